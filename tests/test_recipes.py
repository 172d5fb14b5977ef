"""--recipe fills every setting the user did not give; a flag given always wins."""

import json
import re

import pytest
from conftest import run_script

from qlora_kit import settings
from qlora_kit.cli import given_settings
from qlora_kit.errors import UsageError
from qlora_kit.train_cli import build_parser


def _resolved(task, *argv):
    return settings.resolve(task, given_settings(build_parser(task, "").parse_args(list(argv))))[0].to_dict()


def test_the_default_recipe_keeps_the_original_settings_beyond_speed():
    for task, epochs in (("classification", 5), ("summarization", 1)):
        args = _resolved(task)
        assert (args["epochs"], args["lr_scheduler"], args["load_in_4bit"], args["full_tune"]) == (
            epochs,
            "constant_with_warmup",
            True,
            False,
        )
        assert (args["max_seq_length"], args["prompt_style"], args["batch_size"]) == (512, "seed", 32)
        assert args["logits_where_scored"] is False


def test_small_model_recipe_sets_its_settings_per_task():
    news = _resolved("classification", "--recipe", "small-model")
    samsum = _resolved("summarization", "--recipe", "small-model")
    for args in (news, samsum):
        assert (args["batch_size"], args["grad_accum"], args["learning_rate"], args["lr_scheduler"]) == (
            16,
            1,
            1e-3,
            "cosine",
        )
        assert (args["epochs"], args["load_in_4bit"], args["full_tune"], args["gradient_checkpointing"]) == (
            3,
            False,
            True,
            False,
        )
        assert args["logits_where_scored"] is True  # as the measured runs computed them
    assert (news["max_seq_length"], news["prompt_style"], news["lora_r"]) == (1024, "seed", 8)
    assert (samsum["max_seq_length"], samsum["prompt_style"], samsum["lora_r"]) == (512, "chat", 64)


@pytest.mark.parametrize(
    "flag, value, key",
    [
        (["--load_in_4bit"], True, "load_in_4bit"),
        (["--no-full_tune"], False, "full_tune"),
        (["--epochs", "1"], 1, "epochs"),
        (["--lr_scheduler", "linear"], "linear", "lr_scheduler"),
        (["--max_seq_length", "256"], 256, "max_seq_length"),
        (["--prompt_style", "seed"], "seed", "prompt_style"),
        (["--no-logits_where_scored"], False, "logits_where_scored"),
    ],
)
def test_a_given_flag_wins_over_the_recipe(flag, value, key):
    assert _resolved("summarization", "--recipe", "small-model", *flag)[key] == value


def test_help_states_each_recipes_value_from_the_recipe_files():
    def help_text(task):  # one line, words that argparse broke at a hyphen joined again
        return re.sub(r"-\s+", "-", " ".join(build_parser(task, "").format_help().split()))

    news, samsum = help_text("classification"), help_text("summarization")
    assert "--lr_scheduler" in news and "(default: constant_with_warmup, or the recipe's: small-model: cosine)" in news
    assert "(default: 4, or the recipe's: fast: 32; small-model: 16)" in news  # batch size
    assert "(default: 512, or the recipe's: small-model: 1024)" in news  # its classification section
    assert "(default: 512)" in samsum and "(default: seed, or the recipe's: small-model: chat)" in samsum


def test_a_recipe_file_and_flags_resolve_with_the_stated_precedence(tmp_path):
    """default < task < recipe file < the recipe's task section < flag, each value with where it came from."""
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(
        "# my recipe\nbatch_size: 8\nlearning_rate: 3e-4\nlora_r: 4\nepochs: 2\n"
        "classification:\n  lora_r: 6\n  max_seq_length: 256\n"
    )
    resolved, sources = settings.resolve("classification", {"recipe": str(recipe), "epochs": 7})
    assert (resolved.grad_accum, sources["grad_accum"]) == (2, "default")
    assert (resolved.dataset, sources["dataset"]) == ("rungalileo/20_Newsgroups_Fixed", "task classification")
    assert (resolved.batch_size, resolved.learning_rate) == (8, 3e-4)  # 3e-4 is text to YAML: converted
    assert sources["batch_size"] == f"recipe {recipe}"
    assert (resolved.lora_r, resolved.max_seq_length) == (6, 256)  # the task section wins over the shared key
    assert sources["lora_r"] == f"recipe {recipe}, classification section"
    assert (resolved.epochs, sources["epochs"]) == (7, "flag")
    summarization, _ = settings.resolve("summarization", {"recipe": str(recipe)})
    assert (summarization.lora_r, summarization.max_seq_length) == (4, 512)


