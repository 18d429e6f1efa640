"""Cross-GPU negatives with ``torch.distributed`` (torchrun; NCCL on GPU, gloo on CPU).

Gradient accounting. Every rank computes a loss ``L_r`` from its local anchors and the candidates
gathered from all ranks with :func:`all_gather_with_grad`. The total objective is the mean
``L = (1/W) Σ_r L_r`` (equal per-rank batches). The gather's backward all-reduces (sums) the incoming
gradient over ranks and returns this rank's slice, so rank r's embeddings receive ``Σ_k ∂L_k/∂z_r``;
:func:`average_gradients` then divides the parameter gradients' sum over ranks by W (what DDP does),
which gives exactly ``∂L/∂θ``. The same two rules are right when each rank computes the *global* loss
(``L_r = L`` for all r, used for symmetric / MixCSE / anchor-negatives): the slice gets ``W ∂L/∂z_r``
and the average divides the W back out.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str, timeout_s: float = 600.0) -> torch.device:
    """Initialise the process group if launched by torchrun (``WORLD_SIZE`` > 1); NCCL on CUDA, gloo else.

    Args:
        device: "cuda" or "cpu" (the requested device type).
        timeout_s: how long a collective waits for a stuck rank before it fails (``--dist_timeout``).

    Returns:
        This process's device (``cuda:LOCAL_RANK`` under torchrun on GPU).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if device.startswith("cuda") and world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(device)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward all-reduces the gradient and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (n, D) of every rank in rank order -> (W*n, D), differentiable.

    Every rank must pass the same shape. Identity without a process group.
    """
    if not is_distributed():
        return x
    return _AllGatherWithGrad.apply(x)


def average_gradients(params) -> None:
    """All-reduce the ``.grad`` of ``params`` and divide by the world size (DDP's averaging)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """Average a detached scalar over ranks (for logging)."""
    if not is_distributed():
        return value
    v = value.detach().clone().float()
    dist.all_reduce(v, op=dist.ReduceOp.SUM)
    return v / dist.get_world_size()
