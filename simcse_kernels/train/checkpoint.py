"""Training-state checkpoints (exact resume) and the model export (transformers + sentence-transformers).

Training state (``<out>/checkpoints/step-XXXXXXX/state.pt``): model and optimizer/scheduler/grad-scaler
state, the step (the data position: batch order is a function of seed and step), the best dev score,
and the Python / NumPy / torch CPU / CUDA RNG states.

Export (``export_model``): ``save_pretrained`` of the bare encoder and the tokenizer (loadable by
``AutoModel`` / ``AutoTokenizer``), ``simcse_config.json`` (pooler), and the sentence-transformers files
(``modules.json``, ``sentence_bert_config.json``, ``1_Pooling/config.json``; plus a ``2_Dense`` Tanh layer
when the MLP head is used at evaluation) so ``SentenceTransformer(path)`` gives the same embeddings. A TextCNN
(``--encoder textcnn``) exports its config, weights and tokenizer instead (see :mod:`.textcnn`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from .errors import TrainingStopped, UsageError, write_failed
from .model import (
    EXPORT_TMP_PREFIX,
    SimCSEModel,
    incomplete_export,
    quiet_transformers_progress,
    resolve_model_path,
    resolve_pooler,
)
from .textcnn import TextCNNModel, is_textcnn_folder, load_textcnn, save_textcnn

CHECKSUM_FILE = "state.pt.sha256"
CKPT_TMP_PREFIX = ".tmp-step-"

ST_POOLING = {"cls": "cls", "cls_before_pooler": "cls", "avg": "mean"}


def rng_state() -> dict:
    """Every RNG state the training loop touches."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename or new file inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, flush and fsync (an ``OSError`` such as ENOSPC propagates)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_state(path: str | Path, *, model, optimizer, scheduler, scaler, step: int, best: float | None,
               extra: dict | None = None) -> Path:
    """Write the full training state to ``path`` (a folder; ``state.pt`` inside), atomically and verified.

    The folder is written as a ``.tmp-step-*`` sibling: ``state.pt`` (fsynced), then its SHA-256 in
    ``state.pt.sha256``, then the folder is fsynced and renamed to ``path``. Files already in ``path``
    (other ranks' RNG states) are moved along. On a failed write (e.g. ENOSPC) the temporary is removed
    and :class:`~.errors.TrainingStopped` names the path and the cause.
    """
    path = Path(path)
    blob = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None, "step": step, "best": best,
        "rng": rng_state(), "extra": extra or {},
    }
    buf = io.BytesIO()
    torch.save(blob, buf)
    data = buf.getvalue()
    tmp = path.parent / f"{CKPT_TMP_PREFIX}{path.name}-{os.getpid()}"
    target = tmp / "state.pt"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        if path.is_dir():  # rank files written by every rank before rank 0 saves
            path.rename(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        write_bytes_durably(target, data)
        target = tmp / CHECKSUM_FILE
        write_bytes_durably(target, hashlib.sha256(data).hexdigest().encode() + b"\n")
        fsync_dir(tmp)
        tmp.rename(path)
        fsync_dir(path.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(target, exc) from None
    return path


def verify_checkpoint(path: str | Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be used (missing file, checksum mismatch), or None."""
    path = Path(path)
    state, digest_file = path / "state.pt", path / CHECKSUM_FILE
    if not state.is_file():
        return "no state.pt"
    if not digest_file.is_file():
        return f"no {CHECKSUM_FILE} (unfinished or written by an older version)"
    h = hashlib.sha256()
    with open(state, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != digest_file.read_text().strip():
        return f"state.pt does not match its checksum ({state.stat().st_size} bytes; truncated or corrupted)"
    return None


def checkpoint_folders(out_dir: str | Path) -> list[Path]:
    """The ``checkpoints/step-*`` folders under ``out_dir``, oldest first (temporaries excluded)."""
    return sorted(p for p in Path(out_dir).glob("checkpoints/step-*") if p.is_dir())


def remove_temporaries(out_dir: str | Path) -> None:
    """Delete what an interrupted run left: checkpoint and export temporaries (a ``.old`` export that
    was being replaced is put back if its replacement never arrived)."""
    out = Path(out_dir)
    for p in out.glob(f"checkpoints/{CKPT_TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in out.glob(f"{EXPORT_TMP_PREFIX}*"):
        name = p.name[len(EXPORT_TMP_PREFIX):]
        if name.endswith(".old") and not (out / name[:-4]).exists():
            p.rename(out / name[:-4])
        else:
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(out_dir: str | Path, warn: bool = True) -> Path | None:
    """The newest ``checkpoints/step-*`` folder that passes :func:`verify_checkpoint`, or None.

    Each newer folder that fails prints one warning line (on stderr) and is skipped.
    """
    for path in reversed(checkpoint_folders(out_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        if warn:
            print(f"warning: skipping checkpoint {path}: {problem}", file=sys.stderr, flush=True)
    return None


def load_state(path: str | Path, *, model, optimizer, scheduler, scaler, blob: dict | None = None) -> dict:
    """Load a :func:`save_state` folder (or its already loaded ``blob``) into the given objects; restores RNG.
    Returns the blob (step, best)."""
    if blob is None:
        blob = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and blob["scaler"] is not None:
        scaler.load_state_dict(blob["scaler"])
    set_rng_state(blob["rng"])
    return blob


def check_finite_parameters(model: torch.nn.Module, what: str) -> None:
    """Raise :class:`~.errors.TrainingStopped` if any parameter of ``model`` holds a NaN or infinity."""
    for name, p in model.named_parameters():
        bad = int((~torch.isfinite(p.detach())).sum())
        if bad:
            raise TrainingStopped(f"not exporting {what}: parameter {name} has {bad} non-finite value(s)")


def export_model(model: SimCSEModel, tokenizer, out_dir: str | Path, max_seq_length: int = 128) -> Path:
    """:func:`write_export` into a temporary sibling of ``out_dir``, then rename it into place.

    Every parameter is checked to be finite first. An existing ``out_dir`` is replaced (moved to a
    ``.old`` sibling, then deleted); :func:`remove_temporaries` cleans up after a kill at any point.
    A failed write (e.g. ENOSPC) removes the temporary and raises :class:`~.errors.TrainingStopped`.
    """
    out = Path(out_dir)
    check_finite_parameters(model, str(out))
    tmp = out.parent / f"{EXPORT_TMP_PREFIX}{out.name}"
    old = out.parent / f"{EXPORT_TMP_PREFIX}{out.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_export(model, tokenizer, tmp, max_seq_length)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        cfg = json.loads((tmp / "simcse_config.json").read_text())
        cfg["files"] = files
        write_bytes_durably(tmp / "simcse_config.json", json.dumps(cfg, indent=2).encode())
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        fsync_dir(out.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(tmp, exc) from None
    shutil.rmtree(old, ignore_errors=True)
    return out


def write_export(model: SimCSEModel, tokenizer, out_dir: str | Path, max_seq_length: int = 128) -> Path:
    """Save ``model`` for ``transformers`` and ``sentence-transformers`` (see the module docstring).

    Args:
        model: the trained model.
        tokenizer: its tokenizer.
        out_dir: target folder.
        max_seq_length: sentence-transformers' truncation length.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, TextCNNModel):
        save_textcnn(model.encoder, tokenizer, out, max_seq_length)
        (out / "simcse_config.json").write_text(json.dumps({"encoder": "textcnn"}, indent=2))
        return out
    encoder = model.encoder
    eval_mlp = model.mlp is not None and not model.mlp_only_train
    with quiet_transformers_progress():  # no "Writing model shards" bar inside the training bar
        encoder.save_pretrained(out)
        tokenizer.save_pretrained(out)
    (out / "simcse_config.json").write_text(json.dumps({"pooler": model.pooler, "eval_mlp": eval_mlp}, indent=2))
    if eval_mlp:
        torch.save({k: v.detach().cpu() for k, v in model.mlp.state_dict().items()}, out / "simcse_mlp.pt")
    if model.pooler not in ST_POOLING:
        # sentence-transformers' Pooling has no avg_top2 / avg_first_last mode.
        return out
    hidden = encoder.config.hidden_size
    mode = ST_POOLING[model.pooler]
    pooling = {
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                               "do_lower_case": False}, indent=2))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if eval_mlp:
        _write_st_dense(model.mlp, out / "2_Dense")
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    return out


def _write_st_dense(mlp, path: Path) -> None:
    """The MLP head as a sentence-transformers ``Dense`` (Linear + Tanh) module folder."""
    try:
        from sentence_transformers.sentence_transformer.modules import Dense
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Dense

    path.mkdir(parents=True, exist_ok=True)
    h = mlp.dense.in_features
    dense = Dense(h, h, bias=True, activation_function=torch.nn.Tanh())
    dense.linear.load_state_dict(mlp.dense.state_dict())
    dense.save(str(path))


def load_exported(path: str | Path, pooler: str | None = None, **hf_kwargs) -> SimCSEModel | TextCNNModel:
    """A :class:`SimCSEModel` (or a :class:`~.textcnn.TextCNNModel` for a TextCNN export) in eval mode from an
    exported folder (or any HF model).

    Args:
        path: folder written by :func:`export_model`, ``pkg:MODULE``, or any ``AutoModel`` name/path.
        pooler: overrides the model's own choice; default: ``simcse_config.json``, else the model's
            sentence-transformers pooling, else ``cls_before_pooler`` (see :func:`~.model.resolve_pooler`).
    """
    folder = Path(resolve_model_path(str(path)))
    if folder.is_dir() and incomplete_export(folder) is not None:
        raise UsageError(incomplete_export(folder))
    if is_textcnn_folder(folder):
        return TextCNNModel(load_textcnn(folder)).eval()
    pooler, _, _ = resolve_pooler(str(path), pooler, default="cls_before_pooler")
    cfg_file = folder / "simcse_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    eval_mlp = bool(cfg.get("eval_mlp")) and pooler == "cls"
    model = SimCSEModel.from_pretrained(str(path), pooler=pooler, mlp_only_train=not eval_mlp, **hf_kwargs)
    if eval_mlp:
        model.mlp.load_state_dict(torch.load(folder / "simcse_mlp.pt", map_location="cpu"))
    return model.eval()
