"""Training data: readers, deterministic resumable batch order, collation, masking; a sup-SimCSE run."""

from __future__ import annotations

import json
import math

import torch

from simcse_kernels.train.data import BatchOrder, Collator, mask_tokens, read_examples, split_batch
from simcse_kernels.train.tiny import build_tiny_bert, build_tokenizer, build_vocab
from simcse_kernels.train.trainer import TrainConfig, train

SENTS = ["a man plays guitar", "a man plays a guitar", "the cat sleeps", "a dog runs fast", "kids swim",
         "a woman cooks rice", "the sky is blue", "two men talk", "a bird flies", "the car is red"]


def _write_sup_csv(path, n=12):
    lines = ["sent0,sent1,hard_neg"]
    lines += [f'"{SENTS[i % 10]}, indeed",{SENTS[(i + 1) % 10]},{SENTS[(i + 5) % 10]}' for i in range(n)]
    path.write_text("\n".join(lines) + "\n")


def test_readers(tmp_path):
    txt = tmp_path / "wiki.txt"
    txt.write_text("first line\n\n  second line  \n")
    assert read_examples(txt) == [("first line", "first line"), ("second line", "second line")]
    csv_file = tmp_path / "nli.csv"
    _write_sup_csv(csv_file, 3)
    ex = read_examples(csv_file)
    assert ex[0] == (f"{SENTS[0]}, indeed", SENTS[1], SENTS[5]) and len(ex) == 3


def test_batch_order_is_a_function_of_seed_and_step():
    order = BatchOrder(10, 4, seed=3)
    assert order.batches_per_epoch == 2
    epoch0 = order.indices(0) + order.indices(1)
    assert len(set(epoch0)) == 8  # no repeats within an epoch, last partial batch dropped
    assert order.indices(2) != order.indices(0) or order.indices(3) != order.indices(1)  # reshuffled
    fresh = BatchOrder(10, 4, seed=3)
    assert [fresh.indices(s) for s in (3, 0, 2)] == [order.indices(s) for s in (3, 0, 2)]
    assert order.indices(1, rank=0, world_size=2) + order.indices(1, rank=1, world_size=2) == order.indices(1)


def test_collator_views_masking_and_split():
    tok = build_tokenizer(build_vocab(SENTS))
    examples = [(SENTS[i], SENTS[i + 1], SENTS[i + 2]) for i in range(5)]
    batch = Collator(tok, max_length=8, mlm_probability=0.3)(examples, seed=11)
    assert batch["n_views"] == 3 and batch["input_ids"].shape[0] == 15 and batch["input_ids"].shape[1] <= 8
    again = Collator(tok, max_length=8, mlm_probability=0.3)(examples, seed=11)
    assert torch.equal(batch["mlm_input_ids"], again["mlm_input_ids"])
    assert torch.equal(batch["mlm_labels"], again["mlm_labels"])
    first_views = tok([e[0] for e in examples], padding="max_length", max_length=batch["input_ids"].shape[1],
                      truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(batch["input_ids"][::3], first_views)
    chunks = split_batch(batch, 2)
    assert [c["input_ids"].shape[0] for c in chunks] == [6, 6, 3]
    assert torch.equal(torch.cat([c["mlm_labels"] for c in chunks]), batch["mlm_labels"])


def test_mask_tokens_rates():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (200, 40), generator=g)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    masked, labels = mask_tokens(ids, special, mask_id=4, vocab_size=50, generator=g, probability=0.15)
    chosen = labels != -100
    assert not chosen[:, 0].any() and torch.equal(labels[chosen], ids[chosen])
    assert abs(chosen.float().mean().item() - 0.15 * 39 / 40) < 0.01
    assert abs((masked[chosen] == 4).float().mean().item() - 0.8) < 0.03
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_sup_simcse_run_with_hard_negatives(tmp_path):
    model_dir = build_tiny_bert(tmp_path / "tiny", SENTS + ["indeed ,"])
    csv_file = tmp_path / "nli.csv"
    _write_sup_csv(csv_file, 24)
    out = tmp_path / "run"
    summary = train(TrainConfig(model=str(model_dir), train_file=str(csv_file), output_dir=str(out), batch_size=8,
                                max_steps=6, lr=1e-3, hard_negative_weight=0.5, pooler="avg", log_every=1,
                                eval_every=None, progress=False, threads=1))
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 6 and len(losses) == 6 and all(math.isfinite(v) for v in losses)
    # 3 views: batch of 8 anchors against 8 positives + 8 hard negatives; chance level is log(16)
    assert losses[0] < math.log(16) + 1.0
    assert (out / "final" / "1_Pooling" / "config.json").is_file()
