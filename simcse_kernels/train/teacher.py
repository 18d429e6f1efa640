"""Teacher embeddings for ``--objective distill_mse`` / ``distill_contrastive`` (``--teacher MODEL``).

The teacher (any model ``simcse-eval`` accepts, pooled as ``simcse-eval`` pools it) embeds every sentence of
the training file once, in eval mode, with a progress bar; the (N, D_teacher) table gives the regression
targets (distill_mse), the batch's candidates (distill_contrastive) and, with ``--teacher_bank``, the
candidates of the whole file. The table is cached on disk under ``<cache>/teacher/<key>.pt``, where the
key is the SHA-256 of the teacher's files (or its Hub id), its pooler, the truncation length and the
training file's bytes: a changed teacher or file computes a new table. ``<cache>`` is ``--cache_dir``, else
``$SIMCSE_KERNELS_CACHE``, else ``~/.cache/simcse_kernels``.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from .errors import UsageError


def default_cache_dir() -> Path:
    """``$SIMCSE_KERNELS_CACHE``, else ``~/.cache/simcse_kernels``."""
    env = os.environ.get("SIMCSE_KERNELS_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/simcse_kernels").expanduser()


def check_teacher(name: str) -> str:
    """:func:`~.model.check_model` for ``--teacher`` (messages name ``--teacher``); returns the path/id."""
    from .model import check_model

    try:
        return check_model(name)
    except UsageError as exc:
        raise UsageError(str(exc).replace("--model", "--teacher", 1)) from None


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def teacher_cache_key(teacher_path: str, pooler: str, max_length: int, train_file: str | Path) -> str:
    """SHA-256 over the teacher's files (relative names and bytes; a Hub id: the id), pooler, length, file bytes."""
    h = hashlib.sha256()
    folder = Path(teacher_path).expanduser()
    if folder.is_dir():
        for p in sorted(q for q in folder.rglob("*") if q.is_file()):
            h.update(str(p.relative_to(folder)).encode() + b"\0")
            _hash_file(h, p)
    else:
        h.update(b"hub:" + teacher_path.encode())
    h.update(f"\0pooler={pooler}\0max_length={max_length}\0file\0".encode())
    _hash_file(h, Path(train_file))
    return h.hexdigest()


def teacher_table(teacher: str, sentences: list[str], train_file: str | Path, *, max_length: int = 128,
                  device: torch.device | str = "cpu", cache_dir: str | Path | None = None, show: bool = True,
                  batch_size: int = 128) -> torch.Tensor:
    """The teacher's (N, D_teacher) float32 embeddings of ``sentences`` (the training file's), cached.

    Raises:
        UsageError: a teacher that does not load (one line naming ``--teacher`` and the cause).
    """
    from .model import resolve_pooler

    path = check_teacher(teacher)
    pooler, _, _ = resolve_pooler(teacher, None, default="cls_before_pooler")
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    file = cache / "teacher" / f"{teacher_cache_key(path, pooler, max_length, train_file)}.pt"
    if file.is_file():
        try:
            blob = torch.load(file, map_location="cpu", weights_only=True)
            if blob["embeddings"].shape[0] == len(sentences):
                if show:
                    print(f"teacher embeddings: {file} (cached)", flush=True)
                return blob["embeddings"]
        except Exception as exc:  # noqa: BLE001 - an unreadable cache entry is recomputed
            print(f"warning: {file}: unreadable cache entry ({type(exc).__name__}); recomputing", file=sys.stderr)
    table = _embed_with_teacher(teacher, path, pooler, sentences, max_length, device, show, batch_size)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f"{file.name}.tmp-{os.getpid()}")
        torch.save({"embeddings": table, "teacher": teacher, "pooler": pooler}, tmp)
        tmp.replace(file)
    except OSError as exc:  # the cache is an optimisation: warn and go on
        print(f"warning: cannot cache the teacher embeddings in {file}: {exc.strerror or exc}", file=sys.stderr)
    return table


def _embed_with_teacher(teacher, path, pooler, sentences, max_length, device, show, batch_size) -> torch.Tensor:
    from transformers import AutoTokenizer

    from .checkpoint import load_exported

    try:
        model = load_exported(teacher, pooler).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except UsageError as exc:
        raise UsageError(f"--teacher {teacher}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any load failure is the user's teacher
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UsageError(f"--teacher {teacher}: does not load ({type(exc).__name__}: {first})") from None
    return model.embed_sentences(tokenizer, sentences, batch_size, max_length, device,
                                 progress="teacher embeddings" if show else None)
