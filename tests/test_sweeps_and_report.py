import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


def sweep(script, *args, env=None, cwd=None):
    environment = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    return subprocess.run(
        ["bash", str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=cwd,
        timeout=900,
    )


def test_dry_run_prints_the_grid(tmp_path):
    result = sweep(
        "sample_ablate.sh",
        "--dry-run",
        "--max_steps",
        3,
        "--limit",
        7,
        env={"EXPERIMENTS": str(tmp_path), "NEFTUNE": "5", "FULL_TUNE": "1"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 12  # six fractions, train + evaluate each
    name = "classification_sampleFraction-0.025_epochs-5_rank-8_dropout-0.1_neftune-5_full"
    assert lines[0] == (
        f"python zephyr_classification.py --train_sample_fraction 0.025 --epochs 5 --lora_r 8 "
        f"--dropout 0.1 --neftune 5 --full_tune --experiment_dir {tmp_path}/{name} --max_steps 3"
    )
    assert lines[1] == (
        f"python zephyr_classification_inference.py --experiment_dir {tmp_path}/{name} --overwrite --limit 7"
    )
    assert [line.split("--train_sample_fraction ")[1].split()[0] for line in lines[::2]] == [
        "0.025",
        "0.05",
        "0.1",
        "0.25",
        "0.5",
        "1.0",
    ]
    lora = sweep("run_lora.sh", "--dry-run", env={"EXPERIMENTS": str(tmp_path)})
    assert len(lora.stdout.strip().splitlines()) == 2 * 6 * 3 * 3
    baselines = sweep(
        "baseline_inference.sh",
        "--dry-run",
        "--decoding",
        "constrained",
        env={"BASELINES": str(tmp_path), "STYLES": "seed chat"},
    )
    lines = baselines.stdout.strip().splitlines()
    assert len(lines) == 8
    assert all(("--decoding constrained" in line) == ("classification" in line) for line in lines)


def test_real_sweep_runs_then_skips(tiny_model, data_dir, tmp_path):
    env = {"EXPERIMENTS": str(tmp_path / "exp"), "FRACTIONS": "0.5 1.0", "EPOCHS": "1"}
    args = [
        "--pretrained_ckpt",
        tiny_model,
        "--train_file",
        data_dir / "news_train.jsonl",
        "--test_file",
        data_dir / "news_test.jsonl",
        "--max_steps",
        1,
        "--limit",
        3,
    ]
    first = sweep("sample_ablate.sh", *args, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    runs = sorted(p.name for p in (tmp_path / "exp").iterdir() if p.name != "logs")
    assert len(runs) == 2
    for run in runs:
        assert json.loads((tmp_path / "exp" / run / "metrics" / "metrics.json").read_text())["n"] == 3
        assert (tmp_path / "exp" / "logs" / f"{run}.log").is_file()
    second = sweep("sample_ablate.sh", *args, env=env)
    assert second.returncode == 0
    assert second.stdout.count("[sweep] skip") == 2 and "0 runs to do" in second.stdout


def test_failed_run_is_logged_and_the_sweep_goes_on(tiny_model, data_dir, tmp_path):
    env = {"EXPERIMENTS": str(tmp_path / "exp"), "FRACTIONS": "0.5 2.0", "EPOCHS": "1"}
    result = sweep(
        "sample_ablate.sh",
        "--pretrained_ckpt",
        tiny_model,
        "--train_file",
        data_dir / "news_train.jsonl",
        "--test_file",
        data_dir / "news_test.jsonl",
        "--max_steps",
        1,
        "--limit",
        2,
        env=env,
    )
    assert result.returncode == 1
    assert "1 of 2 runs failed" in result.stdout and "sampleFraction-2.0" in result.stdout
    log = tmp_path / "exp" / "logs" / "classification_sampleFraction-2.0_epochs-1_rank-8_dropout-0.1.log"
    assert "--train_sample_fraction" in log.read_text()
    assert (
        tmp_path / "exp" / "classification_sampleFraction-0.5_epochs-1_rank-8_dropout-0.1" / "metrics" / "metrics.json"
    ).is_file()


def _run_folder(root: Path, name, task, settings, rows_used, metrics, prompt_style="seed"):
    folder = root / name
    (folder / "metrics").mkdir(parents=True)
    (folder / "run_config.json").write_text(
        json.dumps(
            {
                "task": task,
                "prompt_style": prompt_style,
                "data": {"rows": {"used": rows_used}},
                "settings": {"pretrained_ckpt": "m", "epochs": 1, "lora_r": 8, "dropout": 0.1, **settings},
            }
        )
    )
    (folder / "train_metrics.json").write_text(json.dumps({"train_loss": 1.0}))
    if metrics:
        (folder / "metrics" / "metrics.json").write_text(json.dumps(metrics))


def test_report_tables_and_plots(tmp_path):
    from qlora_kit.report import make_report

    exp, base = tmp_path / "exp", tmp_path / "base"
    _run_folder(exp, "a", "classification", {"train_sample_fraction": 0.1}, 100, {"accuracy": 0.5, "macro_f1": 0.25})
    _run_folder(
        exp,
        "a2",
        "classification",
        {"train_sample_fraction": 0.1, "learning_rate": 1e-3},
        100,
        {"accuracy": 0.55, "macro_f1": 0.2},
    )  # same cell as "a": both shown
    _run_folder(
        exp,
        "b",
        "classification",
        {"train_sample_fraction": 0.1, "neftune": 5.0},
        100,
        {"accuracy": 0.6, "macro_f1": 0.5},
    )
    _run_folder(
        exp,
        "c",
        "classification",
        {"train_sample_fraction": 0.05, "full_tune": True},
        50,
        {"accuracy": 0.4, "macro_f1": 0.3},
    )
    _run_folder(exp, "d", "classification", {"train_sample_fraction": 0.05}, 50, None)  # trained, not evaluated
    _run_folder(
        exp,
        "s",
        "summarization",
        {"lora_r": 64},
        10,
        {"rouge1": 40.0, "rouge2": 20.0, "rougeL": 30.0, "rougeLsum": 31.0},
    )
    _run_folder(
        exp / "chat",
        "s",
        "summarization",
        {"lora_r": 64},
        10,
        {"rouge1": 41.0, "rouge2": 21.0, "rougeL": 31.0, "rougeLsum": 32.0},
        "chat",
    )
    (base / "zs").mkdir(parents=True)
    (base / "zs" / "metrics.json").write_text(
        json.dumps(
            {
                "rouge1": 10.0,
                "rouge2": 2.5,
                "rougeL": 8.0,
                "rougeLsum": 9.0,
                "config": {"task": "summarization", "prompt_type": "zero-shot", "prompt_style": "seed"},
            }
        )
    )
    text = make_report(exp, base, tmp_path / "out")
    assert (
        "\n".join(
            [
                "| training samples | fraction | epochs | QLoRA | + NEFTune | + all modules | + NEFTune + all modules |",
                "|---|---|---|---|---|---|---|",
                "| 50 | 0.05 | 1 | — | — | 40.0 (30.0) | — |",
                "| 100 | 0.1 | 1 | 50.0 (25.0) / 55.0 (20.0) | 60.0 (50.0) | — | — |",
            ]
        )
        in text
    )
    assert (
        "\n".join(
            [
                "| method | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum |",
                "|---|---|---|---|---|",
                "| zero-shot (seed) | 10.00 | 2.50 | 8.00 | 9.00 |",
                "| QLoRA r=64 dropout=0.1 epochs=1 | 40.00 | 20.00 | 30.00 | 31.00 |",
                "| QLoRA r=64 dropout=0.1 epochs=1, chat prompt | 41.00 | 21.00 | 31.00 | 32.00 |",
            ]
        )
        in text
    )
    for png in ("accuracy_vs_samples.png", "rouge_by_method.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_lines = (tmp_path / "out" / "runs.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 8 and csv_lines[0].startswith("kind,method,run,task,")


def test_interrupted_runs_resume_and_finished_ones_only_evaluate(tmp_path):
    from qlora_kit.sweep import PlannedRun, commands

    run = PlannedRun("r", "zephyr_classification.py", "zephyr_classification_inference.py", ["--epochs", "1"])
    calls, finished = commands(run, tmp_path, tmp_path / "b", [])
    assert len(calls) == 2 and "--resume" not in calls[0] and "--overwrite" not in calls[0]
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "stray.txt").write_text("")
    assert "--overwrite" in commands(run, tmp_path, tmp_path / "b", [])[0][0]
    (tmp_path / "r" / "run_config.json").write_text("{}")
    assert "--resume" in commands(run, tmp_path, tmp_path / "b", [])[0][0]
    (tmp_path / "r" / "train_metrics.json").write_text("{}")
    calls, finished = commands(run, tmp_path, tmp_path / "b", [])
    assert len(calls) == 1 and "zephyr_classification_inference.py" in calls[0][1]
    assert finished == tmp_path / "r" / "metrics" / "metrics.json"


def test_a_sweep_passes_each_script_only_the_extra_flags_it_takes(tmp_path):
    """The sweep's extra flags go to the scripts that take them: --no-merge_adapter (evaluation only) and
    --decoding to the inference script, --epochs to training, a flag with its value kept together."""
    from qlora_kit.sweep import PlannedRun, commands

    run = PlannedRun("r", "zephyr_classification.py", "zephyr_classification_inference.py", ["--epochs", "1"])
    extra = ["--no-merge_adapter", "--decoding", "constrained", "--learning_rate", "5e-4"]
    train, evaluate = commands(run, tmp_path, tmp_path / "b", extra)[0]
    assert "--no-merge_adapter" not in train and "--decoding" not in train
    assert train[train.index("--learning_rate") + 1] == "5e-4"
    assert "--no-merge_adapter" in evaluate
    assert evaluate[evaluate.index("--decoding") + 1] == "constrained" and "--learning_rate" not in evaluate


def test_choose_checkpoint_by_summed_metrics_then_fewer_invalid_then_earlier():
    from qlora_kit.report import choose_checkpoint

    scores = [
        {"run": "a", "step": 10, "accuracy": 0.70, "invalid_rate": 0.01},
        {"run": "a", "step": 20, "accuracy": 0.72, "invalid_rate": 0.02},
        {"run": "b", "step": 10, "accuracy": 0.72, "invalid_rate": 0.0},
        {"run": "b", "step": 30, "accuracy": 0.72, "invalid_rate": 0.0},
        {"run": "c", "step": 5, "accuracy": None, "invalid_rate": None},
    ]
    assert choose_checkpoint(scores, ["accuracy"]) == scores[2]
    rouge = [
        {"run": "s", "step": 1, "rouge1": 44.0, "rouge2": 19.0},
        {"run": "s", "step": 2, "rouge1": 43.5, "rouge2": 20.0},
    ]
    assert choose_checkpoint(rouge, ["rouge1", "rouge2"])["step"] == 2
    with pytest.raises(ValueError, match="rouge1"):
        choose_checkpoint([scores[4]], ["rouge1"])


def test_report_table_of_checkpoints(tmp_path):
    from qlora_kit.report import checkpoint_scores, make_report

    exp = tmp_path / "exp"
    _run_folder(
        exp,
        "ckpt",
        "classification",
        {"train_sample_fraction": 1.0, "max_seq_length": 1024, "learning_rate": 2e-3, "lr_scheduler": "cosine"},
        40,
        None,
    )
    config = json.loads((exp / "ckpt" / "run_config.json").read_text())
    config.update(effective_batch_size=8, load_in_4bit=False)
    (exp / "ckpt" / "run_config.json").write_text(json.dumps(config))
    for name, accuracy in (
        ("metrics_validation_step-5", 0.7),
        ("metrics_validation_step-10", 0.75),
        ("metrics_step-10_constrained", 0.69),
    ):
        (exp / "ckpt" / name).mkdir()
        (exp / "ckpt" / name / "metrics.json").write_text(
            json.dumps({"n": 4, "accuracy": accuracy, "macro_f1": 0.5, "invalid": 0})
        )
    # 40 rows in batches of 8: 5 steps an epoch (the checkpoints themselves are not kept with results)
    assert [(s["step"], s["epoch"], s["accuracy"]) for s in checkpoint_scores(exp / "ckpt")] == [
        (5, 1.0, 0.7),
        (10, 2.0, 0.75),
    ]
    text = make_report(exp, None, tmp_path / "out")
    assert (
        "\n".join(
            [
                "| run | settings | step | epoch | validation | test |",
                "|---|---|---|---|---|---|",
                "| ckpt | 40 rows, len 1024, 16-bit, r=8, batch 8, lr 0.002, cosine | 5 | 1 | 70.0 (50.0) | — |",
                "| ckpt | 40 rows, len 1024, 16-bit, r=8, batch 8, lr 0.002, cosine | 10 | 2 | 75.0 (50.0) | 69.0 (50.0) "
                "(constrained) |",
            ]
        )
        in text
    )
    assert "| 40 | 1.0 |" not in text  # not an empty row of Table 1


def _fake_run(folder: Path, seed: int, right: int, n: int = 40) -> Path:
    """A classification run folder with a test evaluation: ``right`` of ``n`` answers right."""
    from qlora_kit import tasks

    refs = ["a", "b"] * (n // 2)
    parsed = [ref if i < right else ("b" if ref == "a" else "a") for i, ref in enumerate(refs)]
    (folder / "metrics").mkdir(parents=True)
    settings = {"seed": seed, "lora_r": 8, "epochs": 3, "learning_rate": 1e-3, "experiment_dir": str(folder)}
    (folder / "run_config.json").write_text(
        json.dumps({"task": "classification", "settings": settings, "data": {"rows": {"used": 100}}})
    )
    rows = [{"id": i, "reference": r, "parsed": p} for i, (r, p) in enumerate(zip(refs, parsed))]
    (folder / "metrics" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = tasks.get_task("classification").score(refs, parsed, ["a", "b"])
    (folder / "metrics" / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_report_shows_intervals_seed_repeats_and_a_paired_comparison(tmp_path):
    from qlora_kit.report import make_report

    runs = tmp_path / "runs"
    for seed, right in ((1, 30), (2, 34), (3, 32)):
        _fake_run(runs / f"news-seed{seed}", seed, right)
    text = make_report(runs, None, tmp_path / "report", compare=(runs / "news-seed1", runs / "news-seed2"))
    assert "| 100 | 1.0 | 3 | 75.0 [" in text  # seed 1's accuracy with its interval (another seed's cell beside it)
    # and its macro-F1 with its own
    assert re.search(r"\| 75\.0 \[\d+\.\d, \d+\.\d\] \(\d+\.\d \[\d+\.\d, \d+\.\d\]\)", text)
    assert "| classification | news-seed1 | 1, 2, 3 | accuracy | 80.00 +- 5.00 | 75.00 - 85.00 |" in text
    assert "B minus A: accuracy +10.00 (95% CI" in text and "McNemar: only A right 0, only B right 4" in text
    header = (tmp_path / "report" / "runs.csv").read_text().splitlines()[0]
    assert "accuracy_ci95_low" in header and "accuracy_ci95_high" in header


def test_report_seed_repeats_of_runs_scored_at_their_chosen_checkpoint(tmp_path):
    """A run that chose its checkpoint on validation (selection.json) and was scored on test only there counts
    with that score; a run made before a setting existed groups with later repeats that have it at its default."""
    from qlora_kit.report import make_report
    from qlora_kit.settings import FIELDS

    runs = tmp_path / "runs"
    for seed, right in ((0, 30), (1, 34)):
        run = _fake_run(runs / f"news-seed-{seed}", seed, right)
        (run / "metrics").rename(run / "metrics_step-20_constrained")
        (run / "selection.json").write_text(json.dumps({"best_step": 20, "curve": []}))
    config = json.loads((runs / "news-seed-1" / "run_config.json").read_text())
    config["settings"]["compile_layers"] = FIELDS["compile_layers"].default
    (runs / "news-seed-1" / "run_config.json").write_text(json.dumps(config))
    text = make_report(runs, tmp_path / "no-baselines", tmp_path / "report")
    assert "| classification | news-seed-0 | 0, 1 | accuracy | 80.00 +- 7.07 | 75.00 - 85.00 |" in text
    assert f"`python make_report.py {runs} --out {tmp_path / 'report'}`" in text  # no folder that was not read
    # a setting that differs from its default makes another recipe: no repeats left to aggregate
    config["settings"]["compile_layers"] = not FIELDS["compile_layers"].default
    (runs / "news-seed-1" / "run_config.json").write_text(json.dumps(config))
    assert "Table 4" not in make_report(runs, None, tmp_path / "report")


def test_compare_script_refuses_different_examples(tmp_path):
    _fake_run(tmp_path / "a", 1, 30)
    _fake_run(tmp_path / "b", 1, 30, n=20)
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compare_runs.py"), str(tmp_path / "a"), str(tmp_path / "b")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "not scored on the same examples" in result.stderr
