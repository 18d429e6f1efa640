"""Gradient caching: RNG replay is bitwise, and cached gradients equal uncached ones."""

from __future__ import annotations

import pytest
import torch

from simcse_kernels import FusedInfoNCE
from simcse_kernels.train.data import Collator, split_batch
from simcse_kernels.train.grad_cache import RNGState, grad_cache_backward
from simcse_kernels.train.model import SimCSEModel
from simcse_kernels.train.objective import contrastive_loss
from simcse_kernels.train.tiny import build_tiny_bert, build_tokenizer, build_vocab

SENTS = [f"sentence number {i} says the {w} is {c}." for i, (w, c) in
         enumerate(zip(["cat", "dog", "sky", "sea", "tree", "car", "sun"] * 3, ["red", "blue", "big", "odd"] * 6))]
# per-dtype tolerances for parameter gradients (atol relative to the largest |grad| of the tensor).
# float64: cached (mini-batch matmuls) and uncached (one big matmul) sum in different orders, and
# BLAS picks the order by thread count; the softmax-minus-onehot cancellation amplifies that
# round-off. Measured worst case: 3e-11 of a tensor's max |grad| (with 1 and with 2 threads),
# so atol is 1e-10 of it: >3x headroom, and still ~7 orders below any real gradient error.
PARAM_TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("tiny"), SENTS, hidden=32, layers=2, dropout=0.1)


def _model(tiny_dir, dtype, pooler="cls", dropout=None, **loss_kw):
    kw = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    torch.manual_seed(0)
    model = SimCSEModel.from_pretrained(str(tiny_dir), pooler=pooler, loss_fn=FusedInfoNCE(**loss_kw), **kw)
    return model.to(dtype).train()


def _batch(tiny_dir, n, views=2):
    tok = build_tokenizer(build_vocab(SENTS))
    examples = [tuple(SENTS[(i + v * 5) % len(SENTS)] for v in range(views)) for i in range(n)]
    return Collator(tok, max_length=16)(examples)


def _embed(model):
    def embed(chunk):
        z = model(chunk["input_ids"], chunk["attention_mask"], chunk.get("token_type_ids"))
        return z.view(-1, chunk["n_views"], z.shape[-1])
    return embed


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(actual, expected, dtype):
    assert actual.keys() == expected.keys() and len(expected) > 10
    tol = PARAM_TOL[dtype]
    # gradients that are zero in exact arithmetic (attention key biases) are compared on the model's scale
    floor = 1e-6 * max(g.abs().max().item() for g in expected.values())
    for name, g in expected.items():
        scale = max(g.abs().max().item(), floor)
        torch.testing.assert_close(actual[name], g, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=name)


def test_rng_replay_reproduces_dropout_bitwise(tiny_dir):
    model = _model(tiny_dir, torch.float32, dropout=0.3)
    batch = _batch(tiny_dir, 6)
    embed = _embed(model)
    state = RNGState()
    first = embed(batch)
    second = embed(batch)
    assert not torch.equal(first, second), "dropout should differ without replay"
    with state.replay():
        replayed = embed(batch)
    assert torch.equal(first, replayed)
    # the surrounding stream is untouched by the replay: the next draw continues after `second`
    torch.manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    with state.replay():
        embed(batch)
    assert torch.equal(torch.rand(3), a)


def test_rng_replay_dropout_masks_bitwise():
    drop = torch.nn.Dropout(0.5)
    x = torch.ones(64, 33)
    state = RNGState()
    mask = drop(x) != 0
    with state.replay():
        assert torch.equal(drop(x) != 0, mask)


def _max_rel_err(actual, expected):
    floor = 1e-6 * max(g.abs().max().item() for g in expected.values())
    return max(((actual[k].double() - g.double()).abs().max() / max(g.abs().max().item(), floor)).item()
               for k, g in expected.items())


def _uncached(tiny_dir, dtype, batch, loss_kw):
    model = _model(tiny_dir, dtype, dropout=0.0, **loss_kw)
    loss = contrastive_loss(_embed(model)(batch), model.loss_fn)
    loss.backward()
    return loss.detach(), _grads(model)


def _cached(tiny_dir, dtype, batch, loss_kw, chunk=3):
    model = _model(tiny_dir, dtype, dropout=0.0, **loss_kw)
    loss, _ = grad_cache_backward(_embed(model), split_batch(batch, chunk), lambda z: contrastive_loss(z, model.loss_fn))
    return loss, _grads(model)


LOSS_CASES = [(2, {}), (3, {"hard_negative_weight": 0.5}), (2, {"symmetric": True, "mix_lambda": 0.2})]


@pytest.mark.parametrize("views,loss_kw", LOSS_CASES)
def test_cached_equals_uncached_float64(tiny_dir, views, loss_kw):
    batch = _batch(tiny_dir, 7, views)
    loss_ref, grads_ref = _uncached(tiny_dir, torch.float64, batch, loss_kw)
    loss, grads = _cached(tiny_dir, torch.float64, batch, loss_kw)
    torch.testing.assert_close(loss, loss_ref, **PARAM_TOL[torch.float64])
    _assert_grads_close(grads, grads_ref, torch.float64)


@pytest.mark.parametrize("views,loss_kw", LOSS_CASES)
def test_cached_float32_as_accurate_as_uncached(tiny_dir, views, loss_kw):
    """In float32 both paths round differently; against the float64 oracle the cached gradients must be
    as accurate as the uncached ones (this tiny random encoder maps all sentences close together, so
    the contrastive gradient cancels heavily and float32 itself is only ~1e-2 accurate here)."""
    batch = _batch(tiny_dir, 7, views)
    loss64, grads64 = _uncached(tiny_dir, torch.float64, batch, loss_kw)
    loss_u, grads_u = _uncached(tiny_dir, torch.float32, batch, loss_kw)
    loss_c, grads_c = _cached(tiny_dir, torch.float32, batch, loss_kw)
    torch.testing.assert_close(loss_c.double(), loss64, **PARAM_TOL[torch.float32])
    err_u, err_c = _max_rel_err(grads_u, grads64), _max_rel_err(grads_c, grads64)
    assert err_c <= 3.0 * err_u + PARAM_TOL[torch.float32]["rtol"], (err_c, err_u)


def test_cached_equals_chunked_autograd_with_dropout(tiny_dir):
    """With dropout on, the cached step equals one autograd graph over the same mini-batches and masks."""
    dtype = torch.float64
    batch = _batch(tiny_dir, 8)
    chunks = split_batch(batch, 3)
    ref = _model(tiny_dir, dtype, dropout=0.2, learnable_temperature=True)
    cached = _model(tiny_dir, dtype, dropout=0.2, learnable_temperature=True)
    torch.manual_seed(7)
    z = torch.cat([_embed(ref)(c) for c in chunks])
    loss_ref = contrastive_loss(z, ref.loss_fn)
    loss_ref.backward()
    torch.manual_seed(7)
    loss, _ = grad_cache_backward(_embed(cached), chunks, lambda z: contrastive_loss(z, cached.loss_fn))
    torch.testing.assert_close(loss, loss_ref.detach(), **PARAM_TOL[dtype])
    grads = _grads(cached)
    assert "loss_fn.log_temperature" in grads
    _assert_grads_close(grads, _grads(ref), dtype)
