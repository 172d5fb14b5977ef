"""QLoRA fine-tuning through trl's SFTTrainer (set up in ``sft_trainer``): ``train()`` runs the stages below, one
function each."""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from . import distributed, memory_budget, modeling, results
from . import settings as settings_lib
from .data import canonical_labels, map_to_known_labels
from .errors import Interrupted, UsageError
from .formatting import PromptFormat, build_training_examples, end_of_turn_token
from .packing import PackedCollator, packed_rows
from .run_folder import RunFolder
from .selection import ScoreCheckpoints, selection_metrics
from .settings import TrainingSettings
from .sft_trainer import StopOnSignal, liger_in_use, make_trainer, sft_config
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
    "fused_lora": "fused",
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
        fused_lora=settings.fused_lora,
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
    if settings.fused_lora:
        raise UsageError(
            "--fused_lora is not supported under FSDP (its backward reads the adapter and base weights that FSDP "
            "frees after the forward); use it on one GPU or with configs/ddp.yaml"
        )


def check_compiled_layers_without_liger(settings: TrainingSettings) -> None:
    """--compile_layers and Liger's kernels do not go together: torch.compile fails tracing Liger's Triton RMSNorm
    inside a compiled layer (measured on an H100 with liger-kernel 0.8.5 and torch 2.11, the small-model recipe with
    compiled layers). Where Liger's kernels would not run (the CPU, liger-kernel not installed) nothing is refused."""
    import torch

    if settings.compile_layers and liger_in_use(settings.use_liger_kernel, torch.cuda.is_available()):
        raise UsageError(
            "--compile_layers cannot compile Liger's kernels (--use_liger_kernel, on in --recipe small-model): "
            "add --no-use_liger_kernel (the compiled layers fuse their norms, RoPE and SwiGLU themselves)"
        )


def train(task, settings: TrainingSettings) -> dict:
    """Fine-tune ``task`` with ``settings`` (resolved by ``settings.resolve``) and write the run folder; returns
    the training metrics."""
    task = get_task(task)
    distributed.init()
    if settings.packing and settings.use_flash_attention:
        raise UsageError("--packing uses a 4-D attention mask, which flash_attention_2 does not take; use SDPA")
    check_compiled_layers_without_liger(settings)
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
