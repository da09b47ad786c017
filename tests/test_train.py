"""Losses (paper 002 Eq. 1), early stopping, the training loop, and resume after kill -9."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from femurseg.core.errors import FemursegError
from femurseg.inference.run import read_log
from femurseg.training.fit import (
    EarlyStopping,
    Sample,
    TrainConfig,
    derive_seed,
    fit,
    seed_everything,
)
from femurseg.training.losses import (
    class_fractions,
    get_loss,
    soft_dice_loss,
    weighted_cross_entropy,
)

# ----------------------------------------------------------------------------- losses


def _toy():
    """2 x 3 voxels, femur probabilities p and labels y; N = 6, Np = 2, Nb = 4."""
    p = np.array([[0.9, 0.2, 0.6], [0.3, 0.1, 0.7]])
    y = np.array([[1, 0, 0], [0, 0, 1]])
    logits = torch.tensor(np.stack([np.zeros_like(p), np.log(p / (1 - p))], axis=0)[None], dtype=torch.float32)
    return p, y, logits.reshape(1, 2, 2, 3), torch.tensor(y)[None]


def test_weighted_ce_matches_hand_computation():
    p, y, logits, target = _toy()
    n, n_p, n_b = 6, 2, 4
    # Eq. 1 as intended: femur errors weighted by Nb/N, background errors by Np/N.
    hand = -(1 / n) * sum(
        (n_b / n) * yi * math.log(pi) + (n_p / n) * (1 - yi) * math.log(1 - pi) for pi, yi in zip(p.ravel(), y.ravel())
    )
    # the same number written out voxel by voxel
    by_voxel = -(1 / 6) * ((4 / 6) * (math.log(0.9) + math.log(0.7))
                           + (2 / 6) * (math.log(0.8) + math.log(0.4) + math.log(0.7) + math.log(0.9)))
    assert hand == pytest.approx(by_voxel)
    assert float(weighted_cross_entropy(logits, target)) == pytest.approx(hand, rel=1e-5)
    assert float(get_loss("wce")(logits, target)) == pytest.approx(hand, rel=1e-5)
    # Eq. 1 literally: femur term weighted by its own frequency Np/N.
    literal = -(1 / n) * sum(
        (n_p / n) * yi * math.log(pi) + (n_b / n) * (1 - yi) * math.log(1 - pi) for pi, yi in zip(p.ravel(), y.ravel())
    )
    assert float(weighted_cross_entropy(logits, target, literal=True)) == pytest.approx(literal, rel=1e-5)
    assert float(get_loss("wce-literal")(logits, target)) == pytest.approx(literal, rel=1e-5)
    # unweighted CE for reference, and the intended weighting puts more weight on the rare femur class
    ce = -np.mean(np.where(y == 1, np.log(p), np.log(1 - p)))
    assert float(get_loss("ce")(logits, target)) == pytest.approx(ce, rel=1e-5)


def test_weighted_ce_with_given_fractions_and_multiclass():
    p, y, logits, target = _toy()
    frac = torch.tensor([[0.9, 0.1]])  # the whole volume's fractions, e.g. for a 2D slice
    hand = -np.mean(np.where(y == 1, 0.9 * np.log(p), 0.1 * np.log(1 - p)))
    assert float(weighted_cross_entropy(logits, target, fractions=frac)) == pytest.approx(hand, rel=1e-5)
    # 3 classes: weight 1 - N_c / N
    lg = torch.randn(1, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    t = torch.randint(0, 3, (1, 4, 5), generator=torch.Generator().manual_seed(1))
    f = class_fractions(t, 3)
    logp = torch.log_softmax(lg, 1)
    hand3 = -np.mean([(1 - float(f[c])) * float(logp[0, c, i, j]) for i in range(4) for j in range(5)
                      for c in [int(t[0, i, j])]])
    assert float(weighted_cross_entropy(lg, t)) == pytest.approx(hand3, rel=1e-5)


def test_soft_dice_and_loss_names():
    p, y, logits, target = _toy()
    dice = (2 * (p * y).sum() + 1e-5) / (p.sum() + y.sum() + 1e-5)
    assert float(soft_dice_loss(logits, target)) == pytest.approx(1 - dice, rel=1e-5)
    combo = float(get_loss("dice-wce")(logits, target))
    assert combo == pytest.approx(1 - dice + float(weighted_cross_entropy(logits, target)), rel=1e-5)
    ce = float(torch.nn.functional.cross_entropy(logits, target.long()))
    assert float(get_loss("dice-ce")(logits, target)) == pytest.approx(1 - dice + ce, rel=1e-5)
    perfect = torch.tensor([[[-20.0, 20.0]], [[20.0, -20.0]]]).permute(2, 0, 1)[None]  # (1, 2, 2, 1)
    assert float(soft_dice_loss(perfect, torch.tensor([[[1], [0]]]))) < 1e-4
    with pytest.raises(FemursegError, match="--loss"):
        get_loss("focal")


def test_deep_supervision_loss_weights_and_targets():
    from femurseg.training.losses import deep_supervision_loss

    torch.manual_seed(0)
    target = (torch.rand(1, 8, 8, 8) > 0.6).long()
    full, half = torch.randn(1, 2, 8, 8, 8), torch.randn(1, 2, 4, 4, 4)
    fn = get_loss("dice-ce")
    coarse = torch.nn.functional.interpolate(target[:, None].float(), size=(4, 4, 4), mode="nearest")[:, 0].long()
    want = (1.0 * float(fn(full, target)) + 0.5 * float(fn(half, coarse))) / 1.5
    assert float(deep_supervision_loss(fn, (full, half), target)) == pytest.approx(want, rel=1e-5)
    assert float(deep_supervision_loss(fn, (full,), target)) == pytest.approx(float(fn(full, target)), rel=1e-6)


def test_fit_with_deep_supervision_trains_and_predicts_plain_maps(tmp_path):
    from femurseg.models import build_model
    from femurseg.training.fit import Sample, TrainConfig, fit

    rng = np.random.default_rng(0)
    lab = np.zeros((8, 16, 16), np.uint8)
    lab[2:6, 4:12, 4:12] = 1
    samples = [Sample(f"c{i}", (lab + 0.3 * rng.standard_normal(lab.shape)).astype(np.float32), lab) for i in range(2)]
    model = build_model({"name": "unet3d", "features": 4, "levels": 2, "norm": "instance", "deep_supervision": True})
    res = fit(model, samples, samples[:1], TrainConfig(max_epochs=3, min_epochs=3, lr=5e-3, precision="fp32"),
              out_dir=tmp_path, progress=False)
    losses = [h["train_loss"] for h in res.history]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert isinstance(model.eval()(torch.zeros(1, 1, 8, 16, 16)), torch.Tensor)


def _fitted_boundary_probability(loss: str) -> float:
    """Fit one free logit pair to 10 'boundary' voxels of which 2 are bone (a partial-volume
    voxel, posterior 0.2), beside 180 clear background and 10 clear bone voxels (bone fraction
    12 / 200); returns the fitted bone probability of the boundary voxel."""
    fixed = torch.zeros(2, 190)  # clear voxels: confidently right (not trained)
    fixed[0, :180], fixed[1, 180:] = 8.0, 8.0
    target = torch.cat([torch.zeros(180), torch.ones(10), torch.ones(2), torch.zeros(8)]).long()
    free = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([free], lr=0.05)
    fn = get_loss(loss)
    for _ in range(1500):
        logits = torch.cat([fixed, free[:, None].expand(2, 10)], dim=1)[None]  # (1, 2, 200)
        opt.zero_grad()
        fn(logits, target[None]).backward()
        opt.step()
    return float(torch.softmax(free.detach(), 0)[1])


def test_weighted_ce_shifts_the_boundary_and_plain_ce_does_not():
    # the losses module's claim: the minimiser of the inverse-frequency weighted CE has odds
    # (w1 / w0) x the posterior's, so a 20 %-bone voxel is called bone; plain CE keeps 0.2
    assert _fitted_boundary_probability("ce") == pytest.approx(0.2, abs=0.01)
    f = 12 / 200
    odds = (1 - f) / f * 0.2 / 0.8
    assert _fitted_boundary_probability("wce") == pytest.approx(odds / (1 + odds), abs=0.01)


# ----------------------------------------------------------------------------- early stopping


def _stop_epoch(values, **kw) -> tuple[int, int]:
    es = EarlyStopping(**kw)
    for epoch, v in enumerate(values, start=1):
        es.update(epoch, v)
        if es.should_stop(epoch):
            return epoch, es.best_epoch
    return len(values), es.best_epoch


def test_early_stopping_paper_rule():
    # improves until epoch 35, then flat: stops 10 epochs later, at 45
    seq = [0.5 + 0.01 * e for e in range(1, 36)] + [0.85] * 30
    assert _stop_epoch(seq) == (45, 35)
    # best at epoch 5, then worse: never stops before epoch 30 (the first 30 run without it)
    seq = [0.1, 0.2, 0.3, 0.4, 0.9] + [0.5] * 60
    assert _stop_epoch(seq) == (30, 5)
    # improvements smaller than 1e-4 do not count
    seq = [0.9] + [0.90009] * 59
    assert _stop_epoch(seq, min_epochs=0, patience=10) == (11, 1)
    # ... but a slow drift that adds up to more than 1e-4 against the best does
    seq = [0.9 + 0.00004 * e for e in range(60)]
    assert _stop_epoch(seq, min_epochs=0, patience=10)[0] == 60
    # an improvement of more than 1e-4 on epoch 8 resets the patience
    seq = [0.9] * 7 + [0.9002] + [0.9] * 40
    assert _stop_epoch(seq, min_epochs=0, patience=10) == (18, 8)
    # loss mode, NaN never counts as an improvement
    seq = [1.0, 0.5, float("nan"), 0.6, 0.55]
    assert _stop_epoch(seq, min_epochs=0, patience=3, mode="min") == (5, 2)
    es = EarlyStopping(min_epochs=0, patience=2)
    es.update(1, 0.3)
    state = es.state_dict()
    es2 = EarlyStopping(min_epochs=0, patience=2)
    es2.load_state_dict(state)
    assert es2.best == 0.3 and es2.best_epoch == 1


def test_train_config_validation():
    assert TrainConfig.preset("paper").lr == 5e-5
    assert TrainConfig.preset("paper").min_epochs == 30
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()
    for bad in ({"loss": "l2"}, {"lr": -1.0}, {"batch_size": 0}, {"monitor": "acc"}, {"patch_size": [4, 4]}):
        with pytest.raises(FemursegError):
            TrainConfig(**bad)
    with pytest.raises(FemursegError, match="unknown option"):
        TrainConfig.from_dict({"learning_rate": 1.0})


# ----------------------------------------------------------------------------- the loop


def _blob_samples(n: int, shape=(8, 16, 16), seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    for i in range(n):
        c = rng.uniform([3, 5, 5], [5, 11, 11])
        lab = ((((z - c[0]) / 3) ** 2 + ((y - c[1]) / 4) ** 2 + ((x - c[2]) / 4) ** 2) < 1).astype(np.uint8)
        img = (lab * 2.0 + rng.normal(0, 0.5, shape)).astype(np.float32)
        out.append(Sample(f"c{i}", img, lab))
    return out


@pytest.mark.parametrize("name", ["unet3d", "unet2d", "unet2d-unpadded"])
def test_fit_learns_and_keeps_best(tmp_path, name):
    from femurseg.models import build_model

    samples = _blob_samples(4)
    seed_everything(derive_seed(0, 0, 0))
    model = build_model({"name": name, "features": 4, "levels": 2})
    cfg = TrainConfig(lr=1e-2, max_epochs=3, min_epochs=0, patience=5, threads=1, slices_per_volume=4)
    res = fit(model, samples[:3], samples[3:], cfg, out_dir=tmp_path, progress=False)
    log = read_log(tmp_path / "log.csv")
    assert [int(r["epoch"]) for r in log] == [1, 2, 3]
    assert res.best_epoch == int(np.nanargmax([r["val_dice"] for r in log])) + 1
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == res.best_epoch
    for k, v in model.state_dict().items():  # the model holds the best weights on return
        torch.testing.assert_close(v, best["model"][k])
    assert json.loads((tmp_path / "state.json").read_text())["finished"] is True
    assert all(np.isfinite(r["train_loss"]) for r in log)


def test_fit_without_validation_monitors_training_loss():
    from femurseg.models import build_model

    model = build_model({"name": "unet3d", "features": 4, "levels": 1})
    threads = torch.get_num_threads()
    res = fit(model, _blob_samples(2), [], TrainConfig(max_epochs=2, min_epochs=0, threads=1), progress=False)
    assert res.epochs == 2 and math.isnan(res.history[0]["val_dice"])
    assert torch.get_num_threads() == threads  # restored


# ----------------------------------------------------------------------------- kill -9 and resume

_CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_train import _blob_samples
    import femurseg.training.fit as T
    from femurseg.models import build_model
    out, slow = sys.argv[1], sys.argv[2] == "slow"
    if slow:  # make epochs from the third on slow so the kill lands mid-epoch
        real = T.augment
        def augment(x, y, cfg, gen, **kw):
            if T_state["epoch"] >= 3:
                time.sleep(0.5)
            return real(x, y, cfg, gen, **kw)
        T_state = {{"epoch": 0}}
        real_items = T._epoch_items
        def items(*a):
            T_state["epoch"] += 1
            return real_items(*a)
        T.augment, T._epoch_items = augment, items
    samples = _blob_samples(5)
    T.seed_everything(T.derive_seed(11, 0, 0))
    model = build_model({{"name": "unet3d", "features": 4, "levels": 2, "dropout": 0.2}})
    cfg = T.TrainConfig(lr=5e-3, max_epochs=5, min_epochs=5, threads=1)
    from femurseg.data.augment import AugmentConfig
    T.fit(model, samples[:4], samples[4:], cfg, AugmentConfig(noise_std=0.1, rotate_deg=5), out, seed=11,
          progress=False)
    """
)


