"""Per-scan quality control of ``femurseg predict``: is the scan like the training scans, is the mask plausible?

A researcher who segments a cohort cannot look at every mask; QC says which scans femurseg could
not segment. Training (:func:`femurseg.training.cv.run_cv`) stores what the model saw in
``RUN/qc_reference.json`` (:func:`reference_from_cases`): per training case the features of
:func:`image_features` and :func:`mask_features` of its reference label. At prediction
:func:`assess` compares the scan and its mask with that reference and with the fold models'
agreement, and gives a verdict ``ok``, ``warn`` or ``fail`` with its reasons.

The rule (each line one reason; the verdict is the worst):

``fail``
    * constant image: the robust intensity range (99th - 1st percentile) is 0 (a blank scan);
    * no image structure: the correlation of horizontally adjacent voxels (:func:`image_features`
      ``smoothness``; 0.88 on the MR phantoms, 0.0 for white noise) is under half the lowest
      training value;
    * intensities unlike the training scans: the fraction of voxels below 0 exceeds
      ``max(0.02, 3 x`` the training maximum) (a CT in HU, with air at -1000, given to an MR model,
      whose magnitude images are >= 0), or is under a third of the training minimum when every
      training scan had more than 5 % (an MR given to a CT model);
    * empty mask;
    * femur volume under half the smallest or over twice the largest training label volume;
    * fold models disagree: mean pairwise Dice of the fold masks under 0.5;
    * no femoral head: :func:`femurseg.ct.regions.femoral_head_check`, which ``femurseg predict``
      passes in (``checks``), finds no head sphere on the mask.

``warn``
    * femur volume outside [0.8 x smallest, 1.25 x largest] training volume;
    * several large components: a second 3D component with >= 10 % of the largest one's voxels;
    * fold models agree only partly: mean pairwise Dice under 0.85;
    * field of view outside [0.5 x, 2 x] the training range along an axis.

The margins were checked on the out-of-fold masks of ``make demo`` runs with
:func:`femurseg.evaluation.compare.qc_rows` (``femurseg compare RUN`` writes ``table_qc.csv``):
narrow phantom world (2026-12-05), 16 of 16 ``ok`` (out-of-fold volumes 96.6-126.7 cm^3, training
labels 95.7-133.1 cm^3); wide world (2026-12-06), 16 of 16 ``ok`` (91.7-140.3 cm^3, training
81.5-150.1 cm^3), after the femoral-head rule of :mod:`femurseg.ct.regions` was relaxed to a head
centre at least half a head radius from the shaft axis (at one radius it failed two good masks,
DSC 0.93, and 3 of 60 reference labels of the wide world). The fold-agreement and component rules
are conservative defaults (paper 001's 3D U-Nets agree to Dice > 0.95 on scans they segment well).
A run without ``qc_reference.json``
(made before QC existed, or a CT cascade) gets the checks that need no reference.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from femurseg.inference.postprocess import femur_components

QC_REFERENCE_NAME = "qc_reference.json"
"""The run folder's record of what the model saw (written by ``femurseg cv``)."""

QC_MODES = ("off", "on", "strict")
"""``--qc``: off (no checks), on (checks, masks always written), strict (``fail`` scans get no mask, exit 2)."""

VERDICTS = ("ok", "warn", "fail")

_SAMPLE = 200_000  # voxels sampled for the percentiles of a large image


