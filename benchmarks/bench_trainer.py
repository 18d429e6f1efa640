"""Trainer throughput: sentences/s of a SimCSE step with and without gradient caching at equal batch,
and the largest batch each can train (bounded binary search; on CUDA a batch "fits" if one step runs
without out-of-memory, on CPU there is no memory limit to find and the search reports its bound).

    python benchmarks/bench_trainer.py --device cpu --tiny            # smoke run, seconds
    python benchmarks/bench_trainer.py --device cuda --model bert-base-uncased --batch 64 --chunk 16 \
        --max_length 32 --precision bf16 --search_max 8192

Writes ``<--out>/bench_trainer_<device>[_tiny].{csv,json}`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from simcse_kernels.train.tiny import build_tiny_bert
from simcse_kernels.train.trainer import TrainConfig, Trainer

RESULTS = Path(__file__).resolve().parent / "results"


def _corpus(n: int) -> list[str]:
    words = "the a man woman dog cat plays runs eats guitar ball red blue big small park river city".split()
    g = torch.Generator().manual_seed(0)
    return [" ".join(words[i] for i in torch.randint(len(words), (int(k),), generator=g).tolist())
            for k in torch.randint(8, 24, (n,), generator=g)]


def _trainer(args, model: str, corpus: Path, out: Path, batch: int, chunk: int | None) -> Trainer:
    cfg = TrainConfig(model=model, train_file=str(corpus), output_dir=str(out), pooler="cls", batch_size=batch,
                      grad_cache_chunk=chunk, max_steps=10**9, max_length=args.max_length, eval_every=None,
                      progress=False, device=args.device, precision=args.precision, backend=args.backend)
    return Trainer(cfg)


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def measure(args, model, corpus, out, batch, chunk) -> dict:
    """Median-of-steps sentences/s (2 sentences per example) after warm-up, and peak CUDA memory."""
    trainer = _trainer(args, model, corpus, out, batch, chunk)
    for _ in range(args.warmup):
        trainer.train_step()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    del trainer
    _free(args.device)
    t = sorted(times)[len(times) // 2]
    return {"batch": batch, "chunk": chunk, "step_s": t, "sentences_per_s": 2 * batch / t, "peak_mib": peak}


def fits(args, model, corpus, out, batch, chunk) -> bool:
    """One training step at ``batch`` runs without CUDA out-of-memory."""
    try:
        trainer = _trainer(args, model, corpus, out, batch, chunk)
        trainer.train_step()
        del trainer
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        _free(args.device)


def largest_batch(args, model, corpus, out, chunk) -> int:
    """Bounded binary search (powers of two, then bisection) for the largest batch that fits."""
    lo, hi = 0, args.search_min
    while hi <= args.search_max and fits(args, model, corpus, out, hi, chunk):
        lo, hi = hi, hi * 2
    if hi > args.search_max:
        return lo
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(args, model, corpus, out, mid, chunk) else (lo, mid)
    return lo


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny random BERT (hidden 64, 2 layers) built offline")
    p.add_argument("--model", default=None, help="HF model name/path (or pkg:MODULE)")
    p.add_argument("--batch", type=int, default=None, help="batch for the throughput comparison")
    p.add_argument("--chunk", type=int, default=None, help="grad-cache mini-batch")
    p.add_argument("--max_length", type=int, default=32)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--search_min", type=int, default=16)
    p.add_argument("--search_max", type=int, default=None, help="upper bound of the batch search")
    p.add_argument("--no_search", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the CSV/JSON (default benchmarks/results)")
    args = p.parse_args(argv)
    batch = args.batch or (32 if args.tiny else 64)
    chunk = args.chunk or max(1, batch // 4)
    if args.search_max is None:
        args.search_max = 256 if args.tiny else 8192

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sents = _corpus(max(4096, 2 * args.search_max))
        corpus = tmp / "corpus.txt"
        corpus.write_text("\n".join(sents) + "\n")
        model = str(build_tiny_bert(tmp / "tiny", sents, hidden=64, layers=2, heads=2)) if args.tiny else args.model
        if model is None:
            raise SystemExit("give --model NAME or --tiny")
        rows = []
        for mode, c in (("no_cache", None), ("grad_cache", chunk)):
            r = measure(args, model, corpus, tmp / "out", batch, c)
            r["mode"] = mode
            if not args.no_search:
                r["largest_batch"] = largest_batch(args, model, corpus, tmp / "out", c)
                r["search_max"] = args.search_max
                r["search_limited_by"] = "memory" if args.device.startswith("cuda") else "bound (no OOM on CPU)"
            rows.append(r)
            print(json.dumps(r), flush=True)
    name = f"bench_trainer_{args.device.split(':')[0]}{'_tiny' if args.tiny else ''}"
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": "tiny-bert-h64-l2" if args.tiny else args.model, "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
            "precision": args.precision, "max_length": args.max_length, "torch": torch.__version__}
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    with (out / f"{name}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out / name}.csv/.json")


if __name__ == "__main__":
    main()
