"""Field-of-view matching: segment a scan whose field of view differs from the training scans'
(wider or narrower in-plane, thicker than the slab) in windows of the training field of view.

A network trained on whole slabs of one in-plane field of view learns where the border of the
image is, not only what a femur looks like: the same hip rendered with more thigh, pelvis and air
around it is segmented worse (the border it learnt has moved). nnU-Net avoids this by training on
patches; femurseg's default networks take the whole slab, so at prediction time a wider scan is
brought back to what the network saw:

1. tile the scan with windows of the training field of view (mm), neighbours overlapping by half,
   each segmented alone, blended with Gaussian weights (:func:`tiled_probabilities`);
2. cut the window that puts the largest component of that map (probability >= 0.5) where the
   training labels' centroids lay (the middle of their range, relative to the field of view) and
   segment it again, repeated while the window moves by more than :data:`SETTLE_MM` (at most
   :data:`MAX_PASSES` windows); a second component of at least :data:`~femurseg.inference.postprocess.MIN_FEMUR_FRACTION` of the
   largest (the other hip of a scan showing both) gets its own window the same way;
3. inside those windows their probabilities, outside them the tiles' (where the femur leaves the
   window, e.g. more shaft; what lies outside and is not connected to the femur is removed by
   the largest-component post-processing).

A scan *narrower* than the training scans is segmented the same way in one window that extends
beyond it, the scan's border voxels repeated outward (edge padding: measured better than padding
with air or mirroring), and the result cut back to the scan.

The in-plane axes (rows = inferior, columns = left, canonical axes 1 and 2) are matched along an
axis where the scan's field of view is more than :data:`FOV_MATCH_FACTOR` times the widest
training one, or less than the narrowest divided by it. The slice axis (anterior, axis 0) is
matched where the scan is thicker by that factor than the central slab the preprocessing keeps
(``crop_mm``): the slab is placed on the femur, not in the middle of the scan. Scans within those
bounds are segmented exactly as without matching. Windows are ``(start, stop)`` voxel slices of
the scan's canonical axes and may reach beyond the scan (negative ``start``, ``stop`` past its
size) where it is narrower.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from femurseg.inference.postprocess import femur_components
from femurseg.inference.thresholds import foreground_probability

FOV_MODES = ("match", "full")
"""``--fov``: match (windows of the training field of view) or full (the whole scan as it is)."""

FOV_MATCH_FACTOR = 1.15
"""Match an axis only where the scan's field of view is this factor wider than the widest training
one, or this factor narrower than the narrowest."""

MAX_PASSES = 2
"""Matched windows segmented at most (after the tiles), until the window settles."""

TILE_OVERLAP = 0.5
"""Overlap of neighbouring tiles (fraction of the window)."""

MAX_FEMURS = 2
"""Femurs matched at most, one window each (a scan of both hips)."""

SETTLE_MM = 3.0
"""The window has settled when its corner moves by at most this much (mm) between passes."""

INPLANE_AXES = (1, 2)

Window = tuple[slice, slice, slice]


class AxisFov(NamedTuple):
    """The training scans' field of view along one axis (mm) and where their labels lay."""

    narrowest: float
    widest: float
    middle: float
    """The window's extent: the middle of the training range (mm)."""
    centre: float
    """The label centroid's position relative to the field of view (middle of the training range, 0-1)."""


TrainFov = Mapping[int, AxisFov]


def training_field_of_view(reference: Mapping[str, Any] | None, slab_mm: float | None = None
                           ) -> dict[int, AxisFov] | None:
    """The training field of view (:class:`AxisFov`) per matched axis from a run's QC reference
    (:mod:`femurseg.inference.qc`); None for a run without one (or without those ranges).

    The in-plane axes 1 and 2 always; the slice axis 0 too when ``slab_mm`` (the thickness of the
    central slab the preprocessing keeps, mm) is given: a scan thicker than that slab by
    :data:`FOV_MATCH_FACTOR` gets a slab placed on the femur instead of the central one (never
    padded: a thinner scan is taken as it is)."""
    ranges = (reference or {}).get("ranges") or {}
    out = {}
    for ax in (0, *INPLANE_AXES):
        fov, cen = ranges.get(f"fov_mm_{ax}"), ranges.get(f"label_centroid_{ax}")
        if not fov or not cen:
            if ax == 0:
                continue
            return None
        lo, hi, centre = float(fov[0]), float(fov[1]), 0.5 * (float(cen[0]) + float(cen[1]))
        if ax == 0:
            if slab_mm is None or not slab_mm > 0:
                continue
            mid = 0.5 * (lo + hi)  # the centroid relative to the central slab of the training scans
            centre = min(max((centre * mid - 0.5 * (mid - slab_mm)) / slab_mm, 0.0), 1.0) if mid > slab_mm else centre
            width = float(min(slab_mm, hi))
            out[ax] = AxisFov(0.0, width, width, centre)
            continue
        out[ax] = AxisFov(lo, hi, 0.5 * (lo + hi), centre)
    return out


