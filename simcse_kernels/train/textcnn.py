"""``TextCNNModel``: a Kim-2014 TextCNN sentence encoder (``simcse-train --encoder textcnn``).

Architecture (per sentence of token ids ``x`` (L,) with attention mask):

1. token embeddings ``E[x]`` (L, E) from a table initialised from ``--model``'s input embeddings (e.g.
   all-MiniLM-L6-v2's 30522 x 384 word pieces), padding rows zeroed, then dropout;
2. for each odd width ``w`` in ``widths``: ``Conv1d(E, maps, w)`` over the sentence with ``(w - 1) / 2`` zeros
   on each side (Kim's code zero-pads the sentence too), so position t is the window centred on token t;
3. max over the sentence's own positions (padding never counts, so an embedding does not depend on its batch),
   ReLU (``relu(max) = max(relu)``: Kim's ReLU-then-max-pool), concatenate the ``len(widths) * maps`` features,
   dropout, ``Linear`` to ``dim``.

The dropouts (step 1 and 3) supply SimCSE's two views. An export (:func:`save_textcnn`) is a plain
sentence-transformers model made only of sentence-transformers' own modules: ``WordEmbeddings`` (the table and
the Hugging Face tokenizer) -> ``CNN`` (the same convolutions: it zeroes padding and pads (w - 1) / 2, hence odd
widths) -> ``Pooling("max")`` -> ``Dense`` (identity weights, ReLU) -> ``Dense`` (the projection). So
``SentenceTransformer(path)`` loads it with no ``trust_remote_code`` and gives the same embeddings.
Tokenization follows ``WordEmbeddings``: the tokenizer's ids with special tokens, cut to ``max_seq_length``.

Defaults (``--cnn_widths 1,3,5 --cnn_maps 100 --cnn_dropout 0.1``, ``--cnn_dim`` = the embedding width), by a
short sweep (unsup SimCSE, 100 steps of 32 on MiniLM's table, best STS-B dev; ``benchmarks/embeddings_table.py
--sweep``, ``sweep_textcnn_defaults.json``): widths 1,3,5 66.0 (untrained 67.7) against 3,5,7 55.3 (untrained
57.1): the width-1 maps keep the word-piece table's unigram semantics; 300 maps 52.5 against 100 maps 55.3, and
lr 1e-3 fell to 36.9. SimCSE's dropout rate. ``--cnn_dim`` defaults to the table's width (384 for MiniLM), so a
MiniLM teacher needs no projection.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..module import FusedInfoNCE

CONFIG_FILE = "textcnn_config.json"
DEFAULT_WIDTHS = (1, 3, 5)


def parse_widths(text: str) -> tuple[int, ...]:
    """``"1,3,5"`` -> (1, 3, 5); raises ValueError for anything but distinct odd positive integers."""
    try:
        widths = tuple(int(t) for t in str(text).split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1 or len(set(widths)) != len(widths) or any(w % 2 == 0 for w in widths):
        raise ValueError(f"expected comma-separated distinct odd integers >= 1 (e.g. 1,3,5; odd: a width keeps the "
                         f"sentence length with (w - 1) / 2 zeros a side), got {text!r}")
    return widths


class TextCNN(nn.Module):
    """The encoder of the module docstring.

    Args:
        embeddings: (V, E) initial token-embedding table (copied).
        widths: odd convolution widths (each keeps the sentence length with (w - 1) / 2 zeros a side).
        maps: feature maps per width.
        dim: output dimension of the projection.
        dropout: dropout probability on the embeddings and on the pooled features.
        pad_id: the tokenizer's padding id (its row is zeroed and gets no gradient).
    """

    def __init__(self, embeddings: torch.Tensor, widths=DEFAULT_WIDTHS, maps: int = 100, dim: int | None = None,
                 dropout: float = 0.1, pad_id: int = 0) -> None:
        super().__init__()
        vocab, width = embeddings.shape
        widths = tuple(int(w) for w in widths)
        if any(w % 2 == 0 for w in widths):
            raise ValueError(f"TextCNN widths must be odd (a width keeps the length with (w - 1) / 2 zeros a side, "
                             f"as sentence-transformers' CNN module), got {widths}")
        self.config = {"vocab_size": int(vocab), "embedding_dim": int(width), "widths": list(widths),
                       "maps": int(maps), "dim": int(dim or width), "dropout": float(dropout), "pad_id": int(pad_id)}
        self.embed = nn.Embedding(vocab, width, padding_idx=pad_id)
        with torch.no_grad():
            self.embed.weight.copy_(embeddings)
            self.embed.weight[pad_id].zero_()
        self.convs = nn.ModuleList(nn.Conv1d(width, maps, w, padding=(w - 1) // 2) for w in widths)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(maps * len(widths), self.config["dim"])

    @classmethod
    def from_config(cls, config: dict) -> TextCNN:
        """An (uninitialised) encoder of a saved ``config`` (weights follow with ``load_state_dict``)."""
        table = torch.zeros(config["vocab_size"], config["embedding_dim"])
        return cls(table, config["widths"], config["maps"], config["dim"], config["dropout"], config["pad_id"])

    @property
    def dim(self) -> int:
        return self.config["dim"]

    @property
    def n_features(self) -> int:
        """Width of the pooled feature vector (``maps * len(widths)``)."""
        return self.proj.in_features

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and 0/1 mask -> (B, dim) sentence embeddings."""
        mask = attention_mask.to(torch.bool)
        x = (self.dropout(self.embed(input_ids)) * mask.unsqueeze(-1)).transpose(1, 2)  # (B, E, L), padding 0
        h = torch.cat([conv(x) for conv in self.convs], dim=1)  # (B, F, L): position t centres a window
        pooled = h.masked_fill(~mask.unsqueeze(1), float("-inf")).amax(-1)  # over the sentence's own positions
        return self.proj(self.dropout(torch.relu(pooled)))  # relu(max) == max(relu): Kim's ReLU then max-pool


