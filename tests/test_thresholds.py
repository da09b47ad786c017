"""femurseg.inference.thresholds: hand-computed operating points, Otsu, and spec parsing."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.filters import threshold_otsu

from femurseg.core.errors import FemursegError
from femurseg.inference import thresholds as T

# operating points (prob >= t), P = 3 positives, N = 3 negatives:
#   t     tp fp  precision recall  tpr-fpr  dist^2 to (1, 1)
#   0.9   1  0   1         1/3     1/3      4/9
#   0.8   2  0   1         2/3     2/3      1/9
#   0.7   2  1   2/3       2/3     1/3      2/9
#   0.6   3  1   3/4       1       2/3      1/16   <- PR choice
#   0.55  3  2   3/5       1       1/3      4/25
#   0.4   3  3   1/2       1       0        1/4
PROB = np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.4])
LAB = np.array([1, 1, 0, 1, 0, 0])


def test_pr_threshold_hand_computed():
    assert T.pr_threshold(PROB, LAB) == 0.6
    m = T.binarize(PROB, 0.6)
    assert m.tolist() == [True, True, True, True, False, False]


def test_youden_threshold_hand_computed_tie_goes_to_highest():
    # J = 2/3 at both 0.8 and 0.6: the higher threshold is returned
    assert T.youden_threshold(PROB, LAB) == 0.8
    assert T.youden_threshold(PROB[1:], LAB[1:]) == 0.6  # without 0.9: J(0.8)=1/2 < J(0.6)=2/3


def test_thresholds_pool_cases_and_histogram_grid():
    a, b = PROB[:3].reshape(1, 3), PROB[3:].reshape(3, 1)
    la, lb = LAB[:3].reshape(1, 3), LAB[3:].reshape(3, 1)
    assert T.pr_threshold([a, b], [la, lb]) == 0.6
    assert T.youden_threshold([a, b], [la, lb]) == 0.8
    # on a coarse grid the thresholds are multiples of 1/(n_bins-1) reproducing the same masks
    assert T.pr_threshold(PROB, LAB, n_bins=21) == pytest.approx(0.6)
    assert T.youden_threshold(PROB, LAB, n_bins=21) == pytest.approx(0.8)


def test_thresholds_need_both_classes():
    with pytest.raises(ValueError, match="no foreground"):
        T.pr_threshold(PROB, np.zeros_like(LAB))
    with pytest.raises(ValueError, match="both"):
        T.youden_threshold(PROB, np.ones_like(LAB))


def test_otsu_threshold():
    rng = np.random.default_rng(0)
    prob = np.concatenate([rng.beta(1, 20, 5000), rng.beta(20, 1, 1000)]).astype(np.float32).reshape(60, 100)
    t = T.otsu_threshold(prob)
    assert t == pytest.approx(float(threshold_otsu(prob)))
    assert 0.2 < t < 0.8
    assert T.otsu_threshold(np.zeros((4, 4), np.float32)) == 0.5


def test_resolve_threshold_specs():
    stored = {"pr": 0.47, "youden": 0.31}
    assert T.resolve_threshold(0.3) == 0.3
    assert T.resolve_threshold(1) == 1.0
    assert T.resolve_threshold("0.25") == 0.25
    assert T.resolve_threshold(" PR ", stored) == 0.47
    assert T.resolve_threshold("youden", stored) == 0.31
    prob = np.array([[0.05, 0.1], [0.9, 0.95]], np.float32)
    assert T.resolve_threshold("otsu", None, prob) == pytest.approx(T.otsu_threshold(prob))


def test_resolve_threshold_errors():
    with pytest.raises(FemursegError, match="no stored 'pr' threshold \\(stored: youden\\)"):
        T.resolve_threshold("pr", {"youden": 0.31})
    with pytest.raises(FemursegError, match="no stored 'youden' threshold \\(stored: none\\)"):
        T.resolve_threshold("youden", None)
    with pytest.raises(FemursegError, match="runs/x/thresholds.json: expected a number"):
        T.resolve_threshold("roc", {"pr": 0.5}, source="runs/x/thresholds.json")
    with pytest.raises(FemursegError, match="in \\[0, 1\\]"):
        T.resolve_threshold(1.5)
    with pytest.raises(FemursegError, match="in \\[0, 1\\]"):
        T.resolve_threshold("nan")
    with pytest.raises(FemursegError):
        T.resolve_threshold(True)
    with pytest.raises(ValueError, match="probability map"):
        T.resolve_threshold("otsu")
