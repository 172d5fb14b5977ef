"""The layout of a training run's folder, in one place. Every path of a run is named here:

    RUN/run_config.json          every resolved setting (written before training starts)
    RUN/train_metrics.json       loss, speed, memory; its presence marks a finished training run
    RUN/adapter/                 the final LoRA adapter and tokenizer
    RUN/checkpoints/checkpoint-N trainer checkpoints (adapter, optimizer, trainer state)
    RUN/selection.json           with --select_on: every checkpoint's validation score and the best step
    RUN/metrics[_SPLIT][_step-N][_DECODING]/   one evaluation: metrics.json, predictions.jsonl

An evaluation folder (of a run or of a baseline) holds ``metrics.json`` (written last: it marks a finished
evaluation), ``predictions.jsonl`` and, while generating, ``predictions.partial[.rankN].jsonl``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .results import check_writable_dir, read_json

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
SELECTION = "selection.json"  # the checkpoint chosen on validation while training (--select_on)
TRAIN_METRICS = "train_metrics.json"
METRICS = "metrics.json"
PREDICTIONS = "predictions.jsonl"
PARTIAL_PREDICTIONS = "predictions.partial.jsonl"  # appended while generating (one per process); gone when finished
EVALUATION_PREFIX = "metrics"


@dataclass(frozen=True)
class Evaluation:
    """One evaluation folder of a run: which split, which checkpoint (None: the final adapter), and a suffix."""

    folder: Path
    split: str
    step: int | None
    suffix: str = ""

    @property
    def metrics_file(self) -> Path:
        return self.folder / METRICS

    def metrics(self) -> dict | None:
        try:
            return json.loads(self.metrics_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None


def evaluation_name(split: str = "test", step: int | None = None, suffix: str = "") -> str:
    """metrics[_SPLIT][_step-N][_SUFFIX]: the test split is the unnamed one."""
    name = EVALUATION_PREFIX + ("" if split == "test" else f"_{split}")
    if step is not None:
        name += f"_step-{step}"
    return name + (f"_{suffix}" if suffix else "")


def parse_evaluation_name(name: str) -> tuple[str, int | None, str] | None:
    """(split, step, suffix) of an evaluation folder's name, or None for a folder that is not one."""
    if name != EVALUATION_PREFIX and not name.startswith(EVALUATION_PREFIX + "_"):
        return None
    parts = name.split("_")[1:]
    split = "test"
    if parts and parts[0] == "validation":
        split, parts = "validation", parts[1:]
    step = None
    if parts and parts[0].startswith("step-"):
        if not parts[0][len("step-") :].isdigit():
            return None
        step, parts = int(parts[0][len("step-") :]), parts[1:]
    return split, step, "_".join(parts)


