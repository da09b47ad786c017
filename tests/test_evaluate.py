"""femurseg.evaluation.evaluate: prediction folders and cv runs -> per-case CSV, volume summary, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ball
from scipy.ndimage import gaussian_filter

from femurseg.core import io
from femurseg.core.errors import FemursegError
from femurseg.data.dataset import CT_LABELS, MR_LABELS, write_dataset
from femurseg.evaluation import metrics
from femurseg.evaluation.evaluate import (
    evaluate_command,
    evaluate_folders,
    evaluate_run,
    read_csv,
    summary_paths,
    volume_summary,
)

SHAPE, SPACING = (8, 24, 20), (1.5, 0.8, 0.8)


def _case(i: int, rng: np.random.Generator):
    ref = ball(SHAPE, radius=5.0 + 0.3 * i, spacing=SPACING).astype(np.uint8)
    img = io.make_volume((ref * 200.0 + rng.normal(0, 20, SHAPE)).astype(np.float32), SPACING)
    prob = np.clip(gaussian_filter(ref.astype(np.float32), 1.0) + rng.normal(0, 0.1, SHAPE), 0, 1).astype(np.float32)
    return img, ref, prob


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """gt/ (plain label folder), ds/ (nnU-Net), pred/ masks, prob/ maps for 4 cases."""
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(1)
    for d in ("gt", "pred", "prob", "pred_nnunet"):
        (root / d).mkdir()
    cases, vols = {}, []
    for i in range(4):
        cid = f"hip_{i:04d}"
        img, ref, prob = _case(i, rng)
        mask = (prob >= 0.5).astype(np.uint8)
        io.write_like(root / "gt" / f"{cid}.nii.gz", ref, img)
        io.write_like(root / "pred" / f"{cid}.nii.gz", mask, img)
        io.write_like(root / "pred_nnunet" / f"{cid}_0000.nii.gz", mask, img)
        io.write_like(root / "prob" / f"{cid}.nii.gz", prob, img)
        cases[cid] = (ref, mask, prob)
        vols.append((cid, img, img.with_data(ref)))
    write_dataset(root / "ds", vols, MR_LABELS)
    return root, cases


def test_folder_rows_equal_evaluate_case(folders):
    root, cases = folders
    rows = evaluate_folders(root / "pred", root / "gt", root / "prob", progress=False)
    assert [r["case"] for r in rows] == sorted(cases)
    for r in rows:
        ref, mask, prob = cases[r["case"]]
        want = metrics.evaluate_case(mask, ref, SPACING, prob)
        assert set(want) <= set(r)
        for k, v in want.items():
            assert r[k] == pytest.approx(v, rel=1e-6), k
    # without probability maps: no AUC/AP columns
    assert "ap" not in evaluate_folders(root / "pred", root / "gt", progress=False)[0]


def test_nnunet_gt_and_0000_names(folders):
    root, cases = folders
    rows = evaluate_folders(root / "pred_nnunet", root / "ds", progress=False)
    assert [r["case"] for r in rows] == sorted(cases)
    ref, mask, _ = cases["hip_0002"]
    assert rows[2]["dsc"] == pytest.approx(metrics.evaluate_case(mask, ref, SPACING)["dsc"])


def test_results_csv_and_volume_summary(folders, tmp_path):
    root, cases = folders
    out = tmp_path / "res.csv"
    rows, paths = evaluate_command(out, pred=root / "pred", gt=root / "gt", prob=root / "prob", progress=False)
    back = read_csv(out)
    assert list(back[0])[:3] == ["case", "dsc", "precision"]
    assert back[1]["dsc"] == pytest.approx(rows[1]["dsc"], rel=1e-5)
    vs = read_csv(summary_paths(out)[0])
    assert len(vs) == 1 and vs[0]["compartment"] == "femur"
    want = metrics.volume_errors([r["vol_pred_cm3"] for r in rows], [r["vol_ref_cm3"] for r in rows])
    assert vs[0]["mae_cm3"] == pytest.approx(want["mae"], rel=1e-5)
    assert vs[0]["rmse_cm3"] == pytest.approx(want["rmse"], rel=1e-5)
    assert vs[0]["re_mean_pct"] == pytest.approx(want["re_mean_pct"], rel=1e-5)
    assert paths["stats"].exists()


def test_empty_prediction_row(tmp_path):
    rng = np.random.default_rng(0)
    img, ref, _ = _case(0, rng)
    for d in ("gt", "pred"):
        (tmp_path / d).mkdir()
    io.write_like(tmp_path / "gt" / "a.nii.gz", ref, img)
    io.write_like(tmp_path / "pred" / "a.nii.gz", np.zeros_like(ref), img)
    rows, _ = evaluate_command(tmp_path / "r.csv", pred=tmp_path / "pred", gt=tmp_path / "gt", progress=False)
    assert rows[0]["dsc"] == 0.0 and math.isinf(rows[0]["asd_mm"])
    assert "inf" in (tmp_path / "r.csv").read_text()


def test_geometry_mismatch_is_one_line_error(folders, tmp_path):
    root, cases = folders
    (tmp_path / "pred").mkdir()
    ref, mask, _ = cases["hip_0000"]
    shifted = io.make_volume(mask.astype(np.float32), (1.5, 0.8, 0.9))
    io.write_like(tmp_path / "pred" / "hip_0000.nii.gz", mask, shifted)
    with pytest.raises(FemursegError, match="geometry differs from the reference"):
        evaluate_folders(tmp_path / "pred", root / "gt", progress=False)
    r = subprocess.run([sys.executable, "-m", "femurseg.cli", "evaluate", "--pred", str(tmp_path / "pred"),
                        "--gt", str(root / "gt"), "--out", str(tmp_path / "r.csv"), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("femurseg: error: ") and "Traceback" not in r.stderr
    assert "hip_0000.nii.gz" in last and "spacing" in last
    assert not (tmp_path / "r.csv").exists()


def test_missing_reference_and_bad_options(folders, tmp_path):
    root, _ = folders
    (tmp_path / "pred").mkdir()
    io.write_like(tmp_path / "pred" / "other.nii.gz", np.zeros(SHAPE, np.uint8), io.make_volume(np.zeros(SHAPE, np.float32), SPACING))
    with pytest.raises(FemursegError, match="no reference label"):
        evaluate_folders(tmp_path / "pred", root / "gt", progress=False)
    with pytest.raises(FemursegError, match="either --pred"):
        evaluate_command(tmp_path / "r.csv", gt=root / "gt")
    with pytest.raises(FemursegError, match=r"\.csv"):
        evaluate_command(tmp_path / "r.txt", pred=root / "pred", gt=root / "gt")


def test_ct_label_maps_per_compartment(tmp_path):
    outer = ball(SHAPE, radius=6.0, spacing=SPACING)
    inner = ball(SHAPE, radius=4.0, spacing=SPACING)
    ref = np.where(inner, 1, np.where(outer, 2, 0)).astype(np.uint8)
    pred = np.where(ball(SHAPE, radius=3.6, spacing=SPACING), 1, np.where(outer, 2, 0)).astype(np.uint8)
    img = io.make_volume(ref.astype(np.float32), SPACING)
    write_dataset(tmp_path / "ct", [("c0", img, img.with_data(ref))], CT_LABELS, "CT")
    (tmp_path / "pred").mkdir()
    io.write_like(tmp_path / "pred" / "c0.nii.gz", pred, img)
    rows = evaluate_folders(tmp_path / "pred", tmp_path / "ct", progress=False)
    want = metrics.evaluate_labels(pred, ref, SPACING)
    for k, v in want.items():
        assert rows[0][k] == pytest.approx(v), k
    assert {v["compartment"] for v in volume_summary(rows)} == {"periosteal", "endosteal", "cortical"}


def test_ct_phantom_rows_have_region_volumes_and_nan_fits_are_left_out():
    from femurseg.ct.measure import region_volume_columns
    from femurseg.data import phantom
    from femurseg.evaluation.evaluate import evaluate_arrays

    case = phantom.generate_case(3, modality="ct", artefacts=False)
    ref = case.label
    shrunk = np.where(ref == 2, np.uint8(1), ref)  # the cortex called trabecular: no cortical volume
    rows = [{"case": "a", **evaluate_arrays(ref, ref, case.spacing, region_volumes=region_volume_columns)},
            {"case": "b", **evaluate_arrays(shrunk, ref, case.spacing, region_volumes=region_volume_columns)},
            {"case": "c", **evaluate_arrays(np.zeros_like(ref), ref, case.spacing,
                                                   region_volumes=region_volume_columns)}]
    for r in rows:
        assert r["neck_cortical_vol_ref_cm3"] > 0 and r["combination_total_vol_ref_cm3"] > r["neck_total_vol_ref_cm3"]
    assert rows[0]["neck_cortical_vol_pred_cm3"] == rows[0]["neck_cortical_vol_ref_cm3"]
    assert math.isnan(rows[2]["head_total_vol_pred_cm3"])  # no head to fit in an empty prediction
    by = {v["compartment"]: v for v in volume_summary(rows)}
    assert {"periosteal", "head_total", "neck_cortical", "trochanter_trabecular", "intertrochanter_cortical",
            "combination_cortical"} <= set(by)
    assert "total_total" not in by  # the whole femur is the periosteal compartment
    assert by["neck_cortical"]["n"] == 2 and by["periosteal"]["n"] == 3
    assert by["neck_cortical"]["re_mean_pct"] == pytest.approx(50.0)  # 0 % and 100 %
    assert by["neck_cortical"]["re_max_pct"] == pytest.approx(100.0)


def _fake_run(root: Path, ds: Path, probs: dict[str, np.ndarray], like: dict[str, io.Volume], thr: float,
              postprocess: str | None = None) -> Path:
    run = root / "run"
    (run / "oof").mkdir(parents=True)
    cfg = {"format": "femurseg-run", "version": 1, "kind": "cv", "dataset": str(ds), "modality": "MR",
           "labels": MR_LABELS, "model": {"name": "unet3d", "features": 8, "levels": 3, "dilations": None}, "k": 2}
    if postprocess:
        cfg["postprocess"] = postprocess
    cases = sorted(probs)
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "split.json").write_text(json.dumps({"version": 1, "k": 2, "folds": [cases[::2], cases[1::2]]}))
    (run / "thresholds.json").write_text(json.dumps({"pr": thr, "youden": 0.3}))
    for c, p in probs.items():
        io.write_like(run / "oof" / f"{c}.nii.gz", p, like[c])
    return run


def test_evaluate_run_uses_stored_threshold_and_postprocess(tmp_path):
    rng = np.random.default_rng(3)
    vols, probs, like, refs = [], {}, {}, {}
    for i in range(3):
        cid = f"hip_{i:04d}"
        img, ref, prob = _case(i, rng)
        prob[0, 0, 0] = 0.99  # an isolated false-positive island
        vols.append((cid, img, img.with_data(ref)))
        probs[cid], like[cid], refs[cid] = prob, img, ref
    write_dataset(tmp_path / "ds", vols, MR_LABELS)
    run = _fake_run(tmp_path, tmp_path / "ds", probs, like, thr=0.4)
    ev = evaluate_run(run, progress=False)
    assert ev.threshold == 0.4 and ev.postprocess == "none"
    assert [r["fold"] for r in ev.rows] == [0, 1, 0]
    for r in ev.rows:
        want = metrics.evaluate_case(probs[r["case"]] >= 0.4, refs[r["case"]], SPACING, probs[r["case"]])
        assert r["dsc"] == pytest.approx(want["dsc"]) and r["msd_mm"] == pytest.approx(want["msd_mm"])
    assert int(ev.pos.sum()) == sum(int(r.sum()) for r in refs.values())
    lcc = evaluate_run(run, postprocess="lcc", progress=False)
    assert all(b["msd_mm"] < a["msd_mm"] for a, b in zip(ev.rows, lcc.rows))  # the island is gone
    assert evaluate_run(run, threshold=0.5, progress=False).threshold == 0.5
    c = ev.curves()
    assert 0.5 < c["ap"] <= 1 and 0.5 < c["auc"] <= 1
