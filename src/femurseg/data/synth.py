"""Write synthetic phantom cohorts as datasets (``femurseg synth``)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from femurseg.core import io
from femurseg.core.errors import FemursegError
from femurseg.core.progress import progress as progress_bar
from femurseg.data import phantom
from femurseg.data.dataset import (
    CT_LABELS,
    MR_LABELS,
    Dataset,
    build_dataset,
    write_dataset,
)


def synthesize(
    out: str | os.PathLike,
    n: int = 16,
    modality: str = "mr",
    seed: int = 0,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    artefact_fraction: float = 0.2,
    preview: bool = False,
    progress: bool = True,
    variation: str | None = None,
    shift: str | list[str] | None = None,
    bilateral: bool = False,
) -> Dataset:
    """Generate ``n`` phantom cases into the nnU-Net dataset folder ``out``.

    ``shape`` and ``spacing`` are canonical ``(coronal slices, rows, cols)`` and mm.
    The folder is built under a temporary name and renamed at the end, so an
    interrupted run leaves nothing half-written. ``meta.json`` records each case's
    true geometry (head centre, axes, angles) for tests and the CT region fit.
    ``variation`` / ``shift`` choose the phantom world (:func:`femurseg.data.phantom.variation`;
    None: the modality's default world). ``bilateral``: both hips per case (a pelvic field of view,
    :data:`femurseg.data.phantom.MR_BILATERAL_SHAPE` / ``CT_BILATERAL_SHAPE`` by default).
    """
    modality = modality.lower()
    if modality not in ("mr", "ct"):
        raise FemursegError(f"--modality: expected 'mr' or 'ct', got {modality!r}")
    kwargs = {}
    if shape is not None:
        kwargs["shape"] = tuple(shape)
    if spacing is not None:
        kwargs["spacing"] = tuple(spacing)
    if variation is not None or shift:
        default = "wide" if modality == "mr" else "narrow"
        kwargs["variation"] = phantom.variation(variation or default, shift)
    cohort = phantom.generate_cohort(n, modality=modality, seed=seed, artefact_fraction=artefact_fraction,
                                     bilateral=bilateral, **kwargs)
    groups: dict[str, str] = {}
    metas: dict[str, dict] = {}
    first: list[phantom.PhantomCase] = []

    def volumes() -> Iterator[tuple[str, io.Volume, io.Volume]]:
        for i, case in enumerate(progress_bar(cohort, total=n, desc=f"synth {modality}", unit="case", disable=not progress)):
            cid = f"hip_{i:04d}"
            groups[cid] = str(case.meta.get("side", "unknown"))
            metas[cid] = _jsonable(case.meta)
            if len(first) < 4:
                first.append(case)
            img = io.make_volume(case.image.astype(np.float32), case.spacing)
            yield cid, img, img.with_data(case.label.astype(np.uint8))

    def build(tmp: Path) -> Dataset:
        ds = write_dataset(tmp, volumes(), CT_LABELS if modality == "ct" else MR_LABELS, modality.upper(), groups,
                           name=f"femurseg-phantom-{modality}-seed{seed}")
        (tmp / "meta.json").write_text(json.dumps(metas, indent=1))
        if preview:
            _preview(first, tmp / "preview.png")
        return ds

    return build_dataset(out, build)


def _preview(cases: list, path: Path) -> None:
    from femurseg.core.preview import save_montage

    # One montage per case stacked would be large; show the first case in detail.
    case = cases[0]
    save_montage(case.image, case.label, path, n_slices=4, spacing=case.spacing,
                 title=f"phantom ({case.meta.get('side', '')} hip)")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
