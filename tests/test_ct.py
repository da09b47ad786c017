"""CT helpers (femurseg.ct): HU check, window, per-side femur crops, cascade glue."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from femurseg.core.errors import FemursegError
from femurseg.ct.evaluate import cascade_tables, format_cascade_report
from femurseg.ct.femurs import (
    CropBox,
    crop_femur_dataset,
    dataset_femur_crop,
    femur_boxes,
    find_femurs,
    split_sides,
)
from femurseg.ct.hu import HUWarning, check_hu, normalise_hu
from femurseg.ct.predict import predict_cascade
from femurseg.ct.stages import (
    COMPARTMENTS,
    _ensemble_threshold,
    cascade_probabilities,
    combine_stages,
    mask_outside,
    mean_oof,
    periosteal_mask,
    prepare_cascade_data,
    stage2_input,
    stage_names,
)
from femurseg.ct.train import cascade_configs, run_cascade_cv
from femurseg.data import phantom
from femurseg.data.preprocess import PreprocessConfig, normalise
from femurseg.experiments.ct_study import describe_cascade


@pytest.fixture(scope="module")
def ct_case():
    return phantom.generate_case(3, modality="ct", artefacts=False)


@pytest.fixture(scope="module")
def bilateral_case():
    return phantom.generate_case(0, modality="ct", bilateral=True, artefacts=False)


def test_hu_image_passes_silently(ct_case):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_hu(ct_case.image, "ct.nii.gz") is True


@pytest.mark.parametrize("transform,reason", [
    (lambda a: (a + 1024.0) / 4096.0, "no bone above 300 HU"),   # scaled to [0, 1]
    (lambda a: a + 1024.0, "no fat or air below -50 HU"),           # stored values, intercept missing
    (lambda a: (a - a.mean()) / a.std(), "no bone above 300 HU"),   # z-scored
])
def test_non_hu_image_warns_with_observed_range(ct_case, transform, reason):
    img = transform(ct_case.image.astype(np.float64))
    with pytest.warns(HUWarning, match="do not look like Hounsfield units") as rec:
        assert check_hu(img, "scan.nii.gz") is False
    msg = str(rec[0].message)
    assert msg.startswith("scan.nii.gz: ") and reason in msg
    assert f"observed min {img.min():.4g}" in msg and f"max {img.max():.4g}" in msg


def test_normalise_hu_is_the_preprocess_ct_window():
    a = np.linspace(-1000, 3000, 101, dtype=np.float32).reshape(1, 1, -1)
    out = normalise_hu(a, (-200, 1800))
    ref, _ = normalise(a, PreprocessConfig(crop_slices=None, scale=None, normalise="ct", ct_window=(-200, 1800)))
    assert np.array_equal(out, ref) and out.min() == 0.0 and out.max() == 1.0


def test_crop_box_round_trip_with_mirror_and_padding():
    rng = np.random.default_rng(0)
    full = rng.normal(size=(10, 12, 14)).astype(np.float32)
    box = CropBox("right", (-2, 3, 5), (6, 15, 12), full.shape, mirrored=True)
    crop = box.crop(full, fill=-7)
    assert crop.shape == (8, 12, 7)
    assert np.all(crop[:2] == -7) and np.all(crop[:, 9:] == -7)  # outside the image: fill
    assert np.array_equal(crop[2:, :9, ::-1], full[0:6, 3:12, 5:12])  # mirrored columns
    back = box.paste(crop, fill=0)
    inside = np.zeros(full.shape, bool)
    inside[0:6, 3:12, 5:12] = True
    assert np.array_equal(back[inside], full[inside]) and np.all(back[~inside] == 0)
    # channels-first arrays (class probabilities) go through the same way
    probs = np.stack([full, -full])
    assert np.array_equal(box.paste(box.crop(probs))[:, inside], probs[:, inside])
    assert CropBox.from_dict(box.to_dict()) == box
    with pytest.raises(FemursegError, match="shape"):
        box.paste(crop[:-1])


def test_single_hip_box_holds_the_femur(ct_case):
    boxes = femur_boxes(ct_case.image, ct_case.spacing)
    assert len(boxes) == 1 and boxes[0].side == ct_case.meta["side"]
    fem = ct_case.label > 0
    assert boxes[0].crop(fem).sum() == fem.sum()
    assert all(s % 16 == 0 or (a == 0 and b == n) for s, a, b, n in
               zip(boxes[0].shape, boxes[0].start, boxes[0].stop, fem.shape))


def test_bilateral_scan_gives_one_box_per_side(bilateral_case):
    img, lab = bilateral_case.image, bilateral_case.label > 0
    boxes = femur_boxes(img, bilateral_case.spacing, mirror_to="left")
    assert [b.side for b in boxes] == ["right", "left"]
    assert boxes[0].mirrored and not boxes[1].mirrored
    halves = split_sides(lab)
    assert set(halves) == {"right", "left"}
    for b in boxes:
        own, other = halves[b.side], halves["left" if b.side == "right" else "right"]
        assert b.crop(own).sum() == own.sum()  # the whole femur is inside its box
        assert b.crop(other).sum() == 0  # and nothing of the other one
    # heads: the right femur lies at low columns
    centres = {f["side"]: f["head_centre_mm"][2] for f in bilateral_case.meta["femurs"]}
    assert centres["right"] < centres["left"]
    assert np.nonzero(halves["right"])[2].mean() < np.nonzero(halves["left"])[2].mean()


def test_no_bone_is_an_error():
    with pytest.raises(FemursegError, match="no bone above"):
        find_femurs(np.full((8, 8, 8), 40.0, np.float32), (1.0, 1.0, 1.0))


def _write_ct_dataset(root, cases):
    from femurseg.core import io
    from femurseg.data.dataset import CT_LABELS, write_dataset

    vols = []
    for cid, image, label, spacing in cases:
        img = io.make_volume(image.astype(np.float32), spacing)
        vols.append((cid, img, img.with_data(label.astype(np.uint8))))
    return write_dataset(root, vols, CT_LABELS, "CT")


def test_crop_femur_dataset_one_case_per_labelled_femur(tmp_path, bilateral_case):
    from femurseg.core import io
    from femurseg.data.dataset import load_checked
    from femurseg.data.splits import split_dataset

    c = bilateral_case
    halves = split_sides(c.label > 0)
    left_only = np.where(halves["left"], c.label, 0)  # 003: only the left femur labelled
    src = _write_ct_dataset(tmp_path / "src", [("s01", c.image, c.label, c.spacing),
                                                ("s02", c.image, left_only, c.spacing),
                                                ("s03", c.image, c.label, c.spacing)])
    out = crop_femur_dataset(src.root, tmp_path / "crops", progress=False)
    ids = [x.case_id for x in out.cases]
    assert ids == ["s01_right", "s01_left", "s02_left", "s03_right", "s03_left"]
    ds = load_checked(tmp_path / "crops", progress=False)
    assert ds.modality == "CT" and dataset_femur_crop(tmp_path / "crops") == 15.0
    assert dataset_femur_crop(src.root) is None
    full = io.read_image(src.cases[0].image)
    boxes = {b.side: b for b in femur_boxes(c.image, c.spacing)}
    for case in ds.cases:
        side = case.case_id.split("_")[1]
        img, lab = io.read_image(case.image), io.read_image(case.label, dtype=None)
        box = boxes[side]
        assert img.data.shape == box.shape
        assert np.array_equal(img.data, box.crop(c.image.astype(np.float32), fill=-1024.0))
        own = halves[side] if case.case_id != "s02_left" else halves["left"]
        assert np.count_nonzero(lab.data) == np.count_nonzero(own)  # the whole femur, nothing else
        # the crop sits where it was cut from: its first voxel is the box's start in the scan
        assert np.allclose(img.affine @ np.r_[0, 0, 0, 1], full.affine @ np.r_[box.start, 1])
    # both hips of a scan stay in one fold
    split = split_dataset(ds, 3, 0, "subject")
    for f in split.folds:
        assert len({cid.split("_")[0] for cid in f}) * 2 >= len(f)
    assert {split.fold_of("s01_right")} == {split.fold_of("s01_left")}
    with pytest.raises(FemursegError, match="not empty"):
        crop_femur_dataset(src.root, tmp_path / "crops", progress=False)


def test_cascade_on_crops_warns_when_hips_may_split(tmp_path, bilateral_case, monkeypatch, capsys):
    from femurseg.training import cv

    c = bilateral_case
    src = _write_ct_dataset(tmp_path / "src", [(f"s0{i}", c.image, c.label, c.spacing) for i in range(2)])
    crop_femur_dataset(src.root, tmp_path / "crops", progress=False)

    class Stop(Exception):
        pass

    def no_training(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(cv, "run_cv", no_training)
    for group_by, warned in (("case", True), ("subject", False)):
        with pytest.raises(Stop):
            run_cascade_cv(tmp_path / "crops", tmp_path / f"run_{group_by}", folds=2, group_by=group_by, progress=False)
        assert ("two hips of one scan may land in different folds" in capsys.readouterr().err) is warned


def test_crop_femur_dataset_refuses_labels_outside_the_boxes(tmp_path, ct_case):
    lab = ct_case.label.copy()
    lab[32, 64, -1] = 2  # a labelled voxel at the image border, far from the femur
    src = _write_ct_dataset(tmp_path / "src", [("s01", ct_case.image, lab, ct_case.spacing)])
    with pytest.raises(FemursegError, match="s01: 1 labelled voxels lie outside the femur boxes"):
        crop_femur_dataset(src.root, tmp_path / "crops", progress=False)
    assert not (tmp_path / "crops").exists() and not (tmp_path / ".crops.partial").exists()


def test_cascade_trained_on_crops_segments_a_whole_bilateral_scan(tmp_path):
    """Whole scans -> crop-femurs -> cascade cv -> predict on a whole scan: labels land in the
    femur boxes of the scan, on its grid and geometry (1 epoch: the mask itself is not judged)."""
    from typer.testing import CliRunner

    from femurseg.cli import app
    from femurseg.core import io
    from femurseg.ct.predict import load_any_predictor
    from femurseg.inference.predict import outputs_for, predict_file

    cases = []
    for i in range(2):
        c = phantom.generate_case(i, modality="ct", bilateral=True, shape=(32, 64, 160), artefacts=False)
        cases.append((f"scan{i}", c.image, c.label, c.spacing))
    src = _write_ct_dataset(tmp_path / "src", cases)
    res = CliRunner().invoke(app, ["crop-femurs", str(src.root), str(tmp_path / "crops")])
    assert res.exit_code == 0 and "wrote 4 femur crops from 2 scans" in res.output
    run_cascade_cv(tmp_path / "crops", tmp_path / "run", folds=2, group_by="subject",
                      model_cfg={"features": 4, "levels": 2},
                      train_cfg={"max_epochs": 1, "min_epochs": 0, "patience": 1}, progress=False)
    pred = load_any_predictor(tmp_path / "run", device="cpu")
    assert pred.config["cascade"]["femur_crop_margin_mm"] == 15.0
    from femurseg.inference.predict import load_predictor

    with pytest.raises(FemursegError, match="load_any_predictor"):  # inference alone knows no cascade
        load_predictor(tmp_path / "run", device="cpu")
    out = predict_file(pred, src.cases[0].image, outputs_for(tmp_path / "seg.nii.gz"), postprocess="none",
                       notify=lambda m: None)
    seg, scan = io.read_image(out.outputs.mask, dtype=None), io.read_image(src.cases[0].image)
    assert seg.data.shape == scan.data.shape and np.allclose(seg.affine, scan.affine)
    inside = np.zeros(scan.data.shape, bool)
    for box in femur_boxes(scan.data, scan.spacing):
        inside |= box.paste(np.ones(box.shape, bool), fill=0).astype(bool)
    assert not inside.all() and np.count_nonzero(seg.data[~inside]) == 0
    assert np.count_nonzero(seg.data[inside]) > 0


def test_predict_crops_every_femur_when_trained_on_crops(monkeypatch, ct_case):
    """A cascade trained on crop_femur_dataset's crops sees the same box at predict time."""
    import types

    from femurseg.core import io
    from femurseg.inference import predict as predict_mod

    shapes = []

    def fake_probability(pred, vol, tta="none"):
        shapes.append(vol.data.shape)
        return np.zeros(vol.data.shape, np.float32)

    monkeypatch.setattr(predict_mod, "predict_probability", fake_probability)
    stage = types.SimpleNamespace(thresholds={"pr": 0.5})
    vol = io.make_volume(ct_case.image.astype(np.float32), ct_case.spacing)
    box = femur_boxes(ct_case.image, ct_case.spacing, margin_mm=10.0)[0]
    assert box.shape != vol.data.shape  # the phantom's field of view is larger than the box
    for margin, expected in ((None, vol.data.shape), (10.0, box.shape)):
        shapes.clear()
        pred = types.SimpleNamespace(stages=(stage, stage), config={"cascade": {"femur_crop_margin_mm": margin}})
        probs = predict_cascade(pred, vol)
        assert probs.shape == (3, *vol.data.shape)
        assert shapes == [expected, expected]


