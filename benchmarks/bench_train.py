"""Benchmark: seconds per training epoch and peak memory, 3D and 2D U-Net on the default phantom.

    .venv/bin/python benchmarks/bench_train.py [--threads 2] [--epochs 2] [--cases 12]
                                               [--devices auto] [--models all]

Setting (the defaults of ``femurseg cv``): 12 training and 4 validation cases of the default MR
phantom (48 x 128 x 128 at 1.5 x 0.9375 x 0.9375 mm), preprocessed with the default preset
(central 48 slices, in-plane x0.5 -> 48 x 64 x 64, z-score), batch size 1, Adam, "wce" loss,
horizontal flips; one epoch = every training volume once (3D) or every slice stack once (2D),
then validation of the 4 cases. Models:

* ``unet3d``: 3D U-Net, 16 features, 3 levels, instance norm (the ``default`` preset);
* ``unet2d``: 2D U-Net on 3-slice stacks, 16 features, 3 levels, instance norm, batch 8;

each in float32 and with autocast (bfloat16 on CPU, float16 on CUDA).

Each configuration runs in a fresh child process (peak memory = that child's ``ru_maxrss``,
which includes the ~0.4 GB Python/torch baseline, reported separately; on CUDA also
``torch.cuda.max_memory_allocated``). Reported: ``epoch_s`` (median wall seconds of the epochs
after the first, which includes oneDNN/cuDNN set-up), ``cpu_s`` (process CPU seconds per epoch:
on a shared machine, wall time / cpu time shows the contention), ``first_epoch_s``.
The load average at the start is recorded: the reference machine's 2 cores are shared.

Writes ``benchmarks/results/train.csv`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

from common import machine_info, say, write_csv  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "train.csv"
MODELS = {
    "unet3d": ({"name": "unet3d", "features": 16, "levels": 3, "norm": "instance"}, {"batch_size": 1}),
    "unet2d": ({"name": "unet2d", "features": 16, "levels": 3, "norm": "instance"}, {"batch_size": 8}),
}

CHILD = r"""
import json, resource, sys, time, os
import numpy as np, torch
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
from femurseg.data import phantom
from femurseg.data.preprocess import PreprocessConfig, preprocess_image, preprocess_label
from femurseg.training.fit import Sample, TrainConfig, fit, seed_everything
from femurseg.models import build_model
prep = PreprocessConfig()
samples = []
for i, case in enumerate(phantom.generate_cohort(a["cases"] + 4, modality="mr", seed=1)):
    x, info = preprocess_image(case.image.astype(np.float32), case.spacing, prep)
    samples.append(Sample(f"c{i}", x, preprocess_label(case.label.astype(np.uint8), info, prep)))
train, val = samples[:a["cases"]], samples[a["cases"]:]
seed_everything(0)
model = build_model(a["model"])
cfg = TrainConfig(**{**a["train"], "max_epochs": a["epochs"], "min_epochs": a["epochs"], "precision": a["precision"],
                     "threads": a["threads"]})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if a["device"] == "cuda":
    torch.cuda.reset_peak_memory_stats()
res = fit(model, train, val, cfg, device=a["device"], progress=False)
out = {"epochs": [h["seconds"] for h in res.history], "input": "x".join(map(str, train[0].image.shape)),
       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "baseline_rss_mb": base,
       "cpu_s_total": time.process_time(), "val_dice_last": res.history[-1]["val_dice"]}
if a["device"] == "cuda":
    out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
print("RESULT " + json.dumps(out))
"""


def run_child(args: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args["threads"]), "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, env=env,
                       timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--devices", default="auto", help="auto (cpu, and cuda when present), cpu or cuda")
    ap.add_argument("--models", default="all", help="comma-separated: unet3d,unet2d")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if a.devices == "auto" else a.devices.split(",")
    models = list(MODELS) if a.models == "all" else a.models.split(",")
    info = machine_info()
    rows = []
    for dev in devices:
        for name in models:
            model, train = MODELS[name]
            for prec in ("fp32", "bf16" if dev == "cpu" else "fp16"):
                args = {"model": model, "train": train, "threads": a.threads, "epochs": a.epochs, "cases": a.cases,
                        "device": dev, "precision": prec}
                load = round(os.getloadavg()[0], 2)
                amp = prec != "fp32"
                say(f"{name} on {dev} ({'autocast ' + prec if amp else 'fp32'}) ...")
                r = run_child(args)
                ep = r["epochs"]
                later = sorted(ep[1:]) or ep
                row = {
                    "date": info["date"], "model": f"{name} F{model['features']} L{model['levels']} {model['norm']}",
                    "input": r["input"], "device": dev if dev != "cpu" else f"cpu x{a.threads} threads",
                    "precision": ("bf16 autocast" if dev == "cpu" else "fp16 autocast") if amp else "fp32",
                    "batch": train["batch_size"], "train_cases": a.cases, "val_cases": 4,
                    "epoch_s": later[len(later) // 2], "first_epoch_s": ep[0],
                    "cpu_s_per_epoch": r["cpu_s_total"] / len(ep),
                    "peak_rss_mb": r["peak_rss_mb"], "baseline_rss_mb": r["baseline_rss_mb"],
                    "peak_gpu_mb": r.get("peak_gpu_mb", ""), "load_avg_1min": load,
                    "cpu": info["cpu"], "cores": info["cores"], "torch": info["torch"],
                }
                rows.append(row)
                say(f"  epoch {row['epoch_s']:.1f} s (first {row['first_epoch_s']:.1f} s, {row['cpu_s_per_epoch']:.1f} CPU-s), "
                    f"peak RSS {row['peak_rss_mb']:.0f} MB, load {load}")
    write_csv(rows, a.out)
    say(f"\nwrote {a.out}")
    say(f"{'model':28s} {'device':18s} {'precision':14s} {'epoch s':>8s} {'CPU-s':>7s} {'RSS MB':>7s} {'GPU MB':>7s}")
    for r in rows:
        gpu = f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] != "" else "-"
        say(f"{r['model']:28s} {r['device']:18s} {r['precision']:14s} {r['epoch_s']:8.1f} {r['cpu_s_per_epoch']:7.1f} "
            f"{r['peak_rss_mb']:7.0f} {gpu:>7s}")


if __name__ == "__main__":
    main()
