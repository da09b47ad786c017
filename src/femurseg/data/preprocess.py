"""Preprocessing of paper 001 (Methods, "Dataset"), each step optional and recorded in a run's config.

Steps, in order, on a canonical ``(A, I, L)`` volume ``(n_coronal, rows, cols)``:

1. **Crop** to the central ``crop_slices`` coronal slices (paper: the central 48 of 60, 7.2 cm,
   covering the proximal femur), or to the central slab of ``crop_mm`` millimetres (the slice
   count rounded from the scan's slice spacing). A volume with fewer slices is kept whole. When
   the surplus is odd the extra slice is dropped at the anterior end (``start = (n - N) // 2``).
2. **In-plane resampling** of every coronal slice to ``target_size = (rows, cols)``, to pixels of
   ``spacing_mm = (row_mm, col_mm)`` (sizes rounded), or by ``scale`` (a factor, 0.5 halves rows
   and columns), then, with ``slice_mm``, along the slice axis to slices of that spacing;
   paper: 512 x 512 -> 256 x 256 with
   bicubic spline interpolation. Images use ``scipy.ndimage.zoom(order=3)`` (a true cubic
   B-spline, as in the paper, not PyTorch's cubic-convolution "bicubic"); labels use
   per-class linear interpolation then argmax (``label_interp="linear"``: for a binary mask
   that is linear-then-threshold at 0.5, smoother than nearest neighbour when downsampling)
   or nearest neighbour. The zoom maps pixel *areas* (``grid_mode=True``): the resampled
   pixel size is ``spacing * old / new`` and the field of view is unchanged, so
   :func:`restore` is the exact geometric inverse.
3. **Intensity normalisation**: ``"zscore"`` (mean 0, SD 1 over the cropped volume), ``"body"``
   (the same with the mean and SD of the body alone: the voxels above ``min + BODY_LEVEL x
   (p99 - min)``, so air and dark background are left out of the statistics and the result does
   not depend on how much of the field of view they fill; nnU-Net's ``use_mask_for_norm`` with a
   body mask in place of its non-zero mask, since scanner air is noise, not zero),
   ``"percentile"`` (clip to the ``percentiles`` of the volume, e.g. (1, 99), then z-score),
   ``"ct"`` (clip Hounsfield units to ``ct_window`` and scale it linearly to [0, 1]) or ``"none"``.
   Normalisation runs after resampling (statistics of what the network sees).

:func:`preprocess_image` returns the network input and a :class:`PrepInfo` that holds what
is needed to go back: :func:`preprocess_label` applies the same crop and resampling to a
label, :func:`restore` maps a prediction (probabilities or a mask) back onto the original
grid, with background outside the cropped slices. Evaluation is always on the original grid
against the original-resolution masks (paper 001: "against the original (512 x 512)
hand-segmented masks").

Defaults (``PreprocessConfig()``) are the CPU-friendly ones used by ``femurseg cv``;
``PreprocessConfig.preset("paper")`` gives the paper's (48 slices, 256 x 256, z-score).

Millimetres, not voxels. The paper's steps are in voxels because its scans shared one protocol.
``femurseg cv`` fixes the default preset's factor and slice count in millimetres for the
training data (:meth:`PreprocessConfig.in_millimetres`: ``spacing_mm`` = median training pixel
size / ``scale``, ``crop_mm`` = ``crop_slices`` x median slice spacing) and stores them in the
run, with ``slice_mm`` = the median training slice spacing, so the network sees the femur at
the size it was trained on whatever a new scan's pixel size and slice spacing (nnU-Net's
target spacing); on the training data itself nothing changes (a scan already at ``slice_mm``
is not resampled along the slice axis). The paper preset (fixed ``target_size``, no slice
resampling, as in the papers) is kept as it is, and so is the CT preset (no zoom factor to
convert; the cascade keeps the voxels as acquired: resampling CT to a target spacing is not
measured yet).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from scipy import ndimage

from femurseg.core.errors import FemursegError

NORMALISATIONS = ("zscore", "body", "percentile", "ct", "none")
BODY_LEVEL = 0.1
"""``"body"`` normalisation: the body is what lies above this fraction of the way from the
volume's minimum to its 99th percentile (air noise is below it, muscle at 0.2-0.5 of fat above)."""
BODY_MIN_VOXELS = 1000
"""Fewer body voxels than this (a blank or near-constant image): the whole volume's statistics."""
LABEL_INTERPS = ("linear", "nearest")