def _matched(n: int, spacing: float, f: AxisFov) -> bool:
    """True when ``n`` voxels of ``spacing`` mm are outside the training field of view's bounds."""
    fov = n * spacing
    return fov > FOV_MATCH_FACTOR * f.widest or fov * FOV_MATCH_FACTOR < f.narrowest


def needs_matching(shape: Sequence[int], spacing: Sequence[float], train_fov: TrainFov | None) -> bool:
    """True when an in-plane axis of a scan of ``shape`` voxels at ``spacing`` mm is wider than
    :data:`FOV_MATCH_FACTOR` x the widest training field of view, or narrower than the narrowest
    divided by it."""
    if not train_fov:
        return False
    return any(_matched(int(shape[ax]), spacing[ax], f) for ax, f in train_fov.items())


def _window_size(shape: Sequence[int], spacing: Sequence[float], train_fov: TrainFov, ax: int) -> int:
    """Voxels of the matched window along ``ax`` (the whole axis where it needs no matching)."""
    n = int(shape[ax])
    if not _matched(n, spacing[ax], train_fov[ax]):
        return n
    return max(2, int(round(train_fov[ax].middle / spacing[ax])))


def fov_window(shape: Sequence[int], spacing: Sequence[float], centroid: Sequence[float],
               train_fov: TrainFov) -> Window:
    """The in-plane window (canonical index slices) of the training field of view that puts
    ``centroid`` (voxel indices, canonical axes) at the training labels' relative position; a
    window smaller than the scan is shifted inside it, a larger one so that it covers the scan.
    Axes that need no matching keep their whole extent."""
    window = [slice(0, int(shape[0])), slice(0, int(shape[1])), slice(0, int(shape[2]))]
    for ax in train_fov:
        n, size = int(shape[ax]), _window_size(shape, spacing, train_fov, ax)
        if size == n:
            continue
        start = int(round(centroid[ax] - train_fov[ax].centre * (size - 1)))
        start = min(max(start, 0), n - size) if size < n else min(max(start, n - size), 0)
        window[ax] = slice(start, start + size)
    return tuple(window)  # type: ignore[return-value]


