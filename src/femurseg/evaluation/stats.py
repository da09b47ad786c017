"""Statistics for comparing models over cases: Wilcoxon + Holm, summaries, Bland-Altman.

Paper 001, Table 4: paired-sample Wilcoxon signed-rank test between every pair of
models with Holm's step-down correction for multiple comparisons, reported as
``ns`` (p >= 0.05), ``*`` (p < 0.05), ``**`` (p < 0.01), ``***`` (p < 0.001).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "bland_altman",
    "format_mean_sd",
    "format_median_iqr",
    "holm",
    "stars",
    "summarise",
    "wilcoxon_holm",
]


def stars(p: float) -> str:
    """Significance stars of 001 Table 4: ``'***'`` p < 0.001, ``'**'`` p < 0.01,
    ``'*'`` p < 0.05, else ``'ns'`` (also for nan: no evidence of a difference)."""
    if p is None or not math.isfinite(float(p)) or p >= 0.05:
        return "ns"
    if p < 0.001:
        return "***"
    if p < 0.01:
        return "**"
    return "*"


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values, in the input order.

    With the m finite p-values sorted ascending, ``p_adj(i) = max_{j <= i} min(1, (m - j) p_(j))``
    (0-based j), so adjusted values are monotone in the raw ones and never exceed 1.
    nan entries stay nan and do not count towards m.
    """
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adj)
    return out


def wilcoxon_holm(
    table: Mapping[str, Sequence[float]],
    alternative: str = "two-sided",
    pairs: Sequence[tuple[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """Paired Wilcoxon signed-rank tests between models, Holm-corrected (001 Table 4).

    ``table`` maps a model name to its per-case values; all arrays must have the
    same length and the same case order (paired). ``pairs`` defaults to every
    pair ``(a, b)`` in the table's order (a before b). ``alternative`` is passed to
    ``scipy.stats.wilcoxon`` for the differences ``a - b``.

    Per pair, cases where the difference is nan (a value missing, or inf - inf)
    are dropped; infinite differences (e.g. ASD = inf for an empty prediction) are
    kept and rank highest. Zero differences are discarded (scipy's default
    ``zero_method='wilcox'``); if every difference is zero the row gets
    ``statistic = 0.0`` and ``p = 1.0``; with no usable case, ``p = nan``.
    Holm's correction runs over all rows with a finite p.

    Returns one dict per pair: ``model_a``, ``model_b``, ``n`` (cases used),
    ``statistic``, ``p``, ``p_holm``, ``stars`` (from ``p_holm``).
    """
    from scipy import stats as _stats

    names = list(table)
    data = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in table.items()}
    lengths = {k: v.size for k, v in data.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"paired values must have equal lengths per model, got {lengths}")
    if pairs is None:
        pairs = list(itertools.combinations(names, 2))
    rows: list[dict[str, Any]] = []
    for a, b in pairs:
        if a not in data or b not in data:
            raise ValueError(f"unknown model in pair ({a!r}, {b!r}); known: {names}")
        with np.errstate(invalid="ignore"):
            d = data[a] - data[b]
        d = d[~np.isnan(d)]
        n = int(d.size)
        if n == 0:
            stat, p = math.nan, math.nan
        elif np.all(d == 0):
            stat, p = 0.0, 1.0
        else:
            res = _stats.wilcoxon(d, alternative=alternative)
            stat, p = float(res.statistic), float(res.pvalue)
        rows.append({"model_a": a, "model_b": b, "n": n, "statistic": stat, "p": p})
    adjusted = holm([r["p"] for r in rows])
    for r, pa in zip(rows, adjusted):
        r["p_holm"] = float(pa)
        r["stars"] = stars(pa)
    return rows


def summarise(values: Sequence[float]) -> dict[str, float]:
    """Summary of per-case values: ``mean``, ``sd`` (ddof=1), ``median``, ``q1``, ``q3``,
    ``n``, ``n_missing``.

    nan entries are missing and excluded (counted in ``n_missing``); +-inf are kept,
    so one case with ASD = inf makes the mean inf while median and quartiles stay
    informative. Quartiles use numpy's default linear interpolation. With n = 0 all
    statistics are nan; with n = 1 ``sd`` is nan.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    missing = np.isnan(v)
    v = v[~missing]
    n = int(v.size)
    out = {"mean": math.nan, "sd": math.nan, "median": math.nan, "q1": math.nan, "q3": math.nan}
    if n:
        with np.errstate(invalid="ignore"):
            out["mean"] = float(np.mean(v))
            out["sd"] = float(np.std(v, ddof=1)) if n > 1 else math.nan
            out["median"] = float(np.median(v))
            out["q1"], out["q3"] = (float(x) for x in np.percentile(v, [25, 75]))
    out["n"] = n
    out["n_missing"] = int(missing.sum())
    return out


def _summary(values_or_summary: Any) -> Mapping[str, float]:
    if isinstance(values_or_summary, Mapping):
        return values_or_summary
    return summarise(values_or_summary)


def format_mean_sd(values_or_summary: Any, digits: int = 3) -> str:
    """``'0.953 ± 0.016'`` from values or a :func:`summarise` dict."""
    s = _summary(values_or_summary)
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def format_median_iqr(values_or_summary: Any, digits: int = 3) -> str:
    """``'0.955 [0.940, 0.965]'`` (median [q1, q3]) from values or a :func:`summarise` dict."""
    s = _summary(values_or_summary)
    return f"{s['median']:.{digits}f} [{s['q1']:.{digits}f}, {s['q3']:.{digits}f}]"


def bland_altman(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Bland-Altman agreement of paired measurements ``a`` and ``b`` (e.g. volumes).

    Differences are ``a - b``. Returns ``mean_diff`` (bias), ``sd_diff`` (ddof=1),
    ``loa_low`` / ``loa_high`` (``mean_diff -+ 1.96 sd_diff``), ``n``, and the
    per-pair arrays ``means`` ((a + b) / 2) and ``diffs`` for plotting. Pairs with
    a nan are dropped.
    """
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    if x.size != y.size:
        raise ValueError(f"a and b differ in length: {x.size} vs {y.size}")
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    d = x - y
    n = int(d.size)
    mean = float(np.mean(d)) if n else math.nan
    sd = float(np.std(d, ddof=1)) if n > 1 else math.nan
    return {
        "mean_diff": mean,
        "sd_diff": sd,
        "loa_low": mean - 1.96 * sd,
        "loa_high": mean + 1.96 * sd,
        "n": n,
        "means": (x + y) / 2.0,
        "diffs": d,
    }
