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
import json
import random
import sys
import time
from argparse import Namespace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

LENGTHS = HERE / "train_lengths.json"

# name -> LoRA targets ("qv": q_proj,v_proj; "all": every linear layer and lm_head) and the speed settings
# (the same names as the training scripts' flags; qlora_kit.cli.TRAINING_RECIPES holds the named recipes).
def _recipe(targets, base, **changes):
    from qlora_kit.cli import TRAINING_RECIPES

    return {"targets": targets, **TRAINING_RECIPES[base], **changes}


RECIPES = {
    "original, q,v": _recipe("qv", "original"),
    "original, all modules": _recipe("all", "original"),
    "fast, q,v": _recipe("qv", "fast"),
    "fast, all modules": _recipe("all", "fast"),
    "fast without Liger, all modules": _recipe("all", "fast", use_liger_kernel=False),
    "fast, batch 16, all modules": _recipe("all", "fast", batch_size=16),
    "packed rows x 4, fused AdamW, Liger, all modules": _recipe("all", "fast", batch_size=4, packing=True,
                                                                group_by_length=False),
    # candidates for a faster default (more examples per optimizer step: need a learning check first)
    "fast, batch 32, all modules": _recipe("all", "fast", batch_size=32),
    "packed rows x 8, fused AdamW, Liger, all modules": _recipe("all", "fast", batch_size=8, packing=True,
                                                                group_by_length=False),
}


def write_lengths(data_dir: Path, tokenizer_name: str, max_seq_length: int) -> None:
    from qlora_kit import data as data_lib
    from qlora_kit import modeling
    from qlora_kit.formatting import PromptFormat, build_training_examples, end_of_turn_token

    tokenizer = modeling.load_tokenizer(modeling.resolve_model_source(tokenizer_name))
    result = {"tokenizer": tokenizer_name, "max_seq_length": max_seq_length}
    for task, file in (("classification", data_dir / "newsgroups" / "train.jsonl.gz"),
                       ("summarization", data_dir / "samsum" / "train.jsonl.gz")):
        rows, source = data_lib.load_clean_rows(task, file=str(file), dataset="", split="train")
        labels = data_lib.canonical_labels(rows, source) if task == "classification" else []
        fmt = PromptFormat(task, "finetune", "seed", tokenizer, label_names=labels)
        examples = build_training_examples(rows, fmt, max_seq_length, end_of_turn_token(tokenizer), True)
        result[task] = [[len(e["input_ids"]), sum(label != -100 for label in e["labels"])] for e in examples]
    LENGTHS.write_text(json.dumps(result) + "\n")
    print(f"wrote {LENGTHS}")


def synthetic_dataset(task: str, vocab: int, count: int, seed: int):
    """Examples with the real (prompt + answer) lengths of the task, random ids, loss on the answer."""
    from datasets import Dataset

    lengths = json.loads(LENGTHS.read_text())[task]
    rng = random.Random(seed)
    chosen = [lengths[rng.randrange(len(lengths))] for _ in range(count)]
    rows = []
    for total, answer in chosen:
        ids = [rng.randrange(3, vocab) for _ in range(total)]
        rows.append({"input_ids": ids, "labels": [-100] * (total - answer) + ids[total - answer:]})
    return Dataset.from_list(rows), sum(total for total, _ in lengths), len(lengths)


