"""Field-of-view benchmark: one trained run, the same unseen anatomy shown with a wider field of view.

    python benchmarks/bench_fov.py [RUN] [--cases 8] [--seed 2000] [--work DIR] [--out benchmarks/results/]

What it measures. Users' scans show more or less of the body around the hip than the training
scans did. ``--cases`` phantoms that no training run has seen (``femurseg synth`` at ``--seed``,
the MR default world) are written three ways: as synthesised (the 120 mm in-plane field of view
of the phantoms); the same anatomy rendered with a 180 mm field of view at the same pixel size
(``--size 192,192,48 --spacing 0.9375,0.9375,1.5``: more thigh, pelvis, skin and air); and the
120 mm scans padded in-plane with background (the 1st-percentile intensity) to 200 mm; and the
same anatomy with a 90 mm field of view (``--size 96,96,48``: the label is what the scan shows); and
a thicker scan, 144 mm along anterior-posterior (96 slices of 1.5 mm cut from a 128-slice
rendering) with the femur 24 mm in front of or behind its middle, where the central 72 mm slab the
preprocessing keeps cuts it.
``RUN`` (default ``demo_out/run``, what ``make demo`` writes) segments every variant with
``femurseg predict --fov match`` (the default: a wider or narrower scan is segmented in windows
of the training field of view, :mod:`femurseg.inference.fov`) and ``--fov full`` (the whole scan, as
before); ``femurseg.evaluation.evaluate`` scores each mask against the variant's label on the
variant's grid. Seconds per scan are wall-clock on this machine.

Writes ``fov_cases.csv`` (per mode, variant and case) and ``fov_summary.csv`` (mean ± SD).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine_info, run_on_unseen_args, say, write_csv  # noqa: E402

VARIANTS = ("120 mm (as trained)", "180 mm, more anatomy", "120 mm padded to 200 mm", "90 mm, less anatomy",
            "144 mm thick, femur 24 mm off-centre")
MODES = ("match", "full")
WIDE = {"shape": (48, 192, 192), "spacing": (1.5, 0.9375, 0.9375)}  # canonical (A, I, L)
NARROW = {"shape": (48, 96, 96), "spacing": (1.5, 0.9375, 0.9375)}
DEEP = {"shape": (128, 128, 128), "spacing": (1.5, 0.9375, 0.9375)}  # 192 mm along A/P, cut to 144 mm
OFF_CENTRE = 16  # slices (24 mm) the 96-slice cut is moved from the centre, forward and back in turn
PAD = 43  # voxels each side in-plane: 128 + 86 = 214 voxels = 200 mm


def pad_inplane(path: Path, out: Path, label: bool) -> None:
    """Write ``path`` padded by :data:`PAD` voxels on both sides of both in-plane axes (background:
    the image's 1st percentile, label 0); the geometry moves with it (SimpleITK ConstantPad)."""
    import numpy as np
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    slice_axis = int(np.argmax(np.abs(direction[1])))  # LPS y (posterior): the coronal slice normal
    pad = [0 if i == slice_axis else PAD for i in range(3)]
    value = 0.0 if label else float(np.percentile(sitk.GetArrayViewFromImage(img), 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.ConstantPad(img, pad, pad, value), str(out))


def off_centre_slab(path: Path, out: Path, case_index: int) -> None:
    """Write 96 slices of the 128-slice ``path``, the cut moved :data:`OFF_CENTRE` slices from the
    centre one way for even ``case_index``, the other way for odd (SimpleITK Crop: the geometry
    stays)."""
    import numpy as np
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    slice_axis = int(np.argmax(np.abs(direction[1])))
    n = img.GetSize()[slice_axis]
    start = (n - 96) // 2 + (OFF_CENTRE if case_index % 2 == 0 else -OFF_CENTRE)
    lower = [start if i == slice_axis else 0 for i in range(3)]
    upper = [n - 96 - start if i == slice_axis else 0 for i in range(3)]
    out.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.Crop(img, lower, upper), str(out))


def main(argv: list[str] | None = None) -> int:
    a = run_on_unseen_args(__doc__, argv, cases=8, work="fov_work")
    import numpy as np

    from femurseg.data.synth import synthesize
    from femurseg.evaluation.evaluate import evaluate_folders
    from femurseg.inference.predict import predict_command

    t0 = time.perf_counter()
    a.work.mkdir(parents=True, exist_ok=True)
    folders: dict[str, Path] = {}
    for name, extra, slug in ((VARIANTS[0], {}, "as_trained"), (VARIANTS[1], WIDE, "wide"),
                              (VARIANTS[3], NARROW, "narrow"), ("deep", DEEP, "deep")):
        folders[name] = a.work / slug
        if not (folders[name] / "dataset.json").exists():
            synthesize(folders[name], n=a.cases, modality="mr", seed=a.seed, progress=False, **extra)
    folders[VARIANTS[2]] = padded = a.work / "padded"
    for sub in ("imagesTr", "labelsTr"):
        for f in sorted((folders[VARIANTS[0]] / sub).glob("*.nii.gz")):
            if not (padded / sub / f.name).exists():
                pad_inplane(f, padded / sub / f.name, label=sub == "labelsTr")
    folders[VARIANTS[4]] = off = a.work / "off_centre"
    for sub in ("imagesTr", "labelsTr"):
        for i, f in enumerate(sorted((folders["deep"] / sub).glob("*.nii.gz"))):
            if not (off / sub / f.name).exists():
                off_centre_slab(f, off / sub / f.name, i)
    cases: list[dict[str, Any]] = []
    for name in VARIANTS:
        images, labels = folders[name] / "imagesTr", folders[name] / "labelsTr"
        for mode in MODES:
            pred = a.work / f"pred_{folders[name].name}_{mode}"
            if pred.exists():
                shutil.rmtree(pred)
            t = time.perf_counter()
            predict_command(a.run, [images], pred, progress=False, echo=lambda _m: None, notify=lambda _m: None,
                            fov=mode)
            per_scan = (time.perf_counter() - t) / a.cases
            rows = evaluate_folders(pred, labels, progress=False, notify=lambda _m: None)
            cases += [{"mode": mode, "variant": name, "s_per_scan": per_scan, **r} for r in rows]
            say(f"{name}, --fov {mode}: DSC {np.mean([float(r['dsc']) for r in rows]):.3f} ({per_scan:.1f} s/scan)")
    info = machine_info()
    summary = []
    for name in VARIANTS:
        for mode in MODES:
            sel = [r for r in cases if r["variant"] == name and r["mode"] == mode]
            col = lambda k: np.array([float(r[k]) for r in sel])  # noqa: E731
            d = col("dsc")
            summary.append({"variant": name, "mode": mode, "n": d.size, "dsc_mean": d.mean(), "dsc_sd": d.std(ddof=1),
                            "precision_mean": col("precision").mean(), "recall_mean": col("recall").mean(),
                            "hd95_mm_mean": col("hd95_mm").mean(), "s_per_scan": sel[0]["s_per_scan"],
                            "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": info.get("cpu"), "run": str(a.run)})
    write_csv(cases, a.out / "fov_cases.csv")
    write_csv(summary, a.out / "fov_summary.csv")
    by = {(r["variant"], r["mode"]): r for r in summary}
    print("| scan | DSC / precision / HD95 mm, `--fov match` (default) | the same, `--fov full` | s/scan match, full |\n"
          "|---|---|---|---|")
    for name in VARIANTS:
        cells = [f"{by[name, m]['dsc_mean']:.3f} ± {by[name, m]['dsc_sd']:.3f} / {by[name, m]['precision_mean']:.2f} / "
                 f"{by[name, m]['hd95_mm_mean']:.1f}" for m in MODES]
        secs = ", ".join(f"{by[name, m]['s_per_scan']:.1f}" for m in MODES)
        print(f"| {name} | " + " | ".join(cells) + f" | {secs} |")
    say(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
