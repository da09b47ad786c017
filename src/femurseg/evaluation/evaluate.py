"""Evaluate segmentations against reference labels: one row of metrics per case.

Two sources of predictions (``femurseg evaluate``):

* **prediction folders**: ``--pred DIR`` of masks ``<case>.nii.gz`` (any supported image
  suffix; ``femurseg predict`` output), optionally ``--prob DIR`` of probability maps with
  the same names (adds per-case AUC and AP); matched by case name to the reference labels
  ``--gt``: a folder of ``<case>.nii.gz`` labels, an nnU-Net dataset folder (its
  ``labelsTr/``) or a CSV manifest. A prediction named ``<case>_0000`` (predict's name for an
  nnU-Net image) matches the label ``<case>``.
* **a cross-validation run** (``--run RUN``): the run's out-of-fold probability maps
  ``RUN/oof/<case>.nii.gz`` are thresholded with the run's stored PR threshold
  (``thresholds.json``) and post-processed as the run config says (``postprocess``;
  default ``none``, paper 001's 3D protocol), then evaluated like a folder; the reference is
  the run's dataset (``config.json``) unless ``--gt`` is given.

The metrics are :func:`femurseg.evaluation.metrics.evaluate_case` (binary MR labels: ``dsc``,
``precision``, ``recall``, ``specificity``, ``asd_mm``, ``msd_mm``, ``hd95_mm``,
``vol_pred_cm3``, ``vol_ref_cm3``, ``vol_diff_cm3``, ``auc``, ``ap``) or, when the reference
is a multi-label CT map, :func:`femurseg.evaluation.metrics.evaluate_labels` (per compartment
``periosteal_*``, ``endosteal_*``, ``cortical_*``) plus the volumes per region of 003 Fig. 7
(:func:`femurseg.ct.measure.region_volume_columns`, passed in by the CLI: head, neck, trochanter, intertrochanter, combination; regions
fitted on each mask). Empty masks follow the rules of
:mod:`femurseg.evaluation.metrics` (one empty -> DSC 0, distances inf). Prediction and reference must
share the same grid and geometry (else a one-line error naming both files).

Across cases the volumes are summarised as in 003 Table 2 (Eqs. 6-8): mean absolute error,
root mean square error and relative error (mean, min, max), per compartment and, for CT,
per region and compartment (:func:`volume_summary`), and every metric as mean, SD, median and quartiles
(:func:`metric_summary`).

Length: folder and run evaluation, CT label maps and the summaries share the matching and reading of cases.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from femurseg.core import io
from femurseg.core.errors import FemursegError
from femurseg.core.tables import write_csv

#: Order of the metric columns in the CSV (others follow alphabetically).
METRIC_ORDER = ("dsc", "precision", "recall", "specificity", "asd_mm", "msd_mm", "hd95_mm", "auc", "ap",
                "vol_pred_cm3", "vol_ref_cm3", "vol_diff_cm3")
HIST_BINS = 1001
"""Threshold grid of the pooled ROC/PR curves (:func:`femurseg.evaluation.metrics.histogram_counts`)."""

Notify = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"femurseg: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------------- file matching


def _image_files(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or not p.name.lower().endswith(io.IMAGE_SUFFIXES):
            continue
        out[io.strip_image_suffix(p.name)] = p
    return out


def reference_files(gt: str | os.PathLike) -> dict[str, Path]:
    """Case name -> reference label file.

    ``gt``: a folder of label images, an nnU-Net dataset folder (``labelsTr/``), or a CSV manifest.
    """
    p = Path(gt)
    if not p.exists():
        raise FemursegError(f"{p}: no such reference folder or dataset")
    if p.is_file() or (p / "dataset.json").exists():
        from femurseg.data.dataset import load_dataset

        ds = load_dataset(p)
        files = {c.case_id: c.label for c in ds.cases if c.label is not None and Path(c.label).exists()}
    elif (p / "labelsTr").is_dir():
        files = _image_files(p / "labelsTr")
    else:
        files = _image_files(p)
    if not files:
        raise FemursegError(f"{p}: no reference label files found (expected <case>.nii.gz, an nnU-Net labelsTr/ or a manifest)")
    return files


def _match_name(name: str, known: Mapping[str, Any]) -> str | None:
    if name in known:
        return name
    if name.endswith("_0000") and name[: -len("_0000")] in known:
        return name[: -len("_0000")]
    return None


@dataclass
class CaseFiles:
    """The files of one case to evaluate."""

    case: str
    pred: Path
    gt: Path
    prob: Path | None = None


def match_cases(
    pred_dir: str | os.PathLike, gt: str | os.PathLike, prob_dir: str | os.PathLike | None = None,
    notify: Notify = _stderr,
) -> list[CaseFiles]:
    """Pair every prediction in ``pred_dir`` with its reference (and probability map).

    A prediction without a reference, or (with ``prob_dir``) without a probability map, is an
    error; references without a prediction are reported through ``notify`` and skipped.
    """
    pd = Path(pred_dir)
    if not pd.is_dir():
        raise FemursegError(f"{pd}: no such prediction folder")
    preds = _image_files(pd)
    if not preds:
        raise FemursegError(f"{pd}: no prediction files (<case>.nii.gz) found")
    refs = reference_files(gt)
    probs = None
    if prob_dir is not None:
        qd = Path(prob_dir)
        if not qd.is_dir():
            raise FemursegError(f"{qd}: no such probability map folder")
        probs = _image_files(qd)
    out: list[CaseFiles] = []
    missing: list[str] = []
    for name, path in preds.items():
        case = _match_name(name, refs)
        if case is None:
            missing.append(name)
            continue
        prob = None
        if probs is not None:
            key = name if name in probs else (case if case in probs else None)
            if key is None:
                raise FemursegError(f"{prob_dir}: no probability map for case {name!r} (expected {name}.nii.gz)")
            prob = probs[key]
        out.append(CaseFiles(case, path, refs[case], prob))
    if missing:
        raise FemursegError(f"{gt}: no reference label for {len(missing)} prediction(s): {', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''}")
    skipped = sorted(set(refs) - {c.case for c in out})
    if skipped:
        notify(f"note: {len(skipped)} reference case(s) have no prediction and are not evaluated: "
               f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
    return out


# --------------------------------------------------------------------------------- reading


def read_labels(path: str | os.PathLike, what: str = "mask") -> io.Volume:
    """Read a mask/label map as an integer canonical Volume (float files must hold integers)."""
    vol = io.read_image(path, dtype=None)
    data = vol.data
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(data == np.round(data)):
            raise FemursegError(f"{path}: {what} has non-integer values (a probability map? pass it with --prob)")
        data = data.astype(np.int16)
    if data.min() < 0:
        raise FemursegError(f"{path}: {what} has negative label values")
    return vol.with_data(data.astype(np.uint8) if data.max() < 256 else data)


def read_probability(path: str | os.PathLike) -> io.Volume:
    """Read a probability map (float32 in [0, 1])."""
    vol = io.read_image(path, dtype=np.float32)
    if vol.data.size and (float(vol.data.min()) < -1e-6 or float(vol.data.max()) > 1 + 1e-6):
        raise FemursegError(f"{path}: probability map values outside [0, 1] "
                            f"(min {float(vol.data.min()):.3g}, max {float(vol.data.max()):.3g})")
    return vol.with_data(np.clip(vol.data, 0.0, 1.0))


def check_same_grid(a: io.Volume, a_path: Any, b: io.Volume, b_path: Any) -> None:
    """FemursegError naming both files if the two volumes' grids/geometries differ."""
    if a.data.shape != b.data.shape:
        raise FemursegError(f"{a_path}: shape {a.data.shape} differs from the reference {b_path} {b.data.shape}")
    diff = a.geometry.matches(b.geometry)
    if diff:
        raise FemursegError(f"{a_path}: geometry differs from the reference {b_path}: {diff}")


