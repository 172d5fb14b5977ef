"""Evaluation's element-wise kernels (QLORA_KIT_INFERENCE_KERNELS) on the CPU: the choice read and checked, and
Liger's kernels, asked for where they cannot run, said so once and the model's forwards left as they were."""

import logging

import pytest
import torch

from qlora_kit import inference_kernels
from qlora_kit.errors import UsageError


def test_the_choice_is_auto_unless_the_variable_names_another(monkeypatch):
    monkeypatch.delenv(inference_kernels.VARIABLE, raising=False)
    assert inference_kernels.choice() == "auto"
    for named in ("pytorch", "liger"):
        monkeypatch.setenv(inference_kernels.VARIABLE, named)
        assert inference_kernels.choice() == named
    monkeypatch.setenv(inference_kernels.VARIABLE, "triton")
    with pytest.raises(UsageError, match="QLORA_KIT_INFERENCE_KERNELS=triton: .* one of auto, pytorch, liger"):
        inference_kernels.choice()


@pytest.mark.parametrize(
    "chosen, reason, in_4bit, hidden_size, expected",
    [
        ("auto", None, True, 4096, "liger"),  # the case measured faster: the 7B shape in 4-bit on a GPU
        ("auto", None, True, 576, "pytorch"),  # a small model (SmolLM2-135M measured slower)
        ("auto", None, False, 4096, "pytorch"),  # a 16-bit model: not measured, PyTorch's
        ("auto", "the model is on the cpu", True, 4096, "pytorch"),
        ("liger", None, False, 576, "liger"),  # asked for by name: any model Liger has kernels for
        ("liger", "liger-kernel is not installed", True, 4096, "pytorch"),
        ("pytorch", None, True, 4096, "pytorch"),
    ],
)
def test_which_kernels_run(chosen, reason, in_4bit, hidden_size, expected):
    assert inference_kernels.kernels_for(chosen, reason, in_4bit, hidden_size) == expected


@pytest.mark.parametrize("wrapped", [False, True], ids=["model", "peft model"])
def test_liger_asked_for_on_the_cpu_leaves_the_forwards(tiny_model, monkeypatch, caplog, wrapped):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    if wrapped:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with caplog.at_level(logging.WARNING, logger="qlora_kit.inference_kernels"):
        for quiet in ("pytorch", "auto"):  # neither asks for Liger's: PyTorch's, without a warning
            monkeypatch.setenv(inference_kernels.VARIABLE, quiet)
            assert inference_kernels.apply(model) == "pytorch"
            assert not caplog.records
        monkeypatch.setenv(inference_kernels.VARIABLE, "liger")
        assert inference_kernels.apply(model) == "pytorch"
    assert len(caplog.records) == 1
    assert "QLORA_KIT_INFERENCE_KERNELS=liger: the model is on the cpu" in caplog.text
    base = model.get_base_model() if wrapped else model
    layer = base.model.layers[0]
    for module in (base.model.norm, layer.input_layernorm, layer.mlp):  # no forward patched onto an instance
        assert "forward" not in vars(module)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
