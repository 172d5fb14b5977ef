"""Run folders and result files: JSON and JSONL only (nothing is pickled), written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import UsageError

RUN_CONFIG = "run_config.json"
TRAIN_METRICS = "train_metrics.json"
ADAPTER_DIR = "adapter"
METRICS = "metrics.json"
PREDICTIONS = "predictions.jsonl"
PARTIAL_PREDICTIONS = "predictions.partial.jsonl"  # appended while generating (one per process); gone when finished


def _write_atomic(path: Path, write) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it over: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data) -> None:
    def write(handle):
        json.dump(data, handle, indent=2, ensure_ascii=False, default=str)
        handle.write("\n")

    _write_atomic(path, write)


def write_jsonl_atomic(path: Path, rows) -> None:
    _write_atomic(path, lambda handle: handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def remove_partial_predictions(out_dir: Path) -> None:
    """Delete an evaluation's in-progress prediction files (every process's)."""
    stem = Path(PARTIAL_PREDICTIONS).stem  # per-process files add .rankN before the suffix
    for partial in Path(out_dir).glob(f"{stem}*.jsonl"):
        partial.unlink()


def read_json(path: Path, what: str):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no {what} here")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: unreadable {what} ({error})")


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def check_writable_dir(path: Path, flag: str) -> None:
    """Fail early, with the flag's name, when ``path`` could not be created or written; creates nothing."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write there (permission denied on {existing})")


def check_run_dir(path: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse a folder that holds a finished run (unless --overwrite) or an unfinished one (unless
    --resume or --overwrite); creates nothing."""
    occupied = path.exists() and any(path.iterdir())
    finished = (path / TRAIN_METRICS).is_file()
    if resume and not overwrite:
        if finished:
            raise UsageError(f"--experiment_dir {path} holds a finished run: nothing to resume")
        if not (path / RUN_CONFIG).is_file():
            raise UsageError(f"--experiment_dir {path}: no run_config.json, so no run to resume")
    elif occupied and not overwrite:
        state = "a finished run" if finished else "an unfinished run (or other files)"
        hint = "--overwrite to replace it" if finished else "--resume to continue it or --overwrite to replace it"
        raise UsageError(f"--experiment_dir {path} already holds {state}; pass {hint}")
    check_writable_dir(path, "--experiment_dir")


def latest_checkpoint(path: Path) -> Path | None:
    """The newest complete trainer checkpoint in a run folder (one with its trainer state saved)."""
    steps = checkpoint_steps(path)
    return Path(path) / "checkpoints" / f"checkpoint-{steps[-1]}" if steps else None


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The optimizer steps of a run folder's complete checkpoints, oldest first."""
    return sorted(int(folder.name.split("-")[-1]) for folder in (Path(run_dir) / "checkpoints").glob("checkpoint-*")
                  if folder.name.split("-")[-1].isdigit() and (folder / "trainer_state.json").is_file())


def epoch_end_steps(run_dir: Path) -> list[int]:
    """The steps of the complete checkpoints saved at the end of an epoch (not on a signal mid-epoch)."""
    return list(_epoch_end_checkpoints(run_dir).values())


def epoch_end_step(run_dir: Path, epoch: int) -> int:
    """The step of the checkpoint a run saved at the end of epoch ``epoch`` (1-based)."""
    found = _epoch_end_checkpoints(run_dir)
    if epoch not in found:
        have = ", ".join(f"epoch {e} (step {s})" for e, s in found.items()) or "none"
        raise UsageError(f"{run_dir}: no checkpoint saved at the end of epoch {epoch} (epoch checkpoints: {have})")
    return found[epoch]


def _epoch_end_checkpoints(run_dir: Path) -> dict[int, int]:
    found = {}
    for step in checkpoint_steps(run_dir):
        state = read_json(Path(run_dir) / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json", "trainer state")
        epoch = state.get("epoch") or 0
        if epoch >= 1 and abs(epoch - round(epoch)) < 1e-6:
            found[round(epoch)] = step
    return found


def adapter_dir(run_dir: Path, checkpoint: int | None = None) -> Path:
    """The folder of a run's final adapter, or of the adapter saved at optimizer step ``checkpoint``."""
    run_dir = Path(run_dir)
    if checkpoint is None:
        if not (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
            raise UsageError(f"--experiment_dir {run_dir}: no trained adapter (the run did not finish; "
                             "--checkpoint STEP evaluates one of its checkpoints)")
        return run_dir / ADAPTER_DIR
    steps = checkpoint_steps(run_dir)
    if checkpoint not in steps:
        have = ", ".join(map(str, steps)) or "none"
        raise UsageError(f"--checkpoint {checkpoint}: {run_dir / 'checkpoints'} has no complete checkpoint-"
                         f"{checkpoint} (checkpoints there: {have})")
    return run_dir / "checkpoints" / f"checkpoint-{checkpoint}"


def load_run_config(run_dir: Path) -> dict:
    """The config of a training run; a clear error for a folder that is not one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"--experiment_dir {run_dir}: no such folder")
    return read_json(run_dir / RUN_CONFIG, "run_config.json (not a training run folder)")
