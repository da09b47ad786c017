"""``femurseg predict``: from a scan to a mask on the scan's own grid and geometry.

Pipeline for one scan (:func:`predict_file`):

1. **Check the outputs first** (:func:`check_outputs`): supported suffixes, the folder exists and is
   writable -- before any expensive work, so a typo costs nothing and no partial file is left.
2. **Read** the scan (:func:`femurseg.core.io.read_image`: NIfTI, NRRD, MHA/MHD or a DICOM series folder)
   in the canonical ``(A, I, L)`` order; warn when its voxel spacing is far (more than a factor
   :data:`SPACING_WARN_FACTOR`) from the training data's, as recorded in the run.
3. **Preprocess** exactly as in training (the run's ``preprocess`` config:
   :func:`femurseg.data.preprocess.preprocess_image`).
4. **Predict** the femur probability with :func:`femurseg.inference.tiling.predict_prob`: the fold models'
   softmax probabilities are averaged (``--folds all``, default) or one fold is used
   (``--folds K``). 3D and padded 2D networks see whole volumes/slices, or, when the run sets an
   inference ``patch_size``, a sliding window with Gaussian blending; the unpadded 2D U-Net sees a
   mirrored (reflect-padded) image cut into overlapping tiles whose probabilities are averaged
   (paper 001: 9 patches, 002: 49; :func:`mirrored_tiling`). ``--tta flip`` also predicts the
   left-right mirrored scan and averages (the hips of both sides are in the training data).
5. **Restore** the probability map to the original grid (:func:`femurseg.data.preprocess.restore`,
   linear in-plane, background outside the cropped slices).
6. **Threshold** (:func:`femurseg.inference.thresholds.resolve_threshold`): ``pr`` (default when the run stores
   it: the cross-validation's PR-curve threshold, paper 001), ``youden`` (stored), ``otsu`` (this
   scan's map, paper 003) or a number; a run without stored thresholds falls back to 0.5 with a notice.
7. **Post-process** (:func:`femurseg.inference.postprocess.postprocess`). Default ``lcc`` (largest 3D
   connected component) for **every** model: paper 001 needed it only for 2D networks, but it costs
   little, cannot remove a femur that is one connected object, and removes isolated false-positive
   islands, which dominate the maximum surface distance. Use ``--postprocess lcc2`` for scans with
   both hips (the largest component is one femur; ``lcc2`` keeps a second one of at least 25 % its
   size, and QC checks each femur on its own).
8. **Write** (all files of a scan are written to temporary names and renamed together at the end):
   the mask (uint8, 0/1) with the source's exact geometry (:func:`femurseg.core.io.write_like`),
   optionally the probability map (float32), a DICOM SEG (:mod:`femurseg.core.dicom_seg`, DICOM input
   only) and a PNG preview (:func:`femurseg.core.preview.save_montage`).

Batch mode (:func:`predict_many`): several ``-i``, a ``.txt`` list or a folder of scans; OUTPUT is a
folder, one ``<case>.nii.gz`` per scan. A scan that fails is reported in one line and skipped; the
others are still segmented; the summary line is ``segmented N of M scans, K failed``. Exit status
(:mod:`femurseg.cli`): 0 all done, 1 the command could not run at all (bad run, bad output
folder, bad options, or the single scan failed), :data:`EXIT_SOME_FAILED` = 2 when a batch
finished but some scans failed.

CT cascade runs (``task: cascade`` in the run config, paper 003) are loaded by
:func:`femurseg.ct.predict.load_any_predictor` (the CLI passes it as ``load``), whose predictor's
``probability_fn`` runs the periosteal model, then the endosteal model on the CT masked with its
result; the mask is the CT label map 0/1/2. This module never imports the CT package or the
scale-out back-ends: they sit above it and come in as callables and objects.

Length: the whole predict path (loading a run, probabilities, threshold and post-processing, single-scan and batch output with resume) in one place, so that a reader follows a scan from file to mask without switching files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from femurseg.core import io
from femurseg.core.errors import FemursegError, atomic_path
from femurseg.inference.fov import FOV_MODES
from femurseg.inference.postprocess import femurs_kept
from femurseg.inference.qc import QC_MODES, assess
from femurseg.inference.thresholds import foreground_probability

EXIT_SOME_FAILED = 2
"""Exit status of a batch in which at least one scan failed (others were segmented)."""

SPACING_WARN_FACTOR = 2.0
"""Warn when an axis' spacing differs from the training data's by more than this factor."""

DEFAULT_POSTPROCESS = "lcc"
DEFAULT_TILES = 9
"""Mirrored tiles per slice for unpadded 2D U-Nets (paper 001: 9; paper 002: 49)."""
MAX_WHOLE_VOXELS = 2**24
"""3D networks see volumes of up to this many voxels in one pass (about 16.8 M; the paper's
48 x 256 x 256 input is 3.1 M); larger volumes go through a sliding window."""
FALLBACK_THRESHOLD = 0.5
MASK_SUFFIX = ".nii.gz"
TTA_MODES = ("none", "flip")
ENGINES = ("torch", "onnx")

Notify = Callable[[str], None]


def _stderr_notice(msg: str) -> None:
    print(f"femurseg: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# The run: models, preprocessing, thresholds


@dataclass
class Predictor:
    """A loaded run, ready to segment scans (load once, use for a whole batch).

    Attributes:
        run_dir: the run folder.
        models: the fold networks (PyTorch modules or :class:`femurseg.inference.onnx.OnnxModel`).
        folds: their fold numbers.
        prep: the run's preprocessing (:class:`femurseg.data.preprocess.PreprocessConfig`).
        infer_options: keyword arguments for :func:`femurseg.inference.tiling.predict_prob`
            (``patch_size``, ``overlap``, ``batch_size``) from the run's config.
        thresholds: stored thresholds (``{"pr": ..., "youden": ...}``; empty if none).
        train_spacing: typical training voxel spacing (mm, canonical axes) or None.
        task: the run's task ("segment" or "cascade").
        device: where the networks run.
        config: the run's config.json.
        tiles: mirrored tiles per slice for unpadded 2D networks (a square: 9 = 3 x 3 as in paper 001,
            49 = 7 x 7 as in 002, 1 = one mirrored tile covering the slice); see :func:`mirrored_tiling`.
        max_voxels: 3D networks take volumes up to this many voxels whole; larger ones go through a
            Gaussian-weighted sliding window (:func:`memory_window`).
        qc_reference: the run's ``qc_reference.json`` (:mod:`femurseg.inference.qc`), None if it has none.
        probability_fn: ``(predictor, volume, tta) -> probabilities on the volume's grid`` replacing
            :func:`predict_probability`'s own path; the CT cascade's predictor sets it
            (:func:`femurseg.ct.predict.predict_cascade`: ``(3, *shape)`` class probabilities).
    """

    run_dir: Path
    models: list[nn.Module]
    folds: list[int]
    prep: Any
    infer_options: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    train_spacing: tuple[float, float, float] | None = None
    task: str = "segment"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    config: dict[str, Any] = field(default_factory=dict)
    tiles: int = DEFAULT_TILES
    max_voxels: int = MAX_WHOLE_VOXELS
    probability_fn: Callable[[Any, Any, str], np.ndarray] | None = None
    qc_reference: dict[str, Any] | None = None

    @property
    def spatial_dims(self) -> int:
        return int(getattr(self.models[0], "spatial_dims", 3))

    @property
    def in_channels(self) -> int:
        return int(getattr(self.models[0], "in_channels", 1))


def load_predictor(run_dir: str | os.PathLike, *, folds: str | int | None = "all", engine: str = "torch",
                   device: str | None = "auto", onnx_path: str | os.PathLike | None = None,
                   notify: Notify = _stderr_notice) -> Predictor:
    """Load a run folder's models and settings for prediction.

    Args:
        run_dir: a training / cross-validation run folder.
        folds: "all" (ensemble of every fold) or one fold number.
        engine: "torch" or "onnx" (ONNX Runtime; uses ``RUN/fold_<k>/model.onnx``, exported on the
            first use, or ``onnx_path`` for a single fold).
        device: "auto", "cpu" or "cuda".

    Raises:
        FemursegError: no such run, missing/unreadable checkpoints, unknown fold or engine.
    """
    from femurseg.inference import tiling as infer
    from femurseg.inference.run import load_run, parse_folds

    run = load_run(run_dir)
    if engine not in ENGINES:
        raise FemursegError(f"--engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    if run.config.get("task") == "cascade":  # CT cascade (paper 003): two stage runs inside
        raise FemursegError(f"{run.path}: a CT cascade run; load it with femurseg.ct.predict.load_any_predictor "
                            "(what `femurseg predict` does)")
    dev = infer.get_device(device)
    chosen = parse_folds(folds, list(range(run.k)), run.path)
    if onnx_path is not None and (engine != "onnx" or len(chosen) != 1):
        raise FemursegError(f"{onnx_path}: an ONNX model file needs --engine onnx and a single fold (--folds K)")
    if engine == "torch":
        models = run.load_models(chosen, dev)
    else:
        models = [_onnx_model(run, k, dev, onnx_path, notify) for k in chosen]
    thresholds = {k: float(v) for k, v in (run.thresholds or {}).items()
                  if k in ("pr", "youden") and isinstance(v, (int, float))}
    from femurseg.inference.qc import load_reference

    return Predictor(run.path, models, chosen, run.preprocess, _infer_options(run.config), thresholds,
                     _train_spacing(run.config), str(run.config.get("task", "segment")), dev, run.config,
                     qc_reference=load_reference(run.path))


def _infer_options(config: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for :func:`femurseg.inference.tiling.predict_prob` recorded in the run (``infer`` section)."""
    section = dict(config.get("infer") or {})
    return {k: section[k] for k in ("patch_size", "overlap", "batch_size") if section.get(k) is not None}