def measure(model_dir: Path, recipe: tuple, task: str, args) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback

    from qlora_kit import modeling, training

    from qlora_kit.packing import PackedCollator, packed_rows

    targets, batch, accumulation, packing = recipe["targets"], recipe["batch_size"], recipe["grad_accum"], recipe["packing"]
    steps = args.warmup_steps + args.steps
    model = modeling.load_model(str(model_dir), load_in_4bit=True)
    tokenizer = modeling.load_tokenizer(str(model_dir))
    # packed rows hold several examples: draw enough of them to fill every row; length grouping sorts within
    # mega-batches of 50 batches (transformers' LengthGroupedSampler), so draw at least one of those
    draw = steps * batch * accumulation * (args.max_seq_length // 64 if packing else 1)
    if recipe["group_by_length"]:
        draw = max(draw, 50 * batch * accumulation)
    dataset, epoch_tokens, epoch_examples = synthetic_dataset(task, model.config.vocab_size, draw, args.seed)
    collator = None
    if packing:
        rows = packed_rows(list(dataset), args.max_seq_length)
        examples_per_row = len(dataset) / len(rows)
        from datasets import Dataset

        dataset, collator = Dataset.from_list(rows), PackedCollator(tokenizer.pad_token_id)
    from qlora_kit.cli import TRAINING_RECIPES

    speed = {key: recipe[key] for key in TRAINING_RECIPES["original"]}  # the speed settings every recipe has
    settings = Namespace(epochs=1, max_steps=steps, learning_rate=2e-4, logging_steps=1000,
                         save_steps=10**6, report_to="none", seed=args.seed, neftune=None,
                         max_seq_length=args.max_seq_length, completion_only_loss=True, **speed)
    sft_args = training.sft_config(settings, Path(args.scratch))
    sft_args.save_strategy = "no"
    if packing:
        sft_args.include_num_input_tokens_seen = "all"
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, task_type="CAUSAL_LM",
                             target_modules=modeling.lora_target_modules(targets == "all"))
    trainer = training.make_trainer(model, sft_args, peft_config, tokenizer, dataset, None, data_collator=collator)

    class Clock(TrainerCallback):
        start_time = start_tokens = None

        def on_step_end(self, args_, state, control, **kwargs):
            if state.global_step == settings_warmup:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                self.start_time, self.start_tokens = time.perf_counter(), state.num_input_tokens_seen

    settings_warmup = args.warmup_steps
    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - clock.start_time
    tokens = trainer.state.num_input_tokens_seen - clock.start_tokens
    examples = args.steps * batch * accumulation * (examples_per_row if packing else 1)
    result = {**recipe, "optim": sft_args.optim, "use_liger_kernel": sft_args.use_liger_kernel,
              "timed_steps": args.steps, "seconds": seconds,
              "tokens_per_second": tokens / seconds, "examples_per_second": examples / seconds,
              "seconds_per_epoch": epoch_tokens / (tokens / seconds), "epoch_examples": epoch_examples,
              "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None}
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main(args):
    import zephyr_shaped

    if args.write_lengths:
        write_lengths(Path(args.data_dir), args.tokenizer, args.max_seq_length)
        return
    folder = zephyr_shaped.build(Path(args.model_dir), tiny=args.tiny)
    results = {"command": " ".join(sys.argv), "settings": vars(args), **zephyr_shaped.environment(), "runs": {}}
    for task in args.tasks:
        for name in args.recipes:
            key = f"{task}: {name}"
            results["runs"][key] = measure(folder, RECIPES[name], task, args)
            run = results["runs"][key]
            original = "original, all modules" if run["targets"] == "all" else "original, q,v"
            base = results["runs"].get(f"{task}: {original}")
            if base:
                run["speedup_vs_original"] = run["tokens_per_second"] / base["tokens_per_second"]
            print(f"{key}: {run['tokens_per_second']:.0f} tokens/s, {run['examples_per_second']:.2f} examples/s, "
                  f"peak {run['peak_gpu_memory_gb']} GB, {run['seconds_per_epoch']:.0f} s/epoch", flush=True)
            zephyr_shaped.write_result(Path(args.out), results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write_lengths", action="store_true")
    parser.add_argument("--data_dir", default="../shared/data")
    parser.add_argument("--tokenizer", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--model_dir", default="/tmp/zephyr-7b-shaped")
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same architecture (CPU check)")
    parser.add_argument("--tasks", nargs="+", default=["classification", "summarization"])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES)[:7], choices=list(RECIPES),
                        help="default: the seven measured on 2026-11-29 (benchmarks/README.md)")
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", default="/tmp/train_throughput")
    parser.add_argument("--out", default="benchmarks/results/train_throughput.json")
    main(parser.parse_args())
