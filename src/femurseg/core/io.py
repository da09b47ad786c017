"""Medical image input/output with explicit geometry and one canonical axis order.

Every image femurseg reads (NIfTI ``.nii``/``.nii.gz``, NRRD, MHA/MHD, or a folder
holding one DICOM series) becomes a :class:`Volume`:

* ``data``: a NumPy array in the **canonical axis order** ``(A, I, L)``:
  axis 0 runs through the coronal slices from posterior to anterior, axis 1 down the
  rows from superior to inferior, axis 2 along the columns from patient right to
  patient left. ``data[k]`` is one coronal slice, displayed head-up in the
  radiological convention. This is the order the papers work in (coronal slices).
* ``spacing``: voxel size in mm along the three canonical axes.
* ``geometry``: the on-disk (native) geometry (ITK/LPS convention: size, spacing,
  origin, direction) and the orientation transform between the native array order
  and the canonical one.

:func:`write_like` takes a canonical array and writes it with the *source's* native
geometry, undoing the reorientation, so masks and probability maps overlay the source
image exactly in 3D Slicer or ITK-SNAP and a read/reorient/write round trip restores
the original geometry bit for bit. Oblique direction matrices are reoriented to the
closest canonical axes (nibabel's ``io_orientation``); the exact oblique geometry is
kept for writing.

SimpleITK does all reading and writing (one library, one convention: its
``GetArrayFromImage`` returns arrays indexed ``[k, j, i]``); nibabel's orientation
utilities do the axis bookkeeping.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nibabel import orientations as nio

from femurseg.core.errors import FemursegError, atomic_path

CANONICAL_AXCODES: tuple[str, str, str] = ("A", "I", "L")
"""Canonical axis codes (nibabel convention: the direction in which the index grows)."""

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """Native image geometry in ITK convention (LPS physical space, index order i, j, k).

    ``size`` and ``spacing`` (mm) are per ITK index axis, ``origin`` (mm) is the LPS
    position of voxel (0, 0, 0), ``direction`` is the 3x3 direction cosine matrix
    flattened row-major (its columns are the index axes' directions).
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def from_sitk(cls, img: sitk.Image) -> Geometry:
        return cls(
            tuple(int(s) for s in img.GetSize()),
            tuple(float(s) for s in img.GetSpacing()),
            tuple(float(s) for s in img.GetOrigin()),
            tuple(float(d) for d in img.GetDirection()),
        )

    def apply_to(self, img: sitk.Image) -> None:
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)

    def numpy_affine(self) -> np.ndarray:
        """4x4 affine from NumPy indices ``[k, j, i]`` to RAS millimetres."""
        d = np.asarray(self.direction, dtype=float).reshape(3, 3)
        cols = d * np.asarray(self.spacing)[None, :]  # LPS vector per ITK axis i, j, k
        aff = np.eye(4)
        aff[:3, :3] = _LPS_TO_RAS @ cols[:, ::-1]  # NumPy axis n is ITK axis 2 - n
        aff[:3, 3] = _LPS_TO_RAS @ np.asarray(self.origin)
        return aff

    @classmethod
    def from_numpy_affine(cls, aff: np.ndarray, shape: tuple[int, ...]) -> Geometry:
        """Inverse of :meth:`numpy_affine` for an array of NumPy ``shape``."""
        cols = (_LPS_TO_RAS @ aff[:3, :3])[:, ::-1]
        spacing = np.linalg.norm(cols, axis=0)
        direction = cols / spacing[None, :]
        origin = _LPS_TO_RAS @ aff[:3, 3]
        return cls(
            tuple(int(s) for s in shape[::-1]),
            tuple(float(s) for s in spacing),
            tuple(float(o) for o in origin),
            tuple(float(x) for x in direction.ravel()),
        )

    def matches(self, other: Geometry, tol: float = 1e-4) -> str | None:
        """Return None if both geometries agree (spacing/origin/direction within
        ``tol``), else a short description of the first difference."""
        if self.size != other.size:
            return f"shape {self.size} != {other.size}"
        for name in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            if not np.allclose(a, b, atol=tol, rtol=0):
                fmt = lambda v: "(" + ", ".join(f"{x:.5g}" for x in v) + ")"  # noqa: E731
                return f"{name} {fmt(a)} != {fmt(b)}"
        return None