def _child(tmp_path: Path, out: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script), str(out), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _log_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]


def test_resume_after_kill_reproduces_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    ref = _child(tmp_path, full, "fast")
    victim = _child(tmp_path, killed, "slow")
    deadline = time.time() + 120
    while time.time() < deadline:
        state = killed / "state.json"
        if state.exists() and json.loads(state.read_text())["epoch"] >= 2:
            break
        assert victim.poll() is None, victim.stdout.read().decode()
        time.sleep(0.05)
    else:
        pytest.fail("epoch 2 was never checkpointed")
    time.sleep(0.7)  # inside epoch 3 (each of its batches sleeps 0.5 s)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert json.loads((killed / "state.json").read_text())["epoch"] == 2
    assert len(_log_rows(killed / "log.csv")) == 2
    resumed = _child(tmp_path, killed, "fast")
    assert resumed.wait(timeout=180) == 0, resumed.stdout.read().decode()
    assert ref.wait(timeout=180) == 0, ref.stdout.read().decode()
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(killed / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 5
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    best_a = torch.load(full / "best.pt", weights_only=True)
    best_b = torch.load(killed / "best.pt", weights_only=True)
    assert best_a["epoch"] == best_b["epoch"]
    for k in best_a["model"]:
        assert torch.equal(best_a["model"][k], best_b["model"][k]), k
    assert _log_rows(full / "log.csv") == _log_rows(killed / "log.csv")


def test_bf16_guard_for_depth_two_conv3d():
    """torch's CPU bf16 Conv3d weight gradient is wrong at input depth 2: fit() falls back to float32."""
    from femurseg.models import build_model
    from femurseg.training.fit import bf16_conv3d_hazard

    model = build_model({"name": "unet3d", "features": 4, "levels": 2})
    assert bf16_conv3d_hazard(model, _blob_samples(1, shape=(8, 16, 16)), TrainConfig())  # 8 -> 4 -> 2
    assert not bf16_conv3d_hazard(model, _blob_samples(1, shape=(12, 16, 16)), TrainConfig())  # 12 -> 6 -> 3
    assert bf16_conv3d_hazard(model, _blob_samples(1, shape=(12, 16, 16)), TrainConfig(patch_size=[8, 8, 8]))
    assert not bf16_conv3d_hazard(build_model({"name": "unet2d", "features": 4, "levels": 2}),
                                  _blob_samples(1, shape=(8, 16, 16)), TrainConfig())
    with pytest.warns(UserWarning, match="bfloat16 autocast disabled"):  # forced bf16; also on AVX2-only CPUs
        res = fit(model, _blob_samples(2), [], TrainConfig(max_epochs=1, min_epochs=0, threads=1, precision="bf16"),
                  progress=False)
    assert np.isfinite(res.history[0]["train_loss"])
    assert res.precision["used"] == "fp32" and "depth 2" in res.precision["reason"]


def test_learning_rate_schedules():
    from femurseg.training.fit import TrainConfig, lr_at

    const = TrainConfig(lr=1e-3, lr_schedule="constant", max_epochs=10)
    assert [lr_at(const, e) for e in (1, 5, 10)] == [1e-3] * 3
    cos = TrainConfig(lr=1e-3, lr_schedule="cosine", lr_min_factor=0.1, max_epochs=10)
    assert lr_at(cos, 1) == pytest.approx(1e-3)
    assert lr_at(cos, 6) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way: the mean of peak and floor
    poly = TrainConfig(lr=1e-3, lr_schedule="poly", max_epochs=10)
    assert lr_at(poly, 1) == pytest.approx(1e-3)
    assert lr_at(poly, 6) == pytest.approx(1e-3 * 0.5 ** 0.9)
    assert lr_at(poly, 3) > lr_at(poly, 4) > lr_at(poly, 10) > 0
    with pytest.raises(FemursegError, match="--lr-schedule"):
        TrainConfig(lr_schedule="step")


def test_optimizers():
    from femurseg.training.fit import TrainConfig, make_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    adam = make_optimizer(TrainConfig(lr=1e-3), params)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 1e-3
    sgd = make_optimizer(TrainConfig(optimizer="sgd", lr=1e-2, weight_decay=3e-5), params)
    group = sgd.param_groups[0]
    assert isinstance(sgd, torch.optim.SGD) and group["nesterov"] and group["momentum"] == 0.99
    assert group["weight_decay"] == 3e-5
    with pytest.raises(FemursegError, match="--optimizer"):
        TrainConfig(optimizer="lbfgs")
