"""The attention kernels a prefill group can run on, side by side on the GPU: for each scaled-dot-product attention
backend, its first call on a shape it has not seen (what a process's first generation pays once per prefill group's
shape: cuDNN builds, and may compile, an execution plan per shape) and its warm call on the same shape.

The shapes are the engine's row-group prefill's (``generation.PREFILL_TOKENS`` prompt tokens a group, each group cut
to its longest prompt): ``rows = 16384 // length`` rows of ``length`` positions, left-padded, so a mask is given
and transformers repeats the key/value heads per query head, as it does for a masked call. Random bf16 values; the
outputs of each backend are compared with PyTorch's default choice.

Usage (on a GPU):
    python benchmarks/prefill_attention.py --out benchmarks/results/prefill_attention.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

# (query heads, key/value heads, head dim) of the models the engine is measured on
SHAPES = {"smollm2-135m": (9, 3, 64), "zephyr-7b": (32, 8, 128)}
PREFILL_TOKENS = 16384


def inputs(rows: int, length: int, heads: int, kv_heads: int, dim: int, seed: int):
    """Query, keys and values repeated per query head, and a causal mask with each row's left padding."""
    import torch

    generator = torch.Generator(device="cuda").manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=generator, device="cuda", dtype=torch.bfloat16)

    query = normal(rows, heads, length, dim)
    keys, values = (normal(rows, kv_heads, length, dim).repeat_interleave(heads // kv_heads, 1) for _ in range(2))
    padding = torch.randint(0, max(1, length // 4), (rows,), generator=generator, device="cuda")
    positions = torch.arange(length, device="cuda")
    causal = positions[None, :, None] >= positions[None, None, :]
    real = positions[None, :] >= padding[:, None]  # a row's real tokens (left padding first)
    mask = (causal & real[:, None, :])[:, None]
    mask |= ~real[:, None, :, None]  # padded queries see everything (as transformers' mask keeps them finite)
    return query, keys, values, mask


def timed(function, repeats: int) -> tuple[float, float]:
    """The first call's seconds and the median of ``repeats`` later ones."""
    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    function()
    torch.cuda.synchronize()
    first = time.perf_counter() - started
    later = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        torch.cuda.synchronize()
        later.append(time.perf_counter() - started)
    return first, statistics.median(later)


def main(args) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    backends = {
        "default": None,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "lengths": args.lengths, "models": {}}
    for model, (heads, kv_heads, dim) in SHAPES.items():
        runs = result["models"][model] = {}
        # each backend's first calls are on shapes none of its calls has seen; a warm-up shape first loads its kernels
        for offset, (name, backend) in enumerate(backends.items()):
            per_length = []
            for index, length in enumerate([48, *args.lengths]):
                length += offset  # a shape new to every backend's plan cache
                rows = PREFILL_TOKENS // length
                query, keys, values, mask = inputs(rows, length, heads, kv_heads, dim, seed=index)
                chosen = sdpa_kernel([backend]) if backend is not None else sdpa_kernel(list(SDPBackend))

                def call(query=query, keys=keys, values=values, mask=mask, chosen=chosen):
                    with chosen:
                        return sdpa(query, keys, values, attn_mask=mask)

                first, warm = timed(call, args.repeats)
                if index == 0:
                    continue  # the warm-up shape
                with sdpa_kernel(list(SDPBackend)):
                    reference = sdpa(query, keys, values, attn_mask=mask)
                difference = (call() - reference).abs().max().item()
                per_length.append({"length": length, "rows": rows, "first_s": first, "warm_s": warm,
                                   "max_abs_difference_to_default": difference})  # fmt: skip
            runs[name] = {
                "first_calls_s": sum(run["first_s"] for run in per_length),
                "warm_calls_s": sum(run["warm_s"] for run in per_length),
                "per_length": per_length,
            }
            print(f"{model} {name}: first calls {runs[name]['first_calls_s']:.3f} s, warm {runs[name]['warm_calls_s']:.4f} s"
                  f" over {len(per_length)} shapes", flush=True)  # fmt: skip
            Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[96, 160, 224, 288, 352, 416, 480, 512])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/prefill_attention.json")
    main(parser.parse_args())
