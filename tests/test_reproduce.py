"""The lab in reproduce/ (what made the committed results on the GPU machine), run on the tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_script


def _gpu_session(stage, tiny_model, data_dir, tmp_path, script="gpu_session.sh", **extra_env):
    """Run one stage of reproduce/gpu_session.sh (or another lab script) on the tiny model, with the fixture data
    laid out as on the GPU."""
    import gzip

    data = tmp_path / "data"
    for task, files in (
        ("newsgroups", {"train": "news_train", "test": "news_test"}),
        ("samsum", {"train": "dialogues_train", "validation": "dialogues_test", "test": "dialogues_test"}),
    ):
        (data / task).mkdir(parents=True, exist_ok=True)
        for split, name in files.items():
            with gzip.open(data / task / f"{split}.jsonl.gz", "wt") as out:
                out.write((data_dir / f"{name}.jsonl").read_text())
    env = dict(
        os.environ,
        DATA_DIR=str(data),
        MODEL_GGUF=str(tiny_model),
        R=str(tmp_path / "r"),
        TARGET_EPOCHS="2",
        EXTRA_EVAL="--max_new_tokens 4",
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        **extra_env,
    )
    result = subprocess.run(
        ["bash", str(ROOT / "reproduce" / script), *stage.split()],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _gpu_session.stdout = result.stdout
    return tmp_path / "r" / stage


def test_gpu_session_targets_stage_end_to_end(tiny_model, data_dir, tmp_path):
    """The stage behind results/smollm2/runs/targets, on the tiny model and fixture data: every epoch scored
    on validation, one checkpoint per task chosen and only that one scored on test."""
    targets = _gpu_session("targets", tiny_model, data_dir, tmp_path)
    for task, decodings in (("classification", ["_constrained", "_greedy"]), ("summarization", [""])):
        chosen = json.loads((targets / f"chosen_{task}.json").read_text())
        assert len(chosen["candidates"]) == (6 if task == "classification" else 4)  # runs x 2 epochs
        run, step = Path(chosen["chosen"]["run"]), chosen["chosen"]["step"]
        assert all((run / f"metrics_step-{step}{suffix}" / "metrics.json").is_file() for suffix in decodings)
    # only the chosen checkpoint of each task was scored on test
    assert len(list(targets.glob("*/metrics_step-*"))) == 3


def test_gpu_session_validated_recipe_scores_the_full_data_twin_of_the_choice(tiny_model, data_dir, tmp_path):
    """validated_recipe chooses the 20 Newsgroups schedule and epoch on the held-out runs and scores, on test, the run
    trained on all the data with that schedule at that epoch (and nothing else)."""
    rounds = _gpu_session("validated_recipe", tiny_model, data_dir, tmp_path)
    chosen = json.loads((rounds / "chosen_classification.json").read_text())
    assert {Path(c["run"]).name for c in chosen["candidates"]} == {
        "news-heldout-constant_with_warmup",
        "news-heldout-cosine",
    }
    schedule = Path(chosen["chosen"]["run"]).name.removeprefix("news-heldout-")
    twin = rounds / f"news-full-{schedule}"
    state = json.loads(next(twin.glob("checkpoints/*/trainer_state.json")).read_text())
    steps_per_epoch = round(state["global_step"] / state["epoch"])
    step = steps_per_epoch * round(chosen["chosen"]["epoch"])
    assert json.loads((twin / "run_config.json").read_text())["settings"]["lr_scheduler"] == schedule
    scored = sorted(str(p.relative_to(rounds)) for p in rounds.glob("news-*/metrics_step-*"))
    assert scored == [f"news-full-{schedule}/metrics_step-{step}_{d}" for d in ("constrained", "greedy")]
    assert len(list(rounds.glob("samsum-*/metrics_step-*"))) == 1


def test_gpu_session_seeds_scores_on_test_only_the_checkpoint_chosen_on_validation(tiny_model, data_dir, tmp_path):
    """seeds: the small-model recipe once per seed and task; each run chooses its checkpoint on validation while
    it trains and only that one is scored on test; the seeds differ in what they learn."""
    seeds = _gpu_session(
        "seeds",
        tiny_model,
        data_dir,
        tmp_path,
        SEED_RUNS="news-0 samsum-0 news-1 samsum-1 newsfull-0 news+epochs2-0",
        EXTRA_TRAIN="--max_seq_length 256",
        EXTRA_TRAIN_SAMSUM="--logging_steps 3",
        VARIANT_epochs2="--epochs 2",
    )
    names = ["news+epochs2-seed-0", "news-seed-0", "news-seed-1", "newsfull-seed-0", "samsum-seed-0", "samsum-seed-1"]
    assert sorted(p.name for p in seeds.iterdir()) == names
    # a variant: the recipe with its own flags added, chosen and scored as the others
    variant = json.loads((seeds / "news+epochs2-seed-0" / "selection.json").read_text())
    assert len(variant["curve"]) == 2
    assert (seeds / "news+epochs2-seed-0" / f"metrics_step-{variant['best_step']}_constrained").is_dir()
    # all the training messages, nothing scored on validation, the last epoch scored on test
    full = seeds / "newsfull-seed-0"
    config = json.loads((full / "run_config.json").read_text())
    assert config["data"]["rows"]["held_out"] == 0 and not list(full.glob("metrics_validation*"))
    last = max(json.loads(f.read_text())["global_step"] for f in full.glob("checkpoints/*/trainer_state.json"))
    assert sorted(p.name for p in full.glob("metrics_step-*")) == [
        f"metrics_step-{last}_{d}" for d in ("constrained", "greedy")
    ]
    for task, suffixes in (("news", ["_constrained", "_greedy"]), ("samsum", [""])):
        adapters = []
        for seed in (0, 1):
            run = seeds / f"{task}-seed-{seed}"
            config = json.loads((run / "run_config.json").read_text())
            assert config["settings"]["seed"] == seed and config["settings"]["recipe"] == "small-model"
            # the flags for one task only went to that task's runs
            assert config["settings"]["logging_steps"] == (3 if task == "samsum" else 10)
            selection = json.loads((run / "selection.json").read_text())
            assert len(selection["curve"]) == 3  # the recipe's 3 epochs, each scored on validation
            step = selection["best_step"]
            assert sorted(p.name for p in run.glob("metrics_step-*")) == [f"metrics_step-{step}{s}" for s in suffixes]
            adapters.append((run / "adapter" / "adapter_model.safetensors").read_bytes())
        assert adapters[0] != adapters[1]

    # then the decodings chosen on validation over the runs, test scored with the candidate only if it won:
    # SAMSum greedy against beam search, 20 Newsgroups constrained against likelihood
    for stage, runs, suffixes in (
        ("samsum_beams", 2, ("", "beams-2")),
        ("news_likelihood", 3, ("constrained", "likelihood")),
    ):
        choice = json.loads(
            (_gpu_session(stage, tiny_model, data_dir, tmp_path, BEAMS="2") / "choice.json").read_text()
        )
        assert (choice["current"], choice["candidate"]) == suffixes and choice["split"] == "validation"
        assert len(choice["runs"]) == runs and choice["choice"] in ("candidate", "current")
        for score in choice["runs"]:
            run, step = Path(score["run"]), score["step"]
            for suffix in suffixes:
                assert (run / f"metrics_validation_step-{step}{'_' * bool(suffix)}{suffix}" / "metrics.json").is_file()
            scored = (run / f"metrics_step-{step}_{suffixes[1]}" / "metrics.json").is_file()
            assert scored == (choice["choice"] == "candidate")

    # the adapters packed for a later sitting: unpacked elsewhere, a run is scored again as the original was
    packed = tmp_path / "adapters.tgz"
    subprocess.run([sys.executable, str(ROOT / "reproduce" / "pack_adapters.py"), str(seeds), str(packed)], check=True)
    copy = tmp_path / "unpacked"
    copy.mkdir()
    subprocess.run(["tar", "xzf", str(packed), "-C", str(copy)], check=True)
    assert not list(copy.rglob("optimizer.pt")) and len(list(copy.glob("*/run_config.json"))) == 6
    again = copy / "samsum-seed-0"
    step = json.loads((again / "selection.json").read_text())["best_step"]
    run_script(
        "zephyr_summarization_inference.py",
        "--experiment_dir", str(again), "--split", "validation", "--max_new_tokens", "4",
        "--validation_file", str(tmp_path / "data" / "samsum" / "validation.jsonl.gz"),
        cwd=tmp_path,
    )  # fmt: skip
    original = json.loads((seeds / "samsum-seed-0" / f"metrics_validation_step-{step}" / "metrics.json").read_text())
    rescored = json.loads((again / f"metrics_validation_step-{step}" / "metrics.json").read_text())
    assert rescored["n"] == original["n"] and rescored["rouge1"] == pytest.approx(original["rouge1"], abs=1e-9)


def test_choosing_the_decoding_on_validation():
    sys.path.insert(0, str(ROOT / "reproduce"))
    from choose_decoding import choose

    assert choose([{"current": 0.6, "candidate": 0.7}, {"current": 0.6, "candidate": 0.55}])["choice"] == "candidate"
    assert choose([{"current": 0.6, "candidate": 0.6}])["choice"] == "current"  # a tie keeps what is in use
    assert choose([{"current": 0.6, "candidate": 0.65}, {"current": 0.6, "candidate": 0.5}])["choice"] == "current"


def _chosen_run(path: Path, seed: int, step: int, accuracy: float, n: int = 100) -> str:
    """A run folder as the seeds stage leaves it: its seed, its checkpoint chosen on validation and that score."""
    (path / f"metrics_validation_step-{step}").mkdir(parents=True)
    (path / "run_config.json").write_text(json.dumps({"settings": {"seed": seed}}))
    (path / "selection.json").write_text(json.dumps({"select_on": ["accuracy"], "best_step": step}))
    (path / f"metrics_validation_step-{step}" / "metrics.json").write_text(json.dumps({"n": n, "accuracy": accuracy}))
    return str(path)


def test_choosing_a_variant_pairs_the_runs_by_seed(tmp_path):
    """choose_variant.py compares each variant run with the recipe's run of the same seed, on validation only."""
    sys.path.insert(0, str(ROOT / "reproduce"))
    from choose_variant import paired

    current = [_chosen_run(tmp_path / f"news-seed-{seed}", seed, 60, score) for seed, score in ((0, 0.7), (1, 0.8))]
    variant = [
        _chosen_run(tmp_path / "news+e5-seed-1", 1, 100, 0.85),
        _chosen_run(tmp_path / "news+e5-seed-0", 0, 80, 0.6),
    ]
    pairs = paired(current, variant, ["accuracy"])
    assert [(p["seed"], p["current"], p["candidate"], p["candidate_step"]) for p in pairs] == [
        (1, 0.8, 0.85, 100),
        (0, 0.7, 0.6, 80),
    ]
    with pytest.raises(SystemExit, match="no current run of seed 2"):
        paired(current, [_chosen_run(tmp_path / "news+e5-seed-2", 2, 80, 0.9)], ["accuracy"])
    with pytest.raises(SystemExit, match="50 validation examples against 100"):
        paired(current, [_chosen_run(tmp_path / "other-seed-0", 0, 80, 0.9, n=50)], ["accuracy"])


