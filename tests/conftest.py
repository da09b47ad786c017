"""Shared pytest fixtures: tiny run folders with fixed random weights (for predict / export / DICOM SEG tests).

The runs are written in the run layout of :mod:`femurseg.inference.run` through its own helpers
(``config.json``, ``fold_<k>/best.pt`` + ``state.json``, optional ``thresholds.json``), with
seeded, randomly initialised networks: no training, so they build in well under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

TINY_3D = {"name": "unet3d", "features": 4, "levels": 2, "dilations": [1, 2]}
TINY_2D_UNPADDED = {"name": "unet2d-unpadded", "features": 4, "levels": 2}
TINY_PREP = {"crop_slices": None, "target_size": None, "scale": None, "normalise": "zscore"}


def make_run(path: Path, model_cfg: dict[str, Any], *, k: int = 2, prep: dict[str, Any] | None = None,
             thresholds: dict[str, float] | None = None, seed: int = 0, extra: dict[str, Any] | None = None) -> Path:
    """Write a run folder with ``k`` seeded random models of ``model_cfg``; returns ``path``."""
    from femurseg.inference.run import (
        CONFIG_NAME,
        RUN_FORMAT,
        RUN_VERSION,
        save_checkpoint,
        write_json,
    )
    from femurseg.models import build_model

    path.mkdir(parents=True, exist_ok=True)
    full_cfg = None
    for fold in range(k):
        torch.manual_seed(seed + 1000 * fold)
        model = build_model(dict(model_cfg))
        full_cfg = dict(model.config)
        fold_dir = path / f"fold_{fold}"
        fold_dir.mkdir(exist_ok=True)
        save_checkpoint(fold_dir / "best.pt", {"model": model.state_dict(), "model_config": full_cfg, "epoch": 1,
                                               "format": "femurseg-model"})
        write_json(fold_dir / "state.json", {"epoch": 1, "finished": True, "best_epoch": 1})
    config = {"format": RUN_FORMAT, "version": RUN_VERSION, "kind": "cv" if k > 1 else "train", "modality": "mr",
              "model": full_cfg, "preprocess": dict(prep if prep is not None else TINY_PREP), "k": k, "seed": seed,
              **(extra or {})}
    write_json(path / CONFIG_NAME, config)
    if thresholds is not None:
        write_json(path / "thresholds.json", thresholds)
    return path


@pytest.fixture(scope="session")
def run3d(tmp_path_factory) -> Path:
    """2-fold tiny padded 3D U-Net run (dilated centre) with stored PR / Youden thresholds."""
    return make_run(tmp_path_factory.mktemp("runs") / "run3d", TINY_3D, k=2,
                    thresholds={"pr": 0.49, "youden": 0.47, "source": "test"})


@pytest.fixture(scope="session")
def run2d_unpadded(tmp_path_factory) -> Path:
    """1-fold tiny unpadded 2D U-Net run, no stored thresholds."""
    return make_run(tmp_path_factory.mktemp("runs") / "run2du", TINY_2D_UNPADDED, k=1)
