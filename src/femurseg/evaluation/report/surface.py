"""3D surface of a segmentation coloured by its distance to the reference surface.

Used for the surface panels of the comparison report (paper 001, Figs. 4-5 style
result panels, extended with a 3D view of where the prediction departs from the
reference):

* :func:`surface_mesh` runs marching cubes on a binary mask **in millimetres**
  (canonical ``(A, I, L)`` axes, origin at the centre of voxel ``(0, 0, 0)``);
* :func:`signed_surface_distance` gives every vertex its distance (mm) to the
  reference surface, positive where the prediction lies *outside* the reference
  (over-segmentation) and negative where it lies *inside* (under-segmentation);
* :func:`write_ply` (ASCII PLY with per-vertex RGB and a ``distance`` property) and
  :func:`write_vtk` (legacy VTK POLYDATA with a ``distance_mm`` point scalar) export
  the coloured mesh for 3D Slicer, ParaView or MeshLab, in physical LPS millimetres
  when the image affine is given;
* :func:`render_surface` draws the mesh with matplotlib (``Poly3DCollection``) to PNG.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from femurseg.core.errors import atomic_path

DISTANCE_CMAP = "RdBu_r"
"""Diverging colour map: blue = prediction inside the reference, red = outside."""


@dataclass
class Mesh:
    """A triangle mesh.

    Attributes:
        verts: ``(N, 3)`` float vertex positions in mm along the canonical ``(A, I, L)``
            axes, origin at the centre of voxel ``(0, 0, 0)``.
        faces: ``(M, 3)`` int vertex indices.
        distance: ``(N,)`` signed distance in mm to the reference surface, or None.
    """

    verts: np.ndarray
    faces: np.ndarray
    distance: np.ndarray | None = None

    @property
    def empty(self) -> bool:
        return len(self.faces) == 0


def _bbox(mask: np.ndarray, margin: int = 2) -> tuple[slice, ...]:
    idx = np.nonzero(mask)
    return tuple(slice(max(int(i.min()) - margin, 0), min(int(i.max()) + margin + 1, n)) for i, n in zip(idx, mask.shape))


def surface_mesh(
    mask: np.ndarray,
    spacing: tuple[float, float, float],
    max_faces: int | None = 150000,
    smooth_sigma_mm: float = 0.0,
) -> Mesh:
    """Marching-cubes surface of a binary mask, vertices in mm.

    Args:
        mask: boolean/int array ``(n_coronal, n_rows, n_cols)``, canonical order; non-zero = inside.
        spacing: voxel size in mm per canonical axis.
        max_faces: coarsen (marching-cubes ``step_size``) until the mesh has at most about
            this many faces (rendering cost); None keeps full resolution.
        smooth_sigma_mm: Gaussian smoothing (mm) of the mask before the iso-surface,
            to soften the voxel staircase in renderings (0 = exact voxel surface). Voxels
            of the mask are kept inside the surface, so small components never vanish.

    Returns:
        :class:`Mesh` with ``verts`` in mm along ``(A, I, L)``; empty (0 faces) for an empty mask.
    """
    from skimage.measure import marching_cubes

    mask = np.asarray(mask) != 0
    if not mask.any():
        return Mesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64))
    box = _bbox(mask, margin=2)
    sub = np.pad(mask[box], 1).astype(np.float32)
    if smooth_sigma_mm > 0:
        from scipy.ndimage import gaussian_filter

        inside = sub > 0.5
        sub = gaussian_filter(sub, sigma=[smooth_sigma_mm / s for s in spacing])
        # every mask voxel stays inside the surface: smoothing rounds the staircase but never
        # erases small components (false-positive islands are what the panel must show)
        sub[inside] = np.maximum(sub[inside], 0.55)
    offset = np.array([b.start - 1 for b in box], dtype=float) * np.asarray(spacing, dtype=float)
    step = 1
    while True:
        verts, faces, _, _ = marching_cubes(sub, level=0.5, spacing=tuple(float(s) for s in spacing),
                                            step_size=step, allow_degenerate=False)
        if max_faces is None or len(faces) <= max_faces or step >= 8:
            break
        step += 1
    return Mesh(verts + offset, faces.astype(np.int64))


def signed_surface_distance(
    verts: np.ndarray, reference: np.ndarray, spacing: tuple[float, float, float], smooth_sigma_mm: float = 0.0
) -> np.ndarray:
    """Signed distance (mm) from each vertex to the reference mask's surface.

    The reference surface is its full-resolution marching-cubes iso-surface (sub-voxel);
    the distance is to the nearest reference surface vertex. Sign: positive where the
    vertex lies outside the reference (the prediction over-segments there), negative
    inside (under-segmentation); decided by trilinear sampling of the reference mask.

    Args:
        verts: ``(N, 3)`` positions in mm along ``(A, I, L)`` (as from :func:`surface_mesh`).
        reference: binary array ``(n_coronal, n_rows, n_cols)``.
        spacing: voxel size in mm.
        smooth_sigma_mm: smoothing of the reference iso-surface (as in :func:`surface_mesh`).

    Returns:
        ``(N,)`` float array in mm; all NaN when the reference is empty.
    """
    from scipy.ndimage import map_coordinates
    from scipy.spatial import cKDTree

    verts = np.asarray(verts, dtype=float)
    ref = np.asarray(reference) != 0
    if len(verts) == 0:
        return np.zeros(0)
    if not ref.any():
        return np.full(len(verts), np.nan)
    ref_mesh = surface_mesh(ref, spacing, max_faces=None, smooth_sigma_mm=smooth_sigma_mm)
    dist, _ = cKDTree(ref_mesh.verts).query(verts, workers=1)
    inside = map_coordinates(ref.astype(np.float32), (verts / np.asarray(spacing, float)).T, order=1,
                             mode="constant", cval=0.0) > 0.5
    return np.where(inside, -dist, dist)


def coloured_surface(
    pred: np.ndarray, reference: np.ndarray, spacing: tuple[float, float, float], max_faces: int | None = 150000,
    smooth_sigma_mm: float = 0.0,
) -> Mesh:
    """Surface of ``pred`` with :func:`signed_surface_distance` to ``reference`` per vertex.

    ``smooth_sigma_mm`` smooths both iso-surfaces alike (display only; metrics use voxel surfaces).
    """
    mesh = surface_mesh(pred, spacing, max_faces=max_faces, smooth_sigma_mm=smooth_sigma_mm)
    mesh.distance = signed_surface_distance(mesh.verts, reference, spacing, smooth_sigma_mm)
    return mesh


def distance_colours(distance: np.ndarray, vmax: float, cmap: str = DISTANCE_CMAP) -> np.ndarray:
    """``(N, 4)`` RGBA floats in [0, 1] for distances clipped to ``[-vmax, vmax]`` mm (NaN grey)."""
    import matplotlib

    cm = matplotlib.colormaps[cmap]
    d = np.asarray(distance, dtype=float)
    rgba = cm(np.clip((np.nan_to_num(d) + vmax) / (2 * vmax), 0.0, 1.0))
    rgba[~np.isfinite(d)] = (0.6, 0.6, 0.6, 1.0)
    return rgba


def _physical(verts_mm: np.ndarray, spacing: tuple[float, float, float], affine: np.ndarray | None) -> np.ndarray:
    """Canonical mm -> LPS mm through the canonical-index -> RAS ``affine`` (or unchanged)."""
    if affine is None:
        return verts_mm
    idx = verts_mm / np.asarray(spacing, dtype=float)
    ras = idx @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return ras * np.array([-1.0, -1.0, 1.0])


def write_ply(
    path: str | os.PathLike, mesh: Mesh, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    affine: np.ndarray | None = None, vmax: float = 2.0, cmap: str = DISTANCE_CMAP,
) -> Path:
    """Write ``mesh`` as an ASCII PLY with per-vertex ``red, green, blue`` and ``distance`` (mm).

    With ``affine`` (canonical voxel index -> RAS mm, :attr:`femurseg.core.io.Volume.affine`) the
    vertices are written in physical LPS mm (3D Slicer's model convention), otherwise in the
    canonical mm frame. Colours use :data:`DISTANCE_CMAP` over ``[-vmax, vmax]`` mm.
    """
    path = Path(path)
    pts = _physical(mesh.verts, spacing, affine)
    d = mesh.distance if mesh.distance is not None else np.zeros(len(pts))
    rgb = (distance_colours(d, vmax, cmap)[:, :3] * 255).round().astype(int)
    space = "LPS" if affine is not None else "canonical (A,I,L) mm"
    lines = [
        "ply", "format ascii 1.0",
        "comment femurseg surface: distance = signed distance (mm) to the reference surface, + outside",
        f"comment SPACE={space}",
        f"element vertex {len(pts)}",
        "property float x", "property float y", "property float z",
        "property uchar red", "property uchar green", "property uchar blue",
        "property float distance",
        f"element face {len(mesh.faces)}",
        "property list uchar int vertex_indices",
        "end_header",
    ]
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write("\n".join(lines) + "\n")
        for p, c, dv in zip(pts, rgb, d):
            fh.write(f"{p[0]:.4f} {p[1]:.4f} {p[2]:.4f} {c[0]} {c[1]} {c[2]} {float(dv):.4f}\n")
        for f in mesh.faces:
            fh.write(f"3 {f[0]} {f[1]} {f[2]}\n")
    return path


def write_vtk(
    path: str | os.PathLike, mesh: Mesh, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    affine: np.ndarray | None = None,
) -> Path:
    """Write ``mesh`` as a legacy ASCII VTK POLYDATA file with point scalars ``distance_mm``.

    Coordinates as in :func:`write_ply` (LPS mm with ``affine``).
    """
    path = Path(path)
    pts = _physical(mesh.verts, spacing, affine)
    d = mesh.distance if mesh.distance is not None else np.zeros(len(pts))
    space = "SPACE=LPS" if affine is not None else "canonical AIL mm"
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(f"# vtk DataFile Version 3.0\nfemurseg surface distance to reference {space}\nASCII\nDATASET POLYDATA\n")
        fh.write(f"POINTS {len(pts)} float\n")
        np.savetxt(fh, pts, fmt="%.4f")
        fh.write(f"POLYGONS {len(mesh.faces)} {4 * len(mesh.faces)}\n")
        np.savetxt(fh, np.column_stack([np.full(len(mesh.faces), 3), mesh.faces]), fmt="%d")
        fh.write(f"POINT_DATA {len(pts)}\nSCALARS distance_mm float 1\nLOOKUP_TABLE default\n")
        np.savetxt(fh, np.nan_to_num(np.asarray(d, float), nan=0.0), fmt="%.4f")
    return path


def read_ply(path: str | os.PathLike) -> Mesh:
    """Read back an ASCII PLY written by :func:`write_ply` (vertices as stored, with ``distance``)."""
    lines = Path(path).read_text().splitlines()
    end = lines.index("end_header")
    nv = int(next(ln for ln in lines if ln.startswith("element vertex")).split()[-1])
    nf = int(next(ln for ln in lines if ln.startswith("element face")).split()[-1])
    v = np.array([ln.split() for ln in lines[end + 1:end + 1 + nv]], dtype=float).reshape(nv, 7)
    f = np.array([ln.split()[1:] for ln in lines[end + 1 + nv:end + 1 + nv + nf]], dtype=np.int64).reshape(nf, 3)
    return Mesh(v[:, :3], f, v[:, 6])


def _display_coords(verts_mm: np.ndarray) -> np.ndarray:
    """Canonical (A, I, L) mm -> plot (x = towards patient left, y = posterior, z = superior).

    With ``azim=-90, elev=0`` the camera looks from anterior, patient right on the viewer's
    left and the head up: the radiological coronal view of the 2D panels.
    """
    return np.column_stack([verts_mm[:, 2], -verts_mm[:, 0], -verts_mm[:, 1]])


def _lambert(tris: np.ndarray, elev: float, azim: float) -> np.ndarray:
    """Per-face brightness in [0.35, 1] for a head light placed near the camera (two-sided)."""
    n = np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    e, a = np.radians(elev + 25.0), np.radians(azim - 30.0)
    light = np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)])
    return 0.35 + 0.65 * np.abs(n @ light)


def draw_surface(ax, mesh: Mesh, vmax: float, cmap: str = DISTANCE_CMAP, elev: float = 10.0, azim: float = -75.0,
                 colour_by_distance: bool = True) -> None:
    """Draw ``mesh`` on a matplotlib 3D axes, faces coloured by mean vertex distance."""
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    ax.set_axis_off()
    ax.view_init(elev=elev, azim=azim)
    if mesh.empty:
        ax.text2D(0.5, 0.5, "empty mask", transform=ax.transAxes, ha="center", va="center")
        return
    xyz = _display_coords(mesh.verts)
    tris = xyz[mesh.faces]
    if colour_by_distance and mesh.distance is not None:
        fd = mesh.distance[mesh.faces].mean(axis=1)
        colours = distance_colours(fd, vmax, cmap)
    else:
        colours = np.tile([0.85, 0.8, 0.7, 1.0], (len(tris), 1))
    colours = colours.copy()
    colours[:, :3] *= _lambert(tris, elev, azim)[:, None]
    coll = Poly3DCollection(tris, facecolors=colours, edgecolors=colours, linewidths=0.15, antialiased=False)
    ax.add_collection3d(coll)
    lo, hi = xyz.min(axis=0), xyz.max(axis=0)
    centre, half = (lo + hi) / 2, (hi - lo).max() / 2 * 0.85
    for setter, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre):
        setter(c - half, c + half)
    ax.set_box_aspect((1, 1, 1), zoom=1.25)


def render_surface(
    path: str | os.PathLike, mesh: Mesh, vmax: float = 2.0, title: str = "", cmap: str = DISTANCE_CMAP,
    views: tuple[tuple[float, float], ...] = ((10.0, -75.0), (10.0, 105.0)), dpi: int = 120,
) -> Path:
    """Render ``mesh`` (coloured by ``mesh.distance``) to a PNG: one panel per (elev, azim) view
    plus a colour bar labelled in mm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    path = Path(path)
    fig = plt.figure(figsize=(3.2 * len(views) + 0.9, 3.6))
    for i, (elev, azim) in enumerate(views):
        ax = fig.add_subplot(1, len(views), i + 1, projection="3d")
        draw_surface(ax, mesh, vmax, cmap, elev, azim)
        ax.set_title(["anterior view", "posterior view"][i] if len(views) == 2 else f"elev {elev:g}, azim {azim:g}",
                     fontsize=9)
    sm = ScalarMappable(norm=Normalize(-vmax, vmax), cmap=cmap)
    cb = fig.colorbar(sm, ax=fig.axes, shrink=0.7, fraction=0.05, pad=0.02)
    cb.set_label("distance to reference surface [mm]\n(+ outside, - inside)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    plt.close(fig)
    return path
