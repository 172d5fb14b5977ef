"""--compile_layers: each decoder layer compiled with torch.compile trains as the eager model does."""

import json

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit import sft_trainer, training
from qlora_kit.errors import UsageError


def _adapted(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=["q_proj"])
    return get_peft_model(model, config)


def test_compiled_layers_compute_the_same_loss_and_gradients_under_the_same_names(tiny_model):
    eager, compiled = _adapted(tiny_model), _adapted(tiny_model)
    names = list(compiled.state_dict())
    assert sft_trainer.compile_decoder_layers(compiled) == compiled.config.num_hidden_layers
    sft_trainer.compile_decoder_layers(compiled)  # a second call leaves the compiled layers as they are
    assert list(compiled.state_dict()) == names  # checkpoints and adapters keep their keys
    ids = torch.randint(3, compiled.config.vocab_size, (2, 11))
    losses, grads = [], []
    for model in (eager, compiled):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-5)


def test_compiled_layers_keep_gradient_checkpointing(tiny_model):
    """With gradient checkpointing on, a training forward through the compiled layers keeps as many bytes for the
    backward as through the eager ones: the checkpoint encloses each compiled call. (Compiled together with the
    checkpoint inside a layer's forward, as transformers 5.23 checkpoints, the 7B shape kept 51 GB at batch 32
    against 10.7 GB.)"""

    def kept_bytes(checkpointing: bool, compiled: bool) -> int:
        model = _adapted(tiny_model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        if compiled:
            sft_trainer.compile_decoder_layers(model)
        kept = []
        torch.manual_seed(1)
        ids = torch.randint(3, model.config.vocab_size, (2, 64))

        # a checkpoint's own hooks take the tensors saved inside it: only what stays for the backward is seen here
        def keep(tensor):
            kept.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return sum(kept)

    checkpointed = kept_bytes(checkpointing=True, compiled=False)
    assert kept_bytes(checkpointing=False, compiled=False) > 1.5 * checkpointed  # the measure tells them apart
    assert kept_bytes(checkpointing=True, compiled=True) == checkpointed


def test_a_model_without_a_layer_list_is_refused():
    with pytest.raises(UsageError, match="--compile_layers"):
        sft_trainer.compile_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_a_compiled_run_trains_and_chooses_on_validation(tiny_model, data_dir, tmp_path):
    """The whole training path with compiled layers: two steps, the checkpoint scored on validation while
    training (generation runs the layers eagerly), the adapter saved under the eager model's names."""
    from qlora_kit import settings

    runs = {}
    for compiled in (False, True):
        resolved, _ = settings.resolve(
            "classification",
            {
                "pretrained_ckpt": str(tiny_model),
                "train_file": str(data_dir / "news_train.jsonl"),
                "validation_fraction": 0.25,
                "select_on": "accuracy",
                "max_steps": 2,
                "save_steps": 2,
                "load_in_4bit": False,
                "dropout": 0.0,
                "compile_layers": compiled,
                "experiment_dir": str(tmp_path / f"compiled-{compiled}"),
            },
        )
        metrics = training.train("classification", resolved)
        assert metrics["global_steps"] == 2
        run = tmp_path / f"compiled-{compiled}"
        runs[compiled] = load_file(run / "adapter" / "adapter_model.safetensors")
        assert json.loads((run / "selection.json").read_text())["best_step"] == 2
    assert runs[True].keys() == runs[False].keys()
    for name in runs[False]:
        torch.testing.assert_close(runs[True][name], runs[False][name], rtol=1e-3, atol=1e-4)


def test_compiled_layers_do_not_compile_again_for_new_lengths(tiny_model):
    """Dynamic shapes: batches of new widths reuse the compiled layers (a recompile per length would cost minutes
    a step on a 7B model); only a batch without padding (no attention mask) takes a graph of its own."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _adapted(tiny_model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    sft_trainer.compile_decoder_layers(model)
    for width in (9, 13, 16, 23, 30):
        ids = torch.randint(3, model.config.vocab_size, (2, width))
        mask = torch.ones_like(ids)
        mask[0, : width % 3] = 0  # widths 9 and 30: no padding
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_compiled_layers_with_liger_are_refused_on_a_gpu_before_anything_runs(tmp_path, monkeypatch):
    """On a GPU torch.compile fails on Liger's kernels inside a compiled layer: training stops with one line
    naming both flags, before loading anything (no run folder). Where Liger is not used (the CPU, liger-kernel not
    installed): no refusal."""
    from qlora_kit import settings

    resolved, _ = settings.resolve(
        "classification",
        {"recipe": "small-model", "compile_layers": True, "train_file": "unused.jsonl",
         "experiment_dir": str(tmp_path / "run")},
    )  # fmt: skip
    assert resolved.use_liger_kernel  # the small-model recipe turns Liger on
    monkeypatch.setattr(sft_trainer, "liger_kernel_installed", lambda: True)
    training.check_compiled_layers_without_liger(resolved)  # the CPU: nothing refused
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sft_trainer, "liger_kernel_installed", lambda: False)
    training.check_compiled_layers_without_liger(resolved)  # a GPU without liger-kernel: Liger not used either
    monkeypatch.setattr(sft_trainer, "liger_kernel_installed", lambda: True)
    with pytest.raises(UsageError, match="--compile_layers .*--no-use_liger_kernel"):
        training.train("classification", resolved)
    assert not (tmp_path / "run").exists()
    without_liger, _ = settings.resolve("classification", {"recipe": "small-model", "compile_layers": True,
                                                           "use_liger_kernel": False})  # fmt: skip
    training.check_compiled_layers_without_liger(without_liger)
