"""Two processes on the CPU (gloo): training and evaluation under torchrun, as on several GPUs."""

import json
import subprocess

from conftest import run_script, torchrun_command, torchrun_env


def torchrun(script, *args, cwd, timeout=600):
    command = torchrun_command(script, *args)
    result = subprocess.run(command, cwd=cwd, env=torchrun_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _tiny_training(tiny_model, data_dir) -> list:
    """Two steps of 2 examples per process on the tiny model in 16-bit, into ./run."""
    train = ["--pretrained_ckpt", tiny_model, "--train_file", data_dir / "news_train.jsonl", "--max_steps", 2]
    return [*train, "--batch_size", 2, "--no-load_in_4bit", "--experiment_dir", "run"]


def test_two_processes_train_and_evaluate_like_one(tiny_model, data_dir, tmp_path):
    torchrun("zephyr_classification.py", *_tiny_training(tiny_model, data_dir), "--grad_accum", 2, cwd=tmp_path)
    config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert config["processes"] == 2 and config["effective_batch_size"] == 8
    metrics = json.loads((tmp_path / "run" / "train_metrics.json").read_text())
    assert metrics["global_steps"] == 2 and metrics["processes"] == 2 and metrics["trained_tokens"] > 0

    result = torchrun(
        "zephyr_classification_inference.py",
        "--experiment_dir",
        "run",
        "--test_file",
        data_dir / "news_test.jsonl",
        "--output_dir",
        "two",
        cwd=tmp_path,
    )
    assert result.stdout.count("| accuracy |") == 1  # only the main process prints
    run_script(
        "zephyr_classification_inference.py",
        "--experiment_dir",
        "run",
        "--test_file",
        data_dir / "news_test.jsonl",
        "--output_dir",
        "one",
        cwd=tmp_path,
    )
    two = [json.loads(line) for line in (tmp_path / "two" / "predictions.jsonl").open()]
    one = [json.loads(line) for line in (tmp_path / "one" / "predictions.jsonl").open()]
    assert [r["id"] for r in two] == list(range(12))
    assert [(r["output"], r["parsed"]) for r in two] == [(r["output"], r["parsed"]) for r in one]
    metrics_two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    metrics_one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert metrics_two["processes"] == 2
    assert {k: metrics_two[k] for k in ("n", "accuracy", "macro_f1")} == {
        k: metrics_one[k] for k in ("n", "accuracy", "macro_f1")
    }
    assert not list((tmp_path / "two").glob("predictions.partial*"))


def test_two_processes_learn_what_one_process_learns_from_the_same_batches(tiny_model, data_dir, tmp_path):
    """Data parallel for real: 2 processes x 2 examples a step end with the adapter of 1 process x 4 (the same
    examples each step; gradients all-reduced), up to float rounding, and not with a lone process's."""
    import torch
    from safetensors.torch import load_file

    def trained(folder, *extra):
        args = [
            *_tiny_training(tiny_model, data_dir)[:-2],
            "--max_steps",
            3,
            "--dropout",
            0,
            "--experiment_dir",
            folder,
        ]
        args += extra
        return args

    torchrun("zephyr_classification.py", *trained("two"), cwd=tmp_path)
    run_script("zephyr_classification.py", *trained("one", "--batch_size", 4), cwd=tmp_path)
    run_script("zephyr_classification.py", *trained("alone"), cwd=tmp_path)
    two, one, alone = (
        load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("two", "one", "alone")
    )
    lora_b = [name for name in one if "lora_B" in name]  # zero at the start: what training wrote
    assert lora_b and all(torch.allclose(two[name], one[name], rtol=1e-3, atol=1e-6) for name in lora_b)
    assert not all(torch.allclose(two[name], alone[name], rtol=1e-3, atol=1e-6) for name in lora_b)


def test_two_processes_choose_on_validation_while_training(tiny_model, data_dir, tmp_path):
    """--select_on under data parallel: both processes score their share of the validation rows at each save (on
    the unwrapped model: no collective per forward), the scores are gathered once, the main process records them."""
    torchrun(
        "zephyr_classification.py",
        *_tiny_training(tiny_model, data_dir),
        *("--validation_fraction", 0.25, "--select_on", "accuracy", "--save_steps", 1),
        cwd=tmp_path,
        timeout=420,
    )
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert [point["step"] for point in selection["curve"]] == [1, 2]
    assert selection["best_step"] in (1, 2)
    scored = json.loads((tmp_path / "run" / "metrics_validation_step-2" / "metrics.json").read_text())
    held_out = json.loads((tmp_path / "run" / "run_config.json").read_text())["data"]["rows"]["held_out"]
    assert scored["processes"] == 2 and scored["n"] == held_out > 0  # every held-out row, scored once
    assert json.loads((tmp_path / "run" / "train_metrics.json").read_text())["global_steps"] == 2


SAVE_UNDER_SHARDING = """
import sys, torch, torch.distributed as dist
from pathlib import Path
from types import SimpleNamespace
from qlora_kit import distributed
from qlora_kit.run_folder import RunFolder
from qlora_kit.training import save_run

distributed.init()

def gather_shards(model):  # as FSDP's full state dict: a collective every process must enter
    total = torch.ones(1)
    dist.all_reduce(total)
    return {"lora_A.weight": total}

class Model:
    saved = None
    def save_pretrained(self, folder, state_dict=None, save_embedding_layers=False):
        self.saved = gather_shards(self) if state_dict is None else state_dict
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "adapter_config.json").write_text("{}")

trainer = SimpleNamespace(model=Model(), is_fsdp_enabled=True,
                          accelerator=SimpleNamespace(get_state_dict=gather_shards))
tokenizer = SimpleNamespace(save_pretrained=lambda folder: None)
save_run(trainer, tokenizer, RunFolder(sys.argv[1]), {"global_steps": 1})
if distributed.is_main():
    assert trainer.model.saved["lora_A.weight"].item() == 2.0  # the shards of both processes
(Path(sys.argv[1]).parent / f"saved-by-{distributed.rank()}").touch()  # not stdout: two processes interleave
"""


def test_the_final_save_under_sharding_does_not_wait_forever(tmp_path):
    """Under FSDP the adapter's weights are gathered from every process's shard: a collective. Entered by the
    main process alone (as the final save once did), it waits forever; every process must enter it."""
    (tmp_path / "save.py").write_text(SAVE_UNDER_SHARDING)
    torchrun(tmp_path / "save.py", tmp_path / "run", cwd=tmp_path, timeout=180)  # an absolute path
    assert sorted(p.name for p in tmp_path.glob("saved-by-*")) == ["saved-by-0", "saved-by-1"]
    assert (tmp_path / "run" / "train_metrics.json").is_file() and (tmp_path / "run" / "adapter").is_dir()


FIT_UNDER_TWO_PROCESSES = """
import sys
from pathlib import Path
from types import SimpleNamespace
from qlora_kit import distributed, memory_budget

distributed.init()
rank = distributed.rank()

class Args:
    per_device_train_batch_size, gradient_accumulation_steps = 8, 1
    @property
    def train_batch_size(self):
        return self.per_device_train_batch_size

def peak(rows):  # process 1's GPU holds more: only 2 rows fit there; with "fail", its probe breaks
    if rank == 1 and sys.argv[2] == "fail":
        raise RuntimeError("probe broke")
    return rows * (1.0 if rank == 0 else 4.0)

trainer = SimpleNamespace(args=Args())
chosen = memory_budget.fit_to_budget(trainer, 10.0, peak_gb=peak)
Path(sys.argv[1], f"rank-{rank}").write_text(f"{chosen['micro_batch']} {chosen['grad_accum']}")
distributed.shutdown()
"""


def test_every_process_takes_the_same_micro_batch(tmp_path):
    """--max_memory_gb under data parallel: processes whose probes differ (or fail) still train with one
    micro-batch, the smallest chosen; none waits for another."""
    (tmp_path / "fit.py").write_text(FIT_UNDER_TWO_PROCESSES)
    for mode, expected in (("differ", "2 4"), ("fail", "8 1")):
        out = tmp_path / mode
        out.mkdir()
        torchrun(tmp_path / "fit.py", out, mode, cwd=tmp_path, timeout=180)
        assert [(out / f"rank-{r}").read_text() for r in (0, 1)] == [expected, expected]


def test_two_processes_killed_and_resumed_end_with_the_uninterrupted_adapter(tiny_model, data_dir, tmp_path):
    """A two-process run killed (SIGKILL to every process, as a preempted machine) after a checkpoint and run
    again with --resume ends with exactly the adapter of a run that was never interrupted."""
    import time

    import psutil
    import torch
    from safetensors.torch import load_file

    def args(folder):
        return [
            *_tiny_training(tiny_model, data_dir)[:-2],
            "--max_steps",
            40,
            "--save_steps",
            2,
            "--keep_checkpoints",
            40,
            "--experiment_dir",
            folder,
        ]

    torchrun("zephyr_classification.py", *args("uninterrupted"), cwd=tmp_path)
    first = subprocess.Popen(
        torchrun_command("zephyr_classification.py", *args("killed")),
        cwd=tmp_path,
        env=torchrun_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = tmp_path / "killed" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    deadline = time.time() + 300
    while not saved.is_file() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # the other process's files of that checkpoint
    # torchrun starts its workers in sessions of their own: kill each process, as a preempted machine would
    for process in [*psutil.Process(first.pid).children(recursive=True), psutil.Process(first.pid)]:
        process.kill()
    first.wait()
    time.sleep(1)  # a worker that had survived would have written more by now
    assert saved.is_file() and not (tmp_path / "killed" / "train_metrics.json").exists(), "not killed mid-run"

    torchrun("zephyr_classification.py", *args("killed"), "--resume", cwd=tmp_path)
    metrics = json.loads((tmp_path / "killed" / "train_metrics.json").read_text())
    assert metrics["global_steps"] == 40 and 2 <= metrics["resumed_from_step"] < 40
    resumed, never = (
        load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("killed", "uninterrupted")
    )
    assert resumed.keys() == never.keys()
    assert all(torch.equal(resumed[name], never[name]) for name in never)


def test_a_finished_run_closes_its_process_group(tmp_path, monkeypatch):
    """An entry point that returns closes the process group (a process leaving with it open can abort in gloo's
    teardown after its results are written); closing twice, or with no group, does nothing."""
    import torch.distributed as dist

    from qlora_kit import distributed
    from qlora_kit.errors import run_main

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    distributed.shutdown()  # no group yet
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    run_main(lambda: None)
    assert not dist.is_initialized()
    distributed.shutdown()
