"""QLoRA fine-tuning through trl's SFTTrainer: ``train()`` runs the stages below, one function each."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import Trainer, TrainerCallback
from trl import SFTTrainer

from . import distributed, memory_budget, modeling, results
from . import settings as settings_lib
from .data import canonical_labels, map_to_known_labels
from .errors import Interrupted, UsageError
from .formatting import PromptFormat, build_training_examples, end_of_turn_token
from .packing import PackedCollator, packed_rows
from .run_folder import RunFolder
from .selection import ScoreCheckpoints, selection_metrics
from .settings import TrainingSettings
from .tasks import Task, get_task

log = logging.getLogger(__name__)

# Settings that name a run folder (by these short names) when they differ from their defaults.
_NAMED_IF_CHANGED = {
    "lora_alpha": "alpha",
    "learning_rate": "lr",
    "batch_size": "bs",
    "grad_accum": "ga",
    "max_seq_length": "len",
    "seed": "seed",
    "max_steps": "steps",
    "prompt_style": "style",
    "completion_only_loss": "completion-only",
    "validation_fraction": "val",
    "packing": "packed",
    "optim": "optim",
    "group_by_length": "grouped",
    "use_liger_kernel": "liger",
    "gradient_checkpointing": "ckpt",
    "compile_layers": "compiled",
    "lr_scheduler": "sched",
    "load_in_4bit": "4bit",
    "logits_where_scored": "scored-logits",
}


def default_run_dir(task: Task, settings: TrainingSettings) -> Path:
    """experiments/<task>_<model>_<settings>: a recipe's own settings are named by the recipe, a flag that changes
    one of them by its short name."""
    defaults = settings_lib.resolve(task, {"recipe": settings.recipe})[0].to_dict()
    parts = [task.name, modeling.model_slug(settings.pretrained_ckpt)]
    if settings.recipe != settings_lib.DEFAULT_RECIPE:
        parts.append(f"recipe-{Path(settings.recipe).stem}")
    if task.labelled:
        parts.append(f"sampleFraction-{settings.train_sample_fraction}")
    parts += [f"epochs-{settings.epochs}", f"rank-{settings.lora_r}", f"dropout-{settings.dropout}"]
    if settings.neftune:
        parts.append(f"neftune-{settings.neftune:g}")
    if settings.full_tune:
        parts.append("full")
    for key, short in _NAMED_IF_CHANGED.items():
        value = getattr(settings, key)
        if value != defaults.get(key):
            parts.append(f"{short}-{value}")
    return Path("experiments") / "_".join(parts)


def load_training_data(task: Task, settings: TrainingSettings) -> dict:
    """Cleaned (and, for a labelled task, sampled) training rows with their label list and provenance."""
    rows, source = task.read_rows(
        file=settings.train_file,
        dataset=settings.dataset,
        split="train",
        columns=settings.columns,
        label_names=settings.label_names,
    )
    read = len(rows)
    rows = task.clean(rows, source)
    cleaned = len(rows)
    label_names = canonical_labels(rows, source) if task.labelled else []
    if task.labelled and len(label_names) < 2:
        raise UsageError(f"{source}: needs at least two distinct labels, found {len(label_names)}")
    validation, held_out = None, 0
    if settings.validation_file:
        validation, val_source = task.load_rows(
            file=settings.validation_file,
            dataset=settings.dataset,
            split="validation",
            columns=settings.columns,
            label_names=settings.label_names,
        )
        if task.labelled:
            map_to_known_labels(validation, label_names, val_source)
    elif settings.validation_fraction:
        rows, validation = task.split_off_validation(rows, settings.validation_fraction, settings.seed)
        held_out = len(validation)
    fraction = settings.train_sample_fraction
    rows = task.sample(rows, fraction, settings.seed)
    log.info(
        "training rows: %d read, %d after cleaning, %d held out for validation, %d used (fraction %s)",
        read,
        cleaned,
        held_out,
        len(rows),
        fraction,
    )
    return {
        "rows": rows,
        "validation": validation,
        "label_names": label_names,
        "counts": {"read": read, "after_cleaning": cleaned, "held_out": held_out, "used": len(rows)},
        "source": source,
        "validation_source": settings.validation_file,
    }


def _optimizer(name: str, on_gpu: bool) -> str:
    """The optimizer to use here: paged and fused AdamW need CUDA, the CPU gets plain AdamW (same math)."""
    if not on_gpu and ("paged" in name or "fused" in name or "8bit" in name):
        return "adamw_torch"
    return name


def _liger_available(requested: bool, on_gpu: bool) -> bool:
    import importlib.util

    if not requested:
        return False
    if not on_gpu:
        log.info("Liger kernels need a GPU: not used on the CPU")
        return False
    if importlib.util.find_spec("liger_kernel") is None:
        log.warning("Liger kernels asked for but liger-kernel is not installed (pip install liger-kernel): not used")
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
    liger = _liger_available(args.use_liger_kernel, on_gpu)
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
    where a token is scored (``logits_where_scored``): less memory, but slower on the GPU."""

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
):
    """An SFTTrainer, or a ``HeadAdapterTrainer`` when the LoRA config targets the output head (lm_head); with
    ``compile_layers`` each decoder layer of the adapted model is compiled (``compile_decoder_layers``)."""
    trainer = _make_trainer(
        model, sft_args, peft_config, tokenizer, train_dataset, eval_dataset, data_collator, scored_positions_only
    )
    if compile_layers:
        log.info(
            "compiled %d decoder layers (torch.compile; the first steps take the compile time)",
            compile_decoder_layers(trainer.model),
        )
    return trainer


