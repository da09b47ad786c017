"""The paper's experiment grid (``femurseg experiment paper DATASET --out DIR``).

Paper 001 compared, on the same 4 cross-validation folds:

* **Table 1**: 2D U-Net with unpadded convolutions (``2D CNN*``) and padded convolutions, F = 64
  initial feature maps, L = 3 and 4 levels; 3D U-Net with F in {16, 32} and L in {3, 4};
* **Table 2**: the four 2D networks again with post-processing (largest connected component):
  the *same* trained models evaluated with ``postprocess = lcc`` (no retraining);
* **Table 3**: the best 2D and the best 3D network of Table 1 (by the pooled cross-validation AP
  of Fig. 2) with the dilated centre (dilation rates {1,2}, {1,4}, {1,8}, {1,2,4}, {1,2,4,8});
* **Table 4**: pairwise Wilcoxon signed-rank tests with Holm correction on the per-case AP of the
  Table 3 models.

:func:`paper_grid` returns that grid as a plain list of dicts (printed by ``--dry-run``);
:func:`run_experiment` trains every entry with :func:`femurseg.training.cv.run_cv` on one shared
``split.json`` (so every model sees the same folds), resolves the "best 2D / best 3D" entries
of stage 2 from the stage-1 results, evaluates every run once (the run's PR threshold, paper
001) and writes the comparison reports (:func:`femurseg.evaluation.compare.run_compare`):

    DIR/split.json                  the folds every model uses
    DIR/runs/<id>/                  one cross-validation run per grid entry
    DIR/report_table1/              Table 1, Figs. 2-3 (+ case panels)
    DIR/report_table2/              Table 2 (2D networks with and without post-processing)
    DIR/report_table3/              Tables 3-4 (dilations; Wilcoxon/Holm on AP)
    DIR/grid.csv                    one row per evaluated model: the headline metrics
    DIR/report.html                 index linking the three reports

Scales (:data:`SCALES`): ``full`` is the paper (its feature counts, 256 x 256 in-plane, 48
slices, Adam 5e-5, early stopping after >= 30 epochs with patience 10; meant for a GPU);
``demo`` shrinks the networks (F 64 -> 8, 32 -> 8, 16 -> 4), the images (in-plane x0.25), the
cross-validation (2 folds instead of 4, still one split shared by every model) and the schedule
(3 epochs) so that the whole grid fits in about 30 minutes on 2 CPU cores on the default phantom
cohort (16 cases; see the README for measured times). Demo numbers are a smoke test of the
pipeline, not a replication: at that size every network is far from converged.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from femurseg.core.errors import FemursegError

Notify = Callable[[str], None]

DILATION_SETS: list[list[int]] = [[1, 2], [1, 4], [1, 8], [1, 2, 4], [1, 2, 4, 8]]
"""Dilation rates of 001 Table 3 (rate 1 alone is the original network)."""

EXPERIMENTS = ("paper", "ct")

#: Settings per scale. ``features`` maps the paper's F to the scale's F.
SCALES: dict[str, dict[str, Any]] = {
    "full": {
        "description": "paper 001 sizes: F 16/32/64, 48 slices at 256 x 256, Adam 5e-5, early stopping "
                       "(>= 30 epochs, patience 10); meant for a GPU",
        "preset": "paper",
        "folds": 4,
        "features": {16: 16, 32: 32, 64: 64},
        "prep": {},
        "train": {},
        "train_2d": {},
    },
    "demo": {
        "description": "smoke-test sizes for 2 CPU cores: F 64->8, 32->8, 16->4, in-plane x0.25, "
                       "2 folds, at most 3 epochs (2D: 8 slices per volume per epoch), 1 torch thread",
        "preset": "default",
        "folds": 2,
        "features": {16: 4, 32: 8, 64: 8},
        "prep": {"scale": 0.25, "crop_slices": 48},
        "train": {"max_epochs": 3, "min_epochs": 2, "patience": 1, "lr": 3e-3, "deterministic": False, "threads": 1},
        "train_2d": {"slices_per_volume": 8, "batch_size": 4, "val_batch_size": 48},
    },
}


def _entry(eid: str, label: str, stage: int, tables: str, model: dict[str, Any], postprocess: list[str],
           family: str, base: str | None = None) -> dict[str, Any]:
    return {"id": eid, "label": label, "stage": stage, "tables": tables, "family": family,
            "model": model, "postprocess": postprocess, "base": base}


def paper_grid(scale: str = "demo") -> list[dict[str, Any]]:
    """The grid of paper 001 as a list of plain dicts (JSON-able), in training order.

    Keys: ``id`` (run folder name, with the paper's F), ``label`` (paper notation with the
    scale's F), ``stage`` (1: Table 1; 2: Table 3,
    needs stage 1's best), ``tables``, ``family`` ("2d"/"3d"), ``model`` (registry config; for
    stage 2 only ``dilations``, the rest is copied from ``base``), ``postprocess`` (the modes each
    trained model is evaluated with: ``["none", "lcc"]`` for the 2D networks = Tables 1 and 2),
    ``base`` (stage 2: ``"best-2d"`` or ``"best-3d"``).
    """
    if scale not in SCALES:
        raise FemursegError(f"--scale: expected one of {', '.join(SCALES)}, got {scale!r}")
    f = SCALES[scale]["features"]
    grid: list[dict[str, Any]] = []
    for padded in (False, True):
        for levels in (3, 4):
            name = "unet2d" if padded else "unet2d-unpadded"
            star = "" if padded else "*"
            grid.append(_entry(
                f"2d{'' if padded else '-unpadded'}-f64-l{levels}", f"2D CNN{star}, F:{f[64]}, L:{levels}", 1, "1, 2",
                {"name": name, "features": f[64], "levels": levels, "dilations": None}, ["none", "lcc"], "2d"))
    for feats in (16, 32):
        for levels in (3, 4):
            grid.append(_entry(
                f"3d-f{feats}-l{levels}", f"3D CNN, F:{f[feats]}, L:{levels}", 1, "1",
                {"name": "unet3d", "features": f[feats], "levels": levels, "dilations": None}, ["none"], "3d"))
    for family in ("2d", "3d"):
        for rates in DILATION_SETS:
            r = "-".join(map(str, rates))
            grid.append(_entry(
                f"{family}-best-r{r}", f"{family.upper()} CNN (best of Table 1), r = {', '.join(map(str, rates))}", 2,
                "3, 4", {"dilations": list(rates)}, ["none"], family, base=f"best-{family}"))
    return grid


def select_grid(grid: Sequence[Mapping[str, Any]], patterns: Sequence[str] | None) -> list[dict[str, Any]]:
    """Entries whose ``id`` matches one of the shell patterns (``3d-*``, ``2d-f64-l4``); all if None."""
    if not patterns:
        return [dict(e) for e in grid]
    chosen = [dict(e) for e in grid if any(fnmatch.fnmatchcase(e["id"], p) for p in patterns)]
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(e["id"], p) for e in grid)]
    if unknown:
        raise FemursegError(f"--models: {', '.join(unknown)} match(es) no grid entry; ids: "
                            + ", ".join(e["id"] for e in grid))
    return chosen


def scale_settings(scale: str, family: str) -> dict[str, Any]:
    """``preset``, ``prep_cfg``, ``train_cfg`` and ``folds`` for one family at a scale."""
    s = SCALES[scale]
    train = dict(s["train"])
    if family == "2d":
        train.update(s["train_2d"])
    return {"preset": s["preset"], "prep_cfg": dict(s["prep"]) or None, "train_cfg": train or None,
            "folds": int(s["folds"])}


def format_grid(grid: Sequence[Mapping[str, Any]], scale: str) -> str:
    """The ``--dry-run`` listing: settings, then one line per entry."""
    s = SCALES[scale]
    lines = [f"experiment paper, scale {scale}: {s['description']}",
             f"  cross-validation: {s['folds']} folds, one split.json shared by every model; preset {s['preset']!r}",
             f"  preprocessing overrides: {json.dumps(s['prep']) if s['prep'] else 'none'}; "
             f"training overrides: {json.dumps(s['train']) if s['train'] else 'none'}"
             + (f" (2D also {json.dumps(s['train_2d'])})" if s["train_2d"] else ""),
             f"  {len(grid)} networks to train:"]
    for e in grid:
        m = e["model"]
        if e["base"]:
            arch = f"{e['base']} + dilations {m['dilations']}"
        else:
            arch = f"{m['name']} features={m['features']} levels={m['levels']}"
        pp = ", ".join(e["postprocess"])
        lines.append(f"  [{e['stage']}] {e['id']:<22} {e['label']:<44} {arch:<40} evaluated: {pp:<10} Table {e['tables']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- running


def _run_done(path: Path) -> bool:
    return (path / "summary.json").exists() and (path / "thresholds.json").exists() and (path / "oof").is_dir()


def _train(entry: Mapping[str, Any], dataset: Path, run_dir: Path, split_file: Path, scale: str, seed: int,
           device: str | None, progress: bool, notify: Notify, backend: Any = "local") -> None:
    from femurseg.training.cv import run_cv

    if _run_done(run_dir):
        notify(f"{entry['id']}: already trained ({run_dir}), skipped")
        return
    st = scale_settings(scale, entry["family"])
    resume = (run_dir / "config.json").exists()
    t0 = time.perf_counter()
    notify(f"{entry['id']}: training {entry['label']} ({st['folds']}-fold cv{', resumed' if resume else ''})")
    run_cv(dataset, run_dir, model_cfg=dict(entry["model"]), prep_cfg=st["prep_cfg"], train_cfg=st["train_cfg"],
           preset=st["preset"], folds=st["folds"], seed=seed, split_file=split_file, resume=resume,
           device=device, progress=progress, backend=backend)
    notify(f"{entry['id']}: done in {time.perf_counter() - t0:.0f} s")


def resolve_stage2(entry: Mapping[str, Any], best: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """A stage-2 entry with its model completed from the best stage-1 entry of its family
    (None if that family had no stage-1 model)."""
    base = best.get(entry["family"])
    if base is None:
        return None
    e = copy.deepcopy(dict(entry))
    e["model"] = {**base["model"], "dilations": list(entry["model"]["dilations"])}
    e["label"] = f"{base['label']}, r = {', '.join(map(str, entry['model']['dilations']))}"
    e["base_id"] = base["id"]
    return e


def run_experiment(
    name: str,
    dataset: str | os.PathLike,
    out: str | os.PathLike,
    *,
    scale: str = "demo",
    models: Sequence[str] | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    panels: bool = True,
    notify: Notify | None = None,
    backend: Any = "local",
) -> dict[str, Any]:
    """Run the grid (see the module docstring); resumable: finished runs are skipped.

    ``backend`` "ray" (or a :class:`femurseg.scale.distributed.RayBackend`): each stage's runs are started
    together and every (configuration, fold) is one Ray task (:func:`femurseg.scale.distributed.run_jobs`).

    Returns ``{"grid": [...resolved entries], "best": {"2d": id, "3d": id}, "reports": {...},
    "results": [grid.csv rows], "seconds": float}``.
    """
    from femurseg.core.tables import write_csv
    from femurseg.data.dataset import load_checked
    from femurseg.data.splits import load_split, split_dataset
    from femurseg.evaluation import compare as cmp
    from femurseg.scale.distributed import resolve_backend, run_jobs

    say: Notify = notify or (lambda m: print(f"femurseg: {m}", file=sys.stderr))
    backend = resolve_backend(backend) or "local"  # fails now if Ray is asked for but missing
    if name not in EXPERIMENTS:
        raise FemursegError(f"experiment: unknown experiment {name!r} (available: {', '.join(EXPERIMENTS)})")
    grid = select_grid(paper_grid(scale), models)
    outp = Path(out)
    if outp.exists() and not outp.is_dir():
        raise FemursegError(f"{outp}: exists and is not a folder")
    if not outp.parent.is_dir():
        raise FemursegError(f"{outp}: parent folder {outp.parent} does not exist")
    t0 = time.perf_counter()
    ds = load_checked(dataset, progress=progress)
    outp.mkdir(exist_ok=True)
    (outp / "runs").mkdir(exist_ok=True)
    split_file = outp / "split.json"
    folds = SCALES[scale]["folds"]
    if split_file.exists():
        split = load_split(split_file, ds)
        if split.k != folds:
            raise FemursegError(f"{split_file}: has {split.k} folds but scale {scale!r} uses {folds}; use another --out")
    else:
        split = split_dataset(ds, folds, seed)
        split.save(split_file)
    (outp / "grid.json").write_text(json.dumps({"experiment": name, "scale": scale, "grid": grid}, indent=1))

    # stage 1
    stage1 = [e for e in grid if e["stage"] == 1]
    jobs = lambda entries: [functools.partial(_train, e, Path(dataset), outp / "runs" / e["id"], split_file, scale, seed,  # noqa: E731
                                              device, progress and backend == "local", say, backend) for e in entries]
    run_jobs(jobs(stage1), backend)
    evaluated: dict[tuple[str, str], cmp.ModelResult] = {}

    def result(e: Mapping[str, Any], pp: str) -> cmp.ModelResult:
        key = (e["id"], pp)
        if key not in evaluated:
            label = e["label"] + (" PP" if pp != "none" else "")
            evaluated[key] = cmp.load_model(cmp.RunSpec(outp / "runs" / e["id"], name=label, postprocess=pp),
                                            progress=progress, notify=say)
        return evaluated[key]

    best: dict[str, dict[str, Any]] = {}
    for family in ("2d", "3d"):
        cands = [e for e in stage1 if e["family"] == family]
        if cands:
            scored = [(result(e, "none").curves["ap"], e) for e in cands]
            ap, e = max(scored, key=lambda t: (t[0] if math.isfinite(t[0]) else -1.0))
            best[family] = e
            say(f"best {family.upper()} network of stage 1 by pooled out-of-fold AP: {e['id']} (AP {ap:.4f})")

    # stage 2
    resolved = list(stage1)
    for e in (e for e in grid if e["stage"] == 2):
        r = resolve_stage2(e, best)
        if r is None:
            say(f"{e['id']}: skipped (no {e['family'].upper()} network in stage 1 to extend)")
            continue
        resolved.append(r)
    run_jobs(jobs(resolved[len(stage1):]), backend)
    (outp / "grid.json").write_text(json.dumps({"experiment": name, "scale": scale, "grid": resolved,
                                                "best": {k: v["id"] for k, v in best.items()}}, indent=1))

    # reports
    reports: dict[str, str] = {}
    t1 = [result(e, "none") for e in stage1]
    if t1:
        hl = cmp.run_compare(t1, outp / "report_table1", progress=progress, panels=panels, notify=say,
                             title="Paper 001 Table 1 and Figs. 2-3: 2D and 3D U-Nets")
        reports["table1"] = hl["report"]
    t2 = [result(e, pp) for e in stage1 if e["family"] == "2d" for pp in e["postprocess"]]
    if t2:
        hl = cmp.run_compare(t2, outp / "report_table2", progress=progress, panels=panels, notify=say,
                             title="Paper 001 Table 2: 2D U-Nets with and without post-processing")
        reports["table2"] = hl["report"]
    t3 = []
    for family in ("3d", "2d"):
        if family in best:
            fam = [r for r in resolved if r["stage"] == 2 and r["family"] == family]
            if fam:
                t3 += [result(best[family], "none")] + [result(r, "none") for r in fam]
    if t3:
        hl = cmp.run_compare(t3, outp / "report_table3", metric="ap", progress=progress, panels=panels, notify=say,
                             title="Paper 001 Tables 3-4: dilated centre (Wilcoxon/Holm on per-case AP)")
        reports["table3"] = hl["report"]

    # grid.csv and the index
    rows = []
    for (eid, pp), m in evaluated.items():
        h = cmp.headline([m], sorted(m.by_case))
        rows.append({"id": eid, "postprocess": pp, "model": m.name, "n_cases": h["n_cases"], "mean_dsc": h["mean_dsc"],
                     "sd_dsc": h["sd_dsc"], "mean_precision": h["mean_precision"], "mean_recall": h["mean_recall"],
                     "mean_asd_mm": h["mean_asd_mm"], "mean_msd_mm": h["mean_msd_mm"], "median_ap": h["median_ap"],
                     "pooled_ap": h["pooled_ap"], "threshold": m.evaluation.threshold if m.evaluation else math.nan})
    if rows:
        write_csv(rows, outp / "grid.csv")
    _write_index(outp, name, scale, resolved, best, reports, rows)
    return {"grid": resolved, "best": {k: v["id"] for k, v in best.items()}, "reports": reports, "results": rows,
            "seconds": time.perf_counter() - t0, "index": str(outp / "report.html")}


def _write_index(out: Path, name: str, scale: str, grid: Sequence[Mapping[str, Any]], best: Mapping[str, Any],
                 reports: Mapping[str, str], rows: Sequence[Mapping[str, Any]]) -> Path:
    from femurseg.evaluation.report import html as H

    blocks: list[Any] = [
        H.Paragraph(f"Experiment {name!r} at scale {scale!r}: {SCALES[scale]['description']}. "
                    f"Every network was trained with the same {SCALES[scale]['folds']}-fold split (split.json); "
                    f"masks at each run's PR-curve threshold."),
    ]
    if scale == "demo":
        blocks.append(H.Paragraph("Demo scale: tiny networks and a few epochs. The numbers test the pipeline; "
                                  "they do not replicate the paper.", cls="note"))
    links = [(str(Path(p).relative_to(out)), title) for key, title in
             (("table1", "Table 1, Figs. 2-3: 2D and 3D U-Nets"), ("table2", "Table 2: post-processing of 2D U-Nets"),
              ("table3", "Tables 3-4: dilated centre, Wilcoxon/Holm"))
             if key in reports for p in [reports[key]]]
    blocks += [H.Heading("Reports"), H.Link(links)]
    if best:
        blocks.append(H.Paragraph("Best stage-1 networks by pooled out-of-fold AP (extended with dilations): "
                                  + ", ".join(f"{k.upper()}: {v['id']}" for k, v in best.items())))
    if rows:
        shown = [{"model": r["model"], "DSC": f"{r['mean_dsc']:.3f} ± {r['sd_dsc']:.3f}",
                  "precision": f"{r['mean_precision']:.3f}", "recall": f"{r['mean_recall']:.3f}",
                  "ASD [mm]": f"{r['mean_asd_mm']:.2f}", "MSD [mm]": f"{r['mean_msd_mm']:.2f}",
                  "AP (median)": f"{r['median_ap']:.3f}", "run": r["id"]} for r in rows]
        blocks += [H.Heading("All models"), H.Table(shown, list(shown[0]), csv="grid.csv",
                                                    caption="Mean over cases (out-of-fold).")]
    grid_rows = [{"id": e["id"], "label": e["label"], "stage": str(e["stage"]), "tables": e["tables"],
                  "model": json.dumps(e["model"])} for e in grid]
    blocks += [H.Heading("Grid"), H.Table(grid_rows, ["id", "label", "stage", "tables", "model"])]
    return H.build_report(out, f"femurseg experiment {name} ({scale})", blocks)


def experiment_command(name: str, dataset: str | os.PathLike | None, out: str | os.PathLike | None, *, scale: str,
                       models: Sequence[str] | None, dry_run: bool, **kwargs: Any) -> str:
    """What ``femurseg experiment`` does; returns the text to print."""
    if name not in EXPERIMENTS:
        raise FemursegError(f"experiment: unknown experiment {name!r} (available: {', '.join(EXPERIMENTS)})")
    if name == "ct":  # paper 003's CT cascade study lives in femurseg.ct
        from femurseg.experiments.ct_study import (
            describe_cascade,
            run_cascade_experiment,
        )
        if dry_run:
            return describe_cascade(scale)
        if dataset is None or out is None:
            raise FemursegError("experiment: give the DATASET and --out DIR (or --dry-run to see the settings)")
        return run_cascade_experiment(dataset, out, scale=scale, seed=int(kwargs.get("seed", 0)),
                                         seeds=kwargs.get("seeds"), device=kwargs.get("device"),
                                         progress=bool(kwargs.get("progress", True)))
    if kwargs.get("seeds") is not None:
        raise FemursegError("--seeds: only for the ct experiment")
    grid = select_grid(paper_grid(scale), models)
    if dry_run:
        return format_grid(grid, scale)
    if dataset is None or out is None:
        raise FemursegError("experiment: give the DATASET and --out DIR (or --dry-run to list the grid)")
    res = run_experiment(name, dataset, out, scale=scale, models=models, **kwargs)
    lines = [f"{len(res['results'])} model evaluations in {res['seconds'] / 60:.1f} min"]
    for r in res["results"]:
        lines.append(f"  {r['model']:<52} DSC {r['mean_dsc']:.3f} ± {r['sd_dsc']:.3f}  ASD {r['mean_asd_mm']:.2f} mm  "
                     f"MSD {r['mean_msd_mm']:.2f} mm  AP {r['median_ap']:.3f}")
    lines.append(f"report: {res['index']}")
    return "\n".join(lines)