def _train_spacing(config: dict[str, Any]) -> tuple[float, float, float] | None:
    """The training data's typical voxel spacing (mm, canonical A, I, L axes), if the run recorded it.

    Read from ``config["train_spacing"]`` (the median over the training cases,
    :func:`femurseg.training.cv.train_spacing`); runs made before it was recorded have none, and predict
    cannot warn about a spacing mismatch for them.
    """
    v = config.get("train_spacing")
    if isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) and x > 0 for x in v):
        return tuple(float(x) for x in v)  # type: ignore[return-value]
    return None


def _onnx_model(run, fold: int, dev: torch.device, onnx_path, notify: Notify) -> nn.Module:
    from femurseg.inference.onnx import OnnxModel, default_onnx_path, export_onnx

    path = Path(onnx_path) if onnx_path is not None else default_onnx_path(run.path, fold)
    if not path.is_file():
        if onnx_path is not None:
            raise FemursegError(f"{path}: ONNX model not found")
        notify(f"exporting fold {fold} to {path} (first use of --engine onnx)")
        export_onnx(run.load_models([fold], "cpu")[0], path)
    return OnnxModel(path, device=str(dev))


# ---------------------------------------------------------------------------------------------
# Input checks


def check_volume(pred: Predictor, vol: io.Volume, notify: Notify = _stderr_notice) -> None:
    """Refuse scans the models cannot take; warn about a spacing far from the training data's."""
    expected = 1 if pred.spatial_dims == 3 else None  # 2D nets stack neighbouring slices as channels
    if expected is not None and pred.in_channels != expected:
        raise FemursegError(f"{vol.source}: the model expects {pred.in_channels} channels per voxel; "
                            f"the scan has 1 (a single-channel 3D image)")
    if pred.spatial_dims == 2 and vol.data.shape[0] < 2:
        raise FemursegError(f"{vol.source}: a 2D-slice model needs at least 2 coronal slices, got {vol.data.shape[0]}")
    if pred.train_spacing is not None:
        have, want = np.asarray(vol.spacing, float), np.asarray(pred.train_spacing, float)
        ratio = np.maximum(have / want, want / have)
        if np.any(ratio > SPACING_WARN_FACTOR):
            fmt = lambda v: " x ".join(f"{x:.3g}" for x in v)  # noqa: E731
            adapts = getattr(pred.prep, "spacing_mm", None) is not None  # the run resamples to its mm grid
            notify(f"warning: {vol.source}: voxel spacing {fmt(have)} mm is far from the training data's "
                   f"{fmt(want)} mm (A x I x L); "
                   + ("it is resampled to the training grid, but detail the scan lacks is not recovered"
                      if adapts else "the segmentation may be poor"))


