"""Compare models evaluated on the same cases: tables, statistics, figures, one HTML report.

``femurseg compare RUN_A RUN_B ... --out REPORT_DIR`` (:func:`run_compare`) writes to
``REPORT_DIR``:

* ``table_metrics.csv`` - per model mean ± SD of DSC, precision, recall, ASD, MSD (and HD95),
  AP and AUC as median (IQR), as 001 Tables 1 and 3;
* ``table_significance.csv`` (+ ``table_significance_pairs.csv`` with the p-values) - paired
  Wilcoxon signed-rank tests of the per-case ``--metric`` (default AP) between every pair of
  models, Holm-corrected, shown as ns / * / ** / *** (001 Table 4);
* ``table_volumes.csv`` - volume agreement per model: MAE, RMSE, relative error (003 Table 2);
* ``per_case.csv`` - every model's per-case metrics (long format);
* ``roc_pr.png`` (001 Fig. 2, pooled out-of-fold voxels), ``boxplots.png`` (Fig. 3),
  ``volume_agreement.png`` (003 Fig. 8), ``bland_altman.png``;
* ``case_<case>.png`` for the chosen cases (default: best, median and worst DSC of the first
  model): image with reference outline, probability map, final mask and a 3D surface of the
  prediction coloured by its distance to the reference surface (001 Figs. 4-5), with the
  coloured meshes in ``meshes/<case>_<model>.ply`` / ``.vtk`` and
  ``meshes/<case>_<model>.png`` renderings;
* ``report.html`` - all of it in one self-contained page (figures embedded).

A model is a cross-validation run folder (evaluated with :func:`femurseg.evaluation.evaluate.evaluate_run`:
out-of-fold maps at the run's PR threshold) or a per-case results CSV written by
``femurseg evaluate`` (tables, box plots, statistics and volume plots only: no curves and no
case panels). Only the cases common to all models are compared; differing case sets are
reported.

Length: the tables and figures of one report share their row model and colours.
"""

from __future__ import annotations

import copy
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from femurseg.core.errors import FemursegError

Notify = Callable[[str], None]

TABLE_MEAN_SD = ("dsc", "precision", "recall", "asd_mm", "msd_mm", "hd95_mm")
TABLE_MEDIAN_IQR = ("ap", "auc")
COLUMN_TITLES = {"dsc": "DSC ↑", "precision": "Precision ↑", "recall": "Recall ↑", "asd_mm": "ASD [mm] ↓",
                 "msd_mm": "MSD [mm] ↓", "hd95_mm": "HD95 [mm] ↓", "ap": "AP ↑", "auc": "AUC ↑"}
LOWER_IS_BETTER = {"asd_mm", "msd_mm", "hd95_mm", "vol_abs_err_cm3"}
MAX_PANEL_MODELS = 4


def _stderr(msg: str) -> None:
    print(f"femurseg: {msg}", file=sys.stderr)


@dataclass
class RunSpec:
    """One model to compare: a run folder (or results CSV) with optional overrides."""

    path: Path
    name: str | None = None
    postprocess: str | None = None
    threshold: str | float | None = None


@dataclass
class ModelResult:
    """A model's per-case results (and, for runs, what the figures need)."""

    name: str
    source: Path
    rows: list[dict[str, Any]]
    evaluation: Any = None  # femurseg.evaluation.evaluate.RunEvaluation for runs
    curves: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def by_case(self) -> dict[str, dict[str, Any]]:
        return {str(r["case"]): r for r in self.rows}

    def values(self, key: str, cases: Sequence[str]) -> np.ndarray:
        bc = self.by_case
        return np.array([_float(bc[c].get(key)) for c in cases], dtype=float)

    @property
    def seconds_per_case(self) -> float | None:
        return self.evaluation.seconds_per_case() if self.evaluation is not None else None


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------------- naming


def model_label(config: Mapping[str, Any], postprocess: str = "none") -> str:
    """A paper-style label from a run config: ``"3D U-Net F32 L4 r=1,2,4,8"``, ``"2D U-Net* F64 L3 PP"``."""
    m = config.get("model") or {}
    name = str(m.get("name", "model"))
    base = {"unet2d": "2D U-Net", "unet2d-unpadded": "2D U-Net*", "unet3d": "3D U-Net",
            "unet3d-unpadded": "3D U-Net*", "vnet": "V-Net", "patchcnn": "patch CNN"}.get(name, name)
    parts = [base]
    if m.get("features") is not None:
        parts.append(f"F{m['features']}")
    if m.get("levels") is not None and name != "patchcnn":
        parts.append(f"L{m['levels']}")
    if m.get("dilations"):
        parts.append("r=" + ",".join(str(d) for d in m["dilations"]))
    if postprocess and postprocess != "none":
        parts.append("PP" if postprocess == "lcc" else f"PP({postprocess})")
    return " ".join(parts)


