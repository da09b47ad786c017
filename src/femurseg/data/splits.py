"""Cross-validation splits: k disjoint folds by stratified random sampling (paper 001, "Model selection").

* The unit of sampling is a **case**, or with ``group_by="subject"`` a **subject** (all
  cases of one subject land in the same fold, so a subject's other hip or other visit
  never leaks from training into validation).
* **Strata** are the dataset's group column (``Case.group``, e.g. the side "left"/"right"
  of the phantom cohort); cases without a group form the stratum "unknown". A subject's
  stratum is the most common group among its cases.
* With one case per unit, folds are dealt round robin through the strata (each stratum
  shuffled with the seed, strata in name order), so fold sizes differ by at most one
  (the paper's 21/21/22/22) and every stratum is spread over the folds as evenly as
  possible (counts per fold differ by at most one). With multi-case subjects, each subject
  goes to the fold with the fewest cases (ties: fewest of its stratum, then a seeded
  random order): sizes are as balanced as whole subjects allow.

Subjects (``group_by="subject"``): the ``subject`` column of a CSV manifest, else a
``subjects.csv`` (``case,subject``) beside ``dataset.json``, else the case id up to its
last ``_`` or ``-`` (``sub01_left`` -> ``sub01``; ``hip_0003`` -> ``hip`` i.e. one subject,
which is refused when there are fewer subjects than folds).

A split is saved as ``split.json``::

    {"version": 1, "k": 4, "seed": 0, "group_by": "case",
     "folds": [["case", ...], ...], "strata": {"case": "left", ...}, "subjects": {"case": "subj"}}

and reused with :func:`load_split` (``--split FILE``) so different architectures are
compared on the same folds.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from femurseg.core.errors import FemursegError, atomic_path
from femurseg.data.dataset import Dataset

GROUP_BY = ("case", "subject")
_SUBJECT_RE = re.compile(r"^(.+)[_-][^_-]*$")


@dataclass
class Split:
    """k disjoint folds of case ids (fold i is the validation set of model i)."""

    folds: list[list[str]]
    seed: int = 0
    group_by: str = "case"
    strata: dict[str, str] = field(default_factory=dict)
    subjects: dict[str, str] = field(default_factory=dict)
    kind: str = "cv"  # "cv" (k-fold) or "holdout" (one validation fold, `femurseg train`)

    @property
    def k(self) -> int:
        return len(self.folds)

    @property
    def cases(self) -> list[str]:
        return [c for f in self.folds for c in f]

    def fold_of(self, case_id: str) -> int:
        for i, f in enumerate(self.folds):
            if case_id in f:
                return i
        raise KeyError(case_id)

    def train_cases(self, fold: int, all_cases: list[str]) -> list[str]:
        """Cases used to train model ``fold`` (``all_cases`` minus fold ``fold``), in dataset order."""
        held = set(self.folds[fold])
        return [c for c in all_cases if c not in held]

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, "kind": self.kind, "k": self.k, "seed": self.seed, "group_by": self.group_by,
                "folds": self.folds, "strata": self.strata, "subjects": self.subjects}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Split:
        return cls([list(map(str, f)) for f in d["folds"]], int(d.get("seed", 0)), d.get("group_by", "case"),
                   dict(d.get("strata", {})), dict(d.get("subjects", {})), d.get("kind", "cv"))

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        with atomic_path(p) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return p


def subjects_of(ds: Dataset) -> dict[str, str]:
    """Subject id per case (see the module docstring for where it comes from)."""
    ids = [c.case_id for c in ds.cases]
    table: dict[str, str] = {}
    root = Path(ds.root)
    if root.is_file() and root.suffix.lower() == ".csv":
        with open(root, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows and "subject" in rows[0]:
            for c, row in zip(ds.cases, rows):  # load_dataset keeps the manifest's row order
                if row.get("subject"):
                    table[c.case_id] = row["subject"].strip()
    elif (root / "subjects.csv").exists():
        with open(root / "subjects.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("case") and row.get("subject"):
                    table[row["case"].strip()] = row["subject"].strip()
    out = {}
    for cid in ids:
        if cid in table:
            out[cid] = table[cid]
        else:
            m = _SUBJECT_RE.match(cid)
            out[cid] = m.group(1) if m else cid
    return out


def make_split(case_ids: list[str], k: int, seed: int = 0, strata: dict[str, str | None] | None = None,
               subjects: dict[str, str] | None = None, source: str = "dataset") -> Split:
    """Split ``case_ids`` into ``k`` disjoint folds by stratified random sampling.

    Args:
        case_ids: the cases (unique).
        k: number of folds (2 <= k <= number of units).
        seed: random seed (same inputs and seed -> same split).
        strata: group per case (None / missing: "unknown").
        subjects: subject per case; when given, each subject's cases stay in one fold.
        source: name used in error messages.
    """
    if len(set(case_ids)) != len(case_ids):
        raise FemursegError(f"{source}: duplicate case ids in the split")
    strata_full = {c: str((strata or {}).get(c) or "unknown") for c in case_ids}
    unit_of = {c: (subjects or {}).get(c, c) for c in case_ids} if subjects else {c: c for c in case_ids}
    units: dict[str, list[str]] = {}
    for c in case_ids:
        units.setdefault(unit_of[c], []).append(c)
    what = "subjects" if subjects else "cases"
    if k < 2:
        raise FemursegError(f"{source}: --folds {k}: need at least 2 folds")
    if k > len(units):
        raise FemursegError(f"{source}: --folds {k} is more than the {len(units)} {what} in the dataset")
    rng = np.random.default_rng(seed)
    unit_stratum = {u: Counter(strata_full[c] for c in cs).most_common(1)[0][0] for u, cs in units.items()}
    by_stratum: dict[str, list[str]] = {}
    for u in sorted(units):
        by_stratum.setdefault(unit_stratum[u], []).append(u)
    order: list[str] = []
    for s in sorted(by_stratum):
        us = by_stratum[s]
        order += [us[i] for i in rng.permutation(len(us))]
    folds: list[list[str]] = [[] for _ in range(k)]
    if all(len(cs) == 1 for cs in units.values()):
        for i, u in enumerate(order):
            folds[i % k] += units[u]
    else:
        tiebreak = rng.permutation(k)
        per_stratum = np.zeros((k, len(by_stratum)), dtype=int)
        s_index = {s: i for i, s in enumerate(sorted(by_stratum))}
        for u in order:
            si = s_index[unit_stratum[u]]
            best = min(range(k), key=lambda f: (len(folds[f]), per_stratum[f, si], tiebreak[f]))
            folds[best] += units[u]
            per_stratum[best, si] += 1
    folds = [sorted(f) for f in folds]
    return Split(folds, seed, "subject" if subjects else "case", strata_full,
                 {c: unit_of[c] for c in case_ids} if subjects else {})


def split_dataset(ds: Dataset, k: int, seed: int = 0, group_by: str = "case") -> Split:
    """Stratified k-fold split of a dataset's cases (strata = ``Case.group``)."""
    if group_by not in GROUP_BY:
        raise FemursegError(f"--group-by: {group_by!r} is not one of {', '.join(GROUP_BY)}")
    ids = [c.case_id for c in ds.cases]
    subjects = subjects_of(ds) if group_by == "subject" else None
    return make_split(ids, k, seed, {c.case_id: c.group for c in ds.cases}, subjects, str(ds.root))


