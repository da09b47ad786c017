"""Training-time data augmentation on torch tensors (one batch at a time, on any device).

* **Horizontal flip** (paper 001/002: left and right hips): mirror the column axis
  (patient right <-> left, the last axis) with probability ``flip_p``.
* Optional, from the CT paper (003) and common practice: additive **Gaussian noise**
  (``noise_std``, in normalised intensity units), a **brightness shift** (uniform in
  ``+-brightness``), **3D scaling** (isotropic zoom by a factor uniform in
  ``1 +- scale`` about the volume centre) and small **in-plane rotations** (uniform in
  ``+-rotate_deg`` degrees about the anterior axis, i.e. within each coronal slice).

Images are ``(B, C, D, H, W)`` (3D) or ``(B, C, H, W)`` (2D stacks of 3 coronal slices);
labels ``(B, D, H, W)`` / ``(B, H, W)`` integer tensors. Spatial transforms resample the image
bilinearly (edge values outside) and the label with nearest neighbour, in one
``grid_sample`` per batch. Every random draw comes from the ``torch.Generator`` passed in,
so a run is reproducible from its seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from femurseg.core.errors import FemursegError


@dataclass
class AugmentConfig:
    """Augmentations applied to every training batch (all off except the flip by default)."""

    flip_p: float = 0.5
    noise_std: float = 0.0
    brightness: float = 0.0
    scale: float = 0.0
    rotate_deg: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.flip_p <= 1:
            raise FemursegError(f"augmentation: flip_p={self.flip_p} must be in [0, 1]")
        for name in ("noise_std", "brightness", "scale", "rotate_deg"):
            if getattr(self, name) < 0:
                raise FemursegError(f"augmentation: {name}={getattr(self, name)} must be >= 0")
        if self.scale >= 1:
            raise FemursegError(f"augmentation: scale={self.scale} must be < 1 (factor 1 +- scale)")

    @property
    def spatial(self) -> bool:
        return self.scale > 0 or self.rotate_deg > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> AugmentConfig:
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise FemursegError(f"augmentation: unknown option(s) {', '.join(unknown)}")
        return cls(**d)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def augment(image: torch.Tensor, label: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``cfg`` to a batch; returns new ``(image, label)`` tensors of the same shapes.

    ``gen`` is a CPU ``torch.Generator``; the draws do not depend on the device of the batch.
    """
    b = image.shape[0]
    spatial_dims = image.ndim - 2
    if label.ndim != image.ndim - 1 or label.shape[0] != b or label.shape[1:] != image.shape[2:]:
        raise ValueError(f"augment: label shape {tuple(label.shape)} does not match image {tuple(image.shape)}")
    # Draw everything first (fixed order and count) so the stream does not depend on the options' values.
    flip = torch.rand(b, generator=gen) < cfg.flip_p
    shift = _uniform(b, -cfg.brightness, cfg.brightness, gen)
    factor = _uniform(b, 1 - cfg.scale, 1 + cfg.scale, gen)
    angle = _uniform(b, -cfg.rotate_deg, cfg.rotate_deg, gen) * math.pi / 180
    noise_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))

    if flip.any():
        idx = flip.nonzero().flatten().to(image.device)
        image = image.clone()
        label = label.clone()
        image[idx] = image[idx].flip(-1)
        label[idx] = label[idx].flip(-1)
    if cfg.spatial:
        image, label = _spatial(image, label, factor, angle, spatial_dims)
    if cfg.brightness > 0:
        image = image + shift.to(image.device, image.dtype).view(b, *([1] * (image.ndim - 1)))
    if cfg.noise_std > 0:
        g = torch.Generator(device="cpu").manual_seed(noise_seed)
        noise = torch.randn(image.shape, generator=g, dtype=torch.float32) * cfg.noise_std
        image = image + noise.to(image.device, image.dtype)
    return image, label


def _spatial(image: torch.Tensor, label: torch.Tensor, factor: torch.Tensor, angle: torch.Tensor,
             spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoom by ``factor`` and rotate rows/cols by ``angle`` (radians) about the centre."""
    b = image.shape[0]
    h, w = image.shape[-2:]
    # Normalised grid coordinates run over [-1, 1] on each axis; with square in-plane pixels a
    # rigid rotation in pixel units is S^-1 R S in normalised units, S = diag(w, h) / 2.
    cos, sin = torch.cos(angle), torch.sin(angle)
    inv = 1.0 / factor  # output -> input mapping of a zoom by `factor`
    theta = torch.zeros(b, spatial_dims, spatial_dims + 1, dtype=torch.float64)
    # (x, y) = (col, row) block
    theta[:, 0, 0] = cos * inv
    theta[:, 0, 1] = -sin * inv * h / w
    theta[:, 1, 0] = sin * inv * w / h
    theta[:, 1, 1] = cos * inv
    if spatial_dims == 3:
        theta[:, 2, 2] = inv  # z = coronal axis: zoom only
    theta = theta.to(device=image.device, dtype=torch.float32)
    size = list(image.shape)
    grid = F.affine_grid(theta, size, align_corners=False)
    img = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="border", align_corners=False).to(image.dtype)
    lab = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return img, lab[:, 0].round().to(label.dtype)
