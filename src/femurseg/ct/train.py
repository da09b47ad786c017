"""Training a cascade (``femurseg cv --task cascade``): both stages cross-validated on one split.

:func:`run_cascade_cv` trains both stages with the ordinary cross-validation machinery
(:func:`femurseg.training.cv.run_cv`) on derived datasets and one shared split, then scores the
cascade's out-of-fold label maps (:func:`femurseg.ct.evaluate.evaluate_cascade`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from femurseg.core.errors import FemursegError
from femurseg.ct.evaluate import evaluate_cascade
from femurseg.ct.femurs import dataset_femur_crop
from femurseg.ct.hu import check_ct_dataset
from femurseg.ct.stages import (
    CASCADE_SCALES,
    CASCADE_TASK,
    PERIOSTEAL_POSTPROCESS,
    prepare_cascade_data,
    stage_names,
)


def cascade_configs(scale: str = "demo", model_cfg: dict | None = None, prep_cfg: dict | None = None,
                    train_cfg: dict | None = None, aug_cfg: dict | None = None) -> dict[str, dict[str, Any]]:
    """The partial configs handed to :func:`femurseg.training.cv.run_cv` for both stages: the scale's
    (:data:`CASCADE_SCALES`) overridden by the given dicts. A model ``name`` other than the
    V-Net (e.g. ``unet3d``) drops the V-Net-only options."""
    from femurseg.models import default_config

    if scale not in CASCADE_SCALES:
        raise FemursegError(f"--scale: expected one of {', '.join(CASCADE_SCALES)}, got {scale!r}")
    base = CASCADE_SCALES[scale]
    model = dict(base["model"])
    if model_cfg and model_cfg.get("name", model["name"]) != model["name"]:
        allowed = default_config(model_cfg["name"])
        model = {k: v for k, v in model.items() if k in allowed and k != "name"}
    model.update(model_cfg or {})
    model["num_classes"] = 2
    return {"model": model, "preprocess": {**base["preprocess"], **(prep_cfg or {})},
            "train": {**base["train"], **(train_cfg or {})}, "augment": {**base["augment"], **(aug_cfg or {})}}


def run_cascade_cv(dataset: str | Path, out: str | Path, *, scale: str = "demo", model_cfg: dict | None = None,
                   prep_cfg: dict | None = None, train_cfg: dict | None = None, aug_cfg: dict | None = None,
                   folds: int = 4, seed: int = 0, group_by: str = "case", split_file: str | Path | None = None,
                   dilate_mm: float = 1.0, fill_hu: float = -1024.0, stage2_mask: str = "reference", seeds: int | None = None,
                   resume: bool = False, overwrite: bool = False, device: str | None = None, progress: bool = True,
                   evaluate: bool = True) -> dict[str, Any]:
    """Cross-validate the two-model CT cascade of paper 003 (``femurseg cv --task cascade``).

    Protocol (documented choice): both stages use the same folds. Stage 1 learns the whole bone
    (periosteal, ``label > 0``) from the CT. Stage 2 learns the endosteal region (``label ==
    1``) from the CT restricted to a periosteal region dilated by ``dilate_mm`` (voxels outside
    set to ``fill_hu``), as 003 trains its second model on "the region inside the periosteal
    contour". Which periosteal region (``stage2_mask``):

    * ``"reference"`` (default): the reference periosteal region (the literal reading of 003);
    * ``"oof"``: every case's stage-1 **out-of-fold** mask (:func:`stage1_mask`), so stage 2
      trains on the inputs the cascade gives it at test time (as nnU-Net's cascade trains its
      second stage on out-of-fold predictions); stage 1 is trained first.

    Measured on the 16 CT phantoms (same stage 1, the earlier F 4, L 3 demo models): endosteal DSC 0.980 (reference)
    vs 0.981 (oof), cortical DSC 0.829 vs 0.831, but cortical volume error 8.3 % vs 10.4 %; the
    default stays "reference".

    The **cascade** is evaluated the same way in both cases: every held-out case's stage-2 input
    is masked with its stage-1 out-of-fold prediction (:func:`periosteal_mask`, same
    dilation), and the fold's stage-2 model segments it; :func:`combine_stages` gives the
    label map (``oof_labels/``) that is compared with the reference (:func:`evaluate_cascade`).

    Args:
        dataset: CT dataset (labels 0/1/2): nnU-Net folder or CSV manifest.
        out: the cascade run folder (layout in the comment above this function's source).
        scale: "demo" (CPU) or "full" (paper 003 settings) base configs (:data:`CASCADE_SCALES`).
        model_cfg, prep_cfg, train_cfg, aug_cfg: partial overrides, the same for both stages.
        folds, seed, group_by, split_file: as :func:`femurseg.training.cv.run_cv` (one split for both).
        dilate_mm: dilation of the periosteal mask before masking stage 2's input.
        fill_hu: value outside it.
        stage2_mask: "oof" or "reference": the periosteal region stage 2 is trained on (above).
        seeds: train each stage this many times on the same folds (training seeds ``seed``,
            ``seed + 1``, ...; folders :func:`stage_names`) and average their probabilities
            (an ensemble per fold; the PR thresholds are taken on the averaged out-of-fold maps).
            Costs ``seeds`` times the training. Only with ``stage2_mask="reference"``. None: 1,
            or a resumed run's own; a resumed run given more seeds trains the missing ones and
            evaluates anew.
        resume, overwrite, device, progress: as :func:`femurseg.training.cv.run_cv`.
        evaluate: compute the cascade's out-of-fold labels and metrics at the end.

    Returns:
        The cascade summary (also ``RUN/cascade_summary.json``), or the run config if not evaluated.
    """

    from femurseg.data.dataset import load_checked
    from femurseg.data.splits import load_split, split_dataset
    from femurseg.inference.run import (
        CONFIG_NAME,
        RUN_FORMAT,
        RUN_VERSION,
        environment,
        now_iso,
        prepare_run_dir,
        write_json,
    )
    from femurseg.training.cv import run_cv

    out = Path(out)
    ds = load_checked(dataset, progress=progress)
    check_ct_dataset(ds, str(dataset))
    if dilate_mm < 0:
        raise FemursegError(f"--dilate-mm: must be >= 0, got {dilate_mm}")
    if stage2_mask not in ("oof", "reference"):
        raise FemursegError(f"stage2_mask: expected 'oof' or 'reference', got {stage2_mask!r}")
    cfgs = cascade_configs(scale, model_cfg, prep_cfg, train_cfg, aug_cfg)
    resuming = resume and (out / CONFIG_NAME).exists()
    had = 1  # seeds already in the run
    if resuming:
        config = json.loads((out / CONFIG_NAME).read_text())
        if config.get("task") != CASCADE_TASK:
            raise FemursegError(f"{out}: not a cascade run (task {config.get('task')!r})")
        opts = config["cascade"]
        dilate_mm, fill_hu = float(opts["dilate_mm"]), float(opts["fill_hu"])
        stage2_mask = str(opts.get("stage2_mask", "reference"))  # runs made before the option: reference
        had, seed = int(opts.get("seeds", 1)), int(config.get("seed", seed))
    n_seeds = had if seeds is None else seeds
    names1, names2 = stage_names(n_seeds)
    if n_seeds < had:
        raise FemursegError(f"{out}: the run has {had} seeds; --seeds {seeds} would drop trained ones")
    if n_seeds > 1 and stage2_mask == "oof":
        raise FemursegError("--seeds > 1 needs stage2_mask 'reference' (stage 2 trained on stage 1's "
                            "out-of-fold masks would depend on the seed)")
    if resuming:
        if n_seeds > had:  # add seeds: their stages train below, the evaluation is redone
            opts["seeds"], opts["stages"] = n_seeds, names1 + names2
            write_json(out / CONFIG_NAME, config)
            shutil.rmtree(out / "oof_labels", ignore_errors=True)
        cfgs = config["stage_configs"]
        split = load_split(out / "split.json", ds)
    else:
        if split_file is None and group_by == "case" and dataset_femur_crop(dataset) is not None:
            import sys

            print(f"femurseg: warning: {dataset} holds per-femur crops (femurseg crop-femurs): with --group-by case "
                  "the two hips of one scan may land in different folds; --group-by subject keeps them together",
                  file=sys.stderr)
        split = load_split(split_file, ds) if split_file is not None else split_dataset(ds, folds, seed, group_by)
        prepare_run_dir(out, resume=resume, overwrite=overwrite)
        out.mkdir(parents=True, exist_ok=True)
        split.save(out / "split.json")
        config = {
            "format": RUN_FORMAT, "version": RUN_VERSION, "kind": "cv", "task": CASCADE_TASK,
            "dataset": str(Path(dataset).resolve()), "modality": ds.modality, "labels": ds.labels,
            "cases": [c.case_id for c in ds.cases], "k": split.k, "seed": seed, "group_by": split.group_by,
            "scale": scale, "stage_configs": cfgs,
            "cascade": {"dilate_mm": float(dilate_mm), "fill_hu": float(fill_hu), "stages": names1 + names2,
                        "seeds": n_seeds, "stage2_mask": stage2_mask,
                        # trained on per-femur crops (crop_femur_dataset): predict crops every femur alike
                        "femur_crop_margin_mm": dataset_femur_crop(dataset),
                        "stage2_training_mask": ("stage-1 out-of-fold prediction (PR threshold, " + PERIOSTEAL_POSTPROCESS + ")"
                                                 if stage2_mask == "oof" else "reference periosteal region"),
                        "stage2_evaluation_mask": "stage-1 out-of-fold prediction (PR threshold, " + PERIOSTEAL_POSTPROCESS + ")"},
            # a run's usual keys, describing stage 1 (what tools that read any run expect)
            "model": cfgs["model"], "preprocess": cfgs["preprocess"],
            "device": str(device or "auto"), "environment": environment(), "created": now_iso(),
        }
        write_json(out / CONFIG_NAME, config)
    common = dict(model_cfg=cfgs["model"], prep_cfg=cfgs["preprocess"], train_cfg=cfgs["train"], aug_cfg=cfgs["augment"],
                  split_file=out / "split.json", device=device, progress=progress)
    m1 = prepare_cascade_data(ds, out / "data", 1, progress=progress)
    for i, name in enumerate(names1):
        run_cv(m1, out / name, resume=(out / name).exists(), seed=seed + i, **common)
    # stage 2's inputs: masked with stage 1's out-of-fold masks ("oof", needs stage 1 first) or the reference
    m2 = prepare_cascade_data(ds, out / "data", 2, dilate_mm=dilate_mm, fill_hu=fill_hu, progress=progress,
                              stage1_run=out / "stage1" if stage2_mask == "oof" else None)
    for i, name in enumerate(names2):
        run_cv(m2, out / name, resume=(out / name).exists(), seed=seed + i, **common)
    if not evaluate:
        return config
    return evaluate_cascade(out, device=device, progress=progress)
