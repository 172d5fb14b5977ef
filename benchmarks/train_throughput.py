"""Training speed and memory, side by side in one run: the original recipe in a bare PyTorch + peft loop (the
baseline), the project's recipes through its own trainer, and Unsloth (the peer) on the same batches.

Model: Zephyr-7B-beta's exact config with random weights, 4-bit NF4 (built once, saved locally).
Data: batches drawn from the real 20 Newsgroups and SAMSum training sets in the fine-tuning
format, token lengths as they really are (counted once by the embedded model's tokenizer and
committed in benchmarks/), ids random. Every runner trains the same rows in the same order: --warmup_steps
optimizer steps (the first holds the task's longest examples), then the same --steps steps --repeats times,
each pass timed on its own; the JSON has the median and the spread of non-padding tokens/s, examples/s,
peak memory, and the achieved TFLOP/s (training_batches.flops_per_token) against the GPU's bf16 peak.

Usage:
    python benchmarks/train_throughput.py --write_lengths --data_dir ../shared/data     # once, any machine
    python benchmarks/train_throughput.py --model_dir /tmp/zephyr-shaped --out benchmarks/results/train.json
    python benchmarks/train_throughput.py --tiny --model_dir /tmp/tiny --steps 2 --out /tmp/t.json   # CPU check
    # data parallel: every GPU trains the same rows as one GPU would (the same per-device batch); tokens/s counts
    # every GPU's, TFLOP/s is per GPU (the project's recipes only; build the model first, in one process)
    accelerate launch --config_file configs/ddp.yaml --num_processes 2 benchmarks/train_throughput.py \
        --model_dir /tmp/z7 --tasks classification --recipes "fast, all modules" --out /tmp/ddp.json
    # with the peer (its packages unpacked in /tmp/uns, see benchmarks/unsloth_throughput.py):
    python benchmarks/train_throughput.py --model_dir /tmp/z7 --tasks classification --unsloth_path /tmp/uns \\
        --recipes "bare PyTorch + peft loop, original recipe, all modules" "fast, all modules" \\
                  "Unsloth, fast recipe's batches, every linear layer"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import profiling
import training_batches as tb
from training_batches import HERE, LENGTHS, synthetic_rows, task_lengths

# The speed settings a benchmark recipe takes from a recipe file (recipes/NAME.yaml, resolved as the training
# scripts do) and may change.
SPEED_SETTINGS = (
    "batch_size",
    "grad_accum",
    "learning_rate",
    "gradient_checkpointing",
    "optim",
    "group_by_length",
    "use_liger_kernel",
    "packing",
    "load_in_4bit",
)


# name -> LoRA targets ("qv": q_proj,v_proj; "all": every linear layer and lm_head; "linear": every linear layer)
# and the speed settings.
def _recipe(targets, base, **changes):
    from qlora_kit import settings

    resolved = settings.resolve("classification", {"recipe": base})[0]
    return {
        "runner": "trainer",
        "recipe": base,
        "targets": targets,
        **{key: getattr(resolved, key) for key in SPEED_SETTINGS},
        "scored_positions_only": resolved.logits_where_scored,
        "lora_dropout": resolved.dropout,
        **changes,
    }


# The trainer reads two values back from the GPU after every micro-batch (the loss, to filter NaN/inf out of the
# logged average; the count of tokens seen): each read waits for the GPU to finish, so the host cannot queue the
# next micro-batch's kernels ahead. The bare loop reads nothing back. These switches turn both reads off.
NO_HOST_READS = {"logging_nan_inf_filter": False, "include_num_input_tokens_seen": "no"}

RECIPES = {
    # the published recipe in a hand-written PyTorch + peft loop, nothing of this project: the honest baseline
    "bare PyTorch + peft loop, original recipe, all modules": _recipe("all", "original", runner="bare loop"),
    "bare PyTorch + peft loop, original recipe, q,v": _recipe("qv", "original", runner="bare loop"),
    "original, q,v": _recipe("qv", "original"),
    "original, all modules": _recipe("all", "original"),
    "fast, q,v": _recipe("qv", "fast"),
    "fast, all modules": _recipe("all", "fast"),
    "fast with Liger, all modules": _recipe("all", "fast", use_liger_kernel=True),
    "fast without Liger, all modules": _recipe("all", "fast", use_liger_kernel=False),
    # Unsloth's LoRA targets: every linear layer of the decoder, no lm_head
    "fast with Liger, every linear layer": _recipe("linear", "fast", use_liger_kernel=True),
    "fast without Liger, every linear layer": _recipe("linear", "fast", use_liger_kernel=False),
    # the peer, same batches, batch size, optimizer and LoRA settings (benchmarks/unsloth_throughput.py)
    "Unsloth, fast recipe's batches, every linear layer": _recipe("linear", "fast", runner="unsloth"),
    # LoRA dropout (0.1 in every recipe) masks each adapted layer's input on its own: a random mask and a product
    # over the whole activation, in the forward, the recomputed forward and the backward, for each of the 7 layers
    # of a block. Unsloth patches its fused LoRA kernels in only without dropout.
    "fast without LoRA dropout, all modules": _recipe("all", "fast", lora_dropout=0.0),
    "fast without LoRA dropout, every linear layer": _recipe("linear", "fast", lora_dropout=0.0),
    "Unsloth without LoRA dropout, fast recipe's batches, every linear layer": _recipe(
        "linear", "fast", runner="unsloth", lora_dropout=0.0
    ),
    # no dropout with the other levers Unsloth has: compiled decoder layers (speed); the checkpointed layer inputs
    # kept on the CPU (memory: 32 layers x 16k tokens x 4,096 x 2 bytes = 4.3 GB on the GPU otherwise)
    "fast without LoRA dropout, decoder layers compiled, every linear layer": _recipe(
        "linear", "fast", lora_dropout=0.0, compile_layers=True
    ),
    "fast without LoRA dropout, activations offloaded to the CPU, every linear layer": _recipe(
        "linear", "fast", lora_dropout=0.0, sft_overrides={"activation_offloading": True}
    ),
    # each LoRA layer as one autograd function, the adapter's product added in place (qlora_kit/fused_lora.py):
    # with the default's dropout, and without it (Unsloth's fused path, on its targets)
    "fast, fused LoRA, all modules": _recipe("all", "fast", fused_lora=True),
    "fast without LoRA dropout, fused LoRA, all modules": _recipe("all", "fast", lora_dropout=0.0, fused_lora=True),
    "fast without LoRA dropout, fused LoRA, every linear layer": _recipe(
        "linear", "fast", lora_dropout=0.0, fused_lora=True
    ),
    "fast without LoRA dropout, fused LoRA, decoder layers compiled, every linear layer": _recipe(
        "linear", "fast", lora_dropout=0.0, fused_lora=True, compile_layers=True
    ),
    # the same with an adapter on lm_head too (the original scripts' --full_tune)
    "fast without LoRA dropout, fused LoRA, decoder layers compiled, all modules": _recipe(
        "all", "fast", lora_dropout=0.0, fused_lora=True, compile_layers=True
    ),
    # the same without compiling: Liger's fused norms, RoPE and SwiGLU in their place (the norms are the largest
    # source of element-wise bytes left without dropout and peft's copies: step_anatomy.py)
    "fast without LoRA dropout, fused LoRA, Liger, every linear layer": _recipe(
        "linear", "fast", lora_dropout=0.0, fused_lora=True, use_liger_kernel=True
    ),
    # and with PyTorch's own fused RMSNorm (fuse_rms_norms): one kernel a norm, no Triton, no compiling
    "fast without LoRA dropout, fused LoRA, fused RMSNorm, every linear layer": _recipe(
        "linear", "fast", lora_dropout=0.0, fused_lora=True, fused_rms_norm=True
    ),
    "fast, fused RMSNorm, all modules": _recipe("all", "fast", fused_rms_norm=True),
    "small-model, fused LoRA, all modules": _recipe("all", "small-model", fused_lora=True),
    # levers not in any recipe yet, through trl/transformers' own switches (measured before one is adopted)
    "fast, torch.compile, all modules": _recipe(
        "all", "fast", sft_overrides={"torch_compile": True, "torch_compile_backend": "inductor"}
    ),
    # as Unsloth does: each decoder layer compiled as one region (the 4-bit layers and LoRA inside it)
    "fast, decoder layers compiled, all modules": _recipe("all", "fast", compile_layers=True),
    "fast, decoder layers compiled, every linear layer": _recipe("linear", "fast", compile_layers=True),
    "fast, activations offloaded to the CPU, all modules": _recipe(
        "all", "fast", sft_overrides={"activation_offloading": True}
    ),
    "fast, selective checkpointing (attention kept), all modules": _recipe(
        "all", "fast", sft_overrides={"gradient_checkpointing_kwargs": {"use_reentrant": False, "selective": True}}
    ),
    # without the trainer's two reads from the GPU per micro-batch (NO_HOST_READS)
    "original, no reads from the GPU per micro-batch, all modules": _recipe(
        "all", "original", sft_overrides=NO_HOST_READS
    ),
    "fast, no reads from the GPU per micro-batch, all modules": _recipe("all", "fast", sft_overrides=NO_HOST_READS),
    # the small-model recipe (16-bit base, no checkpointing, logits where scored, Liger) with compiled layers, and
    # without each of its two speed choices, for SmolLM2 (--model_dir: its converted folder)
    "small-model, all modules": _recipe("all", "small-model"),
    # Liger's kernels off: torch.compile fails on them inside a compiled layer (training refuses the two together)
    "small-model without Liger, decoder layers compiled, all modules": _recipe(
        "all", "small-model", compile_layers=True, use_liger_kernel=False
    ),
    # the two launch-cutting levers together: fewer operations per adapted layer, then fused by the compiler
    "small-model without Liger, fused LoRA, decoder layers compiled, all modules": _recipe(
        "all", "small-model", fused_lora=True, compile_layers=True, use_liger_kernel=False
    ),
    "small-model, vocabulary logits at every position, all modules": _recipe(
        "all", "small-model", scored_positions_only=False
    ),
    "small-model without Liger, all modules": _recipe("all", "small-model", use_liger_kernel=False),
    "small-model, no reads from the GPU per micro-batch, all modules": _recipe(
        "all", "small-model", sft_overrides=NO_HOST_READS
    ),
    # the adapted layers' inputs not cast to the adapter's fp32 (keep_lora_inputs_uncast)
    "small-model, LoRA inputs left in bf16, all modules": _recipe("all", "small-model", lora_inputs_uncast=True),
    # --max_memory_gb: the micro-batch the probe picks for a smaller card's budget (same 32 examples a step)
    "fast, fitted to a 16 GB budget, all modules": _recipe("all", "fast", max_memory_gb=16.0),
    "fast, fitted to a 12 GB budget, all modules": _recipe("all", "fast", max_memory_gb=12.0),
    # the same 32 examples a step in two micro-batches of 16: less activation memory for a larger model
    "fast at batch 16 x 2, all modules": _recipe("all", "fast", batch_size=16, grad_accum=2),
    "fast at batch 8 x 4, all modules": _recipe("all", "fast", batch_size=8, grad_accum=4),
    # --logits_where_scored: vocabulary logits only where the answer is scored (qlora_kit.sft_trainer.logits_where_scored)
    "fast, all modules, logits where scored": _recipe("all", "fast", scored_positions_only=True),
    # the default before batch 32: the original's 8 examples a step in one micro-batch
    "batch 8 (previous default), all modules": _recipe("all", "fast", batch_size=8, learning_rate=2e-4),
    # more examples a step than the default: faster, but learned less per example (results/README.md)
    "packed rows x 16, fused AdamW, Liger, all modules": _recipe(
        "all", "fast", batch_size=16, packing=True, group_by_length=False
    ),
}

WHICH = {
    "bare loop": "the baseline: the original recipe in a bare PyTorch + peft loop",
    "unsloth": "Unsloth, the peer",
    "trainer": "this project's trainer",
}


def write_lengths(data_dir: Path, tokenizer_name: str, max_seq_length: int) -> None:
    from qlora_kit import data as data_lib
    from qlora_kit import modeling
    from qlora_kit.formatting import PromptFormat, build_training_examples, end_of_turn_token
    from qlora_kit.tasks import get_task

    tokenizer = modeling.load_tokenizer(modeling.resolve_model_source(tokenizer_name))
    result = {"tokenizer": tokenizer_name, "max_seq_length": max_seq_length}
    for task, file in (
        ("classification", data_dir / "newsgroups" / "train.jsonl.gz"),
        ("summarization", data_dir / "samsum" / "train.jsonl.gz"),
    ):
        rows, source = get_task(task).load_rows(file=str(file), dataset="", split="train")
        labels = data_lib.canonical_labels(rows, source) if get_task(task).labelled else []
        fmt = PromptFormat(task, "finetune", "seed", tokenizer, label_names=labels)
        examples = build_training_examples(rows, fmt, max_seq_length, end_of_turn_token(tokenizer), True)
        result[task] = [[len(e["input_ids"]), sum(label != -100 for label in e["labels"])] for e in examples]
    LENGTHS.write_text(json.dumps(result) + "\n")
    print(f"wrote {LENGTHS}")


class LargestBatch:
    """Wraps a collator to remember the largest padded batch (rows x width) it made."""

    def __init__(self, collate):
        self.collate, self.shape = collate, (0, 0)

    def __call__(self, features):
        batch = self.collate(features)
        shape = tuple(batch["input_ids"].shape)
        if shape[0] * shape[1] > self.shape[0] * self.shape[1]:
            self.shape = shape
        return batch


def lora_target_names(model_dir: Path, targets: str) -> list[str]:
    """The module names of a benchmark's targets: "qv" the architecture's attention default, "all" every linear
    layer and lm_head (--full_tune), "linear" every linear layer without lm_head."""
    from qlora_kit import modeling

    layout = modeling.model_layout(str(model_dir))
    names = modeling.lora_targets(layout, full_tune=targets != "qv")
    return [name for name in names if name != layout.head_name] if targets == "linear" else names


def fuse_rms_norms(model) -> int:
    """Route every RMSNorm of ``model`` that computes what ``torch.nn.functional.rms_norm`` does (the weight times
    the normalised input, the Llama form) through it; returns how many. On CUDA that is one fused kernel each way,
    where the modelling code runs about eight element-wise operations in fp32 each way (the largest source of
    element-wise bytes once LoRA's dropout and peft's copies are gone: step_anatomy.py). Each norm class is checked
    on a random input first; other forms (Gemma's 1 + weight) keep their own. A lever measured here before it
    becomes a training setting."""
    import functools

    import torch

    def fused(module, eps, hidden_states):
        # autocast would compute a norm in fp32 and return fp32; the modelling code returns the input's dtype
        with torch.autocast(hidden_states.device.type, enabled=False):
            return torch.nn.functional.rms_norm(
                hidden_states, (module.weight.shape[0],), module.weight.to(hidden_states.dtype), eps
            )

    same: dict[type, bool] = {}
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if not type(module).__name__.endswith("RMSNorm") or weight is None or weight.dim() != 1 or eps is None:
            continue
        if type(module) not in same:
            probe = torch.randn(2, 5, weight.shape[0], device=weight.device).to(weight.dtype)
            with torch.no_grad():
                same[type(module)] = torch.allclose(
                    module(probe).float(), fused(module, eps, probe).float(), rtol=2e-2, atol=2e-2
                )
        if same[type(module)]:
            module.forward = functools.partial(fused, module, eps)
            count += 1
    return count


def keep_lora_inputs_uncast(model) -> int:
    """Leave each adapted layer's input in the compute dtype. Over a 16-bit base peft keeps the adapter in fp32 and
    casts the layer's input to fp32 before the adapter's matmuls, which autocast (training in bf16) casts back to
    bf16: two casts a layer each way, ~4 of the ~20 kernels peft runs for an adapted layer in a training step, where
    a small model's step is bound by how many kernels the host launches. Training only (under autocast: outside it
    a bf16 input meets an fp32 weight). Returns how many layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


