"""Synthetic hip phantoms: the embedded default data of femurseg (no real data can ship).

Every array is in the canonical order of ``docs/conventions.md``: ``(A, I, L)`` =
``(coronal slice posterior->anterior, row superior->inferior, col patient right->left)``,
spacing in mm per canonical axis. Physical coordinates in ``meta`` are in mm with the
origin at the centre of voxel ``(0, 0, 0)``: voxel ``(i, j, k)`` is at
``(i * s0, j * s1, k * s2)``; direction vectors are unit vectors in that same mm space,
components in canonical order.

MR mode (default) imitates the T1-weighted 3D FLASH coronal hip MR of paper 001
(3T, 0.234 x 0.234 mm in plane, 1.5 mm slices): a parametric proximal femur (femoral head
sphere with a fovea, tapered elliptical neck with a waist, greater trochanter as a tapered
capsule from its rounded tip down the lateral shaft, lesser trochanter ellipsoid, flaring
shaft; smooth signed-distance unions), bright fatty marrow with a dark trabecular texture
(thresholded band-passed noise, denser in the head and along the compressive / tensile
groups, sparse in Ward's triangle, none in the medullary canal), a dark cortical shell
(thin in the head, thick in the calcar and the shaft), a dark physeal scar, the acetabulum
as a cup around the head with a thin cartilage / joint space, labrum, fossa fat (pulvinar)
and ligamentum teres, pelvic bone (ilium, ischium, pubis) with red-marrow signal, the joint
capsule, gluteal tendons, femoral vessels in fat, muscle compartments with fat septa,
fascia lata, subcutaneous fat, skin and air. The image is rendered at 2x in-plane
resolution and area-averaged (partial volume), slightly blurred through the slice (slice
profile), multiplied by a smooth surface-coil bias field (brighter near the lateral skin)
and corrupted by Rician noise (SNR 12-35). Intensities are arbitrary MR units, fat ~ 1000 x
a per-case gain (0.7-1.4) with per-tissue contrast jitter. The bone marrow is as bright as
the subcutaneous fat, as in real T1 MR, so a global threshold does not segment the femur:
the best threshold (chosen with the label) gives a Dice of about 0.35-0.55.

CT mode renders Hounsfield units (cortex 1200-1800 HU, trabecular 150-400 HU with
texture, fatty medullary canal, muscle ~45, fat ~-100, air -1000) with a Gaussian
point-spread blur and correlated Gaussian noise (10-30 HU). CT labels: 1 = trabecular /
medullary bone inside the endosteal surface, 2 = cortical shell between the endosteal
and periosteal surfaces (at least one voxel thick: a label-1 voxel never touches
background). ``bilateral=True`` renders both hips in a wide field of view.

Side convention: radiological display, column index runs patient right -> left, so a
**right hip** has its femoral shaft and greater trochanter at low column indices (image
left) and the head pointing towards higher columns (the midline); a **left hip** is the
mirror image (head towards low columns). ``meta['side']`` says which.

Labels (uint8): MR 1 = proximal femur inside the periosteal surface; CT 1/2 as above.
A voxel is labelled when at least half of its (supersampled) area is inside the surface,
the label is restricted to the field of view and it is one connected component (the
largest 6-connected component per femur is kept; with the default geometry there is
only one).

Failure modes of paper 001 (``artefacts``): ``"foldover"`` (MR only: the body outside
the field of view along the phase-encoding direction, usually left-right, wraps into
the image as a weaker ghost; the label is not affected) and ``"cyst"`` (a hypointense
bone cyst with a sclerotic rim and hypointense foci in the head / neck; in CT a
fluid-density cyst with sclerotic rim and calcified foci; inside the label).

Defaults and why:

* MR ``DEFAULT_SHAPE = (48, 128, 128)`` at ``DEFAULT_SPACING = (1.5, 0.9375, 0.9375)`` mm:
  the paper's central 48 coronal slices (7.2 cm) and its 120 mm in-plane field of view
  (512 x 0.234 mm) at a quarter of the in-plane resolution, so 16 cases take well under a
  minute on 2 CPU cores and a 3D U-Net trains on a CPU. ``PAPER_SHAPE`` /
  ``PAPER_SPACING`` give the paper's full geometry (60 x 512 x 512 at 1.5 x 0.234 x 0.234).
* CT ``CT_DEFAULT_SHAPE = (64, 128, 128)`` at ``CT_DEFAULT_SPACING = (1.0, 1.0, 1.0)`` mm:
  isotropic 1 mm voxels like QCT (paper 003: 1 mm slices, 0.8 mm pixels), 128 mm in plane
  covers the head to below the lesser trochanter, 64 mm covers the femur front to back;
  every size divides by 16 for 4-level U-Nets. ``CT_BILATERAL_SHAPE = (64, 128, 320)``
  holds both hips, as ``MR_BILATERAL_SHAPE = (48, 128, 320)`` does in MR (300 mm wide).
* A ``shape`` without ``spacing`` keeps the default field of view (:func:`fov_spacing`):
  ``shape=PAPER_SHAPE`` alone gives the paper's 0.234 mm pixels, ``(24, 64, 64)`` a fast
  low-resolution version of the same hips.

Cost: about 1 s of CPU per default MR case (3.1 M render voxels, one core), ~1.3 s per
default CT case, roughly 5x that for the paper-size MR (15.7 M voxels, ~1.5 GB peak).

Per-case parameters (all in ``meta``): head radius 20-25 mm, neck-shaft angle 120-140 deg,
anteversion 5-25 deg (rotation of the neck out of the coronal plane about the shaft axis,
towards anterior), neck length (head centre to the neck/shaft axis intersection)
44-56 mm, neck and shaft radii, shaft adduction, trochanter sizes, cortical thicknesses,
joint space 1.5-3 mm, soft-tissue thicknesses, intensities / gain, bias field, SNR.

Everything is vectorised numpy / scipy; generation is deterministic for a seed (the
anatomy, texture, artefact choice and noise come from separate child streams of
``numpy.random.SeedSequence(seed)``, so switching artefacts on or off keeps the anatomy).

Length: one generator; the anatomy, the MR and the CT renderings share one parameter set per case, and splitting them would scatter that table across files.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import fft as _fft
from scipy import ndimage

from femurseg.core.errors import FemursegError

DEFAULT_SHAPE: tuple[int, int, int] = (48, 128, 128)
DEFAULT_SPACING: tuple[float, float, float] = (1.5, 0.9375, 0.9375)
PAPER_SHAPE: tuple[int, int, int] = (60, 512, 512)
PAPER_SPACING: tuple[float, float, float] = (1.5, 0.234, 0.234)
CT_DEFAULT_SHAPE: tuple[int, int, int] = (64, 128, 128)
CT_DEFAULT_SPACING: tuple[float, float, float] = (1.0, 1.0, 1.0)
CT_BILATERAL_SHAPE: tuple[int, int, int] = (64, 128, 320)
MR_BILATERAL_SHAPE: tuple[int, int, int] = (48, 128, 320)
"""Both hips in MR: 300 x 120 mm in-plane at the default MR spacing (a pelvic field of view)."""
MODALITIES: tuple[str, ...] = ("mr", "ct")
SIDES: tuple[str, ...] = ("right", "left")
ARTEFACT_KINDS: tuple[str, ...] = ("foldover", "cyst")

_F32 = np.float32
_BIG = np.float32(1e4)


# ----------------------------------------------------------------------------- variation

# Per-case parameter ranges (uniform draws, lo..hi). ``narrow`` is the generator's original world
# (kept bit for bit: the CT study and older numbers were measured on it); ``wide`` widens every
# factor in which real hip scans vary more than those phantoms did; ``SHIFTS`` hold ranges beyond
# the narrow world, one factor group at a time, for the cross-domain benchmark. Units: mm, degrees,
# MR intensity as a fraction of fat, SNR as a plain ratio, scale factors as plain ratios.
_NARROW: dict[str, tuple[float, float]] = {
    # anatomy
    "head_radius": (20.0, 25.0),
    "head_aspect": (1.0, 1.0),  # head extent along the neck axis / across it (1 = sphere)
    "neck_shaft_angle": (120.0, 140.0),
    "anteversion": (5.0, 25.0),
    "neck_length": (44.0, 56.0),
    "cortex_scale": (1.0, 1.0),  # factor on all cortical thicknesses
    "trabecular_scale": (1.0, 1.0),  # factor on the trabecular texture's length scale
    # pose and placement in the field of view
    "shaft_adduction": (3.0, 9.0),
    "shaft_tilt_ap": (-4.0, 4.0),
    "femur_roll": (0.0, 0.0),  # extra rotation of the whole femur about its head centre, per axis
    "head_offset_si": (14.0, 24.0),  # head centre above the field-of-view centre
    "head_offset_ml": (20.0, 28.0),  # head centre medial of the field-of-view centre (unilateral)
    "ap_offset": (-3.0, 3.0),  # femur's AP centre off the slab centre
    # MR contrast (fraction of the fat signal) and acquisition
    "gain": (700.0, 1400.0),
    "muscle": (0.28, 0.40),
    "marrow_femur": (0.90, 1.02),
    "trab_dark": (0.75, 0.92),
    "cortex": (0.03, 0.08),
    "red_marrow": (0.0, 0.35),
    "snr": (12.0, 35.0),
    "bias_surface": (0.3, 0.9),
    "bias_poly": (-0.25, 0.25),
    "slice_profile": (0.08, 0.2),  # weight of each neighbouring slice in the slice profile
}

_WIDE: dict[str, tuple[float, float]] = {
    **_NARROW,
    "head_radius": (18.0, 28.0),
    "head_aspect": (0.9, 1.1),
    "neck_shaft_angle": (114.0, 146.0),
    "anteversion": (-5.0, 35.0),
    "neck_length": (38.0, 62.0),
    "cortex_scale": (0.7, 1.4),
    "trabecular_scale": (0.7, 1.5),
    "shaft_adduction": (-2.0, 14.0),
    "shaft_tilt_ap": (-10.0, 10.0),
    "femur_roll": (-8.0, 8.0),
    "head_offset_si": (2.0, 38.0),
    "head_offset_ml": (8.0, 36.0),
    "ap_offset": (-9.0, 9.0),
    "gain": (300.0, 3000.0),
    "muscle": (0.20, 0.50),
    "marrow_femur": (0.75, 1.10),
    "trab_dark": (0.60, 0.95),
    "cortex": (0.02, 0.14),
    "red_marrow": (0.0, 0.6),
    "snr": (7.0, 50.0),
    "bias_surface": (0.1, 1.4),
    "bias_poly": (-0.45, 0.45),
    "slice_profile": (0.05, 0.3),
}

# One factor group at a time beyond the narrow ranges (and reaching past the wide ones).
SHIFTS: dict[str, dict[str, tuple[float, float]]] = {
    "placement": {"head_offset_si": (30.0, 42.0), "head_offset_ml": (4.0, 12.0), "ap_offset": (7.0, 11.0)},
    "head": {"head_radius": (26.0, 29.0), "head_aspect": (1.08, 1.14)},
    "neck": {"neck_shaft_angle": (142.0, 150.0), "anteversion": (28.0, 38.0), "neck_length": (58.0, 64.0)},
    "pose": {"femur_roll": (-10.0, 10.0), "shaft_adduction": (12.0, 16.0), "shaft_tilt_ap": (8.0, 12.0)},
    "contrast": {"muscle": (0.45, 0.55), "marrow_femur": (0.70, 0.80), "trab_dark": (0.55, 0.65),
                 "cortex": (0.12, 0.18), "red_marrow": (0.5, 0.7)},
    "cortex": {"cortex_scale": (1.4, 1.7)},
    "texture": {"trabecular_scale": (1.5, 1.9)},
    "noise_bias": {"snr": (5.0, 8.0), "bias_surface": (1.2, 1.6), "bias_poly": (-0.5, 0.5)},
    "slice": {"slice_profile": (0.28, 0.33)},
}
VARIATIONS: tuple[str, ...] = ("narrow", "wide")


@dataclass(frozen=True)
class Variation:
    """The per-case parameter ranges of a phantom world (see ``_NARROW`` for the keys and units)."""

    name: str
    ranges: dict[str, tuple[float, float]]

    def u(self, rng: np.random.Generator, key: str, size: int | None = None):
        """One uniform draw (or ``size`` of them) from the range of ``key``: one stream draw each,
        whatever the range, so two worlds with the same seed stay aligned draw for draw."""
        lo, hi = self.ranges[key]
        return rng.uniform(lo, hi, size=size)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ranges": {k: list(v) for k, v in self.ranges.items()}}


def variation(name: str | Variation = "wide", shift: str | Sequence[str] | None = None) -> Variation:
    """The phantom world ``name`` (``"narrow"`` or ``"wide"``), optionally with factor groups of
    ``SHIFTS`` (a name, ``"all"``, or several) moved beyond it."""
    if isinstance(name, Variation):
        base = name
    elif name == "narrow":
        base = Variation("narrow", dict(_NARROW))
    elif name == "wide":
        base = Variation("wide", dict(_WIDE))
    else:
        raise FemursegError(f"variation: expected one of {', '.join(VARIATIONS)}, got {name!r}")
    if not shift:
        return base
    groups = list(SHIFTS) if shift == "all" else [shift] if isinstance(shift, str) else list(shift)
    unknown = [s for s in groups if s not in SHIFTS]
    if unknown:
        raise FemursegError(f"shift: unknown factor group(s) {', '.join(unknown)} ({', '.join(SHIFTS)}, all)")
    ranges = dict(base.ranges)
    for s in groups:
        ranges.update(SHIFTS[s])
    return Variation(f"{base.name}+{'+'.join(groups)}", ranges)


def _rotation(angles_deg) -> np.ndarray:
    """Rotation matrix (canonical A, I, L axes) of successive rotations about A, I and L."""
    out = np.eye(3)
    for axis, a in enumerate(angles_deg):
        c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


@dataclass
class PhantomCase:
    """One synthetic case.

    Attributes:
        image: float32 ``(n_coronal, rows, cols)``; MR arbitrary units (fat ~ 1000 x gain),
            CT Hounsfield units.
        label: uint8, same shape. MR: 1 = proximal femur. CT: 1 = trabecular/medullary,
            2 = cortical shell.
        spacing: mm per canonical axis ``(s_ap, s_si, s_lr)``.
        meta: JSON-serialisable dict: ``side`` ('left' | 'right' | 'bilateral'),
            ``modality``, ``seed``, ``artefacts`` (list of names), the true geometry of the
            (first) femur in canonical mm (``head_centre_mm``, ``head_radius_mm``,
            ``neck_axis`` (unit, from the neck/shaft intersection towards the head centre),
            ``shaft_axis`` (unit, pointing distally along the shaft), ``neck_shaft_point_mm``
            (where the neck axis meets the shaft axis), ``neck_shaft_angle_deg``,
            ``anteversion_deg``, ``neck_length_mm``, ...) and ``femurs``: a list with one
            such dict per femur (two for a bilateral CT).
    """

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    meta: dict[str, Any] = field(default_factory=dict)


def default_shape(modality: str = "mr", bilateral: bool = False) -> tuple[int, int, int]:
    """Default canonical shape for a modality (see the module docstring for why)."""
    modality = _check_modality(modality)
    if modality == "mr":
        return MR_BILATERAL_SHAPE if bilateral else DEFAULT_SHAPE
    return CT_BILATERAL_SHAPE if bilateral else CT_DEFAULT_SHAPE


def default_spacing(modality: str = "mr") -> tuple[float, float, float]:
    """Default spacing in mm per canonical axis for a modality."""
    return DEFAULT_SPACING if _check_modality(modality) == "mr" else CT_DEFAULT_SPACING


def fov_spacing(shape: Sequence[int], modality: str = "mr", bilateral: bool = False) -> tuple[float, float, float]:
    """Spacing (mm) that shows the modality's default field of view with ``shape`` voxels.

    The slice thickness stays the default (1.5 mm MR, 1 mm CT: more slices cover more
    front-to-back), the in-plane spacing is the default in-plane field of view (MR 120 mm,
    CT 128 mm, bilateral MR 120 x 300 mm, bilateral CT 128 x 320 mm) divided by the number of rows / columns. So
    ``(48, 128, 128)`` gives ``DEFAULT_SPACING`` and ``PAPER_SHAPE`` gives ``PAPER_SPACING``
    (0.234375 mm, the paper's 0.234); used by :func:`generate_case` when ``spacing`` is None.
    """
    modality = _check_modality(modality)
    ref_shape, ref_sp = default_shape(modality, bilateral), default_spacing(modality)
    if len(shape) != 3:
        raise FemursegError(f"shape: expected 3 sizes (coronal, rows, cols), got {tuple(shape)}")
    return (
        float(ref_sp[0]),
        round(ref_shape[1] * ref_sp[1] / int(shape[1]), 6),
        round(ref_shape[2] * ref_sp[2] / int(shape[2]), 6),
    )


# ----------------------------------------------------------------------------- public API


def generate_case(
    seed: int,
    modality: str = "mr",
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    side: str | None = None,
    artefacts: bool | Sequence[str] | None = None,
    artefact_fraction: float = 0.2,
    bilateral: bool = False,
    supersample: int | None = None,
    variation: str | Variation | None = None,
) -> PhantomCase:
    """Generate one synthetic hip case.

    Args:
        seed: non-negative integer; the same arguments always give identical arrays.
        modality: "mr" (T1w 3D FLASH-like) or "ct" (Hounsfield units, cortical/trabecular labels).
        shape: canonical ``(n_coronal, rows, cols)``; None gives the modality default
            (``DEFAULT_SHAPE`` for MR, ``CT_DEFAULT_SHAPE`` / ``CT_BILATERAL_SHAPE`` for CT).
        spacing: mm per canonical axis; None: :func:`fov_spacing` (the default slice
            thickness and the default in-plane field of view, so ``shape=PAPER_SHAPE``
            alone gives the paper's 0.234 mm pixels). The anatomy is placed relative to
            the centre of the field of view in mm: the same seed at another resolution
            with the same field of view shows the same hip.
        side: "right", "left" or None (drawn from the seed). Ignored when bilateral.
        artefacts: None: with probability ``artefact_fraction`` the case gets a failure
            mode (MR: fold-over and/or bone cyst; CT: cyst); True: always one; False: never;
            a sequence of names from ``ARTEFACT_KINDS``: exactly those.
        artefact_fraction: probability of an artefact when ``artefacts`` is None.
        bilateral: both hips in a wide field of view (default shape ``MR_BILATERAL_SHAPE`` /
            ``CT_BILATERAL_SHAPE``); the label holds both femurs.
        supersample: in-plane render factor for partial volume (None: 2 when the in-plane
            spacing is >= 0.4 mm and the render grid stays under 4.5 M voxels, else 1;
            CT adds a Gaussian point-spread blur in any case).
        variation: the phantom world whose parameter ranges the case is drawn from
            (:func:`variation`): ``"wide"`` (MR default), ``"narrow"`` (CT default, and the
            generator's original MR world, reproduced bit for bit) or a :class:`Variation`.

    Returns:
        :class:`PhantomCase` (image float32, label uint8, spacing, meta).
    """
    modality = _check_modality(modality)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise FemursegError(f"seed: expected a non-negative integer, got {seed!r}")
    seed = int(seed)
    shape = tuple(int(v) for v in (default_shape(modality, bilateral) if shape is None else shape))
    if len(shape) != 3 or min(shape) < 8:
        raise FemursegError(f"shape: expected 3 sizes >= 8 (coronal, rows, cols), got {shape}")
    if spacing is None:
        spacing = fov_spacing(shape, modality, bilateral)
    spacing = tuple(float(v) for v in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise FemursegError(f"spacing: expected 3 positive sizes in mm, got {spacing}")
    if not 0.0 <= float(artefact_fraction) <= 1.0:
        raise FemursegError(f"artefact_fraction: expected a value in [0, 1], got {artefact_fraction}")
    if side is not None and side not in SIDES:
        raise FemursegError(f"side: expected 'right', 'left' or None, got {side!r}")

    var = globals()["variation"](variation if variation is not None else ("wide" if modality == "mr" else "narrow"))
    ss_seq = np.random.SeedSequence(seed)
    # the sixth stream holds the draws the narrow world did not have, so it keeps its arrays
    rng_anat, rng_tex, rng_choice, rng_art, rng_noise, rng_extra = (np.random.default_rng(s) for s in ss_seq.spawn(6))
    side_draw = int(rng_choice.integers(2))  # always drawn: the artefact draw does not depend on `side`
    if side is None:
        side = SIDES[side_draw]
    kinds = _choose_artefacts(rng_choice, modality, artefacts, float(artefact_fraction))

    if supersample is None:  # 2x in plane for coarse voxels, unless the render grid gets large
        supersample = 2 if min(spacing[1], spacing[2]) >= 0.4 and 4 * math.prod(shape) <= 4_500_000 else 1
    supersample = int(supersample)
    if supersample < 1 or supersample > 4:
        raise FemursegError(f"supersample: expected 1..4, got {supersample}")

    centre = (np.array(shape, float) - 1.0) / 2.0 * np.array(spacing)
    sides = ("right", "left") if bilateral else (side,)
    hips = _sample_hips(rng_anat, sides, centre, bilateral, var, rng_extra)
    body = _sample_body(rng_anat, hips, centre, bilateral)
    tissue = _sample_tissue_values(rng_anat, modality, var)
    if modality == "mr":
        # trabeculae (0.1-0.3 mm) are far below a coarse voxel: partial volume lowers their contrast
        tissue["trab_dark"] *= float(np.clip((0.5 / min(spacing[1], spacing[2])) ** 0.5, 0.7, 1.0))
    cyst = _sample_cyst(rng_art, hips[0]) if "cyst" in kinds else None
    fold = _sample_foldover(rng_art, shape, hips[0]) if "foldover" in kinds else None

    ext_axis, ext_n = (fold["axis"], fold["n_ext"]) if fold else (2, 0)
    ss = (1, supersample, supersample)
    grid = _Grid(shape, spacing, ss, ext_axis, ext_n)
    fields = _noise_fields(rng_tex, grid, hips, var.u(rng_extra, "trabecular_scale"))
    img_r, peri_r, endo_r = _render(grid, hips, body, tissue, fields, modality, cyst)
    img = _area_mean(img_r, ss)
    del img_r

    if modality == "mr":
        img = _mr_acquisition(rng_noise, img, grid, body, tissue, fold, hips, var)
    else:
        img = _ct_acquisition(rng_noise, img, tissue, spacing)
    img = _crop_ext(img, ext_axis, ext_n).astype(np.float32, copy=False)

    label = np.zeros(shape, np.uint8)
    for h, (pr, er) in enumerate(zip(peri_r, endo_r)):
        peri = _crop_ext(_area_mean(pr, ss), ext_axis, ext_n) >= 0.5
        peri = _largest_component(peri)
        if modality == "ct":
            endo = (_crop_ext(_area_mean(er, ss), ext_axis, ext_n) >= 0.5) & peri
            lab = np.where(peri, np.uint8(2), np.uint8(0))
            lab[endo] = 1
            # the cortex is at least one voxel: label 1 never touches background (6-neighbours)
            bg = lab == 0
            near_bg = ndimage.binary_dilation(bg) & (lab == 1)
            lab[near_bg] = 2
            label = np.maximum(label, lab)
        else:
            label[peri] = 1

    voxel_cm3 = float(np.prod(spacing)) / 1000.0
    femurs = [_hip_meta(h) for h in hips]
    meta: dict[str, Any] = {
        "generator": "femurseg.data.phantom",
        "seed": seed,
        "modality": modality,
        "side": "bilateral" if bilateral else side,
        "shape": list(shape),
        "spacing": list(spacing),
        "axcodes": ["A", "I", "L"],
        "coordinates": "mm, canonical (A, I, L) axes, origin at the centre of voxel (0, 0, 0)",
        "artefacts": list(kinds),
        "supersample": supersample,
        "variation": var.name,
        "label_volume_cm3": float(np.count_nonzero(label)) * voxel_cm3,
        "femurs": femurs,
        "intensity": {k: float(v) for k, v in tissue.items()},
        "body": {k: _jsonable(v) for k, v in body.items() if not k.startswith("_")},
    }
    if modality == "ct":
        meta["trabecular_volume_cm3"] = float(np.count_nonzero(label == 1)) * voxel_cm3
        meta["cortical_volume_cm3"] = float(np.count_nonzero(label == 2)) * voxel_cm3
    if not bilateral:
        meta.update({k: v for k, v in femurs[0].items() if k != "side"})
    if cyst is not None:
        meta["cyst"] = {k: _jsonable(v) for k, v in cyst.items()}
    if fold is not None:
        meta["foldover"] = {k: _jsonable(v) for k, v in fold.items()}
    return PhantomCase(image=img, label=label, spacing=spacing, meta=meta)


def generate_cohort(
    n: int,
    modality: str = "mr",
    seed: int = 0,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    artefact_fraction: float = 0.2,
    bilateral: bool = False,
    supersample: int | None = None,
    variation: str | Variation | None = None,
) -> Iterator[PhantomCase]:
    """Yield ``n`` cases; case ``i`` depends only on ``(seed, i)`` (not on ``n``).

    Per-case seeds come from ``numpy.random.SeedSequence(seed).spawn``; sides alternate
    (the first side is drawn from ``seed``), so a cohort is balanced. Each case has a
    failure mode with probability ``artefact_fraction`` (drawn per case). ``meta['seed']``
    reproduces a case alone with :func:`generate_case`; ``meta['cohort_index']`` is ``i``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise FemursegError(f"n: expected a non-negative number of cases, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise FemursegError(f"seed: expected a non-negative integer, got {seed!r}")
    _check_modality(modality)
    first = int(np.random.default_rng(int(seed)).integers(2))
    children = np.random.SeedSequence(int(seed)).spawn(int(n))
    for i, child in enumerate(children):
        case_seed = int(child.generate_state(1, dtype=np.uint32)[0])
        case = generate_case(
            case_seed,
            modality=modality,
            shape=shape,
            spacing=spacing,
            side=SIDES[(i + first) % 2],
            artefacts=None,
            artefact_fraction=artefact_fraction,
            bilateral=bilateral,
            supersample=supersample,
            variation=variation,
        )
        case.meta["cohort_index"] = i
        case.meta["cohort_seed"] = int(seed)
        yield case


# ----------------------------------------------------------------------------- helpers


def _check_modality(modality: str) -> str:
    m = str(modality).lower()
    if m not in MODALITIES:
        raise FemursegError(f"modality: expected 'mr' or 'ct', got {modality!r}")
    return m


def _choose_artefacts(rng: np.random.Generator, modality: str, artefacts, fraction: float) -> list[str]:
    allowed = ARTEFACT_KINDS if modality == "mr" else ("cyst",)
    u = rng.random()
    pick = rng.random()
    if artefacts is None:
        on = u < fraction
    elif isinstance(artefacts, (bool, np.bool_)):
        on = bool(artefacts)
    else:
        names = [artefacts] if isinstance(artefacts, str) else list(artefacts)
        for a in names:
            if a not in allowed:
                raise FemursegError(f"artefacts: {a!r} is not available for {modality} (choose from {allowed})")
        return sorted(set(names), key=ARTEFACT_KINDS.index)
    if not on:
        return []
    if modality == "ct":
        return ["cyst"]
    if pick < 0.45:
        return ["foldover"]
    if pick < 0.9:
        return ["cyst"]
    return ["foldover", "cyst"]


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return [float(x) for x in v.ravel()]
    if isinstance(v, (np.floating, float)):
        return float(v)
    if isinstance(v, (np.integer, int)) and not isinstance(v, bool):
        return int(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _smin(a, b, k: float):
    """Polynomial smooth minimum (smooth union of two SDFs), blend width ``k`` mm."""
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.minimum(a, b) - h * h * (k * 0.25)


def _smax(a, b, k: float):
    return -_smin(-a, -b, k)


def _crop_ext(a: np.ndarray, axis: int, n_ext: int) -> np.ndarray:
    if n_ext == 0:
        return a
    sl = [slice(None)] * 3
    sl[axis] = slice(n_ext, a.shape[axis] - n_ext)
    return a[tuple(sl)]


def _area_mean(a: np.ndarray, ss: tuple[int, int, int]) -> np.ndarray:
    """Average ``ss``-sized blocks (the render grid back to voxels), float32."""
    if ss == (1, 1, 1):
        return a.astype(np.float32, copy=False)
    n0, n1, n2 = (a.shape[i] // ss[i] for i in range(3))
    b = a.reshape(n0, ss[0], n1, ss[1], n2, ss[2])
    return b.mean(axis=(1, 3, 5), dtype=np.float32)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


class _Grid:
    """Render grid: voxel centres of the output grid, ``ss``-fold supersampled per axis,
    optionally extended by ``n_ext`` output voxels on both ends of ``ext_axis`` (fold-over).
    Coordinates are broadcastable float32 arrays in mm."""

    def __init__(self, shape, spacing, ss, ext_axis: int, n_ext: int):
        self.out_shape = tuple(shape)
        self.spacing = tuple(spacing)
        self.ss = tuple(ss)
        self.ext_axis = ext_axis
        self.n_ext = n_ext
        coords = []
        vox = []
        for ax in range(3):
            n = shape[ax] + (2 * n_ext if ax == ext_axis else 0)
            first = -(n_ext if ax == ext_axis else 0)
            idx = np.arange(first, first + n, dtype=float)
            vox.append(idx * spacing[ax])
            sub = (np.arange(ss[ax]) + 0.5) / ss[ax] - 0.5
            c = (idx[:, None] + sub[None, :]).ravel() * spacing[ax]
            shp = [1, 1, 1]
            shp[ax] = c.size
            coords.append(c.astype(_F32).reshape(shp))
        self.x = coords
        self.shape = tuple(c.size for c in (coords[0].ravel(), coords[1].ravel(), coords[2].ravel()))
        vshape = [v.size for v in vox]
        self.vox = [v.astype(_F32).reshape([vshape[a] if a == ax else 1 for a in range(3)]) for ax, v in enumerate(vox)]
        self.render_spacing = tuple(spacing[a] / ss[a] for a in range(3))

    def slab(self, i0: int, i1: int) -> _Grid:
        """The same grid restricted to render-grid coronal planes ``i0:i1`` (shares arrays)."""
        sub = object.__new__(_Grid)
        sub.__dict__.update(self.__dict__)
        sub.x = [self.x[0][i0:i1], self.x[1], self.x[2]]
        sub.shape = (i1 - i0,) + self.shape[1:]
        return sub


def _rel(g: _Grid, p) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (g.x[0] - _F32(p[0]), g.x[1] - _F32(p[1]), g.x[2] - _F32(p[2]))


def _dot(r, v) -> np.ndarray:
    return r[0] * _F32(v[0]) + r[1] * _F32(v[1]) + r[2] * _F32(v[2])


def _norm2(r) -> np.ndarray:
    return r[0] * r[0] + r[1] * r[1] + r[2] * r[2]


def _segment(g: _Grid, a, b, ra: float, rb: float, flat=None, flat_k: float = 1.0) -> np.ndarray:
    """Approximate SDF of a tapered capsule from ``a`` (radius ``ra``) to ``b`` (``rb``);
    the cross-section is squashed by ``flat_k`` along the unit vector ``flat``."""
    a = np.asarray(a, float)
    ab = np.asarray(b, float) - a
    L2 = float(ab @ ab)
    r = _rel(g, a)
    h = np.clip(_dot(r, ab / L2), 0.0, 1.0)
    perp2 = _norm2(r) - 2.0 * L2 * h * _dot(r, ab / L2) + L2 * h * h
    if flat is not None and flat_k != 1.0:
        flat = np.asarray(flat, float)
        pf = _dot(r, flat) - h * _F32(ab @ flat)
        perp2 = perp2 + (1.0 / (flat_k * flat_k) - 1.0) * pf * pf
    return np.sqrt(np.maximum(perp2, 0.0)) - (ra + (rb - ra) * h)


def _ellipsoid(g: _Grid, c, axes, radii) -> np.ndarray:
    """Approximate SDF of an ellipsoid (centre ``c``, orthonormal ``axes``, ``radii`` mm)."""
    r = _rel(g, c)
    k0 = None
    k1 = None
    for ax, rad in zip(axes, radii):
        p = _dot(r, ax)
        t0 = (p / _F32(rad)) ** 2
        t1 = (p / _F32(rad * rad)) ** 2
        k0 = t0 if k0 is None else k0 + t0
        k1 = t1 if k1 is None else k1 + t1
    k0 = np.sqrt(k0)
    k1 = np.sqrt(k1) + _F32(1e-6)
    return k0 * (k0 - 1.0) / k1


# ----------------------------------------------------------------------------- anatomy


@dataclass
class _Hip:
    side: str
    m: float  # +1: medial is +col (right hip), -1: medial is -col (left hip)
    H: np.ndarray
    R: float
    n: np.ndarray  # neck axis, towards the head
    d_s: np.ndarray  # shaft axis, pointing proximally (superior)
    e_m: np.ndarray
    e_a: np.ndarray
    e1n: np.ndarray
    e2n: np.ndarray
    P: np.ndarray
    L: float
    p: dict  # all other scalars / points


def _sample_hips(rng: np.random.Generator, sides, centre, bilateral: bool, var: Variation,
                 rng_extra: np.random.Generator) -> list[_Hip]:
    base = None
    hips = []
    for side in sides:
        u = rng.uniform
        if base is None:
            base = {
                "R": var.u(rng, "head_radius"),
                "nsa": var.u(rng, "neck_shaft_angle"),
                "av": var.u(rng, "anteversion"),
                "L": var.u(rng, "neck_length"),
                "neck_ratio": u(0.60, 0.68),
                "tilt": var.u(rng, "shaft_adduction"),
                "tilt_ap": var.u(rng, "shaft_tilt_ap"),
                "r_sh_ratio": u(0.55, 0.63),
                "head_off2": u(80.0, 92.0) if bilateral else var.u(rng, "head_offset_ml"),
                "head_off1": var.u(rng, "head_offset_si"),
                "ap_jit": var.u(rng, "ap_offset"),
                # drawn from the extra stream (always, so the stream does not depend on the world)
                "aspect": var.u(rng_extra, "head_aspect"),
                "roll": var.u(rng_extra, "femur_roll", size=3).tolist(),
                "cortex_scale": var.u(rng_extra, "cortex_scale"),
            }
            q = dict(base)
        else:  # the other hip of the same subject: nearly symmetric
            q = dict(base)
            for k, s in (("R", 0.4), ("nsa", 2.0), ("av", 3.0), ("L", 1.5), ("tilt", 1.0), ("head_off2", 3.0),
                         ("head_off1", 2.0), ("ap_jit", 2.0)):
                q[k] = base[k] + rng.normal(0.0, s)
        hips.append(_build_hip(rng, side, q, centre, bilateral, var))
    return hips


def _build_hip(rng: np.random.Generator, side: str, q: dict, centre, bilateral: bool = False,
               var: Variation | None = None) -> _Hip:
    var = var or variation("narrow")
    u = rng.uniform
    m = 1.0 if side == "right" else -1.0
    SUP, ANT, MED = np.array([0.0, -1.0, 0.0]), np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, m])
    t, tap = math.radians(q["tilt"]), math.radians(q["tilt_ap"])
    d_s = _unit(SUP * math.cos(t) - MED * math.sin(t) + ANT * math.sin(tap))
    e_m = _unit(MED - (MED @ d_s) * d_s)
    e_a = _unit(np.cross(d_s, e_m) * (1.0 if np.cross(d_s, e_m) @ ANT > 0 else -1.0))
    th = math.radians(180.0 - q["nsa"])
    av = math.radians(q["av"])
    n = _unit(math.cos(th) * d_s + math.sin(th) * (math.cos(av) * e_m + math.sin(av) * e_a))
    e1n = _unit(d_s - (d_s @ n) * n)
    e2n = _unit(np.cross(n, e1n))
    roll = [float(a) for a in q.get("roll", (0.0, 0.0, 0.0))]
    if any(roll):  # the whole femur rotated about its head centre (pose in the scanner)
        rot = _rotation(roll)
        d_s, e_m, e_a, n, e1n, e2n = (rot @ v for v in (d_s, e_m, e_a, n, e1n, e2n))
    R = float(q["R"])
    L = float(q["L"])
    # unilateral: the head sits medially of the field-of-view centre (the femur fills it);
    # bilateral: each head is half the inter-head distance lateral of the midline
    off2 = -m * q["head_off2"] if bilateral else m * q["head_off2"]
    H = np.array([centre[0], centre[1] - q["head_off1"], centre[2] + off2], float)
    P = H - L * n
    r_n = R * q["neck_ratio"]
    r_sh = R * q["r_sh_ratio"]
    ck = float(q.get("cortex_scale", 1.0))
    p: dict[str, Any] = {
        "r_n": r_n,
        "neck_ka": u(1.0, 1.08),  # neck cross-section: taller (superior-inferior) than deep
        "neck_kb": u(0.86, 0.94),
        "t_w": R * 0.9 + u(0.0, 3.0),  # neck waist, mm from head centre along the neck axis
        "neck_flare": u(0.35, 0.60),
        "r_sh": r_sh,
        "sh_flare": u(0.12, 0.25),
        "s_top": u(0.0, 6.0),
        # greater trochanter: tapered capsule from its rounded tip (``gt_tip`` mm above the
        # neck/shaft intersection) down the lateral shaft; AP wider than ML
        "gt_tip": max(20.0, L * math.cos(th) * u(0.95, 1.2)), "gt_lat": u(1.0, 5.0), "gt_post": u(2.0, 7.0),
        "gt_r": u(9.0, 12.0), "gt_ap": u(1.2, 1.5),
        "lt_down": u(24.0, 32.0), "lt_phi": u(25.0, 55.0), "lt_r": (u(9.0, 13.0), u(5.5, 7.5), u(6.0, 8.0)),
        "fovea_r": u(3.0, 4.5),
        "t_head": u(0.5, 0.9) * ck, "t_meta": u(0.8, 1.3) * ck, "t_calcar": u(2.5, 4.0) * ck,
        "t_shaft": u(3.0, 5.0) * ck,
        "gap": u(1.5, 3.0),  # joint space (cartilage + fluid) between head and acetabulum
        "acet_incl": u(40.0, 55.0), "acet_av": u(10.0, 22.0), "acet_cut": u(-0.08, 0.12),
        "acet_roof": u(14.0, 22.0), "acet_med": u(3.5, 6.0), "pel_cortex": u(0.9, 1.6),
        "fossa_depth": u(3.0, 6.0), "fossa_angle": u(28.0, 40.0),
        "labrum_len": u(5.0, 8.0), "labrum_base": u(3.5, 5.5),
        "cap_in": u(0.6, 1.8), "cap_th": u(1.8, 3.5),
        "ilium_r": (u(18.0, 22.0), u(10.0, 14.0)), "ilium_lat": u(15.0, 35.0), "ilium_med": u(-3.0, 2.0),
        "ilium_flat": u(1.2, 1.5),
        "isch_r": (u(10.0, 13.0), u(11.0, 15.0)), "pubis_r": (u(8.0, 10.0), u(6.5, 8.5)),
        "physis_off": u(0.15, 0.40), "physis_tilt": u(-0.25, 0.25),
        "bv_scale": u(0.7, 1.2),  # trabecular density (osteoporosis variation)
        "red_marrow": var.u(rng, "red_marrow"),
        "vessel_ap": u(4.0, 12.0), "vessel_med": u(3.0, 15.0), "vessel_bright": bool(rng.random() < 0.6),
    }
    # anterior-posterior placement: centre the femur's AP extent (head, shaft, trochanter)
    G = P + (p["gt_tip"] - p["gt_r"]) * d_s - p["gt_lat"] * e_m - p["gt_post"] * e_a
    lo = min(H[0] - R, P[0] - r_sh * 1.3, G[0] - p["gt_r"] * p["gt_ap"])
    hi = max(H[0] + R, P[0] + r_sh * 1.3, G[0] + p["gt_r"] * p["gt_ap"])
    shift = centre[0] + q["ap_jit"] - 0.5 * (lo + hi)
    H = H + np.array([shift, 0.0, 0.0])
    P = P + np.array([shift, 0.0, 0.0])
    hip = _Hip(side=side, m=m, H=H, R=R, n=n, d_s=d_s, e_m=e_m, e_a=e_a, e1n=e1n, e2n=e2n, P=P, L=L, p=p)
    p["nsa"] = float(q["nsa"])
    p["head_aspect"] = float(q.get("aspect", 1.0))
    p["roll"] = roll
    p["cortex_scale"] = ck
    p["av"] = float(q["av"])
    p["tilt"] = float(q["tilt"])
    _derive_points(hip)
    return hip


def _derive_points(h: _Hip) -> None:
    p = h.p
    SUP, INF = np.array([0.0, -1.0, 0.0]), np.array([0.0, 1.0, 0.0])
    ANT, POST = np.array([1.0, 0.0, 0.0]), np.array([-1.0, 0.0, 0.0])
    MED = np.array([0.0, 0.0, h.m])
    LAT = -MED
    # greater trochanter: centre of its rounded tip (lateral / posterior / above the
    # neck-shaft intersection) and the base of the capsule on the lateral shaft
    p["G"] = h.P + (p["gt_tip"] - p["gt_r"]) * h.d_s - p["gt_lat"] * h.e_m - p["gt_post"] * h.e_a
    p["G_base"] = h.P - 22.0 * h.d_s - (p["r_sh"] - 6.0) * h.e_m - 0.3 * p["gt_post"] * h.e_a
    # lesser trochanter: posteromedial bump below the neck
    phi = math.radians(p["lt_phi"])
    radial = _unit(math.cos(phi) * h.e_m - math.sin(phi) * h.e_a)
    s_lt = -p["lt_down"]
    r_at = p["r_sh"] * (1.0 + p["sh_flare"] * float(_smoothstep((s_lt + 45.0) / 45.0)))
    p["Lt"] = h.P + s_lt * h.d_s + (r_at + 1.0) * radial
    p["lt_axes"] = (h.d_s, radial, _unit(np.cross(h.d_s, radial)))
    # fovea capitis: medial-inferior-posterior on the head surface
    p["fovea_dir"] = _unit(h.n + 0.6 * INF + 0.15 * POST)
    p["F"] = h.H + (h.R + 0.6 * p["fovea_r"]) * p["fovea_dir"]
    # acetabulum: cup around the head; opening (lateral / inferior / anterior) axis
    inc, aav = math.radians(p["acet_incl"]), math.radians(p["acet_av"])
    opening = _unit(math.cos(inc) * INF + math.sin(inc) * (math.cos(aav) * LAT + math.sin(aav) * ANT))
    p["cup_in"] = _unit(-opening)  # into the pelvis (deep)
    p["R_in"] = h.R + p["gap"]
    p["fossa_dir"] = _unit(p["cup_in"] + 0.9 * INF + 0.2 * POST)
    # pelvic bone pieces (tapered capsules)
    R_in = p["R_in"]
    p["ilium_a"] = h.H + SUP * (R_in + 9.0) + MED * p["ilium_med"]
    p["ilium_b"] = p["ilium_a"] + SUP * 75.0 + LAT * p["ilium_lat"] + POST * 8.0
    p["isch_a"] = h.H + INF * (0.35 * R_in) + POST * (0.75 * R_in) + MED * (0.45 * R_in)
    p["isch_b"] = p["isch_a"] + INF * 60.0 + POST * 6.0 + MED * 4.0
    p["pubis_a"] = h.H + ANT * (0.55 * R_in) + INF * (0.25 * R_in) + MED * (0.6 * R_in)
    p["pubis_b"] = p["pubis_a"] + MED * 70.0 + ANT * 14.0 + INF * 12.0
    # physeal scar: plane across the head, normal close to the neck axis
    p["physis_n"] = _unit(h.n + p["physis_tilt"] * h.e1n)
    p["physis_c"] = h.H - p["physis_off"] * h.R * h.n
    # femoral vessels: anterior-medial to the head, running inferiorly
    p["vessel_a"] = h.H + ANT * (h.R + p["vessel_ap"] + 6.0) + MED * p["vessel_med"] + SUP * 80.0
    p["vessel_b"] = p["vessel_a"] + INF * 180.0 + LAT * 12.0


def _hip_meta(h: _Hip) -> dict[str, Any]:
    p = h.p
    shaft_down = -h.d_s
    nsa = math.degrees(math.acos(float(np.clip(h.n @ shaft_down, -1, 1))))
    return {
        "side": h.side,
        "head_centre_mm": _jsonable(h.H),
        "head_radius_mm": float(h.R),
        "neck_axis": _jsonable(h.n),
        "shaft_axis": _jsonable(shaft_down),
        "neck_shaft_point_mm": _jsonable(h.P),
        "neck_length_mm": float(h.L),
        "neck_shaft_angle_deg": float(nsa),
        "anteversion_deg": float(p["av"]),
        "shaft_adduction_deg": float(p["tilt"]),
        "femoral_offset_mm": float(h.L * math.sin(math.radians(180.0 - nsa))),
        "neck_radius_mm": float(p["r_n"]),
        "neck_waist_from_head_centre_mm": float(p["t_w"]),
        "shaft_radius_mm": float(p["r_sh"]),
        "greater_trochanter_centre_mm": _jsonable(p["G"]),
        "lesser_trochanter_centre_mm": _jsonable(p["Lt"]),
        "cortical_thickness_mm": {
            "head": float(p["t_head"]), "neck_superior": float(p["t_meta"]),
            "calcar": float(p["t_calcar"]), "shaft": float(p["t_shaft"]),
        },
        "joint_space_mm": float(p["gap"]),
        "head_aspect": float(p["head_aspect"]),
        "femur_roll_deg": [float(a) for a in p["roll"]],
        "cortex_scale": float(p["cortex_scale"]),
        "acetabulum_centre_mm": _jsonable(h.H),
        "acetabulum_axis": _jsonable(p["cup_in"]),
        "acetabular_inclination_deg": float(p["acet_incl"]),
    }


def _sample_body(rng: np.random.Generator, hips, centre, bilateral: bool) -> dict[str, Any]:
    u = rng.uniform
    body: dict[str, Any] = {"lateral": []}
    body["fat_mm"] = u(5.0, 16.0)
    body["fat_var_mm"] = u(2.0, 5.0)
    body["skin_thickness_mm"] = u(1.2, 2.2)
    body["fascia_mm"] = u(0.8, 1.6)
    body["septa_width"] = u(0.05, 0.09)
    body["plane_pelvis_mm"] = u(8.0, 16.0)
    for h in hips:
        G, p = h.p["G"], h.p
        # most lateral bone (col, mm): the trochanter tip or the flared shaft below it
        cands = (G[2] - h.m * p["gt_r"], h.P[2] - h.m * p["r_sh"] * (1.0 + p["sh_flare"]))
        bone_lat = min(cands) if h.m > 0 else max(cands)
        # muscle / tendon layer (>= 6 mm), subcutaneous fat (with its variation) and skin
        soft = u(6.0, 18.0) + body["fat_mm"] + body["fat_var_mm"] + body["skin_thickness_mm"]
        body["lateral"].append({
            "m": h.m,
            "skin_mm": float(bone_lat - h.m * soft),
            "ap_centre_mm": float(h.H[0] + u(-10.0, 5.0)),
            "si_centre_mm": float(G[1] + u(-5.0, 15.0)),
            "r_ap": u(70.0, 120.0),
            "r_si": u(120.0, 300.0),
        })
    body["bilateral"] = bilateral
    body["midline_mm"] = float(centre[2])
    if bilateral:  # pelvic fat and the bladder between the hips, above the symphysis
        half = 0.5 * abs(hips[0].H[2] - hips[1].H[2])
        inner = half - max(h.p["R_in"] + h.p["acet_med"] for h in hips) - u(10.0, 16.0)
        c = np.array([np.mean([h.H[0] for h in hips]) + u(0.0, 10.0), np.mean([h.H[1] for h in hips]) - u(0.0, 10.0),
                      centre[2]])
        body["pelvic_fat_centre_mm"] = c
        body["pelvic_fat_radii_mm"] = np.array([u(35.0, 45.0), u(40.0, 55.0), max(inner, 20.0)])
        body["bladder_centre_mm"] = c + np.array([u(0.0, 8.0), u(-10.0, 0.0), 0.0])
        body["bladder_radii_mm"] = np.array([u(15.0, 28.0), u(15.0, 30.0), min(max(inner, 20.0) - 8.0, u(20.0, 35.0))])
    return body


def _sample_tissue_values(rng: np.random.Generator, modality: str, var: Variation) -> dict[str, float]:
    u = rng.uniform
    if modality == "mr":
        j = lambda a, b: u(a, b)  # noqa: E731
        w = lambda key: var.u(rng, key)  # noqa: E731
        return {
            "gain": w("gain"),
            "air": 0.0,
            "fat": 1.0,
            "skin": j(0.40, 0.55),
            "fascia": j(0.06, 0.14),
            "muscle": w("muscle"),
            "septa": j(0.65, 0.85),
            "marrow_femur": w("marrow_femur"),
            "marrow_pelvis": j(0.62, 0.85),
            "trab_dark": w("trab_dark"),
            "cortex": w("cortex"),
            "cartilage": j(0.30, 0.45),
            "fluid": j(0.12, 0.25),
            "capsule": j(0.06, 0.14),
            "labrum": j(0.04, 0.10),
            "tendon": j(0.05, 0.12),
            "vessel_bright": j(0.85, 1.15),
            "vessel_dark": j(0.05, 0.15),
            "physis": j(0.25, 0.45),
            "cyst": j(0.22, 0.40),
            "cyst_rim": j(0.05, 0.12),
            "foci": j(0.03, 0.10),
        }
    return {
        "gain": 1.0,
        "air": -1000.0,
        "fat": u(-115.0, -85.0),
        "skin": u(10.0, 40.0),
        "fascia": u(50.0, 80.0),
        "muscle": u(35.0, 55.0),
        "septa": u(-100.0, -70.0),
        "marrow_femur": u(-70.0, -30.0),
        "marrow_pelvis": u(-10.0, 40.0),
        "trab_bone": u(650.0, 1050.0),
        "cortex": u(1200.0, 1800.0),
        "cartilage": u(80.0, 110.0),
        "fluid": u(5.0, 20.0),
        "capsule": u(55.0, 80.0),
        "labrum": u(70.0, 95.0),
        "tendon": u(70.0, 100.0),
        "vessel_bright": u(35.0, 50.0),
        "vessel_dark": u(35.0, 50.0),
        "physis": u(400.0, 700.0),
        "cyst": u(10.0, 35.0),
        "cyst_rim": u(500.0, 900.0),
        "foci": u(700.0, 1200.0),
    }


def _sample_cyst(rng: np.random.Generator, h: _Hip) -> dict[str, Any]:
    u = rng.uniform
    t = u(0.0, 1.0) * (h.p["t_w"] + 6.0)  # along the neck axis from the head centre
    c = h.H - t * h.n + u(-0.2, 0.2) * h.p["r_n"] * h.e1n + u(-0.2, 0.2) * h.p["r_n"] * h.e2n
    r_local = h.p["r_n"] if t > h.R * 0.7 else h.R * 0.85
    rad = np.array([u(6.0, 13.0), u(5.0, 10.0), u(5.0, 10.0)])
    rad = np.minimum(rad, max(3.0, r_local - 3.0 - float(np.linalg.norm(c - (h.H - t * h.n)))))
    axes = (h.n, h.e1n, h.e2n)
    n_foci = int(rng.integers(4, 12))
    foci = []
    for _ in range(n_foci):  # hypointense foci (calcium deposits) in and around the cyst
        cc = c + rng.normal(0.0, 1.0, 3) * (float(rad.max()) + 3.0) * 0.6
        foci.append((cc, u(0.8, 2.2)))
    return {"centre_mm": c, "radii_mm": rad, "axes": [a for a in axes], "rim_mm": u(0.6, 1.4),
            "foci_centres_mm": [f[0] for f in foci], "foci_radii_mm": [f[1] for f in foci]}


def _sample_foldover(rng: np.random.Generator, shape, h: _Hip) -> dict[str, Any]:
    axis = 2 if rng.random() < 0.75 else 1
    frac = rng.uniform(0.18, 0.35)
    return {"axis": axis, "n_ext": max(2, int(round(frac * shape[axis]))), "strength": rng.uniform(0.5, 0.95),
            "falloff": rng.uniform(0.5, 0.9)}


# ----------------------------------------------------------------------------- noise fields


def _fourier_noise(rng: np.random.Generator, shape, spacing, sigma_lo, sigma_hi=None, direction=None,
                   elong: float = 1.0) -> np.ndarray:
    """Gaussian random field with a (difference of) Gaussian spectrum, unit std, float32.

    ``sigma_lo`` / ``sigma_hi`` are per-axis correlation lengths in mm (band-pass when
    ``sigma_hi`` is given). ``direction`` (unit vector, mm space) with ``elong`` > 1 stretches
    the correlation along that direction.
    """
    freqs = [_fft.fftfreq(n, d=s).astype(np.float32) for n, s in zip(shape[:2], spacing[:2])]
    freqs.append(_fft.rfftfreq(shape[2], d=spacing[2]).astype(np.float32))
    k = [freqs[0][:, None, None], freqs[1][None, :, None], freqs[2][None, None, :]]

    def quad(sig):
        sig = np.broadcast_to(np.asarray(sig, np.float32), (3,))
        q = (k[0] * sig[0]) ** 2 + (k[1] * sig[1]) ** 2 + (k[2] * sig[2]) ** 2
        if direction is not None and elong != 1.0:
            kd = (k[0] * _F32(direction[0] * sig[0]) + k[1] * _F32(direction[1] * sig[1])
                  + k[2] * _F32(direction[2] * sig[2]))
            q = q + (elong * elong - 1.0) * kd * kd
        return q

    spec = np.exp(_F32(-2.0 * math.pi**2) * quad(sigma_lo))
    if sigma_hi is not None:
        spec = spec - np.exp(_F32(-2.0 * math.pi**2) * quad(sigma_hi))
    spec[0, 0, 0] = 0.0  # zero mean
    half = spec.shape
    white = np.empty(half, np.complex64)
    white.real = rng.standard_normal(half, dtype=np.float32)
    white.imag = rng.standard_normal(half, dtype=np.float32)
    white *= spec
    field_ = _fft.irfftn(white, s=shape, axes=(0, 1, 2)).astype(np.float32, copy=False)
    sd = float(field_[:, ::3, ::3].std())
    field_ *= _F32(1.0 / (sd if sd > 0 else 1.0))
    return field_


def _fast_noise(rng: np.random.Generator, shape, spacing, *args, **kwargs) -> np.ndarray:
    """:func:`_fourier_noise` on an FFT-friendly (larger) grid, cropped to ``shape``."""
    big = tuple(_fft.next_fast_len(int(n), real=True) for n in shape)
    f = _fourier_noise(rng, big, spacing, *args, **kwargs)
    return f[: shape[0], : shape[1], : shape[2]]


def _interp_matrix(x: np.ndarray, x0: float, step: float, m: int) -> np.ndarray:
    """Linear interpolation matrix ``(len(x), m)`` from a regular coarse grid ``x0 + j * step``."""
    u = np.clip((np.asarray(x, float).ravel() - x0) / step, 0.0, m - 1.000001)
    j = np.floor(u).astype(int)
    w = u - j
    a = np.zeros((u.size, m), np.float32)
    a[np.arange(u.size), j] = 1.0 - w
    a[np.arange(u.size), j + 1] += w
    return a


def _smooth_noise(rng: np.random.Generator, g: _Grid, sigma_mm, coarse_mm: float = 2.0, **kwargs) -> np.ndarray:
    """Low-frequency random field (correlation lengths ``sigma_mm`` >> voxel): synthesised on a
    coarse in-plane grid (``coarse_mm``) and linearly interpolated onto the render grid."""
    x1, x2 = g.x[1].ravel(), g.x[2].ravel()
    m1 = int(math.ceil((x1[-1] - x1[0]) / coarse_mm)) + 2
    m2 = int(math.ceil((x2[-1] - x2[0]) / coarse_mm)) + 2
    coarse = _fast_noise(rng, (g.shape[0], m1, m2), (g.render_spacing[0], coarse_mm, coarse_mm), sigma_mm, **kwargs)
    a1 = _interp_matrix(x1, float(x1[0]), coarse_mm, m1)
    a2 = _interp_matrix(x2, float(x2[0]), coarse_mm, m2)
    n0 = coarse.shape[0]
    tmp = (np.ascontiguousarray(coarse).reshape(n0 * m1, m2) @ a2.T).reshape(n0, m1, -1)
    return np.einsum("ij,bjk->bik", a1, tmp, optimize=True).astype(np.float32, copy=False)


def _noise_fields(rng: np.random.Generator, g: _Grid, hips, trab_scale: float = 1.0) -> dict[str, np.ndarray]:
    rs = g.render_spacing
    lo = np.maximum(0.4, 1.2 * np.array(rs))
    lo[0] = max(lo[0], 0.8)
    lo = lo * float(trab_scale)  # texture length scale (mm); 1 keeps the narrow world's arrays
    h = hips[0]
    # trabecular texture: band-pass noise, one field stretched along SI (head / compressive
    # group), one along the neck axis (tensile group / neck)
    trab_si = _fast_noise(rng, g.shape, rs, lo, 2.5 * lo, direction=(0.0, 1.0, 0.0), elong=2.5)
    trab_neck = _fast_noise(rng, g.shape, rs, lo, 2.5 * lo, direction=h.n, elong=2.5)
    septa = _smooth_noise(rng, g, np.array([12.0, 30.0, 10.0]))
    low = _smooth_noise(rng, g, np.array([8.0, 12.0, 12.0]))
    return {"trab_si": trab_si, "trab_neck": trab_neck, "septa": septa, "low": low}


# ----------------------------------------------------------------------------- rendering


def _femur_sdf(g: _Grid, h: _Hip) -> dict[str, np.ndarray]:
    """Periosteal SDF of the proximal femur (mm, negative inside) and helper fields."""
    p = h.p
    rH = _rel(g, h.H)
    dist_H = np.sqrt(_norm2(rH))
    # neck: tapered elliptical cylinder from the head centre (t = 0) to the shaft (t = L)
    t = -_dot(rH, h.n)
    p1 = _dot(rH, h.e1n)
    p2 = _dot(rH, h.e2n)
    k = p.get("head_aspect", 1.0)
    if k == 1.0:
        head = dist_H - _F32(h.R)
    else:  # spheroid with semi-axis k R along the neck axis (an approximate distance, exact at k = 1)
        head = (np.sqrt((t / _F32(k)) ** 2 + p1 * p1 + p2 * p2) - _F32(h.R)) * _F32(min(k, 1.0))
    t_w, L = p["t_w"], h.L
    s_in = np.clip((t_w - t) / _F32(t_w), 0.0, 1.0)
    s_out = np.clip((t - t_w) / _F32(L - t_w), 0.0, 1.0)
    r_t = _F32(p["r_n"]) * (1.0 + 0.12 * s_in * s_in + _F32(p["neck_flare"]) * s_out * s_out)
    rho = np.sqrt((p1 / _F32(p["neck_ka"])) ** 2 + (p2 / _F32(p["neck_kb"])) ** 2)
    neck = np.maximum((rho - r_t) * _F32(p["neck_kb"]), np.maximum(-t, t - _F32(L + 4.0)))
    headneck = _smin(head, neck, 4.0)
    # shaft: flaring cylinder along d_s through P
    rP = _rel(g, h.P)
    s = _dot(rP, h.d_s)
    rad2 = _norm2(rP) - s * s
    r_s = _F32(p["r_sh"]) * (1.0 + _F32(p["sh_flare"]) * _smoothstep((s + 45.0) / 45.0))
    shaft = np.maximum(np.sqrt(np.maximum(rad2, 0.0)) - r_s, s - _F32(p["s_top"]))
    f = _smin(headneck, shaft, 6.0)
    gt = _segment(g, p["G"], p["G_base"], p["gt_r"], 6.0, flat=h.e_a, flat_k=p["gt_ap"])
    f = _smin(f, gt, 5.0)
    lt = _ellipsoid(g, p["Lt"], p["lt_axes"], p["lt_r"])
    f = _smin(f, lt, 5.0)
    fov_ = np.sqrt(_norm2(_rel(g, p["F"]))) - _F32(p["fovea_r"])
    f = _smax(f, -fov_, 1.2)
    return {"f": f, "headneck": headneck, "dist_H": dist_H, "t": t, "p1": p1, "p2": p2, "s": s, "rad2": rad2,
            "r_s": r_s, "rH": rH}


def _cortical_thickness(h: _Hip, fs: dict, low: np.ndarray) -> np.ndarray:
    """Cortical thickness (mm) field: thin in the head, thick in the calcar and the shaft."""
    p = h.p
    t, p1, p2, s = fs["t"], fs["p1"], fs["p2"], fs["s"]
    w_head = _smoothstep((_F32(p["t_w"]) - t) / 6.0)
    pr = np.sqrt(p1 * p1 + p2 * p2) + _F32(1e-3)
    inferior = np.clip(-p1 / pr, 0.0, 1.0)
    # the neck beyond its waist, fading out 8-20 mm below the neck-shaft intersection
    w_neck = _smoothstep((t - _F32(p["t_w"] - 6.0)) / 8.0) * _smoothstep((s + 20.0) / 12.0)
    w_calc = inferior * inferior * w_neck * (1.0 - w_head)
    w_sh = _smoothstep((-s - 12.0) / 45.0)
    tc = _F32(p["t_meta"]) + _F32(p["t_head"] - p["t_meta"]) * w_head
    tc = tc + _F32(p["t_calcar"] - p["t_meta"]) * w_calc
    tc = tc + _F32(p["t_shaft"] - p["t_meta"]) * w_sh * (1.0 - w_calc)
    return np.clip(tc * (1.0 + 0.12 * low), 0.4, 6.0)


def _trabecular_density(g: _Grid, h: _Hip, fs: dict) -> np.ndarray:
    """Bone-volume fraction of the trabecular texture (0..~0.5) inside the femur."""
    p = h.p
    t, s = fs["t"], fs["s"]
    dens = np.full(t.shape, 0.12, np.float32)
    # head
    in_head = _smoothstep((_F32(p["t_w"]) - t) / 8.0) * _smoothstep((_F32(h.R + 2.0) - fs["dist_H"]) / 6.0)
    dens = dens + _F32(0.14) * in_head
    # compressive group: superior head dome -> inferior (calcar) neck
    a = h.H + 0.75 * h.R * _unit(h.d_s + 0.3 * h.n)
    b = h.H - (p["t_w"] + 10.0) * h.n - 0.8 * p["r_n"] * h.e1n
    dc = _segment(g, a, b, 0.0, 0.0)
    dens = dens + _F32(0.18) * np.exp(-(dc * dc) / _F32(2 * 5.5**2))
    # tensile group: inferior head -> superior neck -> lateral cortex below the trochanter
    t1 = h.H + 0.7 * h.R * _unit(-h.e1n + 0.6 * h.n)
    t2 = h.H - 0.6 * h.L * h.n + 0.75 * p["r_n"] * h.e1n
    t3 = h.P - 18.0 * h.d_s - 1.0 * p["r_sh"] * h.e_m
    dt = np.minimum(_segment(g, t1, t2, 0.0, 0.0), _segment(g, t2, t3, 0.0, 0.0))
    dens = dens + _F32(0.10) * np.exp(-(dt * dt) / _F32(2 * 4.0**2))
    # Ward's triangle: sparse
    w = np.sqrt(_norm2(_rel(g, h.H - 0.72 * h.L * h.n - 0.15 * p["r_n"] * h.e1n)))
    dens = dens - _F32(0.10) * np.exp(-(w * w) / _F32(2 * 6.0**2))
    # medullary canal: no trabeculae below the lesser trochanter
    dens = dens * (1.0 - _smoothstep((-s - 15.0) / 35.0))
    return np.clip(dens * _F32(p["bv_scale"]), 0.0, 0.6)


def _pelvis_sdf(g: _Grid, h: _Hip, dist_H: np.ndarray, bilateral: bool, midline: float) -> dict[str, np.ndarray]:
    p = h.p
    rH = _rel(g, h.H)
    z = _dot(rH, p["cup_in"])
    R_in = _F32(p["R_in"])
    up = -rH[1] / (dist_H + _F32(1e-3))
    med = _F32(h.m) * rH[2] / (dist_H + _F32(1e-3))
    # thick roof above the head, thin medial wall (quadrilateral plate), bevelled lateral rim
    roof = np.clip(up + 0.3 * med - 0.3, 0.0, 1.0) / 0.7
    thick = _F32(p["acet_med"]) + _F32(p["acet_roof"] - p["acet_med"]) * roof
    cup = np.maximum(np.maximum(R_in - dist_H, dist_H - R_in - thick), -z - _F32(p["acet_cut"] * p["R_in"]))
    SUP = np.array([0.0, -1.0, 0.0])
    il = _segment(g, p["ilium_a"], p["ilium_b"], p["ilium_r"][0], p["ilium_r"][1], flat=np.array([0, 0, 1.0]),
                  flat_k=1.0 / p["ilium_flat"])
    pel = _smin(cup, il, 8.0)
    isch = _segment(g, p["isch_a"], p["isch_b"], p["isch_r"][0], p["isch_r"][1])
    pel = _smin(pel, isch, 6.0)
    pub_b = p["pubis_b"].copy()
    if bilateral:  # superior pubic rami meet at the symphysis
        pub_b[2] = midline - h.m * 1.5
    pub = _segment(g, p["pubis_a"], pub_b, p["pubis_r"][0], p["pubis_r"][1], flat=SUP, flat_k=0.8)
    pel = _smin(pel, pub, 6.0)
    # acetabular fossa (filled with fat) and the articular surface
    fossa_cos = _dot(rH, p["fossa_dir"]) / (dist_H + _F32(1e-3))
    fossa = (fossa_cos > _F32(math.cos(math.radians(p["fossa_angle"])))) & (dist_H < R_in + _F32(p["fossa_depth"]))
    pel = np.maximum(pel, R_in - dist_H)
    return {"f": pel, "z": z, "fossa": fossa & (pel < 0.0)}


def _body_sdf(g: _Grid, body: dict) -> np.ndarray:
    """Signed distance (mm, negative inside) to the skin (lateral surfaces only)."""
    d = None
    for lat in body["lateral"]:
        a = g.x[0] - _F32(lat["ap_centre_mm"])
        b = g.x[1] - _F32(lat["si_centre_mm"])
        skin = _F32(lat["skin_mm"]) + _F32(lat["m"]) * (a * a / _F32(2 * lat["r_ap"]) + b * b / _F32(2 * lat["r_si"]))
        di = _F32(lat["m"]) * (skin - g.x[2])
        d = di if d is None else np.maximum(d, di)
    return d


def _render(g: _Grid, hips, body, tv, fields, modality: str, cyst) -> tuple[np.ndarray, list, list]:
    """Render the tissue image on the render grid, slab by slab of coronal planes (the
    arrays of a slab stay in the CPU cache); returns (image, [periosteal masks],
    [endosteal masks]) with one boolean mask pair per hip."""
    img = np.empty(g.shape, np.float32)
    peri = [np.empty(g.shape, bool) for _ in hips]
    endo = [np.empty(g.shape, bool) for _ in hips]
    step = max(1, (1 << 18) // (g.shape[1] * g.shape[2]))
    for i0 in range(0, g.shape[0], step):
        i1 = min(g.shape[0], i0 + step)
        im, pe, en = _render_slab(g.slab(i0, i1), hips, body, tv, {k: v[i0:i1] for k, v in fields.items()},
                                  modality, cyst)
        img[i0:i1] = im
        for h in range(len(hips)):
            peri[h][i0:i1] = pe[h]
            endo[h][i0:i1] = en[h]
    return img, peri, endo


def _render_slab(g: _Grid, hips, body, tv, fields, modality: str, cyst) -> tuple[np.ndarray, list, list]:
    mr = modality == "mr"
    low = fields["low"]
    d_body = _body_sdf(g, body)
    # muscle: compartments separated by the septa differ in signal (the septa are the zero
    # set of the same field), plus a faint fibre striation along the muscles (superior-inferior)
    compart = np.tanh(_F32(3.0) * fields["septa"])
    if mr:
        img = _F32(tv["muscle"]) * (1.0 + _F32(0.07) * compart + _F32(0.05) * low + _F32(0.03) * fields["trab_si"])
    else:
        img = _F32(tv["muscle"]) + _F32(6.0) * compart + _F32(4.0) * low
    del compart
    # intermuscular fat septa (sheets, mostly along the muscles, i.e. superior-inferior)
    sep = np.abs(fields["septa"]) < _F32(body["septa_width"]) * (1.0 + 0.7 * low)
    np.copyto(img, _F32(tv["septa"]), where=sep)
    del sep
    # fascia lata / iliotibial band, subcutaneous fat, skin, air
    fat_th = _F32(body["fat_mm"]) + _F32(body["fat_var_mm"]) * low  # smooth variation
    depth = -d_body
    np.copyto(img, _F32(tv["fascia"]), where=(depth < fat_th + _F32(body["fascia_mm"])) & (depth >= fat_th))
    np.copyto(img, _F32(tv["fat"]), where=depth < fat_th)
    np.copyto(img, _F32(tv["skin"]), where=depth < _F32(body["skin_thickness_mm"]))
    np.copyto(img, _F32(tv["air"]), where=depth < 0.0)
    del fat_th
    if "bladder_centre_mm" in body:
        I3 = (np.eye(3)[0], np.eye(3)[1], np.eye(3)[2])
        pf = _ellipsoid(g, body["pelvic_fat_centre_mm"], I3, body["pelvic_fat_radii_mm"]) + _F32(3.0) * low
        np.copyto(img, _F32(tv["fat"]), where=pf < 0.0)
        bl = _ellipsoid(g, body["bladder_centre_mm"], I3, body["bladder_radii_mm"])
        np.copyto(img, _F32(tv["fluid"]), where=bl < 0.0)
        del pf, bl

    peri_masks, endo_masks = [], []
    for h in hips:
        p = h.p
        fs = _femur_sdf(g, h)
        f = fs["f"]
        dist_H = fs["dist_H"]
        pel = _pelvis_sdf(g, h, dist_H, body["bilateral"], body["midline_mm"])
        fp = pel["f"]
        # fascial fat planes that follow the bones (between muscle groups), broken up by noise
        plane = (np.abs(fp - _F32(body["plane_pelvis_mm"])) < _F32(0.6)) & (low > _F32(-0.3))
        plane &= (g.x[1] < _F32(h.H[1])) & (f > 0) & (d_body < _F32(-body["fat_mm"]))
        np.copyto(img, _F32(tv["septa"]), where=plane)
        del plane
        # femoral artery and vein in the fat of the femoral triangle, anterior-medial to the joint
        va, vb = p["vessel_a"], p["vessel_b"]
        off = h.m * np.array([0.0, 0.0, 8.0])
        sheath = _segment(g, va + 0.5 * off, vb + 0.5 * off, 11.0, 11.0) + 2.0 * low
        np.copyto(img, _F32(tv["fat"]), where=sheath < 0.0)
        del sheath
        vk = "vessel_bright" if p["vessel_bright"] else "vessel_dark"
        np.copyto(img, _F32(tv[vk]), where=_segment(g, va, vb, 3.5, 3.5) < 0.0)
        np.copyto(img, _F32(tv["vessel_dark"]), where=_segment(g, va + off, vb + off, 4.5, 4.5) < 0.0)
        # gluteal tendons on the lateral / superior facet of the greater trochanter
        rG = _rel(g, p["G"])
        up_lat = _dot(rG, _unit(h.d_s * 0.6 - h.e_m))
        tendon = (f > 0.0) & (f < 3.0) & (up_lat > 0.0) & (np.sqrt(_norm2(rG)) < _F32(p["gt_r"] * 2.0))
        np.copyto(img, _F32(tv["tendon"]), where=tendon)
        del rG, up_lat, tendon
        # joint capsule (dark) around the head / neck, joint fluid just inside it
        hn = fs["headneck"]
        capsule_zone = (fs["t"] < _F32(0.8 * h.L)) & (fp > 1.5) & (pel["z"] < _F32(-p["acet_cut"] * p["R_in"] + 2.0))
        np.copyto(img, _F32(tv["fluid"]), where=capsule_zone & (hn < _F32(p["cap_in"])) & (f > 0))
        np.copyto(img, _F32(tv["capsule"]),
                  where=capsule_zone & (hn >= _F32(p["cap_in"])) & (hn < _F32(p["cap_in"] + p["cap_th"])))
        del capsule_zone
        # labrum: dark triangle beyond the bony rim
        z, R_in = pel["z"], _F32(p["R_in"])
        zr = -_F32(p["acet_cut"] * p["R_in"]) - z
        lab = (zr > 0) & (zr < _F32(p["labrum_len"])) & (dist_H > _F32(h.R + 0.4)) & (
            dist_H < R_in + _F32(p["labrum_base"]) * (1.0 - zr / _F32(p["labrum_len"])))
        np.copyto(img, _F32(tv["labrum"]), where=lab)
        del lab, zr
        # joint: cartilage on the head and the acetabulum, a dark fluid line between
        in_cup = z > -_F32(p["acet_cut"] * p["R_in"])
        joint = (dist_H < R_in) & (dist_H >= _F32(h.R) - 0.01) & in_cup
        np.copyto(img, _F32(tv["cartilage"]), where=joint)
        mid_line = np.abs(dist_H - _F32(h.R + 0.5 * p["gap"])) < 0.2
        np.copyto(img, _F32(0.5 * (tv["fluid"] + tv["cartilage"])), where=joint & mid_line)
        head_cart = (dist_H < _F32(h.R + 1.2)) & (f > 0) & (fs["t"] < _F32(p["t_w"] - 3.0)) & ~in_cup
        np.copyto(img, _F32(tv["cartilage"]), where=head_cart)
        del joint, head_cart, in_cup
        # pulvinar fat in the acetabular fossa, ligamentum teres from the fovea to the fossa
        np.copyto(img, _F32(tv["fat"]), where=pel["fossa"])
        lig = _segment(g, p["F"], h.H + (p["R_in"] + 2.0) * p["fossa_dir"], 2.2, 2.8)
        np.copyto(img, _F32(tv["capsule"]), where=(lig < 0) & (f > 0) & (fp > 0))
        del lig
        fp = np.where(pel["fossa"], _BIG, fp)

        # trabecular texture (shared by the pelvis and the femur)
        w_si = _smoothstep((_F32(p["t_w"]) - fs["t"]) / 10.0)
        trab_abs = np.abs(w_si * fields["trab_si"] + (1.0 - w_si) * fields["trab_neck"])
        trab_abs /= np.sqrt(w_si * w_si + (1.0 - w_si) ** 2)
        del w_si
        # pelvic bone: cortex + red-marrow trabecular bone
        pel_in = fp < 0
        pel_trab = _trab_soft(trab_abs, _F32(0.22 * p["bv_scale"]))
        if mr:
            val = _F32(tv["marrow_pelvis"]) * (1.0 - _F32(tv["trab_dark"]) * pel_trab) * (1.0 + 0.08 * low)
        else:
            val = _F32(tv["marrow_pelvis"]) + (_F32(tv["trab_bone"]) - _F32(tv["marrow_pelvis"])) * pel_trab
        np.copyto(img, val, where=pel_in)
        np.copyto(img, _F32(tv["cortex"]) * (1.0 if mr else 0.85), where=pel_in & (fp > -_F32(p["pel_cortex"])))
        del val, pel_in, pel_trab
        # femur: trabecular / medullary interior, physeal scar, cortex
        tc = _cortical_thickness(h, fs, low)
        dens = _trabecular_density(g, h, fs)
        trab = _trab_soft(trab_abs, dens * 1.25 + 0.01)
        del dens
        if mr:
            red = _F32(p["red_marrow"]) * np.clip(low, 0.0, 1.0) * _smoothstep((fs["s"] + 45.0) / 20.0) * (
                1.0 - _smoothstep((fs["s"] - 5.0) / 15.0))
            val = _F32(tv["marrow_femur"]) * (1.0 - _F32(tv["trab_dark"]) * trab) * (1.0 - red)
            del red
        else:
            val = _F32(tv["marrow_femur"]) + (_F32(tv["trab_bone"]) - _F32(tv["marrow_femur"])) * trab
        endo = f < -tc
        peri = f < 0
        np.copyto(img, val, where=endo)
        del val, trab
        phys = _dot(_rel(g, p["physis_c"]), p["physis_n"])
        np.copyto(img, _F32(tv["physis"]), where=endo & (np.abs(phys) < 0.45) & (dist_H < _F32(h.R)))
        del phys
        if cyst is not None and h is hips[0]:
            _draw_cyst(g, img, cyst, tv, endo)
        np.copyto(img, _F32(tv["cortex"]), where=peri & ~endo)
        peri_masks.append(peri)
        endo_masks.append(endo)
        del fs, pel, fp, tc, endo, peri, f, dist_H
    return img, peri_masks, endo_masks


def _trab_soft(abs_noise: np.ndarray, thr) -> np.ndarray:
    """Soft trabecular sheets where |band-passed noise| < thr (fraction ~ 0.8 thr)."""
    return np.clip(1.5 - abs_noise / thr, 0.0, 1.0)


def _draw_cyst(g: _Grid, img: np.ndarray, cyst: dict, tv: dict, endo: np.ndarray) -> None:
    e = _ellipsoid(g, cyst["centre_mm"], cyst["axes"], cyst["radii_mm"])
    np.copyto(img, _F32(tv["cyst_rim"]), where=endo & (e < 0.0))
    np.copyto(img, _F32(tv["cyst"]), where=endo & (e < -_F32(cyst["rim_mm"])))
    for c, r in zip(cyst["foci_centres_mm"], cyst["foci_radii_mm"]):
        d = np.sqrt(_norm2(_rel(g, c))) - _F32(r)
        np.copyto(img, _F32(tv["foci"]), where=endo & (d < 0.0))


# ----------------------------------------------------------------------------- acquisition


def _mr_acquisition(rng, img, g: _Grid, body, tv, fold, hips, var: Variation) -> np.ndarray:
    """Slice profile, surface-coil bias field, fold-over and Rician noise (output grid)."""
    w = var.u(rng, "slice_profile")
    img = ndimage.correlate1d(img, np.array([w, 1.0 - 2.0 * w, w], np.float32), axis=0, mode="nearest")
    # bias: brighter near the lateral surface coil, smooth low-order polynomial elsewhere
    x0, x1, x2 = g.vox
    depth = None
    for lat in body["lateral"]:
        di = _F32(lat["m"]) * (x2 - _F32(lat["skin_mm"]))
        depth = di if depth is None else np.minimum(depth, di)
    fov = np.array(g.out_shape) * np.array(g.spacing)
    c = [(x - _F32(f / 2.0)) / _F32(f) for x, f in zip((x0, x1, x2), fov)]
    a_s, lam = var.u(rng, "bias_surface"), rng.uniform(30.0, 70.0)
    coef = var.u(rng, "bias_poly", size=5).tolist()  # python floats keep the arrays float32
    bias = (1.0 + a_s * np.exp(-np.maximum(depth, 0.0) / _F32(lam))) * (
        1.0 + coef[0] * c[0] + coef[1] * c[1] + coef[2] * c[2] + coef[3] * c[1] * c[2] + 0.5 * coef[4] * c[0] * c[0])
    hc = hips[0].H
    bias_h = (1.0 + a_s * math.exp(-max(_lat_depth(body, hc[2]), 0.0) / lam))
    bias = np.maximum(bias / _F32(bias_h), 0.15).astype(np.float32)
    img = img * bias
    if fold is not None:
        ax, n = fold["axis"], fold["n_ext"]
        N = g.out_shape[ax]
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[ax] = slice(0, n)
        hi[ax] = slice(N + n, N + 2 * n)
        before = img[tuple(lo)].copy()  # tissue before the first column wraps to the end
        after = img[tuple(hi)].copy()  # tissue beyond the last column wraps to the start
        ramp = np.linspace(1.0, fold["falloff"], n, dtype=np.float32)  # coil sensitivity falls off outside
        shp = [1, 1, 1]
        shp[ax] = n
        s = _F32(fold["strength"])
        dst_start = [slice(None)] * 3
        dst_end = [slice(None)] * 3
        dst_start[ax] = slice(n, 2 * n)
        dst_end[ax] = slice(N, N + n)
        img[tuple(dst_start)] += s * after * ramp.reshape(shp)
        img[tuple(dst_end)] += s * before * ramp[::-1].reshape(shp)
    gain = _F32(tv["gain"] * 1.0)
    snr = var.u(rng, "snr")
    sigma = _F32(1.0 / snr)
    n1 = rng.standard_normal(img.shape, dtype=np.float32)
    n2 = rng.standard_normal(img.shape, dtype=np.float32)
    out = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2) * gain
    tv["snr"] = snr
    tv["bias_surface"] = a_s
    return out.astype(np.float32)


def _lat_depth(body: dict, col_mm: float) -> float:
    """Depth (mm) below the lateral skin of a column position (nearest lateral surface)."""
    return min(lat["m"] * (col_mm - lat["skin_mm"]) for lat in body["lateral"])


def _ct_acquisition(rng, img, tv, spacing) -> np.ndarray:
    """Point-spread blur and correlated Gaussian noise (Hounsfield units)."""
    psf_mm = rng.uniform(0.35, 0.6)
    img = ndimage.gaussian_filter(img, sigma=[psf_mm / s for s in spacing], mode="nearest")
    sd = rng.uniform(10.0, 30.0)
    noise = ndimage.gaussian_filter(rng.standard_normal(img.shape, dtype=np.float32), 0.6)
    noise *= _F32(sd / max(float(noise.std()), 1e-6))
    tv["noise_sd_hu"] = sd
    tv["psf_mm"] = psf_mm
    return np.clip(img + noise, -1024.0, 3071.0).astype(np.float32)
