"""Synthetic hip phantoms (femurseg.data.phantom) and the PNG montage (femurseg.core.preview)."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from scipy import ndimage

from femurseg.core.errors import FemursegError
from femurseg.core.preview import save_montage
from femurseg.data import phantom

SMALL = (24, 64, 64)  # 1.5 x 1.875 x 1.875 mm: the default in-plane field of view, fast
TINY = (12, 40, 40)
_CPU_S: dict[str, float] = {}


@pytest.fixture(scope="module")
def mr_cohort() -> list[phantom.PhantomCase]:
    t0 = time.process_time()
    # the geometry checks below use the narrow world's exact ranges (a sphere for a head)
    cases = list(phantom.generate_cohort(2, "mr", seed=3, artefact_fraction=0.0, variation="narrow"))
    _CPU_S["mr_per_case"] = (time.process_time() - t0) / len(cases)
    return cases


@pytest.fixture(scope="module")
def ct_case() -> phantom.PhantomCase:
    return phantom.generate_case(1, modality="ct", artefacts=False)


def _at(case: phantom.PhantomCase, point_mm) -> int:
    idx = np.round(np.asarray(point_mm) / np.asarray(case.spacing)).astype(int)
    return int(case.label[tuple(idx)])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_arrays_other_seed_differs():
    a = phantom.generate_case(5, shape=TINY)
    b = phantom.generate_case(5, shape=TINY)
    c = phantom.generate_case(6, shape=TINY)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert a.meta == b.meta
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.label, c.label)


def test_cohort_case_depends_only_on_seed_and_index():
    short = list(phantom.generate_cohort(1, "mr", seed=7, shape=TINY))
    long = list(phantom.generate_cohort(3, "mr", seed=7, shape=TINY))
    assert np.array_equal(short[0].image, long[0].image) and np.array_equal(short[0].label, long[0].label)
    # meta['seed'] reproduces a single case
    m = long[2].meta
    alone = phantom.generate_case(m["seed"], shape=TINY, side=m["side"], artefacts=m["artefacts"])
    assert np.array_equal(alone.image, long[2].image)
    assert [c.meta["cohort_index"] for c in long] == [0, 1, 2]
    # sides alternate
    assert [c.meta["side"] for c in long][:2] in (["right", "left"], ["left", "right"])


def test_artefacts_keep_the_anatomy_and_the_label():
    clean = phantom.generate_case(11, shape=SMALL, artefacts=False)
    fold = phantom.generate_case(11, shape=SMALL, artefacts=["foldover"])
    cyst = phantom.generate_case(11, shape=SMALL, artefacts=["cyst"])
    assert clean.meta["artefacts"] == [] and fold.meta["artefacts"] == ["foldover"]
    assert cyst.meta["artefacts"] == ["cyst"]
    # "these artifacts do not affect the hand segmentation": same label, other image
    assert np.array_equal(clean.label, fold.label) and np.array_equal(clean.label, cyst.label)
    assert not np.array_equal(clean.image, fold.image)
    # the cyst is hypointense inside the femur
    c = np.round(np.asarray(cyst.meta["cyst"]["centre_mm"]) / np.asarray(cyst.spacing)).astype(int)
    win = tuple(slice(max(0, i - 1), i + 2) for i in c)
    assert cyst.label[tuple(c)] == 1
    assert cyst.image[win].mean() < 0.7 * clean.image[win].mean()
    # artefacts=None draws them with the given probability
    assert phantom.generate_case(11, shape=TINY, artefact_fraction=0.0).meta["artefacts"] == []
    assert phantom.generate_case(11, shape=TINY, artefact_fraction=1.0).meta["artefacts"] != []


def test_user_errors_are_femurseg_errors():
    with pytest.raises(FemursegError, match="modality"):
        phantom.generate_case(0, modality="pet")
    with pytest.raises(FemursegError, match="foldover"):
        phantom.generate_case(0, modality="ct", artefacts=["foldover"])
    with pytest.raises(FemursegError, match="side"):
        phantom.generate_case(0, side="middle")
    with pytest.raises(FemursegError, match="seed"):
        phantom.generate_case(-1)
    with pytest.raises(FemursegError, match="spacing"):
        phantom.generate_case(0, spacing=(1.5, 0.0, 1.0))


# ----------------------------------------------------------------------------- labels


def test_mr_label_sanity(mr_cohort):
    for case in mr_cohort:
        assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
        assert case.image.shape == case.label.shape == phantom.DEFAULT_SHAPE
        assert case.spacing == phantom.DEFAULT_SPACING
        assert np.isfinite(case.image).all() and case.image.min() >= 0.0  # magnitude image
        assert set(np.unique(case.label)) == {0, 1}
        _, n = ndimage.label(case.label > 0)
        assert n == 1
        vol = np.count_nonzero(case.label) * np.prod(case.spacing) / 1000.0
        assert 30.0 < vol < 150.0
        assert vol == pytest.approx(case.meta["label_volume_cm3"])


def test_both_sides_occur_and_are_mirrored(mr_cohort):
    sides = {c.meta["side"] for c in mr_cohort}
    assert sides == {"left", "right"}
    for c in mr_cohort:
        head, shaft = c.meta["head_centre_mm"], c.meta["neck_shaft_point_mm"]
        # columns run patient right -> left: a right hip's head is medial = towards higher columns
        assert (head[2] > shaft[2]) == (c.meta["side"] == "right")
        assert head[1] < shaft[1]  # the head is above the shaft (rows run superior -> inferior)


def test_meta_geometry_matches_the_label(mr_cohort, ct_case):
    for c in [*mr_cohort, ct_case]:
        m = c.meta
        json.dumps(m)  # serialisable as it is
        for key in ("head_centre_mm", "greater_trochanter_centre_mm", "lesser_trochanter_centre_mm"):
            assert _at(c, m[key]) > 0, key
        n, s = np.asarray(m["neck_axis"]), np.asarray(m["shaft_axis"])
        assert np.linalg.norm(n) == pytest.approx(1.0) and np.linalg.norm(s) == pytest.approx(1.0)
        assert s[1] > 0.9  # the shaft points distally (down the rows)
        assert 120.0 <= m["neck_shaft_angle_deg"] <= 140.0
        assert math.degrees(math.acos(n @ s)) == pytest.approx(m["neck_shaft_angle_deg"], abs=1e-6)
        # anteversion: the neck turns anteriorly out of the coronal plane about the shaft axis
        perp = n - (n @ s) * s
        av = math.degrees(math.atan2(perp[0], abs(perp[2])))
        assert 5.0 <= m["anteversion_deg"] <= 25.0
        assert av == pytest.approx(m["anteversion_deg"], abs=5.0)
        # the head radius: inside at R - 2 mm, outside at R + 2 mm (away from the neck)
        rng = np.random.default_rng(0)
        dirs = rng.normal(size=(200, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        dirs = dirs[dirs @ n > 0.2]  # the half of the head opposite the neck
        h, r = np.asarray(m["head_centre_mm"]), m["head_radius_mm"]
        inside = [_at(c, h + (r - 2.0) * d) > 0 for d in dirs]
        outside = [_at(c, h + (r + 2.0) * d) == 0 for d in dirs]
        assert np.mean(inside) > 0.97 and np.mean(outside) > 0.97
        # the neck-shaft intersection lies on the neck axis at neck_length_mm from the head centre
        p = np.asarray(m["neck_shaft_point_mm"])
        assert np.linalg.norm(h - m["neck_length_mm"] * n - p) < 1e-6


def test_ct_labels_and_hounsfield_units(ct_case):
    img, lab = ct_case.image, ct_case.label
    assert ct_case.spacing == phantom.CT_DEFAULT_SPACING and lab.shape == phantom.CT_DEFAULT_SHAPE
    assert set(np.unique(lab)) == {0, 1, 2}
    _, n = ndimage.label(lab > 0)
    assert n == 1
    # the cortex surrounds the trabecular bone: label 1 never touches background
    assert not (ndimage.binary_dilation(lab == 0) & (lab == 1)).any()
    cort = np.count_nonzero(lab == 2) / np.count_nonzero(lab)
    assert 0.1 < cort < 0.6
    assert ct_case.meta["cortical_volume_cm3"] + ct_case.meta["trabecular_volume_cm3"] == pytest.approx(
        ct_case.meta["label_volume_cm3"])
    assert img.min() >= -1024 and img.max() <= 3071
    assert np.median(img[lab == 2]) > 700  # cortical bone (partial volume lowers the 1200-1800 HU)
    # trabecular bone of the head: 150-400 HU on average
    h = np.asarray(ct_case.meta["head_centre_mm"]) / np.asarray(ct_case.spacing)
    r = (ct_case.meta["head_radius_mm"] - 4.0) / np.asarray(ct_case.spacing)
    grid = np.ogrid[tuple(slice(0, s) for s in lab.shape)]
    ball = sum(((g - c) / rr) ** 2 for g, c, rr in zip(grid, h, r)) < 1.0
    assert 120 < img[ball & (lab == 1)].mean() < 450
    # soft tissue: muscle about 40 HU, air -1000
    assert img[lab == 0].min() < -900


def test_bilateral_ct_has_one_femur_per_side():
    c = phantom.generate_case(2, modality="ct", bilateral=True, shape=(32, 64, 160), artefacts=False)
    assert c.meta["side"] == "bilateral" and [f["side"] for f in c.meta["femurs"]] == ["right", "left"]
    assert c.spacing == (1.0, 2.0, 2.0)  # the bilateral field of view, 128 x 320 mm in plane
    lab, n = ndimage.label(c.label > 0)
    assert n == 2
    mid = c.label.shape[2] / 2
    cols = [np.nonzero(lab == k)[2].mean() for k in (1, 2)]
    assert min(cols) < mid < max(cols)
    right = c.meta["femurs"][0]
    assert right["head_centre_mm"][2] < c.meta["body"]["midline_mm"]  # patient right = low columns


def test_bilateral_mr_shows_both_hips_in_a_pelvic_field_of_view():
    c = phantom.generate_case(3, modality="mr", bilateral=True, shape=(24, 64, 160), artefacts=False)
    assert c.meta["side"] == "bilateral" and [f["side"] for f in c.meta["femurs"]] == ["right", "left"]
    assert c.spacing == (1.5, 1.875, 1.875)  # 120 x 300 mm in plane
    assert phantom.default_shape("mr", bilateral=True) == phantom.MR_BILATERAL_SHAPE
    lab, n = ndimage.label(c.label > 0)
    assert n == 2
    cols = [np.nonzero(lab == k)[2].mean() for k in (1, 2)]
    assert min(cols) < c.label.shape[2] / 2 < max(cols)
    # both femurs show marrow brighter than the muscle around them, as a unilateral MR phantom does
    for k in (1, 2):
        femur = lab == k
        ring = ndimage.binary_dilation(femur, iterations=4) & ~ndimage.binary_dilation(femur, iterations=2)
        assert np.median(c.image[femur]) > np.median(c.image[ring])


def test_threshold_does_not_segment_the_mr_femur(mr_cohort):
    """Fatty marrow is as bright as fat: no global threshold gives the femur (Dice < 0.9)."""
    for case in mr_cohort:
        fg = case.label > 0
        thresholds = np.percentile(case.image, np.linspace(50, 99.5, 40))
        best = max(_dice(case.image > t, fg) for t in thresholds)
        assert best < 0.8


def test_paper_geometry_from_shape_alone():
    sp = phantom.fov_spacing(phantom.PAPER_SHAPE)
    assert sp == pytest.approx(phantom.PAPER_SPACING, abs=1e-3)
    assert phantom.fov_spacing(phantom.DEFAULT_SHAPE) == phantom.DEFAULT_SPACING
    assert phantom.generate_case(0, shape=TINY).spacing == (1.5, 3.0, 3.0)


def test_generation_time_is_reasonable(mr_cohort):
    """A sanity bound, not a benchmark (about 1 s of CPU per default MR case on one core)."""
    assert _CPU_S["mr_per_case"] < 15.0


# ----------------------------------------------------------------------------- montage


def test_montage_writes_a_png(tmp_path, mr_cohort, ct_case):
    case = mr_cohort[0]
    out = tmp_path / "m.png"
    shown = save_montage(case.image, case.label, out, n_slices=4, title="mr", spacing=case.spacing)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    z = np.nonzero(case.label.any(axis=(1, 2)))[0]
    assert len(shown) == 4 and all(z[0] <= k <= z[-1] for k in shown)
    # CT label, boolean mask + probability map, image only
    save_montage(ct_case.image, ct_case.label, tmp_path / "ct.png", spacing=ct_case.spacing)
    prob = (case.label > 0).astype(np.float32) * 0.8
    save_montage(case.image, case.label > 0, tmp_path / "p.png", n_slices=2, prob=prob)
    save_montage(case.image, None, tmp_path / "i.png", n_slices=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.png", "i.png", "m.png", "p.png"]  # no temp files
    with pytest.raises(FemursegError, match="shape"):
        save_montage(case.image, case.label[:-1], tmp_path / "bad.png")
    with pytest.raises(FemursegError, match="does not exist"):
        save_montage(case.image, None, tmp_path / "missing" / "x.png")


# ----------------------------------------------------------------------------- worlds and shifts


def test_worlds_share_draws_and_record_their_name():
    """The wide world changes the anatomy and the look of a seed, the narrow world is the
    generator's original one, and both say which world they come from."""
    nar = phantom.generate_case(21, shape=SMALL, variation="narrow", artefacts=False)
    wide = phantom.generate_case(21, shape=SMALL, artefacts=False)  # MR default: wide
    again = phantom.generate_case(21, shape=SMALL, variation=phantom.variation("wide"), artefacts=False)
    assert nar.meta["variation"] == "narrow" and wide.meta["variation"] == "wide"
    np.testing.assert_array_equal(wide.image, again.image)
    assert not np.array_equal(nar.image, wide.image)
    lo, hi = phantom.variation("narrow").ranges["head_radius"]
    assert lo <= nar.meta["head_radius_mm"] <= hi
    assert nar.meta["head_aspect"] == 1.0 and nar.meta["femur_roll_deg"] == [0.0, 0.0, 0.0]
    assert phantom.generate_case(21, shape=SMALL, modality="ct", artefacts=False).meta["variation"] == "narrow"


