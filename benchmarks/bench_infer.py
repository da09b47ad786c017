"""Benchmark: inference time per subject and peak memory for paper 001's best 3D network.

    .venv/bin/python benchmarks/bench_infer.py [--threads 2] [--repeats 2] [--devices auto]
                                               [--no-end-to-end] [--shape 48 256 256]

Model: 3D U-Net, 32 features, 4 levels, dilated centre with rates 1, 2, 4, 8 (paper 001's
"3D CNN-dilated", ``build_model({"name": "unet3d", "features": 32, "levels": 4,
"dilations": [1, 2, 4, 8]})``), random but fixed weights (seed 0): the time does not depend
on the weights.

Measurements, each in a fresh child process (so that its peak memory is its own):

* ``network``: :func:`femurseg.inference.tiling.predict_prob` on one preprocessed volume of the paper's
  input size (48 coronal slices of 256 x 256): the forward pass, softmax and copies, as the
  paper's "about 5 s per subject" (Tesla P100) measures. ``repeats`` passes; the first is
  reported separately (``first_s``: includes oneDNN/cuDNN set-up), the median of all as
  ``seconds``.
* ``end-to-end`` (CPU and GPU): ``femurseg predict`` without the command-line start-up
  (:func:`femurseg.inference.predict.predict_file`) on a synthetic scan of the paper's acquisition size
  (60 x 512 x 512, 1.5 x 0.234 x 0.234 mm, int16 NIfTI) through a run folder holding that
  model with the paper's preprocessing (central 48 slices, 256 x 256 bicubic spline, z-score):
  read, preprocess, predict, restore to 512 x 512, threshold, largest component, write.

CPU runs use ``--threads`` torch threads (default 2, the project's reference machine). GPU runs
(when CUDA is present) use float16 autocast, as ``femurseg predict`` does by default; peak GPU
memory is ``torch.cuda.max_memory_allocated``. Peak host memory is the child's maximum resident
set size (``ru_maxrss``), which includes the Python/torch baseline (reported too).

Prints a table and writes ``benchmarks/results/infer.csv`` (one row per measurement, with the
machine, the load average at the start, and the library versions). Timings on a shared
machine vary with its load: the load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from femurseg.inference.run import cpu_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

RESULTS = ROOT / "benchmarks" / "results" / "infer.csv"
MODEL = {"name": "unet3d", "features": 32, "levels": 4, "dilations": [1, 2, 4, 8]}
PAPER_SECONDS = 5.0  # paper 001: about 5 s per subject, Tesla P100
SCAN_SHAPE, SCAN_SPACING = (60, 512, 512), (1.5, 0.234, 0.234)




def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


# ----------------------------------------------------------------------------- child measurements


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    from femurseg.models import build_model

    torch.set_num_threads(int(spec["threads"]))
    dev = torch.device(spec["device"])
    torch.manual_seed(0)
    model = build_model(MODEL).eval().to(dev)
    baseline = _rss_mb()
    out: dict[str, Any] = {"baseline_rss_mb": round(baseline, 1)}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if spec["what"] == "network":
        from femurseg.inference.tiling import predict_prob

        img = np.random.default_rng(0).normal(size=tuple(spec["shape"])).astype(np.float32)
        times = []
        for _ in range(int(spec["repeats"])):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            prob = predict_prob([model], img, device=dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            assert prob.shape == img.shape
        out.update(first_s=times[0], seconds=statistics.median(times), min_s=min(times), n=len(times))
    else:
        out.update(_end_to_end(model, dev, spec))
    out["peak_rss_mb"] = round(_rss_mb(), 1)
    if dev.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _end_to_end(model, dev, spec) -> dict[str, Any]:
    import numpy as np

    from femurseg.core import io
    from femurseg.data.preprocess import PreprocessConfig
    from femurseg.inference import predict as P
    from femurseg.inference.run import (
        CONFIG_NAME,
        RUN_FORMAT,
        RUN_VERSION,
        save_checkpoint,
        write_json,
    )

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        (run / "fold_0").mkdir(parents=True)
        save_checkpoint(run / "fold_0" / "best.pt", {"model": {k: v.cpu() for k, v in model.state_dict().items()},
                                                     "model_config": dict(model.config)})
        write_json(run / "fold_0" / "state.json", {"epoch": 1, "finished": True})
        write_json(run / CONFIG_NAME, {"format": RUN_FORMAT, "version": RUN_VERSION, "kind": "train", "k": 1,
                                       "model": dict(model.config),
                                       "preprocess": PreprocessConfig.preset("paper").to_dict()})
        rng = np.random.default_rng(0)
        grids = np.meshgrid(*[(np.arange(n) - n / 2) * s for n, s in zip(SCAN_SHAPE, SCAN_SPACING)], indexing="ij",
                            sparse=True)
        ball = sum(g**2 for g in grids) <= 25.0**2
        data = (ball * 600 + rng.normal(300, 60, SCAN_SHAPE)).astype(np.int16)
        scan = io.write_volume(Path(tmp) / "scan.nii.gz", io.make_volume(data, SCAN_SPACING))
        pred = P.load_predictor(run, device=str(dev), notify=lambda m: None)
        t0 = time.perf_counter()
        res = P.predict_file(pred, scan, P.outputs_for(Path(tmp) / "mask.nii.gz"), threshold=0.5,
                             notify=lambda m: None)
        seconds = time.perf_counter() - t0
        assert res.outputs.mask.exists()
    return {"first_s": seconds, "seconds": seconds, "min_s": seconds, "n": 1}


# ----------------------------------------------------------------------------- parent


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        raise RuntimeError(f"measurement {spec} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--repeats", type=int, default=2, help="network passes per device (default 2)")
    ap.add_argument("--shape", type=int, nargs=3, default=[48, 256, 256], help="preprocessed input D H W")
    ap.add_argument("--devices", default="auto", help="auto (cpu, and cuda when present), cpu or cuda")
    ap.add_argument("--no-end-to-end", action="store_true", help="skip the end-to-end predict measurement")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return

    import torch

    devices = ["cpu", "cuda"] if args.devices == "auto" else [args.devices]
    if "cuda" in devices and not torch.cuda.is_available():
        devices.remove("cuda")
    whats = ["network"] + ([] if args.no_end_to_end else ["end-to-end"])
    rows = []
    for dev in devices:
        for what in whats:
            spec = {"what": what, "device": dev, "threads": args.threads, "repeats": args.repeats, "shape": args.shape}
            load = os.getloadavg()[0]
            res = _measure(spec)
            row = {
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "what": what,
                "device": torch.cuda.get_device_name(0) if dev == "cuda" else f"cpu x{args.threads} threads",
                "input": "x".join(map(str, args.shape)) if what == "network" else "x".join(map(str, SCAN_SHAPE)),
                "model": "unet3d F32 L4 dilations 1,2,4,8",
                "seconds_per_subject": round(res["seconds"], 2),
                "first_s": round(res["first_s"], 2),
                "min_s": round(res["min_s"], 2),
                "n": res["n"],
                "peak_rss_mb": res["peak_rss_mb"],
                "baseline_rss_mb": res["baseline_rss_mb"],
                "peak_gpu_mb": res.get("peak_gpu_mb", ""),
                "paper_s": PAPER_SECONDS,
                "load_avg_1min": round(load, 2),
                "cpu": cpu_model(),
                "cores": os.cpu_count(),
                "torch": torch.__version__,
            }
            rows.append(row)
            print(f"{what:>10} {row['device']:<24} {row['input']:<12} {row['seconds_per_subject']:8.2f} s/subject "
                  f"(first {row['first_s']:.2f} s)  peak RSS {row['peak_rss_mb']:.0f} MB"
                  + (f"  peak GPU {row['peak_gpu_mb']:.0f} MB" if row["peak_gpu_mb"] != "" else "")
                  + f"  [load {row['load_avg_1min']}]  paper: ~{PAPER_SECONDS:g} s on a P100", flush=True)
    from femurseg.core.errors import atomic_path

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
