"""trl's SFTTrainer set up for a recipe: its ``SFTConfig`` from the settings, the trainer (with an adapter on the
output head, the loss from the model's own logits), LoRA layers fused and decoder layers compiled on request, and a
stop on a signal that saves a checkpoint first. ``training.train()`` uses these; the training benchmark uses them
directly."""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
from pathlib import Path
from types import MethodType

from transformers import Trainer, TrainerCallback
from trl import SFTTrainer

from . import modeling
from .errors import UsageError
from .fused_lora import fuse_lora
from .settings import TrainingSettings

log = logging.getLogger(__name__)


def _optimizer(name: str, on_gpu: bool) -> str:
    """The optimizer to use here: paged and fused AdamW need CUDA, the CPU gets plain AdamW (same math)."""
    if not on_gpu and ("paged" in name or "fused" in name or "8bit" in name):
        return "adamw_torch"
    return name


def liger_kernel_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def liger_in_use(requested: bool, on_gpu: bool, say_why: bool = False) -> bool:
    """Whether training runs Liger's kernels: asked for, on a GPU, with liger-kernel installed (``say_why``: log
    why not, when asked for)."""
    if not requested:
        return False
    if not on_gpu:
        if say_why:
            log.info("Liger kernels need a GPU: not used on the CPU")
        return False
    if not liger_kernel_installed():
        if say_why:
            log.warning(
                "Liger kernels asked for but liger-kernel is not installed (pip install liger-kernel): not used"
            )
        return False
    return True


def _sampling_settings(group_by_length: bool) -> dict:
    """Length-grouped batches, under the setting's name in the installed transformers."""
    import dataclasses

    from trl import SFTConfig

    names = {field.name for field in dataclasses.fields(SFTConfig)}
    if "train_sampling_strategy" in names:  # newer transformers 5.x
        return {"train_sampling_strategy": "group_by_length" if group_by_length else "random"}
    if "group_by_length" in names:
        return {"group_by_length": group_by_length}
    if group_by_length:
        log.warning("this transformers version cannot group batches by length: batches are drawn at random")
    return {}


def sft_config(args: TrainingSettings, run_dir: Path):
    import torch
    from trl import SFTConfig

    on_gpu = torch.cuda.is_available()
    dtype = modeling.compute_dtype()
    liger = liger_in_use(args.use_liger_kernel, on_gpu, say_why=True)
    return SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        gradient_checkpointing=args.gradient_checkpointing,
        optim=_optimizer(args.optim, on_gpu),
        use_liger_kernel=liger,
        # rope, rms_norm, swiglu; never the fused linear cross-entropy (trl has its own fused head, and an
        # adapter on lm_head needs the real logits)
        liger_kernel_config={
            "rope": True,
            "rms_norm": True,
            "swiglu": True,
            "cross_entropy": False,
            "fused_linear_cross_entropy": False,
        }
        if liger
        else None,
        **_sampling_settings(args.group_by_length and not args.packing),
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler,  # default constant_with_warmup: the original's "constant" ignored its warmup
        warmup_steps=0.03,  # a float below 1 is a ratio of the total steps
        max_grad_norm=0.3,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        logging_steps=args.logging_steps,
        **(
            {"save_strategy": "epoch"}
            if args.save_steps == "epoch"
            else {"save_strategy": "steps", "save_steps": args.save_steps}
        ),
        save_total_limit=args.keep_checkpoints,
        report_to=[] if args.report_to == "none" else [args.report_to],
        seed=args.seed,
        data_seed=args.seed,
        neftune_noise_alpha=args.neftune or None,
        max_length=args.max_seq_length,
        completion_only_loss=args.completion_only_loss,
        per_device_eval_batch_size=args.batch_size,
        dataloader_pin_memory=on_gpu,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",  # summed over processes by the Trainer
        # without it, processes launched on a machine without a GPU each train alone (no gradient all-reduce)
        use_cpu=not on_gpu,
    )


