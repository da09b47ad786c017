"""Dataset layout (nnU-Net v2 compatible, or a CSV manifest) and the integrity check.

A dataset is either

* a folder in the nnU-Net v2 layout::

      DATASET/
        dataset.json              {"channel_names": {"0": "MR"}, "labels": {"background": 0, "femur": 1}, ...}
        imagesTr/<case>_0000.nii.gz
        labelsTr/<case>.nii.gz
        imagesTs/<case>_0000.nii.gz   (optional, unlabelled)

  femurseg keeps its own extras in ``dataset.json`` under the key ``"femurseg"``
  (``{"modality": "MR", "groups": {case: group}}``); nnU-Net ignores that key.
  A ``groups.csv`` (``case,group``) beside ``dataset.json`` is read too.
* or a CSV manifest with columns ``image,label[,case][,group]`` (paths relative to the
  CSV's folder or absolute); ``group`` is used to stratify the cross-validation split.

:func:`check_dataset` verifies every case and returns one :class:`Problem` per defect;
:func:`load_checked` is what every command calls before it touches a dataset.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from femurseg.core import io
from femurseg.core.errors import FemursegError, atomic_path
from femurseg.core.progress import progress as progress_bar

MR_LABELS = {"background": 0, "femur": 1}
CT_LABELS = {"background": 0, "trabecular": 1, "cortical": 2}


@dataclass
class Case:
    """One labelled (or unlabelled) scan."""

    case_id: str
    image: Path
    label: Path | None = None
    group: str | None = None


@dataclass
class Dataset:
    """A list of cases plus the dataset-level description."""

    root: Path
    cases: list[Case]
    labels: dict[str, int] = field(default_factory=lambda: dict(MR_LABELS))
    modality: str = "MR"

    @property
    def label_values(self) -> set[int]:
        return set(int(v) for v in self.labels.values())

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise FemursegError(f"{self.root}: no case named {case_id!r}")


@dataclass(frozen=True)
class Problem:
    case: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.case}: {self.path}: {self.message}"


def load_dataset(path: str | os.PathLike) -> Dataset:
    """Read the layout of a dataset folder or CSV manifest (no image is opened)."""
    p = Path(path)
    if not p.exists():
        raise FemursegError(f"{p}: no such dataset folder or manifest")
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise FemursegError(f"{p}: a dataset is an nnU-Net folder or a .csv manifest")
        return _load_manifest(p)
    return _load_nnunet(p)


def _load_manifest(p: Path) -> Dataset:
    with open(p, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "image" not in rows[0]:
        raise FemursegError(f"{p}: manifest needs a header with at least an 'image' column (and 'label', optional 'case', 'group')")
    cases = []
    seen: set[str] = set()
    for i, row in enumerate(rows, start=2):
        image = _resolve(p.parent, row["image"])
        label = _resolve(p.parent, row["label"]) if row.get("label") else None
        cid = row.get("case") or io.strip_image_suffix(image.name).removesuffix("_0000")
        if cid in seen:
            raise FemursegError(f"{p}: line {i}: duplicate case id {cid!r}")
        seen.add(cid)
        cases.append(Case(cid, image, label, row.get("group") or None))
    labels = dict(MR_LABELS)
    modality = "MR"
    side = p.with_suffix(".json")
    if side.exists():
        meta = json.loads(side.read_text())
        labels = {k: int(v) for k, v in meta.get("labels", labels).items()}
        modality = meta.get("modality", modality)
    return Dataset(p, cases, labels, modality)


def _resolve(base: Path, s: str) -> Path:
    q = Path(s.strip())
    return q if q.is_absolute() else base / q


def _load_nnunet(root: Path) -> Dataset:
    meta_path = root / "dataset.json"
    if not meta_path.exists():
        raise FemursegError(f"{root}: not a dataset: dataset.json is missing (expected the nnU-Net layout or a .csv manifest)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise FemursegError(f"{meta_path}: invalid JSON: {exc}") from None
    labels = {k: int(v) for k, v in meta.get("labels", MR_LABELS).items()}
    ending = meta.get("file_ending", ".nii.gz")
    extra = meta.get("femurseg", {})
    channels = meta.get("channel_names", {"0": "MR"})
    modality = extra.get("modality") or ("CT" if str(channels.get("0", "")).upper() == "CT" else "MR")
    groups: dict[str, str] = dict(extra.get("groups", {}))
    gcsv = root / "groups.csv"
    if gcsv.exists():
        with open(gcsv, newline="") as fh:
            groups.update({r["case"]: r["group"] for r in csv.DictReader(fh)})
    images_dir = root / "imagesTr"
    if not images_dir.is_dir():
        raise FemursegError(f"{root}: imagesTr/ is missing")
    cases = []
    for img in sorted(images_dir.iterdir()):
        if not img.name.endswith(ending) or img.name.startswith("."):
            continue
        stem = img.name[: -len(ending)]
        if not stem.endswith("_0000"):
            continue  # other channels are not used (femurseg models are single-channel)
        cid = stem[: -len("_0000")]
        label = root / "labelsTr" / f"{cid}{ending}"
        cases.append(Case(cid, img, label, groups.get(cid)))
    # Labels without an image are a defect the check reports.
    labels_dir = root / "labelsTr"
    if labels_dir.is_dir():
        known = {c.case_id for c in cases}
        for lab in sorted(labels_dir.iterdir()):
            if lab.name.endswith(ending) and not lab.name.startswith("."):
                cid = lab.name[: -len(ending)]
                if cid not in known:
                    cases.append(Case(cid, images_dir / f"{cid}_0000{ending}", lab, groups.get(cid)))
    return Dataset(root, cases, labels, modality)


def check_case(case: Case, allowed: set[int], require_label: bool = True) -> list[Problem]:
    """All problems of one case: readability, 3D, finite values, label values, geometry."""
    problems: list[Problem] = []

    def add(path: Path | None, msg: str) -> None:
        problems.append(Problem(case.case_id, str(path) if path else "-", msg))

    try:
        img = io.read_image(case.image)
    except FemursegError as exc:
        add(case.image, _strip_path(str(exc), case.image))
        img = None
    if case.label is None:
        if require_label:
            add(None, "no label file given")
        return problems
    try:
        lab = io.read_image(case.label, dtype=None)
    except FemursegError as exc:
        add(case.label, _strip_path(str(exc), case.label))
        return problems
    data = lab.data
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(data == np.round(data)):
            add(case.label, "label has non-integer values")
            return problems
    values = set(int(v) for v in np.unique(data))
    bad = sorted(values - allowed)
    if bad:
        add(case.label, f"label values {bad} not in the declared labels {sorted(allowed)}")
    if values <= {0}:
        add(case.label, "label is empty (no foreground voxel)")
    if img is not None:
        diff = img.geometry.matches(lab.geometry)
        if diff:
            add(case.label, f"label geometry differs from the image: {diff}")
    return problems


def _strip_path(msg: str, path: Path) -> str:
    prefix = f"{path}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def check_dataset(ds: Dataset, require_labels: bool = True, progress: bool = True) -> list[Problem]:
    """Check every case of ``ds``; returns the list of problems (empty if all is well)."""
    problems: list[Problem] = []
    if not ds.cases:
        return [Problem("-", str(ds.root), "dataset has no cases")]
    allowed = ds.label_values
    for case in progress_bar(ds.cases, desc="check", unit="case", disable=not progress, leave=False):
        problems += check_case(case, allowed, require_labels)
    return problems


def load_checked(path: str | os.PathLike, require_labels: bool = True, progress: bool = True) -> Dataset:
    """Load a dataset and run the full check; raise one FemursegError listing every problem."""
    ds = load_dataset(path)
    problems = check_dataset(ds, require_labels, progress)
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        raise FemursegError(f"{path}: dataset failed the integrity check ({len(problems)} problem(s)); run `femurseg check {path}`:\n{lines}")
    return ds


def write_dataset(
    root: str | os.PathLike,
    cases: Iterable[tuple[str, io.Volume, io.Volume]],
    labels: dict[str, int],
    modality: str = "MR",
    groups: dict[str, str] | None = None,
    name: str = "femurseg",
    extras: dict | None = None,
) -> Dataset:
    """Write ``(case_id, image, label)`` volumes as an nnU-Net v2 dataset folder.

    ``extras`` are added to ``dataset.json["femurseg"]`` (where femurseg keeps its own keys).
    """
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    written: list[Case] = []
    groups = dict(groups or {})
    for cid, image, label in cases:
        img_path = root / "imagesTr" / f"{cid}_0000.nii.gz"
        lab_path = root / "labelsTr" / f"{cid}.nii.gz"
        io.write_volume(img_path, image, np.float32)
        io.write_volume(lab_path, label, np.uint8)
        written.append(Case(cid, img_path, lab_path, groups.get(cid)))
    meta = {
        "name": name,
        "channel_names": {"0": modality.upper()},
        "labels": labels,
        "numTraining": len(written),
        "file_ending": ".nii.gz",
        "femurseg": {"modality": modality.upper(), "groups": groups, **(extras or {})},
    }
    with atomic_path(root / "dataset.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    return Dataset(root, written, labels, modality.upper())


def build_dataset(out: str | os.PathLike, build: Callable[[Path], Dataset]) -> Dataset:
    """Create the dataset folder ``out`` atomically and return it.

    ``build(tmp)`` writes the dataset into a hidden folder beside ``out`` (``.<name>.partial``),
    which is renamed to ``out`` once ``build`` returns; if it raises or is interrupted, nothing is
    left. ``out`` must not exist or be an empty folder.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FemursegError(f"{out}: output folder exists and is not empty")
    if not out.parent.is_dir():
        raise FemursegError(f"{out}: parent folder {out.parent} does not exist")
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ds = build(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for c in ds.cases:
        c.image = out / c.image.relative_to(tmp)
        c.label = out / c.label.relative_to(tmp) if c.label else None
    ds.root = out
    return ds
