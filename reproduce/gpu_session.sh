#!/usr/bin/env bash
# The GPU machine's measurement stages, each a function, run in the order given:
#   CUDA_VISIBLE_DEVICES=0 R=/tmp/work bash reproduce/gpu_session.sh bench_train baselines
# Needs MODEL_GGUF and DATA_DIR (source .device/bin/setup.sh there). Every stage writes under $R/<stage>/
# and its log to $R/logs/<stage>.log; after each stage $R is packed into $PACK (a .tgz), so what finished
# comes back even if a later stage is cut off. The commands here are the ones behind benchmarks/results/
# and results/ (see their READMEs).
set -uo pipefail
cd "$(dirname "$0")/.."
R=${R:-/tmp/work}
PACK=${PACK:-}
NEWS=$DATA_DIR/newsgroups
SAMSUM=$DATA_DIR/samsum
MODEL=${MODEL_GGUF:-}  # not needed by the stages on the 7B-shaped model
Z7=${Z7:-/tmp/z7}  # the Zephyr-7B-shaped model with random weights (built once by build_z7)
LR=${LR:-5e-4}     # learning rate for the SmolLM2 runs (chosen by lr_scan on the validation split)
KR_SAVE=${KR_SAVE:-20}  # kill_resume: checkpoint every KR_SAVE steps, killed after the second, 3*KR_SAVE in all
# Extra flags for every training / evaluation call (a quick CPU check of this script: --max_steps 2, --limit 8).
read -r -a EXTRA_TRAIN <<< "${EXTRA_TRAIN:-}"
read -r -a EXTRA_EVAL <<< "${EXTRA_EVAL:-}"
# The evaluations behind committed results keep the adapter apart from the base, as those were scored (a GPU now
# merges a 16-bit base's by default): a new run compared with them, or pooled with them, differs in the run only.
KEPT_APART=(--no-merge_adapter)
export PYTHONUNBUFFERED=1
# several runs share one GPU: freed blocks are reused across sizes instead of each size holding its own
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
mkdir -p "$R/logs"

quiet() { grep --line-buffered -v "it/s]\|s/it]\|ex/s]\|examples/s]"; }
gpu_name() { python3 -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"; }

build_z7() {
  python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); import zephyr_shaped; zephyr_shaped.build(Path('$Z7'))"
}

# Training throughput of each recipe on the 7B-shaped model, side by side in one run per task.
bench_train() {
  python3 benchmarks/train_throughput.py --model_dir "$Z7" --tasks classification --steps 8 \
    --recipes "original, q,v" "fast, q,v" "original, all modules" "batch 8 (previous default), all modules" \
              "fast, all modules" "packed rows x 16, fused AdamW, Liger, all modules" \
    --out "$R/bench_train/train_throughput_classification.json"
  python3 benchmarks/train_throughput.py --model_dir "$Z7" --tasks summarization --steps 8 \
    --recipes "original, all modules" "fast, all modules" "packed rows x 16, fused AdamW, Liger, all modules" \
              "original, q,v" "fast, q,v" --out "$R/bench_train/train_throughput_summarization.json"
}

# Training speed side by side (benchmarks/train_throughput.py, 3 passes of 20 steps): the original recipe in a
# bare PyTorch + peft loop, the project's recipes, Unsloth (its packages unpacked in $UNSLOTH); per task in
# SPEED_TASKS (default both). The most telling runs first, so that a cut-off run keeps them.
bench_speed() {
  local task recipes=(
    "bare PyTorch + peft loop, original recipe, all modules"
    "fast without Liger, all modules" "Unsloth, fast recipe's batches, every linear layer"
    "fast, decoder layers compiled, every linear layer" "fast, decoder layers compiled, all modules"
    "fast without Liger, every linear layer" "original, all modules")
  for task in ${SPEED_TASKS:-classification summarization}; do
    python3 benchmarks/train_throughput.py --model_dir "$Z7" --tasks "$task" --unsloth_path "${UNSLOTH:-/tmp/uns}" \
      --recipes "${recipes[@]}" --scratch "$R/scratch" --out "$R/bench_speed/train_throughput_$task.json"
  done
}

# The compiled decoder layers against Unsloth and the default, on Unsloth's LoRA targets (every linear layer),
# 20 Newsgroups lengths, 3 passes of 20 steps (411 s with build_z7 on one H200; Unsloth unpacked in $UNSLOTH).
bench_compiled_vs_peer() {
  python3 benchmarks/train_throughput.py --model_dir "$Z7" --tasks classification --unsloth_path "${UNSLOTH:-/tmp/uns}" \
    --scratch "$R/scratch" --recipes "Unsloth, fast recipe's batches, every linear layer" \
    "fast, decoder layers compiled, every linear layer" "fast without Liger, every linear layer" \
    --out "$R/bench_compiled_vs_peer/train_throughput_compiled_vs_unsloth_classification.json"
}

# Against the peer, on its LoRA targets (every linear layer), 20 Newsgroups lengths, 3 passes of 20 steps: without
# LoRA dropout (Unsloth's fused LoRA kernels need none), us and Unsloth, then our fused LoRA layers (--fused_lora);
# the default on all modules with and without fused LoRA, and the bare-loop baseline; then compiled decoder layers
# (speed), activations offloaded to the CPU (memory), and the runs with dropout. The most telling first (a cut-off
# run keeps them). Unsloth unpacked in $UNSLOTH; its first two recipes ran on the GPU (docs/benchmarks.md).
# Whether no dropout learns as well is recipe_check's question (RC_DROPOUT=1); fused LoRA computes the same
# gradients (tests/test_fused_lora.py).
bench_peer_levers() {
  local recipes=(
    "fast without LoRA dropout, every linear layer"
    "Unsloth without LoRA dropout, fast recipe's batches, every linear layer"
    "fast without LoRA dropout, fused LoRA, every linear layer" "fast, all modules" "fast, fused LoRA, all modules"
    "bare PyTorch + peft loop, original recipe, all modules"
    "fast without LoRA dropout, fused LoRA, decoder layers compiled, every linear layer"
    "fast without LoRA dropout, decoder layers compiled, every linear layer"
    "fast without LoRA dropout, activations offloaded to the CPU, every linear layer"
    "fast without LoRA dropout, all modules" "fast without Liger, every linear layer"
    "Unsloth, fast recipe's batches, every linear layer")
  # PEER_FIRST=N: only the first N recipes (each takes about 2 minutes)
  python3 benchmarks/train_throughput.py --model_dir "$Z7" --tasks classification --unsloth_path "${UNSLOTH:-/tmp/uns}" \
    --scratch "$R/scratch" --recipes "${recipes[@]:0:${PEER_FIRST:-${#recipes[@]}}}" \
    --out "$R/bench_peer_levers/train_throughput_peer_levers_classification.json"
}

# The peer against our leanest candidates in one call of about 8 minutes on an H100 (433 s after build_z7; Unsloth
# unpacked in $UNSLOTH), no LoRA dropout, 3 passes of 20 steps: Unsloth (every linear layer); fused LoRA layers
# with the decoder layers compiled, on every linear layer and with lm_head too (the original's --full_tune);
# fused LoRA alone; with Liger's kernels. (PyTorch's fused RMSNorm measured +2% over fused LoRA alone: dropped.)
bench_peer_best() {
  python3 benchmarks/train_throughput.py --model_dir "$Z7" --tasks classification --unsloth_path "${UNSLOTH:-/tmp/uns}" \
    --scratch "$R/scratch" \
    --recipes "Unsloth without LoRA dropout, fast recipe's batches, every linear layer" \
              "fast without LoRA dropout, fused LoRA, decoder layers compiled, every linear layer" \
              "fast without LoRA dropout, fused LoRA, decoder layers compiled, all modules" \
              "fast without LoRA dropout, fused LoRA, every linear layer" \
              "fast without LoRA dropout, fused LoRA, Liger, every linear layer" \
    --out "$R/bench_peer_best/train_throughput_peer_best_classification.json"
}

# The training-speed targets in one run per task (SPEED_TASKS, default both; about 8 minutes a task on an H100
# after build_z7, Unsloth unpacked in $UNSLOTH): the original recipe in a bare PyTorch + peft loop (the baseline of
# the default's speed-up), the default, Unsloth without dropout and our leanest settings on its targets, and the
# leanest with lm_head adapted too (the original's --full_tune). 3 passes of 20 steps each.
bench_targets() {
  local task
  for task in ${SPEED_TASKS:-classification summarization}; do
    python3 benchmarks/train_throughput.py --model_dir "$Z7" --tasks "$task" --unsloth_path "${UNSLOTH:-/tmp/uns}" \
      --scratch "$R/scratch" \
      --recipes "bare PyTorch + peft loop, original recipe, all modules" "fast, all modules" \
                "Unsloth without LoRA dropout, fast recipe's batches, every linear layer" \
                "fast without LoRA dropout, fused LoRA, decoder layers compiled, every linear layer" \
                "fast without LoRA dropout, fused LoRA, decoder layers compiled, all modules" \
      --out "$R/bench_targets/train_throughput_targets_$task.json"
  done
}

# The default against the same with fused LoRA layers (--fused_lora), 20 Newsgroups lengths, 3 passes of 20 steps,
# nothing else on the GPU (about 4 minutes with build_z7).
bench_fused_lora() {
  python3 benchmarks/train_throughput.py --model_dir "$Z7" --tasks classification --scratch "$R/scratch" \
    --recipes "fast, fused LoRA, all modules" "fast, all modules" \
    --out "$R/bench_fused_lora/train_throughput_fused_lora_classification.json"
}

