"""The cascade of paper 003 (section 3.2), its pieces shared by training, prediction and evaluation.

A first network segments the whole bone (the periosteal region, ``label > 0``), a second one
segments the endosteal (trabecular / medullary, ``label == 1``) region from the CT restricted
to the first one's result (:func:`stage2_input`: voxels outside the periosteal mask, dilated by
1 mm, set to -1024 HU); cortical = periosteal minus endosteal (:func:`combine_stages`).
The run-folder layout is below; :mod:`femurseg.ct.train` trains, :mod:`femurseg.ct.predict`
predicts and :mod:`femurseg.ct.evaluate` scores a cascade.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from femurseg.core.errors import FemursegError

# ----------------------------------------------------------------------------- cascade (paper 003)
#
# A cascade run folder (``femurseg cv --task cascade``) holds two ordinary cross-validation runs,
# produced by :func:`femurseg.training.cv.run_cv` on derived datasets, with one shared split:
#
#     RUN/config.json            format femurseg-run, task "cascade", k, the cascade options
#     RUN/split.json             the folds (both stages use them)
#     RUN/data/stage1.csv        manifest: original images, label > 0 (periosteal, whole bone)
#     RUN/data/stage2.csv        manifest: images masked with the reference periosteal region
#                                (stage2_mask "reference"; stage2_oof.csv: with stage 1's out-of-fold
#                                masks, "oof"), dilated by dilate_mm; label == 1 (endosteal)
#     RUN/stage1/, RUN/stage2/   the two cv runs (fold models, out-of-fold maps, thresholds)
#     RUN/stage1_seed<i>/, ...   with --seeds N: the same stages trained with seed + i (i < N)
#     RUN/oof_labels/<case>.nii.gz     cascade out-of-fold label maps (0/1/2) on the input grid
#     RUN/cascade_metrics.csv    per case: DSC, ASD, sensitivity, specificity per compartment
#     RUN/cascade_volumes.csv    per case and region: reference and predicted volumes
#     RUN/cascade_summary.json   means (003 Table 1) and volume errors per region (003 Table 2),
#                                the thresholds used (with several seeds: those of the ensemble)

CASCADE_TASK = "cascade"
COMPARTMENTS: dict[str, tuple[int, ...]] = {"periosteal": (1, 2), "endosteal": (1,), "cortical": (2,)}

CASCADE_SCALES: dict[str, dict[str, Any]] = {
    # CPU demo: a V-Net with 8 base features and 4 levels (2.5 M parameters) on whole volumes at
    # the scans' own voxel size, 20 epochs (see "Data" below). On 2 CPU cores a step costs about
    # what the earlier F 4 / 3-level V-Net's did (0.7 vs 0.6 s on 64 x 128 x 128: the narrow
    # layers are memory-bound), and stage 1's validation Dice rose from 0.972-0.983 to
    # 0.988-0.992; the whole-bone volume error is what limits the cortical volume (cortical =
    # periosteal - endosteal, and the cortex is ~17 % of the bone). Instance norm, not the
    # paper's batch norm, and whole volumes, not patches: the cv machinery validates and predicts
    # on whole volumes, and a normalisation layer trained on random 32 x 64 x 64 patches does not
    # fit them (measured: batch norm scored Dice 0.000 on a held-out whole volume in eval mode
    # after 40 patch steps; instance norm 0.47 after 40 and 0.41 after 80 steps while its
    # training loss kept falling; without normalisation the V-Net learns several times slower).
    # Every stage runs the whole cosine schedule (min_epochs = max_epochs: no early stop): with
    # min_epochs 10 / patience 8, early stopping on 3-4 validation cases stopped three of four
    # stage-1 folds at epochs 30-35 and kept a checkpoint from a learning rate 5-10x the final
    # one; training to the end took the cortical volume error in the neck from 7.6 to 6.3 %
    # (the same folds, stage 2 unchanged; 16 CT phantoms, 2026-11-21).
    # Loss: soft Dice + *unweighted* cross-entropy (003 trains with plain softmax CE; nnU-Net
    # adds Dice). The inverse-frequency weighted CE of the MR papers moves the 0.5 boundary
    # outwards into partial-volume voxels (see femurseg.training.losses), which biased the thin neck
    # cortex (cortical = periosteal - endosteal) upwards. Measured (same split, 2026-11-22,
    # docs/ct_study.md): cortical combination 3.9 -> 2.9 %, cortical total 4.5 -> 3.8 %, the trabecular
    # region's error in the neck 3.6 -> 2.3 %; cortical neck 5.5 -> 6.1 % (5.3 -> 5.3 % with the
    # reference's regions).
    # Data: the study runs on 32 phantoms for 20 epochs (24 training cases per fold: 480 steps, the
    # cost of 12 cases x 40 epochs). On the same 16 held-out phantoms the four fold models trained
    # on 24 cases instead of 12 gave periosteal DSC 0.992 vs 0.987, cortical neck 5.1 vs 7.8 %,
    # head 2.4 vs 5.1 %, cortical total 3.7 vs 5.0 % (docs/ct_study.md, 2026-11-22). With fewer
    # phantoms, raise the epochs (``--max-epochs`` / ``--min-epochs``) to keep about 500 steps. 64
    # phantoms x 10 epochs (the same 480 steps) did not do better than 32 x 20 (held-out cortical
    # neck 5.4 vs 5.1 %); whether 64 phantoms trained longer would is not measured.
    # Voxel size: the same settings on the same 32 femurs at 003's 0.8 x 0.8 x 1 mm (1.6 s per
    # step against ~1 s at 1 mm) took the cortical neck error from 6.0 to 4.4 % out-of-fold and the
    # cortical combination from 3.2 to 1.4 % (README "Measured: the cascade study").
    "demo": {
        "model": {"name": "vnet", "features": 8, "levels": 4, "norm": "instance"},
        "preprocess": {"crop_slices": None, "target_size": None, "scale": None, "normalise": "ct",
                       "ct_window": [-200.0, 1800.0]},
        "train": {"loss": "dice-ce", "lr": 3e-3, "max_epochs": 20, "min_epochs": 20, "patience": 8},
        "augment": {"flip_p": 0.5},
    },
    # Paper 003: V-Net (F 16, 4 levels), Adam 1e-4, batch 1, whole volumes; GPU
    "full": {
        "model": {"name": "vnet", "features": 16, "levels": 4},
        "preprocess": {"crop_slices": None, "target_size": None, "scale": None, "normalise": "ct",
                       "ct_window": [-200.0, 1800.0]},
        "train": {"loss": "ce", "lr": 1e-4, "max_epochs": 800, "min_epochs": 30, "patience": 30},
        "augment": {"flip_p": 0.5, "noise_std": 0.02, "brightness": 0.05, "scale": 0.1},
    },
}


def periosteal_region(periosteal: np.ndarray, spacing: Sequence[float], dilate_mm: float = 0.0) -> np.ndarray:
    """The periosteal mask dilated by ``dilate_mm`` (ellipsoid in mm; 0: unchanged), bool."""
    from femurseg.inference.postprocess import ellipsoid_structure

    m = np.asarray(periosteal, dtype=bool)
    if dilate_mm <= 0 or not m.any():
        return m.copy()
    se = ellipsoid_structure(dilate_mm, spacing)
    return ndimage.binary_dilation(m, structure=se)


def mask_outside(image: np.ndarray, region: np.ndarray, fill: float = -1024.0) -> np.ndarray:
    """``image`` with every voxel outside ``region`` set to ``fill`` (float32; 003 section 3.2:
    the region inside the periosteal contour is the input of the endosteal segmentation)."""
    img = np.asarray(image, dtype=np.float32)
    r = np.asarray(region, dtype=bool)
    if img.shape != r.shape:
        raise FemursegError(f"cascade: image shape {img.shape} differs from the periosteal mask's {r.shape}")
    return np.where(r, img, np.float32(fill)).astype(np.float32)


def stage2_input(image: np.ndarray, periosteal: np.ndarray, spacing: Sequence[float], dilate_mm: float = 1.0,
                 fill_hu: float = -1024.0) -> np.ndarray:
    """The endosteal model's input: the CT restricted to the (dilated) periosteal region, the rest
    set to ``fill_hu`` (air; the HU window maps it to 0)."""
    return mask_outside(image, periosteal_region(periosteal, spacing, dilate_mm), fill_hu)


def combine_stages(periosteal: np.ndarray, endosteal_prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """CT label map from the cascade's two outputs: 2 (cortical) in the periosteal mask, 1
    (trabecular) where the endosteal probability reaches ``threshold`` inside the periosteal mask
    eroded by one voxel (face neighbours), 0 elsewhere.

    The erosion keeps the reference labels' rule that the cortex is at least one voxel thick
    (a label-1 voxel never touches background). Cortical = periosteal minus endosteal.
    """
    peri = np.asarray(periosteal, dtype=bool)
    inner = ndimage.binary_erosion(peri, structure=ndimage.generate_binary_structure(3, 1), border_value=1)
    lab = np.where(peri, np.uint8(2), np.uint8(0))
    lab[inner & (np.asarray(endosteal_prob) >= threshold)] = 1
    return lab


def cascade_probabilities(periosteal_prob: np.ndarray, periosteal: np.ndarray, endosteal_prob: np.ndarray,
                          threshold: float = 0.5, periosteal_threshold: float = 0.5) -> np.ndarray:
    """``(3, *shape)`` probabilities (background, trabecular, cortical) for ``predict.segment``.

    Built so that ``segment`` at the stored stage-1 threshold gives exactly :func:`combine_stages`,
    the label map the cascade's evaluation scores:

    * foreground = the periosteal probability, raised to ``periosteal_threshold`` inside the
      ``periosteal`` mask and lowered just below it outside, so thresholding it there returns the
      post-processed mask (:func:`periosteal_mask`: holes filled, spurs opened away), not the raw
      ``prob >= threshold`` (a higher or lower ``--threshold`` still moves the surface);
    * inside it the class is trabecular exactly where :func:`combine_stages` puts label 1 (the
      endosteal probability is remapped monotonically so ``threshold`` lands on 0.5, and zeroed
      outside the eroded periosteal mask).
    """
    p = np.asarray(periosteal_prob, dtype=np.float32)
    peri = np.asarray(periosteal, dtype=bool)
    # 1e-6 either side of the threshold: ``segment`` thresholds 1 - (1 - p) in float32 (error ~6e-8)
    t1 = float(periosteal_threshold)
    up, down = np.float32(t1 + 1e-6), np.float32(t1 - 1e-6)
    p = np.where(peri, np.maximum(p, up), np.minimum(p, down)).astype(np.float32)
    q = np.asarray(endosteal_prob, dtype=np.float32)
    t = float(min(max(threshold, 1e-6), 1 - 1e-6))
    q = np.where(q < t, 0.5 * q / t, 0.5 + 0.5 * (q - t) / (1 - t)).astype(np.float32)
    trab = combine_stages(peri, np.asarray(endosteal_prob), threshold) == 1
    q = np.where(trab, np.maximum(q, np.float32(0.5) + 1e-6), np.minimum(q, np.float32(0.5) - 1e-6))
    return np.stack([1.0 - p, p * q, p * (1.0 - q)]).astype(np.float32)


def _write_manifest(path: Path, rows: list[tuple[str, str, str, str]]) -> None:
    from femurseg.core.tables import write_csv

    cols = ["image", "label", "case", "group"]
    write_csv([dict(zip(cols, r)) for r in rows], path, cols)
    # the CSV sidecar (femurseg.data.dataset): the stage runs record their images as CT
    path.with_suffix(".json").write_text(json.dumps({"modality": "CT"}) + "\n")


def prepare_cascade_data(ds: Any, data_dir: str | Path, stage: int, *, dilate_mm: float = 1.0,
                         fill_hu: float = -1024.0, progress: bool = True, stage1_run: str | Path | None = None) -> Path:
    """Write one stage's dataset (manifest + derived files) into ``data_dir``; returns the manifest.

    Stage 1 (``stage1.csv``): the original images with ``label > 0``. Stage 2: ``label == 1`` and
    the images masked (:func:`stage2_input`, region dilated by ``dilate_mm``) with

    * ``stage1_run`` None: the **reference** periosteal region (``stage2_images/``, ``stage2.csv``);
    * ``stage1_run`` a finished stage-1 cv run: each case's stage-1 **out-of-fold** periosteal
      mask (:func:`stage1_mask`; ``stage2_images_oof/``, ``stage2_oof.csv``), i.e. the input the
      cascade gives stage 2 at test time.

    Existing files are kept (resume).
    """

    from femurseg.core import io
    from femurseg.core.progress import progress as progress_bar

    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    d = Path(data_dir)
    oof = stage == 2 and stage1_run is not None
    lab_dir = d / ("stage1_labels" if stage == 1 else "stage2_labels")
    img_dir = None if stage == 1 else d / ("stage2_images_oof" if oof else "stage2_images")
    for sub in (lab_dir, img_dir):
        if sub is not None:
            sub.mkdir(parents=True, exist_ok=True)
    thr1 = _stage_threshold(Path(stage1_run)) if oof else None
    rows = []
    for case in progress_bar(ds.cases, desc=f"cascade data, stage {stage}", unit="case", disable=not progress, leave=False):
        cid = case.case_id
        lab_path = lab_dir / f"{cid}.nii.gz"
        img_path = Path(case.image) if img_dir is None else img_dir / f"{cid}.nii.gz"
        if not (lab_path.exists() and img_path.exists()):
            lab = io.read_image(case.label, dtype=None)
            ref = np.asarray(lab.data)
            io.write_like(lab_path, (ref > 0 if stage == 1 else ref == 1).astype(np.uint8), lab)
            if img_dir is not None:
                img = io.read_image(case.image)
                region = stage1_mask(stage1_run, cid, thr1, img.spacing) if oof else ref > 0
                io.write_like(img_path, stage2_input(img.data, region, img.spacing, dilate_mm, fill_hu), img, np.float32)
        rows.append((str(img_path.resolve()), str(lab_path.resolve()), cid, case.group or ""))
    manifest = d / ("stage1.csv" if stage == 1 else ("stage2_oof.csv" if oof else "stage2.csv"))
    _write_manifest(manifest, rows)
    return manifest


#: Post-processing of stage 1's whole-bone mask (:func:`femurseg.inference.postprocess.postprocess`, 004's chain).
PERIOSTEAL_POSTPROCESS = "lcc+fill+open"


def periosteal_mask(prob: np.ndarray, threshold: float, spacing: Sequence[float]) -> np.ndarray:
    """The cascade's periosteal (whole-bone) mask from stage 1's probability: ``prob >= threshold``,
    largest 3D component, 3D holes filled, opened with a 1 mm ball (:data:`PERIOSTEAL_POSTPROCESS`).

    Why more than the largest component: the periosteal surface is closed and smooth, and the
    cortex is the periosteal mask minus the endosteal one, so every false periosteal voxel is a
    false *cortical* voxel. A hole left inside the bone turns its rim into cortex, and a one-voxel
    spur (into the hip joint space, or a partial-volume voxel at the surface) adds cortex where
    the shell is thinnest. Measured on the 16 CT phantoms (the demo cascade's models of 2026-11-21,
    out-of-fold, only this step changed): cortical volume error in the neck 6.0 -> 5.3 % (reference's regions),
    total cortical 5.7 -> 4.5 %. Bool, on the grid of ``prob``.
    """
    from femurseg.inference.postprocess import postprocess

    return postprocess(np.asarray(prob) >= threshold, PERIOSTEAL_POSTPROCESS, spacing)


def stage1_mask(stage1_run: str | Path, case_id: str, threshold: float, spacing: Sequence[float]) -> np.ndarray:
    """A case's stage-1 out-of-fold periosteal mask (:func:`periosteal_mask` of the ``oof``
    probability; what the cascade hands to stage 2), bool on the case's grid."""
    return periosteal_mask(mean_oof([Path(stage1_run)], case_id), threshold, spacing)


