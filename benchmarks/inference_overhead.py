"""Where an evaluation's time goes besides generating: the fine-tuned inference script's whole run, in one process,
with the engine's ``generate`` replaced by instant answers (every prompt gets the first label, or its own last 40
tokens as a summary), so that what is left is loading the model and adapter, reading the data, tokenising, scoring
(with its bootstrap intervals) and writing. Prints and writes the wall time and the cumulative seconds of each stage.

Usage (a trained run; the CPU is enough, since nothing is generated):
    python benchmarks/inference_overhead.py --task classification --experiment_dir RUN \\
        --test_file newsgroups/test.jsonl.gz --out benchmarks/results/inference_overhead_newsgroups_cpu.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

# the stages timed, by the function that runs each (module file, function name)
STAGES = {
    "loading the model and adapter": ("evaluation.py", "_load_finetuned"),
    "tokenising the prompts": ("evaluation.py", "plan_job"),
    "scoring, with bootstrap intervals": ("evaluation.py", "score"),
    "writing the run's files": ("evaluation.py", "save_evaluation"),
}


def package_checkout() -> dict:
    """Which qlora_kit ran (PYTHONPATH may name another checkout, to time it beside this one): its folder and
    commit."""
    import subprocess

    import qlora_kit

    folder = Path(qlora_kit.__file__).parent
    commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True)
    return {"folder": str(folder), "commit": commit.stdout.strip() or None}


# A summary's length in tokens (SAMSum's are about 25 words): what scoring an instant answer compares
SUMMARY_TOKENS = 40


def instant_answers(model, tokenizer, prompts, *, label_sequences=None, on_batch=None, **settings):
    """``generate``'s result without running the model: the first label's tokens for every prompt, or a summary's
    length of the prompt's own last tokens (so that scoring compares texts of a summary's length, as it would)."""
    from qlora_kit.generation import GenerationResult

    answers = [list(label_sequences[0]) if label_sequences else list(prompt[-SUMMARY_TOKENS:]) for prompt in prompts]
    if on_batch is not None:
        on_batch(list(range(len(prompts))), answers)
    return GenerationResult(outputs=answers)


def main(args) -> dict:
    import zephyr_shaped

    from qlora_kit import evaluation
    from qlora_kit.eval_cli import build_finetuned_parser, finetuned_main

    evaluation.generate = instant_answers  # the name evaluation calls
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="inference_overhead_")
    argv = ["--experiment_dir", args.experiment_dir, "--test_file", args.test_file, "--output_dir", output_dir]
    if args.task == "classification":
        argv += ["--decoding", "constrained"]
    if args.max_prompt_tokens:
        argv += ["--max_prompt_tokens", str(args.max_prompt_tokens)]
    script_args = build_finetuned_parser(args.task, "").parse_args(argv)
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    metrics = finetuned_main(args.task, script_args)
    profile.disable()
    seconds = time.perf_counter() - started
    stats = pstats.Stats(profile).stats  # (file, line, function) -> (calls, ..., tottime, cumtime, callers)
    stages = {
        stage: round(sum(v[3] for k, v in stats.items() if k[0].endswith(os.sep + file) and k[2] == name), 3)
        for stage, (file, name) in STAGES.items()
    }
    result = {
        "command": " ".join(sys.argv),
        "examples": metrics.get("n"),
        "wall_seconds_without_generation": round(seconds, 3),
        "stage_seconds": stages,
        "cpu_count": os.cpu_count(),
        "package": package_checkout(),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        zephyr_shaped.write_result(Path(args.out), result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("classification", "summarization"), required=True)
    parser.add_argument("--experiment_dir", required=True, help="a trained run folder")
    parser.add_argument("--test_file", required=True)
    parser.add_argument(
        "--max_prompt_tokens", type=int, default=None, help="the script's flag (default: the run's max_seq_length)"
    )
    parser.add_argument("--output_dir", default=None, help="where the script writes (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="a JSON file for the figures")
    main(parser.parse_args())