# The trainer's reads from the GPU after every micro-batch (NaN filter of the logged loss, token count) against
# the bare loop that reads nothing: the original recipe (2 micro-batches of 4 a step) and the default (1 of 32),
# with and without the reads, 20 Newsgroups lengths, 3 passes of 20 steps (not yet run on the GPU).
bench_host_reads() {
  python3 benchmarks/train_throughput.py --model_dir "$Z7" --tasks classification --scratch "$R/scratch" \
    --recipes "bare PyTorch + peft loop, original recipe, all modules" "original, all modules" \
              "original, no reads from the GPU per micro-batch, all modules" "fast, all modules" \
              "fast, no reads from the GPU per micro-batch, all modules" \
    --out "$R/bench_host_reads/train_throughput_host_reads_classification.json"
}

# Training-speed levers not in any recipe yet, beside the default, on the 20 Newsgroups lengths (3 passes of 20),
# and the micro-batch --max_memory_gb fits to a 16 GB card. The most telling first (a cut-off run keeps them).
bench_levers() {
  python3 benchmarks/train_throughput.py --model_dir "$Z7" --tasks classification --scratch "$R/scratch" \
    --recipes "fast, all modules" "fast, decoder layers compiled, all modules" \
              "fast, fitted to a 16 GB budget, all modules" \
              "fast, selective checkpointing (attention kept), all modules" "fast, torch.compile, all modules" \
              "fast, activations offloaded to the CPU, all modules" \
    --out "$R/bench_levers/train_throughput_levers_classification.json"
}

# Where the time goes (benchmarks/profiling.py), on the 7B shape, each profile after its timed runs: the
# generation engine on 256 test prompts (every 4th prompt timed first, with and without the stop check every 4
# steps), then the default and the compiled layers' training steps.
bench_profile() {
  python3 benchmarks/generation_throughput.py --model_dir "$Z7" --original_examples 1 --stride_4bit 4 \
    --batch_sizes_plain --batch_sizes_merged --profile_examples 256 --out "$R/bench_profile/generation_profile.json"
  python3 benchmarks/train_throughput.py --model_dir "$Z7" --tasks classification --scratch "$R/scratch" \
    --steps 10 --repeats 1 --profile_steps 3 \
    --recipes "fast, all modules" "fast, decoder layers compiled, all modules" \
    --out "$R/bench_profile/train_throughput_profile_classification.json"
}

# Where the static-cache loop's time goes on the 7B shape: both loops on every 4th test prompt, then the static
# loop profiled on 1,024 prompts (its prefill against its decode, by kernel kind).
bench_gen_static_profile() {
  python3 benchmarks/generation_throughput.py --model_dir "$Z7" --original_examples 1 --stride_4bit 4 \
    --batch_sizes_plain --batch_sizes_merged --stop_check_every 1 --static --profile_examples 1024 \
    --profile_loop static --out "$R/bench_gen_static_profile/generation_static_profile.json"
}

# Where the peer's step time goes beside ours (benchmarks/profiling.py), on its LoRA targets without dropout:
# Unsloth, our leanest (fused LoRA + compiled layers, level with Unsloth), the default's layers; one pass of 10
# steps each, then 3 steps profiled (about 6 minutes with build_z7; Unsloth unpacked in $UNSLOTH).
bench_profile_peer() {
  python3 benchmarks/train_throughput.py --model_dir "$Z7" --tasks classification --unsloth_path "${UNSLOTH:-/tmp/uns}" \
    --scratch "$R/scratch" --steps 10 --repeats 1 --profile_steps 3 \
    --recipes "Unsloth without LoRA dropout, fast recipe's batches, every linear layer" \
    "fast without LoRA dropout, fused LoRA, decoder layers compiled, every linear layer" \
    "fast without LoRA dropout, every linear layer" \
    --out "$R/bench_profile_peer/train_throughput_profile_peer_classification.json"
}

# Where a training step's bytes and kernel time go, by source (benchmarks/step_anatomy.py: every operation with the
# module that ran it, CUDA events around each): the default; on Unsloth's targets without dropout, with peft's
# layers and with fused LoRA layers; ANATOMY_RECIPES for others (the logits only where scored: the same kernel
# time as the default on an H100, so its 0.44x is not in the kernels). One recorded step each on the whole 7B
# shape (72 s for four on an H100).
bench_anatomy() {
  local recipes=("fast, all modules" "fast without LoRA dropout, every linear layer"
                 "fast without LoRA dropout, fused LoRA, every linear layer")
  [ -n "${ANATOMY_RECIPES:-}" ] && mapfile -t recipes <<< "$ANATOMY_RECIPES"
  python3 benchmarks/step_anatomy.py --model_dir "$Z7" --scratch "$R/scratch" --recipes "${recipes[@]}" \
    --out "$R/bench_anatomy/step_anatomy_classification.json"
}

# gen_task TASK: the caller's script, data and decoding for TASK (news or samsum)
gen_task() {
  if [ "$1" = samsum ]; then script=zephyr_summarization data=$SAMSUM decoding=greedy
  else script=zephyr_classification data=$NEWS decoding=constrained; fi
}

# gen_trained RUN: RUN trained with the small-model recipe for GEN_TRAIN_STEPS (300), unless it has finished
# (after gen_task)
gen_trained() {
  [ -f "$1/train_metrics.json" ] || python3 "$script.py" --recipe small-model --pretrained_ckpt "$MODEL" \
    --train_file "$data/train.jsonl.gz" --max_steps "${GEN_TRAIN_STEPS:-300}" --experiment_dir "$1" \
    "${EXTRA_TRAIN[@]}" 2>&1 | quiet | tail -3
}

# gen_bench_run TASK: gen_task TASK, and run= bench_gen_real's run of TASK, trained first if missing (gen_trained)
gen_bench_run() {
  gen_task "$1"
  run=$R/bench_gen_real/$1-run
  gen_trained "$run"
}

# Evaluation speed and exactness on real trained SmolLM2 runs (benchmarks/generation_real_model.py): the engine's
# growing-cache and static-cache loops twice each, a plain batched generate, one example at a time, the engine with
# the adapter merged, and a profile; then the whole inference script timed. The runs: the seeds stage's (GEN_SEED)
# if there, else short runs of the small-model recipe (GEN_TRAIN_STEPS steps: a real adapter is what matters
# here). GEN_BENCH_FLAGS: more flags for the benchmark (e.g. "--batch_sizes_plain 256 --no-merged" for less time).
# GEN_TASKS: which tasks, in order (default "news samsum": 20 Newsgroups' short answers first, the exactness check
# the static loop waits for).
bench_gen_real() {
  local task script data decoding run
  mkdir -p "$R/bench_gen_real"
  for task in ${GEN_TASKS:-news samsum}; do
    gen_task $task
    run=$R/seeds/$task-seed-${GEN_SEED:-0}
    if [ ! -f "$run/train_metrics.json" ]; then
      run=$R/bench_gen_real/$task-run
      gen_trained "$run"
    fi
    # shellcheck disable=SC2086
    python3 benchmarks/generation_real_model.py --experiment_dir "$run" --test_file "$data/test.jsonl.gz" \
      --decoding $decoding --profile --out "$R/bench_gen_real/generation_smollm2_$task.json" ${GEN_BENCH_FLAGS:-}
    timed_inference "$run" "$R/bench_gen_real/${task}_inference"
  done
}

# merged_first_calls ARGS...: the benchmark's engine calls with the adapter merged, before any other generation in
# the process and alone, each batch timed, on the run gen_bench_run chose (ARGS: how many calls, --out, ...)
merged_first_calls() {
  python3 benchmarks/generation_real_model.py --experiment_dir "$run" --test_file "$data/test.jsonl.gz" \
    --decoding "$decoding" --merged_first --only_merged_first "$@"
}

# A process's first generation against its second (the inference script's is its process's first): the 20
# Newsgroups run of bench_gen_real (trained first if missing), the adapter merged, two calls before any other, each
# batch timed; again with PyTorch's default allocator (every stage here sets expandable segments); then the first
# call profiled (the host's largest costs: allocation, kernel loading, graph capture).
bench_gen_first_call() {
  local task=news script data decoding run out=$R/bench_gen_first_call/generation_smollm2_news_first_call
  gen_bench_run $task
  mkdir -p "$R/bench_gen_first_call"
  merged_first_calls --engine_calls 2 --out "$out.json"
  (unset PYTORCH_CUDA_ALLOC_CONF; merged_first_calls --engine_calls 2 --out "${out}_default_allocator.json")
  merged_first_calls --engine_calls 1 --profile_first --out "${out}_profiled.json"
}

# Prefill's attention with cuDNN's kernels (QLORA_KIT_PREFILL_ATTENTION=pytorch: PyTorch's choice, an execution plan
# built per new shape) against without (no-cudnn, the default), side by side on bench_gen_real's 20 Newsgroups run:
# the adapter merged, two calls a process, each batch timed, the two settings alternating, PASSES (3) processes
# each; then the inference script PASSES times under each (time_inference, as TIMED_AS=prefill_pytorch and
# TIMED_AS=prefill_no_cudnn). Measured on an H200 with GEN_TRAIN_STEPS=100 PASSES=2 (5 minutes, training included).
bench_prefill_attention() {
  local task=news script data decoding run pass setting out=$R/bench_prefill_attention/generation_smollm2_news_prefill
  gen_bench_run $task
  mkdir -p "$R/bench_prefill_attention"
  for pass in $(seq 1 "${PASSES:-3}"); do
    for setting in pytorch no-cudnn; do
      QLORA_KIT_PREFILL_ATTENTION=$setting merged_first_calls --engine_calls 2 --out "${out}_${setting/-/_}_pass$pass.json"
    done
  done
  for setting in pytorch no-cudnn; do
    GEN_TASKS=news TIMED_AS=prefill_${setting/-/_} QLORA_KIT_PREFILL_ATTENTION=$setting time_inference
  done
}

