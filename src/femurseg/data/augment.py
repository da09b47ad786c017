"""Training-time data augmentation on torch tensors (one batch at a time, on any device).

What :class:`AugmentConfig` can do, per sample, each with its own probability (nnU-Net v2's
default trainer and batchgeneratorsv2 are the model for the kinds, ranges and probabilities):

* **Mirror** (paper 001/002: left and right hips): the column axis (patient right <-> left,
  the last axis) with probability ``flip_p``.
* **Spatial** (probability ``spatial_p``), one ``grid_sample`` per batch: rotation about the
  anterior axis, i.e. within each coronal slice (uniform in ``+-rotate_deg``), out of the
  coronal plane about the other two axes (``+-tilt_deg``), isotropic zoom by a factor uniform in
  ``1 +- scale`` about the volume centre, and an **elastic** deformation (``elastic_mm``: the
  standard deviation of a random displacement in mm on control points every
  ``elastic_grid_mm``, interpolated trilinearly), and a **translation** along rows and columns
  uniform in ``+-translate`` of the extent. What comes in from outside the field of view is the
  edge value (``fill="edge"``) or the sample's minimum (``fill="air"``: the field of view's
  border moves and air appears beyond it, as in a scan with a larger or shifted field of view,
  so the network cannot use the border as a landmark). Rotations are rigid in millimetres, not in
  voxels: the batch's ``spacing`` turns them into voxel units, so anisotropic voxels (1.5 mm
  slices, 0.5-2 mm pixels) are not sheared.
* **Intensity** (images are z-score normalised, so the units are standard deviations):
  additive Gaussian **noise** with a standard deviation uniform in ``[0, noise_std]``
  (``noise_p``); Gaussian **blur** with sigma uniform in ``blur_sigma`` voxels (``blur_p``);
  a multiplicative **bias field** ``exp(b)``, ``b`` a smooth random field with amplitude
  uniform in ``[0, bias]`` (``bias_p``); **brightness** (multiplication by a factor uniform in
  ``1 +- brightness_mul``) and **contrast** (scaling about the mean by ``1 +- contrast``, clipped
  to the original range), each with ``intensity_p``; simulated **low resolution** (nearest
  down-sampling by a factor uniform in ``lowres``, trilinear back; ``lowres_p``); **gamma**
  (``x -> x^g`` on the range-normalised image, ``g`` log-uniform in ``gamma``, mean and
  standard deviation kept; ``gamma_p``); a **histogram shift** (MONAI's ``RandHistogramShift``:
  the intensities remapped by a random monotone piecewise-linear curve through ``n`` control
  points on the image's range, ``n`` uniform in ``histogram_points``, mean and standard
  deviation kept; ``histogram_p``), which, unlike gamma, changes the ratios between tissue
  intensity bands (marrow, muscle, fat) independently, as a change of sequence or scanner does;
  a **foreground contrast** draw (:func:`foreground_contrast`; ``fg_contrast_p``): the label's
  bright part (the marrow) moved towards the mean of its surroundings (the muscle) by a factor
  uniform in ``fg_contrast``, the one kind that changes the femur against its neighbours; and the
  older additive **brightness shift** (``brightness``, uniform in ``+-brightness``, every sample).

:class:`AugmentConfig` alone is the mirror only (paper 001's augmentation, what the CT cascade
and the paper preset use); :meth:`AugmentConfig.preset` names the sets (``"light"``: what the MR
default preset trains with; ``"nnunet"``: nnU-Net v2's full set). The intensity kinds follow batchgeneratorsv2 / MONAI (``RandAdjustContrast``,
``RandGaussianSmooth``, ``RandBiasField``, ``RandSimulateLowResolution``), re-stated here in
batched torch so that a batch is augmented in one pass on the training device with the
spacing known; the tests check the gamma and blur kinds against MONAI's own transforms.

Images are ``(B, C, D, H, W)`` (3D) or ``(B, C, H, W)`` (2D stacks of 3 coronal slices); labels
``(B, D, H, W)`` / ``(B, H, W)`` integer tensors. Spatial transforms resample the image
bilinearly (edge values outside) and the label with nearest neighbour. Every random draw comes
from the ``torch.Generator`` passed in, in a fixed order and count, so a run is reproducible from
its seed whatever options are on (the histogram shift draws from a generator seeded by one of
those draws, so adding it left the streams of the other kinds as they were).
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
    """Augmentations applied to every training batch (all off except the mirror by default).

    Probabilities are per sample; magnitudes as in the module docstring (degrees, mm, voxels,
    plain ratios, standard deviations of the normalised image).
    """

    flip_p: float = 0.5
    noise_std: float = 0.0
    brightness: float = 0.0
    scale: float = 0.0
    rotate_deg: float = 0.0
    tilt_deg: float = 0.0
    elastic_mm: float = 0.0
    elastic_grid_mm: float = 24.0
    translate: float = 0.0
    fill: str = "edge"
    spatial_p: float = 1.0
    noise_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    blur_p: float = 0.0
    bias: float = 0.0
    bias_p: float = 1.0
    brightness_mul: float = 0.0
    contrast: float = 0.0
    intensity_p: float = 1.0
    lowres: tuple[float, float] = (0.5, 1.0)
    lowres_p: float = 0.0
    gamma: tuple[float, float] = (0.7, 1.5)
    gamma_p: float = 0.0
    histogram_points: tuple[int, int] = (4, 8)
    histogram_p: float = 0.0
    fg_contrast: tuple[float, float] = (0.05, 1.0)
    fg_contrast_p: float = 0.0

    def __post_init__(self) -> None:
        self.blur_sigma = tuple(float(v) for v in self.blur_sigma)  # type: ignore[assignment]
        self.lowres = tuple(float(v) for v in self.lowres)  # type: ignore[assignment]
        self.gamma = tuple(float(v) for v in self.gamma)  # type: ignore[assignment]
        self.histogram_points = tuple(int(v) for v in self.histogram_points)  # type: ignore[assignment]
        self.fg_contrast = tuple(float(v) for v in self.fg_contrast)  # type: ignore[assignment]
        for name in ("flip_p", "spatial_p", "noise_p", "blur_p", "bias_p", "intensity_p", "lowres_p", "gamma_p",
                     "histogram_p", "fg_contrast_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise FemursegError(f"augmentation: {name}={getattr(self, name)} must be in [0, 1]")
        for name in ("noise_std", "brightness", "scale", "rotate_deg", "tilt_deg", "elastic_mm", "bias",
                     "brightness_mul", "contrast"):
            if getattr(self, name) < 0:
                raise FemursegError(f"augmentation: {name}={getattr(self, name)} must be >= 0")
        for name in ("scale", "brightness_mul", "contrast"):
            if getattr(self, name) >= 1:
                raise FemursegError(f"augmentation: {name}={getattr(self, name)} must be < 1 (factor 1 +- {name})")
        if not 0 <= self.translate < 1:
            raise FemursegError(f"augmentation: translate={self.translate} must be in [0, 1) (a fraction of the extent)")
        if self.fill not in ("edge", "air"):
            raise FemursegError(f"augmentation: fill={self.fill!r} must be 'edge' or 'air'")
        if self.elastic_grid_mm <= 0:
            raise FemursegError(f"augmentation: elastic_grid_mm={self.elastic_grid_mm} must be > 0")
        for name, lo_min in (("blur_sigma", 0.0), ("lowres", 0.0), ("gamma", 0.0), ("fg_contrast", 0.0)):
            lo, hi = getattr(self, name)
            if not (lo > lo_min and hi >= lo):
                raise FemursegError(f"augmentation: {name}={getattr(self, name)} must be (lo, hi) with 0 < lo <= hi")
        if self.lowres[1] > 1:
            raise FemursegError(f"augmentation: lowres={self.lowres} factors must be <= 1")
        lo, hi = self.histogram_points
        if not 3 <= lo <= hi:
            raise FemursegError(f"augmentation: histogram_points={self.histogram_points} must be (lo, hi) with 3 <= lo <= hi")

    @property
    def spatial(self) -> bool:
        return self.spatial_p > 0 and (self.scale > 0 or self.rotate_deg > 0 or self.tilt_deg > 0 or self.elastic_mm > 0
                                       or self.translate > 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> AugmentConfig:
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise FemursegError(f"augmentation: unknown option(s) {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str) -> AugmentConfig:
        """``"flip"``: the mirror only (paper 001). ``"nnunet"``: nnU-Net v2's kinds and
        probabilities, with rotations within the coronal plane up to 15 degrees and 5 degrees out
        of it, zoom 0.85-1.15, a mild elastic deformation, bias field, noise, blur, brightness,
        contrast, low resolution and gamma. ``"light"`` (the MR default preset's): the same kinds
        at about half the probability and strength, no elastic, tilt, blur or low resolution.
        Measured with ``benchmarks/bench_shift.py`` at the former 16-epoch budget (README,
        "Robustness"): the wide phantom world is the lever; ``light`` is within noise of the mirror
        alone in domain and slightly ahead under all shifts, ``nnunet`` costs ~0.01 DSC in domain
        and more under contrast shifts at that budget."""
        if name == "flip":
            return cls()
        if name == "nnunet":
            return cls(flip_p=0.5, rotate_deg=15.0, tilt_deg=5.0, scale=0.15, elastic_mm=2.0, spatial_p=0.3,
                       noise_std=0.1, noise_p=0.15, blur_p=0.2, bias=0.3, bias_p=0.3, brightness_mul=0.25,
                       contrast=0.25, intensity_p=0.15, lowres_p=0.25, gamma_p=0.3)
        if name == "light":
            return cls(flip_p=0.5, rotate_deg=10.0, scale=0.1, spatial_p=0.2, noise_std=0.05, noise_p=0.1, bias=0.2,
                       bias_p=0.15, brightness_mul=0.15, contrast=0.15, intensity_p=0.1, gamma=(0.8, 1.25), gamma_p=0.15)
        raise FemursegError(f"augmentation: unknown preset {name!r} ({', '.join(AUGMENT_PRESETS)})")


AUGMENT_PRESETS: tuple[str, ...] = ("flip", "light", "nnunet")


def parse_augment(spec: str) -> AugmentConfig:
    """An :class:`AugmentConfig` from ``"PRESET[,FIELD=VALUE...]"`` (the CLI's ``--augment``).

    ``PRESET`` is one of :data:`AUGMENT_PRESETS`; each ``FIELD=VALUE`` then changes one field:
    a number, a range ``LO:HI`` for the tuple fields (``fg_contrast=0.05:1``), or a word for
    ``fill``. Example: ``"light,fg_contrast_p=0.5,fg_contrast=0.05:1"``.
    """
    preset, *changes = [part.strip() for part in str(spec).split(",")]
    cfg = AugmentConfig.preset(preset).to_dict()
    for change in changes:
        name, sep, value = change.partition("=")
        name = name.strip()
        if not sep or name not in cfg:
            raise FemursegError(f"--augment: {change!r} is not FIELD=VALUE with FIELD one of {', '.join(cfg)}")
        try:
            if isinstance(cfg[name], list):  # a (lo, hi) range
                lo, hi = value.split(":")
                cfg[name] = [float(lo), float(hi)]
            elif isinstance(cfg[name], str):
                cfg[name] = value.strip()
            else:
                cfg[name] = float(value)
        except ValueError:
            raise FemursegError(f"--augment: {change!r}: {value!r} is not a number (ranges: LO:HI)") from None
    return AugmentConfig.from_dict(cfg)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def augment(image: torch.Tensor, label: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator,
            spacing: tuple[float, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``cfg`` to a batch; returns new ``(image, label)`` tensors of the same shapes.

    ``gen`` is a CPU ``torch.Generator``; the draws do not depend on the device of the batch.
    ``spacing``: mm per spatial axis of the batch's grid (None: isotropic voxels); it makes
    rotations rigid in millimetres and sets the elastic control grid.
    """
    b = image.shape[0]
    sd = image.ndim - 2
    if label.ndim != image.ndim - 1 or label.shape[0] != b or label.shape[1:] != image.shape[2:]:
        raise ValueError(f"augment: label shape {tuple(label.shape)} does not match image {tuple(image.shape)}")
    spacing = tuple(float(s) for s in (spacing or (1.0,) * 3))[-sd:]
    # Draw everything first (fixed order and count) so the stream does not depend on the options' values.
    flip = torch.rand(b, generator=gen) < cfg.flip_p
    shift = _uniform(b, -cfg.brightness, cfg.brightness, gen)
    factor = _uniform(b, 1 - cfg.scale, 1 + cfg.scale, gen)
    angle = _uniform(b, -cfg.rotate_deg, cfg.rotate_deg, gen) * math.pi / 180
    noise_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    do_spatial = torch.rand(b, generator=gen) < cfg.spatial_p
    tilt = _uniform(2 * b, -cfg.tilt_deg, cfg.tilt_deg, gen).view(b, 2) * math.pi / 180
    field_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    p = torch.rand(b, 7, generator=gen)  # per-sample coin: noise, blur, bias, brightness, contrast, lowres, gamma
    noise_sd = _uniform(b, 0.0, cfg.noise_std, gen)
    sigma = _uniform(b, *cfg.blur_sigma, gen)
    bias_amp = _uniform(b, 0.0, cfg.bias, gen)
    mul = _uniform(b, 1 - cfg.brightness_mul, 1 + cfg.brightness_mul, gen)
    con = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, gen)
    low = _uniform(b, *cfg.lowres, gen)
    gam = torch.exp(_uniform(b, math.log(cfg.gamma[0]), math.log(cfg.gamma[1]), gen))

    if flip.any():
        idx = flip.nonzero().flatten().to(image.device)
        image = image.clone()
        label = label.clone()
        image[idx] = image[idx].flip(-1)
        label[idx] = label[idx].flip(-1)
    if cfg.spatial and do_spatial.any():
        keep = ~do_spatial
        factor = torch.where(keep, torch.ones_like(factor), factor)
        angle = torch.where(keep, torch.zeros_like(angle), angle)
        tilt = torch.where(keep[:, None], torch.zeros_like(tilt), tilt)
        elastic = torch.where(keep, 0.0, cfg.elastic_mm).to(torch.float64)
        move = None
        if cfg.translate > 0:  # its own generator, so the streams of the other kinds are as they were
            tg = torch.Generator(device="cpu").manual_seed(noise_seed + 2)
            move = _uniform(2 * b, -cfg.translate, cfg.translate, tg).view(b, 2) * (~keep)[:, None]
        image, label = _spatial(image, label, factor, angle, sd, tilt=tilt, spacing=spacing, elastic_mm=elastic,
                                grid_mm=cfg.elastic_grid_mm, seed=field_seed, shift=move, fill=cfg.fill)
    if cfg.brightness > 0:
        image = image + shift.to(image.device, image.dtype).view(b, *([1] * (image.ndim - 1)))
    if cfg.noise_std > 0:
        g = torch.Generator(device="cpu").manual_seed(noise_seed)
        noise = torch.randn(image.shape, generator=g, dtype=torch.float32)
        scale = torch.where(p[:, 0] < cfg.noise_p, noise_sd, torch.zeros_like(noise_sd)).float()
        image = image + (noise * scale.view(b, *([1] * (image.ndim - 1)))).to(image.device, image.dtype)
    sel = lambda k, prob: [i for i in range(b) if float(p[i, k]) < prob]  # noqa: E731
    image = image.clone() if any(cfg_p > 0 for cfg_p in (cfg.blur_p, cfg.bias_p * (cfg.bias > 0), cfg.intensity_p,
                                                         cfg.lowres_p, cfg.gamma_p, cfg.histogram_p,
                                                         cfg.fg_contrast_p)) else image
    for i in sel(1, cfg.blur_p):
        image[i] = gaussian_blur(image[i], float(sigma[i]))
    if cfg.bias > 0:
        for i in sel(2, cfg.bias_p):
            image[i] = image[i] * torch.exp(float(bias_amp[i]) * _smooth_field(image.shape[2:], 4, field_seed + i,
                                                                               image.device))
    if cfg.brightness_mul > 0:
        for i in sel(3, cfg.intensity_p):
            image[i] = image[i] * float(mul[i])
    if cfg.contrast > 0:
        for i in sel(4, cfg.intensity_p):
            x = image[i]
            image[i] = ((x - x.mean()) * float(con[i]) + x.mean()).clamp(x.min(), x.max())
    for i in sel(5, cfg.lowres_p):
        image[i] = simulate_low_resolution(image[i], float(low[i]))
    for i in sel(6, cfg.gamma_p):
        image[i] = adjust_gamma(image[i], float(gam[i]))
    if cfg.histogram_p > 0:
        hg = torch.Generator(device="cpu").manual_seed(noise_seed + 1)
        for i in range(b):
            coin = float(torch.rand(1, generator=hg))
            points = random_histogram_curve(int(torch.randint(cfg.histogram_points[0], cfg.histogram_points[1] + 1,
                                                              (1,), generator=hg)), hg)
            if coin < cfg.histogram_p:
                image[i] = histogram_shift(image[i], points)
    if cfg.fg_contrast_p > 0:
        cg = torch.Generator(device="cpu").manual_seed(noise_seed + 3)
        coins = torch.rand(b, generator=cg)
        scales = _uniform(b, *cfg.fg_contrast, cg)
        for i in range(b):
            if float(coins[i]) < cfg.fg_contrast_p:
                image[i] = foreground_contrast(image[i], label[i], float(scales[i]))
    return image, label


def foreground_contrast(x: torch.Tensor, label: torch.Tensor, factor: float, shell: int = 3,
                        sigma: float = 1.0) -> torch.Tensor:
    """Scale how much brighter the labelled structure is than its surroundings by ``factor``.

    ``x`` ``(C, *S)``, ``label`` ``(*S)`` (foreground ``> 0``). The reference is the mean of ``x``
    per channel over a shell of ``shell`` voxels just outside the label (for a femur: the muscle
    around it); inside the label, every voxel brighter than the reference moves towards it,
    ``x -> ref + factor * (x - ref)``, and darker voxels (cortex) stay as they are. The weight is the
    label blurred by ``sigma`` voxels, so no step appears on the label's boundary for the network to
    find. This is a label-conditioned intensity draw in the spirit of SynthSeg's (Billot et al.,
    2023): a change of sequence or scanner moves the marrow against the muscle, which a global remap
    of the histogram (gamma, histogram shift) does not imitate. A sample without foreground or
    without a shell is returned unchanged.
    """
    sd = x.ndim - 1
    fg = (label > 0).to(torch.float32)[None]
    if not bool(fg.any()):
        return x
    pool = F.max_pool3d if sd == 3 else F.max_pool2d
    ring = pool(fg[None], 2 * shell + 1, stride=1, padding=shell)[0] - fg
    n = ring.sum()
    if not bool(n > 0):
        return x
    dims = tuple(range(1, sd + 1))
    xf = x.float()
    ref = (xf * ring).sum(dim=dims, keepdim=True) / n
    w = gaussian_blur(fg, sigma).clamp(0, 1) if sigma > 0 else fg
    return (xf + w * (factor - 1.0) * (xf - ref).clamp_min(0)).to(x.dtype)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` ``(C, *S)`` with ``sigma`` voxels on every spatial axis:
    MONAI's kernel (the Gaussian integrated over each voxel, truncated at 4 sigma), edges
    replicated (MONAI pads with zeros)."""
    sd = x.ndim - 1
    r = max(1, int(max(4.0 * sigma, 0.5) + 0.5))
    t = torch.arange(-r, r + 1, dtype=torch.float64) / (sigma * math.sqrt(2.0))
    h = 0.5 / (sigma * math.sqrt(2.0))
    k = 0.5 * (torch.erf(t + h) - torch.erf(t - h))
    k = (k / k.sum()).to(device=x.device, dtype=x.dtype)
    y = x[None]
    conv = F.conv3d if sd == 3 else F.conv2d
    c = x.shape[0]
    for ax in range(sd):
        shape = [1] * sd
        shape[ax] = 2 * r + 1
        pad = [0, 0] * sd
        pad[2 * (sd - 1 - ax)] = pad[2 * (sd - 1 - ax) + 1] = r
        y = conv(F.pad(y, pad, mode="replicate"), k.view(1, 1, *shape).expand(c, 1, *shape), groups=c)
    return y[0]


def simulate_low_resolution(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Down-sample ``x`` ``(C, *S)`` by ``factor`` (< 1) with nearest neighbour and back to its
    size with (bi/tri)linear interpolation (what a coarser acquisition looks like)."""
    size = x.shape[1:]
    small = [max(1, int(round(n * factor))) for n in size]
    mode = "trilinear" if len(size) == 3 else "bilinear"
    y = F.interpolate(x[None].float(), size=small, mode="nearest")
    return F.interpolate(y, size=list(size), mode=mode, align_corners=False)[0].to(x.dtype)


def adjust_gamma(x: torch.Tensor, gamma: float, retain_stats: bool = True) -> torch.Tensor:
    """``x -> ((x - min) / range) ^ gamma * range + min`` (MONAI's ``AdjustContrast``), then, with
    ``retain_stats``, shifted and scaled back to the original mean and standard deviation."""
    mean, std = x.mean(), x.std()
    lo, rng = x.min(), (x.max() - x.min()).clamp_min(1e-7)
    y = ((x - lo) / rng).clamp_min(0) ** gamma * rng + lo
    if retain_stats:
        y = (y - y.mean()) / y.std().clamp_min(1e-7) * std + mean
    return y


def random_histogram_curve(n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` (>= 3) floating control points for :func:`histogram_shift`, MONAI's draw: the ends
    stay at 0 and 1, and each inner point, in order, is uniform between its left neighbour's new
    value and its right neighbour's place on ``linspace(0, 1, n)`` (so the curve is monotone)."""
    points = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    for i in range(1, n - 1):
        points[i] = points[i - 1] + (points[i + 1] - points[i - 1]) * float(torch.rand(1, generator=gen, dtype=torch.float64))
    return points


def histogram_shift(x: torch.Tensor, points: torch.Tensor, retain_stats: bool = True) -> torch.Tensor:
    """Remap the intensities of ``x`` (any shape) by the piecewise-linear curve through
    ``(linspace(0, 1, n), points)``, both scaled to ``x``'s range [min, max] (MONAI's
    ``HistogramShift``); with ``retain_stats``, then shifted and scaled back to ``x``'s mean and
    standard deviation. A constant ``x`` is returned unchanged."""
    lo, hi = x.min(), x.max()
    if not bool(hi > lo):
        return x
    xp = torch.linspace(0.0, 1.0, len(points), dtype=torch.float64, device=x.device)
    fp = points.to(device=x.device, dtype=torch.float64)
    t = ((x.double() - lo) / (hi - lo)).clamp(0, 1)
    seg = (torch.searchsorted(xp, t.reshape(-1).contiguous()) - 1).clamp(0, len(xp) - 2)
    slope = (fp[1:] - fp[:-1]) / (xp[1:] - xp[:-1])
    flat = t.reshape(-1)
    y = (fp[seg] + slope[seg] * (flat - xp[seg])).reshape(x.shape) * (hi - lo) + lo
    if retain_stats:
        y = (y - y.mean()) / y.std().clamp_min(1e-7) * x.double().std() + x.double().mean()
    return y.to(x.dtype)


def _smooth_field(shape: torch.Size | tuple[int, ...], n: int, seed: int, device: torch.device) -> torch.Tensor:
    """A smooth random field of ``shape`` (standard normal values on an ``n``-point control grid
    per axis, interpolated (tri)linearly), scaled to maximum absolute value 1."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    coarse = torch.randn((1, 1, *([n] * len(shape))), generator=g)
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    f = F.interpolate(coarse, size=list(shape), mode=mode, align_corners=True)[0, 0]
    return (f / f.abs().max().clamp_min(1e-7)).to(device)


def _rot(axis: int, a: torch.Tensor) -> torch.Tensor:
    """Batch of 3x3 rotations by ``a`` (radians) about coordinate ``axis`` of (x, y, z)."""
    b = a.shape[0]
    r = torch.eye(3, dtype=torch.float64).repeat(b, 1, 1)
    i, j = [k for k in range(3) if k != axis]
    c, s = torch.cos(a), torch.sin(a)
    r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
    return r


def _spatial(image: torch.Tensor, label: torch.Tensor, factor: torch.Tensor, angle: torch.Tensor,
             spatial_dims: int, *, tilt: torch.Tensor | None = None, spacing: tuple[float, ...] | None = None,
             elastic_mm: torch.Tensor | None = None, grid_mm: float = 24.0,
             seed: int = 0, shift: torch.Tensor | None = None,
             fill: str = "edge") -> tuple[torch.Tensor, torch.Tensor]:
    """Zoom by ``factor``, rotate rows/cols by ``angle`` and the coronal plane by ``tilt``
    (radians, ``(B, 2)``: about the row and the column axis), and deform elastically by
    ``elastic_mm`` (``(B,)``), about the centre, rigidly in mm for voxels of ``spacing``; then
    shift by ``shift`` (``(B, 2)``: fractions of the extent along rows and columns). Outside the
    field of view: the edge value (``fill="edge"``) or the sample's minimum (``"air"``)."""
    b = image.shape[0]
    size = tuple(image.shape[2:])
    spacing = tuple(spacing or (1.0,) * spatial_dims)
    # grid_sample's coordinates are (x, y[, z]) = (col, row[, slice]), each normalised to [-1, 1]
    # over its extent: a rigid map in mm is S^-1 R S with S = diag(extent / 2).
    extent = torch.tensor([n * s for n, s in zip(size, spacing)][::-1], dtype=torch.float64)
    s_half = torch.diag(extent / 2)
    s_inv = torch.diag(2 / extent)
    if spatial_dims == 3:
        rot = _rot(2, angle)  # about z (the slice axis): within each coronal slice
        if tilt is not None:
            rot = _rot(1, tilt[:, 0]) @ _rot(0, tilt[:, 1]) @ rot
    else:
        c, s = torch.cos(angle), torch.sin(angle)
        rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    inv = (1.0 / factor).view(b, 1, 1)  # output -> input mapping of a zoom by `factor`
    lin = s_inv @ rot.transpose(1, 2) @ s_half * inv
    offset = torch.zeros(b, spatial_dims, 1, dtype=torch.float64)
    if shift is not None:  # grid coordinates (x = col, y = row): a fraction f of the extent is 2 f
        offset[:, 0, 0] = 2 * shift[:, 1].double()
        offset[:, 1, 0] = 2 * shift[:, 0].double()
    theta = torch.cat([lin, offset], dim=2)
    theta = theta.to(device=image.device, dtype=torch.float32)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    if elastic_mm is not None and bool((elastic_mm > 0).any()):
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        ctrl = [max(2, int(math.ceil(float(e) / grid_mm)) + 1) for e in extent.flip(0)]  # per (z, y, x) / (y, x)
        coarse = torch.randn((b, spatial_dims, *ctrl), generator=g, dtype=torch.float32)
        mode = "trilinear" if spatial_dims == 3 else "bilinear"
        disp = F.interpolate(coarse, size=list(size), mode=mode, align_corners=True)  # (B, xyz, *S), in sd
        disp = disp * elastic_mm.float().view(b, 1, *([1] * spatial_dims))
        disp = disp * (2 / extent.float()).view(1, spatial_dims, *([1] * spatial_dims))  # mm -> normalised
        grid = grid + disp.movedim(1, -1).to(grid.device)
    if fill == "air":
        low = image.float().amin(dim=tuple(range(1, image.ndim)), keepdim=True)
        img = (F.grid_sample(image.float() - low, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
               + low).to(image.dtype)
    else:
        img = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="border", align_corners=False).to(image.dtype)
    lab = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return img, lab[:, 0].round().to(label.dtype)
