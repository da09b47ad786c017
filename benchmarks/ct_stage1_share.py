"""Stage 1's share of the cascade's volume errors: its periosteal mask with the reference's inside.

    .venv/bin/python benchmarks/ct_stage1_share.py RUN [DATASET]

``RUN``: a cascade study (``femurseg cv --task cascade``) whose stage 1 has finished (stage 2 is
not needed: a study stopped after stage 1 can be measured); ``DATASET``: its data (default: the
one the run recorded). For every case, stage 1's out-of-fold periosteal mask
(:func:`femurseg.ct.stages.periosteal_mask` at the stored PR threshold) is combined with the
*reference* trabecular region (:func:`femurseg.ct.stages.combine_stages`), so every volume error left is
stage 1's; volumes are counted in the reference's regions (each voxel in the region of the nearest
reference bone voxel), so the region fit adds nothing. Prints the mean relative error (%) and its
mean sign per region for the cortical and total volume, and the periosteal DSC. About 1 s per case
on 2 cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("dataset", nargs="?")
    args = ap.parse_args(argv)

    from scipy import ndimage
    from tqdm import tqdm

    from femurseg.core import io
    from femurseg.ct.measure import measure_femur
    from femurseg.ct.regions import REGION_LABELS
    from femurseg.ct.stages import combine_stages, mean_oof, periosteal_mask
    from femurseg.data.dataset import load_checked
    from femurseg.evaluation.metrics import overlap_metrics
    from femurseg.inference.run import load_run

    run = Path(args.run)
    stage1 = run / "stage1"
    thr = float(json.loads((stage1 / "thresholds.json").read_text())["pr"])
    ds = load_checked(args.dataset or json.loads((run / "config.json").read_text())["dataset"], progress=False)
    errors: dict[str, list[float]] = {}
    dsc = []
    for cid in tqdm(load_run(stage1).split.cases, desc="cases", unit="case"):
        lab = io.read_image(ds.case(cid).label, dtype=None)
        ref, sp = np.asarray(lab.data).astype(np.uint8), lab.spacing
        _, _, regions = measure_femur(ref, sp, compartments=True)
        _, near = ndimage.distance_transform_edt(regions == 0, sampling=sp, return_indices=True)
        region_of = regions[tuple(near)]
        peri = periosteal_mask(mean_oof([stage1], cid), thr, sp)
        pred = combine_stages(peri, (ref == 1).astype(np.float32), 0.5)
        dsc.append(overlap_metrics(peri, ref > 0)["dsc"])
        for name, value in ((n, v) for n, v in REGION_LABELS.items() if v):
            inside = region_of == value
            for comp, p, r in (("cortical", pred == 2, ref == 2), ("total", pred > 0, ref > 0)):
                n_ref = np.count_nonzero(r & inside)
                if n_ref:
                    errors.setdefault(f"{name} {comp}", []).append(100.0 * (np.count_nonzero(p & inside) - n_ref) / n_ref)
    print(f"{run}: stage-1 PR threshold {thr:.3f}, {len(dsc)} cases, periosteal DSC {np.mean(dsc):.4f}")
    for key, e in errors.items():
        a = np.asarray(e)
        print(f"  {key:28s} RE {np.mean(np.abs(a)):5.2f} %   bias {np.mean(a):+6.2f} %")


if __name__ == "__main__":
    main()
