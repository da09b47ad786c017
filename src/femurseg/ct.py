"""CT helpers: Hounsfield-unit check, intensity window, automatic per-side femur crops.

Everything works on canonical ``(A, I, L)`` arrays ``(n_coronal, rows, cols)``; column index
runs patient right -> left, so a **right** femur lies at low column indices (image left)
and a **left** femur at high ones (``docs/conventions.md``).

* :func:`check_hu` warns (:class:`HUWarning`) when an image declared CT does not look like
  Hounsfield units.
* :func:`normalise_hu` clips to a HU window and scales it to [0, 1] (the training engineer's
  ``preprocess.normalise`` with ``normalise="ct"``; one implementation).
* :func:`find_femurs` / :func:`femur_boxes` locate each femur from a coarse bone threshold and
  give a :class:`CropBox` per side (paper 003 cropped 512 x 512 slices to 192 x 192 around
  the left femur by hand; here it is automatic and per side). A box maps a crop back onto the
  full grid (:meth:`CropBox.paste`), so results of a model run on the crop land on the input
  grid.
* :func:`split_sides` splits a bilateral femur *mask* into one mask per side.
* :func:`crop_femur_dataset` (``femurseg crop-femurs``) turns whole CT scans into one training
  case per labelled femur, cropped to the box :func:`femur_boxes` finds in the image, so a
  cascade trained on them sees the same boxes at predict time.
* The **cascade** of paper 003 (section 3.2): a first network segments the whole bone (the
  periosteal region, ``label > 0``), a second one segments the endosteal (trabecular /
  medullary, ``label == 1``) region from the CT restricted to the first one's result
  (:func:`stage2_input`: voxels outside the periosteal mask, dilated by 1 mm, set to -1024 HU);
  cortical = periosteal minus endosteal (:func:`combine_stages`). :func:`run_cascade_cv`
  trains both with the ordinary cross-validation machinery (:func:`femurseg.cv.run_cv`) on
  derived datasets and one shared split, :func:`evaluate_cascade` scores the cascade's
  out-of-fold label maps (003 Tables 1 and 2), :func:`predict_cascade` is what
  ``femurseg predict`` runs for a cascade run folder, and :func:`run_cascade_experiment` is the
  CT study (``femurseg experiment ct``).
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from femurseg.errors import FemursegError
from femurseg.io import box_slices, crop_array

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


# ----------------------------------------------------------------------------- crop boxes


@dataclass
class CropBox:
    """A box on the canonical grid around one femur, optionally mirrored left-right.

    ``start``/``stop`` are per canonical axis and may reach outside the image (the crop is then
    padded with ``fill``). ``mirrored`` flips the column axis of the crop so a right femur looks
    like a left one (or vice versa).
    """

    side: str
    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    full_shape: tuple[int, int, int]
    mirrored: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(b - a) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    def crop(self, arr: np.ndarray, fill: float = 0) -> np.ndarray:
        """The box of ``arr`` (``(..., *full_shape)``), padded with ``fill`` outside the image,
        mirrored if ``self.mirrored``."""
        a = np.asarray(arr)
        if tuple(a.shape[-3:]) != tuple(self.full_shape):
            raise FemursegError(f"crop: array shape {a.shape[-3:]} differs from the box's image {self.full_shape}")
        out = crop_array(a, self.start, self.stop, fill)
        if self.mirrored:
            out = out[..., ::-1]
        return np.ascontiguousarray(out)

    def paste(self, crop: np.ndarray, fill: float = 0, out: np.ndarray | None = None) -> np.ndarray:
        """Put a crop (``(..., *self.shape)``) back on the full grid (un-mirroring it).

        Voxels outside the box are ``fill`` (or left as they are in ``out``); the part of the
        box outside the image is dropped.
        """
        c = np.asarray(crop)
        if tuple(c.shape[-3:]) != self.shape:
            raise FemursegError(f"paste: crop shape {c.shape[-3:]} differs from the box shape {self.shape}")
        if self.mirrored:
            c = c[..., ::-1]
        if out is None:
            out = np.full(c.shape[:-3] + tuple(self.full_shape), fill, dtype=c.dtype)
        src, dst = box_slices(self.start, self.stop, self.full_shape)
        out[(Ellipsis, *src)] = c[(Ellipsis, *dst)]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"side": self.side, "start": list(self.start), "stop": list(self.stop),
                "full_shape": list(self.full_shape), "mirrored": bool(self.mirrored)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CropBox:
        return cls(str(d["side"]), tuple(int(v) for v in d["start"]), tuple(int(v) for v in d["stop"]),  # type: ignore[arg-type]
                   tuple(int(v) for v in d["full_shape"]), bool(d.get("mirrored", False)))  # type: ignore[arg-type]


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    return ndimage.label(mask, structure=np.ones((3, 3, 3), bool))


def femur_side(mask: np.ndarray) -> str:
    """"left" or "right" for a single femur mask (thresholded bone is enough).

    The head is the most superior part and lies medially of the shaft (the most inferior
    part): a left femur's head is at lower column indices than its shaft.
    """
    m = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(m.any(axis=(0, 2)))
    if rows.size < 2:
        raise FemursegError("femur mask is empty or a single row: cannot tell its side")
    span = rows[-1] - rows[0] + 1
    top = m[:, rows[0]:rows[0] + max(1, span // 5)]
    bottom = m[:, rows[-1] - max(1, span // 5) + 1:rows[-1] + 1]
    c_top = np.nonzero(top)[2].mean()
    c_bot = np.nonzero(bottom)[2].mean()
    return "left" if c_top < c_bot else "right"


SHAFT_SEPARATION_MM = 100.0
"""Distal bone candidates farther apart than this (left-right) are the two femoral shafts."""


def find_femurs(image: np.ndarray, spacing: Sequence[float], threshold: float = BONE_THRESHOLD_HU,
                bilateral: bool | None = None, min_volume_cm3: float = 5.0) -> dict[str, np.ndarray]:
    """Coarse mask of each femur in a CT (HU), keyed by side ("right", "left").

    Rule: bone = ``image > threshold`` split into 6-connected components. The femoral shaft runs
    through the distal end of a hip scan, so the candidates are the bone blobs (connected within
    the last 5 mm of rows holding bone) of at least a quarter of the largest blob whose 3D
    component holds ``min_volume_cm3``. When the leftmost and rightmost candidates are more than
    ``SHAFT_SEPARATION_MM`` (100 mm) apart in the left-right direction the scan is
    **bilateral** (femoral shafts are 150-200 mm apart; a shaft and the ischium of the same hip
    much closer): the mid-sagittal column is half-way between them, the right femur is the
    rightmost candidate (lowest columns) and the left femur the leftmost, each restricted to
    its side of the midline (the ischium and pubis lie medial of the shaft; the pelvis can join
    both femurs into one component). Otherwise the field of view holds **one hip**: the
    component of the largest blob, its side given
    by :func:`femur_side` (the head is medial of the shaft). ``bilateral`` forces either.

    Limits: at a coarse threshold the femur may merge with the pelvis (a narrow joint space);
    its mask, and so its crop box, then includes pelvic bone (never bone across the midline).
    The femur's thin head cortex may break up at the threshold, so callers add a margin.

    Raises:
        FemursegError: no bone above the threshold, or no femur-like component.
    """
    img = np.asarray(image)
    sp = np.asarray(spacing, float)
    bone = img > threshold
    if not bone.any():
        lo, hi = float(img.min()), float(img.max())
        raise FemursegError(f"no bone above {threshold:g} HU (intensities {lo:.4g}..{hi:.4g}); is this a CT in Hounsfield units?")
    lab, n = ndimage.label(bone)
    voxel_cm3 = float(np.prod(sp)) / 1000.0
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    rows = np.flatnonzero(bone.any(axis=(0, 2)))
    band = slice(max(rows[-1] - max(2, int(round(5.0 / sp[1]))) + 1, 0), rows[-1] + 1)
    blobs, nb = ndimage.label(bone[:, band])  # the shafts' cross-sections at the distal end
    bsize = np.bincount(blobs.ravel(), minlength=nb + 1)
    bsize[0] = 0
    comp_of: dict[int, int] = {}
    col: dict[int, float] = {}
    for b in np.flatnonzero(bsize >= 0.25 * bsize.max()):
        ids = lab[:, band][blobs == b]
        c = int(np.bincount(ids).argmax())
        if sizes[c] * voxel_cm3 >= min_volume_cm3:
            comp_of[int(b)] = c
            col[int(b)] = float(np.nonzero(blobs == b)[2].mean())
    if not col:
        raise FemursegError(f"no femur found: no bone component above {threshold:g} HU of at least "
                            f"{min_volume_cm3:g} cm3 reaches the distal end of the scan")
    right, left = min(col, key=col.get), max(col, key=col.get)
    apart = (col[left] - col[right]) * sp[2] > SHAFT_SEPARATION_MM
    cols = np.arange(img.shape[2])[None, None, :]
    if bilateral or (bilateral is None and apart):
        mid = 0.5 * (col[left] + col[right]) if apart else (img.shape[2] - 1) / 2.0
        masks = {}
        if col[right] < mid:
            masks["right"] = (lab == comp_of[right]) & (cols < mid)
        if col[left] >= mid:
            masks["left"] = (lab == comp_of[left]) & (cols >= mid)
        return masks
    m = lab == comp_of[max(col, key=lambda b: bsize[b])]
    return {femur_side(m): m}


def box_around(mask: np.ndarray, spacing: Sequence[float], side: str, *, margin_mm: float = 15.0,
               size: Sequence[int] | None = None, multiple: int = 16, mirror: bool = False,
               col_range: tuple[int, int] | None = None) -> CropBox:
    """A :class:`CropBox` around ``mask``.

    Args:
        mask: the femur (canonical).
        spacing: mm per axis.
        side: recorded in the box.
        margin_mm: added around the mask's bounding box on every side.
        size: fixed box size per canonical axis (voxels), centred on the bounding box (None: the
            bounding box plus margin, rounded up to a multiple of ``multiple`` per axis; as
            in 003, where every crop is 192 x 192 in plane).
        multiple: see ``size`` (16: every size divides by 2^4 for a 4-level U-Net / V-Net).
        mirror: flip the crop's columns (e.g. to show a right femur as a left one).
        col_range: ``(first, stop)`` columns the box must stay within when it fits (the femur's
            side of the midline in a bilateral scan).
    """
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        raise FemursegError("crop: empty femur mask")
    sp = np.asarray(spacing, float)
    idx = np.nonzero(m)
    lo = np.array([i.min() for i in idx])
    hi = np.array([i.max() for i in idx]) + 1
    marg = np.ceil(margin_mm / sp).astype(int)
    lo, hi = lo - marg, hi + marg
    shape = np.asarray(m.shape)
    lo_allowed = np.zeros(3, int)
    hi_allowed = shape.copy()
    if col_range is not None:
        lo_allowed[2], hi_allowed[2] = int(col_range[0]), int(col_range[1])
    if size is None:
        lo, hi = np.maximum(lo, lo_allowed), np.minimum(hi, hi_allowed)
        ext = hi - lo
        want = (np.ceil(ext / multiple) * multiple).astype(int) if multiple > 1 else ext
        want = np.minimum(want, hi_allowed - lo_allowed)  # never larger than the allowed region
    else:
        want = np.asarray(size, int)
        if want.shape != (3,) or np.any(want < 1):
            raise FemursegError(f"crop: size {tuple(size)} must be three positive voxel counts")
    centre2 = lo + hi  # twice the centre
    start = (centre2 - want) // 2
    # keep the box inside the allowed region (the image, the femur's side) where it fits
    for a in range(3):
        if want[a] <= hi_allowed[a] - lo_allowed[a]:
            start[a] = min(max(start[a], lo_allowed[a]), hi_allowed[a] - want[a])
    stop = start + want
    return CropBox(side, tuple(int(v) for v in start), tuple(int(v) for v in stop), tuple(int(v) for v in m.shape),
                   bool(mirror))


def femur_boxes(image: np.ndarray, spacing: Sequence[float], *, threshold: float = BONE_THRESHOLD_HU,
                bilateral: bool | None = None, margin_mm: float = 15.0, size: Sequence[int] | None = None,
                multiple: int = 16, mirror_to: str | None = None) -> list[CropBox]:
    """One :class:`CropBox` per femur found in a CT (:func:`find_femurs`), right first.

    Each box is the femur's bounding box plus ``margin_mm`` (15 mm: the thin head cortex may be
    missing from the threshold mask), rounded up to a multiple of ``multiple`` voxels (or of
    fixed ``size``), kept inside the image and, in a bilateral scan, on the femur's side of the
    midline.

    ``mirror_to="left"`` mirrors right-femur crops (and ``"right"`` left ones) so a model
    trained on one side (003 trained on left femurs) always sees that orientation; the default
    (None) keeps every crop as it is, because the phantom cohorts hold both sides and the
    models are trained on both. :meth:`CropBox.paste` undoes the mirroring.
    """
    if mirror_to not in (None, "left", "right"):
        raise FemursegError(f"mirror_to: expected 'left', 'right' or None, got {mirror_to!r}")
    femurs = find_femurs(image, spacing, threshold, bilateral=bilateral)
    boxes = []
    for side, m in sorted(femurs.items(), key=lambda kv: kv[0] != "right"):
        col_range = None
        if len(femurs) == 2:
            cols = np.flatnonzero(m.any(axis=(0, 1)))
            other = femurs["left" if side == "right" else "right"]
            ocols = np.flatnonzero(other.any(axis=(0, 1)))
            mid = int(round(0.5 * (cols.max() + ocols.min()))) if side == "right" else int(round(0.5 * (ocols.max() + cols.min())))
            col_range = (0, mid) if side == "right" else (mid, m.shape[2])
        boxes.append(box_around(m, spacing, side, margin_mm=margin_mm, size=size, multiple=multiple,
                                mirror=mirror_to is not None and side != mirror_to, col_range=col_range))
    return boxes


def split_sides(mask: np.ndarray, spacing: Sequence[float] | None = None, min_fraction: float = 0.25) -> dict[str, np.ndarray]:
    """Split a femur *mask* holding both femurs into ``{"right": ..., "left": ...}``.

    The two largest 26-connected components, each at least ``min_fraction`` of the largest,
    are the femurs (the one at lower columns is the right one); smaller pieces go to the
    nearer femur. A mask with one large component returns ``{}`` (nothing to split).
    """
    m = np.asarray(mask, dtype=bool)
    lab, n = _components(m)
    if n < 2:
        return {}
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    a, b = int(order[0]), int(order[1])
    if sizes[b] < min_fraction * sizes[a]:
        return {}
    ca, cb = np.nonzero(lab == a)[2].mean(), np.nonzero(lab == b)[2].mean()
    right, left = (a, b) if ca < cb else (b, a)
    mid = 0.5 * (ca + cb)
    cols = np.arange(m.shape[2])[None, None, :]
    rest = m & (lab != a) & (lab != b)
    return {"right": (lab == right) | (rest & (cols < mid)), "left": (lab == left) | (rest & (cols >= mid))}


#: Key in ``dataset.json["femurseg"]`` of a dataset written by :func:`crop_femur_dataset`.
FEMUR_CROP_KEY = "femur_crop"


def crop_femur_dataset(dataset: str | Path, out: str | Path, *, margin_mm: float = 15.0, bilateral: bool | None = None,
                       progress: bool = True) -> Any:
    """``femurseg crop-femurs DATASET OUT``: one case per *labelled* femur, cropped to its box.

    Whole CT scans (512 x 512 slices, both hips) are too large to train a 3D network on whole
    volumes and hold femurs that may not be labelled (003 labelled the left femur only and cropped
    every scan to 192 x 192 around it by hand). For each scan this finds the femurs from the image
    alone (:func:`femur_boxes`: coarse bone threshold, per side, ``margin_mm`` around each) and
    writes each box whose label holds bone as a case ``<case>_<side>`` (image and label cropped
    with their geometry: the crops overlay the scan in a viewer); a box without labelled bone (an
    unlabelled femur) is skipped. Because the boxes come from the image, ``femurseg predict`` finds
    the same boxes on a new scan: a cascade trained on this dataset records ``margin_mm``
    (``dataset.json``, key :data:`FEMUR_CROP_KEY`) and predicts every femur in its box.

    Writes, besides the nnU-Net layout: ``subjects.csv`` (``case,subject``: the source scan, so
    ``femurseg cv --group-by subject`` keeps both hips of a scan in one fold; the side is the
    stratum) and ``crops.csv`` (each crop's source case, side and canonical box).

    Raises:
        FemursegError: not a CT dataset with labels 1 and 2; ``out`` exists and is not empty; no
            femur found in a scan; labelled voxels outside every box (raise ``margin_mm``).
    """
    from tqdm import tqdm

    from femurseg import io
    from femurseg.data.dataset import build_dataset, load_checked, write_dataset
    from femurseg.tables import write_csv

    if margin_mm < 0:
        raise FemursegError(f"--margin-mm: must be >= 0, got {margin_mm}")
    ds = load_checked(dataset, progress=False)
    _check_ct_dataset(ds, str(dataset))
    crops: list[dict[str, Any]] = []
    groups: dict[str, str] = {}

    def volumes() -> Any:
        for case in tqdm(ds.cases, desc="crop femurs", unit="case", disable=not progress):
            vol = io.read_image(case.image)
            lab = io.read_image(case.label, dtype=None)
            try:
                boxes = femur_boxes(vol.data, vol.spacing, margin_mm=margin_mm, bilateral=bilateral)
            except FemursegError as e:
                raise FemursegError(f"{case.case_id}: {e}") from None
            total, covered = int(np.count_nonzero(lab.data)), 0
            for box in boxes:
                lc = io.crop_volume(lab, box.start, box.stop, 0)
                n = int(np.count_nonzero(lc.data))
                if n == 0:
                    continue
                covered += n
                cid = f"{case.case_id}_{box.side}"
                groups[cid] = box.side
                crops.append({"case": cid, "subject": case.case_id, "side": box.side,
                              "start": " ".join(map(str, box.start)), "stop": " ".join(map(str, box.stop))})
                yield cid, io.crop_volume(vol, box.start, box.stop, -1024.0), lc
            if covered < total:
                raise FemursegError(f"{case.case_id}: {total - covered} labelled voxels lie outside the femur boxes "
                                    f"found in the image (margin {margin_mm:g} mm); raise --margin-mm, pass --bilateral if "
                                    f"the scan holds both hips, or check the label")

    def build(tmp: Path) -> Any:
        extras = {FEMUR_CROP_KEY: {"margin_mm": float(margin_mm), "source": str(Path(dataset).resolve())}}
        cropped = write_dataset(tmp, volumes(), ds.labels, "CT", groups, name=f"{Path(dataset).stem}-femur-crops",
                                extras=extras)
        if not crops:
            raise FemursegError(f"{dataset}: no labelled femur found in any scan")
        write_csv([{"case": c["case"], "subject": c["subject"]} for c in crops], tmp / "subjects.csv", ["case", "subject"])
        write_csv(crops, tmp / "crops.csv", ["case", "subject", "side", "start", "stop"])
        return cropped

    return build_dataset(out, build)


def dataset_femur_crop(dataset: str | Path) -> float | None:
    """The ``margin_mm`` a dataset was cropped with (:func:`crop_femur_dataset`), else None."""
    p = Path(dataset) / "dataset.json"
    if not p.is_file():
        return None
    try:
        entry = json.loads(p.read_text()).get("femurseg", {}).get(FEMUR_CROP_KEY)
    except (OSError, ValueError):
        return None
    return float(entry["margin_mm"]) if isinstance(entry, dict) and "margin_mm" in entry else None


# ----------------------------------------------------------------------------- cascade (paper 003)
#
# A cascade run folder (``femurseg cv --task cascade``) holds two ordinary cross-validation runs,
# produced by :func:`femurseg.cv.run_cv` on derived datasets, with one shared split:
#
#     RUN/config.json            format femurseg-run, task "cascade", k, the cascade options
#     RUN/split.json             the folds (both stages use them)
#     RUN/data/stage1.csv        manifest: original images, label > 0 (periosteal, whole bone)
#     RUN/data/stage2.csv        manifest: images masked with the reference periosteal region
#                                (stage2_mask "reference"; stage2_oof.csv: with stage 1's out-of-fold
#                                masks, "oof"), dilated by dilate_mm; label == 1 (endosteal)
#     RUN/stage1/, RUN/stage2/   the two cv runs (fold models, out-of-fold maps, thresholds)
#     RUN/stage1_seed<i>/, ...   with --seeds N: the same stages trained with seed + i (i < N)
#     RUN/oof_labels/<case>.nii.gz     cascade out-of-fold label maps (0/1/2) on the input grid
#     RUN/cascade_metrics.csv    per case: DSC, ASD, sensitivity, specificity per compartment
#     RUN/cascade_volumes.csv    per case and region: reference and predicted volumes
#     RUN/cascade_summary.json   means (003 Table 1) and volume errors per region (003 Table 2),
#                                the thresholds used (with several seeds: those of the ensemble)

CASCADE_TASK = "cascade"
COMPARTMENTS: dict[str, tuple[int, ...]] = {"periosteal": (1, 2), "endosteal": (1,), "cortical": (2,)}

CASCADE_SCALES: dict[str, dict[str, Any]] = {
    # CPU demo: a V-Net with 8 base features and 4 levels (2.5 M parameters) on whole volumes at
    # the scans' own voxel size, 20 epochs (see "Data" below). On 2 CPU cores a step costs about
    # what the earlier F 4 / 3-level V-Net's did (0.7 vs 0.6 s on 64 x 128 x 128: the narrow
    # layers are memory-bound), and stage 1's validation Dice rose from 0.972-0.983 to
    # 0.988-0.992; the whole-bone volume error is what limits the cortical volume (cortical =
    # periosteal - endosteal, and the cortex is ~17 % of the bone). Instance norm, not the
    # paper's batch norm, and whole volumes, not patches: the cv machinery validates and predicts
    # on whole volumes, and a normalisation layer trained on random 32 x 64 x 64 patches does not
    # fit them (measured: batch norm scored Dice 0.000 on a held-out whole volume in eval mode
    # after 40 patch steps; instance norm 0.47 after 40 and 0.41 after 80 steps while its
    # training loss kept falling; without normalisation the V-Net learns several times slower).
    # Every stage runs the whole cosine schedule (min_epochs = max_epochs: no early stop): with
    # min_epochs 10 / patience 8, early stopping on 3-4 validation cases stopped three of four
    # stage-1 folds at epochs 30-35 and kept a checkpoint from a learning rate 5-10x the final
    # one; training to the end took the cortical volume error in the neck from 7.6 to 6.3 %
    # (the same folds, stage 2 unchanged; 16 CT phantoms, 2026-11-21).
    # Loss: soft Dice + *unweighted* cross-entropy (003 trains with plain softmax CE; nnU-Net
    # adds Dice). The inverse-frequency weighted CE of the MR papers moves the 0.5 boundary
    # outwards into partial-volume voxels (see femurseg.losses), which biased the thin neck
    # cortex (cortical = periosteal - endosteal) upwards. Measured (same split, 2026-11-22,
    # docs/ct_study.md): cortical combination 3.9 -> 2.9 %, cortical total 4.5 -> 3.8 %, the trabecular
    # region's error in the neck 3.6 -> 2.3 %; cortical neck 5.5 -> 6.1 % (5.3 -> 5.3 % with the
    # reference's regions).
    # Data: the study runs on 32 phantoms for 20 epochs (24 training cases per fold: 480 steps, the
    # cost of 12 cases x 40 epochs). On the same 16 held-out phantoms the four fold models trained
    # on 24 cases instead of 12 gave periosteal DSC 0.992 vs 0.987, cortical neck 5.1 vs 7.8 %,
    # head 2.4 vs 5.1 %, cortical total 3.7 vs 5.0 % (docs/ct_study.md, 2026-11-22). With fewer
    # phantoms, raise the epochs (``--max-epochs`` / ``--min-epochs``) to keep about 500 steps. 64
    # phantoms x 10 epochs (the same 480 steps) did not do better than 32 x 20 (held-out cortical
    # neck 5.4 vs 5.1 %); whether 64 phantoms trained longer would is not measured.
    # Voxel size: the same settings on the same 32 femurs at 003's 0.8 x 0.8 x 1 mm (1.6 s per
    # step against ~1 s at 1 mm) took the cortical neck error from 6.0 to 4.4 % out-of-fold and the
    # cortical combination from 3.2 to 1.4 % (README "Measured: the cascade study").
    "demo": {
        "model": {"name": "vnet", "features": 8, "levels": 4, "norm": "instance"},
        "preprocess": {"crop_slices": None, "target_size": None, "scale": None, "normalise": "ct",
                       "ct_window": [-200.0, 1800.0]},
        "train": {"loss": "dice-ce", "lr": 3e-3, "max_epochs": 20, "min_epochs": 20, "patience": 8},
        "augment": {"flip_p": 0.5},
    },
    # Paper 003: V-Net (F 16, 4 levels), Adam 1e-4, batch 1, whole volumes; GPU
    "full": {
        "model": {"name": "vnet", "features": 16, "levels": 4},
        "preprocess": {"crop_slices": None, "target_size": None, "scale": None, "normalise": "ct",
                       "ct_window": [-200.0, 1800.0]},
        "train": {"loss": "ce", "lr": 1e-4, "max_epochs": 800, "min_epochs": 30, "patience": 30},
        "augment": {"flip_p": 0.5, "noise_std": 0.02, "brightness": 0.05, "scale": 0.1},
    },
}


def periosteal_region(periosteal: np.ndarray, spacing: Sequence[float], dilate_mm: float = 0.0) -> np.ndarray:
    """The periosteal mask dilated by ``dilate_mm`` (ellipsoid in mm; 0: unchanged), bool."""
    from femurseg.postprocess import ellipsoid_structure

    m = np.asarray(periosteal, dtype=bool)
    if dilate_mm <= 0 or not m.any():
        return m.copy()
    se = ellipsoid_structure(dilate_mm, spacing)
    return ndimage.binary_dilation(m, structure=se)


def mask_outside(image: np.ndarray, region: np.ndarray, fill: float = -1024.0) -> np.ndarray:
    """``image`` with every voxel outside ``region`` set to ``fill`` (float32; 003 section 3.2:
    the region inside the periosteal contour is the input of the endosteal segmentation)."""
    img = np.asarray(image, dtype=np.float32)
    r = np.asarray(region, dtype=bool)
    if img.shape != r.shape:
        raise FemursegError(f"cascade: image shape {img.shape} differs from the periosteal mask's {r.shape}")
    return np.where(r, img, np.float32(fill)).astype(np.float32)


def stage2_input(image: np.ndarray, periosteal: np.ndarray, spacing: Sequence[float], dilate_mm: float = 1.0,
                 fill_hu: float = -1024.0) -> np.ndarray:
    """The endosteal model's input: the CT restricted to the (dilated) periosteal region, the rest
    set to ``fill_hu`` (air; the HU window maps it to 0)."""
    return mask_outside(image, periosteal_region(periosteal, spacing, dilate_mm), fill_hu)


def combine_stages(periosteal: np.ndarray, endosteal_prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """CT label map from the cascade's two outputs: 2 (cortical) in the periosteal mask, 1
    (trabecular) where the endosteal probability reaches ``threshold`` inside the periosteal mask
    eroded by one voxel (face neighbours), 0 elsewhere.

    The erosion keeps the reference labels' rule that the cortex is at least one voxel thick
    (a label-1 voxel never touches background). Cortical = periosteal minus endosteal.
    """
    peri = np.asarray(periosteal, dtype=bool)
    inner = ndimage.binary_erosion(peri, structure=ndimage.generate_binary_structure(3, 1), border_value=1)
    lab = np.where(peri, np.uint8(2), np.uint8(0))
    lab[inner & (np.asarray(endosteal_prob) >= threshold)] = 1
    return lab


def cascade_probabilities(periosteal_prob: np.ndarray, periosteal: np.ndarray, endosteal_prob: np.ndarray,
                          threshold: float = 0.5, periosteal_threshold: float = 0.5) -> np.ndarray:
    """``(3, *shape)`` probabilities (background, trabecular, cortical) for ``predict.segment``.

    Built so that ``segment`` at the stored stage-1 threshold gives exactly :func:`combine_stages`,
    the label map the cascade's evaluation scores:

    * foreground = the periosteal probability, raised to ``periosteal_threshold`` inside the
      ``periosteal`` mask and lowered just below it outside, so thresholding it there returns the
      post-processed mask (:func:`periosteal_mask`: holes filled, spurs opened away), not the raw
      ``prob >= threshold`` (a higher or lower ``--threshold`` still moves the surface);
    * inside it the class is trabecular exactly where :func:`combine_stages` puts label 1 (the
      endosteal probability is remapped monotonically so ``threshold`` lands on 0.5, and zeroed
      outside the eroded periosteal mask).
    """
    p = np.asarray(periosteal_prob, dtype=np.float32)
    peri = np.asarray(periosteal, dtype=bool)
    # 1e-6 either side of the threshold: ``segment`` thresholds 1 - (1 - p) in float32 (error ~6e-8)
    t1 = float(periosteal_threshold)
    up, down = np.float32(t1 + 1e-6), np.float32(t1 - 1e-6)
    p = np.where(peri, np.maximum(p, up), np.minimum(p, down)).astype(np.float32)
    q = np.asarray(endosteal_prob, dtype=np.float32)
    t = float(min(max(threshold, 1e-6), 1 - 1e-6))
    q = np.where(q < t, 0.5 * q / t, 0.5 + 0.5 * (q - t) / (1 - t)).astype(np.float32)
    trab = combine_stages(peri, np.asarray(endosteal_prob), threshold) == 1
    q = np.where(trab, np.maximum(q, np.float32(0.5) + 1e-6), np.minimum(q, np.float32(0.5) - 1e-6))
    return np.stack([1.0 - p, p * q, p * (1.0 - q)]).astype(np.float32)


def _check_ct_dataset(ds: Any, where: str) -> None:
    if not {1, 2} <= set(ds.label_values):
        raise FemursegError(f"{where}: the cascade needs CT labels (1 trabecular, 2 cortical); "
                            f"the dataset declares {ds.labels}")


def _write_manifest(path: Path, rows: list[tuple[str, str, str, str]]) -> None:
    from femurseg.tables import write_csv

    cols = ["image", "label", "case", "group"]
    write_csv([dict(zip(cols, r)) for r in rows], path, cols)
    # the CSV sidecar (femurseg.data.dataset): the stage runs record their images as CT
    path.with_suffix(".json").write_text(json.dumps({"modality": "CT"}) + "\n")


def prepare_cascade_data(ds: Any, data_dir: str | Path, stage: int, *, dilate_mm: float = 1.0,
                         fill_hu: float = -1024.0, progress: bool = True, stage1_run: str | Path | None = None) -> Path:
    """Write one stage's dataset (manifest + derived files) into ``data_dir``; returns the manifest.

    Stage 1 (``stage1.csv``): the original images with ``label > 0``. Stage 2: ``label == 1`` and
    the images masked (:func:`stage2_input`, region dilated by ``dilate_mm``) with

    * ``stage1_run`` None: the **reference** periosteal region (``stage2_images/``, ``stage2.csv``);
    * ``stage1_run`` a finished stage-1 cv run: each case's stage-1 **out-of-fold** periosteal
      mask (:func:`stage1_mask`; ``stage2_images_oof/``, ``stage2_oof.csv``), i.e. the input the
      cascade gives stage 2 at test time.

    Existing files are kept (resume).
    """

    from tqdm import tqdm

    from femurseg import io

    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    d = Path(data_dir)
    oof = stage == 2 and stage1_run is not None
    lab_dir = d / ("stage1_labels" if stage == 1 else "stage2_labels")
    img_dir = None if stage == 1 else d / ("stage2_images_oof" if oof else "stage2_images")
    for sub in (lab_dir, img_dir):
        if sub is not None:
            sub.mkdir(parents=True, exist_ok=True)
    thr1 = _stage_threshold(Path(stage1_run)) if oof else None
    rows = []
    for case in tqdm(ds.cases, desc=f"cascade data, stage {stage}", unit="case", disable=not progress, leave=False):
        cid = case.case_id
        lab_path = lab_dir / f"{cid}.nii.gz"
        img_path = Path(case.image) if img_dir is None else img_dir / f"{cid}.nii.gz"
        if not (lab_path.exists() and img_path.exists()):
            lab = io.read_image(case.label, dtype=None)
            ref = np.asarray(lab.data)
            io.write_like(lab_path, (ref > 0 if stage == 1 else ref == 1).astype(np.uint8), lab)
            if img_dir is not None:
                img = io.read_image(case.image)
                region = stage1_mask(stage1_run, cid, thr1, img.spacing) if oof else ref > 0
                io.write_like(img_path, stage2_input(img.data, region, img.spacing, dilate_mm, fill_hu), img, np.float32)
        rows.append((str(img_path.resolve()), str(lab_path.resolve()), cid, case.group or ""))
    manifest = d / ("stage1.csv" if stage == 1 else ("stage2_oof.csv" if oof else "stage2.csv"))
    _write_manifest(manifest, rows)
    return manifest


#: Post-processing of stage 1's whole-bone mask (:func:`femurseg.postprocess.postprocess`, 004's chain).
PERIOSTEAL_POSTPROCESS = "lcc+fill+open"


def periosteal_mask(prob: np.ndarray, threshold: float, spacing: Sequence[float]) -> np.ndarray:
    """The cascade's periosteal (whole-bone) mask from stage 1's probability: ``prob >= threshold``,
    largest 3D component, 3D holes filled, opened with a 1 mm ball (:data:`PERIOSTEAL_POSTPROCESS`).

    Why more than the largest component: the periosteal surface is closed and smooth, and the
    cortex is the periosteal mask minus the endosteal one, so every false periosteal voxel is a
    false *cortical* voxel. A hole left inside the bone turns its rim into cortex, and a one-voxel
    spur (into the hip joint space, or a partial-volume voxel at the surface) adds cortex where
    the shell is thinnest. Measured on the 16 CT phantoms (the demo cascade's models of 2026-11-21,
    out-of-fold, only this step changed): cortical volume error in the neck 6.0 -> 5.3 % (reference's regions),
    total cortical 5.7 -> 4.5 %. Bool, on the grid of ``prob``.
    """
    from femurseg.postprocess import postprocess

    return postprocess(np.asarray(prob) >= threshold, PERIOSTEAL_POSTPROCESS, spacing)


def stage1_mask(stage1_run: str | Path, case_id: str, threshold: float, spacing: Sequence[float]) -> np.ndarray:
    """A case's stage-1 out-of-fold periosteal mask (:func:`periosteal_mask` of the ``oof``
    probability; what the cascade hands to stage 2), bool on the case's grid."""
    return periosteal_mask(mean_oof([Path(stage1_run)], case_id), threshold, spacing)


def stage_names(seeds: int = 1) -> tuple[list[str], list[str]]:
    """Folders of the stage runs of a cascade trained with ``seeds`` seeds: ``(stage 1 runs,
    stage 2 runs)``; the first seed's are ``stage1``/``stage2``, seed i's ``stage1_seed<i>``."""
    if seeds < 1:
        raise FemursegError(f"--seeds: must be >= 1, got {seeds}")
    return ([f"stage1{f'_seed{i}' if i else ''}" for i in range(seeds)],
            [f"stage2{f'_seed{i}' if i else ''}" for i in range(seeds)])


def mean_oof(runs: Sequence[Path], case_id: str) -> np.ndarray:
    """A case's out-of-fold probability averaged over stage runs (one seed each), float32."""
    from femurseg import io

    maps = [np.asarray(io.read_image(Path(r) / "oof" / f"{case_id}.nii.gz").data, np.float32) for r in runs]
    return maps[0] if len(maps) == 1 else np.mean(maps, axis=0, dtype=np.float32)


def _ensemble_threshold(runs: Sequence[Path], ds: Any, cases: Sequence[str], stage: int) -> float:
    """Stage ``stage``'s PR threshold: the stored one of a single run, else 001's rule on the
    pooled seed-averaged out-of-fold maps (reference: ``label > 0`` for stage 1, ``== 1`` for 2)."""
    from femurseg import io
    from femurseg.thresholds import pr_threshold

    if len(runs) == 1:
        return _stage_threshold(Path(runs[0]))
    probs, refs = [], []
    for cid in cases:
        probs.append(mean_oof(runs, cid))
        lab = np.asarray(io.read_image(ds.case(cid).label, dtype=None).data)
        refs.append(lab > 0 if stage == 1 else lab == 1)
    return float(pr_threshold(probs, refs))


def cascade_configs(scale: str = "demo", model_cfg: dict | None = None, prep_cfg: dict | None = None,
                    train_cfg: dict | None = None, aug_cfg: dict | None = None) -> dict[str, dict[str, Any]]:
    """The partial configs handed to :func:`femurseg.cv.run_cv` for both stages: the scale's
    (:data:`CASCADE_SCALES`) overridden by the given dicts. A model ``name`` other than the
    V-Net (e.g. ``unet3d``) drops the V-Net-only options."""
    from femurseg.models import default_config

    if scale not in CASCADE_SCALES:
        raise FemursegError(f"--scale: expected one of {', '.join(CASCADE_SCALES)}, got {scale!r}")
    base = CASCADE_SCALES[scale]
    model = dict(base["model"])
    if model_cfg and model_cfg.get("name", model["name"]) != model["name"]:
        allowed = default_config(model_cfg["name"])
        model = {k: v for k, v in model.items() if k in allowed and k != "name"}
    model.update(model_cfg or {})
    model["num_classes"] = 2
    return {"model": model, "preprocess": {**base["preprocess"], **(prep_cfg or {})},
            "train": {**base["train"], **(train_cfg or {})}, "augment": {**base["augment"], **(aug_cfg or {})}}


def run_cascade_cv(dataset: str | Path, out: str | Path, *, scale: str = "demo", model_cfg: dict | None = None,
                   prep_cfg: dict | None = None, train_cfg: dict | None = None, aug_cfg: dict | None = None,
                   folds: int = 4, seed: int = 0, group_by: str = "case", split_file: str | Path | None = None,
                   dilate_mm: float = 1.0, fill_hu: float = -1024.0, stage2_mask: str = "reference", seeds: int | None = None,
                   resume: bool = False, overwrite: bool = False, device: str | None = None, progress: bool = True,
                   evaluate: bool = True) -> dict[str, Any]:
    """Cross-validate the two-model CT cascade of paper 003 (``femurseg cv --task cascade``).

    Protocol (documented choice): both stages use the same folds. Stage 1 learns the whole bone
    (periosteal, ``label > 0``) from the CT. Stage 2 learns the endosteal region (``label ==
    1``) from the CT restricted to a periosteal region dilated by ``dilate_mm`` (voxels outside
    set to ``fill_hu``), as 003 trains its second model on "the region inside the periosteal
    contour". Which periosteal region (``stage2_mask``):

    * ``"reference"`` (default): the reference periosteal region (the literal reading of 003);
    * ``"oof"``: every case's stage-1 **out-of-fold** mask (:func:`stage1_mask`), so stage 2
      trains on the inputs the cascade gives it at test time (as nnU-Net's cascade trains its
      second stage on out-of-fold predictions); stage 1 is trained first.

    Measured on the 16 CT phantoms (same stage 1, the earlier F 4, L 3 demo models): endosteal DSC 0.980 (reference)
    vs 0.981 (oof), cortical DSC 0.829 vs 0.831, but cortical volume error 8.3 % vs 10.4 %; the
    default stays "reference".

    The **cascade** is evaluated the same way in both cases: every held-out case's stage-2 input
    is masked with its stage-1 out-of-fold prediction (:func:`periosteal_mask`, same
    dilation), and the fold's stage-2 model segments it; :func:`combine_stages` gives the
    label map (``oof_labels/``) that is compared with the reference (:func:`evaluate_cascade`).

    Args:
        dataset: CT dataset (labels 0/1/2): nnU-Net folder or CSV manifest.
        out: the cascade run folder (layout in the comment above this function's source).
        scale: "demo" (CPU) or "full" (paper 003 settings) base configs (:data:`CASCADE_SCALES`).
        model_cfg, prep_cfg, train_cfg, aug_cfg: partial overrides, the same for both stages.
        folds, seed, group_by, split_file: as :func:`femurseg.cv.run_cv` (one split for both).
        dilate_mm: dilation of the periosteal mask before masking stage 2's input.
        fill_hu: value outside it.
        stage2_mask: "oof" or "reference": the periosteal region stage 2 is trained on (above).
        seeds: train each stage this many times on the same folds (training seeds ``seed``,
            ``seed + 1``, ...; folders :func:`stage_names`) and average their probabilities
            (an ensemble per fold; the PR thresholds are taken on the averaged out-of-fold maps).
            Costs ``seeds`` times the training. Only with ``stage2_mask="reference"``. None: 1,
            or a resumed run's own; a resumed run given more seeds trains the missing ones and
            evaluates anew.
        resume, overwrite, device, progress: as :func:`femurseg.cv.run_cv`.
        evaluate: compute the cascade's out-of-fold labels and metrics at the end.

    Returns:
        The cascade summary (also ``RUN/cascade_summary.json``), or the run config if not evaluated.
    """

    from femurseg.cv import run_cv
    from femurseg.data.dataset import load_checked
    from femurseg.data.splits import load_split, split_dataset
    from femurseg.run import CONFIG_NAME, RUN_FORMAT, RUN_VERSION, environment, now_iso, prepare_run_dir, write_json

    out = Path(out)
    ds = load_checked(dataset, progress=progress)
    _check_ct_dataset(ds, str(dataset))
    if dilate_mm < 0:
        raise FemursegError(f"--dilate-mm: must be >= 0, got {dilate_mm}")
    if stage2_mask not in ("oof", "reference"):
        raise FemursegError(f"stage2_mask: expected 'oof' or 'reference', got {stage2_mask!r}")
    cfgs = cascade_configs(scale, model_cfg, prep_cfg, train_cfg, aug_cfg)
    resuming = resume and (out / CONFIG_NAME).exists()
    had = 1  # seeds already in the run
    if resuming:
        config = json.loads((out / CONFIG_NAME).read_text())
        if config.get("task") != CASCADE_TASK:
            raise FemursegError(f"{out}: not a cascade run (task {config.get('task')!r})")
        opts = config["cascade"]
        dilate_mm, fill_hu = float(opts["dilate_mm"]), float(opts["fill_hu"])
        stage2_mask = str(opts.get("stage2_mask", "reference"))  # runs made before the option: reference
        had, seed = int(opts.get("seeds", 1)), int(config.get("seed", seed))
    n_seeds = had if seeds is None else seeds
    names1, names2 = stage_names(n_seeds)
    if n_seeds < had:
        raise FemursegError(f"{out}: the run has {had} seeds; --seeds {seeds} would drop trained ones")
    if n_seeds > 1 and stage2_mask == "oof":
        raise FemursegError("--seeds > 1 needs stage2_mask 'reference' (stage 2 trained on stage 1's "
                            "out-of-fold masks would depend on the seed)")
    if resuming:
        if n_seeds > had:  # add seeds: their stages train below, the evaluation is redone
            opts["seeds"], opts["stages"] = n_seeds, names1 + names2
            write_json(out / CONFIG_NAME, config)
            shutil.rmtree(out / "oof_labels", ignore_errors=True)
        cfgs = config["stage_configs"]
        split = load_split(out / "split.json", ds)
    else:
        if split_file is None and group_by == "case" and dataset_femur_crop(dataset) is not None:
            import sys

            print(f"femurseg: warning: {dataset} holds per-femur crops (femurseg crop-femurs): with --group-by case "
                  "the two hips of one scan may land in different folds; --group-by subject keeps them together",
                  file=sys.stderr)
        split = load_split(split_file, ds) if split_file is not None else split_dataset(ds, folds, seed, group_by)
        prepare_run_dir(out, resume=resume, overwrite=overwrite)
        out.mkdir(parents=True, exist_ok=True)
        split.save(out / "split.json")
        config = {
            "format": RUN_FORMAT, "version": RUN_VERSION, "kind": "cv", "task": CASCADE_TASK,
            "dataset": str(Path(dataset).resolve()), "modality": ds.modality, "labels": ds.labels,
            "cases": [c.case_id for c in ds.cases], "k": split.k, "seed": seed, "group_by": split.group_by,
            "scale": scale, "stage_configs": cfgs,
            "cascade": {"dilate_mm": float(dilate_mm), "fill_hu": float(fill_hu), "stages": names1 + names2,
                        "seeds": n_seeds, "stage2_mask": stage2_mask,
                        # trained on per-femur crops (crop_femur_dataset): predict crops every femur alike
                        "femur_crop_margin_mm": dataset_femur_crop(dataset),
                        "stage2_training_mask": ("stage-1 out-of-fold prediction (PR threshold, " + PERIOSTEAL_POSTPROCESS + ")"
                                                 if stage2_mask == "oof" else "reference periosteal region"),
                        "stage2_evaluation_mask": "stage-1 out-of-fold prediction (PR threshold, " + PERIOSTEAL_POSTPROCESS + ")"},
            # a run's usual keys, describing stage 1 (what tools that read any run expect)
            "model": cfgs["model"], "preprocess": cfgs["preprocess"],
            "device": str(device or "auto"), "environment": environment(), "created": now_iso(),
        }
        write_json(out / CONFIG_NAME, config)
    common = dict(model_cfg=cfgs["model"], prep_cfg=cfgs["preprocess"], train_cfg=cfgs["train"], aug_cfg=cfgs["augment"],
                  split_file=out / "split.json", device=device, progress=progress)
    m1 = prepare_cascade_data(ds, out / "data", 1, progress=progress)
    for i, name in enumerate(names1):
        run_cv(m1, out / name, resume=(out / name).exists(), seed=seed + i, **common)
    # stage 2's inputs: masked with stage 1's out-of-fold masks ("oof", needs stage 1 first) or the reference
    m2 = prepare_cascade_data(ds, out / "data", 2, dilate_mm=dilate_mm, fill_hu=fill_hu, progress=progress,
                              stage1_run=out / "stage1" if stage2_mask == "oof" else None)
    for i, name in enumerate(names2):
        run_cv(m2, out / name, resume=(out / name).exists(), seed=seed + i, **common)
    if not evaluate:
        return config
    return evaluate_cascade(out, device=device, progress=progress)


def _stage_threshold(run_dir: Path) -> float:
    p = run_dir / "thresholds.json"
    if p.exists():
        v = json.loads(p.read_text()).get("pr")
        if isinstance(v, (int, float)):
            return float(v)
    return 0.5


def evaluate_cascade(run_dir: str | Path, *, device: str | None = None, progress: bool = True,
                     dataset: str | Path | None = None) -> dict[str, Any]:
    """Cascade out-of-fold labels and their evaluation (paper 003 Tables 1 and 2).

    For each case of fold k: stage-1 out-of-fold probability -> PR threshold -> :func:`periosteal_mask`
    = periosteal mask; stage-2 fold-k model on the CT masked with it (:func:`stage2_input`) ->
    endosteal probability -> :func:`combine_stages` (stage 2's PR threshold) -> ``oof_labels/``.
    With several seeds, each stage's probability is the mean over its seeds' runs (stage 1: their
    out-of-fold maps; stage 2: their fold-k models) and the thresholds are taken on the averaged
    out-of-fold maps (:func:`_ensemble_threshold`).
    Metrics per compartment (periosteal {1, 2}, endosteal {1}, cortical {2}): DSC, ASD (mm),
    sensitivity, specificity. Volumes per region (:mod:`femurseg.measure`, regions fitted on
    each mask separately, as two software runs would) and their MAE / RMSE / relative error
    over cases (:func:`femurseg.metrics.volume_errors`); also with the reference's regions
    applied to the prediction (each voxel in the region of the nearest reference bone voxel:
    the segmentation error alone, without the region fit's own variability).
    """

    from tqdm import tqdm

    from femurseg import io
    from femurseg.data.dataset import load_checked
    from femurseg.measure import region_volume_pairs
    from femurseg.metrics import overlap_metrics, surface_metrics, volume_errors
    from femurseg.predict import load_predictor, predict_probability
    from femurseg.run import load_run, write_json

    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    opts = config["cascade"]
    ds = load_checked(dataset or config["dataset"], progress=False)
    names1, names2 = stage_names(int(opts.get("seeds", 1)))
    runs1, runs2 = [run_dir / n for n in names1], [run_dir / n for n in names2]
    split = load_run(runs1[0]).split
    (run_dir / "oof_labels").mkdir(exist_ok=True)
    predictors: dict[int, list[Any]] = {}
    metric_rows, volume_rows = [], []
    vols: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    cases = [c for c in split.cases if all((r / "oof" / f"{c}.nii.gz").exists() for r in runs1)]
    thr1, thr2 = _ensemble_threshold(runs1, ds, cases, 1), _ensemble_threshold(runs2, ds, cases, 2)
    for cid in tqdm(cases, desc="cascade evaluate", unit="case", disable=not progress, leave=False):
        k = split.fold_of(cid)
        case = ds.case(cid)
        vol = io.read_image(case.image)
        ref = np.asarray(io.read_image(case.label, dtype=None).data).astype(np.uint8)
        sp = vol.spacing
        out_path = run_dir / "oof_labels" / f"{cid}.nii.gz"
        if out_path.exists():
            pred = np.asarray(io.read_image(out_path, dtype=None).data).astype(np.uint8)
        else:
            peri = periosteal_mask(mean_oof(runs1, cid), thr1, sp)
            if k not in predictors:
                predictors[k] = [load_predictor(r, folds=k, device=device or "auto", notify=lambda m: None) for r in runs2]
            masked = vol.with_data(stage2_input(vol.data, peri, sp, float(opts["dilate_mm"]), float(opts["fill_hu"])))
            p2 = np.mean([predict_probability(p, masked) for p in predictors[k]], axis=0, dtype=np.float32)
            pred = combine_stages(peri, p2, thr2)
            io.write_like(out_path, pred, vol, np.uint8)
        row: dict[str, Any] = {"case": cid, "fold": k}
        for name, values in COMPARTMENTS.items():
            pm, rm = np.isin(pred, values), np.isin(ref, values)
            o = overlap_metrics(pm, rm)
            row[f"{name}_dsc"] = o["dsc"]
            row[f"{name}_asd_mm"] = surface_metrics(pm, rm, sp)["asd"]
            row[f"{name}_sensitivity"] = o["recall"]
            row[f"{name}_specificity"] = o["specificity"]
        metric_rows.append(row)
        # regional volumes: regions fitted on each mask, and the reference's regions
        for v in region_volume_pairs(pred, ref, sp):
            if v["fit_error"]:
                row["region_error"] = v["fit_error"]
            key = v["region"]  # both femurs of a bilateral scan pool into one row, as 003 pools its femurs
            volume_rows.append({"case": cid, "side": v["side"], "region": v["region"], "compartment": v["compartment"],
                                "ref_cm3": v["ref_cm3"], "pred_cm3": v["pred_cm3"],
                                "pred_in_ref_regions_cm3": v["pred_in_ref_regions_cm3"]})
            vols.setdefault(("own", key, v["compartment"]), []).append((v["pred_cm3"], v["ref_cm3"]))
            vols.setdefault(("reference", key, v["compartment"]), []).append((v["pred_in_ref_regions_cm3"], v["ref_cm3"]))
    for name, rows in (("cascade_metrics.csv", metric_rows), ("cascade_volumes.csv", volume_rows)):
        if not rows:
            continue
        _write_rows(run_dir / name, rows)
    summary: dict[str, Any] = {"task": CASCADE_TASK, "cases": len(metric_rows), "thresholds": {"stage1_pr": thr1, "stage2_pr": thr2}}
    for key in (k for k in (metric_rows[0] if metric_rows else {}) if k not in ("case", "fold", "region_error")):
        v = np.array([r[key] for r in metric_rows], float)
        summary[f"mean_{key}"] = float(np.mean(v))
        summary[f"sd_{key}"] = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
    table2: dict[str, Any] = {}
    for (regions, region, comp), pairs in vols.items():
        p = np.array([a for a, _ in pairs], float)
        r = np.array([b for _, b in pairs], float)
        ok = np.isfinite(p) & (r > 0)
        if not ok.any():
            continue
        e = volume_errors(p[ok], r[ok])
        e.pop("re_pct", None)
        e["ref_mean_cm3"] = float(np.mean(r[ok]))
        e["ref_sd_cm3"] = float(np.std(r[ok], ddof=1)) if ok.sum() > 1 else 0.0
        table2.setdefault(regions, {})[f"{region}/{comp}"] = e
    summary["volume_errors"] = table2
    summary["region_failures"] = [r["case"] for r in metric_rows if "region_error" in r]
    write_json(run_dir / "cascade_summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- cascade prediction


def load_cascade_predictor(run: Any, folds: str | int | None = "all", engine: str = "torch",
                           device: str | None = "auto", notify: Any = None) -> Any:
    """A :class:`femurseg.predict.Predictor` for a cascade run folder: stage 1's models and
    settings, with both stages' predictors attached (``pred.stages``). A run trained with several
    seeds ensembles every seed's fold models per stage, at the thresholds its evaluation took on
    the seed-averaged out-of-fold maps (``cascade_summary.json``)."""
    import dataclasses

    from femurseg.predict import _stderr_notice, load_predictor

    notify = notify or _stderr_notice
    seeds = int(run.config.get("cascade", {}).get("seeds", 1))

    def stage(names: list[str], key: str) -> Any:
        ps = [load_predictor(run.path / n, folds=folds, engine=engine, device=device, notify=notify) for n in names]
        if len(ps) == 1:
            return ps[0]
        summary = run.path / "cascade_summary.json"
        if not summary.exists():
            raise FemursegError(f"{run.path}: a cascade with {seeds} seeds needs its evaluation "
                                f"(cascade_summary.json: the ensemble's thresholds); rerun with --resume")
        thr = float(json.loads(summary.read_text())["thresholds"][key])
        return dataclasses.replace(ps[0], models=[m for p in ps for m in p.models], folds=[f for p in ps for f in p.folds],
                                   thresholds={**ps[0].thresholds, "pr": thr})

    names1, names2 = stage_names(seeds)
    p1, p2 = stage(names1, "stage1_pr"), stage(names2, "stage2_pr")
    pred = type(p1)(run.path, p1.models, p1.folds, p1.prep, p1.infer_options, p1.thresholds, p1.train_spacing,
                    CASCADE_TASK, p1.device, run.config)
    pred.stages = (p1, p2)  # type: ignore[attr-defined]
    return pred


def predict_cascade(pred: Any, vol: Any, tta: str = "none") -> np.ndarray:
    """Cascade inference on one CT volume: ``(3, *vol.data.shape)`` probabilities (background,
    trabecular, cortical) on its grid, for :func:`femurseg.predict.segment`.

    Warns (stderr) when the image does not look like HU. A bilateral scan (two femurs found by
    :func:`find_femurs`) is run per femur crop box (:func:`femur_boxes`) and pasted back, and so is
    every scan when the cascade was trained on per-femur crops (:func:`crop_femur_dataset`, same
    margin); the periosteal mask of each is :func:`periosteal_mask` of stage 1's probability at its
    PR threshold.
    Note that ``predict``'s default ``lcc`` post-processing keeps one femur: use
    ``--postprocess none`` for bilateral scans.
    """
    from femurseg import io
    from femurseg.predict import predict_probability

    p1, p2 = pred.stages
    opts = pred.config.get("cascade", {})
    dilate_mm, fill_hu = float(opts.get("dilate_mm", 1.0)), float(opts.get("fill_hu", -1024.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HUWarning)
        check_hu(vol.data, vol.source or "image")
    for w in caught:
        import sys

        print(f"femurseg: warning: {w.message}", file=sys.stderr)
    thr1, thr2 = float(p1.thresholds.get("pr", 0.5)), float(p2.thresholds.get("pr", 0.5))
    margin = opts.get("femur_crop_margin_mm")
    try:
        boxes = femur_boxes(vol.data, vol.spacing, **({} if margin is None else {"margin_mm": float(margin)}))
    except FemursegError:
        boxes = []
    if len(boxes) < 2 and (margin is None or not boxes):
        # whole volume: a model trained on whole scans, or no femur found by the bone threshold
        boxes = [CropBox("", (0, 0, 0), tuple(vol.data.shape), tuple(vol.data.shape))]
    out = np.zeros((3, *vol.data.shape), np.float32)
    out[0] = 1.0
    for box in boxes:
        img = box.crop(vol.data, fill=fill_hu)
        sub = io.make_volume(img, vol.spacing)
        sub.source = vol.source
        pp = predict_probability(p1, sub, tta)
        peri = periosteal_mask(pp, thr1, vol.spacing)
        pe = predict_probability(p2, sub.with_data(stage2_input(img, peri, vol.spacing, dilate_mm, fill_hu)), tta)
        probs = cascade_probabilities(pp, peri, pe, thr2, thr1)
        region = box.paste(np.ones(box.shape, bool), fill=0).astype(bool)
        full = box.paste(probs)
        out[:, region] = full[:, region]
    return out


# ----------------------------------------------------------------------------- the CT study

TABLE2_ROWS: tuple[tuple[str, str, str], ...] = (
    ("Femur head", "head", "total"),
    ("Femur neck", "neck", "total"),
    ("Combination", "combination", "total"),
    ("Cortical bone in femur neck", "neck", "cortical"),
    ("Cortical bone in combination", "combination", "cortical"),
    ("Trochanter", "trochanter", "total"),
    ("Intertrochanter", "intertrochanter", "total"),
    ("Total", "total", "total"),
    ("Trabecular bone, total", "total", "trabecular"),
    ("Cortical bone, total", "total", "cortical"),
)
"""003 Table 2's five rows (head, neck, neck + trochanter + intertrochanter, their cortical bone)
followed by the other regions and compartments."""


def cascade_tables(summary: dict[str, Any], regions: str = "own") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """003 Table 1 (per compartment: DSC, ASD, specificity, sensitivity; mean and SD over cases)
    and Table 2 (per region: reference volume mean +- SD, MAE, RMSE, relative error mean / min /
    max) rows from a cascade summary. ``regions``: "own" (each mask's own region fit) or
    "reference" (the reference's regions applied to the prediction)."""
    t1 = []
    for name in COMPARTMENTS:
        if f"mean_{name}_dsc" not in summary:
            continue
        row: dict[str, Any] = {"surface": name}
        for key, col in (("dsc", "DSC"), ("asd_mm", "ASD_mm"), ("specificity", "SP"), ("sensitivity", "SN")):
            row[col] = summary[f"mean_{name}_{key}"]
            row[f"{col}_sd"] = summary[f"sd_{name}_{key}"]
        t1.append(row)
    t2 = []
    errs = summary.get("volume_errors", {}).get(regions, {})
    for label, region, comp in TABLE2_ROWS:
        e = errs.get(f"{region}/{comp}")
        if e is None:
            continue
        t2.append({"target": label, "region": region, "compartment": comp, "n": e["n"],
                   "ref_mean_cm3": e["ref_mean_cm3"], "ref_sd_cm3": e["ref_sd_cm3"], "mae_cm3": e["mae"],
                   "rmse_cm3": e["rmse"], "bias_cm3": e["bias"], "re_mean_pct": e["re_mean_pct"],
                   "re_min_pct": e["re_min_pct"], "re_max_pct": e["re_max_pct"]})
    return t1, t2


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    from femurseg.tables import write_csv

    if rows:
        write_csv(rows, path)


def format_cascade_report(summary: dict[str, Any]) -> str:
    """Plain-text 003 Tables 1 and 2 of a cascade summary."""
    t1, t2 = cascade_tables(summary, "own")
    _, t2r = cascade_tables(summary, "reference")
    lines = [f"CT cascade, {summary.get('cases', 0)} cases (out-of-fold)", "",
             "Table 1  surface      DSC             ASD (mm)        SP       SN"]
    for r in t1:
        lines.append(f"         {r['surface']:<12} {r['DSC']:.4f}+-{r['DSC_sd']:.4f}  {r['ASD_mm']:.3f}+-{r['ASD_mm_sd']:.3f}"
                     f"    {r['SP']:.4f}   {r['SN']:.4f}")
    lines += ["", "Table 2  target                          ref cm3        regions fitted on each mask:"
              "  MAE    RMSE   RE % mean (min, max)   | reference regions: RE % mean (min, max)"]
    own = {r["target"]: r for r in t2}
    for rr in t2r:
        r = own.get(rr["target"])
        left = (f"{r['mae_cm3']:6.3f} {r['rmse_cm3']:6.3f}  {r['re_mean_pct']:5.2f} ({r['re_min_pct']:.2f}, "
                f"{r['re_max_pct']:.2f})") if r else "   (no region fit)"
        lines.append(f"         {rr['target']:<31} {rr['ref_mean_cm3']:6.2f}+-{rr['ref_sd_cm3']:5.2f}   {left:<40}"
                     f" | {rr['re_mean_pct']:5.2f} ({rr['re_min_pct']:.2f}, {rr['re_max_pct']:.2f})")
    if summary.get("region_failures"):
        lines.append(f"no region fit on the prediction of: {', '.join(summary['region_failures'])}")
    return "\n".join(lines)


def run_cascade_experiment(dataset: str | Path, out: str | Path, *, scale: str = "demo", seed: int = 0,
                           seeds: int | None = None, folds: int = 4, device: str | None = None, progress: bool = True,
                           model_cfg: dict | None = None) -> str:
    """``femurseg experiment ct DATASET --out DIR``: the cascade study of paper 003 at ``scale``.

    Cross-validates the cascade into ``DIR/run`` (:func:`run_cascade_cv`; rerun to resume), then
    writes ``DIR/table1.csv`` (DSC, ASD, SP, SN per compartment: 003 Table 1),
    ``DIR/table2.csv`` and ``DIR/table2_reference_regions.csv`` (volume MAE, RMSE and relative
    error per region: 003 Table 2) and ``DIR/report.txt``; returns the report text. ``seeds``:
    as :func:`run_cascade_cv` (rerun an existing study with a larger ``seeds`` to add seeds).
    """

    outp = Path(out)
    if outp.exists() and not outp.is_dir():
        raise FemursegError(f"{outp}: exists and is not a folder")
    if not outp.parent.is_dir():
        raise FemursegError(f"{outp}: parent folder {outp.parent} does not exist")
    outp.mkdir(exist_ok=True)
    summary = run_cascade_cv(dataset, outp / "run", scale=scale, seed=seed, seeds=seeds, folds=folds, device=device,
                             progress=progress, resume=True, model_cfg=model_cfg)
    t1, t2 = cascade_tables(summary, "own")
    _, t2r = cascade_tables(summary, "reference")
    _write_rows(outp / "table1.csv", t1)
    _write_rows(outp / "table2.csv", t2)
    _write_rows(outp / "table2_reference_regions.csv", t2r)
    text = format_cascade_report(summary)
    from femurseg.errors import atomic_path

    with atomic_path(outp / "report.txt") as tmp:
        tmp.write_text(text + "\n")
    return text


def describe_cascade(scale: str = "demo") -> str:
    """What ``femurseg experiment ct --dry-run`` prints: the two stages' configs at ``scale``."""

    cfgs = cascade_configs(scale)
    lines = [f"CT cascade (paper 003), scale {scale}: stage 1 periosteal (label > 0) from the CT, stage 2 endosteal "
             "(label == 1) from the CT masked with the periosteal region (dilated 1 mm, -1024 HU outside); "
             "the same settings for both stages:"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in cfgs.items()]
    return "\n".join(lines)