def _unique_names(names: list[str], sources: list[Path]) -> list[str]:
    out = list(names)
    for n in set(names):
        idx = [i for i, x in enumerate(names) if x == n]
        if len(idx) > 1:
            for i in idx:
                out[i] = f"{n} ({sources[i].name})"
    if len(set(out)) < len(out):
        out = [f"{n} #{i + 1}" for i, n in enumerate(out)]
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


# --------------------------------------------------------------------------------- loading


def load_model(spec: RunSpec, gt: str | os.PathLike | None = None, progress: bool = True,
               notify: Notify = _stderr) -> ModelResult:
    """Evaluate a run folder (or read a results CSV) into a :class:`ModelResult`."""
    from femurseg.evaluation import evaluate as ev
    from femurseg.inference.run import is_run

    p = Path(spec.path)
    if p.is_file() and p.suffix.lower() == ".csv":
        rows = ev.read_csv(p)
        if not rows or "case" not in rows[0]:
            raise FemursegError(f"{p}: not a per-case results CSV (needs a 'case' column; write it with femurseg evaluate)")
        return ModelResult(spec.name or p.stem, p, rows)
    if not p.exists():
        raise FemursegError(f"{p}: no such run folder or results CSV")
    if not is_run(p):
        raise FemursegError(f"{p}: not a femurseg run folder (config.json) nor a results CSV")
    e = ev.evaluate_run(p, gt=gt, threshold=spec.threshold, postprocess=spec.postprocess, progress=progress,
                        notify=notify)
    name = spec.name or model_label(e.config, e.postprocess)
    return ModelResult(name, p, e.rows, e, e.curves())


def common_cases(models: Sequence[ModelResult], notify: Notify = _stderr) -> list[str]:
    """Cases evaluated for every model (sorted); warns when the case sets differ."""
    sets = [set(m.by_case) for m in models]
    common = set.intersection(*sets) if sets else set()
    union = set.union(*sets) if sets else set()
    if common != union:
        details = "; ".join(f"{m.name}: {len(s)} cases, {len(s - common)} not shared" for m, s in zip(models, sets))
        notify(f"warning: the models were evaluated on different case sets; comparing the {len(common)} "
               f"common case(s) only ({details})")
    if not common:
        raise FemursegError("compare: the models have no case in common")
    return sorted(common)


# --------------------------------------------------------------------------------- tables


def _fmt_mean_sd(v: np.ndarray, digits: int) -> str:
    from femurseg.evaluation.stats import summarise

    s = summarise(v)
    if s["n"] == 0:
        return "–"
    mean = "∞" if math.isinf(s["mean"]) else f"{s['mean']:.{digits}f}"
    sd = "–" if not math.isfinite(s["sd"]) else f"{s['sd']:.{digits}f}"
    return f"{mean} ± {sd}"


def _fmt_median_iqr(v: np.ndarray, digits: int) -> str:
    """001 Table 3 style: ``median (IQR)`` with IQR = q3 - q1."""
    from femurseg.evaluation.stats import summarise

    s = summarise(v)
    if s["n"] == 0:
        return "–"
    return f"{s['median']:.{digits}f} ({s['q3'] - s['q1']:.{digits}f})"


