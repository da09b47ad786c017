"""ROC and precision-recall curves of probability maps against binary references.

The basis of paper 001's threshold rule (:mod:`femurseg.inference.thresholds`: the point of the
pooled out-of-fold PR curve closest to (recall 1, precision 1)) and of the AUC / AP metrics
(:mod:`femurseg.evaluation.metrics`). Exact curves (one point per distinct probability) by
:func:`roc_pr_curves`, or binned ones from voxel counts (:func:`histogram_counts`,
:func:`curves_from_counts`) that pool many cases in constant memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _prob_ref_pairs(prob: Any, ref: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """Normalise one array pair or two equal-length sequences of arrays into flat pairs."""
    if isinstance(prob, np.ndarray) or np.isscalar(prob):
        probs, refs = [prob], [ref]
    else:
        probs, refs = list(prob), list(ref)
        if isinstance(ref, np.ndarray):
            raise ValueError("prob is a sequence of cases but ref is a single array")
    if len(probs) != len(refs):
        raise ValueError(f"got {len(probs)} probability maps but {len(refs)} references")
    if not probs:
        raise ValueError("no cases given")
    out = []
    for i, (pa, ra) in enumerate(zip(probs, refs)):
        pa, ra = np.asarray(pa), np.asarray(ra)
        if pa.shape != ra.shape:
            raise ValueError(f"case {i}: prob shape {pa.shape} != ref shape {ra.shape}")
        if not np.issubdtype(pa.dtype, np.floating):
            pa = pa.astype(np.float64)
        if np.isnan(pa).any():
            raise ValueError(f"case {i}: probability map contains nan")
        out.append((pa.ravel(), (ra != 0).ravel()))
    return out


def histogram_counts(prob: np.ndarray, ref: np.ndarray, n_bins: int = 1001) -> tuple[np.ndarray, np.ndarray]:
    """Per-threshold-bin counts ``(pos, neg)`` (int64, length ``n_bins``) for pooled curves.

    Bin ``k`` holds the voxels with ``t_k <= prob < t_{k+1}`` where ``t_k = k / (n_bins - 1)``
    (the last bin holds ``prob == 1``). Counts of several cases can be summed and
    passed to :func:`curves_from_counts`; the result is exact at the grid thresholds.
    ``prob`` must lie in [0, 1]. Comparisons use the map's own precision (for a
    float32 map, ``t_k`` rounded to float32, exactly as ``prob >= t_k`` rounds it).
    """
    if n_bins < 2:
        raise ValueError(f"n_bins must be >= 2, got {n_bins}")
    ((p, r),) = _prob_ref_pairs(prob, ref)
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError("histogram curves need probabilities in [0, 1]")
    # work in the map's own precision: the grid is rounded to it exactly as ``prob >= t`` would round t
    dt = p.dtype if p.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    p = p.astype(dt, copy=False)
    grid = (np.arange(n_bins, dtype=np.float64) / (n_bins - 1)).astype(dt)
    k = (p * dt.type(n_bins - 1)).astype(np.int64)  # truncation = floor for p >= 0
    np.minimum(k, n_bins - 1, out=k)
    k -= grid[k] > p  # repair rounding so that grid[k] <= p < grid[k + 1] holds exactly
    k += (k < n_bins - 1) & (grid[np.minimum(k + 1, n_bins - 1)] <= p)
    k += r * n_bins  # one bincount for both classes
    counts = np.bincount(k, minlength=2 * n_bins).astype(np.int64)
    return counts[n_bins:], counts[:n_bins]


def _curves(thr: np.ndarray, tp: np.ndarray, fp: np.ndarray, n_pos: int, n_neg: int) -> dict[str, Any]:
    tp = tp.astype(np.int64)
    fp = fp.astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = tp / n_pos if n_pos else np.full(tp.shape, np.nan)
        fpr = fp / n_neg if n_neg else np.full(fp.shape, np.nan)
        n_sel = tp + fp
        precision = np.where(n_sel > 0, tp / np.maximum(n_sel, 1), 1.0)
    return {
        "thresholds": thr,
        "tp": tp,
        "fp": fp,
        "fpr": fpr,
        "tpr": tpr,
        "precision": precision,
        "recall": tpr,
        "n_pos": int(n_pos),
        "n_neg": int(n_neg),
    }


def curves_from_counts(pos: np.ndarray, neg: np.ndarray) -> dict[str, Any]:
    """ROC/PR curves from (summed) :func:`histogram_counts` output.

    Same keys as :func:`roc_pr_curves`; thresholds ``k / (n_bins - 1)`` in
    decreasing order. Where no voxel is selected (``tp + fp == 0``) precision is 1.0.
    """
    pos = np.asarray(pos, dtype=np.int64)
    neg = np.asarray(neg, dtype=np.int64)
    n_bins = pos.size
    thr = (np.arange(n_bins, dtype=np.float64) / (n_bins - 1))[::-1]
    tp = np.cumsum(pos[::-1])
    fp = np.cumsum(neg[::-1])
    return _curves(thr, tp, fp, int(pos.sum()), int(neg.sum()))


def roc_pr_curves(prob: Any, ref: Any, n_bins: int | None = None) -> dict[str, Any]:
    """ROC and precision-recall curves of a probability map against a reference mask.

    ``prob``/``ref``: one pair of equal-shape arrays, or two sequences of arrays
    (cases pooled voxel-wise). A voxel is positive at threshold ``t`` iff ``prob >= t``.

    ``n_bins=None`` (default): exact, one operating point per distinct probability
    value (sorting, O(N log N); about 1 s per 1e7 voxels); cases are reduced to
    (distinct value, positive count, negative count) one at a time and merged, so
    memory grows with the number of distinct values, not voxels. ``n_bins=int``:
    the thresholds ``k / (n_bins - 1)`` via histograms accumulated case by case,
    exact at those thresholds (constant memory; for pooling many large cases).

    Returns a dict with 1-D arrays ordered by decreasing threshold: ``thresholds``,
    ``tp``, ``fp``, ``fpr``, ``tpr``, ``precision``, ``recall`` (= ``tpr``), plus
    ``n_pos``, ``n_neg``. The curves do not contain the (fpr, tpr) = (0, 0) point of
    an infinite threshold; the last point (lowest threshold) selects every voxel.
    ``tpr``/``recall`` are nan if there is no positive voxel, ``fpr`` if no negative.
    """
    pairs = _prob_ref_pairs(prob, ref)
    if n_bins is not None:
        pos = np.zeros(int(n_bins), dtype=np.int64)
        neg = np.zeros(int(n_bins), dtype=np.int64)
        for p, r in pairs:
            cp, cn = histogram_counts(p, r, int(n_bins))
            pos += cp
            neg += cn
        return curves_from_counts(pos, neg)
    acc = None
    for p, r in pairs:  # exact counts per distinct value, merged case by case (no concatenation)
        part = _value_counts(p, r)
        acc = part if acc is None else _merge_counts(acc, part)
    values, pos, neg = acc
    if values.size == 0:
        raise ValueError("empty probability map")
    return _curves(values[::-1].copy(), np.cumsum(pos[::-1]), np.cumsum(neg[::-1]), int(pos.sum()), int(neg.sum()))


def _run_lengths(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of a sorted array and how often each occurs."""
    if a.size == 0:
        return np.zeros(0, np.float64), np.zeros(0, np.int64)
    start = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
    return a[start].astype(np.float64), np.diff(np.r_[start, a.size]).astype(np.int64)


def _merge_counts(
    a: tuple[np.ndarray, np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge two ``(ascending distinct values, pos_counts, neg_counts)`` triples (linear merge)."""
    if a[0].size < b[0].size:
        a, b = b, a
    total = a[0].size + b[0].size
    ins = np.searchsorted(a[0], b[0], side="left") + np.arange(b[0].size)  # b's slots in the merged order
    from_a = np.ones(total, dtype=bool)
    from_a[ins] = False
    merged = []
    for xa, xb in zip(a, b):
        out = np.empty(total, dtype=np.result_type(xa, xb))
        out[ins] = xb
        out[from_a] = xa
        merged.append(out)
    v, pos, neg = merged
    if total == 0:
        return v, pos, neg
    start = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
    return v[start], np.add.reduceat(pos, start), np.add.reduceat(neg, start)


def _value_counts(p: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ascending distinct values of ``p`` (float64) with the number of positive / negative voxels."""
    vp, cp = _run_lengths(np.sort(p[r]))
    vn, cn = _run_lengths(np.sort(p[~r]))
    return _merge_counts((vp, cp, np.zeros_like(cp)), (vn, np.zeros_like(cn), cn))