def image_features(data: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Intensity and structure features of a canonical ``(A, I, L)`` image (spacing in mm).

    Returns ``p1``, ``p50``, ``p99`` (intensity percentiles), ``negative_fraction`` (voxels < 0),
    ``smoothness`` (correlation of voxels with their neighbour along axis 2, on the z-scored
    image; near 1 for anatomy, near 0 for noise) and ``fov_mm_0..2`` (field of view in mm)."""
    d = np.asarray(data, dtype=np.float32)
    finite = d[np.isfinite(d)]
    flat = finite if finite.size <= _SAMPLE else finite[:: max(1, finite.size // _SAMPLE)]
    p1, p50, p99 = (float(v) for v in np.percentile(flat, [1, 50, 99])) if flat.size else (0.0, 0.0, 0.0)
    smooth = 0.0
    if d.shape[-1] > 1 and flat.size and float(np.std(flat)) > 0:
        a, b = d[..., :-1].ravel(), d[..., 1:].ravel()
        keep = np.isfinite(a) & np.isfinite(b)
        a, b = a[keep], b[keep]
        step = max(1, a.size // (4 * _SAMPLE))
        a, b = a[::step].astype(np.float64), b[::step].astype(np.float64)
        if a.std() > 0 and b.std() > 0:
            smooth = float(np.corrcoef(a, b)[0, 1])
    feats = {"p1": p1, "p50": p50, "p99": p99, "negative_fraction": float(np.mean(flat < 0)) if flat.size else 0.0,
             "smoothness": smooth}
    for ax, (n, s) in enumerate(zip(d.shape, spacing)):
        feats[f"fov_mm_{ax}"] = float(n) * float(s)
    return feats


def mask_features(mask: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """``volume_cm3``, ``components`` (3D components with >= 10 % of the largest one's voxels) and
    the centroid's relative position in the field of view (``centroid_0..2`` in [0, 1])."""
    m = np.asarray(mask) > 0
    n = int(np.count_nonzero(m))
    out: dict[str, float] = {"volume_cm3": n * float(np.prod(spacing)) / 1000.0, "components": 0.0}
    if n:
        lab, k = ndimage.label(m)
        sizes = np.bincount(lab.ravel())[1:]
        out["components"] = float(np.count_nonzero(sizes >= 0.1 * sizes.max()))
        for ax, c in enumerate(ndimage.center_of_mass(m)):
            out[f"centroid_{ax}"] = float(c) / max(m.shape[ax] - 1, 1)
    return out


def reference_from_cases(cases: Mapping[str, tuple[dict[str, float], dict[str, float]]]) -> dict[str, Any]:
    """``qc_reference.json`` from ``{case: (image_features, mask_features of its label)}``: per
    feature the min and max over the training cases."""
    ranges: dict[str, list[float]] = {}
    for img, lab in cases.values():
        for k, v in {**img, **{f"label_{k}": v for k, v in lab.items()}}.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                lo, hi = ranges.get(k, [v, v])
                ranges[k] = [min(lo, v), max(hi, v)]
    return {"format": "femurseg-qc-reference", "version": 1, "cases": len(cases), "ranges": ranges}


def write_reference(run_dir: str | Path, reference: Mapping[str, Any]) -> Path:
    from femurseg.inference.run import write_json

    path = Path(run_dir) / QC_REFERENCE_NAME
    write_json(path, dict(reference))
    return path


def load_reference(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's QC reference, or None (older runs, CT cascades)."""
    p = Path(run_dir) / QC_REFERENCE_NAME
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def fold_agreement(fold_masks: Sequence[np.ndarray]) -> float | None:
    """Mean pairwise Dice of the fold models' masks (None for fewer than 2; 1.0 when all are empty)."""
    ms = [np.asarray(m) > 0 for m in fold_masks]
    if len(ms) < 2:
        return None
    dices = []
    for i in range(len(ms)):
        for j in range(i + 1, len(ms)):
            s = int(ms[i].sum()) + int(ms[j].sum())
            dices.append(1.0 if s == 0 else 2.0 * int(np.count_nonzero(ms[i] & ms[j])) / s)
    return float(np.mean(dices))


def mean_entropy(prob: np.ndarray, mask: np.ndarray) -> float | None:
    """Mean binary entropy (bits) of the femur probability inside the mask (None for an empty mask)."""
    m = np.asarray(mask) > 0
    if not m.any():
        return None
    p = np.clip(np.asarray(prob, dtype=np.float64)[m], 1e-7, 1 - 1e-7)
    return float(np.mean(-(p * np.log2(p) + (1 - p) * np.log2(1 - p))))


MaskCheck = Callable[[np.ndarray, tuple[float, float, float]], list[str]]
"""``(mask, spacing_mm) -> reasons`` ("fail: ..." / "warn: ..."): a check that needs more than this
module knows, passed in by the caller, e.g. :func:`femurseg.ct.regions.femoral_head_check`."""


def assess(image: np.ndarray, spacing: Sequence[float], mask: np.ndarray, *, prob: np.ndarray | None = None,
           fold_masks: Sequence[np.ndarray] = (), reference: Mapping[str, Any] | None = None,
           checks: Sequence[MaskCheck] = (), femurs: int = 1) -> dict[str, Any]:
    """The QC record of one scan: ``verdict``, ``reasons`` (``"fail: ..."`` / ``"warn: ..."``) and
    the measured values (``image``, ``mask``, ``fold_agreement``, ``entropy_bits``).

    Args:
        image: the scan, canonical ``(A, I, L)``; spacing in mm.
        mask: the femur mask on the same grid (labels > 0 are femur).
        prob: the ensemble's femur probability (for the entropy), optional.
        fold_masks: each fold model's mask at the same threshold (for the agreement), optional.
        reference: the run's ``qc_reference.json`` (None: reference-free checks only).
        checks: further mask checks (:data:`MaskCheck`), run on a non-empty mask.
        femurs: how many femurs the mask may hold (2 after ``--postprocess lcc2``: both hips);
            with 2, the volume and ``checks`` apply to each femur (component of at least
            :data:`~femurseg.inference.postprocess.MIN_FEMUR_FRACTION` of the largest) and
            two large components are expected.
    """
    img, msk = image_features(image, spacing), mask_features(mask, spacing)
    agree = fold_agreement(fold_masks)
    ent = mean_entropy(prob, mask) if prob is not None else None
    reasons: list[str] = []
    rng = (reference or {}).get("ranges", {})

    def lohi(key: str) -> tuple[float, float] | None:
        v = rng.get(key)
        return (float(v[0]), float(v[1])) if isinstance(v, (list, tuple)) and len(v) == 2 else None

    if img["p99"] - img["p1"] <= 1e-6 * max(1.0, abs(img["p50"])):
        reasons.append(f"fail: constant image (intensity {img['p50']:.4g} everywhere)")
    else:
        sm = lohi("smoothness")
        if sm is not None and img["smoothness"] < 0.5 * sm[0]:
            reasons.append(f"fail: no image structure (neighbour correlation {img['smoothness']:.2f}, training >= "
                           f"{sm[0]:.2f}): noise, or not an image of this kind")
        neg = lohi("negative_fraction")
        if neg is not None:
            nf = img["negative_fraction"]
            if nf > max(0.02, 3 * neg[1]):
                reasons.append(f"fail: intensities unlike the training scans ({100 * nf:.0f} % of voxels < 0, training "
                               f"<= {100 * neg[1]:.1f} %): another modality (a CT in HU for an MR model)?")
            elif neg[0] > 0.05 and nf < neg[0] / 3:
                reasons.append(f"fail: intensities unlike the training scans ({100 * nf:.1f} % of voxels < 0, training "
                               f">= {100 * neg[0]:.0f} %): another modality (an MR for a CT model)?")
        for ax in range(3):
            fov = lohi(f"fov_mm_{ax}")
            if fov is not None and not 0.5 * fov[0] <= img[f"fov_mm_{ax}"] <= 2.0 * fov[1]:
                reasons.append(f"warn: field of view {img[f'fov_mm_{ax}']:.0f} mm along axis {ax}, training "
                               f"{fov[0]:.0f}-{fov[1]:.0f} mm")
    femurs = max(int(femurs), 1)
    parts = [np.asarray(mask) > 0] if femurs == 1 else femur_components(mask, femurs)
    if femurs > 1:
        msk["femur_volumes_cm3"] = [float(np.count_nonzero(p)) * float(np.prod(spacing)) / 1000.0 for p in parts]
    if msk["volume_cm3"] <= 0:
        reasons.append("fail: empty mask (no femur found)")
    else:
        vr = lohi("label_volume_cm3")
        for i, part in enumerate(parts):
            what = "femur" if femurs == 1 else f"femur {i + 1} of {len(parts)}"
            vol = msk["volume_cm3"] if femurs == 1 else msk["femur_volumes_cm3"][i]
            if vr is not None:
                if vol < 0.5 * vr[0] or vol > 2.0 * vr[1]:
                    reasons.append(f"fail: {what} volume {vol:.1f} cm^3 far outside the training range "
                                   f"{vr[0]:.1f}-{vr[1]:.1f} cm^3")
                elif vol < 0.8 * vr[0] or vol > 1.25 * vr[1]:
                    reasons.append(f"warn: {what} volume {vol:.1f} cm^3 outside the training range "
                                   f"{vr[0]:.1f}-{vr[1]:.1f} cm^3")
            for check in checks:
                reasons.extend(r if femurs == 1 else f"{r} ({what})"
                               for r in check(part, tuple(float(s) for s in spacing)))
        if msk["components"] > femurs:
            reasons.append(f"warn: {int(msk['components'])} large components (the femur should be one)" if femurs == 1
                           else f"warn: {int(msk['components'])} large components (expected at most {femurs} femurs)")
    if agree is not None:
        if agree < 0.5:
            reasons.append(f"fail: the fold models disagree (mean pairwise Dice {agree:.2f})")
        elif agree < 0.85:
            reasons.append(f"warn: the fold models agree only partly (mean pairwise Dice {agree:.2f})")
    verdict = "fail" if any(r.startswith("fail") for r in reasons) else ("warn" if reasons else "ok")
    return {"verdict": verdict, "reasons": reasons, "image": img, "mask": msk, "fold_agreement": agree,
            "entropy_bits": ent, "reference": reference is not None}
