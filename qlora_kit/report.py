"""Tables, CSV and plots made from result files (run folders and baseline folders), never by hand."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

from .run_folder import METRICS, RUN_CONFIG, RunFolder

VARIANTS = ["QLoRA", "+ NEFTune", "+ all modules", "+ NEFTune + all modules"]
MISSING = "—"
ROUGE_COLUMNS = [("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"), ("rougeLsum", "ROUGE-Lsum")]


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def variant(settings: dict) -> str:
    neftune, full = bool(settings.get("neftune")), bool(settings.get("full_tune"))
    return VARIANTS[(2 if full else 0) + (1 if neftune else 0)]


def run_folders(experiments: Path) -> list[RunFolder]:
    """Every training run folder under ``experiments`` (a folder with a run_config.json), in path order."""
    if not Path(experiments).is_dir():
        return []
    return [RunFolder(path.parent) for path in sorted(Path(experiments).rglob(RUN_CONFIG))]


def collect(experiments: Path, baselines: Path | None) -> list[dict]:
    """One record per fine-tuned run and per baseline evaluation found under the folders."""
    records = []
    for run in run_folders(experiments):
        config = _read(run.config_file)
        if not config or "settings" not in config:
            continue
        settings = config["settings"]
        record = {
            "kind": "fine-tuned",
            "run": str(run.path),
            "task": config["task"],
            "method": variant(settings),
            "model": settings.get("pretrained_ckpt"),
            "prompt_style": config.get("prompt_style"),
            "train_sample_fraction": settings.get("train_sample_fraction", 1.0),
            "train_samples": config.get("data", {}).get("rows", {}).get("used"),
            **{
                key: settings.get(key)
                for key in (
                    "epochs",
                    "lora_r",
                    "dropout",
                    "neftune",
                    "full_tune",
                    "max_steps",
                    "learning_rate",
                    "batch_size",
                    "grad_accum",
                )
            },
        }
        train = run.train_metrics() or {}
        record.update(
            {
                key: train.get(key)
                for key in ("train_loss", "train_runtime_s", "tokens_per_second", "peak_gpu_memory_gb")
            }
        )
        evaluation = run_result(run)
        record.update(_metrics(evaluation.metrics(), evaluation.folder))
        record["scored_step"] = evaluation.step
        # a run scored only at its checkpoints (--checkpoint) is in Table 3, not as an empty row of Tables 1-2
        record["checkpoint_only"] = record["n"] is None and any(e.step is not None for e in run.evaluations())
        record["seed"] = settings.get("seed")
        record["recipe_key"] = recipe_key(settings)
        records.append(record)
    for metrics_path in sorted(Path(baselines).rglob(METRICS)) if baselines and Path(baselines).is_dir() else []:
        metrics = _read(metrics_path)
        config = (metrics or {}).get("config", {})
        if "prompt_type" not in config:
            continue
        records.append(
            {
                "kind": "baseline",
                "run": str(metrics_path.parent),
                "task": config["task"],
                "method": f"{config['prompt_type']} ({config.get('prompt_style', 'seed')})",
                "model": config.get("pretrained_ckpt"),
                "prompt_style": config.get("prompt_style"),
                **_metrics(metrics, metrics_path.parent),
            }
        )
    return records


def _metrics(metrics: dict | None, folder: Path | None = None) -> dict:
    """The headline metrics of an evaluation and their 95% intervals (``ci95``): from its metrics.json, or,
    for a file written before intervals were recorded, recomputed from its predictions in ``folder``."""
    keys = ("n", "accuracy", "macro_f1", "micro_f1", "invalid_rate", "rouge1", "rouge2", "rougeL", "rougeLsum")
    found = {key: (metrics or {}).get(key) for key in keys}
    found["ci95"] = (metrics or {}).get("ci95") or (_recomputed_intervals(metrics, folder) if metrics else {})
    return found


def _recomputed_intervals(metrics: dict, folder: Path | None) -> dict:
    from .compare import read_predictions
    from .errors import UsageError
    from .metrics import classification_intervals, rouge_intervals, rouge_per_example

    try:
        rows = [row for row in read_predictions(folder) if "error" not in row] if folder else []
    except UsageError:
        return {}
    if not rows:
        return {}
    references, parsed = [row["reference"] for row in rows], [row.get("parsed") for row in rows]
    if "accuracy" in metrics:
        return classification_intervals(references, parsed, sorted(metrics.get("per_class", {})))
    intervals = rouge_intervals(rouge_per_example(references, [text or "" for text in parsed]))
    intervals.pop("rougeLsum")  # older files scored Lsum without the sentence split: not the same measure
    return intervals


def _pct(value, interval=None) -> str:
    if value is None:
        return MISSING
    return f"{100 * value:.1f}" + (f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else "")


def _accuracy_text(accuracy, macro_f1, intervals: dict) -> str:
    """Accuracy (macro-F1) in %, each with its interval where known."""
    return f"{_pct(accuracy, intervals.get('accuracy'))} ({_pct(macro_f1, intervals.get('macro_f1'))})"


def _num(value, interval=None) -> str:
    if value is None:
        return MISSING
    return f"{value:.2f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def classification_table(records: list[dict]) -> str:
    """Table 1: training samples (and epochs) x method, accuracy (macro-F1) in %.

    Runs that land in the same cell (same samples, epochs and method, other settings differing) are all
    shown, separated by " / ", never one silently in place of another.
    """
    runs = [
        r
        for r in records
        if r["task"] == "classification" and r["kind"] == "fine-tuned" and not r.get("checkpoint_only")
    ]
    cells: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in sorted(runs, key=lambda r: r["run"]):
        cells[(run["train_sample_fraction"], run["train_samples"], run["epochs"])][run["method"]].append(run)
    lines = [
        "| training samples | fraction | epochs | " + " | ".join(VARIANTS) + " |",
        "|---|---|---|" + "---|" * len(VARIANTS),
    ]
    for key in sorted(cells, key=lambda key: (key[0], key[1] or 0, key[2] or 0)):
        fraction, samples, epochs = key
        row = []
        for method in VARIANTS:
            shown = [
                _accuracy_text(run["accuracy"], run["macro_f1"], run["ci95"])
                for run in cells[key].get(method, [])
                if run["accuracy"] is not None
            ]
            row.append(" / ".join(shown) or MISSING)
        lines.append(
            f"| {samples if samples is not None else MISSING} | {fraction} | "
            f"{epochs if epochs is not None else MISSING} | " + " | ".join(row) + " |"
        )
    baselines = [r for r in records if r["task"] == "classification" and r["kind"] == "baseline"]
    for run in sorted(baselines, key=lambda r: r["method"]):
        lines.append(
            f"| {run['method']} | - | - | {_accuracy_text(run['accuracy'], run['macro_f1'], run['ci95'])} |"
            + f" {MISSING} |" * (len(VARIANTS) - 1)
        )
    return "\n".join(lines)


def summarization_table(records: list[dict]) -> str:
    """Table 2: zero-shot, few-shot and each QLoRA run, ROUGE-1/2/L/Lsum."""
    runs = [r for r in records if r["task"] == "summarization" and not r.get("checkpoint_only")]
    baselines = sorted((r for r in runs if r["kind"] == "baseline"), key=lambda r: r["method"])
    tuned = sorted(
        (r for r in runs if r["kind"] == "fine-tuned"),
        key=lambda r: (
            VARIANTS.index(r["method"]),
            r["lora_r"] or 0,
            r["dropout"] or 0,
            r["epochs"] or 0,
            (r.get("prompt_style") or "seed") != "seed",
        ),
    )
    lines = [
        "| method | " + " | ".join(label for _, label in ROUGE_COLUMNS) + " |",
        "|---|" + "---|" * len(ROUGE_COLUMNS),
    ]
    for run in baselines + tuned:
        name = (
            run["method"]
            if run["kind"] == "baseline"
            else (
                f"{run['method']} r={run['lora_r']} dropout={run['dropout']} epochs={run['epochs']}"
                + (f" steps={run['max_steps']}" if run.get("max_steps") else "")
                + (f", {run['prompt_style']} prompt" if run.get("prompt_style") not in (None, "seed") else "")
            )
        )
        lines.append(
            f"| {name} | " + " | ".join(_num(run[key], run["ci95"].get(key)) for key, _ in ROUGE_COLUMNS) + " |"
        )
    return "\n".join(lines)


def write_csv(records: list[dict], path: Path) -> None:
    records = [_flat(record) for record in records]
    columns = sorted(
        {key for record in records for key in record}, key=lambda k: (k not in ("kind", "task", "method", "run"), k)
    )
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for record in records:
            writer.writerow({key: "" if record.get(key) is None else record.get(key) for key in columns})


def _flat(record: dict) -> dict:
    """A record with its intervals as columns (accuracy_ci95_low, accuracy_ci95_high, ...)."""
    flat = {key: value for key, value in record.items() if key != "ci95"}
    for key, (low, high) in (record.get("ci95") or {}).items():
        flat[f"{key}_ci95_low"], flat[f"{key}_ci95_high"] = low, high
    return flat


# Settings that do not make two runs different recipes: repeats of a recipe differ only in these.
NOT_THE_RECIPE = ("seed", "experiment_dir", "overwrite", "resume")


def recipe_key(settings: dict) -> str:
    """What makes a run's recipe, as text: its settings less NOT_THE_RECIPE. A setting added after the run was
    made counts at its default (the run had no other value for it)."""
    from .settings import FIELDS

    defaults = {name: field.default for name, field in FIELDS.items()}
    every = {**defaults, **settings}
    return json.dumps({k: v for k, v in every.items() if k not in NOT_THE_RECIPE}, sort_keys=True, default=str)


def run_result(run: RunFolder):
    """The run's test evaluation: of its final adapter, or else of the checkpoint chosen on validation while it
    trained (--select_on); of several evaluations of one adapter, the default folder's (greedy), then the
    constrained decoding's, then the others by name."""
    steps = [None] if run.chosen_step() is None else [None, run.chosen_step()]
    for step in steps:
        scored = [e for e in run.evaluations() if e.split == "test" and e.step == step and e.metrics() is not None]
        if scored:
            return min(scored, key=lambda e: (e.suffix not in ("", "constrained"), e.suffix != "", e.suffix))
    return run.evaluation()