# ----------------------------------------------------------------------------- cascade


def test_stage2_input_masks_outside_the_dilated_periosteal_region():
    img = np.arange(5 * 9 * 9, dtype=np.float32).reshape(5, 9, 9) + 100
    peri = np.zeros(img.shape, bool)
    peri[2, 4, 4] = True
    same = stage2_input(img, peri, (1.0, 1.0, 1.0), dilate_mm=0.0, fill_hu=-1024)
    assert same[2, 4, 4] == img[2, 4, 4] and np.count_nonzero(same != -1024) == 1
    # 1 mm dilation at spacing (2, 1, 1): the in-plane cross only (the coronal neighbours are 2 mm away)
    dil = stage2_input(img, peri, (2.0, 1.0, 1.0), dilate_mm=1.0, fill_hu=-1024)
    kept = dil != -1024
    assert kept.sum() == 5 and kept[2, 3, 4] and kept[2, 4, 5] and not kept[1, 4, 4]
    assert np.array_equal(dil[kept], img[kept])
    with pytest.raises(FemursegError, match="shape"):
        mask_outside(img, peri[:-1])


def test_periosteal_mask_fills_holes_and_removes_spurs_but_keeps_the_bone():
    g = np.meshgrid(*[np.arange(24)] * 3, indexing="ij")
    d = np.sqrt(sum((x - 11.5) ** 2 for x in g))
    prob = (d <= 8).astype(np.float32)
    ball = prob >= 0.5
    prob[11:13, 11:13, 11:13] = 0.1  # a cavity inside the bone
    prob[11, 11, 20:23] = 0.9  # a one-voxel spur out of the surface
    prob[2, 2, 2] = 0.9  # a separate speck
    m = periosteal_mask(prob, 0.5, (1.0, 1.0, 1.0))
    assert m.dtype == bool and m[11:13, 11:13, 11:13].all()
    assert not m[11, 11, 21:23].any() and not m[2, 2, 2]  # the spur's base voxel may stay
    # the 1 mm opening only rounds the voxelised sphere's surface: within 3 % of its volume
    assert abs(int(m.sum()) - int(ball.sum())) <= 0.03 * ball.sum() and (m & ~ball).sum() <= 1