# Exactness against one at a time under other GPU numerics (bench_gen_real's runs of EXACT_TASKS, default news;
# SAMSum's too with EXACT_TASKS="news samsum"): the static loop through peft's layers and EXACT_N (200) evenly spread
# prompts one at a time, in one process for each of EXACT_NUMERICS (default: PyTorch's defaults, no
# reduced-precision reductions in cuBLAS, everything in fp32); each way's answers are also scored against one at a
# time's, paired (accuracy, or SAMSum's ROUGE). EXACT_RECHECK (e.g. "0.5 2"): the margins at which the static loop
# also decodes its near ties again alone (--recheck_margins), after its first call records how near a tie every
# answer came; EXACT_TRACK=1: that record, and one at a time's prompts decoded alone as a recheck would, without the
# timed calls (--track_margins). EXACT_FLAGS: more of generation_real_model.py's flags, e.g. SAMSum's defaults on a
# GPU: "--merged --compact_below 0.25" (the adapter merged into the 16-bit base, finished rows dropped), scored
# against one at a time too. (One attention kernel for batches and single prompts alike, --sdpa_backend
# efficient, has no kernel for an unpadded prompt's grouped key/value heads on a GPU.)
bench_gen_exactness() {
  local task script data decoding run numerics name
  mkdir -p "$R/bench_gen_exactness"
  for task in ${EXACT_TASKS:-news}; do
    gen_bench_run "$task"
    for numerics in ${EXACT_NUMERICS:-defaults --exact_reductions --fp32}; do
      name=$(echo "$numerics" | tr -d '-')
      [ "$numerics" = defaults ] && numerics=""
      # shellcheck disable=SC2086
      python3 benchmarks/generation_real_model.py --experiment_dir "$run" --test_file "$data/test.jsonl.gz" \
        --decoding "$decoding" --engine_calls 1 --no-merged --batch_sizes_plain --stop_check_every 1 \
        --static_stop_check_every 1 --one_at_a_time "${EXACT_N:-200}" $numerics \
        ${EXACT_RECHECK:+--recheck_margins $EXACT_RECHECK} ${EXACT_TRACK:+--track_margins} ${EXACT_FLAGS:-} \
        --out "$R/bench_gen_exactness/generation_smollm2_${task}_exactness_$name.json"
    done
  done
}

# timed_inference RUN OUTPUT: the caller's inference script with its defaults on RUN's test set into OUTPUT, and the
# whole process's wall time (imports included) in OUTPUT/wall.json (after gen_task)
timed_inference() {
  local started
  started=$(date +%s.%N)
  python3 "${script}_inference.py" --experiment_dir "$1" --test_file "$data/test.jsonl.gz" \
    $([ "$task" = news ] && echo --decoding constrained) --output_dir "$2" "${EXTRA_EVAL[@]}" 2>&1 | quiet | tail -4
  python3 -c "import json, sys, time; print(json.dumps({'script': sys.argv[1], 'wall_seconds': time.time() - float(sys.argv[2])}))" \
    "${script}_inference.py" "$started" | tee "$2/wall.json"
}

# The inference scripts alone, as a user runs them (every default: on a GPU the adapter merged into the 16-bit base,
# the static loop, SAMSum's finished rows dropped), PASSES (3) processes a task, on bench_gen_real's runs (trained
# first if missing: GEN_TRAIN_STEPS steps of the small-model recipe). Each pass's metrics.json has the generation
# time, wall.json the whole process's; inference_script_smollm2_TASK_defaults.json all passes. TIMED_AS: a name for
# the timings of a setting changed by the environment (e.g. TIMED_AS=prefill_pytorch
# QLORA_KIT_PREFILL_ATTENTION=pytorch): they go to time_inference_NAME.
time_inference() {
  local task script data decoding run pass out=$R/time_inference${TIMED_AS:+_$TIMED_AS}
  for task in ${GEN_TASKS:-news samsum}; do
    gen_bench_run $task
    for pass in $(seq 1 "${PASSES:-3}"); do
      timed_inference "$run" "$out/${task}_pass$pass"
    done
  done
  local setting="every default"
  [ -n "${TIMED_AS:-}" ] && setting="$(env | grep '^QLORA_KIT_' | tr '\n' ' ')every other default"
  python3 reproduce/inference_timings.py "$out" "$R/bench_gen_real" --out_dir "$out" --name "${TIMED_AS:-defaults}" \
    --setting "$setting" --overwrite --device "$(gpu_name)"
}

# Evaluation's element-wise kernels on a small model: SmolLM2 in 4-bit, zero-shot on 20 Newsgroups' first
# KERNEL_ROWS (4000) test rows, PyTorch's kernels and Liger's (QLORA_KIT_INFERENCE_KERNELS) at the default batch
# budget, then both at 262,144 tokens a batch, each in its own process; then their speed and answers compared
# (compare_evaluations.py; two budgets give each kernel's own spread of answers). About 3 minutes on an H100, the
# first Liger process compiling its kernels.
bench_kernels_smollm2() {
  local out=$R/bench_kernels_smollm2 name kernels budget pairs=()
  for name in pytorch liger pytorch_262k liger_262k; do
    kernels=${name%_262k} budget=()
    [ "$name" != "$kernels" ] && budget=(--max_batch_tokens 262144)
    QLORA_KIT_INFERENCE_KERNELS=$kernels python3 zephyr_baseline_inference.py --task_type classification \
      --prompt_type zero-shot --pretrained_ckpt "$MODEL" --load_in_4bit --train_file "$NEWS/train.jsonl.gz" \
      --test_file "$NEWS/test.jsonl.gz" --limit "${KERNEL_ROWS:-4000}" "${budget[@]}" "${EXTRA_EVAL[@]}" \
      --output_dir "$out/$name"
    pairs+=("$name=$out/$name")
  done
  python3 reproduce/compare_evaluations.py "${pairs[@]}" --device "$(gpu_name)" --setting "zephyr_baseline_inference.py, \
SmolLM2-135M-Instruct in 4-bit NF4, 20 Newsgroups zero-shot, the first ${KERNEL_ROWS:-4000} test rows; each in its \
own process, in this order, on one machine" --out "$out/inference_kernels_smollm2_zero_shot.json" --overwrite
}

# The small-model recipe's training steps on SmolLM2, as shipped and with one lever each (SMALL_RECIPES, ';'
# between names: compiled decoder layers without Liger's kernels (torch.compile fails on them), with fused LoRA too,
# vocabulary logits at every position, without Liger's kernels, fused LoRA, without the trainer's reads from the GPU
# per micro-batch, the adapted layers' inputs not cast to the adapter's fp32),
# 3 passes of 20 steps, the lengths of SMALL_TASKS (default both) as benchmarks/train_lengths.json has them, at most
# 512 tokens; then SMALL_PROFILE_STEPS (2) steps of each profiled: a 135M model's step is far from the GPU's limit,
# the profile says where it goes (host or kernels). SMALL_SUFFIX names the output file apart.
SMALL_RECIPES_DEFAULT=("small-model, all modules" "small-model without Liger, decoder layers compiled, all modules"
  "small-model without Liger, fused LoRA, decoder layers compiled, all modules"
  "small-model, vocabulary logits at every position, all modules" "small-model without Liger, all modules"
  "small-model, fused LoRA, all modules" "small-model, no reads from the GPU per micro-batch, all modules"
  "small-model, LoRA inputs left in bf16, all modules")
bench_small_model() {
  local smollm2 recipes=("${SMALL_RECIPES_DEFAULT[@]}") tasks
  [ -n "${SMALL_RECIPES:-}" ] && IFS=';' read -r -a recipes <<< "$SMALL_RECIPES"
  read -r -a tasks <<< "${SMALL_TASKS:-classification summarization}"
  smollm2=$(python3 -c "from qlora_kit import modeling; print(modeling.resolve_model_source('$MODEL'))" | tail -1)
  python3 benchmarks/train_throughput.py --model_dir "$smollm2" --tasks "${tasks[@]}" --recipes "${recipes[@]}" \
    --scratch "$R/scratch" --profile_steps "${SMALL_PROFILE_STEPS:-2}" \
    --out "$R/bench_small_model/train_throughput_small_model${SMALL_SUFFIX:-}.json"
}

# The prefix every prompt of a batch shares (few-shot examples, the zero-shot instruction and classes, the chat
# template) prefilled once against every row prefilling it, on the 7B-shaped model in 4-bit (after build_z7):
# PREFIX_TIME (512) evenly spread 20 Newsgroups test prompts a format, 3 repeats each way, and the positions counted
# on the whole test set. Needs SmolLM2's tokenizer (bash reproduce/stage_tokenizer.sh here: .device/tokenizer).
bench_prefix() {
  python3 benchmarks/prefill_work.py --tokenizer "${TOKENIZER_DIR:-.device/tokenizer}" --model "$Z7" --load_in_4bit \
    --data_dir "$DATA_DIR" --tasks classification --formats few-shot/seed zero-shot/seed finetune/chat \
    --max_batch_tokens 110000 --time "${PREFIX_TIME:-512}" --out "$R/bench_prefix/prefill_work_zephyr7b_shape.json"
}