def measure(model_dir: Path, recipe: dict, task: str, args, profiler=None) -> dict:
    """One recipe through the project's trainer (qlora_kit.sft_trainer.make_trainer): the warm-up steps, then the
    timed rows ``--repeats`` times, each pass timed on its own. ``profiler(result, model)``, a context manager,
    records the ``--profile_steps`` steps (default: ``profiling.profiled``, the kernels by kind)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback

    from qlora_kit import memory_budget, modeling, sft_trainer
    from qlora_kit import settings as settings_lib
    from qlora_kit.packing import PackedCollator

    targets, batch, accumulation, packing = (
        recipe["targets"],
        recipe["batch_size"],
        recipe["grad_accum"],
        recipe["packing"],
    )
    model = modeling.load_model(str(model_dir), load_in_4bit=recipe["load_in_4bit"])
    tokenizer = modeling.load_tokenizer(str(model_dir))
    matmul = tb.matmul_parameters(model)
    warm, timed = synthetic_rows(
        task_lengths(task),
        model.config.vocab_size,
        batch * accumulation,
        args.warmup_steps,
        args.steps,
        recipe["group_by_length"],
        packing,
        args.max_seq_length,
        args.seed,
    )
    # --profile_steps: after the timed passes, one more step (not profiled) and the profiled ones, on timed rows
    extra_steps = 1 + args.profile_steps if args.profile_steps else 0
    extra = timed[: extra_steps * batch * accumulation]
    rows = per_process_rows(warm + timed * args.repeats + extra, batch, processes())
    speed = {key: recipe[key] for key in SPEED_SETTINGS}
    # every training setting at its default (so new settings need no change here), then the benchmark's own
    settings = dataclasses.replace(
        settings_lib.resolve("classification")[0],
        epochs=1,
        logging_steps=1000,
        max_steps=args.warmup_steps + args.steps * args.repeats + extra_steps,
        save_steps=10**6,
        seed=args.seed,
        max_seq_length=args.max_seq_length,
        **speed,
    )
    sft_args = sft_trainer.sft_config(settings, Path(args.scratch))
    sft_args.save_strategy = "no"
    for name, value in recipe.get("sft_overrides", {}).items():
        setattr(sft_args, name, value)
    peft_config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=recipe["lora_dropout"],
        task_type="CAUSAL_LM",
        target_modules=lora_target_names(model_dir, targets),
    )
    collator = PackedCollator(tokenizer.pad_token_id) if packing else None
    trainer = sft_trainer.make_trainer(
        model,
        sft_args,
        peft_config,
        tokenizer,
        Dataset.from_list(rows),
        None,
        data_collator=collator,
        scored_positions_only=recipe.get("scored_positions_only", False),
        compile_layers=recipe.get("compile_layers", False),
        fused_lora=recipe.get("fused_lora", False),
    )
    if recipe.get("lora_inputs_uncast"):
        keep_lora_inputs_uncast(trainer.model)
    if recipe.get("fused_rms_norm") and not fuse_rms_norms(trainer.model):
        sys.exit("fused_rms_norm: this model has no RMSNorm of the Llama form")
    # before the collator is wrapped: the probe's batches are not training's
    fitted = memory_budget.fit_to_budget(trainer, recipe["max_memory_gb"]) if recipe.get("max_memory_gb") else None
    # the rows' own order (see synthetic_rows): the worst batch first, then the timed steps
    trainer._get_train_sampler = lambda *unused, **kwargs: SequentialSampler(trainer.train_dataset)  # noqa: F821
    trainer.data_collator = largest = LargestBatch(trainer.data_collator)

    timed_end = args.warmup_steps + args.steps * args.repeats

    class Clock(TrainerCallback):
        """The time at the end of the warm-up and of each pass over the timed rows; with --profile_steps, a
        profile of the steps after one more."""

        marks = []
        profile = {}
        profiler = None
        started = None

        def on_train_begin(self, args_, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            step = state.global_step
            if args.warmup_steps <= step <= timed_end and (step - args.warmup_steps) % args.steps == 0:
                tb.synchronize()
                self.marks.append(time.perf_counter())
            if extra_steps and step == timed_end + 1:
                self.profiler = (
                    profiler(self.profile, kwargs["model"]) if profiler else profiling.profiled(self.profile)
                )
                self.profiler.__enter__()
            elif self.profiler is not None and step == timed_end + extra_steps:
                self.profiler.__exit__(None, None, None)
                self.profiler = None

    clock = Clock()
    trainer.add_callback(clock)
    tb.reset_gpu_memory_stats()
    trainer.train()
    seconds = [later - earlier for earlier, later in zip(clock.marks, clock.marks[1:])]
    # every process trained the timed rows: the tokens of all of them, per second
    result = _result(recipe, timed * processes(), seconds, args, packing, clock.marks[0] - clock.started)
    per_gpu = {**result, "tokens_per_second": result["tokens_per_second"] / processes()}
    result.update(
        processes=processes(),
        # non-padding tokens of every step of every process (warm-up included): each process its own rows
        trained_tokens=trainer.state.num_input_tokens_seen,
        optim=sft_args.optim,
        use_liger_kernel=sft_args.use_liger_kernel,
        largest_batch_rows_x_width=list(largest.shape),
        **({"memory_budget": fitted} if fitted is not None else {}),
        **({"profile": {"steps": args.profile_steps, **clock.profile}} if clock.profile else {}),
        # per GPU
        **tb.hardware_share(
            per_gpu, matmul, model.config.num_hidden_layers, model.config.hidden_size, recipe["gradient_checkpointing"]
        ),
    )
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def processes() -> int:
    """How many processes train side by side (accelerate launch / torchrun): 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def per_process_rows(rows: list, micro_batch: int, count: int) -> list:
    """The rows as the trainer's data loader must hold them for every one of ``count`` processes to train all of
    ``rows``: each micro-batch repeated once per process, since the loader deals micro-batches out in turn."""
    if count == 1:
        return rows
    chunks = [rows[start : start + micro_batch] for start in range(0, len(rows), micro_batch)]
    return [row for chunk in chunks for _ in range(count) for row in chunk]