def test_combine_stages_keeps_a_cortex_and_matches_segment():
    from femurseg.inference.predict import segment

    g = np.meshgrid(*[np.arange(20)] * 3, indexing="ij")
    d = np.sqrt(sum((x - 9.5) ** 2 for x in g))
    peri = d <= 8
    endo_prob = np.clip(7.5 - d, 0, 1).astype(np.float32)  # reaches out to the periosteal surface
    lab = combine_stages(peri, endo_prob, 0.5)
    assert set(np.unique(lab)) == {0, 1, 2}
    assert np.array_equal(lab > 0, peri)  # cortical + trabecular = periosteal
    from scipy import ndimage

    assert not (ndimage.binary_dilation(lab == 0) & (lab == 1)).any()  # label 1 never touches background
    probs = cascade_probabilities(peri.astype(np.float32), peri, endo_prob, 0.5)
    assert probs.shape == (3, *peri.shape) and np.allclose(probs.sum(0), 1)
    seg, _ = segment(probs, (1.0, 1.0, 1.0), threshold=0.5, postprocess="none")
    assert np.array_equal(seg, lab)


def test_predict_labels_are_the_evaluated_cascade_labels():
    """segment() of cascade_probabilities at the stored stage-1 threshold and predict's default
    post-processing returns combine_stages(periosteal_mask(...)): holes filled, spurs removed."""
    from femurseg.inference.predict import DEFAULT_POSTPROCESS, segment

    g = np.meshgrid(*[np.arange(24)] * 3, indexing="ij")
    d = np.sqrt(sum((x - 11.5) ** 2 for x in g))
    p = np.clip(9.0 - d, 0, 1).astype(np.float32) * 0.9 + 0.05
    p[11, 11, 11] = 0.2  # a hole inside the bone
    p[11, 11, 21:23] = 0.8  # a one-voxel spur
    thr1, thr2 = 0.537, 0.41
    peri = periosteal_mask(p, thr1, (1.0, 1.0, 1.0))
    assert peri[11, 11, 11] and not peri[11, 11, 22] and not np.array_equal(peri, p >= thr1)
    q = np.clip(7.0 - d, 0, 1).astype(np.float32)
    want = combine_stages(peri, q, thr2)
    probs = cascade_probabilities(p, peri, q, thr2, thr1)
    for post in (DEFAULT_POSTPROCESS, "none", "lcc+fill+open"):
        seg, used = segment(probs, (1.0, 1.0, 1.0), stored={"pr": thr1}, postprocess=post)
        assert used == pytest.approx(thr1) and np.array_equal(seg, want), post


