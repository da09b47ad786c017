"""nnU-Net's ingredients on the demo: which of them moves femurseg's DSC at the demo's budget?

    python benchmarks/bench_ingredients.py [--data demo_out/data] [--work DIR] [--configs a,b] [--out benchmarks/results/]

What it measures. ``make demo`` cross-validates the 3D U-Net with dilated centre (1,2,4,8) on 16
wide-world MR phantoms for 16 epochs and reaches a DSC of about 0.93, below the 0.96 of the
narrower world. Each configuration here is the same 4-fold cross-validation (same data, same
folds, seed 0, the demo's network and ``default`` preset) with one change, so its out-of-fold DSC
compares with the demo's directly:

* ``demo``: the demo as it is (Dice + wCE, Adam 2e-3 with cosine decay, ``light`` augmentation);
* ``dice-ce``: nnU-Net's loss, Dice + unweighted cross-entropy (``--loss dice-ce``);
* ``deep-supervision``: auxiliary losses on the coarser decoder outputs (``--deep-supervision``);
* ``poly``: nnU-Net's polyLR schedule instead of cosine (``--lr-schedule poly``);
* ``levels-4``: one more U-Net level (``--levels 4``: more context, ~1.6x the step time);
* ``kaiming-init``: PyTorch's default initialisation instead of the papers' Xavier;
* ``sgd``: nnU-Net's optimiser, SGD with Nesterov momentum 0.99, lr 1e-2, weight decay 3e-5, with
  its polyLR (``--optimizer sgd --lr 1e-2 --weight-decay 3e-5 --lr-schedule poly``);
* ``patches-48``: nnU-Net's patch sampling, 48^3 random patches (half of them centred on the
  femur) instead of whole volumes, with 28 epochs for about the same CPU time
  (``--patch-size 48,48,48 --max-epochs 28 --min-epochs 18``).

For every finished configuration it also scores test-time mirroring (``femurseg predict --tta
flip``: the left-right mirrored scan predicted as well and averaged) on the same fold models and
out-of-fold cases, at the run's PR threshold. Runs whose ``summary.json`` exists in ``--work`` are
reused. Writes ``ingredients_summary.csv`` (per configuration: mean ± SD DSC, precision, recall,
ASD, the flip-TTA DSC, cv seconds) and ``ingredients_cases.csv`` (per case).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

from femurseg.experiments.demo import DEMO_MODEL  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {
    "demo": {},
    "dice-ce": {"train": {"loss": "dice-ce"}},
    "deep-supervision": {"model": {"deep_supervision": True}},
    "poly": {"train": {"lr_schedule": "poly"}},
    "levels-4": {"model": {"levels": 4}},
    "kaiming-init": {"model": {"init": "default"}},
    "sgd": {"train": {"optimizer": "sgd", "lr": 1e-2, "weight_decay": 3e-5, "lr_schedule": "poly"}},
    "patches-48": {"train": {"patch_size": [48, 48, 48], "max_epochs": 28, "min_epochs": 18}},
}


def run_config(name: str, data: Path, work: Path) -> Path:
    """4-fold cv of configuration ``name`` into ``work/name`` (reused when finished)."""
    from femurseg.training.cv import run_cv

    out = work / name
    if (out / "summary.json").exists():
        common.say(f"{name}: reusing {out}")
        return out
    spec = CONFIGS[name]
    model = {**DEMO_MODEL, **spec.get("model", {})}
    common.say(f"{name}: 4-fold cv -> {out}")
    run_cv(data, out, model_cfg=model, train_cfg=spec.get("train"), folds=4, seed=0, overwrite=True, progress=False)
    return out


def score(run: Path, data: Path, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Out-of-fold DSC per case without and with flip TTA, on the run's fold models."""
    from femurseg.core.io import read_image
    from femurseg.inference.predict import load_predictor, predict_probability

    summary = json.loads((run / "summary.json").read_text())
    split = json.loads((run / "split.json").read_text())
    thr = float(json.loads((run / "thresholds.json").read_text())["pr"])
    rows = []
    for k, ids in enumerate(split["folds"]):
        pred = load_predictor(run, folds=k)
        for cid in ids:
            vol = read_image(data / "imagesTr" / f"{cid}_0000.nii.gz")
            ref = read_image(data / "labelsTr" / f"{cid}.nii.gz").data > 0.5
            row = {"config": name, "case": cid, "fold": k}
            for tta in ("none", "flip"):
                mask = predict_probability(pred, vol, tta=tta) >= thr
                row[f"dsc_tta_{tta}"] = common.dice(mask, ref)
            rows.append(row)
    per = {r["case"]: r for r in rows}
    for m in common.read_csv(run / "metrics.csv"):
        if m["case"] in per:
            per[m["case"]].update({k: float(m[k]) for k in ("dsc", "precision", "recall", "asd_mm")})
    s = {"config": name, "cases": len(rows),
         "dsc": summary["mean_dsc"], "sd_dsc": summary["sd_dsc"],
         "precision": summary["mean_precision"], "recall": summary["mean_recall"], "asd_mm": summary["mean_asd_mm"],
         "dsc_flip_tta": float(np.mean([r["dsc_tta_flip"] for r in rows])),
         "sd_dsc_flip_tta": float(np.std([r["dsc_tta_flip"] for r in rows])),
         "dsc_check": float(np.mean([r["dsc_tta_none"] for r in rows])),
         "cv_seconds": summary["seconds_total"], "threshold": thr}
    return s, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("demo_out/data"), help="the demo's phantom dataset")
    ap.add_argument("--work", type=Path, default=HERE / "results" / "ingredients_work")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    names = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        ap.error(f"unknown configuration(s) {', '.join(unknown)} ({', '.join(CONFIGS)})")
    if not (a.data / "dataset.json").exists():
        ap.error(f"{a.data}: no dataset (run `make demo` first, or `femurseg synth {a.data} --n 16`)")
    a.work.mkdir(parents=True, exist_ok=True)
    summary, cases = [], []
    machine = common.machine_info()
    for name in names:
        s, rows = score(run_config(name, a.data, a.work), a.data, name)
        summary.append({**s, **machine})
        cases += rows
        common.say(f"{name}: DSC {s['dsc']:.4f} ± {s['sd_dsc']:.4f}, with flip TTA {s['dsc_flip_tta']:.4f}, "
                   f"cv {s['cv_seconds']:.0f} s")
    a.out.mkdir(parents=True, exist_ok=True)
    common.write_csv(cases, a.out / "ingredients_cases.csv")
    common.say(f"wrote {common.write_csv(summary, a.out / 'ingredients_summary.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
