#!/usr/bin/env bash
# Quick start, offline, on a CPU: set everything up, then fine-tune the embedded SmolLM2-135M-Instruct
# with QLoRA on the bundled samples of both tasks, evaluate it, and compare with zero-shot.
# The same scripts and flags a GPU user runs, with the small model and the sample files.
#   bash demo.sh            (about 7 minutes on 2 CPU cores; re-running reuses finished steps)
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODEL=embedded:smollm2-135m-instruct
DATA=data/sample
OUT=${DEMO_DIR:-demo_runs}
# CPU-sized settings: short sequences, one pass, a higher learning rate, no checkpointing overhead.
CPU_TRAINING=(--max_seq_length 128 --batch_size 8 --grad_accum 1 --no-gradient_checkpointing --logging_steps 5)
STEPS=${DEMO_STEPS:-}   # e.g. DEMO_STEPS=2 for a smoke run
LIMIT=${DEMO_LIMIT:-}

step() { echo; echo "=== $1"; }
once() {  # run a command unless its result file exists (the demo is idempotent)
  local result=$1; shift
  if [ -f "$result" ]; then echo "(done before: $result)"; else "$@"; fi
}

step "1/6 zero-shot classification (constrained to the 20 labels)"
once "$OUT/zero-shot-classification/metrics.json" python zephyr_baseline_inference.py \
  --task_type classification --prompt_type zero-shot --pretrained_ckpt "$MODEL" --decoding constrained \
  --max_prompt_tokens 256 --train_file "$DATA/newsgroups_train.jsonl" --test_file "$DATA/newsgroups_test.jsonl" \
  ${LIMIT:+--limit $LIMIT} --output_dir "$OUT/zero-shot-classification"
step "2/6 zero-shot summarization (chat template)"
once "$OUT/zero-shot-summarization/metrics.json" python zephyr_baseline_inference.py \
  --task_type summarization --prompt_type zero-shot --prompt_style chat --pretrained_ckpt "$MODEL" \
  --test_file "$DATA/dialogues_test.jsonl" ${LIMIT:+--limit $LIMIT} --output_dir "$OUT/zero-shot-summarization"
step "3/6 QLoRA fine-tuning: classification"
once "$OUT/classification/train_metrics.json" python zephyr_classification.py --pretrained_ckpt "$MODEL" \
  --train_file "$DATA/newsgroups_train.jsonl" --epochs 1 --full_tune --learning_rate 1e-3 "${CPU_TRAINING[@]}" \
  ${STEPS:+--max_steps $STEPS} --experiment_dir "$OUT/classification" --overwrite
step "4/6 evaluate the fine-tuned classifier"
once "$OUT/classification/metrics_constrained/metrics.json" python zephyr_classification_inference.py \
  --experiment_dir "$OUT/classification" --decoding constrained --test_file "$DATA/newsgroups_test.jsonl" \
  ${LIMIT:+--limit $LIMIT}
step "5/6 QLoRA fine-tuning: summarization"
once "$OUT/summarization/train_metrics.json" python zephyr_summarization.py --pretrained_ckpt "$MODEL" \
  --train_file "$DATA/dialogues_train.jsonl" --epochs 2 --lora_r 16 --learning_rate 1e-3 --prompt_style chat \
  "${CPU_TRAINING[@]}" ${STEPS:+--max_steps $STEPS} --experiment_dir "$OUT/summarization" --overwrite
step "6/6 evaluate the fine-tuned summarizer"
once "$OUT/summarization/metrics/metrics.json" python zephyr_summarization_inference.py \
  --experiment_dir "$OUT/summarization" --test_file "$DATA/dialogues_test.jsonl" --max_new_tokens 60 \
  ${LIMIT:+--limit $LIMIT}

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
read = lambda p: json.loads((out / p).read_text())
zs_c, ft_c = read("zero-shot-classification/metrics.json"), read("classification/metrics_constrained/metrics.json")
zs_s, ft_s = read("zero-shot-summarization/metrics.json"), read("summarization/metrics/metrics.json")
def cell(metrics, key, scale=1.0, unit=""):  # the value and its 95% bootstrap interval
    low, high = (scale * bound for bound in metrics["ci95"][key])
    return f"{scale * metrics[key]:.1f}{unit} [{low:.1f}, {high:.1f}]"
print("\n| sample test set | zero-shot [95% interval] | QLoRA fine-tuned [95% interval] |\n|---|---|---|")
print(f"| 20 Newsgroups accuracy (n={ft_c['n']}) | {cell(zs_c, 'accuracy', 100, '%')} | {cell(ft_c, 'accuracy', 100, '%')} |")
print(f"| dialogues ROUGE-1 (n={ft_s['n']}) | {cell(zs_s, 'rouge1')} | {cell(ft_s, 'rouge1')} |")
print(f"| dialogues ROUGE-2 | {cell(zs_s, 'rouge2')} | {cell(ft_s, 'rouge2')} |")
print(f"\nrun folders: {out}/classification, {out}/summarization (zero-shot results beside them)")
PY
