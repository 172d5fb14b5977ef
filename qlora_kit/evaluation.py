"""Evaluate a trained run or a zero/few-shot baseline: data, prompts, generation, metrics, result files."""

from __future__ import annotations

import json
import logging
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

from . import distributed, inference_kernels, modeling, results
from .data import canonical_labels, map_to_known_labels
from .errors import UsageError
from .formatting import PromptFormat, answer_ids, decode_all, end_of_turn_token
from .generation import (
    default_max_batch_tokens,
    generate,
    loop_setting,
    prefill_attention_choice,
    recheck_margin_setting,
)
from .run_folder import (
    METRICS,
    PREDICTIONS,
    RunFolder,
    partial_predictions_file,
    partial_predictions_glob,
    remove_partial_predictions,
)
from .tasks import Task, get_task

log = logging.getLogger(__name__)

BASELINE_CONTEXT = 2048


def load_eval_rows(task: Task, args: Namespace, label_names: list[str], recorded: dict | None = None) -> list[dict]:
    """The rows to evaluate; the data's column names and integer-label names come from the flags, else from
    ``recorded`` (the training run's settings)."""
    recorded = recorded or {}
    file = args.test_file if args.split == "test" else args.validation_file
    rows, source = task.load_rows(
        file=file,
        dataset=args.dataset,
        split=args.split,
        columns=getattr(args, "columns", None) or recorded.get("columns"),
        label_names=getattr(args, "label_names", None) or recorded.get("label_names"),
    )
    if task.labelled:
        map_to_known_labels(rows, label_names, source)
    if args.limit:
        rows = rows[: args.limit]
    log.info("%s: %d evaluation rows", source, len(rows))
    return rows


def held_out_rows(task: Task, config: dict, limit: int | None) -> list[dict]:
    """The validation rows a run held out of its training data (--validation_fraction), rebuilt the same way."""
    data = config["data"]
    settings = config["settings"]
    rows, source = task.load_rows(
        file=data.get("train_file"),
        dataset=data.get("dataset") or "",
        split="train",
        columns=settings.get("columns"),
        label_names=settings.get("label_names"),
    )
    if task.labelled:
        canonical_labels(rows, source)
    _, held_out = task.split_off_validation(rows, data["validation_fraction"], config["settings"]["seed"])
    log.info("%s: %d validation rows held out of the training data", source, len(held_out))
    return held_out[:limit] if limit else held_out


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace a finished evaluation unless --overwrite; an interrupted one is continued."""
    if (out_dir / METRICS).exists() and not overwrite:
        raise UsageError(f"{out_dir / METRICS} exists; pass --overwrite to replace it")
    results.check_writable_dir(out_dir, "--output_dir")
    if overwrite and distributed.is_main():
        remove_partial_predictions(out_dir)
    distributed.barrier()


def _load_finetuned(config: dict, adapter: Path, use_flash_attention: bool, adapter_product: str = "peft"):
    """The run's base model with its adapter, for evaluation (``fused_lora.inference_product``): merged into the
    weights (``adapter_product="merged"``; a 4-bit base is loaded in bf16 for it), or added to each adapted layer's
    output by peft's own layers (``"peft"``) or in place (``"in_place"``)."""
    from peft import PeftModel

    source = config["model_source"]
    if not Path(source).exists():  # a Hub id, or a run folder copied from another machine: resolve again
        source = modeling.resolve_model_source(config["pretrained_ckpt"])
    merge_adapter = adapter_product == "merged"
    load_in_4bit = config["load_in_4bit"] and not merge_adapter
    model = modeling.load_model(
        source, load_in_4bit=load_in_4bit, use_flash_attention=use_flash_attention, for_training=False
    )
    model = PeftModel.from_pretrained(model, adapter)
    if merge_adapter:
        model = modeling.merge_adapter(model)  # plain bf16 weights: no 4-bit dequantization per step
    elif adapter_product == "in_place":
        from . import fused_lora

        fused_lora.fuse_lora(model, for_inference=True)
    model.eval()
    return model


