"""Choosing the checkpoint on validation while training: every checkpoint saved is scored on the validation
split with the task's own metric (``--select_on accuracy``, ``--select_on rouge1+rouge2``), the curve and the
best step are recorded in the run folder, and the inference scripts use the best checkpoint by default."""

from __future__ import annotations

import logging
from argparse import Namespace

from transformers import TrainerCallback

from . import distributed, results
from .errors import UsageError
from .run_folder import RunFolder

log = logging.getLogger(__name__)


def selection_metrics(select_on: str, task) -> list[str]:
    """The metric names of ``--select_on`` ("rouge1+rouge2"), checked against what the task scores."""
    names = [name.strip() for name in select_on.split("+") if name.strip()]
    known = [name for name in task.summary_metrics if name not in ("n", "invalid_rate")]
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise UsageError(
            f"--select_on {select_on}: the {task.name} task scores {', '.join(known)} (join several with +)"
        )
    return names


def on_save_schedule(args, state) -> bool:
    """Whether the checkpoint saved at this step is one the run planned (every ``--save_steps`` steps, each
    epoch's end, the last step) rather than one a stop signal forced mid-way: only planned ones are candidates,
    so the choice does not depend on when a run was interrupted. The trainer's state holds the save interval in
    steps (``state.save_steps``, a share of the run already turned into steps), as its own schedule uses it."""
    step = state.global_step
    if state.max_steps and step >= state.max_steps:
        return True
    strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
    if strategy == "epoch":
        return state.epoch is not None and float(state.epoch).is_integer()
    if strategy == "steps" and state.save_steps:
        return step % state.save_steps == 0
    return False


class ScoreCheckpoints(TrainerCallback):
    """After each checkpoint is saved: generate for the validation rows with the model as it is, score, write
    ``metrics_validation_step-N`` (as ``--checkpoint N --split validation`` would) and the selection record."""

    def __init__(
        self,
        task,
        metrics: list[str],
        rows: list[dict],
        fmt,
        tokenizer,
        end_token: str,
        label_names: list[str],
        max_prompt_tokens: int,
        run: RunFolder,
    ):
        self.task, self.metrics, self.rows, self.fmt = task, metrics, rows, fmt
        self.tokenizer, self.end_token, self.label_names = tokenizer, end_token, label_names
        self.max_prompt_tokens, self.run = max_prompt_tokens, run
        existing = results.read_json(run.selection_file, "selection") if run.selection_file.is_file() else {}
        self.curve = existing.get("curve", [])  # a resumed run keeps the scores of its earlier checkpoints
        self.scored_here: set[int] = set()

    def on_save(self, args, state, control, model=None, **kwargs):
        import time

        import torch

        from .evaluation import run_generation, save_evaluation

        step = state.global_step
        if step in self.scored_here:  # a stop at a planned step saves it twice
            return control
        if not on_save_schedule(args, state):
            log.info("step %d: saved to resume from, not a candidate: not scored on validation", step)
            return control
        self.scored_here.add(step)
        generation_args = Namespace(
            max_new_tokens=self.task.max_new_tokens, batch_size=None, max_batch_tokens=None, decoding="greedy"
        )
        was_training = model.training
        started = time.perf_counter()
        model.eval()
        try:
            # layers compiled for training (--compile_layers) run eagerly here: decoding's shapes and cache
            # would otherwise compile graphs of their own
            with torch.compiler.set_stance("force_eager"):
                scores, records = run_generation(
                    self.task,
                    model,
                    self.tokenizer,
                    self.fmt,
                    self.rows,
                    generation_args,
                    self.max_prompt_tokens,
                    self.end_token,
                    self.label_names,
                )
        finally:
            model.train(was_training)
        scores["config"] = {
            "experiment_dir": str(self.run.path),
            "checkpoint": step,
            "split": "validation",
            "scored_while_training": True,
            # the training model's own layers: peft's, whatever the inference scripts would use on this device
            "adapter_product": "peft",
            "select_on": "+".join(self.metrics),
        }
        save_evaluation(self.run.evaluation("validation", step).folder, scores, records, started)
        self.curve = [point for point in self.curve if point["step"] != step]
        self.curve.append({"step": step, "epoch": state.epoch, **{name: scores[name] for name in self.metrics}})
        best = max(self.curve, key=lambda point: (sum(point[name] for name in self.metrics), -point["step"]))
        # the trainer never deletes its best checkpoint when it rotates old ones (--keep_checkpoints)
        state.best_model_checkpoint = str(self.run.checkpoint_dir(best["step"]))
        if distributed.is_main():
            results.write_json_atomic(
                self.run.selection_file,
                {"select_on": self.metrics, "split": "validation", "best_step": best["step"], "curve": self.curve},
            )
        log.info(
            "step %d on validation: %s (best so far: step %d)",
            step,
            ", ".join(f"{name} {scores[name]:.4f}" for name in self.metrics),
            best["step"],
        )
        return control
