"""The documentation names every flag the scripts accept, and the test command CI runs."""

from pathlib import Path

from qlora_kit import eval_cli, train_cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
FLAGS = (ROOT / "docs" / "flags.md").read_text()


def _flags(parser):
    return {
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


def test_every_flag_is_in_the_flag_reference():
    parsers = [
        train_cli.build_parser("classification", ""),
        train_cli.build_parser("summarization", ""),
        eval_cli.build_finetuned_parser("classification", ""),
        eval_cli.build_finetuned_parser("summarization", ""),
    ]
    baseline = eval_cli.build_baseline_parser("")
    eval_cli.parse_baseline_args(baseline, ["--task_type", "classification", "--prompt_type", "zero-shot"])
    parsers.append(baseline)
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_model", ROOT / "export_model.py")
    export_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_model)
    parsers.append(export_model.build_parser())
    missing = sorted(
        {
            flag
            for parser in parsers
            for flag in _flags(parser)
            if f"`{flag}`" not in FLAGS and f"`{flag} " not in FLAGS and f"{flag}`" not in FLAGS
        }
    )
    assert not missing, f"flags missing from docs/flags.md: {missing}"


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in README and "bash scripts/test.sh" in ci


def test_readme_links_resolve():
    import re

    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


def test_the_package_docstring_maps_every_module():
    """qlora_kit/__init__.py lists every module of the package with what it does: a new module is added there."""
    import re

    import qlora_kit

    the_map = qlora_kit.__doc__.split("\n\n", 1)[1]
    listed = set(re.findall(r"\w+", the_map))
    modules = {path.stem for path in (ROOT / "qlora_kit").glob("*.py")} - {"__init__"}
    assert modules <= listed, f"not in qlora_kit/__init__.py's map: {sorted(modules - listed)}"
