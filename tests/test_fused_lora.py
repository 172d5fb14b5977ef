"""--fused_lora: LoRA layers trained as one autograd function compute peft's loss and gradients."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit import fused_lora, modeling, training
from qlora_kit.errors import UsageError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def _adapted(tiny_model, four_bit: bool, dropout: float = 0.0, **lora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = modeling.load_model(str(tiny_model), load_in_4bit=four_bit)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False, target_modules=TARGETS, **lora
    )
    return get_peft_model(model, config)


def _ids():
    return torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times the fused function ran."""
    calls = []
    apply = fused_lora._LoRALinear.apply

    def counted(*args):
        calls.append(1)
        return apply(*args)

    monkeypatch.setattr(fused_lora._LoRALinear, "apply", counted)
    return calls


def _loss_and_grads(model, ids, checkpointing: bool = False, autocast: bool = False, reentrant: bool = False):
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
    torch.manual_seed(1)  # the same dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def _assert_same(first, second, rtol, atol):
    torch.testing.assert_close(first[0], second[0], rtol=rtol, atol=atol)
    assert first[1].keys() == second[1].keys() and first[1]
    for name in first[1]:
        torch.testing.assert_close(first[1][name], second[1][name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("four_bit", [False, True], ids=["16-bit base", "4-bit base"])
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no dropout", "dropout"])
def test_fused_layers_compute_peft_loss_and_gradients(tiny_model, four_bit, dropout, fused_calls):
    peft_model, fused = _adapted(tiny_model, four_bit, dropout), _adapted(tiny_model, four_bit, dropout)
    layers = fused_lora.fuse_lora(fused)
    assert layers == 2 * 7 + 1  # two decoder layers of 7 adapted projections, and lm_head
    assert fused_lora.fuse_lora(fused) == 0  # once only
    ids = _ids()
    expected = _loss_and_grads(peft_model, ids)
    assert not fused_calls
    _assert_same(_loss_and_grads(fused, ids), expected, rtol=1e-5, atol=1e-6)
    assert len(fused_calls) == layers


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_fused_layers_under_checkpointing(tiny_model, fused_calls, reentrant):
    """Recomputed activations: the fused function runs again in the backward (in the first forward, without
    gradients, when reentrant); peft's results."""
    ids = _ids()
    expected = _loss_and_grads(_adapted(tiny_model, False), ids, checkpointing=True, reentrant=reentrant)
    fused = _adapted(tiny_model, False)
    layers = fused_lora.fuse_lora(fused)
    got = _loss_and_grads(fused, ids, checkpointing=True, reentrant=reentrant)
    _assert_same(got, expected, rtol=1e-5, atol=1e-6)
    assert len(fused_calls) == 2 * (layers - 1) + 1  # decoder layers twice (forward, recomputed), lm_head once


def test_fused_layers_under_autocast(tiny_model, fused_calls):
    """bf16 autocast over fp32 adapters, as on a GPU: the gradients as far from the fp32 ones as peft's are, to
    bf16's noise (the adapter's sum is rounded once into the output where peft rounds three times; over seeds the
    fused total error was 0.6-1.5x peft's)."""
    ids = _ids()
    exact = _loss_and_grads(_adapted(tiny_model, False), ids)[1]
    unfused_bf16 = _loss_and_grads(_adapted(tiny_model, False), ids, autocast=True)[1]
    fused = _adapted(tiny_model, False)
    layers = fused_lora.fuse_lora(fused)
    fused_bf16 = _loss_and_grads(fused, ids, autocast=True)[1]
    assert len(fused_calls) == layers

    def error(grads, name):
        return ((grads[name] - exact[name]).norm() / exact[name].norm()).item()

    errors = {name: (error(fused_bf16, name), error(unfused_bf16, name)) for name in exact}
    assert all(0 < fused < 0.15 for fused, _ in errors.values()), errors
    assert sum(fused for fused, _ in errors.values()) <= 1.6 * sum(unfused for _, unfused in errors.values())


def test_fused_layers_compile(tiny_model):
    """--fused_lora with --compile_layers: the compiled decoder layers trace the fused function, same results."""
    from qlora_kit import sft_trainer

    ids = _ids()
    expected = _loss_and_grads(_adapted(tiny_model, False), ids)
    model = _adapted(tiny_model, False)
    fused_lora.fuse_lora(model)
    sft_trainer.compile_decoder_layers(model)
    _assert_same(_loss_and_grads(model, ids), expected, rtol=1e-4, atol=1e-5)


def test_what_the_fused_function_does_not_compute_runs_peft_forward(tiny_model, fused_calls, caplog):
    ids = _ids()
    model = _adapted(tiny_model, True)
    fused_lora.fuse_lora(model)
    with torch.no_grad():
        model.eval()  # evaluation: peft's forward
        logits = model(input_ids=ids).logits
        assert not fused_calls
        model.train()  # training without gradients (reentrant checkpointing's first forward): fused
        torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)
        assert len(fused_calls) == 15
    fused_calls.clear()
    with model.disable_adapter():
        model(input_ids=ids)
    assert not fused_calls
    # a 4-bit base on the CPU outputs fp32 while trl trains its adapters in bf16: peft's forward, said once
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    fused_lora._warned.clear()
    with caplog.at_level(logging.WARNING, logger="qlora_kit.fused_lora"):
        model(input_ids=ids, labels=ids).loss.backward()
    assert [record.getMessage() for record in caplog.records] == [
        "--fused_lora: LoRA layers with the adapter computes in torch.bfloat16, the layer's output is "
        "torch.float32 train through peft's own forward"
    ]
    assert not fused_calls
    # DoRA is another computation: its layers keep peft's forward, with the same results as unfused
    dora, fused_dora = _adapted(tiny_model, False, use_dora=True), _adapted(tiny_model, False, use_dora=True)
    fused_lora.fuse_lora(fused_dora)
    _assert_same(_loss_and_grads(fused_dora, ids), _loss_and_grads(dora, ids), rtol=0, atol=0)
    assert not fused_calls


def test_a_fused_run_trains_to_the_adapter_of_an_unfused_one(tiny_model, data_dir, tmp_path, fused_calls):
    """The whole training path, every linear layer and lm_head, checkpointing: two steps fused end with the
    adapter of two steps unfused; the run records the setting."""
    from qlora_kit import settings

    adapters = {}
    for fused in (False, True):
        resolved, _ = settings.resolve(
            "classification",
            {
                "pretrained_ckpt": str(tiny_model),
                "train_file": str(data_dir / "news_train.jsonl"),
                "max_steps": 2,
                "save_steps": 2,
                "full_tune": True,
                # 16-bit: trl trains a 4-bit base's adapters in bf16, which on the CPU differs from the fp32 output
                "load_in_4bit": False,
                "dropout": 0.0,
                "fused_lora": fused,
                "experiment_dir": str(tmp_path / f"fused-{fused}"),
            },
        )
        assert training.train("classification", resolved)["global_steps"] == 2
        assert bool(fused_calls) is fused
        run = tmp_path / f"fused-{fused}"
        assert json.loads((run / "run_config.json").read_text())["settings"]["fused_lora"] is fused
        adapters[fused] = load_file(run / "adapter" / "adapter_model.safetensors")
    assert adapters[True].keys() == adapters[False].keys()
    for name in adapters[False]:
        torch.testing.assert_close(adapters[True][name], adapters[False][name], rtol=1e-4, atol=1e-6)


def test_fused_lora_is_refused_under_fsdp():
    from qlora_kit import settings

    resolved, _ = settings.resolve("classification", {"fused_lora": True})
    with pytest.raises(UsageError, match="--fused_lora is not supported under FSDP"):
        training.check_fsdp_combinations(resolved)


@pytest.mark.parametrize("four_bit", [False, True], ids=["16-bit base", "4-bit base"])
def test_fused_layers_over_base_layers_with_a_bias(tmp_path, four_bit):
    """Qwen2's q, k and v projections carry a bias: the fused function adds the adapter to the base output
    with its bias, as peft does."""
    from conftest import newsgroup_rows
    from peft import LoraConfig, get_peft_model
    from tiny_model import build_tiny_architecture

    folder = build_tiny_architecture(tmp_path / "qwen2", [r["text"] for r in newsgroup_rows(50, 0)], "qwen2")

    def adapted():
        torch.manual_seed(0)
        model = modeling.load_model(str(folder), load_in_4bit=four_bit)
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False, target_modules=TARGETS)
        return get_peft_model(model, config)

    expected, fused = adapted(), adapted()
    assert fused_lora.fuse_lora(fused) == 15
    assert fused.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer().bias is not None
    _assert_same(_loss_and_grads(fused, _ids()), _loss_and_grads(expected, _ids()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("four_bit", [False, True], ids=["16-bit base", "4-bit base"])
def test_fused_layers_for_inference_give_peft_logits_and_answers(tiny_model, four_bit, fused_calls, monkeypatch):
    """for_inference: eval calls without gradients add the adapter's product in place; in fp32 the logits are
    peft's and greedy answers the same. Without for_inference, or with gradients, evaluation stays peft's."""
    from qlora_kit import generation

    peft_model, fused = _adapted(tiny_model, four_bit).eval(), _adapted(tiny_model, four_bit).eval()
    layers = fused_lora.fuse_lora(fused)
    ids = _ids()
    with torch.inference_mode():
        expected = peft_model(input_ids=ids).logits
        fused(input_ids=ids)
    assert not fused_calls  # fused for training only: evaluation is peft's
    assert fused_lora.fuse_lora(fused, for_inference=True) == 0  # already routed: now for inference too
    inference_calls = []
    adapted_in_place = fused_lora._adapted_in_place

    def counted(*args):
        inference_calls.append(1)
        return adapted_in_place(*args)

    monkeypatch.setattr(fused_lora, "_adapted_in_place", counted)
    with torch.inference_mode():
        got = fused(input_ids=ids).logits
    assert len(inference_calls) == layers
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    prompts = [list(range(5, 5 + n)) for n in (3, 9, 6)]
    settings = dict(max_new_tokens=6, stop_ids=[-1], progress=False)
    answers = generation.generate(fused, _Pad, prompts, **settings).outputs
    assert answers == generation.generate(peft_model, _Pad, prompts, **settings).outputs
    inference_calls.clear()
    fused(input_ids=ids).logits.sum().backward()  # with gradients: peft's forward
    assert not inference_calls
    assert fused_lora.fuse_lora(fused) == 0  # without for_inference: evaluation back through peft's layers
    with torch.inference_mode():
        torch.testing.assert_close(fused(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert not inference_calls


class _Pad:  # the engine needs only the pad id
    pad_token_id = 0


def test_evaluation_adds_the_adapter_in_place_on_a_gpu_and_through_peft_elsewhere(monkeypatch):
    monkeypatch.delenv("QLORA_KIT_ADAPTER_PRODUCT", raising=False)
    assert fused_lora.inference_product("cuda") == "in_place"
    assert fused_lora.inference_product("cpu") == fused_lora.inference_product("mps") == "peft"
    # a 16-bit base is merged on a GPU, unless --no-merge_adapter; --merge_adapter merges anywhere
    assert fused_lora.inference_product("cuda", base_in_4bit=False) == "merged"
    assert fused_lora.inference_product("cuda", base_in_4bit=False, merge_adapter=False) == "in_place"
    assert fused_lora.inference_product("cpu", base_in_4bit=False) == "peft"
    assert fused_lora.inference_product("cpu", merge_adapter=True) == "merged"
    monkeypatch.setenv("QLORA_KIT_ADAPTER_PRODUCT", "merged")
    assert fused_lora.inference_product("cpu") == "merged"
    assert fused_lora.inference_product("cuda", base_in_4bit=False, merge_adapter=False) == "in_place"
    monkeypatch.setenv("QLORA_KIT_ADAPTER_PRODUCT", "in_place")
    assert fused_lora.inference_product("cuda", base_in_4bit=False) == "in_place"
    assert fused_lora.inference_product("cuda", merge_adapter=True) == "merged"
    monkeypatch.setenv("QLORA_KIT_ADAPTER_PRODUCT", "peft")
    assert fused_lora.inference_product("cuda") == "peft"
    monkeypatch.setenv("QLORA_KIT_ADAPTER_PRODUCT", "in_place")
    assert fused_lora.inference_product("cpu") == "in_place"
    monkeypatch.setenv("QLORA_KIT_ADAPTER_PRODUCT", "fused")
    with pytest.raises(UsageError, match="QLORA_KIT_ADAPTER_PRODUCT=fused: leave it unset, or set it to one of"):
        fused_lora.inference_product("cuda")


def _step_counting_casts(model, ids, micro_batches: int = 1, checkpointing: str = ""):
    """Loss and gradients of ``micro_batches`` forwards and backwards under bf16 autocast (gradients summed, as
    gradient accumulation does), and how many casts (aten ``_to_copy``) the step ran."""
    from torch.utils._python_dispatch import TorchDispatchMode

    casts = []

    class Counted(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith("_to_copy"):
                casts.append(func)
            return func(*args, **(kwargs or {}))

    model.train()
    if checkpointing:
        reentrant = checkpointing == "reentrant"
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
    torch.manual_seed(1)
    with Counted():
        for _ in range(micro_batches):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
    return (loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}), len(casts)


@pytest.mark.parametrize(
    "micro_batches, checkpointing",
    [(1, ""), (2, ""), (1, "non-reentrant"), (1, "reentrant")],
    ids=["one", "accumulated", "non-reentrant checkpointing", "reentrant checkpointing"],
)
def test_adapter_weights_cast_together_give_the_same_loss_and_gradients(tiny_model, micro_batches, checkpointing):
    """Under bf16 autocast over fp32 adapters each fused layer's two weights are cast in the forward and their
    gradients back in the backward; cast together once per forward instead: the same values to the bit, with two
    casts in all where there were four a layer."""
    ids = _ids()
    results = {}
    for together in (False, True):
        model = _adapted(tiny_model, False, dropout=0.1)
        layers = fused_lora.fuse_lora(model)
        if not together:
            for module in model.modules():
                if hasattr(module, "_adapter_casts"):
                    module._adapter_casts = None
        results[together] = _step_counting_casts(model, ids, micro_batches, checkpointing)
    _assert_same(results[True][0], results[False][0], rtol=0, atol=0)
    fewer = results[False][1] - results[True][1]
    decoder_layers, in_decoder_layers = 2, layers - 1  # the tiny model's, and their adapted layers (lm_head apart)
    if checkpointing == "reentrant":
        # its forward without gradients casts each layer's weights as before; lm_head's forward casts them all, which
        # the recompute then uses, and each checkpointed layer's backward (and lm_head's) casts its gradients back
        before = 2 * in_decoder_layers + 2 * layers  # the recompute's casts and the gradients', a layer each
        assert fewer == before + 2 - (1 + decoder_layers + 1)
    else:
        recomputed = 2 * in_decoder_layers if checkpointing else 0  # non-reentrant: recomputed with the same casts
        assert fewer == micro_batches * (4 * layers + recomputed - 2)


def test_tensors_cast_together_leave_an_unused_ones_gradient_none():
    """An output nobody used gets no gradient (an optimizer then skips its tensor, as without the cast)."""
    used, unused = torch.randn(3, 2, requires_grad=True), torch.randn(5, requires_grad=True)
    cast_used, cast_unused = fused_lora._CastTogether.apply(torch.bfloat16, used, unused)
    assert cast_used.dtype == cast_unused.dtype == torch.bfloat16 and cast_unused.shape == (5,)
    torch.testing.assert_close(cast_used, used.detach().to(torch.bfloat16), rtol=0, atol=0)
    (cast_used.float() * 3).sum().backward()
    assert unused.grad is None and used.grad.dtype == torch.float32
    torch.testing.assert_close(used.grad, torch.full((3, 2), 3.0))


@pytest.mark.parametrize("why", ["too large", "data parallel"])
def test_adapters_cast_a_layer_each_when_too_large_or_data_parallel(tiny_model, monkeypatch, why):
    """Above the size bound (a 7B's rank-64 adapters) the flat copy is not made, nor under data parallel (DDP waits
    for each weight's gradient): each layer casts its own."""
    ids = _ids()
    counts = {}
    for per_layer in (False, True):
        if per_layer and why == "too large":
            monkeypatch.setattr(fused_lora, "CAST_TOGETHER_MAX_ELEMENTS", 1)
        elif per_layer:
            monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
            monkeypatch.setattr(torch.distributed, "get_world_size", lambda *args: 2)
        model = _adapted(tiny_model, False)
        layers = fused_lora.fuse_lora(model)
        counts[per_layer] = _step_counting_casts(model, ids)
    _assert_same(counts[True][0], counts[False][0], rtol=0, atol=0)
    assert counts[True][1] - counts[False][1] == 4 * layers - 2
