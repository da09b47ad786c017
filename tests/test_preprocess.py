"""Preprocessing (crop, in-plane resampling, normalisation), its inverse, and augmentation."""

from __future__ import annotations

import math
import numpy as np
import pytest
import torch

from femurseg.core.errors import FemursegError
from femurseg.data.augment import AugmentConfig, augment
from femurseg.data.preprocess import (
    PrepInfo,
    PreprocessConfig,
    preprocess_image,
    preprocess_label,
    restore,
)


def _ellipsoid(shape=(20, 64, 60), centre=(10, 30, 28), radii=(7, 18, 12)) -> np.ndarray:
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    r = sum(((g - c) / r) ** 2 for g, c, r in zip((z, y, x), centre, radii))
    return (r < 1).astype(np.uint8)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_identity_when_every_step_is_off():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(6, 10, 12)).astype(np.float32)
    cfg = PreprocessConfig(crop_slices=None, target_size=None, scale=None, normalise="none")
    out, info = preprocess_image(img, (1.5, 0.5, 0.5), cfg)
    np.testing.assert_array_equal(out, img)
    assert info.shape == info.original_shape == (6, 10, 12)
    np.testing.assert_array_equal(restore(out, info), img)


def test_crop_central_slices_and_geometry():
    img = np.arange(60, dtype=np.float32)[:, None, None] * np.ones((60, 8, 8), np.float32)
    cfg = PreprocessConfig(crop_slices=48, target_size=(4, 6), scale=None, normalise="none")
    out, info = preprocess_image(img, (1.5, 0.25, 0.5), cfg)
    assert out.shape == (48, 4, 6)
    assert (info.slice_start, info.slice_stop) == (6, 54)  # the central 48 of 60 (paper 001)
    np.testing.assert_allclose(out[:, 0, 0], np.arange(6, 54), atol=1e-4)
    assert info.spacing == pytest.approx((1.5, 0.5, 8 * 0.5 / 6))
    # odd surplus: the extra slice is dropped at the end
    _, info = preprocess_image(np.zeros((7, 4, 4), np.float32), (1, 1, 1), PreprocessConfig(crop_slices=4, scale=None))
    assert (info.slice_start, info.slice_stop) == (1, 5)
    # fewer slices than requested: keep all
    _, info = preprocess_image(np.zeros((3, 4, 4), np.float32), (1, 1, 1), PreprocessConfig(crop_slices=48, scale=None))
    assert (info.slice_start, info.slice_stop) == (0, 3)


def test_round_trip_to_original_resolution():
    """Label -> preprocessed grid (crop + x0.5) -> restore: back on the original grid, zeros outside the crop."""
    lab = _ellipsoid()
    img = lab * 100.0 + 5.0
    cfg = PreprocessConfig(crop_slices=16, scale=0.5, normalise="zscore")
    x, info = preprocess_image(img, (1.5, 0.5, 0.5), cfg)
    assert x.shape == (16, 32, 30) and x.dtype == np.float32
    y = preprocess_label(lab, info, cfg)
    assert y.shape == x.shape and y.dtype == np.uint8 and set(np.unique(y)) == {0, 1}
    back = restore(y.astype(np.float32), info, order=1) >= 0.5
    assert back.shape == lab.shape
    assert not back[: info.slice_start].any() and not back[info.slice_stop:].any()
    assert _dice(back, lab) > 0.95
    # integer masks restore to integer masks
    m = restore(y, info)
    assert m.dtype == np.uint8 and _dice(m, lab) > 0.95
    # a soft (area-fraction) probability map restores almost exactly
    from femurseg.data.preprocess import _zoom_inplane

    soft = _zoom_inplane(lab[info.slice_start:info.slice_stop].astype(np.float32), info.shape[1:], order=1)
    assert _dice(restore(soft, info) >= 0.5, lab) > 0.98


def test_restore_class_probabilities_background_outside_crop():
    info = PrepInfo((6, 4, 4), (1, 1, 1), 1, 5, (4, 2, 2), (1, 2, 2))
    probs = np.zeros((3, 4, 2, 2), np.float32)
    probs[2] = 1
    out = restore(probs, info)
    assert out.shape == (3, 6, 4, 4)
    assert (out[0, 0] == 1).all() and (out[1:, 0] == 0).all()
    assert np.allclose(out[2, 1:5], 1)
    with pytest.raises(FemursegError):
        restore(np.zeros((4, 3, 3), np.float32), info)


