"""Tests for femurseg.models: shapes, size formula, parameter counts, receptive field, configs, training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from femurseg.core.errors import FemursegError
from femurseg.models import (
    ModelConfigError,
    UNet,
    available_models,
    build_model,
    count_parameters,
    default_config,
    extract_triplanar_patches,
    model_config,
    models_table,
    unet_output_size,
    unet_valid_input_size,
)

# Small configs of every registered architecture, and an input shape for each (B, C, *S).
SMALL = {
    "unet2d-unpadded": ({"name": "unet2d-unpadded", "features": 4, "levels": 2}, (2, 3, 44, 60)),
    "unet2d": ({"name": "unet2d", "features": 4, "levels": 3}, (2, 3, 30, 41)),
    "unet2d-dilated": ({"name": "unet2d", "features": 4, "levels": 2, "dilations": [1, 2, 4, 8]}, (1, 3, 33, 20)),
    "unet3d": ({"name": "unet3d", "features": 4, "levels": 2}, (1, 1, 8, 18, 13)),
    "unet3d-dilated": ({"name": "unet3d", "features": 4, "levels": 3, "dilations": [1, 2]}, (1, 1, 12, 16, 21)),
    "unet3d-unpadded": ({"name": "unet3d-unpadded", "features": 2, "levels": 1}, (1, 1, 18, 20, 22)),
    "vnet": ({"name": "vnet", "features": 4, "levels": 3}, (2, 1, 9, 16, 20)),
    "patchcnn": ({"name": "patchcnn", "features": 4}, (5, 3, 32, 32)),
}


def expected_output_shape(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    if model.config["name"] == "patchcnn":
        return (shape[0], 2)
    return (shape[0], 2, *model.output_size(shape[2:]))


def test_registry_lists_every_architecture():
    assert set(available_models()) == {"unet2d-unpadded", "unet2d", "unet3d", "unet3d-unpadded", "vnet", "patchcnn"}
    assert all("paper" in text for text in available_models().values())


@pytest.mark.parametrize("key", SMALL)
def test_output_shape_and_attributes(key):
    config, shape = SMALL[key]
    model = build_model(config).eval()
    out = model(torch.randn(shape))
    assert out.shape == expected_output_shape(model, shape)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert model.spatial_dims == len(shape) - 2 or config["name"] == "patchcnn"
    assert model.in_channels == shape[1] and model.num_classes == 2
    if config["name"].startswith(("unet", "vnet")):
        assert model.size_divisor == 2 ** model.config["levels"]


@pytest.mark.parametrize("name", ["unet2d", "unet3d", "vnet"])
def test_padded_nets_accept_any_size(name):
    """Sizes not divisible by 2**L are padded internally and cropped back: output size = input size."""
    spatial = (5, 7, 11) if name != "unet2d" else (7, 11)
    channels = 3 if name == "unet2d" else 1
    for extra in (0, 1, 3):
        size = tuple(s + extra for s in spatial)
        model = build_model({"name": name, "features": 2, "levels": 3}).eval()
        assert model(torch.randn(1, channels, *size)).shape == (1, 2, *size)


def test_unet_size_formula():
    # Original U-Net (Ronneberger et al., Fig. 1): 572 -> 388 with 4 poolings.
    assert unet_output_size(572, 4) == 388
    # Closed form: out = 2**L * (a_L - 4) - 4 * (2**L - 1) with a_L = (n - 4 * (2**L - 1)) / 2**L.
    for levels in (1, 2, 3, 4):
        for n in range(1, 300):
            try:
                out = unet_output_size(n, levels)
            except ValueError:
                continue
            a_l = (n - 4 * (2**levels - 1)) / 2**levels
            assert a_l == int(a_l) and out == 2**levels * (a_l - 4) - 4 * (2**levels - 1) > 0
            assert n % 2**levels == (-4) % 2**levels
    assert unet_valid_input_size(100, 4) == 188 and unet_valid_input_size(188, 4) == 188
    assert unet_output_size(37, 3, padded=True) == 37


def test_unpadded_model_matches_formula_and_rejects_bad_sizes():
    model = build_model({"name": "unet2d-unpadded", "features": 2, "levels": 2}).eval()
    for n in (44, 48, 52, 60):  # valid for L = 2: n % 4 == 0 and n >= 44 (output 4 at 44)
        out = model(torch.randn(1, 3, n, 52))
        assert out.shape[2:] == (unet_output_size(n, 2), unet_output_size(52, 2)) == model.output_size((n, 52))
    assert model.output_size(44) == 4 and model.valid_input_size(45) == 48
    with pytest.raises(ValueError, match="nearest valid sizes: 44 or 48"):
        model(torch.randn(1, 3, 46, 52))
    with pytest.raises(ModelConfigError, match="input size 10 is not valid"):
        model.output_size(10)
    # A dilated centre is padded, so it does not shrink: output grows by 4 * 2**L.
    dilated = build_model({"name": "unet2d-unpadded", "features": 2, "levels": 2, "dilations": [1, 2]}).eval()
    assert dilated.output_size(44) == 4 + 4 * 2**2
    assert dilated(torch.randn(1, 3, 44, 44)).shape[2:] == (20, 20)


def test_parameter_count_by_hand():
    # unet2d, in 3, F = 4, L = 1, 2 classes, no norm (convs have biases). Conv k x k: cin * cout * k**2 + cout.
    enc = (3 * 4 * 9 + 4) + (4 * 4 * 9 + 4)  # 112 + 148: two 3x3 convs 3->4, 4->4
    centre = (4 * 8 * 9 + 8) + (8 * 8 * 9 + 8)  # 296 + 584: two 3x3 convs 4->8, 8->8
    up = 8 * 4 * 2 * 2 + 4  # 132: 2x2 up-conv 8->4
    dec = (8 * 4 * 9 + 4) + (4 * 4 * 9 + 4)  # 292 + 148: concat(4 + 4) -> 4, 4 -> 4
    head = 4 * 2 + 2  # 10: 1x1 conv 4->2
    assert enc + centre + up + dec + head == 1722
    assert count_parameters(build_model({"name": "unet2d", "features": 4, "levels": 1})) == 1722
    # Dilated centre r = 1, 2: two copies of the centre block; the up-conv then reads 2 * 8 = 16 maps.
    dilated = enc + 2 * centre + (16 * 4 * 2 * 2 + 4) + dec + head
    assert dilated == 2730
    assert count_parameters(build_model({"name": "unet2d", "features": 4, "levels": 1, "dilations": [1, 2]})) == 2730
    # Dilation [1] alone is the original centre layer (paper 001 Table 3, r = 1 = "original CNN").
    for name in ("unet2d", "unet3d"):
        plain = count_parameters(build_model({"name": name, "features": 4, "levels": 2}))
        assert count_parameters(build_model({"name": name, "features": 4, "levels": 2, "dilations": [1]})) == plain
    # patchcnn F = 4, 32x32 patches: convs 3->4->8->16 (3x3), fc 16*8*8 -> 32 -> 2.
    patch = (3 * 4 * 9 + 4) + (4 * 8 * 9 + 8) + (8 * 16 * 9 + 16) + (16 * 8 * 8 * 32 + 32) + (32 * 2 + 2)
    assert count_parameters(build_model({"name": "patchcnn", "features": 4})) == patch == 34_442


def _gradient_support(model: nn.Module, size: int) -> tuple[int, int]:
    """Extent (rows, cols) of the nonzero gradient of the centre output pixel w.r.t. the input."""
    with torch.no_grad():
        for p in model.parameters():  # all-positive weights and input: no ReLU is ever inactive
            p.uniform_(0.01, 0.03)
    x = torch.rand(1, model.in_channels, size, size) + 0.5
    x.requires_grad_(True)
    model.eval()(x)[0, 1, size // 2, size // 2].backward()
    rows, cols = torch.nonzero(x.grad[0].abs().sum(0), as_tuple=True)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def test_dilated_centre_grows_receptive_field():
    torch.manual_seed(0)
    base = {"name": "unet2d", "in_channels": 1, "features": 2, "levels": 2, "init": "default"}
    plain = _gradient_support(build_model(base), 160)
    assert plain[0] == plain[1] < 50
    # A pair of 3x3 convs with dilation r at level L (stride 2**L = 4 px) reaches (r - 1) * 4 px
    # further per conv and side than the undilated pair: extent + 2 * 2 * (r_max - 1) * 4.
    for dilations, gain in (([1, 2], 16), ([1, 2, 4, 8], 112)):
        dilated = _gradient_support(build_model({**base, "dilations": dilations}), 160)
        assert dilated == (plain[0] + gain, plain[1] + gain)


@pytest.mark.parametrize("key", SMALL)
def test_config_json_round_trip(key):
    config, shape = SMALL[key]
    config = {**config, "norm": "batch"} if key in ("unet3d", "patchcnn") else config
    torch.manual_seed(1)
    model = build_model(config)
    model.train()(torch.randn(shape))  # move any batch-norm running statistics away from their defaults
    saved = json.loads(json.dumps(model_config(model)))
    assert saved == model.config and saved["name"] == config["name"]
    rebuilt = build_model(saved)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), rebuilt.eval()(x))


def test_config_errors_are_one_line_user_errors():
    with pytest.raises(ModelConfigError, match="unknown model name 'unet4d'; available: unet2d-unpadded"):
        build_model({"name": "unet4d"})
    with pytest.raises(ModelConfigError, match="unknown option.*featurs"):
        build_model({"name": "unet3d", "featurs": 16})
    with pytest.raises(ModelConfigError, match="norm='group'"):
        build_model({"name": "unet3d", "norm": "group"})
    with pytest.raises(ModelConfigError, match="dilations"):
        build_model({"name": "unet3d", "dilations": []})
    with pytest.raises(ModelConfigError, match="levels=0"):
        build_model({"name": "vnet", "levels": 0})
    with pytest.raises(ModelConfigError, match="expected \\(B, C, D, H, W\\) with C=1"):
        build_model({"name": "unet3d", "features": 2, "levels": 1})(torch.zeros(1, 3, 4, 4))
    assert issubclass(ModelConfigError, FemursegError) and issubclass(ModelConfigError, ValueError)
    assert default_config("unet2d")["in_channels"] == 3 and default_config("unet3d")["in_channels"] == 1


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_norm_options(norm):
    model = build_model({"name": "unet3d", "features": 2, "levels": 2, "norm": norm})
    norm_type = nn.BatchNorm3d if norm == "batch" else nn.InstanceNorm3d
    assert any(isinstance(m, norm_type) for m in model.modules())
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv3d) and m.kernel_size == (3, 3, 3))
    assert model(torch.randn(2, 1, 8, 8, 8)).shape == (2, 2, 8, 8, 8)


def test_xavier_init_sets_bias():
    model = build_model({"name": "unet2d", "features": 2, "levels": 1, "init": "xavier"})
    biases = [m.bias for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert biases and all(torch.all(b == 0.1) for b in biases)


def test_dropout_between_deepest_levels():
    model = build_model({"name": "unet2d", "features": 2, "levels": 3, "dropout": 0.5})
    dropouts = [name for name, m in model.named_modules() if isinstance(m, nn.Dropout)]
    assert dropouts == ["encoders.2.6"]  # end of the deepest encoder block, before the centre
    x = torch.randn(1, 3, 16, 16)
    assert not torch.equal(model.train()(x), model(x))
    assert torch.equal(model.eval()(x), model(x))


def _sphere_batch(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright sphere in noise: image (1, 1, *shape) float32, labels (1, *shape) int64."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    centre = torch.tensor([(s - 1) / 2 for s in shape]).view(-1, *[1] * len(shape))
    label = ((grid - centre) ** 2).sum(0) < (min(shape) / 3) ** 2
    image = label.float() + 0.3 * torch.randn(shape, generator=g)
    return image[None, None], label[None].long()


@pytest.mark.parametrize("name", ["unet3d", "unet2d-unpadded", "vnet", "patchcnn"])
def test_a_few_adam_steps_reduce_the_loss(name):
    torch.manual_seed(0)
    model = build_model({"name": name, "features": 4, "dropout": 0.0, **({} if name == "patchcnn" else {"levels": 2})})
    if name in ("unet3d", "vnet"):
        x, y = _sphere_batch((12, 16, 16))
    elif name == "unet2d-unpadded":  # 3 consecutive slices of a sphere volume; target the centre slice, cropped
        volume, labels = _sphere_batch((3, 52, 52))
        x = volume[:, 0]
        out = model.output_size((52, 52))
        margin = (52 - out[0]) // 2
        y = labels[:, 1, margin:margin + out[0], margin:margin + out[1]]
    else:  # tri-planar patches around voxels inside and outside the sphere
        volume, labels = _sphere_batch((24, 24, 24))
        rng = np.random.default_rng(0)
        centres = rng.integers(0, 24, size=(64, 3))
        x = torch.from_numpy(extract_triplanar_patches(volume[0, 0].numpy(), centres))
        y = labels[0][tuple(torch.from_numpy(centres).T)]
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("key", ["unet2d-unpadded", "unet2d-dilated", "unet3d-dilated", "vnet", "patchcnn"])
def test_bfloat16_autocast_on_cpu(key):
    config, shape = SMALL[key]
    model = build_model(config).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() < 0.1 * reference.abs().max() + 0.1


def test_extract_triplanar_patches_matches_reflect_padding():
    rng = np.random.default_rng(0)
    volume = rng.random((5, 7, 9)).astype(np.float32)
    centres = np.array([[0, 0, 0], [4, 6, 8], [2, 3, 4]])
    size = 16  # larger than two axes: needs repeated mirroring
    patches = extract_triplanar_patches(volume, centres, size=size)
    assert patches.shape == (3, 3, size, size) and patches.dtype == np.float32
    h = size // 2
    padded = np.pad(volume, h, mode="reflect")
    for patch, (a, b, c) in zip(patches, centres + h, strict=True):
        assert np.array_equal(patch[0], padded[a - h:a + h, b, c - h:c + h])  # axial: (A, L)
        assert np.array_equal(patch[1], padded[a, b - h:b + h, c - h:c + h])  # coronal: (I, L)
        assert np.array_equal(patch[2], padded[a - h:a + h, b - h:b + h, c].T)  # sagittal: (I, A)
        assert patch[0, h, h] == patch[1, h, h] == patch[2, h, h] == padded[a, b, c]
    with pytest.raises(ValueError, match="inside the volume"):
        extract_triplanar_patches(volume, np.array([[5, 0, 0]]))


def test_models_table():
    rows = models_table(features=16, levels=3)
    names = [row["name"] for row in rows]
    assert names == ["unet2d-unpadded", "unet2d", "unet2d", "unet3d", "unet3d", "unet3d-unpadded", "vnet", "patchcnn"]
    unet3d_dilated = rows[4]
    assert unet3d_dilated["options"] == "features=16, levels=3, dilations=1,2,4,8"
    assert unet3d_dilated["parameters"] == count_parameters(build_model(unet3d_dilated["config"]))
    assert all(row["paper"] and row["parameters"] > 0 for row in rows)
    assert models_table()[-1]["options"] == "features=32, patch_size=32"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("key", SMALL)
def test_cuda_forward_and_backward(key):
    config, shape = SMALL[key]
    model = build_model(config).cuda()
    x = torch.randn(shape, device="cuda")
    out = model(x)
    assert out.shape == expected_output_shape(model, shape)
    out.float().mean().backward()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.isfinite(model.eval()(x)).all()
    cpu = build_model(config).eval()
    cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(model(x).cpu(), cpu(x.cpu()), rtol=1e-2, atol=1e-2)


def test_unet_class_direct_use():
    model = UNet(3, padded=True, features=2, levels=1)
    assert model.config["name"] == "unet3d" and build_model(model.config).config == model.config


def test_deep_supervision_outputs_and_eval_mode():
    m = build_model({"name": "unet3d", "features": 4, "levels": 3, "dilations": [1, 2], "deep_supervision": True})
    x = torch.randn(1, 1, 21, 30, 34)  # padded to 24 x 32 x 40 inside
    outs = m.train()(x)
    assert isinstance(outs, tuple) and len(outs) == 3
    assert [tuple(o.shape[2:]) for o in outs] == [(21, 30, 34), (11, 15, 17), (6, 8, 9)]
    plain = m.eval()(x)
    assert isinstance(plain, torch.Tensor) and plain.shape == (1, 2, 21, 30, 34)
    torch.testing.assert_close(plain, outs[0].detach(), rtol=1e-4, atol=1e-4)  # same weights, same main head
    rebuilt = build_model(m.config)
    rebuilt.load_state_dict(m.state_dict())  # the auxiliary heads are part of the checkpoint
    assert m.config["deep_supervision"] is True
    # without deep supervision the state dict has no auxiliary heads (old checkpoints load)
    assert not any("aux_heads" in k for k in build_model({"name": "unet3d", "features": 4, "levels": 3}).state_dict())


def test_deep_supervision_needs_a_padded_unet():
    with pytest.raises(ModelConfigError, match="padded"):
        build_model({"name": "unet3d-unpadded", "features": 2, "levels": 1, "deep_supervision": True})
    with pytest.raises(ModelConfigError, match="deep_supervision"):
        build_model({"name": "unet3d", "features": 2, "levels": 1, "deep_supervision": "yes"})
