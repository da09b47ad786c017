"""Voxel size benchmark: one trained run, the same unseen anatomy at other pixel sizes and slice spacings.

    python benchmarks/bench_spacing.py [RUN] [--cases 4] [--seed 2000] [--work DIR] [--out benchmarks/results/]

What it measures. Users' scans come at pixel sizes and slice spacings their training data did
not have. ``--cases`` phantoms that no training run has seen (``femurseg synth`` at ``--seed``,
the MR default world) are resampled with SimpleITK (B-spline image, nearest-neighbour label) to:
the phantom's own grid; pixels half and twice the size; slices as thin as the pixels
(isotropic); slices twice as thick. ``RUN`` (default ``demo_out/run``, what ``make demo`` writes)
segments every variant twice with ``femurseg predict``: with the run's preprocessing in
millimetres (``spacing_mm``, ``crop_mm``: what ``femurseg cv`` stores) and with the same run's
voxel-count preprocessing (the in-plane factor and slice count alone, as runs made before
stored). ``femurseg.evaluation.evaluate`` scores each mask against the variant's label on
the variant's grid.

Writes ``spacing_cases.csv`` (per mode, variant and case) and ``spacing_summary.csv`` (mean ± SD).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine_info, run_on_unseen_args, say, write_csv  # noqa: E402

# variant -> (in-plane pixel factor, slice spacing factor or "iso"): new spacing = old x factor
VARIANTS: dict[str, tuple[float, Any]] = {
    "as synthesised": (1.0, 1.0),
    "pixels x0.5": (0.5, 1.0),
    "pixels x2": (2.0, 1.0),
    "isotropic slices": (1.0, "iso"),
    "slices x2": (1.0, 2.0),
}
MODES = ("mm", "voxels")


def resample(path: Path, out: Path, pixel: float, slices: Any, label: bool) -> None:
    """Write ``path`` resampled over the same field of view: pixels x ``pixel``, slices x ``slices``
    (``"iso"``: slices as thick as the new pixels). The slice axis is the one along A/P."""
    import numpy as np
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    slice_axis = int(np.argmax(np.abs(direction[1])))  # LPS y (posterior): the coronal slice normal
    spacing = list(img.GetSpacing())
    inplane = [spacing[i] * pixel for i in range(3) if i != slice_axis]
    new = [spacing[i] * pixel for i in range(3)]
    new[slice_axis] = min(inplane) if slices == "iso" else spacing[slice_axis] * float(slices)
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(img.GetSize(), spacing, new)]
    # keep the field of view: the first voxel's corner stays where it was
    origin = np.asarray(img.GetOrigin()) + direction @ ((np.asarray(new) - np.asarray(spacing)) / 2)
    interp, kind = (sitk.sitkNearestNeighbor, sitk.sitkUInt8) if label else (sitk.sitkBSpline, sitk.sitkFloat32)
    out.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.Resample(img, size, sitk.Transform(), interp, tuple(origin), new, img.GetDirection(), 0, kind),
                    str(out))


def run_copies(run: Path, work: Path) -> dict[str, Path]:
    """``{"mm": ..., "voxels": ...}``: copies of ``run`` with and without the preprocessing in mm."""
    from femurseg.data.preprocess import PreprocessConfig

    config = json.loads((run / "config.json").read_text())
    prep = PreprocessConfig.from_dict(config["preprocess"])
    voxels = {**prep.to_dict(), "spacing_mm": None, "crop_mm": None, "slice_mm": None}
    mm = PreprocessConfig.from_dict(voxels).in_millimetres(tuple(config["train_spacing"])).to_dict()
    out = {}
    for mode, p in (("mm", mm), ("voxels", voxels)):
        dst = work / f"run_{mode}"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(run, dst)
        (dst / "config.json").write_text(json.dumps({**config, "preprocess": p}, indent=1))
        out[mode] = dst
    return out


def main(argv: list[str] | None = None) -> int:
    a = run_on_unseen_args(__doc__, argv, cases=4, work="spacing_work")
    import numpy as np

    from femurseg.data.synth import synthesize
    from femurseg.evaluation.evaluate import evaluate_folders
    from femurseg.inference.predict import predict_command

    t0 = time.perf_counter()
    cohort = a.work / "cohort"
    if not (cohort / "dataset.json").exists():
        a.work.mkdir(parents=True, exist_ok=True)
        synthesize(cohort, n=a.cases, modality="mr", seed=a.seed, progress=False)
    runs = run_copies(a.run, a.work)
    cases: list[dict[str, Any]] = []
    for name, (pixel, slices) in VARIANTS.items():
        slug = name.replace(" ", "_").replace(".", "")
        images, labels = a.work / slug / "images", a.work / slug / "labels"
        for img in sorted((cohort / "imagesTr").glob("*_0000.nii.gz")):
            case = img.name.removesuffix("_0000.nii.gz")
            resample(img, images / img.name, pixel, slices, label=False)
            resample(cohort / "labelsTr" / f"{case}.nii.gz", labels / f"{case}.nii.gz", pixel, slices, label=True)
        for mode, run in runs.items():
            pred = a.work / slug / f"pred_{mode}"
            if pred.exists():
                shutil.rmtree(pred)
            predict_command(run, [images], pred, progress=False, echo=lambda _m: None, notify=lambda _m: None)
            rows = evaluate_folders(pred, labels, progress=False, notify=lambda _m: None)
            cases += [{"mode": mode, "variant": name, **r} for r in rows]
            say(f"{name}, {mode}: DSC {np.mean([float(r['dsc']) for r in rows]):.3f}")
    info = machine_info()
    summary = []
    for name in VARIANTS:
        for mode in MODES:
            d = np.array([float(r["dsc"]) for r in cases if r["variant"] == name and r["mode"] == mode])
            h = np.array([float(r["hd95_mm"]) for r in cases if r["variant"] == name and r["mode"] == mode])
            summary.append({"variant": name, "mode": mode, "n": d.size, "dsc_mean": d.mean(), "dsc_sd": d.std(ddof=1),
                            "hd95_mm_mean": h.mean(), "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": info.get("cpu"),
                            "run": str(a.run)})
    write_csv(cases, a.out / "spacing_cases.csv")
    write_csv(summary, a.out / "spacing_summary.csv")
    by = {(r["variant"], r["mode"]): r for r in summary}
    print("| scan variant | DSC, preprocessing in mm | DSC, in voxels (runs made before) |\n|---|---|---|")
    for name in VARIANTS:
        cells = [f"{by[name, m]['dsc_mean']:.3f} ± {by[name, m]['dsc_sd']:.3f} / {by[name, m]['hd95_mm_mean']:.1f}"
                 for m in MODES]
        print(f"| {name} | " + " | ".join(cells) + " |")
    say(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
