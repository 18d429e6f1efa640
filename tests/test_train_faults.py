"""Trainer fault injection: killed exports, corrupted checkpoints, non-finite steps, full disks, changed
flags on resume, a second run on one folder, a missing ``[train]`` extra.

Every case injects the fault (SIGKILL inside an export, bytes overwritten in ``state.pt``, a NaN weight,
``OSError(ENOSPC)`` raised inside the write path) and checks what the run does next. Signals and two
concurrent runs are in ``test_train_signals.py``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_and_corpus

from simcse_kernels.train import checkpoint as ckpt
from simcse_kernels.train import trainer as trainer_mod
from simcse_kernels.train.cli import eval_main, train_main
from simcse_kernels.train.errors import TrainingStopped, UsageError
from simcse_kernels.train.model import check_model
from simcse_kernels.train.trainer import TrainConfig, Trainer, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_model_and_corpus(tmp_path_factory.mktemp("faults"))


def _cfg(inputs, out, **changes) -> TrainConfig:
    model_dir, corpus = inputs
    base = dict(model=str(model_dir), train_file=str(corpus), output_dir=str(out), batch_size=4, max_steps=4,
                lr=1e-3, log_every=1, save_every=2, eval_every=None, progress=False, max_length=16, threads=1)
    base.update(changes)
    return TrainConfig(**base)


def _run_py(code: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


# ---- 1. atomic exports ----------------------------------------------------------------------------------
def test_export_killed_midway_leaves_no_model_folder(inputs, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(inputs, out)
    code = f"""
import os, signal
from simcse_kernels.train import checkpoint as ckpt
from simcse_kernels.train.trainer import TrainConfig, train
real = ckpt.write_export
def killed(model, tokenizer, path, n):
    model.encoder.save_pretrained(path)   # part of the export, then SIGKILL (no tokenizer written)
    os.kill(os.getpid(), signal.SIGKILL)