def seed_table(records: list[dict]) -> str:
    """Table 4: runs that differ only in --seed, as mean +- sd over the seeds (one row per recipe)."""
    import statistics

    groups = defaultdict(list)
    for run in records:
        if run["kind"] == "fine-tuned" and run.get("recipe_key") and not run.get("checkpoint_only"):
            groups[(run["task"], run["recipe_key"])].append(run)
    lines = ["| task | run | seeds | metric | mean +- sd | min - max |", "|---|---|---|---|---|---|"]
    for (task, _), runs in sorted(groups.items()):
        seeds = sorted({run["seed"] for run in runs})
        if len(seeds) < 2:
            continue
        for key in ("accuracy", "macro_f1") if task == "classification" else ("rouge1", "rouge2", "rougeL"):
            values = [run[key] for run in runs if run[key] is not None]
            if len(values) < 2:
                continue
            scale = 100 if task == "classification" else 1
            mean, sd = scale * statistics.mean(values), scale * statistics.stdev(values)
            lines.append(
                f"| {task} | {Path(runs[0]['run']).name} | {', '.join(map(str, seeds))} | {key} | "
                f"{mean:.2f} +- {sd:.2f} | {scale * min(values):.2f} - {scale * max(values):.2f} |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def plot_accuracy(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    runs = [
        r
        for r in records
        if r["task"] == "classification"
        and r["kind"] == "fine-tuned"
        and r["accuracy"] is not None
        and r["train_samples"]
    ]
    epochs_seen = sorted({r["epochs"] or 0 for r in runs})
    for method in VARIANTS:
        for epochs in epochs_seen:  # one line per method and epoch count: runs trained longer are not mixed in
            points = sorted(
                (r["train_samples"], 100 * r["accuracy"])
                for r in runs
                if r["method"] == method and (r["epochs"] or 0) == epochs
            )
            label = method if len(epochs_seen) == 1 else f"{method}, {epochs} epoch{'s' if epochs != 1 else ''}"
            if points:
                axis.plot(*zip(*points), marker="o", label=label)
    axis.set_xscale("log")
    axis.set_xlabel("training samples")
    axis.set_ylabel("accuracy (%)")
    axis.set_title("20 Newsgroups: accuracy against training samples")
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_rouge(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in records if r["task"] == "summarization" and r["rouge1"] is not None]
    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(runs)), 4))
    labels = [r["method"] if r["kind"] == "baseline" else f"{r['method']}\nr={r['lora_r']}" for r in runs]
    width = 0.4
    for offset, (key, label) in zip((-width / 2, width / 2), ROUGE_COLUMNS[:2]):
        axis.bar([i + offset for i in range(len(runs))], [r[key] for r in runs], width, label=label)
    axis.set_xticks(range(len(runs)), labels, fontsize=7)
    axis.set_ylabel("score")
    axis.set_title("SAMSum: ROUGE by method")
    if runs:
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def make_report(experiments: Path, baselines: Path | None, out: Path, compare: tuple | None = None) -> str:
    """report.md, runs.csv and two plots from the result folders; ``compare=(A, B)`` adds their paired
    comparison on the same test items."""
    records = collect(experiments, baselines)
    out.mkdir(parents=True, exist_ok=True)
    # the command that remakes this report: a baseline folder that is not there was not read
    shown_baselines = f"{baselines} " if baselines and Path(baselines).is_dir() else ""
    seeds = seed_table(records)
    extra = [f"## Table 4: repeats over seeds\n\n{seeds}"] if seeds else []
    if compare:
        from .compare import compare as compare_runs
        from .compare import describe

        extra.append(f"## Comparison, paired over the same test items\n\n```\n{describe(compare_runs(*compare))}\n```")
    text = (
        "\n\n".join(
            [
                "# Results report",
                f"Made by `python make_report.py {experiments} {shown_baselines}--out {out}` from {len(records)} result folders; "
                f"{MISSING} marks a run that has not been made.",
                "## Table 1: 20 Newsgroups accuracy (macro-F1), %, each with its 95% bootstrap interval",
                classification_table(records),
                "## Table 2: SAMSum ROUGE [95% bootstrap interval]",
                summarization_table(records),
                "![accuracy against training samples](accuracy_vs_samples.png)\n\n![ROUGE by method](rouge_by_method.png)",
            ]
            + (
                [f"## Table 3: checkpoints scored on validation and test\n\n{CHECKPOINT_NOTE}\n\n{checkpoints}"]
                if (checkpoints := checkpoint_table(experiments))
                else []
            )
            + extra
        )
        + "\n"
    )
    (out / "report.md").write_text(text, encoding="utf-8")
    write_csv(records, out / "runs.csv")
    plot_accuracy(records, out / "accuracy_vs_samples.png")
    plot_rouge(records, out / "rouge_by_method.png")
    return text


