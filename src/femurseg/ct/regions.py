"""Anatomical regions of the proximal femur from the mask's geometry (paper 003, Fig. 7).

:func:`split_regions` splits a proximal femur mask into the four regions of 003 Fig. 7
(the Mindways/DXA-style regions): femoral **head** (1), **neck** (2), **trochanter** (3)
and **intertrochanter** (4); 0 is background. It needs nothing but the mask and the voxel
spacing: everything is measured in physical millimetres (``index * spacing``, origin at the
centre of voxel ``(0, 0, 0)``, canonical ``(A, I, L)`` axes, see ``docs/conventions.md``), so
anisotropic voxels (MR: 1.5 x 0.234 x 0.234 mm) are handled.

The rule
--------
1. **Shaft axis.** Straight line fitted through the centres of the largest inscribed circles of
   the mask's axial cross-sections (constant row) over the distal ``shaft_fraction`` (30 %, at
   least 10 mm) of its superior-inferior extent, by iteratively reweighted least squares (rows
   whose centre jumps off the line, e.g. at the lesser trochanter or a ragged predicted edge,
   count less); the inscribed circle, unlike the centroid, is not dragged medially by the
   lesser trochanter. Direction points distally (towards larger row index). The shaft radius
   is the equivalent-circle radius of the median section area.
2. **Femoral head.** The mask voxel farthest from the shaft axis lies on the medial surface of
   the head (the head sticks out medially by the femoral offset plus the head radius, far more
   than the greater trochanter sticks out laterally). The maximum of the mask's distance
   transform within 40 mm of that point seeds the head centre and radius; then a
   least-squares sphere is fitted to the mask's sub-voxel surface (marching cubes at 0.5)
   around it, iteratively keeping points within a band (``max(1 mm, 8 % r, one voxel)``) of the
   current sphere and, once the neck axis is known, dropping the 60-degree cone facing the neck.
3. **Neck axis.** Through the head centre. Initial direction: towards the centroid of the mask
   in a shell 1.1-1.5 head radii around the centre (on the shaft side); then, three times:
   the mask is resampled on planes perpendicular to the axis (every 1 mm, 0.5 mm in the last
   pass, from 0.4 to 2.8 head radii), keeping in each plane only the connected part that holds
   the axis point; the **neck waist** is the narrowest such section, scanning outwards from
   0.5 head radii, before a section reaches ``neck_flare`` times its area, 2.5 head radii, or
   the point where the axis enters the shaft cylinder (a neck lies between the head and the
   shaft: without that bound an untapered valgus neck had its "waist" in the lateral shaft);
   the axis is re-aimed at the mean centre of the sections' largest inscribed circles within
   3 mm of the waist (the inscribed circle, unlike the centroid, ignores the greater
   trochanter or calcar attached on one side of a section; :data:`INSCRIBED_FRACTION`).
4. **Cuts perpendicular to the neck axis** (``t`` = distance from the head centre along the
   neck axis towards the shaft):

   * head / neck: the **head-neck junction** ``t_hn = sqrt(r_head^2 - r_waist^2)``, where a
     cylinder of the waist's equivalent radius would leave the fitted sphere;
   * neck / trochanter: the **base of the neck** ``t_nb = t_hn + 0.35 r_head`` (``neck_length``),
     but no farther than where the neck axis enters the shaft cylinder (``t_X - r_shaft /
     sin(NSA)``, ``t_X`` the neck/shaft axes' crossing) and at least 5 mm past the junction.
     Why a fixed length and not the anatomical flare (the first section beyond the waist whose
     area reaches ``neck_flare`` = 1.5 times the waist's, still available with
     ``neck_length=None``): the section area rises slowly there, so the flare point moved by up to
     3.3 mm between a reference and a predicted mask of the same CT femur that agreed at DSC
     0.98, i.e. +-30 % of the neck's volume, while ``r_head`` and ``t_hn`` moved by < 0.5 mm
     (16 CT phantoms, ``femurseg experiment ct``: neck volume relative error 10.4 % with the
     flare, 3.4 % with the fixed length, see :data:`NECK_LENGTH`). Like DXA's fixed-width neck
     box, a fixed length compares two segmentations of one femur; it is not an anatomical
     landmark.

   Head = mask with ``t < t_hn`` connected to the head centre; neck = mask with
   ``t_hn <= t < t_nb`` in the slab components that reach within half a waist radius of the
   neck axis.
5. **Trochanter / intertrochanter.** The rest of the mask is split by the
   **intertrochanteric plane**: through the crossing point ``X`` of the neck and shaft axes,
   containing the normal of the neck-shaft plane and the bisector of the neck-shaft angle (the
   line from the lesser trochanter region through ``X`` towards the base of the greater
   trochanter). The superolateral side (greater trochanter) is **trochanter**; the
   inferomedial side (lesser trochanter and whatever shaft the scan holds) is
   **intertrochanter**.

The neck-shaft angle is the 3D angle between the neck axis pointing towards the head and the
shaft axis pointing distally (about 125-135 degrees in adults).

Limits
------
* The regions are geometric approximations of the Mindways/MIAF definitions of 003 Fig. 7,
  not their exact implementation: the neck is bounded by planes perpendicular to the fitted
  neck axis, the trochanter/intertrochanter boundary is one plane (the anatomical
  intertrochanteric line is curved), and the intertrochanter region has no distal cut (it
  takes all the shaft in the mask); compare regional volumes between segmentations of the
  same scan (as 003 Table 2 does), not across software.
* The shaft axis needs a few centimetres of shaft at the distal end of the mask; a mask cut
  just below the lesser trochanter tilts it.
* The head must be mostly inside the mask and the field of view (at least 45 % of the sphere
  covered by surface points; a head cut by the image border or a fractured / resected head
  fails with a :class:`~femurseg.core.errors.FemursegError`).
* Only the largest connected component is used for the fit; other components are assigned to
  regions by the same planes.
* A mask holding both femurs must be split per side first (:mod:`femurseg.ct` crops each hip).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from femurseg.core.errors import FemursegError

REGION_LABELS: dict[str, int] = {"background": 0, "head": 1, "neck": 2, "trochanter": 3, "intertrochanter": 4}
REGION_NAMES: tuple[str, ...] = ("head", "neck", "trochanter", "intertrochanter")

MIN_COVERAGE = 0.45
MIN_HEAD_OFFSET = 0.5
"""Least distance of the head centre from the shaft axis, in head radii. A femur's head sits a
femoral offset (typically 35-45 mm) medial of the shaft axis; a valgus neck that is also short
brings it to about one head radius (the wide phantom world's neck-shaft angles up to 146 degrees
and necks from 38 mm do: 3 of 60 reference labels had 0.95-0.98 radii). A cylinder or a ball,
whose widest part lies on the axis, stays near 0."""
"""Fraction of the head sphere's directions that must carry surface points of the mask."""


