"""Where one training step's work goes, by source: every tensor operation of a step of a recipe, recorded below
autograd, with the module that ran it (the norms, LoRA's dropout, peft's copies around an adapted layer, the
attention, the MLP, the head and loss, the optimizer), the pass (forward, the forward recomputed for
checkpointing, backward), the bytes it read and wrote, the FLOPs of matrix products and, on a GPU, its kernels'
time (CUDA events around each operation).

A kernel profile (``train_throughput.py --profile_steps``) names kernels ("elementwise_kernel"), not what asked for
them; this names the source. The bytes are the operation's inputs and outputs (a view moves none), a lower bound
of what its kernels move. The operations are the same on the CPU as on a GPU but for three: bitsandbytes' CPU
path multiplies by the 4-bit weight in one operation where a GPU dequantises it and then multiplies, attention
takes the CPU's kernel, and trl's fused head scores every position on the CPU (the scored ones on a GPU). So the
CPU, in bf16 as a GPU computes, counts a GPU's bytes in a minute or two a recipe on a model of Zephyr-7B's widths
with one decoder layer, its rows scaled to Zephyr's 32 (``--full_layers``). Triton kernels (Liger's) are not
operations of the dispatcher and are not recorded: recipes with them are measured by the kernel profile.

It also counts the step's operations that move data: a GPU launches a kernel for about each, and a small model's
step (SmolLM2-135M's) waits on the host launching them, so their count is what its recipes change. Two more
differences count there: dropout on the CPU is three operations (mask, scale, product) where a GPU runs one
kernel, and the optimizer's multi-tensor updates run on the CPU tensor by tensor where a GPU's fused AdamW
launches a few kernels for all (its operations are the source "other (optimizer, trainer)", pass "no grad").

Usage:
    python benchmarks/step_anatomy.py --layers 1 --model_dir /tmp/zephyr-1-layer --batch_size 8 \\
        --recipes "fast, all modules" "fast without LoRA dropout, fused LoRA, all modules" \\
        --out benchmarks/results/step_anatomy_cpu.json
    python benchmarks/step_anatomy.py --table benchmarks/results/step_anatomy_cpu.json    # the runs side by side
    python benchmarks/step_anatomy.py --tiny --model_dir /tmp/tiny --out /tmp/anatomy.json     # code path check
    # SmolLM2-135M (its folder: python -c "from qlora_kit import modeling;
    #   print(modeling.resolve_model_source('embedded:smollm2-135m-instruct'))"), every layer, operations by source:
    python benchmarks/step_anatomy.py --model_dir SMOLLM2_FOLDER --full_layers 0 --batch_size 4 --task summarization \
        --recipes "small-model without Liger, all modules" --out /tmp/anatomy_small.json
    python benchmarks/step_anatomy.py --table /tmp/anatomy_small.json --operations
    # on a GPU, the whole model, with the kernels' time of each source:
    python benchmarks/step_anatomy.py --model_dir /tmp/z7 --recipes "fast, all modules" --out /tmp/anatomy.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
import sys
from pathlib import Path

import train_throughput
import zephyr_shaped

# operations that move no data: views, shape queries, allocations
NO_DATA = {
    "view", "_unsafe_view", "t", "transpose", "expand", "slice", "select", "as_strided", "alias", "detach",
    "unsqueeze", "squeeze", "permute", "reshape", "_reshape_alias", "split", "split_with_sizes", "chunk", "unbind",
    "empty", "empty_like", "empty_strided", "lift_fresh", "is_same_size", "set_", "resize_", "new_empty",
    "new_empty_strided", "_local_scalar_dense", "diagonal", "narrow", "sym_size", "sym_stride", "sym_numel",
}  # fmt: skip
# in-place operations that only write their target
WRITE_ONLY = {"bernoulli_", "fill_", "zero_", "copy_", "normal_", "uniform_", "random_", "exponential_"}
# (bitsandbytes' CPU path multiplies by a 4-bit weight in one operation of its own)
MATRIX_PRODUCTS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "bitsandbytes::gemm_4bit"}

# the first source whose pattern matches "module path :: operation" takes the operation
SOURCES = (
    ("LoRA dropout", r"lora_dropout"),
    ("LoRA adapter products", r"lora_[AB]\b"),
    ("4-bit base products (dequantise + multiply)", r"base_layer"),
    ("norms", r"norm\b|layernorm"),
    # a fused LoRA layer multiplies by its 4-bit base and its adapter itself, in the adapted layer's own node
    ("fused LoRA layer's products (4-bit base + adapter)", r"(_proj|lm_head)\s::\s(mm|addmm_?|bitsandbytes::)"),
    ("peft's copy, scaling and sum around an adapted layer", r"_proj\s::|lm_head\s::"),
    ("attention (RoPE, scores, reshapes)", r"self_attn\s::"),
    ("MLP activation (SiLU x up)", r"mlp(\.act_fn)?\s::"),
    ("residual adds (decoder layer)", r"layers\.N\s::"),
    ("embedding, head and loss", r"^(model|base_model|lm_head|embed_tokens|model\.embed_tokens|loss)\b"),
)


def source(where: str, op: str) -> str:
    text = f"{where} :: {op}"
    return next((name for name, pattern in SOURCES if re.search(pattern, text)), "other (optimizer, trainer)")


class Recorder:
    """Records every operation below autograd (a TorchDispatchMode) with the module that ran it.

    The module: forward hooks keep a stack of the modules running; in the backward an operation belongs to the
    autograd node that runs it, which a TorchFunctionMode tagged, when the forward made it, with the module then
    running. Checkpointed layers recompute their forward inside the backward: a wrapper around each layer's
    checkpointed function marks that (and restores the stack when a recompute stops early)."""

    def __init__(self, model):
        import torch

        self.torch, self.model = torch, model
        self.stack: list[tuple[str, bool]] = []
        # calls, bytes, flops, output elements, (start, end) events
        self.rows = collections.defaultdict(lambda: [0, 0, 0.0, 0, []])
        self.timed = torch.cuda.is_available()

    def __enter__(self):
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode

        torch, recorder = self.torch, self
        names = {
            id(module): name.replace("base_model.model.", "") or "model" for name, module in self.model.named_modules()
        }

        def pushed(module, *unused):
            recorder.stack.append((names.get(id(module), type(module).__name__), recorder._in_backward()))

        def tag(outputs, where):
            # the nodes a call made: from its outputs back to the first already tagged (a composite operation
            # such as linear makes several: a product behind a reshape)
            pending = [t.grad_fn for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
            while pending:
                node = pending.pop()
                if node is not None and "module" not in node.metadata:
                    node.metadata["module"] = where
                    pending.extend(next_node for next_node, _ in node.next_functions)

        def popped(module, args, outputs):
            # a custom autograd Function (bitsandbytes' 4-bit product, a fused LoRA layer) makes its node unseen by
            # the function mode below: it belongs to the innermost module that returns it
            if recorder.stack:
                tag(outputs, recorder.stack[-1][0])
                recorder.stack.pop()

        self.hooks = [
            torch.nn.modules.module.register_module_forward_pre_hook(pushed),
            torch.nn.modules.module.register_module_forward_hook(popped),
        ]
        self.wrapped = []
        for module in self.model.modules():
            checkpointed = module.__dict__.get("_gradient_checkpointing_func")
            if checkpointed is not None:
                module._gradient_checkpointing_func = self._marking(checkpointed, names[id(module)])
                self.wrapped.append((module, checkpointed))

        class Tag(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if recorder.stack:
                    tag(out, recorder.stack[-1][0])
                return out

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return recorder._record(func, args, kwargs or {})

        self.modes = [Tag(), Dispatch()]
        for mode in self.modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self.modes):
            mode.__exit__(*exc)
        for hook in self.hooks:
            hook.remove()
        for module, checkpointed in self.wrapped:
            module._gradient_checkpointing_func = checkpointed
        if self.timed:
            self.torch.cuda.synchronize()

    def _in_backward(self) -> bool:
        return self.torch._C._current_autograd_node() is not None

    def _marking(self, checkpointed, name):
        recorder = self

        def checkpoint(function, *args, **kwargs):
            def marked(*inner_args, **inner_kwargs):
                depth = len(recorder.stack)
                recorder.stack.append((name, recorder._in_backward()))
                try:
                    return function(*inner_args, **inner_kwargs)
                finally:
                    del recorder.stack[depth:]

            return checkpointed(marked, *args, **kwargs)

        return checkpoint

    def _record(self, func, args, kwargs):
        torch = self.torch
        op = func.__name__.split(".")[0]
        events = None
        if self.timed and op not in NO_DATA:
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            events[0].record()
        out = func(*args, **kwargs)
        if events is not None:
            events[1].record()
        node = torch._C._current_autograd_node()
        if node is not None and not (self.stack and self.stack[-1][1]):
            phase, where = "backward", node.metadata.get("module", "-")
        else:
            # inside a module with gradients off: a custom autograd Function's forward (it runs without them)
            in_forward = torch.is_grad_enabled() or self.stack
            phase = "recompute" if node is not None else "forward" if in_forward else "no grad"
            where = self.stack[-1][0] if self.stack else "-"
        where = re.sub(r"\.\d+(\.|$)", r".N\1", where)
        if func.namespace not in ("aten", "prims"):
            op = f"{func.namespace}::{op}"
        # what the operation reads: its tensor arguments, but not an out= tensor nor the target of a write-only
        # in-place operation (an in-place update such as add_ reads its target and writes it: both count)
        read_args = args[1:] if op in WRITE_ONLY else args
        read_kwargs = {key: value for key, value in kwargs.items() if key != "out"}
        inputs = [t for t in torch.utils._pytree.tree_leaves((read_args, read_kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        row = self.rows[(phase, where, op)]
        row[0] += 1
        if op not in NO_DATA:
            row[1] += sum(t.numel() * t.element_size() for t in inputs + outputs)
            row[3] += sum(t.numel() for t in outputs)
        if op == "bitsandbytes::gemm_4bit":
            row[2] += 2 * inputs[0].numel() * outputs[0].shape[-1]  # (m x k) @ packed (k x n): 2 m k n
        elif op in MATRIX_PRODUCTS:
            # the factors are the last two positional tensors (addmm's first is the sum's; out= is a keyword)
            left, right = [t for t in args if isinstance(t, torch.Tensor)][-2:]
            row[2] += 2 * left.numel() * right.shape[-1]  # (m x k) @ (k x n): 2 m k n
        if events is not None:
            row[4].append(events)
        return out

    def table(self) -> list[dict]:
        return [
            {
                "phase": phase,
                "module": where,
                "op": op,
                "source": source(where, op),
                "calls": calls,
                "bytes": nbytes,
                "flops": flops,
                "output_elements": elements,
                **({"device_ms": sum(start.elapsed_time(end) for start, end in events)} if self.timed else {}),
            }
            for (phase, where, op), (calls, nbytes, flops, elements, events) in self.rows.items()
            if nbytes or flops or events  # not the views and shape queries
        ]


@contextlib.contextmanager
def recorded(result: dict, model):
    """``train_throughput.measure``'s profiler: the recorded operations of the profiled steps, into ``result``."""
    with Recorder(model) as recorder:
        yield
    result["operations"] = recorder.table()