def _epoch_of_step(run: RunFolder, step: int, config: dict | None = None) -> float | None:
    """The epoch a checkpoint was saved at: from its trainer state, else from the run's rows and batch size
    (checkpoints are not kept with committed results); ``config``: the run's, if already read."""
    state = run.checkpoint_state(step)
    if state and state.get("epoch") is not None:
        return state["epoch"]
    config = config if config is not None else _read(run.config_file) or {}
    used, batch = config.get("data", {}).get("rows", {}).get("used"), config.get("effective_batch_size")
    if not used or not batch or config.get("settings", {}).get("packing"):
        return None
    return round(step / math.ceil(used / batch), 2)


def checkpoint_scores(run_dir: Path, split: str = "validation") -> list[dict]:
    """Every evaluated checkpoint of a run on ``split`` (written by the inference scripts' --checkpoint), with
    the epoch it was saved at."""
    run = RunFolder(run_dir)
    return [
        {"run": str(run.path), "step": e.step, "epoch": _epoch_of_step(run, e.step), **_metrics(e.metrics())}
        for e in run.scored_checkpoints(split)
    ]


def _score_text(evaluation, task: str) -> str:
    """An evaluation's headline numbers, each with its 95% interval (accuracy and macro-F1; ROUGE-1, 2, L)."""
    metrics = evaluation.metrics() or {}
    intervals = _metrics(metrics, evaluation.folder)["ci95"]
    if task == "classification":
        invalid = metrics.get("invalid")
        text = _accuracy_text(metrics.get("accuracy"), metrics.get("macro_f1"), intervals)
        return text + (f", {invalid} invalid" if invalid else "")
    return " / ".join(_num(metrics.get(key), intervals.get(key)) for key, _ in ROUGE_COLUMNS[:3])


