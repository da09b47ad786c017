"""Segmentation metrics on arrays: overlap, surface distances, volumes, ROC/PR.

Plain functions on numpy arrays. Masks are ``bool`` or integer arrays of 2 or 3
dimensions in canonical order (see ``docs/conventions.md``); any non-zero voxel is
foreground. ``spacing`` is the voxel size in millimetres per axis, in the same
axis order as the array. Distances are returned in mm, volumes in cm^3.

Definitions (paper 001, "Evaluation", Eqs. 2-7; paper 003, Eqs. 2-8):

* ``dsc = 2 TP / (2 TP + FP + FN)``, ``recall = sensitivity = TP / (TP + FN)``,
  ``specificity = TN / (TN + FP)``, ``precision = TP / (TP + FP)``.

  **0/0 rule.** A ratio whose denominator is zero is 1.0 when prediction and
  reference agree on that class (both contain none of it) and 0.0 otherwise.
  In practice: both masks empty -> dsc = precision = recall = 1.0; empty
  prediction with a non-empty reference -> dsc = precision = recall = 0.0;
  non-empty prediction with an empty reference -> dsc = precision = recall = 0.0.
  Specificity follows the same rule for the background class (it is 0/0 only when
  the reference has no background at all). This matches MONAI's ``compute_dice``
  with ``ignore_empty=False``; nnU-Net instead reports nan for an empty pair.

* **Surface voxels** are foreground voxels with at least one face (6-connected in
  3D, 4-connected in 2D) neighbour in the background, where everything outside
  the array counts as background. A mask touching the array border therefore has
  surface voxels on that border. This is exactly MONAI's definition
  (``monai.metrics.utils.get_mask_edges`` without subvoxels: ``mask ^
  scipy.ndimage.binary_erosion(mask)``, whose default structure is the face
  cross and whose default ``border_value`` is 0).

* **Surface distance** of a surface voxel of one mask: the Euclidean distance in
  mm (voxel centres, scaled by ``spacing``) to the nearest surface voxel of the
  other mask.

* ``asd`` (001 Eq. 6 / 003 Eq. 5): ``(sum d(S->G) + sum d(G->S)) / (N_S + N_G)``,
  the mean over the concatenation of both directed distance sets. This is MONAI's
  ``compute_average_surface_distance(symmetric=True)``.
* ``msd`` (001 Eq. 7): the symmetric Hausdorff distance, the maximum over both
  directed sets. MONAI's ``compute_hausdorff_distance(percentile=None)``.
* ``hd95``: MONAI's definition, ``max(P95(d(S->G)), P95(d(G->S)))`` with the
  percentile linearly interpolated (``numpy.percentile`` default, like
  ``torch.quantile``). This is *not* the 95th percentile of the pooled distances.

  **Empty masks.** Both empty -> asd = msd = hd95 = 0.0 (MONAI gives nan).
  Exactly one empty -> all three are ``inf`` (MONAI gives inf for asd and msd but
  nan for hd95, the interpolated percentile of infinite values): the surface
  distance to a surface that does not exist is unbounded, and ``inf`` ranks such a
  case as the worst one in any comparison instead of silently dropping it (as nan
  would in ``nanmean``).

Surface distances are computed exactly and without a dense distance transform
by default (``method="shell"``): both masks are cropped to the bounding box of
their union, the surfaces are extracted with shifted boolean ANDs, and every
surface voxel tests the integer voxel offsets of the other surface in order of
increasing physical distance (about 256 offsets, i.e. all offsets within a radius
``R`` of about 1.7 mm at the MR spacing (1.5, 0.234, 0.234)); the first hit is the
exact nearest distance. The few voxels farther than ``R`` from the other surface
are resolved exactly with a k-d tree (``scipy.spatial.cKDTree``) over the other
surface's voxel centres. ``method="edt"`` instead runs a dense Euclidean distance
transform of the other surface's complement over the cropped box with the ``edt``
package (``anisotropy=spacing``; scipy's ``distance_transform_edt`` if ``edt`` is
missing); both methods give the same distances (to float32 rounding of the EDT).
On a femur-like 48 x 512 x 512 pair at (1.5, 0.234, 0.234) mm
(``benchmarks/bench_metrics.py``) the shell method takes about 0.07 CPU-seconds for
all three metrics, the dense EDT about 0.5 s and each MONAI call about 0.7 s.

ROC / precision-recall curves (``prob`` is the foreground probability map):
a voxel is predicted foreground at threshold ``t`` iff ``prob >= t`` (scikit-learn's
convention; :func:`femurseg.inference.thresholds.binarize` applies the same rule). The exact
curves have one operating point per distinct probability value, in decreasing
threshold order; the histogram curves (``n_bins``) use the thresholds
``k / (n_bins - 1)`` and are exact for those thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from femurseg.inference.curves import (  # noqa: F401 (re-exported)
    curves_from_counts,
    histogram_counts,
    roc_pr_curves,
)

__all__ = [
    "ap_from_curves",
    "auc_from_curves",
    "average_precision",
    "confusion",
    "curves_from_counts",
    "evaluate_case",
    "evaluate_labels",
    "histogram_counts",
    "overlap_metrics",
    "roc_auc",
    "roc_pr_curves",
    "surface_distances",
    "surface_metrics",
    "surface_voxels",
    "volume_cm3",
    "volume_errors",
    "CT_COMPARTMENTS",
]

#: Default compartments for CT label maps (0 background, 1 trabecular, 2 cortical):
#: name -> label values making up the compartment.
CT_COMPARTMENTS: dict[str, tuple[int, ...]] = {
    "periosteal": (1, 2),  # whole bone, inside the periosteal surface
    "endosteal": (1,),  # medullary/trabecular, inside the endosteal surface
    "cortical": (2,),  # cortical shell
}

# Number of voxel offsets tried by the shell search before the k-d tree takes over.
_SHELL_OFFSETS = 256


# --------------------------------------------------------------------------- helpers


def _mask(a: Any, name: str) -> np.ndarray:
    """Return ``a`` as a bool array (non-zero = foreground); reject floats."""
    a = np.asarray(a)
    if a.dtype != bool:
        if not (np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"{name}: expected a bool or integer mask, got dtype {a.dtype} (threshold it first)")
        a = a != 0
    if a.ndim not in (2, 3):
        raise ValueError(f"{name}: expected a 2D or 3D mask, got shape {a.shape}")
    return a


def _pair(pred: Any, ref: Any) -> tuple[np.ndarray, np.ndarray]:
    p, r = _mask(pred, "pred"), _mask(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(f"pred and ref shapes differ: {p.shape} vs {r.shape}")
    return p, r


def _spacing(spacing: Any, ndim: int) -> np.ndarray:
    s = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if s.size != ndim or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"spacing must be {ndim} positive numbers in mm, got {spacing!r}")
    return s


def _ratio(num: int, den: int, agree: bool) -> float:
    """num/den with the module's 0/0 rule (1.0 if the masks agree, else 0.0)."""
    if den == 0:
        return 1.0 if agree else 0.0
    return num / den


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the non-zero voxels as slices, or None if empty."""
    if mask.ndim == 0 or not mask.any():
        return None
    out = []
    for ax in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != ax)
        nz = np.flatnonzero(mask.any(axis=other))
        out.append(slice(int(nz[0]), int(nz[-1]) + 1))
    return tuple(out)


# --------------------------------------------------------------------------- overlap


def confusion(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int, int]:
    """Voxel counts ``(tp, fp, fn, tn)`` of ``pred`` against ``ref`` (same shape)."""
    p, r = _pair(pred, ref)
    tp = int(np.count_nonzero(p & r))
    n_pred = int(np.count_nonzero(p))
    n_ref = int(np.count_nonzero(r))
    fp = n_pred - tp
    fn = n_ref - tp
    tn = int(p.size) - tp - fp - fn
    return tp, fp, fn, tn


def overlap_metrics(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Voxel overlap metrics: ``dsc``, ``precision``, ``recall``, ``specificity``.

    001 Eqs. 2-5. Zero denominators follow the module's 0/0 rule (both masks
    empty -> 1.0, one empty -> 0.0); see the module docstring.
    """
    tp, fp, fn, tn = confusion(pred, ref)
    fg_agree = (tp + fp + fn) == 0  # both masks empty
    bg_agree = (tn + fp + fn) == 0  # both masks full
    return {
        "dsc": _ratio(2 * tp, 2 * tp + fp + fn, fg_agree),
        "precision": _ratio(tp, tp + fp, fg_agree),
        "recall": _ratio(tp, tp + fn, fg_agree),
        "specificity": _ratio(tn, tn + fp, bg_agree),
    }


