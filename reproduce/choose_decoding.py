"""Choose the decoding on validation: greedy or beam search, by the task's metric averaged over runs.

Each run's chosen checkpoint (its selection.json) was scored on validation greedily while it trained
(metrics_validation_step-N) and, by the lab's `samsum_beams` stage, with beam search
(metrics_validation_step-N_beams-B). Beam search is chosen when the mean over the runs of its metric sum
(e.g. rouge1+rouge2) is higher than greedy's; the JSON holds every run's two scores, the mean difference and
the choice. Only validation is read: the test split is scored afterwards, once, with what was chosen.

Usage: python reproduce/choose_decoding.py --beams 4 --select_on rouge1+rouge2 RUN... --out choice.json
(prints the choice, "beams" or "greedy", as its last line)
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qlora_kit.run_folder import RunFolder  # noqa: E402


def choose(scores: list[dict]) -> dict:
    """``scores``: per run, {"greedy": x, "beams": y}; beam search wins when its mean is strictly higher."""
    differences = [run["beams"] - run["greedy"] for run in scores]
    mean = statistics.mean(differences)
    return {
        "mean_difference_beams_minus_greedy": mean,
        "differences": differences,
        "choice": "beams" if mean > 0 else "greedy",
    }


def run_scores(run: RunFolder, beams: int, metrics: list[str]) -> dict:
    step = run.chosen_step()
    if step is None:
        raise SystemExit(f"{run.path}: no checkpoint chosen on validation (selection.json)")
    score = {}
    for name, suffix in (("greedy", ""), ("beams", f"beams-{beams}")):
        found = run.evaluation("validation", step, suffix).metrics()
        if found is None:
            raise SystemExit(f"{run.path}: no {name} validation score at step {step}")
        score[name] = sum(found[metric] for metric in metrics)
    return {"run": str(run.path), "step": step, **score}


def main(args) -> str:
    metrics = args.select_on.split("+")
    scores = [run_scores(RunFolder(path), args.beams, metrics) for path in args.runs]
    result = {"beams": args.beams, "metric": args.select_on, "split": "validation", "runs": scores, **choose(scores)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for score in scores:
        print(f"{score['run']}: greedy {score['greedy']:.4f}, {args.beams} beams {score['beams']:.4f}")
    print(result["choice"])
    return result["choice"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--beams", type=int, required=True)
    parser.add_argument("--select_on", required=True, help="metrics summed, e.g. rouge1+rouge2")
    parser.add_argument("--out", required=True)
    main(parser.parse_args())
