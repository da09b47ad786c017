"""Segmentation networks of femurseg.

Build models from JSON-able configs through the registry::

    from femurseg.models import build_model
    model = build_model({"name": "unet3d", "features": 32, "levels": 4, "dilations": [1, 2, 4, 8]})
    logits = model(x)  # (B, 1, D, H, W) -> (B, 2, D, H, W); softmax is applied by loss / inference
    build_model(model.config)  # same architecture

Names: 'unet2d-unpadded', 'unet2d', 'unet3d', 'unet3d-unpadded', 'vnet', 'patchcnn'
(see :func:`available_models`). Every model has ``spatial_dims``, ``in_channels``,
``num_classes`` and ``config``; the U-Nets and the V-Net also ``size_divisor`` and ``output_size``.
"""

from femurseg.models.blocks import ModelConfigError, count_parameters
from femurseg.models.patchcnn import PatchCNN, extract_triplanar_patches
from femurseg.models.registry import (
    available_models,
    build_model,
    default_config,
    model_config,
    models_table,
)
from femurseg.models.unet import UNet, unet_output_size, unet_valid_input_size
from femurseg.models.vnet import VNet

__all__ = [
    "ModelConfigError",
    "PatchCNN",
    "UNet",
    "VNet",
    "available_models",
    "build_model",
    "count_parameters",
    "default_config",
    "extract_triplanar_patches",
    "model_config",
    "models_table",
    "unet_output_size",
    "unet_valid_input_size",
]
