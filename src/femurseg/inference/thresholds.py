"""Decision thresholds on probability maps (the papers' rules) and how to apply them.

* ``pr``: the point of the precision-recall curve closest (Euclidean) to
  precision = recall = 1 (001, "to prevent under- and over-segmentation").
* ``youden``: maximises Youden's J = sensitivity + specificity - 1 on the ROC (004).
* ``otsu``: Otsu's threshold of one case's probability map (003).

A voxel is foreground iff ``prob >= threshold`` (:func:`binarize`); the ``pr`` and
``youden`` thresholds are actual probability values at which the chosen operating
point is reached under exactly that rule. They are computed on the pooled voxels
of all given cases (lists of per-case arrays), by default exactly over the
distinct probability values (sorting; fine up to a few 1e8 voxels), or with
``n_bins`` on the grid ``k / (n_bins - 1)`` (histograms accumulated per case,
no concatenation). Ties between operating points (compared exactly, in rationals
of the voxel counts) go to the highest threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

import numpy as np

from femurseg.core.errors import FemursegError
from femurseg.inference.curves import roc_pr_curves

__all__ = ["METHODS", "binarize", "foreground_probability", "otsu_threshold", "pr_threshold", "resolve_threshold", "youden_threshold"]

#: Named threshold rules accepted by :func:`resolve_threshold`.
METHODS: tuple[str, ...] = ("pr", "youden", "otsu")


def foreground_probability(prob: np.ndarray) -> np.ndarray:
    """Femur probability from a binary map (``shape``) or class probabilities ``(C, *shape)``
    (one minus the background's: any femur class)."""
    return 1.0 - prob[0] if prob.ndim == 4 else prob


def binarize(prob: np.ndarray, threshold: float) -> np.ndarray:
    """The mask of a probability map at ``threshold``: ``prob >= threshold`` (bool)."""
    return np.asarray(prob) >= threshold


def _argmin_exact(approx: np.ndarray, exact: Callable[[int], Fraction]) -> int:
    """Index of the minimum of ``approx``, with near-ties (1e-9 relative) re-ranked by the
    exact rational value ``exact(i)``; remaining exact ties go to the lowest index."""
    best = float(np.min(approx))
    cand = np.flatnonzero(approx <= best + 1e-9 * max(1.0, abs(best)))
    if cand.size == 1:
        return int(cand[0])
    return min((int(i) for i in cand), key=lambda i: (exact(i), i))


def pr_threshold(probs: Any, refs: Any, n_bins: int | None = None) -> float:
    """Threshold of the PR-curve point nearest to (precision, recall) = (1, 1) (001).

    ``probs``/``refs``: one probability map and reference mask, or sequences of
    them (pooled). Raises ``ValueError`` if the references contain no foreground.
    """
    c = roc_pr_curves(probs, refs, n_bins=n_bins)
    if c["n_pos"] == 0:
        raise ValueError("pr_threshold: the reference masks contain no foreground voxel")
    dist2 = (1.0 - c["precision"]) ** 2 + (1.0 - c["recall"]) ** 2
    tp, fp, n_pos = c["tp"], c["fp"], c["n_pos"]

    def exact(i: int) -> Fraction:  # (1 - P)^2 + (1 - R)^2 in rationals
        sel = int(tp[i]) + int(fp[i])
        one_minus_p = Fraction(int(fp[i]), sel) if sel else Fraction(0)
        return one_minus_p**2 + Fraction(n_pos - int(tp[i]), n_pos) ** 2

    return float(c["thresholds"][_argmin_exact(dist2, exact)])


def youden_threshold(probs: Any, refs: Any, n_bins: int | None = None) -> float:
    """Threshold maximising Youden's J = TPR - FPR on the ROC curve.

    Same inputs as :func:`pr_threshold`. Raises ``ValueError`` if the references
    lack foreground or background voxels.
    """
    c = roc_pr_curves(probs, refs, n_bins=n_bins)
    if c["n_pos"] == 0 or c["n_neg"] == 0:
        raise ValueError("youden_threshold: the reference masks need both foreground and background voxels")
    tp, fp, n_pos, n_neg = c["tp"], c["fp"], c["n_pos"], c["n_neg"]
    i = _argmin_exact(-(c["tpr"] - c["fpr"]), lambda i: Fraction(int(fp[i]), n_neg) - Fraction(int(tp[i]), n_pos))
    return float(c["thresholds"][i])


def otsu_threshold(prob: np.ndarray, nbins: int = 256) -> float:
    """Otsu's threshold of one probability map (003), ``skimage.filters.threshold_otsu``.

    Uses a ``nbins`` histogram of the map's values. Otsu is undefined for a
    constant map; 0.5 is returned then (so a map of zeros gives an empty mask).
    """
    from skimage.filters import threshold_otsu

    p = np.asarray(prob)
    if p.size == 0:
        raise ValueError("otsu_threshold: empty probability map")
    lo, hi = float(p.min()), float(p.max())
    if lo == hi:
        return 0.5
    return float(threshold_otsu(p, nbins=nbins))


def resolve_threshold(
    spec: str | float,
    stored: Mapping[str, float] | None = None,
    prob: np.ndarray | None = None,
    source: str = "--threshold",
) -> float:
    """Turn a threshold specification into a number in [0, 1].

    ``spec``: a number (or numeric string) used as is; ``'pr'`` / ``'youden'``:
    the value stored with the run (``stored``, e.g. ``{"pr": 0.47, "youden": 0.31}``);
    ``'otsu'``: :func:`otsu_threshold` of ``prob`` (this case's map). ``source``
    names the option or file in error messages.

    Raises :class:`FemursegError` for an unknown spec, a number outside [0, 1],
    or ``'pr'``/``'youden'`` when the run has no such stored threshold; raises
    ``ValueError`` if ``'otsu'`` is asked without ``prob`` (a programming error).
    """
    if isinstance(spec, bool):
        raise FemursegError(f"{source}: expected a number in [0, 1] or one of {', '.join(METHODS)}, got {spec!r}")
    if isinstance(spec, (int, float, np.integer, np.floating)):
        value = float(spec)
    else:
        key = str(spec).strip().lower()
        if key in ("pr", "youden"):
            if not stored or key not in stored or stored[key] is None:
                have = ", ".join(sorted(k for k, v in (stored or {}).items() if v is not None)) or "none"
                raise FemursegError(
                    f"{source}: the run has no stored '{key}' threshold (stored: {have}); "
                    f"use a number or one of {', '.join(k for k in METHODS if k != key)}"
                )
            value = float(stored[key])
        elif key == "otsu":
            if prob is None:
                raise ValueError("resolve_threshold('otsu') needs the case's probability map")
            return otsu_threshold(prob)
        else:
            try:
                value = float(key)
            except ValueError:
                raise FemursegError(
                    f"{source}: expected a number in [0, 1] or one of {', '.join(METHODS)}, got {spec!r}"
                ) from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise FemursegError(f"{source}: threshold must be in [0, 1], got {spec!r}")
    return value
