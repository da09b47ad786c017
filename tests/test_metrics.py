"""femurseg.evaluation.metrics: hand-computed cases, an independent brute-force oracle, and MONAI."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from helpers import ball
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage
from scipy.spatial.distance import cdist

from femurseg.evaluation import metrics as M

SP = (1.5, 0.234, 0.234)  # the paper's MR spacing (mm, canonical axes)


# ----------------------------------------------------------------------------- oracles


def brute_force_distances(pred, ref, spacing):
    """Surface = mask XOR binary_erosion(mask) (MONAI's rule), all-pairs distances."""
    def surf(m):
        return m & ~ndimage.binary_erosion(m)  # face structure, outside = background
    sp_, sr = surf(pred), surf(ref)
    a = np.argwhere(sp_) * np.asarray(spacing)
    b = np.argwhere(sr) * np.asarray(spacing)
    return cdist(a, b).min(axis=1), cdist(b, a).min(axis=1)


def blob(rng, shape, sigma=2.0):
    x = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return x > np.quantile(x, rng.uniform(0.5, 0.9))


def monai_surface(pred, ref, spacing):
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_hausdorff_distance,
    )

    p = torch.from_numpy(pred)[None, None].float()
    r = torch.from_numpy(ref)[None, None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        asd = compute_average_surface_distance(p, r, include_background=True, symmetric=True, spacing=spacing)
        hd = compute_hausdorff_distance(p, r, include_background=True, spacing=spacing)
        hd95 = compute_hausdorff_distance(p, r, include_background=True, spacing=spacing, percentile=95)
    return {"asd": asd.item(), "msd": hd.item(), "hd95": hd95.item()}


# ----------------------------------------------------------------------------- overlap


def test_confusion_and_overlap_hand_computed():
    pred = np.array([1, 1, 1, 0, 0, 0], bool).reshape(1, 1, 6)
    ref = np.array([0, 1, 1, 1, 0, 0], bool).reshape(1, 1, 6)
    assert M.confusion(pred, ref) == (2, 1, 1, 2)
    o = M.overlap_metrics(pred, ref)
    assert o == pytest.approx({"dsc": 4 / 6, "precision": 2 / 3, "recall": 2 / 3, "specificity": 2 / 3})


def test_overlap_accepts_uint8_labels_as_foreground():
    pred = np.array([[0, 1], [2, 0]], np.uint8)
    ref = np.array([[0, 1], [1, 0]], np.uint8)
    assert M.overlap_metrics(pred, ref)["dsc"] == 1.0


@pytest.mark.parametrize(
    "pred_fill, ref_fill, expected",
    [
        (None, None, {"dsc": 1.0, "precision": 1.0, "recall": 1.0, "specificity": 1.0}),  # both empty
        (None, "half", {"dsc": 0.0, "precision": 0.0, "recall": 0.0, "specificity": 1.0}),  # empty prediction
        ("half", None, {"dsc": 0.0, "precision": 0.0, "recall": 0.0, "specificity": 0.5}),  # empty reference
        ("all", "all", {"dsc": 1.0, "precision": 1.0, "recall": 1.0, "specificity": 1.0}),  # both full
        ("half", "all", {"dsc": 2 / 3, "precision": 1.0, "recall": 0.5, "specificity": 0.0}),  # no ref background
    ],
)
def test_overlap_edge_cases(pred_fill, ref_fill, expected):
    def make(fill):
        m = np.zeros((2, 2, 4), bool)
        if fill == "half":
            m[..., :2] = True
        elif fill == "all":
            m[:] = True
        return m

    assert M.overlap_metrics(make(pred_fill), make(ref_fill)) == pytest.approx(expected)


def test_dice_matches_monai():
    import torch
    from monai.metrics import compute_dice

    rng = np.random.default_rng(1)
    for _ in range(5):
        p, r = blob(rng, (10, 16, 18)), blob(rng, (10, 16, 18))
        expected = compute_dice(torch.from_numpy(p)[None, None].float(), torch.from_numpy(r)[None, None].float(),
                                include_background=True).item()
        assert M.overlap_metrics(p, r)["dsc"] == pytest.approx(expected, abs=1e-6)
    # the empty-pair rule is MONAI's ignore_empty=False
    z = torch.zeros(1, 1, 3, 4, 5)
    assert compute_dice(z, z, include_background=True, ignore_empty=False).item() == 1.0
    assert M.overlap_metrics(np.zeros((3, 4, 5), bool), np.zeros((3, 4, 5), bool))["dsc"] == 1.0


def test_rejects_float_masks_and_shape_mismatch():
    with pytest.raises(ValueError, match="threshold it first"):
        M.overlap_metrics(np.zeros((3, 3), np.float32), np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="shapes differ"):
        M.overlap_metrics(np.zeros((3, 3), bool), np.zeros((3, 4), bool))
    with pytest.raises(ValueError, match="spacing"):
        M.surface_metrics(np.ones((3, 3, 3), bool), np.ones((3, 3, 3), bool), (1.0, 1.0))


# ----------------------------------------------------------------------------- surfaces (hand)


def test_surface_voxels_definition_touching_border():
    m = np.ones((3, 4, 4), bool)
    s = M.surface_voxels(m)
    # outside the array is background: only the 4 voxels not on any face are interior
    assert s.sum() == 48 - 4
    assert not s[1, 1:3, 1:3].any()


def test_single_voxels_anisotropic():
    sp = (2.0, 0.5, 1.0)
    ref = np.zeros((5, 5, 5), bool)
    ref[1, 1, 1] = True
    pred = np.zeros_like(ref)
    pred[3, 1, 1] = True
    assert M.surface_metrics(pred, ref, sp) == pytest.approx({"asd": 4.0, "msd": 4.0, "hd95": 4.0})
    pred = np.zeros_like(ref)
    pred[1, 3, 2] = True  # 2 rows x 0.5 mm, 1 column x 1 mm
    assert M.surface_metrics(pred, ref, sp)["asd"] == pytest.approx(math.sqrt(2.0))


def test_lines_hand_computed():
    sp = (2.0, 0.5, 1.0)
    ref = np.zeros((5, 5, 5), bool)
    ref[2, 2, 0:5] = True
    pred = np.zeros_like(ref)
    pred[2, 2, 0:3] = True
    pred[4, 2, 4] = True
    d_pr, d_rp = M.surface_distances(pred, ref, sp)
    np.testing.assert_allclose(d_pr, [0, 0, 0, 4.0])  # C order of pred's surface voxels
    np.testing.assert_allclose(d_rp, [0, 0, 0, 1.0, 2.0])
    s = M.surface_metrics(pred, ref, sp)
    assert s["asd"] == pytest.approx(7 / 9)
    assert s["msd"] == pytest.approx(4.0)
    # MONAI hd95: max of directed linear-interpolated 95th percentiles: 3.4 and 1.8
    assert s["hd95"] == pytest.approx(3.4)


def test_shifted_cubes_hand_computed():
    sp = (1.5, 0.5, 0.5)
    ref = np.zeros((9, 8, 8), bool)
    ref[2:6, 2:6, 2:6] = True
    pred = np.zeros_like(ref)
    pred[3:7, 2:6, 2:6] = True  # shifted one slice (1.5 mm)
    d_pr, d_rp = M.surface_distances(pred, ref, sp)
    # 36 side voxels coincide, 4 bottom-face voxels inside ref are 0.5 mm from a side, 16 top-face at 1.5 mm
    for d in (d_pr, d_rp):
        assert d.size == 56
        assert np.sort(d).tolist() == pytest.approx([0.0] * 36 + [0.5] * 4 + [1.5] * 16)
    s = M.surface_metrics(pred, ref, sp)
    assert s == pytest.approx({"asd": 52 / 112, "msd": 1.5, "hd95": 1.5})


def test_mask_touching_border_hand_computed_and_monai():
    sp = (1.5, 0.5, 1.0)
    ref = np.ones((3, 4, 4), bool)  # fills the array: 44 surface voxels
    pred = ref.copy()
    pred[2] = False  # 32 voxels, all on the surface
    d_pr, d_rp = M.surface_distances(pred, ref, sp)
    assert sorted(d_pr.tolist()) == pytest.approx([0.0] * 28 + [0.5] * 4)
    assert sorted(d_rp.tolist()) == pytest.approx([0.0] * 28 + [1.5] * 16)
    s = M.surface_metrics(pred, ref, sp)
    assert s["asd"] == pytest.approx(26 / 76)
    assert s["msd"] == pytest.approx(1.5)
    m = monai_surface(pred, ref, sp)
    assert s == pytest.approx(m, abs=1e-3)


def test_2d_square_hand_computed():
    sp = (0.5, 2.0)
    ref = np.zeros((6, 6), bool)
    ref[1:4, 1:4] = True
    pred = np.zeros_like(ref)
    pred[1:4, 2:5] = True  # shifted one column (2 mm)
    d_pr, d_rp = M.surface_distances(pred, ref, sp)
    # pred surface: 8 of 9 voxels; the shifted right column (3 voxels) is 2 mm from ref's right column;
    # pred's left column (col 2) lies in ref (centre voxel (2,2) is ref-interior: 0.5 mm to row 1)
    assert sorted(d_pr.tolist()) == pytest.approx([0, 0, 0, 0, 0.5, 2, 2, 2])
    assert sorted(d_rp.tolist()) == pytest.approx([0, 0, 0, 0, 0.5, 2, 2, 2])
    assert M.surface_metrics(pred, ref, sp) == pytest.approx(
        {"asd": 2 * 6.5 / 16, "msd": 2.0, "hd95": 2.0}
    )


@pytest.mark.parametrize("method", ["shell", "edt"])
def test_surface_empty_masks(method):
    e = np.zeros((4, 5, 6), bool)
    m = e.copy()
    m[1:3, 1:4, 1:5] = True
    assert M.surface_metrics(e, e, SP, method=method) == {"asd": 0.0, "msd": 0.0, "hd95": 0.0}
    assert M.surface_metrics(e, m, SP, method=method) == {"asd": math.inf, "msd": math.inf, "hd95": math.inf}
    assert M.surface_metrics(m, e, SP, method=method) == {"asd": math.inf, "msd": math.inf, "hd95": math.inf}
    d_pr, d_rp = M.surface_distances(e, m, SP, method=method)
    assert d_pr.size == 0 and d_rp.size == M.surface_voxels(m).sum() and np.isinf(d_rp).all()
    d_pr, d_rp = M.surface_distances(e, e, SP, method=method)
    assert d_pr.size == 0 and d_rp.size == 0


def test_monai_differs_only_on_both_empty():
    # documented differences: MONAI returns nan for an empty pair (we: 0.0); with one empty mask it
    # returns inf for asd/msd like us but nan for hd95 (torch.quantile of inf values; we: inf)
    e = np.zeros((4, 5, 6), bool)
    m = e.copy()
    m[1:3, 1:4, 1:5] = True
    assert all(math.isnan(v) for v in monai_surface(e, e, SP).values())
    for a, b in ((e, m), (m, e)):
        theirs = monai_surface(a, b, SP)
        assert math.isinf(theirs["asd"]) and math.isinf(theirs["msd"]) and math.isnan(theirs["hd95"])


# ----------------------------------------------------------------------------- surfaces (oracle, MONAI)


def test_shell_matches_brute_force_and_edt_on_random_blobs():
    rng = np.random.default_rng(2)
    for i in range(12):
        nd = 2 if i % 4 == 0 else 3
        shape = (14, 18) if nd == 2 else (8, 14, 16)
        sp = tuple(rng.uniform(0.2, 2.0, nd))
        p, r = blob(rng, shape), blob(rng, shape)
        bp, br = brute_force_distances(p, r, sp)
        sp_, sr_ = M.surface_distances(p, r, sp)
        ep, er = M.surface_distances(p, r, sp, method="edt")
        np.testing.assert_allclose(sp_, bp, atol=1e-9)
        np.testing.assert_allclose(sr_, br, atol=1e-9)
        np.testing.assert_allclose(ep, bp, atol=1e-4)  # edt works in float32
        np.testing.assert_allclose(er, br, atol=1e-4)


def test_far_apart_masks_use_exact_fallback():
    # distances far beyond the shell radius (~1.7 mm at SP) go through the k-d tree
    shape = (20, 60, 60)
    ref = ball(shape, centre=(5, 15, 15), radius=3.0, spacing=SP)
    pred = ball(shape, centre=(14, 45, 40), radius=4.0, spacing=SP)
    pred |= ball(shape, centre=(6, 16, 17), radius=2.0, spacing=SP)  # a near part too
    bp, br = brute_force_distances(pred, ref, SP)
    d_pr, d_rp = M.surface_distances(pred, ref, SP)
    assert bp.max() > 10
    np.testing.assert_allclose(d_pr, bp, atol=1e-9)
    np.testing.assert_allclose(d_rp, br, atol=1e-9)


def test_surface_metrics_match_monai_random_blobs_anisotropic():
    rng = np.random.default_rng(3)
    for i in range(8):
        nd = 2 if i == 0 else 3
        shape = (20, 24) if nd == 2 else (10, 24, 20)
        sp = SP[-nd:] if i % 2 else tuple(rng.uniform(0.2, 2.0, nd))
        p, r = blob(rng, shape), blob(rng, shape)
        ours = M.surface_metrics(p, r, sp)
        theirs = monai_surface(p, r, sp)
        assert ours == pytest.approx(theirs, abs=1e-3), (i, ours, theirs)


def test_surface_metrics_match_monai_ellipsoids():
    shape = (16, 80, 70)
    ref = ball(shape, centre=(8, 40, 35), radius=8.0, spacing=SP)
    pred = ball(shape, centre=(7.6, 41, 34), radius=8.5, spacing=SP)
    pred[2, 5, 5] = True  # an outlier voxel far away sets the Hausdorff distance
    ours = M.surface_metrics(pred, ref, SP)
    theirs = monai_surface(pred, ref, SP)
    assert ours == pytest.approx(theirs, abs=1e-3)
    assert ours["msd"] > 5


mask3 = arrays(bool, (4, 5, 6), elements=st.booleans())


@settings(max_examples=60, deadline=None)
@given(a=mask3, b=mask3)
def test_properties_dsc_and_surface_symmetry(a, b):
    o_ab, o_ba = M.overlap_metrics(a, b), M.overlap_metrics(b, a)
    assert 0.0 <= o_ab["dsc"] <= 1.0
    assert o_ab["dsc"] == pytest.approx(o_ba["dsc"])
    assert o_ab["precision"] == pytest.approx(o_ba["recall"])
    s_ab, s_ba = M.surface_metrics(a, b, SP), M.surface_metrics(b, a, SP)
    assert s_ab == pytest.approx(s_ba)
    if np.array_equal(a, b):
        assert s_ab == {"asd": 0.0, "msd": 0.0, "hd95": 0.0}
    if a.any() and b.any():
        bp, br = brute_force_distances(a, b, SP)
        d_pr, d_rp = M.surface_distances(a, b, SP)
        np.testing.assert_allclose(d_pr, bp, atol=1e-9)
        np.testing.assert_allclose(d_rp, br, atol=1e-9)
        assert 0.0 <= s_ab["asd"] <= s_ab["msd"] + 1e-12
        assert s_ab["hd95"] <= s_ab["msd"] + 1e-12


# ----------------------------------------------------------------------------- volumes


def test_volume_cm3():
    m = np.zeros((12, 12, 12), bool)
    m[1:11, 1:11, 1:11] = True
    assert M.volume_cm3(m, SP) == pytest.approx(1000 * 1.5 * 0.234 * 0.234 / 1000)
    assert M.volume_cm3(np.zeros((2, 2, 2), np.uint8), (1, 1, 1)) == 0.0


def test_volume_errors_hand_computed():
    v = M.volume_errors([10.0, 12.0], [11.0, 10.0])
    assert v["mae"] == pytest.approx(1.5)
    assert v["rmse"] == pytest.approx(math.sqrt(2.5))
    assert v["bias"] == pytest.approx(0.5)
    np.testing.assert_allclose(v["re_pct"], [100 / 11, 20.0])
    assert v["re_mean_pct"] == pytest.approx((100 / 11 + 20) / 2)
    assert v["re_min_pct"] == pytest.approx(100 / 11)
    assert v["re_max_pct"] == pytest.approx(20.0)
    assert v["n"] == 2
    with pytest.raises(ValueError):
        M.volume_errors([1.0], [1.0, 2.0])


# ----------------------------------------------------------------------------- ROC / PR

PROB = np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.4])
LAB = np.array([1, 1, 0, 1, 0, 0])


