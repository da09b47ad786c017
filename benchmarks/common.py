"""Shared helpers of the femurseg benchmark suite (``benchmarks/run_all.py``).

Why the suite measures the way it does
--------------------------------------
The reference machine has 2 CPU cores that other jobs share, so absolute times drift by a
factor of 2 or more within minutes. Every benchmark therefore runs femurseg and its peer(s)
**in one process, interleaved**: a warm-up call of every engine, then ``repeats`` rounds in
each of which every engine runs once (the order rotates from round to round). Each engine's
time is the **median** over the rounds and the headline figures are **ratios of medians**
(and the median of the per-round ratios, which cancels slow drifts even better).

Peak memory: ``resource.getrusage`` keeps one high-water mark per process, which is useless
for comparing engines in one process, so :class:`PeakRSS` samples the resident set size from
``/proc/self/statm`` in a background thread (every 2 ms) during one call of an engine and
reports the maximum **minus the RSS just before the call** (memory the call itself needed:
activations, workspaces, outputs; the weights are already resident). Importing this module
makes glibc return freed blocks of 1 MiB or more to the OS at once
(:func:`return_freed_memory_to_os`); otherwise memory recycled from an earlier call would not
show up as RSS growth.
"""

from __future__ import annotations

import argparse

import contextlib
import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def return_freed_memory_to_os(threshold: int = 1 << 20) -> bool:
    """Make glibc serve every allocation of ``threshold`` bytes or more with its own ``mmap`` (and
    unmap it on free), so the RSS drops when a tensor is freed and :class:`PeakRSS` sees each
    call's own peak. By default glibc raises its mmap threshold up to 32 MiB after large frees,
    so after a warm-up call tensors of a few MiB are recycled inside the heap and a second call
    shows (almost) no RSS growth. Returns False where this is not glibc (nothing changes)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, int(threshold))) and bool(libc.mallopt(m_trim_threshold,
                                                                                           int(threshold)))
    except (OSError, AttributeError):
        return False


MALLOC_FIXED = return_freed_memory_to_os()


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """CPU model name from ``lscpu`` (or /proc/cpuinfo)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from femurseg.inference.run import cpu_model as from_cpuinfo

    return from_cpuinfo()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_info() -> dict[str, Any]:
    """Date, CPU model, cores, memory, load and library versions (one dict, CSV-friendly)."""
    import torch

    flags = cpu_flags()
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        mem_gb = ""
    return {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "isa": "+".join(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


# ----------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Current resident set size of this process (bytes), from /proc/self/statm."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the (monotonic) high-water mark
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Context manager: ``.peak_mb`` = max RSS sampled during the block minus the RSS at entry (MiB).

    A background thread samples ``/proc/self/statm`` every ``interval`` seconds (and once at
    exit), so peaks shorter than the interval can be missed; 2 ms is far below the life
    time of the large activation tensors measured here.
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.base = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        import gc

        gc.collect()
        self.base = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = max(self.peak, rss_bytes())
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def peak_mb(self) -> float:
        return (self.peak - self.base) / 2**20

    @property
    def base_mb(self) -> float:
        return self.base / 2**20


def peak_memory_mb(fn: Callable[[], Any]) -> tuple[float, float]:
    """``(peak above baseline, baseline)`` in MiB for one call of ``fn`` (see :class:`PeakRSS`)."""
    with PeakRSS() as p:
        out = fn()
    del out
    return p.peak_mb, p.base_mb


# ----------------------------------------------------------------------------- timing


def interleaved(engines: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                log: Callable[[str], None] | None = None,
                peak_mb: dict[str, tuple[float, float]] | None = None,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Time every engine ``repeats`` times, interleaved (rotating order), after ``warmup`` calls each.

    Returns ``{name: [seconds, ...]}`` in round order (round r of every engine ran close in time).
    With ``peak_mb`` (a dict to fill), the first timed round also samples each engine's peak
    memory (:class:`PeakRSS`: ``(peak above the RSS before the call, that RSS)`` in MiB); the
    2 ms sampling thread costs nothing measurable next to calls of a second or more.
    With ``cpu`` (a dict to fill), also the process CPU seconds of every call (all threads):
    on an oversubscribed machine the wall time of a call depends on what else runs, its CPU
    time much less (compute-bound work; OpenMP barrier spinning adds a little).
    """
    names = list(engines)
    for _ in range(warmup):
        for n in names:
            engines[n]()
    times: dict[str, list[float]] = {n: [0.0] * repeats for n in names}
    cpu_times: dict[str, list[float]] = {n: [0.0] * repeats for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            sampler = PeakRSS() if (peak_mb is not None and r == 0) else contextlib.nullcontext()
            with sampler:
                c0, t0 = time.process_time(), time.perf_counter()
                out = engines[n]()
                times[n][r] = time.perf_counter() - t0
                cpu_times[n][r] = time.process_time() - c0
                del out
            if isinstance(sampler, PeakRSS) and peak_mb is not None:
                peak_mb[n] = (sampler.peak_mb, sampler.base_mb)
        if log:
            log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][r]:.3f}s ({cpu_times[n][r]:.1f} cpu-s)"
                                                           for n in names))
    if cpu is not None:
        cpu.update(cpu_times)
    return times


def median(v: Sequence[float]) -> float:
    return float(statistics.median(v))


def ratio_stats(times: dict[str, list[float]], num: str, den: str) -> tuple[float, float]:
    """``(median(num) / median(den), median over rounds of num_r / den_r)``: how many times faster
    ``den`` is than ``num``."""
    a, b = times[num], times[den]
    return median(a) / median(b), median([x / y for x, y in zip(a, b)])


@contextlib.contextmanager
def stopwatch() -> Iterator[list[float]]:
    """``with stopwatch() as t: ...`` then ``t[0]`` is the elapsed seconds."""
    box = [0.0]
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - t0


# ----------------------------------------------------------------------------- masks


def dice(a: Any, b: Any) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    import numpy as np

    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


# ----------------------------------------------------------------------------- output


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write ``rows`` (union of their keys as columns, in first-seen order) atomically."""
    from femurseg.core.errors import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        for k in r:
            if k not in fields:
                fields.append(k)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            for r in rows:
                w.writerow({k: _fmt(r.get(k, "")) for k in fields})
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def run_on_unseen_args(doc: str, argv: list[str] | None, *, cases: int, work: str) -> argparse.Namespace:
    """Arguments of a benchmark that applies one trained run to unseen phantoms: ``RUN`` (default
    ``demo_out/run``, what ``make demo`` writes; checked), ``--cases``, ``--seed`` (2000: no run has
    seen it), ``--work`` (``benchmarks/results/<work>``) and ``--out`` (``benchmarks/results``)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("run", nargs="?", type=Path, default=ROOT / "demo_out" / "run")
    ap.add_argument("--cases", type=int, default=cases)
    ap.add_argument("--seed", type=int, default=2000)
    ap.add_argument("--work", type=Path, default=RESULTS / work)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    if not (a.run / "config.json").exists():
        ap.error(f"{a.run}: not a run folder (make demo writes demo_out/run)")
    return a


def say(msg: str) -> None:
    print(msg, flush=True)


def default_threads(size: str) -> int:
    """Torch threads for a benchmark size: 2 (the reference machine's cores), 1 for ``tiny``.

    The tiny inputs of the tests are pure overhead: on a shared, oversubscribed machine every
    parallel region of a 2-thread op waits for both threads to be scheduled, which made a tiny
    training step 80x slower (1.9 s instead of 0.02 s) under a load average of 15.
    """
    return 1 if size == "tiny" else min(2, os.cpu_count() or 1)