def test_multiclass_label_resampling_keeps_classes():
    lab = _ellipsoid()
    lab[_ellipsoid(radii=(5, 14, 8)) > 0] = 2
    cfg = PreprocessConfig(crop_slices=None, scale=0.5)
    _, info = preprocess_image(lab.astype(np.float32), (1, 1, 1), cfg)
    y = preprocess_label(lab, info, cfg, num_classes=3)
    assert set(np.unique(y)) == {0, 1, 2}
    y_nn = preprocess_label(lab, info, PreprocessConfig(crop_slices=None, scale=0.5, label_interp="nearest"))
    assert set(np.unique(y_nn)) == {0, 1, 2}


def test_normalisations():
    rng = np.random.default_rng(1)
    img = rng.normal(300, 50, size=(4, 16, 16)).astype(np.float32)
    img[0, 0, 0] = 1e5  # outlier
    z, info = preprocess_image(img, (1, 1, 1), PreprocessConfig(crop_slices=None, scale=None))
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-3
    assert info.stats["mean"] == pytest.approx(float(img.astype(np.float64).mean()), rel=1e-6)
    p, info = preprocess_image(img, (1, 1, 1), PreprocessConfig(crop_slices=None, scale=None, normalise="percentile",
                                                                percentiles=(1, 99)))
    assert float(p.max()) < 4 and info.stats["clip_high"] < 1e3
    ct = np.array([-1000, -200, 800, 1800, 3000], np.float32).reshape(1, 1, 5) * np.ones((2, 2, 1), np.float32)
    c, _ = preprocess_image(ct, (1, 1, 1), PreprocessConfig(crop_slices=None, scale=None, normalise="ct",
                                                            ct_window=(-200, 1800)))
    np.testing.assert_allclose(c[0, 0], [0, 0, 0.5, 1, 1], atol=1e-6)
    # constant image: no division by zero
    k, _ = preprocess_image(np.full((2, 4, 4), 7, np.float32), (1, 1, 1), PreprocessConfig(crop_slices=None, scale=None))
    assert np.isfinite(k).all()


def test_config_dicts_and_errors():
    cfg = PreprocessConfig(crop_slices=40, target_size=(128, 96), scale=None, normalise="percentile")
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert PreprocessConfig.preset("paper").target_size == (256, 256)
    info = preprocess_image(np.zeros((50, 8, 8), np.float32), (1, 1, 1), cfg)[1]
    assert PrepInfo.from_dict(info.to_dict()) == info
    for bad in ({"crop_slices": 0}, {"normalise": "minmax"}, {"percentiles": (90, 10)}, {"target_size": (1, 5)},
                {"scale": -1.0}, {"ct_window": (10, -10)}):
        with pytest.raises(FemursegError):
            PreprocessConfig(**bad)
    with pytest.raises(FemursegError, match="unknown option"):
        PreprocessConfig.from_dict({"crop": 3})
    with pytest.raises(FemursegError, match="label shape"):
        preprocess_label(np.zeros((3, 3, 3), np.uint8), info)


# ----------------------------------------------------------------------------- augmentation


def _batch(spatial=(8, 12, 10)):
    lab = torch.zeros((2, *spatial), dtype=torch.long)
    lab[..., 2:6, 1:4] = 1
    img = lab[:, None].float() * 3 + torch.arange(spatial[-1]).float() * 0.01
    return img, lab


