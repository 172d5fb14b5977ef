"""LoRA layers trained as one autograd function each (``--fused_lora``).

peft computes an adapted layer as ``base(x).clone() + lora_B(lora_A(dropout(x))) * scaling``: besides the two
small products, that is a copy of the base output, the adapter's own full-size output, a product by the scaling
and a sum, each reading or writing a tensor of the layer's output size, in the forward (twice with recomputed
activations), and a scaled gradient and a sum in the backward. Here the adapter's product is added into the base
output in place, by the matrix multiply itself (``addmm_``), and the backward is written out the same way:

    forward   y  = base(x);  r = d @ A.T;  y += scaling * r @ B.T          (d = dropout(x), or x)
    backward  dB = scaling * dy.T @ r;  g = dy @ B;  dA = scaling * g.T @ d
              dx = dy @ W (+ scaling * g @ A, added in place when d is x)

each product scaled in its own accumulation (addmm's alpha), not by a product of its own. Only ``r`` (tokens x rank)
is saved besides the inputs peft saves too. The passes saved, worked for the 7B shape:
peft's forward writes and reads the output-sized tensor ~8 more times (copy 2, adapter output 1, scaling 2, sum 3)
where ``addmm_`` reads and writes it twice; the block's 7 adapted layers output 43,008 values a token, 86 KB in bf16,
so ~0.5 MB a token a block, ~1 MB with the recomputed forward, ~33 MB a token over 32 blocks: ~10 us at the ~3.3 TB/s
an H200 sustains, against ~125 us a token at 8,000 tokens/s: at most ~8%. Measured on an H200 (7B shape, 4-bit,
docs/benchmarks.md) it was 0.95x the default at the median, later passes even: not a default.

A small model's step counts launches, not bytes: SmolLM2-135M's 211 adapted layers run ~20 operations each through
peft, a kernel each on a GPU, where the host launching them is the step's time. The fused layers run fewer, and cast
their fp32 adapter weights to bf16 all together once per forward (and the gradients back once), not four casts a
layer (``_AdapterCasts``).

It applies where the result is the same LoRA: training (train mode), one active adapter, no DoRA or other
variant, no LoRA bias, a frozen base that is a ``torch.nn.Linear`` or a bitsandbytes 4-bit layer, the adapter's
compute dtype equal to the base output's. Any other call runs peft's own forward (a training call says why, once).

For evaluation, ``fuse_lora(model, for_inference=True)`` also routes calls without gradients in eval mode through
the same in-place product, in the output's dtype: peft computes an adapter loaded onto a 4-bit base in fp32, casting
each adapted layer's input to fp32 and its output back, besides the copy and the sum above; here the small adapter
weights are cast instead. The same LoRA up to rounding (bf16 on a GPU, where a near-tie may turn; exact in fp32).
It is how evaluation adds an adapter on a GPU (``INFERENCE_PRODUCT``, below).
"""

from __future__ import annotations

import logging
import types

import torch

log = logging.getLogger(__name__)


def _dequantized_4bit(weight):
    import bitsandbytes.functional as bnb_functional

    # as bitsandbytes' own backward does: the packed weight in its canonical [(N*K+1)//2, 1] form
    return bnb_functional.dequantize_4bit(weight.data.view(-1, 1), weight.quant_state)


def is_4bit_layer(layer) -> bool:
    """Whether ``layer`` is bitsandbytes' 4-bit linear layer (False where bitsandbytes is not installed)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(layer, bnb.nn.Linear4bit)


def _base_weight(layer) -> torch.Tensor:
    """The base layer's weight as an (out, in) matrix (dequantized when it is 4-bit)."""
    return _dequantized_4bit(layer.weight) if is_4bit_layer(layer) else layer.weight


