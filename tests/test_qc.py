"""Per-scan quality control of femurseg predict (femurseg.inference.qc)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from femurseg.core import io
from femurseg.data import phantom
from femurseg.inference import predict as P
from femurseg.data.augment import AugmentConfig
from femurseg.inference import qc as Q

SHAPE = (32, 64, 64)
SPACING = (1.5, 1.875, 1.875)


def _case(seed: int, modality: str = "mr"):
    # the narrow world: the tiny model of `trained_run` segments it reliably (QC is tested, not the model)
    return phantom.generate_case(seed, modality=modality, shape=SHAPE, spacing=SPACING, artefacts=False,
                                 variation="narrow")


@pytest.fixture(scope="module")
def reference() -> dict:
    cases = {str(s): (Q.image_features(c.image, c.spacing), Q.mask_features(c.label > 0, c.spacing))
             for s, c in ((s, _case(s)) for s in range(4))}
    return Q.reference_from_cases(cases)


def test_features_tell_anatomy_from_blank_noise_and_ct():
    mr, ct = _case(0), _case(0, "ct")
    f_mr, f_ct = Q.image_features(mr.image, SPACING), Q.image_features(ct.image, SPACING)
    noise = np.random.default_rng(0).normal(300, 100, SHAPE).astype(np.float32)
    assert f_mr["smoothness"] > 0.7 and abs(Q.image_features(noise, SPACING)["smoothness"]) < 0.1
    assert f_mr["negative_fraction"] == 0.0 and f_ct["negative_fraction"] > 0.1
    assert f_mr["fov_mm_1"] == pytest.approx(64 * 1.875)
    m = Q.mask_features(mr.label > 0, SPACING)
    assert m["volume_cm3"] == pytest.approx(np.count_nonzero(mr.label) * np.prod(SPACING) / 1000)
    assert m["components"] == 1 and 0 < m["centroid_1"] < 1


def test_assess_verdicts(reference):
    c = _case(7)
    ok = Q.assess(c.image, SPACING, c.label > 0, fold_masks=[c.label > 0, c.label > 0], reference=reference)
    assert ok["verdict"] == "ok", ok["reasons"]
    blank = Q.assess(np.zeros(SHAPE, np.float32), SPACING, c.label > 0, reference=reference)
    assert blank["verdict"] == "fail" and any("constant image" in r for r in blank["reasons"])
    noise = np.random.default_rng(1).normal(300, 100, SHAPE).astype(np.float32)
    assert any("no image structure" in r for r in Q.assess(noise, SPACING, c.label > 0, reference=reference)["reasons"])
    ct = _case(7, "ct")
    wrong = Q.assess(ct.image, SPACING, ct.label > 0, reference=reference)
    assert wrong["verdict"] == "fail" and any("another modality" in r for r in wrong["reasons"])
    empty = Q.assess(c.image, SPACING, np.zeros(SHAPE, bool), reference=reference)
    assert any("empty mask" in r for r in empty["reasons"])
    two = np.zeros(SHAPE, bool)
    two[2:10, 5:20, 5:20] = two[20:28, 40:55, 40:55] = True
    r = Q.assess(c.image, SPACING, two, fold_masks=[two, two[::-1]], reference=reference)["reasons"]
    assert any("large components" in x for x in r) and any("disagree" in x for x in r)
    no_ref = Q.assess(c.image, SPACING, c.label > 0)
    assert no_ref["verdict"] == "ok" and no_ref["reference"] is False


def test_femoral_head_check_is_a_mask_check(reference):
    from femurseg.ct.regions import femoral_head_check

    c = _case(8)
    assert femoral_head_check(c.label > 0, SPACING) == []
    block = np.zeros(SHAPE, bool)
    block[4:28, 10:50, 20:40] = True  # a box: no head sphere
    reasons = Q.assess(c.image, SPACING, block, reference=reference, checks=(femoral_head_check,))["reasons"]
    assert any(r.startswith("fail:") and "femoral head" in r for r in reasons)


def test_both_hips_are_checked_per_femur(reference):
    from femurseg.ct.regions import femoral_head_check

    c = phantom.generate_case(3, modality="mr", shape=(32, 64, 160), spacing=SPACING, artefacts=False,
                              variation="narrow", bilateral=True)
    both = c.label > 0
    one = Q.assess(c.image, SPACING, both, reference=reference, checks=(femoral_head_check,))
    assert any("large components" in r for r in one["reasons"])
    assert any(r.startswith("fail:") and "one femur" in r for r in one["reasons"])  # the head check needs one femur
    two = Q.assess(c.image, SPACING, both, reference=reference, checks=(femoral_head_check,), femurs=2)
    assert [r for r in two["reasons"] if "field of view" not in r] == [], two["reasons"]  # 300 mm wide: only that
    vols = two["mask"]["femur_volumes_cm3"]
    assert len(vols) == 2 and sum(vols) == pytest.approx(two["mask"]["volume_cm3"])
    lo, hi = reference["ranges"]["label_volume_cm3"]
    assert all(0.8 * lo <= v <= 1.25 * hi for v in vols)
    half = both.copy()
    half[:, :, 80:] = False  # one femur only: fine with femurs=2 too
    assert not [r for r in Q.assess(c.image, SPACING, half, reference=reference, femurs=2)["reasons"]
                if "field of view" not in r]


def test_fold_agreement_and_entropy():
    a = np.zeros((4, 4, 4), bool)
    a[:2] = True
    assert Q.fold_agreement([a, a]) == 1.0 and Q.fold_agreement([a]) is None
    assert Q.fold_agreement([a, ~a]) == 0.0
    assert Q.mean_entropy(np.full(a.shape, 0.5), a) == pytest.approx(1.0)
    assert Q.mean_entropy(np.full(a.shape, 0.5), np.zeros_like(a)) is None


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A small 3D U-Net trained by femurseg cv on 6 phantoms (2 folds): writes qc_reference.json."""
    from femurseg.data.synth import synthesize
    from femurseg.training.cv import run_cv

    root = tmp_path_factory.mktemp("qc")
    synthesize(root / "data", n=6, shape=SHAPE, spacing=SPACING, seed=11, progress=False, variation="narrow")
    run_cv(root / "data", root / "run", folds=2, seed=0, progress=False,
           model_cfg={"name": "unet3d", "features": 8, "levels": 2, "dilations": None},
           prep_cfg={"crop_slices": None, "scale": None},
           train_cfg={"max_epochs": 14, "min_epochs": 14, "lr": 3e-3}, aug_cfg=AugmentConfig().to_dict())
    return root / "run"


