"""Loading, validating and cleaning the tasks' data, from local files or the Hub.

Every row becomes ``{"input": str, "target": str}``. Local data may be ``.jsonl`` or ``.json`` (JSON lines or
one array of objects), ``.csv`` or ``.tsv`` (UTF-8, with or without a byte-order mark, quoted multi-line fields),
each also gzipped (``.gz``), ``.parquet``, or a folder written by ``datasets``' ``save_to_disk``. Anything wrong
with a file is a ``UsageError`` naming the file (and line); rows dropped by cleaning are counted and logged,
never dropped silently.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

from .errors import UsageError

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")  # each also as .gz; and .parquet
FORMATS = ".jsonl, .json, .csv, .tsv (each also .gz), .parquet, or a datasets save_to_disk folder"


# --------------------------------------------------------------------------- reading files
def _file_format(path: Path) -> tuple[str, bool]:
    """(format, gzipped) from the file name."""
    name = path.name.lower()
    gzipped = name.endswith(".gz")
    base = name[: -len(".gz")] if gzipped else name
    if base.endswith(".parquet") and not gzipped:
        return ".parquet", False
    for suffix in SUPPORTED_SUFFIXES:
        if base.endswith(suffix):
            return suffix, gzipped
    raise UsageError(f"{path}: unsupported file type; use {FORMATS}")


def _read_bytes(path: Path, gzipped: bool) -> bytes:
    try:
        if gzipped:
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError) as error:
        if isinstance(error, PermissionError):
            raise
        raise UsageError(f"{path}: broken gzip file ({error})")


def _decode(path: Path, content: bytes) -> str:
    try:
        return content.decode("utf-8-sig")  # a byte-order mark (spreadsheets' "CSV UTF-8") is not text
    except UnicodeDecodeError as error:
        line = content[: error.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not valid UTF-8 ({error.reason} at byte {error.start})")


def _json_rows(path: Path, text: str) -> list[dict]:
    """JSON lines, or one JSON array of objects (what ``json.dump(rows)`` writes)."""
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}:{error.lineno}: malformed JSON ({error.msg})")
        for number, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                raise UsageError(f"{path}: item {number} of the array is a {type(row).__name__}, not an object")
        return rows
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}:{line_number}: malformed JSON ({error.msg})")
        if not isinstance(row, dict):
            raise UsageError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _delimited_rows(path: Path, text: str, delimiter: str) -> list[dict]:
    kind = "TSV" if delimiter == "\t" else "CSV"
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
        rows = []
        for row in reader:
            if None in row:
                raise UsageError(f"{path}:{reader.line_num}: more fields than the header has")
            rows.append(row)
        return rows
    except csv.Error as error:
        raise UsageError(f"{path}: malformed {kind} ({error})")


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several unrelated types for a bad file
        raise UsageError(f"{path}: cannot read as parquet ({type(error).__name__}: {error})")


def _dataset_rows(dataset) -> list[dict]:
    """The rows of a ``datasets.Dataset``, with ClassLabel columns as their label names (not integers)."""
    from datasets import ClassLabel

    rows = list(dataset)
    for column, feature in dataset.features.items():
        if isinstance(feature, ClassLabel):
            for row in rows:
                if row[column] is not None and row[column] >= 0:
                    row[column] = feature.int2str(row[column])
    return rows


def _read_saved_dataset(path: Path, split: str) -> list[dict]:
    """A folder written by ``Dataset.save_to_disk`` (one split) or ``DatasetDict.save_to_disk`` (pick ``split``)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # not a datasets folder, or a damaged one
        raise UsageError(f"{path}: a folder, but not one written by datasets' save_to_disk ({_first_line(error)})")
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UsageError(f"{path}: no '{split}' split in this saved dataset (splits: {', '.join(loaded)})")
        loaded = loaded[split]
    return _dataset_rows(loaded)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_records(path: str | Path, split: str = "train") -> list[dict]:
    """Every row of local data as a dict (``split``: which split of a saved ``DatasetDict`` folder)."""
    path = Path(path)
    if path.is_dir():
        return _read_saved_dataset(path, split)
    kind, gzipped = _file_format(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        if kind == ".parquet":
            return _read_parquet(path)
        text = _decode(path, _read_bytes(path, gzipped))
        if kind in (".jsonl", ".json"):
            return _json_rows(path, text)
        return _delimited_rows(path, text, "\t" if kind == ".tsv" else ",")
    except PermissionError:
        raise UsageError(f"{path}: permission denied")


def _load_hub_split(dataset: str, split: str) -> list[dict]:
    import datasets

    try:
        return _dataset_rows(datasets.load_dataset(dataset, split=split))
    except Exception as error:  # offline, unknown id, unknown split: all end here
        raise UsageError(
            f"cannot load split '{split}' of dataset '{dataset}' from the Hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            "offline, pass local files with --train_file/--test_file"
        )


def load_rows(
    task, *, file: str | None, dataset: str, split: str, columns: dict | None = None
) -> tuple[list[dict], str]:
    """Rows of one split as ``{"input", "target"}`` dicts, and a description of the source.

    ``columns`` maps the task's column names to the data's (``{"text": "sentence"}``); unmapped ones keep theirs.
    """
    columns = columns or {}
    unknown = sorted(set(columns) - {task.input_column, task.target_column})
    if unknown:
        raise UsageError(
            f"--columns: {', '.join(unknown)} is not a column of the {task.name} task (its columns: "
            f"{task.input_column}, {task.target_column})"
        )
    if file:
        records, source = read_records(file, split), str(file)
    else:
        records, source = _load_hub_split(dataset, split), f"{dataset}[{split}]"
    if not records:
        raise UsageError(f"{source}: no rows")
    found = set().union(*(record.keys() for record in records[:1000]))
    wanted = [columns.get(name, name) for name in (task.input_column, task.target_column)]
    for column in wanted:
        if column not in found:
            raise UsageError(
                f"{source}: missing column '{column}' (found: {', '.join(sorted(map(str, found))) or 'none'}); "
                f"the {task.name} task needs '{task.input_column}' and '{task.target_column}' (--columns "
                f"{task.input_column}=YOURS,{task.target_column}=YOURS maps other names)"
            )
    rows = [{"input": record.get(wanted[0]), "target": record.get(wanted[1])} for record in records]
    return rows, source


def name_integer_labels(rows: list[dict], label_names: list[str] | None, source: str) -> list[dict]:
    """Integer labels (0..n-1, as most labelled sets ship) replaced by their names from ``label_names``.

    Without names, labels that are all integers are kept (as their digits) with a warning: the model would
    learn to write numbers.
    """

    def as_index(value):
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value.strip())
        return None

    indices = [as_index(row["target"]) for row in rows if row["target"] is not None]
    numeric = bool(indices) and all(index is not None for index in indices)
    if not label_names:
        if numeric:
            log.warning(
                "%s: every label is a number; the model will learn to write numbers (pass --label_names "
                "a,b,c or a file of names, one a line, to train on the names)",
                source,
            )
        return rows
    if not numeric:
        return rows  # the labels are names already
    for row in rows:
        index = as_index(row["target"])
        if index is not None:
            if not 0 <= index < len(label_names):
                raise UsageError(f"{source}: label {index} has no name (--label_names gives {len(label_names)})")
            row["target"] = label_names[index]
    return rows


