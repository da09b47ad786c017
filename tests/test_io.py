"""Image I/O: canonical orientation, geometry round trips per format, bad input."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import write_dicom_series

from femurseg.core import io
from femurseg.core.errors import FemursegError


def _random_volume(native_axcodes=("P", "I", "L"), shape=(6, 10, 12), spacing=(1.5, 0.5, 0.4)):
    rng = np.random.default_rng(0)
    return io.make_volume(rng.random(shape, dtype=np.float32) * 1000, spacing, native_axcodes)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_round_trip_same_format_is_bit_exact(tmp_path, suffix):
    vol = _random_volume()
    first = tmp_path / f"a{suffix}"
    io.write_volume(first, vol)
    a = io.read_image(first)
    second = tmp_path / f"b{suffix}"
    io.write_like(second, a.data, a)  # read, reorient, write back
    b = io.read_image(second)
    assert a.geometry == b.geometry  # bit for bit: spacing, origin, direction, size
    assert np.array_equal(a.data, b.data)
    # the native on-disk arrays are identical too
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(first))), sitk.GetArrayFromImage(sitk.ReadImage(str(second))))


@pytest.mark.parametrize("codes", [("P", "I", "L"), ("A", "I", "L"), ("S", "R", "A"), ("L", "P", "S"), ("I", "A", "R")])
def test_canonical_orientation_independent_of_storage(tmp_path, codes):
    vol = _random_volume(codes)
    io.write_volume(tmp_path / "x.nii.gz", vol)
    r = io.read_image(tmp_path / "x.nii.gz")
    assert np.array_equal(r.data, vol.data)
    assert np.allclose(r.spacing, vol.spacing, atol=1e-6)
    # the canonical affine's axes point anterior, inferior, patient-left
    dirs = r.affine[:3, :3] / np.asarray(r.spacing)
    assert np.allclose(dirs, np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0]]).T, atol=1e-6)


def test_oblique_direction_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    img = sitk.GetImageFromArray(rng.random((5, 7, 9)).astype(np.float32))
    theta = np.deg2rad(17.0)
    rot = np.array([[np.cos(theta), 0, np.sin(theta)], [0, 1, 0], [-np.sin(theta), 0, np.cos(theta)]])
    coronal = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)  # i->L, j->I, k->P
    img.SetDirection(tuple((rot @ coronal).ravel()))
    img.SetSpacing((0.3, 0.4, 1.5))
    img.SetOrigin((10.0, -20.0, 5.0))
    sitk.WriteImage(img, str(tmp_path / "obl.nii.gz"))
    v = io.read_image(tmp_path / "obl.nii.gz")
    assert v.data.shape == (5, 7, 9)  # slices stay on axis 0
    assert np.allclose(v.spacing, (1.5, 0.4, 0.3), atol=1e-6)
    io.write_like(tmp_path / "out.nii.gz", (v.data > 0.5).astype(np.uint8), v)
    w = io.read_image(tmp_path / "out.nii.gz", dtype=None)
    assert w.geometry == v.geometry
    assert np.array_equal(w.data, (v.data > 0.5).astype(np.uint8))


@pytest.mark.parametrize("codes", [("P", "I", "L"), ("R", "A", "S"), ("L", "P", "S")])
def test_crop_volume_keeps_every_voxel_where_it_is(tmp_path, codes):
    rng = np.random.default_rng(2)
    data = rng.random((10, 12, 14)).astype(np.float32)
    v = io.make_volume(data, (1.5, 0.8, 0.7), native_axcodes=codes)
    c = io.crop_volume(v, (2, -3, 5), (7, 6, 20), fill=-1.0)  # reaches outside rows and columns
    assert c.data.shape == (5, 9, 15) and c.spacing == v.spacing
    assert np.array_equal(c.data[:, 3:, :9], data[2:7, 0:6, 5:14])
    assert np.all(c.data[:, :3] == -1) and np.all(c.data[:, :, 9:] == -1)
    io.write_volume(tmp_path / "crop.nii.gz", c)
    back = io.read_image(tmp_path / "crop.nii.gz")
    assert np.array_equal(back.data, c.data)
    # the files put every crop voxel where the full image has it (SimpleITK: index -> LPS point)
    for idx in [(0, 3, 0), (4, 8, 8), (1, 5, 3)]:
        assert np.allclose(c.affine @ np.r_[idx, 1], v.affine @ np.r_[np.add(idx, (2, -3, 5)), 1])
    full_img, crop_img = v.to_sitk(), sitk.ReadImage(str(tmp_path / "crop.nii.gz"))
    crop_arr, full_arr = sitk.GetArrayFromImage(crop_img), sitk.GetArrayFromImage(full_img)
    hits = 0
    for ijk in np.ndindex(*crop_img.GetSize()):
        point = crop_img.TransformIndexToPhysicalPoint(tuple(int(i) for i in ijk))
        f = full_img.TransformPhysicalPointToIndex(point)
        if all(0 <= x < n for x, n in zip(f, full_img.GetSize())):
            assert crop_arr[ijk[::-1]] == full_arr[f[::-1]]
            hits += 1
    assert hits == 5 * 6 * 9
    assert crop_img.GetDirection() == pytest.approx(full_img.GetDirection())
    with pytest.raises(ValueError, match="empty box"):
        io.crop_volume(v, (0, 0, 0), (0, 4, 4))


def test_dicom_series_read(tmp_path):
    vol = _random_volume()
    write_dicom_series(vol, tmp_path / "dcm")
    r = io.read_image(tmp_path / "dcm")
    assert r.geometry.matches(vol.geometry) is None
    assert np.allclose(r.data, vol.data, atol=0.5)  # 16-bit quantisation
    assert len(r.dicom_files) == vol.data.shape[0]


def test_dicom_zero_and_two_series(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FemursegError, match="no DICOM series"):
        io.read_image(tmp_path / "empty")
    vol = _random_volume()
    write_dicom_series(vol, tmp_path / "two")
    for p in write_dicom_series(vol, tmp_path / "tmp2"):
        p.rename(tmp_path / "two" / f"b_{p.name}")
    with pytest.raises(FemursegError, match="2 DICOM series"):
        io.read_image(tmp_path / "two")


def test_bad_inputs(tmp_path):
    with pytest.raises(FemursegError, match="no such file"):
        io.read_image(tmp_path / "missing.nii.gz")
    vol = _random_volume()
    io.write_volume(tmp_path / "ok.nii.gz", vol)
    raw = gzip.decompress((tmp_path / "ok.nii.gz").read_bytes())
    (tmp_path / "trunc.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(FemursegError, match="trunc.nii.gz: unreadable or truncated"):
        io.read_image(tmp_path / "trunc.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.float32)), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(FemursegError, match="2D"):
        io.read_image(tmp_path / "flat.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8, 3), np.float32), isVector=True), str(tmp_path / "rgb.nii.gz"))
    with pytest.raises(FemursegError, match="channels"):
        io.read_image(tmp_path / "rgb.nii.gz")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(FemursegError, match="unsupported"):
        io.read_image(tmp_path / "x.txt")


def test_write_is_atomic_and_checks_folder(tmp_path):
    vol = _random_volume()
    with pytest.raises(FemursegError, match="does not exist"):
        io.write_volume(tmp_path / "nope" / "x.nii.gz", vol)
    with pytest.raises(ValueError):
        io.write_like(tmp_path / "bad.nii.gz", np.zeros((2, 2, 2)), vol)  # wrong shape, nothing written
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_nan_is_reported(tmp_path, suffix):
    vol = _random_volume()
    arr = vol.data.copy()
    arr[1, 2, 3] = np.nan
    io.write_like(tmp_path / f"n{suffix}", arr, vol)
    with pytest.raises(FemursegError, match="1 NaN/Inf"):
        io.read_image(tmp_path / f"n{suffix}")
