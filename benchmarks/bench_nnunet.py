"""femurseg against nnU-Net v2 on the same cases, the same folds, the same training budget and the same metrics.

    python benchmarks/bench_nnunet.py [--task mr|ct] [--quick] [--cases 16] [--budgets 1,4] [--work DIR] [--out benchmarks/results/]

Needs nnU-Net v2 in the Python that runs it (``pip install -e '.[nnunet]'``, nnunetv2 2.8.x; never a
dependency of femurseg itself). ``make bench-nnunet`` makes a separate environment for it
(``.venv-nnunet``: torch 2.13.0 CPU, nnunetv2, femurseg). Two tasks (:data:`TASKS`):

* ``mr``: the femur (label 1) in MR phantoms; femurseg's default ``femurseg cv`` (3D U-Net preset)
  against nnU-Net ``3d_fullres`` with the same label;
* ``ct``: the cortical (2) and trabecular (1) compartments of CT phantoms; femurseg's
  ``femurseg cv --task cascade`` (paper 003's two V-Nets) against nnU-Net ``3d_fullres`` trained
  **region-based** on the nested structures, regions periosteal {1, 2} and endosteal {1}
  (:data:`CT_REGIONS`, nnU-Net's own answer to nested labels), whose output is turned back into
  labels 2 and 1 by ``regions_class_order``.

Steps:

1. **Data**: ``femurseg synth`` (``--cases`` phantoms, seed 0); a femurseg dataset already has
   the nnU-Net v2 raw layout, so ``nnUNet_raw/Dataset90x_femurseg<TASK>`` links its images and
   labels (:func:`nnunet_dataset_json` keeps nnU-Net's keys of ``dataset.json``).
2. **femurseg**: ``femurseg cv`` (4 folds); its per-fold training seconds (both stages for the
   cascade) are the budget unit; its out-of-fold masks (``oof_masks/``, PR threshold, no
   post-processing) or cascade label maps (``oof_labels/``) are femurseg's predictions.
3. **Same folds**: ``splits_final.json`` written from femurseg's ``split.json``
   (:func:`nnunet_splits`), after ``nnUNetv2_plan_and_preprocess -c 3d_fullres``.
4. **nnU-Net**: ``nnUNetv2_train ID 3d_fullres FOLD -tr nnUNetTrainer_femursegBudget -device cpu``
   per fold and budget. The trainer (:data:`TRAINER`, written into nnU-Net's trainer package,
   where nnU-Net looks for custom trainers) is nnU-Net's default trainer with short
   epochs (25 iterations) whose number is fitted to the budget after the first one (the polyLR
   schedule runs to its end within the budget) and training stops, inside an epoch if need be,
   when ``budget x`` femurseg's wall seconds per fold have passed. nnU-Net's own validation then predicts the fold's held-out
   cases (sliding window with mirroring, its default) on their original grid.
5. **Same metrics**: both prediction sets are scored by femurseg against the same labels: MR with
   ``femurseg.evaluation.evaluate`` (DSC, precision, recall, ASD, MSD, HD95, volumes), CT with
   ``femurseg.ct.evaluate.evaluate_label_folder`` (periosteal / endosteal / cortical DSC and ASD,
   003 Table 2's regional volume errors), the scoring of ``femurseg cv --task cascade``; paired
   Wilcoxon signed-rank tests on per-case DSC and ASD (``femurseg.evaluation.stats.wilcoxon_holm``).

Writes ``nnunet_<task>_cases.csv`` (per case, method and budget) and ``nnunet_<task>_summary.csv``
(mean ± SD, wall and CPU seconds of training per fold, peak memory of the largest process,
inference seconds per scan, p-values). ``--quick``: 8 phantoms, 2 folds, budget 1x only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TRAINER_NAME = "nnUNetTrainer_femursegBudget"

CT_REGIONS: dict[str, list[int]] = {"periosteal": [1, 2], "endosteal": [1]}
"""nnU-Net regions of the CT task: the whole bone (inside the periosteal surface) and the marrow
(inside the endosteal surface), over femurseg's labels 1 trabecular and 2 cortical."""
CT_REGION_ORDER = [2, 1]
"""``regions_class_order``: the periosteal region is written as 2, then the endosteal one as 1 on top."""