ckpt.write_export = killed
train(TrainConfig(**{vars(cfg)!r}))
"""
    proc = _run_py(code)
    assert proc.returncode == -9, proc.stderr
    tmp = out / ".tmp-export-final"
    assert (tmp / "model.safetensors").is_file() and not (out / "final").exists()
    with pytest.raises(UsageError, match="unfinished export"):
        check_model(str(tmp))
    trainer = Trainer(_cfg(inputs, out))  # the next start clears the leftover
    assert not tmp.exists()
    trainer.release_lock()


def test_killed_between_the_renames_keeps_the_previous_export(tmp_path):
    out = tmp_path / "run"
    old = out / ".tmp-export-final.old"  # a kill after moving final/ aside, before the new one arrived
    old.mkdir(parents=True)
    (old / "config.json").write_text("{}")
    (out / ".tmp-export-best").mkdir()  # and a half-written best/
    ckpt.remove_temporaries(out)
    assert sorted(p.name for p in out.iterdir()) == ["final"] and (out / "final" / "config.json").is_file()


def test_incomplete_export_refused_by_eval_and_loader(inputs, tmp_path, capfd):
    train(_cfg(inputs, tmp_path / "run", save_every=None))
    final = tmp_path / "run" / "final"
    files = json.loads((final / "simcse_config.json").read_text())["files"]
    assert "model.safetensors" in files and "tokenizer.json" in files
    (final / "tokenizer.json").unlink()  # as a kill of a non-atomic export would leave it
    sts12 = tmp_path / "data" / "sts" / "STS12-en-test"  # just enough for --tasks STS12 --no_align_uniform
    sts12.mkdir(parents=True)
    (sts12 / "STS.input.a.txt").write_text("a cat\tthe cat\na dog\ta bird\n")
    (sts12 / "STS.gs.a.txt").write_text("4.5\n1.0\n")
    capfd.readouterr()
    rc = eval_main(["--model", str(final), "--data_dir", str(tmp_path / "data"), "--tasks", "STS12",
                    "--no_align_uniform"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "incomplete export" in err[0] and "tokenizer.json" in err[0], err
    from simcse_kernels.train.model import SimCSEModel

    with pytest.raises(UsageError, match="incomplete export"):
        SimCSEModel.from_pretrained(str(final))


# ---- 2. verified checkpoints -------------------------------------------------------------------------------
def _corrupt(state: Path, how: str) -> None:
    data = state.read_bytes()
    if how == "truncated":
        state.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        state.write_bytes(os.urandom(len(data)))
    elif how == "empty":
        state.write_bytes(b"")
    elif how == "bitflip_4k":  # inside a tensor: torch.load would accept it
        mid = len(data) // 2
        state.write_bytes(data[:mid] + b"\xff" * 4096 + data[mid + 4096:])


@pytest.fixture(scope="module")
def two_checkpoints(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpts") / "run"
    train(_cfg(inputs, out))
    assert [p.name for p in ckpt.checkpoint_folders(out)] == ["step-0000002", "step-0000004"]
    return out


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "bitflip_4k"])
def test_bad_newest_checkpoint_falls_back(inputs, two_checkpoints, tmp_path, capfd, how):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    _corrupt(out / "checkpoints" / "step-0000004" / "state.pt", how)
    capfd.readouterr()
    trainer = Trainer(_cfg(inputs, out))
    trainer.maybe_resume()
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert trainer.step == 2
    assert len(err) == 1 and err[0].startswith("warning: skipping checkpoint") and "step-0000004" in err[0], err
    trainer.fit()  # finishes from step 2, exports finite weights
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert ckpt.verify_checkpoint(out / "checkpoints" / "step-0000004") is None  # rewritten
    trainer.release_lock()


def test_orphans_do_not_count_towards_keep(inputs, two_checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    ck = out / "checkpoints"
    (ck / ".tmp-step-0000009-123").mkdir()
    (ck / ".tmp-step-0000009-123" / "state.pt").write_bytes(b"x" * 100)
    for name in ("step-0000007", "step-0000008"):  # newer than every good one: would win a name sort
        (ck / name).mkdir()
        (ck / name / "state.pt.tmp").write_bytes(b"partial")
    trainer = Trainer(_cfg(inputs, out, max_steps=6, keep_checkpoints=2, resume_changed=True))
    assert not (ck / ".tmp-step-0000009-123").exists()
    trainer.maybe_resume()
    assert trainer.step == 4
    trainer.fit()
    assert [p.name for p in ckpt.checkpoint_folders(out)] == ["step-0000004", "step-0000006"]
    trainer.release_lock()


# ---- 3. non-finite guard ----------------------------------------------------------------------------------
def _poison_at(step: int, trainer: Trainer):
    def hook(rec):
        if rec["step"] == step:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))
    return hook


def test_nan_stops_before_the_step_and_exports_nothing(inputs, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(_cfg(inputs, out))
    with pytest.raises(TrainingStopped, match=r"^step 3: loss is nan \(non-finite\)") as info:
        trainer.fit(on_step=_poison_at(2, trainer))
    assert info.value.exit_code == 1
    assert not (out / "final").exists()
    assert ckpt.latest_checkpoint(out).name == "step-0000002"
    trainer.release_lock()


def test_infinite_grad_norm_stops_from_the_cli(inputs, tmp_path, capfd):
    model_dir, corpus = inputs
    capfd.readouterr()
    rc = train_main(["--model", str(model_dir), "--train_file", str(corpus), "--output_dir", str(tmp_path / "r"),
                     "--batch_size", "4", "--max_steps", "2", "--temperature", "1e-30", "--no-progress",
                     "--max_length", "16", "--eval_every", "none", "--threads", "1"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 1, err
    assert len(err) == 1 and err[0].startswith("simcse-train: error: step 1: grad norm is inf"), err
    assert not (tmp_path / "r" / "final").exists()


def test_skip_counts_and_stops_after_consecutive_skips(inputs, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(_cfg(inputs, out, max_steps=20, on_nonfinite="skip", max_skipped_steps=3, save_every=None))
    with pytest.raises(TrainingStopped, match="more than --max_skipped_steps 3 non-finite steps in a row"):
        trainer.fit(on_step=_poison_at(2, trainer))
    assert trainer.step == 5 and trainer.skipped_total == 4  # steps 3, 4, 5 skipped; the 4th stops
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r.get("skipped")] == [3, 4, 5]
    trainer.release_lock()


def test_skip_recovers_when_the_fault_passes(inputs, tmp_path, monkeypatch):
    trainer = Trainer(_cfg(inputs, tmp_path / "run", max_steps=5, on_nonfinite="skip", save_every=None))
    real = trainer.forward_backward
    calls = []

    def once_nan(batch, idx=None):  # step 2's loss is NaN (an injected fault); the other steps are normal
        loss, mlm = real(batch, idx)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), mlm

    monkeypatch.setattr(trainer, "forward_backward", once_nan)
    summary = trainer.fit()
    assert summary["skipped_steps"] == 1 and trainer.step == 5
    assert (tmp_path / "run" / "final" / "simcse_config.json").is_file()
    trainer.release_lock()


def test_nan_dev_score_is_never_best(inputs, tmp_path, monkeypatch):
    trainer = Trainer(_cfg(inputs, tmp_path / "run"))
    scores = iter([float("nan"), 12.5, float("nan"), 3.0])
    monkeypatch.setattr(trainer, "evaluate_dev", lambda: next(scores))
    bests = []
    for _ in range(4):
        trainer._eval_and_select()
        bests.append(trainer.best)
    assert bests[0] is None and bests[1:] == [12.5, 12.5, 12.5]
    trainer.release_lock()


# ---- 5. write failures ------------------------------------------------------------------------------------
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_enospc_in_checkpoint_save(inputs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(_cfg(inputs, out))
    real = ckpt.write_bytes_durably

    def full_at_step_4(path, data):
        if "step-0000004" in str(path):
            _enospc()
        real(path, data)

    monkeypatch.setattr(ckpt, "write_bytes_durably", full_at_step_4)
    with pytest.raises(TrainingStopped) as info:
        trainer.fit()
    msg = str(info.value)
    assert "\n" not in msg and "No space left on device" in msg and "step-0000004" in msg, msg
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]  # no temporary left
    assert ckpt.verify_checkpoint(out / "checkpoints" / "step-0000002") is None
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    trainer.release_lock()


def test_enospc_in_metrics_and_export(inputs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(_cfg(inputs, out))
    trainer.log({"step": 1, "loss": 1.0})
    before = (out / "metrics.jsonl").read_bytes()
    monkeypatch.setattr(trainer_mod.os, "fsync", _enospc)
    with pytest.raises(TrainingStopped, match="metrics.jsonl: No space left on device"):
        trainer.log({"step": 2, "loss": 0.5})
    assert (out / "metrics.jsonl").read_bytes() == before  # no cut line
    with pytest.raises(TrainingStopped, match="No space left on device"):
        ckpt.export_model(trainer.model, trainer.tokenizer, out / "final")
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == [".lock", "metrics.jsonl"]
    trainer.release_lock()


def test_cut_metrics_line_dropped_on_resume(inputs, two_checkpoints, tmp_path, capfd):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 0.12')
    capfd.readouterr()
    trainer = Trainer(_cfg(inputs, out, max_steps=6, resume_changed=True))
    trainer.maybe_resume()
    assert "dropping a cut last line" in capfd.readouterr().err
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    trainer.release_lock()


# ---- 6. one run per folder --------------------------------------------------------------------------------
def test_second_run_on_a_folder_is_refused(inputs, tmp_path):
    model_dir, corpus = inputs
    out = tmp_path / "run"
    trainer = Trainer(_cfg(inputs, out))  # holds the lock (this process)
    code = f"""