@pytest.mark.parametrize("group", list(phantom.SHIFTS))
def test_each_shift_moves_its_factors_beyond_the_narrow_world(group):
    nar = phantom.variation("narrow")
    sh = phantom.variation("narrow", group)
    assert sh.name == f"narrow+{group}"
    for key, (lo, hi) in phantom.SHIFTS[group].items():
        assert sh.ranges[key] == (lo, hi)
        nlo, nhi = nar.ranges[key]
        assert hi > nhi or lo < nlo, key  # reaches outside the narrow range
    others = set(nar.ranges) - set(phantom.SHIFTS[group])
    assert all(sh.ranges[k] == nar.ranges[k] for k in others)


def test_shifted_case_draws_inside_its_shifted_ranges():
    case = phantom.generate_case(4, shape=SMALL, variation=phantom.variation("narrow", ["head", "noise_bias"]),
                                 artefacts=False)
    assert 26.0 <= case.meta["head_radius_mm"] <= 29.0 and 1.08 <= case.meta["head_aspect"] <= 1.14
    assert 5.0 <= case.meta["intensity"]["snr"] <= 8.0
    assert int(case.label.sum()) > 0
    all_shift = phantom.variation("wide", "all")
    assert all(all_shift.ranges[k] == v for g in phantom.SHIFTS.values() for k, v in g.items())
    with pytest.raises(FemursegError):
        phantom.variation("extreme")
    with pytest.raises(FemursegError):
        phantom.variation("narrow", "colour")


