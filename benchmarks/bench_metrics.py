"""Benchmark: femurseg surface metrics (ASD, MSD, HD95) against MONAI's.

    .venv/bin/python benchmarks/bench_metrics.py [--shape 48 512 512] [--spacing 1.5 0.234 0.234] [--repeats 3]

Builds a femur-like reference (union of three axis-aligned ellipsoids: head, neck,
trochanter/shaft, with a smooth random boundary perturbation) and a "prediction"
(the same shape with another perturbation: DSC about 0.96 and ASD about 0.4 mm, as
in 001; plus a small false-positive blob a few mm away), then times

* femurseg: ``metrics.surface_metrics`` (one call gives asd, msd and hd95), with the
  default sparse ``shell`` method and with the dense ``edt`` method;
* MONAI: ``compute_average_surface_distance(symmetric=True)``,
  ``compute_hausdorff_distance()`` and ``compute_hausdorff_distance(percentile=95)``
  (three calls; the float tensors are made before timing).

Prints a table and writes ``benchmarks/results/metrics.csv``. Times are wall-clock
seconds, the minimum (and median) over ``repeats``, plus the minimum process CPU time
(all threads; less sensitive to other load on a shared machine). femurseg is
single-threaded; MONAI/torch runs with torch's default thread count.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from femurseg.core.errors import atomic_path  # noqa: E402
from femurseg.evaluation import metrics  # noqa: E402
from femurseg.inference.run import cpu_model

RESULTS = ROOT / "benchmarks" / "results" / "metrics.csv"




def _smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, cells: int = 8) -> np.ndarray:
    """Smooth noise in [-1, 1]-ish: coarse Gaussian noise, blurred and upsampled to ``shape``."""
    coarse = ndimage.gaussian_filter(rng.standard_normal([max(2, s // cells) for s in shape]), 1.0)
    coarse /= np.abs(coarse).max()
    zoom = [s / c for s, c in zip(shape, coarse.shape)]
    return ndimage.zoom(coarse, zoom, order=1, grid_mode=True, mode="nearest").astype(np.float32)[
        tuple(slice(0, s) for s in shape)
    ]


def femur_like_masks(
    shape: tuple[int, int, int] = (48, 512, 512),
    spacing: tuple[float, float, float] = (1.5, 0.234, 0.234),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(pred, ref)`` bool masks of a femur-like object in canonical (A, I, L) order."""
    rng = np.random.default_rng(seed)
    ext = np.array(shape) * np.array(spacing)  # mm
    axes = [(np.arange(n, dtype=np.float32) * s) for n, s in zip(shape, spacing)]
    a, i, l_ = np.meshgrid(*axes, indexing="ij", sparse=True)
    # parts as fractions of the field of view: centre (A, I, L), radii (mm)
    parts = [
        ((0.5, 0.25, 0.28), (0.30, 0.18, 0.18)),  # head
        ((0.5, 0.38, 0.45), (0.20, 0.10, 0.20)),  # neck
        ((0.5, 0.68, 0.62), (0.26, 0.32, 0.14)),  # trochanter and shaft
    ]
    level = None
    for (ca, ci, cl), (ra, ri, rl) in parts:
        f = (((a - ca * ext[0]) / (ra * ext[0])) ** 2 + ((i - ci * ext[1]) / (ri * ext[1])) ** 2
             + ((l_ - cl * ext[2]) / (rl * ext[2])) ** 2)
        level = f if level is None else np.minimum(level, f)
    level = np.sqrt(level) - 1.0  # ~ relative distance to the surface
    ref = level + 0.03 * _smooth_noise(shape, rng) < 0
    pred = level + 0.08 * _smooth_noise(shape, rng) + 0.03 < 0
    # a small false-positive blob a few mm outside the shaft
    blob = ((a - 0.5 * ext[0]) / 3.0) ** 2 + ((i - 0.68 * ext[1]) / 3.0) ** 2 + (
        (l_ - (0.62 + 0.14) * ext[2] - 5.0) / 3.0) ** 2 <= 1
    pred |= blob
    return pred, ref


def _time(fn, repeats: int) -> tuple[float, float, float, Any]:
    """``(wall min, wall median, process CPU min, last result)`` over ``repeats`` calls."""
    times, cpu, out = [], [], None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(times), statistics.median(times), min(cpu), out


