"""Fused element-wise kernels for evaluation's forwards, chosen by QLORA_KIT_INFERENCE_KERNELS.

Besides its matrix products, a decoder layer's forward in PyTorch runs several element-wise kernels, each reading
and writing a whole activation: RMSNorm's cast, square, mean, rsqrt and two products (twice a layer); rotary
embedding's halves, negation, two products and a sum, for queries and keys; SiLU and a product in the MLP. By
count, on the 7B shape a 16,384-token prefill group moves about 8 GB a layer so: some 80 ms a group at an H100's
3.35 TB/s, against about 360 ms of matrix products. Liger's Triton kernels do each of the three in one pass.
``liger`` patches them into the model an evaluation loads (a GPU and liger-kernel needed, else a warning and
PyTorch's); ``pytorch``, the default, leaves PyTorch's.
"""

from __future__ import annotations

import logging
import os

from .errors import UsageError

log = logging.getLogger(__name__)

VARIABLE = "QLORA_KIT_INFERENCE_KERNELS"
CHOICES = ("pytorch", "liger")


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


def apply(model) -> str:
    """Patch the kernels QLORA_KIT_INFERENCE_KERNELS names into ``model`` (a transformers model, or peft's model
    around one; for evaluation only: the patch is not undone). Returns the kernels its forwards now run."""
    if choice() == "pytorch":
        return "pytorch"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    reason = unavailable_reason(next(base.parameters()).device.type, base.config.model_type)
    if reason is not None:
        log.warning("%s=liger: %s; PyTorch's kernels instead", VARIABLE, reason)
        return "pytorch"
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    # forwards only: no loss is computed, so no fused cross-entropy
    _apply_liger_kernel_to_instance(
        base, rope=True, rms_norm=True, swiglu=True, geglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    log.info("Liger's RMSNorm, rotary and MLP kernels in evaluation's forwards")
    return "liger"
