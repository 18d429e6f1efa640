"""Training data: unsup text (one sentence a line), sup CSV (``sent0,sent1[,hard_neg]``), batching.

Batch order is a pure function of (seed, step): epoch ``e`` uses ``randperm(n)`` seeded with
``seed + e`` and drops the last incomplete batch, so resuming at step ``s`` needs no sampler state.
With ``world_size`` > 1 the global batch is split into contiguous per-rank blocks.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from .errors import UsageError

TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise UsageError(f"{what} {path}: no such file")
    if not path.is_file():
        raise UsageError(f"{what} {path}: not a regular file")


def _decode_error(path: Path, exc: UnicodeDecodeError) -> UsageError:
    return UsageError(f"{path}: not UTF-8 text ({exc.reason})")


def read_unsup(path: str | Path) -> list[tuple[str, ...]]:
    """Unsup SimCSE examples: each non-blank line ``s`` (stripped) gives ``(s, s)`` (two dropout views).

    Raises:
        UsageError: missing file, not UTF-8, or no non-blank line.
    """
    path = Path(path)
    _check_file(path, "training text file")
    try:
        with path.open(encoding="utf-8") as f:
            examples = [(s, s) for s in (line.strip() for line in f) if s]
    except UnicodeDecodeError as exc:
        raise _decode_error(path, exc) from None
    if not examples:
        raise UsageError(f"{path}: the file holds no examples (it is empty or has only blank lines)")
    return examples


def read_sup_csv(path: str | Path) -> list[tuple[str, ...]]:
    """Sup SimCSE examples from a CSV with header ``sent0,sent1[,hard_neg]``: ``(sent0, sent1[, hard_neg])``.

    Blank lines are skipped; other columns are ignored.

    Raises:
        UsageError: missing file, not UTF-8, malformed CSV, a header without ``sent0``/``sent1``, a row
            with fewer or more fields than the header (named by file and line), or no data row.
    """
    path = Path(path)
    _check_file(path, "training CSV")
    examples = []
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise UsageError(f"{path}: the file is empty (expected a header sent0,sent1[,hard_neg])")
            header = [h.strip() for h in header]
            if "sent0" not in header or "sent1" not in header:
                raise UsageError(f"{path}: line {reader.line_num}: the header must name sent0 and sent1 "
                                 f"(and optionally hard_neg); found {','.join(header)}")
            cols = [header.index(c) for c in ("sent0", "sent1", "hard_neg") if c in header]
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise UsageError(f"{path}: line {reader.line_num}: {len(row)} field(s), but the header has "
                                     f"{len(header)} ({','.join(header)})")
                examples.append(tuple(row[c] for c in cols))
    except UnicodeDecodeError as exc:
        raise _decode_error(path, exc) from None
    except csv.Error as exc:
        raise UsageError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None
    if not examples:
        raise UsageError(f"{path}: the file holds no examples (a header and no data rows)")
    return examples


def read_examples(path: str | Path) -> list[tuple[str, ...]]:
    """``.csv`` -> :func:`read_sup_csv`, anything else -> :func:`read_unsup`."""
    return read_sup_csv(path) if str(path).endswith(".csv") else read_unsup(path)


def check_enough_examples(examples: list, batch_size: int, path: str | Path) -> None:
    """Raise :class:`UsageError` if ``examples`` (read from ``path``) cannot fill one batch of ``batch_size``."""
    if len(examples) < batch_size:
        raise UsageError(f"{path}: {len(examples)} example(s) are fewer than one batch of {batch_size} "
                         f"(--batch_size)")


class BatchOrder:
    """Deterministic, resumable batch order.

    Args:
        n_examples: data set size.
        batch_size: global batch size (all ranks together).
        seed: base seed; epoch ``e`` is shuffled with ``seed + e``.
    """

    def __init__(self, n_examples: int, batch_size: int, seed: int) -> None:
        if n_examples < batch_size:
            raise ValueError(f"{n_examples} examples are fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed = n_examples, batch_size, seed
        self.batches_per_epoch = n_examples // batch_size
        self._perm_epoch, self._perm = -1, None

    def indices(self, step: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """Example indices of global step ``step`` (0-based) for ``rank`` (a contiguous block)."""
        epoch, b = divmod(step, self.batches_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        batch = self._perm[b * self.batch_size : (b + 1) * self.batch_size]
        per_rank = self.batch_size // world_size
        return batch[rank * per_rank : (rank + 1) * per_rank]


def mask_tokens(input_ids: torch.Tensor, special_mask: torch.Tensor, mask_id: int, vocab_size: int,
                generator: torch.Generator, probability: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (80% [MASK], 10% random, 10% kept), as SimCSE's data collator.

    Args:
        input_ids: (B, L) ids; special_mask: (B, L) bool, True for [CLS]/[SEP]/padding.
        mask_id, vocab_size: tokenizer facts; generator: the RNG (seeded per step for exact resume).

    Returns:
        (masked ids (B, L), labels (B, L) with -100 on unmasked positions).
    """
    labels = input_ids.clone()
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & ~special_mask
    labels[~chosen] = -100
    ids = input_ids.clone()
    r = torch.rand(input_ids.shape, generator=generator)
    ids[chosen & (r < 0.8)] = mask_id
    rand_pos = chosen & (r >= 0.8) & (r < 0.9)
    ids[rand_pos] = torch.randint(vocab_size, input_ids.shape, generator=generator)[rand_pos]
    return ids, labels


