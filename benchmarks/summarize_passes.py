"""Median and spread of a benchmark's repeated processes: the files of its passes (``..._pass1.json``,
``..._pass2.json``, ...) grouped by their name without the pass, each run's seconds, examples/s and peak GPU memory
as median (min-max) over the passes. Prints a markdown table; ``--out`` also writes it as JSON.

    python benchmarks/summarize_passes.py benchmarks/results/generation_throughput_budget_prefill_*_pass*.json
"""

import argparse
import json
import re
import sys
from pathlib import Path

from qlora_kit.metrics import spread

PASS = re.compile(r"_pass(\d+)$")
MEASURES = ("seconds", "examples_per_second", "peak_gpu_memory_gb")


def summarize(paths: list[Path]) -> dict:
    """{setting: {run: {measure: spread}}}, a setting being a file name without its pass (``_passN``)."""
    passes: dict[str, list[dict]] = {}
    for path in sorted(paths):
        match = PASS.search(path.stem)
        if not match:
            raise SystemExit(f"{path}: not a pass's file (its name should end in _passN.json)")
        runs = json.loads(path.read_text()).get("runs")
        if not isinstance(runs, dict) or not runs:
            raise SystemExit(f"{path}: no 'runs' to summarize")
        passes.setdefault(path.stem[: match.start()], []).append(runs)
    table = {}
    for setting, files in passes.items():
        names = [name for name in files[0] if all(name in runs for runs in files)]  # runs every pass has
        table[setting] = {
            name: {
                measure: spread([runs[name][measure] for runs in files])
                for measure in MEASURES
                if all(runs[name].get(measure) is not None for runs in files)
            }
            for name in names
        }
    return table


def markdown(table: dict) -> str:
    def cell(entry, digits):
        if entry is None:
            return "-"
        return f"{entry['median']:.{digits}f} ({entry['min']:.{digits}f}-{entry['max']:.{digits}f})"

    lines = ["| setting | run | passes | seconds | examples/s | peak GB |", "|---|---|---|---|---|---|"]
    for setting, runs in table.items():
        for name, measures in runs.items():
            count = next(iter(measures.values()))["n"] if measures else 0
            lines.append(
                f"| {setting} | {name} | {count} | {cell(measures.get('seconds'), 1)} | "
                f"{cell(measures.get('examples_per_second'), 1)} | {cell(measures.get('peak_gpu_memory_gb'), 2)} |"
            )
    return "\n".join(lines)


def main(args) -> None:
    table = summarize([Path(path) for path in args.files])
    print(markdown(table))
    if args.out:
        Path(args.out).write_text(json.dumps({"files": sorted(args.files), "settings": table}, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="the passes' JSON files (generation_throughput.py and the like)")
    parser.add_argument("--out", help="also write the table as JSON here")
    if len(sys.argv) == 1:
        parser.print_help()
        sys.exit(2)
    main(parser.parse_args())