def compile_decoder_layers(model) -> int:
    """torch.compile each decoder layer in place, as one region (its 4-bit matmuls, LoRA and norms together):
    ``Module.compile`` keeps the parameter names, so checkpoints and adapters are saved as without it. Returns
    how many layers. Compiled with dynamic shapes: the lengths vary from batch to batch."""
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
        layer.compile(dynamic=True)
    return len(layers)


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


def check_checkpoint(checkpoint: Path) -> dict:
    """The checkpoint's trainer state; a clear error for a checkpoint that cannot be resumed from (cut short by
    a full disk, say)."""
    from safetensors import safe_open

    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        with safe_open(str(checkpoint / "adapter_model.safetensors"), "pt") as weights:
            list(weights.keys())
        if not (checkpoint / "optimizer.pt").is_file():
            raise FileNotFoundError("optimizer.pt is missing")
    except Exception as error:  # json, safetensors and the file system each raise their own types
        raise UsageError(
            f"{checkpoint}: damaged checkpoint ({type(error).__name__}: {error}); delete it to resume "
            "from an earlier one, or pass --overwrite to start again"
        )
    return state


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


@dataclass
class Prepared:
    """What the data stage hands to the model stage."""

    tokenizer: object
    model_source: str
    end_token: str
    label_names: list
    counts: dict
    examples: list
    eval_examples: list | None
    fmt: PromptFormat = None
    validation_rows: list | None = None


def prepare_examples(task: Task, settings: TrainingSettings) -> Prepared:
    """Stage 1: rows, tokenizer and token ids of every training (and validation) example."""
    training_data = load_training_data(task, settings)
    source = modeling.resolve_model_source(settings.pretrained_ckpt)
    tokenizer = modeling.load_tokenizer(source)
    end_token = end_of_turn_token(tokenizer)
    fmt = PromptFormat(task, "finetune", settings.prompt_style, tokenizer, label_names=training_data["label_names"])

    def build(rows):
        return build_training_examples(rows, fmt, settings.max_seq_length, end_token, settings.completion_only_loss)

    examples = build(training_data["rows"])
    eval_examples = build(training_data["validation"]) if training_data["validation"] else None
    log.info(
        "%d training examples, %d tokens (end of answer: %r)",
        len(examples),
        sum(len(e["input_ids"]) for e in examples),
        end_token,
    )
    return Prepared(
        tokenizer,
        source,
        end_token,
        training_data["label_names"],
        training_data["counts"],
        examples,
        eval_examples,
        fmt,
        training_data["validation"],
    )


def start_run_folder(run: RunFolder, settings: TrainingSettings) -> tuple[Path | None, dict]:
    """Stage 2: an empty (or resumed) run folder; the checkpoint to resume from and its trainer state."""
    if settings.overwrite and run.path.exists() and distributed.is_main():
        import shutil

        shutil.rmtree(run.path)
    distributed.barrier()
    run.path.mkdir(parents=True, exist_ok=True)
    checkpoint = run.latest_checkpoint() if settings.resume else None
    if checkpoint:
        log.info("resuming from %s", checkpoint)
        return checkpoint, check_checkpoint(checkpoint)
    if settings.resume:
        log.warning("%s has no checkpoint yet: training from the beginning", run.path)
    return None, {}


