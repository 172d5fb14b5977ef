"""Where the time of a measured step goes: torch.profiler's kernels grouped into a few kinds (matrix products,
4-bit dequantisation, attention, ...), the share of the wall time the GPU was busy, and the named ranges
(``prefill``, ``decode`` in the generation engine).

The busy share is the first thing to read: well under 1, the step waits on the host (Python, kernel launches,
synchronisations) and faster kernels would not help; near 1, the kernels themselves are the cost and the
kinds say which. Imports nothing of the project (the peer's process uses it too).
"""

from __future__ import annotations

import contextlib
import time

# The first kind whose words appear in a kernel's name (lower-cased) takes it.
KINDS = (
    ("4-bit dequantisation", ("dequant",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax_warp")),
    ("autograd bookkeeping (host)", ("autograd::", "backward0")),
    ("matrix products", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "::mm", "addmm", "bmm", "linear")),
    ("norms, softmax, loss", ("norm", "softmax", "cross_entropy", "nll", "log_softmax", "rsqrt")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "fused_sgd")),
    ("copies, casts, fills", ("copy", "cast", "memcpy", "memset", "fill", "cat", "index")),
)
OTHER = "other element-wise"
RANGES = ("prefill", "decode")
# the CUDA runtime's and driver's calls that launch kernels (cuBLAS and Triton launch through the driver's; a CUDA
# graph's replay, many kernels, is one call)
LAUNCH_CALLS = (
    "cudaGraphLaunch",
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaLaunchCooperativeKernel",
)


def kind(name: str) -> str:
    lowered = name.lower()
    return next((label for label, words in KINDS if any(word in lowered for word in words)), OTHER)


@contextlib.contextmanager
def profiled(result: dict, top: int = 15):
    """Profile the block (CPU and, where there is one, GPU activity); on exit, fill ``result`` with
    ``summary`` of it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    result.update(summary(prof.key_averages(), wall, top))


def summary(events, wall_seconds: float, top: int = 15) -> dict:
    """The profile's kernels by kind and the largest ``top``. On a GPU the times are the kernels' own device
    times; with no device activity (the CPU) the operators' own CPU times stand in for them."""
    ranges = {event.key: event for event in events if event.key in RANGES}
    timed = [event for event in events if event.key not in RANGES]
    on_device = any(_device_us(event) > 0 for event in timed)
    own = (lambda event: _device_us(event)) if on_device else (lambda event: event.self_cpu_time_total)
    # on a GPU: kernels only (the aten operators that launch them have no device time of their own)
    kernels = [event for event in timed if own(event) > 0 and (not on_device or not event.key.startswith("aten::"))]
    busy_us = sum(own(event) for event in kernels)
    by_kind: dict[str, float] = {}
    for event in kernels:
        by_kind[kind(event.key)] = by_kind.get(kind(event.key), 0.0) + own(event) / 1e6
    largest = sorted(kernels, key=own, reverse=True)[:top]
    return {
        "profiled": "GPU kernels" if on_device else "CPU operators",
        "wall_seconds": wall_seconds,
        # how many kernels ran, and how many times the host launched one (a CUDA graph's replay runs many kernels
        # for one launch): where a step waits on the host, the launches are its time
        **(
            {
                "kernels_run": sum(event.count for event in kernels),
                "kernel_launches": sum(event.count for event in timed if event.key in LAUNCH_CALLS),
            }
            if on_device
            else {}
        ),
        "busy_seconds": busy_us / 1e6,
        "busy_share_of_wall": busy_us / 1e6 / wall_seconds if wall_seconds else None,
        "by_kind_seconds": dict(sorted(by_kind.items(), key=lambda item: -item[1])),
        "largest": [
            {"name": event.key[:160], "calls": event.count, "seconds": own(event) / 1e6, "kind": kind(event.key)}
            for event in largest
        ],
        # how often each operator ran: work done twice shows as a count above the model's own (e.g. matrix
        # products per step against 3 per LoRA layer and pass)
        "operator_calls": dict(
            sorted(
                ((event.key, event.count) for event in timed if event.key.startswith("aten::")),
                key=lambda item: -item[1],
            )[:40]
        ),
        "ranges": {
            name: {"cpu_seconds": event.cpu_time_total / 1e6, "device_seconds": _device_total_us(event) / 1e6}
            for name, event in ranges.items()
        },
        # where the host's own time went: operators and the CUDA runtime's calls (cudaMalloc, cudaFree, graph
        # capture and instantiation, synchronisations, launches that first load a kernel), by their own CPU time
        "host_largest": [
            {"name": event.key[:160], "calls": event.count, "cpu_seconds": event.self_cpu_time_total / 1e6}
            for event in sorted(timed, key=lambda event: event.self_cpu_time_total, reverse=True)[:top]
        ],
    }


def _device_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0) or 0


def _device_total_us(event) -> float:
    return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0) or 0


def print_summary(title: str, result: dict) -> None:
    share = result["busy_share_of_wall"]
    print(
        f"{title}: {result['wall_seconds']:.2f} s wall, {result['profiled']} busy {result['busy_seconds']:.2f} s"
        + (f" ({share:.0%})" if share is not None else "")
        + (
            f", {result['kernels_run']:,} kernels from {result['kernel_launches']:,} launches"
            if "kernels_run" in result
            else ""
        ),
        flush=True,
    )
    for name, seconds in result["by_kind_seconds"].items():
        print(f"  {name}: {seconds:.3f} s", flush=True)
    for name, times in result["ranges"].items():
        print(f"  range {name}: {times['cpu_seconds']:.3f} s host, {times['device_seconds']:.3f} s device", flush=True)
    for event in result.get("host_largest", [])[:8]:
        print(f"  host: {event['name'][:60]} x{event['calls']}: {event['cpu_seconds']:.3f} s", flush=True)
