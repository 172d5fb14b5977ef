"""Label parsing and metrics: small pure functions."""

from __future__ import annotations

import re
import statistics
from collections import Counter

INVALID = "<invalid>"


def spread(values: list[float]) -> dict:
    """The median, least and largest of a repeated measurement, and how many times it was taken."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


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
# After . ! or ? (and any closing quote or bracket), where whitespace and a capital letter or digit follow.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]*[A-Z0-9])")
ROUGE_LSUM_SPLIT = "sentences split after . ! ? before a capital or digit, one a line (as the published SAMSum Lsum)"


def split_sentences(text: str) -> str:
    """The text with one sentence a line, as ROUGE-Lsum expects (an offline rule, no model or download)."""
    lines = []
    for line in text.strip().splitlines():
        lines += [part.strip() for part in _SENTENCE_END.split(line) if part.strip()]
    return "\n".join(lines)


def _stemming_tokenizer():
    """rouge-score's own tokenizer with its Porter stemmer, each word's stem computed once (most of scoring's time
    is stemming the same words again): the same tokens as ``use_stemmer=True``."""
    import functools

    from nltk.stem import porter
    from rouge_score import tokenize, tokenizers

    class StemmedOnce(tokenizers.Tokenizer):
        stem = staticmethod(functools.lru_cache(maxsize=None)(porter.PorterStemmer().stem))

        def tokenize(self, text):
            return tokenize.tokenize(text, self)

    return StemmedOnce()


def rouge_per_example(references: list[str], predictions: list[str]) -> dict[str, list[float]]:
    """ROUGE-1/2/L/Lsum F-measures x100 of every example (stemmed, rouge-score, offline). ROUGE-Lsum splits
    reference and prediction into sentences first (``split_sentences``); ROUGE-L takes each as one sequence."""
    from rouge_score import rouge_scorer

    if len(references) != len(predictions):
        raise ValueError("references and predictions differ in length")
    # two scorers, so that each text is tokenised once for ROUGE-1/2/L and once, sentence by sentence, for
    # ROUGE-Lsum (one scorer of all four would do both for each of its two calls)
    tokenizer = _stemming_tokenizer()
    whole = rouge_scorer.RougeScorer(list(ROUGE_TYPES[:3]), tokenizer=tokenizer)
    by_sentence = rouge_scorer.RougeScorer(["rougeLsum"], tokenizer=tokenizer)
    per_example = {key: [] for key in ROUGE_TYPES}
    for reference, prediction in zip(references, predictions):
        scores = whole.score(reference, prediction)
        lsum = by_sentence.score(split_sentences(reference), split_sentences(prediction))["rougeLsum"]
        for key in ROUGE_TYPES[:3]:
            per_example[key].append(100 * scores[key].fmeasure)
        per_example["rougeLsum"].append(100 * lsum.fmeasure)
    return per_example


def rouge_means(per_example: dict[str, list[float]]) -> dict:
    """Mean ROUGE-1/2/L/Lsum of ``rouge_per_example``'s scores, with n and how Lsum split sentences."""
    count = len(per_example["rouge1"])
    means = {key: sum(values) / count if count else 0.0 for key, values in per_example.items()}
    return {"n": count, **means, "rougeLsum_split": ROUGE_LSUM_SPLIT}


def rouge_scores(references: list[str], predictions: list[str]) -> dict:
    """Mean ROUGE-1/2/L/Lsum F-measures x100."""
    return rouge_means(rouge_per_example(references, predictions))


# --------------------------------------------------------------------------- uncertainty
BOOTSTRAP = {"method": "percentile bootstrap over examples", "resamples": 1000, "seed": 0, "level": 0.95}


def _resample_indices(n: int, resamples: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(values, level: float) -> list[float]:
    import numpy as np

    tail = (1 - level) / 2 * 100
    low, high = np.percentile(np.asarray(values, dtype=float), [tail, 100 - tail])
    return [float(low), float(high)]


def classification_statistics(references: list[str], predictions: list, label_names: list[str]):
    """Per-resample accuracy, macro-F1, micro-F1 and invalid rate as a function of example indices (numpy)."""
    import numpy as np

    index = {name: i for i, name in enumerate(label_names)}
    k = len(label_names)
    ref = np.array([index.get(r, k) for r in references])
    pred = np.array([index.get(p, k + 1) if p is not None else k + 1 for p in predictions])  # k+1: invalid

    def stats(rows):
        r, p = ref[rows], pred[rows]
        n = len(rows)
        correct = r == p
        tp = np.bincount(r[correct], minlength=k + 2)[:k]
        predicted = np.bincount(p, minlength=k + 2)[:k]
        actual = np.bincount(r, minlength=k + 2)[:k]
        precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
        recall = np.divide(tp, actual, out=np.zeros(k), where=actual > 0)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=precision + recall > 0)
        present = actual > 0
        valid = int((p != k + 1).sum())
        micro_p = correct.sum() / valid if valid else 0.0
        micro_r = correct.sum() / n if n else 0.0
        micro_f1 = 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r else 0.0
        return {
            "accuracy": correct.mean() if n else 0.0,
            "macro_f1": f1[present].mean() if present.any() else 0.0,
            "micro_f1": micro_f1,
            "invalid_rate": (n - valid) / n if n else 0.0,
        }

    return stats


def bootstrap_intervals(statistic, n: int, settings: dict = BOOTSTRAP) -> dict[str, list[float]]:
    """The ``level`` interval of every value ``statistic(indices)`` returns, over resamples of the n examples."""
    if n == 0:
        return {}
    draws = [statistic(rows) for rows in _resample_indices(n, settings["resamples"], settings["seed"])]
    return {key: _percentiles([draw[key] for draw in draws], settings["level"]) for key in draws[0]}


def classification_intervals(references: list[str], predictions: list, label_names: list[str]) -> dict:
    return bootstrap_intervals(classification_statistics(references, predictions, label_names), len(references))


def rouge_intervals(per_example: dict[str, list[float]]) -> dict:
    import numpy as np

    arrays = {key: np.asarray(values) for key, values in per_example.items()}
    n = len(next(iter(arrays.values()), []))
    return bootstrap_intervals(lambda rows: {key: values[rows].mean() for key, values in arrays.items()}, n)


def paired_difference(a_values, b_values, settings: dict = BOOTSTRAP) -> dict:
    """B minus A on the same examples: the mean difference and its paired bootstrap interval."""
    import numpy as np

    a, b = np.asarray(a_values, dtype=float), np.asarray(b_values, dtype=float)
    if a.shape != b.shape:
        raise ValueError("the two runs were not scored on the same examples")
    diff = b - a
    draws = [diff[rows].mean() for rows in _resample_indices(len(diff), settings["resamples"], settings["seed"])]
    return {"difference": float(diff.mean()), "ci": _percentiles(draws, settings["level"]), "n": len(diff)}


def mcnemar(a_correct: list[bool], b_correct: list[bool]) -> dict:
    """McNemar's exact test on paired right/wrong answers: the discordant counts and the two-sided p-value."""
    from math import comb

    only_a = sum(1 for x, y in zip(a_correct, b_correct) if x and not y)
    only_b = sum(1 for x, y in zip(a_correct, b_correct) if y and not x)
    discordant = only_a + only_b
    tail = sum(comb(discordant, i) for i in range(min(only_a, only_b) + 1)) / 2**discordant if discordant else 1.0
    return {"only_a_right": only_a, "only_b_right": only_b, "p_value": min(1.0, 2 * tail)}
