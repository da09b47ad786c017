"""Where the femurs are in a CT scan: per-side crop boxes, side splitting, per-femur datasets.

Everything works on canonical ``(A, I, L)`` arrays ``(n_coronal, rows, cols)``; column index
runs patient right -> left, so a **right** femur lies at low column indices (image left)
and a **left** femur at high ones (``docs/conventions.md``).

* :func:`find_femurs` / :func:`femur_boxes` locate each femur from a coarse bone threshold and
  give a :class:`CropBox` per side (paper 003 cropped 512 x 512 slices to 192 x 192 around
  the left femur by hand; here it is automatic and per side). A box maps a crop back onto the
  full grid (:meth:`CropBox.paste`), so results of a model run on the crop land on the input
  grid.
* :func:`split_sides` splits a bilateral femur *mask* into one mask per side.
* :func:`crop_femur_dataset` (``femurseg crop-femurs``) turns whole CT scans into one training
  case per labelled femur, cropped to the box :func:`femur_boxes` finds in the image, so a
  cascade trained on them sees the same boxes at predict time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from femurseg.core.errors import FemursegError
from femurseg.core.io import box_slices, crop_array
from femurseg.ct.hu import BONE_THRESHOLD_HU, check_ct_dataset

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
    from femurseg.core import io
    from femurseg.core.progress import progress as progress_bar
    from femurseg.core.tables import write_csv
    from femurseg.data.dataset import build_dataset, load_checked, write_dataset

    if margin_mm < 0:
        raise FemursegError(f"--margin-mm: must be >= 0, got {margin_mm}")
    ds = load_checked(dataset, progress=False)
    check_ct_dataset(ds, str(dataset))
    crops: list[dict[str, Any]] = []
    groups: dict[str, str] = {}

    def volumes() -> Any:
        for case in progress_bar(ds.cases, desc="crop femurs", unit="case", disable=not progress):
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
