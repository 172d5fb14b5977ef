"""A task is defined once: a third, toy task trains and evaluates through the scripts' own functions."""

import json

import pytest
from conftest import write_jsonl

from qlora_kit import data, tasks
from qlora_kit.tasks import Task

COLOURS = {"red": "cherry tomato blood ruby", "green": "grass leaf lime frog", "blue": "sky sea ocean sapphire"}


def _rows(count: int) -> list[dict]:
    names = sorted(COLOURS)
    return [
        {"thing": COLOURS[names[i % 3]].split()[i % 4] + " " + str(i), "colour": names[i % 3]} for i in range(count)
    ]


def _clean(rows, source):
    return [{"input": row["input"].strip(), "target": row["target"].strip()} for row in rows]


COLOUR_TASK = Task(
    name="colour",
    description="the colour a thing usually has",
    input_column="thing",
    target_column="colour",
    default_dataset="nobody/colours",
    input_field="thing",
    answer_field="colour",
    templates={
        ("finetune", "seed"): "Thing: {thing}\nColour:",
        ("finetune", "chat"): "What colour is {thing}?",
        ("zero-shot", "seed"): "Name the colour of {thing} ({newsgroup_classes}):",
        ("few-shot", "seed"): "{few_shot_samples}Thing: {thing}\nColour:",
    },
    few_shot_sample="Thing: {thing}\nColour: {colour}\n",
    labelled=True,
    clean=_clean,
    lora_r=2,
    epochs=1,
    max_new_tokens=4,
    baseline_max_new_tokens=4,
    shots=1,
    compact_below=0.5,  # the static loop's; handed to generate (the CPU's loop ignores it)
    summary_metrics=("n", "accuracy"),
    selection_metrics=("accuracy",),
)


@pytest.fixture
def colour_task(monkeypatch):
    monkeypatch.setitem(tasks.TASKS, COLOUR_TASK.name, COLOUR_TASK)
    return COLOUR_TASK


def test_a_third_task_trains_and_evaluates_through_the_same_functions(colour_task, tiny_model, tmp_path, monkeypatch):
    from argparse import Namespace

    from qlora_kit import evaluation, settings, training
    from qlora_kit.run_folder import RunFolder

    train_file = write_jsonl(tmp_path / "colours_train.jsonl", _rows(24))
    test_file = write_jsonl(tmp_path / "colours_test.jsonl", _rows(6))
    resolved, sources = settings.resolve(
        "colour",
        {
            "pretrained_ckpt": str(tiny_model),
            "train_file": str(train_file),
            "max_steps": 2,
            "batch_size": 4,
            "load_in_4bit": False,
            "experiment_dir": str(tmp_path / "run"),
        },
    )
    assert resolved.lora_r == 2 and sources["lora_r"] == "task colour"  # the task's own default
    metrics = training.train("colour", resolved)
    assert metrics["global_steps"] == 2
    run = RunFolder(tmp_path / "run")
    config = run.config()
    assert config["task"] == "colour" and config["label_names"] == ["blue", "green", "red"]

    args = Namespace(
        experiment_dir=str(run.path),
        checkpoint=None,
        merge_adapter=False,
        use_flash_attention=False,
        dataset="nobody/colours",
        train_file=None,
        validation_file=None,
        test_file=str(test_file),
        split="test",
        limit=None,
        batch_size=None,
        max_batch_tokens=None,
        max_new_tokens=4,
        max_prompt_tokens=None,
        output_dir=None,
        overwrite=False,
        decoding="constrained",
    )
    asked = []
    generate = evaluation.generate
    monkeypatch.setattr(
        evaluation, "generate", lambda *a, **kw: asked.append(kw["compact_below"]) or generate(*a, **kw)
    )
    scores = evaluation.evaluate_run("colour", args)
    assert asked == [0.5]  # the task's decode setting
    assert scores["n"] == 6 and scores["invalid"] == 0  # constrained decoding: every answer is a colour
    predictions = [
        json.loads(line)
        for line in (run.evaluation(suffix="constrained").folder / "predictions.jsonl").read_text().splitlines()
    ]
    assert {p["parsed"] for p in predictions} <= set(COLOURS)
    assert predictions[0]["prompt"].endswith("Thing: sky 0\nColour:")  # the task's own template
    assert "| accuracy |" in evaluation.summary_table(scores, "colour")


def test_the_task_decides_labels_sampling_and_few_shot(colour_task):
    rows = colour_task.clean([{"input": r["thing"], "target": r["colour"]} for r in _rows(30)], "s")
    sample = colour_task.sample(rows, 0.2, seed=1)
    assert sorted(row["target"] for row in sample) == ["blue", "blue", "green", "green", "red", "red"]
    assert [row["target"] for row in colour_task.few_shot_examples(rows, 1)] == ["blue", "green", "red"]
    assert colour_task.parse_answer(" Green\n", ["blue", "green", "red"]) == "green"
    assert data.canonical_labels(rows, "s") == ["blue", "green", "red"]


def test_on_save_schedule_tells_planned_checkpoints_from_forced_ones():
    import math
    from types import SimpleNamespace

    from qlora_kit.selection import on_save_schedule

    def planned(strategy, save_steps, step, epoch, max_steps=100):
        # the trainer's state holds save_steps in steps, a share of the run (below 1) turned into steps
        state = SimpleNamespace(global_step=step, epoch=epoch, max_steps=max_steps, save_steps=save_steps)
        state.save_steps = math.ceil(max_steps * save_steps) if save_steps < 1 else save_steps
        return on_save_schedule(SimpleNamespace(save_strategy=strategy, save_steps=save_steps), state)

    assert planned("steps", 10, 20, 0.4) and not planned("steps", 10, 23, 0.46)
    assert planned("steps", 0.25, 25, 0.5) and not planned("steps", 0.25, 26, 0.52)  # a share of the run
    assert planned("epoch", 500, 46, 1.0) and not planned("epoch", 500, 67, 1.4565)
    assert planned("steps", 10, 100, 2.0) and planned("epoch", 500, 100, 2.17)  # the last step, whatever else
