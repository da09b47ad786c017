"""Measurements (femurseg.ct.measure): analytic shapes, phantoms, CSV and the CLI."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from femurseg.core import io
from femurseg.core.errors import FemursegError
from femurseg.ct.measure import (
    COLUMNS,
    ROW_NAMES,
    cortical_thickness,
    measure,
    measure_femur,
    read_csv,
    region_volume_pairs,
    write_csv,
)
from femurseg.data import phantom


def sphere_shell(radius: float, inner: float, spacing, fov_mm: float = 56.0) -> np.ndarray:
    """CT-style label map of a spherical shell: 1 inside ``inner`` mm, 2 up to ``radius`` mm."""
    shape = tuple(int(round(fov_mm / s)) for s in spacing)
    # an off-grid centre so the discretisation is not symmetric
    g = np.meshgrid(*[(np.arange(n) - (n - 1) / 2 + 0.3) * s for n, s in zip(shape, spacing)], indexing="ij")
    d = np.sqrt(sum(x * x for x in g))
    lab = np.zeros(shape, np.uint8)
    lab[d <= radius] = 2
    lab[d <= inner] = 1
    return lab


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 0.5, 0.5)], ids=["iso", "aniso"])
@pytest.mark.parametrize("radius,thickness", [(20.0, 2.0), (15.0, 4.0)])
def test_sphere_shell_volumes_and_thickness_match_formulas(spacing, radius, thickness):
    lab = sphere_shell(radius, radius - thickness, spacing)
    rows, fit, rmap = measure_femur(lab, spacing, regions=False)
    assert fit is None and rmap is None and len(rows) == 1
    r = rows[0]
    v_total = 4 / 3 * math.pi * radius**3 / 1000
    v_trab = 4 / 3 * math.pi * (radius - thickness) ** 3 / 1000
    assert r["region"] == "total"
    assert r["total_volume_cm3"] == pytest.approx(v_total, rel=0.01)
    assert r["trabecular_volume_cm3"] == pytest.approx(v_trab, rel=0.01)
    assert r["cortical_volume_cm3"] == pytest.approx(v_total - v_trab, rel=0.02)
    assert r["trabecular_volume_cm3"] + r["cortical_volume_cm3"] == pytest.approx(r["total_volume_cm3"])
    # documented accuracy of the surface-voxel thickness: within 0.3 of the largest voxel size
    assert abs(r["cortical_thickness_mm"] - thickness) <= 0.3 * max(spacing)


def test_thickness_zero_where_the_cortex_is_missing_and_nan_without_marrow():
    lab = sphere_shell(12.0, 10.0, (1.0, 1.0, 1.0), fov_mm=30)
    surface, thick = cortical_thickness(lab, (1.0, 1.0, 1.0))
    assert surface.sum() > 0 and np.all(thick[surface] > 0)
    # the array border is a field-of-view cut, not a periosteal surface
    full = np.full((6, 6, 6), 2, np.uint8)
    assert not cortical_thickness(full, (1.0, 1.0, 1.0))[0].any()
    binary = (lab > 0).astype(np.uint8) * 2
    _, t = cortical_thickness(binary, (1.0, 1.0, 1.0))
    assert np.isnan(t).all()


def test_binary_mask_gives_totals_only_and_mean_intensity():
    lab = sphere_shell(15.0, 13.0, (1.0, 1.0, 1.0), fov_mm=40)
    binary = (lab > 0).astype(np.uint8)
    img = np.where(binary > 0, 1000.0, -100.0).astype(np.float32)
    rows, _, _ = measure_femur(binary, (1.0, 1.0, 1.0), img, regions=False)
    r = rows[0]
    assert math.isnan(r["trabecular_volume_cm3"]) and math.isnan(r["cortical_thickness_mm"])
    assert r["mean_hu_total"] == pytest.approx(1000.0)


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(FemursegError, match="empty"):
        measure_femur(np.zeros((5, 5, 5), np.uint8), (1.0, 1.0, 1.0), regions=False)
    with pytest.raises(FemursegError, match="labels"):
        measure_femur(np.full((5, 5, 5), 3, np.uint8), (1.0, 1.0, 1.0), regions=False)
    with pytest.raises(FemursegError, match="shape"):
        measure_femur(np.ones((5, 5, 5), np.uint8), (1.0, 1.0, 1.0), np.zeros((4, 5, 5)), regions=False)


@pytest.fixture(scope="module")
def ct_case():
    return phantom.generate_case(2, modality="ct", artefacts=False)


def test_phantom_regions_add_up_and_hu_per_compartment(ct_case):
    lab, sp = ct_case.label, ct_case.spacing
    rows, fits, rmap = measure(lab, sp, ct_case.image)
    by = {r["region"]: r for r in rows}
    assert list(by) == list(ROW_NAMES)
    regions = ("head", "neck", "trochanter", "intertrochanter")
    for key in ("total_volume_cm3", "trabecular_volume_cm3", "cortical_volume_cm3", "voxels"):
        assert sum(by[k][key] for k in regions) == pytest.approx(by["total"][key])
        assert sum(by[k][key] for k in regions[1:]) == pytest.approx(by["combination"][key])
    assert by["total"]["total_volume_cm3"] == pytest.approx(ct_case.meta["label_volume_cm3"])
    assert by["total"]["cortical_volume_cm3"] == pytest.approx(ct_case.meta["cortical_volume_cm3"])
    assert by["total"]["head_radius_mm"] == pytest.approx(ct_case.meta["head_radius_mm"], abs=1.5)
    assert by["total"]["neck_shaft_angle_deg"] == pytest.approx(ct_case.meta["neck_shaft_angle_deg"], abs=5)
    assert math.isnan(by["head"]["head_radius_mm"])
    # cortex is dense bone, the trabecular/medullary compartment much less so
    for name in regions:
        assert by[name]["mean_hu_cortical"] > by[name]["mean_hu_trabecular"] + 200
        assert 0.5 < by[name]["cortical_thickness_mm"] < 8
    assert len(fits) == 1 and fits[0]["side"] == ct_case.meta["side"]
    assert set(np.unique(rmap)) == {0, 1, 2, 3, 4}


def test_bilateral_mask_is_measured_per_side(ct_case):
    lab = ct_case.label
    both = np.concatenate([lab, lab[..., ::-1]], axis=2)  # the mirror image is the other femur
    rows, fits, _ = measure(both, ct_case.spacing)
    sides = {r["side"] for r in rows}
    assert sides == {"left", "right"} and len(rows) == 2 * len(ROW_NAMES)
    tot = {r["side"]: r["total_volume_cm3"] for r in rows if r["region"] == "total"}
    assert tot["left"] == pytest.approx(tot["right"])
    assert {f["side"] for f in fits} == {"left", "right"}


def test_region_volume_pairs_exact_layer_and_empty(ct_case):
    lab, sp = ct_case.label, ct_case.spacing
    vox = float(np.prod(sp)) / 1000.0
    same = region_volume_pairs(lab, lab, sp)
    assert {(v["region"], v["compartment"]) for v in same} == {(r, c) for r in ROW_NAMES
                                                                 for c in ("total", "trabecular", "cortical")}
    for v in same:
        assert v["pred_cm3"] == pytest.approx(v["ref_cm3"]) and v["pred_in_ref_regions_cm3"] == pytest.approx(v["ref_cm3"])
        assert v["fit_error"] == "" and v["side"] == ""
    # one more voxel layer of cortex outside the bone: in the reference's regions it all lands in
    # total and cortical, none in trabecular, and the regions' sums are the layer's volume
    grown = ndimage.binary_dilation(lab > 0, ndimage.generate_binary_structure(3, 1)) & (lab == 0)
    pred = np.where(grown, np.uint8(2), lab)
    by = {(v["region"], v["compartment"]): v for v in region_volume_pairs(pred, lab, sp)}
    layer = np.count_nonzero(grown) * vox
    for comp in ("total", "cortical"):
        d = {r: by[(r, comp)]["pred_in_ref_regions_cm3"] - by[(r, comp)]["ref_cm3"] for r in ROW_NAMES}
        assert d["total"] == pytest.approx(layer)
        assert sum(d[r] for r in ("head", "neck", "trochanter", "intertrochanter")) == pytest.approx(layer)
        assert all(d[r] > 0 for r in ("head", "neck", "trochanter", "intertrochanter"))
    assert all(by[(r, "trabecular")]["pred_in_ref_regions_cm3"] == pytest.approx(by[(r, "trabecular")]["ref_cm3"])
               for r in ROW_NAMES)
    assert by[("total", "cortical")]["pred_cm3"] == pytest.approx(by[("total", "cortical")]["ref_cm3"] + layer)
    empty = region_volume_pairs(np.zeros_like(lab), lab, sp)
    assert all(math.isnan(v["pred_cm3"]) and v["pred_in_ref_regions_cm3"] == 0 and v["fit_error"] for v in empty)


def test_region_volume_pairs_bilateral(ct_case):
    lab, sp = ct_case.label, ct_case.spacing
    both = np.concatenate([lab, lab[..., ::-1]], axis=2)
    rows = region_volume_pairs(both, both, sp)
    assert {v["side"] for v in rows} == {"left", "right"} and len(rows) == 2 * 3 * len(ROW_NAMES)
    tot = {v["side"]: v["pred_in_ref_regions_cm3"] for v in rows if (v["region"], v["compartment"]) == ("total", "total")}
    assert tot["left"] == pytest.approx(tot["right"]) == pytest.approx(float(np.count_nonzero(lab)) * np.prod(sp) / 1000)


def test_csv_round_trip(tmp_path):
    rows = [{c: math.nan for c in COLUMNS} | {"side": "left", "region": "total", "voxels": 10, "total_volume_cm3": 1.5}]
    p = write_csv(rows, tmp_path / "m.csv")
    text = p.read_text().splitlines()
    assert text[0].split(",") == list(COLUMNS)
    back = read_csv(p)
    assert back[0]["region"] == "total" and back[0]["total_volume_cm3"] == 1.5 and math.isnan(back[0]["mean_hu_total"])


def test_cli_measure_writes_csv_and_warns_on_non_hu(ct_case, tmp_path):
    vol = io.make_volume(ct_case.image, ct_case.spacing)
    io.write_like(tmp_path / "img.nii.gz", ct_case.image, vol)
    io.write_like(tmp_path / "scaled.nii.gz", (ct_case.image + 1024) / 4096, vol)  # not HU
    io.write_like(tmp_path / "mask.nii.gz", ct_case.label, vol, dtype=np.uint8)
    out = tmp_path / "m.csv"
    cmd = [sys.executable, "-m", "femurseg.cli", "measure", str(tmp_path / "mask.nii.gz"), "--out", str(out),
           "--regions-out", str(tmp_path / "regions.nii.gz")]
    res = subprocess.run(cmd + ["--image", str(tmp_path / "img.nii.gz")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr
    rows = read_csv(out)
    assert [r["region"] for r in rows] == list(ROW_NAMES)
    assert rows[-1]["mean_hu_cortical"] > 500
    assert (tmp_path / "regions.nii.gz").exists()
    res = subprocess.run(cmd + ["--image", str(tmp_path / "scaled.nii.gz")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "do not look like Hounsfield units" in res.stderr and "observed min" in res.stderr
    # a mask without a femoral head: one line, exit 1
    g = np.meshgrid(*[np.arange(s) for s in ct_case.label.shape], indexing="ij")
    cyl = (((g[0] - 32) ** 2 + (g[2] - 64) ** 2) <= 15**2).astype(np.uint8)
    io.write_like(tmp_path / "cyl.nii.gz", cyl, vol)
    res = subprocess.run([sys.executable, "-m", "femurseg.cli", "measure", str(tmp_path / "cyl.nii.gz"), "--out",
                          str(tmp_path / "c.csv")], capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "femoral head" in res.stderr
