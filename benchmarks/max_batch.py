"""Max-batch probe: the largest N each provider handles (one mode/pass), with bounded time.

GPU (default D=768, bf16, unsup, forward+backward)::

    python benchmarks/max_batch.py --device cuda --time-budget 90 --out DIR

CPU (bounded small version: D=256 fp32, a memory cap instead of the real limit)::

    python benchmarks/max_batch.py --device cpu --mem-cap-gb 1 --n-max 16384

Search per provider: double N from ``--n-start`` until a failure, then bisect between the last
success and the first failure down to ``--resolution`` (relative). A failure is an OOM (GPU:
``torch.cuda.OutOfMemoryError``; CPU: measured peak extra RSS, in a worker subprocess, above
``--mem-cap-gb``, or an estimate above it, then not run). The search stops early, reporting a
lower bound, when the next call is predicted (quadratic in N) to exceed ``--max-call-seconds``,
when ``--n-max`` is reached, or when the provider's share of ``--time-budget`` is spent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402
import providers as P  # noqa: E402
from bench_loss import DTYPES, device_label  # noqa: E402


class Prober:
    """Runs single calls of one provider at a given N and says ok / OOM, with time and memory."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.dtype = DTYPES[args.dtype]
        self.worker = measure.CpuMemoryWorker() if device.type == "cpu" else None

    def close(self):
        if self.worker is not None:
            self.worker.close()

    def try_n(self, prov: P.Provider, n: int) -> dict:
        """One attempt: dict(n, ok, reason, seconds, extra_mib)."""
        args, device = self.args, self.device
        cap = args.mem_cap_gb * 2**30 if args.mem_cap_gb else None
        est = P.estimated_bytes(prov.name, args.mode, args.pass_, n, args.dim, self.dtype.itemsize)
        if cap is not None and est > 2 * cap:  # the estimate is conservative: decide by the measurement
            return dict(n=n, ok=False, reason=f"estimated {est / 2**30:.2f} GiB > 2 x cap (not run)")
        if device.type == "cpu":
            task = dict(provider=prov.name, mode=args.mode, d=args.dim, n=n, seed=n,
                        dtype=str(self.dtype).split(".")[-1], **{"pass": args.pass_})
            if not self.worker.alive():
                self.worker = measure.CpuMemoryWorker()
            status, value = self.worker.measure(task, timeout=max(60.0, 4 * args.max_call_seconds))
            if status != "ok":
                return dict(n=n, ok=False, reason=f"{status}: {value}"[:200])
            extra = value["bytes"]
            if cap is not None and extra > cap:
                return dict(n=n, ok=False, reason=f"measured {extra / 2**30:.2f} GiB > cap",
                            seconds=value["seconds"], extra_mib=extra / 2**20)
            return dict(n=n, ok=True, reason="", seconds=value["seconds"], extra_mib=extra / 2**20)
        fn = sets = None
        try:
            backward = args.pass_ == "fwdbwd"
            sets = P.make_inputs(n, args.dim, args.mode, dtype=self.dtype, device=device, seed=n, requires_grad=backward)
            fn = prov.make(args.mode, backward, args.dim)
            measure.timed_once(lambda: fn(*sets), device)  # warm-up (compilation, autotuning)
            _, seconds = measure.timed_once(lambda: fn(*sets), device)
            extra = measure.cuda_extra_memory(lambda: fn(*sets), device)
            return dict(n=n, ok=True, reason="", seconds=seconds, extra_mib=extra / 2**20)
        except Exception as exc:
            if measure.is_oom(exc):
                return dict(n=n, ok=False, reason="OOM")
            return dict(n=n, ok=False, reason=f"error {type(exc).__name__}: {exc}"[:200])
        finally:
            fn = sets = None
            measure.free_memory(device, collect=True)