@dataclass(frozen=True)
class Task:
    """One comparison: the phantoms, femurseg's cv options and nnU-Net's dataset."""

    key: str
    dataset_id: int
    synth_args: tuple[str, ...]
    cv_args: tuple[str, ...]
    regions: Mapping[str, list[int]] | None = None
    region_order: Sequence[int] | None = None

    @property
    def dataset_name(self) -> str:
        return f"Dataset{self.dataset_id}_femurseg{self.key.upper()}"


TASKS: dict[str, Task] = {
    "mr": Task("mr", 901, ("--modality", "mr"), ()),
    "ct": Task("ct", 902, ("--modality", "ct"), ("--task", "cascade"), CT_REGIONS, CT_REGION_ORDER),
}
DATASET_ID = TASKS["mr"].dataset_id
DATASET_NAME = TASKS["mr"].dataset_name

TRAINER = '''"""nnU-Net's default trainer under a wall-clock budget (written by femurseg's benchmarks/bench_nnunet.py)."""
import math
import os
import time

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_femursegBudget(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget_s = float(os.environ["FEMURSEG_NNUNET_BUDGET_S"])
        self.num_iterations_per_epoch = int(os.environ.get("FEMURSEG_NNUNET_ITERS", "25"))
        self.num_val_iterations_per_epoch = max(1, self.num_iterations_per_epoch // 5)
        self.num_epochs = 1000

    def run_training(self):
        self.on_train_start()
        t0 = time.perf_counter()
        self.iterations = 0
        while self.current_epoch < self.num_epochs:
            self.on_epoch_start()
            self.on_train_epoch_start()
            outs = []
            for _ in range(self.num_iterations_per_epoch):  # the budget may end inside an epoch
                outs.append(self.train_step(next(self.dataloader_train)))
                self.iterations += 1
                if time.perf_counter() - t0 >= self.budget_s:
                    break
            self.on_train_epoch_end(outs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val = [self.validation_step(next(self.dataloader_val)) for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val)
            self.on_epoch_end()
            elapsed = time.perf_counter() - t0
            if self.current_epoch == 1:  # fit the polyLR schedule to the epochs the budget allows;
                # rounded up, the last epoch is cut at the budget instead of leaving it unused
                n = max(1, math.ceil(self.budget_s / max(elapsed, 1e-6)))
                self.num_epochs = n
                self.lr_scheduler.max_steps = n
            if elapsed >= self.budget_s:
                break
        self.print_to_log_file(f"femurseg budget: stopped after {self.current_epoch} epochs, "
                               f"{time.perf_counter() - t0:.1f} s of {self.budget_s:.1f} s, "
                               f"{self.iterations} iterations")
        self.on_train_end()
'''


# ----------------------------------------------------------------------------- the bridge (no nnU-Net needed)


