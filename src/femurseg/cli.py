"""The ``femurseg`` command. Thin: it parses options and calls the library modules.

Every user-caused problem surfaces as a :class:`~femurseg.core.errors.FemursegError`, printed
as one line (``femurseg: error: ...``) with exit status 1, never as a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from femurseg.core.errors import FemursegError

app = typer.Typer(
    name="femurseg",
    help="Proximal femur segmentation in 3D MR and CT with deep CNNs (Deniz et al. 2018; Deng et al.).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _parse_ints(text: str, n: int | None = None, what: str = "value") -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError:
        raise FemursegError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if n is not None and len(vals) != n:
        raise FemursegError(f"{what}: expected {n} integers, got {text!r}")
    return vals


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Output dataset folder (nnU-Net layout)."),
    n: int = typer.Option(16, "--n", min=1, help="Number of cases."),
    modality: str = typer.Option("mr", help="mr (3T T1w FLASH-like) or ct (Hounsfield units, 2 labels)."),
    seed: int = typer.Option(0, help="Random seed; generation is deterministic for a seed."),
    size: Optional[str] = typer.Option(None, help="X,Y,Z = columns,rows,coronal slices (default: the modality's default)."),
    spacing: Optional[str] = typer.Option(None, help="Voxel size X,Y,Z in mm (default: keep the modality's field of view, 120 mm in-plane for MR)."),
    artefact_fraction: float = typer.Option(0.2, min=0.0, max=1.0, help="Fraction of cases with fold-over or bone-cyst artefacts (MR)."),
    preview: bool = typer.Option(False, "--preview", help="Also write preview.png: coronal slices of the first cases with the label outline."),
    variation: Optional[str] = typer.Option(None, help="Phantom world: wide (MR default) or narrow (CT default; the original MR world)."),
    shift: Optional[str] = typer.Option(None, help="Factor groups moved beyond the world's ranges, comma-separated (placement, head, neck, pose, contrast, cortex, texture, noise_bias, slice) or all."),
    bilateral: bool = typer.Option(False, "--bilateral", help="Both hips per scan (a pelvic field of view: MR 300 x 120 mm, CT 320 x 128 mm)."),
) -> None:
    """Generate a synthetic hip phantom dataset (the embedded default data)."""
    from femurseg.data import synth as synth_mod

    shape = None if size is None else tuple(reversed(_parse_ints(size, 3, "--size")))
    spc = None
    if spacing is not None:
        try:
            spc = tuple(reversed([float(x) for x in spacing.split(",")]))
        except ValueError:
            raise FemursegError(f"--spacing: expected three numbers in mm, got {spacing!r}") from None
        if len(spc) != 3 or min(spc) <= 0:
            raise FemursegError(f"--spacing: expected three positive numbers in mm, got {spacing!r}")
    ds = synth_mod.synthesize(out, n=n, modality=modality, seed=seed, shape=shape, spacing=spc,
                              artefact_fraction=artefact_fraction, preview=preview, variation=variation,
                              shift=None if shift is None else ("all" if shift == "all" else shift.split(",")),
                              bilateral=bilateral)
    typer.echo(f"wrote {len(ds.cases)} {modality.upper()} cases to {out}")
    if preview:
        typer.echo(f"preview: {Path(out) / 'preview.png'}")


@app.command()
def check(
    dataset: Path = typer.Argument(..., help="nnU-Net dataset folder or CSV manifest."),
    allow_unlabelled: bool = typer.Option(False, help="Do not require a label for every case."),
) -> None:
    """Verify every case of a dataset; one line per problem, non-zero exit if any."""
    from femurseg.data.dataset import check_dataset, load_dataset

    ds = load_dataset(dataset)
    problems = check_dataset(ds, require_labels=not allow_unlabelled)
    for p in problems:
        typer.echo(str(p))
    if problems:
        typer.echo(f"{len(problems)} problem(s) in {len(ds.cases)} case(s)", err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: {len(ds.cases)} case(s), labels {ds.labels}, modality {ds.modality}")


@app.command("crop-femurs")
def crop_femurs(
    dataset: Path = typer.Argument(..., help="CT dataset (labels 1 trabecular, 2 cortical): nnU-Net folder or CSV manifest."),
    out: Path = typer.Argument(..., help="Output dataset folder: one case <case>_<side> per labelled femur."),
    margin_mm: float = typer.Option(15.0, help="Margin around each femur's bone-threshold box, mm."),
    bilateral: Optional[bool] = typer.Option(None, "--bilateral/--unilateral",
                                             help="Force two hips or one per scan (default: from the shafts' distance)."),
) -> None:
    """Crop CT scans to one box per labelled femur, found from the image (for cascade training)."""
    from femurseg.ct.femurs import crop_femur_dataset
    ds = crop_femur_dataset(dataset, out, margin_mm=margin_mm, bilateral=bilateral)
    subjects = len({c.case_id.rsplit("_", 1)[0] for c in ds.cases})
    typer.echo(f"wrote {len(ds.cases)} femur crops from {subjects} scans to {out} "
               f"(train with: femurseg cv {out} --task cascade --group-by subject)")


@app.command()
def models(
    features: Optional[int] = typer.Option(None, help="Initial feature maps F (default: each model's own)."),
    levels: Optional[int] = typer.Option(None, help="Levels L in the contracting/expanding paths."),
    dilations: Optional[str] = typer.Option(None, help="Dilation rates of the centre layer, e.g. 1,2,4,8 (U-Nets)."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows (with buildable configs) as JSON."),
) -> None:
    """List the available architectures with their parameter counts."""
    import json

    from femurseg.models import models_table

    dil = list(_parse_ints(dilations, None, "--dilations")) if dilations else None
    rows = models_table(features, levels, dil)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    w = max(len(r["name"]) for r in rows)
    typer.echo(f"{'name':<{w}}  {'parameters':>12}  paper / options")
    for r in rows:
        typer.echo(f"{r['name']:<{w}}  {r['parameters']:>12,}  {r['paper']}")
        typer.echo(f"{'':<{w}}  {'':>12}  {r['options']}")


@app.command()
def predict(
    run: Path = typer.Argument(..., help="Run folder written by femurseg train / cv."),
    inputs: list[Path] = typer.Option(..., "-i", "--input", help="Scan: NIfTI/NRRD/MHA file or DICOM series folder. "
                                      "Batch mode: -i several times, a .txt list (one path per line) or a folder of scans."),
    output: Path = typer.Option(..., "-o", "--output", "--out", help="Mask (uint8, .nii.gz/.nrrd/.mha) on the scan's grid; "
                                "batch mode: a folder (one <case>.nii.gz per scan)."),
    prob: Optional[Path] = typer.Option(None, "--prob", help="Also write the femur probability map (float32); batch mode: a folder."),
    threshold: Optional[str] = typer.Option(None, "--threshold", help="pr | youden (stored by cv) | otsu | a number in [0, 1]. "
                                            "Default: pr if the run stores it, else 0.5."),
    postprocess: str = typer.Option("lcc", "--postprocess", help="none | lcc | lcc+fill | lcc+fill+open | lcc2[+fill[+open]] (lcc: largest 3D component; lcc2: also a second femur of >= 25 % its size, for scans of both hips)."),
    min_size: float = typer.Option(0.0, "--min-size", help="First remove components smaller than this (mm^3)."),
    folds: str = typer.Option("all", "--folds", help="all (average the fold models) or one fold number K."),
    tta: str = typer.Option("none", "--tta", help="none | flip (average with the left-right mirrored scan)."),
    fov: str = typer.Option("match", "--fov", help="match (a scan whose field of view is wider or narrower in-plane than the "
                            "training scans', or thicker than their slab, is segmented in windows of the training field "
                            "of view placed on the femur) | full (the whole scan as it is)."),
    engine: str = typer.Option("torch", "--engine", help="torch | onnx (ONNX Runtime; RUN/fold_<k>/model.onnx, exported on first use)."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="ONNX model file for --engine onnx (with --folds K)."),
    tiles: int = typer.Option(9, "--tiles", help="Mirrored tiles per slice for unpadded 2D U-Nets (9: paper 001, 49: paper 002)."),
    dicom_seg: bool = typer.Option(False, "--dicom-seg", help="Also write a DICOM SEG (DICOM input) as <output stem>.dcm."),
    dicom_seg_out: Optional[Path] = typer.Option(None, "--dicom-seg-out", help="Path of the DICOM SEG (implies --dicom-seg)."),
    preview: bool = typer.Option(False, "--preview", help="Also write <output stem>_preview.png (coronal slices with the outline)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    qc: str = typer.Option("on", "--qc", help="on (check each scan and mask: ok/warn/fail in <case>_qc.json and the batch "
                           "table) | strict (also: no mask for a fail scan, exit 2) | off."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    resume: bool = typer.Option(False, "--resume", help="Skip scans whose outputs already exist and read back (finish an interrupted batch)."),
    backend: str = typer.Option("local", "--backend", help="local | ray (batch: stream the scans through Ray actors holding the models)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, else a Ray instance started here)."),
    replicas: Optional[int] = typer.Option(None, "--replicas", help="Ray: model replicas (default: as many as the cluster's CPUs/GPUs allow)."),
    num_cpus: float = typer.Option(1.0, "--num-cpus", help="Ray: CPUs per replica (also its torch threads)."),
    num_gpus: float = typer.Option(0.0, "--num-gpus", help="Ray: GPUs per replica (fractions share a GPU)."),
) -> None:
    """Segment the proximal femur in a scan (or a batch of scans) with a trained run.

    Exit status: 0 done; 1 nothing done (bad run, input or output); 2 batch finished but some scans failed,
    or (--qc strict) the scan failed quality control.
    """
    from femurseg.ct.predict import load_any_predictor
    from femurseg.ct.regions import femoral_head_check
    from femurseg.inference.predict import predict_command
    from femurseg.scale.distributed import backend_from_options

    be = backend_from_options(backend, address=address, num_cpus=num_cpus, num_gpus=num_gpus, replicas=replicas)
    code = predict_command(run, inputs, output, backend=be, resume=resume, load=load_any_predictor, qc=qc,
                           qc_checks=(femoral_head_check,),
                           prob=prob, threshold=threshold, postprocess=postprocess,
                           min_size_mm3=min_size, folds=folds, tta=tta, fov=fov, engine=engine, onnx_path=onnx, tiles=tiles,
                           dicom_seg=dicom_seg, dicom_seg_out=dicom_seg_out, preview=preview, device=device,
                           progress=not quiet, echo=typer.echo)
    if code:
        raise typer.Exit(code)


@app.command()
def export(
    run: Path = typer.Argument(..., help="Run folder written by femurseg train / cv."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Output .onnx file (one fold). Default: RUN/fold_<k>/model.onnx for each fold."),
    fold: str = typer.Option("all", "--fold", help="all or one fold number K."),
) -> None:
    """Export fold models to ONNX (dynamic input size) for ONNX Runtime and predict --engine onnx."""
    from femurseg.inference.onnx import export_run

    for p in export_run(run, onnx, fold):
        typer.echo(f"wrote {p}")


@app.command()
def evaluate(
    out: Path = typer.Option(..., "--out", "-o", help="Per-case results CSV (one row per case); RESULTS_summary.csv (volume MAE/RMSE/RE) and RESULTS_stats.csv are written beside it."),
    pred: Optional[Path] = typer.Option(None, "--pred", help="Folder of predicted masks <case>.nii.gz."),
    gt: Optional[Path] = typer.Option(None, "--gt", help="Reference labels: folder of <case>.nii.gz, nnU-Net dataset (labelsTr) or CSV manifest. With --run: overrides the run's dataset."),
    prob: Optional[Path] = typer.Option(None, "--prob", help="Folder of probability maps <case>.nii.gz (adds per-case AUC and AP)."),
    run: Optional[Path] = typer.Option(None, "--run", help="Cross-validation run folder: evaluate its out-of-fold predictions at the stored PR threshold."),
    threshold: Optional[str] = typer.Option(None, "--threshold", help="--run only: pr (default), youden or a number."),
    postprocess: Optional[str] = typer.Option(None, "--postprocess", help="--run only: none, lcc, lcc+fill, lcc+fill+open, lcc2, lcc2+fill, lcc2+fill+open (default: the run's)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Metrics per case (DSC, precision, recall, ASD, MSD, HD95, volumes, AUC/AP) of masks or a cv run."""
    from femurseg.ct.measure import region_volume_columns
    from femurseg.evaluation.evaluate import evaluate_command, format_report

    rows, paths = evaluate_command(out, pred=pred, gt=gt, prob=prob, run=run, threshold=threshold,
                                   region_volumes=region_volume_columns,
                                   postprocess=postprocess, progress=not quiet)
    typer.echo(format_report(rows))
    typer.echo(f"wrote {paths['results']}, {paths['summary'].name}, {paths['stats'].name}")


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="Cross-validation run folders (or per-case results CSVs of femurseg evaluate); the first is the reference model."),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder: CSV tables, PNG figures, meshes and report.html."),
    metric: str = typer.Option("ap", "--metric", help="Per-case metric of the Wilcoxon/Holm table (ap as in paper 001 Table 4, or dsc, asd_mm, ...)."),
    names: Optional[str] = typer.Option(None, "--names", help="Comma-separated display names, one per run."),
    cases: Optional[str] = typer.Option(None, "--cases", help="Comma-separated cases for the figure panels (default: best, median and worst DSC of the first run)."),
    gt: Optional[Path] = typer.Option(None, "--gt", help="Reference labels overriding the runs' datasets."),
    postprocess: Optional[str] = typer.Option(None, "--postprocess", help="Post-processing for every run (none, lcc, ...; default: each run's)."),
    no_panels: bool = typer.Option(False, "--no-panels", help="Skip the case panels and 3D surfaces."),
    no_qc: bool = typer.Option(False, "--no-qc", help="Skip the quality control of the out-of-fold masks (table_qc.csv)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Compare runs on their common cases: Tables 1-4, ROC/PR, box plots, volume agreement, case panels, report.html."""
    from femurseg.ct.regions import femoral_head_check
    from femurseg.evaluation.compare import format_headline, run_compare

    split = lambda t: [x.strip() for x in t.split(",") if x.strip()] if t else None  # noqa: E731
    hl = run_compare(runs, out, names=split(names), metric=metric, cases=split(cases), gt=gt,
                     postprocess=postprocess, panels=not no_panels, qc=not no_qc,
                     qc_checks=(femoral_head_check,), progress=not quiet)
    typer.echo(format_headline(hl))


@app.command()
def measure(
    mask: Path = typer.Argument(..., help="Label map: CT 0/1/2 (trabecular/cortical) or binary 0/1 (MR)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Image on the mask's grid (CT in HU): adds mean intensity per compartment."),
    out: Path = typer.Option(..., "--out", "-o", help="CSV: one row per region (head, neck, trochanter, intertrochanter, combination) and total."),
    regions_out: Optional[Path] = typer.Option(None, "--regions-out", help="Also write the region label map (1 head, 2 neck, 3 trochanter, 4 intertrochanter)."),
    no_regions: bool = typer.Option(False, "--no-regions", help="Only the total row (no head/neck/trochanter split)."),
    modality: Optional[str] = typer.Option(None, "--modality", help="ct or mr (default: ct if the mask holds label 2); ct checks the image is in HU."),
) -> None:
    """Volumes (cm^3), cortical thickness (mm) and mean HU per femur region (paper 003 Fig. 7, Table 2)."""
    import warnings

    from femurseg.ct.hu import HUWarning
    from femurseg.ct.measure import measure_files

    if modality is not None and modality.lower() not in ("ct", "mr"):
        raise FemursegError(f"--modality: expected ct or mr, got {modality!r}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HUWarning)
        rows, fits = measure_files(mask, image, out, regions_out=regions_out, regions=not no_regions, modality=modality)
    for w in caught:
        typer.echo(f"femurseg: warning: {w.message}", err=True)
    for f in fits:
        typer.echo(f"{f['side']} femur: head radius {f['head_radius_mm']:.1f} mm, neck-shaft angle {f['neck_shaft_angle_deg']:.1f} deg")
    for r in rows:
        if r["region"] == "total":
            typer.echo(f"{r['side'] or 'femur'} total volume {r['total_volume_cm3']:.2f} cm3")
    typer.echo(f"wrote {out}")


@app.command()
def experiment(
    name: str = typer.Argument(..., help="Experiment: paper (the grid of paper 001, Tables 1-4)."),
    dataset: Optional[Path] = typer.Argument(None, help="nnU-Net dataset folder or CSV manifest."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Experiment folder (runs/, reports, grid.csv, report.html); rerun to resume."),
    scale: str = typer.Option("demo", "--scale", help="demo (tiny networks, 2 CPU cores, < 30 min on the default phantoms) or full (the paper's sizes; GPU)."),
    models: Optional[str] = typer.Option(None, "--models", help="Comma-separated grid ids or patterns to run (e.g. '3d-*,2d-f64-l4'); default: all."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the grid and settings, train nothing."),
    seed: int = typer.Option(0, help="Seed of the shared split and of every training."),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="ct: train each stage with this many seeds (seed, seed+1, ...) and average them per fold (default 1; more on an existing study adds seeds)."),
    device: Optional[str] = typer.Option(None, help="cuda, cpu or auto (default)."),
    no_panels: bool = typer.Option(False, "--no-panels", help="Skip the case panels in the reports."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    backend: str = typer.Option("local", help="local, or ray (every (model, fold) of a stage is one Ray task)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)."),
    num_cpus: float = typer.Option(1.0, help="CPUs per Ray fold task."),
    num_gpus: float = typer.Option(0.0, help="GPUs per Ray fold task."),
    max_retries: int = typer.Option(3, help="Ray retries of a failed fold task."),
) -> None:
    """Run the paper's model grid on one shared split, select thresholds, evaluate and compare."""
    from femurseg.experiments.paper import experiment_command
    from femurseg.scale.distributed import backend_from_options

    pats = [m.strip() for m in models.split(",") if m.strip()] if models else None
    be = backend_from_options(backend, address=address, num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries)
    typer.echo(experiment_command(name, dataset, out, scale=scale, models=pats, dry_run=dry_run, seed=seed, seeds=seeds,
                                  device=device, panels=not no_panels, progress=not quiet, backend=be))


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", "-o", help="Folder for the phantom data, the cv run and the report."),
    n: int = typer.Option(16, "--n", min=4, help="Number of phantom cases."),
    seed: int = typer.Option(0, help="Seed of the phantoms, the split and the training."),
    max_epochs: Optional[int] = typer.Option(None, help="Cap the epochs per fold (default: the preset's early stopping)."),
) -> None:
    """The whole study in miniature: phantoms -> 4-fold cv of the dilated 3D U-Net -> evaluation -> report."""
    from femurseg.experiments.demo import format_summary, run_demo

    hl = run_demo(out, n=n, seed=seed, max_epochs=max_epochs)
    typer.echo(format_summary(hl))


_PRECISION_HELP = ("auto (default: float16 AMP on CUDA, bfloat16 on CPUs with AVX512-BF16/AMX, float32 on other "
                   "CPUs), fp32, bf16 or fp16; recorded with the reason in config.json.")
_AUGMENT_HELP = ("Augmentation preset: light (the default preset's: mirror, in-plane rotation, zoom, noise, bias, "
                 "brightness, contrast, gamma), nnunet (nnU-Net v2's full set: also tilt, elastic, blur, low "
                 "resolution) or flip (the mirror only; the paper preset's); then optionally ,FIELD=VALUE changes "
                 "of femurseg.data.augment.AugmentConfig, e.g. light,fg_contrast_p=0.5,fg_contrast=0.05:1.")

# The model / preprocessing / training options that `cv` and `train` share, declared once. Every default
# is None, meaning "the preset's value". Both signatures take their declarations from here and hand the
# values on by name (`_chosen_training_options`).
_TRAINING = {
    "model": typer.Option(None, help="Architecture: unet3d, unet2d, unet2d-unpadded, vnet, patchcnn (see `femurseg models`)."),
    "features": typer.Option(None, help="Initial feature maps F (16, 32, 64)."),
    "levels": typer.Option(None, help="Levels L of the contracting/expanding paths (3 or 4)."),
    "dilations": typer.Option(None, help="Dilation rates of the centre layer, e.g. 1,2,4,8 ('none' to switch off)."),
    "norm": typer.Option(None, help="none, batch or instance normalisation."),
    "dropout": typer.Option(None, help="Dropout before the centre layer."),
    "deep_supervision": typer.Option(None, "--deep-supervision/--no-deep-supervision",
                                     help="U-Nets: auxiliary losses on the coarser decoder outputs (nnU-Net's deep supervision)."),
    "loss": typer.Option(None, help="wce (paper Eq. 1, inverse-frequency reading), wce-literal, ce, dice, dice-wce, dice-ce."),
    "lr": typer.Option(None, help="Learning rate (the schedule's peak)."),
    "lr_schedule": typer.Option(None, help="constant (paper), cosine (default preset) or poly (nnU-Net's polyLR)."),
    "optimizer": typer.Option(None, help="adam (papers, default) or sgd (nnU-Net's: Nesterov momentum 0.99; its lr 1e-2, weight decay 3e-5)."),
    "weight_decay": typer.Option(None, help="L2 weight decay (default 0)."),
    "batch_size": typer.Option(None, help="Batch size (per rank under --ddp)."),
    "max_epochs": typer.Option(None, help="Hard limit on epochs."),
    "min_epochs": typer.Option(None, help="Epochs before early stopping may stop (paper: 30)."),
    "patience": typer.Option(None, help="Stop after this many epochs without an improvement of 1e-4 (paper: 10)."),
    "patch_size": typer.Option(None, help="3D random patches D,H,W instead of whole volumes."),
    "crop_slices": typer.Option(None, help="Keep the central N coronal slices (paper: 48; 0: all)."),
    "target_size": typer.Option(None, help="Resample slices in-plane to ROWS,COLS (paper: 256,256)."),
    "scale": typer.Option(None, help="In-plane zoom factor when no --target-size (default preset: 0.5)."),
    "normalise": typer.Option(None, help="zscore (default), body (z-score over the body, not the air), percentile, ct or none."),
    "threads": typer.Option(None, help="CPU threads for torch."),
    "precision": typer.Option(None, help=_PRECISION_HELP),
    "augment": typer.Option(None, help=_AUGMENT_HELP),
}


def _training_options(*, model: str | None = None, features: int | None = None, levels: int | None = None,
                      dilations: str | None = None, norm: str | None = None, dropout: float | None = None,
                      deep_supervision: bool | None = None, loss: str | None = None, lr: float | None = None,
                      lr_schedule: str | None = None, optimizer: str | None = None, weight_decay: float | None = None,
                      batch_size: int | None = None, max_epochs: int | None = None, min_epochs: int | None = None,
                      patience: int | None = None, patch_size: str | None = None, crop_slices: int | None = None,
                      target_size: str | None = None, scale: float | None = None, normalise: str | None = None,
                      threads: int | None = None, precision: str | None = None, augment: str | None = None) -> dict:
    """Partial model / preprocessing / training / augmentation dicts from the options of ``_TRAINING``.

    An option left at None is left out, so the preset fills it in.
    """
    model_cfg = {k: v for k, v in {"name": model, "features": features, "levels": levels, "norm": norm,
                                   "dropout": dropout, "deep_supervision": deep_supervision}.items() if v is not None}
    if dilations is not None:
        model_cfg["dilations"] = None if dilations.strip().lower() in ("", "none", "0") else list(_parse_ints(dilations, None, "--dilations"))
    prep = {}
    if crop_slices is not None:
        prep["crop_slices"] = None if crop_slices <= 0 else crop_slices
    if target_size is not None:
        prep["target_size"] = list(_parse_ints(target_size, 2, "--target-size"))
        prep["scale"] = None
    if scale is not None:
        prep["scale"] = scale
    if normalise is not None:
        prep["normalise"] = normalise
    train = {k: v for k, v in {"loss": loss, "optimizer": optimizer, "lr": lr, "lr_schedule": lr_schedule,
                               "weight_decay": weight_decay, "batch_size": batch_size, "max_epochs": max_epochs,
                               "min_epochs": min_epochs, "patience": patience, "threads": threads,
                               "precision": precision}.items() if v is not None}
    if patch_size is not None:
        train["patch_size"] = list(_parse_ints(patch_size, 3, "--patch-size"))
    out = {"model_cfg": model_cfg or None, "prep_cfg": prep or None, "train_cfg": train or None}
    if augment is not None:
        from femurseg.data.augment import parse_augment

        out["aug_cfg"] = parse_augment(augment).to_dict()
    return out


def _chosen_training_options(arguments: dict) -> dict:
    """``_training_options`` of the ``_TRAINING`` entries among a command's arguments (its ``locals()``)."""
    return _training_options(**{name: arguments[name] for name in _TRAINING})


@app.command()
def cv(
    dataset: Path = typer.Argument(..., help="nnU-Net dataset folder or CSV manifest."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder to create."),
    preset: str = typer.Option("default", help="default (CPU-friendly, demo scale) or paper (001: F 32, L 4, dilations 1,2,4,8, 256x256, lr 5e-5)."),
    task: str = typer.Option("binary", help="binary (femur vs background) or cascade (CT: periosteal then endosteal, paper 003)."),
    model: Optional[str] = _TRAINING["model"],
    features: Optional[int] = _TRAINING["features"],
    levels: Optional[int] = _TRAINING["levels"],
    dilations: Optional[str] = _TRAINING["dilations"],
    norm: Optional[str] = _TRAINING["norm"],
    dropout: Optional[float] = _TRAINING["dropout"],
    deep_supervision: Optional[bool] = _TRAINING["deep_supervision"],
    folds: int = typer.Option(4, help="k of k-fold cross-validation (paper: 4)."),
    seed: int = typer.Option(0, help="Seed of the split, the initial weights and every epoch."),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="--task cascade: train each stage with this many seeds and average them per fold (default 1)."),
    group_by: str = typer.Option("case", help="case, or subject (keep all cases of one subject in one fold)."),
    split: Optional[Path] = typer.Option(None, help="Reuse the folds of a split.json or of another run folder."),
    inner_val: float = typer.Option(0.0, help="Fraction of each fold's training cases used for early stopping (0: the held-out fold, as the paper)."),
    loss: Optional[str] = _TRAINING["loss"],
    lr: Optional[float] = _TRAINING["lr"],
    lr_schedule: Optional[str] = _TRAINING["lr_schedule"],
    optimizer: Optional[str] = _TRAINING["optimizer"],
    weight_decay: Optional[float] = _TRAINING["weight_decay"],
    batch_size: Optional[int] = _TRAINING["batch_size"],
    max_epochs: Optional[int] = _TRAINING["max_epochs"],
    min_epochs: Optional[int] = _TRAINING["min_epochs"],
    patience: Optional[int] = _TRAINING["patience"],
    patch_size: Optional[str] = _TRAINING["patch_size"],
    crop_slices: Optional[int] = _TRAINING["crop_slices"],
    target_size: Optional[str] = _TRAINING["target_size"],
    scale: Optional[float] = _TRAINING["scale"],
    normalise: Optional[str] = _TRAINING["normalise"],
    threads: Optional[int] = _TRAINING["threads"],
    precision: Optional[str] = _TRAINING["precision"],
    augment: Optional[str] = _TRAINING["augment"],
    device: Optional[str] = typer.Option(None, help="cuda or cpu (default: CUDA when present)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last complete epoch."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
    backend: str = typer.Option("local", help="local, or ray (one Ray task per fold)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)."),
    num_cpus: float = typer.Option(1.0, help="CPUs per Ray fold task."),
    num_gpus: float = typer.Option(0.0, help="GPUs per Ray fold task."),
    max_retries: int = typer.Option(3, help="Ray retries of a failed fold task."),
    ddp: bool = typer.Option(False, "--ddp", help="Run as one rank of a torchrun job (DistributedDataParallel)."),
) -> None:
    """Cross-validate a model (paper 001 protocol): k stratified folds, out-of-fold predictions, PR threshold."""
    from femurseg.scale.distributed import backend_from_options

    opts = _chosen_training_options(locals())
    be = backend_from_options(backend, address=address, num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries)
    if task == "cascade":
        from femurseg.ct.evaluate import format_cascade_report
        from femurseg.ct.train import run_cascade_cv
        if be != "local":
            raise FemursegError("--task cascade: runs on the local backend only")
        summary = run_cascade_cv(dataset, out, folds=folds, seed=seed, seeds=seeds, group_by=group_by, split_file=split,
                                 resume=resume, overwrite=overwrite, device=device, **opts)
        typer.echo(format_cascade_report(summary))
        return
    if task != "binary":
        raise FemursegError(f"--task: expected binary or cascade, got {task!r}")
    if seeds is not None:
        raise FemursegError("--seeds: only for --task cascade")
    from femurseg.training.cv import run_cv

    res = run_cv(dataset, out, preset=preset, folds=folds, seed=seed, group_by=group_by, split_file=split,
                 inner_val=inner_val, resume=resume, overwrite=overwrite, device=device, backend=be,
                 dist=_ddp_group(ddp, device), **opts)
    _echo_cv_summary(res.summary, out)


def _ddp_group(ddp: bool, device: str | None):
    """The torchrun process group for ``--ddp`` (None without it)."""
    if not ddp:
        return None
    from femurseg.scale.distributed import init_ddp

    return init_ddp(device)


def _echo_cv_summary(summary: dict, out: Path) -> None:
    m = {k.removeprefix("mean_"): v for k, v in summary.items() if k.startswith("mean_")}
    parts = [f"{k.upper()} {m[k]:.3f}" for k in ("dsc", "precision", "recall") if isinstance(m.get(k), (int, float))]
    parts += [f"{k.removesuffix('_mm').upper()} {m[k]:.2f} mm" for k in ("asd_mm", "msd_mm") if isinstance(m.get(k), (int, float))]
    typer.echo(f"run: {out}" + (f"  out-of-fold mean: {', '.join(parts)}" if parts else ""))


@app.command()
def train(
    dataset: Path = typer.Argument(..., help="nnU-Net dataset folder or CSV manifest."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder to create."),
    preset: str = typer.Option("default", help="default or paper."),
    model: Optional[str] = _TRAINING["model"],
    features: Optional[int] = _TRAINING["features"],
    levels: Optional[int] = _TRAINING["levels"],
    dilations: Optional[str] = _TRAINING["dilations"],
    norm: Optional[str] = _TRAINING["norm"],
    dropout: Optional[float] = _TRAINING["dropout"],
    deep_supervision: Optional[bool] = _TRAINING["deep_supervision"],
    val_fraction: float = typer.Option(0.2, help="Held-out fraction for early stopping (0: train on all cases)."),
    seed: int = typer.Option(0, help="Seed."),
    loss: Optional[str] = _TRAINING["loss"],
    lr: Optional[float] = _TRAINING["lr"],
    lr_schedule: Optional[str] = _TRAINING["lr_schedule"],
    optimizer: Optional[str] = _TRAINING["optimizer"],
    weight_decay: Optional[float] = _TRAINING["weight_decay"],
    batch_size: Optional[int] = _TRAINING["batch_size"],
    max_epochs: Optional[int] = _TRAINING["max_epochs"],
    min_epochs: Optional[int] = _TRAINING["min_epochs"],
    patience: Optional[int] = _TRAINING["patience"],
    patch_size: Optional[str] = _TRAINING["patch_size"],
    crop_slices: Optional[int] = _TRAINING["crop_slices"],
    target_size: Optional[str] = _TRAINING["target_size"],
    scale: Optional[float] = _TRAINING["scale"],
    normalise: Optional[str] = _TRAINING["normalise"],
    threads: Optional[int] = _TRAINING["threads"],
    precision: Optional[str] = _TRAINING["precision"],
    augment: Optional[str] = _TRAINING["augment"],
    device: Optional[str] = typer.Option(None, help="cuda or cpu (default: CUDA when present)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
    ddp: bool = typer.Option(False, "--ddp", help="Run as one rank of a torchrun job (DistributedDataParallel)."),
) -> None:
    """Train one model (same run layout as cv, with one fold) for `femurseg predict`."""
    from femurseg.training.cv import run_train

    opts = _chosen_training_options(locals())
    res = run_train(dataset, out, val_fraction=val_fraction, preset=preset, seed=seed, resume=resume,
                    overwrite=overwrite, device=device, dist=_ddp_group(ddp, device), **opts)
    _echo_cv_summary(res.summary, out)


@app.command("plot-training")
def plot_training(
    run: Path = typer.Argument(..., help="Run folder."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG path (default: RUN/training.png)."),
) -> None:
    """Train/validation loss curves per fold, like the paper's Fig. 7."""
    from femurseg.evaluation.report.training import plot_training as plot

    typer.echo(str(plot(run, out)))


def main() -> None:
    """Console entry point."""
    try:
        rv = app(standalone_mode=False)
    except FemursegError as exc:
        typer.echo(f"femurseg: error: {exc}", err=True)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("femurseg: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("femurseg: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # usage errors (click's or typer's vendored click: duck-typed)
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