class Collator:
    """Tokenizes a list of examples (tuples of V texts) into one (B*V, L) batch, example-major.

    Args:
        tokenizer: an HF tokenizer.
        max_length: truncation length.
        mlm_probability: if set, also returns ``mlm_input_ids`` / ``mlm_labels`` (B, L) built from the
            first view, masked with a generator seeded by ``seed`` (pass the step for exact resume).
    """

    def __init__(self, tokenizer, max_length: int = 32, mlm_probability: float | None = None) -> None:
        self.tokenizer, self.max_length, self.mlm_probability = tokenizer, max_length, mlm_probability

    def __call__(self, examples: list[tuple[str, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
        n_views = len(examples[0])
        flat = [text for ex in examples for text in ex]
        enc = self.tokenizer(flat, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: enc[k] for k in TOKEN_KEYS if k in enc}
        batch["n_views"] = n_views
        if self.mlm_probability:
            first = {k: v[::n_views] for k, v in batch.items() if k in TOKEN_KEYS}
            special = (first["input_ids"] == self.tokenizer.cls_token_id) | (
                first["input_ids"] == self.tokenizer.sep_token_id) | (first["attention_mask"] == 0)
            g = torch.Generator().manual_seed(seed)
            ids, labels = mask_tokens(first["input_ids"], special, self.tokenizer.mask_token_id,
                                      len(self.tokenizer), g, self.mlm_probability)
            batch["mlm_input_ids"], batch["mlm_labels"] = ids, labels
        return batch


def split_batch(batch: dict, chunk_examples: int) -> list[dict]:
    """Split a collated batch into mini-batches of ``chunk_examples`` examples (all views of an example
    stay together; padding is kept as collated)."""
    v = batch["n_views"]
    n = batch["input_ids"].shape[0] // v
    chunks = []
    for s in range(0, n, chunk_examples):
        e = min(n, s + chunk_examples)
        c = {k: batch[k][s * v : e * v] for k in TOKEN_KEYS if k in batch}
        c.update({k: batch[k][s:e] for k in ("mlm_input_ids", "mlm_labels") if k in batch})
        c["n_views"] = v
        chunks.append(c)
    return chunks


AUGMENTATIONS = ("crop", "word_deletion", "delete_one_word")


def parse_augment(spec: str) -> tuple[str, float]:
    """``--augment`` ``crop:R`` | ``word_deletion:R`` (0 < R < 1) | ``delete_one_word`` -> (kind, R).

    Raises:
        UsageError: anything else (one line naming the flag and the accepted forms).
    """
    kind, _, rate = str(spec).partition(":")
    forms = "crop:R, word_deletion:R (0 < R < 1) or delete_one_word"
    if kind == "delete_one_word" and not rate:
        return kind, 0.0
    if kind in ("crop", "word_deletion") and rate:
        try:
            value = float(rate)
        except ValueError:
            value = float("nan")
        if 0 < value < 1:
            return kind, value
    raise UsageError(f"--augment must be {forms}, got {spec!r}")


def augment_sentence(sentence: str, kind: str, rate: float, rng) -> str:
    """One augmented view of ``sentence`` (words = whitespace-separated tokens), SimCSE Table 1's definitions.

    * ``crop``: a random contiguous span of ``max(1, round((1 - rate) * n))`` of the ``n`` words;
    * ``word_deletion``: each word deleted with probability ``rate`` (if every word is deleted, one random
      word is kept, so the view is never empty);
    * ``delete_one_word``: one random word deleted (a one-word sentence is kept).

    Args:
        rng: a :class:`random.Random` (the trainer seeds one per step and rank, so resume is exact).
    """
    words = sentence.split()
    n = len(words)
    if n <= 1:
        return sentence
    if kind == "crop":
        keep = max(1, round((1 - rate) * n))
        start = rng.randrange(n - keep + 1)
        return " ".join(words[start : start + keep])
    if kind == "word_deletion":
        kept = [w for w in words if rng.random() >= rate]
        return " ".join(kept) if kept else words[rng.randrange(n)]
    if kind == "delete_one_word":
        drop = rng.randrange(n)
        return " ".join(words[:drop] + words[drop + 1 :])
    raise ValueError(f"unknown augmentation {kind!r}; expected one of {AUGMENTATIONS}")