def _run_settings(config: dict) -> str:
    settings = config.get("settings", {})
    words = [
        f"{config.get('data', {}).get('rows', {}).get('used')} rows",
        f"len {settings.get('max_seq_length')}",
        "4-bit" if config.get("load_in_4bit") else "16-bit",
        f"r={settings.get('lora_r')}",
        f"batch {config.get('effective_batch_size')}",
        f"lr {settings.get('learning_rate'):g}" if settings.get("learning_rate") else None,
        settings.get("lr_scheduler") if settings.get("lr_scheduler") not in (None, "constant_with_warmup") else None,
    ]
    return ", ".join(word for word in words if word)


CHECKPOINT_NOTE = (
    "[a, b]: the 95% bootstrap interval of the number before it. "
    "Validation: SAMSum's own split; for 20 Newsgroups the part of the training set the run held "
    "out (`--validation_fraction`). 20 Newsgroups: accuracy (macro-F1) %; SAMSum: ROUGE-1 / ROUGE-2 / "
    "ROUGE-L. Test entries name their decoding when it was not the default."
)


def checkpoint_table(experiments: Path) -> str:
    """Table 3: every checkpoint scored on validation (the choice) and on test, one row per run and step.

    20 Newsgroups: accuracy (macro-F1) %; SAMSum: ROUGE-1 / ROUGE-2 / ROUGE-L. A test column holds one entry
    per decoding it was scored with."""
    lines = ["| run | settings | step | epoch | validation | test |", "|---|---|---|---|---|---|"]
    for run in run_folders(experiments):
        config = _read(run.config_file) or {}
        task = config.get("task")
        validation = {e.step: e for e in run.scored_checkpoints("validation")}
        test = defaultdict(list)
        for evaluation in run.evaluations():
            if evaluation.split == "test" and evaluation.step is not None:
                test[evaluation.step].append(evaluation)
        for step in sorted(set(validation) | set(test)):
            valid_text = _score_text(validation[step], task) if step in validation else MISSING
            test_text = (
                "; ".join(_score_text(e, task) + (f" ({e.suffix})" if e.suffix else "") for e in test.get(step, []))
                or MISSING
            )
            epoch = _epoch_of_step(run, step, config)
            lines.append(
                f"| {run.path.name} | {_run_settings(config)} | {step} | "
                f"{MISSING if epoch is None else f'{epoch:g}'} | {valid_text} | {test_text} |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def choose_checkpoint(scores: list[dict], metrics: list[str]) -> dict:
    """The best score by the sum of ``metrics`` (higher is better); ties go to fewer invalid answers, then to the
    earlier checkpoint (less training for the same result)."""
    usable = [score for score in scores if all(score.get(name) is not None for name in metrics)]
    if not usable:
        raise ValueError(f"no evaluated checkpoint has {', '.join(metrics)}")
    return min(
        usable,
        key=lambda score: (
            -sum(score[name] for name in metrics),
            score.get("invalid_rate") or 0,
            score["step"],
            score["run"],
        ),
    )