def test_predict_qc_end_to_end(trained_run, tmp_path):
    ref = json.loads((trained_run / Q.QC_REFERENCE_NAME).read_text())
    assert ref["cases"] == 6 and ref["ranges"]["label_volume_cm3"][0] > 0
    scans = tmp_path / "scans"
    scans.mkdir()
    for s in (101, 102):  # unseen phantoms of the same kind
        c = _case(s)
        io.write_volume(scans / f"hip_{s}.nii.gz", io.make_volume(c.image.astype(np.float32), SPACING))
    io.write_volume(scans / "blank.nii.gz", io.make_volume(np.zeros(SHAPE, np.float32), SPACING))
    noise = np.abs(np.random.default_rng(2).normal(300, 150, SHAPE)).astype(np.float32)
    io.write_volume(scans / "noise.nii.gz", io.make_volume(noise, SPACING))
    io.write_volume(scans / "ct.nii.gz", io.make_volume(_case(103, "ct").image.astype(np.float32), SPACING))
    lines: list[str] = []
    notes: list[str] = []
    from femurseg.ct.regions import femoral_head_check

    code = P.predict_command(trained_run, [scans], tmp_path / "out", progress=False, echo=lines.append,
                             notify=notes.append, qc_checks=(femoral_head_check,))
    assert code == 0
    rows = {r["case"]: r for r in csv.DictReader(open(tmp_path / "out" / P.BATCH_TABLE))}
    # Unseen phantoms of the training kind are never `fail`. This 2-fold, 14-epoch model is weak on
    # hip_101 (its femur touches the first slice and the lower edge of the 32 x 64 x 64 field), so its
    # two fold models agree to Dice ~0.84 there and QC warns about exactly that, and nothing else; the
    # default models' QC on in-domain phantom test scans (all `ok`) is measured by benchmarks/bench_shift.py.
    assert rows["hip_102"]["qc"] == "ok", rows["hip_102"]["qc_reasons"]
    assert rows["hip_101"]["qc"] in ("ok", "warn"), rows["hip_101"]["qc_reasons"]
    assert all("fold models agree only partly" in r for r in rows["hip_101"]["qc_reasons"].split(" | ") if r), rows["hip_101"]
    for bad in ("blank", "noise", "ct"):
        assert rows[bad]["qc"] == "fail", rows[bad]
        assert any(n.startswith("QC fail: " + bad) for n in notes), notes
    side = json.loads((tmp_path / "out" / "blank_qc.json").read_text())
    assert side["verdict"] == "fail" and side["reasons"]
    assert any("QC:" in line and "3 fail" in line for line in lines)
    # strict: a failing single scan gets no mask and exit status 2
    out = tmp_path / "strict.nii.gz"
    assert P.predict_command(trained_run, [scans / "noise.nii.gz"], out, qc="strict", progress=False,
                             echo=lines.append, notify=notes.append) == P.EXIT_SOME_FAILED
    assert not out.exists()
    assert P.predict_command(trained_run, [scans / "hip_101.nii.gz"], out, qc="strict", progress=False,
                             echo=lines.append, notify=notes.append) == 0
    assert out.exists() and P.qc_sidecar(out).exists()


