"""A fine-tuned run exported as a standalone model: the merged model computes what base + adapter computes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import newsgroup_rows, run_script

from qlora_kit import train_cli


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """SmolLM2's layout: a Llama whose lm_head shares the input embeddings' weight."""
    from test_architectures import _corpus
    from tiny_model import build_tiny_architecture

    return build_tiny_architecture(tmp_path_factory.mktemp("tied"), _corpus(), "llama", tie_word_embeddings=True)


def _logits(model, tokenizer):
    ids = tokenizer(newsgroup_rows(2, 7)[0]["text"][:200], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("full_tune", [False, True], ids=["attention", "all-modules"])
def test_exported_model_equals_base_plus_adapter(
    tiny_model, tied_llama, data_dir, tmp_path, monkeypatch, tied, full_tune
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tied_llama if tied else tiny_model
    monkeypatch.chdir(tmp_path)
    argv = [
        "--pretrained_ckpt",
        str(model),
        "--train_file",
        str(data_dir / "news_train.jsonl"),
        "--max_steps",
        "3",
        "--learning_rate",
        "5e-2",
        "--batch_size",
        "4",
        "--experiment_dir",
        "run",
    ]  # 4-bit, as QLoRA runs
    train_cli.main(
        "classification",
        train_cli.build_parser("classification", "").parse_args(argv + (["--full_tune"] if full_tune else [])),
    )
    run_script(
        "export_model.py", "--experiment_dir", "run", "--output_dir", "exported", "--dtype", "float32", cwd=tmp_path
    )

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "exported")
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), tmp_path / "run" / "adapter"
    )
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    expected = _logits(reference, tokenizer)
    assert (expected - _logits(base, tokenizer)).abs().max() > 1e-3  # the adapter changes the model
    torch.testing.assert_close(_logits(exported, tokenizer), expected, atol=1e-4, rtol=1e-4)  # fp32 merge
    assert "quantization_config" not in json.loads((tmp_path / "exported" / "config.json").read_text())
    info = json.loads((tmp_path / "exported" / "export_info.json").read_text())
    assert info["trained_in_4bit"] is True and "4-bit" in (tmp_path / "exported" / "README.md").read_text()
    assert tokenizer.chat_template  # the chat template travels with the tokenizer


def test_the_export_loads_in_a_fresh_process_without_peft(trained_summarizer, tmp_path):
    run = trained_summarizer
    run_script("export_model.py", "--experiment_dir", run, "--output_dir", "out", cwd=tmp_path)
    code = (
        "import sys; sys.modules['peft'] = None\n"  # any import of peft now fails
        "import torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained('out'); t = AutoTokenizer.from_pretrained('out')\n"
        "print(m.dtype, m(**t('A: hi', return_tensors='pt')).logits.shape[-1])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ), timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0] == "torch.bfloat16"  # the default export type
    again = run_script("export_model.py", "--experiment_dir", run, "--output_dir", "out", cwd=tmp_path, check=False)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr.strip().splitlines()[-1]
    run_script("export_model.py", "--experiment_dir", run, "--output_dir", "out", "--overwrite", cwd=tmp_path)


def test_silenced_library_messages_stay_silent(tiny_model, data_dir, tmp_path):
    """The console shows our lines, progress of training and generation, and results: none of the messages that
    qlora_kit.console silences, and no per-file progress bars of the libraries."""
    from qlora_kit.console import HARMLESS_LOG_MESSAGES, HARMLESS_WARNINGS

    train = run_script(
        "zephyr_classification.py",
        "--pretrained_ckpt",
        tiny_model,
        "--train_file",
        data_dir / "news_train.jsonl",
        "--max_steps",
        1,
        "--full_tune",
        "--experiment_dir",
        "run",
        cwd=tmp_path,
    )
    evaluate = run_script(
        "zephyr_classification_inference.py",
        "--experiment_dir",
        "run",
        "--test_file",
        data_dir / "news_test.jsonl",
        "--limit",
        2,
        "--max_new_tokens",
        2,
        cwd=tmp_path,
    )
    output = train.stdout + train.stderr + evaluate.stdout + evaluate.stderr
    import re

    for _, pattern, _ in HARMLESS_WARNINGS + HARMLESS_LOG_MESSAGES:
        assert not re.search(pattern, output), pattern
    for bar in ("Loading weights", "Truncating train dataset", "Dropping fully masked examples", "Writing model"):
        assert bar not in output
    assert "LoRA on" in output and "generating" in output and "| accuracy |" in output  # what stays
    verbose = run_script(
        "zephyr_classification_inference.py",
        "--experiment_dir",
        "run",
        "--test_file",
        data_dir / "news_test.jsonl",
        "--limit",
        2,
        "--max_new_tokens",
        2,
        "--output_dir",
        "v",
        "--verbose",
        cwd=tmp_path,
    )
    assert "Loading weights" in verbose.stderr  # --verbose shows everything