def summarise(operations: list[dict], positions: int, layer_scale: float) -> dict:
    """Per position of the step, layer rows scaled to the full depth: bytes (all, and outside matrix products),
    matrix-product FLOPs and, on a GPU, kernel milliseconds, by source and by pass; and the step's operations that
    move data (a GPU launches a kernel for about each: where a small model's step waits on the host, their count
    is its time)."""
    totals = collections.defaultdict(lambda: collections.Counter())
    for row in operations:
        scale = layer_scale if ".N" in row["module"] else 1.0
        for group in ("all", f"source: {row['source']}", f"pass: {row['phase']}"):
            totals[group]["bytes"] += row["bytes"] * scale
            totals[group]["flops"] += row["flops"] * scale
            totals[group]["device_ms"] += row.get("device_ms", 0.0) * scale
            totals[group]["operations"] += row["calls"] * scale
            if row["op"] not in MATRIX_PRODUCTS:
                totals[group]["bytes_outside_matrix_products"] += row["bytes"] * scale

    def per_position(counter):
        return {
            "bytes": counter["bytes"] / positions,
            "bytes_outside_matrix_products": counter["bytes_outside_matrix_products"] / positions,
            "matrix_product_flops": counter["flops"] / positions,
            "operations_per_step": round(counter["operations"]),
            **({"device_ms_per_step": counter["device_ms"]} if counter["device_ms"] else {}),
        }

    ordered = sorted(
        totals, key=lambda group: (group.startswith("pass"), -totals[group]["bytes_outside_matrix_products"])
    )
    return {
        "positions": positions,
        "layer_rows_scaled_by": layer_scale,
        "per_position": {group: per_position(totals[group]) for group in ordered},
    }


