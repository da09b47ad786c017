"""Inference core: probability maps from one model or an ensemble of fold models.

:func:`predict_prob` takes a **preprocessed** canonical volume (see
:mod:`femurseg.data.preprocess`) and returns the femur probability on the same grid; map it
back to the original grid with :func:`femurseg.data.preprocess.restore`.

How each kind of network sees the volume (all tensors follow ``docs/conventions.md``):

* **3D networks** (``spatial_dims == 3``): the whole volume in one pass (padded U-Nets and the
  V-Net pad to their ``size_divisor`` internally), or with ``patch_size`` a sliding window
  whose tiles overlap by ``overlap`` and are blended with a Gaussian importance map
  (sigma = 1/8 of the tile, as nnU-Net and MONAI do), so tile borders carry little weight.
* **2D networks** (``spatial_dims == 2``, ``in_channels`` = 3): every coronal slice with its two
  neighbours as channels (edge slices repeat the first/last slice), predicting the centre
  slice; slices go through the network in batches of ``batch_size``.
* **Unpadded networks** (output smaller than input, ``model.output_size``): the input is
  mirrored (reflect) at the borders by the network's margin so the output covers the whole
  slice/volume (paper 001/002: "we extrapolate the missing content by mirroring the input
  image"). With ``patch_size`` the mirrored image is cut into overlapping tiles whose
  outputs are averaged with equal weights, as in the paper (9 or 49 patches); without it
  one tile covers the whole slice.
* The **patch CNN** (``patchcnn``, logits per voxel from tri-planar patches) classifies every
  voxel from its patches, ``batch_size * 1024`` voxels at a time (slow; the papers' baseline).

Mixed precision (``amp``): ``None`` (default) uses float16 autocast on CUDA and float32 on
CPU; ``amp=True`` uses bfloat16 autocast on CPU. Measured on the 16 out-of-fold phantom
volumes (3D U-Net F16 L3, 48 x 64 x 64, AMD EPYC with AVX512-BF16): bf16 masks agree with
float32 masks at Dice 0.9995-0.99996 (max |p32 - p16| 0.018) and the Dice against the labels
changes by at most 2e-4, but inference got no faster (1.1-1.5 CPU-s per volume either way;
bf16 pays off in training, where it halves the CPU time of a step), so CPU inference stays
float32 by default (:data:`CPU_AMP_DEFAULT`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from femurseg.core.errors import FemursegError
from femurseg.core.precision import get_device  # noqa: F401 (re-exported for callers of tiling)
from femurseg.inference.accel import accelerated

CPU_AMP_DEFAULT = False
"""Whether ``amp=None`` enables bfloat16 autocast on CPU (off: accurate enough, but no faster; see above)."""

PATCH_CNN_CHUNK = 1024


def amp_enabled(device: torch.device, amp: bool | None) -> bool:
    """Resolve ``amp=None`` (auto) for ``device``."""
    if amp is None:
        return device.type == "cuda" or CPU_AMP_DEFAULT
    return bool(amp)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """float16 autocast on CUDA, bfloat16 on CPU, or a null context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Geometry helpers shared with training


