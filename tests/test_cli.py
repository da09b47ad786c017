"""The femurseg command: help for every command, one-line errors, exit codes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from helpers import ball

from femurseg.cli import app
from femurseg.core import io
from femurseg.core.errors import FemursegError
from femurseg.data.dataset import MR_LABELS, write_dataset


def femurseg(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "femurseg.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def _command_names() -> list[str]:
    import typer.main

    return sorted(typer.main.get_command(app).commands)


def test_help_lists_every_command():
    r = femurseg("--help")
    assert r.returncode == 0
    names = _command_names()
    assert {"synth", "check"} <= set(names)
    for name in names:
        assert name in r.stdout


@pytest.mark.parametrize("name", _command_names())
def test_each_command_has_help(name):
    r = femurseg(name, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout


def _assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stderr.startswith("femurseg: error: ")
    for n in needles:
        assert n in r.stderr


def test_check_exit_codes(tmp_path):
    _assert_one_line_error(femurseg("check", tmp_path / "missing"), "missing", "no such")
    shape, spacing = (6, 12, 12), (1.5, 0.5, 0.5)
    img = io.make_volume(np.random.default_rng(0).normal(size=shape).astype(np.float32), spacing)
    lab = img.with_data(ball(shape, radius=2.0, spacing=spacing).astype(np.uint8))
    write_dataset(tmp_path / "ds", [("a", img, lab)], MR_LABELS)
    r = femurseg("check", tmp_path / "ds")
    assert r.returncode == 0 and "ok: 1 case" in r.stdout
    io.write_like(tmp_path / "ds" / "labelsTr" / "a.nii.gz", lab.data * 2, img)
    r = femurseg("check", tmp_path / "ds")
    assert r.returncode == 1 and "a: " in r.stdout and "label values [2]" in r.stdout and "Traceback" not in r.stderr


def test_usage_errors_are_not_tracebacks():
    for args in (["nosuchcmd"], ["check"]):
        r = femurseg(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "Usage" in r.stderr


def test_synth_world_and_shift_options(tmp_path):
    import json

    out = tmp_path / "ph"
    r = femurseg("synth", out, "--n", "2", "--size", "40,40,12", "--variation", "narrow", "--shift", "head,noise_bias")
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert {m["variation"] for m in meta.values()} == {"narrow+head+noise_bias"}
    assert all(26.0 <= m["head_radius_mm"] <= 29.0 for m in meta.values())
    r = femurseg("synth", tmp_path / "bad", "--n", "1", "--size", "40,40,12", "--shift", "colour")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "colour" in r.stderr


def test_synth_bilateral(tmp_path):
    import json

    out = tmp_path / "both"
    r = femurseg("synth", out, "--n", "1", "--size", "80,32,12", "--bilateral", "--artefact-fraction", "0")
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "meta.json").read_text())
    (m,) = meta.values()
    assert m["side"] == "bilateral" and len(m["femurs"]) == 2 and m["shape"] == [12, 32, 80]


def test_training_options_take_an_augmentation_preset():
    from femurseg.cli import _training_options
    from femurseg.data.augment import AugmentConfig

    opts = _training_options(augment="flip")
    assert opts["aug_cfg"] == AugmentConfig().to_dict()
    assert "aug_cfg" not in _training_options()
    # a preset with field changes: numbers, LO:HI ranges, the fill word
    aug = _training_options(augment="light, fg_contrast_p=0.5, fg_contrast=0.05:1, fill=air")["aug_cfg"]
    light = AugmentConfig.preset("light").to_dict()
    assert aug == {**light, "fg_contrast_p": 0.5, "fg_contrast": [0.05, 1.0], "fill": "air"}
    for bad in ("light,foo=1", "light,fg_contrast_p", "light,fg_contrast_p=x", "light,fg_contrast=0.5",
                "light,fg_contrast_p=2", "nope"):
        with pytest.raises(FemursegError):
            _training_options(augment=bad)


def test_training_options_take_deep_supervision_and_a_schedule():
    from femurseg.cli import _training_options

    opts = _training_options(deep_supervision=True, lr_schedule="poly")
    assert opts["model_cfg"]["deep_supervision"] is True
    assert opts["train_cfg"]["lr_schedule"] == "poly"
    plain = _training_options()
    assert "deep_supervision" not in (plain.get("model_cfg") or {}) and "lr_schedule" not in (plain.get("train_cfg") or {})
    sgd = _training_options(optimizer="sgd", weight_decay=3e-5)["train_cfg"]
    assert sgd["optimizer"] == "sgd" and sgd["weight_decay"] == 3e-5


@pytest.mark.parametrize("command, target", [("cv", "femurseg.training.cv.run_cv"),
                                             ("train", "femurseg.training.cv.run_train")])
def test_cv_and_train_hand_every_shared_option_to_the_run(command, target, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    seen = {}
    monkeypatch.setattr(target, lambda *a, **kw: seen.update(kw) or type("R", (), {"summary": {}})())
    args = [command, str(tmp_path), "--out", str(tmp_path / "run"), "--model", "vnet", "--features", "24",
            "--levels", "3", "--dilations", "1,2", "--norm", "instance", "--dropout", "0.25", "--deep-supervision",
            "--loss", "dice-ce", "--lr", "0.002", "--lr-schedule", "poly", "--optimizer", "sgd",
            "--weight-decay", "3e-05", "--batch-size", "3", "--max-epochs", "7", "--min-epochs", "5",
            "--patience", "4", "--patch-size", "16,32,32", "--crop-slices", "40", "--target-size", "96,96",
            "--normalise", "percentile", "--threads", "2", "--precision", "fp32", "--augment", "nnunet"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert seen["model_cfg"] == {"name": "vnet", "features": 24, "levels": 3, "norm": "instance", "dropout": 0.25,
                                 "deep_supervision": True, "dilations": [1, 2]}
    assert seen["prep_cfg"] == {"crop_slices": 40, "target_size": [96, 96], "scale": None, "normalise": "percentile"}
    assert seen["train_cfg"] == {"loss": "dice-ce", "optimizer": "sgd", "lr": 0.002, "lr_schedule": "poly",
                                 "weight_decay": 3e-05, "batch_size": 3, "max_epochs": 7, "min_epochs": 5,
                                 "patience": 4, "threads": 2, "precision": "fp32", "patch_size": [16, 32, 32]}
    assert seen["aug_cfg"]["elastic_mm"] > 0


def test_every_command_that_writes_takes_out_and_o():
    """One spelling across commands: ``--out`` and ``-o`` wherever an output path is an option."""
    import typer.main

    group = typer.main.get_command(app)
    missing = []
    for name, cmd in group.commands.items():
        for p in cmd.params:
            if p.name in ("out", "output") and p.param_type_name == "option" and not {"--out", "-o"} <= set(p.opts):
                missing.append(f"{name}: {p.opts}")
    assert not missing, missing
    assert {"--out", "-o", "--output"} <= set(next(p for p in group.commands["predict"].params if p.name == "output").opts)
