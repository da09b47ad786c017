"""Benchmark 4: the machine's ceiling, and how close the network forward pass gets to it.

    .venv/bin/python benchmarks/bench_ceiling.py [--size paper|demo|tiny] [--repeats 5]

Measured, interleaved in one process (``benchmarks/common.py``), median of ``repeats`` after a
warm-up, with 2 torch threads:

* a large matrix product (``n x n @ n x n``, n = 2048; 2 n^3 FLOP) in float32 and in bfloat16:
  the dense-arithmetic ceiling of each precision;
* one 3x3x3 convolution layer as the network has thousands of (32 -> 32 maps on the level-0
  grid of the input: 48 x 128 x 128 for ``paper``/``demo``), in float32 with the default
  (NCDHW) memory format, float32 channels-last and bfloat16 channels-last;
* the network forward pass (3D U-Net F 32, L 4, dilations 1, 2, 4, 8, random weights): FLOP from
  ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and transposed convolutions;
  2 FLOP per multiply-add) on the benchmark's input, timed as plain float32 eager and with
  :func:`femurseg.inference.accel.optimise_for_inference` in its ``auto`` mode (float32) and ``bf16``.
  ``run_all.py`` passes the network timings of the inference benchmark instead of timing
  the paper-size network again.

The ceiling of a precision is its fastest kernel here (on this CPU the channels-last convolution
beats the matmul). Achieved GFLOP/s and the fraction of that ceiling are reported, per wall
second and per CPU second (process CPU time, all threads): on a shared, oversubscribed machine
the wall-clock figures measure the share of the cores this process got, the CPU-time figures
measure the code (2 cores x GFLOP/CPU-s is the idle machine's throughput).
Writes ``ceiling_<size>.csv``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

MODEL = {"name": "unet3d", "features": 32, "levels": 4, "dilations": [1, 2, 4, 8]}
SHAPES = {"paper": (48, 256, 256), "demo": (48, 64, 64), "tiny": (16, 32, 32)}
CONV_GRID = {"paper": (48, 128, 128), "demo": (48, 128, 128), "tiny": (8, 16, 16)}
MATMUL_N = {"paper": 2048, "demo": 2048, "tiny": 256}


def network_flops(model_config: dict[str, Any], shape: tuple[int, ...]) -> float:
    """FLOP of one forward pass on ``(1, 1, *shape)`` (counted on the meta device, no compute)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from femurseg.models import build_model

    with torch.device("meta"):
        model = build_model(dict(model_config))
        x = torch.empty((1, 1, *shape))
    with FlopCounterMode(display=False) as fc:
        model(x)
    return float(fc.get_total_flops())