def test_flip_mirrors_image_and_label_together():
    img, lab = _batch()
    out, olab = augment(img, lab, AugmentConfig(flip_p=1.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, img.flip(-1))
    torch.testing.assert_close(olab, lab.flip(-1))
    out, olab = augment(img, lab, AugmentConfig(flip_p=0.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, img)


def test_augment_is_reproducible_and_keeps_labels_valid():
    cfg = AugmentConfig(flip_p=0.5, noise_std=0.1, brightness=0.2, scale=0.1, rotate_deg=10)
    for spatial in ((8, 12, 10), (12, 10)):
        img, lab = _batch(spatial)
        a = augment(img, lab, cfg, torch.Generator().manual_seed(3))
        b = augment(img, lab, cfg, torch.Generator().manual_seed(3))
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[1], b[1])
        assert a[0].shape == img.shape and a[1].shape == lab.shape and a[1].dtype == lab.dtype
        assert set(a[1].unique().tolist()) <= {0, 1} and a[1].sum() > 0
    # the identity transform of the spatial path changes nothing
    img, lab = _batch()
    from femurseg.data.augment import _spatial

    one = torch.ones(2, dtype=torch.float64)
    i2, l2 = _spatial(img, lab, one, 0 * one, 3, tilt=torch.zeros(2, 2, dtype=torch.float64), spacing=(1.5, 1, 1),
                      elastic_mm=0 * one)
    torch.testing.assert_close(i2, img, atol=1e-5, rtol=0)
    torch.testing.assert_close(l2, lab)
    with pytest.raises(FemursegError):
        AugmentConfig(scale=1.5)
    with pytest.raises(FemursegError):
        AugmentConfig(gamma_p=2.0)
    with pytest.raises(FemursegError):
        AugmentConfig.from_dict({"lowres": [0.5, 2.0]})


def test_default_augmentation_is_reproducible_per_seed_and_changes_the_batch():
    cfg = AugmentConfig.preset("nnunet")
    assert AugmentConfig.from_dict(cfg.to_dict()) == cfg
    img, lab = _batch((12, 16, 16))
    img = img.repeat(4, 1, 1, 1, 1)
    lab = lab.repeat(4, 1, 1, 1)
    a = augment(img, lab, cfg, torch.Generator().manual_seed(5), spacing=(1.5, 1.0, 1.0))
    b = augment(img, lab, cfg, torch.Generator().manual_seed(5), spacing=(1.5, 1.0, 1.0))
    c = augment(img, lab, cfg, torch.Generator().manual_seed(6), spacing=(1.5, 1.0, 1.0))
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.isfinite(a[0]).all() and set(a[1].unique().tolist()) <= {0, 1}
    # every kind at probability 1 runs on 2D stacks too
    full = AugmentConfig(rotate_deg=20, tilt_deg=10, scale=0.2, elastic_mm=3, noise_std=0.2, blur_p=1, bias=0.5,
                         brightness_mul=0.3, contrast=0.3, lowres_p=1, gamma_p=1)
    img2, lab2 = _batch((12, 10))
    out, olab = augment(img2, lab2, full, torch.Generator().manual_seed(0), spacing=(1.5, 1.0, 1.0))
    assert out.shape == img2.shape and torch.isfinite(out).all() and olab.shape == lab2.shape


def _ball(shape, spacing, centre_mm, radius_mm):
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) * s for n, s in zip(shape, spacing)], indexing="ij")
    d2 = sum((g - c) ** 2 for g, c in zip(grids, centre_mm))
    return (d2 <= radius_mm**2).long()


def test_rotations_are_rigid_in_millimetres_for_anisotropic_voxels():
    """A ball off the rotation centre, in 3 mm x 1 mm x 1 mm voxels, rotated out of the coronal
    plane: its volume is kept and its centre moves along the circle of a rigid rotation in mm
    (a rotation in voxel units would shear it into an ellipsoid and put its centre elsewhere)."""
    from femurseg.data.augment import _spatial

    shape, spacing = (32, 64, 64), (3.0, 1.0, 1.0)
    c = [(n - 1) / 2 * s for n, s in zip(shape, spacing)]
    centre = (c[0] + 20.0, c[1], c[2])  # 20 mm anterior of the centre
    lab = _ball(shape, spacing, centre, 9.0)[None]
    img = lab[:, None].float()
    one = torch.ones(1, dtype=torch.float64)
    a = math.radians(30)
    tilt = torch.tensor([[a, 0.0]], dtype=torch.float64)  # about the row (I) axis: A and L mix
    _, out = _spatial(img, lab, one, 0 * one, 3, tilt=tilt, spacing=spacing)
    vol0, vol1 = float(lab.sum()), float(out.sum())
    assert abs(vol1 - vol0) / vol0 < 0.05
    idx = out[0].nonzero().double()
    com = (idx.mean(0) * torch.tensor(spacing)).tolist()
    # moved on a circle of radius 20 mm about the centre, within the A-L plane
    r = math.hypot(com[0] - c[0], com[2] - c[2])
    assert abs(r - 20.0) < 1.0 and abs(com[1] - c[1]) < 0.5
    assert abs(abs(math.atan2(com[2] - c[2], com[0] - c[0])) - a) < math.radians(3)
    # extents along A and L stay those of a ball (18 mm), not a sheared ellipsoid
    ext = (idx.max(0).values - idx.min(0).values + 1) * torch.tensor(spacing)
    assert 15.0 <= float(ext[0]) <= 21.5 and 16.0 <= float(ext[2]) <= 20.0