def _record(
    index: int, row: dict, prompt: str, text: str | None, task: Task, label_names: list[str], error: str | None = None
) -> dict:
    record = {"id": index, "prompt": prompt, "output": text, "reference": row["target"]}
    if error is not None:
        record["error"] = error
    else:
        record["parsed"] = task.parse_answer(text, label_names)
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
            if (
                isinstance(index, int)
                and index < len(prompts)
                and record.get("prompt") == prompts[index]
                and "error" not in record
            ):
                done[index] = record
    if done:
        log.info("continuing an interrupted evaluation: %d of %d examples already done", len(done), len(prompts))
    return done


@dataclass
class GenerationJob:
    """What one evaluation generates: the task, its prompts (ids and text), and how to decode and record."""

    task: Task
    rows: list[dict]
    prompt_ids: list[list[int]]
    prompt_texts: list[str]
    label_names: list[str]
    stop_ids: list[int]
    label_sequences: list[list[int]] | None  # constrained or likelihood decoding: the token ids of every label


def plan_job(
    task: Task,
    tokenizer,
    fmt: PromptFormat,
    rows: list[dict],
    args: Namespace,
    max_prompt_tokens: int,
    end_token: str,
    label_names: list[str],
) -> GenerationJob:
    """Stage 1: every prompt's token ids, the stop tokens and, for constrained or likelihood decoding, the label
    sequences."""
    prompt_ids = fmt.prompts_ids([row["input"] for row in rows], max_prompt_tokens)
    constrained = task.labelled and getattr(args, "decoding", "greedy") in ("constrained", "likelihood")
    return GenerationJob(
        task=task,
        rows=rows,
        prompt_ids=prompt_ids,
        prompt_texts=decode_all(tokenizer, prompt_ids),
        label_names=label_names,
        stop_ids=sorted({tokenizer.convert_tokens_to_ids(end_token), tokenizer.eos_token_id}),
        label_sequences=[answer_ids(tokenizer, name, end_token) for name in label_names] if constrained else None,
    )


def resume_job(job: GenerationJob, partial_dir: Path | None) -> dict[int, dict]:
    """Stage 2: the predictions an interrupted evaluation saved; every process reads every process's file, so
    all agree on what is left."""
    done = {}
    for path in sorted(Path(partial_dir).glob(partial_predictions_glob())) if partial_dir is not None else []:
        done.update(_resume_partial(path, job.prompt_texts))
    distributed.barrier()  # nobody appends before everybody has read
    return done


def shared_batch_budget(model, max_batch_tokens: int | None) -> int | None:
    """Stage 3: the padded-token budget of a batch (the flag's, else what the GPU holds), one for every process
    (the smallest one's), or the processes' plans would differ."""
    if max_batch_tokens is None:
        max_batch_tokens = default_max_batch_tokens(model)
        if distributed.world_size() > 1:
            budgets = [b for b in distributed.gather(max_batch_tokens) if b is not None]
            max_batch_tokens = min(budgets) if budgets else None
    return max_batch_tokens


def generate_missing(
    model,
    tokenizer,
    job: GenerationJob,
    todo: list[int],
    args: Namespace,
    max_batch_tokens: int | None,
    partial_path: Path | None,
) -> tuple[dict, dict]:
    """Stage 4: generate the prompts in ``todo`` (this process's share of the batches), appending each finished
    batch to ``partial_path``; returns this process's records (failures included) and its timing."""
    rank, world = distributed.rank(), distributed.world_size()
    records = {}
    if partial_path:
        partial_path.parent.mkdir(parents=True, exist_ok=True)
    partial = open(partial_path, "a", encoding="utf-8") if partial_path else None

    def record_batch(batch_positions, answers):
        for position, answer in zip(batch_positions, answers):
            index = todo[position]
            records[index] = _record(
                index,
                job.rows[index],
                job.prompt_texts[index],
                tokenizer.decode(answer, skip_special_tokens=True),
                job.task,
                job.label_names,
            )
            if partial is not None:
                partial.write(json.dumps(records[index], ensure_ascii=False) + "\n")
        if partial is not None:
            partial.flush()

    started = time.perf_counter()
    try:
        generated = generate(
            model,
            tokenizer,
            [job.prompt_ids[i] for i in todo],
            max_new_tokens=args.max_new_tokens,
            stop_ids=job.stop_ids,
            batch_size=args.batch_size,
            max_batch_tokens=max_batch_tokens,
            label_sequences=job.label_sequences,
            on_batch=record_batch,
            shard=(rank, world),
            num_beams=getattr(args, "num_beams", 1),
            likelihood=getattr(args, "decoding", "greedy") == "likelihood",
            compact_below=job.task.compact_below,
        )
    finally:
        if partial is not None:
            partial.close()
    seconds = time.perf_counter() - started
    for position, error in generated.failures.items():  # the rest were recorded batch by batch
        index = todo[position]
        records[index] = _record(
            index, job.rows[index], job.prompt_texts[index], None, job.task, job.label_names, error=error
        )
    ran = sum(output is not None for output in generated.outputs) + len(generated.failures)
    return records, {
        "seconds": seconds,
        "new": ran,
        "batch": generated.final_batch_size,
        "rechecked": len(generated.rechecked),
    }


