"""Interrupted training: a SIGTERM saves a checkpoint; --resume ends with the same adapter as an uninterrupted run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_script
from safetensors.torch import load_file


def _train(tiny_model, data_dir, cwd, *extra, check=True):
    return run_script(
        "zephyr_classification.py",
        "--pretrained_ckpt",
        tiny_model,
        "--train_file",
        data_dir / "news_train.jsonl",
        "--max_steps",
        6,
        "--save_steps",
        2,
        "--batch_size",
        2,
        "--grad_accum",
        2,
        "--logging_steps",
        1,
        *extra,
        cwd=cwd,
        check=check,
    )


@pytest.mark.parametrize("variant", [[], ["--full_tune"]], ids=["q,v", "full_tune"])
def test_resume_gives_the_same_adapter(tiny_model, data_dir, tmp_path, variant):
    _train(tiny_model, data_dir, tmp_path, "--experiment_dir", "whole", *variant)
    # The same run as if killed during step 5: checkpoint-4 is its newest complete checkpoint (the two
    # newest are kept, so checkpoint-2 is gone).
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    for name in ("adapter", "train_metrics.json", "checkpoints/checkpoint-6"):
        path = tmp_path / "cut" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    (tmp_path / "cut" / "checkpoints" / "checkpoint-6").mkdir()  # an incomplete save is ignored
    refused = _train(tiny_model, data_dir, tmp_path, "--experiment_dir", "cut", *variant, check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed_run = _train(tiny_model, data_dir, tmp_path, "--experiment_dir", "cut", "--resume", *variant)
    assert "resuming from cut/checkpoints/checkpoint-4" in resumed_run.stderr
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:  # same precision, data order, optimizer and RNG state: the same numbers
        assert resumed[key].dtype == whole[key].dtype, key
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=1e-6)
    first = json.loads((tmp_path / "whole" / "train_metrics.json").read_text())
    again = json.loads((tmp_path / "cut" / "train_metrics.json").read_text())
    assert again["final_loss"] == pytest.approx(first["final_loss"], rel=1e-6)
    # the resumed command's speed counts only the tokens it trained itself (steps 5 and 6)
    state = json.loads((tmp_path / "cut" / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert again["resumed_from_step"] == 4 and first["resumed_from_step"] is None
    assert again["trained_tokens"] == first["trained_tokens"] > state["num_input_tokens_seen"] > 0
    assert again["tokens_per_second"] * again["train_runtime_s"] == pytest.approx(
        again["trained_tokens"] - state["num_input_tokens_seen"]
    )
    finished = _train(tiny_model, data_dir, tmp_path, "--experiment_dir", "cut", "--resume", *variant, check=False)
    assert finished.returncode == 2 and "nothing to resume" in finished.stderr


def test_same_seed_same_adapter_with_full_tune(tiny_model, data_dir, tmp_path):
    """The adapter of --full_tune is built before the trainer seeds the RNG: it is seeded for it."""
    for name in ("a", "b"):
        _train(tiny_model, data_dir, tmp_path, "--experiment_dir", name, "--full_tune", "--max_steps", 1)
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_damaged_checkpoint_gets_a_clear_message(tiny_model, data_dir, tmp_path):
    _train(tiny_model, data_dir, tmp_path, "--experiment_dir", "run")
    (tmp_path / "run" / "train_metrics.json").unlink()
    newest = tmp_path / "run" / "checkpoints" / "checkpoint-6"
    (newest / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    result = _train(tiny_model, data_dir, tmp_path, "--experiment_dir", "run", "--resume", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "checkpoint-6: damaged checkpoint" in result.stderr.strip().splitlines()[-1]


def _train_until_sigterm(tiny_model, data_dir, tmp_path, *extra):
    """Start a long run, let it take some steps, send SIGTERM; the process's stderr."""
    command = [sys.executable, str(ROOT / "zephyr_classification.py"), "--pretrained_ckpt", str(tiny_model)]
    command += ["--train_file", str(data_dir / "news_train.jsonl"), "--max_steps", "5000", "--save_steps", "1000"]
    command += ["--batch_size", "2", "--grad_accum", "1", "--experiment_dir", "run", *map(str, extra)]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while not (tmp_path / "run" / "run_config.json").exists() and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(8)  # let it take some steps
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "continue with --resume" in stderr.strip().splitlines()[-1]
    checkpoints = list((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()
    assert not (tmp_path / "run" / "train_metrics.json").exists()
    return stderr


def test_sigterm_saves_a_checkpoint_and_stops(tiny_model, data_dir, tmp_path):
    _train_until_sigterm(tiny_model, data_dir, tmp_path)


def test_a_checkpoint_forced_by_sigterm_is_not_a_candidate_for_selection(tiny_model, data_dir, tmp_path):
    """--select_on scores the checkpoints the run planned; the one a stop signal forces mid-way is a point to
    resume from, so which checkpoint wins does not depend on when the run was interrupted."""
    stderr = _train_until_sigterm(
        tiny_model, data_dir, tmp_path, "--validation_fraction", 0.25, "--select_on", "accuracy"
    )
    assert "not a candidate: not scored on validation" in stderr
    assert not list((tmp_path / "run").glob("metrics_validation_step-*"))
    assert not (tmp_path / "run" / "selection.json").exists()
