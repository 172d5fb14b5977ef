"""Prompt positions that prefill computes, with and without the prefix every prompt of a batch shares.

Every prompt of an evaluation is built from one template: a chat template's system turn, the instruction, the
20 class names, the few-shot examples come before the example's own text. The engine prefills those shared
tokens once per batch and repeats their keys and values for every row (``generation.shared_prefix_length``).
This script counts, for each prompt format of both tasks on the real test sets, the positions prefill runs
through the model with and without that sharing, over the engine's own batches (``plan_batches``) and row groups
(``prefill_row_groups``): prefill's matrix products scale with positions (attention's do not shrink: the rows
still attend to the shared keys). A count of work, not a timing; ``--time N`` also times ``generate`` on ``N``
evenly spread test prompts of each format, with and without sharing, on this machine.

    python benchmarks/prefill_work.py --out benchmarks/results/prefill_work_counts.json
    python benchmarks/prefill_work.py --time 16 --formats few-shot/seed --out /tmp/prefill_time.json

``--model DIR`` times another model than the tokenizer's (e.g. the 7B-shaped one of ``zephyr_shaped.py``, random
weights: each prompt's token ids are taken modulo its vocabulary, which keeps which tokens the prompts share).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

from qlora_kit import generation
from qlora_kit.data import canonical_labels
from qlora_kit.errors import run_main
from qlora_kit.evaluation import BASELINE_CONTEXT, baseline_format
from qlora_kit.formatting import PromptFormat
from qlora_kit.metrics import spread
from qlora_kit.tasks import TASKS

HERE = Path(__file__).resolve().parent

FORMATS = ("finetune/seed", "finetune/chat", "zero-shot/seed", "zero-shot/chat", "few-shot/seed", "few-shot/chat")
DATA = {"classification": "newsgroups", "summarization": "samsum"}


@functools.cache
def load_task_rows(task_name: str, data_dir: str):
    """A task's training rows (for few-shot examples and the label names), its test rows and label names."""
    task, folder = TASKS[task_name], Path(data_dir) / DATA[task_name]
    train_rows, source = task.load_rows(
        file=str(folder / "train.jsonl.gz"), dataset=task.default_dataset, split="train"
    )
    test_rows, _ = task.load_rows(file=str(folder / "test.jsonl.gz"), dataset=task.default_dataset, split="test")
    return train_rows, test_rows, canonical_labels(train_rows, source) if task.labelled else []


def build_prompts(task, tokenizer, data_dir: str, purpose: str, style: str, max_seq_length: int):
    """Every test example's prompt ids in one format, as the evaluation scripts build them; and the answer's
    token budget."""
    train_rows, test_rows, label_names = load_task_rows(task.name, data_dir)
    if purpose == "finetune":
        new_tokens, max_prompt_tokens = task.max_new_tokens, max_seq_length
        fmt = PromptFormat(task, purpose, style, tokenizer, label_names=label_names)
    else:  # as zephyr_baseline_inference.py builds them, with its defaults
        new_tokens = task.baseline_max_new_tokens
        max_prompt_tokens = BASELINE_CONTEXT - new_tokens
        fmt = baseline_format(task, tokenizer, purpose, style, label_names, train_rows, task.shots, max_prompt_tokens)
    return fmt.prompts_ids([row["input"] for row in test_rows], max_prompt_tokens), new_tokens


def count(prompts: list[list[int]], new_tokens: int, batch_size: int, max_batch_tokens, prefill_tokens: int) -> dict:
    """Positions prefill computes over the engine's batches: without sharing (each row group cut to its longest
    prompt) and with the batch's shared prefix run once (the groups cut to their longest own part)."""
    lengths = [len(p) for p in prompts]
    plan = generation.plan_batches(
        lengths, max_new_tokens=new_tokens, batch_size=batch_size, max_batch_tokens=max_batch_tokens
    )
    plain = shared = 0
    prefixes = []
    for batch in plan:
        ids = [prompts[i] for i in batch]
        prefix = generation.shared_prefix_length(ids)
        prefixes.append(prefix)
        groups = generation.prefill_row_groups([len(p) for p in ids], prefill_tokens)
        plain += sum((end - start) * longest for start, end, longest in groups)
        own = generation.prefill_row_groups([len(p) - prefix for p in ids], prefill_tokens)
        shared += prefix + sum((end - start) * longest for start, end, longest in own)
    return {
        "batches": len(plan),
        "prompt_tokens": sum(lengths),
        "mean_prompt_tokens": sum(lengths) / len(lengths),
        "shared_prefix_tokens_per_batch": {"min": min(prefixes), "max": max(prefixes)},
        "positions_without_sharing": plain,
        "positions_with_sharing": shared,
        "with_over_without": shared / plain,
    }