def nnunet_splits(split: Mapping[str, Any], cases: Sequence[str]) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json`` from femurseg's ``split.json``: per fold the held-out cases
    (``val``) and all others (``train``), case identifiers as in the dataset."""
    folds = [list(f) for f in split["folds"]]
    known = set(cases)
    unknown = sorted({c for f in folds for c in f} - known)
    if unknown:
        raise ValueError(f"split.json names cases not in the dataset: {unknown[:5]}")
    return [{"train": sorted(c for c in cases if c not in set(f)), "val": sorted(f)} for f in folds]


def nnunet_dataset_json(femurseg_json: Mapping[str, Any], num_training: int,
                        regions: Mapping[str, list[int]] | None = None,
                        region_order: Sequence[int] | None = None) -> dict[str, Any]:
    """nnU-Net v2's ``dataset.json`` from a femurseg one (femurseg keeps nnU-Net's keys and adds its own).
    With ``regions`` (name -> label values), region-based training: ``labels`` lists the regions
    and ``regions_class_order`` the label each region is written as, in order."""
    labels: dict[str, Any] = dict(femurseg_json["labels"])
    out: dict[str, Any] = {"channel_names": dict(femurseg_json["channel_names"])}
    if regions:
        known = {int(v) for v in labels.values()}
        for name, values in regions.items():
            if not set(values) <= known:
                raise ValueError(f"region {name!r}: labels {values} not all in the dataset's {sorted(known)}")
        if region_order is None or len(region_order) != len(regions):
            raise ValueError("regions need a regions_class_order with one label per region")
        labels = {"background": 0, **{k: list(v) for k, v in regions.items()}}
        out["regions_class_order"] = [int(v) for v in region_order]
    out.update({"labels": labels, "numTraining": int(num_training),
                "file_ending": femurseg_json.get("file_ending", ".nii.gz"),
                "name": femurseg_json.get("name", DATASET_NAME)})
    return out


def link_raw_dataset(dataset: Path, raw_root: Path, task: Task = TASKS["mr"]) -> Path:
    """``raw_root/<task's nnU-Net dataset>`` with links to the femurseg dataset's images and labels."""
    out = raw_root / task.dataset_name
    shutil.rmtree(out, ignore_errors=True)
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    for sub in ("imagesTr", "labelsTr"):
        for f in sorted((dataset / sub).iterdir()):
            (out / sub / f.name).symlink_to(f.resolve())
    meta = json.loads((dataset / "dataset.json").read_text())
    n = len(list((out / "labelsTr").iterdir()))
    (out / "dataset.json").write_text(json.dumps(nnunet_dataset_json(meta, n, task.regions, task.region_order),
                                                 indent=1))
    return out


def collect_validation(results_fold_dirs: Sequence[Path], dest: Path) -> list[str]:
    """Copy nnU-Net's per-fold ``validation/<case>.nii.gz`` into one folder; returns the cases."""
    dest.mkdir(parents=True, exist_ok=True)
    cases = []
    for d in results_fold_dirs:
        for f in sorted((d / "validation").glob("*.nii.gz")):
            shutil.copy2(f, dest / f.name)
            cases.append(f.name[: -len(".nii.gz")])
    return sorted(cases)


def compare_rows(rows_a: Sequence[Mapping[str, Any]], rows_b: Sequence[Mapping[str, Any]],
                 names: tuple[str, str], metrics: Sequence[str] = ("dsc", "asd_mm")) -> list[dict[str, Any]]:
    """Paired Wilcoxon signed-rank tests (Holm over ``metrics``) of two methods' per-case rows."""
    from femurseg.evaluation.stats import wilcoxon_holm

    by_a = {r["case"]: r for r in rows_a}
    by_b = {r["case"]: r for r in rows_b}
    common = sorted(set(by_a) & set(by_b))
    out = []
    for m in metrics:
        res = wilcoxon_holm({names[0]: [float(by_a[c][m]) for c in common],
                             names[1]: [float(by_b[c][m]) for c in common]})[0]
        out.append({"metric": m, "n": res["n"], "statistic": res["statistic"], "p": res["p"]})
    return out


# ----------------------------------------------------------------------------- running

_WRAP = """import resource, subprocess, sys
r = subprocess.run(sys.argv[2:])
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(r.returncode)
"""