def run_config(task: Task, settings: TrainingSettings, prepared: Prepared, targets: list[str]) -> dict:
    """Everything a run was made with, as written to run_config.json."""
    return {
        "task": task.name,
        "pretrained_ckpt": settings.pretrained_ckpt,
        "model_source": prepared.model_source,
        "load_in_4bit": settings.load_in_4bit,
        "use_flash_attention": settings.use_flash_attention,
        "prompt_style": settings.prompt_style,
        "end_token": prepared.end_token,
        "label_names": prepared.label_names,
        "lora_target_modules": targets,
        "data": {
            "dataset": None if settings.train_file else settings.dataset,
            "train_file": settings.train_file,
            "validation_file": settings.validation_file,
            "validation_fraction": settings.validation_fraction,
            "rows": prepared.counts,
            "tokens": sum(len(example["input_ids"]) for example in prepared.examples),
        },
        "settings": settings.to_dict(),
        "processes": distributed.world_size(),
        "effective_batch_size": settings.batch_size * settings.grad_accum * distributed.world_size(),
        "versions": modeling.library_versions(),
    }


def build_trainer(settings: TrainingSettings, prepared: Prepared, run: RunFolder, targets: list[str]):
    """Stage 3: the base model, the LoRA config and the trainer over the (packed, if asked) examples."""
    from datasets import Dataset
    from peft import LoraConfig

    model = modeling.load_model(
        prepared.model_source, load_in_4bit=settings.load_in_4bit, use_flash_attention=settings.use_flash_attention
    )
    if prepared.end_token != prepared.tokenizer.eos_token:
        log.info(
            "answers end with %r (the chat template's end of turn), not %r",
            prepared.end_token,
            prepared.tokenizer.eos_token,
        )
    peft_config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.dropout,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=targets,
    )
    sft_args = sft_config(settings, run.path)
    sft_args.eos_token = prepared.end_token
    collator = None
    train_rows, eval_rows = prepared.examples, prepared.eval_examples
    if settings.packing:
        train_rows = packed_rows(prepared.examples, settings.max_seq_length)
        eval_rows = packed_rows(prepared.eval_examples, settings.max_seq_length) if prepared.eval_examples else None
        log.info(
            "packing: %d examples in %d rows of at most %d tokens",
            len(prepared.examples),
            len(train_rows),
            settings.max_seq_length,
        )
        collator = PackedCollator(prepared.tokenizer.pad_token_id)
        sft_args.include_num_input_tokens_seen = "all"  # the 4-D mask is not a token count; rows are nearly full
    return make_trainer(
        model,
        sft_args,
        peft_config,
        prepared.tokenizer,
        Dataset.from_list(train_rows),
        Dataset.from_list(eval_rows) if eval_rows else None,
        data_collator=collator,
        scored_positions_only=settings.logits_where_scored,
        compile_layers=settings.compile_layers,
    )