def test_gamma_and_blur_match_monai():
    monai = pytest.importorskip("monai")
    from femurseg.data.augment import adjust_gamma, gaussian_blur

    x = torch.rand(1, 10, 12, 14, generator=torch.Generator().manual_seed(0))
    ref = monai.transforms.AdjustContrast(gamma=1.4)(x)
    torch.testing.assert_close(adjust_gamma(x, 1.4, retain_stats=False), torch.as_tensor(ref).float(),
                               atol=1e-5, rtol=1e-5)
    ref = monai.transforms.GaussianSmooth(sigma=0.8)(x)
    ours = gaussian_blur(x, 0.8)
    # the interior agrees (MONAI pads with zeros, femurseg replicates the edge)
    torch.testing.assert_close(ours[:, 4:-4, 4:-4, 4:-4], torch.as_tensor(ref)[:, 4:-4, 4:-4, 4:-4].float(),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype,order", [(np.float32, 3), (np.float32, 1), (np.int16, 3), (np.uint8, 0)])
def test_inplane_zoom_equals_3d_zoom(dtype, order):
    """The slice-by-slice zoom equals scipy's 3D zoom with factor 1 along the slice axis (up to the
    3D spline prefilter's rounding) and never mixes slices."""
    from scipy import ndimage

    from femurseg.data.preprocess import _zoom_inplane

    a = (np.random.default_rng(3).random((48, 37, 29)) * 200).astype(dtype)
    a[10] = 0
    ref = ndimage.zoom(a, (1, 24 / 37, 40 / 29), order=order, mode="reflect", grid_mode=True, prefilter=order > 1)
    out = _zoom_inplane(a, (24, 40), order)
    assert out.dtype == ref.dtype and out.shape == (48, 24, 40)
    np.testing.assert_allclose(out.astype(float), ref.astype(float), rtol=0, atol=1 if dtype == np.int16 else 1e-3)
    assert not out[10].any()
    b = np.ascontiguousarray(a[:, :36, :28])
    half = ndimage.zoom(b, (1, 0.5, 0.5), order=order, mode="reflect", grid_mode=True, prefilter=order > 1)
    np.testing.assert_allclose(_zoom_inplane(b, (18, 14), order).astype(float), half.astype(float), rtol=0,
                               atol=1 if dtype == np.int16 else 1e-3)
    four = np.stack([b, b[::-1]])  # (C, D, H, W) probability stacks take the same path
    assert np.array_equal(_zoom_inplane(four, (18, 14), order)[1], _zoom_inplane(b[::-1], (18, 14), order))


def test_inplane_zoom_threads_give_the_serial_result(monkeypatch):
    """Large slices are resampled on several threads: the same values as one thread."""
    from femurseg.data import preprocess

    a = (np.random.default_rng(4).random((5, 256, 260)) * 100).astype(np.float32)  # >= 65536 px per slice
    monkeypatch.setattr(preprocess, "_threads", lambda: 1)
    serial = preprocess._zoom_inplane(a, (128, 96), 3)
    monkeypatch.setattr(preprocess, "_threads", lambda: 3)
    threaded = preprocess._zoom_inplane(a, (128, 96), 3)
    assert np.array_equal(serial, threaded)


def test_histogram_shift_matches_monai_and_keeps_the_statistics():
    monai = pytest.importorskip("monai")
    from femurseg.data.augment import histogram_shift, random_histogram_curve

    x = torch.randn(1, 10, 12, 14, generator=torch.Generator().manual_seed(0))
    ref = monai.transforms.RandHistogramShift(num_control_points=(5, 5), prob=1.0)
    ref.set_random_state(3)
    ref.randomize()
    points = torch.as_tensor(ref.floating_control_points)
    expected = torch.as_tensor(ref(x, randomize=False)).float()
    torch.testing.assert_close(histogram_shift(x, points, retain_stats=False), expected, atol=1e-5, rtol=1e-5)
    # the intensity order of the voxels is kept (a monotone curve); mean and SD are kept
    y = histogram_shift(x, points)
    assert bool((torch.diff(y.flatten()[x.flatten().argsort()]) >= -1e-5).all())
    torch.testing.assert_close(y.mean(), x.mean(), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(), x.std(), atol=1e-5, rtol=1e-5)
    # the identity curve changes nothing; a constant image is returned as it is
    torch.testing.assert_close(histogram_shift(x, torch.linspace(0, 1, 4, dtype=torch.float64)), x, atol=1e-5, rtol=0)
    c = torch.full((1, 4, 4, 4), 2.0)
    assert torch.equal(histogram_shift(c, points), c)
    # the draw: ends fixed at 0 and 1, inner points increasing
    g = torch.Generator().manual_seed(1)
    for n in (3, 6, 10):
        p = random_histogram_curve(n, g)
        assert p[0] == 0 and p[-1] == 1 and bool((torch.diff(p) >= 0).all()) and len(p) == n


def test_histogram_shift_in_augment_is_seeded_and_leaves_the_other_streams_alone():
    img, lab = _batch((12, 16, 16))
    img = img.repeat(2, 1, 1, 1, 1) + torch.randn(4, 1, 12, 16, 16, generator=torch.Generator().manual_seed(2))
    lab = lab.repeat(2, 1, 1, 1)
    base = AugmentConfig.preset("light")
    on = AugmentConfig.from_dict({**base.to_dict(), "histogram_p": 1.0})
    before = img.clone()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a, _ = augment(img, lab, base, g1)
    b, bl = augment(img, lab, on, g2)
    assert torch.equal(img, before)  # the input batch is not modified in place
    assert torch.equal(g1.get_state(), g2.get_state())  # the caller's stream is the same with it on
    assert not torch.allclose(a, b) and torch.equal(bl, augment(img, lab, base, torch.Generator().manual_seed(7))[1])
    c, _ = augment(img, lab, on, torch.Generator().manual_seed(7))
    torch.testing.assert_close(b, c)
    with pytest.raises(FemursegError):
        AugmentConfig(histogram_points=(2, 5))


def test_foreground_contrast_moves_the_bright_interior_towards_the_surroundings():
    from femurseg.data.augment import foreground_contrast

    x = torch.full((1, 24, 24, 24), 1.0)  # muscle
    lab = torch.zeros(24, 24, 24, dtype=torch.long)
    lab[6:18, 6:18, 6:18] = 1
    x[0, 6:18, 6:18, 6:18] = 0.2  # dark cortex
    x[0, 8:16, 8:16, 8:16] = 3.0  # bright marrow
    y = foreground_contrast(x, lab, 0.5)
    assert float(y[0, 12, 12, 12]) == pytest.approx(2.0)  # 1 + 0.5 * (3 - 1)
    assert float(y[0, 6, 12, 12]) == pytest.approx(0.2)  # darker than the muscle: kept
    assert torch.equal(y[0, :3], x[0, :3])  # far from the label: untouched
    assert torch.equal(foreground_contrast(x, lab, 1.0), x)
    assert torch.equal(foreground_contrast(x, torch.zeros_like(lab), 0.5), x)  # no foreground
    # 2D stacks: (C, H, W) with a (H, W) label, one reference per channel
    y2 = foreground_contrast(x[0, 10:13], lab[12], 0.5)
    assert float(y2[1, 12, 12]) == pytest.approx(2.0)


def test_foreground_contrast_in_augment_is_seeded_and_leaves_the_other_streams_alone():
    img, lab = _batch((12, 16, 16))
    img = img.repeat(2, 1, 1, 1, 1) + torch.randn(4, 1, 12, 16, 16, generator=torch.Generator().manual_seed(2))
    lab = lab.repeat(2, 1, 1, 1)
    base = AugmentConfig.preset("light")
    on = AugmentConfig.from_dict({**base.to_dict(), "fg_contrast_p": 1.0, "fg_contrast": [0.4, 0.4]})
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a, al = augment(img, lab, base, g1)
    b, bl = augment(img, lab, on, g2)
    assert torch.equal(g1.get_state(), g2.get_state()) and torch.equal(al, bl)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, augment(img, lab, on, torch.Generator().manual_seed(7))[0])
    with pytest.raises(FemursegError):
        AugmentConfig(fg_contrast_p=1.5)