class RunFolder:
    """A training run's folder: its files, checkpoints and evaluations."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    config_file = property(lambda self: self.path / RUN_CONFIG)
    selection_file = property(lambda self: self.path / SELECTION)
    train_metrics_file = property(lambda self: self.path / TRAIN_METRICS)
    adapter_dir = property(lambda self: self.path / "adapter")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")

    @property
    def finished(self) -> bool:
        """Training finished (an evaluation may still be missing)."""
        return self.train_metrics_file.is_file()

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / f"checkpoint-{step}"

    def config(self) -> dict:
        """The run's settings; a clear error for a folder that is not a run."""
        if not self.path.is_dir():
            raise UsageError(f"--experiment_dir {self.path}: no such folder")
        return read_json(self.config_file, "run_config.json (not a training run folder)")

    def train_metrics(self) -> dict | None:
        try:
            return json.loads(self.train_metrics_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_steps(self) -> list[int]:
        """The optimizer steps of the complete checkpoints (their trainer state saved), oldest first."""
        return sorted(
            int(folder.name.split("-")[-1])
            for folder in self.checkpoints_dir.glob("checkpoint-*")
            if folder.name.split("-")[-1].isdigit() and (folder / "trainer_state.json").is_file()
        )

    def latest_checkpoint(self) -> Path | None:
        steps = self.checkpoint_steps()
        return self.checkpoint_dir(steps[-1]) if steps else None

    def checkpoint_state(self, step: int) -> dict | None:
        try:
            return json.loads((self.checkpoint_dir(step) / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def epoch_end_steps(self) -> list[int]:
        """The steps of the complete checkpoints saved at the end of an epoch (not on a signal mid-epoch)."""
        return list(self._epoch_end_checkpoints().values())

    def epoch_end_step(self, epoch: int) -> int:
        """The step of the checkpoint saved at the end of epoch ``epoch`` (1-based)."""
        found = self._epoch_end_checkpoints()
        if epoch not in found:
            have = ", ".join(f"epoch {e} (step {s})" for e, s in found.items()) or "none"
            raise UsageError(
                f"{self.path}: no checkpoint saved at the end of epoch {epoch} (epoch checkpoints: {have})"
            )
        return found[epoch]

    def _epoch_end_checkpoints(self) -> dict[int, int]:
        found = {}
        for step in self.checkpoint_steps():
            state = read_json(self.checkpoint_dir(step) / "trainer_state.json", "trainer state")
            epoch = state.get("epoch") or 0
            if epoch >= 1 and abs(epoch - round(epoch)) < 1e-6:
                found[round(epoch)] = step
        return found

    def chosen_step(self) -> int | None:
        """The checkpoint step chosen on validation while training (--select_on), if any."""
        if not self.selection_file.is_file():
            return None
        return read_json(self.selection_file, "selection").get("best_step")

    def default_checkpoint(self, checkpoint: int | None, final_adapter: bool = False) -> int | None:
        """The checkpoint to use: the one asked for, else (unless ``final_adapter``) the one chosen on validation
        while training; None means the final adapter."""
        if checkpoint is not None or final_adapter or self.chosen_step() is None:
            return checkpoint
        log.info(
            "using the checkpoint chosen on validation while training: step %d (--final_adapter for the final one)",
            self.chosen_step(),
        )
        return self.chosen_step()

    def adapter(self, checkpoint: int | None = None) -> Path:
        """The folder of the final adapter, or of the adapter saved at optimizer step ``checkpoint``."""
        if checkpoint is None:
            if not (self.adapter_dir / "adapter_config.json").is_file():
                raise UsageError(
                    f"--experiment_dir {self.path}: no trained adapter (the run did not finish; "
                    "--checkpoint STEP evaluates one of its checkpoints)"
                )
            return self.adapter_dir
        steps = self.checkpoint_steps()
        if checkpoint not in steps:
            have = ", ".join(map(str, steps)) or "none"
            raise UsageError(
                f"--checkpoint {checkpoint}: {self.checkpoints_dir} has no complete checkpoint-"
                f"{checkpoint} (checkpoints there: {have})"
            )
        return self.checkpoint_dir(checkpoint)

    # ------------------------------------------------------------------ evaluations
    def evaluation(self, split: str = "test", step: int | None = None, suffix: str = "") -> Evaluation:
        return Evaluation(self.path / evaluation_name(split, step, suffix), split, step, suffix)

    def evaluations(self) -> list[Evaluation]:
        """Every finished evaluation of the run, by split, step and suffix."""
        found = []
        for folder in sorted(self.path.glob(EVALUATION_PREFIX + "*")):
            parsed = parse_evaluation_name(folder.name)
            if parsed and (folder / METRICS).is_file():
                found.append(Evaluation(folder, *parsed))
        return sorted(found, key=lambda e: (e.split, e.step is not None, e.step or 0, e.suffix))

    def scored_checkpoints(self, split: str = "validation", suffix: str = "") -> list[Evaluation]:
        """The run's checkpoints evaluated on ``split`` (with ``--checkpoint``), oldest first."""
        return [e for e in self.evaluations() if e.split == split and e.step is not None and e.suffix == suffix]

    # ------------------------------------------------------------------ a new run
    def check_new(self, overwrite: bool, resume: bool = False) -> None:
        """Refuse a folder that holds a finished run (unless --overwrite) or an unfinished one (unless
        --resume or --overwrite); creates nothing."""
        occupied = self.path.exists() and any(self.path.iterdir())
        if resume and not overwrite:
            if self.finished:
                raise UsageError(f"--experiment_dir {self.path} holds a finished run: nothing to resume")
            if not self.config_file.is_file():
                raise UsageError(f"--experiment_dir {self.path}: no run_config.json, so no run to resume")
        elif occupied and not overwrite:
            state = "a finished run" if self.finished else "an unfinished run (or other files)"
            hint = (
                "--overwrite to replace it" if self.finished else "--resume to continue it or --overwrite to replace it"
            )
            raise UsageError(f"--experiment_dir {self.path} already holds {state}; pass {hint}")
        check_writable_dir(self.path, "--experiment_dir")


def remove_partial_predictions(out_dir: Path) -> None:
    """Delete an evaluation's in-progress prediction files (every process's)."""
    for partial in Path(out_dir).glob(partial_predictions_glob()):
        partial.unlink()


def partial_predictions_glob() -> str:
    stem, suffix = PARTIAL_PREDICTIONS.rsplit(".", 1)
    return f"{stem}*.{suffix}"  # per-process files add .rankN before the suffix


def partial_predictions_file(out_dir: Path, rank: int = 0, processes: int = 1) -> Path:
    if processes == 1:
        return Path(out_dir) / PARTIAL_PREDICTIONS
    stem, suffix = PARTIAL_PREDICTIONS.rsplit(".", 1)
    return Path(out_dir) / f"{stem}.rank{rank}.{suffix}"
