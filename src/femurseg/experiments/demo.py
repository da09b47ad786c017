"""``femurseg demo`` (what ``make demo`` runs): the paper's study in miniature.

1. generate the default phantom cohort (16 MR hips, seed 0) as an nnU-Net dataset;
2. 4-fold cross-validate the paper's best network, the 3D U-Net with a dilated centre
   (rates 1, 2, 4, 8), at demo scale (the ``default`` preset: in-plane halved volumes,
   F 16, L 3, CPU-friendly learning rate and early stopping);
3. evaluate the out-of-fold predictions on the original grid (DSC, precision, recall,
   ASD, MSD, HD95, AP, volumes) with the PR-curve threshold chosen during cv;
4. write the HTML report and print its path and the headline numbers.

Every step reuses what an earlier run left in ``out`` (a dataset that passes the check, a
finished cv run), so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from femurseg.core.errors import FemursegError

DEMO_MODEL = {"name": "unet3d", "features": 16, "levels": 3, "dilations": [1, 2, 4, 8]}


def run_demo(out: str | os.PathLike = "demo_out", n: int = 16, seed: int = 0, folds: int = 4,
             max_epochs: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the demo into ``out``; returns the headline numbers (see :func:`compare.headline`)."""
    from femurseg.ct.regions import femoral_head_check
    from femurseg.data.synth import synthesize
    from femurseg.evaluation.compare import run_compare
    from femurseg.inference.run import is_run
    from femurseg.training.cv import run_cv

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data, run_dir, report = out / "data", out / "run", out / "report"
    t0 = time.perf_counter()
    if not (data / "dataset.json").exists():
        _say(f"[1/4] generating {n} synthetic MR hip phantoms -> {data}")
        synthesize(data, n=n, modality="mr", seed=seed, preview=True, progress=progress)
    else:
        _say(f"[1/4] reusing the phantom dataset in {data}")
    t_data = time.perf_counter() - t0
    train_cfg = {"max_epochs": max_epochs} if max_epochs else None
    if is_run(run_dir) and (run_dir / "summary.json").exists():
        _say(f"[2/4] reusing the finished cross-validation run in {run_dir}")
    else:
        _say(f"[2/4] {folds}-fold cross-validation of the 3D U-Net with dilated centre (1,2,4,8) -> {run_dir}")
        run_cv(data, run_dir, model_cfg=dict(DEMO_MODEL), train_cfg=train_cfg, folds=folds, seed=seed,
               resume=run_dir.exists(), progress=progress)
    t_cv = time.perf_counter() - t0 - t_data
    _say(f"[3/4] evaluating the out-of-fold predictions and [4/4] writing the report -> {report}")
    hl = run_compare([run_dir], report, names=["3D U-Net dilated (1,2,4,8)"],
                     qc_checks=(femoral_head_check,), progress=progress)
    hl["seconds_data"] = round(t_data, 1)
    hl["seconds_cv"] = round(t_cv, 1)
    hl["seconds_total"] = round(time.perf_counter() - t0, 1)
    if not hl.get("mean_dsc") == hl.get("mean_dsc"):  # NaN: nothing was evaluated
        raise FemursegError(f"{run_dir}: no case could be evaluated")
    return hl


def format_summary(hl: dict[str, Any]) -> str:
    spc = hl.get("seconds_per_case")
    lines = [
        "",
        "femurseg demo: 3D U-Net with dilated centre, 4-fold cross-validation on the synthetic hip phantoms",
        f"  cases                 {hl['n_cases']}",
        f"  DSC                   {hl['mean_dsc']:.3f} ± {hl['sd_dsc']:.3f}",
        f"  precision / recall    {hl['mean_precision']:.3f} / {hl['mean_recall']:.3f}",
        f"  ASD                   {hl['mean_asd_mm']:.2f} mm",
        f"  MSD                   {hl['mean_msd_mm']:.2f} mm",
        f"  AP (median)           {hl['median_ap']:.3f}",
        ("  QC ok / warn / fail   {ok} / {warn} / {fail}".format(**hl["qc"]) if hl.get("qc") else "  QC                    n/a"),
        f"  inference             {spc:.2f} s per subject" if spc is not None else "  inference             n/a",
        f"  wall time             {hl['seconds_total']:.0f} s (data {hl['seconds_data']:.0f} s, cv {hl['seconds_cv']:.0f} s)",
        f"  report                {hl['report']}",
    ]
    return "\n".join(lines)


def _say(msg: str) -> None:
    import typer

    typer.echo(msg, err=True)
