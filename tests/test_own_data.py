"""Bring your own data: the files users really have, with their own column names and integer labels."""

import csv
import gzip
import json

import pytest
from conftest import newsgroup_rows, run_script, write_jsonl

from qlora_kit import data
from qlora_kit.errors import UsageError
from qlora_kit.tasks import TASKS

NEWS = TASKS["classification"]
SAMSUM = TASKS["summarization"]
ROWS = [
    {"text": 'Héllo, wörld\n"quoted"\tand a tab', "label": "sci.space"},
    {"text": "engine, car", "label": "rec.autos"},
]


def _write_delimited(path, rows, delimiter, bom=False, opener=open):
    with opener(path, "wt", encoding="utf-8-sig" if bom else "utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize(
    "name, write",
    [
        ("bom.csv", lambda p: _write_delimited(p, ROWS, ",", bom=True)),
        ("plain.csv.gz", lambda p: _write_delimited(p, ROWS, ",", opener=gzip.open)),
        ("quoted.tsv", lambda p: _write_delimited(p, ROWS, "\t")),
        ("quoted.tsv.gz", lambda p: _write_delimited(p, ROWS, "\t", bom=True, opener=gzip.open)),
        ("array.json", lambda p: p.write_text(json.dumps(ROWS, ensure_ascii=False, indent=2), encoding="utf-8")),
        ("lines.json", lambda p: write_jsonl(p, ROWS)),
        ("array.json.gz", lambda p: p.write_bytes(gzip.compress(json.dumps(ROWS).encode()))),
    ],
)
def test_every_format_reads_the_same_rows(tmp_path, name, write):
    path = tmp_path / name
    write(path)
    rows, source = data.load_rows(NEWS, file=str(path), dataset="", split="train")
    assert rows == [{"input": r["text"], "target": r["label"]} for r in ROWS] and source == str(path)


def test_a_saved_dataset_folder_with_class_labels(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"sentence": Value("string"), "category": ClassLabel(names=["rec.autos", "sci.space"])})
    train = Dataset.from_dict({"sentence": ["orbit", "engine", "moon"], "category": [1, 0, 1]}, features=features)
    DatasetDict({"train": train, "test": train.select([0])}).save_to_disk(str(tmp_path / "both"))
    train.save_to_disk(str(tmp_path / "one"))
    columns = {"text": "sentence", "label": "category"}
    rows, _ = NEWS.load_rows(file=str(tmp_path / "both"), dataset="", split="train", columns=columns)
    assert [row["target"] for row in rows] == ["sci.space", "rec.autos", "sci.space"]  # ClassLabel names
    assert len(NEWS.load_rows(file=str(tmp_path / "both"), dataset="", split="test", columns=columns)[0]) == 1
    assert len(NEWS.load_rows(file=str(tmp_path / "one"), dataset="", split="test", columns=columns)[0]) == 3
    with pytest.raises(UsageError, match="no 'validation' split in this saved dataset"):
        NEWS.load_rows(file=str(tmp_path / "both"), dataset="", split="validation", columns=columns)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="not one written by datasets' save_to_disk"):
        data.read_records(tmp_path / "empty")


def test_mapped_columns_for_both_tasks(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"dialogue_text": "A: hi\r\nB: yo", "gold_summary": "B greets."}])
    rows, _ = SAMSUM.load_rows(
        file=str(path), dataset="", split="train", columns={"dialogue": "dialogue_text", "summary": "gold_summary"}
    )
    assert rows == [{"input": "A: hi\nB: yo", "target": "B greets."}]
    with pytest.raises(UsageError, match="missing column 'dialogue'.*--columns dialogue=YOURS,summary=YOURS"):
        SAMSUM.load_rows(file=str(path), dataset="", split="train")
    with pytest.raises(UsageError, match="--columns: text is not a column of the summarization task"):
        SAMSUM.load_rows(file=str(path), dataset="", split="train", columns={"text": "dialogue_text"})


def test_integer_labels_take_their_names_or_warn(tmp_path, caplog):
    path = _write_delimited(
        tmp_path / "ints.csv", [{"text": "orbit", "label": "1"}, {"text": "car", "label": "0"}], ","
    )
    rows, _ = NEWS.load_rows(file=str(path), dataset="", split="train", label_names=["rec.autos", "sci.space"])
    assert [row["target"] for row in rows] == ["sci.space", "rec.autos"]
    with caplog.at_level("WARNING"):
        rows, _ = NEWS.load_rows(file=str(path), dataset="", split="train")
    assert [row["target"] for row in rows] == ["1", "0"] and "will learn to write numbers" in caplog.text
    with pytest.raises(UsageError, match="label 1 has no name"):
        NEWS.load_rows(file=str(path), dataset="", split="train", label_names=["only"])
    named = write_jsonl(tmp_path / "named.jsonl", [{"text": "x", "label": "sci.space"}])
    assert (
        NEWS.load_rows(file=str(named), dataset="", split="train", label_names=["a", "b"])[0][0]["target"]
        == "sci.space"
    )  # names stay names


@pytest.mark.parametrize(
    "content, message",
    [
        (b'[{"text": "a", "label": "b"}, 3]', "item 2 of the array is a int"),
        (b'[{"text": "a",', "malformed JSON"),
        (b'text,label\n"unclosed,x\n', "malformed CSV"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, content, message):
    suffix = ".csv" if b"text,label" in content else ".json"
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        data.read_records(path)


def test_a_run_on_mapped_columns_and_integer_labels_evaluates_without_repeating_the_flags(tiny_model, tmp_path):
    names = sorted({row["label"] for row in newsgroup_rows(4, 1)})

    def own(rows):  # the same messages as a user's spreadsheet export: other column names, integer labels
        return [{"sentence": row["text"], "category": str(names.index(row["label"]))} for row in rows]

    _write_delimited(tmp_path / "train.csv", own(newsgroup_rows(48, 1)), ",", bom=True)
    _write_delimited(tmp_path / "test.tsv", own(newsgroup_rows(8, 2)), "\t")
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    run_script(
        "zephyr_classification.py",
        "--pretrained_ckpt",
        tiny_model,
        "--train_file",
        "train.csv",
        "--columns",
        "text=sentence,label=category",
        "--label_names",
        "names.txt",
        "--max_steps",
        1,
        "--no-load_in_4bit",
        "--experiment_dir",
        "run",
        cwd=tmp_path,
    )
    config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert config["label_names"] == names and config["settings"]["columns"] == {"text": "sentence", "label": "category"}
    run_script(
        "zephyr_classification_inference.py",
        "--experiment_dir",
        "run",
        "--test_file",
        "test.tsv",
        "--max_new_tokens",
        4,
        "--decoding",
        "constrained",
        cwd=tmp_path,
    )
    predictions = [json.loads(line) for line in (tmp_path / "run" / "metrics_constrained" / "predictions.jsonl").open()]
    assert len(predictions) == 8 and {p["reference"] for p in predictions} <= set(names)
