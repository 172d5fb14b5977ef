"""Two evaluations of the same test items, compared pairwise: "B minus A: +x (95% CI a..b)".

An evaluation is a folder with ``predictions.jsonl`` (or ``.jsonl.gz``) and ``metrics.json``, or a run folder
(its test evaluation, ``metrics/``). Classification compares accuracy (paired bootstrap and McNemar's exact
test); summarization compares ROUGE-1/2/L per example (paired bootstrap).
"""

from __future__ import annotations

import json
from pathlib import Path

from .data import read_records
from .errors import UsageError
from .metrics import mcnemar, paired_difference, rouge_per_example
from .run_folder import METRICS, PREDICTIONS, RunFolder


def evaluation_folder(path: str | Path) -> Path:
    path = Path(path)
    if (path / METRICS).is_file():
        return path
    if RunFolder(path).evaluation().metrics_file.is_file():
        return RunFolder(path).evaluation().folder
    raise UsageError(f"{path}: neither an evaluation folder (with {METRICS}) nor a run folder with a test evaluation")


def read_predictions(folder: Path) -> list[dict]:
    """An evaluation's prediction records in id order (predictions.jsonl, or .jsonl.gz as committed)."""
    for name in (PREDICTIONS, PREDICTIONS + ".gz"):
        if (folder / name).is_file():
            return sorted(read_records(folder / name), key=lambda record: record["id"])
    raise UsageError(f"{folder}: no {PREDICTIONS} (or .gz)")


def compare(a: str | Path, b: str | Path) -> dict:
    """B minus A on every metric the task has, paired over the examples both scored."""
    folder_a, folder_b = evaluation_folder(a), evaluation_folder(b)
    rows_a, rows_b = read_predictions(folder_a), read_predictions(folder_b)
    if [r["reference"] for r in rows_a] != [r["reference"] for r in rows_b]:
        raise UsageError(f"{folder_a} and {folder_b} were not scored on the same examples (references differ)")
    classification = "accuracy" in json.loads((folder_a / METRICS).read_text(encoding="utf-8"))

    def answers(rows):  # a failed example's answer counts as none
        return [None if "error" in r else r.get("parsed") for r in rows]

    references = [r["reference"] for r in rows_a]
    return {
        "a": str(folder_a),
        "b": str(folder_b),
        "n": len(rows_a),
        **paired_differences(references, answers(rows_a), answers(rows_b), classification),
    }


def paired_differences(references: list[str], answers_a: list, answers_b: list, classification: bool) -> dict:
    """B minus A on the same items, from each one's parsed answers (None: no answer): accuracy (paired bootstrap,
    and McNemar's exact test) for classification, else ROUGE-1/2/L per example (paired bootstrap)."""
    if classification:
        right_a = [answer == reference for answer, reference in zip(answers_a, references)]
        right_b = [answer == reference for answer, reference in zip(answers_b, references)]
        return {"differences": {"accuracy": paired_difference(right_a, right_b)}, "mcnemar": mcnemar(right_a, right_b)}
    scores_a = rouge_per_example(references, [answer or "" for answer in answers_a])
    scores_b = rouge_per_example(references, [answer or "" for answer in answers_b])
    return {
        "differences": {key: paired_difference(scores_a[key], scores_b[key]) for key in ("rouge1", "rouge2", "rougeL")}
    }


def describe(result: dict) -> str:
    """One line a metric: "B minus A: accuracy +0.0123 (95% CI 0.0050..0.0197)"."""
    lines = [f"A: {result['a']}", f"B: {result['b']}", f"{result['n']} examples, paired"]
    for key, diff in result["differences"].items():
        scale = 100 if key == "accuracy" else 1  # accuracy in points, ROUGE already x100
        low, high = (scale * value for value in diff["ci"])
        lines.append(
            f"B minus A: {key} {scale * diff['difference']:+.2f} (95% CI {low:+.2f}..{high:+.2f})"
            + (" points" if key == "accuracy" else "")
        )
    if "mcnemar" in result:
        test = result["mcnemar"]
        lines.append(
            f"McNemar: only A right {test['only_a_right']}, only B right {test['only_b_right']}, "
            f"p = {test['p_value']:.3g}"
        )
    return "\n".join(lines)
