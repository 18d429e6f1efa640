"""Cross-rank negatives: 2 gloo processes on 127.0.0.1 give the single-process loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from simcse_kernels import FusedInfoNCE
from simcse_kernels.train.distributed import all_gather_with_grad, average_gradients
from simcse_kernels.train.objective import candidate_loss, contrastive_loss, distill_mse_loss

WORLD, N_LOCAL, D_IN, D = 2, 5, 12, 16
CASES = [
    ("unsup", 2, {}),
    ("sup_hard_negatives", 3, {"hard_negative_weight": 0.7}),
    ("symmetric", 2, {"symmetric": True}),
    ("mixcse", 2, {"mix_lambda": 0.3}),
    ("mixcse_sup", 3, {"mix_lambda": 0.2, "hard_negative_weight": 0.4}),
    ("learnable_temperature", 3, {"learnable_temperature": True, "temperature": 0.1}),
]


# The objectives that score queries against a fixed candidate table (teacher rows, class weights): each
# rank scores its own rows; ("name", views, loss options, kind)
OBJECTIVE_CASES = [
    ("distill_mse", 1, {}, "mse"),
    ("distill_contrastive_batch", 1, {"temperature": 0.1}, "batch"),
    ("distill_contrastive_bank", 1, {"temperature": 0.1, "margin": 0.1}, "bank"),
    ("amsoftmax", 3, {"temperature": 0.05, "margin": 0.35, "angular_margin": 0.1}, "classes"),
]


def _teacher_table():
    g = torch.Generator().manual_seed(2)
    return torch.randn(WORLD * N_LOCAL, D, generator=g, dtype=torch.float64)


def _run_objective(x, loss_kw, kind, offset):
    """Loss and parameter gradients of an OBJECTIVE_CASES objective for rows offset .. offset + n of the batch."""
    enc, loss_fn = _encoder_and_loss(loss_kw)
    n = x.shape[0]
    rows = torch.arange(offset, offset + n)
    table = _teacher_table()
    params = list(enc.parameters())
    z = enc(x)
    if kind == "mse":
        loss = distill_mse_loss(z[:, 0], table[rows])
    elif kind == "batch":  # the global batch's teacher rows; the own row is offset + i
        loss = candidate_loss(z[:, 0], table, rows, loss_fn)
    elif kind == "bank":
        loss = candidate_loss(z[:, 0], torch.cat([table, table.flip(0)]), rows, loss_fn)
    else:
        weights = torch.nn.Parameter(table.clone())
        params.append(weights)
        loss = candidate_loss(z.reshape(-1, D), weights, rows.repeat_interleave(z.shape[1]), loss_fn)
    loss.backward()
    average_gradients(params)
    return loss.detach(), [p.grad.clone() for p in params]


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
    for name, views, loss_kw, kind in OBJECTIVE_CASES:
        x = _inputs(views)[rank * N_LOCAL : (rank + 1) * N_LOCAL]
        loss, grads = _run_objective(x, loss_kw, kind, rank * N_LOCAL)
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


@pytest.mark.parametrize("name,views,loss_kw,kind", OBJECTIVE_CASES, ids=[c[0] for c in OBJECTIVE_CASES])
def test_two_ranks_match_single_process_candidate_objectives(distributed_results, name, views, loss_kw, kind):
    loss_ref, grads_ref = _run_objective(_inputs(views), loss_kw, kind, 0)
    for rank in range(WORLD):
        rank_losses, grads = distributed_results[rank][name]
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


# simcse-train itself on 2 gloo ranks: a TextCNN with each new objective logs the single-process losses
# (dropout off, so both runs see the same views; float32, ranks sum their gradients in another order).
TRAINER_CASES = {
    "textcnn_simcse_crop": dict(augment="crop:0.2"),
    "textcnn_distill_contrastive_batch": dict(objective="distill_contrastive", teacher="TINY"),
    "textcnn_distill_mse_bank_cache": dict(objective="distill_mse", teacher="TINY", grad_cache_chunk=2),
    "textcnn_amsoftmax_grad_cache": dict(objective="amsoftmax", views=2, grad_cache_chunk=2),
}


def _trainer_config(root, name, kw):
    from simcse_kernels.train.trainer import TrainConfig

    kw = {k: (str(root / "tiny") if v == "TINY" else v) for k, v in kw.items()}
    return TrainConfig(model=str(root / "tiny"), train_file=str(root / "corpus.txt"), output_dir=str(root / name),
                       encoder="textcnn", cnn_widths="1,3", cnn_maps=8, batch_size=8, max_steps=3, lr=1e-2,
                       log_every=1, eval_every=None, progress=False, no_dropout=True, cache_dir=str(root / "cache"),
                       device="cpu", **kw)


def _trainer_worker(rank, port, root):
    import os

    from simcse_kernels.train.trainer import train

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    for name, kw in TRAINER_CASES.items():
        train(_trainer_config(root, f"{name}-2ranks", kw))
    dist.destroy_process_group()


def _logged_losses(folder):
    import json

    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_trainer_on_two_ranks_logs_the_single_process_losses(tmp_path):
    from conftest import tiny_model_and_corpus

    from simcse_kernels.train.trainer import train

    tiny_model_and_corpus(tmp_path)
    for name, kw in TRAINER_CASES.items():
        train(_trainer_config(tmp_path, f"{name}-1rank", kw))
    mp.spawn(_trainer_worker, args=(free_port(), tmp_path), nprocs=WORLD, join=True)
    for name in TRAINER_CASES:
        single, two = _logged_losses(tmp_path / f"{name}-1rank"), _logged_losses(tmp_path / f"{name}-2ranks")
        assert len(single) == len(two) == 3, name
        # step 1 from the same weights; steps 2-3 after AdamW updates of gradients summed in another order
        torch.testing.assert_close(torch.tensor(two), torch.tensor(single), rtol=2e-5, atol=1e-6, msg=name)