def test_cascade_configs_default_to_a_binary_vnet():
    cfg = cascade_configs("demo")
    assert cfg["model"]["name"] == "vnet" and cfg["model"]["num_classes"] == 2
    assert cfg["preprocess"]["normalise"] == "ct"
    assert cfg["train"]["min_epochs"] == cfg["train"]["max_epochs"]  # the whole schedule, no early stop
    unet = cascade_configs("demo", model_cfg={"name": "unet3d", "features": 4})
    assert unet["model"] == {"name": "unet3d", "features": 4, "levels": 4, "norm": "instance", "num_classes": 2}
    with pytest.raises(FemursegError, match="scale"):
        cascade_configs("huge")


@pytest.mark.slow
def test_cascade_cv_and_predict_end_to_end(tmp_path):
    """A tiny cascade (1 epoch, 2 folds) runs through cv, evaluation and predict."""
    from femurseg.core import io
    from femurseg.ct.predict import load_any_predictor
    from femurseg.data.synth import synthesize
    from femurseg.inference.predict import outputs_for, predict_file

    ds = synthesize(tmp_path / "ds", n=4, modality="ct", seed=1, shape=(32, 64, 64), spacing=(2.0, 2.0, 2.0),
                    progress=False)
    run = tmp_path / "run"
    summary = run_cascade_cv(ds.root, run, folds=2, model_cfg={"features": 4, "levels": 2},
                                train_cfg={"max_epochs": 1, "min_epochs": 0, "patience": 1, "patch_size": [16, 32, 32]},
                                progress=False)
    assert summary["cases"] == 4 and 0 <= summary["mean_periosteal_dsc"] <= 1
    for f in ("split.json", "stage1/thresholds.json", "stage2/thresholds.json", "cascade_metrics.csv",
              "cascade_volumes.csv", "cascade_summary.json"):
        assert (run / f).exists(), f
    assert len(list((run / "oof_labels").glob("*.nii.gz"))) == 4
    # `femurseg evaluate --run` reads the cascade's label maps: per-compartment rows, same numbers
    from femurseg.evaluation.evaluate import evaluate_command

    rows, _ = evaluate_command(tmp_path / "ev.csv", run=run, progress=False)
    assert len(rows) == 4 and (tmp_path / "ev.csv").exists()
    mean_dsc = np.mean([r["periosteal_dsc"] for r in rows])
    assert mean_dsc == pytest.approx(summary["mean_periosteal_dsc"], abs=1e-6)
    with pytest.raises(FemursegError, match="do not apply"):
        evaluate_command(tmp_path / "ev2.csv", run=run, threshold=0.5, progress=False)
    pred = load_any_predictor(run, device="cpu")
    assert pred.task == "cascade"
    case = ds.cases[0]
    res = predict_file(pred, case.image, outputs_for(tmp_path / "out.nii.gz"), postprocess="none")
    out = io.read_image(res.outputs.mask, dtype=None)
    assert out.data.shape == io.read_image(case.image).data.shape
    assert set(np.unique(out.data)) <= {0, 1, 2}


