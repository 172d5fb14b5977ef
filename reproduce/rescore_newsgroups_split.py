"""Re-score 20 Newsgroups predictions made before the stripping fix on the benchmark split (11,014 / 7,317).

Until 2026-11-29 the loader removed quote lines before looking for the signature footer; scikit-learn
(and the published TF-IDF + LinearSVC reference, 72.1%) looks for the footer first, which empties 190
more test messages. This maps each prediction of an old run (7,507 test rows) to its raw message and
scores the rows the benchmark split keeps: all of them, and only those whose stripped text (so whose
prompt) is the same both ways. No model runs; the numbers are the old predictions, re-counted.

Usage: python reproduce/rescore_newsgroups_split.py RUN_METRICS_DIR RAW_TEST_FILE [--out FILE]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qlora_kit import data as data_lib  # noqa: E402
from qlora_kit.metrics import classification_metrics  # noqa: E402


def strip_quotes_before_footer(text: str) -> str:
    """The loader's stripping before the fix (quote lines first, then the footer)."""
    if not data_lib.has_header_block(text):
        return text
    return data_lib.strip_footer(data_lib.strip_quote_lines(text.partition("\n\n")[2]))


def main(args) -> None:
    raw = data_lib.read_records(args.raw_test_file)
    texts = [row["text"].replace("\r\n", "\n").replace("\r", "\n") for row in raw]
    old = [strip_quotes_before_footer(text) for text in texts]
    new = [data_lib.strip_newsgroup_message(text) for text in texts]
    old_kept = [i for i, text in enumerate(old) if text.strip()]
    new_kept = [i for i, text in enumerate(new) if text.strip()]
    folder = Path(args.metrics_dir)
    path = (
        folder / "predictions.jsonl.gz" if (folder / "predictions.jsonl.gz").is_file() else folder / "predictions.jsonl"
    )
    predictions = {record["id"]: record for record in data_lib.read_records(path)}
    if len(predictions) != len(old_kept):
        raise SystemExit(f"{path}: {len(predictions)} predictions, but the old stripping keeps {len(old_kept)} rows")
    by_raw = {raw_index: predictions[i] for i, raw_index in enumerate(old_kept)}
    for raw_index, record in by_raw.items():
        if record["reference"] != raw[raw_index]["label"].strip():
            raise SystemExit(f"{path}: id {record['id']} is not raw row {raw_index} (labels differ)")
    missing = [i for i in new_kept if i not in by_raw]
    if missing:
        raise SystemExit(f"{len(missing)} rows of the benchmark split have no prediction")
    labels = sorted({row["label"].strip() for row in raw})
    same = [i for i in new_kept if old[i] == new[i]]
    result = {
        "source": str(path),
        "rows_before_fix": len(old_kept),
        "benchmark_split_rows": len(new_kept),
        "rows_with_the_same_prompt": len(same),
    }
    for name, rows in (("benchmark_split", new_kept), ("same_prompt_only", same)):
        scores = classification_metrics(
            [by_raw[i]["reference"] for i in rows], [by_raw[i]["parsed"] for i in rows], labels
        )
        result[name] = {key: scores[key] for key in ("accuracy", "macro_f1", "invalid_rate")} | {"n": len(rows)}
        print(
            f"{name}: n={len(rows)} accuracy {100 * scores['accuracy']:.2f}% macro-F1 "
            f"{100 * scores['macro_f1']:.2f} invalid {scores['invalid_rate']:.4%}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics_dir")
    parser.add_argument("raw_test_file")
    parser.add_argument("--out")
    main(parser.parse_args())
