"""Post-processing of binary segmentation masks.

* Largest connected component (001/002: "the label corresponding to the maximum
  connected volume within the 3D segmentation mask represents the proximal femur"), or, for a
  scan of both hips, the two largest when the second holds at least
  :data:`MIN_FEMUR_FRACTION` of the largest one's voxels (``lcc2``).
* Removal of components below a volume in mm^3 (004: "removing clusters smaller
  than predefined thresholds").
* Hole filling and morphological opening (004).

All functions take a 2D or 3D mask (bool or integer, non-zero = foreground) in
canonical axis order and return a new ``bool`` array of the same shape; the input
is never modified. An empty mask comes back empty. Work is restricted to the
bounding box of the foreground, so cost scales with the object, not the volume.
Everything outside the array counts as background.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "MODES",
    "ellipsoid_structure",
    "femur_components",
    "femurs_kept",
    "fill_holes",
    "MIN_FEMUR_FRACTION",
    "largest_component",
    "largest_components",
    "opening",
    "postprocess",
    "remove_small_components",
]

#: Valid ``mode`` values of :func:`postprocess`.
MODES: tuple[str, ...] = ("none", "lcc", "lcc+fill", "lcc+fill+open", "lcc2", "lcc2+fill", "lcc2+fill+open")

MIN_FEMUR_FRACTION = 0.25
"""A further component counts as a femur (the other hip of a scan showing both) when it has at
least this fraction of the largest one's voxels (both femurs of one patient differ far less).
It separates a femur from stray islands, not from large false positives: the demo model (trained
on one hip) gives midline components of 65-96 % a femur's size on bilateral phantoms
(``benchmarks/bilateral_postprocess.py``), which no size rule can tell from the other femur."""

_CONNECTIVITY = {2: {4: 1, 8: 2}, 3: {6: 1, 18: 2, 26: 3}}


def _mask(a: Any) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != bool:
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"mask: expected a bool or integer mask, got dtype {a.dtype}")
        a = a != 0
    if a.ndim not in (2, 3):
        raise ValueError(f"mask: expected a 2D or 3D mask, got shape {a.shape}")
    return a


def _spacing(spacing: Any, ndim: int) -> np.ndarray:
    s = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if s.size != ndim or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"spacing must be {ndim} positive numbers in mm, got {spacing!r}")
    return s


def _structure(ndim: int, connectivity: int | None) -> np.ndarray:
    """Connectivity structure: ``None`` = full (26 in 3D, 8 in 2D)."""
    if connectivity is None:
        return ndimage.generate_binary_structure(ndim, ndim)
    rank = _CONNECTIVITY[ndim].get(int(connectivity))
    if rank is None:
        raise ValueError(f"connectivity for {ndim}D must be one of {sorted(_CONNECTIVITY[ndim])}, got {connectivity!r}")
    return ndimage.generate_binary_structure(ndim, rank)


def _bbox(m: np.ndarray, margin: int | Sequence[int] = 0) -> tuple[slice, ...] | None:
    if not m.any():
        return None
    margins = [int(margin)] * m.ndim if np.isscalar(margin) else [int(x) for x in margin]
    out = []
    for ax in range(m.ndim):
        other = tuple(i for i in range(m.ndim) if i != ax)
        nz = np.flatnonzero(m.any(axis=other))
        out.append(slice(max(int(nz[0]) - margins[ax], 0), min(int(nz[-1]) + 1 + margins[ax], m.shape[ax])))
    return tuple(out)


def _components(m: np.ndarray, connectivity: int | None) -> tuple[np.ndarray, np.ndarray, tuple[slice, ...] | None]:
    """Label the components inside the bounding box: ``(labels_in_box, sizes, box)``."""
    box = _bbox(m)
    if box is None:
        return np.zeros((0,), np.int32), np.zeros(1, np.int64), None
    lab, _ = ndimage.label(m[box], structure=_structure(m.ndim, connectivity))
    sizes = np.bincount(lab.ravel())
    return lab, sizes, box


def largest_component(mask: np.ndarray, connectivity: int | None = None) -> np.ndarray:
    """Keep only the largest connected component of ``mask``.

    ``connectivity``: ``None`` (default) = full connectivity, i.e. 26 in 3D (faces,
    edges and corners) and 8 in 2D, so diagonal contacts between slices join
    components; or 6/18/26 (3D), 4/8 (2D). Ties go to the component found first
    in C (raster) order.
    """
    parts = femur_components(mask, 1, 0.0, connectivity)
    return parts[0] if parts else np.zeros(_mask(mask).shape, dtype=bool)


def femur_components(mask: np.ndarray, most: int = 2, min_fraction: float = MIN_FEMUR_FRACTION,
                     connectivity: int | None = None) -> list[np.ndarray]:
    """The largest connected component and up to ``most - 1`` further ones, each with at least
    ``min_fraction`` of the largest one's voxels, as separate bool masks, largest first
    (``[]`` for an empty mask). ``connectivity`` as in :func:`largest_component`."""
    if int(most) < 1:
        raise ValueError(f"most: expected at least 1 component, got {most!r}")
    m = _mask(mask)
    lab, sizes, box = _components(m, connectivity)
    if box is None:
        return []
    sizes[0] = 0
    if int(most) == 1:
        order = [int(np.argmax(sizes))]  # ties: the first in raster order, as largest_component
    else:
        order = [int(k) for k in np.argsort(sizes, kind="stable")[::-1][: int(most)]]
    parts = []
    for k in order:
        if sizes[k] > 0 and sizes[k] >= min_fraction * sizes.max():
            part = np.zeros(m.shape, dtype=bool)
            part[box] = lab == k
            parts.append(part)
    return parts


def largest_components(mask: np.ndarray, most: int = 2, min_fraction: float = MIN_FEMUR_FRACTION,
                       connectivity: int | None = None) -> np.ndarray:
    """The union of :func:`femur_components` (``most=1`` is :func:`largest_component`)."""
    out = np.zeros(_mask(mask).shape, dtype=bool)
    for part in femur_components(mask, most, min_fraction, connectivity):
        out |= part
    return out


def remove_small_components(
    mask: np.ndarray, min_size_mm3: float, spacing: Sequence[float], connectivity: int | None = None
) -> np.ndarray:
    """Remove connected components whose volume is below ``min_size_mm3`` (mm^3).

    Volume = voxel count x voxel volume. Components of exactly ``min_size_mm3``
    are kept. ``connectivity`` as in :func:`largest_component`.
    """
    m = _mask(mask)
    sp = _spacing(spacing, m.ndim)
    if min_size_mm3 <= 0:
        return m.copy()
    lab, sizes, box = _components(m, connectivity)
    out = np.zeros(m.shape, dtype=bool)
    if box is None:
        return out
    keep = sizes * float(np.prod(sp)) >= float(min_size_mm3)
    keep[0] = False
    out[box] = keep[lab]
    return out


def fill_holes(mask: np.ndarray, slice_axis: int | None = None) -> np.ndarray:
    """Fill holes: background regions not connected to the outside of the array.

    3D (or 2D) fill with ``scipy.ndimage.binary_fill_holes``: background is
    face-connected (6 in 3D, 4 in 2D), so a cavity that touches the array border,
    or leaks to the outside through a face, is not a hole. If ``slice_axis`` is
    given (e.g. 0 for the coronal slices), each 2D slice along that axis is then
    also filled on its own; this closes cavities that are open in 3D only through
    neighbouring slices (common with thick MR slices), at the price of also
    filling concavities that are closed within a slice.
    """
    m = _mask(mask)
    box = _bbox(m)
    if box is None:
        return m.copy()
    crop = np.pad(m[box], 1)  # a padded frame keeps "connected to the outside" correct
    filled = ndimage.binary_fill_holes(crop)
    if slice_axis is not None:
        ax = int(slice_axis)
        if not -m.ndim <= ax < m.ndim:
            raise ValueError(f"slice_axis {slice_axis} out of range for a {m.ndim}D mask")
        moved = np.moveaxis(filled, ax, 0)
        for k in range(moved.shape[0]):
            moved[k] = ndimage.binary_fill_holes(moved[k])
    out = m.copy()
    out[box] = filled[tuple(slice(1, -1) for _ in range(m.ndim))]
    return out


def ellipsoid_structure(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Bool structuring element: voxel offsets ``o`` with ``sum((o_i s_i / r)^2) <= 1``.

    The half-width along axis i is ``floor(r / s_i)``; an axis whose spacing
    exceeds the radius gets half-width 0, so e.g. ``r = 1 mm`` at spacing
    ``(1.5, 0.234, 0.234)`` is a flat 1 x 9 x 9 disc within each coronal slice.
    """
    if not radius_mm > 0:
        raise ValueError(f"radius_mm must be > 0, got {radius_mm!r}")
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    half = np.floor(radius_mm / sp + 1e-9).astype(int)
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, sp)], indexing="ij")
    r2 = sum(g**2 for g in grids)
    return r2 <= radius_mm**2 * (1 + 1e-9)