def test_predict_matches_a_wider_field_of_view(trained_run, tmp_path):
    """A scan padded in-plane with background (a wider field of view, the same anatomy) is segmented
    in windows of the training field of view: its mask is the unpadded scan's, moved."""
    c = _case(102)
    pad = 24
    bg = float(np.percentile(c.image, 1))
    wide = np.pad(c.image.astype(np.float32), ((0, 0), (pad, pad), (pad, pad)), constant_values=bg)
    io.write_volume(tmp_path / "plain.nii.gz", io.make_volume(c.image.astype(np.float32), SPACING))
    io.write_volume(tmp_path / "wide.nii.gz", io.make_volume(wide, SPACING))
    notes: list[str] = []
    masks = {}
    for name, fov in (("plain", "match"), ("wide", "match"), ("wide_full", "full")):
        src = tmp_path / f"{name.split('_')[0]}.nii.gz"
        out = tmp_path / f"{name}_mask.nii.gz"
        assert P.predict_command(trained_run, [src], out, fov=fov, progress=False, echo=lambda m: None,
                                 notify=notes.append) == 0
        masks[name] = io.read_image(out).data > 0
    window_notes = [n for n in notes if "segmented in a" in n]
    assert len(window_notes) == 1 and "wide.nii.gz" in window_notes[0], notes
    record = json.loads((tmp_path / "wide_mask_qc.json").read_text())
    assert len(record["fov_windows"]) == 1
    (r0, r1), (c0, c1) = record["fov_windows"][0][1], record["fov_windows"][0][2]
    assert r1 - r0 == SHAPE[1] and c1 - c0 == SHAPE[2]
    assert "fov_windows" not in json.loads((tmp_path / "plain_mask_qc.json").read_text())
    inner = masks["wide"][:, pad:-pad, pad:-pad]
    # the padding holds no femur (outside the window the tiles' answer is kept where it joins the femur)
    assert np.count_nonzero(masks["wide"]) - np.count_nonzero(inner) < 0.02 * np.count_nonzero(inner)
    dice = 2 * np.count_nonzero(inner & masks["plain"]) / (np.count_nonzero(inner) + np.count_nonzero(masks["plain"]))
    assert dice > 0.9, dice
