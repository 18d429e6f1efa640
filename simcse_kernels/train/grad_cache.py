"""Gradient caching (the GradCache idea of Gao et al. 2021, written here) with exact RNG replay.

A contrastive loss couples every example of the batch, so the batch cannot simply be split into
accumulation steps. Gradient caching splits the *encoder* work instead:

1. embed each mini-batch without autograd, recording the RNG state (CPU + every CUDA device)
   before it, so dropout can be replayed;
2. compute the loss on the concatenated embeddings and ``d loss / d embeddings`` (the cache);
   parameters of the loss itself (a learnable temperature) get their gradient here;
3. re-embed each mini-batch with autograd under its replayed RNG state — the same dropout masks,
   hence bitwise the same embeddings — and backpropagate ``<embeddings, cached grad>``.

The parameter gradients equal those of one big forward/backward whose dropout masks are the
mini-batches' (up to float summation order). Peak activation memory is one mini-batch's.
Per-mini-batch auxiliary losses (SimCSE's MLM) are added in step 3 with weight ``chunk / batch``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch


class RNGState:
    """Snapshot of the CPU RNG and the RNG of each given CUDA device, replayable with :meth:`replay`.

    Args:
        cuda_devices: CUDA device indices whose generators to record (empty on CPU).
    """

    def __init__(self, cuda_devices: Sequence[int] = ()) -> None:
        self.cuda_devices = list(cuda_devices)
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]

    @contextmanager
    def replay(self):
        """Run the body with the recorded states; the surrounding RNG state is restored afterwards."""
        with torch.random.fork_rng(devices=self.cuda_devices):
            torch.set_rng_state(self.cpu)
            for d, state in zip(self.cuda_devices, self.cuda):
                torch.cuda.set_rng_state(state, d)
            yield


def cuda_devices_of(module: torch.nn.Module) -> list[int]:
    """CUDA device indices holding parameters of ``module`` (whose RNG dropout uses)."""
    return sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})


def grad_cache_backward(
    embed: Callable[[dict], torch.Tensor],
    chunks: Sequence[dict],
    loss_from_embeddings: Callable[[torch.Tensor], torch.Tensor],
    *,
    cuda_devices: Sequence[int] = (),
    aux_loss: Callable[[dict], torch.Tensor] | None = None,
    scale: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One cached forward/backward over ``chunks``; parameter ``.grad`` are accumulated.

    Args:
        embed: mini-batch -> (b, V, H) embeddings (called under autocast by the caller if wanted).
        chunks: the mini-batches, in batch order.
        loss_from_embeddings: (B, V, H) embeddings of the whole batch -> () loss.
        cuda_devices: CUDA devices whose RNG to record/replay.
        aux_loss: optional mini-batch -> () per-mini-batch mean loss (already weighted), added with
            weight ``b / B``.
        scale: the loss scaling applied before backward (e.g. ``GradScaler.scale``); the cached
            embedding gradient is already scaled, so step 3 only scales ``aux_loss``.

    Returns:
        (the contrastive loss, the batch-weighted aux loss or None), both detached.
    """
    states, reps = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RNGState(cuda_devices))
            reps.append(embed(chunk))
    z = torch.cat(reps).detach().requires_grad_(True)
    loss = loss_from_embeddings(z)
    scale(loss).backward()
    cached = z.grad.split([r.shape[0] for r in reps])
    total = z.shape[0]
    aux_total = None
    for chunk, state, g in zip(chunks, states, cached):
        with state.replay():
            r = embed(chunk)
            dt = torch.promote_types(r.dtype, torch.float32)  # fp32 for fp16/bf16, fp64 stays fp64
            surrogate = (r.to(dt) * g.to(dt)).sum()
            if aux_loss is not None:
                aux = aux_loss(chunk) * (r.shape[0] / total)
                surrogate = surrogate + scale(aux)
                aux_total = aux.detach() if aux_total is None else aux_total + aux.detach()
        surrogate.backward()
    return loss.detach(), aux_total
