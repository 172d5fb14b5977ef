"""Bad input, fed to the real scripts: one clear line naming the problem, non-zero exit, no traceback."""

import json

import pytest
from conftest import newsgroup_rows, run_script, write_jsonl


def _fails(result, *needles):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, last
    return last


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "malformed.jsonl").write_text(json.dumps({"text": "a", "label": "b"}) + "\n{oops\n")
    write_jsonl(tmp_path / "wrong_columns.jsonl", [{"body": "x", "topic": "y"}])
    write_jsonl(tmp_path / "empty_after_cleaning.jsonl", [{"text": "  ", "label": "a"}, {"text": None, "label": "b"}])
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9", "label": "x"}\n')
    (tmp_path / "notes.txt").write_text("hello")
    write_jsonl(tmp_path / "one_label.jsonl", [{"text": "x", "label": "a"}])
    return tmp_path


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--train_file", "missing.jsonl"], ["missing.jsonl: no such file"]),
        (["--train_file", "notes.txt"], ["notes.txt: unsupported file type"]),
        (["--train_file", "malformed.jsonl"], ["malformed.jsonl:2: malformed JSON"]),
        (["--train_file", "latin1.jsonl"], ["latin1.jsonl:1: not valid UTF-8"]),
        (["--train_file", "wrong_columns.jsonl"], ["missing column 'text'", "found: body, topic"]),
        (["--train_file", "empty_after_cleaning.jsonl"], ["no usable rows left after cleaning"]),
        (["--train_file", "one_label.jsonl"], ["at least two distinct labels"]),
        (["--train_sample_fraction", "1.5"], ["--train_sample_fraction", "(0, 1]"]),
        (["--train_sample_fraction", "0"], ["--train_sample_fraction"]),
        (["--learning_rate", "-1"], ["--learning_rate", "must be > 0"]),
        (["--dropout", "1.2"], ["--dropout"]),
        (["--lora_r", "0"], ["--lora_r"]),
        (["--optim", "nonsense"], ["--optim", "unknown optimizer 'nonsense'", "paged_adamw_32bit"]),
        (["--recipe", "turbo"], ["--recipe turbo: no such recipe", "fast, original, small-model"]),
        (["--no_such_flag"], ["unrecognized arguments: --no_such_flag"]),
    ],
)
def test_training_input_errors(bad_files, data_dir, args, needles):
    base = ["--pretrained_ckpt", "/nonexistent/model", "--train_file", data_dir / "news_train.jsonl"]
    result = run_script("zephyr_classification.py", *base, *args, cwd=bad_files, check=False)
    _fails(result, *needles)
    assert not (bad_files / "experiments").exists()


def test_unknown_model_path(data_dir, tmp_path):
    result = run_script(
        "zephyr_classification.py",
        "--pretrained_ckpt",
        "/nonexistent/model",
        "--train_file",
        data_dir / "news_train.jsonl",
        cwd=tmp_path,
        check=False,
    )
    _fails(result, "--pretrained_ckpt /nonexistent/model")
    result = run_script(
        "zephyr_classification.py",
        "--pretrained_ckpt",
        tmp_path,
        "--train_file",
        data_dir / "news_train.jsonl",
        cwd=tmp_path,
        check=False,
    )
    _fails(result, "no config.json")


def test_max_seq_length_too_small(tiny_model, data_dir, tmp_path):
    result = run_script(
        "zephyr_summarization.py",
        "--pretrained_ckpt",
        tiny_model,
        "--train_file",
        data_dir / "dialogues_train.jsonl",
        "--max_seq_length",
        6,
        cwd=tmp_path,
        check=False,
    )
    _fails(result, "--max_seq_length 6 is too small")
    assert not (tmp_path / "experiments").exists()


def test_existing_run_folder_is_not_touched(tiny_model, data_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "train_metrics.json").write_text("{}")
    result = run_script(
        "zephyr_classification.py",
        "--pretrained_ckpt",
        tiny_model,
        "--train_file",
        data_dir / "news_train.jsonl",
        "--experiment_dir",
        run_dir,
        cwd=tmp_path,
        check=False,
    )
    _fails(result, "already holds a finished run", "--overwrite")
    assert [p.name for p in run_dir.iterdir()] == ["train_metrics.json"]


def test_unsupported_gguf_architecture(data_dir, tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "madeuparch")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = run_script(
        "zephyr_classification.py",
        "--pretrained_ckpt",
        path,
        "--train_file",
        data_dir / "news_train.jsonl",
        cwd=tmp_path,
        check=False,
    )
    _fails(result, "odd.gguf: cannot load this GGUF file")


