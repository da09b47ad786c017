"""Dataset layout and the integrity check: each defect is reported once, naming the case."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import ball

from femurseg.core import io
from femurseg.core.errors import FemursegError
from femurseg.data.dataset import (
    MR_LABELS,
    check_dataset,
    load_checked,
    load_dataset,
    write_dataset,
)


def _case(seed, shape=(8, 16, 16), spacing=(1.5, 0.5, 0.5)):
    rng = np.random.default_rng(seed)
    img = io.make_volume(rng.normal(100, 10, shape).astype(np.float32), spacing)
    lab = img.with_data(ball(shape, radius=3.0, spacing=spacing).astype(np.uint8))
    return img, lab


@pytest.fixture
def dataset(tmp_path):
    cases = [(f"c{i}", *_case(i)) for i in range(3)]
    write_dataset(tmp_path / "ds", cases, MR_LABELS, groups={"c0": "left", "c1": "right", "c2": "left"})
    return tmp_path / "ds"


def test_clean_dataset_passes(dataset):
    ds = load_checked(dataset, progress=False)
    assert [c.case_id for c in ds.cases] == ["c0", "c1", "c2"]
    assert [c.group for c in ds.cases] == ["left", "right", "left"]
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "femur": 1} and meta["file_ending"] == ".nii.gz"


def _overwrite(path, arr, like):
    io.write_like(path, arr, like)


def test_each_defect_is_reported(dataset):
    lab_dir, img_dir = dataset / "labelsTr", dataset / "imagesTr"
    img0 = io.read_image(img_dir / "c0_0000.nii.gz")
    # c0: non-binary label
    _overwrite(lab_dir / "c0.nii.gz", np.full(img0.data.shape, 3, np.uint8), img0)
    # c1: geometry mismatch (spacing)
    lab1 = io.read_image(lab_dir / "c1.nii.gz", dtype=None)
    bad = sitk.GetImageFromArray(lab1.native_array())
    bad.SetSpacing((0.5, 0.5, 2.0))
    sitk.WriteImage(bad, str(lab_dir / "c1.nii.gz"))
    # c2: NaN in the image and an empty label
    img2 = io.read_image(img_dir / "c2_0000.nii.gz")
    arr = img2.data.copy()
    arr[0, 0, 0] = np.nan
    _overwrite(img_dir / "c2_0000.nii.gz", arr, img2)
    _overwrite(lab_dir / "c2.nii.gz", np.zeros(arr.shape, np.uint8), img2)
    # c3: label without image; c4: truncated image
    (lab_dir / "c3.nii.gz").write_bytes((lab_dir / "c2.nii.gz").read_bytes())
    data = (img_dir / "c0_0000.nii.gz").read_bytes()
    (img_dir / "c4_0000.nii.gz").write_bytes(data[: len(data) // 2])
    (lab_dir / "c4.nii.gz").write_bytes((lab_dir / "c2.nii.gz").read_bytes())

    problems = check_dataset(load_dataset(dataset), progress=False)
    text = [str(p) for p in problems]
    by_case = {p.case: [] for p in problems}
    for p in problems:
        by_case[p.case].append(p.message)
    assert any("label values [3]" in m for m in by_case["c0"])
    assert any("geometry differs" in m and "spacing" in m for m in by_case["c1"])
    assert any("NaN" in m for m in by_case["c2"]) and any("empty" in m for m in by_case["c2"])
    assert any("no such file" in m for m in by_case["c3"])
    assert any("truncated" in m for m in by_case["c4"])
    assert all(t.count(":") >= 2 for t in text)  # "case: path: message"
    with pytest.raises(FemursegError, match="integrity check"):
        load_checked(dataset, progress=False)


def test_2d_image_is_rejected(tmp_path, dataset):
    img_dir = dataset / "imagesTr"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16), np.float32)), str(img_dir / "c0_0000.nii.gz"))
    problems = check_dataset(load_dataset(dataset), progress=False)
    assert any(p.case == "c0" and "2D" in p.message for p in problems)


def test_csv_manifest(tmp_path, dataset):
    rows = ["image,label,group"] + [f"{dataset}/imagesTr/c{i}_0000.nii.gz,{dataset}/labelsTr/c{i}.nii.gz,{'ab'[i % 2]}" for i in range(3)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    ds = load_checked(tmp_path / "m.csv", progress=False)
    assert [c.case_id for c in ds.cases] == ["c0", "c1", "c2"] and ds.cases[1].group == "b"
    (tmp_path / "bad.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(FemursegError, match="image"):
        load_dataset(tmp_path / "bad.csv")


def test_not_a_dataset(tmp_path):
    with pytest.raises(FemursegError, match="dataset.json"):
        load_dataset(tmp_path)
    with pytest.raises(FemursegError, match="no such"):
        load_dataset(tmp_path / "nothing")
