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