def test_femur_roll_rotates_the_femur_rigidly():
    """A roll of the femur about its head centre keeps the head centre (up to the generator's
    re-centring of the femur front to back) and the femur's volume (within the field-of-view
    clipping) and turns the neck axis by the drawn angles."""
    v = phantom.variation("narrow")
    rolled = phantom.Variation("roll", {**v.ranges, "femur_roll": (6.0, 6.0)})
    a = phantom.generate_case(8, shape=SMALL, variation=v, artefacts=False)
    b = phantom.generate_case(8, shape=SMALL, variation=rolled, artefacts=False)
    np.testing.assert_allclose(a.meta["head_centre_mm"][1:], b.meta["head_centre_mm"][1:], atol=1e-9)
    assert abs(a.meta["head_centre_mm"][0] - b.meta["head_centre_mm"][0]) < 3.0
    na, nb = np.array(a.meta["neck_axis"]), np.array(b.meta["neck_axis"])
    expected = phantom._rotation([6.0, 6.0, 6.0]) @ na
    np.testing.assert_allclose(nb, expected, atol=1e-9)
    assert abs(int(b.label.sum()) - int(a.label.sum())) / int(a.label.sum()) < 0.15


def test_wide_world_labels_are_sane():
    for case in phantom.generate_cohort(3, "mr", seed=9, shape=SMALL, artefact_fraction=0.0):
        assert case.meta["variation"] == "wide"
        assert np.isfinite(case.image).all() and case.image.min() >= 0.0
        _, n = ndimage.label(case.label > 0)
        assert n == 1
        assert 25.0 < case.meta["label_volume_cm3"] < 250.0
        assert _at(case, case.meta["head_centre_mm"]) > 0
