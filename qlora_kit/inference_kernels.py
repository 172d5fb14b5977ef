"""Fused element-wise kernels for evaluation's forwards, chosen by QLORA_KIT_INFERENCE_KERNELS.

Besides its matrix products, a decoder layer's forward in PyTorch runs several element-wise kernels, each reading
and writing a whole activation: RMSNorm's cast, square, mean, rsqrt and two products (twice a layer); rotary
embedding's halves, negation, two products and a sum, for queries and keys; SiLU and a product in the MLP. By
count, on the 7B shape a 16,384-token prefill group moves about 8 GB a layer so: some 80 ms a group at an H100's
3.35 TB/s, against about 360 ms of matrix products. Liger's Triton kernels do each of the three in one pass.

``auto``, the default, patches them in where they were measured faster: a model in 4-bit, of hidden size at least
``AUTO_MIN_HIDDEN_SIZE``, on a GPU with liger-kernel installed (the Zephyr-7B shape, hidden size 4,096, its whole 20
Newsgroups test set on an H100: 1.16x, 54.2 s against 63.0 s a warm call, the same peak memory). On a small model
they were slower: SmolLM2-135M in 4-bit (hidden size 576) generated for 4,000 prompts at 0.76x PyTorch's speed with
them (one process each, Triton's kernels already compiled), likely because its forwards wait on the host, where a
Triton kernel's launch from Python costs more than PyTorch's. PyTorch's elsewhere, a 16-bit model included (not
measured).
``liger`` patches them into any model Liger has kernels for (a GPU and liger-kernel needed, else a warning and
PyTorch's); ``pytorch`` leaves PyTorch's.
"""

from __future__ import annotations

import logging
import os

from .errors import UsageError

log = logging.getLogger(__name__)

VARIABLE = "QLORA_KIT_INFERENCE_KERNELS"
CHOICES = ("auto", "pytorch", "liger")
AUTO_MIN_HIDDEN_SIZE = 4096  # the smallest model measured faster with Liger's kernels (the 7B shape)


def choice() -> str:
    """The ``CHOICES`` entry QLORA_KIT_INFERENCE_KERNELS names (the first when unset)."""
    chosen = os.environ.get(VARIABLE, "") or CHOICES[0]
    if chosen not in CHOICES:
        raise UsageError(f"{VARIABLE}={chosen}: leave it unset, or set it to one of {', '.join(CHOICES)}")
    return chosen


def unavailable_reason(device_type: str, model_type: str) -> str | None:
    """Why Liger's kernels cannot run in the forwards of a ``model_type`` model on ``device_type``; None when they
    can."""
    import importlib.util

    if device_type != "cuda":
        return f"the model is on the {device_type}, and Liger's kernels are Triton (a GPU's)"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"Liger has no kernels for model type {model_type!r}"
    return None


def kernels_for(chosen: str, reason: str | None, in_4bit: bool, hidden_size: int) -> str:
    """The kernels a model's forwards run under the setting ``chosen``, given why Liger's cannot run there (``reason``,
    None when they can), whether the model's weights are in 4-bit and its hidden size."""
    if chosen == "auto":  # Liger's only where measured faster
        measured_faster = in_4bit and hidden_size >= AUTO_MIN_HIDDEN_SIZE
        return "liger" if reason is None and measured_faster else "pytorch"
    return "liger" if chosen == "liger" and reason is None else "pytorch"


def apply(model) -> str:
    """Patch the kernels QLORA_KIT_INFERENCE_KERNELS names into ``model`` (a transformers model, or peft's model
    around one; for evaluation only: the patch is not undone). Returns the kernels its forwards now run."""
    chosen = choice()
    if chosen == "pytorch":
        return "pytorch"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    reason = unavailable_reason(next(base.parameters()).device.type, base.config.model_type)
    from .fused_lora import is_4bit_layer

    in_4bit = any(is_4bit_layer(module) for module in base.modules())
    hidden_size = getattr(base.config, "hidden_size", 0)  # a config without one: not a model measured faster
    if kernels_for(chosen, reason, in_4bit, hidden_size) == "pytorch":
        if chosen == "liger":  # asked for by name: say why not
            log.warning("%s=liger: %s; PyTorch's kernels instead", VARIABLE, reason)
        return "pytorch"
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    # forwards only: no loss is computed, so no fused cross-entropy
    _apply_liger_kernel_to_instance(
        base, rope=True, rms_norm=True, swiglu=True, geglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    log.info("Liger's RMSNorm, rotary and MLP kernels in evaluation's forwards")
    return "liger"
