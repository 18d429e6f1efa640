"""Memory budget of the row-chunked gradient paths (fused and ``torch`` backends).

Both backends form ``∂L/∂s`` for R anchor rows at a time, an (R, M) buffer; R is chosen so that
buffer fits the budget, so extra memory is O(R·M + (N + M)·D) and never grows with N·M. The
``torch`` backend's symmetric loss also keeps first-pass logit rows in what the budget leaves
(:func:`simcse_kernels.ops.chunked.symmetric_cache_rows`).
"""

from __future__ import annotations

import os

#: default budget of the (R, M) gradient chunk, in MiB
DEFAULT_CHUNK_MIB = 256.0
ENV_VAR = "SIMCSE_KERNELS_CHUNK_MIB"


def budget_is_set(chunk_budget_mib: float | None) -> bool:
    """Whether the caller chose the budget (the option, or a non-empty ``$SIMCSE_KERNELS_CHUNK_MIB``)."""
    return chunk_budget_mib is not None or os.environ.get(ENV_VAR, "").strip() != ""


def chunk_budget_bytes(chunk_budget_mib: float | None) -> int:
    """Bytes allowed for one (R, M) chunk: the option, else ``$SIMCSE_KERNELS_CHUNK_MIB``, else 256 MiB."""
    if chunk_budget_mib is None:
        raw = os.environ.get(ENV_VAR)
        if raw is None or raw.strip() == "":
            chunk_budget_mib = DEFAULT_CHUNK_MIB
        else:
            try:
                chunk_budget_mib = float(raw)
            except ValueError:
                raise ValueError(f"{ENV_VAR} must be a positive number of MiB, got {raw!r}") from None
            if not chunk_budget_mib > 0:
                raise ValueError(f"{ENV_VAR} must be a positive number of MiB, got {raw!r}")
    return max(1, int(chunk_budget_mib * (1 << 20)))


def rows_per_chunk(n_rows: int, n_cols: int, bytes_per_logit: int, budget_bytes: int, multiple: int = 1) -> int:
    """Rows R of an (R, n_cols) chunk within ``budget_bytes``: at least ``multiple`` (and 1), at most
    ``n_rows``, a multiple of ``multiple`` unless it is all rows."""
    per_row = max(1, n_cols * bytes_per_logit)
    rows = budget_bytes // per_row
    if multiple > 1:
        rows = rows // multiple * multiple
    rows = max(rows, multiple, 1)
    return min(rows, max(n_rows, 1))