# --------------------------------------------------------------------------- surfaces


def _surface_inplace(m: np.ndarray) -> np.ndarray:
    """Surface of a mask whose outermost layer (every face of the array) is False."""
    inner = tuple(slice(1, -1) for _ in range(m.ndim))
    interior = m[inner].copy()
    for ax in range(m.ndim):
        for sl in (slice(None, -2), slice(2, None)):
            idx = list(inner)
            idx[ax] = sl
            interior &= m[tuple(idx)]
    surf = m.copy()
    surf[inner] &= ~interior
    return surf


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Bool array (same shape) marking the surface voxels of ``mask``.

    Surface voxel: foreground with at least one face neighbour in the background;
    outside the array counts as background (module docstring).
    """
    m = _mask(mask, "mask")
    out = np.zeros(m.shape, dtype=bool)
    box = _bbox(m)
    if box is None:
        return out
    crop = np.pad(m[box], 1)
    out[box] = _surface_inplace(crop)[tuple(slice(1, -1) for _ in range(m.ndim))]
    return out


def _offsets(spacing: np.ndarray, n_target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer voxel offsets with physical length <= R, sorted by length.

    R is chosen so that roughly ``n_target`` offsets fall inside the ellipsoid.
    Returns ``(offsets (k, ndim) int, lengths (k,) mm, half_widths (ndim,) int)``.
    """
    nd = spacing.size
    cell = float(np.prod(spacing))
    if nd == 3:
        radius = (3.0 * n_target * cell / (4.0 * math.pi)) ** (1.0 / 3.0)
    else:
        radius = math.sqrt(n_target * cell / math.pi)
    radius = max(radius, float(spacing.min()))  # always include the face neighbours of the finest axis
    half = np.floor(radius / spacing + 1e-9).astype(np.int64)
    grids = np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij")
    off = np.stack([g.ravel() for g in grids], axis=1)
    length = np.sqrt(((off * spacing) ** 2).sum(axis=1))
    keep = length <= radius
    off, length = off[keep], length[keep]
    order = np.argsort(length, kind="stable")
    return off[order], length[order], half


