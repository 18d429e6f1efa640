"""The SimCSE training loop: AdamW + linear warmup/decay, autocast, clipping, gradient caching,
cross-rank negatives, JSONL metrics, checkpoints with exact resume, STS-B dev model selection.

``train(TrainConfig(...))`` is the whole API; :mod:`.cli` maps ``simcse-train`` flags onto it.
Outputs under ``output_dir``: ``metrics.jsonl`` (one record per logged step / evaluation),
``checkpoints/step-XXXXXXX/`` (training state), ``best/`` (export with the best STS-B dev score)
and ``final/`` (export at the end); exports load with ``transformers`` and ``sentence-transformers``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..module import FusedInfoNCE
from . import checkpoint as ckpt
from .data import (
    TOKEN_KEYS,
    BatchOrder,
    Collator,
    augment_sentence,
    check_enough_examples,
    parse_augment,
    read_examples,
    split_batch,
)
from .distributed import average_gradients, init_from_env, is_distributed, mean_over_ranks, rank_and_world
from .errors import TrainingStopped, UsageError, write_failed
from .grad_cache import cuda_devices_of, grad_cache_backward
from .model import SimCSEModel, check_model, resolve_pooler
from .objective import candidate_loss, contrastive_loss, distill_mse_loss
from .pooling import POOLERS
from .textcnn import TextCNNModel, parse_widths

ENCODERS = ("transformer", "textcnn")
OBJECTIVES = ("simcse", "distill_mse", "distill_contrastive", "amsoftmax")
CLASS_INITS = ("encoder", "random")
DEFAULT_VIEWS = 4  # --objective amsoftmax without --views
DEFAULT_MARGIN = 0.35  # --objective amsoftmax without --margin (CosFace's m)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKEND_NAMES = ("auto", "naive", "torch", "triton", "cuda")
NONFINITE_ACTIONS = ("stop", "skip")
# Flags whose change on resume changes what is trained (the others, e.g. --log_every, may change freely).
RESUME_FLAGS = ("model", "train_file", "encoder", "cnn_widths", "cnn_maps", "cnn_dim", "cnn_dropout", "pooler", "mlp_only_train", "max_length", "batch_size", "grad_cache_chunk",
                "max_steps", "epochs", "lr", "weight_decay", "warmup_steps", "max_grad_norm", "temperature",
                "learnable_temperature", "hard_negative_weight", "mix_lambda", "symmetric", "augment", "no_dropout", "objective", "teacher",
                "teacher_bank", "views", "margin", "angular_margin", "class_init", "do_mlm", "mlm_weight",
                "mlm_probability", "precision", "seed", "backend")


@dataclass
class TrainConfig:
    """Every training option (``simcse-train --help`` documents each flag of the same name)."""

    model: str
    train_file: str
    output_dir: str
    encoder: str = "transformer"
    cnn_widths: str = "1,3,5"
    cnn_maps: int = 100
    cnn_dim: int | None = None
    cnn_dropout: float = 0.1
    pooler: str | None = None
    mlp_only_train: bool = False
    max_length: int = 32
    batch_size: int = 64
    grad_cache_chunk: int | None = None
    max_steps: int | None = None
    epochs: float = 1.0
    lr: float = 3e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    temperature: float = 0.05
    learnable_temperature: bool = False
    hard_negative_weight: float = 0.0
    mix_lambda: float | None = None
    symmetric: bool = False
    augment: str | None = None
    no_dropout: bool = False
    objective: str = "simcse"
    teacher: str | None = None
    teacher_bank: bool = False
    cache_dir: str | None = None
    views: int | None = None
    margin: float | None = None
    angular_margin: float | None = None
    class_init: str = "encoder"
    do_mlm: bool = False
    mlm_weight: float = 0.1
    mlm_probability: float = 0.15
    precision: str = "fp32"
    device: str = "auto"
    seed: int = 42
    log_every: int = 10
    save_every: int | None = None
    keep_checkpoints: int = 2
    eval_every: int | None = 125
    eval_before: bool = False
    data_dir: str | None = None
    eval_max_length: int = 128
    resume: bool = True
    backend: str = "auto"
    progress: bool = True
    threads: int | None = None
    on_nonfinite: str = "stop"
    max_skipped_steps: int = 10
    resume_changed: bool = False
    dist_timeout: float = 600.0

    def validate(self) -> None:
        """Check every option's value (cheap, no model or data touched).

        Raises:
            UsageError: the first bad option, named by its flag (``--batch_size must be ...``).
        """
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise UsageError(f"--{name} must be {what}, got {getattr(self, name)!r}")

        def finite(name: str) -> bool:
            v = getattr(self, name)
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def integer(name: str, lo: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= lo
            need(ok, name, f"an integer >= {lo}" + (" (or none)" if optional else ""))

        for name in ("model", "train_file", "output_dir"):
            need(isinstance(getattr(self, name), str) and bool(getattr(self, name).strip()), name, "a non-empty string")
        need(self.encoder in ENCODERS, "encoder", f"one of {', '.join(ENCODERS)}")
        try:
            parse_widths(self.cnn_widths)
        except ValueError as exc:
            raise UsageError(f"--cnn_widths: {exc}") from None
        integer("cnn_maps", 1)
        integer("cnn_dim", 1, optional=True)
        need(finite("cnn_dropout") and 0 <= self.cnn_dropout < 1, "cnn_dropout", "a number in [0, 1)")
        if self.encoder == "textcnn":
            for name, value in (("pooler", self.pooler), ("mlp_only_train", self.mlp_only_train),
                                ("do_mlm", self.do_mlm)):
                if value:
                    raise UsageError(f"--{name} applies to --encoder transformer only (a TextCNN max-pools "
                                     "over time and has no MLM head)")
        if self.pooler is not None and self.pooler not in POOLERS:
            raise UsageError(f"--pooler must be one of {', '.join(POOLERS)}, got {self.pooler!r}")
        for name in ("max_length", "batch_size", "log_every", "keep_checkpoints", "eval_max_length"):
            integer(name, 1)
        for name in ("grad_cache_chunk", "max_steps", "save_every", "eval_every", "threads"):
            integer(name, 1, optional=True)
        integer("warmup_steps", 0)
        integer("seed", 0)
        need(self.seed < 2**32, "seed", "below 2**32")
        need(finite("epochs") and self.epochs > 0, "epochs", "a positive number")
        need(finite("lr") and self.lr > 0, "lr", "a positive number")
        need(finite("weight_decay") and self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(self.max_grad_norm is None or (finite("max_grad_norm") and self.max_grad_norm > 0), "max_grad_norm",
             "a positive number (or none)")
        need(finite("temperature") and self.temperature > 0, "temperature", "a positive finite number")
        need(finite("hard_negative_weight"), "hard_negative_weight", "a finite number")
        need(self.mix_lambda is None or (finite("mix_lambda") and 0 <= self.mix_lambda <= 1), "mix_lambda",
             "a number in [0, 1] (or none)")
        if self.augment is not None:
            parse_augment(self.augment)
            if str(self.train_file).endswith(".csv"):
                raise UsageError(f"--augment makes unsup positives: it needs a text file (one sentence a line), "
                                 f"not the CSV {self.train_file}")
        need(finite("mlm_weight") and self.mlm_weight >= 0, "mlm_weight", "a number >= 0")
        need(finite("mlm_probability") and 0 < self.mlm_probability < 1, "mlm_probability", "a number in (0, 1)")
        need(self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}")
        need(self.backend in BACKEND_NAMES, "backend", f"one of {', '.join(BACKEND_NAMES)}")
        self._validate_objective(need, finite)
        need(self.on_nonfinite in NONFINITE_ACTIONS, "on_nonfinite", f"one of {', '.join(NONFINITE_ACTIONS)}")
        integer("max_skipped_steps", 1)
        need(finite("dist_timeout") and self.dist_timeout > 0, "dist_timeout", "a positive number of seconds")
        try:
            device = torch.device(self.device) if self.device != "auto" else None
        except (RuntimeError, ValueError):
            raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}") from None
        if device is not None and device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {self.device}: no CUDA device is available")
        if self.backend != "auto":
            from ..backends import unavailable_reason

            reason = unavailable_reason(self.backend, self.resolved_device())
            if reason is not None:
                raise UsageError(f"--backend {self.backend}: unavailable on {self.resolved_device()}: {reason}")

    def _validate_objective(self, need, finite) -> None:
        """The --objective flags and which objective each of them applies to."""
        obj = self.objective
        need(obj in OBJECTIVES, "objective", f"one of {', '.join(OBJECTIVES)}")
        distill = obj.startswith("distill")
        if distill and not (isinstance(self.teacher, str) and self.teacher.strip()):
            raise UsageError(f"--objective {obj} needs --teacher MODEL (the model to distill from)")
        only = {"teacher": (self.teacher is not None, distill, "distill_mse or distill_contrastive"),
                "teacher_bank": (self.teacher_bank, obj == "distill_contrastive", "distill_contrastive"),
                "views": (self.views is not None, obj == "amsoftmax", "amsoftmax"),
                "class_init": (self.class_init != "encoder", obj == "amsoftmax", "amsoftmax"),
                "margin": (self.margin is not None, obj != "distill_mse", "simcse, distill_contrastive or amsoftmax"),
                "angular_margin": (self.angular_margin is not None, obj != "distill_mse",
                                   "simcse, distill_contrastive or amsoftmax"),
                "augment": (self.augment is not None, obj == "simcse", "simcse"),
                "hard_negative_weight": (self.hard_negative_weight != 0.0, obj == "simcse", "simcse"),
                "mix_lambda": (self.mix_lambda is not None, obj == "simcse", "simcse"),
                "symmetric": (self.symmetric, obj == "simcse", "simcse")}
        for name, (given, ok, where) in only.items():
            if given and not ok:
                raise UsageError(f"--{name} applies to --objective {where} only (this run: --objective {obj})")
        if self.views is not None:
            ok = isinstance(self.views, int) and not isinstance(self.views, bool) and self.views >= 2
            need(ok, "views", "an integer >= 2 (K dropout views of each sentence)")
        need(self.class_init in CLASS_INITS, "class_init", f"one of {', '.join(CLASS_INITS)}")
        for name in ("margin", "angular_margin"):
            need(getattr(self, name) is None or finite(name), name, "a finite number (or none)")
        try:
            self.loss_module()
        except ValueError as exc:
            raise UsageError(f"--{exc}") from None  # "margin must be ..." / "angular_margin must be ..."

    def loss_module(self) -> FusedInfoNCE:
        """The :class:`~simcse_kernels.FusedInfoNCE` of these options."""
        margin = self.margin if self.margin is not None else (DEFAULT_MARGIN if self.objective == "amsoftmax" else 0.0)
        return FusedInfoNCE(temperature=self.temperature, hard_negative_weight=self.hard_negative_weight,
                            symmetric=self.symmetric, mix_lambda=self.mix_lambda, backend=self.backend,
                            learnable_temperature=self.learnable_temperature, margin=margin,
                            angular_margin=self.angular_margin or 0.0)

    def resolved_device(self) -> torch.device:
        """``device`` with ``auto`` resolved (CUDA if available, else CPU)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: 0 -> 1 over ``warmup`` steps, then linearly 1 -> 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class Trainer:
    """Holds the model, data, optimizer and state of one run; :meth:`fit` trains (see :func:`train`).

    Args:
        cfg: the options (checked with :meth:`TrainConfig.validate`; ``pooler=None`` is resolved with
            :func:`~.model.resolve_pooler`, default ``cls``, and printed).
        examples: the training examples if already read (``simcse-train`` reads and checks them before
            any model loads); default: read ``cfg.train_file``.

    ``output_dir`` is created only once the options, data and model have loaded.
    """

    def __init__(self, cfg: TrainConfig, examples: list[tuple[str, ...]] | None = None) -> None:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        cfg.validate()
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = init_from_env(str(cfg.resolved_device()), cfg.dist_timeout)
        self.rank, self.world = rank_and_world()
        if cfg.batch_size % self.world:
            raise UsageError(f"--batch_size {cfg.batch_size} is not divisible by the world size {self.world}")
        self.out = Path(cfg.output_dir)
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--output_dir {self.out}: exists and is not a folder")
        self.examples = examples if examples is not None else read_examples(cfg.train_file)
        check_enough_examples(self.examples, cfg.batch_size, cfg.train_file)
        path = check_model(cfg.model)
        if cfg.pooler is None and cfg.encoder == "transformer":
            cfg.pooler, source, notes = resolve_pooler(cfg.model, None, default="cls")
            if self.rank == 0:
                print("\n".join([*notes, f"pooler: {cfg.pooler} ({source})"]), flush=True)
        # (N, D_teacher) teacher table of the distill objectives; before seeding: loading a teacher draws
        # random numbers (its untrained heads), computing none does not (cached), the student's init must not care
        self.teacher = None
        if cfg.objective.startswith("distill"):
            from .teacher import teacher_table

            self.teacher = teacher_table(cfg.teacher, [ex[0] for ex in self.examples], cfg.train_file,
                                         max_length=cfg.eval_max_length, device=self.device,
                                         cache_dir=cfg.cache_dir, show=cfg.progress and self.rank == 0)
            self.teacher = self.teacher.to(self.device)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # same MLP init on every rank
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        loss_fn = cfg.loss_module()
        if cfg.encoder == "textcnn":
            dim = cfg.cnn_dim or (self.teacher.shape[1] if self.teacher is not None else None)
            self.model = TextCNNModel.from_pretrained(path, parse_widths(cfg.cnn_widths), cfg.cnn_maps, dim,
                                                      cfg.cnn_dropout, loss_fn=loss_fn).to(self.device)
        else:
            self.model = SimCSEModel.from_pretrained(path, pooler=cfg.pooler, mlp_only_train=cfg.mlp_only_train,
                                                     do_mlm=cfg.do_mlm, loss_fn=loss_fn).to(self.device)
        if cfg.no_dropout:  # SimCSE's "w/o dropout": every dropout module of the encoder is off
            for m in self.model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
        self.augment = parse_augment(cfg.augment) if cfg.augment is not None else None
        self._add_objective_parameters()
        torch.manual_seed(cfg.seed + self.rank)  # distinct dropout per rank
        self.order = BatchOrder(len(self.examples), cfg.batch_size, cfg.seed)
        self.collate = Collator(self.tokenizer, cfg.max_length, cfg.mlm_probability if cfg.do_mlm else None)
        self.total_steps = cfg.max_steps or max(1, int(cfg.epochs * self.order.batches_per_epoch))
        decay, no_decay = [], []
        for p in self.model.parameters():
            (no_decay if p.ndim < 2 else decay).append(p)
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           linear_schedule(cfg.warmup_steps, self.total_steps))
        self.amp_dtype = PRECISIONS[cfg.precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        self.step, self.best = 0, None
        self.skipped_in_a_row = self.skipped_total = 0
        self._signal: int | None = None
        self._lock_file = None
        try:
            self.out.mkdir(parents=True, exist_ok=True)  # only now: nothing is left behind by a failed start
        except OSError as exc:
            raise UsageError(f"--output_dir {self.out}: cannot create it: {exc.strerror or exc}") from None
        if self.rank == 0:
            self._lock_output_dir()
            ckpt.remove_temporaries(self.out)
        self.metrics_path = self.out / "metrics.jsonl"
        self._dev_pairs = None
        self.last_dev: float | None = None

    def _add_objective_parameters(self) -> None:
        """Trainable parameters of the objective, registered on the model (so the optimizer, checkpoints,
        exact resume and gradient averaging include them; exports do not):

        * distill, student width != teacher width: ``distill_projection``, a Linear(student, teacher) applied
          to the student embedding inside the loss (sentence-transformers' ``projection_dim``);
        * amsoftmax: ``class_weights`` (N_train, D), one row per training sentence, initialised with the
          encoder's initial eval-mode embeddings of the sentences (``--class_init encoder``, progress bar)
          or N(0, 1) rows (``--class_init random``, seeded by --seed).
        """
        cfg, model = self.cfg, self.model
        if self.teacher is not None and self.teacher.shape[1] != model.embedding_dim:
            model.distill_projection = torch.nn.Linear(model.embedding_dim, self.teacher.shape[1]).to(self.device)
        if cfg.objective != "amsoftmax":
            return
        sentences = [ex[0] for ex in self.examples]
        if cfg.class_init == "random":
            g = torch.Generator().manual_seed(cfg.seed)
            init = torch.randn(len(sentences), model.embedding_dim, generator=g)
        else:
            init = model.embed_sentences(self.tokenizer, sentences, max_length=cfg.max_length, device=self.device,
                                         progress="class weights" if cfg.progress and self.rank == 0 else None)
        model.class_weights = torch.nn.Parameter(init.to(self.device))

    def _lock_output_dir(self) -> None:
        """Hold an advisory lock on ``output_dir/.lock`` for the life of this process (one run per folder)."""
        path = self.out / ".lock"
        f = open(path, "a+")  # noqa: SIM115 - held open until the process ends
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            pid = f.read().strip() or "?"
            f.close()
            raise UsageError(f"{self.out} is in use by pid {pid}") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock_file = f

    def release_lock(self) -> None:
        """Release the output folder's lock (also released when the process ends)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # ---- one optimisation step -------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _embed(self, chunk: dict) -> torch.Tensor:
        with self._autocast():
            z = self.model(**{k: chunk[k] for k in TOKEN_KEYS if k in chunk})
        return z.view(-1, chunk["n_views"], z.shape[-1])

    def _mlm(self, chunk: dict) -> torch.Tensor:
        with self._autocast():
            loss = self.model.mlm_loss(chunk["mlm_input_ids"], chunk["attention_mask"][:: chunk["n_views"]],
                                       chunk["mlm_labels"])
        return self.cfg.mlm_weight * loss.float()

    def _scale(self, t: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(t) if self.scaler is not None else t

    def _contrastive_or_nan(self, z: torch.Tensor) -> torch.Tensor:
        """The contrastive loss of embeddings ``z``; NaN (with NaN gradients) if ``z`` is not finite, so the
        non-finite guard of :meth:`train_step` decides (the loss itself rejects non-finite inputs)."""
        if not bool(torch.isfinite(z).all()):
            return z.float().sum() * float("nan")
        return contrastive_loss(z, self.model.loss_fn)

    def _views_of(self, examples: list[tuple[str, ...]], idx: list[int]) -> list[tuple[str, ...]]:
        """The texts each example is embedded as: simcse: the example (anchor, positive[, hard negative]),
        the positive augmented with --augment; distill: the sentence once; amsoftmax: the sentence K times."""
        cfg = self.cfg
        if cfg.objective.startswith("distill"):
            return [ex[:1] for ex in examples]
        if cfg.objective == "amsoftmax":
            return [(ex[0],) * (cfg.views or DEFAULT_VIEWS) for ex in examples]
        if self.augment is not None:  # the anchor stays the sentence; the positive is augmented
            # one generator per (seed, step, example): the same views on any number of ranks, and on resume
            step_seed = cfg.seed * 1_000_003 + self.step
            return [(ex[0], augment_sentence(ex[1], *self.augment, random.Random(step_seed * 1_000_003 + i)))
                    for i, ex in zip(idx, examples)]
        return examples

    def _objective_loss(self, idx: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        """(B, V, H) embeddings of the examples ``idx`` (this rank's) -> () loss of ``--objective``.

        A non-finite ``z`` gives NaN (with NaN gradients), so the non-finite guard of :meth:`train_step`
        decides (the loss itself rejects non-finite inputs).
        """
        cfg, model = self.cfg, self.model
        rows = torch.tensor(idx, device=self.device)

        def guarded(loss_of):
            def loss(z):
                if not bool(torch.isfinite(z).all()):
                    return z.float().sum() * float("nan")
                return loss_of(z)
            return loss

        def student(z):
            s = z[:, 0]
            proj = getattr(model, "distill_projection", None)
            return proj(s) if proj is not None else s

        if cfg.objective == "distill_mse":
            return guarded(lambda z: distill_mse_loss(student(z), self.teacher[rows]))
        if cfg.objective == "distill_contrastive":
            if cfg.teacher_bank:  # every sentence of the file is a candidate; the target is the own row
                return guarded(lambda z: candidate_loss(student(z), self.teacher, rows, model.loss_fn))
            everyone = torch.tensor(self.order.indices(self.step, 0, 1), device=self.device)  # the global batch
            labels = self.rank * len(idx) + torch.arange(len(idx), device=self.device)
            return guarded(lambda z: candidate_loss(student(z), self.teacher[everyone], labels, model.loss_fn))
        if cfg.objective == "amsoftmax":
            def amsoftmax(z):
                views = z.reshape(-1, z.shape[-1])  # example-major: the K views of sentence i are rows iK..iK+K-1
                return candidate_loss(views, model.class_weights, rows.repeat_interleave(z.shape[1]), model.loss_fn)
            return guarded(amsoftmax)
        return self._contrastive_or_nan

    def forward_backward(self, batch: dict, idx: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Loss (and weighted MLM loss) of one local batch (the examples ``idx``; needed by every objective but
        simcse); accumulates parameter gradients."""
        loss_of = self._contrastive_or_nan if idx is None else self._objective_loss(idx)
        aux = self._mlm if self.cfg.do_mlm else None
        n_local = batch["input_ids"].shape[0] // batch["n_views"]
        chunk = self.cfg.grad_cache_chunk
        if chunk and chunk < n_local:
            return grad_cache_backward(self._embed, split_batch(batch, chunk), loss_of,
                                       cuda_devices=cuda_devices_of(self.model), aux_loss=aux, scale=self._scale)
        loss = loss_of(self._embed(batch))
        mlm = aux(batch) if aux is not None else None
        self._scale(loss if mlm is None else loss + mlm).backward()
        return loss.detach(), (mlm.detach() if mlm is not None else None)

    def train_step(self) -> dict:
        """Run global step ``self.step``: data, forward/backward, all-reduce, clip, update. Returns metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        idx = self.order.indices(self.step, self.rank, self.world)
        seed = (cfg.seed * 1_000_003 + self.step) * 64 + self.rank  # MLM masks: (seed, step, rank), exact resume
        batch = self.collate(self._views_of([self.examples[i] for i in idx], idx), seed=seed)
        batch = _to_device(batch, self.device)
        self.model.train()
        loss, mlm = self.forward_backward(batch, idx)
        average_gradients(self.model.parameters())
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm or math.inf))
        loss_value = float(mean_over_ranks(loss))
        # fp16: the grad scaler skips steps with non-finite gradients itself; the loss is still checked.
        bad = ("loss", loss_value) if not math.isfinite(loss_value) else (
            ("grad norm", grad_norm) if self.scaler is None and not math.isfinite(grad_norm) else None)
        if bad is not None and cfg.on_nonfinite == "stop":
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingStopped(f"step {self.step + 1}: {bad[0]} is {bad[1]} (non-finite); stopped before the "
                                  "optimizer step, nothing exported; the last checkpoint is intact "
                                  "(lower --lr, raise --temperature, or --on_nonfinite skip)")
        if bad is not None:
            self.skipped_in_a_row += 1
            self.skipped_total += 1
            if self.skipped_in_a_row > cfg.max_skipped_steps:
                raise TrainingStopped(f"step {self.step + 1}: {bad[0]} is {bad[1]}: more than "
                                      f"--max_skipped_steps {cfg.max_skipped_steps} non-finite steps in a row")
        elif self.scaler is not None:
            self.skipped_in_a_row = 0
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.skipped_in_a_row = 0
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        tau = self.model.loss_fn.temperature
        rec = {"step": self.step, "loss": loss_value, "lr": self.scheduler.get_last_lr()[0],
               "temperature": float(tau.detach()) if isinstance(tau, torch.Tensor) else float(tau),
               "examples_per_s": cfg.batch_size / dt, "step_time_s": dt}
        if mlm is not None:
            rec["mlm_loss"] = float(mean_over_ranks(mlm)) / cfg.mlm_weight
        rec["grad_norm"] = grad_norm
        if bad is not None:
            rec["skipped"] = True
            rec["skipped_total"] = self.skipped_total
        return rec

    # ---- evaluation, logging, checkpoints --------------------------------------------------
    def evaluate_dev(self) -> float:
        """STS-B dev Spearman x 100 (cosine), as SimCSE's model selection."""
        from .sts_eval import eval_pairs, load_stsb

        if self._dev_pairs is None:
            self._dev_pairs = load_stsb(self.cfg.data_dir, "dev")
        encode = lambda s: self.model.embed_sentences(self.tokenizer, s, max_length=self.cfg.eval_max_length)
        return eval_pairs(encode, self._dev_pairs)

    def log(self, rec: dict) -> None:
        """Append ``rec`` to metrics.jsonl as one whole line (one write, flushed and fsynced).

        A failed write (e.g. ENOSPC) cuts the file back to its previous length and raises
        :class:`~.errors.TrainingStopped`.
        """
        if self.rank != 0:
            return
        line = (json.dumps(rec) + "\n").encode()
        with self.metrics_path.open("ab") as f:
            size = f.tell()
            try:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            except OSError as exc:
                f.truncate(size)
                raise write_failed(self.metrics_path, exc) from None

    def _truncate_metrics(self) -> None:
        """On resume, drop records of steps after the checkpoint (a killed run may have logged them), and a
        last line cut by a kill or a full disk (with a warning)."""
        if self.rank != 0 or not self.metrics_path.is_file():
            return
        keep = []
        lines = self.metrics_path.read_text().splitlines()
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                if i != len(lines) - 1:
                    raise UsageError(f"{self.metrics_path}: line {i + 1} is not JSON (edit or remove it)") from None
                print(f"warning: {self.metrics_path}: dropping a cut last line ({len(line)} characters)",
                      file=sys.stderr, flush=True)
                continue
            if rec.get("step", 0) <= self.step:
                keep.append(line)
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        try:
            ckpt.write_bytes_durably(tmp, "".join(line + "\n" for line in keep).encode())
            tmp.replace(self.metrics_path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise write_failed(self.metrics_path, exc) from None

    def save_checkpoint(self) -> None:
        path = self.out / "checkpoints" / f"step-{self.step:07d}"
        if self.world > 1:  # every rank's RNG differs; rank 0 saves the rest
            path.mkdir(parents=True, exist_ok=True)
            torch.save(ckpt.rng_state(), path / f"rng-rank{self.rank}.pt")
            torch.distributed.barrier()
        if self.rank == 0:
            ckpt.save_state(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                            scaler=self.scaler, step=self.step, best=self.best,
                            extra={"config": dataclasses.asdict(self.cfg), "world": self.world})
            # Only verified checkpoints count towards --keep_checkpoints; unusable ones are deleted.
            folders = ckpt.checkpoint_folders(self.out)
            good = [p for p in folders if ckpt.verify_checkpoint(p) is None]
            for p in [p for p in folders if p not in good] + good[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(p, ignore_errors=True)
        if self.world > 1:
            torch.distributed.barrier()

    def maybe_resume(self) -> None:
        path = ckpt.latest_checkpoint(self.out, warn=self.rank == 0) if self.cfg.resume else None
        if path is None:
            return
        blob = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        self._check_resume(path, blob.get("extra", {}))
        ckpt.load_state(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                        scaler=self.scaler, blob=blob)
        if self.world > 1:
            ckpt.set_rng_state(torch.load(path / f"rng-rank{self.rank}.pt", weights_only=False))
        self.step, self.best = blob["step"], blob["best"]
        if self.cfg.resume_changed:
            self._apply_new_schedule()
        self._truncate_metrics()
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def _check_resume(self, path: Path, extra: dict) -> None:
        """Refuse a resume whose training-relevant flags or world size differ from the checkpoint's."""
        world = extra.get("world", 1)
        if world != self.world:
            raise UsageError(f"{path} was written by a run on {world} process(es); this run has {self.world} "
                             "(resume with the same number of processes, or use a new --output_dir)")
        old = extra.get("config", {})
        new = dataclasses.asdict(self.cfg)
        diffs = [f"--{k} {old[k]!r} -> {new[k]!r}" for k in RESUME_FLAGS if k in old and old[k] != new[k]]
        if diffs and not self.cfg.resume_changed:
            raise UsageError(f"resuming {path} with changed flags: {'; '.join(diffs)} "
                             "(pass --resume_changed to accept them, or use a new --output_dir)")
        if diffs and self.rank == 0:
            print(f"resuming with changed flags: {'; '.join(diffs)}", flush=True)

    def _apply_new_schedule(self) -> None:
        """After ``--resume_changed``: this run's --lr, --weight_decay and LR schedule replace the checkpoint's."""
        factor = linear_schedule(self.cfg.warmup_steps, self.total_steps)
        self.scheduler.lr_lambdas = [factor] * len(self.optimizer.param_groups)
        self.scheduler.base_lrs = [self.cfg.lr] * len(self.optimizer.param_groups)
        self.scheduler.last_epoch = self.step
        for group, wd in zip(self.optimizer.param_groups, (self.cfg.weight_decay, 0.0)):
            group["initial_lr"] = self.cfg.lr
            group["lr"] = self.cfg.lr * factor(self.step)
            group["weight_decay"] = wd
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def _eval_and_select(self) -> None:
        if self.rank == 0:
            score = self.last_dev = self.evaluate_dev()
            is_best = math.isfinite(score) and (self.best is None or score > self.best)  # NaN is never best
            if is_best:
                self.best = score
                ckpt.export_model(self.model, self.tokenizer, self.out / "best", self.cfg.eval_max_length)
            self.log({"step": self.step, "stsb_dev_spearman": score, "best": self.best})
            from tqdm.auto import tqdm

            best = f"{self.best:.2f}" if self.best is not None else "none yet"
            tqdm.write(f"step {self.step}: STS-B dev Spearman {score:.2f} (best {best})")
        if is_distributed():
            best = torch.tensor([self.best if self.best is not None else -math.inf], dtype=torch.float64)
            torch.distributed.broadcast(best, 0)
            self.best = float(best)

    def fit(self, on_step: Callable[[dict], None] | None = None) -> dict:
        """Train from the current step (after :meth:`maybe_resume`) to ``total_steps``.

        Args:
            on_step: called with each step's metrics record (tests use it to simulate a kill).

        Returns:
            Summary: steps, seconds, last loss, dev scores before/after and best (if evaluated).
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        evaluating = cfg.data_dir is not None and cfg.eval_every is not None
        summary: dict = {"steps": self.total_steps}
        if cfg.eval_before and cfg.data_dir is not None and self.rank == 0 and self.step == 0:
            summary["stsb_dev_before"] = self.evaluate_dev()
            self.log({"step": 0, "stsb_dev_spearman": summary["stsb_dev_before"]})
            print(f"STS-B dev Spearman before training: {summary['stsb_dev_before']:.2f}", flush=True)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not cfg.progress or self.rank != 0,
                   desc="simcse", dynamic_ncols=True)
        t0, rec = time.perf_counter(), {}
        previous = self._install_signal_handlers()
        try:
            while self.step < self.total_steps:
                try:
                    rec = self._fit_step(on_step, bar, evaluating)
                except (torch.distributed.DistError, RuntimeError) as exc:
                    if not is_distributed() or isinstance(exc, TrainingStopped):
                        raise
                    cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                    raise TrainingStopped(f"rank {self.rank}: a collective failed after step {self.step} (another "
                                          f"rank stopped or died? --dist_timeout {cfg.dist_timeout:g} s): {cause}"
                                          ) from None
        finally:
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        summary.update(seconds=time.perf_counter() - t0, last_loss=rec.get("loss"))
        if self.skipped_total:
            summary["skipped_steps"] = self.skipped_total
        if self.rank == 0:
            ckpt.export_model(self.model, self.tokenizer, self.out / "final", cfg.eval_max_length)
            if evaluating:
                summary["stsb_dev_after"] = self.last_dev if self.last_dev is not None else self.evaluate_dev()
                summary["stsb_dev_best"] = self.best
                best = f"{self.best:.2f}" if self.best is not None else "none"
                print(f"STS-B dev Spearman after training: {summary['stsb_dev_after']:.2f} "
                      f"(best {best}, saved in {self.out / 'best'})", flush=True)
        return summary

    def _install_signal_handlers(self) -> dict:
        """First SIGINT / SIGTERM: finish the step, save, exit (see :meth:`_stop_on_signal`); a second: exit now."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._signal is not None:
                os._exit(128 + signum)
            self._signal = signum

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _signal_received(self) -> int | None:
        """The signal any rank received (all ranks stop at the same step), or None."""
        if not is_distributed():
            return self._signal
        flag = torch.tensor([float(self._signal or 0)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag) or None

    def _stop_on_signal(self, signum: int) -> typing.NoReturn:
        path = self.out / "checkpoints" / f"step-{self.step:07d}"
        if ckpt.verify_checkpoint(path) is not None:
            self.save_checkpoint()
        name = signal.Signals(signum).name
        raise TrainingStopped(f"{name} received: stopped after step {self.step}, checkpoint saved in {path}; "
                              "run the same command again to resume", exit_code=128 + signum)

    def _fit_step(self, on_step, bar, evaluating: bool) -> dict:
        """One step of :meth:`fit`: train, log, evaluate, checkpoint; then stop here if a signal came."""
        cfg = self.cfg
        rec = self.train_step()
        bar.update(1)
        bar.set_postfix({"loss": f"{rec['loss']:.3g}", "ex/s": f"{rec['examples_per_s']:.0f}"})
        if self.step % cfg.log_every == 0 or self.step == self.total_steps:
            self.log(rec)
        if evaluating and (self.step % cfg.eval_every == 0 or self.step == self.total_steps):
            self._eval_and_select()
        if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == self.total_steps):
            self.save_checkpoint()
        if on_step is not None:
            on_step(rec)
        signum = self._signal_received()
        if signum is not None:
            self._stop_on_signal(signum)
        return rec


def train(cfg: TrainConfig, on_step: Callable[[dict], None] | None = None,
          examples: list[tuple[str, ...]] | None = None) -> dict:
    """Build a :class:`Trainer` (``examples``: see there), resume from the newest checkpoint in
    ``output_dir`` if any, and fit."""
    trainer = Trainer(cfg, examples)
    try:
        trainer.maybe_resume()
        return trainer.fit(on_step)
    finally:
        trainer.release_lock()
