"""Gather the timed inference-script passes of gpu_session.sh's time_inference stage into one JSON per task.

    python3 reproduce/inference_timings.py R/time_inference R/bench_gen_real --device "NVIDIA H100 80GB HBM3" \
        --out_dir benchmarks/results

Each pass folder (TASK_passN) holds the script's metrics.json (its generation time, examples/s and its own wall
time: loading, tokenising, generating, scoring, writing) and wall.json (the whole process, imports included). The
JSON keeps every pass and the median, min and max of each time; the run each task was scored with (RUNS/TASK-run)
gives the training figures.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qlora_kit.metrics import spread  # noqa: E402

TIMES = ("generation_seconds", "examples_per_second", "wall_seconds", "process_wall_seconds")
SCRIPTS = {"news": "zephyr_classification_inference.py", "samsum": "zephyr_summarization_inference.py"}


def gather(task: str, passes: list[Path], run: Path, device: str, setting: str = "every default") -> dict:
    records, config = [], None
    for folder in passes:
        metrics = json.loads((folder / "metrics.json").read_text())
        wall = json.loads((folder / "wall.json").read_text())
        config = config or metrics["config"]  # the settings every pass ran with: the first pass's
        records.append(
            {
                "pass": folder.name,
                **{key: value for key, value in metrics.items() if not isinstance(value, (dict, list))},
                "process_wall_seconds": wall["wall_seconds"],
            }
        )
    training = json.loads((run / "train_metrics.json").read_text())
    return {
        "command": f"{SCRIPTS[task]} --experiment_dir RUN --test_file TEST ({setting}; RUN: the small-model recipe, "
        f"{training['global_steps']} steps), {len(passes)} processes, timed by reproduce/gpu_session.sh time_inference",
        "device": device,
        "versions": config["versions"],
        "adapter_product": config.get("adapter_product"),
        "decoding": config.get("decoding"),
        "training": {key: training.get(key) for key in ("global_steps", "train_runtime_s", "tokens_per_second")},
        "passes": records,
        **{key: spread([record[key] for record in records]) for key in TIMES},
    }


def main(args) -> int:
    root = Path(args.passes_dir)
    written = 0
    for task in SCRIPTS:
        passes = sorted(root.glob(f"{task}_pass*"), key=lambda path: int(path.name.rsplit("pass", 1)[1]))
        if not passes:
            continue
        result = gather(task, passes, Path(args.runs_dir) / f"{task}-run", args.device, args.setting)
        out = Path(args.out_dir) / f"inference_script_smollm2_{task}_{args.name}.json"
        if out.exists() and not args.overwrite:
            print(f"{out} exists (--overwrite replaces it)", file=sys.stderr)
            return 1
        out.write_text(json.dumps(result, indent=1) + "\n")
        times = ", ".join(
            f"{key} {result[key]['median']:.1f} ({result[key]['min']:.1f}-{result[key]['max']:.1f})" for key in TIMES
        )
        print(f"{task}: {len(passes)} passes, {times} -> {out}")
        written += 1
    if not written:
        print(f"no TASK_passN folders under {root}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("passes_dir", help="the time_inference stage's folder")
    parser.add_argument("runs_dir", help="the folder of the runs it scored (bench_gen_real's)")
    parser.add_argument("--device", default="unknown", help="the GPU the passes ran on")
    parser.add_argument("--out_dir", default="benchmarks/results")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--name", default="defaults", help="the files' last word: what the passes ran with")
    parser.add_argument(
        "--setting", default="every default", help="what the passes ran with, in words, for the file's command"
    )
    sys.exit(main(parser.parse_args()))
