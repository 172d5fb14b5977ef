"""Evaluate a trained run or a zero/few-shot baseline: data, prompts, generation, metrics, result files."""

from __future__ import annotations

import json
import logging
import time
from argparse import Namespace
from pathlib import Path

from . import data as data_lib
from . import distributed, modeling, results
from .errors import UsageError
from .formatting import PromptFormat, answer_ids, end_of_turn_token
from .generation import default_max_batch_tokens, generate
from .metrics import classification_metrics, parse_label, rouge_scores

log = logging.getLogger(__name__)

BASELINE_CONTEXT = 2048


def load_eval_rows(task: str, args: Namespace, label_names: list[str]) -> list[dict]:
    file = args.test_file if args.split == "test" else args.validation_file
    rows, source = data_lib.load_clean_rows(task, file=file, dataset=args.dataset, split=args.split)
    if task == "classification":
        data_lib.map_to_known_labels(rows, label_names, source)
    if args.limit:
        rows = rows[:args.limit]
    log.info("%s: %d evaluation rows", source, len(rows))
    return rows


def held_out_rows(task: str, config: dict, limit: int | None) -> list[dict]:
    """The validation rows a run held out of its training data (--validation_fraction), rebuilt the same way."""
    data = config["data"]
    rows, source = data_lib.load_clean_rows(task, file=data.get("train_file"), dataset=data.get("dataset") or "",
                                            split="train")
    if task == "classification":
        data_lib.canonical_labels(rows, source)
    _, held_out = data_lib.split_off_validation(rows, data["validation_fraction"], config["settings"]["seed"], task)
    log.info("%s: %d validation rows held out of the training data", source, len(held_out))
    return held_out[:limit] if limit else held_out


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace a finished evaluation unless --overwrite; an interrupted one is continued."""
    if (out_dir / results.METRICS).exists() and not overwrite:
        raise UsageError(f"{out_dir / results.METRICS} exists; pass --overwrite to replace it")
    results.check_writable_dir(out_dir, "--output_dir")
    if overwrite and distributed.is_main():
        results.remove_partial_predictions(out_dir)
    distributed.barrier()


def _load_finetuned(config: dict, adapter: Path, merge_adapter: bool, use_flash_attention: bool):
    from peft import PeftModel

    source = config["model_source"]
    if not Path(source).exists():  # a Hub id, or a run folder copied from another machine: resolve again
        source = modeling.resolve_model_source(config["pretrained_ckpt"])
    load_in_4bit = config["load_in_4bit"] and not merge_adapter
    model = modeling.load_model(source, load_in_4bit=load_in_4bit, use_flash_attention=use_flash_attention,
                                for_training=False)
    model = PeftModel.from_pretrained(model, adapter)
    if merge_adapter:
        model = modeling.merge_adapter(model)  # plain bf16 weights: no 4-bit dequantization per step
    model.eval()
    return model


def _record(index: int, row: dict, prompt: str, text: str | None, task: str, label_names: list[str],
            error: str | None = None) -> dict:
    record = {"id": index, "prompt": prompt, "output": text, "reference": row["target"]}
    if error is not None:
        record["error"] = error
    elif task == "classification":
        record["parsed"] = parse_label(text, label_names)
    else:
        record["parsed"] = text.strip()
    return record


def _resume_partial(path: Path, prompts: list[str]) -> dict[int, dict]:
    """Predictions an interrupted evaluation already made, kept only where the prompt is still the same."""
    if not path.is_file():
        return {}
    done = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut off by the crash: everything after it is redone
            index = record.get("id")
            if isinstance(index, int) and index < len(prompts) and record.get("prompt") == prompts[index] \
                    and "error" not in record:
                done[index] = record
    if done:
        log.info("continuing an interrupted evaluation: %d of %d examples already done", len(done), len(prompts))
    return done


def run_generation(task: str, model, tokenizer, fmt: PromptFormat, rows: list[dict], args: Namespace,
                   max_prompt_tokens: int, end_token: str, label_names: list[str],
                   partial_path: Path | None = None) -> tuple[dict, list[dict]]:
    """Generate for every row, score, and return (metrics, prediction records in row order).

    With several processes every process plans the same batches (same prompts, same token budget) and
    runs its share of them, so each prediction comes from exactly the batch one process would have run;
    the records are gathered in order. Each finished batch is appended to ``partial_path`` (one file
    per process); a re-run after a crash, with any number of processes, generates only what is missing.
    """
    rank, world = distributed.rank(), distributed.world_size()
    all_partials = sorted(partial_path.parent.glob(f"{partial_path.stem}*{partial_path.suffix}")) \
        if partial_path is not None else []
    if partial_path is not None and world > 1:
        partial_path = partial_path.with_name(f"{partial_path.stem}.rank{rank}{partial_path.suffix}")
    prompt_ids = [fmt.prompt_ids(row["input"], max_prompt_tokens) for row in rows]
    prompt_texts = [tokenizer.decode(ids) for ids in prompt_ids]
    done = {}
    for path in all_partials:  # every process reads every process's file: all agree on what is left
        done.update(_resume_partial(path, prompt_texts))
    distributed.barrier()  # nobody appends before everybody has read
    todo = [i for i in range(len(rows)) if i not in done]
    max_batch_tokens = getattr(args, "max_batch_tokens", None)
    if max_batch_tokens is None and world > 1:  # one budget for all, or the plans would differ
        budgets = [b for b in distributed.gather(default_max_batch_tokens(model)) if b is not None]
        max_batch_tokens = min(budgets) if budgets else None
    stop_ids = sorted({tokenizer.convert_tokens_to_ids(end_token), tokenizer.eos_token_id})
    constrained = task == "classification" and getattr(args, "decoding", "greedy") == "constrained"
    label_sequences = [answer_ids(tokenizer, name, end_token) for name in label_names] if constrained else None

    if partial_path:
        partial_path.parent.mkdir(parents=True, exist_ok=True)
    partial = open(partial_path, "a", encoding="utf-8") if partial_path else None
    records = dict(done) if rank == 0 else {}  # the resumed records travel once, with the main process

    def record_batch(batch_positions, answers):
        for position, answer in zip(batch_positions, answers):
            index = todo[position]
            records[index] = _record(index, rows[index], prompt_texts[index],
                                     tokenizer.decode(answer, skip_special_tokens=True), task, label_names)
            if partial is not None:
                partial.write(json.dumps(records[index], ensure_ascii=False) + "\n")
        if partial is not None:
            partial.flush()

    started = time.perf_counter()
    try:
        generated = generate(model, tokenizer, [prompt_ids[i] for i in todo], max_new_tokens=args.max_new_tokens,
                             stop_ids=stop_ids, batch_size=args.batch_size, max_batch_tokens=max_batch_tokens,
                             label_sequences=label_sequences, on_batch=record_batch, shard=(rank, world))
    finally:
        if partial is not None:
            partial.close()
    seconds = time.perf_counter() - started
    for position, error in generated.failures.items():  # the rest were recorded batch by batch
        index = todo[position]
        records[index] = _record(index, rows[index], prompt_texts[index], None, task, label_names, error=error)
    ran = sum(output is not None for output in generated.outputs) + len(generated.failures)
    gathered = distributed.gather({"records": list(records.values()), "seconds": seconds, "new": ran,
                                   "resumed": len(done) if rank == 0 else 0, "batch": generated.final_batch_size})
    all_records = sorted((r for part in gathered for r in part["records"]), key=lambda record: record["id"])
    metrics = score(task, all_records, label_names)
    seconds = max(part["seconds"] for part in gathered)
    new = sum(part["new"] for part in gathered)
    metrics.update({
        "failed": sum("error" in record for record in all_records),
        "resumed_examples": sum(part["resumed"] for part in gathered),
        "processes": world,
        "generation_seconds": seconds,
        "examples_per_second": new / seconds if seconds and new else None,
        "final_batch_size": min(part["batch"] for part in gathered),
    })
    return metrics, all_records


def score(task: str, records: list[dict], label_names: list[str]) -> dict:
    """Metrics over the records that ran (a failed example is counted, never scored as empty)."""
    scored = [record for record in records if "error" not in record]
    references = [record["reference"] for record in scored]
    predictions = [record["parsed"] for record in scored]
    if task == "classification":
        return classification_metrics(references, predictions, label_names)
    return rouge_scores(references, predictions)


def evaluate_run(task: str, args: Namespace) -> dict:
    """Evaluate a fine-tuned run folder on its task's test (or validation) split."""
    distributed.init()
    run_dir = Path(args.experiment_dir)
    config = results.load_run_config(run_dir)
    if config.get("task") != task:
        raise UsageError(f"--experiment_dir {run_dir} is a {config.get('task')} run, not a {task} run")
    checkpoint = getattr(args, "checkpoint", None)
    adapter = results.adapter_dir(run_dir, checkpoint)
    default_name = "metrics" if args.split == "test" else f"metrics_{args.split}"
    if checkpoint is not None:
        default_name += f"_step-{checkpoint}"
    out_dir = Path(args.output_dir) if args.output_dir else run_dir / default_name
    label_names = config["label_names"]
    fraction = config.get("data", {}).get("validation_fraction")
    if args.split == "validation" and not args.validation_file and fraction:
        rows = held_out_rows(task, config, args.limit)
    else:
        rows = load_eval_rows(task, args, label_names)
    check_output_dir(out_dir, args.overwrite)

    tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else run_dir / results.ADAPTER_DIR
    tokenizer = modeling.load_tokenizer(str(tokenizer_dir), padding_side="left")
    end_token = config.get("end_token") or end_of_turn_token(tokenizer)
    fmt = PromptFormat(task, "finetune", config["prompt_style"], tokenizer, label_names=label_names)
    max_prompt_tokens = args.max_prompt_tokens or config["settings"]["max_seq_length"]
    model = _load_finetuned(config, adapter, args.merge_adapter, args.use_flash_attention)
    metrics, records = run_generation(task, model, tokenizer, fmt, rows, args, max_prompt_tokens, end_token,
                                      label_names, partial_path=out_dir / results.PARTIAL_PREDICTIONS)
    metrics["config"] = {"experiment_dir": str(run_dir), "checkpoint": checkpoint, "adapter": str(adapter),
                         "split": args.split, "limit": args.limit,
                         "merge_adapter": args.merge_adapter, "max_new_tokens": args.max_new_tokens,
                         "max_prompt_tokens": max_prompt_tokens, "decoding": getattr(args, "decoding", "greedy"),
                         "prompt_style": config["prompt_style"], "versions": modeling.library_versions()}
    _save(out_dir, metrics, records)
    return metrics


