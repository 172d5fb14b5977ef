"""Compare evaluations of the same rows run under different settings: their speed, and how often their answers agree.

    python3 reproduce/compare_evaluations.py pytorch=R/kernels/pytorch liger=R/kernels/liger \
        --device "NVIDIA H100 80GB HBM3" --out benchmarks/results/kernels_smollm2_zero_shot.json

Each NAME=FOLDER is an evaluation's output folder (metrics.json and predictions.jsonl). For every folder: its
generation time, examples a second and the settings that bear on speed (its element-wise kernels, batch budget); for
every pair: the share of rows whose generated text is the same, and whose first PREFIX characters are (where greedy
answers part, a near-tie flipped by a rounding difference; how soon says how much). The rows must be the same ones.
The JSON keeps numbers only, no text from the rows.
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
PREFIX = 5


def agreement(outputs_a: list[str], outputs_b: list[str], prefix: int = PREFIX) -> dict:
    """The share of rows with the same output, and with the same first ``prefix`` characters."""
    rows = len(outputs_a)
    return {
        "rows": rows,
        "same_output": sum(a == b for a, b in zip(outputs_a, outputs_b)) / rows,
        f"same_first_{prefix}_characters": sum(a[:prefix] == b[:prefix] for a, b in zip(outputs_a, outputs_b)) / rows,
    }


def read_evaluation(path: str) -> tuple[dict, list[str], list]:
    """An evaluation folder's metrics, and its outputs and row ids in id order (as qlora_kit.compare reads them)."""
    from qlora_kit.compare import evaluation_folder, read_predictions
    from qlora_kit.errors import UsageError
    from qlora_kit.run_folder import METRICS

    try:
        folder = evaluation_folder(path)
        records = read_predictions(folder)
    except UsageError as error:
        raise SystemExit(f"error: {error}") from None
    metrics = json.loads((folder / METRICS).read_text(encoding="utf-8"))
    return metrics, [record["output"] for record in records], [record["id"] for record in records]


def main(args) -> int:
    named = {}
    for item in args.evaluations:
        name, _, folder = item.partition("=")
        if not name or not folder:
            raise SystemExit(f"error: {item!r}: give each evaluation as NAME=FOLDER")
        named[name] = read_evaluation(folder)
    ids = {name: row_ids for name, (_, _, row_ids) in named.items()}
    first = next(iter(ids))
    for name, row_ids in ids.items():
        if row_ids != ids[first]:
            raise SystemExit(f"error: {name} evaluated other rows than {first}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: {out} exists; pass --overwrite to replace it")
    result = {
        "command": " ".join(["python3", "reproduce/compare_evaluations.py", *sys.argv[1:]]),
        "device": args.device,
        "setting": args.setting,
        "evaluations": {
            name: {
                "inference_kernels": metrics["config"].get("inference_kernels"),
                "max_batch_tokens": metrics.get("max_batch_tokens"),
                "examples": metrics.get("n"),
                "generation_seconds": metrics.get("generation_seconds"),
                "examples_per_second": metrics.get("examples_per_second"),
                "versions": metrics["config"].get("versions"),
            }
            for name, (metrics, _, _) in named.items()
        },
        "pairs": {f"{a} / {b}": agreement(named[a][1], named[b][1]) for a, b in itertools.combinations(named, 2)},
    }
    print("| evaluation | kernels | batch budget | generation s | examples/s |\n|---|---|---|---|---|")
    for name, entry in result["evaluations"].items():
        print(
            f"| {name} | {entry['inference_kernels']} | {entry['max_batch_tokens']} | "
            f"{entry['generation_seconds']:.2f} | {entry['examples_per_second']:.1f} |"
        )
    print(f"\n| pair | same output | same first {PREFIX} characters |\n|---|---|---|")
    for pair, shares in result["pairs"].items():
        print(f"| {pair} | {shares['same_output']:.2%} | {shares[f'same_first_{PREFIX}_characters']:.2%} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("evaluations", nargs="+", metavar="NAME=FOLDER")
    parser.add_argument("--device", default="", help="the GPU the evaluations ran on, as the JSON should name it")
    parser.add_argument("--setting", default="", help="what the evaluations ran (model, task, prompt), in words")
    parser.add_argument("--out", required=True, help="the JSON to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    sys.exit(main(parser.parse_args()))
