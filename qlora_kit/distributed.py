"""Several processes (torchrun / accelerate launch): who is the main one, waiting, gathering results."""

from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def fsdp_requested() -> bool:
    """Launched by accelerate with an FSDP config (configs/fsdp_qlora.yaml): the model will be sharded."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def init() -> None:
    """Start the process group when launched as several processes (gloo on CPU, nccl on GPU)."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState()


def shutdown() -> None:
    """Close the process group at the end of a run: a process that exits with the group still open can abort in
    its communication threads' teardown ("terminate called without an active exception"), failing a finished run."""
    import sys

    if world_size() == 1 or "torch" not in sys.modules:  # nothing started (e.g. --print_config, a usage error)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def gather(value) -> list:
    """Every process's ``value``, in rank order, on every process."""
    if world_size() == 1:
        return [value]
    import torch.distributed as dist

    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered
