"""The shared body of the three evaluation scripts: parse, evaluate, print."""

from __future__ import annotations

import argparse

import prompts

from .cli import TASK_DEFAULTS, add_data_args, add_generation_args, add_model_args, positive_int
from .errors import run_main, setup_logging


def build_finetuned_parser(task: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment_dir", required=True, help="the training run folder to evaluate")
    parser.add_argument("--checkpoint", type=positive_int, default=None, metavar="STEP",
                        help="evaluate the adapter of the run's checkpoint at this optimizer step (kept with "
                             "--keep_checkpoints) instead of its final one; results go to metrics[_SPLIT]_step-STEP")
    parser.add_argument("--merge_adapter", action="store_true",
                        help="load the base in bf16 and merge the LoRA weights: faster generation, more memory")
    parser.add_argument("--use_flash_attention", action="store_true", help="use flash_attention_2 (needs flash-attn)")
    add_data_args(parser, task, training=False)
    add_generation_args(parser, task, baseline=False)
    return parser


def build_baseline_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task_type", choices=tuple(TASK_DEFAULTS), required=True)
    parser.add_argument("--prompt_type", choices=("zero-shot", "few-shot"), required=True)
    parser.add_argument("--prompt_style", choices=prompts.PROMPT_STYLES, default="seed",
                        help="seed: the original instruction prompt as plain text; chat: the same prompt as a "
                             "user turn of the chat template (default: %(default)s)")
    parser.add_argument("--shots", type=int, default=None,
                        help="few-shot examples: per class for classification (default 1), dialogues for "
                             "summarization (default 2)")
    add_model_args(parser)
    return parser


def parse_baseline_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    # Task-dependent flags and defaults (data columns, max_new_tokens, --decoding) need the task first;
    # --help without a task shows the classification ones.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task_type", choices=tuple(TASK_DEFAULTS), default="classification")
    known, _ = pre.parse_known_args(argv)
    task = known.task_type
    add_data_args(parser, task, training=False)
    add_generation_args(parser, task, baseline=True)
    args = parser.parse_args(argv)
    if args.shots is None:
        args.shots = TASK_DEFAULTS[task]["shots"]
    elif args.shots < 1:
        parser.error(f"argument --shots: must be at least 1, got {args.shots}")
    return args


def _print(metrics: dict) -> None:
    from . import distributed
    from .evaluation import summary_table

    if not distributed.is_main():
        return
    print(summary_table(metrics))
    print(f"results: {metrics['output_dir']}")
    if metrics.get("failed"):
        print(f"warning: {metrics['failed']} examples could not be run (see predictions.jsonl)")


def finetuned_entry_point(task: str, description: str) -> None:
    args = build_finetuned_parser(task, description).parse_args()
    setup_logging()

    def main():
        from .evaluation import evaluate_run

        _print(evaluate_run(task, args))

    run_main(main)


def baseline_entry_point(description: str) -> None:
    parser = build_baseline_parser(description)
    args = parse_baseline_args(parser)
    setup_logging()

    def main():
        from .evaluation import evaluate_baseline

        _print(evaluate_baseline(args))

    run_main(main)