def run_generation(
    task,
    model,
    tokenizer,
    fmt: PromptFormat,
    rows: list[dict],
    args: Namespace,
    max_prompt_tokens: int,
    end_token: str,
    label_names: list[str],
    out_dir: Path | None = None,
) -> tuple[dict, list[dict]]:
    """Generate for every row, score, and return (metrics, prediction records in row order).

    With several processes every process plans the same batches (same prompts, same token budget) and
    runs its share of them, so each prediction comes from exactly the batch one process would have run;
    the records are gathered in order. Each finished batch is appended to a partial predictions file in
    ``out_dir`` (one per process); a re-run after a crash, with any number of processes, generates only
    what is missing.
    """
    task = get_task(task)
    rank, world = distributed.rank(), distributed.world_size()
    job = plan_job(task, tokenizer, fmt, rows, args, max_prompt_tokens, end_token, label_names)
    done = resume_job(job, out_dir)
    todo = [i for i in range(len(rows)) if i not in done]
    max_batch_tokens = shared_batch_budget(model, getattr(args, "max_batch_tokens", None))
    partial_path = partial_predictions_file(out_dir, rank, world) if out_dir is not None else None
    records, timing = generate_missing(model, tokenizer, job, todo, args, max_batch_tokens, partial_path)
    if rank == 0:
        records.update(done)  # the resumed records travel once, with the main process

    # Stage 5: gather every process's records in order, and score them.
    gathered = distributed.gather(
        {"records": list(records.values()), **timing, "resumed": len(done) if rank == 0 else 0}
    )
    all_records = sorted((r for part in gathered for r in part["records"]), key=lambda record: record["id"])
    metrics = score(task, all_records, label_names)
    seconds = max(part["seconds"] for part in gathered)
    new = sum(part["new"] for part in gathered)
    metrics.update(
        {
            "failed": sum("error" in record for record in all_records),
            "resumed_examples": sum(part["resumed"] for part in gathered),
            "processes": world,
            "generation_seconds": seconds,
            "examples_per_second": new / seconds if seconds and new else None,
            "final_batch_size": min(part["batch"] for part in gathered),
            "max_batch_tokens": max_batch_tokens,  # the padded-token budget of a batch (None: the CPU's)
            # answers within the recheck margin of a tie, decoded again alone (generation.RECHECK_MARGIN)
            "recheck_margin": recheck_margin_setting(),
            "rechecked_near_ties": sum(part.get("rechecked", 0) for part in gathered),
        }
    )
    return metrics, all_records


def score(task, records: list[dict], label_names: list[str]) -> dict:
    """Metrics over the records that ran (a failed example is counted, never scored as empty)."""
    scored = [record for record in records if "error" not in record]
    return get_task(task).score(
        [record["reference"] for record in scored], [record["parsed"] for record in scored], label_names
    )


def check_environment() -> None:
    """A bad QLORA_KIT_* setting of evaluation stops here, before anything loads, not after the model has."""
    inference_kernels.choice()
    recheck_margin_setting()
    loop_setting()
    prefill_attention_choice()