@dataclass
class PreprocessConfig:
    """What :func:`preprocess_image` does; every step can be switched off (``None`` / ``"none"``).

    Attributes:
        crop_slices: keep the central N coronal slices (None: keep all). Paper: 48.
        crop_mm: keep the central slab of this thickness in mm instead (None: ``crop_slices``).
        target_size: in-plane size ``(rows, cols)`` after resampling (None: see ``spacing_mm``).
        spacing_mm: in-plane pixel size ``(row_mm, col_mm)`` after resampling, when no
            ``target_size`` (None: see ``scale``).
        scale: in-plane zoom factor when neither is set (None or 1: no resampling).
        slice_mm: resample the (cropped) slab along the slice axis to slices of this spacing in
            mm, the count rounded (None: keep the slices).
        normalise: "zscore", "percentile", "ct" or "none".
        percentiles: (low, high) percentiles clipped before the z-score for "percentile".
        ct_window: (low, high) Hounsfield window for "ct", mapped to [0, 1].
        label_interp: "linear" (per-class linear, then argmax) or "nearest".
    """

    crop_slices: int | None = 48
    target_size: tuple[int, int] | None = None
    scale: float | None = 0.5
    spacing_mm: tuple[float, float] | None = None
    crop_mm: float | None = None
    slice_mm: float | None = None
    normalise: str = "zscore"
    percentiles: tuple[float, float] = (1.0, 99.0)
    ct_window: tuple[float, float] = (-200.0, 1800.0)
    label_interp: str = "linear"

    def __post_init__(self) -> None:
        if self.target_size is not None:
            self.target_size = tuple(int(v) for v in self.target_size)  # type: ignore[assignment]
        if self.spacing_mm is not None:
            self.spacing_mm = tuple(float(v) for v in self.spacing_mm)  # type: ignore[assignment]
        self.percentiles = tuple(float(v) for v in self.percentiles)  # type: ignore[assignment]
        self.ct_window = tuple(float(v) for v in self.ct_window)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        """Raise :class:`FemursegError` for an impossible configuration."""
        if self.crop_slices is not None and int(self.crop_slices) < 1:
            raise FemursegError(f"preprocessing: crop_slices={self.crop_slices} must be >= 1 (or None)")
        if self.target_size is not None and (len(self.target_size) != 2 or min(self.target_size) < 2):
            raise FemursegError(f"preprocessing: target_size={self.target_size} must be two sizes >= 2 (rows, cols)")
        if self.scale is not None and not (0 < float(self.scale) <= 8):
            raise FemursegError(f"preprocessing: scale={self.scale} must be in (0, 8]")
        if self.spacing_mm is not None and (len(self.spacing_mm) != 2 or min(self.spacing_mm) <= 0):
            raise FemursegError(f"preprocessing: spacing_mm={self.spacing_mm} must be two pixel sizes > 0 (row, col mm)")
        if self.crop_mm is not None and float(self.crop_mm) <= 0:
            raise FemursegError(f"preprocessing: crop_mm={self.crop_mm} must be > 0 (or None)")
        if self.slice_mm is not None and float(self.slice_mm) <= 0:
            raise FemursegError(f"preprocessing: slice_mm={self.slice_mm} must be > 0 (or None)")
        if self.normalise not in NORMALISATIONS:
            raise FemursegError(f"preprocessing: normalise={self.normalise!r} is not one of {', '.join(NORMALISATIONS)}")
        lo, hi = self.percentiles
        if not (0 <= lo < hi <= 100):
            raise FemursegError(f"preprocessing: percentiles={self.percentiles} must satisfy 0 <= low < high <= 100")
        if not self.ct_window[0] < self.ct_window[1]:
            raise FemursegError(f"preprocessing: ct_window={self.ct_window} must be (low, high) with low < high")
        if self.label_interp not in LABEL_INTERPS:
            raise FemursegError(f"preprocessing: label_interp={self.label_interp!r} is not one of {', '.join(LABEL_INTERPS)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> PreprocessConfig:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FemursegError(f"preprocessing: unknown option(s) {', '.join(unknown)}")
        return cls(**d)

    def in_millimetres(self, spacing: tuple[float, float, float]) -> PreprocessConfig:
        """This configuration with the in-plane ``scale`` and the ``crop_slices`` turned into
        ``spacing_mm`` and ``crop_mm``, and ``slice_mm`` set to the slice spacing, for data of
        (median) canonical ``spacing`` (mm, A x I x L).

        Only a zoom by ``scale`` is converted (with no ``target_size`` or ``spacing_mm`` set), and
        the crop with it; anything else is returned unchanged. On data of exactly ``spacing``
        the result preprocesses to the same grid as ``self``.
        """
        if self.target_size is not None or self.spacing_mm is not None or self.scale is None:
            return self
        sp = [float(v) for v in spacing]
        d = self.to_dict()
        d["spacing_mm"] = [sp[1] / float(self.scale), sp[2] / float(self.scale)]
        if self.crop_slices is not None and self.crop_mm is None:
            d["crop_mm"] = float(self.crop_slices) * sp[0]
        if self.slice_mm is None:
            d["slice_mm"] = sp[0]
        return PreprocessConfig.from_dict(d)

    @classmethod
    def preset(cls, name: str) -> PreprocessConfig:
        """``"default"`` (CPU-friendly: 48 slices, in-plane x0.5, z-score), ``"paper"``
        (48 slices, 256 x 256 bicubic spline, z-score) or ``"ct"`` (HU window -200..1800)."""
        if name == "default":
            return cls()
        if name == "paper":
            return cls(crop_slices=48, target_size=(256, 256), scale=None, normalise="zscore")
        if name == "ct":
            return cls(crop_slices=None, target_size=None, scale=None, normalise="ct")
        raise FemursegError(f"preprocessing: unknown preset {name!r} (default, paper, ct)")


@dataclass
class PrepInfo:
    """What :func:`preprocess_image` did to one volume (enough to undo the geometry).

    Shapes are canonical ``(n_coronal, rows, cols)``; spacings in mm.
    """

    original_shape: tuple[int, int, int]
    original_spacing: tuple[float, float, float]
    slice_start: int
    slice_stop: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def resampled(self) -> bool:
        """True when the slab was resampled in-plane or along the slice axis."""
        return self.shape[1:] != self.original_shape[1:] or self.shape[0] != self.slice_stop - self.slice_start

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrepInfo:
        return cls(
            tuple(d["original_shape"]), tuple(d["original_spacing"]), int(d["slice_start"]), int(d["slice_stop"]),
            tuple(d["shape"]), tuple(d["spacing"]), dict(d.get("stats", {})),
        )


def plan(shape: tuple[int, ...], spacing: tuple[float, ...], cfg: PreprocessConfig) -> PrepInfo:
    """The geometry :func:`preprocess_image` will produce for a volume of ``shape`` (no data)."""
    if len(shape) != 3:
        raise FemursegError(f"preprocessing: expected a 3D volume, got shape {tuple(shape)}")
    n, h, w = (int(s) for s in shape)
    sp = tuple(float(s) for s in spacing)
    if cfg.crop_mm is not None:
        keep = min(max(1, int(round(float(cfg.crop_mm) / sp[0]))), n)
    else:
        keep = n if cfg.crop_slices is None else min(int(cfg.crop_slices), n)
    start = (n - keep) // 2
    if cfg.target_size is not None:
        th, tw = cfg.target_size
    elif cfg.spacing_mm is not None:
        th, tw = (max(2, int(round(h * sp[1] / cfg.spacing_mm[0]))), max(2, int(round(w * sp[2] / cfg.spacing_mm[1]))))
    elif cfg.scale is not None and float(cfg.scale) != 1.0:
        th, tw = max(2, int(round(h * cfg.scale))), max(2, int(round(w * cfg.scale)))
    else:
        th, tw = h, w
    nd = keep if cfg.slice_mm is None else max(1, int(round(keep * sp[0] / float(cfg.slice_mm))))
    new_spacing = (sp[0] * keep / nd, sp[1] * h / th, sp[2] * w / tw)
    return PrepInfo((n, h, w), sp, start, start + keep, (nd, th, tw), new_spacing)


def _zoom_inplane(arr: np.ndarray, size: tuple[int, int], order: int) -> np.ndarray:
    """Resample the last two axes of ``arr`` (..., H, W) to ``size`` (area-aligned grids)."""
    h, w = arr.shape[-2:]
    if (h, w) == tuple(size):
        return arr
    factors = (size[0] / h, size[1] / w)
    # Slice by slice in 2D: a 3D zoom with factor 1 along the leading axes would still run the
    # spline prefilter and 4-tap interpolation along them (same values, ~2-3x the time).
    flat = np.ascontiguousarray(arr).reshape(-1, h, w)
    out = np.empty((flat.shape[0], *size), dtype=flat.dtype)

    def one(i: int) -> None:
        z = ndimage.zoom(flat[i], factors, order=order, mode="reflect", grid_mode=True, prefilter=order > 1)
        if z.shape != tuple(size):  # floating-point rounding in zoom's output shape
            raise AssertionError(f"zoom produced {z.shape}, expected {size}")
        out[i] = z

    # slices are independent and scipy's zoom releases the GIL: one thread per core (same values)
    workers = min(_threads(), flat.shape[0]) if h * w >= 1 << 16 else 1
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(flat.shape[0])))
    else:
        for i in range(flat.shape[0]):
            one(i)
    return out.reshape(*arr.shape[:-2], *size)