def _shell_distances(
    src_lin: np.ndarray,
    dst_flat: np.ndarray,
    dst_lin: np.ndarray,
    shape: tuple[int, ...],
    spacing: np.ndarray,
    offsets: np.ndarray,
    lengths: np.ndarray,
) -> np.ndarray:
    """Exact distance from each voxel ``src_lin`` (flat index) to the nearest True of ``dst_flat``.

    ``dst_flat`` is a flat view of a padded array large enough that every
    ``src + offset`` stays inside it.
    """
    strides = np.array([int(np.prod(shape[i + 1 :])) for i in range(len(shape))], dtype=np.int64)
    lin_off = offsets @ strides
    out = np.empty(src_lin.size, dtype=np.float64)
    cur = src_lin
    idx = np.arange(src_lin.size)
    # group offsets of (numerically) equal length: the first level with a hit is the answer
    level_start = np.flatnonzero(np.r_[True, np.diff(lengths) > 1e-12])
    level_end = np.r_[level_start[1:], lengths.size]
    for s, e in zip(level_start, level_end):
        hit = dst_flat[cur + lin_off[s]]
        for j in range(s + 1, e):
            hit |= dst_flat[cur + lin_off[j]]
        if hit.any():
            out[idx[hit]] = lengths[s]
            miss = ~hit
            cur, idx = cur[miss], idx[miss]
            if cur.size == 0:
                return out
    # the rest are farther than the largest offset: exact nearest neighbour with a k-d tree
    from scipy.spatial import cKDTree

    dst_xyz = np.stack(np.unravel_index(dst_lin, shape), axis=1) * spacing
    src_xyz = np.stack(np.unravel_index(cur, shape), axis=1) * spacing
    tree = cKDTree(dst_xyz, leafsize=16, balanced_tree=False, compact_nodes=False)
    out[idx] = tree.query(src_xyz, k=1)[0]
    return out


