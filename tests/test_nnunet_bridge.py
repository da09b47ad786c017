"""The nnU-Net bridge of benchmarks/bench_nnunet.py (split conversion, dataset, result collection), without nnU-Net."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_nnunet as B  # noqa: E402


def test_splits_follow_femurseg_folds():
    split = {"folds": [["c", "a"], ["b", "d"]]}
    s = B.nnunet_splits(split, ["a", "b", "c", "d"])
    assert s == [{"train": ["b", "d"], "val": ["a", "c"]}, {"train": ["a", "c"], "val": ["b", "d"]}]
    with pytest.raises(ValueError, match="not in the dataset"):
        B.nnunet_splits({"folds": [["x"]]}, ["a"])


def test_raw_dataset_links_and_dataset_json(tmp_path):
    from femurseg.data.synth import synthesize

    ds = synthesize(tmp_path / "d", n=3, shape=(12, 24, 24), seed=1, progress=False)
    out = B.link_raw_dataset(Path(ds.root), tmp_path / "raw")
    assert out.name == B.DATASET_NAME
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MR"} and meta["labels"] == {"background": 0, "femur": 1}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz" and "femurseg" not in meta
    assert sorted(p.name for p in (out / "imagesTr").iterdir())[0].endswith("_0000.nii.gz")
    assert all(p.is_symlink() and p.resolve().exists() for p in (out / "labelsTr").iterdir())


def test_collect_and_compare(tmp_path):
    for k, cases in enumerate((["a", "b"], ["c"])):
        v = tmp_path / f"fold_{k}" / "validation"
        v.mkdir(parents=True)
        for c in cases:
            (v / f"{c}.nii.gz").write_bytes(b"x")
    got = B.collect_validation([tmp_path / "fold_0", tmp_path / "fold_1"], tmp_path / "all")
    assert got == ["a", "b", "c"] and len(list((tmp_path / "all").iterdir())) == 3
    fa = [{"case": c, "dsc": d, "asd_mm": 1 - d} for c, d in zip("abcdefgh", [0.9, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97])]
    fb = [{"case": r["case"], "dsc": r["dsc"] - 0.05, "asd_mm": r["asd_mm"] + 0.05} for r in fa]
    rows = B.compare_rows(fa, fb, ("femurseg", "nnunet"))
    assert [r["metric"] for r in rows] == ["dsc", "asd_mm"] and all(r["n"] == 8 and r["p"] < 0.01 for r in rows)


def test_trainer_source_compiles_and_main_needs_nnunet(monkeypatch, capsys):
    compile(B.TRAINER, "femurseg_budget.py", "exec")
    if "nnunetv2" in sys.modules or any(Path(p, "nnunetv2").exists() for p in sys.path if p):
        pytest.skip("nnunetv2 is installed here: main would run the benchmark")
    assert B.main(["--quick"]) == 2 and "nnunetv2 is not installed" in capsys.readouterr().out


def test_ct_task_is_region_based(tmp_path):
    """The CT task trains nnU-Net on the nested regions periosteal {1, 2} and endosteal {1}; the
    regions are written back as labels 2 then 1 (cortical, then trabecular on top)."""
    from femurseg.data.synth import synthesize

    ds = synthesize(tmp_path / "d", n=2, modality="ct", shape=(16, 24, 24), spacing=(2.0, 2.0, 2.0), seed=1,
                    progress=False)
    task = B.TASKS["ct"]
    out = B.link_raw_dataset(Path(ds.root), tmp_path / "raw", task)
    assert out.name == "Dataset902_femursegCT" == task.dataset_name
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "periosteal": [1, 2], "endosteal": [1]}
    assert meta["regions_class_order"] == [2, 1] and meta["channel_names"] == {"0": "CT"}
    # painting the regions in that order gives back femurseg's labels
    import numpy as np

    lab = np.array([0, 1, 2, 2, 1, 0])
    painted = np.zeros_like(lab)
    for (name, values), value in zip(list(meta["labels"].items())[1:], meta["regions_class_order"]):
        painted[np.isin(lab, values)] = value
    assert np.array_equal(painted, lab)
    with pytest.raises(ValueError, match="not all in the dataset"):
        B.nnunet_dataset_json(meta | {"labels": {"background": 0, "femur": 1}}, 2, {"x": [1, 3]}, [1])
    with pytest.raises(ValueError, match="regions_class_order"):
        B.nnunet_dataset_json({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2}}, 2,
                              B.CT_REGIONS, [2])


def test_budget_line_and_ct_summary(tmp_path):
    (tmp_path / "training_log_2026_12_6.txt").write_text(
        "...\nfemurseg budget: stopped after 3 epochs, 61.5 s of 60.0 s, 52 iterations\n")
    assert B._budget_line(tmp_path) == (3, 61.5, 52)
    with pytest.raises(RuntimeError, match="no budget line"):
        B._budget_line(tmp_path / "missing")
    rows = [{m: v for m in B.CT_METRICS} for v in (0.9, 0.8)]
    ct_summary = {"volume_errors": {"own": {"head/total": {"re_mean_pct": 4.5}}}}
    s = B._summary(rows, "ct", ct_summary)
    assert s["periosteal_dsc_mean"] == pytest.approx(0.85) and s["cortical_asd_mm_sd"] == pytest.approx(0.0707, abs=1e-3)
    assert s["vol_re_pct_head_total"] == 4.5 and s["vol_re_pct_neck_cortical"] != s["vol_re_pct_neck_cortical"]  # nan


def test_run_records_wall_cpu_and_peak_memory(tmp_path):
    c = B._run([sys.executable, "-c", "x = bytearray(60 * 2**20); print('ok')"], dict(__import__("os").environ),
               tmp_path / "log.txt")
    assert c["wall_s"] > 0 and c["cpu_s"] >= 0 and 60 <= c["peak_rss_mb"] < 1000
    assert "ok" in (tmp_path / "log.txt").read_text()
    with pytest.raises(RuntimeError, match="failed"):
        B._run([sys.executable, "-c", "raise SystemExit(3)"], {}, tmp_path / "log.txt")
