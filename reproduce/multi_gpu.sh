#!/usr/bin/env bash
# Several GPUs on the GPU machine (nvidia-h200-x2): FSDP-QLoRA and data parallel training, and evaluation
# over two processes, each beside one GPU, on a model of Zephyr-7B-beta's exact shape (random weights) with a
# byte-level BPE tokenizer trained on the 20 Newsgroups texts (no model download needed).
#   R=/tmp/mg bash reproduce/multi_gpu.sh build fsdp eval_split ddp
# Needs DATA_DIR (source .device/bin/setup.sh). Writes $R/<stage>/ and prints a summary line per run.
set -uo pipefail
cd "$(dirname "$0")/.."
R=${R:-/tmp/mg}
Z7=${Z7:-/tmp/z7-bpe}
NEWS=$DATA_DIR/newsgroups
STEPS=${STEPS:-12}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # multicast stays off
mkdir -p "$R"
quiet() { grep --line-buffered -v "it/s]\|s/it]\|ex/s]\|examples/s]"; }
launch() { python3 -m accelerate.commands.launch "$@"; }
summary() {  # RUN: one line of what train_metrics.json says
  python3 -c "import json,sys; m=json.load(open('$1/train_metrics.json')); print('$1', 'steps', m['global_steps'], 'tokens/s %.0f' % m['tokens_per_second'], 'peak GB (process 0) %.2f' % m['peak_gpu_memory_gb'], 'loss %.3f' % m['train_loss'])"
}

build() {
  python3 - "$Z7" "$NEWS/train.jsonl.gz" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks"); sys.path.insert(0, "tests")
import zephyr_shaped
from tiny_model import build_tokenizer
from qlora_kit.data import read_records
folder = Path(sys.argv[1])
if not (folder / "config.json").is_file():
    zephyr_shaped.build(folder)
    texts = [row["text"] for row in read_records(sys.argv[2])][:3000]
    tokenizer = build_tokenizer(texts)  # 600 byte-level BPE tokens, Zephyr's <s> </s> and chat template
    tokenizer.pad_token = "</s>"
    tokenizer.save_pretrained(folder)
print("model ready", folder)
PY
}

common() { echo --pretrained_ckpt "$Z7" --train_file "$NEWS/train.jsonl.gz" --max_steps "$STEPS" --logging_steps 4; }

# FSDP over 2 GPUs against one GPU at the same per-device batch; the final adapter saved, then evaluated on one.
fsdp() {
  local d=$R/fsdp
  rm -rf "$d"; mkdir -p "$d"
  timeout 400 python3 -m accelerate.commands.launch --config_file configs/fsdp_qlora.yaml --num_processes 2 \
    zephyr_classification.py $(common) --batch_size 8 --grad_accum 1 --save_steps 6 --experiment_dir "$d/two" 2>&1 \
    | quiet | tail -15
  echo "fsdp exit: $?"; ls "$d/two" "$d/two/adapter" 2>&1 | tr '\n' ' '; echo
  summary "$d/two"
  CUDA_VISIBLE_DEVICES=0 python3 zephyr_classification.py $(common) --batch_size 8 --grad_accum 1 \
    --experiment_dir "$d/one" 2>&1 | quiet | tail -3
  summary "$d/one"
  CUDA_VISIBLE_DEVICES=0 python3 zephyr_classification_inference.py --experiment_dir "$d/two" \
    --test_file "$NEWS/test.jsonl.gz" --limit 300 --max_new_tokens 8 2>&1 | quiet | tail -12
}

# Evaluation by one process and by two (torchrun), the same adapter: predictions and examples/s.
eval_split() {
  local d=${EVAL_RUN:-$R/fsdp/two}
  CUDA_VISIBLE_DEVICES=0 python3 zephyr_classification_inference.py --experiment_dir "$d" --test_file \
    "$NEWS/test.jsonl.gz" --max_new_tokens 8 --output_dir "$R/eval/one" 2>&1 | quiet | tail -3
  python3 -m torch.distributed.run --nproc_per_node 2 zephyr_classification_inference.py --experiment_dir "$d" \
    --test_file "$NEWS/test.jsonl.gz" --max_new_tokens 8 --output_dir "$R/eval/two" 2>&1 | quiet | tail -3
  python3 - "$R/eval" <<'PY'
import json, sys
from pathlib import Path
r = Path(sys.argv[1])
one, two = ([json.loads(l) for l in open(r / k / "predictions.jsonl")] for k in ("one", "two"))
m1, m2 = (json.load(open(r / k / "metrics.json")) for k in ("one", "two"))
same = sum(a["output"] == b["output"] for a, b in zip(one, two))
print(f"eval: {len(one)} examples, identical outputs {same}; examples/s one {m1['examples_per_second']:.1f} "
      f"two {m2['examples_per_second']:.1f} ({m2['examples_per_second'] / m1['examples_per_second']:.2f}x); "
      f"seconds one {m1['generation_seconds']:.1f} two {m2['generation_seconds']:.1f}")
PY
}

# One GPU, the default recipe: a run for eval_split (EVAL_RUN=$R/one) without the FSDP stage.
train_one() {
  rm -rf "$R/one"
  CUDA_VISIBLE_DEVICES=0 python3 zephyr_classification.py $(common) --experiment_dir "$R/one" 2>&1 | quiet | tail -3
}

# Data parallel (DDP) over 2 GPUs against one, the default recipe at the same per-device batch.
ddp() {
  local d=$R/ddp
  rm -rf "$d"; mkdir -p "$d"
  launch --config_file configs/ddp.yaml --num_processes 2 zephyr_classification.py $(common) \
    --experiment_dir "$d/two" 2>&1 | quiet | tail -3
  summary "$d/two"
  CUDA_VISIBLE_DEVICES=0 python3 zephyr_classification.py $(common) --experiment_dir "$d/one" 2>&1 | quiet | tail -3
  summary "$d/one"
}

for stage in "$@"; do
  echo "=== $stage"
  "$stage"
done
