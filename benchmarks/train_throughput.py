"""Training speed and memory: the original recipe against candidate recipes, side by side in one run.

Model: Zephyr-7B-beta's exact config with random weights, 4-bit NF4 (built once, saved locally).
Data: batches drawn from the real 20 Newsgroups and SAMSum training sets in the fine-tuning
format, token lengths as they really are (counted once by the embedded model's tokenizer and
committed in benchmarks/), ids random. Each recipe trains through the project's own trainer
(qlora_kit.training.make_trainer) for --warmup_steps + --steps optimizer steps; only the last
--steps are timed.

Usage:
    python benchmarks/train_throughput.py --write_lengths --data_dir ../shared/data     # once, any machine
    python benchmarks/train_throughput.py --model_dir /tmp/zephyr-shaped --out benchmarks/results/train.json
    python benchmarks/train_throughput.py --tiny --model_dir /tmp/tiny --steps 2 --out /tmp/t.json   # CPU check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LENGTHS = HERE / "train_lengths.json"

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
)


# name -> LoRA targets ("qv": q_proj,v_proj; "all": every linear layer and lm_head; "linear": every linear layer)
# and the speed settings.
def _recipe(targets, base, **changes):
    from qlora_kit import settings

    resolved = settings.resolve("classification", {"recipe": base})[0]
    return {"targets": targets, **{key: getattr(resolved, key) for key in SPEED_SETTINGS}, **changes}


RECIPES = {
    "original, q,v": _recipe("qv", "original"),
    "original, all modules": _recipe("all", "original"),
    "fast, q,v": _recipe("qv", "fast"),
    "fast, all modules": _recipe("all", "fast"),
    "fast without Liger, all modules": _recipe("all", "fast", use_liger_kernel=False),
    # the same 32 examples a step in two micro-batches of 16: less activation memory for a larger model
    "fast at batch 16 x 2, all modules": _recipe("all", "fast", batch_size=16, grad_accum=2),
    "fast at batch 8 x 4, all modules": _recipe("all", "fast", batch_size=8, grad_accum=4),
    # --logits_where_scored: vocabulary logits only where the answer is scored (qlora_kit.training.logits_where_scored)
    "fast, all modules, logits where scored": _recipe("all", "fast", scored_positions_only=True),
    # the default before batch 32: the original's 8 examples a step in one micro-batch
    "batch 8 (previous default), all modules": _recipe("all", "fast", batch_size=8, learning_rate=2e-4),
    # more examples a step than the default: faster, but learned less per example (results/README.md)
    "packed rows x 16, fused AdamW, Liger, all modules": _recipe(
        "all", "fast", batch_size=16, packing=True, group_by_length=False
    ),
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


def stratified(lengths: list, count: int) -> list:
    """``count`` items at evenly spaced quantiles of ``lengths``: the real length mix, without sampling noise."""
    ordered = sorted(lengths)
    return [ordered[int((i + 0.5) * len(ordered) / count)] for i in range(count)]


def _example(total: int, answer: int, vocab: int, rng: random.Random) -> dict:
    ids = [rng.randrange(3, vocab) for _ in range(total)]
    return {"input_ids": ids, "labels": [-100] * (total - answer) + ids[total - answer :]}


def task_lengths(task: str) -> list[tuple[int, int]]:
    """(prompt + answer, answer) token counts of every training example of the task."""
    return [tuple(pair) for pair in json.loads(LENGTHS.read_text())[task]]


def synthetic_rows(
    lengths: list,
    vocab: int,
    rows_per_step: int,
    warmup_steps: int,
    steps: int,
    grouped: bool,
    packing: bool,
    max_seq_length: int,
    seed: int,
):
    """Training rows with the real lengths ``lengths`` (``task_lengths``), random ids, loss on the answer, in
    the order they are trained (the benchmark feeds them sequentially): (warm-up rows, timed rows).

    The first step takes the task's longest examples, so the peak memory covers the worst batch a real epoch
    meets. The timed steps take examples at evenly spaced quantiles of the real lengths: shuffled for a recipe
    with random batches; sorted, so that each batch holds similar lengths, for a length-grouped one (as its
    sampler does within each mega-batch); for packing, as many as fill the rows, packed, rows shuffled.
    """
    from qlora_kit.packing import packed_rows

    rng = random.Random(seed)
    warm = sorted(lengths)[-rows_per_step:] + [
        lengths[rng.randrange(len(lengths))] for _ in range(rows_per_step * (warmup_steps - 1))
    ]
    warm = [_example(total, answer, vocab, rng) for total, answer in warm]
    needed = rows_per_step * steps
    if not packing:
        timed = stratified(lengths, needed)
        if grouped:
            timed.sort(reverse=True)
        else:
            rng.shuffle(timed)
        return warm, [_example(total, answer, vocab, rng) for total, answer in timed]
    mean = sum(total for total, _ in lengths) / len(lengths)
    count = int(needed * max_seq_length / mean)
    while True:  # examples enough to fill `needed` rows
        timed = packed_rows([_example(t, a, vocab, rng) for t, a in stratified(lengths, count)], max_seq_length)
        if len(timed) >= needed:
            break
        count = int(count * 1.1) + 1
    rng.shuffle(timed)
    warm_rows = packed_rows(warm, max_seq_length)
    return (warm_rows * warmup_steps)[: rows_per_step * warmup_steps], timed[:needed]


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


def measure(model_dir: Path, recipe: dict, task: str, args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback

    from qlora_kit import modeling, training
    from qlora_kit import settings as settings_lib
    from qlora_kit.packing import PackedCollator

    targets, batch, accumulation, packing = (
        recipe["targets"],
        recipe["batch_size"],
        recipe["grad_accum"],
        recipe["packing"],
    )
    model = modeling.load_model(str(model_dir), load_in_4bit=True)
    tokenizer = modeling.load_tokenizer(str(model_dir))
    lengths = task_lengths(task)
    warm, timed = synthetic_rows(
        lengths,
        model.config.vocab_size,
        batch * accumulation,
        args.warmup_steps,
        args.steps,
        recipe["group_by_length"],
        packing,
        args.max_seq_length,
        args.seed,
    )
    timed_tokens = sum(len(row["input_ids"]) for row in timed)  # no padding: rows are unpadded until collated
    timed_examples = sum(len(row["seq_lengths"]) for row in timed) if packing else len(timed)
    epoch_tokens, epoch_examples = sum(total for total, _ in lengths), len(lengths)

    speed = {key: recipe[key] for key in SPEED_SETTINGS}
    # every training setting at its default (so new settings need no change here), then the benchmark's own
    settings = dataclasses.replace(
        settings_lib.resolve("classification")[0],
        epochs=1,
        logging_steps=1000,
        max_steps=args.warmup_steps + args.steps,
        save_steps=10**6,
        seed=args.seed,
        max_seq_length=args.max_seq_length,
        **speed,
    )
    sft_args = training.sft_config(settings, Path(args.scratch))
    sft_args.save_strategy = "no"
    peft_config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.1,
        task_type="CAUSAL_LM",
        target_modules=lora_target_names(model_dir, targets),
    )
    collator = PackedCollator(tokenizer.pad_token_id) if packing else None
    trainer = training.make_trainer(
        model,
        sft_args,
        peft_config,
        tokenizer,
        Dataset.from_list(warm + timed),
        None,
        data_collator=collator,
        scored_positions_only=recipe.get("scored_positions_only", False),
    )
    # the rows' own order (see synthetic_rows): the worst batch first, then the timed steps
    trainer._get_train_sampler = lambda *unused, **kwargs: SequentialSampler(trainer.train_dataset)  # noqa: F821
    trainer.data_collator = largest = LargestBatch(trainer.data_collator)

    class Clock(TrainerCallback):
        start_time = None

        def on_step_end(self, args_, state, control, **kwargs):
            if state.global_step == args.warmup_steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.start_time = time.perf_counter()

    clock = Clock()
    trainer.add_callback(clock)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - clock.start_time
    on_gpu = torch.cuda.is_available()
    result = {
        **recipe,
        "optim": sft_args.optim,
        "use_liger_kernel": sft_args.use_liger_kernel,
        "timed_steps": args.steps,
        "seconds": seconds,
        "timed_tokens": timed_tokens,
        "timed_examples": timed_examples,
        "tokens_per_second": timed_tokens / seconds,
        "examples_per_second": timed_examples / seconds,
        "seconds_per_epoch": epoch_tokens / (timed_tokens / seconds),
        "epoch_examples": epoch_examples,
        # over every step, warm-up included, whose first batch holds the task's longest examples
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if on_gpu else None,
        "peak_gpu_memory_reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if on_gpu else None,
        "largest_batch_rows_x_width": list(largest.shape),
    }
    del trainer, model
    if on_gpu:
        torch.cuda.empty_cache()
    return result


def main(args):
    import zephyr_shaped

    if args.write_lengths:
        write_lengths(Path(args.data_dir), args.tokenizer, args.max_seq_length)
        return
    folder = zephyr_shaped.build(Path(args.model_dir), tiny=args.tiny, shape=args.shape)
    results = {
        "command": " ".join(sys.argv),
        "settings": vars(args),
        "model_shape": args.shape,
        **zephyr_shaped.environment(),
        "runs": {},
    }
    for task in args.tasks:
        for name in args.recipes:
            key = f"{task}: {name}"
            results["runs"][key] = measure(folder, RECIPES[name], task, args)
            run = results["runs"][key]
            original = "original, all modules" if run["targets"] == "all" else "original, q,v"
            base = results["runs"].get(f"{task}: {original}")
            if base:
                run["speedup_vs_original"] = run["tokens_per_second"] / base["tokens_per_second"]
            print(
                f"{key}: {run['tokens_per_second']:.0f} tokens/s, {run['examples_per_second']:.2f} examples/s, "
                f"peak {run['peak_gpu_memory_gb']} GB (largest batch {run['largest_batch_rows_x_width']}), "
                f"{run['seconds_per_epoch']:.0f} s/epoch",
                flush=True,
            )
            zephyr_shaped.write_result(Path(args.out), results)


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
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES), help="default: all")
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", default="/tmp/train_throughput")
    parser.add_argument("--out", default="benchmarks/results/train_throughput.json")
    main(parser.parse_args())
