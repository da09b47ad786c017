"""Cross-domain benchmark: train on one phantom world, test on worlds shifted beyond it.

    python benchmarks/bench_shift.py [--quick] [--cases 16] [--test-cases 6] [--work DIR] [--out benchmarks/results/]

What it measures. A model trained on femurseg's phantoms is only worth something on real scans
if it does not depend on the look of one generator. Here each training configuration is a
4-fold ``femurseg cv`` (default preset network and schedule) on ``--cases`` phantoms (seed 0);
its fold ensemble then segments test cohorts (``--test-cases`` each, seeds that no training case
has) with ``femurseg predict`` (the run's threshold, post-processing and per-scan QC), and
``femurseg.evaluation.evaluate`` scores them against the phantoms' labels. The configurations:

* ``narrow + flip``: the phantom world and augmentation femurseg had before (the mirror only);
* ``narrow + nnunet aug``: the same data with nnU-Net v2's augmentation set (``AugmentConfig.preset("nnunet")``);
* ``wide + flip``: the wide phantom world (``femurseg.data.phantom.variation("wide")``) without it;
* ``wide + nnunet aug``: both;
* ``wide + light aug``: the wide world with the lighter set (``AugmentConfig.preset("light")``;
  today's default);
* ``wide + light + histogram aug``: the same with a random histogram shift (MONAI's
  ``RandHistogramShift``) on 30 % of the samples, the intensity kind aimed at a change of
  tissue contrast;
* ``wide + light + fg contrast aug``: the same with the femur's marrow moved towards the
  surrounding muscle (``foreground_contrast``, factor 0.35-1) on 30 % of the samples, the
  label-conditioned kind aimed at the same change; ``strong``: factor 0.05-1 on half the samples
  (marrow as dark as the muscle, only the cortex outlining the femur, as in the contrast shift);
* ``... (32 epochs)``: the default and the strong draw with twice the default's epochs (early
  stopping from 20), whether a longer schedule pays for the harder samples.

The test cohorts are the narrow world (in-domain for the first two), the wide world, and the
narrow world with each factor group of ``femurseg.data.phantom.SHIFTS`` moved beyond its range
one at a time (placement in the field of view, head size and sphericity, neck length and
angles, femur pose, T1 contrast, cortical thickness, trabecular scale, noise and bias, slice
profile) and all together. The shifted ranges lie outside the narrow world and reach past the
wide one, so no configuration has seen all of them.

Writes ``shift_cases.csv`` (per configuration, test cohort and case: DSC, precision, recall,
ASD, HD95, volume error, QC verdict) and ``shift_summary.csv`` (mean ± SD per configuration and
cohort, the fraction of scans QC did not pass, training seconds per fold). A run of a subset
(``--configs``) keeps the stored rows of the other configurations in both files. ``--quick``: 8
training cases, 2 folds, 3 test cases per cohort, three cohorts.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import RESULTS, machine_info, say, write_csv  # noqa: E402

# name -> (phantom world, augmentation preset, AugmentConfig fields changed from the preset)
CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "narrow + flip": ("narrow", "flip", {}),
    "narrow + nnunet aug": ("narrow", "nnunet", {}),
    "wide + flip": ("wide", "flip", {}),
    "wide + nnunet aug": ("wide", "nnunet", {}),
    "wide + light aug": ("wide", "light", {}),
    "wide + light + histogram aug": ("wide", "light", {"histogram_p": 0.3}),
    "wide + light + fg contrast aug": ("wide", "light", {"fg_contrast_p": 0.3, "fg_contrast": (0.35, 1.0)}),
    "wide + light + strong fg contrast aug": ("wide", "light", {"fg_contrast_p": 0.5, "fg_contrast": (0.05, 1.0)}),
    "wide + light aug (32 epochs)": ("wide", "light", {}),
    "wide + light + strong fg contrast aug (32 epochs)": ("wide", "light", {"fg_contrast_p": 0.5,
                                                                         "fg_contrast": (0.05, 1.0)}),
}
# name -> TrainConfig fields changed from the default preset (the rest train its 16 epochs)
TRAINING: dict[str, dict[str, Any]] = {
    "wide + light aug (32 epochs)": {"max_epochs": 32, "min_epochs": 20},
    "wide + light + strong fg contrast aug (32 epochs)": {"max_epochs": 32, "min_epochs": 20},
}
TEST_SEED = 1000  # test cohorts are drawn from seeds no training cohort (seed 0) uses


def test_cohorts(quick: bool = False) -> dict[str, tuple[str, Any]]:
    """Test cohort name -> (world, shift) for :func:`femurseg.data.phantom.variation`."""
    from femurseg.data.phantom import SHIFTS

    cohorts: dict[str, tuple[str, Any]] = {"narrow": ("narrow", None), "wide": ("wide", None)}
    if quick:
        cohorts["all shifts"] = ("narrow", "all")
        return cohorts
    for group in SHIFTS:
        cohorts[f"shift {group}"] = ("narrow", group)
    cohorts["all shifts"] = ("narrow", "all")
    return cohorts


def make_cohort(out: Path, n: int, seed: int, world: str, shift: Any) -> Path:
    from femurseg.data.synth import synthesize

    if not (out / "dataset.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        synthesize(out, n=n, modality="mr", seed=seed, variation=world, shift=shift, progress=False)
    return out


def augmentation(preset: str, changes: dict[str, Any]) -> dict[str, Any]:
    """The ``AugmentConfig`` dict of ``preset`` with ``changes`` applied (validated)."""
    from femurseg.data.augment import AugmentConfig

    return AugmentConfig.from_dict({**AugmentConfig.preset(preset).to_dict(), **changes}).to_dict()


def train(data: Path, run: Path, aug_cfg: dict[str, Any], folds: int, train_cfg: dict[str, Any] | None = None) -> float:
    """4-fold cv with the default preset, augmentation ``aug_cfg`` and the preset's training
    config changed by ``train_cfg``; returns training s per fold."""
    from femurseg.inference.run import is_run
    from femurseg.training.cv import run_cv

    if not (is_run(run) and (run / "summary.json").exists()):
        run_cv(data, run, aug_cfg=aug_cfg, train_cfg=train_cfg, folds=folds, seed=0, resume=run.exists(),
               progress=False)
    seconds = []
    for log in sorted(run.glob("fold_*/log.csv")):
        with open(log) as f:
            seconds.append(sum(float(r["seconds"]) for r in csv.DictReader(f)))
    return sum(seconds) / max(len(seconds), 1)


def score(run: Path, cohort: Path, out: Path) -> list[dict[str, Any]]:
    """Segment ``cohort``'s images with ``run`` (all folds, QC on) and evaluate against its labels."""
    from femurseg.evaluation.evaluate import evaluate_folders
    from femurseg.inference.predict import predict_command

    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    predict_command(run, [cohort / "imagesTr"], out, progress=False, echo=lambda _m: None, notify=lambda _m: None)
    qc = {}
    with open(out / "predictions.csv") as f:
        for r in csv.DictReader(f):  # the evaluation names a case without the channel suffix
            qc[r["case"].removesuffix("_0000")] = (r["qc"], r["qc_reasons"])
    rows = evaluate_folders(out, cohort / "labelsTr", progress=False, notify=lambda _m: None)
    for r in rows:
        r["qc"], r["qc_reasons"] = qc.get(r["case"], ("missing", ""))
    return rows