# All-module LoRA with the vocabulary logits at every position (the default) against only where the answer is
# scored (--logits_where_scored), side by side, on the 7B-shaped model (after build_z7) and on SmolLM2
# (vocabulary 49,152 over a 576-wide model).
bench_logits() {
  local recipes=("fast, all modules" "fast, all modules, logits where scored") smollm2
  python3 benchmarks/train_throughput.py --model_dir "$Z7" --steps 8 --recipes "${recipes[@]}" \
    --out "$R/bench_logits/train_throughput_logits_zephyr7b_shape.json"
  smollm2=$(python3 -c "from qlora_kit import modeling; print(modeling.resolve_model_source('$MODEL'))" | tail -1)
  python3 benchmarks/train_throughput.py --model_dir "$smollm2" --steps 8 --recipes "${recipes[@]}" \
    --out "$R/bench_logits/train_throughput_logits_smollm2.json"
}

# The original one-at-a-time way against the engine, the whole test set on the 4-bit model.
bench_gen() {
  python3 benchmarks/generation_throughput.py --model_dir "$Z7" --original_examples 4 --stride_4bit 1 \
    --stride_merged 2 --out "$R/bench_gen/generation_throughput.json"
}

# The decode loops on the whole test set, 4-bit model: the growing cache (the default) against the static cache
# (CUDA graphs), beside the original one-at-a-time way and a plain batched generate (every 8th prompt).
bench_gen_loops() {
  python3 benchmarks/generation_throughput.py --model_dir "$Z7" --original_examples 4 --stride_4bit 1 \
    --batch_sizes_merged --batch_sizes_plain 256 --stride_plain 8 --stop_check_every 1 --static \
    --out "$R/bench_gen_loops/generation_throughput_loops.json"
}

# Evaluation's default on a GPU (the static loop, the adapter's product added in place) on the whole test set, 4-bit
# model, at the benchmark's 110k tokens a batch and at smaller budgets (BUDGETS, default 96000 80000: a peak within
# 22 GB is aimed at; 110k measured 23.8 GB), beside peft's layers at 110k; PASSES (2) processes, about 5 minutes
# each on an H100 with the growing cache's reference run, after build_z7 (measured: 80,000 tokens, 20.0 GB).
# BUDGET_FLAGS: more flags for the benchmark (--no-static leaves out peft's layers, a minute a pass). TIMED_AS: a
# name for a setting changed by the environment, in the files' names (as time_inference has it).
bench_gen_budget() {
  local pass budgets
  read -r -a budgets <<< "${BUDGETS:-96000 80000}"
  for pass in $(seq 1 "${PASSES:-2}"); do
    # shellcheck disable=SC2086
    python3 benchmarks/generation_throughput.py --model_dir "$Z7" --original_examples 0 --stride_4bit 1 \
      --batch_sizes_merged --batch_sizes_plain --stop_check_every 1 --fused_lora_inference ${BUDGET_FLAGS:-} \
      --fused_max_batch_tokens "${budgets[@]}" \
      --out "$R/bench_gen_budget/generation_throughput_budget${TIMED_AS:+_$TIMED_AS}_pass$pass.json"
  done
}

# The 7B shape's whole test set as evaluation runs it on a GPU (the static loop, the adapter's product added in
# place) at BUDGETS (80000: a peak within 22 GB) tokens a batch under each value of one QLORA_KIT_* setting, the
# values alternating, PASSES (3) processes each, CALLS (2) calls a process: its first (graph capture, the kernels'
# first loads, cuDNN's plans, Triton's compiles), then warm ones. No reference run (the answers of random weights are
# near-ties, compared elsewhere). After build_z7. BUDGET_FLAGS: more flags for the benchmark.
# Arguments: the setting's variable, its values, the name of the stage's folder and files.
gen_budget_alternating() {
  local variable=$1 values=$2 name=$3 pass setting call budgets=()
  # shellcheck disable=SC2206
  for call in $(seq 1 "${CALLS:-2}"); do budgets+=(${BUDGETS:-80000}); done
  for pass in $(seq 1 "${PASSES:-3}"); do
    for setting in $values; do
      # shellcheck disable=SC2086
      env "$variable=$setting" python3 benchmarks/generation_throughput.py --model_dir "$Z7" \
        --original_examples 0 --stride_4bit 1 --batch_sizes_4bit --batch_sizes_merged --batch_sizes_plain \
        --fused_max_batch_tokens "${budgets[@]}" ${BUDGET_FLAGS:-} \
        --out "$R/bench_gen_$name/generation_throughput_${name}_${setting/-/_}_pass$pass.json"
    done
  done
}

# Prefill's attention without cuDNN's (the default) against PyTorch's choice (QLORA_KIT_PREFILL_ATTENTION=pytorch).
bench_gen_budget_prefill() {
  gen_budget_alternating QLORA_KIT_PREFILL_ATTENTION "pytorch no-cudnn" budget_prefill
}

# PyTorch's element-wise kernels against Liger's RMSNorm, RoPE and SwiGLU kernels (QLORA_KIT_INFERENCE_KERNELS=liger,
# needs liger-kernel; measured 1.16x, 3 passes on an H100, now the default for a 4-bit model on a GPU). KERNELS: which
# of the two, in order (e.g. KERNELS=liger: the default alone, PASSES processes, about 2.5 minutes each on an H100).
bench_gen_budget_kernels() {
  gen_budget_alternating QLORA_KIT_INFERENCE_KERNELS "${KERNELS:-pytorch liger}" budget_kernels
}

# Where evaluation's time goes on the 7B shape as a GPU runs it (the static loop, the adapter's product added in
# place, prefill without cuDNN's attention): the whole test set at BUDGETS (80000) tokens a batch timed once, then
# 1,024 evenly spread prompts profiled at that budget. After build_z7; about a minute and a half on an H100.
# BUDGETS="80000 80000": a first and a warm call.
bench_gen_fused_profile() {
  # shellcheck disable=SC2086
  python3 benchmarks/generation_throughput.py --model_dir "$Z7" --original_examples 0 --stride_4bit 1 \
    --batch_sizes_4bit --batch_sizes_merged --batch_sizes_plain --fused_max_batch_tokens ${BUDGETS:-80000} \
    --profile_examples "${PROFILE_EXAMPLES:-1024}" --profile_loop fused ${BUDGET_FLAGS:-} \
    --out "$R/bench_gen_fused_profile/generation_fused_profile.json"
}

# SmolLM2 with trained adapters (bench_gen_real's runs, trained first if missing): the adapter's product added in
# place against the adapter merged into the 16-bit base, each task's whole test set, PASSES (3) processes (measured:
# merged 1.27-1.64x in every pass, now the default for a 16-bit base on a GPU). Also the product in place in batches
# of at most GEN_BATCH_TOKENS tokens (default 65536 131072; measured 0.41-0.68x: "" leaves them out); and dropping a
# batch's finished rows once at most GEN_COMPACT of them still decode (default 0.5 0.25), in place and merged
# (measured at 0.25: SAMSum 1.05-1.16x merged, 0.98-1.22x in place, now its default; not on 20 Newsgroups). The
# merged question alone: GEN_TASKS=samsum GEN_TRAIN_STEPS=100 GEN_BATCH_TOKENS="" GEN_COMPACT=0.25 (4 minutes).
bench_gen_merged() {
  local task script data decoding run pass budgets shares
  read -r -a budgets <<< "${GEN_BATCH_TOKENS-65536 131072}"
  read -r -a shares <<< "${GEN_COMPACT-0.5 0.25}"
  mkdir -p "$R/bench_gen_merged"
  for task in ${GEN_TASKS:-news samsum}; do
    gen_bench_run $task
    for pass in $(seq 1 "${PASSES:-3}"); do
      python3 benchmarks/generation_real_model.py --experiment_dir "$run" --test_file "$data/test.jsonl.gz" \
        --decoding $decoding --engine_calls 1 --batch_sizes_plain --stop_check_every 1 --static_stop_check_every \
        --one_at_a_time 0 --fused_lora_inference --static_batch_tokens "${budgets[@]}" --compact_below "${shares[@]}" \
        --out "$R/bench_gen_merged/generation_smollm2_${task}_pass$pass.json"
    done
  done
}

# The static loop with the adapter as peft loads it (fp32 on a 4-bit base), in batches of at most 49,152 tokens
# (the KV cache of a card with 16 GB to spare), with its product added in place (fused_lora for inference), and with
# its weights cast to bf16: every 4th test prompt, 4-bit model, three passes (350 s for the three on an H100,
# the model's loading and the growing cache's reference run included).
bench_gen_inference_lora() {
  local pass
  for pass in 1 2 3; do
    python3 benchmarks/generation_throughput.py --model_dir "$Z7" --original_examples 0 --stride_4bit 4 \
      --batch_sizes_merged --batch_sizes_plain --stop_check_every 1 --static_max_batch_tokens 49152 \
      --fused_lora_inference --adapter_in_compute_dtype \
      --out "$R/bench_gen_inference_lora/generation_throughput_inference_lora_pass$pass.json"
  done
}