# --------------------------------------------------------------------------------- metrics


def is_multilabel(ref: np.ndarray, labels: Mapping[str, int] | None = None) -> bool:
    """True for a CT label map (more than one foreground label declared or present)."""
    if labels is not None and len([v for v in labels.values() if int(v) != 0]) > 1:
        return True
    return int(np.max(ref)) > 1 if ref.size else False


RegionVolumes = Callable[[np.ndarray, np.ndarray, Sequence[float]], dict[str, float]]
"""``(pred, ref, spacing_mm) -> columns``: extra per-region volume columns of a CT case, e.g.
:func:`femurseg.ct.measure.region_volume_columns` (the CLI passes it; the CT regions live above
evaluation, so they come in as a callable)."""


def evaluate_arrays(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], prob: np.ndarray | None = None,
    multilabel: bool | None = None, region_volumes: RegionVolumes | None = None,
) -> dict[str, float]:
    """Metrics of one case: :func:`femurseg.evaluation.metrics.evaluate_case` (binary) or
    :func:`femurseg.evaluation.metrics.evaluate_labels` (CT label maps, plus ``region_volumes``'
    columns when given)."""
    from femurseg.evaluation import metrics

    if multilabel is None:
        multilabel = is_multilabel(ref)
    if multilabel:
        row = metrics.evaluate_labels(np.asarray(pred).astype(np.int16), np.asarray(ref).astype(np.int16), spacing)
        if region_volumes is not None:
            row.update(region_volumes(pred, ref, spacing))
        return row
    return metrics.evaluate_case(np.asarray(pred) != 0, np.asarray(ref) != 0, spacing, prob)


