"""PNG montage of a few coronal slices with the label / mask outline (and optional probability).

Used by ``femurseg synth --preview`` and ``femurseg predict --preview``; generic on purpose:
any canonical ``(n_coronal, rows, cols)`` image, an optional integer label or boolean mask,
an optional probability map in [0, 1].
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from femurseg.core.errors import FemursegError, atomic_path

# outline colours: [0] the foreground (label > 0), [v] the boundary of label value v
_LABEL_COLOURS = ("#ff3b30", "#34c7ff", "#ffd60a", "#30d158", "#bf5af2")


def choose_slices(n_coronal: int, mask: np.ndarray | None, n_slices: int) -> list[int]:
    """Coronal slice indices evenly spaced through the mask's extent (whole volume without a mask).

    The first and last slices of the extent are avoided (they hold little of the object):
    the indices are the centres of ``n_slices`` equal bins of the extent.
    """
    n_slices = max(1, min(int(n_slices), n_coronal))
    lo, hi = 0, n_coronal - 1
    if mask is not None and np.any(mask):
        idx = np.flatnonzero(np.any(mask, axis=(1, 2)))
        lo, hi = int(idx[0]), int(idx[-1])
    edges = np.linspace(lo, hi + 1, n_slices + 1)
    picks = np.clip(np.floor((edges[:-1] + edges[1:]) / 2.0).astype(int), lo, hi)
    return sorted(set(int(i) for i in picks))


def _display_range(image: np.ndarray) -> tuple[float, float]:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    sample = finite[:: max(1, finite.size // 2_000_000)]
    vmin, vmax = np.percentile(sample, [0.5, 99.5])
    if vmin < -500.0 and vmax > 300.0:  # looks like CT (Hounsfield units): a bone window
        vmin, vmax = -200.0, 1300.0
    if vmax <= vmin:
        vmax = vmin + 1.0
    return float(vmin), float(vmax)


def save_montage(
    image: np.ndarray,
    label_or_mask: np.ndarray | None,
    path: str | os.PathLike,
    n_slices: int = 4,
    title: str | None = None,
    spacing: Sequence[float] | None = None,
    prob: np.ndarray | None = None,
    slices: Sequence[int] | None = None,
) -> list[int]:
    """Write a PNG with ``n_slices`` coronal slices of ``image`` and the label outline.

    Args:
        image: canonical ``(n_coronal, rows, cols)`` array (MR units or Hounsfield units;
            CT is shown in a bone window, MR between the 0.5th and 99.5th percentiles).
        label_or_mask: same shape; a boolean mask or an integer label. The outline of
            ``label > 0`` is drawn in red; with several label values the boundary of each
            value except the highest gets its own colour (1 cyan, 2 yellow, ...), so a CT
            label shows the periosteal (red) and endosteal (cyan) surfaces. None: image only.
        path: output PNG; written atomically (``femurseg.core.errors.atomic_path``).
        n_slices: how many coronal slices, evenly spaced through the label's extent
            (through the probability map's >= 0.5 region, else the whole volume, when
            there is no label).
        title: figure title.
        spacing: mm per canonical axis; rows and columns are drawn with their true aspect
            ratio (``spacing[1] / spacing[2]``). None: square pixels.
        prob: optional probability map, same shape, drawn as a translucent overlay
            (values below 0.05 transparent).
        slices: explicit coronal slice indices (overrides ``n_slices``).

    Returns:
        The coronal slice indices shown.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise FemursegError(f"{path}: expected a 3D image (coronal, rows, cols), got shape {image.shape}")
    for name, arr in (("label", label_or_mask), ("probability map", prob)):
        if arr is not None and np.shape(arr) != image.shape:
            raise FemursegError(f"{path}: {name} shape {np.shape(arr)} differs from image shape {image.shape}")
    if spacing is not None and (len(spacing) != 3 or min(float(s) for s in spacing) <= 0):
        raise FemursegError(f"{path}: spacing must be 3 positive numbers, got {spacing}")

    # the object-oriented API with the Agg canvas: no pyplot, no global backend switch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lab = None if label_or_mask is None else np.asarray(label_or_mask)
    if lab is not None and lab.dtype == bool:
        lab = lab.astype(np.uint8)
    extent_mask = lab > 0 if lab is not None else (np.asarray(prob) >= 0.5 if prob is not None else None)
    if slices is None:
        slices = choose_slices(image.shape[0], extent_mask, n_slices)
    else:
        slices = [int(i) for i in slices]
        if any(i < 0 or i >= image.shape[0] for i in slices):
            raise FemursegError(f"{path}: slice index out of range 0..{image.shape[0] - 1}: {slices}")
    vmin, vmax = _display_range(image)
    aspect = 1.0 if spacing is None else float(spacing[1]) / float(spacing[2])

    n = len(slices)
    rows, cols = image.shape[1], image.shape[2]
    panel_w = 3.2
    panel_h = panel_w * rows * aspect / cols
    fig = Figure(figsize=(panel_w * n, panel_h + (0.55 if title else 0.3)), dpi=110)
    FigureCanvasAgg(fig)
    values = [] if lab is None else [int(v) for v in np.unique(lab) if v > 0]
    for j, k in enumerate(slices):
        ax = fig.add_subplot(1, n, j + 1)
        ax.imshow(image[k], cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
        if prob is not None:
            pk = np.ma.masked_less(np.asarray(prob[k], dtype=float), 0.05)
            ax.imshow(pk, cmap="autumn", vmin=0.0, vmax=1.0, alpha=0.35, aspect=aspect, interpolation="nearest")
        if lab is not None:
            # outer outline of the foreground (label > 0), then the boundary of every label
            # value but the highest (CT: the red periosteal and the cyan endosteal surface)
            outlines = [(lab[k] > 0, _LABEL_COLOURS[0])]
            outlines += [(lab[k] == v, _LABEL_COLOURS[v % len(_LABEL_COLOURS)]) for v in values[:-1]]
            for m, colour in outlines:
                if m.any():
                    ax.contour(m.astype(float), levels=[0.5], colors=[colour], linewidths=0.8)
        loc = f"slice {k}" if spacing is None else f"slice {k} ({k * float(spacing[0]):.1f} mm)"
        ax.set_title(loc, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return slices
