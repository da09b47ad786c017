"""The cascade's one-voxel-cortex rule against none, on held-out CT scans (003 Table 2 per region).

    .venv/bin/python benchmarks/ct_cortex_rule.py RUN DATASET

``RUN``: a finished cascade study (``femurseg cv --task cascade`` / ``femurseg experiment ct``);
``DATASET``: labelled CT scans it has not seen (``femurseg synth DATA --n 16 --modality ct --seed
1``). Each scan goes once through both stages exactly as ``femurseg predict`` runs them (all fold
models averaged, stored PR thresholds, :func:`femurseg.ct.stages.periosteal_mask`), and its label map is
built two ways from the same two outputs:

* ``one-voxel``: :func:`femurseg.ct.stages.combine_stages`, femurseg's rule: trabecular only inside the
  periosteal mask eroded by one voxel, so the cortex is at least one voxel thick, as in the
  reference labels;
* ``none``: trabecular wherever stage 2 says so inside the periosteal mask.

Where stage 1 puts the surface one voxel too far out, both rules count that voxel as cortex; where
it puts it one voxel too far in, the first rule turns a trabecular voxel into cortex and the second
does not, so only the first is biased upwards in a sub-voxel cortex (the phantoms' head). Prints
the mean relative volume error (%) and its mean sign per region and compartment, regions fitted on
each mask (:func:`femurseg.ct.measure.region_volume_pairs`). About 1 minute for 16 scans on 2 cores.
"""

from __future__ import annotations

import argparse

import numpy as np


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("dataset")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    from femurseg.core import io
    from femurseg.ct.measure import region_volume_pairs
    from femurseg.ct.predict import load_cascade_predictor
    from femurseg.ct.stages import combine_stages, periosteal_mask, stage2_input
    from femurseg.data.dataset import load_checked
    from femurseg.inference.predict import predict_probability
    from femurseg.inference.run import load_run

    run = load_run(args.run)
    pred = load_cascade_predictor(run, device="cpu", notify=lambda m: None)
    p1, p2 = pred.stages
    thr1, thr2 = float(p1.thresholds["pr"]), float(p2.thresholds["pr"])
    opts = run.config["cascade"]
    ds = load_checked(args.dataset, progress=False)
    errors: dict[tuple[str, str, str], list[float]] = {}
    for case in tqdm(ds.cases, desc="cases", unit="case"):
        vol = io.read_image(case.image)
        ref = np.asarray(io.read_image(case.label, dtype=None).data).astype(np.uint8)
        peri = periosteal_mask(predict_probability(p1, vol), thr1, vol.spacing)
        masked = vol.with_data(stage2_input(vol.data, peri, vol.spacing, float(opts["dilate_mm"]), float(opts["fill_hu"])))
        endo = predict_probability(p2, masked)
        none = np.where(peri, np.uint8(2), np.uint8(0))
        none[peri & (endo >= thr2)] = 1
        for rule, lab in (("one-voxel", combine_stages(peri, endo, thr2)), ("none", none)):
            for v in region_volume_pairs(lab, ref, vol.spacing):
                if v["ref_cm3"] > 0 and np.isfinite(v["pred_cm3"]):
                    key = (rule, v["region"], v["compartment"])
                    errors.setdefault(key, []).append(100.0 * (v["pred_cm3"] - v["ref_cm3"]) / v["ref_cm3"])
    print(f"{'rule':10s} {'region':16s} {'compartment':11s}  RE %   bias %   (n)")
    for (rule, region, comp), e in sorted(errors.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        a = np.asarray(e)
        print(f"{rule:10s} {region:16s} {comp:11s} {np.mean(np.abs(a)):5.2f}  {np.mean(a):+6.2f}   ({a.size})")


if __name__ == "__main__":
    main()