def test_gpu_session_chooses_a_variant_on_validation_before_any_test(tiny_model, data_dir, tmp_path):
    """seeds with SEED_TEST=0 trains and chooses on validation without scoring test; choose_variant then compares
    the variant with the recipe seed by seed, and scores the variant's chosen checkpoint on test only if it won."""
    seeds = _gpu_session("seeds", tiny_model, data_dir, tmp_path, SEED_RUNS="news-0 news+epochs2-0", SEED_TEST="0",
                         VARIANT_epochs2="--epochs 2", EXTRA_TRAIN="--max_seq_length 256 --max_steps 4")  # fmt: skip
    for name in ("news-seed-0", "news+epochs2-seed-0"):
        assert (seeds / name / "selection.json").is_file() and not list((seeds / name).glob("metrics_step-*"))
    choose = _gpu_session("choose_variant", tiny_model, data_dir, tmp_path, VARIANT="news+epochs2")
    choice = json.loads((choose / "news+epochs2.json").read_text())
    assert choice["split"] == "validation" and choice["metric"] == "accuracy" and len(choice["runs"]) == 1
    pair = choice["runs"][0]
    assert Path(pair["current_run"]).name == "news-seed-0" and Path(pair["candidate_run"]).name == "news+epochs2-seed-0"
    # the tiny model scores alike both ways: a tie keeps the recipe, and nothing is scored on test
    assert choice["choice"] == "current" and not list((seeds / "news+epochs2-seed-0").glob("metrics_step-*"))
    # had the variant scored higher on validation, its chosen checkpoint is scored on test, both decodings
    step = pair["candidate_step"]
    validation = seeds / "news+epochs2-seed-0" / f"metrics_validation_step-{step}" / "metrics.json"
    validation.write_text(json.dumps({**json.loads(validation.read_text()), "accuracy": pair["current"] + 0.5}))
    choice = json.loads((_gpu_session("choose_variant", tiny_model, data_dir, tmp_path, VARIANT="news+epochs2")
                         / "news+epochs2.json").read_text())  # fmt: skip
    assert choice["choice"] == "candidate"
    scored = sorted(p.name for p in (seeds / "news+epochs2-seed-0").glob("metrics_step-*"))
    assert scored == [f"metrics_step-{step}_constrained", f"metrics_step-{step}_greedy"]
    assert not list((seeds / "news-seed-0").glob("metrics_step-*"))  # the recipe's run is not scored again


