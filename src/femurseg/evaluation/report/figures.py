"""Publication-style figures of the comparison report (matplotlib, PNG).

Each function draws one figure of papers 001/003 from plain arrays and writes it
atomically; colours are consistent across figures (model ``i`` gets colour ``i`` of
:func:`model_colours`).

* :func:`roc_pr_figure` - pooled ROC and precision-recall curves, AUC / AP in the legend (001 Fig. 2);
* :func:`box_figure` - per-case DSC, precision and recall per model (001 Fig. 3);
* :func:`volume_agreement_figure` - relative volume error vs reference volume (003 Fig. 8);
* :func:`bland_altman_figure` - volume difference vs mean volume, bias and 95 % limits of agreement;
* :func:`case_panel_figure` - image, reference outline, probability map, final mask and the
  3D surface coloured by distance to the reference, one row per model (001 Figs. 4-5).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from femurseg.core.errors import atomic_path  # noqa: E402

DPI = 150
METRIC_LABELS = {
    "dsc": "DSC",
    "precision": "precision",
    "recall": "recall",
    "specificity": "specificity",
    "asd_mm": "ASD [mm]",
    "msd_mm": "MSD [mm]",
    "hd95_mm": "HD95 [mm]",
    "auc": "AUC",
    "ap": "AP",
}

plt.rcParams.update({
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
})


def model_colours(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` distinguishable colours (tab10, then tab20)."""
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------- curves


def roc_pr_figure(
    curves: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike,
    operating_points: Mapping[str, float] | None = None,
    log_fpr: bool = True,
) -> Path:
    """Pooled ROC (left) and precision-recall (right) curves, one line per model (001 Fig. 2).

    Args:
        curves: model name -> curve dict of :func:`femurseg.evaluation.metrics.curves_from_counts`
            (``fpr``, ``tpr``, ``precision``, ``recall``, ``thresholds``) plus ``auc`` and ``ap``
            (pooled over all cases) for the legends.
        path: output PNG.
        operating_points: model name -> decision threshold; marked on the PR curve.
        log_fpr: draw the false-positive rate on a log axis (segmentation ROC curves hug
            the left edge on a linear one).
    """
    many = len(curves) > 4  # legends below the axes instead of over the curves
    height = 4.4 + (0.2 * (len(curves) + 1) + 0.6 if many else 0.0)
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(10, height))
    colours = model_colours(len(curves))
    for (name, c), col in zip(curves.items(), colours):
        fpr, tpr = np.asarray(c["fpr"], float), np.asarray(c["tpr"], float)
        keep = fpr > 0 if log_fpr else np.ones(fpr.shape, bool)
        ax_roc.plot(fpr[keep], tpr[keep], color=col, lw=1.6, label=f"{name} (AUC = {c.get('auc', np.nan):.3f})")
        rec, prec = np.asarray(c["recall"], float), np.asarray(c["precision"], float)
        ax_pr.plot(rec, prec, color=col, lw=1.6, label=f"{name} (AP = {c.get('ap', np.nan):.3f})")
        if operating_points and name in operating_points and operating_points[name] is not None:
            thr = np.asarray(c["thresholds"], float)
            i = int(np.argmin(np.abs(thr - float(operating_points[name]))))
            ax_pr.plot(rec[i], prec[i], "o", color=col, ms=6, mec="k", mew=0.8, zorder=5)
    if log_fpr:
        ax_roc.set_xscale("log")
        ax_roc.set_xlim(1e-5, 1)
        ax_roc.set_xlabel("false positive rate (1 - specificity), log scale")
    else:
        ax_roc.set_xlim(0, 1)
        ax_roc.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax_roc.set_xlabel("false positive rate (1 - specificity)")
    ax_roc.set_ylim(0, 1.01)
    ax_roc.set_ylabel("true positive rate (sensitivity)")
    ax_roc.set_title("ROC (pooled voxels, out-of-fold)")
    below = {"loc": "upper left", "bbox_to_anchor": (-0.02, -0.12 * 4.4 / 3.6), "frameon": False, "ncol": 1}
    ax_roc.legend(**(below if many else {"loc": "lower right", "frameon": False}))
    ax_roc.grid(alpha=0.3)
    ax_pr.set_xlim(0, 1.01)
    ax_pr.set_ylim(0, 1.01)
    ax_pr.set_xlabel("recall (sensitivity)")
    ax_pr.set_ylabel("precision (PPV)")
    ax_pr.set_title("precision-recall (pooled voxels, out-of-fold)")
    ax_pr.grid(alpha=0.3)
    if operating_points:
        ax_pr.plot([], [], "o", color="w", mec="k", label="operating point (PR threshold)")
    ax_pr.legend(**(below if many else {"loc": "lower left", "frameon": False}))
    if many:
        fig.subplots_adjust(left=0.07, right=0.98, wspace=0.25, top=1 - 0.4 / height, bottom=(height - 4.0) / height)
    else:
        fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------- boxes


