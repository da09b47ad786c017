"""Benchmark per machine class: training step and inference, femurseg's default vs plain float32 and MONAI,
natively and with oneDNN capped to the instruction sets of other CPUs.

    .venv/bin/python benchmarks/bench_classes.py [--classes native,AVX512_CORE,AVX2] [--repeats 3]
                                                 [--inference demo|paper] [--out benchmarks/results/]

Most researchers' machines are AVX2-only (laptops, desktops, AMD Zen 2/3 servers, many cloud VMs)
or AVX-512 without BF16; the reference machine has AMX. oneDNN, which runs PyTorch's CPU
convolutions, picks its kernels from the CPU's instruction set, capped by ``ONEDNN_MAX_CPU_ISA``:
with ``ONEDNN_MAX_CPU_ISA=AVX2`` it runs exactly the kernels it runs on an AVX2-only CPU (the
clock and caches stay this machine's, so the class rows compare kernels, not machines). Each class
runs in a child process with the cap set (oneDNN reads it once per process):

* ``training``: :func:`bench_training.run` ("demo": 3D U-Net F16 L3, instance norm, 48 x 64 x 64;
  engines ``femurseg-preset`` = what ``femurseg cv`` runs on that class (precision "auto"),
  ``femurseg`` = fit forced to float32, ``plain`` = a textbook float32 loop);
* ``inference``: :func:`bench_inference.run` (``femurseg`` = the whole predict path with its
  default acceleration for that class, ``plain`` float32 eager, ``monai`` sliding window).

Writes ``classes.csv``: one row per (class, benchmark, engine) with seconds (median), the precision
or acceleration mode used, and the ratios to plain float32 of the same class.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

CLASSES = ("native", "AVX512_CORE", "AVX2")
"""Machine classes: this CPU as it is, AVX-512 without BF16/AMX, AVX2 only."""

CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import bench_inference, bench_training
from femurseg.core.precision import native_bf16_cpu
a = json.loads(sys.argv[2])
quiet = lambda m: print(m, file=sys.stderr, flush=True)
out = {"native_bf16": native_bf16_cpu()}
out["training"] = bench_training.run("demo", a["repeats"], log=quiet)["rows"]
out["inference"] = bench_inference.run(a["inference"], a["repeats"], log=quiet)["rows"]
print("RESULT " + json.dumps(out, default=str))
"""


def run_class(cls: str, repeats: int, inference: str, log=common.say) -> dict[str, Any]:
    """One class in a child process; returns its rows (``training`` and ``inference``) and ``native_bf16``."""
    env = dict(os.environ)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    env.pop("DNNL_MAX_CPU_ISA", None)
    if cls != "native":
        env["ONEDNN_MAX_CPU_ISA"] = cls
    log(f"class {cls}: training (demo) and inference ({inference}) ...")
    r = subprocess.run([sys.executable, "-c", CHILD, str(HERE), json.dumps({"repeats": repeats, "inference": inference})],
                       env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"class {cls} failed:\n{r.stderr[-3000:]}")
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def rows_for(cls: str, res: dict[str, Any]) -> list[dict[str, Any]]:
    machine = common.machine_info()
    out = []
    for bench in ("training", "inference"):
        rows = res[bench]
        plain = next(float(r["seconds_per_step_median" if bench == "training" else "seconds_median"])
                     for r in rows if r["engine"] == "plain")
        monai = next((float(r["seconds_median"]) for r in rows if r["engine"] == "monai"), None)
        for r in rows:
            if r["engine"] not in ("femurseg", "femurseg-preset", "plain", "monai"):
                continue
            t = float(r["seconds_per_step_median" if bench == "training" else "seconds_median"])
            arith = r.get("precision") or (r.get("accel_mode") or "fp32 eager")
            out.append({
                "class": cls, "onednn_max_cpu_isa": "" if cls == "native" else cls,
                "native_bf16": res["native_bf16"], "benchmark": f"{bench}_{r['benchmark'].split('_')[-1]}",
                "engine": r["engine"], "arithmetic": arith, "seconds_median": round(t, 4),
                "plain_fp32_over_engine": round(plain / t, 3),
                "monai_over_engine": round(monai / t, 3) if monai else "",
                "date": machine["date"], "cpu": machine["cpu"], "cores": machine["cores"], "torch": machine["torch"],
            })
    return out


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table: one line per class and benchmark, default vs plain float32 (and MONAI)."""
    lines = ["| machine class | native bf16 | benchmark | femurseg default (arithmetic) | s | plain fp32 s "
             "| x vs plain | MONAI s | x vs MONAI |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for cls in dict.fromkeys(r["class"] for r in rows):
        for bench in dict.fromkeys(r["benchmark"] for r in rows if r["class"] == cls):
            sel = {r["engine"]: r for r in rows if r["class"] == cls and r["benchmark"] == bench}
            d = sel.get("femurseg-preset") or sel.get("femurseg")
            p, m = sel.get("plain"), sel.get("monai")
            if not d or not p:
                continue
            name = "AVX2 only" if cls == "AVX2" else ("AVX-512, no BF16" if cls == "AVX512_CORE" else "native")
            peer = f"{float(m['seconds_median']):.3f} | {float(d['monai_over_engine']):.2f}" if m else "- | -"
            lines.append(f"| {name} | {d['native_bf16']} | {bench} | {d['engine']} ({d['arithmetic']}) "
                         f"| {float(d['seconds_median']):.3f} | {float(p['seconds_median']):.3f} "
                         f"| {float(d['plain_fp32_over_engine']):.2f} | {peer} |")
    return lines


def run(classes=CLASSES, repeats: int = 3, inference: str = "demo", log=common.say) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for cls in classes:
        rows += rows_for(cls, run_class(cls, repeats, inference, log))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", default=",".join(CLASSES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--inference", choices=("demo", "paper", "tiny"), default="demo")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args(argv)
    rows = run([c.strip() for c in args.classes.split(",") if c.strip()], args.repeats, args.inference)
    path = common.write_csv(rows, args.out / "classes.csv")
    print("\n".join(table(rows)))
    common.say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