def _zoom_slices(arr: np.ndarray, n: int, order: int) -> np.ndarray:
    """Resample the slice axis of ``arr`` (..., D, H, W) to ``n`` slices (area-aligned, as
    :func:`_zoom_inplane`: a 2D zoom of every (D, W) plane with factor 1 along W, which the
    interpolating spline leaves unchanged)."""
    if arr.shape[-3] == n:
        return arr
    return np.ascontiguousarray(_zoom_inplane(np.swapaxes(arr, -3, -2), (n, arr.shape[-1]), order).swapaxes(-3, -2))


def _threads() -> int:
    """Worker threads for slice-parallel resampling: torch's intra-op thread count (the cores
    femurseg is allowed to use), at least 1."""
    try:
        import torch

        return max(1, int(torch.get_num_threads()))
    except ImportError:  # pragma: no cover - torch is a dependency
        return 1


def preprocess_image(data: np.ndarray, spacing: tuple[float, float, float], cfg: PreprocessConfig) -> tuple[np.ndarray, PrepInfo]:
    """Crop, resample in-plane and normalise one canonical image.

    Args:
        data: canonical ``(n_coronal, rows, cols)`` image (any real dtype).
        spacing: mm per canonical axis.
        cfg: the steps to apply.

    Returns:
        ``(array, info)``: float32 ``info.shape`` array and the :class:`PrepInfo` for
        :func:`preprocess_label` and :func:`restore`.
    """
    info = plan(data.shape, spacing, cfg)
    arr = np.asarray(data[info.slice_start:info.slice_stop], dtype=np.float32)
    arr = _zoom_inplane(arr, info.shape[1:], order=3)
    arr = _zoom_slices(arr, info.shape[0], order=3)
    arr, info.stats = normalise(arr, cfg)
    return np.ascontiguousarray(arr, dtype=np.float32), info


