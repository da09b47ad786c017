"""Benchmark 3: seconds and peak memory per optimisation step, femurseg's training loop vs plain PyTorch.

    .venv/bin/python benchmarks/bench_training.py [--size demo|paper|tiny] [--repeats 5]

Sizes (batch 1, whole volumes as femurseg trains 3D networks by default):

* ``demo``: 3D U-Net F 16, L 3, instance norm (``femurseg cv``'s default model) on the demo input (the default phantom, default preprocessing:
  48 x 64 x 64);
* ``paper``: 3D U-Net F 32, L 4, dilations 1, 2, 4, 8 on the paper's input (48 x 256 x 256);
* ``tiny``: F 4, L 2 on 8 x 16 x 16 (tests only).

Engines, interleaved in one process (``benchmarks/common.py``), each on its own copy of the same
initial weights; one timed round = one epoch of ``steps`` optimisation steps (the one training
volume repeated), and the figure is seconds per step:

* ``femurseg``: :func:`femurseg.training.fit.fit` for one epoch of ``steps`` samples, no validation, no
  output folder, default :class:`~femurseg.training.fit.TrainConfig` forced to float32 (loss "wce", Adam,
  deterministic algorithms on) and default augmentation (random left-right flip). The time
  covers everything fit does: seeding, sample selection, batch assembly, augmentation, forward,
  loss, backward, Adam, and its per-call bookkeeping (optimiser set-up, keeping the best weights)
  spread over the epoch's steps.
* ``femurseg-preset``: the same with the ``default`` preset's training settings (what ``femurseg
  cv`` runs at demo scale: Dice + weighted CE, precision "auto": bfloat16 autocast on a CPU with
  native bfloat16, float32 elsewhere). Listed because it is what a user's demo-scale run costs
  on the machine (or the ``ONEDNN_MAX_CPU_ISA`` class) it runs on.
* ``plain``: the textbook loop on the same model and loss, tensors prepared beforehand:
  ``zero_grad; loss_fn(model(x), y).backward(); opt.step()`` with the same Adam settings, float32.

Peak memory: RSS above the level before the step, sampled during the first timed round (see
``common.PeakRSS``). Wall and CPU seconds are both reported (the machine is shared).
Writes ``training_<size>.csv``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CONFIGS = {
    "demo": {"name": "unet3d", "features": 16, "levels": 3, "norm": "instance"},  # femurseg cv default
    "paper": {"name": "unet3d", "features": 32, "levels": 4, "dilations": [1, 2, 4, 8]},
    "tiny": {"name": "unet3d", "features": 4, "levels": 2},
}


def make_sample(size: str):
    """One preprocessed training :class:`femurseg.training.fit.Sample` (image + label) for ``size``."""
    from femurseg.data import phantom
    from femurseg.data.preprocess import (
        PreprocessConfig,
        preprocess_image,
        preprocess_label,
    )
    from femurseg.training.fit import Sample

    if size == "paper":
        case = phantom.generate_case(0, shape=phantom.PAPER_SHAPE, spacing=phantom.PAPER_SPACING)
        prep = PreprocessConfig.preset("paper")
    elif size == "demo":
        case = phantom.generate_case(0)
        prep = PreprocessConfig()
    elif size == "tiny":
        case = phantom.generate_case(0, shape=(12, 32, 32), spacing=(1.5, 3.75, 3.75))
        prep = PreprocessConfig(crop_slices=8, scale=0.5)
    else:
        raise ValueError(f"unknown size {size!r}")
    image, info = preprocess_image(case.image, case.spacing, prep)
    label = preprocess_label(case.label, info, prep)
    return Sample("bench", image, label)


def run(size: str = "demo", repeats: int = 5, threads: int | None = None, log=common.say,
        preset: bool = True, steps: int | None = None) -> dict[str, Any]:
    """Run the benchmark; ``threads`` None: 2 (1 for ``tiny``); ``steps`` per timed round (None: 4,
    1 at paper size); ``preset``: include the ``femurseg-preset`` row. Returns ``{"rows", "times"}``."""
    import copy

    import torch

    from femurseg.data.augment import AugmentConfig
    from femurseg.models import build_model
    from femurseg.training import fit as T
    from femurseg.training.cv import PRESETS
    from femurseg.training.losses import get_loss

    torch.set_num_threads(common.default_threads(size) if threads is None else threads)
    steps = steps or (1 if size == "paper" else 4)
    cfg_model = CONFIGS[size]
    sample = make_sample(size)
    torch.manual_seed(0)
    model_f = build_model(dict(cfg_model))
    model_p = copy.deepcopy(model_f)
    model_s = copy.deepcopy(model_f)
    tcfg = T.TrainConfig(max_epochs=1, min_epochs=0, threads=None, precision="fp32")
    pcfg = T.TrainConfig.from_dict({**PRESETS["default"]["train"], "max_epochs": 1, "min_epochs": 0, "threads": None})
    aug = AugmentConfig()
    from femurseg.core.precision import resolve_precision

    preset_precision = resolve_precision(pcfg.precision, "cpu", warn=False)
    log(f"training[{size}]: input {sample.image.shape}, model {cfg_model}, loss {tcfg.loss}, lr {tcfg.lr}, "
        f"{steps} step(s) per round")
    epoch = [sample] * steps

    def femurseg_step() -> float:
        return T.fit(model_f, epoch, [], tcfg, aug, None, progress=False).history[-1]["train_loss"]

    def preset_step() -> float:
        return T.fit(model_s, epoch, [], pcfg, aug, None, progress=False).history[-1]["train_loss"]

    loss_fn = get_loss(tcfg.loss)
    model_p.train()
    opt = torch.optim.Adam(model_p.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    x = torch.from_numpy(sample.image)[None, None]
    y = torch.from_numpy(sample.label)[None].long()

    def plain_step() -> float:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model_p(x), y)
            loss.backward()
            opt.step()
        return float(loss.detach())

    engines = {"femurseg": femurseg_step, "femurseg-preset": preset_step, "plain": plain_step}
    if not preset:
        del engines["femurseg-preset"]
    mem: dict[str, tuple[float, float]] = {}
    cpu: dict[str, list[float]] = {}
    times = common.interleaved(engines, repeats, warmup=1, log=log, peak_mb=mem, cpu=cpu)
    times = {k: [t / steps for t in v] for k, v in times.items()}
    cpu = {k: [t / steps for t in v] for k, v in cpu.items()}
    machine = common.machine_info()
    t_plain = common.median(times["plain"])
    rows = []
    for name in engines:
        t = common.median(times[name])
        rows.append({
            "benchmark": f"training_{size}",
            "input": "x".join(map(str, sample.image.shape)),
            "model": f"unet3d F{cfg_model['features']} L{cfg_model['levels']}"
                     + (f" dil {','.join(map(str, cfg_model['dilations']))}" if cfg_model.get("dilations") else ""),
            "engine": name,
            "precision": (preset_precision.name + (" autocast" if preset_precision.name != "fp32" else "")
                          if name == "femurseg-preset" else "fp32"),
            "isa_cap": os.environ.get("ONEDNN_MAX_CPU_ISA", "native"),
            "steps_per_round": steps,
            "seconds_per_step_median": t,
            "seconds_min": min(times[name]),
            "repeats": repeats,
            "peak_mem_mb": round(mem[name][0], 1),
            "baseline_rss_mb": round(mem[name][1], 1),
            "plain_over_engine": t_plain / t,
            "plain_over_engine_per_round": common.ratio_stats(times, "plain", name)[1],
            "cpu_seconds_median": common.median(cpu[name]),
            "cpu_plain_over_engine": common.median(cpu["plain"]) / common.median(cpu[name]),
            **machine,
        })
        log(f"  {name:<9} {t:8.3f} s/step  (plain/this x{t_plain / t:.2f})  peak +{mem[name][0]:.0f} MiB")
    return {"rows": rows, "times": times}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("demo", "paper", "tiny"), default="demo")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args(argv)
    res = run(args.size, args.repeats)
    common.say(f"wrote {common.write_csv(res['rows'], args.out / f'training_{args.size}.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