@dataclass
class Volume:
    """A 3D image in canonical axis order with everything needed to write results back.

    Attributes:
        data: array of shape ``(n_coronal, n_rows, n_cols)`` in canonical ``(A, I, L)`` order.
        spacing: voxel size in mm along the canonical axes.
        geometry: the native on-disk geometry.
        to_canonical: nibabel orientation transform from the native NumPy order to canonical.
        source: where it was read from ("" for arrays built in memory).
        dicom_files: for DICOM input, the series' files in slice order (for DICOM SEG).
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    geometry: Geometry
    to_canonical: np.ndarray
    source: str = ""
    dicom_files: list[str] = field(default_factory=list)

    @property
    def affine(self) -> np.ndarray:
        """4x4 affine from canonical indices to RAS mm."""
        native_shape = self.geometry.size[::-1]
        return self.geometry.numpy_affine() @ nio.inv_ornt_aff(self.to_canonical, native_shape)

    def with_data(self, data: np.ndarray) -> Volume:
        """Same geometry, new canonical array (must have the same shape)."""
        if data.shape != self.data.shape:
            raise ValueError(f"shape {data.shape} != volume shape {self.data.shape}")
        return Volume(data, self.spacing, self.geometry, self.to_canonical, self.source, self.dicom_files)

    def native_array(self, data: np.ndarray | None = None) -> np.ndarray:
        """``data`` (default: ``self.data``) reoriented back to the native NumPy order."""
        arr = self.data if data is None else data
        back = nio.ornt_transform(nio.axcodes2ornt(CANONICAL_AXCODES), nio.io_orientation(self.geometry.numpy_affine()))
        return np.ascontiguousarray(nio.apply_orientation(arr, back))

    def to_sitk(self, data: np.ndarray | None = None) -> sitk.Image:
        """A SimpleITK image of ``data`` (canonical) carrying the native geometry."""
        img = sitk.GetImageFromArray(self.native_array(data))
        self.geometry.apply_to(img)
        return img


def _orientation(geometry: Geometry) -> np.ndarray:
    native = nio.io_orientation(geometry.numpy_affine())
    return nio.ornt_transform(native, nio.axcodes2ornt(CANONICAL_AXCODES))


def _canonical_spacing(geometry: Geometry, to_canonical: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the canonical axes (the column norms of the canonical affine)."""
    affine = geometry.numpy_affine() @ nio.inv_ornt_aff(to_canonical, geometry.size[::-1])
    return tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))


def from_sitk(img: sitk.Image, source: str = "", dtype: np.dtype | type | None = np.float32) -> Volume:
    """Wrap a 3D SimpleITK image as a canonical :class:`Volume`."""
    geometry = Geometry.from_sitk(img)
    arr = sitk.GetArrayFromImage(img)  # a copy: a view would dangle once img is freed
    t = _orientation(geometry)
    data = np.ascontiguousarray(nio.apply_orientation(arr, t))
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    return Volume(data, _canonical_spacing(geometry, t), geometry, t, source)


def read_spacing(path: str | os.PathLike) -> tuple[float, float, float]:
    """Voxel size in mm along the canonical ``(A, I, L)`` axes of an image, read from the file's
    header alone where the format allows (NIfTI, NRRD, MHA); a DICOM folder is read whole."""
    p = Path(path)
    if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise FemursegError(f"{p}: unreadable or truncated image: {_first_line(exc)}") from None
        if reader.GetDimension() == 3:
            geometry = Geometry.from_sitk(reader)  # the reader has the image's geometry getters
            return _canonical_spacing(geometry, _orientation(geometry))
    return read_image(p).spacing