def evaluate_run(task, args: Namespace) -> dict:
    """Evaluate a fine-tuned run folder on its task's test (or validation) split."""
    started = time.perf_counter()
    task = get_task(task)
    check_decoding(args)
    from . import fused_lora

    check_environment()
    distributed.init()
    run = RunFolder(args.experiment_dir)
    config = run.config()
    adapter_product = fused_lora.inference_product(
        base_in_4bit=config["load_in_4bit"], merge_adapter=getattr(args, "merge_adapter", None)
    )
    if config.get("task") != task.name:
        raise UsageError(f"--experiment_dir {run.path} is a {config.get('task')} run, not a {task.name} run")
    checkpoint = run.default_checkpoint(getattr(args, "checkpoint", None), getattr(args, "final_adapter", False))
    adapter = run.adapter(checkpoint)
    out_dir = (
        Path(args.output_dir)
        if args.output_dir
        else run.evaluation(args.split, checkpoint, decoding_suffix(args)).folder
    )
    label_names = config["label_names"]
    fraction = config.get("data", {}).get("validation_fraction")
    if args.split == "validation" and not args.validation_file and fraction:
        rows = held_out_rows(task, config, args.limit)
    else:
        rows = load_eval_rows(task, args, label_names, recorded=config["settings"])
    check_output_dir(out_dir, args.overwrite)

    tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else run.adapter_dir
    tokenizer = modeling.load_tokenizer(str(tokenizer_dir), padding_side="left")
    end_token = config.get("end_token") or end_of_turn_token(tokenizer)
    fmt = PromptFormat(task, "finetune", config["prompt_style"], tokenizer, label_names=label_names)
    max_prompt_tokens = args.max_prompt_tokens or config["settings"]["max_seq_length"]
    model = _load_finetuned(config, adapter, args.use_flash_attention, adapter_product)
    kernels = inference_kernels.apply(model)
    metrics, records = run_generation(
        task, model, tokenizer, fmt, rows, args, max_prompt_tokens, end_token, label_names, out_dir=out_dir
    )
    metrics["config"] = {
        "experiment_dir": str(run.path),
        "checkpoint": checkpoint,
        "adapter": str(adapter),
        "split": args.split,
        "limit": args.limit,
        "merge_adapter": adapter_product == "merged",
        "adapter_product": adapter_product,
        "inference_kernels": kernels,
        "max_new_tokens": args.max_new_tokens,
        "max_prompt_tokens": max_prompt_tokens,
        "decoding": getattr(args, "decoding", "greedy"),
        "num_beams": getattr(args, "num_beams", 1),
        "prompt_style": config["prompt_style"],
        "versions": modeling.library_versions(),
    }
    save_evaluation(out_dir, metrics, records, started)
    return metrics


def check_decoding(args: Namespace) -> None:
    """Decoding flags that do not go together, refused before anything loads."""
    if getattr(args, "decoding", "greedy") == "likelihood" and getattr(args, "num_beams", 1) > 1:
        raise UsageError("--num_beams does not apply to --decoding likelihood (it scores every label's whole answer)")


def decoding_suffix(args: Namespace) -> str:
    """The decoding, unless greedy, and ``beams-N`` for beam search (e.g. ``constrained_beams-4``): the results of
    each way of decoding go to a folder of their own, beside the greedy ones, not over them."""
    decoding, beams = getattr(args, "decoding", "greedy"), getattr(args, "num_beams", 1)
    return "_".join(([decoding] if decoding != "greedy" else []) + ([f"beams-{beams}"] if beams > 1 else []))


def baseline_dir(args: Namespace) -> Path:
    """baseline_results/<model>/<task>/<prompt type>[-<style>][_<decoding>][_beams-N]: where a baseline's results
    go by default."""
    style_suffix = "" if args.prompt_style == "seed" else f"-{args.prompt_style}"
    suffix = decoding_suffix(args)
    decoding = f"_{suffix}" if suffix else ""
    return (
        Path("baseline_results")
        / modeling.model_slug(args.pretrained_ckpt)
        / args.task_type
        / f"{args.prompt_type}{style_suffix}{decoding}"
    )