def main(args):
    import torch

    from qlora_kit import modeling

    for name in args.recipes:  # before any model is built or trained
        recipe = train_throughput.RECIPES[name]
        if recipe["runner"] != "trainer" or recipe.get("compile_layers"):
            sys.exit(f"--recipes: {name!r}: only the project's eager recipes can be recorded operation by operation")
    folder = zephyr_shaped.build(Path(args.model_dir), tiny=args.tiny, layers=args.layers)
    config = json.loads((folder / "config.json").read_text())
    if not torch.cuda.is_available():
        # bf16 as a GPU computes (the CPU's default is fp32, whose activations are twice the bytes)
        modeling.compute_dtype = lambda: torch.bfloat16
    results = {"command": " ".join(sys.argv), "settings": vars(args), **zephyr_shaped.environment(), "runs": {}}
    for name in args.recipes:
        recipe = {**train_throughput.RECIPES[name], **({"batch_size": args.batch_size} if args.batch_size else {})}
        steps = argparse.Namespace(
            warmup_steps=1, steps=1, repeats=1, profile_steps=1, max_seq_length=args.max_seq_length, seed=args.seed,
            scratch=args.scratch,
        )  # fmt: skip
        run = train_throughput.measure(folder, recipe, args.task, steps, profiler=recorded)
        operations = run["profile"]["operations"]
        positions = positions_of(operations, config["hidden_size"])
        scale = args.full_layers / config["num_hidden_layers"] if args.full_layers else 1.0
        summary = summarise(operations, positions, scale)
        results["runs"][name] = {"recipe": recipe, "summary": summary, "operations": operations}
        print_summary(name, summary)
    zephyr_shaped.write_result(Path(args.out), results)


