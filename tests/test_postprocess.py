"""femurseg.inference.postprocess on constructed masks."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ball
from scipy import ndimage

from femurseg.inference import postprocess as P

SP = (1.5, 0.234, 0.234)


def test_largest_component_two_blobs():
    big = ball((12, 40, 40), centre=(6, 12, 12), radius=2.5, spacing=SP)
    small = ball((12, 40, 40), centre=(6, 30, 30), radius=1.5, spacing=SP)
    out = P.largest_component(big | small)
    assert out.dtype == bool
    np.testing.assert_array_equal(out, big)


def test_largest_component_connectivity():
    m = np.zeros((3, 4, 4), bool)
    m[0, 0, 0] = m[0, 1, 1] = m[0, 2, 2] = True  # an in-plane diagonal chain (edge contacts)
    m[2, 3, 3] = True
    np.testing.assert_array_equal(P.largest_component(m), m & ~(np.arange(3)[:, None, None] == 2))  # default 26
    assert P.largest_component(m, connectivity=18).sum() == 3
    assert P.largest_component(m, connectivity=6).sum() == 1  # singletons: the first in raster order wins
    assert P.largest_component(m, connectivity=6)[0, 0, 0]
    with pytest.raises(ValueError, match="connectivity"):
        P.largest_component(m, connectivity=8)
    m2 = np.eye(4, dtype=bool)
    assert P.largest_component(m2).sum() == 4 and P.largest_component(m2, connectivity=4).sum() == 1


def test_largest_components_keeps_a_second_femur_not_a_fragment():
    shape = (12, 60, 60)
    right = ball(shape, centre=(6, 15, 15), radius=2.5, spacing=SP)
    left = ball(shape, centre=(6, 15, 45), radius=2.0, spacing=SP)  # 0.51 of the right's volume
    speck = ball(shape, centre=(6, 45, 30), radius=1.0, spacing=SP)  # 0.06 of it
    m = right | left | speck
    assert left.sum() >= P.MIN_FEMUR_FRACTION * right.sum() > speck.sum()
    np.testing.assert_array_equal(P.largest_components(m), right | left)
    np.testing.assert_array_equal(P.largest_components(m, most=1), P.largest_component(m))
    np.testing.assert_array_equal(P.largest_components(m, most=3), right | left)  # the speck stays out
    np.testing.assert_array_equal(P.largest_components(m, most=3, min_fraction=0.0), m)
    np.testing.assert_array_equal(P.largest_components(m, min_fraction=0.6), right)
    np.testing.assert_array_equal(P.postprocess(m, "lcc2", SP), right | left)
    opened = P.postprocess(m, "lcc2+fill+open", SP, open_radius_mm=0.5)
    assert opened[right].mean() > 0.9 and opened[left].mean() > 0.9 and not opened[speck].any()
    np.testing.assert_array_equal(P.postprocess(m, "lcc", SP), right)
    with pytest.raises(ValueError, match="most"):
        P.largest_components(m, most=0)


def test_empty_masks_pass_through():
    e = np.zeros((4, 5, 6), bool)
    for out in (P.largest_component(e), P.largest_components(e), P.fill_holes(e), P.opening(e, 1.0, SP),
                P.remove_small_components(e, 10.0, SP)):
        assert out.shape == e.shape and not out.any()
    for mode in P.MODES:
        assert not P.postprocess(e, mode, SP, min_size_mm3=5.0).any()


def test_fill_holes_cube_with_cavity():
    m = np.zeros((7, 9, 9), bool)
    m[1:6, 1:8, 1:8] = True
    m[3, 3:6, 3:6] = False  # enclosed cavity
    solid = m.copy()
    solid[3, 3:6, 3:6] = True
    np.testing.assert_array_equal(P.fill_holes(m), solid)
    # a cavity opening to the outside through one face is not a hole
    n = m.copy()
    n[3, 3:6, 1:6] = False
    np.testing.assert_array_equal(P.fill_holes(n), n)


def test_fill_holes_touching_border_and_slicewise():
    # a hollow tube along axis 0, open at both ends: the inside is connected to the outside in 3D
    m = np.zeros((6, 9, 9), bool)
    m[:, 2:7, 2:7] = True
    m[:, 4, 4] = False
    np.testing.assert_array_equal(P.fill_holes(m), m)
    filled = P.fill_holes(m, slice_axis=0)
    assert filled[:, 4, 4].all() and filled.sum() == m.sum() + 6
    # a cavity touching the array border is never filled, even when the mask touches the border
    b = np.ones((4, 5, 5), bool)
    b[0, 2, 2] = False
    np.testing.assert_array_equal(P.fill_holes(b), b)
    b[1, 2, 2] = False
    b[0, 2, 2] = True
    assert P.fill_holes(b).all()


def test_fill_holes_matches_scipy_on_full_volume():
    rng = np.random.default_rng(0)
    m = ndimage.gaussian_filter(rng.standard_normal((10, 20, 20)), 1.5) > 0.05
    np.testing.assert_array_equal(P.fill_holes(m), ndimage.binary_fill_holes(m))


def test_ellipsoid_structure_is_sized_in_mm():
    se = P.ellipsoid_structure(1.0, SP)
    assert se.shape == (1, 9, 9)  # 1.5 mm slices: flat disc; 1 / 0.234 -> 4 voxels each side
    # offset (4, 1) voxels = 0.965 mm is inside, (4, 2) = 1.046 mm is not
    assert se[0, 4].sum() == 9 and se[0, 0, 3:6].all() and not se[0, 0, 2]
    iso = P.ellipsoid_structure(2.0, (1.0, 1.0, 1.0))
    assert iso.shape == (5, 5, 5) and iso.sum() == 33  # integer points in a ball of radius 2
    assert P.ellipsoid_structure(1.5, (1.5, 0.5, 0.5)).shape == (3, 7, 7)
    with pytest.raises(ValueError):
        P.ellipsoid_structure(0.0, SP)


def test_opening_removes_thin_spur():
    sp = (1.0, 0.5, 0.5)
    m = np.zeros((12, 30, 30), bool)
    m[2:10, 5:20, 5:20] = True  # box, 8 mm x 7.5 mm x 7.5 mm
    spur = np.zeros_like(m)
    spur[5:7, 11:13, 20:28] = True  # 2 x 2 voxels (2 mm x 1 mm) across, 4 mm long
    out = P.opening(m | spur, 1.0, sp)
    # the element reaches 2 voxels (1 mm) in-plane, so only the spur's first column (its root) survives
    assert not (out & spur)[..., 21:].any()
    assert (out & spur).sum() == 4
    # equals scipy's opening with the same element, and the box interior survives
    se = P.ellipsoid_structure(1.0, sp)
    np.testing.assert_array_equal(out, ndimage.binary_opening(m | spur, structure=se))
    assert out[3:9, 7:18, 7:18].all()
    assert (out <= (m | spur)).all()


def test_remove_small_components_in_mm3():
    sp = (2.0, 1.0, 1.0)  # 2 mm^3 voxels
    m = np.zeros((5, 10, 10), bool)
    m[0, 0, 0:3] = True  # 6 mm^3
    m[3, 5:7, 5:7] = True  # 8 mm^3
    out = P.remove_small_components(m, 7.0, sp)
    assert out.sum() == 4 and out[3, 5, 5]
    np.testing.assert_array_equal(P.remove_small_components(m, 6.0, sp), m)  # exactly 6 mm^3 is kept
    np.testing.assert_array_equal(P.remove_small_components(m, 0.0, sp), m)


def test_postprocess_modes():
    shape = (14, 50, 50)
    body = ball(shape, centre=(7, 25, 25), radius=5.0, spacing=SP)
    cavity = ball(shape, centre=(7, 25, 25), radius=1.5, spacing=SP)
    fragment = ball(shape, centre=(7, 5, 5), radius=0.8, spacing=SP)
    spur = np.zeros(shape, bool)
    spur[7, 24:26, 25:48] = True  # 0.47 mm thick, sticking out by ~ 2.5 mm
    m = (body & ~cavity) | fragment | spur
    before = m.copy()
    np.testing.assert_array_equal(P.postprocess(m, "none", SP), m)
    lcc = P.postprocess(m, "lcc", SP)
    np.testing.assert_array_equal(lcc, m & ~fragment)
    filled = P.postprocess(m, "LCC+Fill", SP)
    np.testing.assert_array_equal(filled, body | spur)
    opened = P.postprocess(m, "lcc+fill+open", SP, open_radius_mm=0.5)
    reach = ndimage.binary_dilation(body, structure=P.ellipsoid_structure(0.5, SP))
    assert (opened & spur).any() and not (opened & spur & ~reach).any()  # only the spur's root survives
    assert opened[cavity].all() and (opened <= (body | spur)).all()
    frag_mm3 = fragment.sum() * np.prod(SP)
    np.testing.assert_array_equal(P.postprocess(m, "none", SP, min_size_mm3=frag_mm3 * 1.01), m & ~fragment)
    np.testing.assert_array_equal(P.postprocess(m, "none", SP, min_size_mm3=frag_mm3 * 0.99), m)
    np.testing.assert_array_equal(m, before)  # input untouched
    with pytest.raises(ValueError, match="none, lcc, lcc\\+fill, lcc\\+fill\\+open, lcc2"):
        P.postprocess(m, "crf", SP)


def test_accepts_uint8_and_2d():
    m = np.zeros((10, 10), np.uint8)
    m[1:4, 1:4] = 1
    m[6:9, 6:9] = 1
    m[6, 9] = 1
    out = P.postprocess(m, "lcc", (0.5, 0.5))
    assert out.dtype == bool and out.sum() == 10