def test_print_config_prints_every_setting_and_its_source(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("batch_size: 8\n")
    result = run_script("zephyr_classification.py", "--recipe", recipe, "--lora_r", 3, "--print_config", cwd=tmp_path)
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines() if not line.startswith("#")}
    assert lines["batch_size"][1:] == ["8", "recipe", str(recipe)]
    assert lines["lora_r"][1:] == ["3", "flag"] and lines["seed"][1:] == ["42", "default"]
    assert lines["epochs"][1:] == ["5", "task", "classification"]
    assert set(lines) == set(settings.FIELDS)
    assert not (tmp_path / "experiments").exists()  # nothing trained


@pytest.mark.parametrize(
    "content, message",
    [
        ("batch_sise: 8\n", "unknown setting 'batch_sise'"),
        ("classification:\n  lr: 1\n", "unknown setting 'classification.lr'"),
        ("experiment_dir: x\n", "unknown setting 'experiment_dir'"),
        ("batch_size: many\n", "'batch_size' must be an int"),
        ("packing: 1\n", "'packing' must be true or false"),
        ("lr_scheduler: exponential\n", "'lr_scheduler' must be one of"),
        # held to the same bounds as the flags (peft, torch or the trainer would fail deep inside)
        ("learning_rate: -1e-4\n", "'learning_rate' must be > 0, got -0.0001"),
        ("classification:\n  lora_r: 0\n", "bad.yaml: 'classification.lora_r' must be a positive integer, got 0"),
        ("dropout: 1.5\n", r"'dropout' must be in \[0, 1\), got 1.5"),
        ("save_steps: 0\n", "'save_steps' must be a positive integer"),
        ("- a list\n", "a recipe is a mapping"),
    ],
)
def test_a_bad_recipe_file_is_one_line_naming_file_and_key(tmp_path, content, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(content)
    with pytest.raises(UsageError, match=message) as error:
        settings.resolve("classification", {"recipe": str(recipe)})
    assert str(recipe) in str(error.value) and "\n" not in str(error.value)
    result = run_script("zephyr_classification.py", "--recipe", recipe, cwd=tmp_path, check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(f"error: {recipe}")


def test_an_unknown_recipe_name_lists_the_recipes(tmp_path):
    result = run_script("zephyr_summarization.py", "--recipe", "fastest", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "fast, original, small-model" in result.stderr


def test_small_model_recipe_trains_end_to_end(tiny_model, data_dir, tmp_path):
    run_script(
        "zephyr_summarization.py",
        "--pretrained_ckpt",
        tiny_model,
        "--train_file",
        data_dir / "dialogues_train.jsonl",
        "--recipe",
        "small-model",
        "--max_steps",
        1,
        "--lora_r",
        2,
        cwd=tmp_path,
    )
    (folder,) = (tmp_path / "experiments").iterdir()
    # the recipe is named, the settings it chose are not (they are its defaults)
    assert "recipe-small-model" in folder.name and "epochs-3" in folder.name and "_full" in folder.name
    assert "sched-" not in folder.name and "4bit" not in folder.name and "style-" not in folder.name
    config = json.loads((folder / "run_config.json").read_text())
    assert config["load_in_4bit"] is False and config["prompt_style"] == "chat"
    assert config["settings"]["lr_scheduler"] == "cosine" and config["settings"]["batch_size"] == 16
    assert "lm_head" in config["lora_target_modules"]


@pytest.mark.parametrize("task, run", [("classification", "news-full-cosine"), ("summarization", "samsum-cosine")])
def test_small_model_recipe_is_what_the_winning_runs_used(task, run):
    """The preset must not drift from the committed runs it was chosen by (results/smollm2/runs/validated_recipe):
    every setting that shapes training is the same, and those runs computed logits only where scored."""
    from pathlib import Path

    config = json.loads(
        (
            Path(__file__).resolve().parent.parent
            / "results"
            / "smollm2"
            / "runs"
            / "validated_recipe"
            / run
            / "run_config.json"
        ).read_text()
    )["settings"]
    preset = _resolved(task, "--recipe", "small-model")
    shaping = [
        "load_in_4bit",
        "lora_r",
        "lora_alpha",
        "dropout",
        "full_tune",
        "epochs",
        "learning_rate",
        "lr_scheduler",
        "batch_size",
        "grad_accum",
        "optim",
        "group_by_length",
        "use_liger_kernel",
        "max_seq_length",
        "neftune",
        "prompt_style",
        "completion_only_loss",
        "gradient_checkpointing",
        "packing",
        "seed",
    ]
    assert {key: preset[key] for key in shaping} == {key: config[key] for key in shaping}
    assert "logits_where_scored" not in config and preset["logits_where_scored"]  # then the only path