def evaluate_files(cf: CaseFiles, multilabel: bool | None = None,
                   region_volumes: RegionVolumes | None = None) -> dict[str, Any]:
    """Read one case's files, check their geometry, return its row (``case`` first)."""
    ref = read_labels(cf.gt, "reference label")
    pred = read_labels(cf.pred, "prediction")
    check_same_grid(pred, cf.pred, ref, cf.gt)
    prob = None
    if cf.prob is not None:
        pv = read_probability(cf.prob)
        check_same_grid(pv, cf.prob, ref, cf.gt)
        prob = pv.data
    row: dict[str, Any] = {"case": cf.case}
    row.update(evaluate_arrays(pred.data, ref.data, ref.spacing, prob, multilabel, region_volumes))
    return row


def evaluate_folders(
    pred_dir: str | os.PathLike, gt: str | os.PathLike, prob_dir: str | os.PathLike | None = None,
    progress: bool = True, notify: Notify = _stderr, region_volumes: RegionVolumes | None = None,
) -> list[dict[str, Any]]:
    """Evaluate a folder of predicted masks against references; one row per case (sorted by case).
    ``region_volumes``: see :data:`RegionVolumes`."""
    from femurseg.core.progress import progress as progress_bar
    files = match_cases(pred_dir, gt, prob_dir, notify)
    rows = [evaluate_files(cf, region_volumes=region_volumes) for cf in progress_bar(files, desc="evaluate", unit="case", disable=not progress,
                                               file=sys.stderr)]
    return sorted(rows, key=lambda r: r["case"])


# --------------------------------------------------------------------------------- runs


def run_postprocess(config: Mapping[str, Any]) -> str:
    """The post-processing mode a run asks for (``config.json``), default ``"none"``.

    Looked up as ``postprocess`` at the top level, then in the ``evaluate``, ``inference`` and
    ``train`` sections; a boolean ``true`` means ``"lcc"`` (paper 001's largest component).
    """
    for section in (config, config.get("evaluate") or {}, config.get("inference") or {}, config.get("train") or {}):
        if isinstance(section, Mapping) and "postprocess" in section and section["postprocess"] is not None:
            v = section["postprocess"]
            if isinstance(v, bool):
                return "lcc" if v else "none"
            return str(v)
    return "none"


@dataclass
class RunEvaluation:
    """Everything :func:`evaluate_run` computes for one run.

    Attributes:
        run: the run folder.
        rows: one metrics row per out-of-fold case (``case``, ``fold`` first).
        threshold: the decision threshold used (the run's PR threshold, or 0.5).
        postprocess: the post-processing mode used.
        pos, neg: pooled histogram counts over all cases (:func:`femurseg.evaluation.metrics.histogram_counts`)
            for the pooled ROC/PR curves (``metrics.curves_from_counts(pos, neg)``).
        dataset: the reference dataset path.
        config: the run's config.json.
        timings: the run's ``summary.json`` timings, if any.
    """

    run: Path
    rows: list[dict[str, Any]]
    threshold: float
    postprocess: str
    pos: np.ndarray
    neg: np.ndarray
    dataset: Path | None
    config: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    threshold_source: str = "pr"

    def curves(self) -> dict[str, Any]:
        """Pooled ROC/PR curves with ``auc`` and ``ap`` added."""
        from femurseg.evaluation import metrics

        c = metrics.curves_from_counts(self.pos, self.neg)
        c["auc"] = metrics.auc_from_curves(c)
        c["ap"] = metrics.ap_from_curves(c)
        return c

    def seconds_per_case(self) -> float | None:
        """Inference seconds per subject if the run recorded it."""
        return seconds_per_case(self.timings)