class TextCNNModel(nn.Module):
    """``TextCNN`` with the interface of :class:`~.model.SimCSEModel` that the trainer uses (``forward``,
    ``embed_sentences``, ``loss_fn``, ``embedding_dim``)."""

    pooler = "textcnn"
    do_mlm = False

    def __init__(self, cnn: TextCNN, loss_fn: FusedInfoNCE | None = None) -> None:
        super().__init__()
        self.encoder = cnn
        self.loss_fn = loss_fn if loss_fn is not None else FusedInfoNCE()

    @property
    def embedding_dim(self) -> int:
        return self.encoder.dim

    @classmethod
    def from_pretrained(cls, name: str, widths=DEFAULT_WIDTHS, maps: int = 100, dim: int | None = None,
                        dropout: float = 0.1, loss_fn: FusedInfoNCE | None = None) -> TextCNNModel:
        """A TextCNN whose token table is ``name``'s input embeddings (any ``AutoModel``), or the whole
        saved TextCNN if ``name`` is a TextCNN export (then the architecture arguments are ignored)."""
        from transformers import AutoModel, AutoTokenizer

        from .model import quiet_transformers_progress, resolve_model_path

        path = resolve_model_path(name)
        if is_textcnn_folder(path):
            return cls(load_textcnn(path), loss_fn)
        with quiet_transformers_progress():
            table = AutoModel.from_pretrained(path).get_input_embeddings().weight.detach().float()
        pad = AutoTokenizer.from_pretrained(path).pad_token_id
        return cls(TextCNN(table, widths, maps, dim, dropout, 0 if pad is None else pad), loss_fn)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) tokens -> (B, dim) embeddings (``token_type_ids`` is ignored)."""
        return self.encoder(input_ids, attention_mask)

    def embed_sentences(self, tokenizer, sentences: list[str], batch_size: int = 128, max_length: int = 128,
                        device: torch.device | str | None = None, progress: str | None = None) -> torch.Tensor:
        """Evaluation embeddings, as :meth:`~.model.SimCSEModel.embed_sentences`, tokenized as the export's
        ``WordEmbeddings`` does (:func:`st_token_batch`)."""
        from .model import embed_sentences

        return embed_sentences(self, tokenizer, sentences, batch_size, max_length, device, progress,
                               token_batch=st_token_batch)


def is_textcnn_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`save_textcnn`."""
    return (Path(path).expanduser() / CONFIG_FILE).is_file()


