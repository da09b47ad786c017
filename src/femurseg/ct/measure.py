"""Bone measurements of a proximal femur segmentation (``femurseg measure``).

Input is a label map in the canonical ``(A, I, L)`` order (``docs/conventions.md``):

* **CT** (values 0/1/2, ``CT_LABELS``): 1 = trabecular / medullary bone inside the endosteal
  surface, 2 = cortical shell between the endosteal and periosteal surfaces. The periosteal
  region (the whole bone) is ``label > 0``, the endosteal region ``label == 1``.
* **binary** (values 0/1, MR or a periosteal-only CT mask): only the total bone is measured.

Per anatomical region (head, neck, trochanter, intertrochanter of paper 003 Fig. 7, split by
:func:`femurseg.ct.regions.split_regions`; plus ``combination`` = neck + trochanter +
intertrochanter as in 003 Table 2, and ``total``), :func:`measure` reports

* ``total_volume_cm3``, ``trabecular_volume_cm3``, ``cortical_volume_cm3``: voxel counts times
  the voxel volume (no partial-volume correction; a sphere of radius 20 mm at 1 mm voxels
  is within about 1 % of 4/3 pi r^3).
* ``cortical_thickness_mm``: the mean, over the **periosteal surface voxels** of the region,
  of the Euclidean distance (mm, anisotropic spacing) from the voxel centre to the nearest
  endosteal (label 1) voxel centre. A periosteal surface voxel is a bone voxel with a
  face-neighbour in the background *inside the array*: faces on the array border are cuts of
  the field of view, not bone surface, and are ignored. Voxel-centre to voxel-centre
  distances from the outermost bone voxel to the innermost-but-one layer approximate the
  distance between the two surfaces; on an analytic spherical shell the mean is within about
  0.3 voxel of the true thickness (``tests/test_measure.py``). Where a region has no
  endosteal bone nearby the distance runs to the nearest endosteal voxel elsewhere: a thin,
  fully cortical part reads as thick as the distance to the marrow actually is. Binary masks
  have no thickness.
* ``mean_hu_total``, ``mean_hu_trabecular``, ``mean_hu_cortical``: with an image (CT in
  Hounsfield units, same grid as the mask), the mean intensity of each compartment of the
  region: the input to a BMD calibration (HU -> mg/cm^3 hydroxyapatite with a phantom or
  internal calibration, not done here). Boundary voxels carry partial volume, so the
  cortical mean underestimates the true cortical density of a thin cortex.
* ``head_radius_mm`` and ``neck_shaft_angle_deg`` (on the ``total`` row): by-products of
  the region fit.
* ``voxels``: number of bone voxels of the region.

A mask holding both femurs (a bilateral CT) is split per side first (largest component on
each side of the mid-sagittal column; :func:`femurseg.ct.femurs.split_sides`); the ``side`` column
says which femur a row belongs to.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from femurseg.core.errors import FemursegError
from femurseg.ct.regions import REGION_LABELS, REGION_NAMES, distance_mm, split_regions

COLUMNS: tuple[str, ...] = (
    "side", "region", "voxels", "total_volume_cm3", "trabecular_volume_cm3", "cortical_volume_cm3",
    "cortical_thickness_mm", "mean_hu_total", "mean_hu_trabecular", "mean_hu_cortical",
    "head_radius_mm", "neck_shaft_angle_deg",
)
ROW_NAMES: tuple[str, ...] = (*REGION_NAMES, "combination", "total")
COMBINATION: tuple[str, ...] = ("neck", "trochanter", "intertrochanter")


def periosteal_surface(bone: np.ndarray) -> np.ndarray:
    """Bone voxels with a face-neighbour in the background inside the array (bool, same shape).

    The array border is not a surface (``border_value=1`` in the erosion): a bone cut by the
    field of view has no periosteal surface on the cut.
    """
    b = np.asarray(bone, dtype=bool)
    return b & ~ndimage.binary_erosion(b, structure=ndimage.generate_binary_structure(b.ndim, 1), border_value=1)


def cortical_thickness(label: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Cortical thickness at each periosteal surface voxel of a CT label map.

    Args:
        label: canonical label map, 0 background, 1 trabecular (endosteal region), 2 cortical.
        spacing: mm per canonical axis.

    Returns:
        ``(surface, thickness)``: the bool periosteal-surface mask and a float32 array of the same
        shape holding, on surface voxels, the distance (mm) to the nearest label-1 voxel centre
        (0 where the surface voxel itself is label 1; NaN everywhere if there is no label 1).
    """
    lab = np.asarray(label)
    surface = periosteal_surface(lab > 0)
    endo = lab == 1
    if not endo.any():
        return surface, np.full(lab.shape, np.nan, np.float32)
    thick = distance_mm(~endo, spacing, black_border=False)
    return surface, thick


