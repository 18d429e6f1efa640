"""An offline tiny BERT (random init) with a WordPiece tokenizer built from given sentences.

For tests, CPU smoke runs and ``bench_trainer.py --tiny``: nothing is downloaded.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_vocab(sentences: list[str], max_words: int = 2000) -> list[str]:
    """Special tokens, single characters (+ ``##`` continuations) and the most frequent lowercase words.

    Args:
        sentences: text to draw the vocabulary from.
        max_words: how many whole words to keep at most.
    """
    words = Counter(w for s in sentences for w in re.findall(r"\w+|[^\w\s]", s.lower()))
    chars = sorted({c for w in words for c in w})
    vocab = list(SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars]
    seen = set(vocab)
    for w, _ in words.most_common():
        if len(vocab) >= len(SPECIAL_TOKENS) + 2 * len(chars) + max_words:
            break
        if w not in seen:
            vocab.append(w)
            seen.add(w)
    return vocab


def build_tokenizer(vocab: list[str]):
    """A BERT-style ``PreTrainedTokenizerFast`` (lowercase, WordPiece, ``[CLS] x [SEP]``) over ``vocab``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {t: i for i, t in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(vocab=ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=512,
    )


def build_tiny_bert(out_dir: str | Path, sentences: list[str], *, hidden: int = 32, layers: int = 2,
                    heads: int = 2, intermediate: int | None = None, max_words: int = 2000,
                    dropout: float = 0.1, seed: int = 0) -> Path:
    """Write a randomly initialised BERT and its tokenizer to ``out_dir`` (``from_pretrained``-loadable).

    Args:
        out_dir: target folder.
        sentences: text for the vocabulary.
        hidden, layers, heads, intermediate: BERT sizes (intermediate defaults to 2 * hidden).
        max_words: vocabulary size bound (whole words).
        dropout: hidden and attention dropout probability.
        seed: initialisation seed.

    Returns:
        ``out_dir`` as a Path.
    """
    from transformers import BertConfig, BertForMaskedLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(build_vocab(sentences, max_words))
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate or 2 * hidden, max_position_embeddings=128,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForMaskedLM(config)  # has an MLM head, so do_mlm runs load it too
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