def normalise(arr: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, dict[str, float]]:
    """Intensity normalisation of ``cfg.normalise``; returns the array and the statistics used."""
    arr = arr.astype(np.float32, copy=False)
    if cfg.normalise == "none":
        return arr, {}
    if cfg.normalise == "ct":
        lo, hi = cfg.ct_window
        return ((np.clip(arr, lo, hi) - lo) / (hi - lo)).astype(np.float32), {"low": lo, "high": hi}
    stats: dict[str, float] = {}
    if cfg.normalise == "body":
        lo = float(arr.min())
        level = lo + BODY_LEVEL * (float(np.percentile(arr, 99.0)) - lo)
        body = arr > level
        n = int(np.count_nonzero(body))
        values = arr[body] if n >= BODY_MIN_VOXELS else arr
        mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
        stats.update(mean=mean, std=std, body_level=level, body_fraction=n / arr.size)
        return ((arr - mean) / max(std, 1e-6)).astype(np.float32), stats
    if cfg.normalise == "percentile":
        lo, hi = (float(v) for v in np.percentile(arr, cfg.percentiles))
        arr = np.clip(arr, lo, hi)
        stats.update(clip_low=lo, clip_high=hi)
    mean = float(arr.mean(dtype=np.float64))
    std = float(arr.std(dtype=np.float64))
    stats.update(mean=mean, std=std)
    return ((arr - mean) / max(std, 1e-6)).astype(np.float32), stats