def _scaled_product(left, right, scale):
    """``scale * left @ right`` as one matrix multiply (the scale applied in its accumulation, no separate product:
    with beta 0 addmm's first argument is not read, so an empty scalar serves)."""
    return torch.addmm(left.new_empty(()), left, right, beta=0, alpha=scale)


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dropped, A, B, scaling, base_layer):
        # dropped: dropout(x), or None when the adapter has no dropout (then the adapter reads x itself); A and B:
        # the adapter's weights already in the output's dtype (their casts are autograd's, outside this function)
        result = base_layer(x)
        if not result.is_contiguous():
            result = result.contiguous()
        adapter_input = (x if dropped is None else dropped).reshape(-1, x.shape[-1]).to(result.dtype)
        reduced = torch.mm(adapter_input, A.t())  # tokens x rank: the only new tensor saved
        result.view(-1, result.shape[-1]).addmm_(reduced, B.t(), alpha=scaling)
        ctx.save_for_backward(x, dropped, A, B, reduced)
        ctx.scaling, ctx.base_layer = scaling, base_layer
        return result

    @staticmethod
    def backward(ctx, grad_result):
        x, dropped, A, B, reduced = ctx.saved_tensors
        grad = grad_result.reshape(-1, grad_result.shape[-1]).to(A.dtype)
        adapter_input = (x if dropped is None else dropped).reshape(-1, x.shape[-1]).to(A.dtype)
        grad_A = grad_B = grad_x = grad_dropped = None
        through_B = torch.mm(grad, B)  # tokens x rank
        if ctx.needs_input_grad[3]:
            grad_B = _scaled_product(grad.t(), reduced, ctx.scaling)
        if ctx.needs_input_grad[2]:
            grad_A = _scaled_product(through_B.t(), adapter_input, ctx.scaling)
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad, _base_weight(ctx.base_layer).to(grad.dtype))
            if dropped is None:
                grad_x.addmm_(through_B, A, alpha=ctx.scaling)
            grad_x = grad_x.view(x.shape).to(x.dtype)
        if dropped is not None and ctx.needs_input_grad[1]:
            grad_dropped = _scaled_product(through_B, A, ctx.scaling).view(dropped.shape).to(dropped.dtype)
        return grad_x, grad_dropped, grad_A, grad_B, None, None


class _CastTogether(torch.autograd.Function):
    """Tensors cast to ``dtype`` as one flat tensor: a few kernels for all of them where a cast each is one kernel a
    tensor, and in the backward the gradients cast back the same way. A tensor whose cast nothing used gets no
    gradient (None, as if it had not been cast), so an optimizer skips it as it would have."""

    @staticmethod
    def forward(ctx, dtype, *tensors):
        ctx.set_materialize_grads(False)
        ctx.shapes = [t.shape for t in tensors]
        ctx.dtype = tensors[0].dtype
        flat = torch.cat([t.reshape(-1) for t in tensors]).to(dtype)
        return tuple(part.view(shape) for part, shape in zip(flat.split([t.numel() for t in tensors]), ctx.shapes))

    @staticmethod
    def backward(ctx, *grads):
        given = [i for i, grad in enumerate(grads) if grad is not None]
        result = [None] * len(grads)
        if given:
            flat = torch.cat([grads[i].reshape(-1) for i in given]).to(ctx.dtype)
            for i, part in zip(given, flat.split([grads[i].numel() for i in given])):
                result[i] = part.view(ctx.shapes[i])
        return None, *result


# The flat cast makes a passing fp32 copy of every adapter weight and holds the bf16 copy for the step, where casts
# a layer each hold one layer's (with checkpointing). Launches count where a step waits on the host, on small models
# with small adapters (SmolLM2-135M, every linear layer: 2.8M weights at rank 8, 22M at 64); a 7B's step waits on
# the GPU, and at rank 64 on every linear layer its adapters are 170M weights (0.7 GB in fp32): cast a layer each.
CAST_TOGETHER_MAX_ELEMENTS = 2**25  # 32M weights: 128 MB passing in fp32, 64 MB held in bf16


def _data_parallel() -> bool:
    """Whether several processes train together. DDP then waits for each weight's gradient, or finds the weight
    unused in the graph: a weight whose layer did not run would be in the graph (through the flat cast) and get
    none, so there each layer casts its own."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AdapterCasts:
    """The fused layers' adapter weights, cast to the compute dtype once per forward of the model, all together.

    Over a 16-bit or 4-bit base in bf16 peft keeps the adapter in fp32, so each adapted layer casts its two adapter
    weights to bf16 in the forward and their gradients back in the backward: four kernels a layer, ~840 a step for
    SmolLM2-135M's 211 adapted layers, where a small model's step is bound by how many kernels the host launches.
    Cast together: a few. The same values either way.

    The casts are made at the first fused call of a forward of the model with gradients, outside the backward and
    outside a compiled region, and used by that forward's layers and by their recomputation under checkpointing; a
    forward pre-hook on the model forgets them when the next forward starts (the backward has used their graph).
    A call without gradients, or a compiled layer, casts its own, as peft does."""

    def __init__(self, layers):
        self.layers = layers
        self.cast: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def forget(self, *unused):
        self.cast = None

    def weights(self, layer, lora_A, lora_B, dtype):
        """``layer``'s adapter weights cast to ``dtype``, or None where it casts its own."""
        if torch.compiler.is_compiling():
            return None  # the compiled graph keeps its own casts (and traces no Python state)
        if self.cast is None:
            if not torch.is_grad_enabled() or torch._C._current_autograd_node() is not None:
                return None
            self.cast = self._cast_all(dtype)
        cast = self.cast.get(id(layer))
        if cast is None or cast[0].dtype != dtype or cast[2] is not lora_A or cast[3] is not lora_B:
            return None
        return cast[0], cast[1]

    def _cast_all(self, dtype) -> dict:
        pairs = {}
        for layer in self.layers:
            names = _active_adapters(layer)
            if len(names) == 1 and isinstance(layer.lora_A[names[0]], torch.nn.Linear):
                pairs[id(layer)] = (layer.lora_A[names[0]].weight, layer.lora_B[names[0]].weight)
        weights = [weight for pair in pairs.values() for weight in pair]
        if not weights or len({(w.device, w.dtype) for w in weights}) != 1 or weights[0].dtype == dtype:
            return {}  # nothing to cast, or not one flat tensor's worth
        if sum(weight.numel() for weight in weights) > CAST_TOGETHER_MAX_ELEMENTS or _data_parallel():
            return {}
        cast = _CastTogether.apply(dtype, *weights)
        return {key: (cast[2 * i], cast[2 * i + 1], *pair) for i, (key, pair) in enumerate(pairs.items())}