def baseline_format(
    task, tokenizer, prompt_type, prompt_style, label_names, train_rows, shots, max_prompt_tokens
) -> PromptFormat:
    """A zero- or few-shot baseline's prompt format: the few-shot examples, drawn from ``train_rows``, filled in to
    use at most half of ``max_prompt_tokens``."""
    fmt = PromptFormat(task, prompt_type, prompt_style, tokenizer, label_names=label_names)
    if prompt_type == "few-shot":
        fmt.set_few_shot(task.few_shot_examples(train_rows, shots), max_prompt_tokens)
    return fmt


def evaluate_baseline(args: Namespace) -> dict:
    """Zero- or few-shot evaluation of the base model, as the original baseline script did."""
    started = time.perf_counter()
    check_decoding(args)
    check_environment()
    distributed.init()
    task = get_task(args.task_type)
    out_dir = Path(args.output_dir) if args.output_dir else baseline_dir(args)
    check_output_dir(out_dir, args.overwrite)

    train_rows, label_names = [], []
    if task.labelled or args.prompt_type == "few-shot":
        train_rows, source = task.load_rows(
            file=args.train_file,
            dataset=args.dataset,
            split="train",
            columns=args.columns,
            label_names=getattr(args, "label_names", None),
        )
        if task.labelled:
            label_names = canonical_labels(train_rows, source)
    rows = load_eval_rows(task, args, label_names)

    source_path = modeling.resolve_model_source(args.pretrained_ckpt)
    tokenizer = modeling.load_tokenizer(source_path, padding_side="left")
    end_token = end_of_turn_token(tokenizer)
    max_prompt_tokens = args.max_prompt_tokens or BASELINE_CONTEXT - args.max_new_tokens
    fmt = baseline_format(
        task, tokenizer, args.prompt_type, args.prompt_style, label_names, train_rows, args.shots, max_prompt_tokens
    )
    model = modeling.load_model(
        source_path, load_in_4bit=args.load_in_4bit, use_flash_attention=args.use_flash_attention, for_training=False
    )
    model.eval()
    kernels = inference_kernels.apply(model)
    metrics, records = run_generation(
        task, model, tokenizer, fmt, rows, args, max_prompt_tokens, end_token, label_names, out_dir=out_dir
    )
    metrics["config"] = {
        "pretrained_ckpt": args.pretrained_ckpt,
        "task": task.name,
        "prompt_type": args.prompt_type,
        "prompt_style": args.prompt_style,
        "shots": args.shots,
        "split": args.split,
        "limit": args.limit,
        "max_new_tokens": args.max_new_tokens,
        "max_prompt_tokens": max_prompt_tokens,
        "load_in_4bit": args.load_in_4bit,
        "inference_kernels": kernels,
        "decoding": getattr(args, "decoding", "greedy"),
        "num_beams": getattr(args, "num_beams", 1),
        "versions": modeling.library_versions(),
    }
    save_evaluation(out_dir, metrics, records, started)
    return metrics


def save_evaluation(out_dir: Path, metrics: dict, records: list[dict], started: float) -> None:
    """Write the predictions and the metrics; ``started``: when the evaluation began (its wall time, loading,
    tokenising, generating and scoring, goes into the metrics beside the generation time)."""
    metrics["output_dir"] = str(out_dir)
    metrics["wall_seconds"] = time.perf_counter() - started
    distributed.barrier()
    if distributed.is_main():  # one process writes the results
        results.write_jsonl_atomic(out_dir / PREDICTIONS, records)
        results.write_json_atomic(out_dir / METRICS, metrics)  # last: its presence marks a finished evaluation
        remove_partial_predictions(out_dir)
    distributed.barrier()


def summary_table(metrics: dict, task) -> str:
    """A compact table of the task's headline numbers."""
    keys = list(get_task(task).summary_metrics) + [
        "failed",
        "examples_per_second",
        "generation_seconds",
        "wall_seconds",
    ]
    intervals = metrics.get("ci95", {})
    lines = ["| metric | value | 95% interval |", "|---|---|---|"]
    for key in keys:
        value = metrics.get(key)
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        interval = f"{intervals[key][0]:.4f} - {intervals[key][1]:.4f}" if key in intervals else ""
        lines.append(f"| {key} | {shown} | {interval} |")
    if intervals:
        lines.append(f"(intervals: {metrics['bootstrap']['resamples']} bootstrap resamples of the examples)")
    return "\n".join(lines)
