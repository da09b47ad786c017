"""Run the femurseg benchmark suite and write ``benchmarks/results/*.csv`` and ``SUMMARY.md``.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only NAME ...] [--out DIR] [--summary-only]

``make bench`` runs the full suite (under 20 minutes on an idle 2-core machine):

==================  ==================================================================  =========
name                what                                                                CSV
==================  ==================================================================  =========
inference_paper     predict path vs MONAI sliding window vs plain eager, 48x256x256     inference_paper.csv
inference_demo      the same on the demo input (48x64x64)                               inference_demo.csv
training_demo       train step, 3D U-Net F16 L3, femurseg fit vs plain loop             training_demo.csv
training_paper      train step, 3D U-Net F32 L4 (dilated), 48x256x256 (2 repeats)       training_paper.csv
ceiling             matmul / conv GFLOP/s and the network's fraction of them            ceiling_paper.csv
metrics             ASD/MSD/HD95 on 48x512x512, femurseg vs MONAI (bench_metrics.py)    metrics.csv
levers_demo         every femurseg.inference.accel mode on the demo input                         levers_demo.csv
machine_classes     training (demo) and inference per CPU class: native, AVX512_CORE, AVX2     classes.csv
==================  ==================================================================  =========

``--quick`` (a few minutes): fewer repeats, no paper-size training, no lever sweep.

Standalone complements, not run here (they measure other things): ``bench_infer.py`` (end-to-end
``femurseg predict`` with file I/O, and GPU runs), ``bench_train.py`` (whole epochs with
validation, 2D U-Net, autocast, GPU), ``bench_ray_scaling.py`` (Ray back-end scaling) and
``bench_precision.py`` (which convolutions may run in bfloat16: mask agreement per assignment,
``precision_paper.csv``, not timed).
The paper-size lever sweep (``bench_inference.py --size paper --levers``, ~15 min with the
compilations) is run separately; ``SUMMARY.md`` includes every CSV present in the results folder,
with the date it was measured.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

TARGETS = {
    "inference_vs_monai": 1.5,
    "inference_vs_plain": 3.0,
    "dice": 0.999,
    "training_ratio": 1.0,
    "metrics_speedup": 5.0,
    "metrics_agree_mm": 1e-3,
}

OPT_IN = ("fused", "bf16")
"""Whole-path rows besides the default: the float32-exact mode and all-bfloat16."""


def _steps(quick: bool) -> list[tuple[str, Callable[[Path], Any]]]:
    import bench_ceiling
    import bench_inference
    import bench_training

    r_inf = 2 if quick else 5
    r_small = 3 if quick else 5
    shared: dict[str, Any] = {}

    def inference_paper(out: Path) -> None:
        res = bench_inference.run("paper", r_inf, opt_in=() if quick else OPT_IN)
        shared["paper_times"], shared["paper_cpu"] = res["times"], res["cpu"]
        common.write_csv(res["rows"], out / "inference_paper.csv")

    def inference_demo(out: Path) -> None:
        res = bench_inference.run("demo", r_small, opt_in=() if quick else OPT_IN)
        common.write_csv(res["rows"], out / "inference_demo.csv")

    def training_demo(out: Path) -> None:
        common.write_csv(bench_training.run("demo", r_small)["rows"], out / "training_demo.csv")

    def training_paper(out: Path) -> None:
        # a paper-size step takes ~30 s on the idle machine: 1 warm-up + 2 timed steps per engine
        common.write_csv(bench_training.run("paper", 2, preset=False)["rows"], out / "training_paper.csv")

    def ceiling(out: Path) -> None:
        # the network-only engines of the inference benchmark (same input): from this run, or from
        # its CSV (per-round wall seconds, median CPU seconds) when run with --only ceiling
        keys = ("plain", "femurseg-network")
        net = net_cpu = None
        if shared.get("paper_times"):
            net = {k: shared["paper_times"][k] for k in keys}
            net_cpu = {k: shared["paper_cpu"][k] for k in keys}
        elif (out / "inference_paper.csv").exists():
            rows = {r["engine"]: r for r in common.read_csv(out / "inference_paper.csv")}
            if all(k in rows and rows[k].get("seconds_per_round") for k in keys):
                net = {k: [float(v) for v in rows[k]["seconds_per_round"].split()] for k in keys}
                net_cpu = {k: [float(rows[k]["cpu_seconds_median"])] for k in keys if rows[k].get("cpu_seconds_median")}
        if net:  # name the default path's precision (accel "auto": "mixed" where bfloat16 is native)
            from femurseg.inference import accel

            tag = f"femurseg-network={accel.resolve_mode('auto', 'cpu')}"
            net = {tag if k == "femurseg-network" else k: v for k, v in net.items()}
            net_cpu = {tag if k == "femurseg-network" else k: v for k, v in (net_cpu or {}).items()}
        res = bench_ceiling.run("paper", r_small, network_times=net, network_cpu=net_cpu)
        common.write_csv(res["rows"], out / "ceiling_paper.csv")

    def metrics(out: Path) -> None:
        import bench_metrics

        res = bench_metrics.run(repeats=2 if quick else 5)
        bench_metrics.print_table(res)
        bench_metrics.write_csv(res, out / "metrics.csv")

    def levers_demo(out: Path) -> None:
        res = bench_inference.run("demo", r_small, levers=bench_inference.LEVERS)
        common.write_csv(res["rows"], out / "levers_demo.csv")

    def machine_classes(out: Path) -> None:
        import bench_classes

        rows = bench_classes.run(bench_classes.CLASSES, 2 if quick else 3, "demo" if quick else "paper")
        common.write_csv(rows, out / "classes.csv")

    steps = [("inference_paper", inference_paper), ("inference_demo", inference_demo),
             ("training_demo", training_demo), ("ceiling", ceiling), ("metrics", metrics)]
    if not quick:
        steps.insert(3, ("training_paper", training_paper))
        steps.append(("levers_demo", levers_demo))
    steps.append(("machine_classes", machine_classes))
    return steps


# ----------------------------------------------------------------------------- summary


def _f(v: Any, fmt: str = ".2f") -> str:
    try:
        return format(float(v), fmt)
    except (TypeError, ValueError):
        return str(v) if v not in (None, "") else "-"


def _load(out: Path, name: str) -> list[dict[str, str]]:
    p = out / name
    return common.read_csv(p) if p.exists() else []


def _inference_table(rows: list[dict[str, str]]) -> list[str]:
    lines = ["| engine | covers | s / subject (median) | x vs plain fp32 | x vs MONAI | CPU-s (median) "
             "| x vs plain, CPU time | x vs MONAI, CPU time | peak MiB above baseline | Dice vs plain fp32 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = r["engine"] + (f" ({r['accel_mode']})" if r.get("accel_mode") else "")
        lines.append(f"| {name} | {r['covers']} | {_f(r['seconds_median'], '.2f')} | "
                     f"{_f(r['speedup_vs_plain'])} | {_f(r['speedup_vs_monai'])} | {_f(r.get('cpu_seconds_median'), '.1f')} | "
                     f"{_f(r.get('cpu_speedup_vs_plain'))} | {_f(r.get('cpu_speedup_vs_monai'))} | "
                     f"{_f(r['peak_mem_mb'], '.0f')} | {_f(r['dice_vs_plain_fp32'], '.5f')} |")
    return lines


def _by(rows: list[dict[str, str]], engine: str) -> dict[str, str]:
    return next((r for r in rows if r.get("engine") == engine), {})


def _status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def write_summary(out: Path, started: str = "", elapsed_s: float | None = None) -> Path:
    """Render ``SUMMARY.md`` from the CSVs in ``out``."""
    inf_p, inf_d = _load(out, "inference_paper.csv"), _load(out, "inference_demo.csv")
    tr_d, tr_p = _load(out, "training_demo.csv"), _load(out, "training_paper.csv")
    ceil, met = _load(out, "ceiling_paper.csv"), _load(out, "metrics.csv")
    lev_d, lev_p = _load(out, "levers_demo.csv"), _load(out, "levers_paper.csv")
    first = next((rows[0] for rows in (inf_p, inf_d, tr_d, ceil) if rows), {})
    L: list[str] = ["# femurseg benchmarks", ""]
    if first:
        L.append(f"Measured {first.get('date', '?')} on **{first.get('cpu', '?')}**, {first.get('cores', '?')} cores, "
                 f"{first.get('memory_gb', '?')} GB, {first.get('isa', '')}; torch {first.get('torch', '?')}, "
                 f"{first.get('torch_threads', '?')} threads; 1-min load average at the start "
                 f"{first.get('load_avg_1min', '?')} (the machine is shared: absolute times vary, ratios are "
                 "measured interleaved in one process).")
    if elapsed_s is not None:
        L.append(f"Suite run started {started}, took {elapsed_s / 60:.1f} min.")
    L += ["", "Method: every benchmark runs femurseg and its peers interleaved in one process (a warm-up call "
          "each, then rounds in rotating order); times are medians, ratios are ratios of medians. Peak memory "
          "is sampled from /proc/self/statm every 2 ms during one call, minus the RSS before it. "
          "Network: 3D U-Net F32 L4 with dilated centre (1, 2, 4, 8), random weights (seed 0); input a "
          "synthetic MR phantom (seed 0).", ""]

    # targets
    L += ["## Targets", "", "| target | measured | status |", "|---|---|---|"]
    fp = _by(inf_p, "femurseg")
    if fp:
        dice_ok = float(fp["dice_vs_plain_fp32"]) >= TARGETS["dice"]
        L.append(f"| paper-size inference >= {TARGETS['inference_vs_monai']}x faster than MONAI sliding window "
                 f"| {_f(fp['speedup_vs_monai'])}x wall, {_f(fp.get('cpu_speedup_vs_monai'))}x CPU time "
                 "(whole path vs network only) "
                 f"| {_status(float(fp['speedup_vs_monai']) >= TARGETS['inference_vs_monai'] and dice_ok)} |")
        L.append(f"| paper-size inference >= {TARGETS['inference_vs_plain']}x faster than plain float32 eager "
                 f"| {_f(fp['speedup_vs_plain'])}x wall, {_f(fp.get('cpu_speedup_vs_plain'))}x CPU time (network part "
                 f"alone: {_f(_by(inf_p, 'femurseg-network').get('speedup_vs_plain'))}x wall, "
                 f"{_f(_by(inf_p, 'femurseg-network').get('cpu_speedup_vs_plain'))}x CPU time) "
                 f"| {_status(float(fp['speedup_vs_plain']) >= TARGETS['inference_vs_plain'] and dice_ok)} |")
        L.append(f"| mask Dice vs float32 >= {TARGETS['dice']} | {_f(fp['dice_vs_plain_fp32'], '.5f')} "
                 f"| {_status(dice_ok)} |")
        for mode, what in (("fused", "float32-exact"), ("bf16", "opt-in")):
            fb = _by(inf_p, f"femurseg[{mode}]")
            if not fb:
                continue
            bd = float(fb["dice_vs_plain_fp32"])
            ok = bd >= TARGETS["dice"] and float(fb["speedup_vs_plain"]) >= TARGETS["inference_vs_plain"]
            L.append(f"| ({what} FEMURSEG_ACCEL={mode}, both speed targets) | {_f(fb['speedup_vs_monai'])}x vs MONAI, "
                     f"{_f(fb['speedup_vs_plain'])}x vs plain (wall); {_f(fb.get('cpu_speedup_vs_monai'))}x / "
                     f"{_f(fb.get('cpu_speedup_vs_plain'))}x CPU time; Dice {bd:.5f} (random weights) "
                     f"| {_status(ok)} |")
    ft = _by(tr_d, "femurseg")
    if ft:
        ratio = float(ft["plain_over_engine"])
        fpre = _by(tr_d, "femurseg-preset")
        pre = (f"; default preset (bf16 autocast): plain / femurseg = {_f(fpre['plain_over_engine'])} wall"
               if fpre else "")
        L.append(f"| demo training step no slower than a plain PyTorch loop | float32: plain / femurseg = {_f(ratio)} wall "
                 f"(per-round median {_f(ft.get('plain_over_engine_per_round'))}), "
                 f"{_f(ft.get('cpu_plain_over_engine'))} CPU time{pre} "
                 f"| {_status(ratio >= 0.95 * TARGETS['training_ratio'])} (5 % noise allowance) |")
    if met:
        res = _metrics_summary(met)
        if res:
            ok = res["speedup"] >= TARGETS["metrics_speedup"] and res["diff"] <= TARGETS["metrics_agree_mm"]
            L.append(f"| surface distances >= {TARGETS['metrics_speedup']}x faster than MONAI, agree to 1e-3 mm "
                     f"| {res['speedup']:.1f}x (vs MONAI's 3 calls), max diff {res['diff']:.1e} mm | {_status(ok)} |")
    L.append("")

    classes = _load(out, "classes.csv")
    if classes:
        import bench_classes

        L += ["## 0. Per machine class (oneDNN capped with ONEDNN_MAX_CPU_ISA)", "",
              "The same kernels an AVX2-only CPU or an AVX-512 CPU without BF16 runs, on this machine "
              f"(measured {classes[0].get('date', '?')}): femurseg's default (precision and acceleration "
              "chosen for the class) against plain float32 eager PyTorch and MONAI.", ""]
        L += bench_classes.table(classes) + [""]
    if inf_p:
        L += [f"## 1. Inference, paper size (scan {inf_p[0]['scan']} -> network {inf_p[0]['network_input']})", ""]
        L += _inference_table(inf_p) + [""]
    if inf_d:
        L += [f"## 2. Inference, demo size (scan {inf_d[0]['scan']} -> network {inf_d[0]['network_input']})", ""]
        L += _inference_table(inf_d) + [""]
    if tr_d or tr_p:
        L += ["## 3. Training step (batch 1, whole volume)", "",
              "Seconds per step inside one `fit` epoch of several steps (`femurseg`: float32 like `plain`; "
              "`femurseg-preset`: the default preset's bfloat16 autocast, what `femurseg cv` runs at demo scale).", "",
              "| model | input | engine | precision | s / step (median) | plain / engine | CPU-s / step "
              "| plain / engine, CPU time | peak MiB above baseline |",
              "|---|---|---|---|---:|---:|---:|---:|---:|"]
        for r in tr_d + tr_p:
            L.append(f"| {r['model']} | {r['input']} | {r['engine']} | {r.get('precision', 'fp32')} | "
                     f"{_f(r['seconds_per_step_median'])} | "
                     f"{_f(r['plain_over_engine'])} | {_f(r.get('cpu_seconds_median'), '.1f')} | "
                     f"{_f(r.get('cpu_plain_over_engine'))} | {_f(r['peak_mem_mb'], '.0f')} |")
        L.append("")
    if ceil:
        L += ["## 4. Machine ceiling", "",
              "The ceiling of a precision is its fastest kernel here (matmul or one 3x3x3 convolution, 32 -> 32 "
              "maps on 48x128x128). GFLOP per CPU-second is the contention-robust figure (x 2 cores = the idle "
              "machine's GFLOP/s). `mixed` (femurseg's default on this CPU: bfloat16 except the final "
              "full-resolution stage) is given as a fraction of the bfloat16 ceiling, its upper bound.", "",
              "| kernel | precision | s (median) | GFLOP/s (wall) | % of ceiling (wall) | GFLOP / CPU-s "
              "| % of ceiling (CPU time) |",
              "|---|---|---:|---:|---:|---:|---:|"]
        for r in ceil:
            frac_cpu = r.get("fraction_of_ceiling_cpu")
            L.append(f"| {r['kernel']} | {r['precision']} | {_f(r['seconds_median'], '.4f')} | {_f(r['gflops'], '.1f')} | "
                     f"{_f(100 * float(r['fraction_of_ceiling']), '.0f')} | {_f(r.get('gflops_per_cpu_second'), '.1f')} | "
                     f"{_f(100 * float(frac_cpu), '.0f') if frac_cpu not in (None, '') else '-'} |")
        L.append("")
    if met:
        L += ["## 5. Surface distances (48 x 512 x 512, spacing 1.5 x 0.234 x 0.234 mm)", "",
              "| tool | computes | s (min) | s (median) | ASD mm | MSD mm | HD95 mm |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in met:
            L.append(f"| {r['tool']} | {r['computes']} | {_f(r['seconds_min'], '.3f')} | {_f(r['seconds_median'], '.3f')} | "
                     f"{_f(r['asd_mm'], '.4f')} | {_f(r['msd_mm'], '.4f')} | {_f(r['hd95_mm'], '.4f')} |")
        L.append("")
    for title, rows in (("paper size", lev_p), ("demo size", lev_d)):
        if rows:
            L += [f"## Levers, {title} (network only unless stated; measured {rows[0].get('date', '?')})", ""]
            L += ["| engine | s (median) | x vs plain fp32 | x vs plain, CPU time | set-up s (once per shape) | peak MiB "
                  "| Dice vs plain fp32 |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
            for r in rows:
                L.append(f"| {r['engine']} | {_f(r['seconds_median'])} | {_f(r['speedup_vs_plain'])} | "
                         f"{_f(r.get('cpu_speedup_vs_plain'))} | "
                         f"{_f(r.get('setup_s'), '.1f')} | {_f(r['peak_mem_mb'], '.0f')} | "
                         f"{_f(r['dice_vs_plain_fp32'], '.5f')} |")
            L.append("")
    prec = _load(out, "precision_paper.csv")
    if prec:
        L += [f"## Which convolutions may run in bfloat16 (paper size, `bench_precision.py`, measured "
              f"{prec[0].get('date', '?')})", "",
              "Mask Dice against float32, random weights; not timed.", "",
              "| convolutions in bfloat16 | share of the FLOPs | Dice, network grid | Dice, whole predict path |",
              "|---|---:|---:|---:|"]
        for r in prec:
            L.append(f"| {r['bf16_convolutions']} | {_f(100 * float(r['bf16_flop_share']), '.1f')} % | "
                     f"{_f(r['dice_grid'], '.5f')} | {_f(r['dice_whole_path'], '.5f')} |")
        L.append("")
    findings = HERE / "FINDINGS.md"
    if findings.exists():
        L += [findings.read_text().strip(), ""]
    path = out / "SUMMARY.md"
    from femurseg.core.errors import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(L) + "\n")
    return path


def _metrics_summary(rows: list[dict[str, str]]) -> dict[str, float] | None:
    try:
        ours = next(r for r in rows if r["tool"].startswith("femurseg") and "shell" in r["tool"])
        three = next(r for r in rows if r["tool"] == "monai" and "3 calls" in r["computes"])
    except StopIteration:
        return None
    diff = max(abs(float(ours[f"{k}_mm"]) - float(three[f"{k}_mm"])) for k in ("asd", "msd", "hd95"))
    return {"speedup": float(three["seconds_min"]) / float(ours["seconds_min"]), "diff": diff}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, skip paper-size training and the lever sweep")
    ap.add_argument("--only", nargs="*", default=None, metavar="NAME", help="run only these benchmarks")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    ap.add_argument("--summary-only", action="store_true", help="only rewrite SUMMARY.md from the CSVs")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.summary_only:  # keep the last suite run's start and duration
        import re

        old = (args.out / "SUMMARY.md").read_text() if (args.out / "SUMMARY.md").exists() else ""
        m = re.search(r"Suite run started (.+?), took ([0-9.]+) min", old)
        started, elapsed = (m.group(1), 60 * float(m.group(2))) if m else ("", None)
        common.say(f"wrote {write_summary(args.out, started, elapsed)}")
        return 0
    started = time.strftime("%Y-%m-%d %H:%M")
    t0 = time.perf_counter()
    failed = []
    steps = _steps(args.quick)
    if args.only:
        unknown = set(args.only) - {n for n, _ in steps}
        if unknown:
            ap.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(n for n, _ in steps)}")
        steps = [(n, f) for n, f in steps if n in args.only]
    for name, fn in steps:
        common.say(f"== {name} ({(time.perf_counter() - t0) / 60:.1f} min so far)")
        try:
            fn(args.out)
        except Exception:  # noqa: BLE001 - report, go on with the others
            traceback.print_exc()
            failed.append(name)
    elapsed = time.perf_counter() - t0
    common.say(f"wrote {write_summary(args.out, started, elapsed)} ({elapsed / 60:.1f} min)")
    if failed:
        common.say(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
