"""Flip test-time augmentation of the CT cascade, out-of-fold and on held-out scans (003 Table 2).

    .venv/bin/python benchmarks/ct_tta.py RUN [--heldout DATASET]

``RUN``: a finished cascade study (``femurseg cv --task cascade`` / ``femurseg experiment ct``).
Out-of-fold: each case of the study's dataset is segmented by its own fold's models (the fold
that did not train on it), once as ``femurseg predict`` does (``--tta none``) and once with
``--tta flip`` (both stages also see the left-right mirrored image; probabilities averaged),
at the stored PR thresholds, with :func:`femurseg.ct.stages.periosteal_mask` and
:func:`femurseg.ct.stages.combine_stages` as in prediction. ``--heldout DATASET``: the same on labelled
scans the run has not seen, with all fold models averaged. Prints the mean relative volume error
(%) per region and compartment (regions fitted on each mask,
:func:`femurseg.ct.measure.region_volume_pairs`) and the periosteal DSC, for both modes. The ``none``
column re-derives the study's own out-of-fold numbers (a check). About 25 s per case and mode on
2 cores at 0.8 x 0.8 x 1 mm.
"""

from __future__ import annotations

import argparse

import numpy as np


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--heldout", default=None, help="labelled scans the run has not seen (instead of out-of-fold)")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    from femurseg.core import io
    from femurseg.ct.measure import region_volume_pairs
    from femurseg.ct.predict import load_cascade_predictor
    from femurseg.ct.stages import combine_stages, periosteal_mask, stage2_input
    from femurseg.data.dataset import load_checked
    from femurseg.data.splits import load_split
    from femurseg.evaluation.metrics import overlap_metrics
    from femurseg.inference.predict import predict_probability
    from femurseg.inference.run import load_run

    run = load_run(args.run)
    opts = run.config["cascade"]
    if args.heldout:
        ds = load_checked(args.heldout, progress=False)
        jobs = [("all", [c for c in ds.cases])]
    else:
        ds = load_checked(run.config["dataset"], progress=False)
        by_id = {c.case_id: c for c in ds.cases}
        split = load_split(run.path / "split.json")
        jobs = [(k, [by_id[c] for c in fold]) for k, fold in enumerate(split.folds)]
    errors: dict[tuple[str, str, str], list[float]] = {}
    dsc: dict[str, list[float]] = {}
    for folds, cases in jobs:
        pred = load_cascade_predictor(run, folds=folds, device="cpu", notify=lambda m: None)
        p1, p2 = pred.stages
        thr1, thr2 = float(p1.thresholds["pr"]), float(p2.thresholds["pr"])
        for case in tqdm(cases, desc=f"fold {folds}", unit="case"):
            vol = io.read_image(case.image)
            ref = np.asarray(io.read_image(case.label, dtype=None).data).astype(np.uint8)
            for tta in ("none", "flip"):
                peri = periosteal_mask(predict_probability(p1, vol, tta), thr1, vol.spacing)
                masked = vol.with_data(stage2_input(vol.data, peri, vol.spacing, float(opts["dilate_mm"]),
                                                    float(opts["fill_hu"])))
                lab = combine_stages(peri, predict_probability(p2, masked, tta), thr2)
                dsc.setdefault(tta, []).append(float(overlap_metrics(lab > 0, ref > 0)["dsc"]))
                for v in region_volume_pairs(lab, ref, vol.spacing):
                    if v["ref_cm3"] > 0 and np.isfinite(v["pred_cm3"]):
                        key = (tta, v["region"], v["compartment"])
                        errors.setdefault(key, []).append(100.0 * (v["pred_cm3"] - v["ref_cm3"]) / v["ref_cm3"])
    print("periosteal DSC: " + ", ".join(f"{t} {np.mean(d):.4f}" for t, d in dsc.items()))
    print(f"{'region':16s} {'compartment':11s}  RE % none  flip   bias % none  flip   (n)")
    keys = sorted({(r, c) for _, r, c in errors})
    for region, comp in keys:
        a, b = np.asarray(errors[("none", region, comp)]), np.asarray(errors[("flip", region, comp)])
        print(f"{region:16s} {comp:11s}  {np.mean(np.abs(a)):8.2f} {np.mean(np.abs(b)):5.2f}   "
              f"{np.mean(a):+9.2f} {np.mean(b):+5.2f}   ({a.size})")


if __name__ == "__main__":
    main()
