"""Loss implementations ("providers") benchmarked side by side on the same inputs.

Every provider turns ``(anchors, positives, negatives)`` into the same InfoNCE loss for one
*mode* (see :data:`MODES`):

* ``naive``        -- the matmul form a user writes: ``F.cross_entropy(F.normalize(a) @
  F.normalize(c).T / tau, arange(N))``; the similarity matmul runs in the input dtype (as under
  autocast) and the cross-entropy on the logits cast to fp32. Baseline: speed ratio 1.0.
* ``simcse_orig``  -- SimCSE's original broadcasting form ``nn.CosineSimilarity(dim=-1)(
  z1.unsqueeze(1), z2.unsqueeze(0)) / temp`` (``princeton-nlp/SimCSE`` ``cl_forward``; MixCSE's
  official code uses the same ``Similarity`` module): builds an N x M x D product.
* ``compile``      -- ``torch.compile`` of the ``naive`` function (``dynamic=True``).
* ``st_mnrl``      -- sentence-transformers' ``MultipleNegativesRankingLoss`` loss math on
  embeddings (its own ``compute_loss_from_embeddings`` when the installed version has it, else
  its formula reproduced: ``cross_entropy(cos_sim(a, c) * scale, arange)``).
* ``st_cmnrl``     -- sentence-transformers' ``CachedMultipleNegativesRankingLoss`` loss step on
  cached embeddings: its own ``calculate_loss(reps, with_backward=...)`` (mini-batches of
  ``mini_batch_size`` anchors; the backward runs inside, per mini-batch, as GradCache does).
* ``infcl``        -- Inf-CL (``inf_cl.cal_inf_loss``, DAMO-NLP-SG), CUDA only, on
  ``F.normalize`` d inputs; symmetric = mean of the two directions, as its CLIP loss does.
* ``torch`` / ``triton`` / ``cuda`` -- this package's ``fused_info_nce(..., backend=...)``,
  each only when ``simcse_kernels.available_backends(device)`` lists it.

A provider that cannot express a mode reports ``n/a`` for it (``unsupported(mode)``).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

#: Mode name -> options. "sup" uses hard negatives with weight 0 (SimCSE's default z3_weight),
#: so that the baselines without a hard-negative weight compute the same loss.
MODES: dict[str, dict] = {
    "unsup": dict(negatives=False, mix_lambda=None, symmetric=False),
    "sup": dict(negatives=True, mix_lambda=None, symmetric=False),
    "mixcse": dict(negatives=False, mix_lambda=0.2, symmetric=False),
    "symmetric": dict(negatives=False, mix_lambda=None, symmetric=True),
}
PASSES = ("fwd", "fwdbwd")
TEMPERATURE = 0.05
OURS = ("torch", "triton", "cuda")
BASELINES = ("naive", "simcse_orig", "compile", "st_mnrl", "st_cmnrl", "infcl")
ALL_PROVIDERS = BASELINES + OURS
#: anchors per mini-batch of the CachedMNRL loss step (sentence-transformers' default)
CMNRL_MINI_BATCH = 32

LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def logit_columns(mode: str, n: int) -> int:
    """Logit columns per anchor row for ``mode`` with batch ``n`` (P = N, K = N when "sup").

    unsup/symmetric: N; sup: 2N (positives + hard negatives); mixcse: 3N (positives, mixed
    positives, mixed anchors). The symmetric column direction reuses the same N x N matrix.
    """
    opts = MODES[mode]
    return n * (1 + int(opts["negatives"]) + (2 if opts["mix_lambda"] is not None else 0))


def gemm_equivalents(pass_: str) -> int:
    """FLOP convention: the N x M x D similarity GEMM counts once forward, 3 times forward+backward."""
    return 1 if pass_ == "fwd" else 3


def useful_flops(mode: str, pass_: str, n: int, d: int) -> float:
    """Nominal FLOPs of one call: ``gemm_equivalents * 2 * N * M * D`` (same for every provider)."""
    return gemm_equivalents(pass_) * 2.0 * n * logit_columns(mode, n) * d


def make_inputs(n: int, d: int, mode: str, *, dtype: torch.dtype, device: torch.device | str, seed: int,
                requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random embeddings for one input set.

    Args:
        n: batch size N; d: embedding dim D; mode: a key of :data:`MODES` (decides the negatives).
        dtype/device: of the returned tensors; seed: generator seed (same seed -> same inputs).
        requires_grad: make the returned tensors autograd leaves (forward+backward runs).

    Returns:
        anchors (N, D), positives (N, D) correlated with the anchors (cosine ~0.3, loss O(1)), negatives (N, D) or None.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    a = torch.randn(n, d, generator=gen, device=device, dtype=torch.float32)
    p = a + 3.0 * torch.randn(n, d, generator=gen, device=device, dtype=torch.float32)
    neg = torch.randn(n, d, generator=gen, device=device, dtype=torch.float32) if MODES[mode]["negatives"] else None
    out = []
    for t in (a, p, neg):
        if t is not None:
            t = t.to(dtype).requires_grad_(requires_grad)
        out.append(t)
    return out[0], out[1], out[2]


# --------------------------------------------------------------------------------------------------
# loss functions per provider (each: (a, p, n) -> scalar loss)


def _mix(x: torch.Tensor, lam: float) -> torch.Tensor:
    """MixCSE's detached mixture ``lam * x_j + (1 - lam) * x_{(j+1) mod N}`` of raw embeddings."""
    x = x.detach()
    return lam * x + (1.0 - lam) * torch.roll(x, shifts=-1, dims=0)