def preprocess_label(label: np.ndarray, info: PrepInfo, cfg: PreprocessConfig | None = None,
                     num_classes: int | None = None) -> np.ndarray:
    """Apply the crop and in-plane resampling of ``info`` to a label (uint8, same shape as the image).

    ``cfg.label_interp`` "linear" (default) interpolates each class's indicator linearly and
    takes the argmax (binary: linear-then-threshold at 0.5); "nearest" uses nearest neighbour.
    ``num_classes`` defaults to ``label.max() + 1``.
    """
    if tuple(label.shape) != info.original_shape:
        raise FemursegError(f"label shape {tuple(label.shape)} differs from the image shape {info.original_shape}")
    lab = np.asarray(label[info.slice_start:info.slice_stop]).astype(np.uint8, copy=False)
    interp = cfg.label_interp if cfg is not None else "linear"
    return _resample_label_slices(resample_label(lab, info.shape[1:], interp, num_classes), info.shape[0], interp,
                                  num_classes)


def _resample_label_slices(lab: np.ndarray, n: int, interp: str, num_classes: int | None) -> np.ndarray:
    """:func:`resample_label` along the slice axis of ``lab`` (D, H, W) to ``n`` slices."""
    if lab.shape[0] == n:
        return lab
    return np.ascontiguousarray(resample_label(lab.swapaxes(0, 1), (n, lab.shape[2]), interp, num_classes).swapaxes(0, 1))


def resample_label(lab: np.ndarray, size: tuple[int, int], interp: str = "linear",
                   num_classes: int | None = None) -> np.ndarray:
    """Resample the last two axes of an integer label ``(..., H, W)`` to ``size`` (uint8 out).

    "linear": each class indicator is interpolated linearly and the argmax taken (binary:
    linear-then-threshold at 0.5); "nearest": nearest neighbour.
    """
    lab = np.asarray(lab).astype(np.uint8, copy=False)
    if tuple(lab.shape[-2:]) == tuple(size):
        return np.ascontiguousarray(lab)
    if interp == "nearest":
        return np.ascontiguousarray(_zoom_inplane(lab, size, order=0).astype(np.uint8))
    n_cls = max(2, int(num_classes or (int(lab.max()) + 1)))
    if n_cls == 2:
        fg = _zoom_inplane((lab > 0).astype(np.float32), size, order=1)
        return (fg >= 0.5).astype(np.uint8)
    scores = np.stack([_zoom_inplane((lab == c).astype(np.float32), size, order=1) for c in range(n_cls)])
    return scores.argmax(axis=0).astype(np.uint8)


def restore(pred: np.ndarray, info: PrepInfo, order: int = 1) -> np.ndarray:
    """Map a prediction on the preprocessed grid back onto the original grid.

    Args:
        pred: ``info.shape`` (D, H, W) probability map / mask, or ``(C, D, H, W)`` class
            probabilities.
        info: from :func:`preprocess_image`.
        order: spline order of the in-plane resampling (1 linear for probabilities,
            0 nearest for masks; 3 is clipped to [0, 1] for float input).

    Returns:
        ``info.original_shape`` array (or ``(C, *original_shape)``) of ``pred``'s dtype:
        background outside the cropped slices (0; for ``(C, ...)`` input channel 0 is 1 there).
    """
    pred = np.asarray(pred)
    multi = pred.ndim == 4
    if tuple(pred.shape[-3:]) != info.shape:
        raise FemursegError(f"prediction shape {tuple(pred.shape[-3:])} differs from the preprocessed shape {info.shape}")
    dtype = pred.dtype
    size = info.original_shape[1:]
    keep = info.slice_stop - info.slice_start
    if not np.issubdtype(dtype, np.floating):  # a mask / label map
        if multi:
            raise FemursegError("restore: a (C, D, H, W) prediction must be floating point")
        interp = "linear" if order > 0 else "nearest"
        up = resample_label(_resample_label_slices(pred, keep, interp, None), size, interp).astype(dtype)
    else:
        up = _zoom_inplane(_zoom_slices(pred, keep, order=order), size, order=order)
        if order > 1:
            up = np.clip(up, 0.0, 1.0)
    lead = (pred.shape[0],) if multi else ()
    out = np.zeros(lead + info.original_shape, dtype=dtype)
    if multi:
        out[0] = 1
    out[..., info.slice_start:info.slice_stop, :, :] = up.astype(dtype, copy=False)
    return out