def test_gpu_session_bench_gen_real_trains_short_runs_when_there_are_no_seeds(tiny_model, data_dir, tmp_path):
    """bench_gen_real: without the seeds' runs it trains short small-model runs, then benchmarks each (the engine,
    the plain path, one at a time, the merged adapter, a profile) and times the whole inference script.
    bench_gen_merged then times the in-place product against the merged adapter on those runs, without training,
    and time_inference the inference script alone on them; bench_gen_first_call a process's first generation against
    its second, bench_prefill_attention prefill with and without cuDNN's attention, bench_gen_exactness one at a time
    under other numerics, on the same runs."""
    bench = _gpu_session("bench_gen_real", tiny_model, data_dir, tmp_path, GEN_TRAIN_STEPS="2",
                         EXTRA_TRAIN="--max_seq_length 256")  # fmt: skip
    for task in ("samsum", "news"):
        assert json.loads((bench / f"{task}-run" / "train_metrics.json").read_text())["global_steps"] == 2
        result = json.loads((bench / f"generation_smollm2_{task}.json").read_text())
        assert {"engine_call2", "one_at_a_time", "engine_static_adapter_merged_call1"} <= set(result["runs"])
        # each way scored against one at a time on its prompts: ROUGE for SAMSum, accuracy for 20 Newsgroups
        against = result["runs"]["engine_static_adapter_merged_call1"]["against_one_at_a_time"]["differences"]
        assert set(against) == ({"rouge1", "rouge2", "rougeL"} if task == "samsum" else {"accuracy"})
        assert result["profile_engine"]["busy_seconds"] > 0
        assert (bench / f"{task}_inference" / "metrics.json").is_file()
        assert json.loads((bench / f"{task}_inference" / "wall.json").read_text())["wall_seconds"] > 0
    trained = (bench / "news-run" / "train_metrics.json").stat().st_mtime_ns
    merged = _gpu_session("bench_gen_merged", tiny_model, data_dir, tmp_path, PASSES="2", GEN_TASKS="news",
                          GEN_BATCH_TOKENS="300", GEN_COMPACT="0.5")  # fmt: skip
    for path in (merged / "generation_smollm2_news_pass1.json", merged / "generation_smollm2_news_pass2.json"):
        runs = json.loads(path.read_text())["runs"]
        assert set(runs) == {
            "engine_call1",
            "engine_static_fused_lora_inference_call1",
            "engine_static_fused_lora_inference_batch_tokens300_call1",
            "engine_static_fused_lora_inference_compact_below0.5_call1",
            "engine_static_adapter_merged_call1",
            "engine_static_adapter_merged_compact_below0.5_call1",
        }
    assert (bench / "news-run" / "train_metrics.json").stat().st_mtime_ns == trained  # not trained again
    # time_inference: the inference script alone, with its defaults, once a pass, gathered into one JSON
    timed = _gpu_session("time_inference", tiny_model, data_dir, tmp_path, PASSES="2", GEN_TASKS="news")
    gathered = json.loads((timed / "inference_script_smollm2_news_defaults.json").read_text())
    assert [record["pass"] for record in gathered["passes"]] == ["news_pass1", "news_pass2"]
    assert all(record["n"] == gathered["passes"][0]["n"] > 0 for record in gathered["passes"])
    walls = [record["process_wall_seconds"] for record in gathered["passes"]]
    assert gathered["process_wall_seconds"]["min"] == min(walls) > 0
    assert gathered["training"]["global_steps"] == 2 and gathered["device"] == "cpu"
    assert "(every default;" in gathered["command"]
    assert (bench / "news-run" / "train_metrics.json").stat().st_mtime_ns == trained
    # bench_gen_first_call: the merged adapter's first and second calls alone, each batch timed, in three processes
    first = _gpu_session("bench_gen_first_call", tiny_model, data_dir, tmp_path)
    for suffix, calls in (("", 2), ("_default_allocator", 2), ("_profiled", 1)):
        runs = json.loads((first / f"generation_smollm2_news_first_call{suffix}.json").read_text())["runs"]
        assert list(runs) == [f"engine_static_adapter_merged_first_call{call}" for call in range(1, calls + 1)]
        assert all(run["batch_seconds"] for run in runs.values())
        if suffix == "_profiled":
            assert runs["engine_static_adapter_merged_first_call1"]["profile"]["host_largest"]
    # bench_prefill_attention: cuDNN's attention in prefill or not, alternating processes, then the inference script
    # under each setting, its timings named apart
    prefill = _gpu_session("bench_prefill_attention", tiny_model, data_dir, tmp_path, PASSES="1")
    for setting in ("pytorch", "no-cudnn"):
        result = json.loads(
            (prefill / f"generation_smollm2_news_prefill_{setting.replace('-', '_')}_pass1.json").read_text()
        )
        assert result["prefill_attention"] == setting and len(result["runs"]) == 2
        name = f"prefill_{setting.replace('-', '_')}"
        timed = tmp_path / "r" / f"time_inference_{name}"
        gathered = json.loads((timed / f"inference_script_smollm2_news_{name}.json").read_text())
        assert f"QLORA_KIT_PREFILL_ATTENTION={setting} " in gathered["command"] and len(gathered["passes"]) == 1
    # bench_gen_exactness: one at a time beside the static loop under each numerics asked for, one process each
    exact = _gpu_session("bench_gen_exactness", tiny_model, data_dir, tmp_path, EXACT_N="2",
                         EXACT_NUMERICS="defaults --fp32", EXACT_TASKS="news samsum")  # fmt: skip
    for task, name_of_task in (("news", "classification"), ("samsum", "summarization")):
        for name in ("defaults", "fp32"):
            result = json.loads((exact / f"generation_smollm2_{task}_exactness_{name}.json").read_text())
            assert result["runs"]["one_at_a_time"]["examples"] == 2 and result["task"] == name_of_task
            assert result["compute_dtype"] == "float32" and not result["exact_reductions"]
    assert (bench / "news-run" / "train_metrics.json").stat().st_mtime_ns == trained