def test_cascade_tables_follow_003_tables_1_and_2():
    e = {"mae": 1.0, "rmse": 1.5, "bias": 0.2, "re_mean_pct": 3.0, "re_min_pct": 0.1, "re_max_pct": 6.0, "n": 4,
         "ref_mean_cm3": 40.0, "ref_sd_cm3": 5.0}
    summary = {"cases": 4, "volume_errors": {"own": {"head/total": e, "neck/cortical": e},
                                             "reference": {"head/total": e, "neck/cortical": e}}}
    for name in COMPARTMENTS:
        for key in ("dsc", "asd_mm", "specificity", "sensitivity"):
            summary[f"mean_{name}_{key}"], summary[f"sd_{name}_{key}"] = 0.9, 0.01
    t1, t2 = cascade_tables(summary)
    assert [r["surface"] for r in t1] == ["periosteal", "endosteal", "cortical"]
    assert set(t1[0]) >= {"DSC", "ASD_mm", "SP", "SN"}
    assert [r["target"] for r in t2] == ["Femur head", "Cortical bone in femur neck"]
    text = format_cascade_report(summary)
    assert "Table 1" in text and "Table 2" in text and "Femur head" in text
    assert "vnet" in describe_cascade("demo")


def test_stage2_data_masked_with_stage1_out_of_fold_masks(tmp_path):
    """stage2_mask='oof': stage 2's images are masked with stage 1's out-of-fold masks (here a
    perfect stage 1 with a stray blob the largest-component step removes)."""
    import json

    from femurseg.core import io
    from femurseg.data.synth import synthesize

    ds = synthesize(tmp_path / "ds", n=2, modality="ct", seed=2, shape=(24, 48, 48), spacing=(2.0, 2.5, 2.5),
                    progress=False)
    s1 = tmp_path / "stage1"
    (s1 / "oof").mkdir(parents=True)
    (s1 / "thresholds.json").write_text(json.dumps({"pr": 0.5}))
    for case in ds.cases:
        lab = io.read_image(case.label, dtype=None)
        prob = (np.asarray(lab.data) > 0).astype(np.float32)
        prob[0, :2, :2] = 1.0  # a blob away from the femur: not part of the stage-1 mask
        io.write_like(s1 / "oof" / f"{case.case_id}.nii.gz", prob, lab, np.float32)
    m_ref = prepare_cascade_data(ds, tmp_path / "data", 2, progress=False)
    m_oof = prepare_cascade_data(ds, tmp_path / "data", 2, progress=False, stage1_run=s1)
    assert m_ref.name == "stage2.csv" and m_oof.name == "stage2_oof.csv"
    for case in ds.cases:
        a = io.read_image(tmp_path / "data" / "stage2_images" / f"{case.case_id}.nii.gz").data
        b = io.read_image(tmp_path / "data" / "stage2_images_oof" / f"{case.case_id}.nii.gz").data
        np.testing.assert_array_equal(a, b)  # perfect stage 1: the same input as the reference mask
        assert b[0, 0, 0] == -1024.0
    with pytest.raises(FemursegError, match="stage2_mask"):
        run_cascade_cv(ds.root, tmp_path / "run", stage2_mask="predicted", progress=False)


