#!/usr/bin/env bash
# SAMSum summarization over LoRA rank, dropout and epochs, each trained then evaluated.
#   ./run_lora.sh
#   RANKS="8 64" DROPOUTS=0.1 EPOCHS_LIST=1 NEFTUNE=5 FULL_TUNE=1 ./run_lora.sh
#   ./run_lora.sh --dry-run --pretrained_ckpt MODEL --train_file T --test_file E --max_steps 5 --limit 20
# Finished runs are skipped; logs go to $EXPERIMENTS/logs/; GPUS=0,1 runs one run per GPU.
set -euo pipefail
cd "$(dirname "$0")"
RANKS=${RANKS:-"2 4 8 16 32 64"}
DROPOUTS=${DROPOUTS:-"0.1 0.2 0.5"}
EPOCHS_LIST=${EPOCHS_LIST:-"1 2 3"}
NEFTUNE=${NEFTUNE:-}
FULL_TUNE=${FULL_TUNE:-}
source scripts/sweep_lib.sh

variant=$(variant_suffix)
for epochs in $EPOCHS_LIST; do
  for rank in $RANKS; do
    for dropout in $DROPOUTS; do
      plan "summarization_epochs-${epochs}_rank-${rank}_dropout-${dropout}${variant}" \
        zephyr_summarization.py zephyr_summarization_inference.py \
        --epochs "$epochs" --lora_r "$rank" --dropout "$dropout" \
        $(variant_flags)
    done
  done
done | run_plan "$@"
