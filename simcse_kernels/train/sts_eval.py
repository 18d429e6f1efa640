"""STS evaluation from local SentEval-format files: STS12–16 ("all"), STS-B, SICK-R, alignment/uniformity.

Layout under ``data_dir`` (see the project's data README):

* ``sts/STS1{2..6}-en-test/STS.input.X.txt`` (sent1 TAB sent2) + ``STS.gs.X.txt`` (one score a line;
  an empty gold line means the pair is unscored and skipped, as SentEval does);
* ``sts/STSBenchmark-senteval/sts-{dev,test}.csv`` (falls back to ``sts/STSBenchmark``): tab-separated,
  the first 7 fields kept (score = field 4, sentences = fields 5, 6), no quote handling;
* ``sick/SICK_test_annotated.txt``: header, tab-separated, relatedness = field 3 (CRLF tolerated).

Scores: cosine similarity of the two embeddings, Spearman x 100 over all pairs of a task ("all"
setting: STS12–16 subsets concatenated). Alignment / uniformity (Wang & Isola 2020, as in the SimCSE
paper): on l2-normalised embeddings, alignment = E ||f(x) - f(y)||^2 over STS-B pairs with score > 4,
uniformity = log E exp(-2 ||f(x) - f(y)||^2) over all pairs of distinct STS-B sentences.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

Pairs = tuple[list[str], list[str], list[float]]
STS_YEARS = ("STS12", "STS13", "STS14", "STS15", "STS16")
TASKS = (*STS_YEARS, "STSBenchmark", "SICKRelatedness")


def _read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def load_sts_year(data_dir: str | Path, year: str) -> Pairs:
    """All scored pairs of ``year`` (e.g. "STS12"), subsets in sorted file order."""
    folder = Path(data_dir) / "sts" / f"{year}-en-test"
    inputs = sorted(folder.glob("STS.input.*.txt"))
    if not inputs:
        raise FileNotFoundError(f"no STS.input.*.txt under {folder}")
    s1, s2, gold = [], [], []
    for inp in inputs:
        gs = folder / inp.name.replace("STS.input.", "STS.gs.")
        for pair, score in zip(_read_lines(inp), _read_lines(gs)):
            if not score.strip():
                continue
            a, b = pair.split("\t")[:2]
            s1.append(a.strip())
            s2.append(b.strip())
            gold.append(float(score))
    return s1, s2, gold


def stsb_file(data_dir: str | Path, split: str) -> Path:
    """``sts-{split}.csv`` of the SentEval STS-B copy (or of the original release if that is absent)."""
    base = Path(data_dir) / "sts"
    for name in ("STSBenchmark-senteval", "STSBenchmark"):
        f = base / name / f"sts-{split}.csv"
        if f.is_file():
            return f
    raise FileNotFoundError(f"no STS-B sts-{split}.csv under {base}/STSBenchmark-senteval or STSBenchmark")


def load_stsb(data_dir: str | Path, split: str = "test") -> Pairs:
    """STS-B pairs of ``split`` ("train" | "dev" | "test")."""
    s1, s2, gold = [], [], []
    for line in _read_lines(stsb_file(data_dir, split)):
        fields = line.split("\t")[:7]
        if len(fields) < 7:
            continue
        gold.append(float(fields[4]))
        s1.append(fields[5].strip())
        s2.append(fields[6].strip())
    return s1, s2, gold


def load_sick(data_dir: str | Path, split: str = "test_annotated") -> Pairs:
    """SICK-R pairs (relatedness 1–5) of ``SICK_{split}.txt``."""
    path = Path(data_dir) / "sick" / f"SICK_{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"SICK file not found: {path}")
    s1, s2, gold = [], [], []
    for line in _read_lines(path)[1:]:
        fields = line.rstrip("\r").split("\t")
        if len(fields) < 4:
            continue
        s1.append(fields[1].strip())
        s2.append(fields[2].strip())
        gold.append(float(fields[3]))
    return s1, s2, gold


def load_task(data_dir: str | Path, task: str) -> Pairs:
    """Pairs of one of :data:`TASKS` (test splits)."""
    if task in STS_YEARS:
        return load_sts_year(data_dir, task)
    if task == "STSBenchmark":
        return load_stsb(data_dir, "test")
    if task == "SICKRelatedness":
        return load_sick(data_dir)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def spearman_of_cosine(emb1: torch.Tensor, emb2: torch.Tensor, gold: list[float]) -> float:
    """Spearman correlation x 100 between ``cos(emb1[i], emb2[i])`` and ``gold`` (emb: (n, H))."""
    from scipy.stats import spearmanr

    cos = F.cosine_similarity(emb1.double(), emb2.double(), dim=-1)
    return 100.0 * float(spearmanr(cos.numpy(), gold).statistic)


Encode = Callable[[list[str]], torch.Tensor]


def eval_pairs(encode: Encode, pairs: Pairs) -> float:
    """Spearman x 100 of ``encode`` (sentences -> (n, H) CPU tensor) on ``pairs``."""
    s1, s2, gold = pairs
    return spearman_of_cosine(encode(s1), encode(s2), gold)


def alignment_uniformity(encode: Encode, pairs: Pairs, threshold: float = 4.0) -> dict[str, float]:
    """Alignment (pairs with gold > ``threshold``) and uniformity (all distinct sentences), lower is better."""
    s1, s2, gold = pairs
    e1 = F.normalize(encode(s1).double(), dim=-1)
    e2 = F.normalize(encode(s2).double(), dim=-1)
    pos = torch.tensor(gold) > threshold
    align = (e1[pos] - e2[pos]).norm(dim=-1).pow(2).mean()
    sents = list(dict.fromkeys(s1 + s2))
    index = {s: i for i, s in enumerate(sents)}
    emb = torch.empty(len(sents), e1.shape[1], dtype=torch.float64)
    emb[[index[s] for s in s1]] = e1
    emb[[index[s] for s in s2]] = e2
    sq = torch.pdist(emb).pow(2)
    uniform = torch.logsumexp(-2.0 * sq, dim=0) - torch.log(torch.tensor(float(sq.numel()), dtype=torch.float64))
    return {"alignment": float(align), "uniformity": float(uniform)}


def load_eval_data(data_dir: str | Path, tasks=TASKS, align_uniform: bool = True) -> dict[str, Pairs]:
    """Read every file :func:`evaluate_loaded` needs (so a missing one is found before a model loads).

    Args:
        data_dir: folder with ``sts/`` and ``sick/``.
        tasks: names from :data:`TASKS`.
        align_uniform: also read STS-B dev (key ``"stsb_dev"``).

    Returns:
        ``{task: (sents1, sents2, gold)}`` (+ ``"stsb_dev"``).

    Raises:
        UsageError: a missing or unreadable file (named), or an unknown task.
    """
    from .errors import UsageError

    data = {}
    for name in (*tasks, *(["stsb_dev"] if align_uniform else [])):
        try:
            data[name] = load_stsb(data_dir, "dev") if name == "stsb_dev" else load_task(data_dir, name)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--data_dir {data_dir}: {name}: {exc}") from None
        if not data[name][2]:
            raise UsageError(f"--data_dir {data_dir}: {name}: no scored pairs found")
    return data


def evaluate_loaded(encode: Encode, data: dict[str, Pairs], tasks=TASKS, align_uniform: bool = True
                    ) -> dict[str, float]:
    """:func:`evaluate_all` on what :func:`load_eval_data` returned."""
    results = {task: eval_pairs(encode, data[task]) for task in tasks}
    results["avg"] = sum(results[t] for t in tasks) / len(tasks)
    if align_uniform:
        results.update(alignment_uniformity(encode, data["stsb_dev"]))
    return results


def evaluate_all(encode: Encode, data_dir: str | Path, tasks=TASKS, align_uniform: bool = True) -> dict[str, float]:
    """Spearman x 100 of every task in ``tasks`` + ``avg`` (their mean) [+ alignment/uniformity on STS-B dev].

    Tasks whose files are missing raise :class:`~.errors.UsageError` (a partial average would mislead).
    """
    return evaluate_loaded(encode, load_eval_data(data_dir, tasks, align_uniform), tasks, align_uniform)
