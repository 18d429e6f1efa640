"""Compact headline of one or more benchmark runs: median ms per provider, side by side, per case.

    python benchmarks/summarize.py RUN_DIR [RUN_DIR ...] [--markdown SUMMARY.md]

Each RUN_DIR may hold ``bench_loss.json``, ``max_batch.json`` and ``matmul_peak.json``. For every
(dtype, mode, pass, N) it prints one line: each provider's median time (or OOM / n/a / skip),
then the best of ours vs naive and vs the best baseline that ran, and the best of ours' TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import providers as P  # noqa: E402

SHORT = {"OOM": "OOM", "n/a": "n/a", "skip": "skip", "error": "ERR"}


def headline(rows: list[dict]) -> list[str]:
    """Text lines: one header, then one line per (dtype, mode, pass, N)."""
    names = [p for p in P.ALL_PROVIDERS if any(r["provider"] == p for r in rows)]
    head = f"{'dtype':<5} {'mode':<9} {'pass':<6} {'N':>7} {'D':>5} | " + " ".join(f"{n:>10}" for n in names)
    head += " | ours/naive ours/bestbase  TFLOP/s"
    lines = [head, "-" * len(head)]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["dtype"], r["mode"], r["pass"], r["n"], r["d"]), {})[r["provider"]] = r
    for (dname, mode, pass_, n, d), grp in groups.items():
        cells = []
        for name in names:
            r = grp.get(name)
            if r is None:
                cells.append(f"{'':>10}")
            elif r["status"] == "ok":
                cells.append(f"{r['time_ms_median']:>10.3f}")
            else:
                cells.append(f"{SHORT.get(r['status'], r['status']):>10}")
        ok = {k: r for k, r in grp.items() if r["status"] == "ok"}
        ours = [r for k, r in ok.items() if k in P.OURS]
        base = [r for k, r in ok.items() if k in P.BASELINES]
        tail = ""
        if ours:
            best = min(ours, key=lambda r: r["time_ms_median"])
            vs_naive = f"{ok['naive']['time_ms_median'] / best['time_ms_median']:.2f}x" if "naive" in ok else "naive OOM"
            if base:
                b = min(base, key=lambda r: r["time_ms_median"])
                vs_base = f"{b['time_ms_median'] / best['time_ms_median']:.2f}x ({b['provider']})"
            else:
                vs_base = "no baseline ran"
            tail = f" | {vs_naive:>10} {vs_base:>13} {best.get('tflops') or 0:8.3g} ({best['provider']})"
        lines.append(f"{dname:<5} {mode:<9} {pass_:<6} {n:>7} {d:>5} | " + " ".join(cells) + tail)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="folders with bench_loss.json / max_batch.json / matmul_peak.json")
    ap.add_argument("--markdown", default=None, help="also write the full tables of every run to this file")
    args = ap.parse_args(argv)
    rows, text, md = [], [], []
    for run in map(Path, args.runs):
        peak = run / "matmul_peak.json"
        if peak.exists():
            data = json.loads(peak.read_text())
            text.append(f"matmul peak on {data['device']}: " + ", ".join(
                f"{r['dtype']} {r['tflops_median']:.1f} TFLOP/s" for r in data["rows"]))
        bench = run / "bench_loss.json"
        if bench.exists():
            data = json.loads(bench.read_text())
            rows += data["rows"]
            md.append((run / "bench_loss.md").read_text() if (run / "bench_loss.md").exists() else "")
            unavailable = data["meta"].get("providers_unavailable") or {}
            if unavailable:
                text.append(f"{run.name}: not run: " + "; ".join(f"{k} ({v})" for k, v in unavailable.items()))
        mb = run / "max_batch.json"
        if mb.exists():
            data = json.loads(mb.read_text())
            a = data["meta"]["args"]
            text.append(f"max batch ({data['meta']['label']}, D={a['dim']} {a['dtype']} {a['mode']} {a['pass_']}):")
            for r in data["rows"]:
                ext = r.get("linear_memory_extrapolated_n")
                text.append(f"  {r['provider']:<12} {r['result']}" + (f"  [linear-memory extrapolation ~{ext}]" if ext else ""))
    if rows:
        text += ["", "median ms per provider (OOM / n/a / skip); ours = best of torch/triton/cuda:"] + headline(rows)
    print("\n".join(text))
    if args.markdown:
        Path(args.markdown).write_text("```\n" + "\n".join(text) + "\n```\n\n" + "\n\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
