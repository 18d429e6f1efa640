"""Training-state checkpoints (exact resume) and the model export (transformers + sentence-transformers).

Training state (``<out>/checkpoints/step-XXXXXXX/state.pt``): model and optimizer/scheduler/grad-scaler
state, the step (the data position: batch order is a function of seed and step), the best dev score,
and the Python / NumPy / torch CPU / CUDA RNG states.

Export (``export_model``): ``save_pretrained`` of the bare encoder and the tokenizer (loadable by
``AutoModel`` / ``AutoTokenizer``), ``simcse_config.json`` (pooler), and the sentence-transformers files
(``modules.json``, ``sentence_bert_config.json``, ``1_Pooling/config.json``; plus a ``2_Dense`` Tanh layer
when the MLP head is used at evaluation) so ``SentenceTransformer(path)`` gives the same embeddings.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from .model import SimCSEModel, quiet_transformers_progress, resolve_model_path, resolve_pooler

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


def save_state(path: str | Path, *, model, optimizer, scheduler, scaler, step: int, best: float | None,
               extra: dict | None = None) -> Path:
    """Write the full training state to ``path`` (a folder; ``state.pt`` inside), atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    blob = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None, "step": step, "best": best,
        "rng": rng_state(), "extra": extra or {},
    }
    tmp = path / "state.pt.tmp"
    torch.save(blob, tmp)
    tmp.replace(path / "state.pt")
    return path


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest ``checkpoints/step-*`` folder with a complete ``state.pt`` under ``out_dir``, or None."""
    ckpts = sorted(Path(out_dir).glob("checkpoints/step-*/state.pt"))
    return ckpts[-1].parent if ckpts else None


def load_state(path: str | Path, *, model, optimizer, scheduler, scaler) -> dict:
    """Load a :func:`save_state` folder into the given objects; restores RNG. Returns the blob (step, best)."""
    blob = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and blob["scaler"] is not None:
        scaler.load_state_dict(blob["scaler"])
    set_rng_state(blob["rng"])
    return blob


def export_model(model: SimCSEModel, tokenizer, out_dir: str | Path, max_seq_length: int = 128) -> Path:
    """Save ``model`` for ``transformers`` and ``sentence-transformers`` (see the module docstring).

    Args:
        model: the trained model.
        tokenizer: its tokenizer.
        out_dir: target folder.
        max_seq_length: sentence-transformers' truncation length.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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


def load_exported(path: str | Path, pooler: str | None = None, **hf_kwargs) -> SimCSEModel:
    """A :class:`SimCSEModel` in eval mode from an exported folder (or any HF model).

    Args:
        path: folder written by :func:`export_model`, ``pkg:MODULE``, or any ``AutoModel`` name/path.
        pooler: overrides the model's own choice; default: ``simcse_config.json``, else the model's
            sentence-transformers pooling, else ``cls_before_pooler`` (see :func:`~.model.resolve_pooler`).
    """
    pooler, _, _ = resolve_pooler(str(path), pooler, default="cls_before_pooler")
    folder = Path(resolve_model_path(str(path)))
    cfg_file = folder / "simcse_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    eval_mlp = bool(cfg.get("eval_mlp")) and pooler == "cls"
    model = SimCSEModel.from_pretrained(str(path), pooler=pooler, mlp_only_train=not eval_mlp, **hf_kwargs)
    if eval_mlp:
        model.mlp.load_state_dict(torch.load(folder / "simcse_mlp.pt", map_location="cpu"))
    return model.eval()
