#!/usr/bin/env bash
# Quick end-to-end check on a GPU machine: small real runs of both tasks on the embedded model.
# Usage: MODEL=path/to/model.gguf DATA_DIR=path/to/data OUT=results-folder bash reproduce/gpu_smoke.sh
set -uo pipefail
MODEL=${MODEL:-embedded:smollm2-135m-instruct}
RUNS=${RUNS:-/tmp/runs}
OUT=${OUT:-/tmp/out}
python3 - <<PY
from qlora_kit.modeling import resolve_model_source, load_tokenizer
from qlora_kit.formatting import end_of_turn_token
tok = load_tokenizer(resolve_model_source("$MODEL"))
print("tokenizer:", type(tok).__name__, "eos", tok.eos_token, tok.eos_token_id, "pad", tok.pad_token,
      "end of turn", end_of_turn_token(tok), tok.convert_tokens_to_ids(end_of_turn_token(tok)))
PY
python3 zephyr_classification.py --pretrained_ckpt "$MODEL" --train_file "$DATA_DIR/newsgroups/train.jsonl.gz" \
  --train_sample_fraction 0.05 --epochs 1 --full_tune --experiment_dir "$RUNS/cls" --overwrite 2>&1 | grep -v "it/s]" | tail -12
python3 zephyr_classification_inference.py --experiment_dir "$RUNS/cls" --test_file "$DATA_DIR/newsgroups/test.jsonl.gz" \
  --limit 1000 --overwrite 2>&1 | tail -11
python3 zephyr_summarization.py --pretrained_ckpt "$MODEL" --train_file "$DATA_DIR/samsum/train.jsonl.gz" \
  --max_steps 60 --experiment_dir "$RUNS/sum" --overwrite 2>&1 | grep -v "it/s]" | tail -12
python3 zephyr_summarization_inference.py --experiment_dir "$RUNS/sum" --test_file "$DATA_DIR/samsum/test.jsonl.gz" \
  --limit 200 --overwrite 2>&1 | tail -11
mkdir -p "$OUT"
head -n 5 "$RUNS/cls/metrics/predictions.jsonl" > "$OUT/cls_predictions_head.jsonl"
head -n 5 "$RUNS/sum/metrics/predictions.jsonl" > "$OUT/sum_predictions_head.jsonl"
