"""The largest micro-batch that fits a GPU memory budget (``--max_memory_gb``), same examples per step.

Before training, one forward and backward pass over the training set's longest examples (the worst batch an
epoch meets) measures the peak memory of a micro-batch; while it exceeds the budget (or runs out of memory),
the micro-batch is halved and the gradient accumulation doubled. Optimizer steps, examples per step, the
learning rate and the data order stay as asked.

Why measure rather than predict: the peak depends on the model, the 4-bit kernels, checkpointing, Liger and
the attention backend; one probe per candidate costs a second or two. On the 7B shape at 512 tokens
(docs/benchmarks.md): 15.3 GB at 32 rows with checkpointing, so a 24 GB card keeps the default's 32 while a
16 GB budget gets 16 x 2.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from . import distributed

log = logging.getLogger(__name__)

# Beside the probe's peak: the CUDA context and allocator fragmentation the allocator's own count leaves out.
HEADROOM_GB = 1.0

# What trl's SFTTrainer updates in each loss computation (token count, logged metrics).
TRAINER_COUNTERS = ("_metrics", "_total_train_tokens")


def candidates(batch_size: int, grad_accum: int) -> list[tuple[int, int]]:
    """(micro-batch, accumulation) pairs with the same examples per step, largest micro-batch first: the asked
    micro-batch, then halvings while the examples per step divide evenly."""
    per_step = batch_size * grad_accum
    pairs, micro = [], batch_size
    while micro >= 1 and per_step % micro == 0:
        pairs.append((micro, per_step // micro))
        if micro == 1:
            break
        micro //= 2
    return pairs


def choose(
    batch_size: int, grad_accum: int, budget_gb: float, peak_gb: Callable[[int], float | None]
) -> tuple[int, int, float | None]:
    """The first candidate whose measured peak (``peak_gb(micro_batch)``; None when it ran out of memory) plus
    the headroom fits the budget: (micro-batch, accumulation, its peak). The smallest candidate when none fits
    (training then runs as near the budget as it can)."""
    pairs = candidates(batch_size, grad_accum)
    for micro, accumulation in pairs:
        peak = peak_gb(micro)
        if peak is not None and peak + HEADROOM_GB <= budget_gb:
            return micro, accumulation, peak
        log.info(
            "micro-batch %d: %s the %.1f GB budget",
            micro,
            "out of memory under" if peak is None else f"peak {peak:.1f} GB + {HEADROOM_GB:.0f} GB headroom over",
            budget_gb,
        )
    micro, accumulation = pairs[-1]
    log.warning("even micro-batch %d may not fit --max_memory_gb %.1f: training with it", micro, budget_gb)
    return micro, accumulation, None


def probe_peak_gb(trainer, rows: int) -> float | None:
    """Peak GPU memory (GB) of one forward and backward pass over the ``rows`` longest training examples, the
    gradients dropped again; None when it ran out of memory."""
    import copy

    import torch

    # trl counts the tokens and logs metrics of every loss it computes: the probe's are not training's
    counters = {name: copy.deepcopy(getattr(trainer, name)) for name in TRAINER_COUNTERS if hasattr(trainer, name)}
    dataset = trainer.train_dataset
    lengths = [len(ids) for ids in dataset["input_ids"]]
    longest = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)[:rows]
    model = trainer.model
    model.train()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    inputs = loss = None
    try:
        inputs = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in longest]))
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, inputs)
        loss.backward()
        peak = torch.cuda.max_memory_allocated() / 1e9
    except torch.cuda.OutOfMemoryError:
        peak = None
    finally:
        inputs = loss = None  # noqa: F841  (a loss that ran out of memory in backward still holds its graph)
        model.zero_grad(set_to_none=True)
        for name, value in counters.items():
            setattr(trainer, name, value)
        torch.cuda.empty_cache()
    return peak


def enable_checkpointing_as_training_will(trainer) -> None:
    """Recompute activations in the probe as training will (the Trainer switches it on only inside train())."""
    args, model = trainer.args, trainer.model
    if args.gradient_checkpointing and not getattr(model, "is_gradient_checkpointing", True):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)


def apply(trainer, micro_batch: int, accumulation: int) -> None:
    """Make the trainer build its data loader with ``micro_batch`` rows and accumulate ``accumulation`` of them."""
    trainer.args.per_device_train_batch_size = micro_batch
    trainer.args.gradient_accumulation_steps = accumulation
    trainer._train_batch_size = trainer.args.train_batch_size  # what the Trainer builds its data loader with


def fit_to_budget(trainer, budget_gb: float | None, peak_gb: Callable[[int], float | None] | None = None) -> dict:
    """Choose and apply the micro-batch for ``budget_gb`` (None or 0: as asked; no GPU: as asked, unless a
    ``peak_gb`` measure is given, as the tests do). Returns what was chosen, for the run's metrics."""
    import torch

    asked = (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps)
    if not budget_gb or (peak_gb is None and not torch.cuda.is_available()):
        return {}
    if getattr(trainer, "is_fsdp_enabled", False):
        log.info("--max_memory_gb: not applied under FSDP (each process holds a shard); micro-batch as asked")
        return {}
    if peak_gb is None:
        enable_checkpointing_as_training_will(trainer)
        peak_gb = lambda rows: probe_peak_gb(trainer, rows)  # noqa: E731
    error = None
    try:
        micro, accumulation, peak = choose(*asked, budget_gb, peak_gb)
    except Exception as exc:  # the probe is an optimisation: never the reason a run cannot train
        log.warning("--max_memory_gb: could not measure a micro-batch (%s): training with it as asked", exc)
        (micro, accumulation), peak, error = asked, None, str(exc)
    # Several processes must accumulate alike (each step is one all-reduce): all take the smallest choice.
    micro = min(chosen for chosen, _ in distributed.gather((micro, accumulation)))
    accumulation = asked[0] * asked[1] // micro
    if (micro, accumulation) != asked:
        apply(trainer, micro, accumulation)
        log.info(
            "micro-batch %d x %d accumulation (asked: %d x %d; the same %d examples per step) to fit "
            "--max_memory_gb %.1f",
            micro,
            accumulation,
            *asked,
            micro * accumulation,
            budget_gb,
        )
    return {
        "max_memory_gb": budget_gb,
        "micro_batch": micro,
        "grad_accum": accumulation,
        "probe_peak_gb": peak,
        **({"probe_error": error} if error else {}),
    }
