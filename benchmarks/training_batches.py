"""What every training-speed measurement shares: the batches (real lengths, random ids), a plain PyTorch
training loop timed in windows, and the arithmetic of FLOPs per token.

Imports nothing of the project, so that the peer's measurement (unsloth_throughput.py, which runs with its
own packages) and the bare-loop baseline feed exactly the batches our trainer gets.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LENGTHS = HERE / "train_lengths.json"

# Dense bf16 tensor-core peak of an H100/H200 SXM (NVIDIA's data sheet, without sparsity), TFLOP/s.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "A10G": 70.0, "L4": 121.0}


def task_lengths(task: str) -> list[tuple[int, int]]:
    """(prompt + answer, answer) token counts of every training example of the task."""
    return [tuple(pair) for pair in json.loads(LENGTHS.read_text())[task]]


def stratified(lengths: list, count: int) -> list:
    """``count`` items at evenly spaced quantiles of ``lengths``: the real length mix, without sampling noise."""
    ordered = sorted(lengths)
    return [ordered[int((i + 0.5) * len(ordered) / count)] for i in range(count)]


def example(total: int, answer: int, vocab: int, rng: random.Random) -> dict:
    ids = [rng.randrange(3, vocab) for _ in range(total)]
    return {"input_ids": ids, "labels": [-100] * (total - answer) + ids[total - answer :]}


def synthetic_rows(
    lengths: list,
    vocab: int,
    rows_per_step: int,
    warmup_steps: int,
    steps: int,
    grouped: bool,
    packing: bool = False,
    max_seq_length: int = 512,
    seed: int = 0,
):
    """Training rows with the real lengths ``lengths`` (``task_lengths``), random ids, loss on the answer, in
    the order they are trained (the benchmark feeds them sequentially): (warm-up rows, timed rows).

    The first step takes the task's longest examples, so the peak memory covers the worst batch a real epoch
    meets. The timed steps take examples at evenly spaced quantiles of the real lengths: shuffled for a recipe
    with random batches; sorted, so that each batch holds similar lengths, for a length-grouped one (as its
    sampler does within each mega-batch); for packing, as many as fill the rows, packed, rows shuffled.
    """
    rng = random.Random(seed)
    warm = sorted(lengths)[-rows_per_step:] + [
        lengths[rng.randrange(len(lengths))] for _ in range(rows_per_step * (warmup_steps - 1))
    ]
    warm = [example(total, answer, vocab, rng) for total, answer in warm]
    needed = rows_per_step * steps
    if not packing:
        timed = stratified(lengths, needed)
        if grouped:
            timed.sort(reverse=True)
        else:
            rng.shuffle(timed)
        return warm, [example(total, answer, vocab, rng) for total, answer in timed]
    from qlora_kit.packing import packed_rows

    mean = sum(total for total, _ in lengths) / len(lengths)
    count = int(needed * max_seq_length / mean)
    while True:  # examples enough to fill `needed` rows
        timed = packed_rows([example(t, a, vocab, rng) for t, a in stratified(lengths, count)], max_seq_length)
        if len(timed) >= needed:
            break
        count = int(count * 1.1) + 1
    rng.shuffle(timed)
    warm_rows = packed_rows(warm, max_seq_length)
    return (warm_rows * warmup_steps)[: rows_per_step * warmup_steps], timed[:needed]


def collate(rows: list[dict], pad_id: int, device):
    """Right-padded tensors of a micro-batch, loss masked on the padding."""
    import torch

    width = max(len(row["input_ids"]) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def plain_loop(
    model,
    optimizer,
    warm: list,
    timed: list,
    micro_batch: int,
    accumulation: int,
    repeats: int,
    pad_id,
    profile_steps: int = 0,
):
    """Train as a hand-written PyTorch loop does (bf16 autocast, loss / accumulation, gradient clipping at 0.3
    as the recipes do): the warm-up rows once, then the timed rows ``repeats`` times; the seconds of the warm-up
    (compiling included, for a runner that compiles) and of each pass; and with ``profile_steps``, after the passes
    one more step of the timed rows, then that many profiled (``profiling.profiled``), as the trainer's measurement
    profiles its steps: ``{"steps": profile_steps, **summary}``, else ``{}``.

    Same order of rows as the trainer's measurement: micro-batches of consecutive rows.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    device = next(p.device for p in params)

    def step(rows):
        for start in range(0, len(rows), micro_batch):
            batch = collate(rows[start : start + micro_batch], pad_id, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(**batch).loss / accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rows_per_step = micro_batch * accumulation
    model.train()
    started = time.perf_counter()
    for start in range(0, len(warm), rows_per_step):
        step(warm[start : start + rows_per_step])
    synchronize()
    warmup_seconds = time.perf_counter() - started
    seconds = []
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        for start in range(0, len(timed), rows_per_step):
            step(timed[start : start + rows_per_step])
        synchronize()
        seconds.append(time.perf_counter() - started)
    profile = {}
    if profile_steps:
        import profiling

        steps = [timed[start : start + rows_per_step] for start in range(0, len(timed), rows_per_step)]
        step(steps[0])  # one more, unprofiled: the profiler's start is not the steps' cost
        with profiling.profiled(profile):
            for index in range(profile_steps):
                step(steps[(1 + index) % len(steps)])
            synchronize()
        profile = {"steps": profile_steps, **profile}
    return warmup_seconds, seconds, profile


def synchronize():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_parameters(model) -> int:
    """Weights that take part in a matrix product per token: every linear layer of the base model, lm_head
    included (LoRA's own matrices, rank 8, add well under 1% and are left out)."""
    total = 0
    for name, module in model.named_modules():
        if "lora_" in name or not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            continue
        if any(hasattr(module, attr) for attr in ("lora_A", "base_layer")):  # peft's wrapper: its base counts
            continue
        total += module.in_features * module.out_features
    return total


def flops_per_token(matmul_params: int, layers: int, hidden: int, mean_row_tokens: float, checkpointing: bool):
    """Training FLOPs per non-padding token with a frozen base.

    Forward: 2 x matmul weights (a multiply and an add per weight), plus attention's two products with the
    earlier tokens, 2 x 2 x layers x hidden x (row length / 2) on average in a causal row. Backward: the
    gradients of the activations cost the forward again (the frozen weights get no gradient; LoRA's are
    negligible), and attention's backward twice its forward. Activation checkpointing recomputes the forward.
    """
    forward = 2 * matmul_params + 4 * layers * hidden * mean_row_tokens / 2
    attention_forward = 4 * layers * hidden * mean_row_tokens / 2
    backward = 2 * matmul_params + 2 * attention_forward
    return forward + backward + (forward if checkpointing else 0)


def summary(window_seconds: list[float], tokens: int, examples: int) -> dict:
    """Median and spread of tokens/s and examples/s over timed windows of the same rows."""
    speeds = [tokens / s for s in window_seconds]
    return {
        "window_seconds": window_seconds,
        "tokens_per_second": statistics.median(speeds),
        "tokens_per_second_min": min(speeds),
        "tokens_per_second_max": max(speeds),
        "tokens_per_second_spread_percent": 100 * (max(speeds) - min(speeds)) / statistics.median(speeds),
        "examples_per_second": examples / statistics.median(window_seconds),
    }


# the caching allocator's counts over a run: cudaMalloc / cudaFree calls (each can stall the host) and the retries
# after freeing cached blocks; steady steps of a fixed shape make none, shapes that change step to step may
ALLOCATOR_COUNTS = ("num_device_alloc", "num_device_free", "num_alloc_retries")


def reset_gpu_memory_stats() -> None:
    """Start a run's peak memory and allocator counts afresh (no-op without a GPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.reset_accumulated_memory_stats()


def allocator_counts() -> dict | None:
    """The allocator's counts (``ALLOCATOR_COUNTS``) since ``reset_gpu_memory_stats``; None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    stats = torch.cuda.memory_stats()
    return {key: stats.get(key) for key in ALLOCATOR_COUNTS}


def timed_record(
    timed: list, seconds: list[float], steps: int, repeats: int, packing: bool = False, warmup_seconds=None
) -> dict:
    """What every runner reports of its timed passes: the rows' non-padding tokens and examples, their speeds
    (``summary``), the peak GPU memory since the last reset (over every step, warm-up included, whose first
    batch holds the task's longest examples), the allocator's counts over the run (``ALLOCATOR_COUNTS``) and the
    warm-up's seconds (where compiling shows)."""
    import torch

    on_gpu = torch.cuda.is_available()
    tokens = sum(len(row["input_ids"]) for row in timed)  # no padding: rows are unpadded until collated
    examples = sum(len(row["seq_lengths"]) for row in timed) if packing else len(timed)
    return {
        "timed_steps": steps,
        "repeats": repeats,
        "timed_tokens": tokens,
        "timed_examples": examples,
        "warmup_seconds": warmup_seconds,
        **summary(seconds, tokens, examples),
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if on_gpu else None,
        "peak_gpu_memory_reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if on_gpu else None,
        "allocator": allocator_counts(),
    }


def hardware_share(result: dict, matmul_params: int, layers: int, hidden: int, checkpointing: bool) -> dict:
    """The achieved TFLOP/s of a measurement and its share of the GPU's bf16 peak."""
    import torch

    mean_row = result["timed_tokens"] / result["timed_examples"]
    per_token = flops_per_token(matmul_params, layers, hidden, mean_row, checkpointing)
    achieved = per_token * result["tokens_per_second"] / 1e12
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    peak = next((value for key, value in BF16_PEAK_TFLOPS.items() if key in name), None)
    return {
        "flops_per_token": per_token,
        "flops_formula": "2P + 2P (+ 2P recomputed with checkpointing) + attention, P = matmul weights incl. lm_head",
        "achieved_tflops": achieved,
        "bf16_peak_tflops": peak,
        "share_of_peak": achieved / peak if peak else None,
    }
