import errno
import json

import pytest

from qlora_kit import results
from qlora_kit.errors import UsageError, run_main


def test_full_disk_gets_a_clear_message_and_keeps_the_old_file(tmp_path, capsys, monkeypatch):
    target = tmp_path / "metrics.json"
    results.write_json_atomic(target, {"accuracy": 0.5})

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".metrics.json.tmp"))

    monkeypatch.setattr(results.json, "dump", full_disk)
    with pytest.raises(SystemExit) as stop:
        run_main(lambda: results.write_json_atomic(target, {"accuracy": 0.9}))
    assert stop.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith(f"error: No space left on device: {tmp_path}") and "--resume" in message
    assert "Traceback" not in message
    assert json.loads(target.read_text()) == {"accuracy": 0.5}  # the finished file was not touched
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left behind


def test_usage_error_is_one_line(capsys):
    def bad():
        raise UsageError("--limit must be positive")

    with pytest.raises(SystemExit) as stop:
        run_main(bad)
    assert stop.value.code == 2 and capsys.readouterr().err == "error: --limit must be positive\n"


def test_other_errors_are_not_hidden():
    with pytest.raises(OSError):
        run_main(lambda: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))


@pytest.mark.parametrize(
    "variable",
    [
        "QLORA_KIT_GENERATION",
        "QLORA_KIT_INFERENCE_KERNELS",
        "QLORA_KIT_PREFILL_ATTENTION",
        "QLORA_KIT_RECHECK_MARGIN",
    ],
)
def test_every_evaluation_setting_is_checked_before_anything_loads(variable, monkeypatch):
    from qlora_kit import evaluation

    for name in ("GENERATION", "INFERENCE_KERNELS", "PREFILL_ATTENTION", "RECHECK_MARGIN"):
        monkeypatch.delenv(f"QLORA_KIT_{name}", raising=False)
    evaluation.check_environment()
    monkeypatch.setenv(variable, "bogus")
    with pytest.raises(UsageError, match=f"{variable}=bogus: leave it unset"):
        evaluation.check_environment()