def logits_where_scored(labels) -> dict:
    """Model inputs that compute the vocabulary logits only at the sequence positions whose next token is scored.

    With the loss on the answer only, most positions of a batch are prompt: their logits (batch x length x
    vocabulary, upcast to fp32 for the loss) cost memory and time and are thrown away. ``logits_to_keep`` (the
    positions, one list for the whole batch) makes the model project only those, and ``shift_labels`` gives the
    loss the labels of exactly those positions, so the loss is the same sum over the same tokens.
    """
    import torch

    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # the token each position predicts
    positions = (shifted != -100).any(dim=0).nonzero().squeeze(-1)
    return {"logits_to_keep": positions, "shift_labels": shifted[:, positions]}


def accepts_scored_positions(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` and its loss takes ``shift_labels`` (every causal LM of
    recent transformers; a model that does not gets the logits of every position, as before)."""
    import inspect

    try:
        loss = model.loss_function
    except Exception:  # a model class without transformers' loss mapping
        return False
    return (
        "logits_to_keep" in inspect.signature(model.forward).parameters
        and "shift_labels" in inspect.signature(loss).parameters
    )


class ResumingTrainer(SFTTrainer):
    """trl's SFTTrainer that resumes an adapter in the precision it was trained in."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # peft's load_adapter upcasts the adapter to fp32, while trl trains QLoRA adapters in bf16: without
        # this, a resumed run would go on in another precision than the run it continues.
        target = model if model is not None else self.model
        dtypes = {name: param.dtype for name, param in target.named_parameters() if param.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name, param in target.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])


class HeadAdapterTrainer(ResumingTrainer):
    """Trains a LoRA adapter on lm_head too: the loss comes from the model's own logits, as in
    ``transformers.Trainer`` (trl computes its loss from ``lm_head.weight`` directly, a fused head that would
    skip the adapter). With ``scored_positions_only`` (``--logits_where_scored``) the logits are computed only
    where a token is scored (``logits_where_scored``): less memory; slower on the 7B shape on a GPU, not on SmolLM2
    with the small-model recipe (docs/benchmarks.md)."""

    scored_positions_only = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs["use_cache"] = False
        if self.scored_positions_only and not return_outputs and "labels" in inputs:  # training: the loss alone
            inputs = {**inputs, **logits_where_scored(inputs["labels"])}
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)


def make_trainer(
    model,
    sft_args,
    peft_config,
    tokenizer,
    train_dataset,
    eval_dataset,
    data_collator=None,
    scored_positions_only: bool = False,
    compile_layers: bool = False,
    fused_lora: bool = False,
):
    """An SFTTrainer, or a ``HeadAdapterTrainer`` when the LoRA config targets the output head (lm_head); with
    ``fused_lora`` its LoRA layers train through ``fused_lora.fuse_lora``; with ``compile_layers`` each decoder
    layer of the adapted model is compiled (``compile_decoder_layers``)."""
    trainer = _make_trainer(
        model, sft_args, peft_config, tokenizer, train_dataset, eval_dataset, data_collator, scored_positions_only
    )
    if fused_lora:
        log.info("LoRA layers fused: %d", fuse_lora(trainer.model))
    if compile_layers:
        log.info(
            "compiled %d decoder layers (torch.compile; the first steps take the compile time)",
            compile_decoder_layers(trainer.model),
        )
    return trainer


def compile_decoder_layers(model) -> int:
    """torch.compile each decoder layer in place, as one region (its 4-bit matmuls, LoRA and norms together),
    keeping the parameter names, so checkpoints and adapters are saved as without it. Returns how many layers.
    Compiled with dynamic shapes: the lengths vary from batch to batch.

    Gradient checkpointing stays outside the compiled region. Transformers 5.23 (the pinned version) checkpoints a
    layer inside its ``forward`` (``GradientCheckpointingLayer``), which ``Module.compile`` would trace together with
    the layer: the compiled graph then keeps the activations a checkpoint drops (measured on the 7B shape at batch
    32: 51 GB against 10.7 GB with the checkpoint outside). There each layer's own forward is compiled and
    transformers' checkpointing wraps the compiled call, as older versions wrap ``__call__`` (where
    ``Module.compile`` is enough). A layer compiled by an earlier call is left as it is."""
    import torch

    layers = next(
        (
            module
            for module in model.modules()
            if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and "Layer" in type(module[0]).__name__
        ),
        None,
    )
    if layers is None:
        raise UsageError("--compile_layers: found no list of decoder layers in this model")
    for layer in layers:
        if getattr(layer, "compiled_forward", None) is not None:
            continue  # its forward calls compiled_forward: compiling that forward again would call itself
        own_forward = _forward_inside_checkpointing(type(layer))
        if own_forward is None:
            layer.compile(dynamic=True)
        else:
            layer.compiled_forward = torch.compile(MethodType(own_forward, layer), dynamic=True)
            layer.__class__ = _calling_compiled_forward(type(layer))
    return len(layers)


def _forward_inside_checkpointing(layer_class):
    """The class's own ``forward``, from inside the wrapper with which transformers checkpoints it
    (``GradientCheckpointingLayer`` in versions that checkpoint inside ``forward``); None otherwise."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return None
    if not issubclass(layer_class, GradientCheckpointingLayer) or "__call__" in vars(GradientCheckpointingLayer):
        return None  # not a checkpointing layer, or one checkpointed around __call__ (outside Module.compile's region)
    return getattr(layer_class.forward, "__wrapped__", None)


@functools.cache
def _calling_compiled_forward(layer_class):
    """A subclass of ``layer_class`` (same name) whose forward calls the instance's ``compiled_forward``:
    transformers wraps a subclass's forward with its checkpointing again, so the checkpoint encloses the compiled
    call; the compiled function is the class's own forward, without the checkpointing wrapper."""

    def forward(self, *args, **kwargs):
        return self.compiled_forward(*args, **kwargs)

    return type(layer_class.__name__, (layer_class,), {"forward": forward, "__module__": layer_class.__module__})


def _make_trainer(
    model, sft_args, peft_config, tokenizer, train_dataset, eval_dataset, data_collator, scored_positions_only
):
    from peft import get_peft_model
    from transformers import set_seed

    if output_head_name(model) not in (peft_config.target_modules or []):
        trainer = ResumingTrainer(
            model=model,
            args=sft_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            data_collator=data_collator,
        )
        check_adapted(trainer.model, peft_config.target_modules)
        return trainer

    # The LoRA matrices are initialised from the global RNG: seed it as the trainer would before wrapping,
    # or two runs with the same --seed start from different adapters.
    set_seed(sft_args.seed)
    peft_model = get_peft_model(model, peft_config)
    if getattr(model, "is_loaded_in_4bit", False):  # as trl does for QLoRA: adapters in the compute dtype
        for param in peft_model.parameters():
            if param.requires_grad:
                param.data = param.data.to(modeling.compute_dtype())
    # lm_head's own weights never change (only its LoRA matrices train): checkpoints need not copy the layer.
    peft_model.save_pretrained = functools.partial(peft_model.save_pretrained, save_embedding_layers=False)
    # trl's constructor refuses an adapted lm_head because of its fused loss, which this subclass replaces.
    peft_model.get_output_embeddings = lambda: None
    try:
        trainer = HeadAdapterTrainer(
            model=peft_model,
            args=sft_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            data_collator=data_collator,
        )
    finally:
        del peft_model.get_output_embeddings
    trainer.scored_positions_only = scored_positions_only and accepts_scored_positions(model)
    check_adapted(trainer.model, peft_config.target_modules)
    return trainer


def output_head_name(model) -> str | None:
    """The last name component of the model's output projection (lm_head; embed_out for GPT-NeoX)."""
    head = model.get_output_embeddings()
    return next((name.split(".")[-1] for name, module in model.named_modules() if module is head), None)


def check_adapted(peft_model, targets) -> None:
    """Every LoRA target matched at least one layer: a run never adapts fewer modules than it records."""
    adapted = {name.split(".")[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    missing = sorted(set(targets or []) - adapted)
    if missing:
        raise UsageError(
            f"LoRA targets {', '.join(missing)} matched no layer of the model; adapted: "
            f"{', '.join(sorted(adapted)) or 'none'}"
        )


class StopOnSignal(TrainerCallback):
    """On SIGTERM/SIGINT, save a checkpoint at the end of the current step and stop training."""

    def __init__(self):
        self.signal_number = None

    def _handle(self, number, frame):
        if self.signal_number is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal_number = number
        log.warning("%s received: saving a checkpoint after this step, then stopping", signal.Signals(number).name)

    @contextlib.contextmanager
    def installed(self):
        previous = {number: signal.signal(number, self._handle) for number in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal_number is not None:
            control.should_save = True
            control.should_training_stop = True
        return control
