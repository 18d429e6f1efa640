"""Log-log plots of the loss benchmark: time vs N and peak extra memory vs N, one panel per mode.

Usage (re-plot one results file, or merge several runs into one set of plots)::

    python benchmarks/plots.py benchmarks/results/cpu/bench_loss.json --out benchmarks/results/cpu
    python benchmarks/plots.py runA/bench_loss.json runB/bench_loss.json --out merged/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

STYLE = {
    "naive": dict(color="black", marker="o", ls="-"),
    "simcse_orig": dict(color="tab:gray", marker="v", ls="--"),
    "compile": dict(color="tab:brown", marker="s", ls="--"),
    "st_mnrl": dict(color="tab:purple", marker="D", ls="--"),
    "st_cmnrl": dict(color="tab:pink", marker="d", ls=":"),
    "infcl": dict(color="tab:olive", marker="P", ls="-."),
    "torch": dict(color="tab:blue", marker="^", ls="-", lw=2),
    "triton": dict(color="tab:red", marker="*", ls="-", lw=2, ms=9),
    "cuda": dict(color="tab:green", marker="X", ls="-", lw=2),
}
PASS_TITLE = {"fwd": "forward", "fwdbwd": "forward + backward"}


def _panel(ax, rows: list[dict], value: str, ylabel: str) -> None:
    """One mode: a line per provider over N; OOM marked 'x' at the top edge, n/a noted."""
    top = blended_transform_factory(ax.transData, ax.transAxes)
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    any_line = False
    for name in providers:
        pts = sorted((r["n"], r[value]) for r in rows if r["provider"] == name and r["status"] == "ok"
                     and r.get(value) is not None and r[value] > 0)
        style = dict(STYLE.get(name, {}))
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], label=name, **style)
            any_line = True
        ooms = [r["n"] for r in rows if r["provider"] == name and r["status"] == "OOM"]
        if ooms:
            ax.scatter(ooms, [0.97] * len(ooms), transform=top, marker="x", color=style.get("color"), s=40,
                       clip_on=False, label=None if pts else f"{name} (OOM)")
    nas = [p for p in providers if all(r["status"] == "n/a" for r in rows if r["provider"] == p)]
    if nas:
        ax.text(0.98, 0.03, "n/a: " + ", ".join(nas), transform=ax.transAxes, fontsize=7, color="0.35", ha="right")
    if any_line:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_xlabel("batch N")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


def plot_results(rows: list[dict], out: Path, label: str) -> list[Path]:
    """Write ``time_vs_n_<dtype>_<pass>.png`` and ``memory_vs_n_<dtype>_<pass>.png`` (``_d<D>`` appended
    when the rows hold several D); return the paths.

    Args:
        rows: result rows of ``bench_loss`` (keys provider, status, n, mode, pass, dtype, d,
            time_ms_median, peak_extra_mib). out: folder. label: device text for the titles.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    combos = list(dict.fromkeys((r["dtype"], r["pass"], r["d"]) for r in rows))
    for dname, pass_, d in combos:
        sub = [r for r in rows if r["dtype"] == dname and r["pass"] == pass_ and r["d"] == d]
        modes = list(dict.fromkeys(r["mode"] for r in sub))
        # one D per (dtype, pass): the plain names; several (merged runs): a _d<D> suffix each
        suffix = f"_d{d}" if sum(1 for c in combos if c[:2] == (dname, pass_)) > 1 else ""
        for value, ylabel, stem in (("time_ms_median", "median time (ms)", "time_vs_n"),
                                    ("peak_extra_mib", "peak extra memory (MiB)", "memory_vs_n")):
            if not any(r.get(value) is not None for r in sub):
                continue
            fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 4.0), squeeze=False)
            for ax, mode in zip(axes[0], modes):
                _panel(ax, [r for r in sub if r["mode"] == mode], value, ylabel)
                ax.set_title(mode)
            handles, labels = {}, []
            for ax in axes[0]:
                for h, lab in zip(*ax.get_legend_handles_labels()):
                    if lab not in handles:
                        handles[lab] = h
                        labels.append(lab)
            fig.legend([handles[k] for k in labels], labels, loc="lower center", ncol=min(len(labels), 9),
                       fontsize=9, frameon=False)
            what = "time" if value.startswith("time") else "peak extra memory"
            fig.suptitle(f"InfoNCE loss {what} vs batch N — {PASS_TITLE.get(pass_, pass_)}, {dname}, D={d} — {label}"
                         "  (x = OOM)", fontsize=11)
            fig.tight_layout(rect=(0, 0.08, 1, 0.95))
            path = out / f"{stem}_{dname}_{pass_}{suffix}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Plot a bench_loss.json file")
    ap.add_argument("results", nargs="+", help="bench_loss.json file(s); rows of several runs are merged")
    ap.add_argument("--out", default=None, help="folder (default: the first JSON's folder)")
    args = ap.parse_args(argv)
    rows, label = [], None
    for path in args.results:
        data = json.loads(Path(path).read_text())
        rows += data["rows"]
        label = label or data["meta"]["label"]
    out = Path(args.out) if args.out else Path(args.results[0]).parent
    for p in plot_results(rows, out, label):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
