"""--objective distill_mse / distill_contrastive (--teacher, --teacher_bank) and amsoftmax (--views, --margin,
--angular_margin, --class_init): each step's loss equals the objective written out by hand, the teacher table is
the teacher's simcse-eval embeddings and is cached, gradient caching gives the uncached gradients."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TRAIN_SENTS, tiny_model_and_corpus

from simcse_kernels.train import checkpoint as ckpt
from simcse_kernels.train.cli import train_main
from simcse_kernels.train.data import TOKEN_KEYS
from simcse_kernels.train.errors import UsageError
from simcse_kernels.train.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectives")
    model_dir, corpus = tiny_model_and_corpus(root)
    return model_dir, corpus, root


def _trainer(tiny, tmp_path, **kw) -> Trainer:
    model_dir, corpus, root = tiny
    base = dict(model=str(model_dir), train_file=str(corpus), output_dir=str(tmp_path / "out"), batch_size=8,
                max_steps=3, eval_every=None, progress=False, max_length=16, no_dropout=True,
                cache_dir=str(root / "cache"), lr=1e-3)
    return Trainer(TrainConfig(**{**base, **kw}))


def _embed(trainer, sentences):
    """Training-mode embeddings of ``sentences`` (dropout is off: --no_dropout)."""
    enc = trainer.tokenizer(sentences, padding=True, truncation=True, max_length=trainer.cfg.max_length,
                            return_tensors="pt")
    trainer.model.train()
    return trainer.model(**{k: enc[k] for k in TOKEN_KEYS if k in enc})


def _step_loss(trainer) -> float:
    rec = trainer.train_step()
    trainer.release_lock()
    return rec["loss"]


def _teacher_reference(model_dir, max_length=128):
    from transformers import AutoTokenizer

    teacher = ckpt.load_exported(str(model_dir))  # the pooling simcse-eval uses (cls_before_pooler here)
    return teacher.embed_sentences(AutoTokenizer.from_pretrained(model_dir), TINY_TRAIN_SENTS, max_length=max_length)


@pytest.mark.parametrize("encoder", ["textcnn", "transformer"])
def test_distill_mse_is_sentence_transformers_mse(tiny, tmp_path, encoder):
    model_dir = tiny[0]
    kw = {"cnn_dim": 10} if encoder == "textcnn" else {}  # 10 != teacher 16: a learned projection
    trainer = _trainer(tiny, tmp_path, encoder=encoder, objective="distill_mse", teacher=str(model_dir), **kw)
    torch.testing.assert_close(trainer.teacher, _teacher_reference(model_dir))
    idx = trainer.order.indices(0)
    with torch.no_grad():
        s = _embed(trainer, [TINY_TRAIN_SENTS[i] for i in idx])
        proj = getattr(trainer.model, "distill_projection", None)
        assert (proj is not None) == (encoder == "textcnn")
        s = proj(s) if proj is not None else s
        expected = ((s - trainer.teacher[idx]) ** 2).mean()  # MSELoss: mean over all B x D entries
    assert _step_loss(trainer) == pytest.approx(float(expected), rel=1e-6)
    assert "distill_projection.weight" in trainer.model.state_dict() or encoder == "transformer"


@pytest.mark.parametrize("bank", [False, True], ids=["batch", "bank"])
def test_distill_contrastive_candidates(tiny, tmp_path, bank):
    model_dir = tiny[0]
    trainer = _trainer(tiny, tmp_path, encoder="textcnn", cnn_widths="1,3", cnn_maps=8,
                       objective="distill_contrastive", teacher=str(model_dir), teacher_bank=bank, temperature=0.1)
    assert trainer.model.embedding_dim == trainer.teacher.shape[1]  # --cnn_dim defaults to the teacher's width
    idx = trainer.order.indices(0)
    with torch.no_grad():
        s = F.normalize(_embed(trainer, [TINY_TRAIN_SENTS[i] for i in idx]).double(), dim=1)
        t = F.normalize(trainer.teacher.double(), dim=1)
        if bank:
            expected = F.cross_entropy(s @ t.T / 0.1, torch.tensor(idx))
        else:
            expected = F.cross_entropy(s @ t[idx].T / 0.1, torch.arange(len(idx)))
    assert _step_loss(trainer) == pytest.approx(float(expected), rel=1e-5)


# With --class_init encoder and no dropout every view equals its class row (cosine 1), where ArcFace's
# acos is ill-conditioned in float32 (an fp32 rounding of c near 1 moves theta by ~1e-4): the arc case
# starts from random class weights.
@pytest.mark.parametrize("margin,angular,init", [(None, None, "encoder"), (0.2, 0.3, "random")],
                         ids=["default_margin", "margin_and_arc"])
def test_amsoftmax_views_against_class_weights(tiny, tmp_path, margin, angular, init):
    kw = {k: v for k, v in (("margin", margin), ("angular_margin", angular)) if v is not None}
    trainer = _trainer(tiny, tmp_path, encoder="textcnn", cnn_widths="1,3", cnn_maps=8, objective="amsoftmax",
                       views=3, temperature=0.05, class_init=init, **kw)
    w = trainer.model.class_weights
    assert w.shape == (len(TINY_TRAIN_SENTS), trainer.model.embedding_dim)
    initial = w.detach().clone()
    if init == "encoder":
        torch.testing.assert_close(initial, trainer.model.embed_sentences(trainer.tokenizer, TINY_TRAIN_SENTS,
                                                                          max_length=16))
    idx = trainer.order.indices(0)
    m, a = (0.35 if margin is None else margin), (angular or 0.0)
    with torch.no_grad():
        # the 3 views of one sentence are identical without dropout; each is labelled with its sentence
        v = F.normalize(_embed(trainer, [TINY_TRAIN_SENTS[i] for i in idx for _ in range(3)]).double(), dim=1)
        cos = v @ F.normalize(w.double(), dim=1).T
        labels = torch.tensor(idx).repeat_interleave(3)
        target = cos.gather(1, labels[:, None])
        if a:  # ArcFace as reference.py defines it (the clamp matters: these views equal their class rows)
            c = target.clamp(-1 + 1e-7, 1 - 1e-7)
            theta = torch.acos(c)
            target = torch.where(theta <= math.pi - a, torch.cos(theta + a), c - a * math.sin(a))
        shifted = target - m
        logits = cos.scatter(1, labels[:, None], shifted) / 0.05
        expected = F.cross_entropy(logits, labels)
    assert _step_loss(trainer) == pytest.approx(float(expected), rel=1e-5)
    assert not torch.equal(trainer.model.class_weights.detach(), initial)  # trained by the optimizer


def test_class_init_random_is_seeded_and_weights_are_not_exported(tiny, tmp_path):
    a = _trainer(tiny, tmp_path / "a", objective="amsoftmax", class_init="random", encoder="textcnn")
    b = _trainer(tiny, tmp_path / "b", objective="amsoftmax", class_init="random", encoder="textcnn")
    assert torch.equal(a.model.class_weights, b.model.class_weights)
    assert a.model.class_weights.std().item() == pytest.approx(1.0, abs=0.1)
    a.release_lock()
    b.fit()
    b.release_lock()
    final = tmp_path / "b" / "out" / "final"
    from safetensors.torch import load_file

    keys = [k for f in final.rglob("*.safetensors") for k in load_file(f)]  # the export's sentence-transformers modules
    assert keys and not any("class" in k for k in keys) and not list(final.rglob("*.pt"))  # not exported


def test_teacher_table_is_cached(tiny, tmp_path, monkeypatch):
    model_dir, corpus, _ = tiny
    cache = tmp_path / "cache"
    first = _trainer(tiny, tmp_path / "1", objective="distill_mse", teacher=str(model_dir), cache_dir=str(cache))
    first.release_lock()
    (entry,) = (cache / "teacher").glob("*.pt")

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded although its embeddings are cached")

    monkeypatch.setattr(ckpt, "load_exported", no_teacher)
    second = _trainer(tiny, tmp_path / "2", objective="distill_mse", teacher=str(model_dir), cache_dir=str(cache))
    second.release_lock()
    assert torch.equal(first.teacher, second.teacher)
    # the student starts the same whether the teacher was loaded (drawing random numbers) or not
    for (name, p), q in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(p, q), name
    # another training file (same sentences, one more blank line): a new key, the teacher is needed again
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text() + "\n")
    with pytest.raises(UsageError, match="the teacher was loaded although its embeddings are cached"):
        _trainer(tiny, tmp_path / "3", objective="distill_mse", teacher=str(model_dir), cache_dir=str(cache),
                 train_file=str(other))
    assert len(list((cache / "teacher").glob("*.pt"))) == 1 and entry.is_file()


def test_a_teacher_that_does_not_load(tiny, tmp_path, capsys):
    model_dir, corpus, root = tiny
    bad = tmp_path / "bad_teacher"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "bert", "hidden_size": "not a number"}')
    out = tmp_path / "run"
    rc = train_main(["--model", str(model_dir), "--train_file", str(corpus), "--output_dir", str(out),
                     "--objective", "distill_mse", "--teacher", str(bad), "--batch_size", "8", "--no-progress",
                     "--cache_dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"simcse-train: error: --teacher {bad}: "), err
    assert not out.exists() and not (tmp_path / "cache").exists()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kw", [
    dict(encoder="textcnn", objective="simcse"),
    dict(encoder="textcnn", objective="distill_mse", cnn_dim=12),
    dict(encoder="textcnn", objective="distill_contrastive", teacher_bank=True),
    dict(encoder="transformer", objective="distill_contrastive", pooler="avg"),
    dict(encoder="textcnn", objective="amsoftmax", views=3, learnable_temperature=True),
    dict(encoder="transformer", objective="amsoftmax", views=2, angular_margin=0.2, pooler="avg"),
], ids=["textcnn_simcse", "textcnn_distill_mse_projection", "textcnn_distill_bank", "transformer_distill_batch",
        "textcnn_amsoftmax", "transformer_amsoftmax_arc"])
def test_grad_cache_equals_uncached_float64(tiny, tmp_path, kw):
    """The objective's own parameters (projection, class weights, temperature) get their gradient in the
    cached loss step; the encoder's come from the replay. float64 (the model and every objective tensor):
    the two paths differ only by summation order (see test_train_grad_cache.PARAM_TOL). The transformer cases
    pool with avg: the random tiny BERT's cls + MLP maps every sentence to nearly the same point (cosine spread
    2e-4), where the softmax-minus-onehot cancellation amplifies the summation-order round-off to 5e-10 of
    the largest gradient; with avg it is 1e-14 (textcnn: 1e-12)."""
    if kw["objective"].startswith("distill"):
        kw["teacher"] = str(tiny[0])
    grads = []
    for chunk in (None, 3):
        trainer = _trainer(tiny, tmp_path / str(chunk), grad_cache_chunk=chunk, **kw)
        trainer.release_lock()
        trainer.model.double()
        if trainer.teacher is not None:
            trainer.teacher = trainer.teacher.double()
        idx = trainer.order.indices(0)
        views = trainer._views_of([trainer.examples[i] for i in idx], idx)
        loss, _ = trainer.forward_backward(trainer.collate(views), idx)
        grads.append((loss, _grads(trainer.model)))
    (loss_ref, ref), (loss, got) = grads
    assert ref.keys() == got.keys() and len(ref) >= 5
    extra = {"distill_projection.weight", "class_weights", "loss_fn.log_temperature"} & set(ref)
    assert extra or kw["objective"] in ("simcse", "distill_contrastive")
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=0)
    floor = 1e-6 * max(g.abs().max().item() for g in ref.values())
    for name, g in ref.items():
        scale = max(g.abs().max().item(), floor)
        torch.testing.assert_close(got[name], g, rtol=1e-9, atol=1e-10 * scale, msg=name)


def test_distill_and_amsoftmax_train_and_resume_from_cli(tiny, tmp_path):
    """End to end through simcse-train: metrics, final/ export, and a checkpoint that holds the objective's
    parameters (class weights) and resumes."""
    model_dir, corpus, root = tiny
    out = tmp_path / "run"
    argv = ["--model", str(model_dir), "--train_file", str(corpus), "--output_dir", str(out), "--encoder", "textcnn",
            "--objective", "amsoftmax", "--views", "2", "--margin", "0.1", "--batch_size", "8", "--max_steps", "4",
            "--save_every", "2", "--log_every", "1", "--no-progress", "--eval_every", "none"]
    assert train_main(argv) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    state = torch.load(ckpt.latest_checkpoint(out) / "state.pt", weights_only=False)
    assert state["model"]["class_weights"].shape[0] == len(TINY_TRAIN_SENTS)
    assert (out / "final" / "textcnn_config.json").is_file() and (out / "final" / "modules.json").is_file()


def test_objective_flags_are_checked(tmp_path):
    base = dict(model="m", train_file="t.txt", output_dir=str(tmp_path / "o"))
    cases = [
        (dict(objective="triplet"), "--objective must be one of simcse, distill_mse, distill_contrastive, amsoftmax"),
        (dict(objective="distill_mse"), "--objective distill_mse needs --teacher MODEL"),
        (dict(teacher="x"), "--teacher applies to --objective distill_mse or distill_contrastive only"),
        (dict(objective="distill_mse", teacher="x", teacher_bank=True),
         "--teacher_bank applies to --objective distill_contrastive only"),
        (dict(objective="amsoftmax", views=1), "--views must be an integer >= 2"),
        (dict(views=4), "--views applies to --objective amsoftmax only"),
        (dict(objective="distill_mse", teacher="x", margin=0.2), "--margin applies to --objective simcse, "),
        (dict(objective="amsoftmax", margin=-0.1), "--margin must be a finite number >= 0"),
        (dict(objective="amsoftmax", angular_margin=4.0), "--angular_margin must be a number of radians in [0, pi)"),
        (dict(objective="amsoftmax", class_init="zeros"), "--class_init must be one of encoder, random"),
        (dict(class_init="random"), "--class_init applies to --objective amsoftmax only"),
        (dict(objective="amsoftmax", augment="crop:0.1"), "--augment applies to --objective simcse only"),
        (dict(objective="amsoftmax", symmetric=True), "--symmetric applies to --objective simcse only"),
        (dict(encoder="cnn"), "--encoder must be one of transformer, textcnn"),
        (dict(encoder="textcnn", do_mlm=True), "--do_mlm applies to --encoder transformer only"),
        (dict(encoder="textcnn", cnn_widths="3,x"), "--cnn_widths: expected comma-separated"),
        (dict(encoder="textcnn", cnn_dropout=1.0), "--cnn_dropout must be a number in [0, 1)"),
    ]
    for kw, message in cases:
        with pytest.raises(UsageError) as info:
            TrainConfig(**base, **kw).validate()
        assert message in str(info.value), (kw, str(info.value))