# A real run killed once (SIGKILL, as a preempted machine) and resumed, against an uninterrupted one.
kill_resume() {
  local d=$R/kill_resume
  local common=(--pretrained_ckpt "$MODEL" --train_file "$SAMSUM/train.jsonl.gz" --max_steps $((3 * KR_SAVE))
                --save_steps "$KR_SAVE" --logging_steps 5 --batch_size 16)
  python3 zephyr_summarization.py "${common[@]}" --experiment_dir "$d/uninterrupted" 2>&1 | quiet | tail -12
  python3 zephyr_summarization.py "${common[@]}" --experiment_dir "$d/interrupted" > "$d.first.log" 2>&1 &
  local pid=$!
  until [ -s "$d/interrupted/checkpoints/checkpoint-$((2 * KR_SAVE))/trainer_state.json" ] || ! kill -0 $pid 2>/dev/null; do
    sleep 0.5
  done
  sleep 3
  kill -9 $pid && echo "killed the training process (SIGKILL) after checkpoint-$((2 * KR_SAVE))"
  wait $pid
  ls "$d/interrupted/checkpoints"
  python3 zephyr_summarization.py "${common[@]}" --experiment_dir "$d/interrupted" --resume 2>&1 | quiet | tail -12
  python3 - "$d" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
for name in ("uninterrupted", "interrupted"):
    m = json.loads((d / name / "train_metrics.json").read_text())
    losses = {e["step"]: round(e["loss"], 4) for e in m["log_history"] if "loss" in e}
    print(name, "final loss", m["final_loss"], "steps", m["global_steps"], "logged losses", losses)
PY
}

# Hyperparameters on a validation split: learning rates for the 10% classification runs,
# 10% of the training set held out (stratified) and scored.
lr_scan() {
  local lr
  for lr in ${LRS:-2e-4 5e-4 1e-3 2e-3}; do
    (python3 zephyr_classification.py --pretrained_ckpt "$MODEL" --train_file "$NEWS/train.jsonl.gz" \
       --validation_fraction 0.1 --train_sample_fraction 0.1 --epochs 3 --batch_size 16 --no-gradient_checkpointing \
       --learning_rate $lr --experiment_dir "$R/lr_scan/lr-$lr" "${EXTRA_TRAIN[@]}" > "$R/logs/lr_scan_$lr.log" 2>&1 &&
     python3 zephyr_classification_inference.py "${KEPT_APART[@]}" --experiment_dir "$R/lr_scan/lr-$lr" --split validation \
       --train_file "$NEWS/train.jsonl.gz" --max_batch_tokens 300000 "${EXTRA_EVAL[@]}" >> "$R/logs/lr_scan_$lr.log" 2>&1) &
  done
  wait
  python3 - "$R/lr_scan" <<'PY'
import json, sys
from pathlib import Path
for run in sorted(Path(sys.argv[1]).glob("lr-*")):
    train = json.loads((run / "train_metrics.json").read_text()) if (run / "train_metrics.json").is_file() else {}
    metrics = run / "metrics_validation" / "metrics.json"
    m = json.loads(metrics.read_text()) if metrics.is_file() else {}
    print(run.name, "eval_loss", train.get("eval_loss"), "validation accuracy", m.get("accuracy"),
          "invalid", m.get("invalid_rate"), "train s", train.get("train_runtime_s"))
PY
}

# Zero-shot and few-shot baselines of both tasks, both prompt styles, 4 at a time on one GPU.
baselines() {
  local gpu=${CUDA_VISIBLE_DEVICES:-0}
  TASKS=classification STYLES="seed chat" BASELINES="$R/baselines" EXPERIMENTS="$R/baselines" \
    GPUS=$gpu,$gpu,$gpu,$gpu ./baseline_inference.sh --pretrained_ckpt "$MODEL" --train_file "$NEWS/train.jsonl.gz" \
    --test_file "$NEWS/test.jsonl.gz" --max_batch_tokens 300000 "${EXTRA_EVAL[@]}"
  TASKS=summarization STYLES="seed chat" BASELINES="$R/baselines" EXPERIMENTS="$R/baselines" \
    GPUS=$gpu,$gpu,$gpu,$gpu ./baseline_inference.sh --pretrained_ckpt "$MODEL" --train_file "$SAMSUM/train.jsonl.gz" \
    --test_file "$SAMSUM/test.jsonl.gz" --max_batch_tokens 300000 "${EXTRA_EVAL[@]}"
}

# The sample ablation at 2.5%, 5% and 10% for the four variants; a small model leaves the GPU
# mostly idle, so several runs share each GPU (GPUS lists a GPU once per run slot).
grid() {
  local flags=(--pretrained_ckpt "$MODEL" --train_file "$NEWS/train.jsonl.gz" --test_file "$NEWS/test.jsonl.gz"
               --batch_size 16 --no-gradient_checkpointing --learning_rate "$LR" --max_batch_tokens 300000
               "${KEPT_APART[@]}" "${EXTRA_TRAIN[@]}" "${EXTRA_EVAL[@]}")  # each script takes the flags it knows
  env FRACTIONS="0.025 0.05 0.1" EPOCHS=3 EXPERIMENTS="$R/grid" GPUS=${GPU_A:-0},${GPU_A:-0},${GPU_A:-0} \
    ./sample_ablate.sh "${flags[@]}" &
  env FRACTIONS="0.025 0.05 0.1" EPOCHS=3 EXPERIMENTS="$R/grid" NEFTUNE=5 GPUS=${GPU_A:-0},${GPU_A:-0},${GPU_A:-0} \
    ./sample_ablate.sh "${flags[@]}" &
  env FRACTIONS="0.025 0.05 0.1" EPOCHS=3 EXPERIMENTS="$R/grid" FULL_TUNE=1 GPUS=${GPU_B:-0},${GPU_B:-0},${GPU_B:-0} \
    ./sample_ablate.sh "${flags[@]}" &
  env FRACTIONS="0.025 0.05 0.1" EPOCHS=3 EXPERIMENTS="$R/grid" NEFTUNE=5 FULL_TUNE=1 \
    GPUS=${GPU_B:-0},${GPU_B:-0},${GPU_B:-0} ./sample_ablate.sh "${flags[@]}" &
  wait
}

# Learning is not traded for speed: the default recipe against the original after the same examples,
# SAMSum, evaluation loss on the validation split. 1,600 dialogues: exactly one mega-batch of the length-grouped
# sampler at batch 32 (50 batches), so both see a random sample, not the longest batches of a part-read mega-batch.
recipe_check() {
  compare_recipes recipe_check "original|--recipe original --max_steps 200
fast|--recipe fast --max_steps 50
batch8-lr2e-4|--recipe fast --batch_size 8 --learning_rate 2e-4 --max_steps 200$(
  [ "${RC_DROPOUT:-0}" = 1 ] && printf '\nfast-no-dropout|--recipe fast --dropout 0 --max_steps 50')"
}

# Candidate recipes with more examples per optimizer step, against the original, at about the same
# number of training examples (2,000 dialogues: 250 x 8, 63 x 32, 45 packed steps of about 44; the 63 grouped
# batches of 32 hold 19% more tokens: the last 13 are the longest of a second mega-batch).
# RC_VARIANTS: one "name|flags" per line.
recipe_compare() {
  compare_recipes recipe_compare "${RC_VARIANTS:-original|--recipe original --max_steps 250
bs32-lr4e-4|--batch_size 32 --learning_rate 4e-4 --max_steps 63
bs32-lr8e-4|--batch_size 32 --learning_rate 8e-4 --max_steps 63
packed16-lr8e-4|--batch_size 16 --packing --no-group_by_length --learning_rate 8e-4 --max_steps 45}"
}

# compare_recipes NAME VARIANTS: SAMSum trained once per "name|flags" line, all at once on one GPU, scored by the
# evaluation loss on the validation split; results in $R/NAME/<name>.
compare_recipes() {
  local stage=$1 name flags
  while IFS='|' read -r name flags; do
    [ -n "$name" ] || continue
    # shellcheck disable=SC2086
    python3 zephyr_summarization.py --pretrained_ckpt "$MODEL" --train_file "$SAMSUM/train.jsonl.gz" \
      --validation_file "$SAMSUM/validation.jsonl.gz" $flags --experiment_dir "$R/$stage/$name" \
      "${EXTRA_TRAIN[@]}" > "$R/logs/${stage}_$name.log" 2>&1 &
  done <<< "$2"
  wait
  python3 - "$R/$stage" <<'PY'
import json, sys
from pathlib import Path
for run in sorted(Path(sys.argv[1]).iterdir()):
    m = json.loads((run / "train_metrics.json").read_text()) if (run / "train_metrics.json").is_file() else {}
    print(run.name, {k: m.get(k) for k in ("eval_loss", "final_loss", "global_steps", "train_runtime_s",
                                           "tokens_per_second", "peak_gpu_memory_gb")})
PY
}