def positions_of(operations: list[dict], hidden: int) -> int:
    """The step's positions (rows x padded width): the embedding's output is one ``hidden`` vector each."""
    embedded = [row for row in operations if row["op"] == "embedding" and row["phase"] == "forward"]
    if not embedded:
        sys.exit("found no embedding in the recorded step: not a decoder model this can read")
    return round(embedded[0]["output_elements"] / embedded[0]["calls"] / hidden)


def print_summary(name: str, summary: dict) -> None:
    every = summary["per_position"]["all"]
    print(
        f"{name}: {summary['positions']} positions; per position {every['bytes'] / 1024:,.0f} KiB moved, "
        f"{every['bytes_outside_matrix_products'] / 1024:,.0f} KiB outside matrix products; "
        f"{every['operations_per_step']:,} operations moving data in the step",
        flush=True,
    )
    for group, value in summary["per_position"].items():
        if group != "all":
            outside = value["bytes_outside_matrix_products"]
            ms = f"  {value['device_ms_per_step']:8.1f} ms" if "device_ms_per_step" in value else ""
            operations = f"{value['operations_per_step']:7,} ops"
            print(
                f"  {outside / 1024:9,.1f} KiB {outside / every['bytes_outside_matrix_products']:6.1%} {operations}"
                f"{ms}  {group}"
            )


def markdown_table(results: dict, operations: bool = False) -> str:
    """The runs of a results file side by side: MB moved per position outside matrix products, by source (with the
    kernels' milliseconds of the step where a GPU measured them), or with ``operations`` the step's operations that
    move data, by source."""
    runs = results["runs"]
    groups = list(dict.fromkeys(group for run in runs.values() for group in run["summary"]["per_position"]))
    lines = ["| source | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for group in groups:
        cells = []
        for run in runs.values():
            value = run["summary"]["per_position"].get(group)
            if value is None:
                cells.append("-")
                continue
            if operations:
                cells.append(f"{value['operations_per_step']:,}")
                continue
            cell = f"{value['bytes_outside_matrix_products'] / 1e6:.1f}"
            if "device_ms_per_step" in value:
                cell += f" ({value['device_ms_per_step']:.0f} ms)"
            cells.append(cell)
        name = group
        if group == "all":
            name = "**all**" if operations else "**all, outside matrix products**"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    flops = [run["summary"]["per_position"]["all"]["matrix_product_flops"] / 1e9 for run in runs.values()]
    lines.append("| matrix products, GFLOP per position | " + " | ".join(f"{value:.1f}" for value in flops) + " |")
    # the bytes' table ends with the step's operations (results written before they were counted have none)
    counts = [run["summary"]["per_position"]["all"].get("operations_per_step") for run in runs.values()]
    if not operations and any(count is not None for count in counts):
        cells = " | ".join("-" if count is None else f"{count:,}" for count in counts)
        lines.append(f"| operations moving data in the step (about a kernel each on a GPU) | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default="/tmp/zephyr-7b-shaped")
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same architecture (code path check)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of the model built (default: all)")
    parser.add_argument("--full_layers", type=int, default=32, help="scale the layers' rows to this depth (0: none)")
    parser.add_argument("--recipes", nargs="+", default=["fast, all modules"], choices=list(train_throughput.RECIPES))
    parser.add_argument("--batch_size", type=int, default=None, help="rows per step (default: the recipe's)")
    parser.add_argument("--task", default="classification", choices=("classification", "summarization"))
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", default="/tmp/step_anatomy")
    parser.add_argument("--out", default="benchmarks/results/step_anatomy.json")
    parser.add_argument("--table", metavar="JSON", help="print a results file's runs as a markdown table, and stop")
    parser.add_argument(
        "--operations", action="store_true", help="with --table: the operations moving data by source, not the bytes"
    )
    parsed = parser.parse_args()
    if parsed.table:
        print(markdown_table(json.loads(Path(parsed.table).read_text()), parsed.operations))
    else:
        main(parsed)
