"""Collect every run folder and baseline result into tables (markdown), a CSV and PNG plots.

Usage:
    python make_report.py [experiments] [baseline_results] [--out report] [--compare RUN_A RUN_B]
"""

import argparse
from pathlib import Path

from qlora_kit.errors import UsageError, run_main


def main(args):
    from qlora_kit.report import make_report

    if not Path(args.experiments).is_dir() and not Path(args.baselines).is_dir():
        raise UsageError(f"neither {args.experiments} nor {args.baselines} is a folder of results")
    print(make_report(Path(args.experiments), Path(args.baselines), Path(args.out), compare=args.compare))
    print(f"report written to {args.out}/ (report.md, runs.csv, accuracy_vs_samples.png, rouge_by_method.png)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="?", default="experiments")
    parser.add_argument("baselines", nargs="?", default="baseline_results")
    parser.add_argument("--out", default="report")
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="add B minus A, paired over the same test items (evaluation or run folders)",
    )
    run_main(lambda: main(parser.parse_args()))