def run(size: str = "paper", repeats: int = 5, network_times: dict[str, list[float]] | None = None,
        threads: int | None = None, log=common.say,
        network_cpu: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """Run the benchmark. ``network_times`` / ``network_cpu``: ``{"plain": [...], "femurseg-network": [...]}``
    wall / CPU seconds of forward passes measured elsewhere on the same input (then the network
    is not timed here)."""
    import torch

    from femurseg.inference import accel
    from femurseg.models import build_model

    torch.set_num_threads(common.default_threads(size) if threads is None else threads)
    cl = torch.channels_last_3d
    n = MATMUL_N[size]
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    grid = CONV_GRID[size]
    conv = torch.nn.Conv3d(32, 32, 3, padding=1).eval()
    conv_cl = torch.nn.Conv3d(32, 32, 3, padding=1).eval().to(memory_format=cl)
    conv_bf = torch.nn.Conv3d(32, 32, 3, padding=1).eval().to(memory_format=cl).bfloat16()
    xc = torch.randn(1, 32, *grid)
    xc_cl = xc.contiguous(memory_format=cl)
    xc_bf = xc_cl.bfloat16()
    conv_flop = 2.0 * 27 * 32 * 32 * float(torch.tensor(grid).prod())

    def under_inference(fn):
        def g():
            with torch.inference_mode():
                return fn()
        return g

    kernels = {
        "matmul_fp32": (lambda: a32 @ b32, 2.0 * n**3, "fp32"),
        "matmul_bf16": (lambda: a16 @ b16, 2.0 * n**3, "bf16"),
        "conv3x3x3_fp32_ncdhw": (under_inference(lambda: conv(xc)), conv_flop, "fp32"),
        "conv3x3x3_fp32_channels_last": (under_inference(lambda: conv_cl(xc_cl)), conv_flop, "fp32"),
        "conv3x3x3_bf16_channels_last": (under_inference(lambda: conv_bf(xc_bf)), conv_flop, "bf16"),
    }
    log(f"ceiling[{size}]: matmul n={n}, conv 32->32 3x3x3 on {grid}")
    cpu: dict[str, list[float]] = {}
    times = common.interleaved({k: v[0] for k, v in kernels.items()}, repeats, warmup=1, log=log, cpu=cpu)
    shape = SHAPES[size]
    flop = network_flops(MODEL, shape)
    net_times = dict(network_times or {})
    net_cpu = dict(network_cpu or {})
    setup_s: dict[str, float] = {}
    if not net_times:
        torch.manual_seed(0)
        model = build_model(dict(MODEL)).eval()
        x = torch.randn(1, 1, *shape)
        engines: dict[str, Any] = {}

        def plain():
            with torch.no_grad():
                return model(x)
        engines["plain"] = plain
        for mode in ("auto", "bf16"):
            fwd = accel.optimise_for_inference(model, tuple(x.shape), "cpu", mode)
            setup_s[f"accel[{mode}]"] = fwd.setup_s
            engines[f"accel[{mode}]={fwd.mode}"] = (lambda f=fwd: f(x))
        net_times = common.interleaved(engines, repeats, warmup=1, log=log, cpu=net_cpu)

    machine = common.machine_info()
    # the ceiling of a precision = its fastest kernel here (matmul or one convolution layer)
    peak = {p: max(f / common.median(times[k]) for k, (_, f, q) in kernels.items() if q == p) for p in ("fp32", "bf16")}
    peak_cpu = {p: max(f / common.median(cpu[k]) for k, (_, f, q) in kernels.items() if q == p)
                for p in ("fp32", "bf16")}
    rows = []

    def row(kernel: str, prec: str, f: float, wall: list[float], cpu_s: list[float] | None, **extra: Any) -> dict:
        t = common.median(wall)
        c = common.median(cpu_s) if cpu_s else None
        return {"benchmark": f"ceiling_{size}", "kernel": kernel, "precision": prec, "flop": f,
                "seconds_median": t, "cpu_seconds_median": "" if c is None else c, "repeats": len(wall),
                "gflops": f / t / 1e9, "fraction_of_ceiling": (f / t) / peak[ceiling_of(prec)],
                "gflops_per_cpu_second": "" if c is None else f / c / 1e9,
                "fraction_of_ceiling_cpu": "" if c is None else (f / c) / peak_cpu[ceiling_of(prec)], **extra, **machine}

    for name, (_, f, prec) in kernels.items():
        rows.append(row(name, prec, f, times[name], cpu[name]))
    for name, ts in net_times.items():
        prec = "bf16" if "bf16" in name else ("mixed" if "mixed" in name else "fp32")
        rows.append(row(f"network_forward[{name}]", prec, flop, ts, net_cpu.get(name),
                        input="x".join(map(str, shape)), setup_s=setup_s.get(name.split("=")[0], "")))
    for r in rows:
        per_cpu = (f"  {r['gflops_per_cpu_second']:7.1f} GFLOP/CPU-s ({100 * r['fraction_of_ceiling_cpu']:4.0f}%)"
                   if r["gflops_per_cpu_second"] != "" else "")
        log(f"  {r['kernel']:<44} {r['seconds_median']:9.4f} s  {r['gflops']:8.1f} GFLOP/s  "
            f"{100 * r['fraction_of_ceiling']:5.1f}% of the {r['precision']} ceiling" + per_cpu)
    return {"rows": rows, "times": times, "network_flop": flop}


def ceiling_of(precision: str) -> str:
    """The ceiling a precision is measured against: "mixed" (accel's bfloat16 network with a
    float32 final stage) against the bfloat16 one, its upper bound."""
    return "bf16" if precision == "mixed" else precision


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=tuple(SHAPES), default="paper")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args(argv)
    res = run(args.size, args.repeats)
    common.say(f"wrote {common.write_csv(res['rows'], args.out / f'ceiling_{args.size}.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