def time_generation(model, tokenizer, prompts, new_tokens: int, repeats: int, batch_size: int) -> dict:
    """Seconds of ``generate`` over ``prompts`` with and without a shared prefix, ``repeats`` times each,
    alternating; and whether the answers agree."""
    seconds = {"without": [], "with": []}
    answers = {}
    stop = [tokenizer.eos_token_id]
    for _ in range(repeats):
        for way, least in (("without", 10**9), ("with", generation.MIN_SHARED_PREFIX)):
            saved, generation.MIN_SHARED_PREFIX = generation.MIN_SHARED_PREFIX, least
            try:
                started = time.perf_counter()
                out = generation.generate(
                    model, tokenizer, prompts, max_new_tokens=new_tokens, stop_ids=stop, batch_size=batch_size,
                    progress=False,
                )  # fmt: skip
                seconds[way].append(time.perf_counter() - started)
            finally:
                generation.MIN_SHARED_PREFIX = saved
            answers[way] = out.outputs
    same = sum(a == b for a, b in zip(answers["without"], answers["with"])) / len(prompts)
    result = {way: {**spread(s), "all": s} for way, s in seconds.items()}
    return {**result, "speedup": result["without"]["median"] / result["with"]["median"], "same_answers": same}


def main(args) -> dict:
    import torch

    from qlora_kit import modeling

    # a folder may hold a tokenizer alone (reproduce/stage_tokenizer.sh)
    source = args.tokenizer if Path(args.tokenizer).is_dir() else modeling.resolve_model_source(args.tokenizer)
    tokenizer = modeling.load_tokenizer(source, padding_side="left")
    model = None
    if args.time:
        timed_source = modeling.resolve_model_source(args.model) if args.model else source
        model = modeling.load_model(
            timed_source, load_in_4bit=args.load_in_4bit, use_flash_attention=False, for_training=False
        )
        model.eval()
        vocabulary = model.get_input_embeddings().num_embeddings
    results = {
        "command": " ".join(sys.argv),
        "tokenizer": args.tokenizer,
        "timed_model": (args.model or args.tokenizer) if args.time else None,
        "load_in_4bit": args.load_in_4bit,
        "timed_dtype": str(next(model.parameters()).dtype) if model is not None else None,
        "what": "prompt positions prefill runs through the model over the engine's batches and row groups, "
        "without and with the batch's shared prefix run once; --time: seconds of generate on a subset",
        "prefill_tokens": args.prefill_tokens,
        "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "formats": {},
    }
    for task_name in args.tasks:
        task = TASKS[task_name]
        for name in args.formats:
            purpose, style = name.split("/")
            prompts, new_tokens = build_prompts(
                task, tokenizer, Path(args.data_dir), purpose, style, args.max_seq_length
            )
            key = f"{task_name}: {name}"
            entry = results["formats"][key] = {"examples": len(prompts), "max_new_tokens": new_tokens, "budgets": {}}
            for budget in args.max_batch_tokens:
                budget = budget or None
                counted = count(prompts, new_tokens, args.batch_size, budget, args.prefill_tokens)
                entry["budgets"][str(budget or "rows only")] = counted
                print(
                    f"{key} (batches of at most {budget or args.batch_size} {'tokens' if budget else 'rows'}): "
                    f"{counted['mean_prompt_tokens']:.0f} tokens a prompt, shared prefix "
                    f"{counted['shared_prefix_tokens_per_batch']['min']}-{counted['shared_prefix_tokens_per_batch']['max']}"
                    f" a batch; positions {counted['positions_without_sharing']:,} -> "
                    f"{counted['positions_with_sharing']:,} ({counted['with_over_without']:.2f}x)",
                    flush=True,
                )
            if args.time:
                step = max(1, len(prompts) // args.time)
                subset = [[token % vocabulary for token in ids] for ids in prompts[::step][: args.time]]
                timed = entry["timed"] = time_generation(
                    model, tokenizer, subset, new_tokens, args.repeats, args.batch_size
                )
                timed["examples"] = len(subset)
                print(
                    f"{key}: generate on {len(subset)} prompts, {args.repeats} repeats: "
                    f"{timed['without']['median']:.1f} s without sharing, {timed['with']['median']:.1f} s with "
                    f"({timed['speedup']:.2f}x); same answers {timed['same_answers']:.0%}",
                    flush=True,
                )
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if args.out:
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default="embedded:smollm2-135m-instruct", help="builds the prompts")
    parser.add_argument("--model", default=None, help="the model --time runs (default: the tokenizer's)")
    parser.add_argument("--load_in_4bit", action="store_true", help="the timed model in 4-bit (a GPU)")
    parser.add_argument("--data_dir", default=str(HERE.parent.parent / "shared" / "data"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--max_seq_length", type=int, default=1024, help="fine-tuned prompts' token budget")
    parser.add_argument("--batch_size", type=int, default=1024, help="prompts a batch (the engine's GPU default)")
    parser.add_argument(
        "--max_batch_tokens",
        type=int,
        nargs="+",
        default=[0, 110_000],
        help="padded tokens a batch (0: rows only); 110,000 is what a 7B model's cache takes in 14 GB",
    )
    parser.add_argument("--prefill_tokens", type=int, default=generation.PREFILL_TOKENS)
    parser.add_argument("--time", type=int, default=0, help="also time generate on this many prompts a format")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    arguments = parser.parse_args()
    run_main(lambda: main(arguments))
