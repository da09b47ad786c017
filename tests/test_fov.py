"""Field-of-view matching (femurseg.inference.fov): the window, the passes, the paste."""

from __future__ import annotations

import numpy as np
import pytest

from femurseg.inference import fov as F

REFERENCE = {"ranges": {"fov_mm_1": [118.0, 122.0], "fov_mm_2": [120.0, 120.0],
                        "label_centroid_1": [0.3, 0.5], "label_centroid_2": [0.5, 0.7]}}
SPACING = (1.5, 1.0, 1.0)


def test_training_field_of_view_from_reference():
    t = F.training_field_of_view(REFERENCE)
    assert t == {1: (118.0, 122.0, 120.0, pytest.approx(0.4)), 2: (120.0, 120.0, 120.0, pytest.approx(0.6))}
    assert t[1].widest == 122.0 and t[2].centre == pytest.approx(0.6)
    assert F.training_field_of_view(None) is None
    assert F.training_field_of_view({"ranges": {"fov_mm_1": [1, 2]}}) is None


def test_needs_matching_only_beyond_the_factor():
    t = F.training_field_of_view(REFERENCE)
    assert not F.needs_matching((20, 120, 120), SPACING, t)
    assert not F.needs_matching((20, 140, 120), SPACING, t)  # 140 mm < 1.15 x 122 mm
    assert F.needs_matching((20, 120, 180), SPACING, t)
    assert not F.needs_matching((20, 105, 120), SPACING, t)  # 105 mm x 1.15 > 118 mm
    assert F.needs_matching((20, 100, 120), SPACING, t)  # narrower
    assert not F.needs_matching((20, 240, 240), SPACING, None)
    # the same voxels at half the pixel size are a field of view of half the width
    assert not F.needs_matching((20, 240, 240), (1.5, 0.5, 0.5), t)


def test_window_puts_the_centroid_where_the_training_labels_were():
    t = F.training_field_of_view(REFERENCE)
    w = F.fov_window((20, 200, 200), SPACING, (10.0, 100.0, 90.0), t)
    assert w[0] == slice(0, 20)
    assert w[1].stop - w[1].start == 120 and w[2].stop - w[2].start == 120
    assert (100.0 - w[1].start) / 119 == pytest.approx(0.4, abs=0.01)
    assert (90.0 - w[2].start) / 119 == pytest.approx(0.6, abs=0.01)
    # near the border the window is shifted inside the scan, never cut
    w = F.fov_window((20, 200, 200), SPACING, (10.0, 5.0, 195.0), t)
    assert w[1] == slice(0, 120) and w[2] == slice(80, 200)
    # an axis that needs no matching keeps its extent
    w = F.fov_window((20, 125, 200), SPACING, (10.0, 60.0, 90.0), t)
    assert w[1] == slice(0, 125) and w[2].stop - w[2].start == 120


def test_tiles_cover_the_scan_and_blend_to_the_same_answer():
    t = F.training_field_of_view(REFERENCE)
    img = np.random.default_rng(0).random((4, 200, 170)).astype(np.float32)
    shapes = []

    def probabilities(a):
        shapes.append(a.shape)
        return [a.copy(), np.stack([1 - a, a])]  # a map and (C, ...) class probabilities

    probs = F.tiled_probabilities(img, SPACING, t, probabilities)
    assert set(shapes) == {(4, 120, 120)} and len(shapes) == 3 * 2  # rows 0/60/80, cols 0/50
    np.testing.assert_allclose(probs[0], img, rtol=1e-5)
    np.testing.assert_allclose(probs[1], np.stack([1 - img, img]), rtol=1e-4, atol=1e-6)


def test_matched_window_inside_tiles_outside():
    t = F.training_field_of_view(REFERENCE)
    img = np.zeros((8, 200, 200), np.float32)
    img[2:6, 60:200, 120:150] = 1.0  # a femur whose shaft leaves any 120 mm window
    n_tiles = 9
    calls: list[tuple[int, ...]] = []

    def probabilities(a):  # the tiles see 0.7 where the femur is, the matched windows 0.9
        calls.append(a.shape)
        return [(0.7 if len(calls) <= n_tiles else 0.9) * (a > 0.5).astype(np.float32)]

    probs, windows = F.matched_probabilities(img, SPACING, t, probabilities)
    assert len(windows) == 1 and probs[0].shape == img.shape
    window = windows[0]
    assert n_tiles < len(calls) <= n_tiles + F.MAX_PASSES and all(c == (8, 120, 120) for c in calls)
    inside = np.zeros(img.shape, bool)
    inside[window] = True
    femur = img > 0.5
    np.testing.assert_allclose(probs[0][femur & inside], 0.9)
    assert (femur & ~inside).any()
    np.testing.assert_allclose(probs[0][femur & ~inside], 0.7, rtol=1e-5)
    assert not probs[0][~femur].any()
    # the window holds the femur's centroid at the training labels' relative position
    centroid_rows = np.nonzero(femur)[1].mean()
    assert (centroid_rows - window[1].start) / 119 == pytest.approx(0.4, abs=0.02)


