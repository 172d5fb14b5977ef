#!/usr/bin/env bash
# Real runs on the GPU machine with the embedded SmolLM2-135M-Instruct and the real data:
# one fine-tuned adapter per task evaluated on the full test sets, and the zero/few-shot baselines.
# Usage: DATA_DIR=... MODEL=... RESULTS=results/smollm2 bash reproduce/gpu_results.sh
set -uo pipefail
MODEL=${MODEL:-embedded:smollm2-135m-instruct}
RESULTS=${RESULTS:-results/smollm2}
NEWS=$DATA_DIR/newsgroups
SAMSUM=$DATA_DIR/samsum
mkdir -p "$RESULTS"
run() { echo "+ $*" | tee -a "$RESULTS/commands.txt"; /usr/bin/time -f "  (%e s)" "$@" 2>&1 | grep -v "it/s]\|ex/s]\|examples/s]" | tail -14; }

run python3 zephyr_classification.py --pretrained_ckpt "$MODEL" --train_file "$NEWS/train.jsonl.gz" \
  --train_sample_fraction 0.1 --epochs 1 --batch_size 16 --grad_accum 1 --no-gradient_checkpointing \
  --experiment_dir "$RESULTS/classification_frac0.1"
run python3 zephyr_classification_inference.py --experiment_dir "$RESULTS/classification_frac0.1" \
  --test_file "$NEWS/test.jsonl.gz" --batch_size 256
run python3 zephyr_summarization.py --pretrained_ckpt "$MODEL" --train_file "$SAMSUM/train.jsonl.gz" \
  --max_steps 150 --batch_size 16 --grad_accum 1 --no-gradient_checkpointing \
  --experiment_dir "$RESULTS/summarization_steps150"
run python3 zephyr_summarization_inference.py --experiment_dir "$RESULTS/summarization_steps150" \
  --test_file "$SAMSUM/test.jsonl.gz" --batch_size 128
for style in seed chat; do
  for prompt in zero-shot few-shot; do
    run python3 zephyr_baseline_inference.py --task_type summarization --prompt_type $prompt --prompt_style $style \
      --pretrained_ckpt "$MODEL" --train_file "$SAMSUM/train.jsonl.gz" --test_file "$SAMSUM/test.jsonl.gz" \
      --output_dir "$RESULTS/baselines/summarization/$prompt-$style"
  done
done
for prompt in zero-shot few-shot; do
  run python3 zephyr_baseline_inference.py --task_type classification --prompt_type $prompt \
    --pretrained_ckpt "$MODEL" --train_file "$NEWS/train.jsonl.gz" --test_file "$NEWS/test.jsonl.gz" \
    --batch_size 256 --output_dir "$RESULTS/baselines/classification/$prompt-seed"
done