def test_in_millimetres_keeps_the_training_grid_and_adapts_to_other_spacings():
    from femurseg.data.preprocess import plan

    cfg = PreprocessConfig()  # the default: 48 slices, in-plane x0.5
    mm = cfg.in_millimetres((1.5, 0.9375, 0.9375))
    assert mm.spacing_mm == (1.875, 1.875) and mm.crop_mm == pytest.approx(72.0) and mm.slice_mm == 1.5
    # on the training spacing: the grid of the factor and the slice count, exactly
    for shape in ((60, 128, 128), (48, 127, 131), (30, 128, 96)):
        a, b = plan(shape, (1.5, 0.9375, 0.9375), cfg), plan(shape, (1.5, 0.9375, 0.9375), mm)
        assert (a.slice_start, a.slice_stop, a.shape, a.spacing) == (b.slice_start, b.slice_stop, b.shape, b.spacing)
    # a scan with pixels half the size, thin slices: the same millimetres reach the network
    fine = plan((120, 256, 256), (0.75, 0.46875, 0.46875), mm)
    assert fine.shape == (48, 64, 64) and fine.spacing == pytest.approx((1.5, 1.875, 1.875))
    assert (fine.slice_stop - fine.slice_start) * 0.75 == pytest.approx(72.0)
    thick = plan((24, 128, 128), (3.0, 0.9375, 0.9375), mm)
    assert thick.shape == (48, 64, 64) and thick.slice_stop - thick.slice_start == 24
    # only a zoom factor is converted: the paper's fixed size and "no resampling" stay as they are
    paper = PreprocessConfig.preset("paper")
    assert paper.in_millimetres((1.5, 0.5, 0.5)) == paper
    assert PreprocessConfig.preset("ct").in_millimetres((1.0, 1.0, 1.0)) == PreprocessConfig.preset("ct")
    assert PreprocessConfig.from_dict(mm.to_dict()) == mm
    with pytest.raises(FemursegError):
        PreprocessConfig(spacing_mm=(0.0, 1.0))
    with pytest.raises(FemursegError):
        PreprocessConfig(crop_mm=-1.0)