def test_matched_probabilities_leaves_training_sized_scans_alone():
    t = F.training_field_of_view(REFERENCE)
    img = np.zeros((8, 120, 120), np.float32)
    img[2:6, 40:70, 50:80] = 1.0
    calls = []
    probs, windows = F.matched_probabilities(img, SPACING, t, lambda a: calls.append(a.shape) or [a.copy()])
    assert windows == [] and calls == [img.shape]
    np.testing.assert_array_equal(probs[0], img)
    # nothing found in a wide scan: the tiles' answer, no window
    empty = np.zeros((8, 200, 200), np.float32)
    probs, windows = F.matched_probabilities(empty, SPACING, t, lambda a: [np.zeros(a.shape, np.float32)])
    assert windows == [] and probs[0].shape == empty.shape and not probs[0].any()


def test_paste_into_the_base_maps():
    window = (slice(0, 4), slice(10, 20), slice(5, 15))
    p = np.full((3, 4, 10, 10), 1 / 3, np.float32)
    base = np.zeros((3, 4, 30, 30), np.float32)
    base[0] = 1.0
    full = F.paste([p], window, [base])[0]
    assert full.shape == (3, 4, 30, 30) and base[1].max() == 0  # the base is not changed
    assert np.all(full[0, :, :10] == 1.0) and np.all(full[1:, :, :10] == 0.0)
    np.testing.assert_allclose(full[:, :, 10:20, 5:15], p)


def test_a_narrower_scan_is_segmented_in_one_edge_padded_window():
    t = F.training_field_of_view(REFERENCE)
    img = np.zeros((8, 90, 120), np.float32)  # 90 mm rows: narrower than 118 mm
    img[2:6, 20:70, 40:80] = 1.0
    img[:, -1, :] = 0.25  # the last row, to see the edge padding
    w = F.fov_window(img.shape, SPACING, (4.0, 44.5, 59.5), t)
    assert w[2] == slice(0, 120) and w[1].stop - w[1].start == 120
    assert w[1].start <= 0 and w[1].stop >= 90  # covers the scan
    win = F.extract(img, w)
    assert win.shape == (8, 120, 120)
    np.testing.assert_array_equal(win[:, -w[1].start:-w[1].start + 90], img)
    if w[1].stop > 90:
        assert np.all(win[:, -w[1].start + 90:] == img[:, -1:])  # the border row repeated
    calls = []

    def probabilities(a):
        calls.append(a.shape)
        return [(a > 0.5).astype(np.float32)]

    probs, windows = F.matched_probabilities(img, SPACING, t, probabilities)
    assert len(windows) == 1 and all(c == (8, 120, 120) for c in calls)
    assert probs[0].shape == img.shape
    np.testing.assert_array_equal(probs[0] > 0.5, img > 0.5)


def test_the_slab_is_placed_on_the_femur_in_a_thicker_scan():
    ref = {"ranges": {**REFERENCE["ranges"], "fov_mm_0": [72.0, 72.0], "label_centroid_0": [0.4, 0.6]}}
    t = F.training_field_of_view(ref, slab_mm=72.0)
    assert t[0] == (0.0, 72.0, 72.0, pytest.approx(0.5))
    assert 0 not in F.training_field_of_view(ref)  # no slab: the slice axis is not matched
    # training scans thicker than the slab: the centroid is re-expressed relative to the slab
    thick = {"ranges": {**ref["ranges"], "fov_mm_0": [144.0, 144.0], "label_centroid_0": [0.5, 0.5]}}
    assert F.training_field_of_view(thick, slab_mm=72.0)[0].centre == pytest.approx(0.5)
    img = np.zeros((96, 120, 120), np.float32)  # 144 mm of 1.5 mm slices, the femur anterior
    img[60:90, 30:70, 40:80] = 1.0
    assert F.needs_matching(img.shape, SPACING, t) and not F.needs_matching((50, 120, 120), SPACING, t)
    calls = []

    def probabilities(a):  # the network finds the femur only where it is whole in its window
        calls.append(a.shape)
        fg = (a > 0.5).astype(np.float32)
        return [fg if fg[0].max() == 0 and fg[-1].max() == 0 else np.zeros_like(fg)]

    probs, windows = F.matched_probabilities(img, SPACING, t, probabilities)
    window = windows[0]
    assert len(windows) == 1 and window[0].stop - window[0].start == 48
    assert window[0].start <= 60 and window[0].stop >= 90 and window[1:] == (slice(0, 120), slice(0, 120))
    assert all(c[0] == 48 for c in calls)
    np.testing.assert_array_equal(probs[0] > 0.5, img > 0.5)


def test_both_hips_get_a_window_each():
    t = F.training_field_of_view(REFERENCE)
    img = np.zeros((8, 120, 260), np.float32)  # 260 mm wide: a femur on each side
    img[2:6, 40:80, 30:60] = 1.0
    img[2:6, 40:75, 200:230] = 1.0  # a little smaller
    img[2:6, 5:8, 125:128] = 1.0  # a speck: below MIN_FEMUR_FRACTION, no window
    probs, windows = F.matched_probabilities(img, SPACING, t, lambda a: [(a > 0.5).astype(np.float32)])
    assert len(windows) == 2
    cols = [(w[2].start, w[2].stop) for w in windows]
    assert cols[0][0] <= 30 and cols[0][1] >= 60 and cols[1][0] <= 200 and cols[1][1] >= 230  # largest first
    np.testing.assert_array_equal(probs[0] > 0.5, img > 0.5)
