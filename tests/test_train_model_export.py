"""Poolers follow SimCSE's definitions; exports load in transformers and sentence-transformers."""

from __future__ import annotations

import pytest
import torch

from simcse_kernels.train.checkpoint import export_model, load_exported
from simcse_kernels.train.model import SimCSEModel
from simcse_kernels.train.pooling import pool
from simcse_kernels.train.tiny import build_tiny_bert

SENTS = ["a man is playing a guitar .", "the cat sleeps", "two dogs run on the beach near the water .",
         "a woman slices an onion .", "rain"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("tiny"), SENTS, hidden=32, layers=3)


def test_pool_definitions():
    g = torch.Generator().manual_seed(0)
    hs = tuple(torch.randn(3, 5, 4, generator=g, dtype=torch.float64) for _ in range(4))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    mean = lambda h: torch.stack([h[b, : int(mask[b].sum())].mean(0) for b in range(3)])
    torch.testing.assert_close(pool("cls", mask, hs[-1], hs), hs[-1][:, 0])
    torch.testing.assert_close(pool("cls_before_pooler", mask, hs[-1], hs), hs[-1][:, 0])
    torch.testing.assert_close(pool("avg", mask, hs[-1], hs), mean(hs[-1]))
    torch.testing.assert_close(pool("avg_top2", mask, hs[-1], hs), (mean(hs[-1]) + mean(hs[-2])) / 2)
    torch.testing.assert_close(pool("avg_first_last", mask, hs[-1], hs), (mean(hs[0]) + mean(hs[-1])) / 2)
    with pytest.raises(ValueError, match="unknown pooler"):
        pool("max", mask, hs[-1], hs)


def test_mlp_head_modes(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    enc = tok(SENTS, padding=True, return_tensors="pt")
    for mlp_only_train in (False, True):
        model = SimCSEModel.from_pretrained(str(tiny_dir), pooler="cls", mlp_only_train=mlp_only_train).eval()
        with torch.no_grad():
            cls = model.encoder(**enc).last_hidden_state[:, 0]
            out = model(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
        expected = cls if mlp_only_train else torch.tanh(model.mlp.dense(cls))
        torch.testing.assert_close(out, expected)
        model.train()
        assert model.uses_mlp()
    assert SimCSEModel.from_pretrained(str(tiny_dir), pooler="avg").mlp is None


@pytest.mark.parametrize("pooler,mlp_only_train", [("cls", False), ("cls", True), ("cls_before_pooler", False),
                                                    ("avg", False), ("avg_first_last", False)])
def test_export_loads_in_transformers_and_sentence_transformers(tiny_dir, tmp_path, pooler, mlp_only_train):
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    model = SimCSEModel.from_pretrained(str(tiny_dir), pooler=pooler, mlp_only_train=mlp_only_train).eval()
    with torch.no_grad():  # move the weights away from the saved ones so the test sees the export
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    expected = model.embed_sentences(tok, SENTS)
    out = export_model(model, tok, tmp_path / "export", max_seq_length=64)

    reloaded = load_exported(out)
    torch.testing.assert_close(reloaded.embed_sentences(AutoTokenizer.from_pretrained(out), SENTS), expected)

    hf = AutoModel.from_pretrained(out).eval()
    enc = AutoTokenizer.from_pretrained(out)(SENTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hs = hf(**enc, output_hidden_states=True)
    pooled = pool(pooler, enc["attention_mask"], hs.last_hidden_state, hs.hidden_states)
    if pooler == "cls" and not mlp_only_train:
        pooled = model.mlp(pooled)
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-6)

    if pooler == "avg_first_last":
        assert not (out / "modules.json").exists()  # no sentence-transformers pooling mode for it
        return
    st = pytest.importorskip("sentence_transformers")
    st_model = st.SentenceTransformer(str(out), device="cpu")
    st_emb = torch.as_tensor(st_model.encode(SENTS, convert_to_numpy=True))
    torch.testing.assert_close(st_emb, expected, rtol=1e-5, atol=1e-5)
