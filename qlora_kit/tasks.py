"""What a task is, in one place: its data columns, cleaning, prompts, answers, metrics and defaults.

A task is one ``Task`` value. The two built in are 20 Newsgroups classification (the model writes the group
name) and SAMSum summarization. Everything else in the package asks the task, never its name: adding a data set
means writing one more ``Task`` (with its templates in ``prompts.py``) and registering it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import prompts

from . import data as data_lib
from .errors import UsageError
from .metrics import (
    BOOTSTRAP,
    classification_intervals,
    classification_metrics,
    parse_label,
    rouge_intervals,
    rouge_means,
    rouge_per_example,
)

# (purpose, style) of a template: fine-tuning or a baseline, in the original format or the chat template.
PURPOSES = ("finetune", "zero-shot", "few-shot")


@dataclass(frozen=True)
class Task:
    name: str
    input_column: str  # the data's column names
    target_column: str
    default_dataset: str  # Hub id used when no local file is given
    input_field: str  # what the templates call the input: {sentence}, {dialogue}
    answer_field: str  # what the few-shot sample calls the answer: {label}, {summary}
    templates: dict  # (purpose, style) -> template text (from prompts.py); chat baselines reuse the seed text
    few_shot_sample: str  # one few-shot example, repeated inside {few_shot_samples}
    labelled: bool  # answers come from a fixed label set: parsed to a label, constrained decoding, stratified splits
    clean: Callable[[list[dict], str], list[dict]]  # rows {"input", "target"} -> cleaned rows (empty ones dropped)
    # defaults of the original scripts, per task
    lora_r: int
    epochs: int
    max_new_tokens: int  # fine-tuned evaluation
    baseline_max_new_tokens: int  # zero/few-shot
    shots: int  # few-shot examples: per label for a labelled task, else in all
    # the static decode loop drops a batch's finished rows once at most this share still decodes (None: never);
    # pays where answers differ much in length (generation.generate)
    compact_below: float | None = None
    summary_metrics: tuple = ()  # printed after an evaluation, in this order
    selection_metrics: tuple = ()  # summed to choose a checkpoint on validation
    description: str = ""

    def template(self, purpose: str, style: str) -> str:
        key = (purpose, style)
        if key not in self.templates and purpose != "finetune":
            key = (purpose, "seed")  # a baseline sends the same instruction as one user turn
        return self.templates[key]

    def parse_answer(self, text: str, label_names: list[str]) -> str | None:
        """What a generated answer says: the label it names (None if none) or the stripped text."""
        return parse_label(text, label_names) if self.labelled else text.strip()

    def score(self, references: list[str], predictions: list, label_names: list[str]) -> dict:
        """The task's metrics, each with its 95% bootstrap interval (``ci95``) and how it was drawn."""
        if self.labelled:
            metrics = classification_metrics(references, predictions, label_names)
            intervals = classification_intervals(references, predictions, label_names)
        else:
            per_example = rouge_per_example(references, predictions)
            metrics, intervals = rouge_means(per_example), rouge_intervals(per_example)
        return {**metrics, "ci95": intervals, "bootstrap": BOOTSTRAP}

    def read_rows(
        self,
        *,
        file: str | None,
        dataset: str,
        split: str,
        columns: dict | None = None,
        label_names: list[str] | None = None,
    ) -> tuple[list[dict], str]:
        """One split as read (local file or Hub; ``columns`` mapped; integer labels named), before cleaning."""
        rows, source = data_lib.load_rows(self, file=file, dataset=dataset, split=split, columns=columns)
        if self.labelled:
            rows = data_lib.name_integer_labels(rows, label_names, source)
        return rows, source

    def load_rows(
        self,
        *,
        file: str | None,
        dataset: str,
        split: str,
        columns: dict | None = None,
        label_names: list[str] | None = None,
    ) -> tuple[list[dict], str]:
        """One split, read and cleaned; and a description of its source."""
        rows, source = self.read_rows(file=file, dataset=dataset, split=split, columns=columns, label_names=label_names)
        return self.clean(rows, source), source

    def sample(self, rows: list[dict], fraction: float, seed: int) -> list[dict]:
        """A fixed-seed ``fraction`` of the rows: the same fraction of each label for a labelled task."""
        if self.labelled:
            return data_lib.stratified_sample(rows, fraction, seed)
        if not 0 < fraction <= 1:
            raise UsageError(f"sample fraction must be in (0, 1], got {fraction}")
        if fraction == 1:
            return list(rows)
        chosen = sorted(random.Random(seed).sample(range(len(rows)), max(1, round(fraction * len(rows)))))
        return [rows[index] for index in chosen]

    def split_off_validation(self, rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
        """Hold out a fixed-seed ``fraction`` of the training rows (stratified by label for a labelled task)."""
        if not 0 < fraction < 1:
            raise UsageError(f"--validation_fraction must be in (0, 1), got {fraction}")
        held_out = self.sample(rows, fraction, seed)
        held_ids = {id(row) for row in held_out}
        return [row for row in rows if id(row) not in held_ids], held_out

    def few_shot_examples(self, rows: list[dict], shots: int) -> list[dict]:
        """Deterministic few-shot examples: the first ``shots`` rows of each label, or the first ``shots`` rows."""
        if shots < 1:
            raise UsageError(f"--shots must be at least 1, got {shots}")
        if not self.labelled:
            return rows[:shots]
        taken: dict[str, int] = {}
        examples = []
        for row in rows:
            if taken.get(row["target"], 0) < shots:
                taken[row["target"]] = taken.get(row["target"], 0) + 1
                examples.append(row)
        return examples


NEWSGROUPS = Task(
    name="classification",
    description="20 Newsgroups: the model writes the group name",
    input_column="text",
    target_column="label",
    default_dataset="rungalileo/20_Newsgroups_Fixed",
    input_field="sentence",
    answer_field="label",
    templates={
        ("finetune", "seed"): prompts.INFERENCE_CLASSIFIER_PROMPT,
        ("finetune", "chat"): prompts.CHAT_CLASSIFIER_INSTRUCTION,
        ("zero-shot", "seed"): prompts.ZERO_SHOT_CLASSIFIER_PROMPT,
        ("few-shot", "seed"): prompts.FEW_SHOT_CLASSIFIER_PROMPT,
    },
    few_shot_sample=prompts.FEW_SHOT_CLASSIFIER_SAMPLE,
    labelled=True,
    clean=data_lib.clean_classification,
    lora_r=8,
    epochs=5,
    max_new_tokens=20,
    baseline_max_new_tokens=20,
    shots=1,
    summary_metrics=("n", "accuracy", "macro_f1", "micro_f1", "invalid_rate"),
    selection_metrics=("accuracy",),
)

SAMSUM = Task(
    name="summarization",
    description="SAMSum: a one- or two-sentence summary of a chat dialogue",
    input_column="dialogue",
    target_column="summary",
    # The old `samsum` id is a loading script that datasets 4+ refuses; this copy is plain data.
    default_dataset="knkarthick/samsum",
    input_field="dialogue",
    answer_field="summary",
    templates={
        ("finetune", "seed"): prompts.INFERENCE_SUMMARIZATION_PROMPT,
        ("finetune", "chat"): prompts.CHAT_SUMMARIZATION_INSTRUCTION,
        ("zero-shot", "seed"): prompts.ZERO_SHOT_SUMMARIZATION_PROMPT,
        ("few-shot", "seed"): prompts.FEW_SHOT_SUMMARIZATION_PROMPT,
    },
    few_shot_sample=prompts.FEW_SHOT_SUMMARIZATION_SAMPLE,
    labelled=False,
    clean=data_lib.clean_summarization,
    lora_r=64,
    epochs=1,
    max_new_tokens=100,
    baseline_max_new_tokens=50,
    shots=2,
    # a batch runs until its longest summary ends, most end far sooner. Measured on an H100 (SmolLM2 adapters, the
    # 819 test dialogues, docs/benchmarks.md): merged adapter 1.05-1.16x in each of 3 passes, product in place
    # 0.98-1.22x in 6 (median 1.18x), the same summaries (in place, one run turned a summary or two: the smaller
    # batch rounds otherwise); 0.5 lost (0.88-0.96x). 20 Newsgroups' answers (at most 20 tokens): 0.92-1.09x, none.
    compact_below=0.25,
    summary_metrics=("n", "rouge1", "rouge2", "rougeL", "rougeLsum"),
    selection_metrics=("rouge1", "rouge2"),
)

TASKS: dict[str, Task] = {task.name: task for task in (NEWSGROUPS, SAMSUM)}


def register(task: Task) -> Task:
    """Make a task known by its name (to the run folders' configs, the report, the recipes' task sections)."""
    TASKS[task.name] = task
    return task


def get_task(name: str | Task) -> Task:
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise UsageError(f"unknown task '{name}'; one of: {', '.join(TASKS)}")
    return TASKS[name]
