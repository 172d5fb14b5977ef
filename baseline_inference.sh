#!/usr/bin/env bash
# Zero-shot and few-shot baselines of the base model for both tasks.
#   ./baseline_inference.sh
#   STYLES="seed chat" ./baseline_inference.sh --pretrained_ckpt MODEL --train_file T --test_file E --limit 100
# Results go to $BASELINES/<task>_<prompt type>_<style>/; finished ones are skipped.
set -euo pipefail
cd "$(dirname "$0")"
TASKS=${TASKS:-"classification summarization"}
PROMPT_TYPES=${PROMPT_TYPES:-"zero-shot few-shot"}
STYLES=${STYLES:-"seed"}
source scripts/sweep_lib.sh

for task in $TASKS; do
  for prompt_type in $PROMPT_TYPES; do
    for style in $STYLES; do
      plan "${task}_${prompt_type}_${style}" - zephyr_baseline_inference.py \
        --task_type "$task" --prompt_type "$prompt_type" --prompt_style "$style"
    done
  done
done | run_plan "$@"
