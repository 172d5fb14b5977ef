"""Choose a training variant on validation: the recipe's runs or the variant's, seed by seed, by the task's metric.

Each run chose its checkpoint on validation while it trained (selection.json; `--select_on`). The current runs
(the recipe as shipped) and the candidate runs (the recipe with the variant's flags, e.g. `--epochs 5`) are
paired by seed: the same seed holds out the same validation examples, so each pair is scored on the same items.
The candidate is chosen when the mean over the pairs of its chosen checkpoint's metric sum (e.g. rouge1+rouge2)
is higher. Only validation is read: the test split is scored afterwards, once, and only for what was chosen.

Usage: python reproduce/choose_variant.py --current RUN... --candidate RUN... --select_on accuracy --out choice.json
(prints the choice, "candidate" or "current", as its last line)
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from choose_decoding import choose  # noqa: E402

from qlora_kit.run_folder import RunFolder  # noqa: E402


def chosen_score(path: str, metrics: list[str]) -> dict:
    """The run's seed, its checkpoint chosen on validation, that checkpoint's metric sum and its validation size."""
    run = RunFolder(path)
    step = run.chosen_step()
    if step is None:
        raise SystemExit(f"{path}: no checkpoint chosen on validation (selection.json)")
    found = run.evaluation("validation", step).metrics()
    if found is None:
        raise SystemExit(f"{path}: no validation score at its chosen step {step}")
    seed = json.loads((Path(path) / "run_config.json").read_text())["settings"]["seed"]
    return {"run": path, "seed": seed, "step": step, "n": found["n"], "score": sum(found[m] for m in metrics)}


def paired(current: list[str], candidate: list[str], metrics: list[str]) -> list[dict]:
    """Per seed of the candidate runs: both runs' scores. Every candidate needs a current run of its seed, scored
    on as many validation examples."""
    by_seed = {}
    for path in current:
        score = chosen_score(path, metrics)
        by_seed[score["seed"]] = score
    pairs = []
    for path in candidate:
        other = chosen_score(path, metrics)
        mine = by_seed.get(other["seed"])
        if mine is None:
            raise SystemExit(f"{path}: no current run of seed {other['seed']} to compare with")
        if mine["n"] != other["n"]:
            raise SystemExit(f"{path}: {other['n']} validation examples against {mine['n']} in {mine['run']}")
        pairs.append(
            {
                "seed": other["seed"],
                "current_run": mine["run"],
                "current_step": mine["step"],
                "current": mine["score"],
                "candidate_run": path,
                "candidate_step": other["step"],
                "candidate": other["score"],
            }
        )
    return pairs


def main(args) -> str:
    metrics = args.select_on.split("+")
    pairs = paired(args.current, args.candidate, metrics)
    result = {"metric": args.select_on, "split": "validation", "runs": pairs, **choose(pairs)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for pair in pairs:
        print(f"seed {pair['seed']}: current {pair['current']:.4f}, candidate {pair['candidate']:.4f}")
    print(result["choice"])
    return result["choice"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--current", nargs="+", required=True, help="the recipe's runs")
    parser.add_argument("--candidate", nargs="+", required=True, help="the variant's runs, one per seed")
    parser.add_argument("--select_on", required=True, help="metrics summed, e.g. rouge1+rouge2")
    parser.add_argument("--out", required=True)
    main(parser.parse_args())
