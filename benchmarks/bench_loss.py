"""Benchmark every loss provider side by side: time, peak memory, TFLOP/s, ratios, loss cross-check.

Example (GPU)::

    python benchmarks/bench_loss.py --device cuda --dtype bf16 --sizes 4096,16384,65536 --dim 768

Example (CPU, small)::

    python benchmarks/bench_loss.py --device cpu --dtype fp32 --sizes 256,1024,4096 --dim 256

Writes ``bench_loss.csv``, ``bench_loss.json``, ``bench_loss.md`` and PNG plots under ``--out``
(default ``benchmarks/results/<device>``) and prints the table.

FLOP convention (same nominal count for every provider, so TFLOP/s is proportional to 1/time):
``gemm_equiv * 2 * N * M * D`` with M the logit columns of the mode (unsup/symmetric N, sup 2N,
mixcse 3N) and ``gemm_equiv`` = 1 forward, 3 forward+backward (the naive loss's GEMM count);
recomputation inside fused backwards is not counted.

Each case (dtype, mode, pass, N, provider) is warmed up, then timed over ``--input-sets`` input
sets x up to ``--repeats`` calls (fewer when calls are slow, see ``--case-seconds``); the table
reports the median and the interquartile range. Status: ok | OOM | n/a (mode unsupported) |
skip (time bound) | error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402
import providers as P  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
COLUMNS = [
    "device", "dtype", "mode", "pass", "n", "d", "m_cols", "provider", "kind", "status", "note",
    "time_ms_median", "time_ms_q25", "time_ms_q75", "time_ms_min", "time_ms_max", "n_samples",
    "first_call_s", "peak_extra_mib", "input_mib", "gemm_equiv", "gflop", "tflops", "speedup_vs_naive",
    "mem_ratio_vs_naive", "loss", "loss_fp64_ref", "loss_abs_err",
]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
FLOP_CONVENTION = ("TFLOP/s = gemm_equiv * 2*N*M*D / median time; gemm_equiv = 1 (fwd), 3 (fwd+bwd); "
                   "M = logit columns (unsup/symmetric N, sup 2N, mixcse 3N); same count for every provider")
GPU_MEMORY_METHOD = ("GPU: torch.cuda.max_memory_allocated() during one (warm-up) call minus the memory allocated "
                     "before it (inputs excluded; fwd+bwd includes the input gradients)")
CPU_MEMORY_METHOD = ("CPU: peak RSS growth (VmHWM - VmRSS) of one call in a spawned worker subprocess "
                     "(inputs excluded; fwd+bwd includes the input gradients)")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="comma list of fp32,bf16,fp16,fp64 (default bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--sizes", default=None, help="comma list of N (default 4096,16384,65536 GPU; 256,1024 CPU)")
    ap.add_argument("--dim", type=int, default=None, help="D (default 768 GPU, 256 CPU)")
    ap.add_argument("--modes", default=",".join(P.MODES), help="comma list of " + ",".join(P.MODES))
    ap.add_argument("--passes", default=",".join(P.PASSES), help="fwd,fwdbwd")
    ap.add_argument("--providers", default=",".join(P.ALL_PROVIDERS), help="comma list (unavailable ones are listed)")
    ap.add_argument("--skip-providers", default="", help="comma list of providers to leave out")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per input set (upper bound)")
    ap.add_argument("--input-sets", type=int, default=3, help="independent random input sets per case")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up calls before timing")
    ap.add_argument("--case-seconds", type=float, default=None,
                    help="target timed seconds per case; repeats are cut to fit (>= 1 per input set)")
    ap.add_argument("--max-call-seconds", type=float, default=None,
                    help="skip a case when one call is predicted (quadratic in N) to exceed this")
    ap.add_argument("--time-budget", type=float, default=None, help="total seconds; later cases are 'skip'")
    ap.add_argument("--cpu-mem-cap-gb", type=float, default=6.0,
                    help="CPU: a case whose estimated extra memory exceeds this is recorded OOM, not run")
    ap.add_argument("--no-memory", action="store_true", help="do not measure peak memory")
    ap.add_argument("--ref-max-logits", type=float, default=2**27,
                    help="compute the float64 reference loss when N*M <= this")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; use 1 on a shared machine: OpenMP spin-waits "
                         "make oversubscribed threads very slow)")
    ap.add_argument("--label", default=None, help="label for titles (default: device name)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.sizes = args.sizes or ("4096,16384,65536" if gpu else "256,1024")
    args.dim = args.dim or (768 if gpu else 256)
    args.case_seconds = args.case_seconds or (2.0 if gpu else 3.0)
    args.max_call_seconds = args.max_call_seconds or (10.0 if gpu else 30.0)
    return args


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def environment(device: torch.device) -> dict:
    """Versions and hardware, recorded in the JSON meta."""
    env = dict(python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
               cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
               date_utc=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   gpu_mem_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    for mod in ("triton", "sentence_transformers", "inf_cl", "simcse_kernels"):
        try:
            env[mod] = getattr(__import__(mod), "__version__", "installed")
        except Exception:  # not installed or broken: recorded as such
            env[mod] = None
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except Exception:
        env["git_commit"] = None
    return env


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({os.cpu_count()} cores, {threads} thread{'s' if threads > 1 else ''})"


def fp64_reference(a, p, n, mode) -> float:
    from simcse_kernels import info_nce_reference

    opts = P.MODES[mode]
    to64 = lambda t: None if t is None else t.detach().double()
    return float(info_nce_reference(to64(a), to64(p), to64(n), temperature=P.TEMPERATURE,
                                    symmetric=opts["symmetric"], mix_lambda=opts["mix_lambda"]))


class Runner:
    """Runs the grid of cases and collects one row (dict) per case."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.t_start = time.perf_counter()
        self.rows: list[dict] = []
        self.unavailable: dict[str, str] = {}
        wanted = [p for p in _split(args.providers) if p not in _split(args.skip_providers)]
        unknown = [p for p in wanted if p not in P.PROVIDERS]
        if unknown:
            raise SystemExit(f"unknown providers {unknown}; known: {list(P.PROVIDERS)}")
        self.providers = []
        for name in wanted:
            reason = P.PROVIDERS[name].unavailable_reason(self.device, args.dim)
            if reason is None:
                self.providers.append(P.PROVIDERS[name])
            else:
                self.unavailable[name] = reason
        self.skipped = {p: "left out by --skip-providers" for p in _split(args.skip_providers)}
        self.worker = None
        if self.device.type == "cpu" and not args.no_memory:
            self.worker = measure.CpuMemoryWorker()
        # (dtype, mode, pass, provider) -> (n, seconds) of the last successful call / n of an OOM
        self.last_ok: dict[tuple, tuple[int, float]] = {}
        self.oom_at: dict[tuple, int] = {}

    def out_of_time(self) -> bool:
        return self.args.time_budget is not None and time.perf_counter() - self.t_start > self.args.time_budget

    def run(self, checkpoint=None) -> list[dict]:
        """Run every case; ``checkpoint(rows)`` is called after each group (partial results on disk)."""
        args = self.args
        sizes = sorted(int(s) for s in _split(args.sizes))
        try:
            for dname in _split(args.dtype):
                for mode in _split(args.modes):
                    for pass_ in _split(args.passes):
                        for n in sizes:
                            self._run_group(dname, mode, pass_, n)
                            if checkpoint is not None:
                                checkpoint(self.rows)
        finally:
            if self.worker is not None:
                self.worker.close()
        add_ratios(self.rows)
        return self.rows

    def _base_row(self, dname, mode, pass_, n, prov) -> dict:
        d = self.args.dim
        return dict(device=self.device.type, dtype=dname, mode=mode, **{"pass": pass_}, n=n, d=d,
                    m_cols=P.logit_columns(mode, n), provider=prov.name, kind=prov.kind, status="", note="",
                    gemm_equiv=P.gemm_equivalents(pass_), gflop=P.useful_flops(mode, pass_, n, d) / 1e9)

    def _run_group(self, dname: str, mode: str, pass_: str, n: int) -> None:
        args, device = self.args, self.device
        dtype = DTYPES[dname]
        backward = pass_ == "fwdbwd"
        sets = None
        ref = None
        for prov in self.providers:
            row = self._base_row(dname, mode, pass_, n, prov)
            self.rows.append(row)
            key = (dname, mode, pass_, prov.name)
            if not prov.supports(mode):
                row.update(status="n/a", note=f"{prov.name} cannot compute mode {mode}")
                continue
            if key in self.oom_at:
                row.update(status="OOM", note=f"not run: OOM at N={self.oom_at[key]}")
                continue
            est = P.estimated_bytes(prov.name, mode, pass_, n, args.dim, dtype.itemsize)
            if device.type == "cpu" and est > args.cpu_mem_cap_gb * 2**30:
                row.update(status="OOM", note=f"not run: estimated {est / 2**30:.1f} GiB > CPU cap "
                                              f"{args.cpu_mem_cap_gb:g} GiB")
                continue
            if key in self.last_ok:
                n0, t0 = self.last_ok[key]
                predicted = t0 * (n / n0) ** 2
                if predicted > args.max_call_seconds:
                    row.update(status="skip", note=f"predicted {predicted:.1f} s/call > --max-call-seconds")
                    continue
            if self.out_of_time():
                row.update(status="skip", note="time budget exhausted")
                continue
            if sets is None:
                sets = [P.make_inputs(n, args.dim, mode, dtype=dtype, device=device, seed=1000 * s + n,
                                      requires_grad=backward) for s in range(args.input_sets)]
                if n * P.logit_columns(mode, n) <= args.ref_max_logits:
                    try:
                        ref = fp64_reference(*sets[0], mode)
                    except Exception as exc:  # e.g. OOM of the fp64 matrix on a small GPU
                        if not measure.is_oom(exc):
                            raise
                        measure.free_memory(device, collect=True)
            row["input_mib"] = sum(t.numel() * t.element_size() for t in sets[0] if t is not None) / 2**20
            row["loss_fp64_ref"] = ref
            self._measure(prov, row, key, sets, mode, backward, n, dname)
            measure.free_memory(device)
        print_group(self.rows[-len(self.providers):], flush=True)

    def _measure(self, prov, row, key, sets, mode, backward, n, dname) -> None:
        args, device = self.args, self.device
        gpu = device.type == "cuda"
        fn = None
        try:
            fn = prov.make(mode, backward, args.dim)
            call = lambda: fn(*sets[0])
            # warm-up: the first call compiles/autotunes; a second one only when calls are fast.
            # On GPU the peak memory of the last warm-up call is the reported extra memory.
            n_warm = max(1, args.warmup)
            for i in range(n_warm):
                if gpu and not args.no_memory:
                    measure.sync(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                loss, last = measure.timed_once(call, device)
                if gpu and not args.no_memory:
                    row["peak_extra_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                if i == 0:
                    row["first_call_s"] = last
                    row["loss"] = float(loss)
                    if last > 1.0:
                        break
            if row["loss_fp64_ref"] is not None:
                row["loss_abs_err"] = abs(row["loss"] - row["loss_fp64_ref"])
            per_set = int(min(args.repeats, max(1, args.case_seconds / max(last, 1e-6) / len(sets))))
            times = []
            for a, p, neg in sets:
                times += measure.time_calls(lambda a=a, p=p, neg=neg: fn(a, p, neg), device, per_set)
            row.update(measure.summarize(times))
            self.last_ok[key] = (n, row["time_ms_median"] / 1e3)
            row["status"] = "ok"
            if not gpu and not args.no_memory:
                self._cpu_memory(prov, row, mode, backward, n, dname)
        except Exception as exc:
            if measure.is_oom(exc):
                row.update(status="OOM", note=f"{type(exc).__name__}"[:200])
                row.pop("peak_extra_mib", None)
                self.oom_at[key] = n
            else:
                row.update(status="error", note=f"{type(exc).__name__}: {exc}"[:300])
                print(f"  ! {prov.name} {mode} N={n}: {row['note']}", file=sys.stderr, flush=True)
        finally:
            fn = None
            call = None
        if row["status"] != "ok":
            measure.free_memory(device, collect=True)

    def _cpu_memory(self, prov, row, mode, backward, n, dname) -> None:
        """Peak RSS growth of one call, in the worker subprocess (same inputs as input set 0)."""
        if self.worker is None or not self.worker.alive():
            self.worker = measure.CpuMemoryWorker()
        task = dict(provider=prov.name, mode=mode, d=self.args.dim, n=n, seed=n,
                    dtype=str(DTYPES[dname]).split(".")[-1], **{"pass": "fwdbwd" if backward else "fwd"})
        status, value = self.worker.measure(task)
        if status == "ok":
            row["peak_extra_mib"] = value["bytes"] / 2**20
        else:
            row["note"] = (row["note"] + f" memory: {value}").strip()


def add_ratios(rows: list[dict]) -> None:
    """TFLOP/s, speed-up vs every baseline (t_baseline / t) and memory ratio vs naive, per group."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dtype"], r["mode"], r["pass"], r["n"]), []).append(r)
    for group in groups.values():
        ok = {r["provider"]: r for r in group if r["status"] == "ok"}
        for r in group:
            if r["status"] != "ok":
                continue
            r["tflops"] = r["gflop"] / r["time_ms_median"]  # GFLOP / ms = TFLOP/s
            for base in P.BASELINES:
                if base in ok:
                    r[f"speedup_vs_{base}"] = ok[base]["time_ms_median"] / r["time_ms_median"]
            naive_mem = ok.get("naive", {}).get("peak_extra_mib")
            if naive_mem and r.get("peak_extra_mib") is not None:
                r["mem_ratio_vs_naive"] = r["peak_extra_mib"] / naive_mem


def _fmt(v, spec: str, missing: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return missing
    return format(v, spec)


def table_lines(rows: list[dict]) -> list[str]:
    """Human-readable table: one line per row, grouped by (dtype, mode, pass, N)."""
    head = (f"{'provider':<12} {'status':<6} {'median ms':>10} {'IQR ms':>17} {'extra MiB':>10} "
            f"{'TFLOP/s':>8} {'x naive':>8} {'mem/naive':>9} {'loss':>10}  note")
    lines = []
    last = None
    for r in rows:
        group = (r["dtype"], r["mode"], r["pass"], r["n"])
        if group != last:
            lines.append("")
            lines.append(f"== {r['dtype']} {r['mode']} {r['pass']}  N={r['n']} M={r['m_cols']} D={r['d']} "
                         f"({r['gflop']:.3g} GFLOP nominal, {r['gemm_equiv']} GEMM-equiv)")
            lines.append(head)
            last = group
        iqr = (f"[{_fmt(r.get('time_ms_q25'), '.4g')}, {_fmt(r.get('time_ms_q75'), '.4g')}]"
               if r["status"] == "ok" else "")
        lines.append(
            f"{r['provider']:<12} {r['status']:<6} {_fmt(r.get('time_ms_median'), '10.3f', ''):>10} {iqr:>17} "
            f"{_fmt(r.get('peak_extra_mib'), '10.1f', ''):>10} {_fmt(r.get('tflops'), '8.3f', ''):>8} "
            f"{_fmt(r.get('speedup_vs_naive'), '8.2f', ''):>8} {_fmt(r.get('mem_ratio_vs_naive'), '9.3f', ''):>9} "
            f"{_fmt(r.get('loss'), '10.6f', ''):>10}  {r.get('note', '')}"
        )
    return lines


def print_group(rows: list[dict], flush: bool = False) -> None:
    tmp = [dict(r) for r in rows]
    add_ratios(tmp)
    print("\n".join(table_lines(tmp)), flush=flush)


def markdown(rows: list[dict], meta: dict) -> str:
    """The results as a markdown document (one table per dtype/mode/pass)."""
    out = [f"# Loss benchmark: {meta['label']}", "",
           f"D = {meta['args']['dim']}, tau = {P.TEMPERATURE}; {meta['flop_convention']}", "",
           f"Time: median over {meta['args']['input_sets']} input sets x up to {meta['args']['repeats']} calls, "
           "IQR in brackets. Memory: " + meta["memory_method"], ""]
    if meta["providers_unavailable"]:
        out.append("Not available here: " + "; ".join(f"`{k}` ({v})" for k, v in meta["providers_unavailable"].items()))
        out.append("")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dtype"], r["mode"], r["pass"], r["d"]), []).append(r)
    for (dname, mode, pass_, d), grp in groups.items():
        out += [f"## {dname} {mode} {pass_} D={d}", "",
                "| N | provider | status | median ms [IQR] | extra MiB | TFLOP/s | speed-up vs naive | mem vs naive | loss |",
                "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in grp:
            t = (f"{r['time_ms_median']:.3f} [{r['time_ms_q25']:.4g}, {r['time_ms_q75']:.4g}]"
                 if r["status"] == "ok" else "")
            status = r["status"] if not r.get("note") or r["status"] == "ok" else f"{r['status']} ({r['note']})"
            out.append(f"| {r['n']} | {r['provider']} | {status} | {t} | {_fmt(r.get('peak_extra_mib'), '.1f', '')} | "
                       f"{_fmt(r.get('tflops'), '.3f', '')} | {_fmt(r.get('speedup_vs_naive'), '.2f', '')} | "
                       f"{_fmt(r.get('mem_ratio_vs_naive'), '.3f', '')} | {_fmt(r.get('loss'), '.6f', '')} |")
        out.append("")
    return "\n".join(out)


def write_outputs(rows: list[dict], meta: dict, out: Path, plots: bool = True) -> list[Path]:
    """CSV, JSON, markdown and (optionally) PNG plots; returns the written paths."""
    import csv

    out.mkdir(parents=True, exist_ok=True)
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    cols = COLUMNS + extra
    paths = [out / "bench_loss.csv", out / "bench_loss.json", out / "bench_loss.md"]
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in cols})
    paths[1].write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    paths[2].write_text(markdown(rows, meta))
    if plots:
        try:
            import plots as plotting
        except ImportError as exc:  # matplotlib missing: the numbers are still written
            print(f"# no plots: {exc}", file=sys.stderr)
            return paths
        paths += plotting.plot_results(rows, out, meta["label"])
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    out = Path(args.out) if args.out else RESULTS_DIR / device.type
    runner = Runner(args)
    label = args.label or device_label(device)
    print(f"# bench_loss on {label}: providers {[p.name for p in runner.providers]}", flush=True)
    for name, reason in {**runner.unavailable, **runner.skipped}.items():
        print(f"#   {name}: not run ({reason})", flush=True)
    env = environment(device)
    notes = {p.name: p.code_path("unsup") for p in runner.providers}

    def make_meta() -> dict:
        return dict(
            label=label, device=device.type, env=env, args=vars(args),
            providers=[p.name for p in runner.providers],
            providers_unavailable={**runner.unavailable, **runner.skipped},
            provider_code=notes, temperature=P.TEMPERATURE, modes=P.MODES, cmnrl_mini_batch=P.CMNRL_MINI_BATCH,
            flop_convention=FLOP_CONVENTION,
            memory_method=GPU_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD,
            wall_s=round(time.perf_counter() - runner.t_start, 1),
        )

    def checkpoint(rows):
        tmp = [dict(r) for r in rows]
        add_ratios(tmp)
        write_outputs(tmp, make_meta(), out, plots=False)

    rows = runner.run(checkpoint)
    meta = make_meta()
    paths = write_outputs(rows, meta, out, plots=not args.no_plots)
    print(f"\n# wrote {', '.join(str(p) for p in paths)}  ({meta['wall_s']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