def opening(mask: np.ndarray, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Morphological opening with an ellipsoidal structuring element of radius ``radius_mm``.

    The element is sized in mm per axis (:func:`ellipsoid_structure`), so it is
    anisotropic in voxels. Removes structures thinner than about ``2 * radius_mm``
    (spurs, thin bridges) and keeps the rest. Outside the array is background, so
    thin structures lying on the array border are removed too.
    """
    m = _mask(mask)
    sp = _spacing(spacing, m.ndim)
    se = ellipsoid_structure(radius_mm, sp)
    half = [s // 2 for s in se.shape]
    box = _bbox(m)
    if box is None:
        return m.copy()
    pad = [(h + 1, h + 1) for h in half]
    crop = np.pad(m[box], pad)
    opened = ndimage.binary_opening(crop, structure=se)
    out = np.zeros(m.shape, dtype=bool)
    out[box] = opened[tuple(slice(h + 1, -(h + 1)) for h in half)]
    return out


def _parse_mode(mode: str) -> str:
    key = str(mode).strip().lower().replace(" ", "")
    if key not in MODES:
        raise ValueError(f"post-processing mode must be one of {', '.join(MODES)}; got {mode!r}")
    return key


def femurs_kept(mode: str) -> int:
    """How many femurs (components) a post-processing mode keeps at most: 2 for ``lcc2...``, else 1
    (``none`` keeps every component, but a mask is still expected to hold one femur)."""
    return 2 if _parse_mode(mode).startswith("lcc2") else 1


def postprocess(
    mask: np.ndarray,
    mode: str,
    spacing: Sequence[float],
    min_size_mm3: float = 0.0,
    open_radius_mm: float = 1.0,
    connectivity: int | None = None,
) -> np.ndarray:
    """Apply a named post-processing chain; returns a new bool mask.

    ``mode`` (case-insensitive), applied in this order:

    * ``'none'``: nothing (beyond ``min_size_mm3``);
    * ``'lcc'``: keep the largest connected component (001/002);
    * ``'lcc+fill'``: then fill 3D holes (:func:`fill_holes`);
    * ``'lcc+fill+open'``: then open with an ellipsoid of ``open_radius_mm`` and
      keep the largest component again (opening can detach fragments) (004);
    * ``'lcc2'``, ``'lcc2+fill'``, ``'lcc2+fill+open'``: the same with up to two components
      (:func:`largest_components`): scans showing both hips.

    ``min_size_mm3 > 0`` first removes components smaller than that volume (in
    every mode). ``connectivity`` as in :func:`largest_component` (default full).
    Raises ``ValueError`` listing the valid modes for anything else.
    """
    key = _parse_mode(mode)
    m = _mask(mask)
    sp = _spacing(spacing, m.ndim)
    out = remove_small_components(m, min_size_mm3, sp, connectivity) if min_size_mm3 > 0 else m.copy()
    if key == "none" or not out.any():
        return out
    most = femurs_kept(key)
    out = largest_components(out, most, connectivity=connectivity)
    if "+fill" in key:
        out = fill_holes(out)
    if key.endswith("+open"):
        out = largest_components(opening(out, open_radius_mm, sp), most, connectivity=connectivity)
    return out