def vol_rel_err_pct(row: dict[str, Any]) -> float:
    """Signed volume error of one case in % of the reference volume (NaN for an empty reference)."""
    ref = float(row["vol_ref_cm3"])
    return 100.0 * float(row["vol_diff_cm3"]) / ref if ref > 0 else float("nan")


def summarise(cases: list[dict[str, Any]], train_s: dict[str, float]) -> list[dict[str, Any]]:
    import numpy as np

    info = machine_info()
    out = []
    keys = sorted({(r["config"], r["cohort"]) for r in cases}, key=lambda k: (list(CONFIGS).index(k[0]), k[1]))
    for cfg, cohort in keys:
        rows = [r for r in cases if r["config"] == cfg and r["cohort"] == cohort]
        row: dict[str, Any] = {"config": cfg, "cohort": cohort, "n": len(rows)}
        for m in ("dsc", "precision", "recall", "asd_mm", "hd95_mm", "vol_rel_err_pct"):
            v = np.array([float(r[m]) if m != "vol_rel_err_pct" else vol_rel_err_pct(r) for r in rows
                          if (r.get(m) if m != "vol_rel_err_pct" else r.get("vol_ref_cm3")) not in (None, "")], float)
            v = v[np.isfinite(v)]
            row[f"{m}_mean"] = float(v.mean()) if v.size else float("nan")
            row[f"{m}_sd"] = float(v.std(ddof=1)) if v.size > 1 else float("nan")
        row["qc_not_ok"] = sum(r["qc"] != "ok" for r in rows) / max(len(rows), 1)
        row["train_s_per_fold"] = round(train_s[cfg], 1)
        row["date"] = time.strftime("%Y-%m-%d %H:%M")
        row["cpu"] = info.get("cpu")
        out.append(row)
    return out


