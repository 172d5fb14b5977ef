"""User-facing errors: one clear line and a non-zero exit, never a library traceback."""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

EXIT_USAGE = 2
_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class UsageError(Exception):
    """Bad input from the user (file, field, flag): printed as one line, exit status 2."""


class Interrupted(Exception):
    """Stopped by a signal after saving what can be resumed: printed as one line, exit status 128 + signal."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number


def run_main(main: Callable[[], object]) -> None:
    """Run an entry point; turn UsageError (and Ctrl-C) into a one-line message and exit code."""
    from . import distributed

    try:
        main()
        distributed.shutdown()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except Interrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except OSError as error:
        # A full disk or a folder that turned read-only mid-run: say which file, and how to go on.
        if error.errno not in _STORAGE_ERRORS:
            raise
        where = f": {error.filename}" if error.filename else ""
        print(
            f"error: {error.strerror or error}{where}; results already written are intact "
            "(free space or fix permissions, then run again; training continues with --resume)",
            file=sys.stderr,
        )
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