# The scripts under accelerate launch on 2 GPUs: data-parallel training, split evaluation (same
# predictions as one process), and the FSDP-QLoRA config.
multi_gpu() {
  local d=$R/multi_gpu
  local data=(--pretrained_ckpt "$MODEL" --train_file "$NEWS/train.jsonl.gz")
  python3 -m accelerate.commands.launch --config_file configs/ddp.yaml --num_processes 2 zephyr_classification.py "${data[@]}" \
    --train_sample_fraction 0.05 --epochs 1 --batch_size 4 --experiment_dir "$d/ddp" "${EXTRA_TRAIN[@]}" 2>&1 | quiet | tail -15
  python3 -m accelerate.commands.launch --config_file configs/ddp.yaml --num_processes 2 zephyr_classification_inference.py \
    --experiment_dir "$d/ddp" --test_file "$NEWS/test.jsonl.gz" "${EXTRA_EVAL[@]}" 2>&1 | quiet | tail -12
  CUDA_VISIBLE_DEVICES=0 python3 zephyr_classification_inference.py --experiment_dir "$d/ddp" \
    --test_file "$NEWS/test.jsonl.gz" --output_dir "$d/one_process_eval" "${EXTRA_EVAL[@]}" 2>&1 | quiet | tail -12
  python3 - "$d" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
config = json.loads((d / "ddp" / "run_config.json").read_text())
print("processes", config["processes"], "effective batch", config["effective_batch_size"])
two = [json.loads(line) for line in open(d / "ddp" / "metrics" / "predictions.jsonl")]
one = [json.loads(line) for line in open(d / "one_process_eval" / "predictions.jsonl")]
same = sum(a["id"] == b["id"] and a["output"] == b["output"] for a, b in zip(one, two))
m2 = json.loads((d / "ddp" / "metrics" / "metrics.json").read_text())
m1 = json.loads((d / "one_process_eval" / "metrics.json").read_text())
print(f"2 processes vs 1: {same}/{len(one)} same predictions in the same order; accuracy {m2['accuracy']} vs {m1['accuracy']}; "
      f"generation {m2['generation_seconds']:.1f}s vs {m1['generation_seconds']:.1f}s")
PY
  python3 -m accelerate.commands.launch --config_file configs/fsdp_qlora.yaml --num_processes 2 zephyr_classification.py "${data[@]}" \
    --train_sample_fraction 0.05 --max_steps 20 --batch_size 4 --experiment_dir "$d/fsdp" "${EXTRA_TRAIN[@]}" 2>&1 | quiet | tail -15
}

# The full training sets with all-module LoRA: 20 Newsgroups with the learning rate chosen by lr_scan,
# scored with greedy decoding (the sweep) and with constrained decoding (every answer a label); SAMSum for each
# prompt style in SAMSUM_STYLES and epoch count in SAMSUM_EPOCHS, each scored on validation (to choose) and test.
# Longer than one 10-minute command: with STOP_AFTER every run checkpoints and stops in time; run the stage again
# and the sweeps resume them.
full_data() {
  local common=(--pretrained_ckpt "$MODEL" --batch_size 16 --no-gradient_checkpointing --learning_rate "$LR"
                --max_batch_tokens 300000 --save_steps 100 "${EXTRA_TRAIN[@]}" "${EXTRA_EVAL[@]}")
  (env FRACTIONS=1.0 EPOCHS=3 EXPERIMENTS="$R/full" FULL_TUNE=1 GPUS=${GPU_A:-0} ./sample_ablate.sh "${common[@]}" \
     --train_file "$NEWS/train.jsonl.gz" --test_file "$NEWS/test.jsonl.gz"
   run=$R/full/classification_sampleFraction-1.0_epochs-3_rank-8_dropout-0.1_full
   if [ -f "$run/metrics/metrics.json" ] && [ ! -f "$run/metrics_constrained/metrics.json" ]; then
     python3 zephyr_classification_inference.py "${KEPT_APART[@]}" --experiment_dir "$run" --test_file "$NEWS/test.jsonl.gz" \
       --decoding constrained --output_dir "$run/metrics_constrained" --max_batch_tokens 300000 "${EXTRA_EVAL[@]}"
   fi) &
  local style epochs
  for style in ${SAMSUM_STYLES:-seed chat}; do
    for epochs in ${SAMSUM_EPOCHS:-1}; do
      (env RANKS=64 DROPOUTS=0.1 EPOCHS_LIST=$epochs EXPERIMENTS="$R/full/samsum-$style" FULL_TUNE=1 \
         GPUS=${GPU_B:-0} ./run_lora.sh "${common[@]}" --prompt_style $style --train_file "$SAMSUM/train.jsonl.gz" \
         --test_file "$SAMSUM/test.jsonl.gz"
       run=$R/full/samsum-$style/summarization_epochs-${epochs}_rank-64_dropout-0.1_full
       if [ -f "$run/metrics/metrics.json" ] && [ ! -f "$run/metrics_validation/metrics.json" ]; then
         python3 zephyr_summarization_inference.py "${KEPT_APART[@]}" --experiment_dir "$run" --split validation \
           --validation_file "$SAMSUM/validation.jsonl.gz" --max_batch_tokens 300000 "${EXTRA_EVAL[@]}"
       fi) &
    done
  done
  wait
}

# Candidate recipes trained with a checkpoint at the end of every epoch, each epoch scored
# on the validation split (20 Newsgroups: 10% of its training set held out, stratified; SAMSum: its own), the
# best by validation then scored on the test set. With STOP_AFTER the runs checkpoint and stop; run the stage
# again to resume them. TARGETS_TRAIN=0 skips training (only scores what was saved); TARGETS_FINAL=1 chooses among
# the checkpoints scored so far even if runs are unfinished.
TARGET_EPOCHS=${TARGET_EPOCHS:-3}
targets() {
  local d=$R/targets
  local news=(--train_file "$NEWS/train.jsonl.gz" --validation_fraction 0.1 --full_tune --batch_size 32
              --learning_rate 2e-3)
  local sam=(--train_file "$SAMSUM/train.jsonl.gz" --validation_file "$SAMSUM/validation.jsonl.gz" --prompt_style chat
             --full_tune --batch_size 32 --learning_rate 2e-3 --no-gradient_checkpointing)
  local news_eval=(--decoding constrained --max_batch_tokens 150000)
  local sam_eval=(--validation_file "$SAMSUM/validation.jsonl.gz" --max_batch_tokens 150000)
  mkdir -p "$d"
  target_candidate news-len512 zephyr_classification "${news[@]}" --no-gradient_checkpointing -- "${news_eval[@]}" &
  target_candidate news-len1024 zephyr_classification "${news[@]}" --max_seq_length 1024 -- "${news_eval[@]}" &
  target_candidate news-len1024-bf16 zephyr_classification "${news[@]}" --max_seq_length 1024 --no-load_in_4bit \
    -- "${news_eval[@]}" &
  target_candidate samsum-4bit zephyr_summarization "${sam[@]}" -- "${sam_eval[@]}" &
  target_candidate samsum-bf16 zephyr_summarization "${sam[@]}" --no-load_in_4bit -- "${sam_eval[@]}" &
  wait
  target_test zephyr_classification "accuracy" "--test_file $NEWS/test.jsonl.gz --max_batch_tokens 150000" \
    constrained,greedy "$d"/news-*/
  target_test zephyr_summarization "rouge1 rouge2" "--test_file $SAMSUM/test.jsonl.gz --max_batch_tokens 150000" \
    - "$d"/samsum-*/
}

# The validated recipe (what the candidates pointed to): the settings (1,024 tokens, 16-bit base) at
# batch 16 / lr 1e-3 (the rate that learned more per epoch), constant or cosine-decaying, 3 epochs. 20 Newsgroups:
# each schedule twice, with 10% held out (every epoch scored on validation) and on the whole training set; the
# schedule and epoch best on validation choose which full-data checkpoint is scored on test (constrained and
# greedy). SAMSum: every epoch on validation, the best on test.
validated_recipe() {
  local news=(--train_file "$NEWS/train.jsonl.gz" --full_tune --batch_size 16 --learning_rate 1e-3
              --max_seq_length 1024 --no-load_in_4bit --no-gradient_checkpointing)
  local sam=(--train_file "$SAMSUM/train.jsonl.gz" --validation_file "$SAMSUM/validation.jsonl.gz" --prompt_style chat
             --full_tune --batch_size 16 --learning_rate 1e-3 --no-gradient_checkpointing --no-load_in_4bit)
  local news_eval=(--decoding constrained --max_batch_tokens 150000)
  local sam_eval=(--validation_file "$SAMSUM/validation.jsonl.gz" --max_batch_tokens 150000)
  local schedule
  export TARGETS_DIR=validated_recipe
  mkdir -p "$R/validated_recipe"
  for schedule in constant_with_warmup cosine; do
    target_candidate "news-heldout-$schedule" zephyr_classification "${news[@]}" --lr_scheduler $schedule \
      --validation_fraction 0.1 -- "${news_eval[@]}" &
    target_candidate "news-full-$schedule" zephyr_classification "${news[@]}" --lr_scheduler $schedule &
    target_candidate "samsum-$schedule" zephyr_summarization "${sam[@]}" --lr_scheduler $schedule \
      -- "${sam_eval[@]}" &
  done
  wait
  target_twin_test zephyr_classification "accuracy" "--test_file $NEWS/test.jsonl.gz --max_batch_tokens 150000" \
    constrained,greedy news-heldout- news-full- "$R"/validated_recipe/news-heldout-*/
  target_test zephyr_summarization "rouge1 rouge2" "--test_file $SAMSUM/test.jsonl.gz --max_batch_tokens 150000" \
    - "$R"/validated_recipe/samsum-*/
}