def test_rescoring_old_predictions_on_the_benchmark_split(tmp_path):
    """reproduce/rescore_newsgroups_split.py maps predictions made with the old stripping to the raw rows."""
    import gzip
    import subprocess
    import sys

    header = "From: a@b.c\nSubject: x\n\n"
    raw = [
        {"text": header + "Plain text about space.", "label": "sci.space"},  # same both ways
        {"text": header + "In article <1@x> b@y writes:\n> q1\n\nMy point\n> q2", "label": "rec.autos"},  # empty now
        {"text": header + "> only a quote", "label": "sci.space"},  # empty both ways
        {"text": header + "Cars.\n\nMore.\n\nIn article <2@x> c@z writes:\n> q", "label": "rec.autos"},  # kept, changed
    ]
    with gzip.open(tmp_path / "test.jsonl.gz", "wt") as out:
        out.writelines(json.dumps(row) + "\n" for row in raw)
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    old_rows = [(0, "sci.space", "sci.space"), (1, "rec.autos", "sci.space"), (3, "rec.autos", "rec.autos")]
    (metrics / "predictions.jsonl").write_text(
        "".join(
            json.dumps({"id": i, "reference": ref, "parsed": parsed}) + "\n"
            for i, (_, ref, parsed) in enumerate(old_rows)
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "reproduce" / "rescore_newsgroups_split.py"),
            str(metrics),
            str(tmp_path / "test.jsonl.gz"),
            "--out",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    scores = json.loads((tmp_path / "r.json").read_text())
    assert scores["rows_before_fix"] == 3 and scores["benchmark_split_rows"] == 2
    assert scores["rows_with_the_same_prompt"] == 1
    # the wrong answer was on the row the benchmark split drops: both kept rows are right
    assert scores["benchmark_split"] == {"accuracy": 1.0, "macro_f1": 1.0, "invalid_rate": 0.0, "n": 2}


def test_multi_gpu_stages_for_smollm2_run_on_two_cpu_processes(tiny_model, data_dir, tmp_path):
    """multi_gpu.sh's SmolLM2 stages (evaluation by one process and by two; a sweep on one device and on two),
    run on the CPU: two processes give the outputs of one, and both sweeps make every run."""
    import re

    _gpu_session(
        "smollm2_eval_split sweep_two_gpus",
        tiny_model,
        data_dir,
        tmp_path,
        script="multi_gpu.sh",
        SMOLLM2_STEPS="2",
        SWEEP_STEPS="2",
        SWEEP_RANKS="8 16",
    )
    compared = re.findall(r"(\d+) examples, identical outputs (\d+)", _gpu_session.stdout)
    assert len(compared) == 2 and all(n == same and int(n) > 0 for n, same in compared), _gpu_session.stdout
    for gpus in ("0", "0,1"):
        runs = sorted((tmp_path / "r" / "sweep" / f"gpus-{gpus}").glob("summarization_*/metrics/metrics.json"))
        assert len(runs) == 2, _gpu_session.stdout
    assert _gpu_session.stdout.count("runs trained and evaluated in") == 2


def test_detached_stop_ends_only_the_started_processes_it_names(tmp_path):
    """detached.sh stop TEXT kills the processes of the stages it started whose command has TEXT, and nothing
    else: not the other runs of the stage, not the stages' shell, not a process outside with TEXT in its command
    (a `pkill -f TEXT` would kill the very command that runs it)."""
    import signal
    import time

    stages = tmp_path / "stages.sh"
    # two "runs" side by side, then a mark that the stage's shell went on after they ended
    stages.write_text('sleep 301 & sleep 302 & wait; touch "$R/after"\n')
    env = dict(os.environ, R=str(tmp_path / "r"), STAGES_SCRIPT=str(stages))
    detached = ["bash", str(ROOT / "reproduce" / "detached.sh")]
    outside = subprocess.Popen(["bash", "-c", "sleep 301; true"])  # has the text, not started by detached.sh
    session = None
    try:
        subprocess.run([*detached, "start", "runs"], env=env, check=True, timeout=30)
        session = int((tmp_path / "r" / "detached.sid").read_text())

        def in_session(text):
            listing = subprocess.run(["ps", "-e", "-o", "sid=,args="], capture_output=True, text=True).stdout
            return [line for line in listing.splitlines() if line.split()[0] == str(session) and text in line]

        deadline = time.time() + 10
        while not (in_session("sleep 301") and in_session("sleep 302")) and time.time() < deadline:
            time.sleep(0.2)
        stopped = subprocess.run([*detached, "stop", "sleep 301"], env=env, capture_output=True, text=True)
        assert stopped.returncode == 0 and "stopped 1 processes" in stopped.stdout
        time.sleep(0.5)
        assert not in_session("sleep 301") and in_session("sleep 302")
        assert outside.poll() is None  # the process outside the session lives on
        again = subprocess.run([*detached, "stop", "sleep 301"], env=env, capture_output=True, text=True)
        assert again.returncode == 1 and "no started process has 'sleep 301'" in again.stdout
        subprocess.run([*detached, "stop", "sleep 302"], env=env, check=True, capture_output=True)
        watched = subprocess.run([*detached, "watch", "20"], env=env, capture_output=True, text=True, timeout=60)
        assert watched.returncode == 0 and (tmp_path / "r" / "after").is_file()  # the stage's shell went on
    finally:
        outside.send_signal(signal.SIGKILL)
        if session is not None:  # whatever of the stage is left
            subprocess.run(["pkill", "-9", "-s", str(session)], check=False)


def test_detached_watch_refuses_at_once_where_nothing_was_started(tmp_path):
    """On a machine that started bare (the stages' /tmp gone with the last one), watch says so and returns at
    once instead of spending its whole wait on nothing."""
    env = dict(os.environ, R=str(tmp_path / "r"))
    watched = subprocess.run(
        ["bash", str(ROOT / "reproduce" / "detached.sh"), "watch", "600"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert watched.returncode == 2 and "nothing was started under" in watched.stdout


def test_detached_start_after_waits_for_the_other_runs_end(tmp_path):
    """AFTER=DIR: the stages start only once those started under DIR have ended (one measurement at a time)."""
    import time

    stages = tmp_path / "stages.sh"
    stages.write_text('touch "$R/ran"\n')
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    env = dict(os.environ, R=str(second), STAGES_SCRIPT=str(stages), AFTER=str(first))
    detached = ["bash", str(ROOT / "reproduce" / "detached.sh")]
    subprocess.run([*detached, "start", "go"], env=env, check=True, timeout=30)
    time.sleep(2)
    assert not (second / "ran").exists()  # the other stages have not ended
    (first / "detached.rc").write_text("0\n")
    watched = subprocess.run([*detached, "watch", "30"], env=env, capture_output=True, text=True, timeout=60)
    assert watched.returncode == 0 and (second / "ran").is_file()


def test_gpu_session_packs_every_few_seconds_what_a_cut_off_stage_wrote(tmp_path):
    """PACK_EVERY=N: a command killed by its time limit mid-stage (no pack at the stage's end) still leaves what
    the stage had written in the pack."""
    import tarfile

    pack = tmp_path / "r.tgz"
    # a stage as the script runs it: a bash function, here exported through the environment
    stage = '() { echo written > "$R/partial.json"; sleep 30; }'
    env = dict(os.environ, DATA_DIR=str(tmp_path), R=str(tmp_path / "r"), PACK=str(pack), PACK_EVERY="1")
    env["BASH_FUNC_slow_stage%%"] = stage
    script = ["bash", str(ROOT / "reproduce" / "gpu_session.sh"), "slow_stage"]
    cut = subprocess.run(["timeout", "4", *script], env=env, capture_output=True, text=True, timeout=60)
    assert cut.returncode == 124  # cut off by its time limit
    with tarfile.open(pack) as packed:
        assert "./partial.json" in packed.getnames()


def test_gpu_session_bench_prefix_times_both_ways_on_the_7b_stage(tiny_model, data_dir, tmp_path):
    """bench_prefix, with the tiny model standing for the 7B-shaped one and its tokenizer for SmolLM2's: three
    20 Newsgroups formats counted on the whole test set and timed both ways, the same answers."""
    _gpu_session("bench_prefix", tiny_model, data_dir, tmp_path, Z7=str(tiny_model), TOKENIZER_DIR=str(tiny_model),
                 PREFIX_TIME="3")  # fmt: skip
    result = json.loads((tmp_path / "r" / "bench_prefix" / "prefill_work_zephyr7b_shape.json").read_text())
    assert result["load_in_4bit"] and set(result["formats"]) == {
        "classification: few-shot/seed", "classification: zero-shot/seed", "classification: finetune/chat",
    }  # fmt: skip
    for entry in result["formats"].values():
        assert entry["timed"]["examples"] == 3 and entry["timed"]["same_answers"] == 1.0
        assert list(entry["budgets"]) == ["110000"]


def test_gpu_session_bench_gen_budget_prefill_alternates_the_settings_two_calls_a_process(
    tiny_model, data_dir, tmp_path
):
    """bench_gen_budget_prefill on a tiny model of the 7B's architecture (every 500th prompt): PyTorch's choice of
    prefill attention and no-cudnn in alternating processes, each process's first call and a warm one, no reference
    run; every file names its setting. Then bench_gen_fused_profile on it."""
    _gpu_session("bench_gen_budget_prefill bench_gen_fused_profile", tiny_model, data_dir, tmp_path, PASSES="1",
                 PROFILE_EXAMPLES="8",
                 Z7=str(tmp_path / "z7"), BUDGETS="4096", BUDGET_FLAGS="--tiny --stride_4bit 500")  # fmt: skip
    folder = tmp_path / "r" / "bench_gen_budget_prefill"
    for setting in ("pytorch", "no_cudnn"):
        result = json.loads((folder / f"generation_throughput_budget_prefill_{setting}_pass1.json").read_text())
        assert result["prefill_attention"] == setting.replace("_", "-")
        first, warm = (f"engine_static_4bit_batch1024_fused_lora_inference_max_batch_tokens4096{call}"
                       for call in ("", "_call2"))  # fmt: skip
        assert set(result["runs"]) == {first, warm}
        for run in (first, warm):
            assert result["runs"][run]["examples"] == 16 and result["runs"][run]["max_batch_tokens"] == 4096
            assert "identical_to_engine" not in result["runs"][run]
    # bench_gen_fused_profile: the same loop timed once, then profiled at the same budget
    profiled = json.loads((tmp_path / "r" / "bench_gen_fused_profile" / "generation_fused_profile.json").read_text())
    assert list(profiled["runs"]) == ["engine_static_4bit_batch1024_fused_lora_inference_max_batch_tokens4096"]
    profile = profiled["profile_engine_4bit"]
    assert profile["loop"] == "fused" and profile["max_batch_tokens"] == 4096 and profile["examples"] == 8
    assert profile["busy_seconds"] > 0 and set(profile["ranges"]) == {"prefill", "decode"}


def test_comparing_evaluations_counts_the_answers_that_agree():
    sys.path.insert(0, str(ROOT / "reproduce"))
    from compare_evaluations import agreement

    shares = agreement(["comp.graphics", "sci.med", "rec.autos", "talk"], ["comp.graphics", "sci.medicine", "rec", "x"])
    assert shares == {"rows": 4, "same_output": 0.25, "same_first_5_characters": 0.5}


def test_gpu_session_bench_kernels_smollm2_compares_the_kernels_answers(tiny_model, data_dir, tmp_path):
    """bench_kernels_smollm2 on the tiny model: four zero-shot evaluations of the same rows, their speed and the
    agreement of every pair in one JSON. On the CPU Liger's kernels cannot run: their evaluations run PyTorch's,
    say so, and give the same answers as PyTorch's at the same budget."""
    folder = _gpu_session("bench_kernels_smollm2", tiny_model, data_dir, tmp_path, KERNEL_ROWS="6")
    result = json.loads((folder / "inference_kernels_smollm2_zero_shot.json").read_text())
    assert list(result["evaluations"]) == ["pytorch", "liger", "pytorch_262k", "liger_262k"]
    for name, entry in result["evaluations"].items():
        assert entry["inference_kernels"] == "pytorch" and entry["examples"] == 6
        assert (entry["max_batch_tokens"] == 262144) == name.endswith("_262k")
    assert len(result["pairs"]) == 6
    assert result["pairs"]["pytorch / liger"]["same_output"] == 1.0
    assert result["pairs"]["pytorch_262k / liger_262k"]["same_output"] == 1.0
    assert (
        "QLORA_KIT_INFERENCE_KERNELS=liger: the model is on the cpu"
        in (tmp_path / "r" / "logs").joinpath("bench_kernels_smollm2.log").read_text() + _gpu_session.stdout
    )


def test_comparing_evaluations_refuses_other_rows_and_missing_files(tmp_path):
    for name, ids in (("a", [1, 2]), ("b", [3, 1])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"n": 2, "config": {}}))
        rows = [json.dumps({"id": i, "output": "x"}) for i in ids]
        (tmp_path / name / "predictions.jsonl").write_text("\n".join(rows) + "\n")
    script = [sys.executable, str(ROOT / "reproduce" / "compare_evaluations.py"), "--out", str(tmp_path / "c.json")]
    for folders, message in (
        ([f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"], "error: b evaluated other rows than a"),
        ([f"a={tmp_path / 'a'}", f"c={tmp_path / 'c'}"], f"error: {tmp_path / 'c'}: neither an evaluation folder"),
        ([f"a={tmp_path / 'a'}", str(tmp_path / "b")], "give each evaluation as NAME=FOLDER"),
    ):
        refused = subprocess.run(script + folders, capture_output=True, text=True)
        assert refused.returncode == 1 and message in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "c.json").exists()


def test_gpu_session_bench_small_model_times_the_recipes_named(tiny_model, data_dir, tmp_path):
    """bench_small_model with SMALL_RECIPES (';'-separated) and SMALL_TASKS: each named recipe timed and profiled
    on the task named, nothing else."""
    recipes = ["small-model, all modules", "small-model, no reads from the GPU per micro-batch, all modules"]
    _gpu_session("bench_small_model", tiny_model, data_dir, tmp_path, SMALL_RECIPES=";".join(recipes),
                 SMALL_TASKS="classification", SMALL_PROFILE_STEPS="1")  # fmt: skip
    result = json.loads((tmp_path / "r" / "bench_small_model" / "train_throughput_small_model.json").read_text())
    assert list(result["runs"]) == [f"classification: {name}" for name in recipes]
    for run in result["runs"].values():
        assert run["tokens_per_second"] > 0 and run["profile"]["steps"] == 1
