"""Field-of-view matching: segment a scan wider than the training scans in windows of the
training field of view.

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
   :data:`MAX_PASSES` windows);
3. inside that window its probabilities, outside it the tiles' (where the femur leaves the window,
   e.g. more shaft; what lies outside and is not connected to the femur is removed by the
   largest-component post-processing).

Only in-plane axes (rows = inferior, columns = left, canonical axes 1 and 2) are matched, and only
along an axis where the scan is more than :data:`FOV_MATCH_FACTOR` times the widest training field
of view; the slice axis is already matched by the preprocessing's central slab (``crop_mm``). Scans
of the training field of view are segmented exactly as without matching.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

FOV_MODES = ("match", "full")
"""``--fov``: match (a window of the training field of view for wider scans) or full (the whole scan)."""

FOV_MATCH_FACTOR = 1.15
"""Match an axis only where the scan's field of view exceeds the widest training one by this factor."""

MAX_PASSES = 2
"""Matched windows segmented at most (after the tiles), until the window settles."""

TILE_OVERLAP = 0.5
"""Overlap of neighbouring tiles (fraction of the window)."""

SETTLE_MM = 3.0
"""The window has settled when its corner moves by at most this much (mm) between passes."""

INPLANE_AXES = (1, 2)

Window = tuple[slice, slice, slice]


def training_field_of_view(reference: Mapping[str, Any] | None) -> dict[int, tuple[float, float, float]] | None:
    """Per in-plane axis ``(widest training field of view in mm, its middle in mm, the label
    centroid's relative position)`` from a run's QC reference (:mod:`femurseg.inference.qc`);
    None for a run without one (or without those ranges)."""
    ranges = (reference or {}).get("ranges") or {}
    out = {}
    for ax in INPLANE_AXES:
        fov, cen = ranges.get(f"fov_mm_{ax}"), ranges.get(f"label_centroid_{ax}")
        if not fov or not cen:
            return None
        out[ax] = (float(fov[1]), 0.5 * (float(fov[0]) + float(fov[1])), 0.5 * (float(cen[0]) + float(cen[1])))
    return out


def needs_matching(shape: Sequence[int], spacing: Sequence[float],
                   train_fov: Mapping[int, tuple[float, float, float]] | None) -> bool:
    """True when an in-plane axis of a scan of ``shape`` voxels at ``spacing`` mm is wider than
    :data:`FOV_MATCH_FACTOR` x the widest training field of view."""
    if not train_fov:
        return False
    return any(shape[ax] * spacing[ax] > FOV_MATCH_FACTOR * train_fov[ax][0] for ax in INPLANE_AXES)


def fov_window(shape: Sequence[int], spacing: Sequence[float], centroid: Sequence[float],
               train_fov: Mapping[int, tuple[float, float, float]]) -> Window:
    """The in-plane window (canonical index slices) of the training field of view that puts
    ``centroid`` (voxel indices, canonical axes) at the training labels' relative position,
    shifted inside the scan where it would leave it. Axes that need no matching keep their
    whole extent."""
    window = [slice(0, int(shape[0])), slice(0, int(shape[1])), slice(0, int(shape[2]))]
    for ax in INPLANE_AXES:
        n, rel, size = int(shape[ax]), train_fov[ax][2], _window_size(shape, spacing, train_fov, ax)
        if size == n:
            continue
        start = int(round(centroid[ax] - rel * (size - 1)))
        start = min(max(start, 0), n - size)
        window[ax] = slice(start, start + size)
    return tuple(window)  # type: ignore[return-value]


def _foreground(prob: np.ndarray) -> np.ndarray:
    """Femur probability from a binary map ``shape`` or class probabilities ``(C, *shape)``."""
    return 1.0 - prob[0] if prob.ndim == 4 else prob


def _centroid(prob: np.ndarray) -> tuple[float, ...] | None:
    """Centroid (voxel indices) of the largest component of ``prob >= 0.5``; None when empty."""
    lab, n = ndimage.label(_foreground(prob) >= 0.5)
    if n == 0:
        return None
    largest = 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
    return tuple(float(c) for c in ndimage.center_of_mass(lab == largest))


