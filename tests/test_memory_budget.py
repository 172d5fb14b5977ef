"""--max_memory_gb: the largest micro-batch that fits, with the same examples per optimizer step."""

import functools

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit import memory_budget


def test_candidates_keep_the_examples_per_step():
    assert memory_budget.candidates(32, 1) == [(32, 1), (16, 2), (8, 4), (4, 8), (2, 16), (1, 32)]
    assert memory_budget.candidates(4, 2) == [(4, 2), (2, 4), (1, 8)]
    assert memory_budget.candidates(6, 1) == [(6, 1), (3, 2), (1, 6)]  # halving 3 rounds down to 1


def test_choose_takes_the_largest_that_fits_with_headroom():
    peaks = {32: None, 16: 12.0, 8: 7.5, 4: 5.0}  # None: out of memory
    assert memory_budget.choose(32, 1, 22.0, peaks.get) == (16, 2, 12.0)
    assert memory_budget.choose(32, 1, 8.5, peaks.get) == (8, 4, 7.5)  # 7.5 GB + 1 GB headroom
    assert memory_budget.choose(32, 1, 8.4, peaks.get) == (4, 8, 5.0)
    # nothing fits: the smallest micro-batch, said so
    assert memory_budget.choose(4, 1, 2.0, {4: 5.0, 2: 4.0, 1: 3.5}.get) == (1, 4, None)


def _train(tiny_model, data_dir, folder, **given):
    from qlora_kit import settings, training

    resolved, _ = settings.resolve(
        "classification",
        {
            "pretrained_ckpt": str(tiny_model),
            "train_file": str(data_dir / "news_train.jsonl"),
            "max_steps": 2,
            "load_in_4bit": False,
            "dropout": 0.0,
            "logging_steps": 1,
            "experiment_dir": str(folder),
            **given,
        },
    )
    return training.train("classification", resolved)


def _probe_with(monkeypatch, peak):
    """Training measures each micro-batch with ``peak(trainer, rows)`` instead of the GPU's counters; returns
    the real ``fit_to_budget``, to put back."""
    fit = memory_budget.fit_to_budget
    monkeypatch.setattr(
        memory_budget,
        "fit_to_budget",
        lambda trainer, budget: fit(trainer, budget, peak_gb=functools.partial(peak, trainer)),
    )
    return fit


def test_a_halved_micro_batch_trains_as_asking_for_it(tiny_model, data_dir, tmp_path, monkeypatch):
    """A budget the asked micro-batch of 4 exceeds gives 2 x 2 accumulation: the same adapter as asking for
    2 x 2 directly (same examples per step, same order). The probe runs the trainer's own forward and
    backward over the longest examples (here with the CUDA memory counters faked: no GPU)."""
    probed = []

    def fake_peak(trainer, rows):
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: rows * 10e9)
        probed.append(rows)
        peak = memory_budget.probe_peak_gb(trainer, rows)
        assert all(p.grad is None for p in trainer.model.parameters())  # the probe leaves no gradient behind
        return peak

    fit = _probe_with(monkeypatch, fake_peak)
    fitted = _train(tiny_model, data_dir, tmp_path / "fitted", batch_size=4, grad_accum=1, max_memory_gb=30)
    assert probed == [4, 2]  # 4 rows: 40 GB + headroom > 30; 2 rows: 20 GB fits
    assert fitted["memory_budget"] == {"max_memory_gb": 30, "micro_batch": 2, "grad_accum": 2, "probe_peak_gb": 20}
    monkeypatch.setattr(memory_budget, "fit_to_budget", fit)
    asked = _train(tiny_model, data_dir, tmp_path / "asked", batch_size=2, grad_accum=2, max_memory_gb=0)
    assert asked["memory_budget"] == {}
    assert fitted["global_steps"] == asked["global_steps"] == 2
    assert fitted["trained_tokens"] == asked["trained_tokens"]
    # the probe's own pass is not counted as training
    assert [e.get("num_tokens") for e in fitted["log_history"]] == [e.get("num_tokens") for e in asked["log_history"]]
    a = load_file(tmp_path / "fitted" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "asked" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_no_gpu_no_budget_as_asked(tiny_model, data_dir, tmp_path):
    metrics = _train(tiny_model, data_dir, tmp_path / "run", batch_size=4, grad_accum=1)
    assert metrics["memory_budget"] == {}


@pytest.mark.parametrize("budget", [0, None])
def test_budget_off(budget):
    class Args:
        per_device_train_batch_size, gradient_accumulation_steps = 4, 1

    class Trainer:
        args = Args()

    assert memory_budget.fit_to_budget(Trainer(), budget, peak_gb=lambda rows: 100.0) == {}


def test_a_failed_probe_trains_as_asked(tiny_model, data_dir, tmp_path, monkeypatch):
    def broken(trainer, rows):
        raise RuntimeError("something in a library")

    _probe_with(monkeypatch, broken)
    metrics = _train(tiny_model, data_dir, tmp_path / "run", batch_size=4, grad_accum=1, max_memory_gb=30)
    assert metrics["memory_budget"]["probe_error"] == "something in a library"
    assert metrics["global_steps"] == 2


def test_several_processes_take_the_smallest_choice(monkeypatch):
    """Processes whose probes chose differently (memory a little apart) all train with the smallest micro-batch:
    they must accumulate alike, or one waits for the other's all-reduce forever."""
    from qlora_kit import distributed

    class Args:
        per_device_train_batch_size, gradient_accumulation_steps = 8, 1

        @property
        def train_batch_size(self):
            return self.per_device_train_batch_size

    class Trainer:
        args = Args()

    monkeypatch.setattr(distributed, "gather", lambda value: [value, (2, 4)])  # the other process chose 2 x 4
    trainer = Trainer()
    chosen = memory_budget.fit_to_budget(trainer, 22.0, peak_gb=lambda rows: 1.0)  # this one: 8 fits
    assert (chosen["micro_batch"], chosen["grad_accum"]) == (2, 4)
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (2, 4)
    assert trainer._train_batch_size == 2