import sys
from simcse_kernels.train.cli import train_main
sys.exit(train_main(["--model", {str(model_dir)!r}, "--train_file", {str(corpus)!r}, "--output_dir", {str(out)!r},
                     "--batch_size", "4", "--max_steps", "2", "--no-progress", "--eval_every", "none"]))
"""
    proc = _run_py(code)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert err == [f"simcse-train: error: {out} is in use by pid {os.getpid()}"]
    trainer.release_lock()
    proc = _run_py(code)  # released: the run goes ahead
    assert proc.returncode == 0, proc.stderr


# ---- 7. resume checks -------------------------------------------------------------------------------------
def test_changed_flags_on_resume(inputs, two_checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    trainer = Trainer(_cfg(inputs, out, lr=5e-4, temperature=0.1, seed=7, max_steps=8))
    with pytest.raises(UsageError) as info:
        trainer.maybe_resume()
    msg = str(info.value)
    assert "\n" not in msg
    for part in ("--lr 0.001 -> 0.0005", "--temperature 0.05 -> 0.1", "--seed 42 -> 7", "--max_steps 4 -> 8",
                 "--resume_changed"):
        assert part in msg, msg
    trainer.release_lock()

    trainer = Trainer(_cfg(inputs, out, lr=5e-4, max_steps=8, warmup_steps=0, resume_changed=True))
    trainer.maybe_resume()
    assert trainer.step == 4
    expected = 5e-4 * (8 - 4) / 8  # the new peak lr on the new 8-step linear decay, at step 4
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([expected] * 2, rel=1e-12)
    trainer.fit()
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in recs if r["step"] > 4}
    assert lrs == pytest.approx({s: 5e-4 * (8 - s) / 8 for s in range(5, 9)}, rel=1e-12)
    trainer.release_lock()


def test_different_world_size_on_resume(inputs, two_checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    trainer = Trainer(_cfg(inputs, out))
    trainer.world = 2  # as a 2-process torchrun resuming a 1-process run would see it
    with pytest.raises(UsageError, match=r"written by a run on 1 process\(es\); this run has 2"):
        trainer.maybe_resume()
    trainer.release_lock()


# ---- 9. new-user findings ---------------------------------------------------------------------------------
def test_output_dir_under_a_file(inputs, tmp_path, capfd):
    model_dir, corpus = inputs
    (tmp_path / "a_file").write_text("x")
    capfd.readouterr()
    rc = train_main(["--model", str(model_dir), "--train_file", str(corpus), "--output_dir",
                     str(tmp_path / "a_file" / "run"), "--batch_size", "4", "--no-progress"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "a_file is not a folder" in err[0], err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into any folder")
def test_output_dir_under_an_unwritable_folder(inputs, tmp_path, capfd):
    model_dir, corpus = inputs
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    capfd.readouterr()
    rc = train_main(["--model", str(model_dir), "--train_file", str(corpus), "--output_dir", str(ro / "run"),
                     "--batch_size", "4", "--no-progress"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is not writable" in err[0], err


@pytest.mark.parametrize("main", ["train_main", "eval_main"])
def test_clis_without_transformers(main):
    code = f"""