def evaluate_baseline(args: Namespace) -> dict:
    """Zero- or few-shot evaluation of the base model, as the original baseline script did."""
    distributed.init()
    task = args.task_type
    style_suffix = "" if args.prompt_style == "seed" else f"-{args.prompt_style}"
    out_dir = Path(args.output_dir) if args.output_dir else (
        Path("baseline_results") / modeling.model_slug(args.pretrained_ckpt) / task / f"{args.prompt_type}{style_suffix}")
    check_output_dir(out_dir, args.overwrite)

    train_rows, label_names = [], []
    if task == "classification" or args.prompt_type == "few-shot":
        train_rows, source = data_lib.load_clean_rows(task, file=args.train_file, dataset=args.dataset, split="train")
        if task == "classification":
            label_names = data_lib.canonical_labels(train_rows, source)
    rows = load_eval_rows(task, args, label_names)

    source_path = modeling.resolve_model_source(args.pretrained_ckpt)
    tokenizer = modeling.load_tokenizer(source_path, padding_side="left")
    end_token = end_of_turn_token(tokenizer)
    fmt = PromptFormat(task, args.prompt_type, args.prompt_style, tokenizer, label_names=label_names)
    max_prompt_tokens = args.max_prompt_tokens or BASELINE_CONTEXT - args.max_new_tokens
    if args.prompt_type == "few-shot":
        fmt.set_few_shot(data_lib.few_shot_examples(train_rows, task, args.shots), max_prompt_tokens)
    model = modeling.load_model(source_path, load_in_4bit=args.load_in_4bit,
                                use_flash_attention=args.use_flash_attention, for_training=False)
    model.eval()
    metrics, records = run_generation(task, model, tokenizer, fmt, rows, args, max_prompt_tokens, end_token,
                                      label_names, partial_path=out_dir / results.PARTIAL_PREDICTIONS)
    metrics["config"] = {"pretrained_ckpt": args.pretrained_ckpt, "task": task, "prompt_type": args.prompt_type,
                         "prompt_style": args.prompt_style, "shots": args.shots, "split": args.split,
                         "limit": args.limit, "max_new_tokens": args.max_new_tokens,
                         "max_prompt_tokens": max_prompt_tokens, "load_in_4bit": args.load_in_4bit,
                         "decoding": getattr(args, "decoding", "greedy"), "versions": modeling.library_versions()}
    _save(out_dir, metrics, records)
    return metrics


def _save(out_dir: Path, metrics: dict, records: list[dict]) -> None:
    metrics["output_dir"] = str(out_dir)
    distributed.barrier()
    if distributed.is_main():  # one process writes the results
        results.write_jsonl_atomic(out_dir / results.PREDICTIONS, records)
        results.write_json_atomic(out_dir / results.METRICS, metrics)  # last: its presence marks a finished evaluation
        results.remove_partial_predictions(out_dir)
    distributed.barrier()


def summary_table(metrics: dict) -> str:
    """A compact table of the headline numbers."""
    if "accuracy" in metrics:
        keys = ["n", "accuracy", "macro_f1", "micro_f1", "invalid_rate", "failed", "examples_per_second"]
    else:
        keys = ["n", "rouge1", "rouge2", "rougeL", "rougeLsum", "failed", "examples_per_second"]
    lines = ["| metric | value |", "|---|---|"]
    for key in keys:
        value = metrics.get(key)
        lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    return "\n".join(lines)