def fit(trainer, checkpoint: Path | None, resumed_state: dict, run: RunFolder) -> dict:
    """Stage 4: train; SIGTERM/SIGINT save a checkpoint at the end of the current step, then stop."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    stop = StopOnSignal()
    trainer.add_callback(stop)
    started = time.perf_counter()
    with stop.installed():
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    runtime = time.perf_counter() - started
    if stop.signal_number is not None:
        raise Interrupted(
            f"{signal.Signals(stop.signal_number).name} at step {trainer.state.global_step}; checkpoint "
            f"saved in {run.checkpoints_dir}; continue with --resume",
            stop.signal_number,
        )
    trained_tokens = trainer.state.num_input_tokens_seen
    metrics = {
        "train_loss": output.training_loss,
        "final_loss": _last_logged_loss(trainer),
        "global_steps": output.global_step,
        "train_runtime_s": runtime,  # this command's; a resumed run's earlier commands are not in it
        "trained_tokens": trained_tokens,  # the whole run's
        # a resumed run's trainer state counts the tokens of earlier commands: this command's speed leaves them out
        "tokens_per_second": (trained_tokens - (resumed_state.get("num_input_tokens_seen") or 0)) / runtime
        if runtime
        else None,
        "resumed_from_step": resumed_state.get("global_step"),
        "processes": distributed.world_size(),
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
        "log_history": trainer.state.log_history,
    }
    if trainer.eval_dataset is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    return metrics


def adapter_state_dict(trainer) -> dict | None:
    """The full (unsharded) weights to save the adapter from, or None to let peft read them from the model.

    Under FSDP every process holds a shard: gathering them is a collective that every process must enter,
    or the main process waits forever for the others (the others must not skip it).
    """
    if getattr(trainer, "is_fsdp_enabled", False):
        return trainer.accelerator.get_state_dict(trainer.model)
    return None


def save_run(trainer, tokenizer, run: RunFolder, metrics: dict) -> None:
    """Stage 5: adapter and tokenizer, then the metrics file that marks the run finished (one process writes;
    every process takes part in gathering sharded weights)."""
    state_dict = adapter_state_dict(trainer)
    if distributed.is_main():
        trainer.model.save_pretrained(run.adapter_dir, state_dict=state_dict, save_embedding_layers=False)
        tokenizer.save_pretrained(run.adapter_dir)
        results.write_json_atomic(run.train_metrics_file, metrics)
    distributed.barrier()


def check_fsdp_combinations(settings: TrainingSettings) -> None:
    """What does not work with a sharded model, refused before any work."""
    if settings.select_on:
        raise UsageError(
            "--select_on is not supported under FSDP (generating inside training would need every process in "
            "every sharded layer); save each epoch (--save_steps epoch) and score the checkpoints afterwards "
            "with the inference script (--checkpoint STEP --split validation)"
        )
    if settings.compile_layers:
        raise UsageError(
            "--compile_layers is not supported under FSDP (configs/fsdp_qlora.yaml shards with "
            "use_orig_params false, which torch.compile does not take); use it on one GPU or with configs/ddp.yaml"
        )


def train(task, settings: TrainingSettings) -> dict:
    """Fine-tune ``task`` with ``settings`` (resolved by ``settings.resolve``) and write the run folder; returns
    the training metrics."""
    task = get_task(task)
    distributed.init()
    if settings.packing and settings.use_flash_attention:
        raise UsageError("--packing uses a 4-D attention mask, which flash_attention_2 does not take; use SDPA")
    if distributed.fsdp_requested():
        check_fsdp_combinations(settings)
    run = RunFolder(settings.experiment_dir or default_run_dir(task, settings))
    run.check_new(settings.overwrite, settings.resume)
    distributed.barrier()  # every process has checked before the main one writes anything

    if settings.select_on:
        selection_metrics(settings.select_on, task)  # a bad name fails before any work
        if not (settings.validation_file or settings.validation_fraction):
            raise UsageError("--select_on needs validation data: --validation_file or --validation_fraction")
    prepared = prepare_examples(task, settings)
    log.info(
        "effective batch %d = %d per device x %d accumulation x %d processes",
        settings.batch_size * settings.grad_accum * distributed.world_size(),
        settings.batch_size,
        settings.grad_accum,
        distributed.world_size(),
    )
    layout = modeling.model_layout(prepared.model_source)
    targets = modeling.lora_targets(layout, settings.full_tune, settings.lora_target_modules)
    log.info("LoRA on %s (%s model)", ", ".join(targets), layout.model_type)
    checkpoint, resumed_state = start_run_folder(run, settings)  # everything above was checked first
    if distributed.is_main():
        results.write_json_atomic(run.config_file, run_config(task, settings, prepared, targets))
    trainer = build_trainer(settings, prepared, run, targets)
    if settings.select_on:
        trainer.add_callback(
            ScoreCheckpoints(
                task,
                selection_metrics(settings.select_on, task),
                prepared.validation_rows,
                prepared.fmt,
                prepared.tokenizer,
                prepared.end_token,
                prepared.label_names,
                settings.max_seq_length,
                run,
            )
        )
    micro_batch = memory_budget.fit_to_budget(trainer, settings.max_memory_gb)
    metrics = fit(trainer, checkpoint, resumed_state, run)
    metrics["memory_budget"] = micro_batch
    save_run(trainer, prepared.tokenizer, run, metrics)
    metrics["run_dir"] = str(run.path)
    return metrics


def _last_logged_loss(trainer) -> float | None:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    value = losses[-1] if losses else None
    return value if value is None or math.isfinite(value) else None
