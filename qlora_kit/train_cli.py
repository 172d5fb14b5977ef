"""The shared body of the two training scripts: parse, train, print."""

from __future__ import annotations

import argparse
import json

from .cli import add_data_args, add_model_args, add_training_args
from .errors import run_main, setup_logging


def build_parser(task: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, training=True)
    add_data_args(parser, task, training=True)
    add_training_args(parser, task)
    return parser


def main(task: str, args: argparse.Namespace) -> dict:
    from . import distributed
    from .training import train

    metrics = train(task, args)
    if not distributed.is_main():
        return metrics
    summary = {key: metrics[key] for key in ("train_loss", "final_loss", "global_steps", "train_runtime_s",
                                             "trained_tokens", "tokens_per_second", "peak_gpu_memory_gb")}
    if "eval_loss" in metrics:
        summary["eval_loss"] = metrics["eval_loss"]
    print(json.dumps(summary, indent=2))
    print(f"run folder: {metrics['run_dir']}")
    return metrics


def entry_point(task: str, description: str) -> None:
    args = build_parser(task, description).parse_args()
    setup_logging()
    run_main(lambda: main(task, args))
