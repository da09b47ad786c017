"""3D V-Net for the CT cascade (paper 003, section 2.3 and Fig. 2; after Milletari et al. 2016).

Paper 003 gives: a symmetric 3D encoder-decoder, 3x3x3 kernels, every convolution followed by
batch norm and ReLU, softmax output of the input's size, about 8.6 M parameters. The stage
layout is taken from the V-Net paper (its Fig. 2 is not available to us as text):

    stage k = 0..L, c_k = F * 2**k channels, n_k = min(k + 1, 3) convs (1, 2, 3, 3, 3 for L = 4)
    encoder stage 0:  n_0 convs (in -> F) + residual (input broadcast to F channels when it has
                      one channel, else a 1x1x1 projection)
    encoder stage k:  down = 2x2x2 conv, stride 2 (c_{k-1} -> c_k, norm, ReLU);
                      out = n_k convs (c_k -> c_k) of down + down          (residual add)
    decoder stage k:  up = 2x2x2 transposed conv, stride 2 (c_{k+1} -> c_k, norm, ReLU);
                      out = n_k convs of concat[skip_k, up] (2 c_k -> c_k) + up
    head:             1x1x1 conv -> num_classes logits

With F = 16, L = 4 this has 10,033,586 parameters (003 reports ~8.6 M for its own variant).
Inputs of any size are padded internally (edge replication) to a multiple of 2**L and the
logits cropped back, as in the padded U-Nets. Optional dropout acts on the output of the
deepest encoder stage before the last down-convolution.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from femurseg.models.blocks import (
    ConvBlock,
    UpConv,
    check_common,
    check_input,
    crop_to,
    init_weights,
    norm_layer,
    pad_to_multiple,
)


class DownConv(nn.Sequential):
    """Strided down-convolution: 2x2x2 conv, stride 2 -> norm -> ReLU. ``(B, Cin, *S)`` -> ``(B, Cout, *S/2)``."""

    def __init__(self, in_channels: int, out_channels: int, *, norm: str) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size=2, stride=2, bias=norm == "none"),
            norm_layer(norm, 3, out_channels),
            nn.ReLU(inplace=True),
        )


class VNet(nn.Module):
    """V-Net returning logits. Input ``(B, in_channels, D, H, W)`` -> ``(B, num_classes, D, H, W)``.

    Attributes: ``spatial_dims`` (3), ``in_channels``, ``num_classes``, ``size_divisor`` (2**levels),
    ``config`` (``build_model(model.config)`` rebuilds it).
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 2,
        features: int = 16,
        levels: int = 4,
        norm: str = "batch",
        dropout: float = 0.0,
        init: str = "xavier",
    ) -> None:
        super().__init__()
        check_common(norm=norm, init=init, dropout=dropout, in_channels=in_channels,
                     num_classes=num_classes, features=features, levels=levels)

        self.spatial_dims = 3
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.levels = levels
        self.size_divisor = 2**levels
        self.config: dict[str, Any] = {
            "name": "vnet",
            "in_channels": in_channels,
            "num_classes": num_classes,
            "features": features,
            "levels": levels,
            "norm": norm,
            "dropout": float(dropout),
            "init": init,
        }

        widths = [features * 2**k for k in range(levels + 1)]
        n_convs = [min(k + 1, 3) for k in range(levels + 1)]

        def stage(k: int, cin: int, dropout: float = 0.0) -> ConvBlock:
            return ConvBlock(3, cin, widths[k], num_convs=n_convs[k], norm=norm, dropout=dropout)

        self.input_stage = stage(0, in_channels, dropout if levels == 1 else 0.0)
        self.input_projection = (
            nn.Conv3d(in_channels, features, kernel_size=1) if in_channels != 1 else None
        )
        self.downs = nn.ModuleList(DownConv(widths[k - 1], widths[k], norm=norm) for k in range(1, levels + 1))
        self.encoders = nn.ModuleList(
            stage(k, widths[k], dropout if k == levels - 1 else 0.0) for k in range(1, levels + 1)
        )
        self.ups = nn.ModuleList(UpConv(3, widths[k + 1], widths[k], norm=norm) for k in reversed(range(levels)))
        self.decoders = nn.ModuleList(stage(k, 2 * widths[k]) for k in reversed(range(levels)))
        self.head = nn.Conv3d(features, num_classes, kernel_size=1)
        init_weights(self, init)

    def output_size(self, input_size: int | tuple[int, ...]) -> int | tuple[int, ...]:
        """Output size = input size (any size is accepted)."""
        return input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, D, H, W)`` -> logits ``(B, num_classes, D, H, W)``."""
        check_input(x, 3, self.in_channels)
        x, crop_back = pad_to_multiple(x, self.size_divisor)
        residual = x if self.input_projection is None else self.input_projection(x)
        x = self.input_stage(x) + residual  # a one-channel residual broadcasts over the F channels
        skips = []
        for down, encoder in zip(self.downs, self.encoders, strict=True):
            skips.append(x)
            x = down(x)
            x = encoder(x) + x
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            x = up(x)
            x = decoder(torch.cat([skip, x], dim=1)) + x
        return crop_to(self.head(x), crop_back)