def test_slice_resampling_round_trip():
    """A slab resampled along the slice axis (and in-plane) comes back on the original grid:
    probabilities and masks, binary and multi-class."""
    from femurseg.data.preprocess import plan

    shape, spacing = (20, 32, 36), (3.0, 1.0, 1.0)
    lab = np.zeros(shape, np.uint8)
    lab[5:15, 8:24, 10:26] = 1
    lab[8:12, 12:20, 14:22] = 2
    img = lab.astype(np.float32) * 100 + 10
    cfg = PreprocessConfig(crop_slices=None, scale=0.5, slice_mm=1.5)
    x, info = preprocess_image(img, spacing, cfg)
    assert x.shape == (40, 16, 18) == info.shape and info.spacing == pytest.approx((1.5, 2.0, 2.0)) and info.resampled
    y = preprocess_label(lab, info, cfg, num_classes=3)
    assert y.shape == info.shape and set(np.unique(y)) == {0, 1, 2}
    back = restore(y, info, order=0)
    assert back.shape == shape and back.dtype == np.uint8
    fg, ref = back > 0, lab > 0
    assert 2 * (fg & ref).sum() / (fg.sum() + ref.sum()) > 0.9
    probs = restore((y > 0).astype(np.float32), info)
    assert probs.shape == shape and probs.dtype == np.float32 and 0 <= probs.min() and probs.max() <= 1
    onehot = np.stack([(y == c).astype(np.float32) for c in range(3)])
    assert restore(onehot, info).shape == (3, *shape)
    # no slice resampling when the scan is already at slice_mm: the same arrays as without it
    same = PreprocessConfig(crop_slices=None, scale=0.5)
    x1, _ = preprocess_image(img, (1.5, 1.0, 1.0), PreprocessConfig(crop_slices=None, scale=0.5, slice_mm=1.5))
    x2, _ = preprocess_image(img, (1.5, 1.0, 1.0), same)
    assert np.array_equal(x1, x2) and plan(shape, (3.0, 1.0, 1.0), same).shape[0] == 20


