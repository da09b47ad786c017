"""femurseg.experiments.paper: the paper grid as data, --dry-run, and the orchestration (with a fake cv)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ball
from scipy.ndimage import gaussian_filter

from femurseg.core import io
from femurseg.core.errors import FemursegError
from femurseg.data.dataset import MR_LABELS, write_dataset
from femurseg.experiments import paper as experiment


def test_paper_grid_is_the_papers():
    grid = experiment.paper_grid("full")
    json.dumps(grid)  # plain data
    ids = [e["id"] for e in grid]
    assert len(ids) == len(set(ids)) == 18
    stage1 = [e for e in grid if e["stage"] == 1]
    assert {(e["model"]["name"], e["model"]["features"], e["model"]["levels"]) for e in stage1} == {
        ("unet2d-unpadded", 64, 3), ("unet2d-unpadded", 64, 4), ("unet2d", 64, 3), ("unet2d", 64, 4),
        ("unet3d", 16, 3), ("unet3d", 16, 4), ("unet3d", 32, 3), ("unet3d", 32, 4)}
    assert all(e["postprocess"] == ["none", "lcc"] for e in stage1 if e["family"] == "2d")  # Table 2
    assert all(e["postprocess"] == ["none"] for e in stage1 if e["family"] == "3d")
    stage2 = [e for e in grid if e["stage"] == 2]
    for fam in ("2d", "3d"):
        assert [e["model"]["dilations"] for e in stage2 if e["family"] == fam] == experiment.DILATION_SETS
    demo = experiment.paper_grid("demo")
    assert [e["id"] for e in demo] == ids
    assert max(e["model"].get("features") or 0 for e in demo) < 16
    with pytest.raises(FemursegError, match="--scale"):
        experiment.paper_grid("huge")


def test_select_and_resolve():
    grid = experiment.paper_grid("demo")
    assert [e["id"] for e in experiment.select_grid(grid, ["3d-f32-*"])] == ["3d-f32-l3", "3d-f32-l4"]
    with pytest.raises(FemursegError, match="match"):
        experiment.select_grid(grid, ["4d-*"])
    best = {"3d": next(e for e in grid if e["id"] == "3d-f32-l4")}
    r = experiment.resolve_stage2(next(e for e in grid if e["id"] == "3d-best-r1-2-4-8"), best)
    assert r["model"] == {**best["3d"]["model"], "dilations": [1, 2, 4, 8]} and r["base_id"] == "3d-f32-l4"
    assert experiment.resolve_stage2(next(e for e in grid if e["id"] == "2d-best-r1-2"), best) is None


def test_dry_run_lists_the_grid():
    r = subprocess.run([sys.executable, "-m", "femurseg.cli", "experiment", "paper", "--dry-run", "--scale", "full"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for e in experiment.paper_grid("full"):
        assert e["id"] in r.stdout
    assert "18 networks" in r.stdout and "4 folds" in r.stdout
    r = subprocess.run([sys.executable, "-m", "femurseg.cli", "experiment", "nope", "--dry-run"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("femurseg: error: ") and "paper" in r.stderr


def test_run_experiment_with_fake_training(tmp_path, monkeypatch):
    """The orchestration: one shared split, best-of-stage-1 selection by AP, stage 2, three reports."""
    shape, spacing = (6, 20, 18), (1.5, 0.8, 0.8)
    rng = np.random.default_rng(0)
    vols = []
    for i in range(8):
        lab = ball(shape, radius=4.5 + 0.2 * i, spacing=spacing).astype(np.uint8)
        img = io.make_volume((lab * 200.0 + rng.normal(0, 10, shape)).astype(np.float32), spacing)
        vols.append((f"c{i}", img, img.with_data(lab)))
    ds = write_dataset(tmp_path / "ds", vols, MR_LABELS).root
    calls: list[dict] = []

    def fake_run_cv(dataset, out, *, model_cfg, split_file, resume, **kw):
        """Probability maps whose quality grows with features, levels and dilations (no training)."""
        calls.append({"out": Path(out).name, "model": model_cfg, "split": Path(split_file), **kw})
        out = Path(out)
        (out / "oof").mkdir(parents=True)
        quality = model_cfg["features"] + model_cfg["levels"] + len(model_cfg.get("dilations") or [])
        noise = 0.1 * (20 - quality)
        split = json.loads(Path(split_file).read_text())
        (out / "split.json").write_text(json.dumps(split))
        (out / "config.json").write_text(json.dumps({
            "format": "femurseg-run", "version": 1, "kind": "cv", "dataset": str(Path(dataset).resolve()),
            "modality": "MR", "labels": MR_LABELS, "model": model_cfg, "k": split["k"]}))
        g = np.random.default_rng(len(calls))
        for cid, img, lab in vols:
            p = gaussian_filter(lab.data.astype(np.float32), 0.7) + g.normal(0, noise, shape)
            io.write_like(out / "oof" / f"{cid}.nii.gz", np.clip(p, 0, 1).astype(np.float32), img)
        (out / "thresholds.json").write_text(json.dumps({"pr": 0.5, "youden": 0.5}))
        (out / "summary.json").write_text("{}")

    import femurseg.training.cv

    monkeypatch.setattr(femurseg.training.cv, "run_cv", fake_run_cv)
    res = experiment.run_experiment("paper", ds, tmp_path / "exp", scale="demo", progress=False, panels=False,
                                    models=["2d-f64-*", "3d-f16-*", "3d-best-r1-2", "3d-best-r1-2-4-8"],
                                    notify=lambda m: None)
    assert [c["out"] for c in calls] == ["2d-f64-l3", "2d-f64-l4", "3d-f16-l3", "3d-f16-l4",
                                         "3d-best-r1-2", "3d-best-r1-2-4-8"]
    assert {c["split"] for c in calls} == {tmp_path / "exp" / "split.json"}  # one split for every model
    assert all(c["folds"] == experiment.SCALES["demo"]["folds"] and c["preset"] == "default" for c in calls)
    assert res["best"] == {"2d": "2d-f64-l4", "3d": "3d-f16-l4"}
    assert calls[-1]["model"] == {"name": "unet3d", "features": 4, "levels": 4, "dilations": [1, 2, 4, 8]}
    assert set(res["reports"]) == {"table1", "table2", "table3"}
    assert len(res["results"]) == 2 * 2 + 2 + 2  # 2D with and without PP, 3D, stage 2
    t2 = (tmp_path / "exp" / "report_table2" / "table_metrics.csv").read_text()
    assert "PP" in t2
    index = (tmp_path / "exp" / "report.html").read_text()
    assert "report_table3/report.html" in index
    # a second call resumes: nothing is retrained
    n = len(calls)
    experiment.run_experiment("paper", ds, tmp_path / "exp", scale="demo", progress=False, panels=False,
                              models=["3d-f16-*"], notify=lambda m: None)
    assert len(calls) == n
