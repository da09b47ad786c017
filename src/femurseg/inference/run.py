"""The run folder: a self-describing record of one training or cross-validation run.

Layout (written by :func:`femurseg.training.cv.run_cv` and :func:`femurseg.training.cv.run_train`)::

    RUN/
      config.json        {"format": "femurseg-run", "version": 1, "kind": "cv" | "train",
                          "dataset", "modality", "labels", "preset", "model", "preprocess",
                          "train", "augment", "k", "seed", "group_by", "environment", "created"}
      split.json         the folds (femurseg.data.splits), reusable with --split
      fold_<i>/best.pt   model of fold i at its best validation epoch (weights + model config)
      fold_<i>/last.pt   full training state after the last complete epoch (resume)
      fold_<i>/log.csv   one row per epoch: train/validation loss and Dice
      oof/<case>.nii.gz  out-of-fold femur probability on the case's original grid
      oof_masks/<case>.nii.gz   out-of-fold binary masks (at the PR threshold)
      thresholds.json    PR and Youden thresholds from the pooled out-of-fold predictions
      metrics.csv        per-case metrics of the out-of-fold masks
      summary.json       mean metrics, timings

Model i is trained on every case *not* in fold i; ``femurseg train`` writes the same layout
with one fold (its validation cases), so ``femurseg predict`` loads either kind.
Every file is written atomically (``femurseg.core.errors.atomic_path``); a run killed at any
moment can be resumed (``--resume``) from the last complete epoch.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from femurseg.core.errors import FemursegError, atomic_path
from femurseg.data.preprocess import PreprocessConfig
from femurseg.data.splits import Split, load_split

RUN_FORMAT = "femurseg-run"
RUN_VERSION = 1
CONFIG_NAME = "config.json"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    p = Path(path)
    with atomic_path(p) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")
    return p


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_checkpoint(path: str | os.PathLike, obj: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary file, then rename (a kill never leaves half a checkpoint)."""
    p = Path(path)
    with atomic_path(p) as tmp:
        torch.save(obj, tmp)
    return p


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (safe ``weights_only`` loading)."""
    p = Path(path)
    if not p.exists():
        raise FemursegError(f"{p}: checkpoint not found")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign file
        raise FemursegError(f"{p}: unreadable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def model_from_checkpoint(path: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild the model stored in a ``best.pt``/``last.pt`` checkpoint, in eval mode."""
    from femurseg.core.precision import get_device
    from femurseg.models import build_model

    ck = load_checkpoint(path)
    if "model_config" not in ck or "model" not in ck:
        raise FemursegError(f"{path}: not a femurseg model checkpoint")
    model = build_model(dict(ck["model_config"]))
    model.load_state_dict(ck["model"])
    return model.to(get_device(device)).eval()


