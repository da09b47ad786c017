"""Cascade inference: what ``femurseg predict`` runs for a cascade run folder.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np

from femurseg.core.errors import FemursegError
from femurseg.ct.femurs import CropBox, femur_boxes
from femurseg.ct.hu import HUWarning, check_hu
from femurseg.ct.stages import (
    CASCADE_TASK,
    cascade_probabilities,
    periosteal_mask,
    stage2_input,
    stage_names,
)

# ----------------------------------------------------------------------------- cascade prediction


def load_cascade_predictor(run: Any, folds: str | int | None = "all", engine: str = "torch",
                           device: str | None = "auto", notify: Any = None) -> Any:
    """A :class:`femurseg.inference.predict.Predictor` for a cascade run folder: stage 1's models and
    settings, with both stages' predictors attached (``pred.stages``). A run trained with several
    seeds ensembles every seed's fold models per stage, at the thresholds its evaluation took on
    the seed-averaged out-of-fold maps (``cascade_summary.json``)."""
    import dataclasses

    from femurseg.inference.predict import _stderr_notice, load_predictor

    notify = notify or _stderr_notice
    seeds = int(run.config.get("cascade", {}).get("seeds", 1))

    def stage(names: list[str], key: str) -> Any:
        ps = [load_predictor(run.path / n, folds=folds, engine=engine, device=device, notify=notify) for n in names]
        if len(ps) == 1:
            return ps[0]
        summary = run.path / "cascade_summary.json"
        if not summary.exists():
            raise FemursegError(f"{run.path}: a cascade with {seeds} seeds needs its evaluation "
                                f"(cascade_summary.json: the ensemble's thresholds); rerun with --resume")
        thr = float(json.loads(summary.read_text())["thresholds"][key])
        return dataclasses.replace(ps[0], models=[m for p in ps for m in p.models], folds=[f for p in ps for f in p.folds],
                                   thresholds={**ps[0].thresholds, "pr": thr})

    names1, names2 = stage_names(seeds)
    p1, p2 = stage(names1, "stage1_pr"), stage(names2, "stage2_pr")
    pred = type(p1)(run.path, p1.models, p1.folds, p1.prep, p1.infer_options, p1.thresholds, p1.train_spacing,
                    CASCADE_TASK, p1.device, run.config, probability_fn=predict_cascade)
    pred.stages = (p1, p2)  # type: ignore[attr-defined]
    return pred


def predict_cascade(pred: Any, vol: Any, tta: str = "none") -> np.ndarray:
    """Cascade inference on one CT volume: ``(3, *vol.data.shape)`` probabilities (background,
    trabecular, cortical) on its grid, for :func:`femurseg.inference.predict.segment`.

    Warns (stderr) when the image does not look like HU. A bilateral scan (two femurs found by
    :func:`find_femurs`) is run per femur crop box (:func:`femur_boxes`) and pasted back, and so is
    every scan when the cascade was trained on per-femur crops (:func:`crop_femur_dataset`, same
    margin); the periosteal mask of each is :func:`periosteal_mask` of stage 1's probability at its
    PR threshold.
    Note that ``predict``'s default ``lcc`` post-processing keeps one femur: use
    ``--postprocess none`` for bilateral scans.
    """
    from femurseg.core import io
    from femurseg.inference.predict import predict_probability

    p1, p2 = pred.stages
    opts = pred.config.get("cascade", {})
    dilate_mm, fill_hu = float(opts.get("dilate_mm", 1.0)), float(opts.get("fill_hu", -1024.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HUWarning)
        check_hu(vol.data, vol.source or "image")
    for w in caught:
        import sys

        print(f"femurseg: warning: {w.message}", file=sys.stderr)
    thr1, thr2 = float(p1.thresholds.get("pr", 0.5)), float(p2.thresholds.get("pr", 0.5))
    margin = opts.get("femur_crop_margin_mm")
    try:
        boxes = femur_boxes(vol.data, vol.spacing, **({} if margin is None else {"margin_mm": float(margin)}))
    except FemursegError:
        boxes = []
    if len(boxes) < 2 and (margin is None or not boxes):
        # whole volume: a model trained on whole scans, or no femur found by the bone threshold
        boxes = [CropBox("", (0, 0, 0), tuple(vol.data.shape), tuple(vol.data.shape))]
    out = np.zeros((3, *vol.data.shape), np.float32)
    out[0] = 1.0
    for box in boxes:
        img = box.crop(vol.data, fill=fill_hu)
        sub = io.make_volume(img, vol.spacing)
        sub.source = vol.source
        pp = predict_probability(p1, sub, tta)
        peri = periosteal_mask(pp, thr1, vol.spacing)
        pe = predict_probability(p2, sub.with_data(stage2_input(img, peri, vol.spacing, dilate_mm, fill_hu)), tta)
        probs = cascade_probabilities(pp, peri, pe, thr2, thr1)
        region = box.paste(np.ones(box.shape, bool), fill=0).astype(bool)
        full = box.paste(probs)
        out[:, region] = full[:, region]
    return out


def load_any_predictor(run_dir: Any, **kwargs: Any) -> Any:
    """A predictor for any run folder: a CT cascade run (:func:`load_cascade_predictor`) or an ordinary
    one (:func:`femurseg.inference.predict.load_predictor`); same keyword arguments as the latter."""
    from femurseg.inference.predict import _stderr_notice, load_predictor
    from femurseg.inference.run import load_run

    run = load_run(run_dir)
    if run.config.get("task") != CASCADE_TASK:
        return load_predictor(run_dir, **kwargs)
    if kwargs.get("onnx_path") is not None:
        raise FemursegError(f"{run_dir}: --onnx-path names one network; a cascade run has two stages")
    return load_cascade_predictor(run, kwargs.get("folds", "all"), kwargs.get("engine", "torch"),
                                  kwargs.get("device", "auto"), kwargs.get("notify") or _stderr_notice)
