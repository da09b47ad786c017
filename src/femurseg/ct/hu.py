"""CT intensities: the Hounsfield-unit check and the HU window (paper 003's input).

* :func:`check_hu` warns (:class:`HUWarning`) when an image declared CT does not look like
  Hounsfield units; :func:`hu_range` gives the numbers it judges.
* :func:`normalise_hu` clips to a HU window and scales it to [0, 1] (``preprocess.normalise``
  with ``normalise="ct"``; one implementation).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from femurseg.core.errors import FemursegError

BONE_THRESHOLD_HU = 200.0
"""Coarse bone threshold: cortical and dense trabecular bone are above it, soft tissue below."""


class HUWarning(UserWarning):
    """An image declared CT whose intensities do not look like Hounsfield units."""


def hu_range(data: np.ndarray) -> tuple[float, float, float, float]:
    """``(min, p0.5, p99.5, max)`` of the intensities (percentiles on at most ~2M voxels)."""
    a = np.asarray(data)
    flat = a.ravel()
    if flat.size > 2_000_000:
        flat = flat[:: flat.size // 2_000_000 + 1]
    p_lo, p_hi = np.percentile(flat, [0.5, 99.5])
    return float(a.min()), float(p_lo), float(p_hi), float(a.max())


def check_hu(data: np.ndarray, where: str = "image") -> bool:
    """Warn if an image declared CT does not look like Hounsfield units.

    Rule (robust percentiles, so a few outliers do not decide): a CT of the hip holds fat
    (about -100 HU; air, -1000, when the body outline is in the field of view) and bone
    (cortex 1000-2000 HU). It is flagged when

    * the 0.5th percentile is above -50 HU: no fat or air, typical of stored values without
      the rescale intercept (0..4095) or of an already normalised image; or
    * the 99.5th percentile is below 300 HU: no bone, typical of a [0, 1] or z-scored image; or
    * the maximum is above 5000 HU: beyond any CT scale (raw 16-bit values).

    Args:
        data: the image (any shape).
        where: name for the message (a path).

    Returns:
        True when the range looks like HU (no warning), False after warning with the observed
        range.
    """
    lo, p_lo, p_hi, hi = hu_range(data)
    reasons = []
    if p_lo > -50.0:
        reasons.append("no fat or air below -50 HU")
    if p_hi < 300.0:
        reasons.append("no bone above 300 HU")
    if hi > 5000.0:
        reasons.append("values above 5000 HU")
    if not reasons:
        return True
    warnings.warn(
        f"{where}: intensities do not look like Hounsfield units ({', '.join(reasons)}; observed min {lo:.4g}, "
        f"0.5-99.5th percentiles {p_lo:.4g}..{p_hi:.4g}, max {hi:.4g}); check the rescale slope/intercept",
        HUWarning, stacklevel=2)
    return False


def normalise_hu(data: np.ndarray, window: tuple[float, float] = (-200.0, 1800.0)) -> np.ndarray:
    """Clip Hounsfield units to ``window`` and scale linearly to [0, 1] (float32).

    The same operation as ``PreprocessConfig(normalise="ct", ct_window=window)`` in
    :mod:`femurseg.data.preprocess` (it is that function).
    """
    from femurseg.data.preprocess import PreprocessConfig, normalise

    cfg = PreprocessConfig(crop_slices=None, target_size=None, scale=None, normalise="ct", ct_window=tuple(window))
    return normalise(np.asarray(data, dtype=np.float32), cfg)[0]


def check_ct_dataset(ds: Any, where: str) -> None:
    """Raise unless the dataset declares the CT compartment labels (1 trabecular, 2 cortical)."""
    if not {1, 2} <= set(ds.label_values):
        raise FemursegError(f"{where}: the cascade needs CT labels (1 trabecular, 2 cortical); "
                            f"the dataset declares {ds.labels}")
