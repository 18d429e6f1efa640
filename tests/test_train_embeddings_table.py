"""benchmarks/embeddings_table.py: skips without the shared data; builds SNLI triples; the table from rows."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("_bench_embeddings_table", ROOT / "benchmarks" / "embeddings_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_skips_with_a_reason_without_data(tmp_path, capsys):
    table = _module()
    assert table.main(["--data_dir", str(tmp_path / "absent"), "--out", str(tmp_path / "out")]) == 0
    assert "skipped: the shared data is absent" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_snli_triples_group_by_premise(tmp_path):
    table = _module()
    folder = tmp_path / "nli" / "snli_senteval"
    folder.mkdir(parents=True)
    rows = [("p1", "e1", "entailment"), ("p1", "c1", "contradiction"), ("p1", "n1", "neutral"),
            ("p2", "e2", "entailment"), ("p3", "c3", "contradiction"), ("p3", "e3", "entailment")]
    for split in ("dev", "test"):
        part = rows[:3] if split == "dev" else rows[3:]
        for i, name in enumerate(("s1", "s2", "labels")):
            (folder / f"{name}.{split}").write_text("".join(f"{r[i]} \n" for r in part))
    out = table.snli_triples_csv(tmp_path, tmp_path / "t.csv")
    assert list(csv.reader(out.open())) == [["sent0", "sent1", "hard_neg"], ["p1", "e1", "c1"], ["p3", "e3", "c3"]]


def test_table_and_plot_from_rows(tmp_path):
    table = _module()
    out = tmp_path / "out"
    (out / "rows").mkdir(parents=True)
    for i, name in enumerate(("cnn_untrained", "minilm_untrained")):
        row = {"row": name, "label": table.ROWS[name][0], **{c: 10.0 + i for c in table.TASK_COLUMNS},
               "stsb_dev": 50.0 + i, "alignment": 0.3, "uniformity": -2.0, "sentences_per_s": 100.0 * (2 - i),
               "parameters": 12_000_000, "points": [{"step": 0, "alignment": 0.3, "uniformity": -2.0}]}
        (out / "rows" / f"{name}.json").write_text(json.dumps(row))
    args = table.main.__globals__["argparse"].Namespace(out=out, steps=5, batch=4, max_length=8, eval_every=5,
                                                        data_dir=tmp_path / "data")
    table.write_table(args)
    md = (out / "table.md").read_text().splitlines()
    assert md[2].startswith("| TextCNN (MiniLM table), untrained | 10.00 |") and "| 2.0x | 12.0M |" in md[2]
    assert "| 1.0x |" in md[3] and "Budget: 5 steps x batch 4 x max_length 8" in (out / "table.md").read_text()
    assert (out / "table.csv").is_file()
    assert (out / "align_uniform.png").stat().st_size > 1000 or not _has_matplotlib()


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None