def _result(recipe: dict, timed: list, seconds: list, args, packing: bool = False, warmup_seconds=None) -> dict:
    return {
        "which": WHICH[recipe["runner"]],
        **recipe,
        **tb.timed_record(timed, seconds, args.steps, args.repeats, packing, warmup_seconds),
    }


def measure_bare_loop(model_dir: Path, recipe: dict, task: str, args) -> dict:
    """The published recipe as its scripts' users would write it by hand, nothing of this project: 4-bit NF4
    (double quantisation, bf16 compute), peft's prepare_model_for_kbit_training (fp32 norms, gradient
    checkpointing), LoRA r=8 / alpha 16 / dropout 0.1, paged AdamW 32-bit, 4 x 2 random batches."""
    import bitsandbytes
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), quantization_config=quantization, device_map={"": 0} if torch.cuda.is_available() else None
    )
    matmul = tb.matmul_parameters(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe["gradient_checkpointing"])
    model = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=recipe["lora_dropout"],
            task_type="CAUSAL_LM",
            target_modules=lora_target_names(model_dir, recipe["targets"]),
        ),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe["optim"] == "paged_adamw_32bit" and torch.cuda.is_available():
        optimizer = bitsandbytes.optim.PagedAdamW32bit(params, lr=recipe["learning_rate"])
    else:
        optimizer = torch.optim.AdamW(params, lr=recipe["learning_rate"])
    rows = recipe["batch_size"] * recipe["grad_accum"]
    warm, timed = synthetic_rows(
        task_lengths(task), model.config.vocab_size, rows, args.warmup_steps, args.steps, recipe["group_by_length"]
    )
    pad = AutoTokenizer.from_pretrained(str(model_dir)).pad_token_id
    tb.reset_gpu_memory_stats()
    warmup_seconds, seconds, profile = tb.plain_loop(
        model, optimizer, warm, timed, recipe["batch_size"], recipe["grad_accum"], args.repeats, pad, args.profile_steps
    )
    result = _result(recipe, timed, seconds, args, warmup_seconds=warmup_seconds)
    if profile:
        result["profile"] = profile
    config = model.config
    result.update(tb.hardware_share(result, matmul, config.num_hidden_layers, config.hidden_size, True))
    result["optim"] = type(optimizer).__name__
    del model, optimizer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def measure_unsloth(model_dir: Path, recipe: dict, task: str, args) -> dict:
    """Unsloth in its own process with its own packages (--unsloth_path): benchmarks/unsloth_throughput.py."""
    import os
    import subprocess

    if not args.unsloth_path:
        raise SystemExit("--unsloth_path: the folder of Unsloth's packages is needed to measure Unsloth")
    out = Path(args.scratch) / f"unsloth_{task}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        PYTHONPATH=args.unsloth_path,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        UNSLOTH_DISABLE_STATISTICS="1",
        UNSLOTH_COMPILE_LOCATION=str(Path(args.scratch) / "unsloth_compiled_cache"),
    )
    command = [
        sys.executable,
        str(HERE / "unsloth_throughput.py"),
        "--model_dir",
        str(model_dir),
        "--task",
        task,
        "--targets",
        *lora_target_names(model_dir, recipe["targets"]),
        "--batch_size",
        str(recipe["batch_size"]),
        "--grad_accum",
        str(recipe["grad_accum"]),
        "--grouped" if recipe["group_by_length"] else "--no-grouped",
        "--learning_rate",
        str(recipe["learning_rate"]),
        "--dropout",
        str(recipe["lora_dropout"]),
        "--warmup_steps",
        str(args.warmup_steps),
        "--steps",
        str(args.steps),
        "--repeats",
        str(args.repeats),
        "--max_seq_length",
        str(args.max_seq_length),
        "--seed",
        str(args.seed),
        "--profile_steps",
        str(args.profile_steps),
        "--out",
        str(out),
    ]
    subprocess.run(command, env=env, check=True)
    return {**recipe, **json.loads(out.read_text())}


