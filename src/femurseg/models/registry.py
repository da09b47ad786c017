"""Model registry: build any network from a JSON-able config dict, and describe them all.

A config is ``{"name": <registry name>, <option>: <value>, ...}``; options left out take the
defaults of :func:`default_config`. Every model keeps its complete config in ``model.config``
and ``build_model(model.config)`` rebuilds the same architecture (same state_dict keys/shapes).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from femurseg.models.blocks import ModelConfigError, count_parameters
from femurseg.models.patchcnn import PatchCNN
from femurseg.models.unet import UNet
from femurseg.models.vnet import VNet

_UNET_OPTIONS = ("in_channels", "num_classes", "features", "levels", "dilations", "norm", "dropout", "init", "deep_supervision")


def _unet_defaults(in_channels: int) -> dict[str, Any]:
    return {"in_channels": in_channels, "num_classes": 2, "features": 32, "levels": 4,
            "dilations": None, "norm": "none", "dropout": 0.0, "init": "xavier",
            "deep_supervision": False}


class _Entry(NamedTuple):
    builder: Callable[..., nn.Module]  # takes the options as keyword arguments
    defaults: dict[str, Any]           # every option with its default value
    summary: str                       # what the architecture is
    paper: str                         # the paper section it follows


_REGISTRY: dict[str, _Entry] = {
    "unet2d-unpadded": _Entry(
        lambda **kw: UNet(2, padded=False, **kw),
        _unet_defaults(3),
        "2D U-Net, unpadded 3x3 convs, output = centre region of the input (original U-Net)",
        "001 Methods, '2D CNN*' of Tables 1-2; 002 CNN#2",
    ),
    "unet2d": _Entry(
        lambda **kw: UNet(2, padded=True, **kw),
        _unet_defaults(3),
        "2D U-Net, padded 3x3 convs, output = input size",
        "001 Methods, '2D CNN' of Tables 1-3",
    ),
    "unet3d": _Entry(
        lambda **kw: UNet(3, padded=True, **kw),
        _unet_defaults(1),
        "3D U-Net, padded 3x3x3 convs, output = input size",
        "001 Methods and Fig. 6, '3D CNN' of Tables 1, 3",
    ),
    "unet3d-unpadded": _Entry(
        lambda **kw: UNet(3, padded=False, **kw),
        _unet_defaults(1),
        "3D U-Net, unpadded 3x3x3 convs (Cicek et al.); not evaluated in the papers",
        "001 ref. 42 (contrast to 001's padded 3D CNN)",
    ),
    "vnet": _Entry(
        lambda **kw: VNet(**kw),
        {"in_channels": 1, "num_classes": 2, "features": 16, "levels": 4, "norm": "batch", "dropout": 0.0,
         "init": "xavier"},
        "3D V-Net: residual stages, batch norm + ReLU, strided-conv down, transposed-conv up (CT cascade)",
        "003 section 2.3, Fig. 2",
    ),
    "patchcnn": _Entry(
        lambda **kw: PatchCNN(**kw),
        {"in_channels": 3, "num_classes": 2, "features": 32, "patch_size": 32, "norm": "none", "dropout": 0.5,
         "init": "xavier"},
        "7-layer classifier of 32x32 tri-planar (2.5D) patches; logits for the centre voxel",
        "004 Methods, Fig. 1; 002 CNN#1",
    ),
}


def available_models() -> dict[str, str]:
    """Registry names -> one-line description ending with the paper section it follows."""
    return {name: f"{entry.summary} [paper {entry.paper}]" for name, entry in _REGISTRY.items()}


def default_config(name: str) -> dict[str, Any]:
    """The complete config (all options with their defaults) of model ``name``."""
    if name not in _REGISTRY:
        raise ModelConfigError(f"model config: unknown model name {name!r}; available: {', '.join(_REGISTRY)}")
    return {"name": name, **copy.deepcopy(_REGISTRY[name].defaults)}


def build_model(config: dict[str, Any]) -> nn.Module:
    """Build a freshly initialised model from ``config`` (``{"name": ..., options...}``).

    Options not given take :func:`default_config`'s values. Unknown names, unknown options
    and bad values raise :class:`~femurseg.models.blocks.ModelConfigError` (a FemursegError and
    a ValueError) in one line.
    """
    if not isinstance(config, dict) or "name" not in config:
        raise ModelConfigError(f"model config: expected a dict with a 'name' key, got {config!r}")
    full = default_config(config["name"])
    unknown = sorted(set(config) - set(full))
    if unknown:
        raise ModelConfigError(
            f"model config: unknown option(s) {', '.join(unknown)} for {config['name']!r}; "
            f"allowed: {', '.join(k for k in full if k != 'name')}"
        )
    full.update(copy.deepcopy(config))
    builder = _REGISTRY[full.pop("name")].builder
    return builder(**full)


def model_config(model: nn.Module) -> dict[str, Any]:
    """A copy of ``model.config``: JSON-able, and ``build_model(model_config(m))`` rebuilds ``m``."""
    if not hasattr(model, "config"):
        raise ValueError(f"{type(model).__name__} has no .config; build models with femurseg.models.build_model")
    return copy.deepcopy(model.config)


def models_table(
    features: int | None = None, levels: int | None = None, dilations: list[int] | None = None
) -> list[dict[str, Any]]:
    """One row per architecture for ``femurseg models``, with parameter counts.

    ``features`` / ``levels`` override every model's default (None: each model's own default;
    ``levels`` does not apply to ``patchcnn``). ``unet2d`` and ``unet3d`` get a second row with
    the dilated centre (``dilations``, default [1, 2, 4, 8]), as evaluated in paper 001.
    Rows: ``{"name", "options", "parameters", "summary", "paper", "config"}``; ``config`` rebuilds
    the row's model. Models are built on the 'meta' device, so no weights are allocated.
    """
    dilations = [1, 2, 4, 8] if dilations is None else list(dilations)
    rows = []
    for name, entry in _REGISTRY.items():
        variants: list[dict[str, Any]] = [{}]
        if name in ("unet2d", "unet3d"):
            variants.append({"dilations": dilations})
        for extra in variants:
            config: dict[str, Any] = {"name": name, **extra}
            if features is not None:
                config["features"] = features
            if levels is not None and "levels" in entry.defaults:
                config["levels"] = levels
            with torch.device("meta"):
                model = build_model(config)
            shown = ("features", "levels", "dilations", "patch_size")
            options = ", ".join(
                f"{key}={_fmt(value)}" for key, value in model.config.items() if key in shown and value is not None
            )
            rows.append({
                "name": name,
                "options": options,
                "parameters": count_parameters(model),
                "summary": entry.summary,
                "paper": entry.paper,
                "config": model_config(model),
            })
    return rows


def _fmt(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)
