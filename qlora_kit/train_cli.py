"""The shared body of the two training scripts: parse, resolve the settings, train, print."""

from __future__ import annotations

import argparse
import json

from . import console
from . import settings as settings_lib
from .cli import add_training_args, given_settings
from .errors import run_main
from .tasks import get_task


def build_parser(task, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, task)
    return parser


def main(task, args: argparse.Namespace) -> dict | None:
    """Train ``task`` with the flags in ``args`` (or print the resolved settings with --print_config)."""
    task = get_task(task)
    settings, sources = settings_lib.resolve(task, given_settings(args))
    if getattr(args, "print_config", False):
        print(settings_lib.describe(settings, sources, task))
        return None
    from . import distributed
    from .training import train  # imports torch, transformers and trl: after the settings are known to be good

    metrics = train(task, settings)
    if not distributed.is_main():
        return metrics
    summary = {
        key: metrics[key]
        for key in (
            "train_loss",
            "final_loss",
            "global_steps",
            "train_runtime_s",
            "trained_tokens",
            "tokens_per_second",
            "peak_gpu_memory_gb",
        )
    }
    if "eval_loss" in metrics:
        summary["eval_loss"] = metrics["eval_loss"]
    print(json.dumps(summary, indent=2))
    print(f"run folder: {metrics['run_dir']}")
    return metrics


def entry_point(task, description: str) -> None:
    args = build_parser(task, description).parse_args()
    console.setup(args.verbose)
    run_main(lambda: main(task, args))
