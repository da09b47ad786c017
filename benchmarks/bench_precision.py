"""Which convolutions may run in bfloat16: mask agreement with float32 per precision assignment.

    .venv/bin/python benchmarks/bench_precision.py [--size paper|demo|tiny] [--out benchmarks/results/]

The network and input of :mod:`bench_inference` (paper 001's 3D U-Net F32 L4, dilated centre,
random weights, seed 0; the MR phantom through the predict path's preprocessing). Every
convolution runs as a :class:`femurseg.inference.accel.FusedConv` in float32 or bfloat16 according to an
assignment; the masks are compared with float32's on the network grid (``p >= 0.5``) and after the
whole predict path (restore to the scan grid, threshold 0.5, largest component). Not timed (the
speed of ``mixed`` is in ``inference_*.csv`` and ``levers_*.csv``). Writes ``precision_<size>.csv``;
``FINDINGS.md`` quotes the paper-size table. About 2 minutes at paper size on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def assignments(model: Any, shape: tuple[int, ...]) -> dict[str, Callable[[str], bool]]:
    """``{label: is_bf16(conv_name)}``; the full-resolution sets come from the traced shapes."""

    from femurseg.inference import accel

    convs = {n: m for n, m in model.named_modules() if isinstance(m, accel._CONVS)}
    by_weight = {id(m.weight): n for n, m in convs.items()}
    final = {by_weight[i] for i in accel.final_stage_convs(model, shape)}
    # every convolution whose output has the input's spatial size
    calls, _ = accel.trace_convs(model, shape)
    out_sp = {n: o for n, _, o in calls}
    full = {n for n, sp in out_sp.items() if sp == tuple(shape[2:])}
    names = list(convs)
    ends = {names[0], *(n for n in names if n.endswith("head"))}
    return {
        "all": lambda n: True,
        "all but the first convolution and the head": lambda n: n not in ends,
        "only the full-resolution convolutions": lambda n: n in full,
        "all but the final full-resolution stage (mixed)": lambda n: n not in final,
        "all but every full-resolution convolution": lambda n: n not in full,
        "none (float32)": lambda n: False,
    }


def run(size: str = "paper", log: Callable[[str], None] = common.say) -> dict[str, Any]:
    import bench_inference
    import numpy as np
    import torch

    from femurseg.data.preprocess import preprocess_image, restore
    from femurseg.inference import accel
    from femurseg.inference import predict as P

    torch.set_num_threads(common.default_threads(size))
    vol, prep, cfg = bench_inference.make_case(size)
    model = bench_inference.build(cfg)
    image, info = preprocess_image(vol.data, vol.spacing, prep)
    x = torch.from_numpy(image)[None, None]
    shape = tuple(x.shape)
    flops = _conv_flops(model, x)
    total = sum(flops.values())
    by_weight = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, accel._CONVS)}

    def masks(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        prob = torch.softmax(logits.float(), 1)[0, 1].numpy()
        grid = prob >= 0.5
        full = restore(np.ascontiguousarray(prob, dtype=np.float32), info, order=1)
        whole = P.segment(full, vol.spacing, threshold=0.5, postprocess="lcc", notify=lambda m: None)[0]
        return grid, np.asarray(whole, bool)

    results = {}
    for label, is_bf16 in assignments(model, shape).items():
        net = accel.fuse_conv_relu(model, torch.float32)
        share = 0.0
        for fc in net.modules():
            if isinstance(fc, accel.FusedConv) and is_bf16(by_weight[id(fc.weight)]):
                fc.dtype = torch.bfloat16
                share += flops[by_weight[id(fc.weight)]]
        with torch.inference_mode():
            out = net(x.contiguous(memory_format=torch.channels_last_3d)).float()
        results[label] = (share / total, *masks(out))
        log(f"  {label:<50} bf16 share {100 * share / total:5.1f} %")
    ref_grid, ref_whole = results["none (float32)"][1:]
    machine = common.machine_info()
    rows = [{"benchmark": f"precision_{size}", "bf16_convolutions": label, "bf16_flop_share": share,
             "dice_grid": common.dice(g, ref_grid), "dice_whole_path": common.dice(w, ref_whole),
             "network_tflop": total / 1e12, **machine}
            for label, (share, g, w) in results.items()]
    for r in rows:
        log(f"  {r['bf16_convolutions']:<50} {100 * r['bf16_flop_share']:5.1f} %  grid Dice {r['dice_grid']:.5f}  "
            f"whole path Dice {r['dice_whole_path']:.5f}")
    return {"rows": rows}


def _conv_flops(model: Any, x: Any) -> dict[str, float]:
    """Multiply-adds x 2 of every convolution for input ``x`` (traced on the meta device)."""
    import copy

    import torch

    from femurseg.inference import accel

    meta = copy.deepcopy(model).to("meta")
    flops: dict[str, float] = {}

    def hook(name: str):
        def h(mod: Any, i: Any, o: Any) -> None:
            k = mod.weight.shape[1] * int(torch.tensor(mod.weight.shape[2:]).prod())  # in/groups x kernel
            if isinstance(mod, (torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)):
                flops[name] = 2.0 * i[0].numel() * mod.weight.shape[1] * int(torch.tensor(mod.weight.shape[2:]).prod())
            else:
                flops[name] = 2.0 * o.numel() * k
        return h

    hooks = [m.register_forward_hook(hook(n)) for n, m in meta.named_modules() if isinstance(m, accel._CONVS)]
    with torch.no_grad():
        meta(torch.empty(tuple(x.shape), device="meta"))
    for h in hooks:
        h.remove()
    return flops


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("paper", "demo", "tiny"), default="paper")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args(argv)
    res = run(args.size)
    common.say(f"wrote {common.write_csv(res['rows'], args.out / f'precision_{args.size}.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