def box_figure(
    values: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | os.PathLike,
    metrics: Sequence[str] = ("dsc", "precision", "recall"),
) -> Path:
    """Box plots of per-case metrics, one panel per metric, one box per model (001 Fig. 3).

    Boxes are horizontal (models on the shared vertical axis, the first model on top) so
    that long model names stay readable; every case is drawn as a dot over its box.

    Args:
        values: model name -> metric -> per-case values (non-finite values are left out).
        path: output PNG.
        metrics: the metric keys to plot (labels from :data:`METRIC_LABELS`).
    """
    names = list(values)
    n = len(names)
    colours = model_colours(n)
    label_w = min(3.2, 0.3 + 0.065 * max(len(x) for x in names))
    fig, axes = plt.subplots(1, len(metrics), figsize=(label_w + 3.0 * len(metrics), 0.8 + 0.42 * max(n, 2.5)),
                             squeeze=False, sharey=True)
    rng = np.random.default_rng(0)
    pos = np.arange(n, 0, -1)  # first model on top
    for ax, metric in zip(axes[0], metrics):
        data = []
        for name in names:
            v = np.asarray(values[name].get(metric, []), dtype=float)
            data.append(v[np.isfinite(v)])
        bp = ax.boxplot(data, positions=pos, orientation="horizontal", patch_artist=True, widths=0.6, showfliers=False,
                        medianprops={"color": "k", "lw": 1.2})
        for patch, col in zip(bp["boxes"], colours):
            patch.set_facecolor((*col[:3], 0.35))
            patch.set_edgecolor(col)
        for p, v, col in zip(pos, data, colours):
            ax.scatter(v, p + rng.uniform(-0.15, 0.15, v.size), s=10, color=col, alpha=0.85, lw=0, zorder=3)
        ax.set_xlabel(METRIC_LABELS.get(metric, metric) + " per case")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(pos)
    axes[0][0].set_yticklabels(names)
    axes[0][0].set_ylim(0.4, n + 0.6)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------- volumes


