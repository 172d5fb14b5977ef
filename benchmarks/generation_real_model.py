"""Evaluation speed and exactness on a real trained run (e.g. SmolLM2-135M-Instruct with its adapter), side by
side in one process: one example at a time (greedy), a plain batched ``model.generate`` (left padding, the
engine's own batches), and the project's engine with each of its decode loops (the growing cache; the static cache,
its steps replayed as CUDA graphs on a GPU), each called twice (the first call warms up kernels and caches). The
adapter runs through peft's own layers in every way but ``--fused_lora_inference`` (the product added in place,
evaluation's default on a GPU for a 4-bit base) and ``--merged`` (merged into a 16-bit base, the default there;
``--merged_first``: also before every other way, as the inference script's first generation).

Times are generation alone (the prompts are built and tokenised before the clock starts); the inference script
prints its whole wall time separately. Exactness: the share of outputs identical to one-at-a-time greedy on an
evenly spread subset, to the plain path on every prompt, and the metric of each way. ``--track_margins``: how
near a tie the answers that differ from one at a time's came, and what deciding near ties alone would give;
``--recheck_margins``: also the static loop doing so, timed.

Usage (after training a run, e.g. `python zephyr_summarization.py --recipe small-model ...`):
    python benchmarks/generation_real_model.py --experiment_dir RUN --test_file samsum/test.jsonl.gz \\
        --out benchmarks/results/generation_smollm2_samsum.json
    python benchmarks/generation_real_model.py --experiment_dir NEWS_RUN --test_file newsgroups/test.jsonl.gz \\
        --decoding constrained --out benchmarks/results/generation_smollm2_newsgroups.json
"""

from __future__ import annotations

import argparse
import sys
import time
from argparse import Namespace
from pathlib import Path


def timed(function):
    """``function()``'s value, its seconds, and its GPU memory: the peak and the caching allocator's counts over the
    call (cudaMalloc / cudaFree calls and retries: a decode cache that grows step by step makes a new block for
    every layer at every step until the allocator holds enough; one allocated once makes none)."""
    import torch
    import training_batches as tb

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    tb.reset_gpu_memory_stats()
    started = time.perf_counter()
    value = function()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    memory = {
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        "allocator": tb.allocator_counts(),
    }
    return value, seconds, memory


class BatchClock:
    """``generate``'s ``on_batch``: each batch's rows and the seconds since the previous batch ended (the call's
    start, for the first). A batch's answers are on the host when it is called: its work has finished."""

    def __init__(self):
        self.rows, self.seconds, self.last = [], [], None

    def start(self):
        self.last = time.perf_counter()

    def __call__(self, indices, answers):
        now = time.perf_counter()
        self.rows.append(len(indices))
        self.seconds.append(round(now - self.last, 4))
        self.last = now


def one_at_a_time(model, tokenizer, prompt: list[int], max_new_tokens: int, stop_ids: list[int], trie):
    """Greedy, one prompt alone (a batch of one: no padding), through transformers' generate; constrained like
    the engine."""
    from qlora_kit.generation import _generate_batch_plain

    return _generate_batch_plain(model, tokenizer, [prompt], max_new_tokens, stop_ids, trie)[0]


# Margins (logits) at which near_ties counts what rechecking would do.
MARGIN_GRID = (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0)


def near_ties(margins: list[float], outputs: list, subset: list[int], single: list, alone: list | None = None) -> dict:
    """How near each of the static loop's answers came to a tie against whether it equals one at a time's: the
    closest margins of the subset's answers that differ, and for each margin of ``MARGIN_GRID`` the share of
    every answer under it (the share ``recheck_margin`` would decode again alone) and the subset's share identical
    once those are: an answer under the margin replaced by ``alone``'s (the subset's answers decoded alone), or
    without them by one at a time's."""
    differ = [i for i, answer in zip(subset, single) if outputs[i] != answer]
    alone = single if alone is None else alone
    grid = {}
    for margin in MARGIN_GRID:
        rechecked = [alone[k] if margins[i] < margin else outputs[i] for k, i in enumerate(subset)]
        grid[f"{margin:g}"] = {
            "share_rechecked": sum(m < margin for m in margins) / len(margins),
            "identical_share_if_rechecked": sum(a == b for a, b in zip(rechecked, single)) / len(subset),
        }
    return {"differing_margins": sorted(margins[i] for i in differ), "by_margin": grid}