@dataclass
class FemurFit:
    """Geometry of one proximal femur, in mm (``index * spacing``, canonical (A, I, L) axes).

    Attributes:
        head_centre_mm: centre of the least-squares head sphere.
        head_radius_mm: its radius.
        neck_axis: unit vector along the neck, pointing from the neck base towards the head.
        shaft_axis: unit vector along the shaft, pointing distally (inferior).
        shaft_point_mm: a point on the shaft axis (centroid of the distal sections).
        shaft_radius_mm: equivalent-circle radius of the distal sections.
        neck_shaft_angle_deg: angle between ``neck_axis`` and ``shaft_axis`` (3D).
        axes_crossing_mm: midpoint of the shortest segment between the neck and shaft axes.
        neck_waist_mm: distance from the head centre to the narrowest neck section.
        neck_waist_radius_mm: equivalent-circle radius of that section.
        head_neck_junction_mm: ``t_hn``, distance of the head/neck plane from the head centre.
        neck_base_mm: ``t_nb``, distance of the neck/trochanter plane from the head centre.
        head_coverage: fraction of the sphere's directions carrying fitted surface points.
        head_rms_mm: RMS residual of the sphere fit.
        side: "left" or "right" femur (the head lies medially: towards the patient's midline).
    """

    head_centre_mm: np.ndarray
    head_radius_mm: float
    neck_axis: np.ndarray
    shaft_axis: np.ndarray
    shaft_point_mm: np.ndarray
    shaft_radius_mm: float
    neck_shaft_angle_deg: float
    axes_crossing_mm: np.ndarray
    neck_waist_mm: float
    neck_waist_radius_mm: float
    head_neck_junction_mm: float
    neck_base_mm: float
    head_coverage: float
    head_rms_mm: float
    side: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (arrays as lists of floats)."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, np.ndarray):
                d[k] = [float(x) for x in v]
            elif isinstance(v, (float, np.floating)):
                d[k] = float(v)
        return d

    def intertrochanteric_normal(self) -> np.ndarray:
        """Unit normal of the trochanter/intertrochanter plane, pointing into the trochanter side."""
        m = self.neck_axis - self.shaft_axis  # the external bisector of the neck-shaft angle
        return m / np.linalg.norm(m)


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def distance_mm(mask: np.ndarray, spacing: tuple[float, ...] | np.ndarray, black_border: bool = False) -> np.ndarray:
    """Euclidean distance (mm) of every ``mask`` voxel to the nearest voxel outside it (0 outside).

    ``black_border=False`` treats everything beyond the array as unknown (not background).
    Uses the ``edt`` package (anisotropic) with scipy as fallback. Returns float32.
    """
    m = np.ascontiguousarray(np.asarray(mask, dtype=bool))
    sp = tuple(float(s) for s in spacing)
    try:
        import edt as _edt

        return np.asarray(_edt.edt(m, anisotropy=sp, black_border=black_border, parallel=1), dtype=np.float32)
    except ImportError:  # pragma: no cover - edt is a declared dependency
        # scipy has no border option: pad with background (black) or foreground (unknown)
        pad = np.pad(m, 1, constant_values=not black_border)
        inner = tuple(slice(1, -1) for _ in range(m.ndim))
        return ndimage.distance_transform_edt(pad, sampling=sp)[inner].astype(np.float32)