def _mean(values: np.ndarray) -> float:
    return float(values.mean(dtype=np.float64)) if values.size else math.nan


def measure_femur(label: np.ndarray, spacing: tuple[float, float, float], image: np.ndarray | None = None, *,
                  regions: bool = True, compartments: bool | None = None, side: str = "",
                  **fit_kwargs: Any) -> tuple[list[dict[str, Any]], dict[str, Any] | None, np.ndarray | None]:
    """Measure one femur (rule: module docstring).

    Args:
        label: canonical label map of one femur (CT 0/1/2 or binary 0/1).
        spacing: mm per canonical axis.
        image: optional image on the same grid (CT: Hounsfield units) for the mean intensities.
        regions: split into head/neck/trochanter/intertrochanter (else only the ``total`` row).
        compartments: measure trabecular/cortical (None: when the label holds the value 2).
        side: written to the ``side`` column ("" = taken from the region fit when available).
        **fit_kwargs: passed to :func:`femurseg.ct.regions.fit_femur`.

    Returns:
        ``(rows, fit, region_map)``: one dict per row (keys :data:`COLUMNS`, NaN where not
        measured), the region fit (None without regions) and the uint8 region map (None without
        regions).

    Raises:
        FemursegError: empty mask, labels outside 0/1/2, an image of another shape, or no
            femoral head when ``regions`` is True.
    """
    lab = np.asarray(label)
    sp = tuple(float(s) for s in spacing)
    if lab.ndim != 3:
        raise FemursegError(f"mask: expected a 3D label map, got shape {lab.shape}")
    values = np.unique(lab)
    if values.size and (values.min() < 0 or values.max() > 2 or np.any(values != np.round(values))):
        raise FemursegError(f"mask: labels {values.tolist()[:6]} are not 0/1 (binary) or 0/1/2 (CT)")
    lab = lab.astype(np.uint8, copy=False)
    bone = lab > 0
    if not bone.any():
        raise FemursegError("mask is empty: nothing to measure")
    if image is not None and np.shape(image) != lab.shape:
        raise FemursegError(f"image shape {np.shape(image)} differs from the mask shape {lab.shape}")
    if compartments is None:
        compartments = bool((lab == 2).any())
    voxel_cm3 = float(np.prod(sp)) / 1000.0

    fit = None
    region_map = None
    if regions:
        region_map, fit = split_regions(bone, sp, **fit_kwargs)
        side = side or fit["side"]
    if compartments:
        surface, thick = cortical_thickness(lab, sp)
    img = None if image is None else np.asarray(image, dtype=np.float32)

    def row(name: str, sel: np.ndarray) -> dict[str, Any]:
        r: dict[str, Any] = {c: math.nan for c in COLUMNS}
        r["side"], r["region"] = side, name
        b = bone & sel
        r["voxels"] = int(np.count_nonzero(b))
        r["total_volume_cm3"] = r["voxels"] * voxel_cm3
        if img is not None:
            r["mean_hu_total"] = _mean(img[b])
        if compartments:
            tr, co = (lab == 1) & sel, (lab == 2) & sel
            r["trabecular_volume_cm3"] = int(np.count_nonzero(tr)) * voxel_cm3
            r["cortical_volume_cm3"] = int(np.count_nonzero(co)) * voxel_cm3
            r["cortical_thickness_mm"] = _mean(thick[surface & sel])
            if img is not None:
                r["mean_hu_trabecular"] = _mean(img[tr])
                r["mean_hu_cortical"] = _mean(img[co])
        return r

    rows = []
    if region_map is not None:
        for name in REGION_NAMES:
            rows.append(row(name, region_map == REGION_LABELS[name]))
        rows.append(row("combination", np.isin(region_map, [REGION_LABELS[n] for n in COMBINATION])))
    total = row("total", np.ones(lab.shape, bool))
    if fit is not None:
        total["head_radius_mm"] = float(fit["head_radius_mm"])
        total["neck_shaft_angle_deg"] = float(fit["neck_shaft_angle_deg"])
    rows.append(total)
    return rows, fit, region_map