def _run(cmd: Sequence[str], env: Mapping[str, str], log: Path) -> dict[str, float]:
    """Run a command, its output appended to ``log``: wall and CPU seconds (the command and its
    children) and ``peak_rss_mb``, the peak resident memory of its largest process (a fresh
    wrapper process reads it, so earlier commands do not count)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    rss_file = log.with_name(log.name + ".rss")
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        r = subprocess.run([sys.executable, "-c", _WRAP, str(rss_file), *cmd], env=dict(env), stdout=fh,
                           stderr=subprocess.STDOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed (exit {r.returncode}); see {log}")
    try:
        peak = int(rss_file.read_text()) / 1024.0  # ru_maxrss is in KiB on Linux
    except (OSError, ValueError):
        peak = float("nan")
    return {"wall_s": time.perf_counter() - t0,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), "peak_rss_mb": peak}


def _install_trainer() -> Path:
    import nnunetv2

    # top level of the trainer package: nnU-Net looks at modules there before it walks the subpackages,
    # some of which import timm -> torchvision (which fails to load beside a torch of another build)
    path = Path(nnunetv2.__file__).parent / "training" / "nnUNetTrainer" / "femurseg_budget.py"
    path.write_text(TRAINER)
    return path


def _budget_line(fold_dir: Path) -> tuple[int, float, int]:
    """(epochs, training seconds, iterations) from the budget trainer's line in nnU-Net's training log."""
    import re

    for log in sorted(fold_dir.glob("training_log_*.txt"), reverse=True):
        m = re.search(r"femurseg budget: stopped after (\d+) epochs, ([\d.]+) s of [\d.]+ s, (\d+) iterations",
                      log.read_text())
        if m:
            return int(m.group(1)), float(m.group(2)), int(m.group(3))
    raise RuntimeError(f"{fold_dir}: no budget line in the training log")


MR_METRICS = ("dsc", "precision", "recall", "asd_mm", "msd_mm", "hd95_mm")
CT_METRICS = tuple(f"{c}_{m}" for c in ("periosteal", "endosteal", "cortical") for m in ("dsc", "asd_mm"))
CT_VOLUMES = ("head/total", "neck/total", "combination/total", "neck/cortical", "combination/cortical",
              "total/total", "total/cortical", "total/trabecular")
"""003 Table 2's rows (region/compartment) reported as mean relative volume error (%)."""


def _summary(rows: Sequence[Mapping[str, Any]], task: str = "mr", ct_summary: Mapping[str, Any] | None = None
             ) -> dict[str, float]:
    """Mean and SD of the task's metrics over cases, and the volume error (% of the reference):
    MR the femur's mean relative error, CT 003 Table 2's rows (``femurseg.ct.evaluate`` summary)."""
    import numpy as np

    out: dict[str, float] = {}
    for k in (MR_METRICS if task == "mr" else CT_METRICS):
        v = np.array([float(r[k]) for r in rows], float)
        out[f"{k}_mean"], out[f"{k}_sd"] = float(np.mean(v)), float(np.std(v, ddof=1)) if v.size > 1 else 0.0
    if task == "mr":
        rel = np.array([abs(float(r["vol_pred_cm3"]) - float(r["vol_ref_cm3"])) / float(r["vol_ref_cm3"]) * 100
                        for r in rows])
        out["vol_rel_err_pct_mean"] = float(np.mean(rel))
    else:
        own = (ct_summary or {}).get("volume_errors", {}).get("own", {})
        for key in CT_VOLUMES:
            e = own.get(key)
            out[f"vol_re_pct_{key.replace('/', '_')}"] = float(e["re_mean_pct"]) if e else float("nan")
    return out


def _score(task: str, pred: Path, data: Path) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """femurseg's scores of a folder of predictions: per-case rows and :func:`_summary`."""
    if task == "mr":
        from femurseg.evaluation.evaluate import evaluate_folders

        rows = evaluate_folders(pred, data, progress=False)
        return rows, _summary(rows, "mr")
    from femurseg.ct.evaluate import evaluate_label_folder

    rows, summary = evaluate_label_folder(pred, data, progress=False)
    return rows, _summary(rows, "ct", summary)