def _edt_distances(src: np.ndarray, dst: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance at each True voxel of ``src`` to the nearest True voxel of ``dst`` (dense EDT)."""
    try:
        import edt as _edt

        dist = _edt.edt(np.ascontiguousarray(~dst), anisotropy=tuple(spacing), black_border=False)
    except ImportError:  # pragma: no cover - edt is a declared dependency
        from scipy import ndimage

        dist = ndimage.distance_transform_edt(~dst, sampling=tuple(spacing))
    return dist[src].astype(np.float64)


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], method: str = "shell"
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: ``(d_pred_to_ref, d_ref_to_pred)``.

    ``d_pred_to_ref[i]`` is the distance from the i-th surface voxel of ``pred``
    (C order) to the nearest surface voxel of ``ref``; likewise the other way.
    Both are float64 1-D arrays of length N_S and N_G. If one mask is empty, its
    array is empty and the other one is all ``inf``; both empty -> two empty arrays.

    ``method``: ``"shell"`` (default, sparse exact search + k-d tree) or ``"edt"``
    (dense distance transform with the ``edt`` package); see the module docstring.
    """
    p, r = _pair(pred, ref)
    sp = _spacing(spacing, p.ndim)
    if method not in ("shell", "edt"):
        raise ValueError(f"method must be 'shell' or 'edt', got {method!r}")
    box_p, box_r = _bbox(p), _bbox(r)
    if box_p is None and box_r is None:
        return np.zeros(0), np.zeros(0)
    if box_p is None or box_r is None:
        s = surface_voxels(r if box_p is None else p)
        inf = np.full(int(np.count_nonzero(s)), np.inf)
        return (np.zeros(0), inf) if box_p is None else (inf, np.zeros(0))
    box = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(box_p, box_r))

    if method == "edt":
        inner = tuple(slice(1, -1) for _ in range(p.ndim))
        sp_surf = _surface_inplace(np.pad(p[box], 1))[inner]
        sr_surf = _surface_inplace(np.pad(r[box], 1))[inner]
        return _edt_distances(sp_surf, sr_surf, sp), _edt_distances(sr_surf, sp_surf, sp)

    offsets, lengths, half = _offsets(sp, _SHELL_OFFSETS)
    pad = [(int(h) + 1, int(h) + 1) for h in half]  # >= 1 so the surface sees outside as background
    ps = _surface_inplace(np.pad(p[box], pad))
    rs = _surface_inplace(np.pad(r[box], pad))
    shape = ps.shape
    p_flat, r_flat = ps.ravel(), rs.ravel()
    p_lin, r_lin = np.flatnonzero(p_flat), np.flatnonzero(r_flat)
    d_pr = _shell_distances(p_lin, r_flat, r_lin, shape, sp, offsets, lengths)
    d_rp = _shell_distances(r_lin, p_flat, p_lin, shape, sp, offsets, lengths)
    return d_pr, d_rp


def _surface_summary(d_pr: np.ndarray, d_rp: np.ndarray) -> dict[str, float]:
    if d_pr.size == 0 and d_rp.size == 0:
        return {"asd": 0.0, "msd": 0.0, "hd95": 0.0}
    if d_pr.size == 0 or d_rp.size == 0:
        return {"asd": math.inf, "msd": math.inf, "hd95": math.inf}
    asd = (float(d_pr.sum()) + float(d_rp.sum())) / (d_pr.size + d_rp.size)
    msd = max(float(d_pr.max()), float(d_rp.max()))
    hd95 = max(float(np.percentile(d_pr, 95)), float(np.percentile(d_rp, 95)))
    return {"asd": asd, "msd": msd, "hd95": hd95}