def git_commit() -> str | None:
    """Commit of the femurseg source tree (None outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment() -> dict[str, Any]:
    """Library versions, machine and git commit, recorded in every run's config."""
    import numpy
    import scipy

    import femurseg

    env: dict[str, Any] = {
        "femurseg": getattr(femurseg, "__version__", "unknown"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
    }
    try:
        import SimpleITK

        env["SimpleITK"] = SimpleITK.Version_VersionString()
    except Exception:  # noqa: BLE001
        pass
    return env


def cpu_model() -> str:
    """The CPU model name (from /proc/cpuinfo), for run configs and benchmark tables."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Run:
    """A loaded run folder (see the module docstring)."""

    path: Path
    config: dict[str, Any]
    split: Split | None
    thresholds: dict[str, Any] | None

    @property
    def kind(self) -> str:
        return str(self.config.get("kind", "cv"))

    @property
    def model_config(self) -> dict[str, Any]:
        return dict(self.config["model"])

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.config.get("preprocess"))

    @property
    def train_config(self) -> dict[str, Any]:
        return dict(self.config.get("train", {}))

    @property
    def k(self) -> int:
        return int(self.config.get("k", self.split.k if self.split else 1))

    @property
    def folds(self) -> list[list[str]]:
        """Validation (held-out) cases of each fold model."""
        return self.split.folds if self.split else []

    def fold_dir(self, fold: int) -> Path:
        return self.path / f"fold_{fold}"

    def fold_finished(self, fold: int) -> bool:
        return (self.fold_dir(fold) / "best.pt").exists() and bool(self.fold_state(fold).get("finished"))

    def fold_state(self, fold: int) -> dict[str, Any]:
        """``{"epoch", "finished", "best_epoch", "best_metric"}`` of a fold's last checkpoint ({} if none)."""
        p = self.fold_dir(fold) / "state.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def threshold(self, name: str = "pr", default: float = 0.5) -> float:
        """The stored threshold ``name`` ("pr" or "youden"), else ``default``."""
        if self.thresholds and name in self.thresholds and self.thresholds[name] is not None:
            return float(self.thresholds[name])
        return default

    def load_models(self, folds: str | int | list[int] = "all", device: str | torch.device | None = None,
                    which: str = "best") -> list[nn.Module]:
        """The trained fold models (eval mode, on ``device``): "all", one index or a list.

        ``which`` = "best" (the early-stopping checkpoint, default) or "last".
        """
        if folds == "all":
            idx = list(range(self.k))
        elif isinstance(folds, int):
            idx = [folds]
        else:
            idx = [int(f) for f in folds]
        models = []
        for i in idx:
            if not 0 <= i < self.k:
                raise FemursegError(f"{self.path}: no fold {i} (the run has {self.k} fold(s))")
            ck = self.fold_dir(i) / f"{which}.pt"
            if not ck.exists() or (which == "best" and not self.fold_finished(i)):
                raise FemursegError(f"{self.path}: fold {i} has not finished training (resume it with --resume)")
            models.append(model_from_checkpoint(ck, device))
        return models


def is_run(path: str | os.PathLike) -> bool:
    p = Path(path) / CONFIG_NAME
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == RUN_FORMAT
    except (json.JSONDecodeError, OSError, AttributeError):
        return False


def load_run(path: str | os.PathLike) -> Run:
    """Open a run folder; raises FemursegError ``"<path>: not a femurseg run ..."`` otherwise."""
    p = Path(path)
    if not p.is_dir() or not is_run(p):
        raise FemursegError(f"{p}: not a femurseg run (no {CONFIG_NAME} written by `femurseg cv` or `femurseg train`)")
    config = json.loads((p / CONFIG_NAME).read_text())
    if int(config.get("version", 0)) > RUN_VERSION:
        raise FemursegError(f"{p}: run format version {config.get('version')} is newer than this femurseg understands")
    split = load_split(p / "split.json") if (p / "split.json").exists() else None
    thr_path = p / "thresholds.json"
    thresholds = json.loads(thr_path.read_text()) if thr_path.exists() else None
    return Run(p, config, split, thresholds)


def prepare_run_dir(out: str | os.PathLike, *, resume: bool, overwrite: bool) -> bool:
    """Decide what to do with the output folder; returns True when an existing run is resumed.

    * missing or empty folder: a new run;
    * an existing femurseg run: resumed with ``resume``, deleted and restarted with
      ``overwrite`` (call this only after every input check has passed), else an error;
    * anything else (a non-empty folder that is not a run): an error, never deleted.
    """
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise FemursegError(f"{p}: exists and is not a folder")
    if not p.exists() or not any(p.iterdir()):
        if not p.parent.exists():
            raise FemursegError(f"{p}: parent folder {p.parent} does not exist")
        return False
    if not is_run(p):
        raise FemursegError(f"{p}: folder exists, is not empty and is not a femurseg run; choose another --out")
    if resume:
        return True
    if overwrite:
        shutil.rmtree(p)
        return False
    raise FemursegError(f"{p}: a run already exists here; pass --resume to continue it or --overwrite to replace it")


def read_log(path: str | os.PathLike) -> list[dict[str, float]]:
    """Rows of a ``log.csv`` as floats (empty cells -> NaN)."""
    with open(path, newline="") as fh:
        return [{k: (float(v) if v not in ("", None) else float("nan")) for k, v in row.items()} for row in csv.DictReader(fh)]


def parse_folds(folds: str | int | None, available: Sequence[int], run_dir: Path | str = "") -> list[int]:
    """``'all'``/None -> every available fold; ``'K'`` or K -> ``[K]`` (must exist)."""
    if folds is None or str(folds).strip().lower() == "all":
        return list(available)
    try:
        k = int(str(folds).strip())
    except ValueError:
        raise FemursegError(f"--folds: expected 'all' or a fold number, got {folds!r}") from None
    if k not in available:
        have = ", ".join(map(str, available)) or "none"
        raise FemursegError(f"{run_dir}: no fold {k} in the run (folds: {have})")
    return [k]