def _femurseg_timings(run: Path, task: str) -> tuple[float, float | None]:
    """(training wall seconds per fold, inference seconds per scan) of a femurseg run: the cascade
    adds its two stages."""
    names = ["."] if task == "mr" else ["stage1", "stage2"]
    train, infer = 0.0, 0.0
    for n in names:
        t = json.loads((run / n / "summary.json").read_text())["timings"]
        train += float(t["train_s_per_fold"])
        infer += float(t.get("inference_s_per_case") or 0.0)
    return train, (infer or None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="mr", help="mr (femur) or ct (cortical/trabecular)")
    ap.add_argument("--quick", action="store_true", help="8 phantoms, 2 folds, budget 1x")
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--budgets", default="1,4", help="nnU-Net's training wall time per fold, in multiples of femurseg's")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default results/nnunet_work_<task>)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    if a.quick:
        a.cases, a.folds, a.budgets = 8, 2, "1"
    task = TASKS[a.task]
    budgets = [float(b) for b in a.budgets.split(",")]
    try:
        import nnunetv2  # noqa: F401
    except ImportError:
        print("bench_nnunet: nnunetv2 is not installed here (pip install -e '.[nnunet]', or make bench-nnunet)")
        return 2
    import common

    work = a.work or HERE / "results" / ("nnunet_work" if a.task == "mr" else f"nnunet_work_{a.task}")
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
           "nnUNet_results": str(work / "nnUNet_results"), "nnUNet_n_proc_DA": "1", "nnUNet_compile": "false"}
    data = work / "data"
    if not (data / "dataset.json").exists():
        _run([str(bin_dir / "femurseg"), "synth", str(data), "--n", str(a.cases), "--seed", "0", *task.synth_args],
             env, log)
    cases = sorted(f.name[: -len(".nii.gz")] for f in (data / "labelsTr").glob("*.nii.gz"))
    # femurseg
    frun = work / "femurseg_run"
    done = frun / ("summary.json" if a.task == "mr" else "cascade_summary.json")
    if not done.exists():
        t_f = _run([str(bin_dir / "femurseg"), "cv", str(data), "--out", str(frun), "--folds", str(a.folds),
                    *task.cv_args, "--overwrite"], env, log)
        (work / "femurseg_cost.json").write_text(json.dumps(t_f))
    t_f = json.loads((work / "femurseg_cost.json").read_text())
    per_fold_s, f_infer = _femurseg_timings(frun, a.task)
    common.say(f"femurseg: {per_fold_s:.1f} s training per fold; cv {t_f['wall_s']:.0f} s wall, {t_f['cpu_s']:.0f} CPU-s")
    # nnU-Net: raw data, plans, our folds
    link_raw_dataset(data, work / "nnUNet_raw", task)
    pre = work / "nnUNet_preprocessed" / task.dataset_name
    if not (pre / "nnUNetPlans.json").exists():
        _run([str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", str(task.dataset_id), "-c", "3d_fullres",
              "-np", "2"], env, log)
    split = json.loads((frun / "split.json").read_text())
    (pre / "splits_final.json").write_text(json.dumps(nnunet_splits(split, cases), indent=1))
    _install_trainer()
    f_rows, f_sum = _score(a.task, frun / ("oof_masks" if a.task == "mr" else "oof_labels"), data)
    metrics = ("dsc", "asd_mm") if a.task == "mr" else ("periosteal_dsc", "endosteal_dsc", "periosteal_asd_mm")
    all_rows: list[dict[str, Any]] = [{"method": "femurseg", "budget": 1.0, **r} for r in f_rows]
    fname = "femurseg default" if a.task == "mr" else "femurseg cascade (2 V-Nets)"
    summary = [{"method": fname, "budget": "1x", **f_sum, "train_wall_s_per_fold": per_fold_s,
                "train_and_validate_cpu_s_per_fold": t_f["cpu_s"] / a.folds, "peak_rss_mb": t_f.get("peak_rss_mb"),
                "inference_s_per_scan": f_infer}]
    nn_name = "nnU-Net 3d_fullres" + (" (regions)" if task.regions else "")
    for b in budgets:
        res_root = work / f"nnUNet_results_{b:g}x"
        env_b = {**env, "nnUNet_results": str(res_root), "FEMURSEG_NNUNET_BUDGET_S": str(b * per_fold_s)}
        folds_dirs = [res_root / task.dataset_name / f"{TRAINER_NAME}__nnUNetPlans__3d_fullres" / f"fold_{k}"
                      for k in range(a.folds)]
        costs = []
        for k, fold_dir in enumerate(folds_dirs):
            if (fold_dir / "validation" / "summary.json").exists():
                costs.append(json.loads((fold_dir / "femurseg_cost.json").read_text()))
                continue
            c = _run([str(bin_dir / "nnUNetv2_train"), str(task.dataset_id), "3d_fullres", str(k), "-tr", TRAINER_NAME,
                      "-device", "cpu"], env_b, log)
            (fold_dir / "femurseg_cost.json").write_text(json.dumps(c))
            costs.append(c)
        trained = [_budget_line(d) for d in folds_dirs]
        # inference time: nnUNetv2_predict (its defaults: sliding window, mirroring) on fold 0's held-out scans
        inp, outp = work / f"predict_in_{b:g}x", work / f"predict_out_{b:g}x"
        shutil.rmtree(inp, ignore_errors=True)
        shutil.rmtree(outp, ignore_errors=True)
        inp.mkdir()
        for c in split["folds"][0]:
            (inp / f"{c}_0000.nii.gz").symlink_to((data / "imagesTr" / f"{c}_0000.nii.gz").resolve())
        t_pred = _run([str(bin_dir / "nnUNetv2_predict"), "-i", str(inp), "-o", str(outp), "-d", str(task.dataset_id),
                       "-c", "3d_fullres", "-f", "0", "-tr", TRAINER_NAME, "-device", "cpu"], env_b, log)
        pred = work / f"nnunet_oof_{b:g}x"
        collect_validation(folds_dirs, pred)
        n_rows, n_sum = _score(a.task, pred, data)
        all_rows += [{"method": nn_name, "budget": b, **r} for r in n_rows]
        tests = {t["metric"]: t["p"] for t in compare_rows(f_rows, n_rows, ("femurseg", "nnunet"), metrics)}
        summary.append({"method": nn_name, "budget": f"{b:g}x", **n_sum,
                        "train_wall_s_per_fold": float(sum(t for _, t, _ in trained)) / a.folds,
                        "epochs_per_fold": float(sum(e for e, _, _ in trained)) / a.folds,
                        "iterations_min": min(i for _, _, i in trained), "iterations_max": max(i for _, _, i in trained),
                        "train_and_validate_cpu_s_per_fold": float(sum(c["cpu_s"] for c in costs)) / a.folds,
                        "peak_rss_mb": max(float(c.get("peak_rss_mb", float("nan"))) for c in costs),
                        "inference_s_per_scan": t_pred["wall_s"] / len(split["folds"][0]),
                        **{f"wilcoxon_p_{m}": tests[m] for m in metrics}})
        key = metrics[0]
        common.say(f"{nn_name} {b:g}x: {key} {summary[-1][key + '_mean']:.3f} (femurseg {summary[0][key + '_mean']:.3f}), "
                   f"p = {tests[key]:.3g}")
    machine = common.machine_info()
    for r in summary:
        r.update({"date": machine["date"], "cpu": machine["cpu"], "cores": machine["cores"]})
    common.write_csv(all_rows, a.out / f"nnunet_{a.task}_cases.csv")
    common.say(f"wrote {common.write_csv(summary, a.out / f'nnunet_{a.task}_summary.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