def _round(n: int, grain: int) -> int:
    return max(grain, (n // grain) * grain)


def probe(prober: Prober, prov: P.Provider, budget_s: float) -> dict:
    """Doubling then bisection for one provider; returns its result row."""
    args = prober.args
    t0 = time.perf_counter()
    tries: list[dict] = []
    best: dict | None = None
    fail: dict | None = None
    stop = ""

    def attempt(n: int) -> dict | None:
        nonlocal stop
        if time.perf_counter() - t0 > budget_s:
            stop = "time budget"
            return None
        if best is not None and best.get("seconds") is not None:
            predicted = best["seconds"] * (n / best["n"]) ** 2
            if predicted > args.max_call_seconds:
                stop = f"next call predicted {predicted:.0f} s > --max-call-seconds"
                return None
        res = prober.try_n(prov, n)
        tries.append(res)
        secs = "" if res.get("seconds") is None else f"{res['seconds']:.3f} s"
        mib = "" if res.get("extra_mib") is None else f"{res['extra_mib']:.0f} MiB"
        print(f"  {prov.name:<12} N={n:<9} {'ok' if res['ok'] else 'FAIL'} {res.get('reason', '')} {secs} {mib}",
              flush=True)
        return res

    n = args.n_start
    while n <= args.n_max:
        res = attempt(n)
        if res is None:
            break
        if not res["ok"]:
            fail = res
            break
        best = res
        n *= 2
    else:
        stop = f"reached --n-max {args.n_max}"
    # the first size already failed: halve down to the first success
    n = args.n_start // 2
    while best is None and fail is not None and not stop and n >= args.grain:
        res = attempt(n)
        if res is None:
            break
        if res["ok"]:
            best = res
        else:
            fail = res
        n //= 2
    if best is not None and fail is not None and not stop:
        lo, hi = best["n"], fail["n"]
        while hi - lo > max(args.grain, lo * args.resolution):
            mid = _round((lo + hi) // 2, args.grain)
            if mid <= lo or mid >= hi:
                break
            res = attempt(mid)
            if res is None:
                break
            if res["ok"]:
                best, lo = res, mid
            else:
                fail, hi = res, mid
    if best is None:
        bound = f"< {args.n_start}"
    elif fail is not None and not stop:
        bound = f"{best['n']} (fails at {fail['n']}: {fail['reason']})"
    elif fail is not None:
        bound = f">= {best['n']} (fails at {fail['n']}: {fail['reason']}; bisection stopped: {stop})"
    else:
        bound = f">= {best['n']} (stopped: {stop})"
    extrapolated = None
    linear = prov.name in P.OURS or prov.name in ("infcl", "st_cmnrl")
    if linear and stop and best is not None and best.get("extra_mib") and prober.device.type == "cuda":
        # memory of the fused losses is linear in N: extra + inputs (and their gradients) scale with N
        dtype_bytes = prober.dtype.itemsize
        n_tensors = 2 * (1 + int(P.MODES[args.mode]["negatives"]) / 2) * (2 if args.pass_ == "fwdbwd" else 1)
        inputs_mib = n_tensors * best["n"] * args.dim * dtype_bytes / 2**20
        total_mib = torch.cuda.get_device_properties(prober.device).total_memory / 2**20
        extrapolated = int(best["n"] * 0.9 * total_mib / (best["extra_mib"] + inputs_mib))
    return dict(provider=prov.name, max_n=None if best is None else best["n"],
                first_fail_n=None if fail is None else fail["n"], fail_reason=None if fail is None else fail["reason"],
                stopped_by=stop or None, result=bound,
                seconds_at_max=None if best is None else best.get("seconds"),
                extra_mib_at_max=None if best is None else best.get("extra_mib"),
                linear_memory_extrapolated_n=extrapolated, tries=len(tries), probe_s=round(time.perf_counter() - t0, 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bf16 (GPU default) / fp32 (CPU default) / fp16 / fp64")
    ap.add_argument("--dim", type=int, default=None, help="D (default 768 GPU, 256 CPU)")
    ap.add_argument("--mode", default="unsup", choices=list(P.MODES))
    ap.add_argument("--pass", dest="pass_", default="fwdbwd", choices=list(P.PASSES))
    ap.add_argument("--providers", default=",".join(P.ALL_PROVIDERS))
    ap.add_argument("--skip-providers", default="")
    ap.add_argument("--n-start", type=int, default=None, help="first N (default 8192 GPU, 256 CPU)")
    ap.add_argument("--n-max", type=int, default=None, help="largest N tried (default 2^22 GPU, 2^15 CPU)")
    ap.add_argument("--grain", type=int, default=None, help="N granularity of the bisection (default 1024 / 64)")
    ap.add_argument("--resolution", type=float, default=1 / 16, help="stop bisecting at this relative gap")
    ap.add_argument("--max-call-seconds", type=float, default=None, help="per-call time bound (default 10 GPU / 5 CPU)")
    ap.add_argument("--time-budget", type=float, default=None, help="total seconds, split over providers (default 120)")
    ap.add_argument("--mem-cap-gb", type=float, default=None,
                    help="memory cap (CPU default 1 GiB of extra RSS; GPU default none: the real device limit)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="folder for max_batch.json / max_batch.csv")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.dim = args.dim or (768 if gpu else 256)
    args.n_start = args.n_start or (8192 if gpu else 256)
    args.n_max = args.n_max or (1 << 22 if gpu else 1 << 15)
    args.grain = args.grain or (1024 if gpu else 64)
    args.max_call_seconds = args.max_call_seconds or (10.0 if gpu else 5.0)
    args.time_budget = args.time_budget or 120.0
    if args.mem_cap_gb is None and not gpu:
        args.mem_cap_gb = 1.0
    skip = {p.strip() for p in args.skip_providers.split(",") if p.strip()}
    provs, unavailable = [], {}
    for name in [p.strip() for p in args.providers.split(",") if p.strip() and p.strip() not in skip]:
        prov = P.PROVIDERS[name]
        reason = prov.unavailable_reason(device, args.dim)
        if reason is None and not prov.supports(args.mode):
            reason = f"cannot compute mode {args.mode}"
        if reason is None:
            provs.append(prov)
        else:
            unavailable[name] = reason
    label = device_label(device)
    cap = f"{args.mem_cap_gb:g} GiB cap" if args.mem_cap_gb else "device memory"
    print(f"# max batch on {label}: D={args.dim} {args.dtype} {args.mode} {args.pass_}, limit: {cap}, "
          f"<= {args.max_call_seconds:g} s/call, budget {args.time_budget:g} s", flush=True)
    for name, reason in unavailable.items():
        print(f"#   {name}: not probed ({reason})", flush=True)
    prober = Prober(args, device)
    rows = []
    t0 = time.perf_counter()
    try:
        for i, prov in enumerate(provs):
            remaining = args.time_budget - (time.perf_counter() - t0)
            rows.append(probe(prober, prov, remaining / (len(provs) - i)))
    finally:
        prober.close()
    print(f"\n{'provider':<12} {'max N':>9}  result")
    for r in rows:
        extra = ""
        if r["linear_memory_extrapolated_n"]:
            extra = f"; if memory stays linear in N: ~{r['linear_memory_extrapolated_n']} fit in 90% of the GPU"
        print(f"{r['provider']:<12} {r['max_n'] if r['max_n'] is not None else '-':>9}  {r['result']}{extra}")
    if args.out:
        import csv

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = dict(label=label, args=vars(args), unavailable=unavailable,
                    limit=("CPU: peak extra RSS of one call (worker subprocess) must stay under the cap"
                           if not gpu else "GPU: the call must not raise OutOfMemoryError"))
        (out / "max_batch.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
        with open(out / "max_batch.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["provider"])
            w.writeheader()
            w.writerows(rows)
        print(f"# wrote {out / 'max_batch.json'}, {out / 'max_batch.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
