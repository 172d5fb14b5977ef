"""Choose the decoding on validation: the current one or a candidate, by the task's metric averaged over runs.

Each run's chosen checkpoint (its selection.json) has been scored on validation with both decodings, in the
folders metrics_validation_step-N[_SUFFIX] (e.g. greedy's from training, suffix "", against beam search's,
"beams-4"; or "constrained" against "likelihood"). The candidate is chosen when the mean over the runs of its
metric sum (e.g. rouge1+rouge2) is higher; the JSON holds every run's two scores, the mean difference and the
choice. Only validation is read: the test split is scored afterwards, once, with what was chosen.

Usage: python reproduce/choose_decoding.py --current "" --candidate beams-4 --select_on rouge1+rouge2 RUN...
           --out choice.json
(prints the choice, "candidate" or "current", as its last line)
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qlora_kit.run_folder import RunFolder  # noqa: E402


def choose(scores: list[dict]) -> dict:
    """``scores``: per run, {"current": x, "candidate": y}; the candidate wins when its mean is strictly higher."""
    differences = [run["candidate"] - run["current"] for run in scores]
    mean = statistics.mean(differences)
    return {
        "mean_difference_candidate_minus_current": mean,
        "differences": differences,
        "choice": "candidate" if mean > 0 else "current",
    }


def run_scores(run: RunFolder, suffixes: dict, metrics: list[str]) -> dict:
    step = run.chosen_step()
    if step is None:
        raise SystemExit(f"{run.path}: no checkpoint chosen on validation (selection.json)")
    score = {}
    for name, suffix in suffixes.items():
        found = run.evaluation("validation", step, suffix).metrics()
        if found is None:
            raise SystemExit(f"{run.path}: no validation score of the {name} decoding ({suffix!r}) at step {step}")
        score[name] = sum(found[metric] for metric in metrics)
    return {"run": str(run.path), "step": step, **score}


def main(args) -> str:
    metrics = args.select_on.split("+")
    suffixes = {"current": args.current, "candidate": args.candidate}
    scores = [run_scores(RunFolder(path), suffixes, metrics) for path in args.runs]
    result = {**suffixes, "metric": args.select_on, "split": "validation", "runs": scores, **choose(scores)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for score in scores:
        print(
            f"{score['run']}: {args.current or 'default'} {score['current']:.4f}, {args.candidate} {score['candidate']:.4f}"
        )
    print(result["choice"])
    return result["choice"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--current", default="", help="evaluation folder suffix of the decoding in use")
    parser.add_argument("--candidate", required=True, help="evaluation folder suffix of the candidate decoding")
    parser.add_argument("--select_on", required=True, help="metrics summed, e.g. rouge1+rouge2")
    parser.add_argument("--out", required=True)
    main(parser.parse_args())