def paste(probs: Sequence[np.ndarray], window: Window, base: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each window probability (``shape`` or ``(C, *shape)``) placed into a copy of the matching
    scan-sized map of ``base``."""
    out = []
    for p, b in zip(probs, base):
        full = np.array(b, dtype=np.float32, copy=True)
        full[(Ellipsis, *window)] = p
        out.append(full)
    return out


def _window_size(shape: Sequence[int], spacing: Sequence[float],
                 train_fov: Mapping[int, tuple[float, float, float]], ax: int) -> int:
    """Voxels of the matched window along ``ax`` (the whole axis where it needs no matching)."""
    n = int(shape[ax])
    if n * spacing[ax] <= FOV_MATCH_FACTOR * train_fov[ax][0]:
        return n
    return min(n, max(2, int(round(train_fov[ax][1] / spacing[ax]))))


def tiled_probabilities(image: np.ndarray, spacing: Sequence[float],
                        train_fov: Mapping[int, tuple[float, float, float]],
                        probabilities: Callable[[np.ndarray], list[np.ndarray]]) -> list[np.ndarray]:
    """``probabilities`` of ``image`` computed in windows of the training field of view covering
    it (overlap :data:`TILE_OVERLAP`), blended with in-plane Gaussian weights
    (:func:`femurseg.inference.tiling.gaussian_weights`, as nnU-Net's sliding window)."""
    from femurseg.inference.tiling import gaussian_weights, tile_starts

    sizes = [_window_size(image.shape, spacing, train_fov, ax) for ax in INPLANE_AXES]
    weight = gaussian_weights(sizes).numpy()[None]  # (1, rows, cols): broadcast over the slices
    starts = [tile_starts(int(image.shape[ax]), size, TILE_OVERLAP) for ax, size in zip(INPLANE_AXES, sizes)]
    acc: list[np.ndarray] | None = None
    total = np.zeros(image.shape, np.float32)
    for r in starts[0]:
        for c in starts[1]:
            win = (slice(None), slice(r, r + sizes[0]), slice(c, c + sizes[1]))
            probs = probabilities(np.ascontiguousarray(image[win]))
            if acc is None:
                acc = [np.zeros(p.shape[:-3] + image.shape, np.float32) for p in probs]
            for a, p in zip(acc, probs):
                a[(Ellipsis, *win)] += weight * p
            total[win] += weight
    assert acc is not None
    return [a / total for a in acc]


def matched_probabilities(image: np.ndarray, spacing: Sequence[float],
                          train_fov: Mapping[int, tuple[float, float, float]] | None,
                          probabilities: Callable[[np.ndarray], list[np.ndarray]],
                          ) -> tuple[list[np.ndarray], Window | None]:
    """Probabilities of ``image`` (canonical ``(A, I, L)``, ``spacing`` mm) segmented in windows
    of the training field of view (see the module docstring).

    Args:
        image: the scan.
        spacing: its voxel size (mm).
        train_fov: :func:`training_field_of_view` of the run (None: no matching).
        probabilities: ``image -> [probability maps]`` on any sub-volume of the scan (one map per
            fold model, or the ensemble's alone); their mean locates the femur.

    Returns:
        The maps on the scan's grid, and the matched window (None: the whole scan was segmented
        as it is, because it needs no matching; or the tiles alone, when they found nothing).
    """
    if not needs_matching(image.shape, spacing, train_fov):
        return probabilities(image), None
    assert train_fov is not None
    tiles = tiled_probabilities(image, spacing, train_fov, probabilities)
    probs, window = tiles, None
    for _ in range(MAX_PASSES):
        c = _centroid(np.mean(probs, axis=0) if len(probs) > 1 else probs[0])
        if c is None:
            break
        if window is not None:
            c = tuple(ci + w.start for ci, w in zip(c, window))
        new = fov_window(image.shape, spacing, c, train_fov)
        if window is not None and all(abs(new[ax].start - window[ax].start) * spacing[ax] <= SETTLE_MM
                                      for ax in INPLANE_AXES):
            break
        window = new
        probs = probabilities(np.ascontiguousarray(image[window]))
    if window is None:
        return tiles, None
    return paste(probs, window, tiles), window
