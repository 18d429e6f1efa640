"""--encoder textcnn: masked max-pool over time, the table from --model, exports for simcse-eval and
sentence-transformers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_TRAIN_SENTS, tiny_model_and_corpus

from simcse_kernels.train.checkpoint import export_model, load_exported
from simcse_kernels.train.cli import eval_main
from simcse_kernels.train.textcnn import TextCNN, TextCNNModel, parse_widths
from simcse_kernels.train.trainer import TrainConfig, train

SENTS = ["the quick fox", "a", "line 3: the red cat near the town .", "dog dog"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_and_corpus(tmp_path_factory.mktemp("textcnn"))


def _reference_embedding(cnn: TextCNN, ids: list[int]) -> torch.Tensor:
    """One sentence without padding, in float64: each position's window centred on it, (w - 1) / 2 zeros a
    side, ReLU, the max over positions, the projection."""
    x = cnn.embed.weight[torch.tensor(ids)].double()
    feats = []
    for conv in cnn.convs:
        w = conv.kernel_size[0]
        zeros = torch.zeros((w - 1) // 2, x.shape[1], dtype=x.dtype)
        seq = torch.cat([zeros, x, zeros])
        windows = [seq[t : t + w] for t in range(len(ids))]
        vals = [torch.relu(torch.einsum("oiw,wi->o", conv.weight.double(), win) + conv.bias.double())
                for win in windows]
        feats.append(torch.stack(vals).amax(0))
    return cnn.proj.weight.double() @ torch.cat(feats) + cnn.proj.bias.double()


def test_masked_max_pool_matches_per_sentence_reference(tiny):
    from transformers import AutoTokenizer

    model_dir, _ = tiny
    torch.manual_seed(0)
    model = TextCNNModel.from_pretrained(str(model_dir), widths=(1, 5), maps=6, dim=7).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(SENTS, padding=True, return_tensors="pt")
    assert enc["attention_mask"].sum(1).min() < 5 < enc["input_ids"].shape[1]  # short and padded rows
    with torch.no_grad():
        batch = model(enc["input_ids"], enc["attention_mask"])
        for i, s in enumerate(SENTS):
            ids = tok(s)["input_ids"]
            torch.testing.assert_close(batch[i].double(), _reference_embedding(model.encoder, ids),
                                       rtol=1e-5, atol=1e-6)
            alone = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
            torch.testing.assert_close(batch[i], alone, rtol=1e-5, atol=1e-6)  # padding never counts


def test_table_comes_from_the_model(tiny):
    from transformers import AutoModel, AutoTokenizer

    model_dir, _ = tiny
    table = AutoModel.from_pretrained(model_dir).get_input_embeddings().weight
    model = TextCNNModel.from_pretrained(str(model_dir))
    pad = AutoTokenizer.from_pretrained(model_dir).pad_token_id
    w = model.encoder.embed.weight
    assert w.shape == table.shape and model.embedding_dim == table.shape[1]  # --cnn_dim default: E
    keep = torch.arange(len(w)) != pad
    assert torch.equal(w[keep], table[keep]) and not w[pad].any()
    assert [c.kernel_size[0] for c in model.encoder.convs] == [1, 3, 5]
    assert parse_widths("1,7") == (1, 7)
    for bad in ("", "3,3", "0,3", "a", "3,4"):
        with pytest.raises(ValueError):
            parse_widths(bad)


def test_dropout_gives_two_views(tiny):
    model_dir, _ = tiny
    model = TextCNNModel.from_pretrained(str(model_dir), widths=(1, 3), maps=8, dropout=0.1).train()
    ids = torch.randint(5, 40, (3, 9))
    mask = torch.ones_like(ids)
    assert not torch.equal(model(ids, mask), model(ids, mask))
    model.eval()
    assert torch.equal(model(ids, mask), model(ids, mask))


def test_trained_export_loads_in_simcse_eval_and_sentence_transformers(tiny, tmp_path):
    from transformers import AutoTokenizer

    model_dir, corpus = tiny
    out = tmp_path / "run"
    train(TrainConfig(model=str(model_dir), train_file=str(corpus), output_dir=str(out), encoder="textcnn",
                      cnn_widths="1,3", cnn_maps=8, cnn_dim=12, batch_size=8, max_steps=3, lr=1e-2,
                      eval_every=None, progress=False))
    final = out / "final"
    reloaded = load_exported(final)
    assert isinstance(reloaded, TextCNNModel) and reloaded.embedding_dim == 12
    tok = AutoTokenizer.from_pretrained(final)
    expected = reloaded.embed_sentences(tok, SENTS)
    initial = TextCNNModel.from_pretrained(str(model_dir), widths=(1, 3), maps=8, dim=12)
    assert not torch.equal(initial.encoder.embed.weight, reloaded.encoder.embed.weight)  # trained, then saved

    st = pytest.importorskip("sentence_transformers")
    st_model = st.SentenceTransformer(str(final), device="cpu")  # only sentence-transformers' own modules
    st_emb = torch.as_tensor(st_model.encode(SENTS))
    assert st_emb.shape == (len(SENTS), 12)
    torch.testing.assert_close(st_emb, expected, rtol=1e-5, atol=1e-6)
    longer = [" ".join(TINY_TRAIN_SENTS) * 3]  # cut to max_seq_length, as WordEmbeddings cuts
    assert len(tok(longer[0])["input_ids"]) > st_model.max_seq_length
    torch.testing.assert_close(torch.as_tensor(st_model.encode(longer)),
                               reloaded.embed_sentences(tok, longer, max_length=st_model.max_seq_length),
                               rtol=1e-5, atol=1e-6)

    sts12 = tmp_path / "data" / "sts" / "STS12-en-test"  # a 4-pair STS12 for simcse-eval
    sts12.mkdir(parents=True)
    pairs = [(TINY_TRAIN_SENTS[i], TINY_TRAIN_SENTS[i + 1]) for i in range(4)]
    (sts12 / "STS.input.a.txt").write_text("".join(f"{a}\t{b}\n" for a, b in pairs))
    (sts12 / "STS.gs.a.txt").write_text("4.5\n1.0\n3.0\n2.0\n")
    res = tmp_path / "res.json"
    assert eval_main(["--model", str(final), "--data_dir", str(tmp_path / "data"), "--tasks", "STS12",
                      "--no_align_uniform", "--output", str(res)]) == 0
    assert set(json.loads(res.read_text())) == {"STS12", "avg"}


def test_export_of_an_untrained_textcnn_round_trips(tiny, tmp_path):
    from transformers import AutoTokenizer

    model_dir, _ = tiny
    model = TextCNNModel.from_pretrained(str(model_dir), widths=(1, 5), maps=5).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = export_model(model, tok, tmp_path / "exp")
    torch.testing.assert_close(load_exported(out).embed_sentences(tok, SENTS), model.embed_sentences(tok, SENTS))
    again = TextCNNModel.from_pretrained(str(out))  # a TextCNN export as --model: the whole encoder
    torch.testing.assert_close(again.embed_sentences(tok, SENTS), model.embed_sentences(tok, SENTS))
