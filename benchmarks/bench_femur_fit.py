"""Accuracy of the femur geometry fit (:func:`femurseg.ct.regions.fit_femur`) on phantoms of known geometry.

    .venv/bin/python benchmarks/bench_femur_fit.py [--mr 40] [--ct 16]

Fits the reference labels of MR phantoms (seeds ``0 .. mr-1``, the default wide parameter world)
and CT phantoms (seeds ``0 .. ct-1``), no artefacts, and compares with the generator's ``meta``:
head-centre distance (mm), head-radius error (mm), neck-axis angle (deg, 3D) and neck-shaft
angle error (deg). Prints median / 90th percentile / maximum per quantity and the worst cases;
writes ``femur_fit.csv`` (one row per case) under ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_csv  # noqa: E402

from femurseg.ct.regions import fit_femur  # noqa: E402
from femurseg.core.errors import FemursegError  # noqa: E402
from femurseg.data import phantom  # noqa: E402


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1.0, 1.0))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mr", type=int, default=40, help="number of MR phantoms (seeds 0..N-1)")
    ap.add_argument("--ct", type=int, default=16, help="number of CT phantoms (seeds 0..N-1)")
    args = ap.parse_args(argv)
    rows = []
    t0 = time.perf_counter()
    for modality, n in (("mr", args.mr), ("ct", args.ct)):
        for seed in range(n):
            case = phantom.generate_case(seed, modality=modality, artefacts=False)
            m = case.meta
            row = {"modality": modality, "seed": seed, "neck_length_mm": m["neck_length_mm"],
                   "neck_shaft_angle_deg": m["neck_shaft_angle_deg"], "anteversion_deg": m["anteversion_deg"]}
            try:
                fit = fit_femur(case.label, case.spacing)
            except FemursegError as exc:
                rows.append({**row, "error": str(exc)})
                continue
            rows.append({**row, "error": "",
                         "centre_err_mm": float(np.linalg.norm(fit.head_centre_mm - np.asarray(m["head_centre_mm"]))),
                         "radius_err_mm": abs(fit.head_radius_mm - m["head_radius_mm"]),
                         "neck_axis_err_deg": _angle_deg(fit.neck_axis, m["neck_axis"]),
                         "nsa_err_deg": abs(fit.neck_shaft_angle_deg - m["neck_shaft_angle_deg"])})
    ok = [r for r in rows if not r["error"]]
    print(f"{len(rows)} phantoms, {len(rows) - len(ok)} without a fit, {time.perf_counter() - t0:.0f} s")
    for key in ("centre_err_mm", "radius_err_mm", "neck_axis_err_deg", "nsa_err_deg"):
        v = np.array([r[key] for r in ok])
        print(f"  {key:18s} median {np.median(v):5.2f}  p90 {np.percentile(v, 90):5.2f}  max {v.max():5.2f}")
    worst = sorted(ok, key=lambda r: -r["neck_axis_err_deg"])[:3]
    print("  worst neck axis:", ", ".join(f"{r['modality']} {r['seed']} ({r['neck_axis_err_deg']:.1f} deg)" for r in worst))
    write_csv(rows, RESULTS / "femur_fit.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
