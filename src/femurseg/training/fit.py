"""Training loop: losses, Adam, early stopping, atomic checkpoints, exact resume.

:func:`fit` trains one model on in-memory preprocessed samples (:class:`Sample`; the
preprocessed volumes are computed once and cached for the whole run, so the loop never
waits for disk or resampling) and validates it after every epoch.

* **Samples per epoch.** 3D networks see each training volume once per epoch, whole
  (``patch_size=None``, the paper's choice) or as one random patch of ``patch_size``
  (half of the patches centred on a femur voxel) for volumes that do not fit in memory.
  2D networks see 3-slice stacks (``in_channels`` consecutive coronal slices, edge slices
  repeated) of every slice of every volume, or ``slices_per_volume`` random ones; the
  label is the centre slice. Unpadded networks get their input mirrored at the borders
  (as at inference, :mod:`femurseg.inference.tiling`) so their output covers the whole slice.
* **Loss** (:mod:`femurseg.training.losses`): "wce" (paper 002 Eq. 1 with the intended
  inverse-frequency weights; the paper preset), "wce-literal", "ce", "dice", "dice-wce"
  (soft Dice + "wce"; the CPU default, see below), "dice-ce" (soft Dice + unweighted CE; the
  CT cascade's, see :mod:`femurseg.training.losses` for why). Slices and patches are weighted with the
  class fractions of their whole volume.
* **Optimiser**: Adam (paper 001 Table 5: learning rate 5e-5 constant, batch size 1), with an
  optional cosine or poly decay of the learning rate over ``max_epochs``; ``optimizer="sgd"`` is
  nnU-Net's SGD with Nesterov momentum 0.99 (use it with its lr 1e-2 and weight decay 3e-5).
* **Defaults** (``TrainConfig()``, the ``default`` preset of :mod:`femurseg.training.cv`) are tuned
  for 2 CPU cores and the 16-case phantom (measured, see ``femurseg.training.cv``): Dice + wCE, Adam
  2e-3 with cosine decay to 1e-4, at most 32 epochs, early stopping from epoch 20 with
  patience 5 (16 / 10 until the wide phantom world showed the model under-trained at 16).
  ``TrainConfig.preset("paper")``: wCE, Adam 5e-5 constant, early stopping after 30 epochs with
  patience 10 and min delta 1e-4.
* **Validation** after every epoch on the validation cases, whole volumes through
  :func:`femurseg.inference.tiling.predict_classes` (exactly the inference path): validation loss
  and Dice of ``p >= 0.5`` (mean over cases; C > 2: mean over foreground classes of the
  argmax). **Early stopping monitors the validation Dice** (``monitor="dice"``): it is
  the "accuracy" of paper 001 ("training is stopped when the accuracy on the validation
  set does not improve by 1e-4 within the last 10 epochs; the first 30 epochs are trained
  without early stopping"), it is what is evaluated, and unlike the class-weighted loss
  it does not reward over-confident probabilities. ``monitor="loss"`` uses the
  validation loss. Without validation cases the training loss is monitored.
  The best epoch's weights are kept (``best.pt``).
* **Devices and precision**: CUDA when present, else the CPU. ``precision="auto"`` (every
  preset) trains in what the device runs natively (:mod:`femurseg.core.precision`): float16
  AMP with a gradient scaler on CUDA, bfloat16 autocast on a CPU with AVX512-BF16/AMX (the
  same out-of-fold Dice as float32 on the demo, 0.966 vs 0.963, at half the CPU time),
  float32 on other CPUs, where bfloat16 is emulated and ~37x slower. Where torch's CPU
  bfloat16 ``Conv3d`` weight gradient is broken (input depth 2, which made tiny test volumes
  diverge to NaN) :func:`fit` trains in float32 (:func:`bf16_conv3d_hazard`).
* **Reproducibility and resume.** Every source of randomness is re-seeded at the start of
  every epoch from ``(seed, fold, epoch)`` (Python ``random``, NumPy, torch incl. CUDA; the
  sample order, augmentation and dropout draw from these), and the complete state after
  each epoch (weights, Adam moments, gradient scaler, early-stopping state, history, RNG
  states) is written atomically to ``last.pt``. A run killed at any moment (even
  ``kill -9`` while a checkpoint is being written) resumes from the last complete epoch
  and reproduces the uninterrupted run bit for bit on the same machine and thread count.
  What remains non-deterministic: on CUDA some kernels (cuDNN convolution algorithms,
  atomics in transposed-convolution backward passes, interpolation) are not bitwise
  reproducible even with ``torch.use_deterministic_algorithms(True, warn_only=True)``,
  which :func:`fit` sets; results also differ across CPU models, torch/MKL/oneDNN versions
  and thread counts (floating-point reduction order); timings in the log always differ.

Length: the fit loop with its configuration, sampling, resume state and early stopping, which change together.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from femurseg.core.errors import FemursegError, atomic_path
from femurseg.core.precision import PRECISIONS, Precision, resolve_precision
from femurseg.core.progress import progress as progress_bar
from femurseg.core.progress import write as progress_write
from femurseg.data.augment import AugmentConfig, augment
from femurseg.inference.run import load_checkpoint, save_checkpoint, write_json
from femurseg.inference.tiling import (
    get_device,
    input_size_for,
    is_patch_classifier,
    mirror_pad,
    predict_classes,
)
from femurseg.training.losses import LOSSES, deep_supervision_loss, get_loss

MONITORS = ("dice", "loss")
LR_SCHEDULES = ("constant", "cosine", "poly")
OPTIMIZERS = ("adam", "sgd")
LOG_COLUMNS = ("epoch", "train_loss", "val_loss", "val_dice", "lr", "best_epoch", "seconds")


@dataclass
class TrainConfig:
    """Training parameters (defaults: the CPU-friendly preset; ``TrainConfig.preset("paper")``
    gives paper 001's Table 5 and early-stopping values).

    Attributes:
        loss: one of :data:`femurseg.training.losses.LOSSES`.
        optimizer: "adam" (the papers') or "sgd" (nnU-Net's: Nesterov momentum 0.99).
        lr: learning rate (the peak of the schedule).
        lr_schedule: "constant" (paper), "cosine" or "poly". Epoch e (1-based), ``t = (e - 1) / max_epochs``:
            cosine ``lr * (f + (1 - f) * (1 + cos(pi * t)) / 2)`` with ``f = lr_min_factor``; poly
            (nnU-Net's polyLR, per epoch instead of per iteration) ``lr * (1 - t) ** 0.9``. Both are
            functions of the epoch only (exact on resume).
        lr_min_factor: the cosine schedule's final fraction of ``lr``.
        batch_size: volumes (3D) or slice stacks (2D) per step.
        max_epochs: hard limit on the number of epochs.
        min_epochs: epochs trained before early stopping may stop (paper: 30).
        patience: stop when the monitored metric has not improved by ``min_delta`` within
            this many epochs (paper: 10 and 1e-4).
        min_delta: the improvement that counts.
        monitor: "dice" (validation Dice at 0.5, maximised) or "loss" (validation loss).
        weight_decay: L2 weight decay.
        patch_size: 3D random-patch size (D, H, W); None trains on whole volumes.
        slices_per_volume: 2D stacks per volume per epoch (None: every slice).
        patches_per_volume: patch CNN: tri-planar patches per volume per epoch.
        precision: "auto" (default), "fp32", "bf16" or "fp16", decided for the training device by
            :func:`femurseg.core.precision.resolve_precision`: "auto" is float16 AMP on CUDA,
            bfloat16 autocast on a CPU with native bfloat16 (AVX512-BF16/AMX), float32 on other
            CPUs. Where torch's CPU bfloat16 ``Conv3d`` weight gradient is broken (input depth 2)
            :func:`fit` trains in float32 instead (:func:`bf16_conv3d_hazard`).
        threads: torch CPU threads during :func:`fit` (None: torch's default, the number of
            physical cores; restored afterwards).
        deterministic: request deterministic kernels (``torch.use_deterministic_algorithms``).
        val_batch_size: slices (2D) per forward pass in validation.
    """

    loss: str = "dice-wce"
    optimizer: str = "adam"
    lr: float = 2e-3
    lr_schedule: str = "cosine"
    lr_min_factor: float = 0.05
    batch_size: int = 1
    max_epochs: int = 32
    min_epochs: int = 20
    patience: int = 5
    min_delta: float = 1e-4
    monitor: str = "dice"
    weight_decay: float = 0.0
    patch_size: list[int] | None = None
    slices_per_volume: int | None = None
    patches_per_volume: int = 2048
    precision: str = "auto"
    threads: int | None = None
    deterministic: bool = True
    val_batch_size: int = 16

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise FemursegError(f"--precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.loss not in LOSSES:
            raise FemursegError(f"--loss: {self.loss!r} is not one of {', '.join(LOSSES)}")
        if self.monitor not in MONITORS:
            raise FemursegError(f"--monitor: {self.monitor!r} is not one of {', '.join(MONITORS)}")
        if self.optimizer not in OPTIMIZERS:
            raise FemursegError(f"--optimizer: {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FemursegError(f"--lr: {self.lr} must be a positive number")
        if self.lr_schedule not in LR_SCHEDULES:
            raise FemursegError(f"--lr-schedule: {self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        if not 0 <= self.lr_min_factor <= 1:
            raise FemursegError(f"--lr-min-factor: {self.lr_min_factor} must be in [0, 1]")
        for name in ("batch_size", "max_epochs", "patches_per_volume", "val_batch_size"):
            if int(getattr(self, name)) < 1:
                raise FemursegError(f"--{name.replace('_', '-')}: {getattr(self, name)} must be >= 1")
        if self.min_epochs < 0 or self.patience < 1:
            raise FemursegError(f"--min-epochs {self.min_epochs} / --patience {self.patience}: must be >= 0 / >= 1")
        if self.patch_size is not None:
            self.patch_size = [int(v) for v in self.patch_size]
            if len(self.patch_size) != 3 or min(self.patch_size) < 1:
                raise FemursegError(f"--patch-size: {self.patch_size} must be three positive sizes (D, H, W)")
        if self.slices_per_volume is not None and self.slices_per_volume < 1:
            raise FemursegError(f"--slices-per-volume: {self.slices_per_volume} must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TrainConfig:
        d = dict(d or {})
        if "amp" in d:  # run folders written before ``precision``: amp False was float32 everywhere
            amp = d.pop("amp")
            d.setdefault("precision", "fp32" if amp is False else "auto")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise FemursegError(f"training: unknown option(s) {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str) -> TrainConfig:
        if name == "default":
            return cls()
        if name == "paper":
            return cls(loss="wce", lr=5e-5, lr_schedule="constant", batch_size=1, max_epochs=1000, min_epochs=30,
                       patience=10, min_delta=1e-4)
        raise FemursegError(f"--preset: unknown preset {name!r} (default, paper)")


@dataclass
class Sample:
    """One preprocessed training/validation case held in memory.

    ``image`` float32 and ``label`` uint8 have the preprocessed shape ``(D, H, W)``;
    ``fractions`` are the label's class fractions ``(C,)`` (loss weights for slices/patches);
    ``spacing`` the preprocessed grid's mm per axis (None: unknown, treated as isotropic by the
    augmentation's rotations).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    fractions: np.ndarray = field(default=None)  # type: ignore[assignment]
    spacing: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.fractions is None:
            n = max(2, int(self.label.max()) + 1)
            self.fractions = np.bincount(self.label.ravel(), minlength=n) / self.label.size


class EarlyStopping:
    """Paper 001's rule: after ``min_epochs`` epochs, stop once the monitored metric has not
    improved by more than ``min_delta`` for ``patience`` epochs.

    Epochs are numbered from 1. ``update(epoch, value)`` returns True when ``value`` is a new
    best (first epoch, or better than the best by more than ``min_delta``; NaN never is);
    ``should_stop(epoch)`` is ``epoch >= min_epochs and epoch - best_epoch >= patience``.
    """

    def __init__(self, min_epochs: int = 30, patience: int = 10, min_delta: float = 1e-4, mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.min_epochs, self.patience, self.min_delta, self.mode = int(min_epochs), int(patience), float(min_delta), mode
        self.best: float | None = None
        self.best_epoch = 0

    def update(self, epoch: int, value: float) -> bool:
        if value is None or not math.isfinite(value):
            return False
        better = (self.best is None or (value > self.best + self.min_delta if self.mode == "max"
                                        else value < self.best - self.min_delta))
        if better:
            self.best, self.best_epoch = float(value), int(epoch)
        return better

    def should_stop(self, epoch: int) -> bool:
        return epoch >= self.min_epochs and epoch - self.best_epoch >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.best = None if d.get("best") is None else float(d["best"])
        self.best_epoch = int(d.get("best_epoch", 0))


@dataclass
class FitResult:
    best_epoch: int
    best_metric: float | None
    epochs: int
    stopped_early: bool
    history: list[dict[str, Any]]
    seconds: float
    precision: dict[str, Any] = field(default_factory=dict)


def make_optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``params`` at ``cfg.lr`` and ``cfg.weight_decay``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of epoch ``epoch`` (1-based) under ``cfg.lr_schedule``."""
    if cfg.lr_schedule == "constant":
        return float(cfg.lr)
    f = float(cfg.lr_min_factor)
    t = min(max(epoch - 1, 0), cfg.max_epochs) / max(cfg.max_epochs, 1)
    if cfg.lr_schedule == "poly":
        return float(cfg.lr * (1 - t) ** 0.9)
    return float(cfg.lr * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * t))))


# ----------------------------------------------------------------------------- randomness


def derive_seed(*keys: int) -> int:
    """A 31-bit seed from integers (e.g. ``(seed, fold, epoch)``), stable across runs."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0] & 0x7FFFFFFF)


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, NumPy's global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    st = np.random.get_state()
    state = {
        "python": json.dumps(random.getstate()),
        "numpy": {"key": torch.from_numpy(st[1].astype(np.int64)), "pos": int(st[2]), "has_gauss": int(st[3]),
                  "cached": float(st[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- batches


def _stack(image: np.ndarray, k: int, c_in: int) -> np.ndarray:
    half = (c_in - 1) // 2
    idx = np.clip(np.arange(k - half, k - half + c_in), 0, image.shape[0] - 1)
    return image[idx]


def _epoch_items(samples: list[Sample], model: nn.Module, cfg: TrainConfig, rng: np.random.Generator) -> list[tuple]:
    """The shuffled training items of one epoch: ``(sample index, where)``."""
    items: list[tuple] = []
    sd = int(getattr(model, "spatial_dims", 3))
    for i, s in enumerate(samples):
        if is_patch_classifier(model):
            items.append((i, "patches"))
        elif sd == 2:
            ks = np.arange(s.image.shape[0])
            if cfg.slices_per_volume is not None and cfg.slices_per_volume < len(ks):
                ks = np.sort(rng.choice(ks, cfg.slices_per_volume, replace=False))
            items += [(i, int(k)) for k in ks]
        elif cfg.patch_size is not None:
            items.append((i, _patch_start(s, cfg.patch_size, rng)))
        else:
            items.append((i, None))
    order = rng.permutation(len(items))
    return [items[j] for j in order]


def _patch_start(s: Sample, patch: list[int], rng: np.random.Generator) -> tuple[int, ...]:
    shape = s.image.shape
    size = [min(p, n) for p, n in zip(patch, shape)]
    if rng.random() < 0.5 and s.label.any():
        fg = np.flatnonzero(s.label)
        centre = np.unravel_index(int(fg[rng.integers(len(fg))]), shape)
    else:
        centre = tuple(int(rng.integers(n)) for n in shape)
    return tuple(int(np.clip(c - p // 2, 0, n - p)) for c, p, n in zip(centre, size, shape))


def _make_batch(samples: list[Sample], items: list[tuple], model: nn.Module, cfg: TrainConfig,
                rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(image (B, C, *S), label (B, *S), fractions (B, C) or None)`` on the CPU."""
    sd = int(getattr(model, "spatial_dims", 3))
    c_in = int(getattr(model, "in_channels", 1))
    if is_patch_classifier(model):
        return _patch_classifier_batch(samples, items, model, cfg, rng)
    imgs, labs, fracs = [], [], []
    for i, where in items:
        s = samples[i]
        if sd == 2:
            imgs.append(_stack(s.image, where, c_in))
            labs.append(s.label[where])
        elif where is None:
            imgs.append(s.image[None])
            labs.append(s.label)
        else:
            region = tuple(slice(a, a + min(p, n)) for a, p, n in zip(where, cfg.patch_size, s.image.shape))
            imgs.append(s.image[region][None])
            labs.append(s.label[region])
        fracs.append(s.fractions)
    shapes = {a.shape for a in imgs}
    if len(shapes) > 1:
        raise FemursegError(f"batch size {len(items)} needs volumes of one shape, got {sorted(shapes)}; "
                            "use --batch-size 1, a fixed --target-size and --crop-slices, or --patch-size")
    n_cls = max(len(f) for f in fracs)
    frac = np.stack([np.pad(f, (0, n_cls - len(f))) for f in fracs])
    whole_3d = sd == 3 and cfg.patch_size is None
    return (torch.from_numpy(np.stack(imgs)), torch.from_numpy(np.stack(labs)),
            None if whole_3d else torch.from_numpy(frac))


def _patch_classifier_batch(samples, items, model, cfg, rng):
    from femurseg.models import extract_triplanar_patches

    size = int(model.config.get("patch_size", 32))
    imgs, labs, fracs = [], [], []
    for i, _ in items:
        s = samples[i]
        n = cfg.patches_per_volume
        fg = np.flatnonzero(s.label)
        bg = np.flatnonzero(s.label == 0)
        pick = np.concatenate([fg[rng.integers(len(fg), size=n // 2)] if len(fg) else np.zeros(0, int),
                               bg[rng.integers(len(bg), size=n - (n // 2 if len(fg) else 0))]])
        centres = np.stack(np.unravel_index(pick, s.label.shape), -1)
        imgs.append(extract_triplanar_patches(s.image, centres, size))
        labs.append(s.label.ravel()[pick])
        fracs.append(np.repeat(s.fractions[None], len(pick), 0))
    return (torch.from_numpy(np.concatenate(imgs)), torch.from_numpy(np.concatenate(labs)),
            torch.from_numpy(np.concatenate(fracs)))


def _forward(model: nn.Module, x: torch.Tensor, call: nn.Module | None = None) -> torch.Tensor:
    """Logits covering ``x``'s spatial size (unpadded nets get a mirrored border).

    ``call``: the module to run instead of ``model`` (its DistributedDataParallel wrapper)."""
    call = model if call is None else call
    if is_patch_classifier(model):
        return call(x)
    spatial = x.shape[2:]
    sizes = [input_size_for(model, int(s)) for s in spatial]
    if any(n != s for (n, _), s in zip(sizes, spatial)):
        x = mirror_pad(x, [(m, n - s - m) for (n, m), s in zip(sizes, spatial)])
        out = call(x)
        return out[(slice(None), slice(None), *[slice(0, int(s)) for s in spatial])]
    return call(x)


def training_memory_format(model: nn.Module, device: torch.device) -> torch.memory_format | None:
    """``torch.channels_last_3d`` for 3D networks trained on the CPU, else None (keep the default).

    oneDNN's blocked 3D convolution kernels run without reordering every activation in NDHWC
    (channels-last) layout. Measured on the demo 3D U-Net (F16, L3, instance norm, 48 x 64 x 64,
    2 threads, Intel Xeon with AMX, 2026-12-05): a bare training step in float32 under
    ``ONEDNN_MAX_CPU_ISA=AVX2`` 0.693 -> 0.637 s, in bfloat16 with AMX 0.166 -> 0.158 s (median of
    3 x 6 steps); a whole ``fit`` step of the default preset (A/B interleaved, 4 x 4 steps) 0.911 ->
    0.875 s under AVX2 and 0.338 -> 0.333 s with AMX. A small gain where float32 runs, none lost
    elsewhere. Only the memory layout changes; the arithmetic is the same up to rounding order.
    """
    if torch.device(device).type != "cpu" or int(getattr(model, "spatial_dims", 3)) != 3 or is_patch_classifier(model):
        return None
    return torch.channels_last_3d


def bf16_conv3d_hazard(model: nn.Module, samples: list[Sample], cfg: TrainConfig) -> bool:
    """True when a 3x3x3 ``Conv3d`` (dilation 1) of ``model`` sees an input of depth 2 on the
    training input size.

    torch 2.13's CPU bfloat16 ``Conv3d`` weight gradient is non-deterministic and can be
    NaN/Inf when the input depth (first spatial axis) is exactly 2 (measured: every depth
    1-12 tested, only 2 fails; dilated convolutions, ``ConvTranspose3d``, ``Conv2d`` and the
    forward pass are unaffected). This happens e.g. in a 3-level 3D U-Net on 16 slices
    (16 -> 8 -> 4 -> 2). :func:`fit` then trains in float32 instead. One float32 forward pass
    on zeros of the training input size finds the depths.
    """
    if int(getattr(model, "spatial_dims", 3)) != 3 or is_patch_classifier(model) or not samples:
        return False
    shape = samples[0].image.shape
    if cfg.patch_size is not None:
        shape = tuple(min(p, n) for p, n in zip(cfg.patch_size, shape))
    depths: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: depths.append(int(inp[0].shape[2])))
             for m in model.modules()
             if isinstance(m, nn.Conv3d) and tuple(m.kernel_size)[0] == 3 and tuple(m.dilation)[0] == 1]
    if not hooks:
        return False
    was_training = model.training
    try:
        with torch.no_grad():
            _forward(model.eval(), torch.zeros((1, 1, *shape), device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return 2 in depths


# ----------------------------------------------------------------------------- validation


def evaluate(model: nn.Module, samples: list[Sample], cfg: TrainConfig, device: torch.device,
             precision: Precision) -> tuple[float, float]:
    """Mean validation loss and mean Dice at 0.5 (argmax for C > 2) over ``samples``.

    Validation runs under the autocast of ``precision`` (float32 when training in float32)."""
    from femurseg.evaluation.metrics import overlap_metrics

    loss_fn = get_loss(cfg.loss)
    losses, dices = [], []
    sd = int(getattr(model, "spatial_dims", 3))
    for s in samples:
        probs = predict_classes([model], s.image, batch_size=1 if sd == 3 else cfg.val_batch_size,
                                device=device, amp=precision.autocast_enabled)
        logp = torch.from_numpy(np.log(np.clip(probs, 1e-7, 1.0)))[None]
        losses.append(float(loss_fn(logp, torch.from_numpy(s.label)[None].long())))
        pred = probs[1] >= 0.5 if probs.shape[0] == 2 else None
        if pred is not None:
            dices.append(overlap_metrics(pred, s.label > 0)["dsc"])
        else:
            am = probs.argmax(0)
            dices.append(float(np.mean([overlap_metrics(am == c, s.label == c)["dsc"] for c in range(1, probs.shape[0])])))
    model.train()
    return float(np.mean(losses)), float(np.mean(dices))


# ----------------------------------------------------------------------------- fit


def fit(
    model: nn.Module,
    train: list[Sample],
    val: list[Sample],
    cfg: TrainConfig,
    aug: AugmentConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    fold: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "",
    dist: Any = None,
) -> FitResult:
    """Train ``model`` in place; returns the history and the best epoch.

    With ``out_dir``, writes ``best.pt`` (the best epoch's weights), ``last.pt`` (the full
    state after each epoch), ``log.csv`` and ``state.json`` there, and resumes from
    ``last.pt`` when it exists (a finished ``last.pt`` returns at once). The model's weights
    must already be initialised (the caller seeds with ``derive_seed(seed, fold, 0)``
    before building it). On return the model holds the **best** epoch's weights.

    ``dist`` (:class:`femurseg.scale.distributed.DDP`, under ``torchrun``): the model is wrapped in
    DistributedDataParallel, each rank trains on its shard of every epoch's batches (effective
    batch = ``batch_size`` x world size), losses and validation are averaged over the ranks, and
    only rank 0 writes to ``out_dir``.
    """
    if not train:
        raise FemursegError("training: no training cases")
    aug = aug or AugmentConfig()
    dev = get_device(device)
    prec = resolve_precision(cfg.precision, dev)
    if prec.name == "bf16" and dev.type == "cpu" and bf16_conv3d_hazard(model, train, cfg):
        warnings.warn("bfloat16 autocast disabled for this model and input size: torch's CPU bfloat16 "
                      "Conv3d weight gradient is wrong for inputs of depth 2 (training in float32)", stacklevel=2)
        prec = prec.fallback("torch's CPU bfloat16 Conv3d weight gradient is wrong at input depth 2")
    prev_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    monitor = cfg.monitor if val else "train_loss"
    stopper = EarlyStopping(cfg.min_epochs, cfg.patience, cfg.min_delta, "max" if monitor == "dice" else "min")
    model.to(dev).train()
    memory_format = training_memory_format(model, dev)
    if memory_format is not None:
        model.to(memory_format=memory_format)
    net = model if dist is None else dist.wrap(model)  # what the training step calls
    writer = dist is None or dist.is_main
    optimizer = make_optimizer(cfg, model.parameters())
    scaler = torch.amp.GradScaler("cuda", enabled=prec.grad_scaling and dev.type == "cuda")
    loss_fn = get_loss(cfg.loss)
    history: list[dict[str, Any]] = []
    start_epoch = 1
    finished = False
    elapsed = 0.0
    if out is not None and (out / "last.pt").exists():
        ck = load_checkpoint(out / "last.pt", map_location=dev)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        stopper.load_state_dict(ck["early_stopping"])
        history = list(ck["history"])
        _set_rng_state(ck["rng"])
        start_epoch = int(ck["epoch"]) + 1
        finished = bool(ck["finished"])
        elapsed = float(ck.get("seconds", 0.0))
        _write_log(out, history)
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    if cfg.deterministic:
        if dev.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every new tensor with NaN (a debugging aid against reads of
        # uninitialised memory): ~800 extra memory passes, ~20 % of a CPU step (profiled); results
        # do not depend on it.
        torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        epoch = start_epoch - 1
        for epoch in range(start_epoch, cfg.max_epochs + 1):
            if finished:
                break
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, epoch)
            es = derive_seed(seed, fold, epoch)
            seed_everything(es)
            rng = np.random.default_rng(es)
            gen = torch.Generator().manual_seed(es)
            items = _epoch_items(train, model, cfg, rng)
            batches = [items[i:i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)] if dist is None \
                else dist.shard(items, cfg.batch_size)
            total = 0.0
            bar = progress_bar(batches, desc=f"{desc}epoch {epoch}", unit="batch", leave=False, disable=not progress,
                               dynamic_ncols=True)
            for n, chunk in enumerate(bar, start=1):
                x, y, frac = _make_batch(train, chunk, model, cfg, rng)
                if not is_patch_classifier(model):
                    x, y = augment(x, y, aug, gen, spacing=train[chunk[0][0]].spacing)
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True).long()
                if memory_format is not None:
                    x = x.contiguous(memory_format=memory_format)
                optimizer.zero_grad(set_to_none=True)
                with prec.autocast():
                    logits = _forward(model, x, net)
                if isinstance(logits, tuple):  # a U-Net with deep supervision, in training mode
                    loss = deep_supervision_loss(loss_fn, logits, y, fractions=frac)
                else:
                    loss = loss_fn(logits, y, fractions=frac)
                if not torch.isfinite(loss):
                    raise FemursegError(f"training diverged at epoch {epoch} (loss {float(loss)}); lower --lr")
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                total += float(loss.detach())
                bar.set_postfix(loss=f"{total / n:.4f}")
            bar.close()
            train_loss = total / max(len(batches), 1)
            val_loss = val_dice = float("nan")
            if dist is not None:
                train_loss, (val_loss, val_dice) = dist.mean(train_loss), dist.evaluate(evaluate, model, val, cfg, dev, prec)
            elif val:
                val_loss, val_dice = evaluate(model, val, cfg, dev, prec)
            value = {"dice": val_dice, "loss": val_loss, "train_loss": train_loss}[monitor]
            improved = stopper.update(epoch, value)
            finished = stopper.should_stop(epoch) or epoch >= cfg.max_epochs
            seconds = time.perf_counter() - t0
            elapsed += seconds
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_dice": val_dice,
                            "lr": optimizer.param_groups[0]["lr"], "best_epoch": stopper.best_epoch,
                            "seconds": round(seconds, 3)})
            if progress and writer:
                progress_write(f"{desc}epoch {epoch}: train loss {train_loss:.4f}"
                           + (f", val loss {val_loss:.4f}, val Dice {val_dice:.4f}" if val else "")
                           + (" *" if improved else "") + (" (stop)" if finished else ""))
            if out is not None and writer:
                if improved:
                    save_checkpoint(out / "best.pt", _model_checkpoint(model, epoch, value, monitor))
                save_checkpoint(out / "last.pt", {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "early_stopping": stopper.state_dict(), "history": history, "rng": _rng_state(),
                    "epoch": epoch, "finished": finished, "seconds": elapsed,
                    "model_config": dict(model.config),
                })
                _write_log(out, history)
                write_json(out / "state.json", {"epoch": epoch, "finished": finished, "best_epoch": stopper.best_epoch,
                                                "best_metric": stopper.best, "monitor": monitor,
                                                "precision": prec.to_dict()})
            elif improved:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if dist is not None:
                dist.barrier()  # rank 0's checkpoints are complete before any rank reads them
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill
        torch.set_num_threads(prev_threads)
    # Leave the best weights in the model.
    if out is not None and (out / "best.pt").exists():
        model.load_state_dict(load_checkpoint(out / "best.pt", map_location=dev)["model"])
    elif out is None and "best_state" in locals():
        model.load_state_dict(best_state)
    model.eval()
    last = history[-1]["epoch"] if history else 0
    return FitResult(stopper.best_epoch, stopper.best, last, last < cfg.max_epochs and finished, history, elapsed,
                     prec.to_dict())


def _model_checkpoint(model: nn.Module, epoch: int, value: float, monitor: str) -> dict[str, Any]:
    return {"model": model.state_dict(), "model_config": dict(model.config), "epoch": epoch,
            "metric": value, "monitor": monitor, "format": "femurseg-model"}


def _write_log(out: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``log.csv`` from the history (atomically: a kill never leaves a torn row)."""
    with atomic_path(out / "log.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(LOG_COLUMNS))
            w.writeheader()
            for row in history:
                w.writerow({k: _fmt(row.get(k)) for k in LOG_COLUMNS})


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v
