"""The CT study (``femurseg experiment ct``): a cascade cross-validated and reported as paper 003.
"""

from __future__ import annotations

import json
from pathlib import Path

from femurseg.core.errors import FemursegError
from femurseg.ct.evaluate import _write_rows, cascade_tables, format_cascade_report
from femurseg.ct.train import cascade_configs, run_cascade_cv


def run_cascade_experiment(dataset: str | Path, out: str | Path, *, scale: str = "demo", seed: int = 0,
                           seeds: int | None = None, folds: int = 4, device: str | None = None, progress: bool = True,
                           model_cfg: dict | None = None) -> str:
    """``femurseg experiment ct DATASET --out DIR``: the cascade study of paper 003 at ``scale``.

    Cross-validates the cascade into ``DIR/run`` (:func:`run_cascade_cv`; rerun to resume), then
    writes ``DIR/table1.csv`` (DSC, ASD, SP, SN per compartment: 003 Table 1),
    ``DIR/table2.csv`` and ``DIR/table2_reference_regions.csv`` (volume MAE, RMSE and relative
    error per region: 003 Table 2) and ``DIR/report.txt``; returns the report text. ``seeds``:
    as :func:`run_cascade_cv` (rerun an existing study with a larger ``seeds`` to add seeds).
    """

    outp = Path(out)
    if outp.exists() and not outp.is_dir():
        raise FemursegError(f"{outp}: exists and is not a folder")
    if not outp.parent.is_dir():
        raise FemursegError(f"{outp}: parent folder {outp.parent} does not exist")
    outp.mkdir(exist_ok=True)
    summary = run_cascade_cv(dataset, outp / "run", scale=scale, seed=seed, seeds=seeds, folds=folds, device=device,
                             progress=progress, resume=True, model_cfg=model_cfg)
    t1, t2 = cascade_tables(summary, "own")
    _, t2r = cascade_tables(summary, "reference")
    _write_rows(outp / "table1.csv", t1)
    _write_rows(outp / "table2.csv", t2)
    _write_rows(outp / "table2_reference_regions.csv", t2r)
    text = format_cascade_report(summary)
    from femurseg.core.errors import atomic_path

    with atomic_path(outp / "report.txt") as tmp:
        tmp.write_text(text + "\n")
    return text


def describe_cascade(scale: str = "demo") -> str:
    """What ``femurseg experiment ct --dry-run`` prints: the two stages' configs at ``scale``."""

    cfgs = cascade_configs(scale)
    lines = [f"CT cascade (paper 003), scale {scale}: stage 1 periosteal (label > 0) from the CT, stage 2 endosteal "
             "(label == 1) from the CT masked with the periosteal region (dilated 1 mm, -1024 HU outside); "
             "the same settings for both stages:"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in cfgs.items()]
    return "\n".join(lines)
