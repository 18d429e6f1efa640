"""A killed run, resumed from its last checkpoint, logs the same losses as an uninterrupted run (every encoder,
augmentation and objective: the objective's parameters, a distill projection or amsoftmax class weights, are in
the checkpoint)."""

from __future__ import annotations

import json

import pytest

from simcse_kernels.train.tiny import build_tiny_bert
from simcse_kernels.train.trainer import TrainConfig, Trainer, train

SENTS = [f"line {i}: the {a} {b} near the {c}." for i, (a, b, c) in enumerate(
    zip(["quick", "lazy", "small", "red"] * 10, ["fox", "dog", "bird", "cat", "cow"] * 8, ["river", "hill", "town"] * 14))]


class Killed(Exception):
    pass


def _losses(out_dir):
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.mark.parametrize("extra", [{}, {"grad_cache_chunk": 3, "do_mlm": True, "learnable_temperature": True},
                                   {"encoder": "textcnn", "cnn_widths": "1,3", "cnn_maps": 8, "grad_cache_chunk": 3},
                                   {"augment": "word_deletion:0.2"}, {"encoder": "textcnn", "augment": "crop:0.2"},
                                   {"encoder": "textcnn", "objective": "distill_mse", "teacher": "TINY", "cnn_dim": 8},
                                   {"objective": "distill_contrastive", "teacher": "TINY", "teacher_bank": True,
                                    "grad_cache_chunk": 3},
                                   {"encoder": "textcnn", "objective": "amsoftmax", "views": 3, "grad_cache_chunk": 3,
                                    "learnable_temperature": True, "angular_margin": 0.1}],
                         ids=["plain", "grad_cache_mlm_learnable_tau", "textcnn_grad_cache", "word_deletion",
                              "textcnn_crop", "textcnn_distill_mse_projection", "distill_bank_grad_cache",
                              "textcnn_amsoftmax_grad_cache"])
def test_resume_matches_uninterrupted(tmp_path, extra):
    model_dir = build_tiny_bert(tmp_path / "tiny", SENTS, hidden=32, layers=2)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTS) + "\n")
    extra = {k: (str(model_dir) if v == "TINY" else v) for k, v in extra.items()}  # the teacher: the tiny BERT
    if "teacher" in extra:
        extra["cache_dir"] = str(tmp_path / "cache")
    base = dict(model=str(model_dir), train_file=str(corpus), batch_size=8, max_steps=7, lr=1e-3, warmup_steps=2,
                log_every=1, save_every=3, eval_every=None, progress=False, max_length=16, **extra)
    train(TrainConfig(output_dir=str(tmp_path / "full"), **base))
    full = _losses(tmp_path / "full")
    assert sorted(full) == list(range(1, 8))

    def kill_at_5(rec):
        if rec["step"] == 5:
            raise Killed

    with pytest.raises(Killed):
        train(TrainConfig(output_dir=str(tmp_path / "killed"), **base), on_step=kill_at_5)
    assert (tmp_path / "killed" / "checkpoints" / "step-0000003" / "state.pt").is_file()
    trainer = Trainer(TrainConfig(output_dir=str(tmp_path / "killed"), **base))
    trainer.maybe_resume()
    assert trainer.step == 3
    trainer.fit()
    resumed = _losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 8))
    assert resumed == full  # exact: same batches, dropout masks, MLM masks, optimizer and LR state
    assert len(set(full.values())) == 7