def volume_agreement_figure(
    ref_volumes: Mapping[str, Sequence[float]],
    pred_volumes: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    what: str = "femur",
) -> Path:
    """Relative volume error ``(pred - ref) / ref x 100 %`` against the reference volume
    (003 Fig. 8, signed), one marker colour per model; dashed lines at +-5 %.

    Args:
        ref_volumes / pred_volumes: model name -> per-case volumes in cm^3 (paired).
    """
    fig, ax = plt.subplots(figsize=(6.2 + (3.4 if len(pred_volumes) > 3 else 0.0), 4.2))
    colours = model_colours(len(pred_volumes))
    markers = "osD^v<>ph*"
    for i, (name, col) in enumerate(zip(pred_volumes, colours)):
        r = np.asarray(ref_volumes[name], float)
        p = np.asarray(pred_volumes[name], float)
        with np.errstate(divide="ignore", invalid="ignore"):
            re = (p - r) / r * 100.0
        ok = np.isfinite(re)
        ax.scatter(r[ok], re[ok], s=28, color=col, marker=markers[i % len(markers)], alpha=0.85, lw=0.5,
                   edgecolors="k", label=f"{name} (mean |RE| = {np.mean(np.abs(re[ok])):.2f} %)" if ok.any() else name)
    ax.axhline(0, color="0.3", lw=0.8)
    for y in (-5, 5):
        ax.axhline(y, color="0.5", lw=0.8, ls="--")
    ax.set_xlabel(f"reference {what} volume [cm$^3$]")
    ax.set_ylabel("relative volume error (pred - ref) / ref [%]")
    ax.set_title(f"{what} volume agreement")
    ax.grid(alpha=0.3)
    if len(pred_volumes) > 3:  # beside the axes, not over the points
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        ax.legend(frameon=False, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def bland_altman_figure(
    agreements: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike,
    what: str = "femur volume",
    unit: str = "cm$^3$",
) -> Path:
    """Bland-Altman plot per model: difference ``pred - ref`` against the mean of both,
    bias (solid) and 95 % limits of agreement (dashed, bias +- 1.96 SD).

    Args:
        agreements: model name -> :func:`femurseg.evaluation.stats.bland_altman` (pred, ref) result
            (``means``, ``diffs``, ``mean_diff``, ``loa_low``, ``loa_high``).
    """
    names = list(agreements)
    n = len(names)
    ncol = min(n, 3)
    nrow = int(np.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.5 * nrow), squeeze=False)
    colours = model_colours(n)
    for ax, name, col in zip(axes.ravel(), names, colours):
        ba = agreements[name]
        m, d = np.asarray(ba["means"], float), np.asarray(ba["diffs"], float)
        ax.scatter(m, d, s=22, color=col, edgecolors="k", lw=0.5, alpha=0.85)
        for y, ls in ((ba["mean_diff"], "-"), (ba["loa_high"], "--"), (ba["loa_low"], "--")):
            if y is not None and np.isfinite(y):
                ax.axhline(y, color="0.25", lw=1.0, ls=ls)
        ax.text(0.02, 0.98, f"bias {ba['mean_diff']:+.3g} {unit}\n95% LoA [{ba['loa_low']:+.3g}, {ba['loa_high']:+.3g}]",
                transform=ax.transAxes, va="top", ha="left", fontsize=7,
                bbox={"facecolor": "w", "alpha": 0.8, "lw": 0, "pad": 1.5})
        finite = [v for v in (*d, ba["loa_low"], ba["loa_high"]) if v is not None and np.isfinite(v)]
        if finite:
            lo, hi = min(finite), max(finite)
            pad = 0.25 * (hi - lo) + 1e-6 * max(1.0, abs(hi))
            ax.set_ylim(lo - pad, hi + 2.2 * pad)
        ax.axhline(0, color="0.7", lw=0.6, ls=":")
        ax.set_title(name)
        ax.set_xlabel(f"mean of predicted and reference {what} [{unit}]")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"predicted - reference [{unit}]")
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    fig.suptitle(f"Bland-Altman agreement of the {what}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------- case panels


def best_slice(*masks: np.ndarray) -> int:
    """Coronal slice index (axis 0) with the largest area of the first non-empty mask."""
    for m in masks:
        if m is not None and np.any(m):
            return int(np.argmax(np.count_nonzero(m, axis=(1, 2))))
    return masks[0].shape[0] // 2


def _crop_box(masks: Sequence[np.ndarray], shape: tuple[int, int], margin: float = 0.25) -> tuple[slice, slice]:
    """In-plane (rows, cols) box around all masks' projections, padded by ``margin`` of its size."""
    union = np.zeros(shape, bool)
    for m in masks:
        if m is not None:
            union |= np.asarray(m).any(axis=0)
    if not union.any():
        return slice(0, shape[0]), slice(0, shape[1])
    out = []
    for ax in range(2):
        idx = np.flatnonzero(union.any(axis=1 - ax))
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        pad = int(round((hi - lo) * margin)) + 2
        out.append(slice(max(lo - pad, 0), min(hi + pad, shape[ax])))
    return out[0], out[1]


def _show_image(ax, img2d: np.ndarray, aspect: float) -> None:
    lo, hi = np.percentile(img2d, [1, 99.5]) if img2d.size else (0, 1)
    ax.imshow(img2d, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _outline(ax, mask2d: np.ndarray, colour: str, lw: float = 1.2, ls: str = "-") -> None:
    if mask2d is not None and mask2d.any() and not mask2d.all():
        ax.contour(mask2d.astype(float), levels=[0.5], colors=[colour], linewidths=lw, linestyles=ls)


def _scalebar(ax, n_cols: int, col_mm: float) -> None:
    """A 10 mm (or 20/50 mm) bar in the lower left corner."""
    width_mm = n_cols * col_mm
    length = 10.0 if width_mm < 60 else (20.0 if width_mm < 150 else 50.0)
    px = length / col_mm
    x0, y0 = 0.05, 0.06
    ax.plot([x0, x0 + px / n_cols], [y0, y0], transform=ax.transAxes, color="w", lw=2.5, solid_capstyle="butt")
    ax.text(x0 + px / n_cols / 2, y0 + 0.025, f"{length:g} mm", transform=ax.transAxes, color="w", ha="center",
            va="bottom", fontsize=7)


def case_panel_figure(
    image: np.ndarray,
    reference: np.ndarray,
    models: Mapping[str, Mapping[str, Any]],
    spacing: tuple[float, float, float],
    path: str | os.PathLike,
    title: str = "",
    slice_index: int | None = None,
    surface_vmax: float = 2.0,
    modality: str = "MR",
) -> Path:
    """Result panel of one case (001 Figs. 4-5): one row per model with
    (a) the image with the reference outline, (b) the probability map, (c) the final mask
    against the reference (false positives red, false negatives blue) and (d) the 3D
    surface of the prediction coloured by its distance to the reference surface.

    Args:
        image, reference: canonical arrays ``(n_coronal, n_rows, n_cols)``.
        models: model name -> ``{"prob": float array or None, "mask": bool array,
            "mesh": femurseg.evaluation.report.surface.Mesh or None, "metrics": {"dsc": ..., "asd_mm": ...}}``.
        spacing: voxel size in mm (canonical axes).
        slice_index: coronal slice to show (default: largest reference area).
        surface_vmax: colour range of the surface distance, +-mm.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    from femurseg.evaluation.report.surface import DISTANCE_CMAP, draw_surface

    k = best_slice(reference, *(m.get("mask") for m in models.values())) if slice_index is None else slice_index
    rows, cols = _crop_box([reference, *(m.get("mask") for m in models.values())], image.shape[1:])
    aspect = spacing[1] / spacing[2]
    img = image[k][rows, cols]
    ref = np.asarray(reference[k][rows, cols]) != 0
    n = len(models)
    crop_h = (rows.stop - rows.start) * spacing[1]
    crop_w = (cols.stop - cols.start) * spacing[2]
    panel_h = 2.6
    panel_w = float(np.clip(panel_h * crop_w / crop_h, 1.6, 4.0))
    fig_h = panel_h * n + 1.3
    fig = plt.figure(figsize=(3 * panel_w + panel_h * 1.15 + 0.8, fig_h))
    widths = [panel_w, panel_w, panel_w, panel_h * 1.15]
    gs = fig.add_gridspec(n, 4, width_ratios=widths, wspace=0.06, hspace=0.18, top=1 - 0.55 / fig_h,
                          bottom=0.75 / fig_h, left=0.04, right=0.99)
    fpfn = ListedColormap([(0, 0, 0, 0), (0.85, 0.1, 0.1, 0.75), (0.15, 0.35, 0.95, 0.75)])
    prob_im = None
    for i, (name, m) in enumerate(models.items()):
        mask = np.asarray(m["mask"][k][rows, cols]) != 0
        ax = fig.add_subplot(gs[i, 0])
        _show_image(ax, img, aspect)
        _outline(ax, ref, "yellow")
        ax.set_ylabel(name, fontsize=9)
        if i == 0:
            ax.set_title(f"{modality} + reference (slice {k})")
            _scalebar(ax, img.shape[1], spacing[2])
        ax = fig.add_subplot(gs[i, 1])
        if m.get("prob") is not None:
            prob_im = ax.imshow(m["prob"][k][rows, cols], cmap="magma", vmin=0, vmax=1, aspect=aspect,
                                interpolation="nearest")
            _outline(ax, ref, "cyan", lw=0.8, ls="--")
        else:
            ax.text(0.5, 0.5, "no probability map", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        if i == 0:
            ax.set_title("probability map")
        ax = fig.add_subplot(gs[i, 2])
        _show_image(ax, img, aspect)
        err = np.zeros(mask.shape, np.uint8)
        err[mask & ~ref] = 1
        err[~mask & ref] = 2
        ax.imshow(np.ma.masked_equal(err, 0), cmap=fpfn, vmin=0, vmax=2, aspect=aspect, interpolation="nearest")
        _outline(ax, mask, "lime", lw=1.0)
        met = m.get("metrics") or {}
        if met:
            txt = "  ".join(f"{METRIC_LABELS.get(key, key).split(' ')[0]} {met[key]:.3f}" if key != "asd_mm"
                            else f"ASD {met[key]:.2f} mm" for key in ("dsc", "asd_mm") if key in met)
            ax.text(0.02, 0.98, txt, transform=ax.transAxes, color="w", fontsize=7, va="top",
                    bbox={"facecolor": "k", "alpha": 0.5, "pad": 1.5, "lw": 0})
        if i == 0:
            ax.set_title("mask (green), FP red, FN blue")
        ax = fig.add_subplot(gs[i, 3], projection="3d")
        mesh = m.get("mesh")
        if mesh is not None:
            draw_surface(ax, mesh, surface_vmax, elev=10.0, azim=-75.0)
        else:
            ax.set_axis_off()
        if i == 0:
            ax.set_title("3D surface: distance to ref.")
    if prob_im is not None:
        cax = fig.add_axes([0.1, 0.32 / fig_h, 0.22, 0.1 / fig_h])
        cb = fig.colorbar(prob_im, cax=cax, orientation="horizontal")
        cb.set_label("femur probability", fontsize=7)
        cb.ax.tick_params(labelsize=7)
    cax = fig.add_axes([0.72, 0.32 / fig_h, 0.22, 0.1 / fig_h])
    cb = fig.colorbar(ScalarMappable(norm=Normalize(-surface_vmax, surface_vmax), cmap=DISTANCE_CMAP), cax=cax,
                      orientation="horizontal")
    cb.set_label("surface distance [mm] (+ outside ref., - inside)", fontsize=7)
    cb.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.12 / fig_h, va="top")
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png", bbox_inches="tight")
    plt.close(fig)
    return Path(path)