def measure(label: np.ndarray, spacing: tuple[float, float, float], image: np.ndarray | None = None, *,
            regions: bool = True, compartments: bool | None = None,
            **fit_kwargs: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], np.ndarray | None]:
    """Measure every femur of a label map (one, or two in a bilateral CT).

    A mask whose two largest connected components lie on either side of the mid-sagittal
    column and are both at least a quarter of the bone is split per side
    (:func:`femurseg.ct.femurs.split_sides`) and each femur is measured alone.

    Returns:
        ``(rows, fits, region_map)``: rows of all femurs (see :func:`measure_femur`), one fit dict
        per femur (with ``side``), and the combined region map (None without regions).
    """
    from femurseg.ct.femurs import split_sides

    lab = np.asarray(label)
    if compartments is None:
        compartments = bool((lab == 2).any())
    parts = split_sides(lab > 0, spacing) if regions else {}
    if len(parts) < 2:
        rows, fit, rmap = measure_femur(lab, spacing, image, regions=regions, compartments=compartments, **fit_kwargs)
        return rows, [fit] if fit is not None else [], rmap
    all_rows: list[dict[str, Any]] = []
    fits: list[dict[str, Any]] = []
    rmap = np.zeros(lab.shape, np.uint8)
    for side, sel in parts.items():
        one = np.where(sel, lab, 0).astype(np.uint8)
        rows, fit, rm = measure_femur(one, spacing, image, regions=regions, compartments=compartments, side=side,
                                      **fit_kwargs)
        all_rows += rows
        if fit is not None:
            fit["side"] = side
            fits.append(fit)
        if rm is not None:
            rmap = np.maximum(rmap, rm)
    return all_rows, fits, rmap


def region_volume_pairs(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float]) -> list[dict[str, Any]]:
    """Reference and predicted volumes (cm^3) per femur, region and compartment (003 Table 2).

    Args:
        pred, ref: CT label maps (0/1/2) on the same canonical grid; one femur, or both femurs of a
            bilateral scan (split as :func:`measure` does, on the reference; each predicted voxel
            goes to the femur on its side of the mid-column between the two reference femurs).
        spacing: mm per canonical axis.

    Returns:
        One dict per (femur, region in :data:`ROW_NAMES`, compartment ``total`` / ``trabecular``
        / ``cortical``) with ``side`` ("" for a single femur), ``region``, ``compartment``,
        ``ref_cm3``, ``pred_cm3`` (the regions fitted on the *predicted* mask, as two software
        runs would measure; NaN when the prediction has no recognisable femoral head, the reason
        in ``fit_error``) and ``pred_in_ref_regions_cm3`` (the reference's regions, each voxel
        in the region of the nearest reference bone voxel, so bone the prediction adds outside
        the reference counts where it sticks out: the segmentation error without the region
        fit's own variability).

    Raises:
        FemursegError: the reference has no recognisable femoral head (:func:`measure_femur`).
    """
    from femurseg.ct.femurs import split_sides

    p, r = np.asarray(pred).astype(np.uint8), np.asarray(ref).astype(np.uint8)
    if p.shape != r.shape:
        raise FemursegError(f"prediction shape {p.shape} differs from the reference's {r.shape}")
    sp = tuple(float(s) for s in spacing)
    sides = split_sides(r > 0, sp)
    if sides:
        mid = 0.5 * (np.nonzero(sides["right"])[2].mean() + np.nonzero(sides["left"])[2].mean())
        cols = np.arange(r.shape[2])[None, None, :]
        halves = {"right": cols < mid, "left": cols >= mid}
        femurs = [(s, np.where(sides[s], r, 0).astype(np.uint8), np.where(halves[s], p, 0).astype(np.uint8))
                  for s in ("right", "left")]
    else:
        femurs = [("", r, p)]
    vox = float(np.prod(sp)) / 1000.0
    comps = {"total": (1, 2), "trabecular": (1,), "cortical": (2,)}
    out: list[dict[str, Any]] = []
    for side, rf, pf in femurs:
        ref_rows, _, ref_regions = measure_femur(rf, sp, compartments=True, side=side)
        fit_error = ""
        try:
            own = {row["region"]: row for row in measure_femur(pf, sp, compartments=True, side=side)[0]} if pf.any() else {}
            if not own:
                fit_error = "empty prediction"
        except FemursegError as exc:
            own, fit_error = {}, str(exc)
        _, near = ndimage.distance_transform_edt(ref_regions == 0, sampling=sp, return_indices=True)
        nearest = ref_regions[tuple(near)]
        for rr in ref_rows:
            region = rr["region"]
            sel = (np.ones(r.shape, bool) if region == "total" else
                   np.isin(nearest, [REGION_LABELS[n] for n in COMBINATION]) if region == "combination" else
                   nearest == REGION_LABELS[region])
            for comp, values in comps.items():
                pr = own.get(region)
                out.append({"side": side, "region": region, "compartment": comp,
                            "ref_cm3": float(rr[f"{comp}_volume_cm3"]),
                            "pred_cm3": float(pr[f"{comp}_volume_cm3"]) if pr else math.nan,
                            "pred_in_ref_regions_cm3": np.count_nonzero(np.isin(pf, values) & sel) * vox,
                            "fit_error": fit_error})
    return out


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write measurement rows (keys :data:`COLUMNS`) as CSV atomically (:func:`femurseg.core.tables.write_csv`)."""
    from femurseg.core.tables import write_csv as _write

    return _write(rows, path, COLUMNS, missing=math.nan)


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a measurement CSV back (numbers as float, empty as NaN)."""
    out = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            d: dict[str, Any] = {}
            for k, v in r.items():
                if k in ("side", "region"):
                    d[k] = v
                else:
                    d[k] = float(v) if v != "" else math.nan
            out.append(d)
    return out


