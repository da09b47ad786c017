"""U-Net in 2D and 3D, padded or unpadded, with an optional dilated centre layer.

One class, :class:`UNet`, covers every U-Net of paper 001 (Methods, Fig. 6, Tables 1 and 3) and
CNN#2 of paper 002:

- ``unet2d-unpadded`` (001 "2D CNN*", 002 CNN#2; the original U-Net of Ronneberger et al.):
  unpadded 3x3 convs, so the output is the centre region of the input (see :func:`unet_output_size`).
- ``unet2d`` and ``unet3d``: padded convs, output size = input size.
- ``dilations=[1, 2, 4, 8]`` etc.: the "CNN-dilated" variants (001 Fig. 6, Table 3).

Layout for ``features=F``, ``levels=L`` (L = number of poolings), level k = 0..L-1:

    encoder k:  ConvBlock(two 3x3[x3] convs, F*2**k maps) -> skip_k ; 2x2[x2] max pool, stride 2
    centre:     ConvBlock(two convs, F*2**L maps)  or  DilatedCentre (one such block per rate r,
                concatenated: len(r) * F*2**L maps, fed straight to the first up-conv)
    decoder k:  UpConv(-> F*2**k maps) ; concat[crop(skip_k), up] ; ConvBlock(two convs, F*2**k maps)
    head:       1x1[x1] conv -> num_classes logits

Choices not fixed by the papers (documented here once):

- The up-convolution is followed by a ReLU (as in the original U-Net implementation).
- ``dropout`` p (002: "dropout between the 3rd and 4th contracting path layers") is applied to the
  output of the deepest encoder block, i.e. between the last encoder level and the centre layer
  (for L = 3 that is between the 3rd and the 4th contracting layer; the original U-Net also puts
  its dropout at the end of the contracting path). The skip from that level sees the same dropout.
- The dilated centre is always padded (dilated convolutions are padded in 001), also in an
  unpadded net; there the centre then does not shrink the feature maps, which
  :func:`unet_output_size` accounts for.
- Padded nets accept any input size: the input is padded internally (edge replication) up to the
  next multiple of ``2**L`` and the logits are cropped back, so output size = input size always.
- Unpadded nets accept only the sizes of the U-Net size formula; any other size raises
  :class:`~femurseg.models.blocks.ModelConfigError` (a ValueError) naming the nearest valid sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any

import torch
from torch import nn

from femurseg.models.blocks import (
    ConvBlock,
    DilatedCentre,
    ModelConfigError,
    UpConv,
    center_crop,
    check_common,
    check_input,
    check_spatial_dims,
    conv_layer,
    crop_to,
    init_weights,
    max_pool_layer,
    pad_to_multiple,
)

_CONV_BLOCK_SHRINK = 4  # two unpadded 3x3 convs trim 2 voxels per side


def unet_name(spatial_dims: int, padded: bool) -> str:
    """Registry name of a U-Net: 'unet2d', 'unet2d-unpadded', 'unet3d' or 'unet3d-unpadded'."""
    return f"unet{spatial_dims}d" + ("" if padded else "-unpadded")


def _unpadded_output(n: int, levels: int, centre_shrinks: bool) -> int | None:
    """Output size along one axis of an unpadded U-Net for input size ``n``; None if invalid.

    Follows Ronneberger et al. (002's CNN#2): every conv block trims 4, every pooling needs an even
    size and halves it, every up-conv doubles it. Example: L = 4, n = 572 -> 388.
    """
    s = n
    for _ in range(levels):
        s -= _CONV_BLOCK_SHRINK
        if s < 2 or s % 2:
            return None
        s //= 2
    if centre_shrinks:
        s -= _CONV_BLOCK_SHRINK
    if s < 1:
        return None
    for _ in range(levels):
        s = 2 * s - _CONV_BLOCK_SHRINK
        if s < 1:
            return None
    return s


def unet_output_size(n: int, levels: int, *, padded: bool = False, centre_shrinks: bool = True) -> int:
    """Output size along one spatial axis of a U-Net with ``levels`` poolings for input size ``n``.

    Padded: ``n``. Unpadded (``centre_shrinks=False`` for a dilated, hence padded, centre):
    ``out = 2**L * (a_L - c) - 4 * (2**L - 1)`` where ``a_L = (n - 4 * (2**L - 1)) / 2**L`` is the
    centre's input size and ``c`` = 4 (or 0); valid only when every size before a pooling is even
    and all sizes stay >= 1, i.e. ``n % 2**L == (-4) % 2**L`` and ``n`` large enough.
    Raises :class:`ModelConfigError` naming the nearest valid sizes otherwise.
    """
    if padded:
        return n
    out = _unpadded_output(n, levels, centre_shrinks)
    if out is None:
        below = [m for m in range(n - 1, 0, -1) if _unpadded_output(m, levels, centre_shrinks) is not None][:1]
        above = unet_valid_input_size(n, levels, centre_shrinks=centre_shrinks)
        nearest = " or ".join(str(m) for m in [*below, above])
        raise ModelConfigError(
            f"unpadded U-Net with {levels} levels: input size {n} is not valid "
            f"(sizes before each pooling must be even and stay positive); nearest valid sizes: {nearest}"
        )
    return out


def unet_valid_input_size(n: int, levels: int, *, padded: bool = False, centre_shrinks: bool = True) -> int:
    """Smallest valid input size >= ``n`` along one axis (``n`` itself for a padded U-Net)."""
    if padded:
        return n
    m = max(n, 1)
    while _unpadded_output(m, levels, centre_shrinks) is None:
        m += 1
    return m


class UNet(nn.Module):
    """Configurable 2D/3D U-Net returning logits.

    Input ``(B, in_channels, H, W)`` (2D; ``in_channels=3`` consecutive coronal slices, the target
    is the centre slice) or ``(B, in_channels, D, H, W)`` (3D). Output logits
    ``(B, num_classes, *S_out)`` with ``S_out = S`` when padded and ``S_out = output_size(S)``
    when unpadded. Softmax is left to the loss / inference code.

    Attributes used elsewhere: ``spatial_dims``, ``in_channels``, ``num_classes``, ``padded``,
    ``size_divisor`` (= 2**levels), ``config`` (``build_model(model.config)`` rebuilds it).

    ``deep_supervision`` (padded nets only; nnU-Net's ingredient): a 1x1 head on each decoder
    output below full resolution. In training mode ``forward`` then returns the tuple
    ``(logits, aux_1, ..., aux_{L-1})``, ``aux_k`` the logits at 1/2**k of the input size
    (rounded up); in eval mode it returns the full-resolution logits alone, so inference and
    ONNX export see the plain network. :func:`femurseg.training.losses.deep_supervision_loss`
    weighs the outputs.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        *,
        padded: bool = True,
        in_channels: int = 1,
        num_classes: int = 2,
        features: int = 32,
        levels: int = 4,
        dilations: Sequence[int] | None = None,
        norm: str = "none",
        dropout: float = 0.0,
        init: str = "xavier",
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        check_common(norm=norm, init=init, dropout=dropout, in_channels=in_channels,
                     num_classes=num_classes, features=features, levels=levels)
        if dilations is not None:
            if isinstance(dilations, (str, bytes)) or not all(isinstance(r, Integral) for r in dilations):
                raise ModelConfigError(f"model config: dilations={dilations!r} must be a list of integer rates")
            dilations = [int(r) for r in dilations]
            if not dilations or any(r < 1 for r in dilations):
                raise ModelConfigError(f"model config: dilations={dilations!r} must be a non-empty list of rates >= 1")
        if not isinstance(deep_supervision, bool):
            raise ModelConfigError(f"model config: deep_supervision={deep_supervision!r} must be true or false")
        if deep_supervision and not padded:
            raise ModelConfigError("model config: deep_supervision needs a padded U-Net")

        self.spatial_dims = spatial_dims
        self.padded = padded
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.levels = levels
        self.size_divisor = 2**levels
        self.dilations = dilations
        self.config: dict[str, Any] = {
            "name": unet_name(spatial_dims, padded),
            "in_channels": in_channels,
            "num_classes": num_classes,
            "features": features,
            "levels": levels,
            "dilations": dilations,
            "norm": norm,
            "dropout": float(dropout),
            "init": init,
            "deep_supervision": deep_supervision,
        }
        self.deep_supervision = deep_supervision

        widths = [features * 2**k for k in range(levels + 1)]  # F, 2F, ..., F*2**L (centre)
        self.encoders = nn.ModuleList()
        channels = in_channels
        for k in range(levels):
            deepest = k == levels - 1
            block_dropout = dropout if deepest else 0.0
            self.encoders.append(
                ConvBlock(spatial_dims, channels, widths[k], padded=padded, norm=norm, dropout=block_dropout)
            )
            channels = widths[k]
        self.pool = max_pool_layer(spatial_dims)(kernel_size=2, stride=2)

        if dilations is None:
            self.centre: nn.Module = ConvBlock(spatial_dims, channels, widths[levels], padded=padded, norm=norm)
            channels = widths[levels]
        else:
            self.centre = DilatedCentre(spatial_dims, channels, widths[levels], dilations, norm=norm)
            channels = self.centre.out_channels

        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for k in reversed(range(levels)):
            self.ups.append(UpConv(spatial_dims, channels, widths[k], norm=norm))
            self.decoders.append(ConvBlock(spatial_dims, 2 * widths[k], widths[k], padded=padded, norm=norm))
            channels = widths[k]
        self.head = conv_layer(spatial_dims)(channels, num_classes, kernel_size=1)
        # one head per decoder output below full resolution, coarsest first (widths[L-1] .. widths[1])
        self.aux_heads = nn.ModuleList(
            conv_layer(spatial_dims)(widths[k], num_classes, kernel_size=1) for k in reversed(range(1, levels))
        ) if deep_supervision else nn.ModuleList()
        init_weights(self, init)

    # ---- sizes -------------------------------------------------------------------------------
    def output_size(self, input_size: int | Sequence[int]) -> int | tuple[int, ...]:
        """Output size for an input size (an int for one axis, or a tuple of spatial sizes).

        Padded nets: the input size. Unpadded nets: the U-Net formula (:func:`unet_output_size`);
        raises ModelConfigError (a ValueError) with the nearest valid sizes for invalid sizes.
        """
        centre_shrinks = self.dilations is None
        if isinstance(input_size, Integral):
            return unet_output_size(int(input_size), self.levels, padded=self.padded, centre_shrinks=centre_shrinks)
        return tuple(
            unet_output_size(int(n), self.levels, padded=self.padded, centre_shrinks=centre_shrinks)
            for n in input_size
        )

    def valid_input_size(self, n: int) -> int:
        """Smallest valid input size >= ``n`` along one axis (``n`` for padded nets)."""
        return unet_valid_input_size(n, self.levels, padded=self.padded, centre_shrinks=self.dilations is None)

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """``(B, in_channels, *S)`` -> logits ``(B, num_classes, *S_out)`` (with deep supervision in
        training mode: the tuple of the class docstring)."""
        check_input(x, self.spatial_dims, self.in_channels)
        if self.padded:
            x, crop_back = pad_to_multiple(x, self.size_divisor)
        else:
            self.output_size(tuple(x.shape[2:]))  # raises with the nearest valid sizes

        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.centre(x)
        aux: list[torch.Tensor] = []
        supervise = self.deep_supervision and self.training
        for k, (up, decoder, skip) in enumerate(zip(self.ups, self.decoders, reversed(skips), strict=True)):
            x = up(x)
            x = decoder(torch.cat([center_crop(skip, x.shape[2:]), x], dim=1))
            if supervise and k < len(self.aux_heads):
                aux.append(crop_to(self.aux_heads[k](x), _scaled_crop(crop_back, 2 ** (self.levels - 1 - k))))
        x = self.head(x)
        x = crop_to(x, crop_back) if self.padded else x
        return (x, *reversed(aux)) if supervise else x


def _scaled_crop(index: tuple[slice, ...], factor: int) -> tuple[slice, ...]:
    """The crop of :func:`pad_to_multiple` for an output ``factor`` times coarser (sizes rounded up)."""
    out = list(index[:2])
    for sl in index[2:]:
        start = sl.start // factor
        out.append(slice(start, start + -(-(sl.stop - sl.start) // factor)))
    return tuple(out)

