"""Training curves of a run (``femurseg plot-training RUN``), like paper 001's Fig. 7.

Left panel: training and validation loss per epoch, one colour per fold (solid training,
dashed validation), the best (early-stopping) epoch of each fold marked with a dot.
Right panel: validation Dice at 0.5 per epoch. Reads ``RUN/fold_<i>/log.csv``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from femurseg.core.errors import FemursegError
from femurseg.evaluation.report.figures import _save, model_colours
from femurseg.inference.run import load_run, read_log


def plot_training(run_path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the loss curves of every fold of ``run_path``; returns the PNG's path
    (default ``RUN/training.png``)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run = load_run(run_path)
    logs = {}
    for k in range(run.k):
        p = run.fold_dir(k) / "log.csv"
        if p.exists():
            rows = read_log(p)
            if rows:
                logs[k] = rows
    if not logs:
        raise FemursegError(f"{run.path}: no training log yet (fold_*/log.csv)")
    out = Path(out) if out is not None else run.path / "training.png"
    colours = model_colours(max(logs) + 1)
    has_val = any(np.isfinite([r["val_loss"] for r in rows]).any() for rows in logs.values())
    fig, axes = plt.subplots(1, 2 if has_val else 1, figsize=(10 if has_val else 5.5, 3.8), squeeze=False)
    ax = axes[0, 0]
    for k, rows in logs.items():
        ep = np.array([r["epoch"] for r in rows])
        tr = np.array([r["train_loss"] for r in rows])
        va = np.array([r["val_loss"] for r in rows])
        best = int(rows[-1]["best_epoch"])
        c = colours[k]
        label = f"fold {k}" if run.k > 1 else "model"
        ax.plot(ep, tr, "-", color=c, lw=1.3, label=f"{label} train")
        if np.isfinite(va).any():
            ax.plot(ep, va, "--", color=c, lw=1.3, label=f"{label} validation")
            sel = ep == best
            ax.plot(ep[sel], va[sel], "o", color=c, ms=5)
        if has_val:
            d = np.array([r["val_dice"] for r in rows])
            axes[0, 1].plot(ep, d, "-", color=c, lw=1.3, label=label)
            axes[0, 1].plot(ep[ep == best], d[ep == best], "o", color=c, ms=5)
    loss = run.train_config.get("loss", "wce")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"loss ({loss})")
    ax.set_title("training and validation loss (dot: best epoch)")
    ax.legend(ncol=2 if len(logs) > 2 else 1, frameon=False)
    if has_val:
        a2 = axes[0, 1]
        a2.set_xlabel("epoch")
        a2.set_ylabel("validation Dice (p >= 0.5)")
        a2.set_title("validation Dice")
        a2.legend(frameon=False)
    for a in axes.ravel():
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    name = run.model_config.get("name", "")
    fig.suptitle(f"{run.path.name}: {name}, {run.kind}", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)