# The small-model recipe as shipped (recipes/small-model.yaml), once per seed (SEEDS, default 0 1 2) and task
# (SEED_TASKS, default news samsum), or for the runs SEED_RUNS names (TASK-SEED, e.g. "samsum-0 news-1"): each run
# chooses its checkpoint on validation while it trains (20 Newsgroups: 10% of the training messages held out,
# drawn with the run's seed; SAMSum: its validation split; --select_on the task's metric), and only that
# checkpoint is scored on test, once (20 Newsgroups: constrained and greedy). Task newsfull: 20 Newsgroups on
# every training message, scored at its last epoch. EXTRA_TRAIN_NEWS, EXTRA_TRAIN_NEWSFULL and
# EXTRA_TRAIN_SAMSUM add training flags for one task only. Runs of one call go side by side on the GPU.
# Log: $R/logs/seeds_NAME.log.
seeds() {
  local seed task run runs=()
  mkdir -p "$R/seeds"
  if [ -n "${SEED_RUNS:-}" ]; then
    read -r -a runs <<< "$SEED_RUNS"
  else
    for seed in ${SEEDS:-0 1 2}; do
      for task in ${SEED_TASKS:-news samsum}; do runs+=("$task-$seed"); done
    done
  fi
  for run in "${runs[@]}"; do
    case "${run%-*}" in news|newsfull|samsum|news+*|newsfull+*|samsum+*) ;;
      *) echo "SEED_RUNS: $run is not TASK[+VARIANT]-SEED with TASK news, newsfull or samsum"; return 1;; esac
    seed_run "${run%-*}" "${run##*-}" &
  done
  wait
}

# seed_task TASK: the seeds stage's script, training data, test flags, decodings and validation metric for TASK
# (news, newsfull or samsum), set in the caller's variables
seed_task() {
  if [ "$1" = news ]; then
    script=zephyr_classification
    train=(--train_file "$NEWS/train.jsonl.gz" --validation_fraction 0.1 --select_on accuracy)
    eval="--test_file $NEWS/test.jsonl.gz"
    decodings=constrained,greedy
    metric=accuracy
  elif [ "$1" = newsfull ]; then
    # every training message, nothing held out: scored at the recipe's last epoch, the one every held-out run
    # chose on validation (results/README.md)
    script=zephyr_classification
    train=(--train_file "$NEWS/train.jsonl.gz")
    eval="--test_file $NEWS/test.jsonl.gz"
    decodings=constrained,greedy
    metric=
  else
    script=zephyr_summarization
    train=(--train_file "$SAMSUM/train.jsonl.gz" --validation_file "$SAMSUM/validation.jsonl.gz" --select_on rouge1+rouge2)
    eval="--test_file $SAMSUM/test.jsonl.gz"
    decodings=-
    metric=rouge1+rouge2
  fi
}

