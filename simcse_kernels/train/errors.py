"""``UsageError``: a user mistake (bad flag value, missing or malformed file, unknown model).

The CLIs print its message as one line (``simcse-train: error: ...``) and exit with status 2; the Python
API raises it (it is a ``ValueError``). Anything else that goes wrong is unexpected and keeps its traceback.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A user input that cannot work; the message names the flag or file (and line) and what is wrong."""


class TrainingStopped(RuntimeError):
    """The run stopped on purpose: non-finite loss/gradients, a failed write (full disk), a signal.

    The CLI prints the message as one line and exits with ``exit_code`` (1; 130 / 143 after SIGINT / SIGTERM).
    Checkpoints written before stay intact.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def write_failed(path, exc: OSError) -> TrainingStopped:
    """One-line error for a failed write of ``path`` (names the path and the cause, e.g. no space left)."""
    cause = exc.strerror or str(exc)
    return TrainingStopped(f"cannot write {path}: {cause} (errno {exc.errno}); earlier checkpoints are intact")