# ---------------------------------------------------------------------------------------------
# Probabilities, threshold, post-processing


def predict_probability(pred: Predictor, vol: io.Volume, tta: str = "none") -> np.ndarray:
    """Femur probability on ``vol``'s original grid: float32, ``vol.data.shape``.

    For networks with more than two classes, returns ``(C, *vol.data.shape)`` class probabilities.
    """
    if tta not in TTA_MODES:
        raise FemursegError(f"--tta: expected one of {', '.join(TTA_MODES)}, got {tta!r}")
    if pred.probability_fn is not None:
        return pred.probability_fn(pred, vol, tta)
    return _restored_probabilities(pred, vol, tta, [pred.models])[0]


def fold_probabilities(pred: Predictor, vol: io.Volume, tta: str = "none") -> list[np.ndarray]:
    """Each fold model's probability on ``vol``'s grid (as :func:`predict_probability` with that model
    alone, the scan preprocessed once); their mean is the ensemble's probability (the softmax is
    averaged over the models and restored linearly). A predictor with its own ``probability_fn``
    gives one map, the ensemble's."""
    if pred.probability_fn is not None or len(pred.models) < 2:
        return [predict_probability(pred, vol, tta)]
    if tta not in TTA_MODES:
        raise FemursegError(f"--tta: expected one of {', '.join(TTA_MODES)}, got {tta!r}")
    return _restored_probabilities(pred, vol, tta, [[m] for m in pred.models])


def matched_fold_probabilities(pred: Predictor, vol: io.Volume, tta: str = "none", *, per_fold: bool = True,
                               fov: str = "match") -> tuple[list[np.ndarray], list[tuple[slice, ...]]]:
    """:func:`fold_probabilities` (``per_fold``) or ``[`` :func:`predict_probability` ``]``, with the
    field of view matched to the training scans' (:mod:`femurseg.inference.fov`) when ``fov`` is
    "match" and the run has a QC reference. Returns the maps on ``vol``'s grid and the windows
    placed on the femurs (:func:`femurseg.inference.fov.matched_probabilities`; empty: the whole scan). Predictors with their own
    ``probability_fn`` (the CT cascade localises the femur itself) are never matched."""
    from femurseg.inference.fov import matched_probabilities, training_field_of_view

    def probabilities(data: np.ndarray) -> list[np.ndarray]:
        # a window of the scan: only data and spacing are used on this path, not the geometry
        sub = vol if data is vol.data else dataclasses.replace(vol, data=data)
        return fold_probabilities(pred, sub, tta) if per_fold else [predict_probability(pred, sub, tta)]

    train_fov = (training_field_of_view(pred.qc_reference, _slab_mm(pred))
                 if fov == "match" and pred.probability_fn is None else None)
    return matched_probabilities(vol.data, vol.spacing, train_fov, probabilities)


def _slab_mm(pred: Predictor) -> float | None:
    """Thickness (mm) of the central slab the run's preprocessing keeps: ``crop_mm``, or
    ``crop_slices`` x the training slice spacing; None when it keeps every slice."""
    prep = pred.prep
    if getattr(prep, "crop_mm", None) is not None:
        return float(prep.crop_mm)
    if getattr(prep, "crop_slices", None) is not None and pred.train_spacing is not None:
        return float(prep.crop_slices) * pred.train_spacing[0]
    return None


def _fov_text(shape: Sequence[int], spacing: Sequence[float]) -> str:
    """Field of view ``A x I x L`` in mm."""
    return " x ".join(f"{n * sp:.0f}" for n, sp in zip(shape, spacing))


def _restored_probabilities(pred: Predictor, vol: io.Volume, tta: str, groups: Sequence[Sequence[nn.Module]]
                            ) -> list[np.ndarray]:
    """Preprocess ``vol`` once; per group of models their averaged probability, restored to ``vol``'s grid."""
    from femurseg.data.preprocess import preprocess_image, restore

    image, info = preprocess_image(vol.data, vol.spacing, pred.prep)
    out = []
    for models in groups:
        p = dataclasses.replace(pred, models=list(models))
        prob = _predict_preprocessed(p, image)
        if tta == "flip":  # left-right mirror (canonical axis 2 = patient right -> left)
            flipped = _predict_preprocessed(p, np.ascontiguousarray(image[..., ::-1]))
            prob = 0.5 * (prob + flipped[..., ::-1])
        out.append(restore(np.ascontiguousarray(prob, dtype=np.float32), info, order=1))
    return out


def _predict_preprocessed(pred: Predictor, image: np.ndarray) -> np.ndarray:
    from femurseg.inference.tiling import predict_prob

    return predict_prob(pred.models, image, device=pred.device, **inference_options(pred, image.shape))


