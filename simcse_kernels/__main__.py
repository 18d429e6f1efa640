"""``python -m simcse_kernels [--json PATH] [--no-timing] ...``: diagnostics (see :mod:`simcse_kernels.diagnostics`)."""

import sys

from .diagnostics import main

if __name__ == "__main__":
    sys.exit(main())