def _zero_shifted(block: torch.Tensor, shift: int) -> torch.Tensor:
    """Set entries ``(i, (i + shift) mod N)`` of an (N, N) logit block to 0 (MixCSE's mask)."""
    n = block.shape[0]
    rows = torch.arange(n, device=block.device)
    return block.index_put((rows, (rows + shift) % n), torch.zeros((), device=block.device, dtype=block.dtype))


def naive_loss(mode: str, tau: float = TEMPERATURE) -> LossFn:
    """The naive matmul-form loss for ``mode`` (also the function that ``compile`` compiles)."""
    lam = MODES[mode]["mix_lambda"]
    symmetric = MODES[mode]["symmetric"]

    def loss(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None) -> torch.Tensor:
        labels = torch.arange(a.shape[0], device=a.device)
        an, pn = F.normalize(a, dim=-1), F.normalize(p, dim=-1)
        cands = pn if n is None else torch.cat([pn, F.normalize(n, dim=-1)])
        logits = an @ cands.T / tau
        if symmetric:
            logits = logits.float()
            return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        if lam is not None:
            mix3 = F.normalize(_mix(p, lam), dim=-1)
            mix4 = F.normalize(_mix(a, lam), dim=-1)
            block3 = _zero_shifted(an @ mix3.T / tau, -1)  # (i, i-1) holds row i's own positive
            block4 = _zero_shifted(mix4 @ pn.T / tau, 1)
            logits = torch.cat([logits, block3, block4], dim=1)
        return F.cross_entropy(logits.float(), labels)

    return loss


def simcse_orig_loss(mode: str, tau: float = TEMPERATURE) -> LossFn:
    """SimCSE's / MixCSE's original broadcasting cosine (``nn.CosineSimilarity`` on (N,1,D) x (1,M,D))."""
    lam = MODES[mode]["mix_lambda"]
    cos = torch.nn.CosineSimilarity(dim=-1)
    sim = lambda x, y: cos(x.unsqueeze(1), y.unsqueeze(0)) / tau

    def loss(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None) -> torch.Tensor:
        labels = torch.arange(a.shape[0], device=a.device)
        blocks = [sim(a, p)]
        if n is not None:
            blocks.append(sim(a, n))  # + z3_weight (0) on the diagonal
        if lam is not None:
            blocks.append(_zero_shifted(sim(a, _mix(p, lam)), -1))
            blocks.append(_zero_shifted(sim(_mix(a, lam), p), 1))
        logits = torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]
        return F.cross_entropy(logits.float(), labels)

    return loss


def _st_losses():
    """sentence-transformers' loss classes, or None when it is not installed."""
    if importlib.util.find_spec("sentence_transformers") is None:
        return None
    try:  # sentence-transformers >= 6 moved the losses; the old path warns
        mod = importlib.import_module("sentence_transformers.sentence_transformer.losses")
    except ImportError:
        mod = importlib.import_module("sentence_transformers.losses")
    return mod.MultipleNegativesRankingLoss, mod.CachedMultipleNegativesRankingLoss


def _stub_model() -> torch.nn.Module:
    """A placeholder for the loss classes' ``model`` argument: the loss runs on given embeddings."""
    return torch.nn.Sequential(torch.nn.Identity())