def sentence_transformer_modules(cnn: TextCNN, tokenizer, max_seq_length: int) -> list[nn.Module]:
    """The encoder as sentence-transformers' own modules (see the module docstring), weights copied."""
    from sentence_transformers.sentence_transformer.modules import CNN, Dense, Pooling, WordEmbeddings

    cfg = cnn.config
    words = WordEmbeddings(tokenizer, cnn.embed.weight.detach().cpu().clone(), max_seq_length=max_seq_length)
    conv = CNN(cfg["embedding_dim"], out_channels=cfg["maps"], kernel_sizes=list(cfg["widths"]))
    for mine, theirs in zip(cnn.convs, conv.convs, strict=True):
        theirs.load_state_dict(mine.state_dict())
    feats = cnn.n_features
    relu = Dense(feats, feats, activation_function=nn.ReLU(), init_weight=torch.eye(feats),
                 init_bias=torch.zeros(feats))
    proj = Dense(feats, cfg["dim"], activation_function=nn.Identity(),
                 init_weight=cnn.proj.weight.detach().cpu().clone(), init_bias=cnn.proj.bias.detach().cpu().clone())
    return [words, conv, Pooling(feats, pooling_mode="max"), relu, proj]


def save_textcnn(cnn: TextCNN, tokenizer, out: Path, max_seq_length: int) -> None:
    """Write ``cnn`` as a sentence-transformers model folder (plus its tokenizer and ``textcnn_config.json``)."""
    from sentence_transformers import SentenceTransformer

    out.mkdir(parents=True, exist_ok=True)
    model = SentenceTransformer(modules=sentence_transformer_modules(cnn, tokenizer, max_seq_length), device="cpu")
    model.save(str(out), create_model_card=False)
    tokenizer.save_pretrained(out)
    (out / CONFIG_FILE).write_text(json.dumps({**cnn.config, "max_seq_length": max_seq_length}, indent=2))


def load_textcnn(path: str | Path) -> TextCNN:
    """The :class:`TextCNN` saved in ``path`` (eval mode), read back from its sentence-transformers modules."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import CNN, Dense, WordEmbeddings

    path = Path(path).expanduser()
    config = json.loads((path / CONFIG_FILE).read_text())
    cnn = TextCNN.from_config(config)
    st = SentenceTransformer(str(path), device="cpu")
    words, conv = (next(m for m in st if isinstance(m, kind)) for kind in (WordEmbeddings, CNN))
    proj = [m for m in st if isinstance(m, Dense)][-1]
    with torch.no_grad():
        cnn.embed.weight.copy_(words.emb_layer.weight)
        for mine, theirs in zip(cnn.convs, conv.convs, strict=True):
            mine.load_state_dict(theirs.state_dict())
        cnn.proj.load_state_dict(proj.linear.state_dict())
    return cnn.eval()


def st_token_batch(tokenizer, sentences: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Token ids and mask as sentence-transformers' ``WordEmbeddings`` forms them: the tokenizer's ids with
    special tokens, cut to ``max_length``, right-padded with 0 (so an export embeds exactly as in training)."""
    ids = [tokenizer(str(s))["input_ids"][:max_length] for s in sentences]
    longest = max(1, max(len(t) for t in ids))
    input_ids = torch.zeros(len(ids), longest, dtype=torch.long)
    mask = torch.zeros(len(ids), longest, dtype=torch.long)
    for row, t in enumerate(ids):
        input_ids[row, : len(t)] = torch.tensor(t, dtype=torch.long)
        mask[row, : len(t)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}
