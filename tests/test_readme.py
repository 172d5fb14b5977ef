"""The README documents every flag the scripts accept, so the two cannot drift apart."""

from pathlib import Path

from qlora_kit import eval_cli, train_cli

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _flags(parser):
    return {option for action in parser._actions for option in action.option_strings
            if option.startswith("--") and option != "--help"}


def test_every_flag_is_in_the_readme():
    parsers = [train_cli.build_parser("classification", ""), train_cli.build_parser("summarization", ""),
               eval_cli.build_finetuned_parser("classification", ""), eval_cli.build_finetuned_parser("summarization", "")]
    baseline = eval_cli.build_baseline_parser("")
    eval_cli.parse_baseline_args(baseline, ["--task_type", "classification", "--prompt_type", "zero-shot"])
    parsers.append(baseline)
    missing = sorted({flag for parser in parsers for flag in _flags(parser) if f"`{flag}`" not in README
                      and f"`{flag} " not in README and f"{flag}`" not in README})
    assert not missing, f"flags missing from README: {missing}"


def test_readme_test_command_is_what_ci_runs():
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in README and "bash scripts/test.sh" in ci