def measure_files(mask: str | os.PathLike, image: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                  regions_out: str | os.PathLike | None = None, regions: bool = True,
                  modality: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``femurseg measure``: read a label map (and an image), measure, write the CSV.

    Args:
        mask: label map file (CT 0/1/2 or binary).
        image: optional image on the same grid; if it is CT (``modality="ct"``, or the mask
            holds label 2) its range is checked for Hounsfield units (a warning, see
            :func:`femurseg.ct.hu.check_hu`).
        out: CSV path (None: not written).
        regions_out: optional path for the region label map (written like the mask).
        regions: split into regions (False: only totals).
        modality: "ct", "mr" or None (from the labels).

    Returns:
        ``(rows, fits)``.
    """
    from femurseg.core import io
    from femurseg.ct.hu import check_hu

    mvol = io.read_image(mask, dtype=None)
    lab = np.asarray(mvol.data)
    img = None
    if image is not None:
        ivol = io.read_image(image)
        if ivol.data.shape != lab.shape:
            raise FemursegError(f"{image}: image shape {ivol.data.shape} differs from the mask's {lab.shape}")
        diff = ivol.geometry.matches(mvol.geometry, tol=1e-3)
        if diff is not None:
            raise FemursegError(f"{image}: image grid differs from the mask's ({diff})")
        img = ivol.data
        is_ct = (modality or "").lower() == "ct" or (modality is None and bool((lab == 2).any()))
        if is_ct:
            check_hu(img, str(image))
    try:
        rows, fits, rmap = measure(lab, mvol.spacing, img, regions=regions)
    except FemursegError as exc:
        hint = " (use --no-regions for totals only)" if regions and "femoral head" in str(exc) else ""
        raise FemursegError(f"{mask}: {exc}{hint}") from None
    if out is not None:
        write_csv(rows, out)
    if regions_out is not None and rmap is not None:
        io.write_like(regions_out, rmap, mvol, dtype=np.uint8)
    return rows, fits


def region_volume_columns(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Per-region volume columns of a CT case (003 Table 2): ``{region}_{compartment}_vol_pred_cm3``
    and ``..._vol_ref_cm3`` for the regions head, neck, trochanter, intertrochanter and combination
    and the compartments total, trabecular and cortical (the whole femur is already in the
    ``periosteal_`` / ``endosteal_`` / ``cortical_`` columns), prefixed ``right_`` / ``left_`` for
    a bilateral scan. The regions are fitted on each mask separately
    (:func:`femurseg.ct.measure.region_volume_pairs`); a prediction without a recognisable femoral
    head gets NaN, left out of the summaries. A reference without one gets no region columns."""
    try:
        pairs = region_volume_pairs(pred, ref, tuple(float(s) for s in spacing))
    except FemursegError:
        return {}
    row: dict[str, float] = {}
    for v in pairs:
        if v["region"] == "total":
            continue
        key = f"{v['side'] + '_' if v['side'] else ''}{v['region']}_{v['compartment']}"
        row[f"{key}_vol_pred_cm3"] = v["pred_cm3"]
        row[f"{key}_vol_ref_cm3"] = v["ref_cm3"]
    return row