def _active_adapters(layer) -> list[str]:
    """The names of ``layer``'s active LoRA adapters."""
    return [name for name in layer.active_adapters if name in layer.lora_A]


def unfused_reason(layer, x, inference: bool = False) -> str | None:
    """Why the fused function would not compute this training call of a peft LoRA layer as peft does (None: it
    would). ``inference``: a call without gradients, where the base's trainability and the adapter's dtype do not
    matter (the product is computed in the output's dtype)."""
    adapters = _active_adapters(layer)
    if len(adapters) != 1:
        return f"{len(adapters)} active adapters"
    name = adapters[0]
    if name in getattr(layer, "lora_variant", {}):
        return f"a LoRA variant ({type(layer.lora_variant[name]).__name__})"
    lora_A, lora_B, base = layer.lora_A[name], layer.lora_B[name], layer.get_base_layer()
    four_bit = is_4bit_layer(base)
    if not isinstance(lora_A, torch.nn.Linear) or lora_B.bias is not None:
        return "a LoRA bias or a non-linear adapter"
    if not (four_bit or type(base) is torch.nn.Linear):
        return f"a {type(base).__name__} base layer"
    if inference:
        return None
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return "a base layer that trains"
    if four_bit and getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        return "4-bit weights repacked for bitsandbytes' CPU inference"
    autocast = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
    # bitsandbytes returns x's dtype; a Linear under autocast, autocast's; else its weight's (and x's)
    output_dtype = x.dtype if four_bit else (autocast or base.weight.dtype)
    # peft multiplies the adapter in autocast's dtype, or the adapter weights' own, then casts to the output's
    adapter_dtype = autocast or lora_A.weight.dtype
    if adapter_dtype != output_dtype:
        return f"the adapter computes in {adapter_dtype}, the layer's output is {output_dtype}"
    return None


_warned: set[str] = set()


def _adapted_in_place(x, lora_A, lora_B, scaling, base_layer):
    """base(x) + scaling * x A^T B^T without gradients, the adapter's product added in place in the output's dtype."""
    result = base_layer(x)
    if not result.is_contiguous():
        result = result.contiguous()
    dtype = result.dtype
    reduced = torch.mm(x.reshape(-1, x.shape[-1]).to(dtype), lora_A.to(dtype).t())  # tokens x rank
    result.view(-1, result.shape[-1]).addmm_(reduced, lora_B.to(dtype).t(), alpha=scaling)  # scaled in the product
    return result


def _fused_forward(self, x, *args, **kwargs):
    if args or kwargs or self.disable_adapters or self.merged:
        return self._peft_forward(x, *args, **kwargs)  # no adapter to add, or a call peft's own forward must read
    # training, with or without gradients (reentrant checkpointing's first forward has none); in eval mode only when
    # asked for (for_inference) and only without gradients
    inference = not self.training
    if inference and (not getattr(self, "_fused_for_inference", False) or torch.is_grad_enabled()):
        return self._peft_forward(x)
    reason = unfused_reason(self, x, inference)
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            if inference:
                log.warning("LoRA layers with %s evaluate through peft's own forward", reason)
            else:
                log.warning("--fused_lora: LoRA layers with %s train through peft's own forward", reason)
        return self._peft_forward(x)
    name = _active_adapters(self)[0]
    lora_A, lora_B, scaling, base = (
        self.lora_A[name].weight,
        self.lora_B[name].weight,
        self.scaling[name],
        self.get_base_layer(),
    )
    if inference:
        return _adapted_in_place(x, lora_A, lora_B, scaling, base)
    # the dtype the product runs in (unfused_reason made it the output's): autocast's, else the adapter's own
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else lora_A.dtype
    casts = getattr(self, "_adapter_casts", None)
    cast = casts.weights(self, lora_A, lora_B, dtype) if casts is not None else None
    A, B = cast if cast is not None else (lora_A.to(dtype), lora_B.to(dtype))
    dropout = self.lora_dropout[name]
    dropped = None if isinstance(dropout, torch.nn.Identity) else dropout(x)
    return _LoRALinear.apply(x, dropped, A, B, scaling, base)