def _st_kwargs(symmetric: bool) -> dict:
    kw = dict(scale=1.0 / TEMPERATURE)
    if symmetric:
        kw.update(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
    return kw


def st_mnrl_loss(mode: str) -> tuple[LossFn, str]:
    """MultipleNegativesRankingLoss on embeddings; returns (fn, which code path)."""
    mnrl_cls, _ = _st_losses()
    symmetric = MODES[mode]["symmetric"]
    module = mnrl_cls(_stub_model(), **_st_kwargs(symmetric))
    if hasattr(module, "compute_loss_from_embeddings"):
        def loss(a, p, n):
            embs = [a, p] if n is None else [a, p, n]
            return module.compute_loss_from_embeddings(embs, None)

        return loss, "MultipleNegativesRankingLoss.compute_loss_from_embeddings (their code)"
    from sentence_transformers.util import cos_sim

    def loss_reproduced(a, p, n):  # their formula (sentence-transformers < 3.x path)
        cands = p if n is None else torch.cat([p, n])
        return F.cross_entropy(cos_sim(a, cands) * module.scale, torch.arange(a.shape[0], device=a.device))

    return loss_reproduced, "formula reproduced: cross_entropy(cos_sim(a, c) * scale, arange)"


def st_cmnrl_loss(mode: str, backward: bool) -> tuple[LossFn, str]:
    """CachedMultipleNegativesRankingLoss's loss step on cached embeddings; returns (fn, code path).

    With ``backward`` its ``calculate_loss(..., with_backward=True)`` backpropagates each
    mini-batch into the embeddings itself (the returned loss is detached).
    """
    _, cmnrl_cls = _st_losses()
    symmetric = MODES[mode]["symmetric"]
    module = cmnrl_cls(_stub_model(), mini_batch_size=CMNRL_MINI_BATCH, **_st_kwargs(symmetric))

    def loss(a, p, n):
        cols = [a, p] if n is None else [a, p, n]
        reps = [list(t.split(CMNRL_MINI_BATCH)) for t in cols]
        return module.calculate_loss(reps, with_backward=backward)

    return loss, f"CachedMultipleNegativesRankingLoss.calculate_loss (their code, mini_batch_size={CMNRL_MINI_BATCH})"


def _infcl_head_dim(d: int) -> int | None:
    for hd in (256, 128, 64, 32, 16):
        if d % hd == 0:
            return hd
    return None


def infcl_loss(mode: str, d: int) -> LossFn:
    """Inf-CL's ``cal_inf_loss`` on normalized inputs, 1/tau folded into the queries."""
    from inf_cl import cal_inf_loss

    hd = _infcl_head_dim(d)
    symmetric = MODES[mode]["symmetric"]

    def loss(a, p, n):
        an, pn = F.normalize(a, dim=-1), F.normalize(p, dim=-1)
        cands = pn if n is None else torch.cat([pn, F.normalize(n, dim=-1)])
        out = cal_inf_loss(an / TEMPERATURE, cands, head_dim=hd)
        if symmetric:
            out = 0.5 * (out + cal_inf_loss(pn / TEMPERATURE, an, head_dim=hd))
        return out

    return loss


def ours_loss(mode: str, backend: str) -> LossFn:
    """``simcse_kernels.fused_info_nce`` with ``backend`` (``check_inputs=False``: no NaN scan/sync)."""
    from simcse_kernels import fused_info_nce

    opts = MODES[mode]

    def loss(a, p, n):
        return fused_info_nce(a, p, n, temperature=TEMPERATURE, symmetric=opts["symmetric"],
                              mix_lambda=opts["mix_lambda"], backend=backend, check_inputs=False)

    return loss


# --------------------------------------------------------------------------------------------------
# provider registry


@dataclass
class Provider:
    """One benchmarked implementation.

    Attributes:
        name: short id (CSV ``provider`` column); label: legend text; kind: "baseline" or "ours".
        modes: the modes it can compute (others are reported "n/a").
    """

    name: str
    label: str
    kind: str
    modes: tuple[str, ...] = tuple(MODES)
    _compiled: dict = field(default_factory=dict, repr=False)

    def unavailable_reason(self, device: torch.device, d: int | None = None) -> str | None:
        """None when it can run on ``device`` (dim ``d``), else why not."""
        if self.name in ("st_mnrl", "st_cmnrl"):
            return None if _st_losses() is not None else "sentence-transformers is not installed"
        if self.name == "infcl":
            if device.type != "cuda":
                return "Inf-CL is CUDA-only"
            if importlib.util.find_spec("inf_cl") is None:
                return "inf_cl is not installed"
            if d is not None and _infcl_head_dim(d) is None:
                return f"Inf-CL needs D divisible by 16 (D={d})"
            return None
        if self.name in OURS:
            import simcse_kernels

            if self.name not in simcse_kernels.available_backends(device):
                from simcse_kernels.backends import unavailable_reason

                return unavailable_reason(self.name, device) or f"not in available_backends({device})"
        return None

    def supports(self, mode: str) -> bool:
        return mode in self.modes

    def code_path(self, mode: str) -> str:
        """Which code runs (recorded in the results' notes)."""
        if self.name == "st_mnrl":
            return st_mnrl_loss(mode)[1]
        if self.name == "st_cmnrl":
            return st_cmnrl_loss(mode, False)[1]
        return self.label

    def make(self, mode: str, backward: bool, d: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None],
                                                                   torch.Tensor]:
        """A callable ``(a, p, n) -> detached scalar loss``; runs the backward too when ``backward``.

        Inputs must be leaves with ``requires_grad`` for a backward run; their ``.grad`` are reset
        to None at each call so gradients never accumulate across repeats.
        """
        if self.name == "st_cmnrl":
            fn, _ = st_cmnrl_loss(mode, backward)

            def run_cached(a, p, n):
                _clear_grads(a, p, n)
                return fn(a, p, n).detach()

            return run_cached
        fn = self._loss_fn(mode, d)
        if not backward:
            def run_fwd(a, p, n):
                return fn(a, p, n).detach()

            return run_fwd

        def run_fwdbwd(a, p, n):
            _clear_grads(a, p, n)
            loss = fn(a, p, n)
            loss.backward()
            return loss.detach()

        return run_fwdbwd

    def _loss_fn(self, mode: str, d: int) -> LossFn:
        if self.name == "naive":
            return naive_loss(mode)
        if self.name == "simcse_orig":
            return simcse_orig_loss(mode)
        if self.name == "compile":
            if mode not in self._compiled:
                self._compiled[mode] = torch.compile(naive_loss(mode), dynamic=True)
            return self._compiled[mode]
        if self.name == "st_mnrl":
            return st_mnrl_loss(mode)[0]
        if self.name == "infcl":
            return infcl_loss(mode, d)
        if self.name in OURS:
            return ours_loss(mode, self.name)
        raise ValueError(f"unknown provider {self.name!r}")


