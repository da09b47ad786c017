"""Benchmark: a small demo grid on a local Ray instance with 1 versus 2 worker CPUs.

    .venv/bin/python benchmarks/bench_ray_scaling.py [--repeats 2] [--epochs 4] [--configs 2]

Workload: ``--configs`` tiny 3D U-Nets (features 4, 6, 8, ...; 2 levels) x 2 cross-validation folds
on 8 synthetic phantoms of 16 x 64 x 64 voxels = 2 x ``--configs`` fold tasks, run as one grid
(:func:`femurseg.scale.distributed.run_jobs`, one :func:`femurseg.training.cv.run_cv` per configuration, all fold
tasks queued together). Every fold task requests ``num_cpus=1`` and uses 1 torch thread.

Conditions (rounds interleaved, the order alternating, so slow drifts of the machine's load hit
both): a local Ray instance started with ``num_cpus=1`` (one task at a time) and with
``num_cpus=2`` (two at once); also ``local`` (the local back-end, 1 thread, no Ray) as the
no-Ray reference. Before each timed grid the Ray workers are warmed up (torch and femurseg
imported in two worker processes), so worker start-up is not in the figure.

Reported per run: ``wall_s`` (whole grid: driver-side checks and preprocessing, fold training,
out-of-fold evaluation), ``folds_wall_s`` (first fold submitted -> last fold done),
``fold_train_s`` (sum of the folds' own training times, from summary.json), ``tasks_at_once``
(``fold_train_s / folds_wall_s``: how many fold tasks were training at the same time, on
average) and the 1-minute load average before and after. Writes ``benchmarks/results/ray_scaling.csv``: one row per run
plus ``median`` rows per condition with the speed-up over 1 worker CPU.

What it shows and what it does not: on the reference machine (2 cores shared with other jobs)
it checks that independent fold tasks do run concurrently and how much of the ideal 2x a
second worker CPU gives under that load; it says nothing about multi-node clusters (no
network, shared file system or object-store transfer costs) or GPUs.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from femurseg.inference.run import cpu_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

RESULTS = ROOT / "benchmarks" / "results" / "ray_scaling.csv"
SHAPE = (16, 64, 64)
PREP = {"crop_slices": None, "target_size": None, "scale": None}


def _load() -> float:
    return round(os.getloadavg()[0], 2)




def _grid(dataset: Path, out: Path, configs: int, epochs: int, backend: Any) -> tuple[float, float | None, float]:
    """Run the grid; returns (wall seconds, folds wall seconds or None, sum of fold training seconds)."""
    import torch

    from femurseg.scale.distributed import RayBackend, run_jobs
    from femurseg.training.cv import run_cv

    spans: list[tuple[float, float]] = []
    lock = threading.Lock()

    class TimedRay(RayBackend):
        def train_folds(self, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return super().train_folds(*args, **kwargs)
            finally:
                with lock:
                    spans.append((t0, time.perf_counter()))

    be = TimedRay(num_cpus=1, threads=1) if backend == "ray" else "local"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    kw = dict(prep_cfg=PREP, aug_cfg={"flip_p": 0.5}, folds=2, seed=0, progress=False,
              train_cfg={"max_epochs": epochs, "min_epochs": epochs, "threads": 1})
    jobs = [lambda i=i: run_cv(dataset, out / f"cfg{i}", backend=be,
                               model_cfg={"name": "unet3d", "features": 4 + 2 * i, "levels": 2, "dilations": None}, **kw)
            for i in range(configs)]
    prev = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        results = run_jobs(jobs, "ray" if backend == "ray" else "local")
    finally:
        torch.set_num_threads(prev)
    wall = time.perf_counter() - t0
    folds_wall = (max(e for _, e in spans) - min(s for s, _ in spans)) if spans else None
    train = sum(f["train_seconds"] for r in results for f in r.summary["folds"])
    return wall, folds_wall, train


def _warm_up(ray: Any, n: int) -> None:
    @ray.remote(num_cpus=1)
    def warm() -> int:
        import torch  # noqa: F401  (warm the import in the worker)

        import femurseg.training.cv  # noqa: F401

        time.sleep(0.5)
        return os.getpid()

    ray.get([warm.remote() for _ in range(n)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--configs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import ray
    import torch

    from femurseg.data.synth import synthesize

    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    rows: list[dict[str, Any]] = []
    try:
        ds = tmp / "ds"
        synthesize(ds, n=8, shape=SHAPE, progress=False)
        order = ["local", 1, 2]
        for r in range(args.repeats):
            for cond in (order if r % 2 == 0 else order[::-1]):
                if cond != "local":
                    ray.init(num_cpus=cond, include_dashboard=False, log_to_driver=False)
                    _warm_up(ray, cond)
                load0 = _load()
                wall, folds_wall, train = _grid(ds, tmp / "grid", args.configs, args.epochs,
                                                "local" if cond == "local" else "ray")
                if cond != "local":
                    ray.shutdown()
                row = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "row": "run", "round": r,
                       "condition": "local (no Ray)" if cond == "local" else f"ray num_cpus={cond}",
                       "worker_cpus": 1 if cond == "local" else cond, "fold_tasks": 2 * args.configs,
                       "epochs": args.epochs, "wall_s": round(wall, 2),
                       "folds_wall_s": "" if folds_wall is None else round(folds_wall, 2),
                       "fold_train_s": round(train, 2),
                       "tasks_at_once": "" if folds_wall is None else round(train / folds_wall, 2),
                       "speedup_vs_1cpu": "", "load_1min_start": load0,
                       "load_1min_end": _load()}
                rows.append(row)
                print(f"round {r}: {row['condition']:<18} wall {wall:7.1f} s  folds {row['folds_wall_s']!s:>7} s  "
                      f"sum of fold training {train:6.1f} s  load {load0} -> {row['load_1min_end']}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def med(cond: str, key: str) -> float | None:
        vals = [float(r[key]) for r in rows if r["condition"] == cond and r[key] != ""]
        return statistics.median(vals) if vals else None

    base = {k: med("ray num_cpus=1", k) for k in ("wall_s", "folds_wall_s")}
    for cond in ("local (no Ray)", "ray num_cpus=1", "ray num_cpus=2"):
        m = {k: med(cond, k) for k in ("wall_s", "folds_wall_s", "fold_train_s", "load_1min_start")}
        rows.append({"date": rows[-1]["date"], "row": "median", "round": "", "condition": cond,
                     "worker_cpus": rows[[r["condition"] for r in rows].index(cond)]["worker_cpus"],
                     "fold_tasks": 2 * args.configs, "epochs": args.epochs,
                     "wall_s": round(m["wall_s"], 2), "folds_wall_s": "" if m["folds_wall_s"] is None else round(m["folds_wall_s"], 2),
                     "fold_train_s": round(m["fold_train_s"], 2),
                     "tasks_at_once": "" if m["folds_wall_s"] is None else round(m["fold_train_s"] / m["folds_wall_s"], 2),
                     "speedup_vs_1cpu": (f"wall {base['wall_s'] / m['wall_s']:.2f}x"
                                         + (f"; folds {base['folds_wall_s'] / m['folds_wall_s']:.2f}x" if m["folds_wall_s"] else "")),
                     "load_1min_start": round(m["load_1min_start"], 2), "load_1min_end": ""})
    for r in rows:
        r.update({"cores": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__, "ray": ray.__version__})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("\nmedians:")
    for r in rows:
        if r["row"] == "median":
            print(f"  {r['condition']:<18} wall {r['wall_s']:7.1f} s  folds {r['folds_wall_s']!s:>7} s  {r['speedup_vs_1cpu']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
