"""Benchmark 1-2: inference time per subject, peak memory and mask agreement, femurseg vs peers.

    .venv/bin/python benchmarks/bench_inference.py [--size paper|demo|tiny] [--repeats 5]
                                                   [--levers [MODE ...]] [--out benchmarks/results/]

Network: paper 001's best 3D network, ``build_model({"name": "unet3d", "features": 32,
"levels": 4, "dilations": [1, 2, 4, 8]})`` with random but fixed weights (``torch.manual_seed(0)``
before building); ``--size tiny`` uses F4 L2 on a small volume (for the tests).

Input: a synthetic MR scan from :mod:`femurseg.data.phantom` (seed 0):

* ``paper``: 60 x 512 x 512 at 1.5 x 0.234 x 0.234 mm (the paper's acquisition), preprocessed
  with ``PreprocessConfig.preset("paper")`` (central 48 slices, 256 x 256 bicubic spline,
  z-score) -> the network sees 48 x 256 x 256;
* ``demo``: the default phantom (48 x 128 x 128 at 1.5 x 0.9375 x 0.9375 mm) with the default
  (demo/cv) preprocessing (in-plane x 0.5) -> 48 x 64 x 64.

Engines, timed interleaved in one process (see ``benchmarks/common.py``):

* ``femurseg``: the whole predict path of :mod:`femurseg.inference.predict` on the in-memory scan --
  preprocess, :func:`femurseg.inference.tiling.predict_prob` (whatever acceleration infer applies by
  default: ``"mixed"`` bfloat16/float32 on CPUs with native bfloat16, else float32 ``"fused"``), restore to the original grid, threshold 0.5, largest connected component
  (:func:`femurseg.inference.predict.predict_probability` + :func:`femurseg.inference.predict.segment`).
* ``femurseg-network``: :func:`femurseg.inference.tiling.predict_prob` on the preprocessed volume (the
  network part of the path, with its softmax), to compare like with like.
* ``femurseg[MODE]`` (``opt_in``; ``run_all`` uses ``fused``, the float32-exact path, and
  ``bf16``, all-bfloat16): the whole path with ``FEMURSEG_ACCEL=MODE``.
* ``monai``: the same network on the same preprocessed volume through
  ``monai.inferers.sliding_window_inference`` with MONAI's defaults (``sw_batch_size=1``,
  ``overlap=0.25``, ``mode="constant"``) and ``roi_size`` = the whole preprocessed volume, which
  is also femurseg's training patch (``TrainConfig.patch_size=None``: 3D nets train on whole
  volumes), so MONAI runs one window; network only (no pre/post-processing).
* ``plain``: ``model(x)`` in float32 eager PyTorch under ``torch.no_grad`` (network only).

Peers' times cover the network alone, femurseg's the whole path, so its ratios are conservative.
Peak memory is sampled during the first timed round (RSS above the level before the call).
Agreement: every engine's probabilities go through the same restore / threshold / largest
component (outside the timed region for the peers) and the masks' Dice against ``plain`` is
reported. ``--levers`` adds one row per acceleration mode of :mod:`femurseg.inference.accel` (network only,
same protocol), to show what each lever is worth.

Writes ``inference_<size>.csv`` (and ``levers_<size>.csv`` with ``--levers``).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

MODEL = {"name": "unet3d", "features": 32, "levels": 4, "dilations": [1, 2, 4, 8]}
TINY_MODEL = {"name": "unet3d", "features": 4, "levels": 2, "dilations": [1, 2]}
LEVERS = ("channels-last", "fused", "mixed", "compile", "onnx", "bf16", "compile-bf16")
COVERS = {
    "femurseg": "whole predict path: preprocess, network, restore, threshold, largest component",
    "femurseg-network": "network only: femurseg.inference.tiling.predict_prob (softmax included)",
    "monai": "network only: sliding_window_inference, roi = whole volume",
    "plain": "network only: model(x), float32 eager",
}


def make_case(size: str) -> tuple[Any, Any, dict[str, Any]]:
    """``(volume, preprocess config, model config)`` for a benchmark size."""
    from femurseg.core import io
    from femurseg.data import phantom
    from femurseg.data.preprocess import PreprocessConfig

    if size == "paper":
        case = phantom.generate_case(0, shape=phantom.PAPER_SHAPE, spacing=phantom.PAPER_SPACING)
        prep, model = PreprocessConfig.preset("paper"), MODEL
    elif size == "demo":
        case = phantom.generate_case(0)
        prep, model = PreprocessConfig(), MODEL
    elif size == "tiny":
        case = phantom.generate_case(0, shape=(12, 32, 32), spacing=(1.5, 3.75, 3.75))
        prep, model = PreprocessConfig(crop_slices=8, scale=0.5), TINY_MODEL
    else:
        raise ValueError(f"unknown size {size!r}")
    vol = io.make_volume(case.image, case.spacing)
    return vol, prep, model


def build(model_config: dict[str, Any]):
    import torch

    from femurseg.models import build_model

    torch.manual_seed(0)
    return build_model(dict(model_config)).eval()


def run(size: str = "paper", repeats: int = 5, levers: Sequence[str] = (), threads: int | None = None,
        log=common.say, opt_in: Sequence[str] = (), network_only: bool = False) -> dict[str, Any]:
    """Run the benchmark; ``threads`` None: 2 (1 for ``tiny``). Returns ``{"rows": [...], "times": {...}}``."""
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference

    from femurseg.data.preprocess import preprocess_image, restore
    from femurseg.inference import predict as P
    from femurseg.inference import tiling as infer

    torch.set_num_threads(common.default_threads(size) if threads is None else threads)
    vol, prep, cfg = make_case(size)
    model = build(cfg)
    image, info = preprocess_image(vol.data, vol.spacing, prep)
    x = torch.from_numpy(image)[None, None]
    roi = tuple(image.shape)
    pred = P.Predictor(run_dir=Path("."), models=[model], folds=[0], prep=prep, device=torch.device("cpu"))
    log(f"inference[{size}]: scan {vol.data.shape} -> network input {image.shape}, model {cfg}")

    def post(prob_pre: np.ndarray) -> np.ndarray:
        """The predict path's restore + threshold 0.5 + largest component, for peers' probabilities."""
        prob = restore(np.ascontiguousarray(prob_pre, dtype=np.float32), info, order=1)
        return P.segment(prob, vol.spacing, threshold=0.5, postprocess="lcc", notify=lambda m: None)[0]

    def femurseg_path() -> np.ndarray:
        prob = P.predict_probability(pred, vol)
        return P.segment(prob, vol.spacing, threshold=0.5, postprocess="lcc", notify=lambda m: None)[0]

    def plain() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    def monai() -> torch.Tensor:
        with torch.no_grad():
            return sliding_window_inference(x, roi_size=roi, sw_batch_size=1, predictor=model)

    def femurseg_network() -> np.ndarray:
        return infer.predict_prob(model, image, device="cpu")

    def with_mode(fn, mode: str):
        def run_with_mode():
            from femurseg.inference import accel

            old = os.environ.get(accel.ENV_MODE)
            os.environ[accel.ENV_MODE] = mode
            try:
                return fn()
            finally:
                if old is None:
                    del os.environ[accel.ENV_MODE]
                else:
                    os.environ[accel.ENV_MODE] = old
        return run_with_mode

    engines = {"femurseg": femurseg_path, "femurseg-network": femurseg_network, "monai": monai, "plain": plain}
    for mode in opt_in:  # the whole path with an opt-in acceleration mode ($FEMURSEG_ACCEL)
        engines[f"femurseg[{mode}]"] = with_mode(femurseg_path, mode)
    if network_only:  # lever sweeps: only the network engines (plain is the reference)
        engines = {k: v for k, v in engines.items() if k in ("femurseg-network", "plain")}
    setup: dict[str, float] = {}
    if levers:
        from femurseg.inference import accel

        for mode in levers:
            with common.stopwatch() as t, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fwd = accel.optimise_for_inference(model, tuple(x.shape), "cpu", mode)
            setup[f"accel[{mode}]"] = t[0]
            log(f"  accel[{mode}]: set-up {t[0]:.1f} s -> {fwd!r}")
            engines[f"accel[{mode}]"] = (lambda f=fwd: f(x))

    # first call of each engine (includes one-off set-up such as compilation) = warm-up
    first: dict[str, float] = {}
    outputs: dict[str, Any] = {}
    for name, fn in engines.items():
        with common.stopwatch() as t:
            outputs[name] = fn()
        first[name] = t[0]
        log(f"  warm-up {name}: {t[0]:.2f} s")
    mem: dict[str, tuple[float, float]] = {}
    cpu: dict[str, list[float]] = {}
    times = common.interleaved(engines, repeats, warmup=0, log=log, peak_mb=mem, cpu=cpu)

    # masks and agreement
    def to_mask(name: str, out: Any) -> np.ndarray:
        if name == "femurseg" or name.startswith("femurseg["):
            return np.asarray(out, bool)
        if isinstance(out, np.ndarray):  # femurseg-network: probabilities already
            return post(out).astype(bool)
        prob = torch.softmax(out.float(), dim=1)[0, 1].numpy()
        return post(prob).astype(bool)

    masks = {n: to_mask(n, o) for n, o in outputs.items()}
    ref = masks["plain"]

    machine = common.machine_info()
    base = {"benchmark": f"inference_{size}", "scan": "x".join(map(str, vol.data.shape)),
            "network_input": "x".join(map(str, image.shape)),
            "model": f"unet3d F{cfg['features']} L{cfg['levels']} dil {','.join(map(str, cfg['dilations']))}"}
    rows = []
    t_plain = common.median(times["plain"])
    if "monai" not in times:  # network-only sweep: ratios against MONAI are not measured
        times["monai"], cpu["monai"] = [float("nan")] * repeats, [float("nan")] * repeats
    t_monai = common.median(times["monai"])
    for name in engines:
        t = common.median(times[name])
        if name not in masks:
            continue
        rows.append({
            **base,
            "engine": name,
            "covers": COVERS.get(name, f"whole predict path, FEMURSEG_ACCEL={name[9:-1]}"
                                 if name.startswith("femurseg[") else "network only (femurseg.inference.accel mode)"),
            "seconds_median": t,
            "seconds_min": min(times[name]),
            "repeats": repeats,
            "first_call_s": first[name],
            "setup_s": setup.get(name, ""),
            "seconds_per_round": " ".join(f"{v:.3f}" for v in times[name]),
            "peak_mem_mb": round(mem[name][0], 1),
            "baseline_rss_mb": round(mem[name][1], 1),
            "dice_vs_plain_fp32": round(common.dice(masks[name], ref), 6),
            "mask_voxels": int(masks[name].sum()),
            "speedup_vs_plain": t_plain / t,
            "speedup_vs_plain_per_round": common.ratio_stats(times, "plain", name)[1],
            "cpu_seconds_median": common.median(cpu[name]),
            "cpu_speedup_vs_plain": common.median(cpu["plain"]) / common.median(cpu[name]),
            "cpu_speedup_vs_monai": common.median(cpu["monai"]) / common.median(cpu[name]),
            "speedup_vs_monai": t_monai / t,
            "speedup_vs_monai_per_round": common.ratio_stats(times, "monai", name)[1],
            "accel_mode": _infer_mode(model, name[9:-1] if name.startswith("femurseg[") else None)
                          if name.startswith("femurseg") else "",
            **machine,
        })
    for r in rows:
        log(f"  {r['engine']:<22} {r['seconds_median']:8.3f} s  x{r['speedup_vs_plain']:.2f} vs plain  "
            f"x{r['speedup_vs_monai']:.2f} vs monai  peak +{r['peak_mem_mb']:.0f} MiB  Dice {r['dice_vs_plain_fp32']:.5f}")
    return {"rows": rows, "times": times, "cpu": cpu}


def _infer_mode(model: Any, requested: str | None) -> str:
    """The femurseg.inference.accel mode infer actually used for ``requested`` (None: the default mode)."""
    try:
        from femurseg.inference import accel

        want = accel.default_mode() if requested is None else requested
        used = {h.mode for h in accel._CACHE.get(model, {}).values() if h.requested == want}
        return ",".join(sorted(used)) or "none"
    except Exception:  # noqa: BLE001 - reporting only
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("paper", "demo", "tiny"), default="paper")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--levers", nargs="*", default=None, metavar="MODE",
                    help=f"also time femurseg.inference.accel modes, network only (no MODE: {' '.join(LEVERS)})")
    ap.add_argument("--opt-in", nargs="*", default=[], metavar="MODE",
                    help="also time the whole path with FEMURSEG_ACCEL=MODE (e.g. bf16)")
    ap.add_argument("--network-only", action="store_true",
                    help="time only plain, femurseg-network and the levers (no predict path, no MONAI)")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args(argv)
    levers = () if args.levers is None else (args.levers or LEVERS)
    res = run(args.size, args.repeats, levers, opt_in=args.opt_in, network_only=args.network_only)
    name = f"{'levers' if levers else 'inference'}_{args.size}.csv"
    common.say(f"wrote {common.write_csv(res['rows'], args.out / name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
