import json
import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LABELS = ["comp.graphics", "rec.autos", "sci.space", "talk.politics.guns"]
TOPIC_WORDS = {
    "comp.graphics": "image pixel render polygon shading texture",
    "rec.autos": "engine car brake wheel dealer tire",
    "sci.space": "orbit shuttle launch nasa moon rocket",
    "talk.politics.guns": "firearm rifle law amendment ban pistol",
}


def newsgroup_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        label = LABELS[index % len(LABELS)]
        words = TOPIC_WORDS[label].split()
        body = " ".join(rng.choice(words) for _ in range(rng.randint(8, 30)))
        text = (
            f"From: user{index}@example.com\r\nSubject: question {index}\r\nLines: 3\r\n\r\n"
            f"{body}\r\n> quoted reply line\r\n-- \r\nsignature line"
        )
        rows.append({"text": text, "label": label})
    return rows


def dialogue_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    names = ["Anna", "Ben", "Chloé", "Dan"]
    places = ["the cinema", "the park", "school", "the office"]
    rows = []
    for index in range(count):
        a, b = rng.sample(names, 2)
        place = rng.choice(places)
        dialogue = f"{a}: are you going to {place} today?\r\n{b}: yes, at {index % 12 + 1} pm\r\n{a}: great, see you"
        rows.append(
            {"id": str(index), "dialogue": dialogue, "summary": f"{b} is going to {place} at {index % 12 + 1} pm."}
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_jsonl(folder / "news_train.jsonl", newsgroup_rows(48, seed=1))
    write_jsonl(folder / "news_test.jsonl", newsgroup_rows(12, seed=2))
    write_jsonl(folder / "dialogues_train.jsonl", dialogue_rows(24, seed=3))
    write_jsonl(folder / "dialogues_test.jsonl", dialogue_rows(6, seed=4))
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, data_dir) -> Path:
    from tiny_model import build_tiny_model

    corpus = [row["text"] for row in newsgroup_rows(48, 1)] + [
        row["dialogue"] + row["summary"] for row in dialogue_rows(24, 3)
    ]
    corpus += LABELS + ["### Sentence: ### Class: ### Dialogue: ### Summary: Classify the sentence Summarize"]
    return build_tiny_model(tmp_path_factory.mktemp("tiny-mistral"), corpus)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def run_script(script: str, *args, cwd: Path, check: bool = True, timeout: int = 600):
    """Run a top-level script as a subprocess, the way a user does."""
    import subprocess

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def torchrun_command(script, *args) -> list[str]:
    """The command that runs ``script`` (a path, or one relative to the repository) as two processes on this
    machine (gloo on the CPU), on a free port."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    return [*launcher, "--master_port", str(port), str(ROOT / script), *map(str, args)]


def torchrun_env() -> dict:
    """The environment of two processes sharing this machine's cores."""
    return dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="session")
def trained_run_for_resume(tmp_path_factory, tiny_model, data_dir) -> Path:
    work = tmp_path_factory.mktemp("trained")
    run_script(
        "zephyr_classification.py",
        "--pretrained_ckpt",
        tiny_model,
        "--train_file",
        data_dir / "news_train.jsonl",
        "--max_steps",
        2,
        "--no-load_in_4bit",
        "--experiment_dir",
        "run",
        cwd=work,
    )
    return work / "run"


@pytest.fixture(scope="session")
def trained_summarizer(tmp_path_factory, tiny_model, data_dir) -> Path:
    """A tiny summarization run, one step in 16 bits: for tests that only read a trained run."""
    work = tmp_path_factory.mktemp("summarizer")
    run_script(
        "zephyr_summarization.py",
        "--pretrained_ckpt",
        tiny_model,
        "--train_file",
        data_dir / "dialogues_train.jsonl",
        "--max_steps",
        1,
        "--lora_r",
        2,
        "--no-load_in_4bit",
        "--experiment_dir",
        "run",
        cwd=work,
    )
    return work / "run"
