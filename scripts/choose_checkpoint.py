"""Choose the best checkpoint of one or more runs by their scores on the validation split.

Evaluate checkpoints first (train with --save_steps epoch --keep_checkpoints N, then run the inference script
with --checkpoint STEP --split validation for each); this reads every metrics_validation_step-N folder of
the runs, prints them, and names the best by the sum of --metrics (ties: fewer invalid answers, then the
earlier checkpoint). The test set is never read.

Usage: python scripts/choose_checkpoint.py RUN [RUN ...] --metrics accuracy [--out chosen.json]
       python scripts/choose_checkpoint.py RUN [RUN ...] --metrics rouge1 rouge2
The last line printed is "RUN STEP", for shell scripts.
"""

import argparse
import sys
from pathlib import Path

from qlora_kit.errors import UsageError, run_main
from qlora_kit.report import checkpoint_scores, choose_checkpoint
from qlora_kit.results import write_json_atomic


def main(args) -> None:
    scores = []
    for run in args.runs:
        if not Path(run).is_dir():
            raise UsageError(f"{run}: no such run folder")
        found = checkpoint_scores(Path(run), args.split)
        if not found:
            print(f"{run}: no checkpoint evaluated on {args.split} (metrics_{args.split}_step-N)", file=sys.stderr)
        scores += found
    try:
        best = choose_checkpoint(scores, args.metrics)
    except ValueError as error:
        raise UsageError(f"{', '.join(args.runs)}: {error} on {args.split}")
    for score in scores:
        mark = "*" if score is best else " "
        values = "  ".join(f"{name} {score[name]:.4f}" for name in args.metrics)
        invalid = f"  invalid {score['invalid_rate']:.4f}" if score.get("invalid_rate") is not None else ""
        print(f"{mark} {score['run']}  step {score['step']}  epoch {score['epoch']}  {values}{invalid}")
    if args.out:
        write_json_atomic(
            Path(args.out), {"split": args.split, "metrics": args.metrics, "chosen": best, "candidates": scores}
        )
    print(f"{best['run']} {best['step']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders")
    parser.add_argument(
        "--metrics",
        nargs="+",
        required=True,
        help="metrics.json keys to add up, higher is better (accuracy, macro_f1, rouge1, rouge2, ...)",
    )
    parser.add_argument("--split", default="validation", help="default: %(default)s")
    parser.add_argument("--out", help="also write the candidates and the choice to this JSON file")
    run_main(lambda: main(parser.parse_args()))
