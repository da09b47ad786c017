"""The small set of building blocks shared by every network in :mod:`femurseg.models`.

Shapes follow the conventions (``docs/conventions.md``): 2D tensors are ``(B, C, H, W)``,
3D tensors are ``(B, C, D, H, W)`` with D = coronal slices, H = rows, W = columns.
``spatial_dims`` (2 or 3) picks the 2D or the 3D version of every layer.

Blocks
------
- :class:`ConvBlock`: ``num_convs`` x (3x3[x3] conv -> optional norm -> ReLU), then optional dropout.
  Padded (output size = input size) or unpadded (each conv trims 1 voxel per side).
- :class:`DilatedCentre`: parallel ConvBlocks with different dilation rates, concatenated
  (the "CNN-dilated" centre layer of paper 001, Fig. 6).
- :class:`UpConv`: 2x2[x2] transposed convolution with stride 2 (the U-Net "up-convolution"),
  then optional norm and ReLU.
- :func:`center_crop`: crop-and-copy helper for the skip connections of unpadded nets.
- :func:`pad_to_multiple` / :func:`crop_to`: let padded nets accept any input size.
- :func:`init_weights`: 'xavier' (Glorot uniform weights, bias 0.1; paper 001 Table 5) or 'default'.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from femurseg.core.errors import FemursegError

NORMS = ("none", "batch", "instance")
INITS = ("xavier", "default")
XAVIER_BIAS = 0.1  # paper 001, Table 5: "Bias 0.10"


class ModelConfigError(FemursegError, ValueError):
    """A bad model configuration or input size (one line; also a ValueError)."""


def check_choice(what: str, value: object, choices: Sequence[object]) -> None:
    """Raise :class:`ModelConfigError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ModelConfigError(f"model config: {what}={value!r} is not one of {', '.join(map(str, choices))}")


def check_spatial_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ModelConfigError(f"model config: spatial_dims={spatial_dims!r} must be 2 or 3")


def check_positive_int(what: str, value: object) -> None:
    """Raise :class:`ModelConfigError` unless ``value`` is an int >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelConfigError(f"model config: {what}={value!r} must be a positive integer")


def check_dropout(value: object) -> None:
    """Raise :class:`ModelConfigError` unless ``value`` is a probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ModelConfigError(f"model config: dropout={value!r} must be a number in [0, 1)")


def check_common(*, norm: str, init: str, dropout: object, **positive_ints: object) -> None:
    """The checks every network's constructor makes: ``norm`` in :data:`NORMS`, ``init`` in
    :data:`INITS`, ``dropout`` in [0, 1), and each keyword in ``positive_ints`` an int >= 1."""
    check_choice("norm", norm, NORMS)
    check_choice("init", init, INITS)
    for what, value in positive_ints.items():
        check_positive_int(what, value)
    check_dropout(dropout)


def check_input(x: torch.Tensor, spatial_dims: int, in_channels: int) -> None:
    """Raise :class:`ModelConfigError` unless ``x`` is ``(B, in_channels, *S)`` with len(S) = spatial_dims."""
    if x.dim() != spatial_dims + 2 or x.shape[1] != in_channels:
        expected = "(B, C, H, W)" if spatial_dims == 2 else "(B, C, D, H, W)"
        raise ModelConfigError(f"model input: expected {expected} with C={in_channels}, got shape {tuple(x.shape)}")


def conv_layer(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def conv_transpose_layer(spatial_dims: int) -> type[nn.Module]:
    """``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``."""
    return nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d


def max_pool_layer(spatial_dims: int) -> type[nn.Module]:
    """``nn.MaxPool2d`` or ``nn.MaxPool3d``."""
    return nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d


def norm_layer(norm: str, spatial_dims: int, channels: int) -> nn.Module:
    """Normalisation after a convolution: 'none' (identity), 'batch' or 'instance' (affine)."""
    check_choice("norm", norm, NORMS)
    if norm == "batch":
        return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels)
    if norm == "instance":
        return (nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """``num_convs`` x (conv 3x3[x3] -> norm -> ReLU), then ``Dropout(dropout)`` if ``dropout > 0``.

    Input ``(B, in_channels, *S)``; output ``(B, out_channels, *S')`` where ``S' = S`` when
    ``padded`` and ``S' = S - 2 * num_convs * dilation`` when unpadded.
    The convolutions have a bias only when ``norm == 'none'`` (a bias before a norm is redundant).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        num_convs: int = 2,
        padded: bool = True,
        dilation: int = 1,
        norm: str = "none",
        dropout: float = 0.0,
    ) -> None:
        layers: list[nn.Module] = []
        conv = conv_layer(spatial_dims)
        for i in range(num_convs):
            layers.append(
                conv(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    kernel_size=3,
                    padding=dilation if padded else 0,
                    dilation=dilation,
                    bias=norm == "none",
                )
            )
            layers.append(norm_layer(norm, spatial_dims, out_channels))
            layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)
        self.shrink = 0 if padded else 2 * num_convs * dilation  # voxels lost per spatial axis


class DilatedCentre(nn.Module):
    """Centre layer of the "CNN-dilated" U-Net (paper 001, Methods and Fig. 6; Table 3).

    One padded :class:`ConvBlock` (two 3x3[x3] convs, ``out_channels`` maps each) per dilation
    rate r, all applied to the same input and concatenated along the channel axis.
    Input ``(B, in_channels, *S)``; output ``(B, len(dilations) * out_channels, *S)``.

    Each branch is the plain centre layer with its convolutions dilated, so ``dilations=[1]``
    is exactly the original centre layer (Table 3 lists r = 1 as "the original CNN").
    No 1x1 fusion convolution follows (none is described in the paper): the concatenation
    feeds the first up-convolution directly.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        dilations: Sequence[int],
        *,
        norm: str = "none",
    ) -> None:
        super().__init__()
        self.dilations = [int(r) for r in dilations]
        self.branches = nn.ModuleList(
            ConvBlock(spatial_dims, in_channels, out_channels, padded=True, dilation=r, norm=norm)
            for r in self.dilations
        )
        self.out_channels = len(self.dilations) * out_channels
        self.shrink = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class UpConv(nn.Sequential):
    """Up-convolution: transposed conv, kernel 2, stride 2 -> norm -> ReLU.

    Input ``(B, in_channels, *S)``; output ``(B, out_channels, *(2 * S))``. In the U-Nets
    ``out_channels = in_channels / 2`` ("an up-convolution that halves the number of feature maps").
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, *, norm: str = "none") -> None:
        super().__init__(
            conv_transpose_layer(spatial_dims)(in_channels, out_channels, kernel_size=2, stride=2, bias=norm == "none"),
            norm_layer(norm, spatial_dims, out_channels),
            nn.ReLU(inplace=True),
        )


def center_crop(x: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Crop the centre ``spatial_shape`` out of ``x`` of shape ``(B, C, *S)`` (crop-and-copy skips).

    When ``S - spatial_shape`` is odd the extra voxel is dropped at the end.
    """
    slices = [slice(None), slice(None)]
    for have, want in zip(x.shape[2:], spatial_shape, strict=True):
        if want > have:
            raise ValueError(f"center_crop: cannot crop size {have} to larger size {want}")
        start = (have - want) // 2
        slices.append(slice(start, start + want))
    return x[tuple(slices)]


def pad_to_multiple(x: torch.Tensor, divisor: int, mode: str = "replicate") -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the spatial axes of ``x`` ``(B, C, *S)`` up to the next multiple of ``divisor``.

    The padding is split evenly between both sides (the extra voxel goes at the end) and uses
    ``mode`` ('replicate' repeats the edge voxels; 'constant' pads zeros).
    Returns the padded tensor and the index that crops an output of the padded size back to ``S``
    (use with :func:`crop_to`). No copy is made when ``S`` is already a multiple.
    """
    pads: list[int] = []  # F.pad order: last axis first, (before, after) per axis
    crop: list[slice] = []
    for size in x.shape[2:]:
        extra = -size % divisor
        before = extra // 2
        pads[:0] = [before, extra - before]
        crop.append(slice(before, before + size))
    index = (slice(None), slice(None), *crop)
    if any(pads):
        x = F.pad(x, pads, mode=mode)
    return x, index


def crop_to(x: torch.Tensor, index: tuple[slice, ...]) -> torch.Tensor:
    """Apply an index returned by :func:`pad_to_multiple` (``(B, C, *S_padded)`` -> ``(B, C, *S)``)."""
    return x[index]


def init_weights(module: nn.Module, init: str) -> None:
    """Initialise every conv / transposed conv / linear layer of ``module`` in place.

    'xavier': Xavier/Glorot uniform weights and bias 0.1 (paper 001 Table 5, paper 004 Table 1).
    'default': keep PyTorch's default (Kaiming-uniform) initialisation.
    Normalisation layers keep weight 1, bias 0.
    """
    check_choice("init", init, INITS)
    if init == "default":
        return
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, XAVIER_BIAS)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (works on 'meta' tensors too)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