def _largest_component(m: np.ndarray, voxvol: float = 1.0) -> np.ndarray:
    """The largest 26-connected component; a second one of >= 25 % of its size is an error
    (two femurs in one mask)."""
    lab, n = ndimage.label(m, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return m
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    if sizes[order[1]] >= 0.25 * sizes[order[0]]:
        raise FemursegError(
            f"mask holds {n} separate parts, the two largest {sizes[order[0]] * voxvol / 1000:.1f} and "
            f"{sizes[order[1]] * voxvol / 1000:.1f} cm3: expected one femur (split a bilateral mask per side first)")
    return lab == int(order[0])


def _fit_shaft(m: np.ndarray, sp: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Line through the centres of the largest inscribed circles of the axial (constant-row)
    sections of the distal part (the inscribed circle ignores the lesser trochanter's bump,
    which drags a plain centroid medially)."""
    rows = np.flatnonzero(m.any(axis=(0, 2)))
    r0, r1 = int(rows.min()), int(rows.max())
    n_rows = max(int(round((r1 - r0 + 1) * fraction)), int(np.ceil(10.0 / sp[1])), 4)
    start = max(r0, r1 - n_rows + 1)
    ys, ca, cl, areas = [], [], [], []
    for r in range(start, r1 + 1):
        sec = m[:, r, :]
        if not sec.any():
            continue
        d = distance_mm(sec, (sp[0], sp[2]))
        a, l = np.nonzero(d >= 0.9 * d.max())
        ys.append(r * sp[1])
        ca.append(a.mean() * sp[0])
        cl.append(l.mean() * sp[2])
        areas.append(np.count_nonzero(sec) * sp[0] * sp[2])
    if len(ys) < 3:
        raise FemursegError("mask is too short along the superior-inferior axis to find the femoral shaft")
    ys_, ca_, cl_ = np.asarray(ys), np.asarray(ca), np.asarray(cl)
    w = np.ones_like(ys_)
    for _ in range(3):  # iteratively reweighted: rows whose centre jumps (a bump, a noisy edge) count less
        pa, pl = np.polyfit(ys_, ca_, 1, w=w), np.polyfit(ys_, cl_, 1, w=w)
        res = np.hypot(ca_ - np.polyval(pa, ys_), cl_ - np.polyval(pl, ys_))
        scale = 1.4826 * float(np.median(res)) + 0.3
        w = 1.0 / np.maximum(1.0, (res / (2.0 * scale)) ** 2)
    direction = _unit(np.array([pa[0], 1.0, pl[0]]))
    y0 = float(np.average(ys_, weights=w))
    point = np.array([np.polyval(pa, y0), y0, np.polyval(pl, y0)])
    area = float(np.median(areas)) * abs(direction[1])  # section area perpendicular to the axis
    return point, direction, float(np.sqrt(area / np.pi))


def _perp_dist(pts: np.ndarray, point: np.ndarray, direction: np.ndarray) -> np.ndarray:
    d = pts - point
    along = d @ direction
    return np.sqrt(np.maximum(np.einsum("ij,ij->i", d, d) - along**2, 0.0))


def _surface_points(m: np.ndarray, sp: np.ndarray, centre: np.ndarray, half: float, max_points: int = 60000,
                    seed: int = 0) -> np.ndarray:
    """Sub-voxel surface points (mm) of ``m`` in a box of half-size ``half`` mm around ``centre``."""
    from skimage.measure import marching_cubes

    if not (np.all(np.isfinite(centre)) and np.isfinite(half)):  # a degenerate fit upstream: no points
        return np.zeros((0, 3))
    c = centre / sp
    h = half / sp
    lo = np.maximum(np.floor(c - h).astype(int), 0)
    hi = np.minimum(np.ceil(c + h).astype(int) + 1, m.shape)
    sub = m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    if min(sub.shape) < 2 or not sub.any() or sub.all():
        return np.zeros((0, 3))
    verts, *_ = marching_cubes(sub.astype(np.float32), level=0.5, spacing=tuple(sp), allow_degenerate=False)
    verts = verts + lo * sp
    if len(verts) > max_points:
        verts = verts[np.random.default_rng(seed).choice(len(verts), max_points, replace=False)]
    return verts


def _sphere_lstsq(p: np.ndarray) -> tuple[np.ndarray, float]:
    """Algebraic least-squares sphere: |p|^2 = 2 c.p + (r^2 - |c|^2)."""
    A = np.c_[2 * p, np.ones(len(p))]
    b = np.einsum("ij,ij->i", p, p)
    sol, *_ = np.linalg.lstsq(A, b, rcond=None)
    c = sol[:3]
    r2 = sol[3] + c @ c
    return c, float(np.sqrt(max(r2, 0.0)))


def _fibonacci_dirs(n: int = 300) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    return np.c_[np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)]


def _coverage(dirs: np.ndarray, probe: np.ndarray, max_angle_deg: float = 15.0) -> float:
    if len(dirs) == 0:
        return 0.0
    cos_t = np.cos(np.radians(max_angle_deg))
    step = max(1, len(dirs) // 20000)
    best = (probe @ dirs[::step].T).max(axis=1)
    return float(np.mean(best >= cos_t))


def _fit_sphere(surf: np.ndarray, c0: np.ndarray, r0: float, tol_floor: float,
                exclude_dir: np.ndarray | None = None, exclude_cos: float = 0.5) -> tuple[np.ndarray, float, np.ndarray]:
    c, r = c0.astype(float), float(r0)
    d = np.linalg.norm(surf - c, axis=1)
    inl = (d > 0.6 * r) & (d < 1.5 * r)
    for _ in range(8):
        if exclude_dir is not None:
            u = (surf - c) / np.maximum(np.linalg.norm(surf - c, axis=1), 1e-9)[:, None]
            inl &= (u @ exclude_dir) < exclude_cos
        if inl.sum() < 20:
            break
        c_new, r_new = _sphere_lstsq(surf[inl])
        if not np.all(np.isfinite(c_new)) or r_new <= 0:
            break
        c, r = c_new, r_new
        d = np.linalg.norm(surf - c, axis=1)
        inl = np.abs(d - r) < max(tol_floor, 0.08 * r)
    if exclude_dir is not None:
        u = (surf - c) / np.maximum(np.linalg.norm(surf - c, axis=1), 1e-9)[:, None]
        inl &= (u @ exclude_dir) < exclude_cos
    return c, r, inl


def _plane_basis(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    helper = np.array([1.0, 0.0, 0.0]) if abs(n[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = _unit(helper - (helper @ n) * n)
    return e1, np.cross(n, e1)


def _sections(mf: np.ndarray, sp: np.ndarray, c: np.ndarray, n: np.ndarray, ts: np.ndarray, half: float,
              res: float) -> tuple[np.ndarray, np.ndarray]:
    """Cross-sections of the mask perpendicular to ``n`` at ``c + t n`` for each ``t`` in ``ts``.

    Each section is resampled (trilinear, threshold 0.5) on a square grid of half-size ``half``
    mm and pixel ``res`` mm; only its connected part that holds the axis point counts.

    Returns:
        ``(areas, centres)``: area (mm^2) of that part, and the centre (mm, 3D) of its largest
        inscribed circle (pixels within :data:`INSCRIBED_FRACTION` of the maximum 2D distance,
        averaged): unlike the
        centroid it is not pulled off the axis by bone attached on one side (the trochanters).
        Sections whose axis point lies outside the mask have area 0 and centre on the axis.
    """
    e1, e2 = _plane_basis(n)
    u = np.arange(-half, half + res / 2, res)
    k = u.size
    U, V = np.meshgrid(u, u, indexing="ij")
    plane = U[..., None] * e1 + V[..., None] * e2  # (k, k, 3)
    mid = k // 2
    areas = np.zeros(len(ts))
    centres = c + np.outer(ts, n)
    for i, t in enumerate(ts):
        pos = (c + t * n + plane).reshape(-1, 3) / sp
        sec = ndimage.map_coordinates(mf, pos.T, order=1, mode="constant", cval=0.0).reshape(k, k) >= 0.5
        if not sec[mid, mid]:
            continue
        lab, _ = ndimage.label(sec)
        part = lab == lab[mid, mid]
        areas[i] = np.count_nonzero(part) * res * res
        d = distance_mm(part, (res, res), black_border=True)
        a, b = np.nonzero(d >= INSCRIBED_FRACTION * d.max())
        centres[i] = c + t * n + u[a].mean() * e1 + u[b].mean() * e2
    return areas, centres


INSCRIBED_FRACTION = 0.95
"""Inscribed-circle centre = mean of the pixels at least this fraction of the section's maximum
edge distance deep. A flat neck's section (up to 29 x 40 mm) has a long distance ridge: at 0.9 its
mean drifted 4 mm towards the trochanter of a short valgus neck. ``benchmarks/bench_femur_fit.py``
(56 phantoms): 0.95 and the shaft bound give neck-axis errors median 0.3, max 3.7 deg (0.9, no bound: 0.2, 8.1)."""


NECK_LENGTH = 0.35
"""Default neck-region length in head radii (``fit_femur(neck_length=...)``): 7.7 mm for a 22 mm
head. Chosen for stability on the 16 default CT phantoms (reference vs cascade masks): at 0.5 the
cap where the neck axis enters the shaft cylinder (which moves with the shaft-axis fit) bound in
most femurs and the neck volume error was 6.8 % (max 29 %); at 0.35 it is 3.4 % (max 11 %). The
flare-based neck length of those phantoms has median 0.53 head radii (0.21-0.94)."""


def _waist(ts: np.ndarray, areas: np.ndarray, t_lo: float, t_hi: float, flare: float) -> tuple[int | None, int]:
    """Index of the narrowest section before the neck flares, and of the flare.

    Scanning outwards from ``t_lo``, the waist is the running minimum of the area until a
    section reaches ``flare`` times it (the base of the neck) or ``t_hi`` is passed.
    """
    best = None
    for i in np.flatnonzero(ts >= t_lo):
        a = areas[i]
        if best is not None and a >= flare * areas[best]:
            return best, int(i)
        if ts[i] > t_hi:
            break
        if a > 0 and (best is None or a < areas[best]):
            best = int(i)
    return best, len(ts) - 1


def _closest_points(p1: np.ndarray, d1: np.ndarray, p2: np.ndarray, d2: np.ndarray) -> tuple[float, float]:
    """Parameters (s, u) of the closest points p1 + s d1 and p2 + u d2 of two lines."""
    w = p1 - p2
    b = d1 @ d2
    den = 1 - b * b
    if den < 1e-9:
        return 0.0, float(w @ d2)
    s = (b * (d2 @ w) - (d1 @ w)) / den
    u = ((d2 @ w) - b * (d1 @ w)) / den
    return float(s), float(u)


def _no_head(why: str) -> FemursegError:
    return FemursegError(f"mask has no recognisable femoral head ({why}); expected a proximal femur mask")


def fit_femur(mask: np.ndarray, spacing: tuple[float, float, float], *, shaft_fraction: float = 0.3,
              neck_flare: float = 1.5, neck_length: float | None = NECK_LENGTH) -> FemurFit:
    """Fit the head sphere, neck and shaft axes of a proximal femur mask (rule: module docstring).

    Args:
        mask: canonical ``(n_coronal, rows, cols)`` array; non-zero = inside the periosteal surface.
        spacing: mm per canonical axis.
        shaft_fraction: distal fraction of the superior-inferior extent used for the shaft axis.
        neck_flare: area ratio (to the waist) that ends the search for the neck waist (and, with
            ``neck_length=None``, marks the base of the neck).
        neck_length: length of the neck region along the neck axis in head radii (from the
            head-neck junction); None: cut at the flare instead (anatomical, but unstable).

    Raises:
        FemursegError: empty mask, or no femoral head (e.g. a cylinder or a ball).
    """
    m = np.asarray(mask) != 0
    if m.ndim != 3:
        raise FemursegError(f"mask: expected a 3D array, got shape {m.shape}")
    if not m.any():
        raise FemursegError("mask is empty: nothing to split into regions")
    sp = np.asarray(spacing, dtype=float)
    if sp.shape != (3,) or np.any(sp <= 0):
        raise FemursegError(f"spacing: expected three positive sizes in mm, got {tuple(spacing)}")
    voxvol = float(np.prod(sp))
    m = _largest_component(m, voxvol)
    idx = np.nonzero(m)
    pts = np.stack(idx, 1).astype(np.float64) * sp

    # 1. shaft
    s_point, s_dir, s_rad = _fit_shaft(m, sp, shaft_fraction)

    # 2. head seed: farthest voxel from the shaft axis, then the distance-transform maximum near it
    dperp = _perp_dist(pts, s_point, s_dir)
    e = pts[int(dperp.argmax())]
    dt = distance_mm(m, sp)
    near = np.linalg.norm(pts - e, axis=1) <= 40.0
    dts = dt[idx][near]
    j = int(dts.argmax())
    c0 = pts[near][j]
    r0 = float(dts[j])
    if r0 <= 1.5 * sp.max():
        raise _no_head(f"the widest part near the medial end is only {r0:.1f} mm thick")
    tol_floor = max(1.0, float(sp.max()))
    surf = _surface_points(m, sp, c0, 1.7 * r0 + 2 * sp.max())
    if len(surf) < 50:
        raise _no_head("too few surface points around the candidate head")
    c, r, inl = _fit_sphere(surf, c0, r0, tol_floor)

    # 3. neck axis
    res = max(0.5, float(sp.min()))
    ball = np.linalg.norm(pts - c, axis=1) <= 1.5 * r
    rel = pts[ball] - c
    dist = np.linalg.norm(rel, axis=1)
    s_foot = s_point + ((c - s_point) @ s_dir) * s_dir
    shell = (dist >= 1.1 * r) & (rel @ (s_foot - c) > 0)
    if shell.sum() < 10:
        raise _no_head("nothing attached to the candidate head on the shaft side")
    n_out = _unit(rel[shell].mean(axis=0))
    mf = m.astype(np.float32)
    t_w = r_w = a_w = t_flare = 0.0
    for it in range(4):
        step = max(res, 0.5) if it == 3 else max(res, 1.0)  # coarse while aiming, fine at the end
        ts = np.arange(0.4 * r, 2.8 * r, step)
        areas, centres = _sections(mf, sp, c, n_out, ts, 1.6 * r, res)
        sN, _ = _closest_points(c, n_out, s_point, s_dir)
        sin_a = max(float(np.sqrt(max(1 - float(n_out @ s_dir) ** 2, 0.0))), 0.2)
        t_hi = min(2.5 * r, max(sN - s_rad / sin_a, 0.8 * r))  # not beyond the shaft's surface
        iw, i_flare = _waist(ts, areas, 0.5 * r, t_hi, neck_flare)
        if iw is None:
            raise _no_head("no neck section found beyond the candidate head")
        t_w, a_w = float(ts[iw]), float(areas[iw])
        r_w = float(np.sqrt(a_w / np.pi))
        t_flare = float(ts[i_flare])
        if it < 3:  # re-aim the axis at the inscribed centres around the waist
            near_w = (np.abs(ts - t_w) <= 3.0) & (areas > 0)
            n_out = _unit(np.mean(centres[near_w], axis=0) - c)
        if it == 1:  # refit the sphere without the cone facing the neck
            c, r, inl = _fit_sphere(surf, c, r, tol_floor, exclude_dir=n_out)

    # head quality checks
    u = surf[inl] - c
    u /= np.maximum(np.linalg.norm(u, axis=1), 1e-9)[:, None]
    probe = _fibonacci_dirs(300)
    probe = probe[probe @ n_out < 0.5]  # the cone facing the neck carries no head surface
    coverage = _coverage(u, probe)
    rms = float(np.sqrt(np.mean((np.linalg.norm(surf[inl] - c, axis=1) - r) ** 2))) if inl.any() else np.inf
    offset = float(_perp_dist(c[None], s_point, s_dir)[0])
    if offset < MIN_HEAD_OFFSET * r:
        raise _no_head(f"the widest proximal part, {r:.1f} mm in radius, lies {offset:.1f} mm from the shaft axis")
    if coverage < MIN_COVERAGE:
        raise _no_head(f"a sphere fits only {100 * coverage:.0f} % of the candidate head's surface, "
                       f"need {100 * MIN_COVERAGE:.0f} %")
    if r_w >= 0.95 * r:
        raise _no_head(f"no neck narrower than the candidate head (waist radius {r_w:.1f} mm, head radius {r:.1f} mm)")

    # 4. cuts along the neck
    t_hn = float(np.sqrt(max(r * r - r_w * r_w, 0.0)))
    neck_axis = -n_out
    cos_nsa = float(np.clip(neck_axis @ s_dir, -1, 1))
    nsa = float(np.degrees(np.arccos(cos_nsa)))
    sN, uS = _closest_points(c, n_out, s_point, s_dir)
    crossing = 0.5 * ((c + sN * n_out) + (s_point + uS * s_dir))
    sin_nsa = max(np.sqrt(max(1 - cos_nsa**2, 0.0)), 0.2)
    t_entry = sN - s_rad / sin_nsa
    t_base = t_flare if neck_length is None else t_hn + float(neck_length) * r
    t_nb = max(min(t_base, t_entry), t_hn + 5.0)
    side = "left" if neck_axis[2] < 0 else "right"  # a left femur's head points to the patient's right (col 0)
    return FemurFit(
        head_centre_mm=c, head_radius_mm=r, neck_axis=neck_axis, shaft_axis=s_dir, shaft_point_mm=s_point,
        shaft_radius_mm=s_rad, neck_shaft_angle_deg=nsa, axes_crossing_mm=crossing, neck_waist_mm=t_w,
        neck_waist_radius_mm=r_w, head_neck_junction_mm=t_hn, neck_base_mm=float(t_nb),
        head_coverage=coverage, head_rms_mm=rms, side=side,
    )


def label_regions(mask: np.ndarray, spacing: tuple[float, float, float], fit: FemurFit) -> np.ndarray:
    """Region label map (uint8: 0 bg, 1 head, 2 neck, 3 trochanter, 4 intertrochanter) of ``mask``
    given its :class:`FemurFit` (rule: module docstring)."""
    m = np.asarray(mask) != 0
    sp = np.asarray(spacing, dtype=float)
    idx = np.nonzero(m)
    pts = np.stack(idx, 1).astype(np.float64) * sp
    n_out = -fit.neck_axis
    rel = pts - fit.head_centre_mm
    t = rel @ n_out
    radial = np.sqrt(np.maximum(np.einsum("ij,ij->i", rel, rel) - t**2, 0.0))
    out = np.zeros(m.shape, np.uint8)
    struct = np.ones((3, 3, 3), bool)

    # head: below the junction plane, the component holding the head centre (or nearest to it)
    cand = np.zeros(m.shape, bool)
    cand[idx] = t < fit.head_neck_junction_mm
    lab, n = ndimage.label(cand, structure=struct)
    head = np.zeros(m.shape, bool)
    if n:
        inside = (t < fit.head_neck_junction_mm)
        near = inside & (np.linalg.norm(rel, axis=1) <= fit.head_radius_mm)
        ids = lab[tuple(ix[near] for ix in idx)] if near.any() else lab[tuple(ix[inside] for ix in idx)]
        ids = ids[ids > 0]
        if ids.size:
            head = lab == int(np.bincount(ids).argmax())
    # neck: the slab components that reach the neck axis
    slab_sel = (t >= fit.head_neck_junction_mm) & (t < fit.neck_base_mm)
    cand[:] = False
    cand[idx] = slab_sel
    cand &= ~head
    lab, n = ndimage.label(cand, structure=struct)
    neck = np.zeros(m.shape, bool)
    if n:
        core = slab_sel & (radial <= 0.5 * fit.neck_waist_radius_mm)
        ids = np.unique(lab[tuple(ix[core] for ix in idx)])
        ids = ids[ids > 0]
        if ids.size:
            neck = np.isin(lab, ids)
    # trochanter / intertrochanter by the intertrochanteric plane
    side = (pts - fit.axes_crossing_mm) @ fit.intertrochanteric_normal()
    out[idx] = np.where(side >= 0, REGION_LABELS["trochanter"], REGION_LABELS["intertrochanter"]).astype(np.uint8)
    out[neck] = REGION_LABELS["neck"]
    out[head] = REGION_LABELS["head"]
    return out


def split_regions(mask: np.ndarray, spacing: tuple[float, float, float], **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Split a proximal femur mask into head, neck, trochanter and intertrochanter (003 Fig. 7).

    Args:
        mask: canonical ``(n_coronal, rows, cols)`` array, non-zero inside the periosteal surface
            (a CT label map 0/1/2 works as is).
        spacing: mm per canonical axis (anisotropic allowed).
        **kwargs: passed to :func:`fit_femur` (``shaft_fraction``, ``neck_flare``).

    Returns:
        ``(regions, fit)``: uint8 array of ``mask``'s shape (0 bg, 1 head, 2 neck, 3 trochanter,
        4 intertrochanter) and :meth:`FemurFit.to_dict` (``head_centre_mm``, ``head_radius_mm``,
        ``neck_axis``, ``shaft_axis``, ``neck_shaft_angle_deg``, ...; mm, ``index * spacing``).

    Raises:
        FemursegError: empty mask or no femoral head.
    """
    fit = fit_femur(mask, spacing, **kwargs)
    return label_regions(mask, spacing, fit), fit.to_dict()


def femoral_head_check(mask: np.ndarray, spacing: tuple[float, float, float]) -> list[str]:
    """A QC check for ``femurseg predict`` (:mod:`femurseg.inference.qc`): ``[]`` when
    :func:`fit_femur` finds a femoral head in the (non-empty) mask, else one ``"fail: ..."`` reason."""
    if not np.any(mask):
        return []  # the empty mask is reported by the QC itself
    try:
        fit_femur(np.asarray(mask) > 0, tuple(float(s) for s in spacing))
    except FemursegError as exc:
        return [f"fail: {exc}"]
    return []