def test_seed_ensemble_names_mean_and_threshold(tmp_path):
    """Several seeds: stage folders, the seed-averaged out-of-fold map, and the PR threshold on
    it (a single run keeps its stored threshold)."""
    import json

    from femurseg.core import io
    from femurseg.data.synth import synthesize
    from femurseg.inference.thresholds import pr_threshold

    assert stage_names(1) == (["stage1"], ["stage2"])
    assert stage_names(3) == (["stage1", "stage1_seed1", "stage1_seed2"], ["stage2", "stage2_seed1", "stage2_seed2"])
    with pytest.raises(FemursegError, match="seeds"):
        stage_names(0)
    ds = synthesize(tmp_path / "ds", n=2, modality="ct", seed=3, shape=(24, 48, 48), spacing=(2.0, 2.5, 2.5),
                    progress=False)
    rng = np.random.default_rng(0)
    runs = [tmp_path / "a", tmp_path / "b"]
    for i, r in enumerate(runs):
        (r / "oof").mkdir(parents=True)
        (r / "thresholds.json").write_text(json.dumps({"pr": 0.3 + 0.1 * i}))
        for case in ds.cases:
            lab = io.read_image(case.label, dtype=None)
            prob = np.clip((np.asarray(lab.data) > 0) * 0.7 + rng.uniform(0, 0.3 + 0.2 * i, lab.data.shape), 0, 1)
            io.write_like(r / "oof" / f"{case.case_id}.nii.gz", prob.astype(np.float32), lab, np.float32)
    ids = [c.case_id for c in ds.cases]
    m = mean_oof(runs, ids[0])
    a, b = (io.read_image(r / "oof" / f"{ids[0]}.nii.gz").data for r in runs)
    assert np.allclose(m, (a + b) / 2)
    assert _ensemble_threshold(runs[:1], ds, ids, 1) == pytest.approx(0.3)
    refs = [np.asarray(io.read_image(c.label, dtype=None).data) > 0 for c in ds.cases]
    expect = pr_threshold([mean_oof(runs, c) for c in ids], refs)
    assert _ensemble_threshold(runs, ds, ids, 1) == pytest.approx(expect)