import sys
sys.modules["transformers"] = None  # as on a base install without the [train] extra
from simcse_kernels.train.cli import {main}
sys.exit({main}(["--model", "m", "--train_file", "t", "--output_dir", "o", "--data_dir", "d"][:6 if "{main}" == "train_main" else 2] + (["--data_dir", "d"] if "{main}" == "eval_main" else [])))
"""
    proc = _run_py(code)
    prog = "simcse-train" if main == "train_main" else "simcse-eval"
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f'{prog}: error: transformers is not installed; pip install "simcse-kernels[train]"']



@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (a real full disk); skipped where this process may not mount one."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_on_a_small_tmpfs(inputs, small_tmpfs):
    out = small_tmpfs / "run"
    trainer = Trainer(_cfg(inputs, out, max_steps=1000, save_every=1, keep_checkpoints=1000))
    with pytest.raises(TrainingStopped) as info:
        trainer.fit()
    msg = str(info.value)
    assert "\n" not in msg and "No space left on device" in msg and str(out) in msg, msg
    folders = ckpt.checkpoint_folders(out)
    assert len(folders) >= 2 and not list((out / "checkpoints").glob(".tmp-*"))  # the temporary is removed
    assert all(ckpt.verify_checkpoint(p) is None for p in folders)  # every earlier checkpoint intact
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= len(folders)
    trainer.release_lock()
