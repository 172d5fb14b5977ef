#!/usr/bin/env bash
# Several GPUs on the GPU machine (nvidia-h200-x2): FSDP-QLoRA and data parallel training, and evaluation
# over two processes, each beside one GPU, on a model of Zephyr-7B-beta's exact shape (random weights) with a
# byte-level BPE tokenizer trained on the 20 Newsgroups texts (no model download needed).
#   R=/tmp/mg bash reproduce/multi_gpu.sh build fsdp eval_split ddp
#   R=/tmp/mg bash reproduce/multi_gpu.sh build ddp_speed fsdp_resume smollm2_eval_split sweep_two_gpus
# Needs DATA_DIR (source .device/bin/setup.sh); the SmolLM2 stages also MODEL_GGUF (.device/bin/gguf.sh).
# Writes $R/<stage>/ and prints a summary line per run.
set -uo pipefail
cd "$(dirname "$0")/.."
R=${R:-/tmp/mg}
Z7=${Z7:-/tmp/z7-bpe}
NEWS=$DATA_DIR/newsgroups
SAMSUM=$DATA_DIR/samsum
STEPS=${STEPS:-12}
# extra flags for every evaluation of compare_eval and every run of the sweep (a CPU check: --max_new_tokens 4)
read -r -a EXTRA_EVAL <<< "${EXTRA_EVAL:-}"
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
  compare_eval zephyr_classification "${EVAL_RUN:-$R/fsdp/two}" "$NEWS/test.jsonl.gz" "$R/eval" --max_new_tokens 8
}

# compare_eval SCRIPT RUN TEST_FILE OUT [FLAGS...]: SCRIPT_inference.py on one GPU and on two (torchrun), then
# the identical outputs and the speed-up.
compare_eval() {
  local script=$1 run=$2 test=$3 out=$4
  shift 4
  CUDA_VISIBLE_DEVICES=0 python3 "${script}_inference.py" --experiment_dir "$run" --test_file "$test" \
    --output_dir "$out/one" "$@" "${EXTRA_EVAL[@]}" 2>&1 | quiet | tail -3
  python3 -m torch.distributed.run --nproc_per_node 2 "${script}_inference.py" --experiment_dir "$run" \
    --test_file "$test" --output_dir "$out/two" "$@" "${EXTRA_EVAL[@]}" 2>&1 | quiet | tail -3
  python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
r = Path(sys.argv[1])
one, two = ([json.loads(l) for l in open(r / k / "predictions.jsonl")] for k in ("one", "two"))
m1, m2 = (json.load(open(r / k / "metrics.json")) for k in ("one", "two"))
same = sum(a["output"] == b["output"] for a, b in zip(one, two))
print(f"{r}: {len(one)} examples, identical outputs {same}; examples/s one {m1['examples_per_second']:.1f} "
      f"two {m2['examples_per_second']:.1f} ({m2['examples_per_second'] / m1['examples_per_second']:.2f}x); "
      f"seconds one {m1['generation_seconds']:.1f} two {m2['generation_seconds']:.1f}")
PY
}

# FSDP over 2 GPUs killed (every process, SIGKILL, as a preempted machine) after its second checkpoint and
# resumed, against the same run uninterrupted; then the resumed adapter evaluated on one GPU.
fsdp_resume() {
  local d=$R/fsdp_resume pid flags=($(common) --batch_size 8 --grad_accum 1 --save_steps 4 --keep_checkpoints 8)
  rm -rf "$d"; mkdir -p "$d"
  launch --config_file configs/fsdp_qlora.yaml --num_processes 2 zephyr_classification.py "${flags[@]}" \
    --experiment_dir "$d/uninterrupted" 2>&1 | quiet | tail -3
  launch --config_file configs/fsdp_qlora.yaml --num_processes 2 zephyr_classification.py "${flags[@]}" \
    --experiment_dir "$d/killed" > "$d/first.log" 2>&1 &
  pid=$!
  until [ -s "$d/killed/checkpoints/checkpoint-8/trainer_state.json" ] || ! kill -0 $pid 2>/dev/null; do sleep 0.5; done
  sleep 3
  kill_tree $pid && echo "killed every process of the run (SIGKILL) after checkpoint-8"
  wait $pid 2>/dev/null
  ls "$d/killed/checkpoints"
  launch --config_file configs/fsdp_qlora.yaml --num_processes 2 zephyr_classification.py "${flags[@]}" \
    --experiment_dir "$d/killed" --resume 2>&1 | quiet | tail -3
  python3 - "$d" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
for name in ("uninterrupted", "killed"):
    m = json.loads((d / name / "train_metrics.json").read_text())
    losses = {e["step"]: round(e["loss"], 4) for e in m["log_history"] if "loss" in e}
    print(name, "steps", m["global_steps"], "resumed from", m.get("resumed_from_step"), "logged losses", losses)
PY
  CUDA_VISIBLE_DEVICES=0 python3 zephyr_classification_inference.py --experiment_dir "$d/killed" \
    --test_file "$NEWS/test.jsonl.gz" --limit 300 --max_new_tokens 8 2>&1 | quiet | tail -12
}