# seed_run TASK[+VARIANT] SEED: train $R/seeds/TASK[+VARIANT]-seed-SEED, choose its checkpoint on validation (the
# last epoch's for newsfull) and score that one on test (with SEED_TEST=0 not: a variant waits for choose_variant).
# A variant's extra training flags are in $VARIANT_<name> (e.g. SEED_RUNS="news+epochs5-0" VARIANT_epochs5="--epochs 5").
seed_run() {
  local task=${1%%+*} seed=$2 run=$R/seeds/$1-seed-$2 script train eval decodings metric step task_extra=() variant=() var
  var=EXTRA_TRAIN_${task^^}
  read -r -a task_extra <<< "${!var:-}"
  if [[ $1 == *+* ]]; then
    var=VARIANT_${1#*+}
    [ -n "${!var:-}" ] || { echo "seed run $1: set $var to the variant's training flags"; return 1; }
    read -r -a variant <<< "${!var}"
    task_extra+=("${variant[@]}")
  fi
  seed_task "$task"
  {
    if [ ! -f "$run/train_metrics.json" ]; then
      local resume=()
      [ -f "$run/run_config.json" ] && resume=(--resume)
      python3 "$script.py" --recipe small-model --pretrained_ckpt "$MODEL" --experiment_dir "$run" --seed "$seed" \
        --save_steps epoch --keep_checkpoints 8 "${resume[@]}" "${train[@]}" "${EXTRA_TRAIN[@]}" "${task_extra[@]}"
    fi
    if [ "$task" = newsfull ]; then
      step=$(python3 -c "from qlora_kit.run_folder import RunFolder; print((RunFolder('$run').epoch_end_steps() or [''])[-1])")
    else
      step=$(python3 -c "from qlora_kit.run_folder import RunFolder; print(RunFolder('$run').chosen_step() or '')")
    fi
    [ -f "$run/train_metrics.json" ] && [ -n "$step" ] || { echo "$run: training did not finish: nothing scored on test"; return; }
    if [ "${SEED_TEST:-1}" = 1 ]; then
      test_checkpoint "$script" "--max_batch_tokens 150000 $eval" "$decodings" "$run" "$step"
    else
      echo "$run: step $step chosen on validation, not scored on test (SEED_TEST=0)"
    fi
  } >> "$R/logs/seeds_$1-seed-$seed.log" 2>&1
  echo "$1 seed $seed: $(tail -1 "$R/logs/seeds_$1-seed-$seed.log")"
}

# choose_variant: the seeds stage's runs of VARIANT (e.g. news+epochs5, trained with SEED_TEST=0: chosen on
# validation, not scored on test) against the recipe's runs of the same seeds under CURRENT_SEEDS (default
# $R/seeds; the committed ones, results/smollm2/seeds, need no training again), on validation
# (reproduce/choose_variant.py); only if the variant wins are its chosen checkpoints scored on test, once.
# Choice: $R/choose_variant/VARIANT.json. E.g., in one sitting:
#   SEED_TEST=0 SEED_RUNS="news+epochs5-0 news+epochs5-1 news+epochs5-2" VARIANT_epochs5="--epochs 5" \
#     VARIANT=news+epochs5 CURRENT_SEEDS=results/smollm2/seeds bash reproduce/gpu_session.sh seeds choose_variant
# Too long for one sitting: one 20 Newsgroups seed alone took 17.5 minutes for 3 epochs on an H100 at the recipe's
# --max_memory_gb 22 (micro-batches of 8 x 2; a larger budget in the variant's flags, e.g. --max_memory_gb 40, may
# give 16 x 1 as seeds 0-1 had on an H200: the same examples a step). Then one seed a sitting (SEED_RUNS=
# news+epochs5-0, watched with ADAPTERS=... so its chosen adapter comes back), and choose_variant in a last sitting
# with the three runs unpacked under $R/seeds.
choose_variant() {
  local variant=${VARIANT:-} task script train eval decodings metric run step candidates=() current=()
  [ -n "$variant" ] || { echo "choose_variant: set VARIANT to the variant's runs, e.g. news+epochs5"; return 1; }
  task=${variant%%+*}
  seed_task "$task"
  [ -n "$metric" ] || { echo "choose_variant: $task runs hold nothing out to choose on"; return 1; }
  for run in "$R/seeds/$variant"-seed-*; do [ -f "$run/selection.json" ] && candidates+=("$run"); done
  for run in "${CURRENT_SEEDS:-$R/seeds}/$task"-seed-*; do [ -f "$run/selection.json" ] && current+=("$run"); done
  [ ${#candidates[@]} -gt 0 ] || { echo "choose_variant: no run of $variant chose a checkpoint under $R/seeds"; return 1; }
  [ ${#current[@]} -gt 0 ] || { echo "choose_variant: no run of $task under ${CURRENT_SEEDS:-$R/seeds}"; return 1; }
  if [ "$(python3 reproduce/choose_variant.py --current "${current[@]}" --candidate "${candidates[@]}" \
          --select_on "$metric" --out "$R/choose_variant/$variant.json" | tee /dev/stderr | tail -1)" = candidate ]
  then
    for run in "${candidates[@]}"; do
      step=$(python3 -c "from qlora_kit.run_folder import RunFolder; print(RunFolder('$run').chosen_step())")
      test_checkpoint "$script" "--max_batch_tokens 150000 $eval" "$decodings" "$run" "$step"
    done
  fi
}

# A decoding chosen on validation over the runs of `seeds`:
#   choose_decoding NAME SCRIPT METRICS "CURRENT_FLAGS" CURRENT_SUFFIX "CANDIDATE_FLAGS" CANDIDATE_SUFFIX
#                   "TEST_FLAGS" RUN...
# each run's chosen checkpoint is scored on validation with both decodings (a score already there is kept: the
# greedy one from training, say), reproduce/choose_decoding.py compares their means over the runs, and only if
# the candidate wins is each run's chosen checkpoint scored on test with it, once. Choice: $R/NAME/choice.json.
choose_decoding() {
  local name=$1 script=$2 metrics=$3 current=$4 current_suffix=$5 candidate=$6 candidate_suffix=$7 test=$8
  local run step flags suffix runs=()
  shift 8
  mkdir -p "$R/$name"
  for run in "$@"; do
    step=$(python3 -c "from qlora_kit.run_folder import RunFolder; print(RunFolder('$run').chosen_step() or '')")
    [ -f "$run/train_metrics.json" ] && [ -n "$step" ] || { echo "$run: not finished, left out"; continue; }
    for flags in current candidate; do
      [ $flags = current ] && suffix=$current_suffix || suffix=$candidate_suffix
      [ $flags = current ] && flags=$current || flags=$candidate
      [ -f "$run/metrics_validation_step-$step${suffix:+_$suffix}/metrics.json" ] ||
        # shellcheck disable=SC2086
        python3 "${script}_inference.py" "${KEPT_APART[@]}" --experiment_dir "$run" --checkpoint "$step" --split validation \
          --output_dir "$run/metrics_validation_step-$step${suffix:+_$suffix}" $flags "${EXTRA_EVAL[@]}" 2>&1 |
          quiet | tail -4
    done
    runs+=("$run")
  done
  [ ${#runs[@]} -gt 0 ] || { echo "$name: no finished run"; return 1; }
  if [ "$(python3 reproduce/choose_decoding.py --current "$current_suffix" --candidate "$candidate_suffix" \
          --select_on "$metrics" --out "$R/$name/choice.json" "${runs[@]}" | tee /dev/stderr | tail -1)" = candidate ]
  then
    for run in "${runs[@]}"; do
      step=$(python3 -c "from qlora_kit.run_folder import RunFolder; print(RunFolder('$run').chosen_step())")
      [ -f "$run/metrics_step-${step}_$candidate_suffix/metrics.json" ] ||
        # shellcheck disable=SC2086
        python3 "${script}_inference.py" "${KEPT_APART[@]}" --experiment_dir "$run" --checkpoint "$step" \
          --output_dir "$run/metrics_step-${step}_$candidate_suffix" $candidate $test "${EXTRA_EVAL[@]}" 2>&1 |
          quiet | tail -4
    done
  fi
}

# SAMSum: greedy (scored on validation while training) against beam search with BEAMS beams (default 4).
samsum_beams() {
  local beams=${BEAMS:-4}
  choose_decoding samsum_beams zephyr_summarization rouge1+rouge2 "" "" \
    "--num_beams $beams --validation_file $SAMSUM/validation.jsonl.gz --max_batch_tokens 150000" "beams-$beams" \
    "--test_file $SAMSUM/test.jsonl.gz" "$R"/seeds/samsum*-seed-*
}

# 20 Newsgroups (the held-out runs): constrained decoding against choosing the label by likelihood.
news_likelihood() {
  choose_decoding news_likelihood zephyr_classification accuracy "--decoding constrained --max_batch_tokens 150000" \
    constrained "--decoding likelihood --max_batch_tokens 150000" likelihood "--test_file $NEWS/test.jsonl.gz" \
    "$R"/seeds/news-seed-* "$R"/seeds/news+*-seed-*
}

# target_candidate NAME SCRIPT TRAIN_FLAGS... [-- EVAL_FLAGS...]: train (or resume) $R/$TARGETS_DIR/NAME (default
# folder: targets), then, given evaluation flags, score every checkpoint saved at the end of an epoch on the
# validation split. Log (appended to): $R/logs/${TARGETS_DIR}_NAME.log.
target_candidate() {
  local name=$1 script=$2 run=$R/${TARGETS_DIR:-targets}/$1 train=() eval=() step
  shift 2
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do train+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  eval=("$@")
  {
    if [ ! -f "$run/train_metrics.json" ] && [ "${TARGETS_TRAIN:-1}" = 1 ]; then
      local resume=()
      [ -f "$run/run_config.json" ] && resume=(--resume)
      python3 "$script.py" --pretrained_ckpt "$MODEL" --experiment_dir "$run" --epochs "$TARGET_EPOCHS" \
        --save_steps epoch --keep_checkpoints 8 "${resume[@]}" "${train[@]}" "${EXTRA_TRAIN[@]}"
    fi
    # with no evaluation flags there is nothing to score on validation
    for step in $([ ${#eval[@]} -gt 0 ] &&
                  python3 -c "from qlora_kit.run_folder import RunFolder; print(*RunFolder('$run').epoch_end_steps())"); do
      [ -f "$run/metrics_validation_step-$step/metrics.json" ] ||
        python3 "${script}_inference.py" "${KEPT_APART[@]}" --experiment_dir "$run" --checkpoint "$step" --split validation \
          --output_dir "$run/metrics_validation_step-$step" "${eval[@]}" "${EXTRA_EVAL[@]}"
    done
  } >> "$R/logs/${TARGETS_DIR:-targets}_$name.log" 2>&1  # appended: a resumed run keeps its earlier commands' log
  echo "$name: $(tail -1 "$R/logs/${TARGETS_DIR:-targets}_$name.log")"
}

# target_test SCRIPT "METRICS" "EVAL_FLAGS" DECODINGS RUN...: once every run has finished (or TARGETS_FINAL=1),
# choose the best checkpoint on validation and score it on the test set, once per decoding in DECODINGS
# (comma-separated, e.g. constrained,greedy; "-" for the script's only one). Results: RUN/metrics_step-N[_DECODING].
target_test() {
  local script=$1 metrics=$2 flags=$3 decodings=$4 chosen
  shift 4
  chosen=$(target_choice "$script" "$metrics" "$@") || return 0
  test_checkpoint "$script" "$flags" "$decodings" $chosen
}

# target_twin_test SCRIPT "METRICS" "EVAL_FLAGS" DECODINGS FROM TO RUN...: as target_test, but what is scored on
# test is the chosen run's twin (its name with FROM replaced by TO: the same settings trained on all the data,
# which has no validation of its own) at the chosen epoch.
target_twin_test() {
  local script=$1 metrics=$2 flags=$3 decodings=$4 from=$5 to=$6 chosen twin step
  shift 6
  chosen=$(target_choice "$script" "$metrics" "$@") || return 0
  twin=${chosen% *}
  twin=$(dirname "$twin")/$(basename "$twin" | sed "s/^$from/$to/")
  step=$(python3 -c "
import json
from qlora_kit.errors import run_main
from qlora_kit.run_folder import RunFolder
chosen = json.load(open('$R/${TARGETS_DIR:-targets}/chosen_${script#zephyr_}.json'))['chosen']
run_main(lambda: print(RunFolder('$twin').epoch_end_step(round(chosen['epoch']))))") || return 0
  echo "scored on test: $twin at step $step (epoch of the choice)"
  test_checkpoint "$script" "$flags" "$decodings" "$twin" "$step"
}

# target_choice SCRIPT "METRICS" RUN...: prints "RUN STEP", the best checkpoint on validation (its list in
# $R/$TARGETS_DIR/chosen_TASK.json); fails while a run is unfinished or has an epoch checkpoint not scored on
# validation yet (unless TARGETS_FINAL=1).
target_choice() {
  local script=$1 metrics=$2 run
  shift 2
  local unscored
  for run in "$@"; do
    [ "${TARGETS_FINAL:-0}" = 1 ] && continue
    if [ ! -f "$run/train_metrics.json" ]; then
      echo "$run unfinished: no choice yet" >&2; return 1
    fi
    unscored=$(python3 -c "from qlora_kit.run_folder import RunFolder; r = RunFolder('$run')
print(*[s for s in r.epoch_end_steps() if not r.evaluation('validation', s).metrics_file.is_file()])")
    if [ -n "$unscored" ]; then
      echo "$run: checkpoints $unscored not scored on validation yet: no choice yet" >&2; return 1
    fi
  done
  # shellcheck disable=SC2086
  python3 scripts/choose_checkpoint.py "$@" --metrics $metrics \
    --out "$R/${TARGETS_DIR:-targets}/chosen_${script#zephyr_}.json" | tee /dev/stderr | tail -1
}

# test_checkpoint SCRIPT "EVAL_FLAGS" DECODINGS RUN STEP: score one checkpoint on the test set per decoding.
test_checkpoint() {
  local script=$1 flags=$2 decodings=$3 run=$4 step=$5 decoding out
  for decoding in ${decodings//,/ }; do
    out=$run/metrics_step-$step
    local choice=()
    [ "$decoding" = - ] || { out+=_$decoding; choice=(--decoding "$decoding"); }
    [ -f "$out/metrics.json" ] && continue
    # shellcheck disable=SC2086
    python3 "${script}_inference.py" --experiment_dir "$run" --checkpoint "$step" --output_dir "$out" \
      "${KEPT_APART[@]}" $flags "${choice[@]}" "${EXTRA_EVAL[@]}" 2>&1 | quiet | tail -14
  done
}

# With STOP_AFTER=N: after N seconds, every training or evaluation process gets one SIGTERM (a training run
# saves a checkpoint and stops; an evaluation keeps its partial predictions), so the command ends in time.
stop_after() {
  sleep "$1"
  echo "STOP_AFTER: asking every run to checkpoint and stop"
  local seen=" " pid
  while true; do
    # python processes only: a shell whose command line names a script must not be stopped with it
    for pid in $(pgrep -f "^[^ ]*python[0-9.]* [^ ]*zephyr_[a-z_]*\.py"); do
      case "$seen" in *" $pid "*) ;; *) kill -TERM "$pid" 2>/dev/null; seen="$seen$pid ";; esac
    done
    sleep 1
  done
}

source reproduce/pack_dir.sh
pack() {
  [ -n "$PACK" ] || return 0
  pack_dir "$R" "$PACK"
}

watchers=()
if [ -n "${STOP_AFTER:-}" ]; then
  stop_after "$STOP_AFTER" &
  watchers+=($!)
fi
# With PACK_AT=N: also pack after N seconds, whatever stage runs then: a command cut off by its time limit still
# brings back what the stages wrote so far (a benchmark writes its JSON after each recipe).
if [ -n "${PACK_AT:-}" ]; then
  (sleep "$PACK_AT"; pack; echo "PACK_AT: packed $R after $PACK_AT s") &
  watchers+=($!)
fi
# With PACK_EVERY=N: also pack every N seconds, so that a command cut off by its time limit returns what was
# written up to N seconds before (PACK_AT packs once, and misses what a stage writes after it).
if [ -n "${PACK_EVERY:-}" ]; then
  (while sleep "$PACK_EVERY"; do pack; done) &
  watchers+=($!)
fi
# the watchers' sleeps too: they hold our stdout
trap 'for w in "${watchers[@]}"; do pkill -P $w 2>/dev/null; kill $w 2>/dev/null; done' EXIT
for stage in "$@"; do
  echo "=== $stage (GPU ${CUDA_VISIBLE_DEVICES:-all}) $(date +%T)"
  started=$SECONDS
  "$stage" 2>&1 | tee -a "$R/logs/$stage.log" | quiet
  echo "=== $stage done in $((SECONDS - started)) s"
  pack
done
