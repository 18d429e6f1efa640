"""SimCSE's poolers (``cls``, ``cls_before_pooler``, ``avg``, ``avg_top2``, ``avg_first_last``) and MLP head.

Definitions follow SimCSE (``princeton-nlp/SimCSE``, ``simcse/models.py``): ``cls`` and
``cls_before_pooler`` both take the last layer's first token; the difference is that ``cls`` is followed
by the MLP head (Linear + Tanh) during training, and also at evaluation unless ``mlp_only_train``.
``avg`` is the attention-masked mean of the last layer; ``avg_top2`` averages the masked means of the
last two layers; ``avg_first_last`` the masked means of the embedding-layer output (hidden_states[0])
and the last layer — as SimCSE does.
"""

from __future__ import annotations

import torch
from torch import nn

POOLERS = ("cls", "cls_before_pooler", "avg", "avg_top2", "avg_first_last")


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where ``mask`` is 1.

    Args:
        hidden: (B, L, H) token states.
        mask: (B, L) attention mask (0/1).

    Returns:
        (B, H) masked means (a row with no token gives 0).
    """
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def needs_hidden_states(pooler: str) -> bool:
    """Whether ``pooler`` reads more than the last layer (the encoder must return all hidden states)."""
    return pooler in ("avg_top2", "avg_first_last")


def pool(pooler: str, attention_mask: torch.Tensor, last_hidden: torch.Tensor, hidden_states=None) -> torch.Tensor:
    """Sentence embeddings from token states.

    Args:
        pooler: one of :data:`POOLERS`.
        attention_mask: (B, L) 0/1 mask.
        last_hidden: (B, L, H) last layer.
        hidden_states: tuple of (B, L, H), embeddings output first (needed by ``avg_top2`` /
            ``avg_first_last``).

    Returns:
        (B, H) embeddings (before the MLP head).
    """
    if pooler in ("cls", "cls_before_pooler"):
        return last_hidden[:, 0]
    if pooler == "avg":
        return _masked_mean(last_hidden, attention_mask)
    if pooler == "avg_first_last":
        return 0.5 * (_masked_mean(hidden_states[0], attention_mask) + _masked_mean(hidden_states[-1], attention_mask))
    if pooler == "avg_top2":
        return 0.5 * (_masked_mean(hidden_states[-1], attention_mask) + _masked_mean(hidden_states[-2], attention_mask))
    raise ValueError(f"unknown pooler {pooler!r}; expected one of {POOLERS}")


class MLPHead(nn.Module):
    """SimCSE's ``MLPLayer``: Linear(H, H) + Tanh over the pooled (B, H) embedding."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H) -> (B, H)."""
        return self.activation(self.dense(x))
