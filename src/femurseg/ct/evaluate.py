"""Scoring a cascade: out-of-fold label maps against the reference (paper 003 Tables 1 and 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from femurseg.ct.stages import (
    CASCADE_TASK,
    COMPARTMENTS,
    _ensemble_threshold,
    combine_stages,
    mean_oof,
    periosteal_mask,
    stage2_input,
    stage_names,
)


def evaluate_cascade(run_dir: str | Path, *, device: str | None = None, progress: bool = True,
                     dataset: str | Path | None = None) -> dict[str, Any]:
    """Cascade out-of-fold labels and their evaluation (paper 003 Tables 1 and 2).

    For each case of fold k: stage-1 out-of-fold probability -> PR threshold -> :func:`periosteal_mask`
    = periosteal mask; stage-2 fold-k model on the CT masked with it (:func:`stage2_input`) ->
    endosteal probability -> :func:`combine_stages` (stage 2's PR threshold) -> ``oof_labels/``.
    With several seeds, each stage's probability is the mean over its seeds' runs (stage 1: their
    out-of-fold maps; stage 2: their fold-k models) and the thresholds are taken on the averaged
    out-of-fold maps (:func:`_ensemble_threshold`).
    Metrics per compartment (periosteal {1, 2}, endosteal {1}, cortical {2}): DSC, ASD (mm),
    sensitivity, specificity. Volumes per region (:mod:`femurseg.ct.measure`, regions fitted on
    each mask separately, as two software runs would) and their MAE / RMSE / relative error
    over cases (:func:`femurseg.evaluation.metrics.volume_errors`); also with the reference's regions
    applied to the prediction (each voxel in the region of the nearest reference bone voxel:
    the segmentation error alone, without the region fit's own variability).
    """

    from femurseg.core import io
    from femurseg.core.progress import progress as progress_bar
    from femurseg.data.dataset import load_checked
    from femurseg.inference.predict import load_predictor, predict_probability
    from femurseg.inference.run import load_run, write_json

    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    opts = config["cascade"]
    ds = load_checked(dataset or config["dataset"], progress=False)
    names1, names2 = stage_names(int(opts.get("seeds", 1)))
    runs1, runs2 = [run_dir / n for n in names1], [run_dir / n for n in names2]
    split = load_run(runs1[0]).split
    (run_dir / "oof_labels").mkdir(exist_ok=True)
    predictors: dict[int, list[Any]] = {}
    metric_rows: list[dict[str, Any]] = []
    volume_rows: list[dict[str, Any]] = []
    cases = [c for c in split.cases if all((r / "oof" / f"{c}.nii.gz").exists() for r in runs1)]
    thr1, thr2 = _ensemble_threshold(runs1, ds, cases, 1), _ensemble_threshold(runs2, ds, cases, 2)
    for cid in progress_bar(cases, desc="cascade evaluate", unit="case", disable=not progress, leave=False):
        k = split.fold_of(cid)
        case = ds.case(cid)
        vol = io.read_image(case.image)
        ref = np.asarray(io.read_image(case.label, dtype=None).data).astype(np.uint8)
        sp = vol.spacing
        out_path = run_dir / "oof_labels" / f"{cid}.nii.gz"
        if out_path.exists():
            pred = np.asarray(io.read_image(out_path, dtype=None).data).astype(np.uint8)
        else:
            peri = periosteal_mask(mean_oof(runs1, cid), thr1, sp)
            if k not in predictors:
                predictors[k] = [load_predictor(r, folds=k, device=device or "auto", notify=lambda m: None) for r in runs2]
            masked = vol.with_data(stage2_input(vol.data, peri, sp, float(opts["dilate_mm"]), float(opts["fill_hu"])))
            p2 = np.mean([predict_probability(p, masked) for p in predictors[k]], axis=0, dtype=np.float32)
            pred = combine_stages(peri, p2, thr2)
            io.write_like(out_path, pred, vol, np.uint8)
        row, vrows = score_labels(pred, ref, sp)
        metric_rows.append({"case": cid, "fold": k, **row})
        volume_rows += [{"case": cid, **v} for v in vrows]
    summary = summarise_scores(metric_rows, volume_rows, run_dir)
    summary["thresholds"] = {"stage1_pr": thr1, "stage2_pr": thr2}
    write_json(run_dir / "cascade_summary.json", summary)
    return summary


def score_labels(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float]
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One case's cascade scores: a predicted label map (0 background, 1 trabecular, 2 cortical)
    against the reference on the same grid (spacing in mm).

    Returns ``(row, volume_rows)``: per compartment of :data:`COMPARTMENTS` (periosteal {1, 2},
    endosteal {1}, cortical {2}) ``<name>_dsc``, ``<name>_asd_mm``, ``<name>_sensitivity``,
    ``<name>_specificity`` (plus ``region_error`` when the region fit failed on a mask), and one
    row per side, region and compartment: ``ref_cm3``, ``pred_cm3`` (regions fitted on each mask
    separately, as two software runs would) and ``pred_in_ref_regions_cm3`` (each predicted voxel
    in the region of the nearest reference bone voxel: the segmentation error alone)."""
    from femurseg.ct.measure import region_volume_pairs
    from femurseg.evaluation.metrics import overlap_metrics, surface_metrics

    pred, ref = np.asarray(pred).astype(np.uint8), np.asarray(ref).astype(np.uint8)
    row: dict[str, Any] = {}
    for name, values in COMPARTMENTS.items():
        pm, rm = np.isin(pred, values), np.isin(ref, values)
        o = overlap_metrics(pm, rm)
        row[f"{name}_dsc"] = o["dsc"]
        row[f"{name}_asd_mm"] = surface_metrics(pm, rm, spacing)["asd"]
        row[f"{name}_sensitivity"] = o["recall"]
        row[f"{name}_specificity"] = o["specificity"]
    volume_rows = []
    for v in region_volume_pairs(pred, ref, spacing):
        if v["fit_error"]:
            row["region_error"] = v["fit_error"]
        volume_rows.append({"side": v["side"], "region": v["region"], "compartment": v["compartment"],
                            "ref_cm3": v["ref_cm3"], "pred_cm3": v["pred_cm3"],
                            "pred_in_ref_regions_cm3": v["pred_in_ref_regions_cm3"]})
    return row, volume_rows


def summarise_scores(metric_rows: list[dict[str, Any]], volume_rows: list[dict[str, Any]],
                     out_dir: str | Path | None = None) -> dict[str, Any]:
    """Mean and SD of every :func:`score_labels` metric over cases and 003 Table 2's volume
    errors (MAE, RMSE, relative error; :func:`femurseg.evaluation.metrics.volume_errors`) per
    region and compartment, for the fitted (``own``) and the ``reference`` regions (both femurs of
    a bilateral scan pool into one row, as 003 pools its femurs). With ``out_dir``, writes
    ``cascade_metrics.csv`` and ``cascade_volumes.csv`` there."""
    from femurseg.evaluation.metrics import volume_errors

    if out_dir is not None:
        for name, rows in (("cascade_metrics.csv", metric_rows), ("cascade_volumes.csv", volume_rows)):
            if rows:
                _write_rows(Path(out_dir) / name, rows)
    summary: dict[str, Any] = {"task": CASCADE_TASK, "cases": len(metric_rows)}
    for key in (k for k in (metric_rows[0] if metric_rows else {}) if k not in ("case", "fold", "region_error")):
        v = np.array([r[key] for r in metric_rows], float)
        summary[f"mean_{key}"] = float(np.mean(v))
        summary[f"sd_{key}"] = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
    vols: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for v in volume_rows:
        vols.setdefault(("own", v["region"], v["compartment"]), []).append((v["pred_cm3"], v["ref_cm3"]))
        vols.setdefault(("reference", v["region"], v["compartment"]), []).append(
            (v["pred_in_ref_regions_cm3"], v["ref_cm3"]))
    table2: dict[str, Any] = {}
    for (regions, region, comp), pairs in vols.items():
        p = np.array([a for a, _ in pairs], float)
        r = np.array([b for _, b in pairs], float)
        ok = np.isfinite(p) & (r > 0)
        if not ok.any():
            continue
        e = volume_errors(p[ok], r[ok])
        e.pop("re_pct", None)
        e["ref_mean_cm3"] = float(np.mean(r[ok]))
        e["ref_sd_cm3"] = float(np.std(r[ok], ddof=1)) if ok.sum() > 1 else 0.0
        table2.setdefault(regions, {})[f"{region}/{comp}"] = e
    summary["volume_errors"] = table2
    summary["region_failures"] = [r["case"] for r in metric_rows if "region_error" in r]
    return summary


def evaluate_label_folder(pred_dir: str | Path, dataset: str | Path, *, progress: bool = True
                          ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score a folder of ``<case>.nii.gz`` label maps (another method's, e.g. nnU-Net's) against a
    CT dataset's labels exactly as :func:`evaluate_cascade` scores the cascade; returns the
    per-case rows and :func:`summarise_scores`' summary. Cases without a prediction are skipped."""
    from femurseg.core import io
    from femurseg.core.errors import FemursegError
    from femurseg.core.progress import progress as progress_bar
    from femurseg.data.dataset import load_checked

    ds = load_checked(dataset, progress=False)
    pred_dir = Path(pred_dir)
    metric_rows: list[dict[str, Any]] = []
    volume_rows: list[dict[str, Any]] = []
    cases = [c for c in ds.cases if (pred_dir / f"{c.case_id}.nii.gz").exists()]
    if not cases:
        raise FemursegError(f"{pred_dir}: no <case>.nii.gz label map of the dataset's cases")
    for case in progress_bar(cases, desc="evaluate labels", unit="case", disable=not progress, leave=False):
        ref_v = io.read_image(case.label, dtype=None)
        pred_v = io.read_image(pred_dir / f"{case.case_id}.nii.gz", dtype=None)
        if pred_v.data.shape != ref_v.data.shape:
            raise FemursegError(f"{case.case_id}: prediction shape {pred_v.data.shape} != reference {ref_v.data.shape}")
        row, vrows = score_labels(pred_v.data, ref_v.data, ref_v.spacing)
        metric_rows.append({"case": case.case_id, **row})
        volume_rows += [{"case": case.case_id, **v} for v in vrows]
    return metric_rows, summarise_scores(metric_rows, volume_rows)


# ----------------------------------------------------------------------------- the CT study

TABLE2_ROWS: tuple[tuple[str, str, str], ...] = (
    ("Femur head", "head", "total"),
    ("Femur neck", "neck", "total"),
    ("Combination", "combination", "total"),
    ("Cortical bone in femur neck", "neck", "cortical"),
    ("Cortical bone in combination", "combination", "cortical"),
    ("Trochanter", "trochanter", "total"),
    ("Intertrochanter", "intertrochanter", "total"),
    ("Total", "total", "total"),
    ("Trabecular bone, total", "total", "trabecular"),
    ("Cortical bone, total", "total", "cortical"),
)
"""003 Table 2's five rows (head, neck, neck + trochanter + intertrochanter, their cortical bone)
followed by the other regions and compartments."""


def cascade_tables(summary: dict[str, Any], regions: str = "own") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """003 Table 1 (per compartment: DSC, ASD, specificity, sensitivity; mean and SD over cases)
    and Table 2 (per region: reference volume mean +- SD, MAE, RMSE, relative error mean / min /
    max) rows from a cascade summary. ``regions``: "own" (each mask's own region fit) or
    "reference" (the reference's regions applied to the prediction)."""
    t1 = []
    for name in COMPARTMENTS:
        if f"mean_{name}_dsc" not in summary:
            continue
        row: dict[str, Any] = {"surface": name}
        for key, col in (("dsc", "DSC"), ("asd_mm", "ASD_mm"), ("specificity", "SP"), ("sensitivity", "SN")):
            row[col] = summary[f"mean_{name}_{key}"]
            row[f"{col}_sd"] = summary[f"sd_{name}_{key}"]
        t1.append(row)
    t2 = []
    errs = summary.get("volume_errors", {}).get(regions, {})
    for label, region, comp in TABLE2_ROWS:
        e = errs.get(f"{region}/{comp}")
        if e is None:
            continue
        t2.append({"target": label, "region": region, "compartment": comp, "n": e["n"],
                   "ref_mean_cm3": e["ref_mean_cm3"], "ref_sd_cm3": e["ref_sd_cm3"], "mae_cm3": e["mae"],
                   "rmse_cm3": e["rmse"], "bias_cm3": e["bias"], "re_mean_pct": e["re_mean_pct"],
                   "re_min_pct": e["re_min_pct"], "re_max_pct": e["re_max_pct"]})
    return t1, t2


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    from femurseg.core.tables import write_csv

    if rows:
        write_csv(rows, path)


def format_cascade_report(summary: dict[str, Any]) -> str:
    """Plain-text 003 Tables 1 and 2 of a cascade summary."""
    t1, t2 = cascade_tables(summary, "own")
    _, t2r = cascade_tables(summary, "reference")
    lines = [f"CT cascade, {summary.get('cases', 0)} cases (out-of-fold)", "",
             "Table 1  surface      DSC             ASD (mm)        SP       SN"]
    for r in t1:
        lines.append(f"         {r['surface']:<12} {r['DSC']:.4f}+-{r['DSC_sd']:.4f}  {r['ASD_mm']:.3f}+-{r['ASD_mm_sd']:.3f}"
                     f"    {r['SP']:.4f}   {r['SN']:.4f}")
    lines += ["", "Table 2  target                          ref cm3        regions fitted on each mask:"
              "  MAE    RMSE   RE % mean (min, max)   | reference regions: RE % mean (min, max)"]
    own = {r["target"]: r for r in t2}
    for rr in t2r:
        r = own.get(rr["target"])
        left = (f"{r['mae_cm3']:6.3f} {r['rmse_cm3']:6.3f}  {r['re_mean_pct']:5.2f} ({r['re_min_pct']:.2f}, "
                f"{r['re_max_pct']:.2f})") if r else "   (no region fit)"
        lines.append(f"         {rr['target']:<31} {rr['ref_mean_cm3']:6.2f}+-{rr['ref_sd_cm3']:5.2f}   {left:<40}"
                     f" | {rr['re_mean_pct']:5.2f} ({rr['re_min_pct']:.2f}, {rr['re_max_pct']:.2f})")
    if summary.get("region_failures"):
        lines.append(f"no region fit on the prediction of: {', '.join(summary['region_failures'])}")
    return "\n".join(lines)