def inference_options(pred: Predictor, shape: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments of :func:`femurseg.inference.tiling.predict_prob` for a preprocessed volume of ``shape``.

    The run's recorded ``infer`` options win. Otherwise: unpadded 2D networks get
    :func:`mirrored_tiling` with ``pred.tiles`` tiles per slice; 3D networks take the whole volume,
    or a sliding window (:func:`memory_window`) above ``pred.max_voxels`` voxels; padded 2D networks
    take whole slices. 2D networks go through in batches of 16 slices.
    """
    opts = dict(pred.infer_options)
    model = pred.models[0]
    if pred.spatial_dims == 2:
        opts.setdefault("batch_size", 16)
    if "patch_size" in opts:
        return opts
    if pred.spatial_dims == 2 and not getattr(model, "padded", True) and pred.tiles > 1:
        opts.update(mirrored_tiling(tuple(shape[1:]), pred.tiles))
    elif pred.spatial_dims == 3 and int(np.prod(shape)) > pred.max_voxels:
        opts.update(memory_window(tuple(shape), pred.max_voxels, int(getattr(model, "size_divisor", 1))))
    return opts


def mirrored_tiling(size: tuple[int, int], tiles: int) -> dict[str, Any]:
    """``patch_size``/``overlap`` for :func:`femurseg.inference.tiling.predict_prob` giving about ``tiles`` tiles per slice.

    Paper 001 (9 patches) / 002 (49 patches): the mirrored slice is covered by n x n overlapping tiles
    (n = sqrt(tiles)) whose probabilities are averaged. Each tile's *output* is ``2 * ceil(S / (n + 1))``
    pixels along an axis of size S, consecutive tiles overlap by half, so n tiles span the axis
    (exactly n for S >= 4 (n + 1); fewer for tiny slices); infer mirrors the borders so every tile's
    input is complete and averages the tiles with equal weights (unpadded networks).
    """
    n = int(round(np.sqrt(tiles)))
    if n < 1 or n * n != tiles:
        raise FemursegError(f"--tiles: expected a square number of tiles per slice (1, 9, 49, ...), got {tiles}")
    if n == 1:
        return {}
    patch = tuple(min(s, 2 * int(np.ceil(s / (n + 1)))) for s in size)
    return {"patch_size": patch, "overlap": 0.5}


def memory_window(shape: tuple[int, ...], max_voxels: int, divisor: int = 1) -> dict[str, Any]:
    """A sliding-window tile of at most ``max_voxels`` voxels for a volume of ``shape`` (50 % overlap,
    Gaussian blending in infer). The longest axes are halved first; sizes stay multiples of ``divisor``."""
    tile = list(shape)
    while int(np.prod(tile)) > max_voxels:
        i = int(np.argmax(tile))
        if tile[i] <= max(divisor, 1):
            break
        tile[i] = max(divisor, int(np.ceil(tile[i] / 2 / divisor)) * divisor)
    return {"patch_size": tuple(tile), "overlap": 0.5}


def segment(prob: np.ndarray, spacing: Sequence[float], *, threshold: str | float | None = None,
            stored: dict[str, float] | None = None, postprocess: str = DEFAULT_POSTPROCESS,
            min_size_mm3: float = 0.0, notify: Notify = _stderr_notice) -> tuple[np.ndarray, float]:
    """Threshold and post-process a probability map on the original grid.

    Args:
        prob: ``(D, H, W)`` femur probability, or ``(C, D, H, W)`` class probabilities (the femur is
            everything but class 0; its voxels get the most probable class 1..C-1).
        spacing: mm per canonical axis.
        threshold: "pr", "youden", "otsu", a number, or None (stored "pr", else 0.5 with a notice).
        stored: the run's stored thresholds.
        postprocess: one of :data:`femurseg.inference.postprocess.MODES` ("lcc2...": both hips).
        min_size_mm3: remove components smaller than this first.

    Returns:
        ``(mask, threshold)``: uint8 mask (0/1, or class labels for C > 2) and the threshold used.
    """
    from femurseg.inference.postprocess import MODES
    from femurseg.inference.postprocess import postprocess as run_postprocess
    from femurseg.inference.thresholds import binarize, resolve_threshold

    if str(postprocess).strip().lower() not in MODES:
        raise FemursegError(f"--postprocess: expected one of {', '.join(MODES)}, got {postprocess!r}")
    multi = prob.ndim == 4
    fg = foreground_probability(prob)
    if threshold is None:
        if stored and stored.get("pr") is not None:
            threshold = "pr"
        else:
            notify(f"notice: the run stores no PR threshold (run femurseg cv to get one); using {FALLBACK_THRESHOLD}")
            threshold = FALLBACK_THRESHOLD
    thr = resolve_threshold(threshold, stored, fg if str(threshold).lower() == "otsu" else None)
    mask = binarize(fg, thr)
    if min_size_mm3 < 0:
        raise FemursegError(f"--min-size: must be >= 0 mm^3, got {min_size_mm3}")
    mask = run_postprocess(mask, postprocess, spacing, min_size_mm3=min_size_mm3)
    if multi:
        labels = (np.argmax(prob[1:], axis=0) + 1).astype(np.uint8)
        return np.where(mask, labels, 0).astype(np.uint8), thr
    return mask.astype(np.uint8), thr


# ---------------------------------------------------------------------------------------------
# Outputs


@dataclass
class Outputs:
    """Where one scan's results go (None: not written)."""

    mask: Path
    prob: Path | None = None
    dicom_seg: Path | None = None
    preview: Path | None = None

    def all(self) -> list[Path]:
        return [p for p in (self.mask, self.prob, self.dicom_seg, self.preview) if p is not None]


def image_stem(path: str | os.PathLike) -> str:
    """``'out/case.nii.gz'`` -> ``'case'`` (any supported image suffix)."""
    return io.strip_image_suffix(Path(path).name)


def outputs_for(mask: str | os.PathLike, *, prob: str | os.PathLike | None = None, dicom_seg: bool = False,
                dicom_seg_out: str | os.PathLike | None = None, preview: bool = False) -> Outputs:
    """The output paths of one scan: the DICOM SEG defaults to ``<mask stem>.dcm`` and the preview to
    ``<mask stem>_preview.png``, both beside the mask."""
    m = Path(mask)
    seg = None
    if dicom_seg or dicom_seg_out is not None:
        seg = Path(dicom_seg_out) if dicom_seg_out is not None else m.with_name(image_stem(m) + ".dcm")
    png = m.with_name(image_stem(m) + "_preview.png") if preview else None
    return Outputs(m, None if prob is None else Path(prob), seg, png)


def check_outputs(out: Outputs) -> None:
    """Fail early (before reading and inference) on output paths that cannot be written."""
    checks = [(out.mask, io.IMAGE_SUFFIXES, "a mask"), (out.prob, io.IMAGE_SUFFIXES, "a probability map"),
              (out.dicom_seg, (".dcm",), "a DICOM SEG"), (out.preview, (".png",), "a preview")]
    seen: set[Path] = set()
    for path, suffixes, what in checks:
        if path is None:
            continue
        if not path.name.lower().endswith(tuple(suffixes)):
            raise FemursegError(f"{path}: {what} must end in {' or '.join(suffixes)}")
        if path.is_dir():
            raise FemursegError(f"{path}: is a folder; give a file name for {what}")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise FemursegError(f"{path}: output folder {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise FemursegError(f"{path}: output folder {parent} is not writable")
        if path.exists() and not os.access(path, os.W_OK):
            raise FemursegError(f"{path}: exists and is read-only")
        key = path.resolve()
        if key in seen:
            raise FemursegError(f"{path}: given for two outputs")
        seen.add(key)


@dataclass
class CaseResult:
    """What :func:`predict_file` did for one scan."""

    input: Path
    outputs: Outputs
    threshold: float
    voxels: int
    volume_cm3: float
    qc: dict[str, Any] | None = None
    """The QC record (:func:`femurseg.inference.qc.assess`), None with ``qc="off"``."""


class QCFailed(FemursegError):
    """``--qc strict``: the scan failed quality control; no mask was written."""


def predict_file(pred: Predictor, input_path: str | os.PathLike, out: Outputs, *, threshold: str | float | None = None,
                 postprocess: str = DEFAULT_POSTPROCESS, min_size_mm3: float = 0.0, tta: str = "none",
                 notify: Notify = _stderr_notice, qc: str = "on", qc_checks: Sequence[Any] = (),
                 fov: str = "match") -> CaseResult:
    """Segment one scan and write its outputs (see the module docstring for the steps).

    ``fov`` (:data:`femurseg.inference.fov.FOV_MODES`): "match" segments a scan whose field of view
    differs from the training scans' (wider or narrower in-plane, thicker than the preprocessing's
    slab) in windows of the training field of view (:func:`matched_fold_probabilities`); "full"
    segments the whole scan as it is.

    ``qc`` (:data:`femurseg.inference.qc.QC_MODES`): "on" checks the scan and its mask
    (:func:`femurseg.inference.qc.assess`), writes the record beside the mask (``<case>_qc.json``)
    and reports anything not ``ok`` through ``notify``; "strict" also refuses to write the outputs of
    a ``fail`` scan (:class:`QCFailed`); "off" skips the checks. ``qc_checks``: further mask checks
    (:data:`femurseg.inference.qc.MaskCheck`).

    Raises:
        FemursegError: unreadable / non-3D input, a DICOM SEG asked for a non-DICOM input, outputs that
            cannot be written, a QC failure under ``qc="strict"``. No output file is left behind on
            any error.
    """
    src = Path(input_path)
    check_outputs(out)
    if out.dicom_seg is not None and src.is_file():
        raise FemursegError(f"{src}: --dicom-seg needs a DICOM series folder as input, not a {src.name} file")
    if qc not in QC_MODES:
        raise FemursegError(f"--qc: expected one of {', '.join(QC_MODES)}, got {qc!r}")
    if fov not in FOV_MODES:
        raise FemursegError(f"--fov: expected one of {', '.join(FOV_MODES)}, got {fov!r}")
    vol = io.read_image(src)
    check_volume(pred, vol, notify)
    folds, windows = matched_fold_probabilities(pred, vol, tta, per_fold=qc != "off", fov=fov)
    if windows:
        size = _fov_text([w.stop - w.start for w in windows[0]], vol.spacing)
        notify(f"notice: {src.name}: field of view {_fov_text(vol.data.shape, vol.spacing)} mm differs from the "
               f"training scans'; segmented in {'a' if len(windows) == 1 else len(windows)} {size} mm "
               f"window{'s' if len(windows) > 1 else ''} placed on the femur{'s' if len(windows) > 1 else ''} "
               f"(--fov full: the whole scan as it is)")
    prob = folds[0] if len(folds) == 1 else np.mean(folds, axis=0, dtype=np.float32)
    mask, thr = segment(prob, vol.spacing, threshold=threshold, stored=pred.thresholds, postprocess=postprocess,
                        min_size_mm3=min_size_mm3, notify=notify)
    fg_prob = foreground_probability(prob)
    record = None
    if qc != "off":
        fold_masks = [segment(p, vol.spacing, threshold=thr, postprocess=postprocess, min_size_mm3=min_size_mm3,
                              notify=lambda m: None)[0] for p in folds] if len(folds) > 1 else []
        record = assess(vol.data, vol.spacing, mask, prob=fg_prob, fold_masks=fold_masks, reference=pred.qc_reference,
                        checks=qc_checks, femurs=femurs_kept(postprocess))
        record["input"] = str(src)
        if windows:
            record["fov_windows"] = [[[w.start, w.stop] for w in window] for window in windows]
        if record["verdict"] != "ok":
            notify(f"QC {record['verdict']}: {src.name}: {'; '.join(r.split(': ', 1)[1] for r in record['reasons'])}")
        if qc == "strict" and record["verdict"] == "fail":
            raise QCFailed(f"{src}: QC fail ({'; '.join(r.split(': ', 1)[1] for r in record['reasons'] if r.startswith('fail'))});"
                           " no mask written (--qc strict)")
    seg_ds = None
    if out.dicom_seg is not None:  # build it before writing anything: a bad header must not leave a mask
        from femurseg.core.dicom_seg import build_segmentation

        seg_ds = build_segmentation(mask > 0, vol)
    with contextlib.ExitStack() as stack:  # every file to a temporary name; all renamed at the end
        io.write_like(stack.enter_context(atomic_path(out.mask)), mask, vol, np.uint8)
        if out.prob is not None:
            io.write_like(stack.enter_context(atomic_path(out.prob)), fg_prob.astype(np.float32), vol, np.float32)
        if seg_ds is not None:
            seg_ds.save_as(stack.enter_context(atomic_path(out.dicom_seg)), enforce_file_format=True)
        if record is not None:
            qc_path = qc_sidecar(out.mask)
            with open(stack.enter_context(atomic_path(qc_path)), "w") as fh:
                json.dump(record, fh, indent=1, default=float)
        if out.preview is not None:
            from femurseg.core.preview import save_montage

            save_montage(vol.data, mask, stack.enter_context(atomic_path(out.preview)), title=src.name,
                         spacing=vol.spacing, prob=fg_prob)
    n = int(np.count_nonzero(mask))
    return CaseResult(src, out, thr, n, n * float(np.prod(vol.spacing)) / 1000.0, record)


def qc_sidecar(mask_path: str | os.PathLike) -> Path:
    """Where the QC record of a mask goes: ``<case>_qc.json`` beside ``<case>.nii.gz``."""
    p = Path(mask_path)
    return p.with_name(f"{image_stem(p)}_qc.json")


BATCH_TABLE = "predictions.csv"
"""The batch table written into the output folder: one row per scan (volume, threshold, QC)."""


def write_batch_table(res: BatchResult, out_dir: str | os.PathLike) -> Path:
    """``out_dir/predictions.csv``: per scan the mask, femur volume (cm^3), threshold, QC verdict and reasons
    (failed scans: verdict ``error`` or the QC failure, with the message)."""
    from femurseg.core.tables import write_csv

    rows: list[dict[str, Any]] = []
    for r in res.results:
        q = r.qc or {}
        rows.append({"case": case_name(r.input), "input": str(r.input), "mask": str(r.outputs.mask),
                     "volume_cm3": r.volume_cm3, "voxels": r.voxels, "threshold": r.threshold,
                     "qc": q.get("verdict", "off"), "qc_reasons": " | ".join(q.get("reasons", [])),
                     "fold_agreement": q.get("fold_agreement"), "entropy_bits": q.get("entropy_bits")})
    for scan, err in res.failures:
        rows.append({"case": case_name(scan), "input": str(scan), "mask": "", "volume_cm3": None, "voxels": None,
                     "threshold": None, "qc": "fail" if "QC fail" in (err or "") else "error", "qc_reasons": err or "",
                     "fold_agreement": None, "entropy_bits": None})
    path = Path(out_dir) / BATCH_TABLE
    write_csv(sorted(rows, key=lambda r: r["case"]), path)
    return path


# ---------------------------------------------------------------------------------------------
# Batch mode


def _is_dicom_folder(folder: Path) -> bool:
    """A folder is one DICOM series when it holds files but no image files and no sub-folders."""
    entries = [e for e in folder.iterdir() if not e.name.startswith(".")]
    files = [e for e in entries if e.is_file()]
    if any(io.is_image_path(e) for e in files):
        return False
    return bool(files) and not any(e.is_dir() for e in entries)


def _scans_in_folder(folder: Path) -> list[Path]:
    found = []
    for e in sorted(folder.iterdir()):
        if e.name.startswith("."):
            continue
        if e.is_file() and e.name.lower().endswith(io.IMAGE_SUFFIXES):
            if e.name.lower().endswith(".raw"):
                continue
            found.append(e)
        elif e.is_dir():
            found.append(e)
    return found


def _read_list(path: Path) -> list[Path]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FemursegError(f"{path}: cannot read the list of scans: {exc}") from None
    out = []
    for line in lines:
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        p = Path(s).expanduser()
        if not p.is_absolute() and not p.exists() and (path.parent / p).exists():
            p = path.parent / p  # relative to the list file when not relative to the working folder
        out.append(p)
    if not out:
        raise FemursegError(f"{path}: the list of scans is empty")
    return out


def expand_inputs(items: Sequence[str | os.PathLike]) -> tuple[list[Path], bool]:
    """Resolve ``-i`` arguments into scans; returns ``(scans, batch)``.

    One image file or one DICOM series folder is a single scan (``batch`` False). Batch mode: several
    ``-i``, a ``.txt`` file (one path per line; ``#`` comments; relative paths are taken from the
    working folder, else from the list's folder), or a folder of scans (image files and/or one
    DICOM series sub-folder per scan).
    """
    if not items:
        raise FemursegError("-i/--input: give at least one scan")
    scans: list[Path] = []
    batch = len(items) > 1
    for item in items:
        p = Path(item)
        if p.is_file() and p.suffix.lower() == ".txt":
            scans.extend(_read_list(p))
            batch = True
        elif p.is_dir() and not _is_dicom_folder(p):
            found = _scans_in_folder(p)
            if not found:
                raise FemursegError(f"{p}: folder holds no scans (image files or DICOM series folders)")
            scans.extend(found)
            batch = True
        else:
            scans.append(p)
    return scans, batch


def case_name(scan: Path) -> str:
    """Output case name of a scan: the file name without its image suffix, or the folder name."""
    return scan.name if scan.is_dir() else image_stem(scan)


@dataclass
class BatchResult:
    results: list[CaseResult]
    failures: list[tuple[Path, str]]
    skipped: list[Path] = field(default_factory=list)
    """Scans whose outputs were already complete (``resume``): not segmented again."""

    @property
    def n_total(self) -> int:
        return len(self.results) + len(self.failures) + len(self.skipped)

    def summary(self) -> str:
        done = f", {len(self.skipped)} already done (skipped)" if self.skipped else ""
        return f"segmented {len(self.results)} of {self.n_total} scans, {len(self.failures)} failed{done}"


def outputs_complete(out: Outputs) -> bool:
    """True when every output of a scan exists and its images read back (``--resume`` skips the scan).

    Every file is written under a temporary name and renamed when complete, so an interrupted
    run leaves either no final file or a whole one; reading the images back also catches files
    damaged afterwards (those scans are segmented again).
    """
    if not all(p.is_file() for p in out.all()):
        return False
    try:
        for p in (out.mask, out.prob):
            if p is not None:
                io.read_image(p)
    except Exception:  # noqa: BLE001 - unreadable: not complete
        return False
    return True


def batch_plan(scans: Sequence[Path], out_dir: str | os.PathLike, *, prob_dir: str | os.PathLike | None = None,
               dicom_seg: bool = False, preview: bool = False) -> list[tuple[Path, Outputs]]:
    """``(scan, outputs)`` of a batch: ``out_dir/<case>.nii.gz`` (+ probability map, SEG, preview);
    creates the folders; raises FemursegError for bad folders or two scans with one case name."""
    out = prepare_batch_folder(out_dir)
    pdir = prepare_batch_folder(prob_dir, "probability map output") if prob_dir is not None else None
    names = [case_name(s) for s in scans]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise FemursegError(f"batch: several scans would be written as {', '.join(dupes[:5])}{MASK_SUFFIX}; "
                            f"give scans distinct names")
    return [(scan, outputs_for(out / f"{name}{MASK_SUFFIX}", prob=None if pdir is None else pdir / f"{name}{MASK_SUFFIX}",
                               dicom_seg=dicom_seg and scan.is_dir(), preview=preview))
            for scan, name in zip(scans, names)]


def predict_case(pred: Predictor, scan: Path, outs: Outputs, **options: Any) -> tuple[CaseResult | None, str | None]:
    """One scan of a batch: ``(result, None)``, or ``(None, one-line error)`` when it fails (never raises
    for a bad scan). ``options``: keyword arguments of :func:`predict_file`. Local and Ray batches both use it."""
    try:
        return predict_file(pred, scan, outs, **options), None
    except FemursegError as exc:
        return None, str(exc)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # one broken scan must not stop the batch
        return None, f"{scan}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def prepare_batch_folder(folder: str | os.PathLike, what: str = "output") -> Path:
    """Create the batch output folder if needed (its parent must exist and be writable)."""
    d = Path(folder)
    if d.exists() and not d.is_dir():
        raise FemursegError(f"{d}: batch mode writes one file per scan; the {what} must be a folder")
    if d.name.lower().endswith(io.IMAGE_SUFFIXES):
        raise FemursegError(f"{d}: batch mode writes one file per scan; give a folder as {what}, not a file name")
    if not d.exists():
        parent = d.parent if str(d.parent) else Path(".")
        if not parent.is_dir():
            raise FemursegError(f"{d}: parent folder {parent} does not exist")
        try:
            d.mkdir()
        except OSError as exc:
            raise FemursegError(f"{d}: cannot create the {what} folder: {exc.strerror}") from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise FemursegError(f"{d}: {what} folder is not writable")
    return d


def predict_many(pred: Predictor, scans: Sequence[Path], out_dir: str | os.PathLike, *,
                 prob_dir: str | os.PathLike | None = None, dicom_seg: bool = False, preview: bool = False,
                 threshold: str | float | None = None, postprocess: str = DEFAULT_POSTPROCESS,
                 min_size_mm3: float = 0.0, tta: str = "none", progress: bool = True,
                 notify: Notify = _stderr_notice, resume: bool = False, qc: str = "on",
                 qc_checks: Sequence[Any] = (), fov: str = "match") -> BatchResult:
    """Segment several scans into ``out_dir/<case>.nii.gz`` (plus ``<case>.nii.gz`` probability maps
    in ``prob_dir``, ``<case>.dcm`` SEGs for DICOM inputs, ``<case>_preview.png``).

    A scan that fails is reported through ``notify`` (one line) and skipped. Raises FemursegError only
    for problems that stop the whole batch (output folders, duplicate case names). ``resume``: scans
    whose outputs are already complete (:func:`outputs_complete`) are skipped.
    """
    from femurseg.core.progress import progress as progress_bar

    results: list[CaseResult] = []
    failures: list[tuple[Path, str]] = []
    skipped: list[Path] = []
    bar = progress_bar(batch_plan(scans, out_dir, prob_dir=prob_dir, dicom_seg=dicom_seg, preview=preview),
                       desc="predict", unit="scan", disable=not progress, file=sys.stderr)
    for scan, outs in bar:
        if resume and outputs_complete(outs):
            skipped.append(scan)
            continue
        res, err = predict_case(pred, scan, outs, threshold=threshold, postprocess=postprocess,
                                min_size_mm3=min_size_mm3, tta=tta, notify=notify, qc=qc, qc_checks=qc_checks,
                                fov=fov)
        if res is not None:
            results.append(res)
            continue
        failures.append((scan, err))
        msg = err
        if progress:
            bar.write(f"femurseg: failed: {msg}", file=sys.stderr)
        else:
            notify(f"failed: {msg}")
    bar.close()
    return BatchResult(results, failures, skipped)


# ---------------------------------------------------------------------------------------------
# The command


def check_options(*, threshold: str | float | None, postprocess: str, tta: str, tiles: int, engine: str,
                  min_size_mm3: float) -> None:
    """Refuse bad option values before anything is loaded or read."""
    from femurseg.inference.postprocess import MODES
    from femurseg.inference.thresholds import METHODS

    if str(postprocess).strip().lower() not in MODES:
        raise FemursegError(f"--postprocess: expected one of {', '.join(MODES)}, got {postprocess!r}")
    if tta not in TTA_MODES:
        raise FemursegError(f"--tta: expected one of {', '.join(TTA_MODES)}, got {tta!r}")
    if engine not in ENGINES:
        raise FemursegError(f"--engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    if not min_size_mm3 >= 0:
        raise FemursegError(f"--min-size: must be >= 0 mm^3, got {min_size_mm3}")
    mirrored_tiling((64, 64), tiles)  # raises for a non-square count
    if threshold is not None and str(threshold).strip().lower() not in METHODS:
        from femurseg.inference.thresholds import resolve_threshold

        resolve_threshold(threshold, None)  # a number in [0, 1]


def predict_command(run: str | os.PathLike, inputs: Sequence[str | os.PathLike], output: str | os.PathLike, *,
                    prob: str | os.PathLike | None = None, threshold: str | None = None,
                    postprocess: str = DEFAULT_POSTPROCESS, min_size_mm3: float = 0.0, folds: str = "all",
                    tta: str = "none", engine: str = "torch", onnx_path: str | os.PathLike | None = None,
                    tiles: int = DEFAULT_TILES, dicom_seg: bool = False, dicom_seg_out: str | os.PathLike | None = None,
                    preview: bool = False, device: str = "auto", progress: bool = True,
                    echo: Callable[[str], None] = print, notify: Notify = _stderr_notice,
                    backend: Any = None, resume: bool = False,
                    load: Callable[..., Predictor] | None = None, qc: str = "on",
                    qc_checks: Sequence[Any] = (), fov: str = "match") -> int:
    """``femurseg predict``: check everything cheap first, load the run once, segment; returns the exit status
    (0, or :data:`EXIT_SOME_FAILED` when a batch finished with failures). Raises FemursegError otherwise.

    ``backend``: None/"local", or a back-end object with ``predict_many`` such as
    :class:`femurseg.scale.distributed.RayBackend` (batch mode: scans stream through Ray actors
    holding the models). ``resume``: skip scans whose outputs are complete. ``load``: the run
    loader (default :func:`load_predictor`; :func:`femurseg.ct.predict.load_any_predictor` also
    loads CT cascade runs). ``qc``, ``qc_checks``, ``fov``: see :func:`predict_file`."""
    from femurseg.core.backend import local_or_backend

    check_options(threshold=threshold, postprocess=postprocess, tta=tta, tiles=tiles, engine=engine,
                  min_size_mm3=min_size_mm3)
    backend = local_or_backend(backend)  # None: here; a back-end is connected now, before any work
    scans, batch = expand_inputs(list(inputs))
    if qc not in QC_MODES:
        raise FemursegError(f"--qc: expected one of {', '.join(QC_MODES)}, got {qc!r}")
    if fov not in FOV_MODES:
        raise FemursegError(f"--fov: expected one of {', '.join(FOV_MODES)}, got {fov!r}")
    common = dict(threshold=threshold, postprocess=postprocess, min_size_mm3=min_size_mm3, tta=tta, notify=notify, qc=qc,
                  qc_checks=tuple(qc_checks), fov=fov)
    if batch:
        if dicom_seg_out is not None:
            raise FemursegError(f"{dicom_seg_out}: --dicom-seg-out names one file; in batch mode use --dicom-seg "
                                f"(writes <case>.dcm beside each mask)")
        prepare_batch_folder(output)
        if prob is not None:
            prepare_batch_folder(prob, "probability map output")
    else:
        outs = outputs_for(output, prob=prob, dicom_seg=dicom_seg, dicom_seg_out=dicom_seg_out, preview=preview)
        check_outputs(outs)
        if outs.dicom_seg is not None and scans[0].is_file():
            raise FemursegError(f"{scans[0]}: --dicom-seg needs a DICOM series folder as input, not a file")
        if not scans[0].exists():
            raise FemursegError(f"{scans[0]}: no such file or folder")
    pred = (load or load_predictor)(run, folds=folds, engine=engine, device=device, onnx_path=onnx_path, notify=notify)
    pred.tiles = int(tiles)
    if threshold is not None and str(threshold).strip().lower() in ("pr", "youden"):
        from femurseg.inference.thresholds import resolve_threshold

        resolve_threshold(threshold, pred.thresholds)  # fails now, not after the first inference
    if threshold is None and pred.thresholds.get("pr") is None:  # say it once, not once per scan
        notify(f"notice: {pred.run_dir} stores no PR threshold (femurseg cv writes one); using {FALLBACK_THRESHOLD}")
        threshold = FALLBACK_THRESHOLD
    common["threshold"] = threshold
    if not batch:
        if resume and outputs_complete(outs):
            echo(f"{outs.mask}: already done (--resume), skipped")
            return 0
        if backend is not None:
            notify("notice: a single scan is segmented here, not on Ray (--backend ray is for batches)")
        try:
            r = predict_file(pred, scans[0], outs, **common)
        except QCFailed as exc:
            notify(str(exc))
            return EXIT_SOME_FAILED
        verdict = f", QC {r.qc['verdict']}" if r.qc else ""
        echo(f"wrote {r.outputs.mask}: femur {r.volume_cm3:.2f} cm^3 ({r.voxels} voxels) at threshold {r.threshold:.4g}"
             f"{verdict}")
        for extra in (r.outputs.prob, r.outputs.dicom_seg, r.outputs.preview):
            if extra is not None:
                echo(f"wrote {extra}")
        return 0
    kwargs = dict(prob_dir=prob, dicom_seg=dicom_seg, preview=preview, progress=progress, resume=resume, **common)
    if backend is None:
        res = predict_many(pred, scans, output, **kwargs)
    else:
        res = backend.predict_many(pred, scans, output, load=dict(folds=folds, engine=engine, device=device,
                                                                  onnx_path=onnx_path), **kwargs)
    table = write_batch_table(res, output)
    echo(res.summary())
    flagged = [r for r in res.results if r.qc and r.qc["verdict"] != "ok"]
    if flagged:
        echo(f"QC: {sum(r.qc['verdict'] == 'warn' for r in flagged)} warn, "
             f"{sum(r.qc['verdict'] == 'fail' for r in flagged)} fail (see {table})")
    else:
        echo(f"wrote {table}")
    return EXIT_SOME_FAILED if res.failures else 0