def seconds_per_case(timings: Mapping[str, Any]) -> float | None:
    for key in ("inference_s_per_case", "seconds_per_case", "inference_seconds_per_case", "predict_s_per_case",
                "inference_s_per_subject", "s_per_case"):
        v = timings.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            return float(v)
    return None


def _run_timings(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "summary.json"
    if not p.exists():
        return {}
    try:
        s = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    t = dict(s.get("timings") or {})
    for k, v in s.items():
        if k not in t and isinstance(v, (int, float)) and ("time" in k or k.endswith("_s") or "seconds" in k):
            t[k] = v
    return t


def run_reference(run_dir: Path, config: Mapping[str, Any], gt: str | os.PathLike | None) -> tuple[dict[str, Path], Path]:
    """Reference labels of a run: ``gt`` if given, else the run's dataset; also its path."""
    if gt is not None:
        return reference_files(gt), Path(gt)
    ds = config.get("dataset")
    if not ds:
        raise FemursegError(f"{run_dir}: the run config names no dataset; pass the references with --gt")
    dp = Path(ds)
    if not dp.is_absolute() and not dp.exists():
        dp = (run_dir / dp)
    if not dp.exists():
        raise FemursegError(f"{run_dir}: the run's dataset {ds} is not found; pass the references with --gt")
    return reference_files(dp), dp


def oof_files(run_dir: Path) -> dict[str, Path]:
    d = run_dir / "oof"
    if not d.is_dir():
        raise FemursegError(f"{run_dir}: no oof/ folder of out-of-fold probability maps (has `femurseg cv` finished?)")
    files = _image_files(d)
    if not files:
        raise FemursegError(f"{d}: no out-of-fold probability maps")
    return files


def evaluate_run(
    run_dir: str | os.PathLike, gt: str | os.PathLike | None = None, threshold: str | float | None = None,
    postprocess: str | None = None, progress: bool = True, keep: Callable[[str], bool] | None = None,
    notify: Notify = _stderr,
) -> RunEvaluation:
    """Evaluate a cross-validation run's out-of-fold predictions.

    Args:
        run_dir: the run folder (``config.json``, ``oof/``, ``thresholds.json``).
        gt: reference labels (default: the run's dataset).
        threshold: override the run's stored PR threshold (a number, ``"pr"``, ``"youden"``).
        postprocess: override the run config's post-processing mode
            (:data:`femurseg.inference.postprocess.MODES`).
        keep: only cases for which ``keep(case)`` is true.

    Returns:
        :class:`RunEvaluation` with one row per case (``case``, ``fold``, metrics...).
    """
    from femurseg.core.progress import progress as progress_bar
    from femurseg.evaluation import metrics
    from femurseg.inference import postprocess as pp
    from femurseg.inference.run import load_run
    from femurseg.inference.thresholds import binarize, resolve_threshold

    run = load_run(run_dir)
    rdir = Path(run_dir)
    refs, ds_path = run_reference(rdir, run.config, gt)
    stored = run.thresholds or {}
    if threshold is None:
        if stored.get("pr") is not None:
            thr, thr_src = float(stored["pr"]), "pr"
        else:
            notify(f"notice: {rdir} stores no PR threshold; using 0.5")
            thr, thr_src = 0.5, "0.5"
    else:
        thr = resolve_threshold(threshold, stored, source=f"{rdir}: threshold")
        thr_src = str(threshold)
    mode = postprocess if postprocess is not None else run_postprocess(run.config)
    if str(mode).strip().lower() not in pp.MODES:
        raise FemursegError(f"{rdir}: post-processing mode {mode!r} is not one of {', '.join(pp.MODES)}")
    fold_of = {c: i for i, f in enumerate(run.folds) for c in f}
    probs = oof_files(rdir)
    items = []
    no_ref = []
    for name, path in probs.items():
        case = _match_name(name, refs)
        if case is None:
            no_ref.append(name)
        elif keep is None or keep(case):
            items.append((case, path))
    if no_ref:
        raise FemursegError(f"{rdir}: no reference label for out-of-fold case(s) {', '.join(no_ref[:5])}"
                            f"{' ...' if len(no_ref) > 5 else ''} (pass --gt)")
    labels = run.config.get("labels")
    pos = np.zeros(HIST_BINS, np.int64)
    neg = np.zeros(HIST_BINS, np.int64)
    rows = []
    for case, ppath in progress_bar(items, desc=f"evaluate {rdir.name}", unit="case", disable=not progress, file=sys.stderr):
        ref = read_labels(refs[case], "reference label")
        prob = read_probability(ppath)
        check_same_grid(prob, ppath, ref, refs[case])
        multi = is_multilabel(ref.data, labels if isinstance(labels, Mapping) else None)
        if multi:
            raise FemursegError(f"{rdir}: a multi-label (CT) run: evaluate it with `femurseg evaluate --run` on the "
                                "cascade run folder, or predict label maps and use `femurseg evaluate --pred`")
        mask = pp.postprocess(binarize(prob.data, thr), mode, ref.spacing)
        row: dict[str, Any] = {"case": case, "fold": fold_of.get(case, "")}
        row.update(evaluate_arrays(mask, ref.data, ref.spacing, prob.data, multilabel=False))
        rows.append(row)
        cp, cn = metrics.histogram_counts(prob.data, ref.data != 0, HIST_BINS)
        pos += cp
        neg += cn
    rows.sort(key=lambda r: r["case"])
    return RunEvaluation(rdir, rows, thr, str(mode), pos, neg, ds_path, dict(run.config), _run_timings(rdir), thr_src)


def run_case_arrays(ev: RunEvaluation, case: str, refs: Mapping[str, Path] | None = None) -> dict[str, Any]:
    """Image, reference, probability map and final mask of one case of an evaluated run
    (canonical arrays; for the report's case panels)."""
    from femurseg.inference import postprocess as pp
    from femurseg.inference.thresholds import binarize

    refs = refs if refs is not None else reference_files(ev.dataset)
    probs = oof_files(ev.run)
    key = case if case in probs else (f"{case}_0000" if f"{case}_0000" in probs else None)
    if key is None:
        raise FemursegError(f"{ev.run}: no out-of-fold prediction for case {case!r}")
    ref = read_labels(refs[case], "reference label")
    prob = read_probability(probs[key])
    mask = pp.postprocess(binarize(prob.data, ev.threshold), ev.postprocess, ref.spacing)
    return {"reference": ref, "prob": prob.data, "mask": mask}


# --------------------------------------------------------------------------------- summaries


def metric_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The numeric metric columns of ``rows`` in :data:`METRIC_ORDER` (then alphabetical)."""
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in keys and k not in ("case", "fold", "model") and isinstance(v, (int, float, np.floating)):
                keys.append(k)
    order = {k: i for i, k in enumerate(METRIC_ORDER)}

    def sort_key(k: str) -> tuple:
        base = k.split("_", 1)[1] if k.split("_", 1)[0] in ("periosteal", "endosteal", "cortical") else k
        comp = k.split("_", 1)[0] if base != k else ""
        return (comp, order.get(base, len(order)), base)

    return sorted(keys, key=sort_key)


def metric_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per metric over cases: ``metric, n, mean, sd, median, q1, q3, min, max``
    (:func:`femurseg.evaluation.stats.summarise`; inf values make the mean inf, nan are left out)."""
    from femurseg.evaluation.stats import summarise

    out = []
    for k in metric_columns(rows):
        v = np.array([float(r.get(k, math.nan)) for r in rows], dtype=float)
        s = summarise(v)
        fin = v[~np.isnan(v)]
        out.append({"metric": k, "n": s["n"], "mean": s["mean"], "sd": s["sd"], "median": s["median"], "q1": s["q1"],
                    "q3": s["q3"], "min": float(fin.min()) if fin.size else math.nan,
                    "max": float(fin.max()) if fin.size else math.nan})
    return out


def volume_pairs(rows: Sequence[Mapping[str, Any]]) -> dict[str, tuple[str, str]]:
    """Compartment -> (pred column, ref column) of the volume columns present in any of ``rows``
    (``femur`` for binary rows; ``periosteal``/``endosteal``/``cortical`` and the regional
    ``{region}_{compartment}`` for CT)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = {}
    for k in keys:
        if k.endswith("vol_pred_cm3"):
            prefix = k[: -len("vol_pred_cm3")]
            ref = prefix + "vol_ref_cm3"
            if ref in keys:
                out[prefix.rstrip("_") or "femur"] = (k, ref)
    return out


def volume_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Volume agreement per compartment over cases (003 Table 2, Eqs. 6-8):
    ``compartment, n, ref_mean_cm3, ref_sd_cm3, pred_mean_cm3, mae_cm3, rmse_cm3, bias_cm3,
    re_mean_pct, re_min_pct, re_max_pct`` (:func:`femurseg.evaluation.metrics.volume_errors`; relative
    error with respect to the reference volume)."""
    from femurseg.evaluation.metrics import volume_errors

    out = []
    for comp, (pk, rk) in volume_pairs(rows).items():
        p = np.array([float(r.get(pk, math.nan)) for r in rows])
        r = np.array([float(r.get(rk, math.nan)) for r in rows])
        ok = np.isfinite(p) & np.isfinite(r)  # NaN: a prediction whose regions could not be fitted
        if not ok.any():
            continue
        p, r = p[ok], r[ok]
        e = volume_errors(p, r)
        out.append({
            "compartment": comp, "n": e["n"],
            "ref_mean_cm3": float(np.mean(r)), "ref_sd_cm3": float(np.std(r, ddof=1)) if r.size > 1 else math.nan,
            "pred_mean_cm3": float(np.mean(p)),
            "mae_cm3": e["mae"], "rmse_cm3": e["rmse"], "bias_cm3": e["bias"],
            "re_mean_pct": e["re_mean_pct"], "re_min_pct": e["re_min_pct"], "re_max_pct": e["re_max_pct"],
        })
    return out


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a CSV written by :func:`write_csv`; numeric cells become floats."""
    rows = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            out: dict[str, Any] = {}
            for k, v in r.items():
                try:
                    out[k] = float(v) if k not in ("case", "model", "compartment", "metric") else v
                except (TypeError, ValueError):
                    out[k] = v
            rows.append(out)
    return rows


def results_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lead = [c for c in ("case", "fold") if rows and c in rows[0]]
    return lead + metric_columns(rows)


def summary_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """``RESULTS.csv`` -> (``RESULTS_summary.csv`` volume agreement, ``RESULTS_stats.csv`` metric statistics)."""
    o = Path(out)
    stem = o.name[: -len(".csv")] if o.name.lower().endswith(".csv") else o.name
    return o.with_name(f"{stem}_summary.csv"), o.with_name(f"{stem}_stats.csv")


def write_results(rows: Sequence[Mapping[str, Any]], out: str | os.PathLike) -> dict[str, Path]:
    """Write the per-case CSV ``out`` plus its volume summary and metric statistics beside it."""
    if not rows:
        raise FemursegError(f"{out}: nothing to write (no case was evaluated)")
    out = Path(out)
    vol_path, stats_path = summary_paths(out)
    paths = {"results": write_csv(rows, out, results_columns(rows))}
    vs = volume_summary(rows)
    paths["summary"] = write_csv(vs, vol_path, list(vs[0]) if vs else ["compartment"])
    paths["stats"] = write_csv(metric_summary(rows), stats_path,
                               ["metric", "n", "mean", "sd", "median", "q1", "q3", "min", "max"])
    return paths


def format_report(rows: Sequence[Mapping[str, Any]]) -> str:
    """The text printed by ``femurseg evaluate``: metrics as mean ± SD, volumes as 003 Table 2."""
    lines = [f"{len(rows)} case(s)"]
    for s in metric_summary(rows):
        if s["metric"].startswith(("vol_", "periosteal_vol", "endosteal_vol", "cortical_vol")) or s["metric"].endswith("_cm3"):
            continue
        lines.append(f"  {s['metric']:<24} {s['mean']:.4g} ± {s['sd']:.3g}   median {s['median']:.4g} "
                     f"[{s['q1']:.4g}, {s['q3']:.4g}]")
    for v in volume_summary(rows):
        lines.append(f"  volume {v['compartment']:<11} ref {v['ref_mean_cm3']:.3f} ± {v['ref_sd_cm3']:.3f} cm^3   "
                     f"MAE {v['mae_cm3']:.4f} cm^3   RMSE {v['rmse_cm3']:.4f} cm^3   "
                     f"RE {v['re_mean_pct']:.2f} % (min {v['re_min_pct']:.2f}, max {v['re_max_pct']:.2f})")
    return "\n".join(lines)


def iter_rows_values(rows: Iterable[Mapping[str, Any]], key: str) -> np.ndarray:
    """Column ``key`` of ``rows`` as a float array (missing -> nan)."""
    return np.array([float(r.get(key, math.nan)) if r.get(key, "") != "" else math.nan for r in rows], dtype=float)


def evaluate_command(
    out: str | os.PathLike, *, pred: str | os.PathLike | None = None, gt: str | os.PathLike | None = None,
    prob: str | os.PathLike | None = None, run: str | os.PathLike | None = None,
    threshold: str | float | None = None, postprocess: str | None = None, progress: bool = True,
    notify: Notify = _stderr, region_volumes: RegionVolumes | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """What ``femurseg evaluate`` does: check the options, evaluate, write the CSVs (CT label maps
    get ``region_volumes``' columns, :data:`RegionVolumes`).

    Exactly one of ``pred`` (with ``gt``) or ``run`` must be given. Returns the rows and the
    written paths (``results``, ``summary``, ``stats``).
    """
    if (pred is None) == (run is None):
        raise FemursegError("evaluate: give either --pred DIR --gt DIR [--prob DIR] or --run RUN [--gt DIR]")
    outp = Path(out)
    if not outp.name.lower().endswith(".csv"):
        raise FemursegError(f"{outp}: --out must be a .csv file")
    if not (outp.parent if str(outp.parent) else Path(".")).is_dir():
        raise FemursegError(f"{outp}: output folder {outp.parent} does not exist")
    if pred is not None:
        if gt is None:
            raise FemursegError("evaluate: --pred needs --gt (reference labels: folder, nnU-Net dataset or manifest)")
        if threshold is not None or postprocess is not None:
            raise FemursegError("evaluate: --threshold and --postprocess apply to --run only (masks are given)")
        rows = evaluate_folders(pred, gt, prob, progress=progress, notify=notify, region_volumes=region_volumes)
    else:
        if prob is not None:
            raise FemursegError("evaluate: --prob applies to --pred only (a run has its own probability maps)")
        thr: str | float | None = threshold
        if isinstance(threshold, str):
            try:
                thr = float(threshold)
            except ValueError:
                thr = threshold
        if is_cascade_run(run):
            if threshold is not None or postprocess is not None:
                raise FemursegError(f"{run}: a CT cascade run's label maps are final (its stage thresholds were chosen "
                                    "during cv); --threshold and --postprocess do not apply")
            rdir = Path(run)
            _, ref_path = run_reference(rdir, json.loads((rdir / "config.json").read_text()), gt)
            if not (rdir / "oof_labels").is_dir():
                raise FemursegError(f"{rdir}: no oof_labels/ (the cascade's out-of-fold label maps); run "
                                    "`femurseg cv --task cascade ... --resume` to finish it")
            rows = evaluate_folders(rdir / "oof_labels", ref_path, progress=progress, notify=notify,
                                    region_volumes=region_volumes)
        else:
            rows = evaluate_run(run, gt, threshold=thr, postprocess=postprocess, progress=progress, notify=notify).rows
    return rows, write_results(rows, outp)


def is_cascade_run(run_dir: str | os.PathLike) -> bool:
    """True for a CT cascade run folder (``femurseg cv --task cascade``)."""
    p = Path(run_dir) / "config.json"
    try:
        return p.exists() and json.loads(p.read_text()).get("task") == "cascade"
    except (OSError, json.JSONDecodeError):
        return False