# How an evaluation adds the adapter's product to each adapted layer's output, by where the model runs. On a GPU in
# place, in the output's dtype (``fuse_lora(for_inference=True)``): measured on an H100 (docs/benchmarks.md), 1.56x
# peft's own layers on a trained SmolLM2 adapter over the 7,317 20 Newsgroups test prompts (7.5 s against 11.6, one
# pass; peft's casts and copies were half of the GPU's busy time) and 1.07x on the Zephyr-7B shape in 4-bit (8.6
# against 9.1-9.3 ms an example, three passes). Its bf16 rounding turned 3.8% of that adapter's answers (accuracy
# 52.06% against 52.19%). On the CPU peft's layers: level there (docs/benchmarks.md), and the loop measured there.
INFERENCE_PRODUCT = {"cuda": "in_place", "cpu": "peft"}
# Where a 16-bit base gets its adapter merged into the weights instead (no LoRA products at all, no extra memory):
# on an H100 with trained SmolLM2 adapters, three passes each (docs/benchmarks.md), 1.20-1.64x the product in place
# on the 7,317 20 Newsgroups test prompts (median 1,283 against 867 examples/s; accuracy 65.30% against 65.40%) and
# 1.27-1.38x on the 819 SAMSum dialogues (475 against 373; ROUGE-1 43.12 both). A 4-bit base is not merged by
# default: merging loads it in bf16, four times the weights' memory.
MERGED_ON = ("cuda",)
INFERENCE_PRODUCTS = ("in_place", "peft", "merged")


def inference_product(
    device_type: str | None = None, base_in_4bit: bool = True, merge_adapter: bool | None = None
) -> str:
    """How an evaluation on ``device_type`` (default: a GPU if there is one) adds the adapter's product:
    ``merged`` when ``merge_adapter`` says so (``--merge_adapter``); else QLORA_KIT_ADAPTER_PRODUCT if set
    (``peft`` evaluates through peft's own layers, e.g. to compare with another tool), unless it says ``merged``
    against ``--no-merge_adapter``; else ``merged`` for a 16-bit base where ``MERGED_ON`` names the device, and
    ``INFERENCE_PRODUCT`` for the device otherwise (the CPU's for any device it does not name)."""
    import os

    from .errors import UsageError

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    choice = os.environ.get("QLORA_KIT_ADAPTER_PRODUCT", "")
    if choice and choice not in INFERENCE_PRODUCTS:
        raise UsageError(
            f"QLORA_KIT_ADAPTER_PRODUCT={choice}: leave it unset, or set it to one of {', '.join(INFERENCE_PRODUCTS)}"
        )
    if merge_adapter:
        return "merged"
    if merge_adapter is False and choice == "merged":
        choice = ""  # the flag wins over the variable
    if choice:
        return choice
    if merge_adapter is None and not base_in_4bit and device_type in MERGED_ON:
        return "merged"
    return INFERENCE_PRODUCT.get(device_type, "peft")


def fuse_lora(model, for_inference: bool = False) -> int:
    """Route the training forward of every peft LoRA linear layer of ``model`` through the fused function, and its
    calls without gradients in eval mode too while ``for_inference`` (a later call without it hands them back to
    peft); returns how many layers were routed anew. Idempotent; adapters save and load under the same names.
    Routed for training, the layers cast their adapter weights together once per forward (``_AdapterCasts``)."""
    from peft.tuners.lora import LoraLayer

    routed = []
    for module in model.modules():
        if not (isinstance(module, LoraLayer) and hasattr(module, "lora_A")):
            continue
        if not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            routed.append(module)
        module._fused_for_inference = for_inference
    if routed and not for_inference:  # (an evaluation's forwards, captured in CUDA graphs, need no training casts)
        casts = _AdapterCasts(routed)
        for module in routed:
            module._adapter_casts = casts
        # every call of the model goes through its innermost model (peft's wrappers call it)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.register_forward_pre_hook(casts.forget)
    return len(routed)
