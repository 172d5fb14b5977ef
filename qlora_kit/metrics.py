"""Label parsing and metrics: small pure functions."""

from __future__ import annotations

import re
from collections import Counter

INVALID = "<invalid>"


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def _continues_word(next_char: str) -> bool:
    return next_char.isalnum() or next_char in ".-_"


def parse_label(generated: str, label_names: list[str]) -> str | None:
    """The label a generated answer names, or None.

    First line only, whitespace and case normalised; an exact label name, else the one
    label that the answer is a prefix of (a cut-off answer) or that is a prefix of the answer.
    """
    lines = [line for line in generated.strip().splitlines() if line.strip()]
    answer = _normalise(lines[0]) if lines else ""
    answer = answer.strip("`'\". ")
    if not answer:
        return None
    by_name = {_normalise(name): name for name in label_names}
    if answer in by_name:
        return by_name[answer]
    cut_off = [name for key, name in by_name.items() if key.startswith(answer)]
    if len(cut_off) == 1:
        return cut_off[0]
    named_first = [
        name
        for key, name in by_name.items()
        if answer.startswith(key) and not _continues_word(answer[len(key) : len(key) + 1])
    ]
    if len(named_first) == 1:
        return named_first[0]
    return None


def classification_metrics(references: list[str], predictions: list[str | None], label_names: list[str]) -> dict:
    """Accuracy, macro/micro F1, micro precision/recall, invalid rate, per-class scores, confusion matrix.

    An invalid prediction (None) counts as wrong for accuracy and recall and is no prediction for precision.
    """
    if len(references) != len(predictions):
        raise ValueError("references and predictions differ in length")
    total = len(references)
    correct = sum(ref == pred for ref, pred in zip(references, predictions))
    valid = sum(pred is not None for pred in predictions)
    per_class = {}
    for label in label_names:
        tp = sum(ref == label and pred == label for ref, pred in zip(references, predictions))
        predicted = sum(pred == label for pred in predictions)
        actual = sum(ref == label for ref in references)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    present = [label for label in label_names if per_class[label]["support"] > 0]
    micro_precision = correct / valid if valid else 0.0
    micro_recall = correct / total if total else 0.0
    micro_f1 = (
        2 * micro_precision * micro_recall / (micro_precision + micro_recall) if micro_precision + micro_recall else 0.0
    )
    confusion: dict[str, dict[str, int]] = {label: {} for label in label_names}
    for (ref, pred), count in Counter(zip(references, predictions)).items():
        confusion.setdefault(ref, {})[pred if pred is not None else INVALID] = count
    return {
        "n": total,
        "accuracy": correct / total if total else 0.0,
        "macro_f1": sum(per_class[label]["f1"] for label in present) / len(present) if present else 0.0,
        "micro_f1": micro_f1,
        "micro_precision": micro_precision,
        "micro_recall": micro_recall,
        "invalid": total - valid,
        "invalid_rate": (total - valid) / total if total else 0.0,
        "per_class": per_class,
        "confusion_matrix": confusion,
    }


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge_scores(references: list[str], predictions: list[str]) -> dict:
    """Mean ROUGE-1/2/L/Lsum F-measures x100 with stemming (rouge-score, offline); Lsum splits on newlines."""
    from rouge_score import rouge_scorer

    if len(references) != len(predictions):
        raise ValueError("references and predictions differ in length")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for reference, prediction in zip(references, predictions):
        scores = scorer.score(reference, prediction)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    count = len(references)
    return {"n": count, **{key: 100 * value / count if count else 0.0 for key, value in totals.items()}}