def metrics_table(models: Sequence[ModelResult], cases: Sequence[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(formatted rows for the report, numeric rows for the CSV), one row per model.

    Mean ± SD of DSC, precision, recall, ASD, MSD, HD95; median (IQR) of AP and AUC (001 Tables 1, 3).
    """
    from femurseg.evaluation.stats import summarise

    shown, numeric = [], []
    for m in models:
        row: dict[str, Any] = {"model": m.name, "n": len(cases)}
        num: dict[str, Any] = {"model": m.name, "n": len(cases)}
        for k in TABLE_MEAN_SD:
            v = m.values(k, cases)
            if np.all(np.isnan(v)):
                continue
            digits = 3 if k in ("dsc", "precision", "recall") else 2
            row[COLUMN_TITLES[k]] = _fmt_mean_sd(v, digits)
            s = summarise(v)
            num[f"{k}_mean"], num[f"{k}_sd"] = s["mean"], s["sd"]
        for k in TABLE_MEDIAN_IQR:
            v = m.values(k, cases)
            if np.all(np.isnan(v)):
                continue
            row[f"{COLUMN_TITLES[k]} median (IQR)"] = _fmt_median_iqr(v, 3)
            s = summarise(v)
            num[f"{k}_median"], num[f"{k}_q1"], num[f"{k}_q3"] = s["median"], s["q1"], s["q3"]
        if m.curves is not None:
            row["pooled AUC"] = f"{m.curves['auc']:.4f}"
            row["pooled AP"] = f"{m.curves['ap']:.4f}"
            num["pooled_auc"], num["pooled_ap"] = m.curves["auc"], m.curves["ap"]
        if m.evaluation is not None:
            row["threshold"] = f"{m.evaluation.threshold:.3f}"
            num["threshold"], num["postprocess"] = m.evaluation.threshold, m.evaluation.postprocess
        spc = m.seconds_per_case
        if spc is not None:
            row["s / subject"] = f"{spc:.2f}"
            num["seconds_per_case"] = spc
        shown.append(row)
        numeric.append(num)
    return shown, numeric


def significance(models: Sequence[ModelResult], cases: Sequence[str], metric: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """001 Table 4: (matrix rows ``{"model", <other model>: stars}`` for the upper triangle,
    the pairwise rows of :func:`femurseg.evaluation.stats.wilcoxon_holm`)."""
    from femurseg.evaluation.stats import wilcoxon_holm

    if len(models) < 2:
        return [], []
    table = {m.name: m.values(metric, cases) for m in models}
    pairs = wilcoxon_holm(table)
    lookup = {(r["model_a"], r["model_b"]): r["stars"] for r in pairs}
    names = [m.name for m in models]
    matrix = []
    for i, a in enumerate(names[:-1]):
        row: dict[str, Any] = {"model": a}
        for j, b in enumerate(names[1:], start=1):
            row[b] = lookup.get((a, b), "") if j > i else ""
        matrix.append(row)
    return matrix, pairs


def volume_table(models: Sequence[ModelResult], cases: Sequence[str]) -> list[dict[str, Any]]:
    """003 Table 2 per model and compartment (:func:`femurseg.evaluation.evaluate.volume_summary`)."""
    from femurseg.evaluation.evaluate import volume_summary

    out = []
    for m in models:
        bc = m.by_case
        for v in volume_summary([bc[c] for c in cases]):
            out.append({"model": m.name, **v})
    return out


# --------------------------------------------------------------------------------- case panels


def pick_cases(model: ModelResult, cases: Sequence[str], key: str = "dsc") -> dict[str, str]:
    """Best, median and worst case by ``key`` of ``model``: ``{case: "best DSC"...}`` (ordered)."""
    v = model.values(key, cases)
    ok = np.flatnonzero(~np.isnan(v))
    if ok.size == 0:
        return {cases[0]: "first case"} if cases else {}
    order = ok[np.argsort(v[ok], kind="stable")]
    picks = [(order[-1], "best"), (order[len(order) // 2], "median"), (order[0], "worst")]
    out: dict[str, str] = {}
    for i, label in picks:
        c = cases[int(i)]
        out[c] = f"{out[c]}/{label}" if c in out else label
    return {c: f"{lbl} {key.upper()}" for c, lbl in out.items()}


def _nice_vmax(distances: Sequence[np.ndarray], floor: float) -> float:
    """Colour range (+-mm) of the surface distance: the smallest 90th percentile of |d| over the
    models (so the best model's errors are visible; far-off islands saturate), at least
    ``floor`` (the coarsest voxel size), rounded up to 0.5, 1, 2, 3, 5, 10, 20 or 50 mm."""
    qs = []
    for d in distances:
        a = np.abs(np.asarray(d, float))
        a = a[np.isfinite(a)]
        if a.size:
            qs.append(float(np.percentile(a, 90)))
    q = max(min(qs) if qs else 1.0, floor)
    for nice in (0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0):
        if q <= nice:
            return nice
    return 100.0


def _image_for(dataset: Path | None, case: str):
    """The case's image Volume from the run's dataset (None if not available)."""
    from femurseg.core import io
    from femurseg.data.dataset import load_dataset

    if dataset is None:
        return None
    try:
        ds = load_dataset(dataset)
        return io.read_image(ds.case(case).image)
    except (FemursegError, OSError):
        return None


def case_panels(
    models: Sequence[ModelResult], cases: Mapping[str, str], out: Path, gt: str | os.PathLike | None = None,
    progress: bool = True, notify: Notify = _stderr,
) -> list[dict[str, Any]]:
    """Write ``case_<case>.png`` panels plus coloured meshes; returns one dict per case
    (``case``, ``label``, ``png``, ``meshes``: [(path, label)])."""
    from femurseg.core.progress import progress as progress_bar
    from femurseg.evaluation import evaluate as ev
    from femurseg.evaluation.report import figures, surface

    runs = [m for m in models if m.evaluation is not None]
    if not runs:
        return []
    mesh_dir = out / "meshes"
    mesh_dir.mkdir(exist_ok=True)
    refs = ev.reference_files(gt) if gt is not None else ev.reference_files(runs[0].evaluation.dataset)
    results = []
    for case, label in progress_bar(list(cases.items()), desc="case panels", unit="case", disable=not progress,
                                    file=sys.stderr):
        per_model: dict[str, dict[str, Any]] = {}
        ref_vol = None
        for m in runs:
            arrays = ev.run_case_arrays(m.evaluation, case, refs)
            ref_vol = arrays["reference"]
            per_model[m.name] = {"prob": arrays["prob"], "mask": arrays["mask"], "metrics": m.by_case.get(case, {})}
        assert ref_vol is not None
        ref = ref_vol.data != 0
        spacing = ref_vol.spacing
        sigma = 0.5 * max(spacing)
        for m in per_model.values():
            m["mesh"] = surface.coloured_surface(m["mask"], ref, spacing, smooth_sigma_mm=sigma)
        vmax = _nice_vmax([m["mesh"].distance for m in per_model.values() if m["mesh"].distance is not None],
                          floor=max(spacing))
        img = _image_for(runs[0].evaluation.dataset if gt is None else Path(gt), case)
        image = img.data if img is not None and img.data.shape == ref.shape else ref.astype(np.float32)
        meshes = []
        for name, m in per_model.items():
            stem = f"{_safe(case)}_{_safe(name)}"
            surface.write_ply(mesh_dir / f"{stem}.ply", m["mesh"], spacing, ref_vol.affine, vmax=vmax)
            surface.write_vtk(mesh_dir / f"{stem}.vtk", m["mesh"], spacing, ref_vol.affine)
            surface.render_surface(mesh_dir / f"{stem}.png", m["mesh"], vmax=vmax,
                                   title=f"{case} - {name}: surface distance to reference")
            meshes.append((f"meshes/{stem}.ply", f"{name}: PLY"), )
            meshes.append((f"meshes/{stem}.vtk", f"{name}: VTK"))
            meshes.append((f"meshes/{stem}.png", f"{name}: rendering (anterior and posterior views)"))
        png = out / f"case_{_safe(case)}.png"
        modality = str(runs[0].evaluation.config.get("modality", "MR"))
        figures.case_panel_figure(image, ref, per_model, spacing, png, title=f"case {case} ({label})" if label == "chosen" else f"case {case} ({label} of {models[0].name})",
                                  surface_vmax=vmax, modality=modality)
        results.append({"case": case, "label": label, "png": png.name, "meshes": meshes, "vmax": vmax})
    return results


def qc_rows(model: ModelResult, cases: Sequence[str], gt: str | os.PathLike | None = None,
            checks: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Quality control of a run's out-of-fold masks, one row per case: ``case``, ``qc``
    (``ok``/``warn``/``fail``), ``qc_reasons``, ``dsc`` and the checked values.

    Each mask (the run's threshold and post-processing, as evaluated) is checked against its
    image and the run's ``qc_reference.json`` with :func:`femurseg.inference.qc.assess`, the
    checks ``femurseg predict`` makes, so the report shows whether QC would have flagged the cases
    that segment badly. A case predicted by one fold model has no fold agreement to check.
    ``checks``: further mask checks (:data:`femurseg.inference.qc.MaskCheck`). Empty for a results
    CSV (no masks)."""
    from femurseg.evaluation import evaluate as ev
    from femurseg.inference.qc import assess, load_reference

    e = model.evaluation
    if e is None:
        return []
    reference = load_reference(e.run)
    refs = ev.reference_files(gt) if gt is not None else ev.reference_files(e.dataset)
    bc = model.by_case
    rows = []
    for case in cases:
        arrays = ev.run_case_arrays(e, case, refs)
        img = _image_for(e.dataset if gt is None else Path(gt), case)
        if img is None or img.data.shape != arrays["mask"].shape:
            continue
        rec = assess(img.data, img.spacing, arrays["mask"], prob=arrays["prob"], reference=reference,
                     checks=checks)
        m = rec["mask"]
        rows.append({"model": model.name, "case": case, "qc": rec["verdict"],
                     "qc_reasons": " | ".join(rec["reasons"]), "dsc": _float(bc.get(case, {}).get("dsc")),
                     "volume_cm3": round(m["volume_cm3"], 2), "components": int(m["components"]),
                     "entropy_bits": None if rec["entropy_bits"] is None else round(rec["entropy_bits"], 4),
                     "smoothness": round(rec["image"]["smoothness"], 3),
                     "reference": "yes" if rec["reference"] else "no"})
    return rows


def qc_counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """``{"ok": n, "warn": n, "fail": n}`` over :func:`qc_rows` rows."""
    return {v: sum(1 for r in rows if r["qc"] == v) for v in ("ok", "warn", "fail")}


def qc_blocks(models: Sequence[ModelResult], rows: Sequence[Mapping[str, Any]], H: Any) -> list[Any]:
    """The report's quality-control section: verdict counts per model and every case not ``ok``."""
    summary = []
    for m in models:
        mine = [r for r in rows if r["model"] == m.name]
        if not mine:
            continue
        c = qc_counts(mine)
        flagged = [r for r in mine if r["qc"] != "ok"]
        dsc_ok = [r["dsc"] for r in mine if r["qc"] == "ok" and math.isfinite(r["dsc"])]
        dsc_fl = [r["dsc"] for r in flagged if math.isfinite(r["dsc"])]
        summary.append({"model": m.name, "cases": str(len(mine)), "ok": str(c["ok"]), "warn": str(c["warn"]),
                        "fail": str(c["fail"]),
                        "DSC of ok cases": f"{np.mean(dsc_ok):.3f}" if dsc_ok else "-",
                        "DSC of flagged cases": f"{np.mean(dsc_fl):.3f}" if dsc_fl else "-"})
    flagged_rows = [{"model": r["model"], "case": r["case"], "QC": r["qc"], "DSC": f"{r['dsc']:.3f}",
                     "reasons": r["qc_reasons"]} for r in rows if r["qc"] != "ok"]
    out: list[Any] = [
        H.Heading("Quality control of the out-of-fold masks"),
        H.Table(summary, list(summary[0]), csv="table_qc.csv",
                caption="Each out-of-fold mask checked against its image and the run's qc_reference.json as "
                        "femurseg predict checks a new scan (femurseg.inference.qc: constant or structureless "
                        "image, intensities of another modality, empty mask, femur volume outside the training "
                        "range, several large components, no femoral head). One fold model predicts each case, "
                        "so the fold-agreement check of femurseg predict is not made here. QC sees only the "
                        "image and the mask: a mask that is consistently too small can pass.")]
    if flagged_rows:
        out.append(H.Table(flagged_rows, ["model", "case", "QC", "DSC", "reasons"],
                           caption="Cases with a warn or fail verdict and the reasons."))
    else:
        out.append(H.Paragraph("Every checked case is ok."))
    return out


# --------------------------------------------------------------------------------- main


def _parse_specs(runs: Sequence[Any], names: Sequence[str] | None) -> list[Any]:
    specs = [copy.copy(r) if isinstance(r, (RunSpec, ModelResult)) else RunSpec(Path(r)) for r in runs]
    if names:
        if len(names) != len(specs):
            raise FemursegError(f"--names: got {len(names)} name(s) for {len(specs)} run(s)")
        for s, n in zip(specs, names):
            s.name = n
    return specs


def headline(models: Sequence[ModelResult], cases: Sequence[str]) -> dict[str, Any]:
    """Headline numbers: per model ``mean_dsc``, ``sd_dsc``, ``mean_asd_mm``, ``mean_msd_mm``,
    ``median_ap``, ``seconds_per_case``; top-level keys repeat the first model's."""
    per: dict[str, dict[str, Any]] = {}
    for m in models:
        def mean(k: str) -> float:
            v = m.values(k, cases)
            v = v[~np.isnan(v)]
            return float(np.mean(v)) if v.size else math.nan

        dsc = m.values("dsc", cases)
        ap = m.values("ap", cases)
        per[m.name] = {
            "n_cases": len(cases),
            "mean_dsc": mean("dsc"),
            "sd_dsc": float(np.nanstd(dsc, ddof=1)) if np.sum(~np.isnan(dsc)) > 1 else math.nan,
            "mean_precision": mean("precision"),
            "mean_recall": mean("recall"),
            "mean_asd_mm": mean("asd_mm"),
            "mean_msd_mm": mean("msd_mm"),
            "median_ap": float(np.nanmedian(ap)) if np.any(~np.isnan(ap)) else math.nan,
            "pooled_ap": m.curves["ap"] if m.curves else math.nan,
            "seconds_per_case": m.seconds_per_case,
        }
    first = per[models[0].name]
    return {"model": models[0].name, **first, "models": per}


def run_compare(
    runs: Sequence[str | os.PathLike | RunSpec | ModelResult],
    out: str | os.PathLike,
    *,
    names: Sequence[str] | None = None,
    metric: str = "ap",
    cases: Sequence[str] | None = None,
    gt: str | os.PathLike | None = None,
    postprocess: str | None = None,
    title: str | None = None,
    panels: bool = True,
    qc: bool = True,
    qc_checks: Sequence[Any] = (),
    progress: bool = True,
    notify: Notify = _stderr,
) -> dict[str, Any]:
    """Compare models and write the report folder ``out`` (see the module docstring).

    Args:
        runs: run folders, results CSVs, :class:`RunSpec` or already evaluated
            :class:`ModelResult` (first = reference model for the case choice).
        out: report folder (created; existing files with the same names are replaced).
        names: display names, one per run (default: from each run's model config).
        metric: per-case metric of the significance table (``ap`` as 001 Table 4; any
            per-case column such as ``dsc``).
        cases: cases for the figure panels (default: best, median and worst DSC of the first model).
        gt: reference labels overriding the runs' datasets.
        postprocess: post-processing mode overriding every run's (e.g. ``"lcc"``).
        panels: draw the case panels and meshes.
        qc: check every run's out-of-fold masks as ``femurseg predict`` checks a scan
            (:func:`qc_rows`; ``table_qc.csv`` and a report section).
        qc_checks: further mask checks for the QC (e.g.
            :func:`femurseg.ct.regions.femoral_head_check`).

    Returns:
        :func:`headline` numbers plus ``report`` (path of report.html), ``cases`` (compared case
        ids), ``qc`` (the first model's :func:`qc_counts`, when checked) and ``files`` (every file
        written, relative to ``out``).
    """
    from femurseg.core.tables import write_csv
    from femurseg.evaluation.report import figures
    from femurseg.evaluation.report import html as H
    from femurseg.evaluation.stats import bland_altman

    if not runs:
        raise FemursegError("compare: give at least one run folder")
    specs = _parse_specs(runs, names)
    if postprocess is not None:
        for s in specs:
            if isinstance(s, RunSpec):
                s.postprocess = s.postprocess or postprocess
    outp = Path(out)
    if outp.exists() and not outp.is_dir():
        raise FemursegError(f"{outp}: exists and is not a folder")
    if not outp.parent.is_dir():
        raise FemursegError(f"{outp}: parent folder {outp.parent} does not exist")
    models = [s if isinstance(s, ModelResult) else load_model(s, gt, progress, notify) for s in specs]
    new = _unique_names([m.name for m in models], [m.source for m in models])
    for m, n in zip(models, new):
        m.name = n
    common = common_cases(models, notify)
    if metric not in ("ap",) and not any(metric in r for m in models for r in m.rows):
        raise FemursegError(f"--metric: {metric!r} is not a per-case column (e.g. ap, dsc, asd_mm)")
    sig_metric = metric
    if np.all(np.isnan(np.concatenate([m.values(metric, common) for m in models]))):
        if metric == "ap":
            notify("note: no per-case AP (no probability maps); the significance table uses DSC")
            sig_metric = "dsc"
        else:
            raise FemursegError(f"--metric: no model has values of {metric!r}")
    outp.mkdir(exist_ok=True)
    files: list[str] = []

    # tables
    shown, numeric = metrics_table(models, common)
    files.append(write_csv(numeric, outp / "table_metrics.csv").name)
    matrix, pairs = significance(models, common, sig_metric)
    if pairs:
        names_ = [m.name for m in models]
        files.append(write_csv(matrix, outp / "table_significance.csv", ["model", *names_[1:]]).name)
        files.append(write_csv(pairs, outp / "table_significance_pairs.csv",
                               ["model_a", "model_b", "n", "statistic", "p", "p_holm", "stars"]).name)
    vols = volume_table(models, common)
    if vols:
        files.append(write_csv(vols, outp / "table_volumes.csv").name)
    long_rows = []
    for m in models:
        bc = m.by_case
        for c in common:
            long_rows.append({"model": m.name, **bc[c]})
    qc_all: list[dict[str, Any]] = []
    if qc:
        for m in models:
            qc_all += qc_rows(m, common, gt, qc_checks)
    if qc_all:
        by = {(r["model"], r["case"]): r for r in qc_all}
        for r in long_rows:
            q = by.get((r["model"], r["case"]))
            if q is not None:
                r["qc"], r["qc_reasons"] = q["qc"], q["qc_reasons"]
        files.append(write_csv(qc_all, outp / "table_qc.csv").name)
    files.append(write_csv(long_rows, outp / "per_case.csv").name)

    # figures
    blocks: list[Any] = []
    hl = headline(models, common)
    hl_boxes = {
        "cases": str(len(common)),
        f"DSC ({models[0].name})": f"{hl['mean_dsc']:.3f} ± {hl['sd_dsc']:.3f}",
        "ASD": f"{hl['mean_asd_mm']:.2f} mm",
        "MSD": f"{hl['mean_msd_mm']:.2f} mm",
    }
    if math.isfinite(hl["median_ap"]):
        hl_boxes["AP (median)"] = f"{hl['median_ap']:.3f}"
    if hl["seconds_per_case"] is not None:
        hl_boxes["inference"] = f"{hl['seconds_per_case']:.2f} s / subject"
    first_qc = [r for r in qc_all if r["model"] == models[0].name]
    if first_qc:
        hl["qc"] = qc_counts(first_qc)
        hl_boxes["QC ok / warn / fail"] = "{ok} / {warn} / {fail}".format(**hl["qc"])
    blocks.append(H.Headline(hl_boxes))
    src_rows = []
    for m in models:
        e = m.evaluation
        src_rows.append({"model": m.name, "source": str(m.source),
                         "threshold": f"{e.threshold:.4f} ({e.threshold_source})" if e else "",
                         "post-processing": e.postprocess if e else "", "cases": str(len(m.rows))})
    blocks += [H.Heading("Models"),
               H.Table(src_rows, ["model", "source", "threshold", "post-processing", "cases"],
                       caption="Each run's out-of-fold probability maps were thresholded at its stored PR-curve "
                               "threshold (the point nearest precision = recall = 1 on the pooled out-of-fold "
                               "voxels, paper 001) and post-processed as listed.")]
    blocks += [H.Heading("Segmentation metrics (001 Tables 1 and 3)"),
               H.Table(shown, list(shown[0].keys()), csv="table_metrics.csv",
                       caption=f"Mean ± SD over the {len(common)} common cases; AP and AUC per case as median "
                               f"(interquartile range); pooled AUC/AP over all out-of-fold voxels. ASD: average "
                               f"symmetric surface distance; MSD: maximum (Hausdorff) surface distance; ∞ marks "
                               f"an empty prediction.")]
    if pairs:
        cls = {"ns": "sig-ns", "*": "sig-1", "**": "sig-2", "***": "sig-3"}
        # numbered columns keep the matrix narrow (001 Table 4 layout); the CSV has full names
        numbered = [{"model": f"[{i + 1}] {r['model']}", **{f"[{j + 2}]": r[m.name] for j, m in enumerate(models[1:])}}
                    for i, r in enumerate(matrix)]
        blocks += [H.Heading(f"Pairwise significance of per-case {sig_metric.upper()} (001 Table 4)"),
                   H.Table(numbered, ["model", *[f"[{j + 2}]" for j in range(len(models) - 1)]],
                           csv="table_significance.csv", cell_class=cls,
                           caption="Paired Wilcoxon signed-rank tests with Holm correction over all pairs; "
                                   "column [k] is model [k] ("
                                   + "; ".join(f"[{i + 1}] {m.name}" for i, m in enumerate(models))
                                   + "). ns p ≥ 0.05, * p < 0.05, ** p < 0.01, *** p < 0.001."),
                   H.Link([("table_significance_pairs.csv", "p-values of every pair (raw and Holm-adjusted)")])]
    if qc_all:
        blocks += qc_blocks(models, qc_all, H)
    curves = {m.name: m.curves for m in models if m.curves is not None}
    if curves:
        ops = {m.name: m.evaluation.threshold for m in models if m.evaluation is not None}
        figures.roc_pr_figure(curves, outp / "roc_pr.png", ops)
        files.append("roc_pr.png")
        blocks += [H.Heading("ROC and precision-recall curves (001 Fig. 2)"),
                   H.Figure("roc_pr.png", "Pooled out-of-fold ROC (left, log false-positive rate) and "
                                          "precision-recall curves (right); AUC and AP in the legends; dots mark "
                                          "each model's PR-threshold operating point.")]
    box_values = {m.name: {k: m.values(k, common) for k in ("dsc", "precision", "recall")} for m in models}
    figures.box_figure(box_values, outp / "boxplots.png")
    files.append("boxplots.png")
    blocks += [H.Heading("Per-case DSC, precision and recall (001 Fig. 3)"),
               H.Figure("boxplots.png", "Box plots (median, quartiles, whiskers to 1.5 IQR) with every case as a dot.")]
    if vols:
        ref_v = {m.name: m.values("vol_ref_cm3", common) for m in models}
        pred_v = {m.name: m.values("vol_pred_cm3", common) for m in models}
        if not all(np.all(np.isnan(v)) for v in pred_v.values()):
            figures.volume_agreement_figure(ref_v, pred_v, outp / "volume_agreement.png")
            bas = {n: bland_altman(pred_v[n], ref_v[n]) for n in pred_v}
            figures.bland_altman_figure(bas, outp / "bland_altman.png")
            files += ["volume_agreement.png", "bland_altman.png"]
            vol_rows = [{"model": v["model"], "compartment": v["compartment"],
                         "reference [cm³]": f"{v['ref_mean_cm3']:.2f} ± {v['ref_sd_cm3']:.2f}",
                         "MAE [cm³]": f"{v['mae_cm3']:.3f}", "RMSE [cm³]": f"{v['rmse_cm3']:.3f}",
                         "bias [cm³]": f"{v['bias_cm3']:+.3f}",
                         "RE % (mean, min, max)": f"({v['re_mean_pct']:.2f}, {v['re_min_pct']:.2f}, {v['re_max_pct']:.2f})"}
                        for v in vols]
            blocks += [H.Heading("Volume agreement (003 Table 2 and Fig. 8)"),
                       H.Table(vol_rows, list(vol_rows[0]), csv="table_volumes.csv",
                               caption="Mean absolute error, root mean square error and relative error "
                                       "|pred − ref| / ref of the segmented volume (003 Eqs. 6-8)."),
                       H.Figure("volume_agreement.png", "Relative volume error against the reference volume, "
                                                        "one dot per case (003 Fig. 8, signed); dashed: ±5 %.",
                                  width="62%" if len(models) <= 3 else None),
                       H.Figure("bland_altman.png", "Bland-Altman plots: predicted − reference volume against "
                                                    "their mean; bias (solid) and 95 % limits of agreement (dashed).")]
    panel_info: list[dict[str, Any]] = []
    if panels and any(m.evaluation is not None for m in models):
        if cases:
            missing = [c for c in cases if c not in common]
            if missing:
                raise FemursegError(f"--cases: not among the compared cases: {', '.join(missing)}")
            chosen = {c: "chosen" for c in cases}
        else:
            chosen = pick_cases(models[0], common)
        panel_models = [m for m in models if m.evaluation is not None]
        if len(panel_models) > MAX_PANEL_MODELS:
            key = sig_metric
            sign = -1 if key in LOWER_IS_BETTER else 1
            ranked = sorted(panel_models[1:], key=lambda m: -sign * np.nanmedian(m.values(key, common)))
            panel_models = [panel_models[0], *ranked[:MAX_PANEL_MODELS - 1]]
            notify(f"note: case panels show {MAX_PANEL_MODELS} of {len(models)} models (the first and the best by "
                   f"median {key})")
        panel_info = case_panels(panel_models, chosen, outp, gt, progress, notify)
        if panel_info:
            blocks.append(H.Heading("Example cases (001 Figs. 4-5)"))
            for p in panel_info:
                files.append(p["png"])
                files += [m[0] for m in p["meshes"]]
                blocks.append(H.Heading(f"{p['case']} ({p['label']})", 3))
                blocks.append(H.Figure(p["png"], f"Case {p['case']}: coronal slice with the reference outline "
                                                  f"(yellow), probability map, final mask (green outline; false "
                                                  f"positives red, false negatives blue) and the 3D surface of the "
                                                  f"mask coloured by its signed distance to the reference surface "
                                                  f"(±{p['vmax']:g} mm; red outside, blue inside)."))
                blocks.append(H.Link(p["meshes"], "Coloured meshes (vertex colours and a per-vertex distance "
                                                  "property, LPS mm; open in 3D Slicer, ParaView or MeshLab):"))
    blocks += [H.Heading("Files"),
               H.Link([(f, f) for f in files if f.endswith(".csv")], "Tables (CSV):")]
    ttl = title or ("femurseg report: " + models[0].name if len(models) == 1 else f"femurseg comparison of {len(models)} models")
    report = H.build_report(outp, ttl, blocks,
                            subtitle=f"{len(common)} cases; models: " + "; ".join(m.name for m in models))
    files.append(report.name)
    hl.update({"report": str(report), "cases": list(common), "files": files})
    return hl


def format_headline(hl: Mapping[str, Any]) -> str:
    """Text summary printed by ``femurseg compare``."""
    lines = []
    for name, h in hl["models"].items():
        s = (f"{name}: DSC {h['mean_dsc']:.3f} ± {h['sd_dsc']:.3f}, precision {h['mean_precision']:.3f}, "
             f"recall {h['mean_recall']:.3f}, ASD {h['mean_asd_mm']:.2f} mm, MSD {h['mean_msd_mm']:.2f} mm")
        if math.isfinite(h["median_ap"]):
            s += f", AP {h['median_ap']:.3f} (median)"
        if h.get("seconds_per_case") is not None:
            s += f", {h['seconds_per_case']:.2f} s/subject"
        lines.append(s)
    if hl.get("qc"):
        lines.append("QC of the first model's out-of-fold masks: {ok} ok, {warn} warn, {fail} fail "
                     "(table_qc.csv)".format(**hl["qc"]))
    lines.append(f"report: {hl['report']}")
    return "\n".join(lines)