def test_curves_hand_computed():
    c = M.roc_pr_curves(PROB, LAB)
    np.testing.assert_array_equal(c["thresholds"], PROB)
    np.testing.assert_array_equal(c["tp"], [1, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(c["fp"], [0, 0, 1, 1, 2, 3])
    np.testing.assert_allclose(c["tpr"], [1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    np.testing.assert_allclose(c["fpr"], [0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(c["precision"], [1, 1, 2 / 3, 3 / 4, 3 / 5, 1 / 2])
    assert M.roc_auc(PROB, LAB) == pytest.approx(8 / 9)
    # step-wise AP: 1/3 * 1 + 1/3 * 1 + 0 * 2/3 + 1/3 * 3/4
    assert M.average_precision(PROB, LAB) == pytest.approx(11 / 12)


def test_curves_with_ties_and_degenerate_refs():
    prob = np.array([[0.5, 0.5], [0.2, 0.2]])
    ref = np.array([[1, 0], [1, 0]])
    assert M.roc_auc(prob, ref) == pytest.approx(0.5)
    assert M.average_precision(prob, ref) == pytest.approx(0.5)
    assert math.isnan(M.roc_auc(prob, np.zeros_like(ref)))
    assert math.isnan(M.average_precision(prob, np.zeros_like(ref)))
    assert math.isnan(M.roc_auc(prob, np.ones_like(ref)))
    with pytest.raises(ValueError, match="nan"):
        M.roc_auc(np.array([0.1, np.nan]), np.array([0, 1]))


def test_auc_matches_monai():
    import torch
    from monai.metrics import compute_roc_auc

    rng = np.random.default_rng(4)
    for _ in range(3):
        ref = rng.random(3000) < 0.3
        prob = np.clip(rng.normal(0.35 + 0.3 * ref, 0.2), 0, 1).round(2)  # rounding makes ties
        expected = compute_roc_auc(torch.from_numpy(prob), torch.from_numpy(ref.astype(np.float64)))
        assert M.roc_auc(prob, ref) == pytest.approx(float(expected), abs=1e-12)


def test_ap_matches_a_direct_loop():
    rng = np.random.default_rng(5)
    ref = rng.random(500) < 0.4
    prob = rng.random(500).round(2)
    ap = 0.0
    prev_r = 0.0
    for t in sorted(set(prob.tolist()), reverse=True):
        sel = prob >= t
        tp = np.sum(sel & ref)
        r, p = tp / ref.sum(), tp / sel.sum()
        ap += (r - prev_r) * p
        prev_r = r
    assert M.average_precision(prob, ref) == pytest.approx(ap, abs=1e-12)


def test_pooled_and_histogram_curves():
    rng = np.random.default_rng(6)
    cases = [(rng.integers(0, 1001, (4, 5, 6)) / 1000.0, rng.random((4, 5, 6)) < 0.3) for _ in range(3)]
    probs = [c[0] for c in cases]
    refs = [c[1] for c in cases]
    pooled = M.roc_pr_curves(probs, refs)
    flat = M.roc_pr_curves(np.concatenate([p.ravel() for p in probs]), np.concatenate([r.ravel() for r in refs]))
    for k in ("thresholds", "tp", "fp"):
        np.testing.assert_array_equal(pooled[k], flat[k])
    # values on the k/1000 grid: the 1001-bin histogram is exact
    h = M.roc_pr_curves(probs, refs, n_bins=1001)
    assert M.roc_auc(probs, refs, n_bins=1001) == pytest.approx(M.roc_auc(probs, refs), abs=1e-12)
    assert M.average_precision(probs, refs, n_bins=1001) == pytest.approx(M.average_precision(probs, refs), abs=1e-12)
    idx = np.searchsorted(-h["thresholds"], -pooled["thresholds"])
    np.testing.assert_array_equal(h["tp"][idx], pooled["tp"])
    np.testing.assert_array_equal(h["fp"][idx], pooled["fp"])
    # summing per-case counts is the same as pooling
    counts = [M.histogram_counts(p, r, 1001) for p, r in cases]
    c2 = M.curves_from_counts(sum(c[0] for c in counts), sum(c[1] for c in counts))
    np.testing.assert_array_equal(c2["tp"], h["tp"])


def test_histogram_bins_are_exact_at_grid_edges():
    prob = np.array([0.0, 0.1, 0.3, 0.7, 1.0, 0.29999999])
    pos, neg = M.histogram_counts(prob, np.array([1, 1, 1, 0, 0, 0]), n_bins=11)
    assert pos.tolist() == [1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    assert neg.tolist() == [0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 1]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.histogram_counts(np.array([1.5]), np.array([1]), 11)


# ----------------------------------------------------------------------------- per case


def test_evaluate_case_row():
    ref = ball((10, 30, 30), radius=3.0, spacing=SP)
    pred = ball((10, 30, 30), centre=(4.5, 15, 14), radius=3.0, spacing=SP)
    row = M.evaluate_case(pred, ref, SP)
    assert set(row) == {"dsc", "precision", "recall", "specificity", "asd_mm", "msd_mm", "hd95_mm",
                        "vol_pred_cm3", "vol_ref_cm3", "vol_diff_cm3"}
    assert row["dsc"] == pytest.approx(M.overlap_metrics(pred, ref)["dsc"])
    assert row["asd_mm"] == pytest.approx(M.surface_metrics(pred, ref, SP)["asd"])
    assert row["vol_diff_cm3"] == pytest.approx(row["vol_pred_cm3"] - row["vol_ref_cm3"])
    prob = np.where(pred, 0.8, 0.1) + 0.05 * ref
    row = M.evaluate_case(pred, ref, SP, prob=prob)
    assert row["auc"] == pytest.approx(M.roc_auc(prob, ref))
    assert row["ap"] == pytest.approx(M.average_precision(prob, ref))


def test_evaluate_labels_compartments():
    ref = np.zeros((6, 20, 20), np.uint8)
    ref[1:5, 4:16, 4:16] = 2
    ref[1:5, 6:14, 6:14] = 1
    pred = ref.copy()
    pred[1:5, 6:14, 6] = 2  # the endosteal surface moves inwards by one column
    row = M.evaluate_labels(pred, ref, SP)
    assert row["periosteal_dsc"] == 1.0 and row["periosteal_asd_mm"] == 0.0
    assert row["endosteal_dsc"] == pytest.approx(M.overlap_metrics(pred == 1, ref == 1)["dsc"])
    assert row["cortical_dsc"] == pytest.approx(M.overlap_metrics(pred == 2, ref == 2)["dsc"])
    assert row["endosteal_asd_mm"] == pytest.approx(M.surface_metrics(pred == 1, ref == 1, SP)["asd"])
    assert row["endosteal_asd_mm"] > 0
    custom = M.evaluate_labels(pred, ref, SP, labels={"bone": (1, 2)})
    assert set(custom) == {f"bone_{k}" for k in ("dsc", "precision", "recall", "asd_mm", "msd_mm", "hd95_mm",
                                                   "vol_pred_cm3", "vol_ref_cm3")}