def mirror_pad(x: torch.Tensor, pads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Mirror (reflect, edge not repeated) ``x`` ``(B, C, *S)`` by ``pads[i] = (before, after)``
    on spatial axis i; pads larger than the axis are reflected repeatedly."""
    for axis, (lo, hi) in enumerate(pads):
        dim = 2 + axis
        while lo > 0 or hi > 0:
            n = x.shape[dim]
            if n < 2:
                x = torch.cat([x.narrow(dim, 0, 1)] * lo + [x] + [x.narrow(dim, n - 1, 1)] * hi, dim=dim)
                break
            a, b = min(lo, n - 1), min(hi, n - 1)
            spec = [0, 0] * (x.ndim - 2)
            k = x.ndim - 1 - dim  # F.pad lists the last axis first
            spec[2 * k], spec[2 * k + 1] = a, b
            x = F.pad(x, spec, mode="reflect")
            lo, hi = lo - a, hi - b
    return x


def input_size_for(model: nn.Module, out: int) -> tuple[int, int]:
    """``(n, margin)``: the smallest valid input size whose output covers ``out`` voxels along
    one axis, and the voxels trimmed on the leading side (0 for padded networks)."""
    if not hasattr(model, "output_size"):
        return out, 0
    n = model.valid_input_size(out) if hasattr(model, "valid_input_size") else out
    for _ in range(64):
        o = model.output_size(n)
        if o >= out:
            return n, (n - o) // 2
        n = model.valid_input_size(n + (out - o)) if hasattr(model, "valid_input_size") else n + (out - o)
    raise FemursegError(f"model cannot produce an output of size {out}")


def is_patch_classifier(model: nn.Module) -> bool:
    return type(model).__name__ == "PatchCNN"


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """First indices of tiles of ``tile`` voxels covering ``size`` voxels, neighbours overlapping by
    at least ``overlap`` (a fraction of ``tile``); the last tile ends at ``size``."""
    if tile >= size:
        return [0]
    step = max(1, int(round(tile * (1 - overlap))))
    starts = list(range(0, size - tile + 1, step))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def gaussian_weights(tile: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Gaussian importance map of shape ``tile`` (max 1, minimum clamped to 1e-3)."""
    w = torch.ones(())
    for n in tile:
        x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        g = torch.exp(-0.5 * (x / max(sigma_scale * n, 1e-6)) ** 2)
        w = w[..., None] * g
    return (w / w.max()).clamp_min(1e-3)


# ---------------------------------------------------------------------------------------------


def predict_prob(
    models: Sequence[nn.Module] | nn.Module,
    image: np.ndarray,
    *,
    patch_size: Sequence[int] | int | None = None,
    overlap: float = 0.5,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    amp: bool | None = None,
) -> np.ndarray:
    """Femur probability of a preprocessed volume, averaged over ``models`` (fold ensemble).

    Args:
        models: trained networks (moved to ``device`` and set to eval mode).
        image: preprocessed canonical volume ``(D, H, W)`` float32.
        patch_size: sliding-window tile: ``(d, h, w)`` for 3D networks, ``(h, w)`` for 2D
            (an int means a cube/square); None: the whole volume/slice per pass.
        overlap: fraction of a tile shared with its neighbour (0 <= overlap < 1).
        batch_size: tiles (3D) or slices/tiles (2D) per forward pass.
        device: "cuda", "cpu", ... (None: :func:`get_device`).
        amp: autocast (float16 on CUDA, bfloat16 on CPU); None: on for CUDA only.

    Returns:
        float32 ``(D, H, W)`` femur probability (softmax channel 1) for 2-class networks, or
        ``(C, D, H, W)`` class probabilities for networks with more classes (CT: 3).
    """
    probs = predict_classes(models, image, patch_size=patch_size, overlap=overlap, batch_size=batch_size,
                            device=device, amp=amp)
    return probs[1] if probs.shape[0] == 2 else probs


def predict_classes(
    models: Sequence[nn.Module] | nn.Module,
    image: np.ndarray,
    *,
    patch_size: Sequence[int] | int | None = None,
    overlap: float = 0.5,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    amp: bool | None = None,
) -> np.ndarray:
    """Like :func:`predict_prob` but always returns all class probabilities ``(C, D, H, W)``."""
    if isinstance(models, nn.Module):
        models = [models]
    if not models:
        raise FemursegError("predict: no model given")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise FemursegError(f"predict: expected a (D, H, W) volume, got shape {image.shape}")
    if not 0 <= overlap < 1:
        raise FemursegError(f"predict: overlap={overlap} must be in [0, 1)")
    dev = get_device(device)
    use_amp = amp_enabled(dev, amp)
    total: np.ndarray | None = None
    with torch.inference_mode():
        for model in models:
            model.to(dev).eval()
            p = _predict_one(model, image, patch_size, overlap, max(1, int(batch_size)), dev, use_amp)
            total = p if total is None else total + p
    assert total is not None
    return (total / len(models)).astype(np.float32, copy=False)


def _as_tuple(patch: Sequence[int] | int | None, n: int) -> tuple[int, ...] | None:
    if patch is None:
        return None
    if isinstance(patch, int):
        return (patch,) * n
    t = tuple(int(v) for v in patch)
    if len(t) != n:
        raise FemursegError(f"predict: patch size {t} needs {n} values for a {n}D network")
    return t


def _predict_one(model: nn.Module, image: np.ndarray, patch, overlap: float, batch_size: int,
                 dev: torch.device, use_amp: bool) -> np.ndarray:
    if is_patch_classifier(model):
        return _predict_patch_classifier(model, image, batch_size, dev, use_amp)
    sd = int(getattr(model, "spatial_dims", 3))
    vol = torch.from_numpy(image)
    if sd == 3:
        spatial = tuple(image.shape)
        tile = _as_tuple(patch, 3) or spatial
        src = vol[None, None]  # (1, 1, D, H, W)
        n_slices = 1
    else:
        c_in = int(getattr(model, "in_channels", 3))
        spatial = tuple(image.shape[1:])
        tile = _as_tuple(patch, 2) or spatial
        half = (c_in - 1) // 2
        idx = np.clip(np.arange(-half, image.shape[0] + c_in - 1 - half), 0, image.shape[0] - 1)
        src = vol[idx][None, None]  # (1, 1, D + c_in - 1, H, W), stacks cut below
        n_slices = image.shape[0]
    tile = tuple(min(t, s) for t, s in zip(tile, spatial))
    sizes = [input_size_for(model, t) for t in tile]
    unpadded = any(n != t for (n, _), t in zip(sizes, tile))
    pads = [(m, n - t - m) for (n, m), t in zip(sizes, tile)]
    if sd == 2:
        src = mirror_pad(src, [(0, 0)] + pads)[0, 0]  # (D + c_in - 1, H', W')
    else:
        src = mirror_pad(src, pads)
    src = src.to(dev)
    starts = [tile_starts(s, t, overlap) for s, t in zip(spatial, tile)]
    tiles = [tuple(p) for p in np.array(np.meshgrid(*starts, indexing="ij")).reshape(len(spatial), -1).T]
    single = len(tiles) == 1
    weight = (torch.ones(tile) if (unpadded or single) else gaussian_weights(tile)).to(dev)
    num_classes = int(getattr(model, "num_classes", 2))
    acc = torch.zeros((num_classes, image.shape[0], *spatial) if sd == 2 else (num_classes, *spatial), device=dev)
    norm = torch.zeros(acc.shape[1:], device=dev)
    items = [(k, t) for k in range(n_slices) for t in tiles]
    c_in = int(getattr(model, "in_channels", 1))
    for chunk in _chunks(items, batch_size):
        batch = []
        for k, t in chunk:
            region = tuple(slice(s, s + n) for s, (n, _) in zip(t, sizes))
            batch.append(src[(slice(k, k + c_in), *region)] if sd == 2 else src[(0, slice(None), *region)])
        x = torch.stack(batch)
        if use_amp:
            with autocast(dev, use_amp):
                logits = model(x)
        else:  # float32: femurseg.inference.accel's fastest float32-exact path ($FEMURSEG_ACCEL, default "auto")
            logits = accelerated(model, tuple(x.shape), dev)(x)
        prob = torch.softmax(logits.float(), dim=1)[(slice(None), slice(None), *[slice(0, t) for t in tile])]
        for (k, t), p in zip(chunk, prob):
            region = tuple(slice(s, s + n) for s, n in zip(t, tile))
            if sd == 2:
                acc[(slice(None), k, *region)] += p * weight
                norm[(k, *region)] += weight
            else:
                acc[(slice(None), *region)] += p * weight
                norm[region] += weight
    return (acc / norm).cpu().numpy()


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _predict_patch_classifier(model: nn.Module, image: np.ndarray, batch_size: int, dev: torch.device,
                              use_amp: bool) -> np.ndarray:
    from femurseg.models import extract_triplanar_patches

    size = int(model.config.get("patch_size", 32))
    coords = np.stack(np.meshgrid(*[np.arange(s) for s in image.shape], indexing="ij"), -1).reshape(-1, 3)
    out = np.zeros((int(model.num_classes), coords.shape[0]), dtype=np.float32)
    step = PATCH_CNN_CHUNK * batch_size
    for i in range(0, coords.shape[0], step):
        patches = torch.from_numpy(extract_triplanar_patches(image, coords[i:i + step], size)).to(dev)
        with autocast(dev, use_amp):
            logits = model(patches)
        out[:, i:i + step] = torch.softmax(logits.float(), dim=1).cpu().numpy().T
    return out.reshape((out.shape[0], *image.shape))
