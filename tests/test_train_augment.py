"""--augment (SimCSE Table 1's discrete positives) and --no_dropout."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import tiny_model_and_corpus

from simcse_kernels.train.data import augment_sentence, parse_augment
from simcse_kernels.train.errors import UsageError
from simcse_kernels.train.trainer import TrainConfig, Trainer

WORDS = "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9".split()
SENT = " ".join(WORDS)


def test_parse_augment():
    assert parse_augment("crop:0.1") == ("crop", 0.1)
    assert parse_augment("word_deletion:0.25") == ("word_deletion", 0.25)
    assert parse_augment("delete_one_word") == ("delete_one_word", 0.0)
    for bad in ("crop", "crop:0", "crop:1", "crop:x", "word_deletion:-0.1", "delete_one_word:0.1", "shuffle:0.1",
                "", "crop:nan"):
        with pytest.raises(UsageError, match="--augment must be"):
            parse_augment(bad)


def test_crop_keeps_a_contiguous_span():
    rng = random.Random(0)
    starts = set()
    for _ in range(200):
        out = augment_sentence(SENT, "crop", 0.3, rng).split()
        assert len(out) == 7
        start = WORDS.index(out[0])
        assert out == WORDS[start : start + 7]
        starts.add(start)
    assert starts == {0, 1, 2, 3}  # every span position occurs


def test_word_deletion_rate():
    rng = random.Random(1)
    kept = [len(augment_sentence(SENT, "word_deletion", 0.2, rng).split()) for _ in range(2000)]
    mean_deleted = 10 - sum(kept) / len(kept)
    assert abs(mean_deleted - 2.0) < 0.15  # binomial(10, 0.2): sd of the mean 0.028
    out = augment_sentence(SENT, "word_deletion", 0.5, random.Random(3)).split()
    assert out == [w for w in WORDS if w in out]  # order kept
    assert augment_sentence("a b", "word_deletion", 0.999, random.Random(0)) in ("a", "b")  # never empty


def test_delete_one_word():
    rng = random.Random(2)
    dropped = set()
    for _ in range(300):
        out = augment_sentence(SENT, "delete_one_word", 0.0, rng).split()
        assert len(out) == 9
        (missing,) = set(WORDS) - set(out)
        dropped.add(missing)
    assert dropped == set(WORDS)
    assert augment_sentence("alone", "delete_one_word", 0.0, rng) == "alone"


def _cfg(root, model_dir, corpus, **kw):
    return TrainConfig(model=str(model_dir), train_file=str(corpus), output_dir=str(root / "out"), batch_size=8,
                       max_steps=2, eval_every=None, progress=False, max_length=16, **kw)


def test_positive_view_is_augmented_anchor_is_not(tmp_path, monkeypatch):
    model_dir, corpus = tiny_model_and_corpus(tmp_path)
    trainer = Trainer(_cfg(tmp_path, model_dir, corpus, augment="delete_one_word"))
    seen = []
    original = trainer.collate.__call__
    monkeypatch.setattr(type(trainer.collate), "__call__",
                        lambda self, examples, seed=0: seen.append(examples) or original(examples, seed))
    trainer.train_step()
    trainer.release_lock()
    (examples,) = seen
    for anchor, positive in examples:
        assert any(anchor == ex[0] for ex in trainer.examples)
        assert len(positive.split()) == len(anchor.split()) - 1


def test_no_dropout_makes_the_encoder_deterministic(tmp_path):
    model_dir, corpus = tiny_model_and_corpus(tmp_path)
    for encoder in ("transformer", "textcnn"):
        trainer = Trainer(TrainConfig(model=str(model_dir), train_file=str(corpus), output_dir=str(tmp_path / encoder),
                                      batch_size=8, eval_every=None, progress=False, encoder=encoder,
                                      no_dropout=True))
        trainer.model.train()
        ids = torch.randint(5, 30, (4, 9))
        mask = torch.ones_like(ids)
        assert torch.equal(trainer.model(ids, mask), trainer.model(ids, mask))
        trainer.release_lock()


def test_augment_needs_a_text_file(tmp_path):
    csv = tmp_path / "sup.csv"
    csv.write_text("sent0,sent1\na b,c d\n")
    with pytest.raises(UsageError, match="--augment makes unsup positives"):
        TrainConfig(model="m", train_file=str(csv), output_dir=str(tmp_path / "o"), augment="crop:0.1").validate()


def test_metrics_differ_by_augmentation(tmp_path):
    """Each augmentation changes the training losses (the positives differ), reproducibly."""
    model_dir, corpus = tiny_model_and_corpus(tmp_path)
    from simcse_kernels.train.trainer import train

    def losses(name, **kw):
        out = tmp_path / name
        train(TrainConfig(model=str(model_dir), train_file=str(corpus), output_dir=str(out), batch_size=8,
                          max_steps=2, log_every=1, eval_every=None, progress=False, **kw))
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    plain = losses("plain")
    crop = losses("crop", augment="crop:0.3")
    assert crop != plain and losses("crop_again", augment="crop:0.3") == crop