def test_body_normalisation_does_not_depend_on_the_air_around_the_body():
    from femurseg.data.preprocess import normalise

    rng = np.random.default_rng(0)
    body = rng.normal(800.0, 300.0, (8, 40, 40)).clip(150, None).astype(np.float32)  # tissue
    air = lambda shape: np.abs(rng.normal(0.0, 20.0, shape)).astype(np.float32)  # noqa: E731 (Rician-like)
    small = np.concatenate([air((8, 40, 5)), body, air((8, 40, 5))], axis=2)
    large = np.concatenate([air((8, 40, 60)), body, air((8, 40, 60))], axis=2)
    cfg = PreprocessConfig(normalise="body")
    zs, s1 = normalise(small, cfg)
    zl, s2 = normalise(large, cfg)
    # the body's voxels get the same values whatever the field of view holds around them
    np.testing.assert_allclose(zs[:, :, 5:45], zl[:, :, 60:100], atol=0.02)
    assert s2["body_fraction"] < s1["body_fraction"] < 1
    # the plain z-score moves with the air
    z1, _ = normalise(small, PreprocessConfig(normalise="zscore"))
    z2, _ = normalise(large, PreprocessConfig(normalise="zscore"))
    assert np.abs(z1[:, :, 5:45] - z2[:, :, 60:100]).mean() > 0.3
    # a blank image: too few body voxels, the whole volume's statistics, finite output
    zb, sb = normalise(np.zeros((8, 16, 16), np.float32), cfg)
    assert np.isfinite(zb).all() and sb["body_fraction"] == 0


def test_translation_moves_image_and_label_together_and_fills_with_air():
    from femurseg.data.augment import _spatial

    shape = (4, 16, 20)
    lab = torch.zeros((1, *shape), dtype=torch.long)
    lab[0, :, 4:10, 6:12] = 1
    img = lab[:, None].float() * 5 + 1.0  # background 1, femur 6; the minimum is 1
    img[0, 0, :, 0, :] = 3.0  # a bright top row: with "edge" fill it would be copied in
    one = torch.ones(1, dtype=torch.float64)
    shift = torch.tensor([[0.25, -0.1]], dtype=torch.float64)  # a quarter of the rows, a tenth of the columns
    out, olab = _spatial(img, lab, one, 0 * one, 3, shift=shift, fill="air")
    assert int(olab.sum()) == int(lab.sum())  # moved, not cut
    rows = olab[0].nonzero()[:, 1]
    cols = olab[0].nonzero()[:, 2]
    # a shift of the sampling grid by f moves the content by -f of the extent: up 4 rows, right 2 columns
    assert (int(rows.min()), int(rows.max())) == (0, 5) and (int(cols.min()), int(cols.max())) == (8, 13)
    assert torch.allclose(out[0, 0, :, -4:, :], torch.tensor(1.0))  # the rows that came in are air
    edge, _ = _spatial(img, lab, one, 0 * one, 3, shift=-shift, fill="edge")
    assert torch.allclose(edge[0, 0, :, :4, :], torch.tensor(3.0))  # edge fill copies the border row
    with pytest.raises(FemursegError):
        AugmentConfig(translate=1.0)
    with pytest.raises(FemursegError):
        AugmentConfig(fill="zero")
    # through augment: reproducible, and the caller's stream is the one without translation
    cfg = AugmentConfig(translate=0.2, fill="air", spatial_p=1.0)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    a = augment(img, lab, cfg, g1)
    augment(img, lab, AugmentConfig(spatial_p=1.0, scale=0.1), g2)
    assert torch.equal(g1.get_state(), g2.get_state())
    b = augment(img, lab, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