def make_volume(
    data: np.ndarray,
    spacing: tuple[float, float, float],
    native_axcodes: tuple[str, str, str] = ("P", "I", "L"),
    origin_ras: tuple[float, float, float] | None = None,
) -> Volume:
    """Build a :class:`Volume` for a canonical array (used by the phantom generator and tests).

    ``native_axcodes`` chooses how the array is stored on disk (NumPy order ``[k, j, i]``);
    the default ``(P, I, L)`` is how a scanner stores a coronal DICOM/NIfTI acquisition
    (rows along patient left, columns down, slices stacked towards posterior).
    ``origin_ras`` is the RAS position of canonical voxel (0, 0, 0); by default the
    volume is centred on the origin.
    """
    if data.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {data.shape}")
    canon_dirs = np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0]], dtype=float).T  # A, I, L in RAS
    aff = np.eye(4)
    aff[:3, :3] = canon_dirs * np.asarray(spacing, dtype=float)[None, :]
    if origin_ras is None:
        centre = aff[:3, :3] @ ((np.asarray(data.shape) - 1) / 2.0)
        aff[:3, 3] = -centre
    else:
        aff[:3, 3] = origin_ras
    t = nio.ornt_transform(nio.axcodes2ornt(CANONICAL_AXCODES), nio.axcodes2ornt(native_axcodes))
    native = nio.apply_orientation(data, t)
    native_aff = aff @ nio.inv_ornt_aff(t, data.shape)
    geometry = Geometry.from_numpy_affine(native_aff, native.shape)
    return Volume(np.ascontiguousarray(data), tuple(float(s) for s in spacing), geometry, _orientation(geometry))


def is_image_path(path: str | os.PathLike) -> bool:
    """True for a file with a supported image suffix or a folder (a DICOM series)."""
    p = Path(path)
    return p.is_dir() or p.name.lower().endswith(IMAGE_SUFFIXES)


def _read_sitk(path: Path) -> tuple[sitk.Image, list[str]]:
    if not path.exists():
        raise FemursegError(f"{path}: no such file or folder")
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise FemursegError(f"{path}: folder holds no DICOM series")
        if len(series) > 1:
            raise FemursegError(f"{path}: folder holds {len(series)} DICOM series ({', '.join(series)}); give one series per folder")
        files = list(reader.GetGDCMSeriesFileNames(str(path), series[0]))
        reader.SetFileNames(files)
        try:
            return reader.Execute(), files
        except RuntimeError as exc:
            raise FemursegError(f"{path}: cannot read DICOM series: {_first_line(exc)}") from None
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        raise FemursegError(f"{path}: unsupported file type (expected one of {', '.join(IMAGE_SUFFIXES)} or a DICOM folder)")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise FemursegError(f"{path}: unreadable or truncated image: {_first_line(exc)}") from None
    _check_nifti_complete(path, img)
    return img, []


def _check_nifti_complete(path: Path, img: sitk.Image) -> None:
    """Re-read NIfTI data with nibabel to catch what ITK's reader hides.

    ITK pads a truncated ``.nii``/``.nii.gz`` with zeros and turns NaN into 0, so a
    corrupt file would pass silently; nibabel raises on short data and keeps NaN.
    """
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return
    import nibabel as nib

    try:
        arr = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as exc:  # nibabel raises EOFError, OSError, zlib.error, ValueError...
        raise FemursegError(f"{path}: unreadable or truncated image: {exc}") from None
    _check_finite(path, arr)


def _check_finite(path: Path, arr: np.ndarray) -> None:
    if arr.dtype.kind in "fc":
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise FemursegError(f"{path}: image has {bad} NaN/Inf voxels (of {arr.size}); replace them (e.g. with "
                                "the image's minimum, what a scanner writes outside the field of view) and run again")


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages put the useful part after the source location.
    msg = next((ln for ln in lines if "Description:" in ln), lines[-1] if lines else type(exc).__name__)
    return msg.split("Description:")[-1].strip()


def read_image(path: str | os.PathLike, dtype: np.dtype | type | None = np.float32) -> Volume:
    """Read a 3D image (NIfTI, NRRD, MHA/MHD or a DICOM series folder) as a canonical Volume.

    Args:
        path: file, or folder holding exactly one DICOM series.
        dtype: cast the data to this type (``None`` keeps the stored type, as for labels).

    Raises:
        FemursegError: missing/unreadable/truncated file, zero or several DICOM series, an
            image that is not 3D (2D, 4D with more than one volume, or multi-channel), or
            NaN/Inf voxels.
    """
    p = Path(path)
    img, files = _read_sitk(p)
    if img.GetNumberOfComponentsPerPixel() > 1:
        raise FemursegError(f"{p}: image has {img.GetNumberOfComponentsPerPixel()} channels per voxel; expected a single-channel 3D image")
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3:
        raise FemursegError(f"{p}: image is {img.GetDimension()}D with size {img.GetSize()}; expected a 3D volume")
    if min(img.GetSize()) < 2:
        raise FemursegError(f"{p}: image has size {img.GetSize()}, a single slice; expected a 3D volume")
    vol = from_sitk(img, str(p), dtype)
    _check_finite(p, vol.data)
    vol.dicom_files = files
    return vol