@pytest.mark.slow
def test_cascade_adds_seeds_on_resume(tmp_path):
    """A finished 1-seed cascade rerun with seeds=2 trains only the second seed's stages,
    re-evaluates, and predicts with both seeds' fold models."""
    import json

    from femurseg.ct.predict import load_any_predictor
    from femurseg.data.synth import synthesize

    ds = synthesize(tmp_path / "ds", n=4, modality="ct", seed=1, shape=(32, 64, 64), spacing=(2.0, 2.0, 2.0),
                    progress=False)
    run = tmp_path / "run"
    kw = dict(folds=2, model_cfg={"features": 4, "levels": 2}, progress=False,
              train_cfg={"max_epochs": 1, "min_epochs": 0, "patience": 1, "patch_size": [16, 32, 32]})
    run_cascade_cv(ds.root, run, **kw)
    before = (run / "stage1" / "fold_0" / "best.pt").stat().st_mtime_ns
    summary = run_cascade_cv(ds.root, run, seeds=2, resume=True, **kw)
    cfg = json.loads((run / "config.json").read_text())["cascade"]
    assert cfg["seeds"] == 2 and cfg["stages"] == ["stage1", "stage1_seed1", "stage2", "stage2_seed1"]
    assert (run / "stage1" / "fold_0" / "best.pt").stat().st_mtime_ns == before  # seed 0 not retrained
    s1 = json.loads((run / "stage1_seed1" / "config.json").read_text())
    assert s1["seed"] == 1 and summary["cases"] == 4
    pred = load_any_predictor(run, device="cpu")
    assert [len(p.models) for p in pred.stages] == [4, 4]  # 2 folds x 2 seeds per stage
    assert pred.stages[0].thresholds["pr"] == pytest.approx(summary["thresholds"]["stage1_pr"])
    with pytest.raises(FemursegError, match="drop"):
        run_cascade_cv(ds.root, run, seeds=1, resume=True, **kw)


