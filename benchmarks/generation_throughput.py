"""Evaluation speed: the original one-at-a-time sampling, a plain batched ``model.generate`` as a user would
write it (left padding, the same batches), and this project's batched engine, side by side.

Model: Zephyr-7B-beta's exact config with random weights, 4-bit NF4, a LoRA adapter (r=8 on q,v).
Prompts: the real 20 Newsgroups test set in the fine-tuning format, token lengths as the
embedded model's tokenizer counts them, random ids; every example generates exactly
--new_tokens tokens (random weights never stop early), so both ways do the same work.

Usage:
    # once, on any machine: the real prompts' token lengths (committed in benchmarks/)
    python benchmarks/generation_throughput.py --write_lengths --test_file data/newsgroups/test.jsonl.gz
    # on the GPU:
    python benchmarks/generation_throughput.py --model_dir /tmp/zephyr-shaped \
        --out benchmarks/results/generation_throughput.json
    # the same code path on a CPU, tiny model, in seconds:
    python benchmarks/generation_throughput.py --tiny --model_dir /tmp/tiny-shaped --out /tmp/g.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def adapter_in_compute_dtype(model) -> int:
    """The LoRA weights cast to the compute dtype (bf16 on a GPU); returns how many were cast. peft keeps an adapter
    on a 4-bit base in fp32, so every adapted layer casts its input to fp32 and its output back, a full-size copy
    each way per layer per forward; in bf16 there is none (the matmuls still accumulate in fp32). Measured here
    only: evaluation keeps the adapter as peft loads it."""
    from qlora_kit import modeling

    dtype = modeling.compute_dtype()
    cast = 0
    for name, parameter in model.named_parameters():
        if "lora_" in name and parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
            cast += 1
    return cast


def main(args):
    import json
    import random

    import profiling
    import torch
    import training_batches as tb
    import zephyr_shaped
    from peft import LoraConfig, get_peft_model

    from qlora_kit import fused_lora, inference_kernels, modeling
    from qlora_kit.errors import UsageError
    from qlora_kit.generation import generate, prefill_attention_choice

    if args.write_lengths:
        lengths, _, _ = zephyr_shaped.real_prompt_lengths(
            "classification", args.test_file, modeling.resolve_model_source(args.tokenizer), args.max_prompt_tokens
        )
        Path(args.lengths).write_text(
            json.dumps(
                {
                    "source": args.test_file,
                    "tokenizer": args.tokenizer,
                    "max_prompt_tokens": args.max_prompt_tokens,
                    "lengths": lengths,
                }
            )
            + "\n"
        )
        print(f"wrote {len(lengths)} prompt lengths to {args.lengths}")
        return
    folder = zephyr_shaped.build(Path(args.model_dir), tiny=args.tiny)
    lengths = json.loads(Path(args.lengths).read_text())["lengths"]
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, vocab) for _ in range(n - 1)] for n in lengths]
    print(f"{len(prompts)} prompts, mean {sum(lengths) / len(lengths):.0f} tokens, max {max(lengths)}")

    class Tok:  # the engine needs only the pad id
        pad_token_id = 2

    results = {
        "command": " ".join(sys.argv),
        "settings": vars(args),
        "model": "Zephyr-7B-beta config, random weights",
        "new_tokens": args.new_tokens,
        "examples": len(prompts),
        "mean_prompt_tokens": sum(lengths) / len(lengths),
        **zephyr_shaped.environment(),
        "prefill_attention": prefill_attention_choice(),
        "runs": {},
    }
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    no_stop = [-1]  # no token stops generation: every example produces new_tokens tokens

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    try:
        kernels_asked = inference_kernels.choice()
    except UsageError as error:
        raise SystemExit(str(error)) from None
    liger_refused = kernels_asked == "liger" and inference_kernels.unavailable_reason(device, "mistral")
    if liger_refused:  # before the model loads
        raise SystemExit(f"{inference_kernels.VARIABLE}=liger: {liger_refused}")

    def peak_gb():
        return torch.cuda.max_memory_allocated() / 1e9 if cuda else None

    def reset_peak():  # the peak and the allocator's counts (training_batches.ALLOCATOR_COUNTS) start afresh
        tb.reset_gpu_memory_stats()

    def record(name, seconds, count, extra=None):
        if name in results["runs"]:  # the same run again in this process (a warm call): name it by its call
            earlier = sum(known == name or known.startswith(f"{name}_call") for known in results["runs"])
            name = f"{name}_call{earlier + 1}"
        per = seconds / count
        results["runs"][name] = {
            "examples": count,
            "seconds": seconds,
            "seconds_per_example": per,
            "examples_per_second": 1 / per,
            "peak_gpu_memory_gb": peak_gb(),
            "allocator": tb.allocator_counts(),
            **(extra or {}),
        }
        base = results["runs"].get("original_one_at_a_time_4bit")
        if base:
            results["runs"][name]["speedup_vs_original"] = base["seconds_per_example"] / per
        print(
            f"{name}: {count} examples in {seconds:.1f}s = {per * 1000:.1f} ms/example, peak {peak_gb()} GB", flush=True
        )
        zephyr_shaped.write_result(Path(args.out), results)  # after every run: a cut-off benchmark keeps its numbers

    # 1. the original way and the engine on the 4-bit model with its adapter
    model = get_peft_model(modeling.load_model(str(folder), load_in_4bit=True, for_training=False), lora).eval()
    reset_peak()
    started = time.perf_counter()
    with torch.inference_mode():
        for ids in prompts[:: max(1, len(prompts) // max(1, args.original_examples))][: args.original_examples]:
            model.generate(
                input_ids=torch.tensor([ids], device=device),
                do_sample=True,
                temperature=1e-3,
                top_p=0.95,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=2,
            )
    if args.original_examples:
        record("original_one_at_a_time_4bit", time.perf_counter() - started, args.original_examples)
    # every engine run: the same new tokens, no stop, prefill groups, and (on the 4-bit model) token budget
    engine_4bit = dict(
        max_new_tokens=args.new_tokens,
        stop_ids=no_stop,
        max_batch_tokens=args.max_batch_tokens_4bit,
        prefill_tokens=args.prefill_tokens,
    )
    engine_outputs = None  # the growing-cache loop's answers, if it runs: the reference for the other runs'
    largest_batch = max(args.batch_sizes_4bit, default=1024)  # the static loop's and the profile's batches

    def identical_to_engine(outputs, step=1) -> float:  # share of answers equal to the engine's on the same prompts
        return sum(a == b for a, b in zip(outputs, engine_outputs[::step])) / len(outputs)

    for batch_size in args.batch_sizes_4bit:
        reset_peak()
        started = time.perf_counter()
        subset = prompts[:: args.stride_4bit]  # evenly spread over the test set
        out = generate(model, Tok, subset, batch_size=batch_size, loop="dynamic", **engine_4bit)
        assert all(o is not None and len(o) == args.new_tokens for o in out.outputs)
        record(
            f"engine_4bit_batch{batch_size}",
            time.perf_counter() - started,
            len(subset),
            {"final_batch_size": out.final_batch_size},
        )
        engine_outputs = out.outputs
        if args.stop_check_every != 1:  # the same prompts, checking for the end every k steps: no sync per step
            reset_peak()
            started = time.perf_counter()
            out = generate(
                model,
                Tok,
                subset,
                batch_size=batch_size,
                loop="dynamic",
                stop_check_every=args.stop_check_every,
                **engine_4bit,
            )
            record(
                f"engine_4bit_batch{batch_size}_stop_check_every{args.stop_check_every}",
                time.perf_counter() - started,
                len(subset),
                {"identical_to_engine": identical_to_engine(out.outputs)},
            )
        if args.static:  # the same prompts through the static-cache loop (CUDA graphs on a GPU)
            reset_peak()
            started = time.perf_counter()
            out = generate(model, Tok, subset, batch_size=batch_size, loop="static", **engine_4bit)
            record(
                f"engine_static_4bit_batch{batch_size}",
                time.perf_counter() - started,
                len(subset),
                {"identical_to_engine": identical_to_engine(out.outputs)},
            )

    def profile_engine(**changes):  # where the engine's time goes, on an evenly spread subset, after timed runs
        subset = prompts[:: max(1, len(prompts) // args.profile_examples)][: args.profile_examples]
        loop = "static" if args.profile_loop == "fused" else args.profile_loop
        profile = results["profile_engine_4bit"] = {"examples": len(subset), "loop": args.profile_loop, **changes}
        with profiling.profiled(profile):
            generate(model, Tok, subset, batch_size=largest_batch, loop=loop, **{**engine_4bit, **changes})
        profiling.print_summary(
            f"profile of the engine ({args.profile_loop} loop), 4-bit, {len(subset)} examples", profile
        )
        zephyr_shaped.write_result(Path(args.out), results)

    if args.profile_examples and args.profile_loop != "fused":
        profile_engine()
    for batch_size in args.batch_sizes_plain:
        reset_peak()
        started = time.perf_counter()
        subset = prompts[:: args.stride_plain]
        # transformers' generate over the engine's own batches: the same padding (it prefills its own way)
        out = generate(model, Tok, subset, batch_size=batch_size, loop="plain", **engine_4bit)
        extra = {"final_batch_size": out.final_batch_size}
        if engine_outputs is not None and args.stride_plain % args.stride_4bit == 0:  # the engine's prompts: compare
            extra["identical_to_engine"] = identical_to_engine(out.outputs, args.stride_plain // args.stride_4bit)
        record(f"plain_generate_4bit_batch{batch_size}", time.perf_counter() - started, len(subset), extra)

    def static_variant(name, extra, **changes):  # the same prompts through the static loop, after a change
        subset = prompts[:: args.stride_4bit]
        reset_peak()
        started = time.perf_counter()
        out = generate(model, Tok, subset, batch_size=largest_batch, loop="static", **{**engine_4bit, **changes})
        seconds = time.perf_counter() - started
        if engine_outputs is not None:
            extra = {"identical_to_engine": identical_to_engine(out.outputs), **extra}
        record(f"engine_static_4bit_batch{largest_batch}_{name}", seconds, len(subset), extra)

    for budget in args.static_max_batch_tokens:  # smaller batches, for a card with less memory to spare
        static_variant(f"max_batch_tokens{budget}", {"max_batch_tokens": budget}, max_batch_tokens=budget)
    if args.fused_lora_inference or args.fused_max_batch_tokens:  # the adapter's product added in place, then undone
        fused_lora.fuse_lora(model, for_inference=True)
        # the element-wise kernels as evaluation chooses them (QLORA_KIT_INFERENCE_KERNELS), for every fused run
        results["inference_kernels"] = inference_kernels.apply(model)
        if args.fused_lora_inference:
            static_variant("fused_lora_inference", {})
        for budget in args.fused_max_batch_tokens:  # evaluation's default on a GPU, in a smaller card's batches
            name = f"fused_lora_inference_max_batch_tokens{budget}"
            static_variant(name, {"max_batch_tokens": budget}, max_batch_tokens=budget)
        if args.profile_examples and args.profile_loop == "fused":  # at the last budget timed (the parser asks one)
            profile_engine(max_batch_tokens=args.fused_max_batch_tokens[-1])
        fused_lora.fuse_lora(model)  # evaluation back through peft's layers
    if args.adapter_in_compute_dtype:  # the LoRA weights in bf16 (no casts per layer); left so
        static_variant("adapter_in_compute_dtype", {"lora_tensors_cast": adapter_in_compute_dtype(model)})
    del model
    if cuda:
        torch.cuda.empty_cache()

    # 2. the engine with the adapter merged into a bf16 base (--merge_adapter): no dequantization per step
    if args.batch_sizes_merged:
        model = get_peft_model(modeling.load_model(str(folder), load_in_4bit=False, for_training=False), lora)
        model = model.merge_and_unload().eval()
    for batch_size in args.batch_sizes_merged:
        reset_peak()
        started = time.perf_counter()
        subset = prompts[:: args.stride_merged]
        out = generate(
            model,
            Tok,
            subset,
            batch_size=batch_size,
            loop="dynamic",
            **{**engine_4bit, "max_batch_tokens": args.max_batch_tokens_merged},
        )
        assert all(o is not None and len(o) == args.new_tokens for o in out.outputs)
        record(
            f"engine_merged_bf16_batch{batch_size}",
            time.perf_counter() - started,
            len(subset),
            {"final_batch_size": out.final_batch_size},
        )

    if args.original_examples:
        results["runs"]["original_one_at_a_time_4bit"]["speedup_vs_original"] = 1.0
    print("\n| way | ms/example | examples/s | speed-up | peak GPU GB |\n|---|---|---|---|---|")
    for name, run in results["runs"].items():
        speedup = f"{run['speedup_vs_original']:.1f}x" if "speedup_vs_original" in run else "-"  # no original run
        print(
            f"| {name} | {run['seconds_per_example'] * 1000:.1f} | {run['examples_per_second']:.1f} | {speedup} | "
            f"{run['peak_gpu_memory_gb']} |"
        )
    zephyr_shaped.write_result(Path(args.out), results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test_file", help="20 Newsgroups test file (for --write_lengths)")
    parser.add_argument("--write_lengths", action="store_true", help="only compute the real prompts' token lengths")
    parser.add_argument(
        "--lengths", default=str(Path(__file__).resolve().parent / "newsgroups_test_prompt_lengths.json")
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same architecture (CPU check)")
    parser.add_argument("--model_dir", default="/tmp/zephyr-7b-shaped")
    parser.add_argument("--tokenizer", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--max_prompt_tokens", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=20)
    parser.add_argument("--original_examples", type=int, default=16)
    parser.add_argument("--stride_4bit", type=int, default=1, help="engine on every Nth prompt, 4-bit model")
    parser.add_argument("--stride_merged", type=int, default=1, help="engine on every Nth prompt, merged model")
    parser.add_argument(
        "--batch_sizes_4bit",
        type=int,
        nargs="*",
        default=[1024],
        help="the growing-cache loop and the static loop through peft's layers, the other runs' reference for their "
        "answers (none given: not run, and the later runs record no identical_to_engine; they batch at most 1024)",
    )
    parser.add_argument(
        "--batch_sizes_merged", type=int, nargs="*", default=[1024], help="merged model (none given: not run)"
    )
    parser.add_argument(
        "--batch_sizes_plain", type=int, nargs="*", default=[64, 256], help="plain generate (none given: not run)"
    )
    parser.add_argument("--stride_plain", type=int, default=4, help="plain generate on every Nth prompt")
    # Token budgets meant to keep the peak under 22 GB on the 7B model: the KV cache takes 128 KiB per token;
    # prefill activations (~118 KB per token) are bounded by --prefill_tokens.
    parser.add_argument("--max_batch_tokens_4bit", type=int, default=110_000)
    parser.add_argument("--max_batch_tokens_merged", type=int, default=40_000)
    parser.add_argument("--prefill_tokens", type=int, default=16_384, help="prompt tokens prefilled at once")
    parser.add_argument(
        "--stop_check_every",
        type=int,
        default=4,
        help="also the engine checking for the end every N decode steps (1: not run)",
    )
    parser.add_argument(
        "--static",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the engine's static-cache loop on the 4-bit model, same prompts",
    )
    parser.add_argument(
        "--profile_examples", type=int, default=0, help="profile the engine on this many prompts (0: no profile)"
    )
    parser.add_argument(
        "--profile_loop",
        choices=("dynamic", "static", "fused"),
        default="static",
        help="the decode loop the profile runs (fused: the static loop with the adapter's product added in place, "
        "after the timed runs with it, at the last of --fused_max_batch_tokens)",
    )
    parser.add_argument(
        "--static_max_batch_tokens",
        type=int,
        nargs="*",
        default=[],
        help="also the static loop in batches of at most N padded tokens (less memory), after the default budget",
    )
    parser.add_argument(
        "--fused_lora_inference",
        action="store_true",
        help="also the static loop with the adapter's product added in place (fused_lora.fuse_lora(for_inference))",
    )
    parser.add_argument(
        "--fused_max_batch_tokens",
        type=int,
        nargs="*",
        default=[],
        help="also the static loop with the adapter's product added in place, in batches of at most N padded tokens",
    )
    parser.add_argument(
        "--adapter_in_compute_dtype",
        action="store_true",
        help="also the static loop with the LoRA weights cast to bf16 (adapter_in_compute_dtype), last",
    )
    parser.add_argument("--out", default="benchmarks/results/generation_throughput.json")
    arguments = parser.parse_args()
    if arguments.profile_loop == "fused" and arguments.profile_examples and not arguments.fused_max_batch_tokens:
        parser.error("--profile_loop fused profiles after the timed fused runs: give --fused_max_batch_tokens")
    main(arguments)
