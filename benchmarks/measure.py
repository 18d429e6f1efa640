"""Timing and peak-memory measurement, with out-of-memory detection.

* Time: CUDA events around each call on GPU (after a device sync), ``time.perf_counter`` on CPU.
* GPU memory: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
  memory allocated before the call (inputs) -> the *extra* memory of the call.
* CPU memory: peak RSS growth of one call, measured in a spawned worker subprocess
  (:class:`CpuMemoryWorker`) whose allocator returns memory to the OS (``MALLOC_MMAP_THRESHOLD_``),
  with the peak (``VmHWM``) reset through ``/proc/self/clear_refs`` before each call.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable

import torch


def is_oom(exc: BaseException) -> bool:
    """True for a CUDA/CPU out-of-memory error (``OutOfMemoryError`` or a RuntimeError saying so)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in msg or "can't allocate memory" in msg or isinstance(exc, MemoryError)
    )


def free_memory(device: torch.device, collect: bool = False) -> None:
    """Return cached device memory (between providers); ``collect``: also run the garbage collector
    (after an OOM, whose traceback holds tensors; skipped otherwise: slow with large imports)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, n_calls: int) -> list[float]:
    """Wall time in seconds of each of ``n_calls`` calls of ``fn`` (already warmed up).

    Args:
        fn: a no-argument callable (one loss call, forward or forward+backward).
        device: CUDA -> CUDA events recorded around each call; else ``time.perf_counter``.
        n_calls: how many timed calls.
    """
    if device.type == "cuda":
        sync(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n_calls)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        sync(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for _ in range(n_calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def timed_once(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """(result, seconds) of one synchronized call (used for warm-up; includes compilation)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def summarize(times: list[float]) -> dict[str, float]:
    """Median, quartiles, min and max of a list of seconds, in milliseconds."""
    ms = sorted(t * 1e3 for t in times)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return dict(time_ms_median=statistics.median(ms), time_ms_q25=q1, time_ms_q75=q3, time_ms_min=ms[0],
                time_ms_max=ms[-1], n_samples=len(ms))


def cuda_extra_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by one call of ``fn`` beyond what was allocated before it (GPU)."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


# --------------------------------------------------------------------------------------------------
# CPU: peak RSS in a subprocess


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _worker_main(conn, threads: int) -> None:
    """Worker loop: receive a task dict, run one call, send back the extra peak RSS in bytes."""
    torch.set_num_threads(threads)
    import providers  # noqa: PLC0415  (spawned: the parent's sys.path holds benchmarks/)

    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if task is None:
            return
        try:
            prov = providers.PROVIDERS[task["provider"]]
            backward = task["pass"] == "fwdbwd"
            fn = prov.make(task["mode"], backward, task["d"])
            a, p, n = providers.make_inputs(task["n"], task["d"], task["mode"], dtype=getattr(torch, task["dtype"]),
                                            device="cpu", seed=task["seed"], requires_grad=backward)
            fn(a, p, n)  # warm-up (lazy init, compilation)
            for t in (a, p, n):
                if t is not None:
                    t.grad = None
            _malloc_trim()
            if not _reset_peak_rss():
                conn.send(("error", "cannot reset peak RSS (/proc/self/clear_refs)"))
                continue
            base = _status_kib("VmRSS")
            t0 = time.perf_counter()
            fn(a, p, n)
            seconds = time.perf_counter() - t0
            peak = _status_kib("VmHWM")
            conn.send(("ok", dict(bytes=(peak - base) * 1024, seconds=seconds)))
        except Exception as exc:  # reported to the parent, which records it
            if isinstance(exc, (BrokenPipeError, EOFError)):
                return
            try:
                conn.send(("oom" if is_oom(exc) else "error", f"{type(exc).__name__}: {exc}"[:300]))
            except (BrokenPipeError, EOFError, OSError):
                return


class CpuMemoryWorker:
    """A spawned subprocess that measures the peak RSS growth of one provider call per task.

    Task: dict(provider, mode, pass, n, d, dtype (torch attribute name, e.g. "float32"), seed).
    ``measure(task)`` returns ``("ok", {"bytes": extra peak RSS, "seconds": time of the call})``,
    ``("oom", message)`` or ``("error", message)``.
    """

    def __init__(self, threads: int | None = None):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        saved = {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
        # fixed thresholds: every block >= 64 KiB is its own mapping, unmapped on free
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.environ["MALLOC_TRIM_THRESHOLD_"] = "65536"
        try:
            self._proc = ctx.Process(target=_worker_main, args=(child, threads or torch.get_num_threads()), daemon=True)
            self._proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()

    def measure(self, task: dict, timeout: float = 600.0) -> tuple[str, object]:
        self._conn.send(task)
        if not self._conn.poll(timeout):
            self.close(kill=True)
            return "error", f"memory worker timed out after {timeout:.0f} s"
        return self._conn.recv()

    def alive(self) -> bool:
        return self._proc.is_alive()

    def close(self, kill: bool = False) -> None:
        if self._proc.is_alive():
            if kill:
                self._proc.kill()
            else:
                with contextlib.suppress(OSError, BrokenPipeError):
                    self._conn.send(None)
                self._proc.join(timeout=10)
                if self._proc.is_alive():
                    self._proc.kill()
        self._proc.join(timeout=5)