@pytest.mark.parametrize(
    "model, needles",
    [
        ("notes.gguf", ["notes.gguf: not a GGUF file"]),
        ("cut.gguf", ["cut.gguf: cannot load this GGUF file", "cut off"]),
        ("embedded:smollm3", ["--pretrained_ckpt embedded:smollm3: no such embedded model", "smollm2-135m-instruct"]),
    ],
)
def test_model_files_that_are_not_models(model, needles, data_dir, tmp_path):
    (tmp_path / "notes.gguf").write_text("these are notes, not weights")
    # a GGUF header (magic, version 3, no tensors, 5 metadata entries) and the file ends before the first entry
    header = b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (5).to_bytes(8, "little")
    (tmp_path / "cut.gguf").write_bytes(header)
    result = run_script(
        "zephyr_classification.py",
        "--pretrained_ckpt",
        model,
        "--train_file",
        data_dir / "news_train.jsonl",
        cwd=tmp_path,
        check=False,
    )
    _fails(result, *needles)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model, data_dir):
    work = tmp_path_factory.mktemp("finished")
    run_script(
        "zephyr_classification.py",
        "--pretrained_ckpt",
        tiny_model,
        "--train_file",
        data_dir / "news_train.jsonl",
        "--max_steps",
        1,
        "--experiment_dir",
        "run",
        cwd=work,
    )
    return work / "run"


def test_inference_input_errors(finished_run, data_dir, tmp_path):
    def infer(script, *args):
        return run_script(script, *args, cwd=tmp_path, check=False)

    _fails(infer("zephyr_classification_inference.py", "--experiment_dir", tmp_path), "run_config.json")
    _fails(infer("zephyr_classification_inference.py", "--experiment_dir", tmp_path / "nope"), "no such folder")
    _fails(
        infer("zephyr_summarization_inference.py", "--experiment_dir", finished_run),
        "is a classification run, not a summarization run",
    )
    _fails(infer("zephyr_classification_inference.py", "--experiment_dir", finished_run, "--limit", "0"), "--limit")
    _fails(infer("zephyr_classification_inference.py", "--experiment_dir", finished_run, "--split", "dev"), "--split")
    write_jsonl(tmp_path / "cols.jsonl", [{"dialogue": "x", "summary": "y"}])
    _fails(
        infer(
            "zephyr_classification_inference.py",
            "--experiment_dir",
            finished_run,
            "--test_file",
            tmp_path / "cols.jsonl",
        ),
        "missing column 'text'",
    )
    rows = newsgroup_rows(3, 9) + [{"text": "a message", "label": "misc.forsale"}]
    write_jsonl(tmp_path / "new_label.jsonl", rows)
    _fails(
        infer(
            "zephyr_classification_inference.py",
            "--experiment_dir",
            finished_run,
            "--test_file",
            tmp_path / "new_label.jsonl",
        ),
        "'misc.forsale' (1 rows)",
        "not among the 4 training labels",
    )
    assert not (finished_run / "metrics").exists()


def test_unfinished_run_is_refused(finished_run, tmp_path):
    import shutil

    copy = tmp_path / "half"
    shutil.copytree(finished_run, copy)
    shutil.rmtree(copy / "adapter")
    result = run_script("zephyr_classification_inference.py", "--experiment_dir", copy, cwd=tmp_path, check=False)
    _fails(result, "no trained adapter")


def test_output_dir_that_is_a_file(finished_run, data_dir, tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    result = run_script(
        "zephyr_classification_inference.py",
        "--experiment_dir",
        finished_run,
        "--test_file",
        data_dir / "news_test.jsonl",
        "--output_dir",
        tmp_path / "taken" / "out",
        cwd=tmp_path,
        check=False,
    )
    _fails(result, "--output_dir", "is a file, not a folder")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--select_on", "accuracy", "--validation_fraction", "0.25"], "--select_on is not supported under FSDP"),
        (["--compile_layers"], "--compile_layers is not supported under FSDP"),
    ],
)
def test_what_fsdp_cannot_run_is_refused_before_any_work(tiny_model, data_dir, tmp_path, monkeypatch, flags, needle):
    """Under accelerate's FSDP launch (ACCELERATE_USE_FSDP), a combination a sharded model cannot run stops with
    one line, before the run folder exists."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    args = ["--pretrained_ckpt", tiny_model, "--train_file", data_dir / "news_train.jsonl", "--max_steps", 1]
    result = run_script("zephyr_classification.py", *args, *flags, "--experiment_dir", "run", cwd=tmp_path, check=False)
    _fails(result, needle)
    assert not (tmp_path / "run").exists()
