"""``TextCNNModel``: a Kim-2014 TextCNN sentence encoder (``simcse-train --encoder textcnn``).

Architecture (per sentence of token ids ``x`` (L,) with attention mask):

1. token embeddings ``E[x]`` (L, E) from a table initialised from ``--model``'s input embeddings (e.g.
   all-MiniLM-L6-v2's 30522 x 384 word pieces), padding rows zeroed, then dropout;
2. for each width ``w`` in ``widths``: ``Conv1d(E, maps, w)`` over the sentence, ReLU, and a max over the
   window positions that lie inside the sentence (a sentence shorter than ``w`` has one window: the
   sentence, zero-padded) — padding never enters a window that is counted, so an embedding does not depend
   on the batch it is computed in;
3. concatenate the ``len(widths) * maps`` features, dropout, ``Linear`` to ``dim``.

The dropouts (step 1 and 3) supply SimCSE's two views. ``TextCNNSentenceTransformer`` wraps the encoder
and its tokenizer as a sentence-transformers module, so an export loads with
``SentenceTransformer(path, trust_remote_code=True)`` (sentence-transformers >= 6 asks for that flag for any
module class outside its own package; this one is ``simcse_kernels.train.textcnn.TextCNNSentenceTransformer``).

Defaults (``--cnn_widths 3,4,5 --cnn_maps 100 --cnn_dropout 0.1``, ``--cnn_dim`` = the embedding width) are
Kim's filter bank and SimCSE's dropout rate, kept after a short measurement on MiniLM's table (unsup SimCSE,
100 steps of 32, STS-B dev: 300 maps 54.1 vs 100 maps 56.8 at lr 1e-4; lr 1e-3 fell to 37.2; see README
"TextCNN, augmentations, distillation, multi-view AM-softmax" and ``benchmarks/embeddings_table.py --sweep``).
``--cnn_dim`` defaults to the table's width (384 for MiniLM), so a MiniLM teacher needs no projection.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..module import FusedInfoNCE

CONFIG_FILE = "textcnn_config.json"
WEIGHTS_FILE = "textcnn.pt"
ST_MODULE = "simcse_kernels.train.textcnn.TextCNNSentenceTransformer"


def parse_widths(text: str) -> tuple[int, ...]:
    """``"3,4,5"`` -> (3, 4, 5); raises ValueError for anything but distinct positive integers."""
    try:
        widths = tuple(int(t) for t in str(text).split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1 or len(set(widths)) != len(widths):
        raise ValueError(f"expected comma-separated distinct integers >= 1 (e.g. 3,4,5), got {text!r}")
    return widths


class TextCNN(nn.Module):
    """The encoder of the module docstring.

    Args:
        embeddings: (V, E) initial token-embedding table (copied).
        widths: convolution widths.
        maps: feature maps per width.
        dim: output dimension of the projection.
        dropout: dropout probability on the embeddings and on the pooled features.
        pad_id: the tokenizer's padding id (its row is zeroed and gets no gradient).
    """

    def __init__(self, embeddings: torch.Tensor, widths=(3, 4, 5), maps: int = 100, dim: int | None = None,
                 dropout: float = 0.1, pad_id: int = 0) -> None:
        super().__init__()
        vocab, width = embeddings.shape
        self.config = {"vocab_size": int(vocab), "embedding_dim": int(width), "widths": [int(w) for w in widths],
                       "maps": int(maps), "dim": int(dim or width), "dropout": float(dropout), "pad_id": int(pad_id)}
        self.embed = nn.Embedding(vocab, width, padding_idx=pad_id)
        with torch.no_grad():
            self.embed.weight.copy_(embeddings)
            self.embed.weight[pad_id].zero_()
        self.convs = nn.ModuleList(nn.Conv1d(width, maps, w) for w in widths)
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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and 0/1 mask -> (B, dim) sentence embeddings."""
        mask = attention_mask.to(torch.bool)
        x = self.dropout(self.embed(input_ids)) * mask.unsqueeze(-1)  # padding rows are exactly zero
        lengths = mask.sum(1)
        longest = max(self.config["widths"])
        if x.shape[1] < longest:
            x = nn.functional.pad(x, (0, 0, 0, longest - x.shape[1]))
        x = x.transpose(1, 2)  # (B, E, L)
        pooled = []
        for conv in self.convs:
            w = conv.kernel_size[0]
            h = torch.relu(conv(x))  # (B, maps, L - w + 1); window t covers tokens t .. t + w - 1
            t = torch.arange(h.shape[-1], device=h.device)
            # windows inside the sentence; a sentence shorter than w keeps its one (zero-padded) window
            inside = (t.unsqueeze(0) + w <= lengths.clamp_min(w).unsqueeze(1)).unsqueeze(1)
            pooled.append(h.masked_fill(~inside, float("-inf")).amax(-1))
        return self.proj(self.dropout(torch.cat(pooled, dim=1)))


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
    def from_pretrained(cls, name: str, widths=(3, 4, 5), maps: int = 100, dim: int | None = None,
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
        """Evaluation embeddings, as :meth:`~.model.SimCSEModel.embed_sentences`."""
        from .model import embed_sentences

        return embed_sentences(self, tokenizer, sentences, batch_size, max_length, device, progress)


def is_textcnn_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`save_textcnn`."""
    return (Path(path).expanduser() / CONFIG_FILE).is_file()


def save_textcnn(cnn: TextCNN, tokenizer, out: Path, max_seq_length: int) -> None:
    """Write the encoder (config + weights), its tokenizer and the sentence-transformers files to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    (out / CONFIG_FILE).write_text(json.dumps({**cnn.config, "max_seq_length": max_seq_length}, indent=2))
    torch.save({k: v.detach().cpu() for k, v in cnn.state_dict().items()}, out / WEIGHTS_FILE)
    (out / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": ST_MODULE}], indent=2))


def load_textcnn(path: str | Path) -> TextCNN:
    """The :class:`TextCNN` saved in ``path`` (eval mode)."""
    path = Path(path).expanduser()
    config = json.loads((path / CONFIG_FILE).read_text())
    cnn = TextCNN.from_config(config)
    cnn.load_state_dict(torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return cnn.eval()


class TextCNNSentenceTransformer(nn.Module):
    """A sentence-transformers module (tokenizer + :class:`TextCNN`) for a saved TextCNN folder.

    ``SentenceTransformer(path, trust_remote_code=True)`` finds it in ``modules.json`` and calls
    :meth:`load` with the folder; ``encode`` calls :meth:`tokenize` then :meth:`forward`.
    """

    def __init__(self, cnn: TextCNN, tokenizer, max_seq_length: int = 128) -> None:
        super().__init__()
        self.cnn, self.tokenizer, self.max_seq_length = cnn, tokenizer, max_seq_length

    def tokenize(self, texts, **kwargs) -> dict[str, torch.Tensor]:
        enc = self.tokenizer([str(t) for t in texts], padding=True, truncation=True,
                             max_length=self.max_seq_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, features: dict) -> dict:
        features["sentence_embedding"] = self.cnn(features["input_ids"], features["attention_mask"])
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.cnn.dim

    def save(self, path: str, *args, **kwargs) -> None:
        save_textcnn(self.cnn, self.tokenizer, Path(path), self.max_seq_length)

    @staticmethod
    def load(path: str) -> TextCNNSentenceTransformer:
        from transformers import AutoTokenizer

        config = json.loads((Path(path) / CONFIG_FILE).read_text())
        return TextCNNSentenceTransformer(load_textcnn(path), AutoTokenizer.from_pretrained(path),
                                          config.get("max_seq_length", 128))
