"""Cross-rank negatives: 2 gloo processes on 127.0.0.1 give the single-process loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from simcse_kernels import FusedInfoNCE
from simcse_kernels.train.distributed import all_gather_with_grad, average_gradients
from simcse_kernels.train.objective import contrastive_loss

WORLD, N_LOCAL, D_IN, D = 2, 5, 12, 16
CASES = [
    ("unsup", 2, {}),
    ("sup_hard_negatives", 3, {"hard_negative_weight": 0.7}),
    ("symmetric", 2, {"symmetric": True}),
    ("mixcse", 2, {"mix_lambda": 0.3}),
    ("mixcse_sup", 3, {"mix_lambda": 0.2, "hard_negative_weight": 0.4}),
    ("learnable_temperature", 3, {"learnable_temperature": True, "temperature": 0.1}),
]


def _encoder_and_loss(loss_kw):
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(D_IN, D), torch.nn.Tanh(), torch.nn.Linear(D, D)).double()
    return enc, FusedInfoNCE(**loss_kw).double()


def _inputs(views):
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * N_LOCAL, views, D_IN, generator=g, dtype=torch.float64)


def _run(x, loss_kw):
    """Loss and the gradients of every parameter (encoder + loss) for inputs x (n, V, D_IN)."""
    enc, loss_fn = _encoder_and_loss(loss_kw)
    loss = contrastive_loss(enc(x), loss_fn)
    loss.backward()
    params = list(enc.parameters()) + list(loss_fn.parameters())
    average_gradients(params)
    return loss.detach(), [p.grad.clone() for p in params]


def _worker(rank, port, out_file):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = {}
    for name, views, loss_kw in CASES:
        x = _inputs(views)[rank * N_LOCAL : (rank + 1) * N_LOCAL]
        loss, grads = _run(x, loss_kw)
        losses = [torch.zeros_like(loss) for _ in range(WORLD)]
        dist.all_gather(losses, loss)
        results[name] = (torch.stack(losses), grads)
    # the gather itself: forward concatenates, backward sums the ranks' gradients and slices
    x = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)
    y = all_gather_with_grad(x)
    (y * torch.arange(1.0, 5.0, dtype=torch.float64).view(4, 1)).sum().backward()
    results["gather"] = (y.detach(), [x.grad])
    torch.save(results, f"{out_file}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "res"
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("name,views,loss_kw", CASES, ids=[c[0] for c in CASES])
def test_two_ranks_match_single_process(distributed_results, name, views, loss_kw):
    loss_ref, grads_ref = _run(_inputs(views), loss_kw)
    for rank in range(WORLD):
        rank_losses, grads = distributed_results[rank][name]
        # the objective is the mean of the ranks' losses (each rank's own anchors, or the global loss)
        torch.testing.assert_close(rank_losses.mean(), loss_ref, rtol=1e-12, atol=1e-12)
        assert len(grads) == len(grads_ref)
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_all_gather_with_grad(distributed_results):
    for rank in range(WORLD):
        y, (grad,) = distributed_results[rank]["gather"]
        torch.testing.assert_close(y, torch.tensor([1.0, 1, 2, 2], dtype=torch.float64).view(4, 1).expand(4, 3))
        # d/dx of sum_r sum_k w_k y_k: each rank contributes w of this rank's rows, summed over 2 ranks
        expected = 2.0 * torch.arange(1.0, 5.0, dtype=torch.float64)[rank * 2 : rank * 2 + 2].view(2, 1).expand(2, 3)
        torch.testing.assert_close(grad, expected)