# The process and every process below it, SIGKILL (torchrun starts its workers in sessions of their own).
kill_tree() {
  local child
  for child in $(pgrep -P "$1"); do kill_tree "$child"; done
  kill -9 "$1" 2>/dev/null
}

# SmolLM2 with real weights: a short small-model run on one GPU per task, then each task's test set evaluated
# by one process and by two.
smollm2_eval_split() {
  local d=$R/smollm2 task script data flags
  mkdir -p "$d"
  for task in samsum news; do
    if [ $task = samsum ]; then script=zephyr_summarization data=$SAMSUM flags=()
    else script=zephyr_classification data=$NEWS flags=(--decoding constrained); fi
    [ -f "$d/$task-run/train_metrics.json" ] || CUDA_VISIBLE_DEVICES=0 python3 "$script.py" --recipe small-model \
      --pretrained_ckpt "$MODEL_GGUF" --train_file "$data/train.jsonl.gz" --max_steps "${SMOLLM2_STEPS:-300}" \
      --experiment_dir "$d/$task-run" 2>&1 | quiet | tail -2
    compare_eval "$script" "$d/$task-run" "$data/test.jsonl.gz" "$d/eval_$task" "${flags[@]}"
  done
}

# A sweep (run_lora.sh, 4 short SmolLM2 runs trained and evaluated; SWEEP_RANKS) on one GPU and with GPUS=0,1 (one run per
# GPU at a time): wall time of each.
sweep_two_gpus() {
  local gpus started flags=(--pretrained_ckpt "$MODEL_GGUF" --train_file "$SAMSUM/train.jsonl.gz"
    --test_file "$SAMSUM/test.jsonl.gz" --recipe small-model --max_steps "${SWEEP_STEPS:-200}")
  for gpus in 0 0,1; do
    started=$SECONDS
    EXPERIMENTS=$R/sweep/gpus-$gpus GPUS=$gpus RANKS="${SWEEP_RANKS:-8 16 32 64}" DROPOUTS=0.1 EPOCHS_LIST=1 \
      ./run_lora.sh "${flags[@]}" "${EXTRA_EVAL[@]}" 2>&1 | quiet | tail -2
    echo "sweep GPUS=$gpus: $(ls "$R/sweep/gpus-$gpus" | grep -c summarization) runs trained and evaluated in $((SECONDS - started)) s"
  done
}

# One GPU, the default recipe: a run for eval_split (EVAL_RUN=$R/one) without the FSDP stage.
train_one() {
  rm -rf "$R/one"
  CUDA_VISIBLE_DEVICES=0 python3 zephyr_classification.py $(common) --experiment_dir "$R/one" 2>&1 | quiet | tail -3
}

# Data parallel's steady speed (benchmarks/train_throughput.py, 3 passes of 20 steps after the warm-up, real 20
# Newsgroups lengths): the default recipe on one GPU, then on two at the same per-device batch.
ddp_speed() {
  local d=$R/ddp_speed
  mkdir -p "$d"
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/train_throughput.py --model_dir "$Z7" --tasks classification \
    --recipes "fast, all modules" --scratch "$d/scratch" --out "$d/train_throughput_one_gpu.json" | tail -2
  launch --config_file configs/ddp.yaml --num_processes 2 benchmarks/train_throughput.py --model_dir "$Z7" \
    --tasks classification --recipes "fast, all modules" --scratch "$d/scratch" \
    --out "$d/train_throughput_two_gpus.json" 2>&1 | quiet | tail -2
  python3 - "$d" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
one, two = (json.loads((d / f"train_throughput_{n}.json").read_text())["runs"]["classification: fast, all modules"]
            for n in ("one_gpu", "two_gpus"))
print(f"DDP: two GPUs {two['tokens_per_second']:.0f} tokens/s ({two['tokens_per_second_min']:.0f}-"
      f"{two['tokens_per_second_max']:.0f}), one {one['tokens_per_second']:.0f} ({one['tokens_per_second_min']:.0f}-"
      f"{one['tokens_per_second_max']:.0f}): {two['tokens_per_second'] / one['tokens_per_second']:.2f}x")
PY
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