# --------------------------------------------------------------------------- cleaning
_HEADER_LINE = re.compile(r"^[A-Za-z][^\s:]*:(\s|$)")
_KNOWN_HEADERS = re.compile(r"^(From|Subject|Newsgroups|Organization|Lines|Message-ID|Path|Date):", re.M)
# The same markers scikit-learn's fetch_20newsgroups(remove=("quotes",)) drops.
_QUOTE_LINE = re.compile(r"(writes in|writes:|wrote:|says:|said:|^In article|^Quoted from|^\||^>)")


def has_header_block(text: str) -> bool:
    """True when the message starts with an e-mail header block (``Key: value`` lines, then a blank line)."""
    head, blank, _ = text.partition("\n\n")
    if not blank or not head.strip():
        return False
    lines = head.split("\n")
    if not all(_HEADER_LINE.match(line) or line[:1] in (" ", "\t") for line in lines):
        return False
    return bool(_KNOWN_HEADERS.search(head))


def strip_newsgroup_message(text: str) -> str:
    """Remove headers, the signature footer and quoted replies, as scikit-learn's 20 Newsgroups loader does.

    In its order: header block, then footer, then quote lines (the footer is found before quotes are removed;
    the other order keeps ~250 more messages non-empty than the benchmark split has: 11,290 / 7,507 train / test
    instead of 11,014 / 7,317). Only a message that starts with a real header block is changed: already-clean
    text passes unchanged.
    """
    if not has_header_block(text):
        return text
    return strip_quote_lines(strip_footer(text.partition("\n\n")[2]))