def run(
    shape: tuple[int, int, int] = (48, 512, 512),
    spacing: tuple[float, float, float] = (1.5, 0.234, 0.234),
    repeats: int = 3,
) -> dict[str, Any]:
    """Time femurseg's and MONAI's surface metrics on one femur-like pair; returns a dict
    with ``rows`` (one per implementation/metric), ``speedup`` figures and the set-up."""
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_hausdorff_distance,
    )

    pred, ref = femur_like_masks(tuple(shape), tuple(spacing))
    sp = tuple(float(s) for s in spacing)
    setup = {
        "shape": "x".join(map(str, shape)),
        "spacing_mm": ",".join(f"{s:g}" for s in sp),
        "dsc": metrics.overlap_metrics(pred, ref)["dsc"],
        "surface_voxels_pred": int(metrics.surface_voxels(pred).sum()),
        "surface_voxels_ref": int(metrics.surface_voxels(ref).sum()),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(),
    }
    rows: list[dict[str, Any]] = []
    metrics.surface_metrics(pred, ref, sp)  # warm-up (imports)
    for method in ("shell", "edt"):
        tmin, tmed, cmin, s = _time(lambda: metrics.surface_metrics(pred, ref, sp, method=method), repeats)
        rows.append({"tool": f"femurseg[{method}]", "computes": "asd+msd+hd95 (1 call)", "seconds_min": tmin,
                     "seconds_median": tmed, "cpu_seconds_min": cmin, "asd_mm": s["asd"], "msd_mm": s["msd"],
                     "hd95_mm": s["hd95"]})

    p_t = torch.from_numpy(pred)[None, None].float()
    r_t = torch.from_numpy(ref)[None, None].float()
    calls = {
        "asd": lambda: compute_average_surface_distance(p_t, r_t, include_background=True, symmetric=True,
                                                        spacing=sp),
        "msd": lambda: compute_hausdorff_distance(p_t, r_t, include_background=True, spacing=sp),
        "hd95": lambda: compute_hausdorff_distance(p_t, r_t, include_background=True, spacing=sp, percentile=95),
    }
    monai_vals: dict[str, float] = {}
    monai_total_min = monai_total_med = monai_total_cpu = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calls["asd"]()  # warm-up
        for name, fn in calls.items():
            tmin, tmed, cmin, v = _time(fn, repeats)
            monai_vals[name] = float(v.item())
            monai_total_min += tmin
            monai_total_med += tmed
            monai_total_cpu += cmin
            row = {"tool": "monai", "computes": name, "seconds_min": tmin, "seconds_median": tmed,
                   "cpu_seconds_min": cmin, "asd_mm": "", "msd_mm": "", "hd95_mm": ""}
            row[f"{name}_mm"] = monai_vals[name]
            rows.append(row)
    rows.append({"tool": "monai", "computes": "asd+msd+hd95 (3 calls)", "seconds_min": monai_total_min,
                 "seconds_median": monai_total_med, "cpu_seconds_min": monai_total_cpu,
                 "asd_mm": monai_vals["asd"], "msd_mm": monai_vals["msd"], "hd95_mm": monai_vals["hd95"]})

    ours = rows[0]
    fastest_monai_call = min(r["seconds_min"] for r in rows if r["tool"] == "monai" and "calls" not in r["computes"])
    max_diff = max(abs(ours[f"{k}_mm"] - monai_vals[k]) for k in ("asd", "msd", "hd95"))
    edt_diff = max(abs(rows[1][f"{k}_mm"] - monai_vals[k]) for k in ("asd", "msd", "hd95"))
    fastest_monai_cpu = min(r["cpu_seconds_min"] for r in rows if r["tool"] == "monai" and "calls" not in r["computes"])
    for r in rows:
        r["speedup_femurseg_shell"] = (r["seconds_min"] / ours["seconds_min"]) if r["tool"] == "monai" else ""
    return {
        "setup": setup,
        "rows": rows,
        "speedup_vs_monai_3_calls": monai_total_min / ours["seconds_min"],
        "speedup_vs_fastest_monai_call": fastest_monai_call / ours["seconds_min"],
        "cpu_speedup_vs_monai_3_calls": monai_total_cpu / ours["cpu_seconds_min"],
        "cpu_speedup_vs_fastest_monai_call": fastest_monai_cpu / ours["cpu_seconds_min"],
        "max_abs_diff_mm": max_diff,
        "max_abs_diff_edt_mm": edt_diff,
    }


def write_csv(result: dict[str, Any], path: Path = RESULTS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    setup = result["setup"]
    fields = ["tool", "computes", "seconds_min", "seconds_median", "cpu_seconds_min", "asd_mm", "msd_mm", "hd95_mm",
              "speedup_femurseg_shell", *setup.keys()]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            for r in result["rows"]:
                w.writerow({**r, **setup})
    return path


def print_table(result: dict[str, Any]) -> None:
    s = result["setup"]
    print(f"shape {s['shape']}, spacing {s['spacing_mm']} mm, DSC {s['dsc']:.3f}, surface voxels "
          f"{s['surface_voxels_pred']} / {s['surface_voxels_ref']}")
    print(f"CPU {s['cpu']} x {s['cpus']}, load avg {s['load_avg_1min']:.2f}, torch threads {s['torch_threads']}")
    print(f"{'tool':<16} {'computes':<24} {'s (min)':>9} {'s (median)':>10} {'cpu s':>7} {'asd':>8} {'msd':>8} "
          f"{'hd95':>8}")
    for r in result["rows"]:
        vals = [f"{r[k]:8.4f}" if r[k] != "" else f"{'':8}" for k in ("asd_mm", "msd_mm", "hd95_mm")]
        print(f"{r['tool']:<16} {r['computes']:<24} {r['seconds_min']:9.3f} {r['seconds_median']:10.3f} "
              f"{r['cpu_seconds_min']:7.3f} " + " ".join(vals))
    print(f"wall-clock speedup vs MONAI (3 calls): {result['speedup_vs_monai_3_calls']:.1f}x; vs MONAI's fastest "
          f"single call: {result['speedup_vs_fastest_monai_call']:.1f}x")
    print(f"CPU-time speedup vs MONAI (3 calls): {result['cpu_speedup_vs_monai_3_calls']:.1f}x; vs MONAI's fastest "
          f"single call: {result['cpu_speedup_vs_fastest_monai_call']:.1f}x")
    print(f"max |femurseg - MONAI| = "
          f"{result['max_abs_diff_mm']:.2e} mm (edt method {result['max_abs_diff_edt_mm']:.2e} mm)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(48, 512, 512))
    ap.add_argument("--spacing", type=float, nargs=3, default=(1.5, 0.234, 0.234))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    result = run(tuple(args.shape), tuple(args.spacing), args.repeats)
    print_table(result)
    print(f"wrote {write_csv(result, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
