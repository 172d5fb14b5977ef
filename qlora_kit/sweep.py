"""Run a sweep planned by the shell scripts: train then evaluate each run, skip finished ones, log each run.

The shell scripts (sample_ablate.sh, run_lora.sh, baseline_inference.sh) keep the grids and
print one plan line per run; this module executes the plan:

    NAME <TAB> TRAIN_SCRIPT|- <TAB> EVAL_SCRIPT <TAB> ARGS FOR TRAINING (or for the baseline)

A run whose metrics.json exists is skipped, so a stopped sweep continues where it stopped; a
failed run is logged and the sweep goes on; the exit status says whether any run failed.
Extra arguments go to every Python call that accepts them (model, data files, --max_steps, --limit);
--batch_size goes to the training script of a run that trains (its generation batch stays automatic).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .run_folder import METRICS, RunFolder

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class PlannedRun:
    name: str
    train_script: str | None
    eval_script: str
    args: list[str]


def parse_plan(lines) -> list[PlannedRun]:
    runs = []
    for line in lines:
        if not line.strip():
            continue
        name, train, evaluate, args = (line.rstrip("\n").split("\t") + [""])[:4]
        runs.append(PlannedRun(name, None if train == "-" else train, evaluate, shlex.split(args)))
    return runs


def _parser_for(script: str, run_args: list[str]) -> argparse.ArgumentParser:
    from . import eval_cli, train_cli

    if script == "zephyr_baseline_inference.py":  # its options depend on the task of this run
        parser = eval_cli.build_baseline_parser("")
        eval_cli.parse_baseline_args(parser, run_args)
        return parser
    builders = {
        "zephyr_classification.py": lambda: train_cli.build_parser("classification", ""),
        "zephyr_summarization.py": lambda: train_cli.build_parser("summarization", ""),
        "zephyr_classification_inference.py": lambda: eval_cli.build_finetuned_parser("classification", ""),
        "zephyr_summarization_inference.py": lambda: eval_cli.build_finetuned_parser("summarization", ""),
    }
    if script not in builders:
        raise ValueError(f"unknown script {script}")
    return builders[script]()


def route(script: str, extra: list[str], run_args: list[str] = ()) -> list[str]:
    """The extra arguments that ``script`` accepts (a flag with its value, if it takes one)."""
    options = {}
    for action in _parser_for(script, list(run_args))._actions:
        for option in action.option_strings:
            options[option] = action.nargs != 0
    kept, index = [], 0
    while index < len(extra):
        flag = extra[index].split("=", 1)[0]
        takes_value = options.get(flag)
        width = 2 if takes_value and "=" not in extra[index] and index + 1 < len(extra) else 1
        if flag in options:
            kept += extra[index : index + width]
        index += width
    return kept


# Flags both kinds of script take with different meanings: in a run that trains, they are the training
# script's (--batch_size is the training micro-batch, not the generation batch).
TRAINING_MEANING = ("--batch_size",)


def _without(extra: list[str], flags: tuple[str, ...]) -> list[str]:
    kept, index = [], 0
    while index < len(extra):
        flag = extra[index].split("=", 1)[0]
        if flag in flags:
            index += 1 if "=" in extra[index] else 2
            continue
        kept.append(extra[index])
        index += 1
    return kept


def commands(run: PlannedRun, experiments: Path, baselines: Path, extra: list[str]) -> tuple[list[list[str]], Path]:
    """The Python calls of one run, and the metrics file whose existence means it is finished."""
    python = [sys.executable]
    if run.train_script is None:
        out = baselines / run.name
        call = python + [
            str(ROOT / run.eval_script),
            *run.args,
            "--output_dir",
            str(out),
            *route(run.eval_script, extra, run.args),
        ]
        return [call], out / METRICS
    folder = RunFolder(experiments / run.name)
    calls = []
    if not folder.finished:
        # An interrupted run continues from its newest checkpoint; a folder with no run in it starts again.
        restart = (["--resume"] if folder.config_file.is_file() else ["--overwrite"]) if folder.path.exists() else []
        calls.append(
            python
            + [
                str(ROOT / run.train_script),
                *run.args,
                "--experiment_dir",
                str(folder.path),
                *restart,
                *route(run.train_script, extra),
            ]
        )
    calls.append(
        python
        + [
            str(ROOT / run.eval_script),
            "--experiment_dir",
            str(folder.path),
            "--overwrite",
            *route(run.eval_script, _without(extra, TRAINING_MEANING)),
        ]
    )
    return calls, folder.evaluation().metrics_file


def _gpu_slots(gpus: str | None) -> list[str | None]:
    if gpus:
        return [g.strip() for g in gpus.split(",") if g.strip()]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        count = sum(line.startswith("GPU ") for line in listing.splitlines())
    except (OSError, subprocess.SubprocessError):
        count = 0
    return [str(i) for i in range(count)] if count > 1 else [None]


def execute(
    runs: list[PlannedRun],
    *,
    experiments: Path,
    baselines: Path,
    logs: Path,
    extra: list[str],
    dry_run: bool,
    gpus: str | None,
) -> int:
    pending = []
    for run in runs:
        calls, finished = commands(run, experiments, baselines, extra)
        if finished.is_file():
            print(f"[sweep] skip {run.name}: {finished} exists")
            continue
        pending.append((run, calls))
    if dry_run:
        for _, calls in pending:
            for call in calls:
                print("python " + shlex.join([str(Path(call[1]).relative_to(ROOT)), *call[2:]]))
        return 0
    slots = _gpu_slots(gpus)
    free = list(slots)
    logs.mkdir(parents=True, exist_ok=True)
    failures = []

    def work(item):
        run, calls = item
        slot = free.pop()
        env = dict(os.environ)
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
        log = logs / f"{run.name}.log"
        started = time.perf_counter()
        try:
            with open(log, "a", encoding="utf-8") as handle:
                for call in calls:
                    handle.write(f"\n+ {shlex.join(call)}\n")
                    handle.flush()
                    if subprocess.run(call, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode != 0:
                        failures.append(run.name)
                        print(f"[sweep] FAILED {run.name} (see {log})", flush=True)
                        return
            print(
                f"[sweep] done {run.name} in {time.perf_counter() - started:.0f}s"
                f"{'' if slot is None else f' on GPU {slot}'}",
                flush=True,
            )
        finally:
            free.append(slot)

    print(
        f"[sweep] {len(pending)} runs to do, {len(runs) - len(pending)} already finished, "
        f"{len(slots)} at a time; logs in {logs}",
        flush=True,
    )
    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        list(pool.map(work, pending))
    if failures:
        print(f"[sweep] {len(failures)} of {len(pending)} runs failed: {', '.join(failures)}")
        return 1
    print("[sweep] all runs finished")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", default=os.environ.get("EXPERIMENTS", "experiments"))
    parser.add_argument("--baselines", default=os.environ.get("BASELINES", "baseline_results"))
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY_RUN", "") not in ("", "0"))
    parser.add_argument("--gpus", default=os.environ.get("GPUS"))
    # Everything else passes through to every Python call that takes it.
    args, extra = parser.parse_known_args(argv)
    runs = parse_plan(sys.stdin)
    experiments = Path(args.experiments)
    return execute(
        runs,
        experiments=experiments,
        baselines=Path(args.baselines),
        logs=experiments / "logs",
        extra=extra,
        dry_run=args.dry_run,
        gpus=args.gpus,
    )


if __name__ == "__main__":
    sys.exit(main())