def test_ct_benchmarks_reproduce_the_cascade_evaluation(tmp_path, capsys):
    """benchmarks/ct_tta.py (its ``none`` mode), ct_stage1_share.py and ct_cortex_rule.py run on a
    tiny cascade study; the first two re-derive the study's out-of-fold periosteal DSC."""
    import importlib
    import re
    import sys
    from pathlib import Path

    from femurseg.data.synth import synthesize

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    ds = synthesize(tmp_path / "ds", n=4, modality="ct", seed=1, shape=(32, 64, 64), spacing=(2.0, 2.0, 2.0),
                    progress=False)
    test = synthesize(tmp_path / "test", n=1, modality="ct", seed=2, shape=(32, 64, 64), spacing=(2.0, 2.0, 2.0),
                      progress=False)
    run = tmp_path / "run"
    summary = run_cascade_cv(ds.root, run, folds=2, model_cfg={"features": 4, "levels": 2},
                                train_cfg={"max_epochs": 2, "min_epochs": 0, "patience": 2},
                                progress=False)
    want = summary["mean_periosteal_dsc"]
    assert want > 0.2, want  # a partial segmentation (0.45 with these settings): the checks below are not 0 == 0
    # another method's label maps are scored exactly as the cascade's (the nnU-Net benchmark's path)
    from femurseg.ct.evaluate import evaluate_label_folder

    rows, again = evaluate_label_folder(run / "oof_labels", ds.root, progress=False)
    assert len(rows) == 4 and again["mean_periosteal_dsc"] == pytest.approx(want, abs=1e-9)
    assert again["mean_cortical_asd_mm"] == pytest.approx(summary["mean_cortical_asd_mm"], abs=1e-9)
    for regions, table in summary["volume_errors"].items():
        for key, errs in table.items():
            assert again["volume_errors"][regions][key] == pytest.approx(errs, rel=1e-9), (regions, key)
    importlib.import_module("ct_tta").main([str(run)])
    out = capsys.readouterr().out
    none = float(re.search(r"periosteal DSC: none ([0-9.]+), flip ([0-9.]+)", out).group(1))
    assert none == pytest.approx(want, abs=1e-4)
    importlib.import_module("ct_stage1_share").main([str(run)])
    out = capsys.readouterr().out
    assert float(re.search(r"4 cases, periosteal DSC ([0-9.]+)", out).group(1)) == pytest.approx(want, abs=1e-4)
    importlib.import_module("ct_tta").main([str(run), "--heldout", str(test.root)])
    assert "periosteal DSC: none" in capsys.readouterr().out
    importlib.import_module("ct_cortex_rule").main([str(run), str(test.root)])
    assert "rule" in capsys.readouterr().out


def test_ct_head_size_reads_both_tables(tmp_path):
    """benchmarks/ct_head_size.py: the same errors from a cascade_volumes.csv and from femurseg
    evaluate's per-case table (predictions named <case>_0000)."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    hs = importlib.import_module("ct_head_size")
    meta = {f"hip_{i:04d}": {"femurs": [{"head_radius_mm": 20.0 + i}]} for i in range(3)}
    ratios = {"hip_0000": (1.10, 1.2), "hip_0001": (1.00, 1.0), "hip_0002": (0.95, 0.9)}  # head, cortical neck
    cv = tmp_path / "cascade_volumes.csv"
    lines = ["case,side,region,compartment,ref_cm3,pred_cm3,pred_in_ref_regions_cm3"]
    for c, (h, n) in ratios.items():
        lines += [f"{c},,head,total,40,{40 * h},0", f"{c},,neck,cortical,1,{n},0", f"{c},,neck,total,5,5,5"]
    cv.write_text("\n".join(lines) + "\n")
    ev = tmp_path / "eval.csv"
    ev.write_text("case,head_total_vol_pred_cm3,head_total_vol_ref_cm3,neck_cortical_vol_pred_cm3,neck_cortical_vol_ref_cm3\n"
                  + "".join(f"{c}_0000,{40 * h},40,{n},1\n" for c, (h, n) in ratios.items()))
    for path in (cv, ev):
        r, head, neck = hs.errors(meta, path)
        np.testing.assert_allclose(r, [20, 21, 22])
        np.testing.assert_allclose(head, [10, 0, -5], atol=1e-9)
        np.testing.assert_allclose(neck, [20, 0, -10], atol=1e-9)
