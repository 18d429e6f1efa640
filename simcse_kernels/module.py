"""``FusedInfoNCE``: the ``nn.Module`` face of :func:`simcse_kernels.fused_info_nce`."""

from __future__ import annotations

import torch
from torch import nn

from .functional import info_nce_with_options
from .options import InfoNCEOptions, Temperature


class FusedInfoNCE(nn.Module):
    """InfoNCE / SimCSE / MixCSE loss module; options as :func:`fused_info_nce`.

    ``learnable_temperature=True`` registers ``log_temperature`` as a parameter (CLIP-style,
    initialised at ``temperature``); otherwise a tensor ``temperature`` is used as given.

    Example::

        loss_fn = FusedInfoNCE(temperature=0.05)
        loss = loss_fn(z1, z2)            # unsup SimCSE
        loss = loss_fn(z1, z2, z3)        # sup SimCSE with hard negatives
    """

    def __init__(
        self,
        temperature: Temperature = 0.05,
        hard_negative_weight: float = 0.0,
        symmetric: bool = False,
        anchor_negatives: bool = False,
        mix_lambda: float | None = None,
        reduction: str = "mean",
        backend: str = "auto",
        check_inputs: bool = True,
        learnable_temperature: bool = False,
        chunk_budget_mib: float | None = None,
        margin: float = 0.0,
        angular_margin: float = 0.0,
        similarity: str = "cosine",
        directions: tuple[str, ...] | None = None,
        partition_mode: str = "joint",
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        doc_to_doc_negatives: bool = True,
        guide_margin: float = 0.0,
        guide_margin_strategy: str = "absolute",
    ) -> None:
        super().__init__()
        # Validate every option once, here, with the same messages as the functional API.
        self.options = InfoNCEOptions(
            temperature=temperature,
            hard_negative_weight=hard_negative_weight,
            symmetric=symmetric,
            anchor_negatives=anchor_negatives,
            mix_lambda=mix_lambda,
            reduction=reduction,
            backend=backend,
            check_inputs=check_inputs,
            chunk_budget_mib=chunk_budget_mib,
            margin=margin,
            angular_margin=angular_margin,
            similarity=similarity,
            directions=directions,
            partition_mode=partition_mode,
            hardness_mode=hardness_mode,
            hardness_strength=hardness_strength,
            doc_to_doc_negatives=doc_to_doc_negatives,
            guide_margin=guide_margin,
            guide_margin_strategy=guide_margin_strategy,
        )
        self.log_temperature: nn.Parameter | None = None
        if learnable_temperature:
            init = float(temperature.detach()) if isinstance(temperature, torch.Tensor) else float(temperature)
            self.log_temperature = nn.Parameter(torch.tensor(init).log())

    @property
    def temperature(self) -> Temperature:
        if self.log_temperature is not None:
            return self.log_temperature.exp()
        return self.options.temperature

    def forward(
        self,
        anchors: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        guide: tuple | None = None,
    ) -> torch.Tensor:
        """The loss; ``guide``: GIST's guide embeddings of this batch (see :func:`fused_info_nce`)."""
        options = self.options
        if self.log_temperature is not None or guide is not None:
            temperature = self.temperature if self.log_temperature is not None else options.temperature
            options = InfoNCEOptions(**{**options.__dict__, "temperature": temperature, "guide": guide})
        return info_nce_with_options(anchors, positives, negatives, labels, options)

    def extra_repr(self) -> str:
        o = self.options
        tau = "learnable" if self.log_temperature is not None else o.temperature
        return (
            f"temperature={tau}, hard_negative_weight={o.hard_negative_weight}, symmetric={o.symmetric}, "
            f"anchor_negatives={o.anchor_negatives}, mix_lambda={o.mix_lambda}, reduction={o.reduction!r}, "
            f"backend={o.backend!r}, margin={o.margin}, angular_margin={o.angular_margin}, "
            f"similarity={o.similarity!r}, directions={o.directions!r}, partition_mode={o.partition_mode!r}, "
            f"hardness_mode={o.hardness_mode!r}, hardness_strength={o.hardness_strength}"
        )