def holdout_split(ds: Dataset, val_fraction: float, seed: int = 0, group_by: str = "case") -> Split:
    """One stratified validation fold of about ``val_fraction`` of the cases (``femurseg train``).

    ``val_fraction == 0`` gives an empty validation fold (train on everything).
    """
    if not 0 <= val_fraction < 1:
        raise FemursegError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    ids = [c.case_id for c in ds.cases]
    if val_fraction == 0:
        return Split([[]], seed, group_by, {c.case_id: str(c.group or "unknown") for c in ds.cases}, {}, "holdout")
    k = max(2, int(round(1 / val_fraction)))
    if k > len(ids):
        raise FemursegError(f"{ds.root}: --val-fraction {val_fraction} needs at least {k} cases, the dataset has {len(ids)}")
    full = split_dataset(ds, k, seed, group_by)
    return Split([full.folds[0]], seed, full.group_by, full.strata, full.subjects, "holdout")


def load_split(path: str | os.PathLike, ds: Dataset | None = None) -> Split:
    """Read a ``split.json`` (or a run folder holding one); check it against ``ds`` when given."""
    p = Path(path)
    if p.is_dir():
        p = p / "split.json"
    if not p.exists():
        raise FemursegError(f"{p}: no such split file")
    try:
        split = Split.from_dict(json.loads(p.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise FemursegError(f"{p}: not a femurseg split file ({type(exc).__name__}: {exc})") from None
    seen = split.cases
    if len(set(seen)) != len(seen):
        raise FemursegError(f"{p}: folds are not disjoint")
    if ds is not None:
        have = {c.case_id for c in ds.cases}
        missing = sorted(set(seen) - have)
        extra = sorted(have - set(seen))
        if missing:
            raise FemursegError(f"{p}: split names {len(missing)} case(s) not in {ds.root}: {', '.join(missing[:5])}")
        if extra and split.kind == "cv":
            raise FemursegError(f"{p}: {len(extra)} case(s) of {ds.root} are in no fold: {', '.join(extra[:5])}")
    return split
