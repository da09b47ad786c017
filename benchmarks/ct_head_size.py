"""Does the cascade pull femoral-head size towards the training mean? Head volume error against the
phantoms' true head radius.

    .venv/bin/python benchmarks/ct_head_size.py DATASET CSV

``DATASET``: synthetic CT phantoms (``femurseg synth``; their ``meta.json`` holds each femur's
true head radius). ``CSV``: per-case volumes of those cases, either a cascade study's out-of-fold
``RUN/cascade_volumes.csv`` or the per-case table of ``femurseg evaluate --pred PRED --gt DATASET
--out FILE.csv``. Prints the Pearson correlation and slope (% per mm) of the head's total volume
error (regions fitted on each mask) against the true head radius, the same correlation for the
cortical neck error, and the mean head error of the smaller and larger half of the heads. A
negative correlation means small heads are over- and large heads under-segmented.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def errors(meta: dict, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true head radius mm, head volume error %, cortical neck volume error %) per case."""
    rows = list(csv.DictReader(path.open()))
    vols: dict[str, dict[str, float]] = {}
    if rows and "region" in rows[0]:  # cascade_volumes.csv: one row per case, region, compartment
        for r in rows:
            vols.setdefault(r["case"], {})[f"{r['region']}_{r['compartment']}"] = float(r["pred_cm3"]) / float(r["ref_cm3"])
    else:  # femurseg evaluate's per-case table: <region>_<compartment>_vol_{pred,ref}_cm3 columns
        for r in rows:
            if "head_total_vol_ref_cm3" in r and r["head_total_vol_ref_cm3"]:
                vols[r["case"]] = {k: float(r[f"{k}_vol_pred_cm3"]) / float(r[f"{k}_vol_ref_cm3"])
                                   for k in ("head_total", "neck_cortical")}
    radius, head, neck = [], [], []
    for case, v in vols.items():
        cid = case if case in meta else case.rsplit("_", 1)[0]  # predictions may be named <case>_0000
        if cid not in meta or "head_total" not in v or "neck_cortical" not in v:
            continue
        radius.append(meta[cid]["femurs"][0]["head_radius_mm"])
        head.append(100.0 * (v["head_total"] - 1.0))
        neck.append(100.0 * (v["neck_cortical"] - 1.0))
    return np.asarray(radius), np.asarray(head), np.asarray(neck)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("csv")
    args = ap.parse_args(argv)
    meta = json.loads((Path(args.dataset) / "meta.json").read_text())
    r, e, ec = errors(meta, Path(args.csv))
    if r.size < 3:
        raise SystemExit(f"{args.csv}: {r.size} cases of {args.dataset} with head and neck volumes; need 3")
    small = r < np.median(r)
    print(f"n {r.size}; head radius {r.min():.1f}-{r.max():.1f} mm; Pearson r(radius, head volume error) "
          f"{np.corrcoef(r, e)[0, 1]:+.2f}, slope {np.polyfit(r, e, 1)[0]:+.2f} % per mm; "
          f"r(radius, cortical neck error) {np.corrcoef(r, ec)[0, 1]:+.2f}")
    print(f"head volume error: smaller half of the heads {e[small].mean():+.2f} %, larger half {e[~small].mean():+.2f} %")


if __name__ == "__main__":
    main()