def _inside(window: Window, shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """``(in the window, in the scan)`` index slices of the part of ``window`` inside the scan."""
    src, dst = [], []
    for w, n in zip(window, shape):
        lo, hi = max(w.start, 0), min(w.stop, int(n))
        src.append(slice(lo - w.start, hi - w.start))
        dst.append(slice(lo, hi))
    return tuple(src), tuple(dst)


def extract(image: np.ndarray, window: Window) -> np.ndarray:
    """The voxels of ``window``; beyond the scan its border voxels repeated (edge padding)."""
    _, dst = _inside(window, image.shape)
    pads = [(max(0, -w.start), max(0, w.stop - int(n))) for w, n in zip(window, image.shape)]
    inner = image[dst]
    return np.ascontiguousarray(np.pad(inner, pads, mode="edge") if any(a or b for a, b in pads) else inner)


def paste(probs: Sequence[np.ndarray], window: Window, base: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each window probability (``window`` sized, or ``(C, ...)``) placed, where the window lies
    inside the scan, into a copy of the matching scan-sized map of ``base``."""
    out = []
    for p, b in zip(probs, base):
        src, dst = _inside(window, b.shape[-3:])
        full = np.array(b, dtype=np.float32, copy=True)
        full[(Ellipsis, *dst)] = p[(Ellipsis, *src)]
        out.append(full)
    return out


def _mean(probs: Sequence[np.ndarray]) -> np.ndarray:
    """The maps' mean (the ensemble's probability)."""
    return np.mean(probs, axis=0) if len(probs) > 1 else probs[0]


def _centroids(prob: np.ndarray, most: int = 1) -> list[tuple[float, ...]]:
    """Centroids (voxel indices) of :func:`femur_components` of ``prob >= 0.5`` (6-connected,
    up to ``most``, largest first)."""
    parts = femur_components(foreground_probability(prob) >= 0.5, most, connectivity=6)
    return [tuple(float(c) for c in ndimage.center_of_mass(part)) for part in parts]


def tiled_probabilities(image: np.ndarray, spacing: Sequence[float], train_fov: TrainFov,
                        probabilities: Callable[[np.ndarray], list[np.ndarray]]) -> list[np.ndarray]:
    """``probabilities`` of ``image`` computed in windows of the training field of view covering
    it (overlap :data:`TILE_OVERLAP`; along an axis narrower than the window, one window centred
    on the scan), blended with Gaussian weights along the matched axes
    (:func:`femurseg.inference.tiling.gaussian_weights`, as nnU-Net's sliding window)."""
    import itertools

    from femurseg.inference.tiling import gaussian_weights, tile_starts

    shape = tuple(int(n) for n in image.shape)
    sizes = [_window_size(shape, spacing, train_fov, ax) if ax in train_fov else shape[ax] for ax in range(3)]
    weight = np.ones((1, 1, 1), np.float32)
    for ax, size in enumerate(sizes):
        w1 = gaussian_weights((size,)).numpy() if size != shape[ax] else np.ones(size, np.float32)
        weight = weight * w1.reshape([size if a == ax else 1 for a in range(3)])
    starts = [tile_starts(shape[ax], size, TILE_OVERLAP) if size <= shape[ax] else [(shape[ax] - size) // 2]
              for ax, size in enumerate(sizes)]
    acc: list[np.ndarray] | None = None
    total = np.zeros(shape, np.float32)
    for corner in itertools.product(*starts):
        win = tuple(slice(c, c + size) for c, size in zip(corner, sizes))
        src, dst = _inside(win, shape)  # type: ignore[arg-type]
        probs = probabilities(extract(image, win))  # type: ignore[arg-type]
        if acc is None:
            acc = [np.zeros(p.shape[:-3] + shape, np.float32) for p in probs]
        for a, p in zip(acc, probs):
            a[(Ellipsis, *dst)] += (weight * p)[(Ellipsis, *src)]
        total[dst] += weight[src]
    assert acc is not None
    return [a / total for a in acc]


def _settled_window(image: np.ndarray, spacing: Sequence[float], train_fov: TrainFov,
                    probabilities: Callable[[np.ndarray], list[np.ndarray]], centroid: Sequence[float]
                    ) -> tuple[Window, list[np.ndarray]]:
    """The window placed on the femur at ``centroid`` and its probabilities, moved onto the
    window's own femur while it moves by more than :data:`SETTLE_MM` (at most :data:`MAX_PASSES`)."""
    window = fov_window(image.shape, spacing, centroid, train_fov)
    probs = probabilities(extract(image, window))
    for _ in range(MAX_PASSES - 1):
        found = _centroids(_mean(probs))
        if not found:
            break
        c = tuple(ci + w.start for ci, w in zip(found[0], window))
        new = fov_window(image.shape, spacing, c, train_fov)
        if all(abs(new[ax].start - window[ax].start) * spacing[ax] <= SETTLE_MM for ax in train_fov):
            break
        window, probs = new, probabilities(extract(image, new))
    return window, probs


def matched_probabilities(image: np.ndarray, spacing: Sequence[float], train_fov: TrainFov | None,
                          probabilities: Callable[[np.ndarray], list[np.ndarray]],
                          ) -> tuple[list[np.ndarray], list[Window]]:
    """Probabilities of ``image`` (canonical ``(A, I, L)``, ``spacing`` mm) segmented in windows
    of the training field of view (see the module docstring).

    Args:
        image: the scan.
        spacing: its voxel size (mm).
        train_fov: :func:`training_field_of_view` of the run (None: no matching).
        probabilities: ``image -> [probability maps]`` on any window of the scan (one map per
            fold model, or the ensemble's alone); their mean locates the femur.

    Returns:
        The maps on the scan's grid, and the matched windows, one per femur found (up to
        :data:`MAX_FEMURS`, largest first; empty: the whole scan was segmented as it is, because it
        needs no matching, or the tiles alone, when they found nothing).
    """
    if not needs_matching(image.shape, spacing, train_fov):
        return probabilities(image), []
    assert train_fov is not None
    tiles = tiled_probabilities(image, spacing, train_fov, probabilities)
    found = _centroids(_mean(tiles), MAX_FEMURS)
    matched = [_settled_window(image, spacing, train_fov, probabilities, c) for c in found]
    out = tiles
    for window, probs in reversed(matched):  # the largest femur's window last: it wins where they overlap
        out = paste(probs, window, out)
    return out, [w for w, _ in matched]