def strip_footer(body: str) -> str:
    """Cut at the last blank or dashes-only line (scikit-learn's signature rule); unchanged if there is none."""
    lines = body.strip().split("\n")
    for line_number in range(len(lines) - 1, -1, -1):
        if lines[line_number].strip().strip("-") == "":
            break
    return "\n".join(lines[:line_number]) if line_number > 0 else body


def strip_quote_lines(body: str) -> str:
    return "\n".join(line for line in body.split("\n") if not _QUOTE_LINE.search(line))


def _as_text(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value if isinstance(value, str) else str(value)


def _drop_empty(rows: list[dict], source: str) -> list[dict]:
    kept, dropped = [], Counter()
    for row in rows:
        if not row["input"] or not row["input"].strip():
            dropped["empty or missing input"] += 1
        elif not row["target"] or not row["target"].strip():
            dropped["empty or missing target"] += 1
        else:
            kept.append(row)
    for reason, count in dropped.items():
        log.warning("%s: dropped %d of %d rows with %s", source, count, len(rows), reason)
    if not kept:
        raise UsageError(f"{source}: no usable rows left after cleaning ({len(rows)} read)")
    return kept


def clean_classification(rows: list[dict], source: str) -> list[dict]:
    """Normalise line ends, strip newsgroup headers/footers/quotes, tidy labels, drop empty rows."""
    cleaned = []
    for row in rows:
        text, label = _as_text(row["input"]), _as_text(row["target"])
        if text is not None:
            text = strip_newsgroup_message(text.replace("\r\n", "\n").replace("\r", "\n"))
        cleaned.append({"input": text, "target": label.strip() if label is not None else None})
    return _drop_empty(cleaned, source)


def clean_summarization(rows: list[dict], source: str) -> list[dict]:
    """Normalise line ends and surrounding space; drop rows with no dialogue or summary."""
    cleaned = []
    for row in rows:
        dialogue, summary = _as_text(row["input"]), _as_text(row["target"])
        cleaned.append(
            {
                "input": dialogue.replace("\r\n", "\n").strip() if dialogue is not None else None,
                "target": summary.replace("\r\n", "\n").strip() if summary is not None else None,
            }
        )
    return _drop_empty(cleaned, source)


def canonical_labels(rows: list[dict], source: str) -> list[str]:
    """Merge labels that differ only in case (the most frequent spelling wins); return the sorted label set."""
    spellings: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        spellings[row["target"].lower()][row["target"]] += 1
    canonical = {key: counts.most_common(1)[0][0] for key, counts in spellings.items()}
    merged = sum(len(counts) - 1 for counts in spellings.values())
    if merged:
        log.warning("%s: merged %d label spellings that differ only in case", source, merged)
    for row in rows:
        row["target"] = canonical[row["target"].lower()]
    return sorted(set(canonical.values()))


def map_to_known_labels(rows: list[dict], label_names: list[str], source: str) -> None:
    """Match evaluation labels to the training label set (case-insensitively); unknown labels are an error."""
    known = {name.lower(): name for name in label_names}
    unknown = Counter(row["target"] for row in rows if row["target"].lower() not in known)
    if unknown:
        listed = ", ".join(f"'{label}' ({count} rows)" for label, count in unknown.most_common(5))
        raise UsageError(f"{source}: labels not among the {len(label_names)} training labels: {listed}")
    for row in rows:
        row["target"] = known[row["target"].lower()]


# --------------------------------------------------------------------------- sampling
def stratified_sample(rows: list[dict], fraction: float, seed: int) -> list[dict]:
    """A fixed-seed sample of ``fraction`` of the rows, the same fraction of each label (at least one each)."""
    if not 0 < fraction <= 1:
        raise UsageError(f"--train_sample_fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return list(rows)
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        by_label[row["target"]].append(index)
    rng = random.Random(seed)
    chosen = []
    for label in sorted(by_label):
        indices = by_label[label]
        count = max(1, round(fraction * len(indices)))
        chosen.extend(rng.sample(indices, count))
    chosen.sort()  # keep the file's order; the trainer shuffles
    return [rows[index] for index in chosen]