def _clear_grads(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None:
            t.grad = None


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("naive", "naive PyTorch (matmul + cross_entropy)", "baseline"),
        Provider("simcse_orig", "SimCSE original (broadcast CosineSimilarity)", "baseline",
                 ("unsup", "sup", "mixcse")),
        Provider("compile", "torch.compile(naive)", "baseline"),
        Provider("st_mnrl", "sentence-transformers MNRL", "baseline", ("unsup", "sup", "symmetric")),
        Provider("st_cmnrl", "sentence-transformers CachedMNRL", "baseline", ("unsup", "sup", "symmetric")),
        Provider("infcl", "Inf-CL cal_inf_loss", "baseline", ("unsup", "sup", "symmetric")),
        Provider("torch", "ours: torch chunked", "ours"),
        Provider("triton", "ours: triton", "ours"),
        Provider("cuda", "ours: cuda extension", "ours"),
    )
}


def estimated_bytes(name: str, mode: str, pass_: str, n: int, d: int, elem: int) -> int:
    """Rough, conservative estimate of the extra memory of one call (bytes), to skip runs that cannot fit.

    Args:
        name: provider; mode/pass_: what runs; n: batch; d: dim; elem: bytes per input element.
    """
    m = logit_columns(mode, n)
    logits = n * m
    feats = (n + m) * d * 4 * 4  # normalized copies + gradients, fp32
    bwd = pass_ == "fwdbwd"
    if name in ("naive", "compile", "st_mnrl"):
        per = (2 * elem + 4 * 4) if bwd else (elem + 4 * 2)
        return feats + logits * per
    if name == "simcse_orig":  # the (N, M, D) broadcast product and its normalized operands
        return feats + logits * d * max(elem, 4) * (8 if bwd else 4) + logits * 4 * 4
    if name == "st_cmnrl":
        return feats + CMNRL_MINI_BATCH * m * (elem + 4) * 6
    if name == "torch":  # row chunks of at most 512 full rows on CPU (256 MiB budget elsewhere)
        return feats + min(n, 512) * m * 4 * 2 + n * 4 * 8
    # fused (Triton, CUDA, Inf-CL): O((N + M) D) plus a bounded tile of logits
    return feats + min(logits, 1 << 21) * 4 * 6 + n * 4 * 8
