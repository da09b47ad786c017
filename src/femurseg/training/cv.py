"""Cross-validation (``femurseg cv``) and single-model training (``femurseg train``).

:func:`run_cv` follows paper 001 ("Model selection"): the cases are split into k disjoint
folds by stratified random sampling (:mod:`femurseg.data.splits`), one model is trained per
fold on the other k - 1 folds with early stopping on the held-out fold, every held-out case
is predicted by the model that did not see it, and the pooled out-of-fold predictions give
the PR-curve and Youden thresholds. Outputs, in the run folder (:mod:`femurseg.inference.run`):
per-case probability maps on the original grid (``oof/<case>.nii.gz``, written with the
source image's geometry), binary masks at the PR threshold (``oof_masks/``), per-case
metrics (``metrics.csv``), ``thresholds.json`` and ``summary.json``.

Validation protocol. As in the paper, each fold's held-out cases are also its early-stopping
validation set. The out-of-fold Dice is therefore slightly optimistic (the stopping epoch was
chosen on those cases; the PR threshold, too, is chosen on the pooled out-of-fold
predictions it is then evaluated on). ``inner_val`` > 0 instead holds out that fraction of
each fold's *training* cases for early stopping, which removes this bias at the cost of
training data.

:func:`run_train` writes the same layout with one fold: its held-out cases
(``val_fraction`` of the dataset, stratified) are the validation set and get out-of-fold
predictions; ``val_fraction=0`` trains on every case (monitoring the training loss).

Every input problem (a dataset that fails the check, more folds than cases, a label empty
after cropping, a model that does not fit the input, an existing run without
``--resume``/``--overwrite``) raises :class:`FemursegError` *before* anything is written.

Presets: ``"default"`` is tuned so that ``femurseg cv DATASET --out RUN`` on the default
16-case phantom reaches a mean out-of-fold Dice >= 0.95 in a few minutes on 2 CPU cores
(see :data:`PRESETS`); ``"paper"`` is paper 001's best 3D network and Table 5 values.

Length: the cross-validation protocol (configs, data preparation, folds, parallel fold workers, out-of-fold maps, thresholds) is one contract with the run folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from femurseg.core import io
from femurseg.core.backend import local_or_backend
from femurseg.core.errors import FemursegError
from femurseg.core.precision import resolve_precision
from femurseg.inference.qc import image_features, mask_features, reference_from_cases
from femurseg.inference.qc import load_reference as load_qc_reference
from femurseg.inference.qc import write_reference as write_qc_reference
from femurseg.inference.thresholds import foreground_probability
from femurseg.core.progress import progress as progress_bar
from femurseg.core.progress import write as progress_write
from femurseg.core.tables import write_csv
from femurseg.data.augment import AugmentConfig
from femurseg.data.dataset import Dataset, load_checked
from femurseg.data.preprocess import (
    PrepInfo,
    PreprocessConfig,
    preprocess_image,
    preprocess_label,
    restore,
)
from femurseg.data.splits import Split, holdout_split, load_split, split_dataset
from femurseg.inference.run import (
    CONFIG_NAME,
    RUN_FORMAT,
    RUN_VERSION,
    Run,
    environment,
    load_run,
    model_from_checkpoint,
    now_iso,
    prepare_run_dir,
    write_json,
)
from femurseg.inference.tiling import (
    get_device,
    input_size_for,
    is_patch_classifier,
    predict_prob,
)
from femurseg.training.fit import (
    FitResult,
    Sample,
    TrainConfig,
    derive_seed,
    fit,
    seed_everything,
)

PRESETS: dict[str, dict[str, Any]] = {
    # CPU-friendly (2 cores, ~5 min for 16 phantom cases x 4 folds). Chosen by measurement on the
    # default 16-case MR phantom (48 x 128 x 128), AMD EPYC with AVX512-BF16:
    # * in-plane x0.5 (64 x 64): a 3D U-Net step costs ~1/4 of full resolution; restoring soft
    #   probabilities to 128 x 128 loses < 0.005 Dice (an ideal map restores at 0.995);
    # * 16 features, 3 levels (the paper's smaller width); the dilated centre (1,2,4,8) costs only
    #   ~5 % more CPU time per step (1.14 vs 1.08 CPU-s float32, 0.52 vs 0.51 bf16);
    # * instance norm: without it (the paper's plain U-Net) validation Dice was 0.79 after 7 epochs
    #   at lr 2e-3 and unstable; with it 0.95 after 8;
    # * Dice + wCE: 0.975 vs 0.964 (wCE alone) validation Dice after 20 epochs on one fold;
    # * Adam 2e-3 with cosine decay, 16 epochs (early stopping from 10, patience 5): mean
    #   out-of-fold DSC 0.966 +- 0.011 (20 epochs: 0.969 +- 0.012), ~115 CPU-s per fold, on the
    #   narrow phantom world; on the wide world (the MR default since) 16 epochs left the model
    #   under-trained, so the default is now at most 32 epochs, early stopping from 20 (patience 5):
    #   demo DSC 0.937 -> 0.952 (same day), and every cohort of benchmarks/bench_shift.py gains
    #   (wide world 0.931 -> 0.956, head shift 0.930 -> 0.951), at ~1.5x the training time
    #   (README, "The demo today");
    # * precision "auto" (femurseg.core.precision): bfloat16 autocast where the CPU has it natively
    #   (AVX512-BF16/AMX): mean out-of-fold DSC 0.966 +- 0.011 vs 0.963 +- 0.015 in float32 with
    #   the same settings, at 115 vs 245 CPU-s per fold; float32 on AVX2-only CPUs, where
    #   bfloat16 is emulated and a step is ~37x slower than float32.
    "default": {
        "model": {"name": "unet3d", "features": 16, "levels": 3, "dilations": None, "norm": "instance"},
        "preprocess": PreprocessConfig.preset("default").to_dict(),
        "train": TrainConfig.preset("default").to_dict(),
        "augment": AugmentConfig.preset("light").to_dict(),
    },
    # Paper 001: 3D U-Net, 32 features, 4 levels, dilations 1,2,4,8 at the centre; 48 central
    # slices resampled to 256 x 256; Adam 5e-5, batch 1; early stopping after 30 epochs with
    # patience 10 and min delta 1e-4; horizontal flips.
    "paper": {
        "model": {"name": "unet3d", "features": 32, "levels": 4, "dilations": [1, 2, 4, 8]},
        "preprocess": PreprocessConfig.preset("paper").to_dict(),
        "train": TrainConfig.preset("paper").to_dict(),
        "augment": AugmentConfig().to_dict(),
    },
}


@dataclass
class CVResult:
    run: Run
    summary: dict[str, Any]


# ----------------------------------------------------------------------------- configs


def resolve_configs(preset: str = "default", model_cfg: dict | None = None, prep_cfg: dict | None = None,
                    train_cfg: dict | None = None, aug_cfg: dict | None = None) -> dict[str, Any]:
    """The complete configs: ``preset``'s values overridden by the given (partial) dicts.

    A model override that changes ``name`` to another U-Net keeps the preset's U-Net options
    (features, levels, dilations, norm); any other network (V-Net, patch CNN) starts from its
    own registry defaults. With the default preset the 2D U-Nets train on batches of 8 slice
    stacks unless ``batch_size`` is given (the paper preset keeps batch size 1).
    """
    from femurseg.models import default_config

    if preset not in PRESETS:
        raise FemursegError(f"--preset: unknown preset {preset!r} ({', '.join(PRESETS)})")
    base = PRESETS[preset]
    model = dict(base["model"])
    name = (model_cfg or {}).get("name", model["name"])
    allowed = default_config(name)
    keep = name.startswith("unet") and str(model["name"]).startswith("unet")
    model = {k: v for k, v in model.items() if keep and k in allowed and k != "in_channels"}
    model.update(model_cfg or {})
    model["name"] = name
    full_model = {**allowed, **model}
    prep = PreprocessConfig.from_dict({**base["preprocess"], **(prep_cfg or {})})
    spatial2d = name.startswith("unet2d") or name == "patchcnn"
    cpu_2d = preset == "default" and spatial2d and name != "patchcnn"
    train_base = {**base["train"], **({"batch_size": 8} if cpu_2d else {})}
    train = TrainConfig.from_dict({**train_base, **(train_cfg or {})})
    aug = AugmentConfig.from_dict({**base["augment"], **(aug_cfg or {})})
    return {"model": full_model, "preprocess": prep.to_dict(), "train": train.to_dict(), "augment": aug.to_dict()}


def _conflicts(stored: dict[str, Any], given: dict | None, section: str) -> list[str]:
    out = []
    for k, v in (given or {}).items():
        sv = stored.get(k)
        norm = (lambda x: list(x) if isinstance(x, tuple) else x)
        if norm(sv) != norm(v):
            out.append(f"{section}.{k}: run has {sv!r}, given {v!r}")
    return out


# ----------------------------------------------------------------------------- data


@dataclass
class Prepared:
    sample: Sample
    info: PrepInfo
    qc: tuple[dict[str, float], dict[str, float]] | None = None
    """The case's QC features: :func:`femurseg.inference.qc.image_features` of the image and
    :func:`femurseg.inference.qc.mask_features` of its label (original grid)."""


def prepare_cases(ds: Dataset, prep: PreprocessConfig, num_classes: int = 2, progress: bool = True) -> dict[str, Prepared]:
    """Read, preprocess and cache every case (image and label) in memory.

    Raises FemursegError for a label that is empty after cropping.
    """
    out: dict[str, Prepared] = {}
    for case in progress_bar(ds.cases, desc="preprocess", unit="case", disable=not progress, leave=False):
        vol = io.read_image(case.image)
        lab = io.read_image(case.label, dtype=None)
        image, info = preprocess_image(vol.data, vol.spacing, prep)
        label = preprocess_label(np.asarray(lab.data).astype(np.uint8), info, prep, num_classes)
        if not label.any():
            raise FemursegError(f"{case.label}: label is empty after cropping to the central {prep.crop_slices} "
                                f"coronal slices (slices {info.slice_start}-{info.slice_stop - 1} of {info.original_shape[0]}); "
                                "use a larger --crop-slices or none")
        if int(label.max()) >= num_classes:
            raise FemursegError(f"{case.label}: label value {int(label.max())} needs a model with more than "
                                f"{num_classes} classes")
        qc = (image_features(vol.data, vol.spacing), mask_features(np.asarray(lab.data) > 0, vol.spacing))
        out[case.case_id] = Prepared(Sample(case.case_id, image, label, spacing=tuple(info.spacing)), info, qc)
    return out


def check_model_fits(model_cfg: dict[str, Any], shape: tuple[int, ...], train: TrainConfig) -> None:
    """Build the model and run one tiny forward pass on the training input size (CPU, no grad)."""
    from femurseg.models import build_model
    from femurseg.training.fit import _forward

    try:
        model = build_model(model_cfg)
    except FemursegError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise FemursegError(f"model config {model_cfg}: {exc}") from None
    sd = int(getattr(model, "spatial_dims", 3))
    if is_patch_classifier(model):
        size = int(model.config.get("patch_size", 32))
        x = torch.zeros((1, model.in_channels, size, size))
    elif sd == 3:
        s = tuple(min(p, n) for p, n in zip(train.patch_size, shape)) if train.patch_size else tuple(shape)
        x = torch.zeros((1, 1, *s))  # one image channel
    else:
        x = torch.zeros((1, model.in_channels, *shape[1:]))
    try:
        for n in x.shape[2:]:
            input_size_for(model, int(n))
        with torch.no_grad():
            y = _forward(model.eval(), x)
    except FemursegError as exc:
        raise FemursegError(f"model {model_cfg['name']} does not fit the preprocessed input {tuple(shape)}: {exc}") from None
    except RuntimeError as exc:
        msg = str(exc).splitlines()[0][:200]
        raise FemursegError(f"model {model_cfg['name']} does not fit the preprocessed input {tuple(shape)}: {msg}") from None
    if not is_patch_classifier(model) and tuple(y.shape[2:]) != tuple(x.shape[2:]):
        raise FemursegError(f"model {model_cfg['name']}: output {tuple(y.shape[2:])} does not cover input {tuple(x.shape[2:])}")


# ----------------------------------------------------------------------------- run


def run_cv(
    dataset: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model_cfg: dict | None = None,
    prep_cfg: dict | None = None,
    train_cfg: dict | None = None,
    aug_cfg: dict | None = None,
    preset: str = "default",
    folds: int = 4,
    seed: int = 0,
    group_by: str = "case",
    split_file: str | os.PathLike | None = None,
    inner_val: float = 0.0,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
    backend: Any = None,
    dist: Any = None,
    workers: int | str | None = 1,
    _kind: str = "cv",
    _val_fraction: float = 0.2,
) -> CVResult:
    """k-fold cross-validation into the run folder ``out`` (see the module docstring).

    Args:
        dataset: nnU-Net dataset folder or CSV manifest.
        out: run folder (created; must not exist unless ``resume``/``overwrite``).
        model_cfg, prep_cfg, train_cfg, aug_cfg: partial dicts overriding ``preset``
            (on resume: must agree with the stored run, or be None).
        preset: "default" (CPU-friendly) or "paper".
        folds: k (2 <= k <= number of cases/subjects).
        seed: seeds the split, the weights' initialisation and every epoch.
        group_by: "case" or "subject" (keep a subject's cases in one fold).
        split_file: reuse the folds of a ``split.json`` or of another run folder.
        inner_val: fraction of each fold's training cases used for early stopping instead of
            the held-out fold (0: the paper's protocol).
        resume: continue an interrupted run from its last complete epoch.
        overwrite: replace an existing run in ``out``.
        device: "cuda", "cpu" or None (auto).
        progress: show progress bars.
        backend: where the folds train: None or "local" (here), or a back-end object with
            ``train_folds(run, ds, prepared, folds, device=, progress=)`` (and optionally
            ``connect()``, called first), e.g. :class:`femurseg.scale.distributed.RayBackend`
            (one Ray task per fold; :func:`femurseg.scale.distributed.resolve_backend` makes one
            from "ray").
        dist: the DDP process group when this process is one rank of a ``torchrun`` job
            (:func:`femurseg.scale.distributed.init_ddp`; rank 0 writes the run folder).
        workers: local back-end only: folds trained at the same time, each in its own process
            (1: one after the other in this process; "auto": on CPU one per core up to k, with
            ``cores // workers`` torch threads each; on CUDA 1). See :func:`local_workers`.
    """
    t_start = time.perf_counter()
    out = Path(out)
    backend = local_or_backend(backend)
    if dist is not None:
        device, progress = dist.device, progress and dist.is_main
    ds = load_checked(dataset, progress=progress)
    resuming = (resume and out.exists() and (out / CONFIG_NAME).exists())
    if resuming:
        run = load_run(out)
        stored = run.config
        problems = (_conflicts(stored["model"], model_cfg, "model") + _conflicts(stored["preprocess"], prep_cfg, "preprocess")
                    + _conflicts(stored["train"], train_cfg, "train") + _conflicts(stored["augment"], aug_cfg, "augment"))
        if problems:
            raise FemursegError(f"{out}: --resume with settings that differ from the run: {'; '.join(problems)}")
        cfgs = {k: stored[k] for k in ("model", "preprocess", "train", "augment")}
        seed = int(stored.get("seed", seed))
        split = load_split(out / "split.json", ds)
        _kind = stored.get("kind", _kind)
    else:
        cfgs = resolve_configs(preset, model_cfg, prep_cfg, train_cfg, aug_cfg)
        # the preset's zoom factor and slice count, fixed in mm for this data (predict then adapts to any spacing)
        cfgs["preprocess"] = PreprocessConfig.from_dict(cfgs["preprocess"]).in_millimetres(
            median_spacing(ds)).to_dict()
        if split_file is not None:
            split = load_split(split_file, ds)
        elif _kind == "cv":
            split = split_dataset(ds, folds, seed, group_by)
        else:
            split = holdout_split(ds, _val_fraction, seed, group_by)
    prep = PreprocessConfig.from_dict(cfgs["preprocess"])
    tcfg = TrainConfig.from_dict(cfgs["train"])
    AugmentConfig.from_dict(cfgs["augment"])  # validates the options before anything is written
    num_classes = int(cfgs["model"].get("num_classes", 2))
    if num_classes < max(ds.label_values) + 1:
        raise FemursegError(f"{dataset}: labels {sorted(ds.label_values)} need num_classes >= {max(ds.label_values) + 1}")
    if not 0 <= inner_val < 1:
        raise FemursegError(f"--inner-val {inner_val}: must be in [0, 1)")
    prepared = prepare_cases(ds, prep, num_classes, progress)
    shapes = {p.sample.image.shape for p in prepared.values()}
    for shape in sorted(shapes):
        check_model_fits(cfgs["model"], shape, tcfg)

    # Every input check has passed: now (and only now) touch the output folder.
    if dist is not None:
        dist.barrier()  # every rank has decided `resuming` before rank 0 creates the folder
    if not resuming and (dist is None or dist.is_main):
        prepare_run_dir(out, resume=resume, overwrite=overwrite)
        config = {
            "format": RUN_FORMAT, "version": RUN_VERSION, "kind": _kind,
            "dataset": str(Path(dataset).resolve()), "modality": ds.modality, "labels": ds.labels,
            "cases": [c.case_id for c in ds.cases], "preset": preset, **cfgs,
            "k": split.k, "seed": seed, "group_by": split.group_by, "inner_val": inner_val,
            "train_spacing": train_spacing(prepared),
            "device": str(get_device(device)),
            "precision": resolve_precision(tcfg.precision, get_device(device), warn=False).to_dict(),
            "environment": environment(), "created": now_iso(),
            **({"ddp": dist.describe(tcfg.batch_size)} if dist is not None else {}),
        }
        _create_run_dir(out, config, split)
    if dist is None or dist.is_main:
        if load_qc_reference(out) is None:  # what the model saw, for predict's QC
            write_qc_reference(out, reference_from_cases({c: p.qc for c, p in prepared.items() if p.qc}))
    if dist is not None:
        dist.barrier()
    run = load_run(out)

    n_workers = 1 if dist is not None else local_workers(workers, split.k, device)
    if backend is None and n_workers > 1:
        fold_results = _train_folds_parallel(run, ds, prepared, list(range(split.k)), n_workers, device, progress)
    elif backend is None:
        fold_results = [train_fold(run, ds, prepared, k, device=device, progress=progress, dist=dist)
                        for k in range(split.k)]
    else:
        fold_results = backend.train_folds(run, ds, prepared, list(range(split.k)), device=device, progress=progress)
    if dist is not None and not dist.is_main:
        dist.barrier()  # rank 0 evaluates and writes the summary
        return CVResult(load_run(out), json.loads((out / "summary.json").read_text()))
    summary = finalize_run(run, ds, progress=progress)
    summary["folds"] = fold_results
    summary["seconds_total"] = round(time.perf_counter() - t_start, 1)
    per_fold = [f["inference_s_per_case"] for f in fold_results if f.get("inference_s_per_case") is not None]
    summary["timings"] = {"inference_s_per_case": round(float(np.median(per_fold)), 3) if per_fold else None,
                          "train_s_per_fold": round(float(np.mean([f.get("train_seconds", np.nan) for f in fold_results])), 1)
                          if fold_results else None}
    write_json(out / "summary.json", summary)
    if dist is not None:
        dist.barrier()
    return CVResult(load_run(out), summary)


def local_workers(workers: int | str | None, k: int, device: str | None = None) -> int:
    """Number of fold processes for ``workers`` (an int, "auto" or None = 1).

    "auto": 1 on CUDA; on CPU ``min(k, os.cpu_count())``. Several single-threaded fold processes
    use a small CPU better than one process with several threads (small 3D convolutions scale
    poorly across threads, and threads that wait for each other stall badly on a busy machine),
    at the cost of one model's memory per process (~1 GB for the default preset).
    """
    if workers is None:
        return 1
    if isinstance(workers, str):
        if workers.strip().lower() != "auto":
            try:
                workers = int(workers)
            except ValueError:
                raise FemursegError(f"--workers: expected a number or 'auto', got {workers!r}") from None
        else:
            if get_device(device).type == "cuda":
                return 1
            return max(1, min(int(k), os.cpu_count() or 1))
    if int(workers) < 1:
        raise FemursegError(f"--workers: {workers} must be >= 1")
    return max(1, min(int(workers), int(k)))


def _train_folds_parallel(run: Run, ds: Dataset, prepared: dict[str, Prepared], folds: list[int], workers: int,
                          device: str | None, progress: bool) -> list[dict[str, Any]]:
    """Train ``folds`` in up to ``workers`` child processes at a time; rows in fold order.

    Each child is a fresh ``python`` running :func:`_fold_worker` (no re-import of the caller's
    ``__main__``, so scripts need no ``if __name__ == "__main__"`` guard), reads the preprocessed
    cases from a pickle in a hidden folder of the run, uses ``cores // workers`` torch threads
    (unless the run sets ``threads``), runs :func:`train_fold` and exits if this process dies.
    Every fold is waited for, then the first failure is raised; finished folds are kept (``--resume``).
    """
    import pickle
    import subprocess
    import sys
    import tempfile

    import femurseg

    threads = max(1, (os.cpu_count() or 1) // workers)
    for stale in run.path.glob(".workers-*"):  # left by a killed earlier attempt
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".workers-", dir=run.path))
    src = str(Path(femurseg.__file__).resolve().parents[1])  # the children import this very femurseg
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}
    results: dict[int, dict[str, Any]] = {}
    errors: dict[int, str] = {}
    running: dict[int, tuple[subprocess.Popen, Any]] = {}
    try:
        with open(tmp / "cases.pkl", "wb") as fh:
            pickle.dump((ds, prepared), fh, protocol=pickle.HIGHEST_PROTOCOL)
        queue = list(folds)
        code = "import sys; from femurseg.training.cv import _fold_worker; sys.exit(_fold_worker(sys.argv[1:]))"
        with progress_bar(total=len(folds), desc=f"folds ({workers} processes)", unit="fold", disable=not progress) as bar:
            while queue or running:
                while queue and len(running) < workers:
                    k = queue.pop(0)
                    err = open(tmp / f"fold_{k}.err", "wb")
                    args = [str(run.path), str(tmp / "cases.pkl"), str(k), device or "", str(threads), str(os.getpid()),
                            str(tmp / f"fold_{k}.json")]
                    running[k] = (subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL,
                                                   stderr=err, env=env), err)
                time.sleep(0.2)
                for k, (proc, err) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    err.close()
                    del running[k]
                    out = tmp / f"fold_{k}.json"
                    row = json.loads(out.read_text()) if out.exists() else None
                    if proc.returncode == 0 and row is not None and "error" not in row:
                        results[k] = row
                        if progress:
                            progress_write(f"fold {k + 1}/{len(folds)}: best epoch {row['best_epoch']} of {row['epochs']}, "
                                       f"validation Dice {row['best_metric']:.4f}, {row['train_seconds']:.0f} s")
                    elif row is not None and "error" in row:
                        errors[k] = row["error"]
                    else:
                        tail = (tmp / f"fold_{k}.err").read_text(errors="replace").strip().splitlines()[-1:]
                        errors[k] = (f"{run.path}: fold {k} failed in its worker process (exit code {proc.returncode}"
                                     f"{': ' + tail[0][:200] if tail else ''}); finished folds are kept, "
                                     "run again with --resume")
                    bar.update()
    finally:
        for proc, err in running.values():  # interrupted: stop the children too
            proc.kill()
            proc.wait()
            err.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if errors:
        raise FemursegError(errors[min(errors)])
    return [results[k] for k in folds]


def _fold_worker(argv: list[str]) -> int:
    """Child process of :func:`_train_folds_parallel`: ``RUN CASES_PKL FOLD DEVICE THREADS PARENT_PID OUT_JSON``."""
    import pickle
    import threading

    run_dir, cases, k, device, threads, parent, out = argv
    parent_pid = int(parent)

    def watchdog() -> None:  # never outlive the parent: a killed `femurseg cv` leaves no trainer behind
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watchdog, daemon=True).start()
    torch.set_num_threads(int(threads))
    with open(cases, "rb") as fh:
        ds, prepared = pickle.load(fh)
    try:
        row = train_fold(load_run(run_dir), ds, prepared, int(k), device=device or None, progress=False)
    except FemursegError as exc:
        write_json(out, {"error": str(exc)})
        return 1
    write_json(out, row)
    return 0


def median_spacing(ds: Dataset) -> tuple[float, float, float]:
    """Median canonical voxel size (mm, A x I x L) of the dataset's images, from their headers."""
    sp = np.array([io.read_spacing(c.image) for c in ds.cases], dtype=float)
    return tuple(float(v) for v in np.median(sp, axis=0))


def train_spacing(prepared: dict[str, Prepared]) -> list[float]:
    """Median original canonical spacing (mm) of the cases (``config["train_spacing"]``; predict
    warns when a scan's spacing differs much from it)."""
    sp = np.array([p.info.original_spacing for p in prepared.values()], dtype=float)
    return [float(v) for v in np.median(sp, axis=0)]


def train_fold(run: Run, ds: Dataset, prepared: dict[str, Prepared], k: int, *, device: str | None = None,
               progress: bool = True, dist: Any = None) -> dict[str, Any]:
    """Train fold ``k`` of ``run`` into ``RUN/fold_<k>/`` and write its held-out cases' ``oof/`` maps.

    Everything (configs, seed, split, ``inner_val``) comes from the run folder, so the local loop of
    :func:`run_cv` and a Ray task (:mod:`femurseg.scale.distributed`) run exactly this. Resumable and
    idempotent: a finished fold returns at once, an interrupted one continues from its ``last.pt``,
    existing ``oof/`` files are kept. ``dist``: the DDP process group (rank 0 writes). Returns the
    fold's row of ``summary.json["folds"]``.
    """
    from femurseg.models import build_model

    cfgs, seed, split = run.config, int(run.config.get("seed", 0)), run.split
    inner_val = float(cfgs.get("inner_val", 0.0))
    all_ids = [c.case_id for c in ds.cases]
    train_ids = split.train_cases(k, all_ids)
    val_ids = list(split.folds[k])
    stop_ids = val_ids
    if inner_val > 0:
        inner = _inner_split(train_ids, ds, inner_val, derive_seed(seed, k, 999))
        train_ids = [c for c in train_ids if c not in inner]
        stop_ids = inner
    if not train_ids:
        raise FemursegError(f"{run.path}: fold {k} has no training cases")
    desc = f"fold {k + 1}/{split.k} " if split.k > 1 else ""
    seed_everything(derive_seed(seed, k, 0))
    model = build_model(cfgs["model"])
    res: FitResult = fit(model, [prepared[c].sample for c in train_ids], [prepared[c].sample for c in stop_ids],
                         TrainConfig.from_dict(cfgs["train"]), AugmentConfig.from_dict(cfgs["augment"]),
                         run.fold_dir(k), seed=seed, fold=k, device=device, progress=progress, desc=desc, dist=dist)
    seconds: list[float] = []
    if dist is None or dist.is_main:
        seconds = _write_oof(run, ds, prepared, val_ids, model, device, progress)
    return {"fold": k, "best_epoch": res.best_epoch, "best_metric": res.best_metric,
            "epochs": res.epochs, "train_seconds": round(res.seconds, 1), "precision": res.precision.get("used"),
            "inference_s_per_case": round(float(np.median(seconds)), 3) if seconds else None}


def _create_run_dir(out: Path, config: dict[str, Any], split: Split) -> None:
    """Create the run folder with its config and split in one rename (never half-created)."""
    tmp = out.parent / f".{out.name}.creating-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        split.save(tmp / "split.json")
        write_json(tmp / CONFIG_NAME, config)
        if out.exists():
            out.rmdir()  # empty (checked by prepare_run_dir)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_train(dataset: str | os.PathLike, out: str | os.PathLike, *, val_fraction: float = 0.2, **kwargs: Any) -> CVResult:
    """Train one model (``femurseg train``): same layout as :func:`run_cv` with one fold whose
    cases (``val_fraction`` of the dataset, stratified; 0: none) are the validation set."""
    kwargs.pop("folds", None)
    return run_cv(dataset, out, _kind="train", _val_fraction=val_fraction, **kwargs)


def _inner_split(train_ids: list[str], ds: Dataset, fraction: float, seed: int) -> list[str]:
    from femurseg.data.splits import make_split

    k = max(2, int(round(1 / fraction)))
    if k > len(train_ids):
        raise FemursegError(f"--inner-val {fraction}: too few training cases ({len(train_ids)}) per fold")
    groups = {c.case_id: c.group for c in ds.cases}
    return make_split(train_ids, k, seed, groups).folds[0]


def _oof_path(run: Run, case_id: str) -> Path:
    return run.path / "oof" / f"{case_id}.nii.gz"


def _write_oof(run: Run, ds: Dataset, prepared: dict[str, Prepared], case_ids: list[str], model: torch.nn.Module,
               device: str | None, progress: bool) -> list[float]:
    """Predict the held-out cases with the fold's best model; write probabilities on the original grid.

    Returns the wall seconds per newly predicted case (network on the preprocessed volume plus
    restoring the map to the original grid; file I/O excluded). With parallel fold workers another
    fold may be training meanwhile, so these are upper bounds for an idle machine.
    """
    seconds: list[float] = []
    if not case_ids:
        return seconds
    (run.path / "oof").mkdir(exist_ok=True)
    sd = int(getattr(model, "spatial_dims", 3))
    for cid in progress_bar(case_ids, desc="predict held-out", unit="case", disable=not progress, leave=False):
        path = _oof_path(run, cid)
        if path.exists():
            continue
        p = prepared[cid]
        t0 = time.perf_counter()
        prob = predict_prob([model], p.sample.image, batch_size=1 if sd == 3 else 16, device=device)
        prob = foreground_probability(prob)  # C > 2: store the probability of any foreground class
        full = restore(prob.astype(np.float32), p.info, order=1)
        seconds.append(time.perf_counter() - t0)
        like = io.read_image(ds.case(cid).image, dtype=None)
        io.write_like(path, full.astype(np.float32), like)
    return seconds


def finalize_run(run: Run, ds: Dataset | None = None, progress: bool = True) -> dict[str, Any]:
    """Thresholds, masks and per-case metrics from the out-of-fold probability maps of ``run``.

    PR and Youden thresholds (:mod:`femurseg.inference.thresholds`) on the pooled out-of-fold voxels;
    masks ``prob >= PR threshold`` in ``oof_masks/``; ``metrics.csv`` with
    :func:`femurseg.evaluation.metrics.evaluate_case` of every case plus its Dice at 0.5.
    Returns the summary (means over cases).
    """
    from femurseg.evaluation.metrics import evaluate_case, overlap_metrics
    from femurseg.inference.thresholds import pr_threshold, youden_threshold

    if ds is None:
        ds = load_checked(run.config["dataset"], progress=progress)
    ids = [c for c in (run.split.cases if run.split else []) if _oof_path(run, c).exists()]
    summary: dict[str, Any] = {"kind": run.kind, "cases": len(ids)}
    if not ids:
        return summary
    probs, refs, spacings = [], [], []
    for cid in ids:
        probs.append(io.read_image(_oof_path(run, cid)).data)
        lab = io.read_image(ds.case(cid).label, dtype=None)
        refs.append(np.asarray(lab.data) > 0)
        spacings.append(lab.spacing)
    thresholds = {"pr": pr_threshold(probs, refs), "youden": youden_threshold(probs, refs),
                  "source": "pooled out-of-fold predictions", "cases": len(ids)}
    write_json(run.path / "thresholds.json", thresholds)
    thr = thresholds["pr"]
    (run.path / "oof_masks").mkdir(exist_ok=True)
    rows = []
    groups = {c.case_id: c.group for c in ds.cases}
    for cid, prob, ref, sp in progress_bar(list(zip(ids, probs, refs, spacings)), desc="evaluate", unit="case",
                                           disable=not progress, leave=False):
        mask = prob >= thr
        like = io.read_image(_oof_path(run, cid))
        io.write_like(run.path / "oof_masks" / f"{cid}.nii.gz", mask.astype(np.uint8), like)
        row = {"case": cid, "fold": run.split.fold_of(cid), "group": groups.get(cid) or "", "threshold": thr}
        row.update(evaluate_case(mask, ref, sp, prob=prob))
        row["dsc_at_0.5"] = overlap_metrics(prob >= 0.5, ref)["dsc"]
        rows.append(row)
    write_csv(rows, run.path / "metrics.csv")
    for key in ("dsc", "dsc_at_0.5", "precision", "recall", "asd_mm", "msd_mm"):
        vals = np.array([r[key] for r in rows], dtype=float)
        summary[f"mean_{key}"] = float(np.mean(vals))
        summary[f"sd_{key}"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    summary["thresholds"] = {"pr": thresholds["pr"], "youden": thresholds["youden"]}
    return summary


def load_fold_model(run: Run, fold: int, device: str | None = None) -> torch.nn.Module:
    """The best model of one fold (helper for scripts)."""
    return model_from_checkpoint(run.fold_dir(fold) / "best.pt", device)
