"""Stratified k-fold splits: disjoint, balanced sizes, stratified, subjects kept together."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from femurseg.core.errors import FemursegError
from femurseg.data.dataset import Case, Dataset
from femurseg.data.splits import (
    Split,
    holdout_split,
    load_split,
    make_split,
    split_dataset,
    subjects_of,
)


def _check_partition(split: Split, ids: list[str]) -> None:
    flat = split.cases
    assert sorted(flat) == sorted(ids)  # covers every case
    assert len(flat) == len(set(flat))  # disjoint


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 60), k=st.integers(2, 8), n_strata=st.integers(1, 4), seed=st.integers(0, 10**6),
       data=st.data())
def test_stratified_split_properties(n, k, n_strata, seed, data):
    if k > n:
        with pytest.raises(FemursegError, match="more than"):
            make_split([f"c{i}" for i in range(n)], k, seed)
        return
    ids = [f"c{i:03d}" for i in range(n)]
    strata = {c: f"g{data.draw(st.integers(0, n_strata - 1))}" for c in ids}
    split = make_split(ids, k, seed, strata)
    _check_partition(split, ids)
    sizes = [len(f) for f in split.folds]
    assert max(sizes) - min(sizes) <= 1  # paper: 21/21/22/22
    for g in set(strata.values()):
        per_fold = [sum(strata[c] == g for c in f) for f in split.folds]
        assert max(per_fold) - min(per_fold) <= 1, (g, per_fold)


def test_paper_fold_sizes_and_determinism():
    ids = [f"s{i:02d}" for i in range(86)]
    strata = {c: ("osteoporosis" if i < 36 else "control") for i, c in enumerate(ids)}
    a = make_split(ids, 4, seed=7, strata=strata)
    assert sorted(len(f) for f in a.folds) == [21, 21, 22, 22]
    assert all(sum(strata[c] == "osteoporosis" for c in f) == 9 for f in a.folds)
    b = make_split(ids, 4, seed=7, strata=strata)
    assert a.folds == b.folds
    c = make_split(ids, 4, seed=8, strata=strata)
    assert a.folds != c.folds


def test_subjects_stay_in_one_fold():
    ids = [f"sub{s:02d}_{side}" for s in range(9) for side in ("left", "right")] + ["sub09_left"]
    subjects = {c: c.split("_")[0] for c in ids}
    split = make_split(ids, 4, 0, {c: c.split("_")[1] for c in ids}, subjects)
    _check_partition(split, ids)
    for s in set(subjects.values()):
        assert len({split.fold_of(c) for c in ids if subjects[c] == s}) == 1
    sizes = sorted(len(f) for f in split.folds)
    assert sizes[-1] - sizes[0] <= 2  # whole subjects of 2 cases
    with pytest.raises(FemursegError, match="more than the 2 subjects"):
        make_split(["a_1", "a_2", "b_1"], 3, 0, None, {"a_1": "a", "a_2": "a", "b_1": "b"})


def _dataset(tmp_path: Path, n: int = 8) -> Dataset:
    cases = [Case(f"p{i // 2}_{'LR'[i % 2]}", tmp_path / f"{i}.nii.gz", None, "left" if i % 2 else "right")
             for i in range(n)]
    return Dataset(tmp_path, cases)


def test_split_dataset_uses_groups_and_subjects(tmp_path):
    ds = _dataset(tmp_path)
    split = split_dataset(ds, 4, seed=1)
    assert split.strata["p0_L"] == "right" and split.group_by == "case"
    for f in split.folds:
        assert Counter(split.strata[c] for c in f) == Counter({"left": 1, "right": 1})
    assert subjects_of(ds)["p3_R"] == "p3"  # case-id prefix before the last '_'
    by_subject = split_dataset(ds, 4, seed=1, group_by="subject")
    for f in by_subject.folds:
        assert len({c.split("_")[0] for c in f}) == 1
    (tmp_path / "subjects.csv").write_text("case,subject\n" + "".join(f"{c.case_id},X{i % 4}\n" for i, c in enumerate(ds.cases)))
    assert subjects_of(ds)["p0_L"] == "X0"
    with pytest.raises(FemursegError, match="--group-by"):
        split_dataset(ds, 4, group_by="side")


def test_save_load_and_mismatch(tmp_path):
    ds = _dataset(tmp_path)
    split = split_dataset(ds, 2, seed=3)
    split.save(tmp_path / "split.json")
    again = load_split(tmp_path / "split.json", ds)
    assert again.folds == split.folds and again.seed == 3
    assert load_split(tmp_path, ds).folds == split.folds  # a run folder holding split.json
    other = Dataset(tmp_path, ds.cases[:6])
    with pytest.raises(FemursegError, match="not in"):
        load_split(tmp_path / "split.json", other)
    bigger = Dataset(tmp_path, ds.cases + [Case("new", tmp_path / "x.nii.gz")])
    with pytest.raises(FemursegError, match="in no fold"):
        load_split(tmp_path / "split.json", bigger)
    (tmp_path / "bad.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(FemursegError, match="not a femurseg split"):
        load_split(tmp_path / "bad.json")
    with pytest.raises(FemursegError, match="no such split"):
        load_split(tmp_path / "missing.json")


def test_holdout_split(tmp_path):
    ds = _dataset(tmp_path, 10)
    h = holdout_split(ds, 0.2, seed=0)
    assert h.k == 1 and len(h.folds[0]) == 2 and h.kind == "holdout"
    assert holdout_split(ds, 0.0).folds == [[]]
    with pytest.raises(FemursegError):
        holdout_split(ds, 1.0)
    with pytest.raises(FemursegError, match="at least 2 folds"):
        make_split(["a", "b"], 1)