def write_like(path: str | os.PathLike, data: np.ndarray, like: Volume, dtype: np.dtype | type | None = None) -> Path:
    """Write a canonical array with the native geometry of ``like`` (atomically).

    The format follows the suffix (``.nii.gz`` recommended; NRRD and MHA also work).
    Masks should be passed as ``uint8`` and probability maps as ``float32``.
    """
    p = Path(path)
    if data.shape != like.data.shape:
        raise ValueError(f"array shape {data.shape} != reference volume shape {like.data.shape}")
    if not p.name.lower().endswith(IMAGE_SUFFIXES):
        raise FemursegError(f"{p}: output must end in one of {', '.join(IMAGE_SUFFIXES)}")
    arr = data if dtype is None else data.astype(dtype, copy=False)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    img = like.to_sitk(arr)
    with atomic_path(p) as tmp:
        sitk.WriteImage(img, str(tmp), True)
    return p


def box_slices(start: Sequence[int], stop: Sequence[int], shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """The part of the box ``[start, stop)`` inside an image of ``shape``: its slices in the
    image and in the box (the box may reach outside the image on any side)."""
    src, dst = [], []
    for a, b, n in zip(start, stop, shape):
        lo, hi = min(max(a, 0), n), max(min(b, n), 0)
        hi = max(hi, lo)
        src.append(slice(lo, hi))
        dst.append(slice(lo - a, hi - a))
    return tuple(src), tuple(dst)


def crop_array(arr: np.ndarray, start: Sequence[int], stop: Sequence[int], fill: float = 0) -> np.ndarray:
    """The box ``[start, stop)`` over the last three axes of ``arr`` (``(..., X, Y, Z)``), as a
    new array; the part of the box outside the image is ``fill``."""
    shape = tuple(int(b - a) for a, b in zip(start, stop))
    if min(shape) < 1:
        raise ValueError(f"crop: empty box {tuple(start)}..{tuple(stop)}")
    a = np.asarray(arr)
    src, dst = box_slices(start, stop, a.shape[-3:])
    out = np.full(a.shape[:-3] + shape, fill, dtype=a.dtype)
    out[(Ellipsis, *dst)] = a[(Ellipsis, *src)]
    return out


def crop_volume(vol: Volume, start: tuple[int, int, int], stop: tuple[int, int, int], fill: float = 0) -> Volume:
    """The canonical box ``[start, stop)`` of ``vol`` as a :class:`Volume` of its own.

    The box may reach outside the image (those voxels are ``fill``). The crop keeps the native
    axis order, direction cosines and spacing, and its origin is moved so that every voxel stays
    at its physical position: written out, it overlays the original scan in 3D Slicer or ITK-SNAP.
    """
    data = crop_array(vol.data, start, stop, fill)
    shape = data.shape
    aff = vol.affine.copy()  # canonical index -> RAS
    aff[:3, 3] = aff[:3, :3] @ np.asarray(start, float) + aff[:3, 3]
    to_native = nio.ornt_transform(nio.axcodes2ornt(CANONICAL_AXCODES), nio.io_orientation(vol.geometry.numpy_affine()))
    native = nio.apply_orientation(data, to_native)
    geometry = Geometry.from_numpy_affine(aff @ nio.inv_ornt_aff(to_native, shape), native.shape)
    return Volume(data, vol.spacing, geometry, _orientation(geometry), vol.source)


def write_volume(path: str | os.PathLike, vol: Volume, dtype: np.dtype | type | None = None) -> Path:
    """Write a :class:`Volume` with its own geometry."""
    return write_like(path, vol.data, vol, dtype)


def strip_image_suffix(name: str) -> str:
    """``'case_0001.nii.gz'`` -> ``'case_0001'`` for any supported suffix."""
    low = name.lower()
    for suf in IMAGE_SUFFIXES:
        if low.endswith(suf):
            return name[: -len(suf)]
    return name
