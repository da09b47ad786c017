"""End-to-end cross-validation on tiny phantoms, the run folder, and every bad-input error."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from femurseg.core import io
from femurseg.core.errors import FemursegError
from femurseg.inference.run import load_run
from femurseg.training.cv import resolve_configs, run_cv, run_train

TINY = {"model_cfg": {"features": 4, "levels": 2}, "prep_cfg": {"scale": None, "crop_slices": 14},
        "train_cfg": {"max_epochs": 2, "min_epochs": 0, "lr": 5e-3, "threads": 1}, "progress": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from femurseg.data.synth import synthesize

    root = tmp_path_factory.mktemp("data") / "tiny"
    synthesize(root, n=4, shape=(16, 32, 32), seed=3, progress=False)
    (root / "groups.csv").write_text("case,group\nhip_0000,left\nhip_0001,right\nhip_0002,left\nhip_0003,right\n")
    return root


@pytest.fixture(scope="module")
def cv_run(tiny, tmp_path_factory) -> tuple[Path, dict, float]:
    out = tmp_path_factory.mktemp("runs") / "cv"
    t0 = time.perf_counter()
    res = run_cv(tiny, out, folds=2, seed=5, **TINY)
    return out, res.summary, time.perf_counter() - t0


def test_cv_end_to_end(cv_run, tiny):
    out, summary, seconds = cv_run
    print(f"tiny 2-fold CV: {seconds:.1f} s")  # measured, not asserted (shared CI machines)
    run = load_run(out)
    assert run.kind == "cv" and run.k == 2
    # stratified on the group column: one left and one right hip per fold
    assert sorted(len(f) for f in run.folds) == [2, 2]
    for f in run.folds:
        assert {run.split.strata[c] for c in f} == {"left", "right"}
    cfg = json.loads((out / "config.json").read_text())
    for key in ("model", "preprocess", "train", "augment", "environment", "seed", "dataset"):
        assert key in cfg
    assert cfg["preprocess"]["crop_slices"] == 14 and cfg["environment"]["torch"]
    for k in range(2):
        for name in ("best.pt", "last.pt", "log.csv", "state.json"):
            assert (run.fold_dir(k) / name).exists()
        with open(run.fold_dir(k) / "log.csv") as fh:
            assert len(list(csv.DictReader(fh))) == 2
    # out-of-fold maps on the original grid with the source geometry
    for case in sorted(c for f in run.folds for c in f):
        src = io.read_image(tiny / "imagesTr" / f"{case}_0000.nii.gz")
        prob = io.read_image(out / "oof" / f"{case}.nii.gz")
        assert prob.data.shape == src.data.shape and src.geometry.matches(prob.geometry) is None
        assert 0 <= prob.data.min() and prob.data.max() <= 1
        # background outside the 14 central slices of 16
        assert prob.data[0].max() == 0 and prob.data[-1].max() == 0
        mask = io.read_image(out / "oof_masks" / f"{case}.nii.gz", dtype=None)
        assert set(np.unique(mask.data)) <= {0, 1}
    thr = json.loads((out / "thresholds.json").read_text())
    assert 0 < thr["pr"] < 1 and 0 < thr["youden"] < 1
    assert run.threshold("pr") == thr["pr"]
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {"case", "fold", "dsc", "asd_mm", "dsc_at_0.5"} <= set(rows[0])
    assert summary["cases"] == 4 and 0 <= summary["mean_dsc"] <= 1
    assert json.loads((out / "summary.json").read_text())["cases"] == 4
    # seconds per subject for the report's headline: timed while writing the out-of-fold maps
    assert summary["timings"]["inference_s_per_case"] > 0
    assert all(f["inference_s_per_case"] > 0 for f in summary["folds"])


def test_load_models_and_predict(cv_run, tiny):
    from femurseg.data.preprocess import preprocess_image, restore
    from femurseg.inference.tiling import predict_prob

    run = load_run(cv_run[0])
    models = run.load_models("all", device="cpu")
    assert len(models) == 2 and all(not m.training for m in models)
    assert len(run.load_models(1)) == 1
    with pytest.raises(FemursegError, match="no fold 2"):
        run.load_models(2)
    vol = io.read_image(tiny / "imagesTr" / "hip_0000_0000.nii.gz")
    x, info = preprocess_image(vol.data, vol.spacing, run.preprocess)
    prob = restore(predict_prob(models, x), info)
    assert prob.shape == vol.data.shape and prob.dtype == np.float32


def test_resume_finished_run_is_a_no_op_and_plot(cv_run, tiny):
    from femurseg.evaluation.report.training import plot_training

    out = cv_run[0]
    before = (out / "fold_0" / "best.pt").stat().st_mtime_ns
    res = run_cv(tiny, out, resume=True, progress=False)
    assert (out / "fold_0" / "best.pt").stat().st_mtime_ns == before
    assert res.summary["mean_dsc"] == pytest.approx(cv_run[1]["mean_dsc"])
    png = plot_training(out)
    assert png.exists() and png.stat().st_size > 1000
    with pytest.raises(FemursegError, match="differ from the run"):
        run_cv(tiny, out, resume=True, train_cfg={"lr": 1.0}, progress=False)


def test_existing_run_is_left_untouched(cv_run, tiny, tmp_path):
    out = cv_run[0]
    snapshot = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(FemursegError, match="--resume .* or --overwrite"):
        run_cv(tiny, out, folds=2, **TINY)
    with pytest.raises(FemursegError, match="more than the 4 cases"):
        run_cv(tiny, out, folds=5, overwrite=True, **TINY)  # bad input: even --overwrite keeps the run
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == snapshot
    # a non-empty folder that is not a run is never deleted
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FemursegError, match="not a femurseg run"):
        run_cv(tiny, other, folds=2, overwrite=True, **TINY)
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(FemursegError, match="not a femurseg run"):
        load_run(other)


def test_bad_inputs(tiny, tmp_path):
    out = tmp_path / "run"
    # a model that does not fit the input (3 input channels for a 1-channel volume)
    with pytest.raises(FemursegError, match="does not fit"):
        run_cv(tiny, out, folds=2, **{**TINY, "model_cfg": {"features": 4, "levels": 2, "in_channels": 3}})
    # a label that is empty after cropping: keep only the first two slices
    with pytest.raises(FemursegError, match="empty after cropping"):
        bad = tmp_path / "cropped"
        shutil.copytree(tiny, bad)
        lab_path = bad / "labelsTr" / "hip_0001.nii.gz"
        lab = io.read_image(lab_path, dtype=None)
        data = np.zeros_like(lab.data)
        data[0, 10:12, 10:12] = 1
        io.write_like(lab_path, data, lab)
        run_cv(bad, out, folds=2, **TINY)
    # a dataset that fails the integrity check
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "labelsTr" / "hip_0002.nii.gz").write_bytes(b"not an image")
    with pytest.raises(FemursegError, match="integrity check"):
        run_cv(broken, out, folds=2, **TINY)
    with pytest.raises(FemursegError, match="--group-by"):
        run_cv(tiny, out, folds=2, group_by="scanner", **TINY)
    with pytest.raises(FemursegError, match="preset"):
        run_cv(tiny, out, preset="fast", **TINY)
    assert not out.exists()


def test_train_single_model_layout(tiny, tmp_path):
    res = run_train(tiny, tmp_path / "single", val_fraction=0.5, **{**TINY, "train_cfg": {"max_epochs": 1, "min_epochs": 0, "threads": 1}})
    run = load_run(tmp_path / "single")
    assert run.kind == "train" and run.k == 1 and len(run.folds[0]) == 2
    assert len(run.load_models()) == 1
    assert res.summary["cases"] == 2 and (run.path / "thresholds.json").exists()


def test_split_reuse(cv_run, tiny, tmp_path):
    out = tmp_path / "same_folds"
    run_cv(tiny, out, split_file=cv_run[0], **{**TINY, "model_cfg": {"name": "unet2d", "features": 4, "levels": 2},
                                                 "train_cfg": {"max_epochs": 1, "min_epochs": 0, "threads": 1,
                                                               "slices_per_volume": 4}})
    assert load_run(out).folds == load_run(cv_run[0]).folds
    assert load_run(out).model_config["name"] == "unet2d"


def test_resolve_configs_presets():
    d = resolve_configs()
    assert d["model"]["name"] == "unet3d" and d["train"]["loss"] == "dice-wce" and d["model"]["norm"] == "instance"
    p = resolve_configs("paper")
    assert p["train"]["lr"] == 5e-5 and p["model"]["dilations"] == [1, 2, 4, 8] and p["train"]["loss"] == "wce"
    assert p["preprocess"]["target_size"] == [256, 256]
    v = resolve_configs("paper", {"name": "vnet"})
    assert v["model"]["name"] == "vnet" and "dilations" not in v["model"]


def test_parallel_fold_processes_match_the_sequential_run(cv_run, tiny, tmp_path):
    """workers=2 (one spawned process per fold, 1 thread each) gives the weights of workers=1."""
    import torch

    from femurseg.training.cv import local_workers

    out = tmp_path / "parallel"
    run_cv(tiny, out, folds=2, seed=5, workers=2, **TINY)
    for k in range(2):
        a = torch.load(cv_run[0] / f"fold_{k}" / "best.pt", weights_only=True)
        b = torch.load(out / f"fold_{k}" / "best.pt", weights_only=True)
        assert a["epoch"] == b["epoch"]
        assert all(torch.equal(a["model"][p], b["model"][p]) for p in a["model"])
    assert (out / "thresholds.json").exists()
    assert local_workers(1, 4) == 1 and local_workers("3", 2) == 2 and local_workers("auto", 4, "cpu") >= 1
    with pytest.raises(FemursegError, match="--workers"):
        local_workers("many", 4)


def test_a_run_fixes_the_zoom_and_crop_in_millimetres(tiny, tmp_path):
    """The preset's factor, slice count and slice spacing are stored as mm, so a finer scan
    reaches the network on the training grid."""
    from femurseg.data.preprocess import plan

    out = tmp_path / "mm"
    run_train(tiny, out, val_fraction=0.25, **{**TINY, "prep_cfg": {"scale": 0.5, "crop_slices": 14}})
    prep = load_run(out).preprocess
    vol = io.read_image(tiny / "imagesTr" / "hip_0000_0000.nii.gz")
    sp = vol.spacing
    assert prep.spacing_mm == pytest.approx((sp[1] / 0.5, sp[2] / 0.5)) and prep.crop_mm == pytest.approx(14 * sp[0])
    trained = plan(vol.data.shape, sp, prep)
    n, h, w = vol.data.shape
    finer = plan((2 * n, 2 * h, 2 * w), (sp[0] / 2, sp[1] / 2, sp[2] / 2), prep)
    assert finer.shape == trained.shape and finer.spacing == pytest.approx(trained.spacing)
    assert prep.slice_mm == pytest.approx(sp[0])