def keep_stored(path: Path, rows: list[dict[str, Any]], ran: list[str]) -> list[dict[str, Any]]:
    """``rows`` after the rows of ``path`` (if it exists) whose configuration was not run this time."""
    stored = []
    if path.exists():
        with open(path, newline="") as f:
            stored = [r for r in csv.DictReader(f) if r["config"] in CONFIGS and r["config"] not in ran]
    return stored + rows


def markdown(summary: list[dict[str, Any]]) -> str:
    """The README table: one row per test cohort, DSC (and HD95) per configuration."""
    order = list(test_cohorts())
    cohorts = sorted(dict.fromkeys(r["cohort"] for r in summary), key=lambda c: order.index(c) if c in order else len(order))
    cfgs = [c for c in CONFIGS if any(r["config"] == c for r in summary)]
    by = {(r["config"], r["cohort"]): r for r in summary}
    lines = ["| test cohort | " + " | ".join(f"{c}: DSC / HD95 mm" for c in cfgs) + " |",
             "|---|" + "---|" * len(cfgs)]
    for co in cohorts:
        cells = []
        for c in cfgs:
            r = by.get((c, co))
            cells.append("-" if r is None else f"{float(r['dsc_mean']):.3f} ± {float(r['dsc_sd']):.3f} / {float(r['hd95_mm_mean']):.1f}")
        lines.append(f"| {co} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--test-cases", type=int, default=6)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--work", type=Path, default=RESULTS / "shift_work")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    if a.quick:
        a.cases, a.test_cases, a.folds = 8, 3, 2
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configuration(s): {unknown}")
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cohorts = {name: make_cohort(a.work / "test" / name.replace(" ", "_"), a.test_cases, TEST_SEED + i, w, s)
               for i, (name, (w, s)) in enumerate(test_cohorts(a.quick).items())}
    say(f"test cohorts ready ({len(cohorts)} x {a.test_cases} cases, {time.perf_counter() - t0:.0f} s)")
    cases: list[dict[str, Any]] = []
    train_s: dict[str, float] = {}
    for cfg in configs:
        world, preset, changes = CONFIGS[cfg]
        data = make_cohort(a.work / f"train_{world}", a.cases, 0, world, None)
        run = a.work / ("run_" + cfg.replace(" + ", "_").replace("(", "").replace(")", "").replace(" ", "_"))
        t1 = time.perf_counter()
        train_s[cfg] = train(data, run, augmentation(preset, changes), a.folds, TRAINING.get(cfg))
        say(f"{cfg}: trained ({time.perf_counter() - t1:.0f} s, {train_s[cfg]:.0f} s per fold)")
        for name, cohort in cohorts.items():
            rows = score(run, cohort, a.work / "pred" / run.name / name.replace(" ", "_"))
            for r in rows:
                cases.append({"config": cfg, "cohort": name, **r})
            dsc = [float(r["dsc"]) for r in rows]
            say(f"  {name}: DSC {sum(dsc) / len(dsc):.3f}, QC not ok {sum(r['qc'] != 'ok' for r in rows)}/{len(rows)}")
    suffix = "_quick" if a.quick else ""
    cases = keep_stored(a.out / f"shift_cases{suffix}.csv", cases, configs)
    summary = keep_stored(a.out / f"shift_summary{suffix}.csv", summarise([r for r in cases if r["config"] in configs],
                                                                          train_s), configs)
    order = list(CONFIGS)
    summary.sort(key=lambda r: order.index(r["config"]))
    write_csv(cases, a.out / f"shift_cases{suffix}.csv")
    write_csv(summary, a.out / f"shift_summary{suffix}.csv")
    print(markdown(summary))
    say(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
