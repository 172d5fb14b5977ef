"""Command-line flags: the training flags made from the settings (qlora_kit/settings.py), the evaluation flags."""

from __future__ import annotations

import argparse

import prompts

from . import settings as settings_lib
from .data import FORMATS
from .tasks import get_task


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def bounded(name: str, kind):
    """An argparse type for training setting ``name``: read as ``kind``, then held to its bounds
    (``settings.BOUNDS``, which recipe files are held to as well)."""

    def read(text: str):
        value = kind(text)
        problem = settings_lib.out_of_bounds(name, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    read.__name__ = kind.__name__  # argparse's "invalid int value: 'x'"
    return read


def save_interval(text: str) -> int | str:
    """A checkpoint interval: a positive number of optimizer steps, or "epoch"."""
    return text if text == "epoch" else positive_int(text)


def optimizer_name(text: str) -> str:
    """An optimizer transformers knows (checked when the flag is given; the import is only paid then)."""
    from transformers.training_args import OptimizerNames

    names = [name.value for name in OptimizerNames]
    if text not in names:
        raise argparse.ArgumentTypeError(f"unknown optimizer {text!r}; one of: {', '.join(names)}")
    return text


def module_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("needs at least one module name, e.g. q_proj,v_proj")
    return names


def column_map(text: str) -> dict[str, str]:
    """TASK_COLUMN=YOURS pairs, comma-separated: text=sentence,label=category."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if not pairs or any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in pairs):
        raise argparse.ArgumentTypeError(
            f"expected NAME=YOURS pairs such as text=sentence,label=category, got {text!r}"
        )
    return {name.strip(): yours.strip() for name, yours in pairs}


def label_names_arg(text: str) -> list[str]:
    """Label names for integer labels: a file of names (one a line), or comma-separated names."""
    from pathlib import Path

    path = Path(text)
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    else:
        names = [name.strip() for name in text.split(",") if name.strip()]
    if len(names) < 2:
        raise argparse.ArgumentTypeError(f"needs at least two names (comma-separated, or a file), got {text!r}")
    return names


# How each training flag's value is read (numbers held to settings.BOUNDS); a setting not named here is read as text.
FLAG_TYPES = {
    **{name: bounded(name, settings_lib._scalar_type(name)) for name in settings_lib.BOUNDS if name != "save_steps"},
    "optim": optimizer_name,
    "save_steps": save_interval,
    "lora_target_modules": module_names,
    "columns": column_map,
    "label_names": label_names_arg,
    "seed": int,
}
GROUP_ORDER = ("model", "data", "LoRA", "training", "run folder")


def _default_text(name: str, task) -> str:
    item = settings_lib.FIELDS[name]
    if name in ("lora_r", "epochs", "dataset"):
        own = {"lora_r": task.lora_r, "epochs": task.epochs, "dataset": task.default_dataset}[name]
        base = f"the task's: {own}"
    else:
        base = settings_lib._shown(item.default) if item.default not in (None, False) else ""
    by_recipe = settings_lib.recipe_value_text(name, task.name)
    if by_recipe:
        return f" (default: {base + ', or ' if base else ''}the recipe's: {by_recipe})"
    return f" (default: {base})" if base else ""


def add_training_args(parser: argparse.ArgumentParser, task) -> None:
    """Every training setting as a flag; a flag not given is absent from the parsed namespace, so the settings'
    precedence (qlora_kit/settings.py) decides its value."""
    task = get_task(task)
    groups = {name: parser.add_argument_group(name) for name in GROUP_ORDER}
    for name, item in settings_lib.FIELDS.items():
        meta = item.metadata
        if meta.get("labelled_only") and not task.labelled:
            continue
        kwargs = {"default": argparse.SUPPRESS, "help": meta["help"] + _default_text(name, task)}
        kind = settings_lib._scalar_type(name)
        if meta.get("switch"):
            kwargs["action"] = "store_true"
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = FLAG_TYPES.get(name, str)
            for key in ("choices", "metavar"):
                if key in meta:
                    kwargs[key] = meta[key]
        if name == "recipe":
            kwargs["help"] = (
                f"{meta['help']}: {', '.join(settings_lib.recipe_names())} (default: {settings_lib.DEFAULT_RECIPE})"
            )
        groups[meta["group"]].add_argument(f"--{name}", **kwargs)
    add_verbose_arg(parser)
    parser.add_argument(
        "--print_config", action="store_true", help="print every resolved setting and where it came from, then exit"
    )


def add_adapter_args(parser: argparse.ArgumentParser, verb: str) -> None:
    """Which run and which of its adapters: --experiment_dir, --checkpoint STEP, --final_adapter."""
    parser.add_argument("--experiment_dir", required=True, help=f"the training run folder to {verb}")
    parser.add_argument(
        "--checkpoint",
        type=positive_int,
        default=None,
        metavar="STEP",
        help=f"{verb} the adapter of the run's checkpoint at this optimizer step (kept with "
        "--keep_checkpoints) instead of the default: the checkpoint chosen on validation "
        "while training (--select_on), else the final adapter",
    )
    parser.add_argument(
        "--final_adapter",
        action="store_true",
        help=f"{verb} the final adapter even when training chose a checkpoint on validation",
    )


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show every library message and progress bar (default: only what you can act on)",
    )


def given_settings(args: argparse.Namespace) -> dict:
    """The settings given as flags (the parser leaves out those not given)."""
    return {key: value for key, value in vars(args).items() if key in settings_lib.FIELDS}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--pretrained_ckpt",
        default=settings_lib.DEFAULT_MODEL,
        help=settings_lib.FIELDS["pretrained_ckpt"].metadata["help"] + " (default: %(default)s)",
    )
    group.add_argument(
        "--load_in_4bit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="quantize the base model to 4-bit NF4 with double quantization (default: on)",
    )
    group.add_argument(
        "--use_flash_attention",
        action="store_true",
        help="use flash_attention_2 (needs the flash-attn package); SDPA otherwise",
    )


def add_data_args(parser: argparse.ArgumentParser, task) -> None:
    """The data flags of the evaluation scripts."""
    task = get_task(task)
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default=task.default_dataset, help="Hub dataset id (default: %(default)s)")
    columns = f"columns {task.input_column},{task.target_column}; {FORMATS}"
    group.add_argument("--train_file", help=f"local training file instead of the Hub ({columns})")
    group.add_argument("--validation_file", help=f"local validation file ({columns})")
    group.add_argument("--test_file", help=f"local test file ({columns})")
    group.add_argument(
        "--columns",
        type=column_map,
        default=None,
        metavar="NAME=YOURS,...",
        help="the data's own column names, e.g. text=sentence,label=category (default: those the "
        "training run was given)",
    )
    if task.labelled:
        group.add_argument(
            "--label_names",
            type=label_names_arg,
            default=None,
            metavar="NAMES",
            help="names of integer labels 0,1,2,...: comma-separated or a file (default: the training run's)",
        )


def add_generation_args(parser: argparse.ArgumentParser, task, *, baseline: bool) -> None:
    task = get_task(task)
    group = parser.add_argument_group("evaluation")
    group.add_argument("--split", choices=("test", "validation"), default="test", help="default: %(default)s")
    group.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N examples")
    group.add_argument(
        "--batch_size",
        type=positive_int,
        default=None,
        help="generation batch size (default: 1,024 prompts on a GPU, within --max_batch_tokens; 32 on a CPU; "
        "halved on out-of-memory)",
    )
    group.add_argument(
        "--max_batch_tokens",
        type=positive_int,
        default=None,
        help="at most this many padded tokens per batch (default: what half the free GPU memory "
        "holds as KV cache, after room for one prefill group's activations)",
    )
    group.add_argument(
        "--max_new_tokens",
        type=positive_int,
        default=task.baseline_max_new_tokens if baseline else task.max_new_tokens,
        help="default: %(default)s",
    )
    group.add_argument(
        "--max_prompt_tokens",
        type=positive_int,
        default=None,
        help="shorten the input text so the prompt fits (default: the training --max_seq_length, "
        "or 2048 for baselines)",
    )
    group.add_argument(
        "--num_beams",
        type=positive_int,
        default=1,
        help="beam search with this many beams, through transformers' generate (scores divided by length, as "
        "transformers does; slower); 1: greedy, through the batched engine (default: %(default)s)",
    )
    group.add_argument("--output_dir", default=None, help="where metrics.json and predictions.jsonl go")
    group.add_argument("--overwrite", action="store_true", help="replace existing evaluation results")
    if task.labelled:
        group.add_argument(
            "--decoding",
            choices=("greedy", "constrained", "likelihood"),
            default="greedy",
            help="greedy: generate and parse; constrained: generate, each token one a label allows; likelihood: "
            "the label whose whole answer is most probable (scored, not generated); results of a decoding other "
            "than greedy go to a folder named after it (default: %(default)s)",
        )


def add_prompt_style_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompt_style",
        choices=prompts.PROMPT_STYLES,
        default="seed",
        help="seed: the original instruction prompt as plain text; chat: the same prompt as a "
        "user turn of the chat template (default: %(default)s)",
    )
