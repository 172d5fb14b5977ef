"""Compare two evaluations of the same test items: "B minus A: +x (95% CI a..b)", paired.

Usage:
    python scripts/compare_runs.py RUN_A RUN_B                  # run folders: their test evaluations
    python scripts/compare_runs.py RUN_A/metrics_step-620 RUN_B/metrics --out diff.json

Classification: accuracy difference with a paired bootstrap interval and McNemar's exact test; summarization:
ROUGE-1/2/L differences with paired bootstrap intervals (1,000 resamples of the examples, fixed seed).
"""

import argparse
from pathlib import Path

from qlora_kit.compare import compare, describe
from qlora_kit.errors import run_main
from qlora_kit.results import write_json_atomic


def main(args) -> dict:
    result = compare(args.a, args.b)
    print(describe(result))
    if args.out:
        write_json_atomic(Path(args.out), result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="evaluation folder (metrics.json + predictions) or run folder: A")
    parser.add_argument("b", help="the same for B, scored on the same examples")
    parser.add_argument("--out", help="also write the comparison to this JSON file")
    run_main(lambda: main(parser.parse_args()))
