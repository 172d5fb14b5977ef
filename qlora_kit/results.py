"""Result files: JSON and JSONL only (nothing is pickled), written atomically; their reading with clear errors.

Where each file of a run lives is ``run_folder``'s business.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import UsageError


def _write_atomic(path: Path, write) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it over: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data) -> None:
    def write(handle):
        json.dump(data, handle, indent=2, ensure_ascii=False, default=str)
        handle.write("\n")

    _write_atomic(path, write)


def write_jsonl_atomic(path: Path, rows) -> None:
    _write_atomic(path, lambda handle: handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_json(path: Path, what: str):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no {what} here")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: unreadable {what} ({error})")


def check_writable_dir(path: Path, flag: str) -> None:
    """Fail early, with the flag's name, when ``path`` could not be created or written; creates nothing."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write there (permission denied on {existing})")
