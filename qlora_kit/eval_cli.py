"""The shared body of the three evaluation scripts: parse, evaluate, print."""

from __future__ import annotations

import argparse

from . import console
from .cli import (
    add_adapter_args,
    add_data_args,
    add_generation_args,
    add_model_args,
    add_prompt_style_arg,
    add_verbose_arg,
)
from .errors import run_main
from .tasks import TASKS, get_task


def build_finetuned_parser(task, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_adapter_args(parser, "evaluate")  # a checkpoint's results go to metrics[_SPLIT]_step-STEP
    parser.add_argument(
        "--merge_adapter",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="merge the LoRA weights into the base before generating (a 4-bit base is loaded in bf16 for it: "
        "more memory). Default: merged on a GPU when the run's base is 16-bit (measured faster), kept apart "
        "otherwise; --no-merge_adapter keeps it apart",
    )
    parser.add_argument("--use_flash_attention", action="store_true", help="use flash_attention_2 (needs flash-attn)")
    add_data_args(parser, task)
    add_generation_args(parser, task, baseline=False)
    add_verbose_arg(parser)
    return parser


def build_baseline_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task_type", choices=tuple(TASKS), required=True)
    parser.add_argument("--prompt_type", choices=("zero-shot", "few-shot"), required=True)
    add_prompt_style_arg(parser)
    parser.add_argument(
        "--shots",
        type=int,
        default=None,
        help="few-shot examples: per label for classification (default 1), dialogues for summarization (default 2)",
    )
    add_model_args(parser)
    add_verbose_arg(parser)
    return parser


def parse_baseline_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    # Task-dependent flags and defaults (data columns, max_new_tokens, --decoding) need the task first;
    # --help without a task shows the classification ones.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task_type", choices=tuple(TASKS), default="classification")
    known, _ = pre.parse_known_args(argv)
    task = get_task(known.task_type)
    add_data_args(parser, task)
    add_generation_args(parser, task, baseline=True)
    args = parser.parse_args(argv)
    if args.shots is None:
        args.shots = task.shots
    elif args.shots < 1:
        parser.error(f"argument --shots: must be at least 1, got {args.shots}")
    return args


def _print(metrics: dict, task) -> None:
    from . import distributed
    from .evaluation import summary_table

    if not distributed.is_main():
        return
    print(summary_table(metrics, get_task(task)))
    print(f"results: {metrics['output_dir']}")
    if metrics.get("failed"):
        print(f"warning: {metrics['failed']} examples could not be run (see predictions.jsonl)")


def finetuned_main(task, args: argparse.Namespace) -> dict:
    from .evaluation import evaluate_run

    metrics = evaluate_run(task, args)
    _print(metrics, task)
    return metrics


def baseline_main(args: argparse.Namespace) -> dict:
    from .evaluation import evaluate_baseline

    metrics = evaluate_baseline(args)
    _print(metrics, args.task_type)
    return metrics


def finetuned_entry_point(task, description: str) -> None:
    args = build_finetuned_parser(task, description).parse_args()
    console.setup(args.verbose)
    run_main(lambda: finetuned_main(task, args))


def baseline_entry_point(description: str) -> None:
    args = parse_baseline_args(build_baseline_parser(description))
    console.setup(args.verbose)
    run_main(lambda: baseline_main(args))
