"""``UsageError``: a user mistake (bad flag value, missing or malformed file, unknown model).

The CLIs print its message as one line (``simcse-train: error: ...``) and exit with status 2; the Python
API raises it (it is a ``ValueError``). Anything else that goes wrong is unexpected and keeps its traceback.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A user input that cannot work; the message names the flag or file (and line) and what is wrong."""