def stage_names(seeds: int = 1) -> tuple[list[str], list[str]]:
    """Folders of the stage runs of a cascade trained with ``seeds`` seeds: ``(stage 1 runs,
    stage 2 runs)``; the first seed's are ``stage1``/``stage2``, seed i's ``stage1_seed<i>``."""
    if seeds < 1:
        raise FemursegError(f"--seeds: must be >= 1, got {seeds}")
    return ([f"stage1{f'_seed{i}' if i else ''}" for i in range(seeds)],
            [f"stage2{f'_seed{i}' if i else ''}" for i in range(seeds)])


def mean_oof(runs: Sequence[Path], case_id: str) -> np.ndarray:
    """A case's out-of-fold probability averaged over stage runs (one seed each), float32."""
    from femurseg.core import io

    maps = [np.asarray(io.read_image(Path(r) / "oof" / f"{case_id}.nii.gz").data, np.float32) for r in runs]
    return maps[0] if len(maps) == 1 else np.mean(maps, axis=0, dtype=np.float32)


def _ensemble_threshold(runs: Sequence[Path], ds: Any, cases: Sequence[str], stage: int) -> float:
    """Stage ``stage``'s PR threshold: the stored one of a single run, else 001's rule on the
    pooled seed-averaged out-of-fold maps (reference: ``label > 0`` for stage 1, ``== 1`` for 2)."""
    from femurseg.core import io
    from femurseg.inference.thresholds import pr_threshold

    if len(runs) == 1:
        return _stage_threshold(Path(runs[0]))
    probs, refs = [], []
    for cid in cases:
        probs.append(mean_oof(runs, cid))
        lab = np.asarray(io.read_image(ds.case(cid).label, dtype=None).data)
        refs.append(lab > 0 if stage == 1 else lab == 1)
    return float(pr_threshold(probs, refs))


def _stage_threshold(run_dir: Path) -> float:
    p = run_dir / "thresholds.json"
    if p.exists():
        v = json.loads(p.read_text()).get("pr")
        if isinstance(v, (int, float)):
            return float(v)
    return 0.5
