"""Tri-planar (2.5D) patch classifier: paper 004 (Methods, Fig. 1, Table 1) and CNN#1 of paper 002.

For every voxel, an axial, a coronal and a sagittal patch of 32x32 centred on it are stacked as
three channels; a small 2D CNN outputs 2-class logits for the centre voxel.

The papers give: 7 layers, 3x3 convolutions, max pooling, ReLU, dropout (p = 0.5) after each
hidden layer, fully connected layers, Xavier init with bias 0.1. The exact widths are in 004's
Fig. 1, which we do not have as text, so the 7 layers are our reading:

    conv 3x3 (3 -> F) ReLU dropout | maxpool 2 | conv 3x3 (F -> 2F) ReLU dropout | maxpool 2 |
    conv 3x3 (2F -> 4F) ReLU dropout | fc (4F * (P/4)**2 -> 8F) ReLU dropout | fc (8F -> classes)

(padded convs; P = patch size, 32). With F = 32 this has 2,191,170 parameters.

Patch orientation (canonical axes (A, I, L), see docs/conventions.md), centre voxel at index
``size // 2`` of each patch axis:

    channel 0, axial    (fixed row):          patch[i, j] = volume[c0 - s/2 + i, c1, c2 - s/2 + j]
    channel 1, coronal  (fixed coronal slice): patch[i, j] = volume[c0, c1 - s/2 + i, c2 - s/2 + j]
    channel 2, sagittal (fixed column):        patch[i, j] = volume[c0 - s/2 + j, c1 - s/2 + i, c2]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from femurseg.models.blocks import (
    ConvBlock,
    ModelConfigError,
    check_common,
    check_input,
    init_weights,
)


class PatchCNN(nn.Module):
    """7-layer tri-planar patch classifier. Input ``(B, 3, P, P)`` -> logits ``(B, num_classes)``.

    Attributes: ``spatial_dims`` (2: 2D convolutions), ``in_channels``, ``num_classes``,
    ``patch_size`` (P, a multiple of 4), ``config``.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 2,
        features: int = 32,
        patch_size: int = 32,
        norm: str = "none",
        dropout: float = 0.5,
        init: str = "xavier",
    ) -> None:
        super().__init__()
        check_common(norm=norm, init=init, dropout=dropout, in_channels=in_channels,
                     num_classes=num_classes, features=features, patch_size=patch_size)
        if patch_size % 4:
            raise ModelConfigError(f"model config: patch_size={patch_size} must be a multiple of 4")

        self.spatial_dims = 2
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.config: dict[str, Any] = {
            "name": "patchcnn",
            "in_channels": in_channels,
            "num_classes": num_classes,
            "features": features,
            "patch_size": patch_size,
            "norm": norm,
            "dropout": float(dropout),
            "init": init,
        }

        def conv(cin: int, cout: int) -> ConvBlock:
            return ConvBlock(2, cin, cout, num_convs=1, norm=norm, dropout=dropout)

        f = features
        self.features = nn.Sequential(
            conv(in_channels, f), nn.MaxPool2d(2),      # layers 1, 2
            conv(f, 2 * f), nn.MaxPool2d(2),            # layers 3, 4
            conv(2 * f, 4 * f),                         # layer 5
        )
        hidden = 8 * f
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * f * (patch_size // 4) ** 2, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),  # layer 6
            nn.Linear(hidden, num_classes),                                                                # layer 7
        )
        init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, P, P)`` -> logits ``(B, num_classes)`` for the patches' centre voxels."""
        check_input(x, 2, self.in_channels)
        if tuple(x.shape[2:]) != (self.patch_size, self.patch_size):
            raise ModelConfigError(
                f"model input: patchcnn expects {self.patch_size}x{self.patch_size} patches, got shape {tuple(x.shape)}"
            )
        return self.classifier(self.features(x))


def _reflect(index: np.ndarray, n: int) -> np.ndarray:
    """Map indices onto ``range(n)`` by mirror reflection without edge repeat (as ``np.pad(mode='reflect')``)."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    index = np.abs(index) % period
    return np.where(index >= n, period - index, index)


def extract_triplanar_patches(volume: np.ndarray, centres: np.ndarray, size: int = 32) -> np.ndarray:
    """Axial, coronal and sagittal ``size x size`` patches around voxels of a canonical volume.

    ``volume`` ``(D, H, W)`` in canonical order; ``centres`` ``(N, 3)`` integer voxel indices inside it.
    Returns ``(N, 3, size, size)`` (channels axial, coronal, sagittal; orientation in the module
    docstring) with ``volume``'s dtype. Beyond the volume's borders the image is mirrored
    (reflect padding, edge voxel not repeated, as ``np.pad(mode='reflect')``).
    """
    volume = np.asarray(volume)
    centres = np.asarray(centres)
    if volume.ndim != 3:
        raise ValueError(f"extract_triplanar_patches: volume must be (D, H, W), got shape {volume.shape}")
    if centres.ndim != 2 or centres.shape[1] != 3 or not np.issubdtype(centres.dtype, np.integer):
        raise ValueError(
            f"extract_triplanar_patches: centres must be (N, 3) integers, got {centres.dtype} {centres.shape}"
        )
    if size < 1:
        raise ValueError(f"extract_triplanar_patches: size must be >= 1, got {size}")
    if len(centres) and (np.any(centres < 0) or np.any(centres >= np.array(volume.shape))):
        raise ValueError(f"extract_triplanar_patches: centres must lie inside the volume of shape {volume.shape}")

    offsets = np.arange(size) - size // 2  # (size,)
    # Per axis a: reflected indices c_a + offset, shape (N, size); and the fixed centre index, shape (N,).
    span = [_reflect(centres[:, a, None] + offsets, volume.shape[a]) for a in range(3)]
    c0, c1, c2 = (centres[:, a] for a in range(3))
    axial = volume[span[0][:, :, None], c1[:, None, None], span[2][:, None, :]]
    coronal = volume[c0[:, None, None], span[1][:, :, None], span[2][:, None, :]]
    sagittal = volume[span[0][:, None, :], span[1][:, :, None], c2[:, None, None]]
    return np.stack([axial, coronal, sagittal], axis=1)