def main(args):
    """The benchmark under the numerics asked for (``--exact_reductions``, ``--sdpa_backend``, ``--fp32``): each
    changes every way alike, one at a time included, so the shares of identical answers say how much they matter."""
    import contextlib

    import torch

    if args.fp32:  # every layer, the cache and the logits in fp32 (as on the CPU): is bf16 what turns batched answers?
        from qlora_kit import modeling

        modeling.compute_dtype = lambda: torch.float32
    if args.exact_reductions:  # PyTorch lets cuBLAS add a split bf16 / fp16 product's parts in that precision
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    attention = contextlib.nullcontext()
    if args.sdpa_backend != "default":  # one attention kernel for every way (batches with a mask, one prompt without)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        attention = sdpa_kernel(
            {"efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[args.sdpa_backend]
        )
    with attention:
        run(args)


def run(args):
    import contextlib
    import json

    import profiling
    import zephyr_shaped

    from qlora_kit import modeling
    from qlora_kit.compare import paired_differences
    from qlora_kit.evaluation import _load_finetuned, load_eval_rows, plan_job
    from qlora_kit.formatting import PromptFormat, end_of_turn_token
    from qlora_kit.generation import LabelTrie, decode_alone, generate, prefill_attention_choice
    from qlora_kit.run_folder import RunFolder
    from qlora_kit.tasks import get_task

    run = RunFolder(args.experiment_dir)
    config = run.config()
    task = get_task(config["task"])
    checkpoint = run.default_checkpoint(None)
    adapter = run.adapter(checkpoint)
    eval_args = Namespace(
        test_file=args.test_file, validation_file=None, dataset="", split="test", limit=args.limit,
        decoding=args.decoding, max_batch_tokens=args.max_batch_tokens,
    )  # fmt: skip
    rows = load_eval_rows(task, eval_args, config["label_names"], recorded=config["settings"])
    tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else run.adapter_dir
    tokenizer = modeling.load_tokenizer(str(tokenizer_dir), padding_side="left")
    end_token = config.get("end_token") or end_of_turn_token(tokenizer)
    fmt = PromptFormat(task, "finetune", config["prompt_style"], tokenizer, label_names=config["label_names"])
    job = plan_job(
        task, tokenizer, fmt, rows, eval_args, config["settings"]["max_seq_length"], end_token, config["label_names"]
    )
    # peft's layers: the reference every variant is compared with (evaluation's default on a GPU is the in-place
    # product, --fused_lora_inference here)
    model = _load_finetuned(config, adapter, use_flash_attention=False, adapter_product="peft")
    new_tokens = args.max_new_tokens or task.max_new_tokens
    settings = dict(
        max_new_tokens=new_tokens,
        stop_ids=job.stop_ids,
        label_sequences=job.label_sequences,
        max_batch_tokens=args.max_batch_tokens,
        batch_size=args.batch_size,
        progress=False,
        loop="dynamic",  # "the engine": the growing cache; the static loop is named where it runs
    )
    results = {
        "command": " ".join(sys.argv),
        "run": str(run.path),
        "checkpoint": checkpoint,
        "task": task.name,
        "examples": len(rows),
        "max_new_tokens": new_tokens,
        "decoding": args.decoding if task.labelled else "greedy",
        **zephyr_shaped.environment(),
        "exact_reductions": args.exact_reductions,
        "sdpa_backend": args.sdpa_backend,
        "compute_dtype": str(modeling.compute_dtype()).removeprefix("torch."),
        "prefill_attention": prefill_attention_choice(),
        "runs": {},
    }

    def parsed(outputs) -> list:
        return [
            task.parse_answer(tokenizer.decode(ids or [], skip_special_tokens=True), config["label_names"])
            for ids in outputs
        ]

    def metric(outputs) -> dict:
        scored = task.score([row["target"] for row in rows], parsed(outputs), config["label_names"])
        return {key: value for key, value in scored.items() if not isinstance(value, dict)}

    def record(name, outputs, seconds, memory, count, extra=None):
        results["runs"][name] = {
            "examples": count,
            "seconds": seconds,
            "examples_per_second": count / seconds,
            "ms_per_example": 1000 * seconds / count,
            **memory,
            **(extra or {}),
        }
        print(f"{name}: {count} examples in {seconds:.2f}s = {count / seconds:.1f} examples/s", flush=True)
        zephyr_shaped.write_result(Path(args.out), results)

    def identical(outputs, reference) -> float:
        return sum(a == b for a, b in zip(outputs, reference)) / len(outputs)

    # the engine's answers, and one at a time's on an evenly spread subset, once each has run: what every later way
    # is compared with
    engine = single = single_answers = None
    subset = list(range(0, len(rows), max(1, len(rows) // max(1, args.one_at_a_time))))[: args.one_at_a_time]

    def against_one_at_a_time(outputs) -> dict:
        """A way's answers to one at a time's prompts (``outputs``: to every prompt) scored against one at a time's,
        paired: this way minus one at a time (accuracy or ROUGE, with its bootstrap interval), what bf16 rounding in
        batches costs or gains."""
        references = [rows[i]["target"] for i in subset]
        return paired_differences(references, single_answers, parsed([outputs[i] for i in subset]), task.labelled)

    def compared(outputs) -> dict:
        """The metric of answers to every prompt, and their shares identical to the engine's and to one at a time's
        (those that have run), and their score against one at a time's on its prompts."""
        extra = {"metrics": metric(outputs)}
        if engine is not None:
            extra["identical_to_engine"] = identical(outputs, engine)
        if single is not None:
            extra["one_at_a_time_identical_share"] = identical([outputs[i] for i in subset], single)
            extra["against_one_at_a_time"] = against_one_at_a_time(outputs)
        return extra

    def called(name, profile_first=False, **changes):
        """``generate`` with ``settings`` changed by ``changes``, called ``--engine_calls`` times, each recorded as
        NAME_callK with its metric, its share of answers identical to the engine's (once there are some) and, after
        the first call, to the first call's: the same call need not give the same answers again on a GPU (bf16
        kernels may pick other algorithms, and a long greedy answer turns at the first near-tie), and each batch's
        seconds (a first call's extra time in its first batch is a process's one-off cost, spread over every batch
        it is a per-shape one). ``profile_first``: the first call runs under the profiler (its summary in
        NAME_call1's ``profile``; its time is the profiled one). Returns the last call's GenerationResult."""
        first = None
        for call in range(1, args.engine_calls + 1):
            clock = BatchClock()

            def generation(clock=clock):
                clock.start()
                return generate(model, tokenizer, job.prompt_ids, on_batch=clock, **{**settings, **changes})

            profile = {} if profile_first and call == 1 else None
            with profiling.profiled(profile) if profile is not None else contextlib.nullcontext():
                out, seconds, memory = timed(generation)
            first = first or out.outputs
            extra = {**compared(out.outputs), "final_batch_size": out.final_batch_size}
            if "recheck_margin" in changes:
                extra["rechecked"] = len(out.rechecked)
            extra.update(batch_rows=clock.rows, batch_seconds=clock.seconds)
            if profile is not None:
                extra["profile"] = profile
                profiling.print_summary(f"{name}_call1 profiled", profile)
            if call > 1:
                extra["identical_to_first_call"] = identical(out.outputs, first)
            record(f"{name}_call{call}", out.outputs, seconds, memory, len(rows), extra)
        return out

    if args.merged_first and not config["load_in_4bit"]:
        # the merged adapter's calls before any other generation in this process, as the inference script makes
        # them (its default on a GPU): the first pays what a process's first generation pays, a later one does not
        peft_model, model = model, _load_finetuned(config, adapter, use_flash_attention=False, adapter_product="merged")
        called(
            f"engine_{args.variant_loop}_adapter_merged_first", profile_first=args.profile_first, loop=args.variant_loop
        )
        model = peft_model
        if args.only_merged_first:
            return
    engine = called("engine").outputs
    if args.stop_check_every != 1:  # checking for the end every k decode steps instead of every step
        out, seconds, memory = timed(
            lambda: generate(model, tokenizer, job.prompt_ids, stop_check_every=args.stop_check_every, **settings)
        )
        extra = compared(out.outputs)
        record(f"engine_stop_check_every{args.stop_check_every}", out.outputs, seconds, memory, len(rows), extra)
    # the static-cache loop (CUDA graphs on a GPU) at each stop-check interval
    static, margins = {}, None
    for every in args.static_stop_check_every:
        # with --track_margins or --recheck_margins the first interval's calls record how near each answer came to
        # a tie
        track = (args.track_margins or bool(args.recheck_margins)) and margins is None
        out = called(f"engine_static_check_every{every}", loop="static", stop_check_every=every, track_margins=track)
        static[every] = out.outputs
        if track:
            margins = out.closest_margins
    # one at a time on the subset: the exactness check, before the slower comparisons
    trie = LabelTrie(job.label_sequences) if job.label_sequences else None
    if subset:
        single, seconds, memory = timed(
            lambda: [one_at_a_time(model, tokenizer, job.prompt_ids[i], new_tokens, job.stop_ids, trie) for i in subset]
        )
        single_answers = parsed(single)  # parsed once: every later way is scored against them
        extra = {"engine_identical_share": identical(single, [engine[i] for i in subset])}
        extra["engine_against_one_at_a_time"] = against_one_at_a_time(engine)
        for every, outputs in static.items():
            extra[f"engine_static_check_every{every}_identical_share"] = identical(single, [outputs[i] for i in subset])
            extra[f"engine_static_check_every{every}_against_one_at_a_time"] = against_one_at_a_time(outputs)
        if margins is not None:
            extra["near_ties"] = near_ties(margins, static[args.static_stop_check_every[0]], subset, single)
        record("one_at_a_time", single, seconds, memory, len(subset), extra)
        if margins is not None:  # what a recheck runs, on the same prompts: one at a time's answers?
            alone, seconds, memory = timed(
                lambda: [
                    decode_alone(model, tokenizer, job.prompt_ids[i], new_tokens, job.stop_ids, trie) for i in subset
                ]
            )
            extra = {"identical_to_one_at_a_time": identical(alone, single)}
            # the static loop with its near ties replaced by these answers, against one at a time's
            outputs = static[args.static_stop_check_every[0]]
            extra["near_ties"] = near_ties(margins, outputs, subset, single, alone)
            record("decode_alone", alone, seconds, memory, len(subset), extra)
    # the static loop rechecking its near ties: each answer closer than the margin to a tie decoded again alone
    for margin in args.recheck_margins:
        called(f"engine_static_recheck_margin{margin:g}", loop="static", recheck_margin=margin)
    # the static loop at smaller token budgets: each batch's rows decode over its own longest prompt's cache (less
    # padding: a single batch of prompts of mixed lengths pads most rows to the longest), in more batches; with
    # --fused_lora_inference, with the product in place (evaluation's default on a GPU), else through peft's layers
    in_place = "fused_lora_inference_" if args.fused_lora_inference else ""
    if args.fused_lora_inference:  # the adapter's product added in place, in the output's dtype; undone after
        from qlora_kit import fused_lora

        fused_lora.fuse_lora(model, for_inference=True)
        called(f"engine_{args.variant_loop}_fused_lora_inference", loop=args.variant_loop)
    for budget in args.static_batch_tokens:
        called(f"engine_static_{in_place}batch_tokens{budget}", loop="static", max_batch_tokens=budget)
    # ... and dropping a batch's finished rows once at most this share of them still decodes
    for share in args.compact_below:
        called(f"engine_static_{in_place}compact_below{share:g}", loop="static", compact_below=share)
    if args.fused_lora_inference:
        fused_lora.fuse_lora(model)  # evaluation back through peft's layers
    # ... and with other prefill groups: more prompt tokens through the model at once, fewer forwards per batch
    for tokens in args.static_prefill_tokens:
        called(f"engine_static_prefill_tokens{tokens}", loop="static", prefill_tokens=tokens)
    for batch_size in args.batch_sizes_plain:
        out, seconds, memory = timed(
            lambda size=batch_size: generate(
                model, tokenizer, job.prompt_ids, **{**settings, "loop": "plain", "batch_size": size}
            )
        )
        record(f"plain_generate_batch{batch_size}", out.outputs, seconds, memory, len(rows), compared(out.outputs))
    if args.profile:  # where an engine call's time goes (benchmarks/profiling.py), in the loop asked for
        profile = results["profile_engine"] = {"loop": args.profile_loop}
        with profiling.profiled(profile):
            generate(model, tokenizer, job.prompt_ids, **{**settings, "loop": args.profile_loop})
        profiling.print_summary(f"profile of an engine call ({args.profile_loop} loop)", profile)
    if args.merged and not config["load_in_4bit"]:
        # --merge_adapter on a 16-bit base: the same weights with no LoRA matmuls per step (bf16 rounding of
        # the merged weights may flip near-ties)
        del model
        model = _load_finetuned(config, adapter, use_flash_attention=False, adapter_product="merged")
        called(f"engine_{args.variant_loop}_adapter_merged", loop=args.variant_loop)
        for share in args.compact_below:  # merged and dropping finished rows
            called(f"engine_static_adapter_merged_compact_below{share:g}", loop="static", compact_below=share)
    print(json.dumps({name: round(run["examples_per_second"], 1) for name, run in results["runs"].items()}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment_dir", required=True, help="a trained run folder")
    parser.add_argument("--test_file", required=True)
    parser.add_argument("--decoding", choices=("greedy", "constrained"), default="greedy")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=None, help="default: the task's")
    parser.add_argument("--max_batch_tokens", type=int, default=None, help="default: the engine's budget")
    parser.add_argument(
        "--batch_size", type=int, default=None, help="prompts a batch, every engine way (default: the engine's)"
    )
    parser.add_argument("--engine_calls", type=int, default=2)
    parser.add_argument(
        "--batch_sizes_plain", type=int, nargs="*", default=[64, 256], help="plain generate (none given: not run)"
    )
    parser.add_argument("--one_at_a_time", type=int, default=64, help="examples generated one at a time (0: none)")
    parser.add_argument(
        "--recheck_margins",
        type=float,
        nargs="*",
        default=[],
        help="the static loop with each recheck margin (logits; answers nearer a tie decoded again alone), after "
        "the first static call records every answer's margin against one at a time's answers",
    )
    parser.add_argument(
        "--track_margins",
        action="store_true",
        help="the first static call records how near a tie every answer came, and one at a time's prompts are decoded "
        "alone as a recheck would (--recheck_margins without the timed calls)",
    )
    parser.add_argument(
        "--merged",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the adapter merged into a 16-bit base (--merge_adapter), in --variant_loop",
    )
    parser.add_argument(
        "--merged_first",
        action="store_true",
        help="also the adapter merged, in --variant_loop, before every other way (the process's first generation,"
        " as in the inference script)",
    )
    parser.add_argument(
        "--static_batch_tokens",
        type=int,
        nargs="*",
        default=[],
        help="also the static-cache loop with batches of at most N padded tokens each (smaller batches, less padding;"
        " with --fused_lora_inference, the product in place)",
    )
    parser.add_argument(
        "--compact_below",
        type=float,
        nargs="*",
        default=[],
        help="also the static-cache loop dropping a batch's finished rows once at most this share still decodes"
        " (with --fused_lora_inference, the product in place; with --merged, also merged)",
    )
    parser.add_argument(
        "--fused_lora_inference",
        action="store_true",
        help="also the adapter's product added in place (fused_lora.fuse_lora(for_inference)), in --variant_loop",
    )
    parser.add_argument(
        "--variant_loop",
        choices=("dynamic", "static"),
        default="static",
        help="the decode loop --fused_lora_inference and --merged run in (static: the default on a GPU)",
    )
    parser.add_argument(
        "--static_prefill_tokens",
        type=int,
        nargs="*",
        default=[],
        help="also the static-cache loop prefilling at most N prompt tokens at once (default: generation.PREFILL_TOKENS)",
    )
    parser.add_argument("--profile", action="store_true", help="profile one more engine call")
    parser.add_argument("--only_merged_first", action="store_true", help="with --merged_first: no other way after it")
    parser.add_argument(
        "--profile_first",
        action="store_true",
        help="with --merged_first: its first call runs under the profiler (where a process's first generation's"
        " extra time goes: the host's largest costs, cudaMalloc and kernel loading among them)",
    )
    parser.add_argument(
        "--profile_loop", choices=("dynamic", "static"), default="static", help="the decode loop --profile runs"
    )
    parser.add_argument(
        "--stop_check_every",
        type=int,
        default=4,
        help="also the engine checking for the end every N steps (1: not run)",
    )
    parser.add_argument(
        "--static_stop_check_every",
        type=int,
        nargs="*",
        default=[1, 4],
        help="also the static-cache loop (loop='static'), checking for the end every N steps (none given: not run)",
    )
    parser.add_argument(
        "--exact_reductions",
        action="store_true",
        help="no reduced-precision reductions in cuBLAS's bf16 / fp16 products (PyTorch allows them by default)",
    )
    parser.add_argument(
        "--sdpa_backend",
        choices=("default", "efficient", "math"),
        default="default",
        help="one scaled-dot-product attention kernel for every way (default: PyTorch's choice per call)",
    )
    parser.add_argument(
        "--fp32",
        action="store_true",
        help="compute in fp32 (the model, its cache, the logits) instead of the GPU's bf16; cuBLAS's fp32 products"
        " stay fp32 (PyTorch's default: no TF32)",
    )
    parser.add_argument("--out", default="benchmarks/results/generation_real_model.json")
    main(parser.parse_args())
