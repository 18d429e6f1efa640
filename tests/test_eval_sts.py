"""STS / SICK loaders on small fixture files with the real formats' quirks, scoring, and simcse-eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from simcse_kernels.train import sts_eval
from simcse_kernels.train.cli import eval_main, train_main
from simcse_kernels.train.tiny import build_tiny_bert

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WORDS = ["a man plays guitar", "a man plays a guitar", "the cat sleeps", "a dog runs", "kids swim",
         "a woman cooks rice", "the sky is blue", "two men talk", "a bird flies", "the car is red"]


def _write_fixtures(root: Path) -> None:
    sts = root / "sts"
    for year in sts_eval.STS_YEARS:
        d = sts / f"{year}-en-test"
        d.mkdir(parents=True)
        # subset "b": one unscored line (empty gold) that must be skipped, UTF-8 text
        (d / "STS.input.a.txt").write_text("\n".join(f"{WORDS[i]}\t{WORDS[(i + 1) % 10]}" for i in range(6)) + "\n")
        (d / "STS.gs.a.txt").write_text("\n".join(str(i * 0.5) for i in range(6)) + "\n")
        (d / "STS.input.b.txt").write_text("café au lait\tcoffee\nx\ty\nthe cat sleeps\ta cat sleeps\n", encoding="utf-8")
        (d / "STS.gs.b.txt").write_text("1.0\n\n4.5\n")
    for name in ("STSBenchmark-senteval",):
        d = sts / name
        d.mkdir()
        lines = []
        for i in range(12):
            extra = "\textra1\textra2" if i % 5 == 0 else ""  # 2 trailing fields on some lines
            quote = '"' if i == 3 else ""  # a stray quote, no quote handling
            lines.append(f"main-captions\tMSRvid\t2012test\t{i:04d}\t{(i % 6) * 1.0:.3f}\t{quote}{WORDS[i % 10]}"
                         f"\t{WORDS[(i * 3) % 10]}{extra}")
        for split in ("dev", "test", "train"):
            (d / f"sts-{split}.csv").write_text("\n".join(lines) + "\n")
    sick = root / "sick"
    sick.mkdir()
    rows = ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"]
    rows += [f"{i}\t{WORDS[i]}\t{WORDS[(i + 2) % 10]}\t{1 + (i % 5) * 0.9:.1f}\tNEUTRAL" for i in range(8)]
    (sick / "SICK_test_annotated.txt").write_bytes(("\r\n".join(rows) + "\r\n").encode())


@pytest.fixture()
def data_dir(tmp_path):
    _write_fixtures(tmp_path)
    return tmp_path


def test_loaders_handle_format_quirks(data_dir):
    s1, s2, gold = sts_eval.load_sts_year(data_dir, "STS12")
    assert len(s1) == len(s2) == len(gold) == 8  # 6 + 2 scored of 3 in subset b
    assert s1[6] == "café au lait" and gold[7] == 4.5 and "x" not in s1
    s1, s2, gold = sts_eval.load_stsb(data_dir, "dev")
    assert len(gold) == 12 and s1[3].startswith('"') and s2[0] == WORDS[0] and gold[5] == 5.0
    s1, s2, gold = sts_eval.load_sick(data_dir)
    assert len(gold) == 8 and gold[-1] == pytest.approx(1 + 2 * 0.9) and not s2[-1].endswith("\r")


def test_spearman_and_alignment_uniformity_match_naive():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(0)
    e1, e2 = torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g)
    gold = torch.rand(20, generator=g).mul(5).tolist()
    cos = [F.cosine_similarity(e1[i : i + 1].double(), e2[i : i + 1].double()).item() for i in range(20)]
    assert sts_eval.spearman_of_cosine(e1, e2, gold) == pytest.approx(100 * spearmanr(cos, gold)[0], abs=1e-10)

    sents1, sents2 = [f"s{i}" for i in range(20)], [f"t{i}" for i in range(20)]
    table = dict(zip(sents1 + sents2, torch.cat([e1, e2])))
    encode = lambda s: torch.stack([table[x] for x in s])
    res = sts_eval.alignment_uniformity(encode, (sents1, sents2, gold))
    n1, n2 = F.normalize(e1.double(), dim=-1), F.normalize(e2.double(), dim=-1)
    pos = [i for i in range(20) if gold[i] > 4]
    align = sum((n1[i] - n2[i]).norm() ** 2 for i in pos) / len(pos)
    allv = torch.cat([n1, n2])
    pairs = [(allv[i] - allv[j]).norm() ** 2 for i in range(40) for j in range(i + 1, 40)]
    uniform = torch.log(sum(torch.exp(-2 * d) for d in pairs) / len(pairs))
    assert res["alignment"] == pytest.approx(float(align), rel=1e-10)
    assert res["uniformity"] == pytest.approx(float(uniform), rel=1e-10)


def test_train_and_eval_cli_end_to_end(data_dir, tmp_path, capsys):
    model_dir = build_tiny_bert(tmp_path / "tiny", WORDS * 2)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(WORDS * 2) + "\n")
    out = tmp_path / "run"
    capsys.readouterr()  # drop build_tiny_bert's own save_pretrained output
    assert train_main(["--model", str(model_dir), "--train_file", str(corpus), "--output_dir", str(out),
                       "--batch_size", "4", "--max_steps", "4", "--eval_every", "2", "--eval_before",
                       "--data_dir", str(data_dir), "--pooler", "cls", "--mlp_only_train",
                       "--grad_cache_chunk", "2", "--no-progress", "--precision", "bf16"]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "stsb_dev_spearman" in r] == [0, 2, 4]
    assert (out / "best" / "modules.json").is_file() and (out / "final" / "config.json").is_file()
    res_file = tmp_path / "res.json"
    assert eval_main(["--model", str(out / "final"), "--data_dir", str(data_dir), "--output", str(res_file)]) == 0
    res = json.loads(res_file.read_text())
    assert set(res) == {*sts_eval.TASKS, "avg", "alignment", "uniformity"}
    assert res["avg"] == pytest.approx(sum(res[t] for t in sts_eval.TASKS) / 7)
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "pooler: cls (from --pooler)"  # simcse-train
    assert "pooler: cls (from the model's simcse_config.json)" in lines  # simcse-eval of final/
    dev = {r["step"]: r["stsb_dev_spearman"] for r in recs if "stsb_dev_spearman" in r}
    best = {r["step"]: r["best"] for r in recs if "best" in r}
    for step in (2, 4):  # each evaluation is one console line (tqdm.write), as in metrics.jsonl
        assert f"step {step}: STS-B dev Spearman {dev[step]:.2f} (best {best[step]:.2f})" in lines
    assert "STS-B dev Spearman after training" in captured.out
    assert "Writing model shards" not in captured.err  # transformers' save bars are silenced


def test_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    assert eval_main(["--model", "x", "--data_dir", str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err.strip() == f"simcse-eval: error: --data_dir {tmp_path / 'absent'}: no sts/ folder there"


@pytest.mark.skipif(not (SHARED_DATA / "sts").is_dir(), reason="shared/data beside the repo is absent")
def test_real_files_load_with_documented_counts():
    counts = {"STS12": 3108, "STS13": 1500, "STS14": 3750, "STS15": 3000, "STS16": 1186}
    for year, n in counts.items():
        assert len(sts_eval.load_sts_year(SHARED_DATA, year)[2]) == n
    assert len(sts_eval.load_stsb(SHARED_DATA, "dev")[2]) == 1500
    assert len(sts_eval.load_stsb(SHARED_DATA, "test")[2]) == 1379
    assert len(sts_eval.load_sick(SHARED_DATA)[2]) == 4927