RUNNERS = {"trainer": measure, "bare loop": measure_bare_loop, "unsloth": measure_unsloth}


def model_summary(folder: Path) -> dict:
    """The timed model's architecture, from its config.json."""
    config = json.loads((Path(folder) / "config.json").read_text())
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    return {key: config.get(key) for key in keys}


def main(args):
    import zephyr_shaped

    from qlora_kit import distributed

    if args.write_lengths:
        write_lengths(Path(args.data_dir), args.tokenizer, args.max_seq_length)
        return
    main_process = int(os.environ.get("RANK", "0")) == 0
    if processes() > 1:
        others = [name for name in args.recipes if RECIPES[name]["runner"] != "trainer"]
        if others:
            sys.exit(f"--recipes: {others[0]!r} runs in one process only; several processes time the project's trainer")
        if not (Path(args.model_dir) / "config.json").is_file():
            sys.exit(f"--model_dir {args.model_dir}: no model there; build it first, in one process")
    folder = zephyr_shaped.build(Path(args.model_dir), tiny=args.tiny, shape=args.shape)
    results = {
        "command": " ".join(sys.argv),
        "settings": vars(args),
        # what --model_dir holds: the random model of --shape built here, or any model folder given (e.g. SmolLM2)
        "model": model_summary(folder),
        "what": "non-padding tokens/s: the median of --repeats passes over the same --steps optimizer steps "
        "(after --warmup_steps), min and max beside it; peak memory over every step",
        "processes": processes(),
        **zephyr_shaped.environment(),
        "runs": {},
    }
    for task in args.tasks:
        for name in args.recipes:
            key = f"{task}: {name}"
            recipe = RECIPES[name]
            run = results["runs"][key] = RUNNERS[recipe["runner"]](folder, recipe, task, args)
            base = results["runs"].get(f"{task}: bare PyTorch + peft loop, original recipe, all modules")
            if base and run is not base:
                run["speedup_vs_bare_loop_original"] = run["tokens_per_second"] / base["tokens_per_second"]
            if not main_process:
                continue
            peak = run["peak_gpu_memory_gb"]
            print(
                f"{key}: {run['tokens_per_second']:.0f} tokens/s "
                f"({run['tokens_per_second_min']:.0f}-{run['tokens_per_second_max']:.0f} over {args.repeats} x "
                f"{args.steps} steps), {run['examples_per_second']:.2f} examples/s, "
                f"{run['achieved_tflops']:.0f} TFLOP/s, peak {peak and round(peak, 1)} GB, "
                f"warm-up {run['warmup_seconds']:.1f} s",
                flush=True,
            )
            if "profile" in run:
                profiling.print_summary(f"{key}: profile of {args.profile_steps} steps", run["profile"])
            zephyr_shaped.write_result(Path(args.out), results)
    distributed.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write_lengths", action="store_true")
    parser.add_argument("--data_dir", default="../shared/data")
    parser.add_argument("--tokenizer", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--model_dir", default="/tmp/zephyr-7b-shaped")
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same architecture (CPU check)")
    parser.add_argument(
        "--shape",
        choices=("zephyr-7b", "falcon-7b", "llama-2-13b"),
        default="zephyr-7b",
        help="the exact config whose random-weight model --model_dir holds or gets",
    )
    parser.add_argument("--tasks", nargs="+", default=["classification", "summarization"])
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=list(RECIPES),
        choices=list(RECIPES),
        metavar="RECIPE",
        help="default: all, namely: " + "; ".join(RECIPES),
    )
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per timed pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the same steps")
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile_steps",
        type=int,
        default=0,
        help="after the timed passes, profile this many more steps of each recipe (0: none)",
    )
    parser.add_argument("--unsloth_path", default=None, help="PYTHONPATH of Unsloth's own packages")
    parser.add_argument("--scratch", default="/tmp/train_throughput")
    parser.add_argument("--out", default="benchmarks/results/train_throughput.json")
    main(parser.parse_args())
