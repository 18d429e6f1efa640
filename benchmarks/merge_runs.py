"""Merge several ``bench_loss.json`` runs (e.g. one fresh process per (D, N) group) into one result.

    python benchmarks/merge_runs.py runs/*/bench_loss.json --out benchmarks/results/cpu

Writes ``bench_loss.{csv,json,md}`` and the plots (one set per D) under ``--out`` (rows of every
run, a later run's row replacing an earlier one of the same case; ``meta.runs`` = each run's own
meta) and, unless ``--no-summary``, ``SUMMARY.md`` via ``summarize.py``. When
:mod:`simcse_kernels.analysis.gemm_count` exists, each ``ours`` row also gets ``gemm_equiv_counted``:
the GEMM-equivalents one forward+backward of that backend actually performs (counted on CPU).
``gemm_equiv`` stays the nominal 3 of the FLOP convention.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_loss  # noqa: E402

MODE_ORDER = {"unsup": 0, "sup": 1, "mixcse": 2, "symmetric": 3}


def _key(r: dict) -> tuple:
    return (r["dtype"], r["mode"], r["pass"], r["n"], r["d"], r["provider"])


def merge(paths: list[Path]) -> tuple[list[dict], dict]:
    """Rows of every run and a merged meta (the first run's, with ``runs`` = all metas).

    Rows are sorted by (dtype, D, mode, pass, N), providers in run order; a row of a later file
    replaces the row of the same (dtype, mode, pass, N, D, provider) of an earlier one, and
    ``run`` names the folder each row came from.

    Args:
        paths: ``bench_loss.json`` files.
    """
    by_key: dict[tuple, dict] = {}
    metas = []
    for path in paths:
        data = json.loads(path.read_text())
        for r in data["rows"]:
            r = dict(r, run=str(path.parent.name))
            # a later run's row replaces an earlier one of the same case (a re-measured group)
            by_key.pop(_key(r), None)
            by_key[_key(r)] = r
        metas.append(dict(data["meta"], source=str(path)))
    rows = sorted(by_key.values(), key=lambda r: (r["dtype"], r["d"], MODE_ORDER.get(r["mode"], 9), r["pass"],
                                                   r["n"]))
    if not metas:
        raise SystemExit("no runs to merge")
    meta = dict(metas[0])
    meta["runs"] = metas
    meta["args"] = dict(metas[0]["args"], dim="/".join(sorted({str(m["args"]["dim"]) for m in metas})))
    meta["providers"] = sorted({p for m in metas for p in m["providers"]})
    meta["wall_s"] = round(sum(m.get("wall_s", 0.0) for m in metas), 1)
    return rows, meta


#: benchmark mode -> the GEMM-count mode with the same logit blocks (sup's w = 0 changes no GEMM)
GEMM_COUNT_MODES = {"unsup": "unsup", "sup": "sup_weight", "mixcse": "mixcse", "symmetric": "symmetric"}


def add_gemm_counts(rows: list[dict], n_count: int = 64) -> str:
    """``gemm_equiv_counted`` on rows of ours (fwd+bwd), from :mod:`simcse_kernels.analysis.gemm_count`.

    ``torch`` rows are counted at the benchmark's own N and D on the ``meta`` device with the row
    plan of the benchmark's device (default budget, so a symmetric loss takes the same one-chunk,
    two-pass or kept-rows path). Other backends at N = ``n_count`` with the default 256 MiB chunk
    budget scaled by (n_count / N)². Returns a note for the meta (what was counted, or why not).
    """
    try:
        from simcse_kernels.analysis.gemm_count import count_gemm_equivalents
        from simcse_kernels.ops.budget import DEFAULT_CHUNK_MIB
    except ImportError as exc:
        return f"GEMM-equivalents not counted: {exc}"
    cache: dict[tuple, float] = {}
    for r in rows:
        mode = GEMM_COUNT_MODES.get(r["mode"])
        if r.get("kind") != "ours" or r.get("status") != "ok" or r["pass"] != "fwdbwd" or mode is None:
            continue
        key = (r["provider"], mode, r["n"], r["d"], r["device"])
        if key not in cache:
            if r["provider"] == "torch":
                count = count_gemm_equivalents("torch", mode, r["n"], r["d"], meta_plan_of=r["device"])
            else:
                budget = DEFAULT_CHUNK_MIB * (n_count / r["n"]) ** 2
                count = count_gemm_equivalents(r["provider"], mode, n_count, r["d"], chunk_budget_mib=budget)
            cache[key] = round(count, 4)
        r["gemm_equiv_counted"] = cache[key]
    return ("gemm_equiv_counted: simcse_kernels.analysis.gemm_count.count_gemm_equivalents, forward+backward "
            "(every matmul FLOP / 2·N·M·D): torch at the row's N and D on the meta device with the row's "
            f"device's chunk plan and default budget; other backends at n={n_count} with a chunk budget "
            f"256 MiB·({n_count}/N)²")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="bench_loss.json files")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--no-summary", action="store_true")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    rows, meta = merge(args.runs)
    meta["gemm_count"] = add_gemm_counts(rows)
    paths = bench_loss.write_outputs(rows, meta, args.out, plots=not args.no_plots)
    if not args.no_summary:
        import summarize

        # the merged bench_loss.json (plus any max_batch.json / matmul_peak.json already in --out)
        summarize.main([str(args.out), "--markdown", str(args.out / "SUMMARY.md")])
        paths.append(args.out / "SUMMARY.md")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
