"""femurseg.evaluation.stats: Holm by hand, Wilcoxon rows against scipy, summaries, Bland-Altman."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from femurseg.evaluation import stats as S


def test_holm_hand_computed_with_monotonicity():
    # sorted: .005 x4 = .02, .01 x3 = .03, .03 x2 = .06, .04 x1 = .04 -> raised to .06 (monotone)
    adj = S.holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adj, [0.03, 0.06, 0.06, 0.02])


def test_holm_caps_at_one_and_skips_nan():
    np.testing.assert_allclose(S.holm([0.5, 0.6]), [1.0, 1.0])
    adj = S.holm([0.01, math.nan, 0.02])
    assert math.isnan(adj[1])
    np.testing.assert_allclose(adj[[0, 2]], [0.02, 0.02])  # m = 2 finite p-values
    assert S.holm([]).size == 0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=12))
def test_holm_properties(p):
    adj = S.holm(p)
    p = np.asarray(p)
    assert np.all(adj >= p - 1e-15) and np.all(adj <= 1.0)
    order = np.argsort(p, kind="stable")
    assert np.all(np.diff(adj[order]) >= -1e-15)  # monotone in the raw p-values


@pytest.mark.parametrize(
    "p, s",
    [(0.2, "ns"), (0.05, "ns"), (0.0499, "*"), (0.01, "*"), (0.0099, "**"), (0.001, "**"), (0.00099, "***"),
     (math.nan, "ns")],
)
def test_stars_thresholds(p, s):
    assert S.stars(p) == s


def test_wilcoxon_holm_rows_match_scipy_and_holm():
    rng = np.random.default_rng(0)
    base = rng.normal(0.95, 0.01, 20)
    table = {"2d": base - 0.01 + rng.normal(0, 0.003, 20), "3d": base,
             "3d-dil": base + 0.004 + rng.normal(0, 0.003, 20)}
    rows = S.wilcoxon_holm(table)
    assert [(r["model_a"], r["model_b"]) for r in rows] == [("2d", "3d"), ("2d", "3d-dil"), ("3d", "3d-dil")]
    raw = []
    for r in rows:
        res = sps.wilcoxon(table[r["model_a"]] - table[r["model_b"]])
        assert r["p"] == pytest.approx(res.pvalue)
        assert r["statistic"] == pytest.approx(res.statistic)
        assert r["n"] == 20
        raw.append(res.pvalue)
    np.testing.assert_allclose([r["p_holm"] for r in rows], S.holm(raw))
    assert [r["stars"] for r in rows] == [S.stars(r["p_holm"]) for r in rows]
    assert rows[0]["stars"] == "***"


def test_wilcoxon_holm_edge_cases():
    a = np.array([1.0, 2.0, 3.0, math.nan, 5.0, 6.0])
    b = np.array([0.5, 1.0, 2.0, 4.0, 4.0, math.inf])
    rows = S.wilcoxon_holm({"a": a, "b": b, "c": a})
    ab, ac, bc = rows
    assert ab["n"] == 5  # the nan case is dropped; the inf difference is kept
    assert ac["statistic"] == 0.0 and ac["p"] == 1.0 and ac["stars"] == "ns"  # identical models
    greater = S.wilcoxon_holm({"a": a[:3], "b": b[:3]}, alternative="greater")[0]
    assert greater["p"] == pytest.approx(sps.wilcoxon(a[:3] - b[:3], alternative="greater").pvalue)
    assert math.isnan(S.wilcoxon_holm({"x": [math.nan], "y": [1.0]})[0]["p"])
    with pytest.raises(ValueError, match="equal lengths"):
        S.wilcoxon_holm({"a": [1, 2], "b": [1, 2, 3]})
    with pytest.raises(ValueError, match="unknown model"):
        S.wilcoxon_holm({"a": [1, 2], "b": [1, 2]}, pairs=[("a", "z")])


def test_summarise_and_format():
    s = S.summarise([1, 2, 3, 4])
    assert s == pytest.approx({"mean": 2.5, "sd": math.sqrt(5 / 3), "median": 2.5, "q1": 1.75, "q3": 3.25,
                               "n": 4, "n_missing": 0})
    assert S.format_mean_sd(s) == "2.500 ± 1.291"
    assert S.format_mean_sd([1, 2, 3, 4], digits=1) == "2.5 ± 1.3"
    assert S.format_median_iqr([1, 2, 3, 4], digits=2) == "2.50 [1.75, 3.25]"
    s = S.summarise([1.0, math.nan, math.inf, 2.0])
    assert s["n"] == 3 and s["n_missing"] == 1 and math.isinf(s["mean"]) and s["median"] == 2.0
    s = S.summarise([])
    assert s["n"] == 0 and math.isnan(s["mean"])
    s = S.summarise([3.0])
    assert s["mean"] == 3.0 and math.isnan(s["sd"])


def test_bland_altman_hand_computed():
    ba = S.bland_altman([1, 2, 3, math.nan], [1, 1, 1, 2])
    assert ba["n"] == 3
    assert ba["mean_diff"] == pytest.approx(1.0)
    assert ba["sd_diff"] == pytest.approx(1.0)
    assert ba["loa_low"] == pytest.approx(-0.96)
    assert ba["loa_high"] == pytest.approx(2.96)
    np.testing.assert_allclose(ba["means"], [1, 1.5, 2])
    np.testing.assert_allclose(ba["diffs"], [0, 1, 2])
