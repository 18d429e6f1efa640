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

One implementation, two call patterns: :func:`grad_cache_backward` runs the three steps at once
(``simcse-train``); :func:`deferred_grad_cache_loss` runs steps 1-2 and returns a loss whose
``.backward()`` runs step 3 (what a loss for a trainer that calls ``loss.backward()`` itself needs,
e.g. sentence-transformers' ``SentenceTransformerTrainer``). Both are model-agnostic: ``embed`` maps
one mini-batch (any object) to a tensor whose first dimension is the mini-batch's rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm


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


def _progress(items: Sequence, desc: str, show: bool) -> Iterable:
    return tqdm(items, desc=desc, leave=False) if show else items


def embed_without_grad(
    embed: Callable[[object], torch.Tensor],
    chunks: Sequence[object],
    *,
    cuda_devices: Sequence[int] = (),
    show_progress_bar: bool = False,
) -> tuple[list[torch.Tensor], list[RNGState]]:
    """Step 1: embed every mini-batch under ``torch.no_grad``, recording the RNG state before each.

    Args:
        embed: mini-batch -> (b, ...) embeddings.
        chunks: the mini-batches, in batch order.
        cuda_devices: CUDA devices whose RNG to record.
        show_progress_bar: show a tqdm bar over the mini-batches.

    Returns:
        (the detached embeddings of each mini-batch, the RNG state recorded before each).
    """
    states, reps = [], []
    with torch.no_grad():
        for chunk in _progress(chunks, "Embed mini-batches", show_progress_bar):
            states.append(RNGState(cuda_devices))
            reps.append(embed(chunk).detach())
    return reps, states


def replay_backward(
    embed: Callable[[object], torch.Tensor],
    chunks: Sequence[object],
    states: Sequence[RNGState],
    cached_grads: Sequence[torch.Tensor],
    *,
    grad_output: torch.Tensor | None = None,
    aux_loss: Callable[[object], torch.Tensor] | None = None,
    scale: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    show_progress_bar: bool = False,
) -> torch.Tensor | None:
    """Step 3: re-embed each mini-batch under its replayed RNG state and back-propagate its cached gradient.

    Args:
        embed: the function of step 1 (mini-batch -> (b, ...) embeddings).
        chunks: the mini-batches of step 1, in the same order.
        states: the RNG states recorded by step 1 (:func:`embed_without_grad`).
        cached_grads: d loss / d embeddings of each mini-batch, shaped like its embeddings.
        grad_output: optional 0-dim factor multiplied into every cached gradient (the gradient that
            reached the loss from outside: loss scaling, gradient-accumulation division).
        aux_loss: optional mini-batch -> () per-mini-batch mean loss, added with weight ``b / B``.
        scale: the loss scaling applied to ``aux_loss`` (e.g. ``GradScaler.scale``).
        show_progress_bar: show a tqdm bar over the mini-batches.

    Returns:
        The batch-weighted aux loss (detached), or None without ``aux_loss``.
    """
    total = sum(g.shape[0] for g in cached_grads)
    aux_total = None
    with torch.enable_grad():
        for chunk, state, g in _progress(list(zip(chunks, states, cached_grads)), "Replay mini-batches",
                                         show_progress_bar):
            with state.replay():
                r = embed(chunk)
                dt = torch.promote_types(r.dtype, torch.float32)  # fp32 for fp16/bf16, fp64 stays fp64
                g = g.to(dt) if grad_output is None else g.to(dt) * grad_output.to(dt)
                surrogate = (r.to(dt) * g).sum()
                if aux_loss is not None:
                    aux = aux_loss(chunk) * (r.shape[0] / total)
                    surrogate = surrogate + scale(aux)
                    aux_total = aux.detach() if aux_total is None else aux_total + aux.detach()
            if surrogate.requires_grad:  # a mini-batch of a frozen encoder has nothing to back-propagate
                surrogate.backward()
    return aux_total


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
    reps, states = embed_without_grad(embed, chunks, cuda_devices=cuda_devices)
    z = torch.cat(reps).requires_grad_(True)
    loss = loss_from_embeddings(z)
    scale(loss).backward()
    cached = z.grad.split([r.shape[0] for r in reps])
    aux_total = replay_backward(embed, chunks, states, cached, aux_loss=aux_loss, scale=scale)
    return loss.detach(), aux_total


def deferred_grad_cache_loss(
    embed: Callable[[object], torch.Tensor],
    chunks: Sequence[object],
    loss_from_embeddings: Callable[[torch.Tensor], torch.Tensor],
    *,
    cuda_devices: Sequence[int] = (),
    show_progress_bar: bool = False,
) -> torch.Tensor:
    """Steps 1-2 now; step 3 when the returned loss is back-propagated.

    With gradients disabled (evaluation) only step 1 and the loss run. Otherwise the loss and
    ``d loss / d embeddings`` are computed over the whole batch, and the returned 0-dim loss is a
    detached leaf with a hook: ``loss.backward()`` (or any backward that reaches it, scaled by
    whatever factor ``g`` the caller applied) runs :func:`replay_backward` with ``grad_output=g``,
    so parameter gradients are those of ``g · loss``. Every tensor the hook needs belongs to this
    call, so another forward before the backward cannot mix batches up.

    Args:
        embed: mini-batch -> (b, ...) embeddings.
        chunks: the mini-batches, in order; their embeddings are concatenated along dim 0.
        loss_from_embeddings: (B, ...) embeddings of the whole batch -> () loss. It must have no
            trainable parameters of its own (only ``d loss / d embeddings`` is cached).
        cuda_devices: CUDA devices whose RNG to record/replay.
        show_progress_bar: tqdm bars over the mini-batches of steps 1 and 3.

    Returns:
        The () loss; requires grad iff gradients were enabled.
    """
    grad_enabled = torch.is_grad_enabled()
    reps, states = embed_without_grad(embed, chunks, cuda_devices=cuda_devices,
                                      show_progress_bar=show_progress_bar)
    z = torch.cat(reps)
    if not grad_enabled:
        return loss_from_embeddings(z)
    z.requires_grad_(True)
    loss = loss_from_embeddings(z)
    (grad,) = torch.autograd.grad(loss, z)
    cached = grad.split([r.shape[0] for r in reps])
    del z, reps

    def _hook(grad_output: torch.Tensor) -> None:
        replay_backward(embed, chunks, states, cached, grad_output=grad_output,
                        show_progress_bar=show_progress_bar)

    out = loss.detach().requires_grad_(True)
    out.register_hook(_hook)
    return out
