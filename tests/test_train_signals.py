"""Real signals to real ``simcse-train`` processes: SIGINT / SIGTERM save and exit 130 / 143, a second signal
exits at once, and a SIGSTOPped gloo rank makes the other rank fail within ``--dist_timeout``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, tiny_model_and_corpus

from simcse_kernels.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]

# simcse-train with each step slowed to >= 0.3 s, so a signal lands inside a step.
SLOW_TRAIN = """
import sys, time
from simcse_kernels.train import trainer
real = trainer.Trainer.train_step
def slow(self):
    rec = real(self)
    time.sleep(0.3)
    return rec
trainer.Trainer.train_step = slow
from simcse_kernels.train.cli import train_main
sys.exit(train_main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_model_and_corpus(tmp_path_factory.mktemp("signals"))


def _start(inputs, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    model_dir, corpus = inputs
    args = ["--model", str(model_dir), "--train_file", str(corpus), "--output_dir", str(out), "--batch_size", "4",
            "--max_steps", "100000", "--log_every", "1", "--eval_every", "none", "--no-progress",
            "--max_length", "16", "--threads", "1", *extra]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env)


def _wait_for_steps(proc: subprocess.Popen, out: Path, steps: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.communicate()}")
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the run did not reach its steps in time")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_first_signal_saves_and_exits(inputs, tmp_path, sig, code):
    out = tmp_path / "run"
    proc = _start(inputs, out)
    _wait_for_steps(proc, out, 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"simcse-train: {signal.Signals(sig).name} received: stopped after step "), err
    assert "run the same command again to resume" in last and "Traceback" not in err
    path = ckpt.latest_checkpoint(out)
    assert path is not None and str(path) in last
    step = int(path.name.split("-")[1])
    assert step >= 2 and step == len((out / "metrics.jsonl").read_text().splitlines())
    assert not (out / "final").exists()


def test_second_signal_exits_at_once(inputs, tmp_path):
    out = tmp_path / "run"
    proc = _start(inputs, out)
    _wait_for_steps(proc, out, 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)  # inside the same (0.3 s) step
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "received" not in err and "Traceback" not in err
    assert ckpt.latest_checkpoint(out, warn=False) is None  # it did not wait to save


def test_stopped_rank_fails_the_other_within_dist_timeout(inputs, tmp_path):
    out = tmp_path / "run"
    port = str(free_port())
    procs = [_start(inputs, out, "--dist_timeout", "5", env={
        "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        for r in range(2)]
    try:
        _wait_for_steps(procs[0], out, 2, timeout=120)
        os.kill(procs[1].pid, signal.SIGSTOP)
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    lines = err.strip().splitlines()
    assert procs[0].returncode == 1, err
    assert lines[-1].startswith("simcse-train: error: rank 0: ") and "--dist_timeout 5 s" in lines[-1], err
    assert waited < 5 + 20, waited  # the timeout plus one step and the exit