def surface_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], method: str = "shell"
) -> dict[str, float]:
    """Surface metrics in mm: ``asd`` (average symmetric), ``msd`` (Hausdorff), ``hd95``.

    Definitions and empty-mask rules (both empty -> 0.0, one empty -> inf) in the
    module docstring; ``hd95`` is MONAI's max of the two directed 95th percentiles.
    """
    return _surface_summary(*surface_distances(pred, ref, spacing, method=method))


# --------------------------------------------------------------------------- volumes


def volume_cm3(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Foreground volume in cm^3 (voxel count x voxel volume in mm^3 / 1000)."""
    m = np.asarray(mask)
    if m.dtype != bool and not np.issubdtype(m.dtype, np.integer):
        raise ValueError(f"mask: expected a bool or integer mask, got dtype {m.dtype}")
    sp = _spacing(spacing, m.ndim)
    return float(np.count_nonzero(m)) * float(np.prod(sp)) / 1000.0


def volume_errors(pred_volumes: Sequence[float], ref_volumes: Sequence[float]) -> dict[str, Any]:
    """Volume agreement over m cases (003 Eqs. 6-8), in the volumes' unit (cm^3).

    Returns ``mae`` = mean |p - r|, ``rmse`` = sqrt(mean (p - r)^2), ``bias`` =
    mean (p - r), ``re_pct`` (per-case relative error |p - r| / r x 100, array),
    ``re_mean_pct``, ``re_min_pct``, ``re_max_pct`` and ``n``.

    003's Eq. 8 is printed as ``|y'_i - y_i| / y'_i``; we divide by the *reference*
    volume ``r`` (the usual relative error, and what 003's text describes: "the
    relative error of the volume measured from our prediction as compared to the
    ground truth"). A zero reference volume gives ``inf`` (``nan`` if p is also 0).
    """
    p = np.asarray(pred_volumes, dtype=np.float64).reshape(-1)
    r = np.asarray(ref_volumes, dtype=np.float64).reshape(-1)
    if p.size != r.size:
        raise ValueError(f"pred_volumes and ref_volumes differ in length: {p.size} vs {r.size}")
    if p.size == 0:
        raise ValueError("volume_errors needs at least one case")
    diff = p - r
    with np.errstate(divide="ignore", invalid="ignore"):
        re = np.abs(diff) / np.abs(r) * 100.0
    return {
        "mae": float(np.mean(np.abs(diff))),
        "rmse": float(np.sqrt(np.mean(diff**2))),
        "bias": float(np.mean(diff)),
        "re_pct": re,
        "re_mean_pct": float(np.mean(re)),
        "re_min_pct": float(np.min(re)),
        "re_max_pct": float(np.max(re)),
        "n": int(p.size),
    }


# --------------------------------------------------------------------------- ROC / PR


def auc_from_curves(c: Mapping[str, Any]) -> float:
    """ROC AUC (trapezoidal, from (0, 0)) of a :func:`roc_pr_curves` / :func:`curves_from_counts` dict."""
    if c["n_pos"] == 0 or c["n_neg"] == 0:
        return math.nan
    x = np.r_[0.0, c["fpr"]]
    y = np.r_[0.0, c["tpr"]]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def ap_from_curves(c: Mapping[str, Any]) -> float:
    """Step-wise average precision of a :func:`roc_pr_curves` / :func:`curves_from_counts` dict."""
    if c["n_pos"] == 0:
        return math.nan
    dr = np.diff(np.r_[0.0, c["recall"]])
    return float(np.sum(dr * c["precision"]))


_auc_from_curves = auc_from_curves  # private aliases kept for existing callers
_ap_from_curves = ap_from_curves


def roc_auc(prob: Any, ref: Any, n_bins: int | None = None) -> float:
    """Area under the ROC curve (trapezoidal; ties count 1/2, = Mann-Whitney U / (P N)).

    Same inputs as :func:`roc_pr_curves`. nan if the reference has no positive or
    no negative voxel (like MONAI's ``compute_roc_auc``).
    """
    return auc_from_curves(roc_pr_curves(prob, ref, n_bins=n_bins))


def average_precision(prob: Any, ref: Any, n_bins: int | None = None) -> float:
    """Average precision, scikit-learn's step-wise definition ``sum_n (R_n - R_{n-1}) P_n``.

    Over decreasing thresholds with ``R_0 = 0`` (no trapezoidal interpolation).
    nan if the reference has no positive voxel.
    """
    return ap_from_curves(roc_pr_curves(prob, ref, n_bins=n_bins))


# --------------------------------------------------------------------------- per case


def evaluate_case(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], prob: np.ndarray | None = None
) -> dict[str, float]:
    """All per-case metrics in one flat row (a dict of floats).

    Keys: ``dsc``, ``precision``, ``recall``, ``specificity``, ``asd_mm``, ``msd_mm``,
    ``hd95_mm``, ``vol_pred_cm3``, ``vol_ref_cm3``, ``vol_diff_cm3`` (pred - ref) and,
    only when ``prob`` (the probability map the mask came from) is given, ``auc``
    and ``ap`` (exact, :func:`roc_auc` / :func:`average_precision` against ``ref``).
    """
    p, r = _pair(pred, ref)
    sp = _spacing(spacing, p.ndim)
    row: dict[str, float] = dict(overlap_metrics(p, r))
    s = surface_metrics(p, r, sp)
    row["asd_mm"] = s["asd"]
    row["msd_mm"] = s["msd"]
    row["hd95_mm"] = s["hd95"]
    row["vol_pred_cm3"] = volume_cm3(p, sp)
    row["vol_ref_cm3"] = volume_cm3(r, sp)
    row["vol_diff_cm3"] = row["vol_pred_cm3"] - row["vol_ref_cm3"]
    if prob is not None:
        prob = np.asarray(prob)
        if prob.shape != p.shape:
            raise ValueError(f"prob shape {prob.shape} != mask shape {p.shape}")
        c = roc_pr_curves(prob, r)
        row["auc"] = auc_from_curves(c)
        row["ap"] = ap_from_curves(c)
    return row


def evaluate_labels(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spacing: Sequence[float],
    labels: Mapping[str, int | Sequence[int]] | None = None,
) -> dict[str, float]:
    """Per-compartment metrics of two label maps (CT: 1 trabecular, 2 cortical).

    ``labels`` maps a compartment name to the label value(s) it consists of;
    default :data:`CT_COMPARTMENTS` (periosteal = {1, 2}, endosteal = {1},
    cortical = {2}). Returns one flat row with, for each compartment ``name``:
    ``{name}_dsc``, ``{name}_precision``, ``{name}_recall``, ``{name}_asd_mm``,
    ``{name}_msd_mm``, ``{name}_hd95_mm``, ``{name}_vol_pred_cm3``, ``{name}_vol_ref_cm3``.
    """
    pl, rl = np.asarray(pred_labels), np.asarray(ref_labels)
    if pl.shape != rl.shape:
        raise ValueError(f"pred and ref label shapes differ: {pl.shape} vs {rl.shape}")
    for name, a in (("pred_labels", pl), ("ref_labels", rl)):
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name}: expected an integer label map, got dtype {a.dtype}")
    sp = _spacing(spacing, pl.ndim)
    comps = CT_COMPARTMENTS if labels is None else labels
    row: dict[str, float] = {}
    for name, values in comps.items():
        vals = np.atleast_1d(np.asarray(values))
        pm = np.isin(pl, vals)
        rm = np.isin(rl, vals)
        o = overlap_metrics(pm, rm)
        s = surface_metrics(pm, rm, sp)
        row[f"{name}_dsc"] = o["dsc"]
        row[f"{name}_precision"] = o["precision"]
        row[f"{name}_recall"] = o["recall"]
        row[f"{name}_asd_mm"] = s["asd"]
        row[f"{name}_msd_mm"] = s["msd"]
        row[f"{name}_hd95_mm"] = s["hd95"]
        row[f"{name}_vol_pred_cm3"] = volume_cm3(pm, sp)
        row[f"{name}_vol_ref_cm3"] = volume_cm3(rm, sp)
    return row
