"""ONNX export and the ONNX Runtime engine: agreement with PyTorch, dynamic sizes, run-level export, predict --engine onnx."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import TINY_2D_UNPADDED, TINY_3D, make_run
from helpers import ball

from femurseg.core import io
from femurseg.core.errors import FemursegError
from femurseg.inference import predict as P
from femurseg.inference.onnx import (
    OnnxModel,
    default_onnx_path,
    export_onnx,
    export_run,
)
from femurseg.models import build_model


@pytest.mark.parametrize("cfg", [TINY_3D, TINY_2D_UNPADDED, {"name": "unet2d", "features": 4, "levels": 2},
                                 {"name": "vnet", "features": 4, "levels": 2}, {"name": "patchcnn", "features": 4}],
                         ids=lambda c: c["name"])
def test_onnx_matches_pytorch_on_sizes_other_than_the_export_size(cfg, tmp_path):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    path = export_onnx(model, tmp_path / "m.onnx")
    engine = OnnxModel(path)
    assert engine.config == model.config and engine.spatial_dims == model.spatial_dims
    assert not list(engine.parameters())
    if cfg["name"] == "patchcnn":
        sizes = [(32, 32)]
    elif cfg["name"] == "unet2d-unpadded":
        sizes = [(model.valid_input_size(30), model.valid_input_size(50))]
    elif model.spatial_dims == 2:
        sizes = [(20, 30), (13, 17)]
    else:
        sizes = [(6, 20, 22), (9, 13, 17)]  # not multiples of the size divisor: the engine pads like the model
    for size in sizes:
        x = torch.randn(3, model.in_channels, *size)
        with torch.no_grad():
            a, b = model(x), engine(x)
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= 1e-4
        assert float((torch.softmax(a, 1) - torch.softmax(b, 1)).abs().max()) <= 1e-4
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert "femurseg_config" in meta


def test_onnx_engine_errors(tmp_path):
    with pytest.raises(FemursegError, match="not found"):
        OnnxModel(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(FemursegError, match="cannot load"):
        OnnxModel(tmp_path / "junk.onnx")
    with pytest.raises(FemursegError, match=".onnx"):
        export_onnx(build_model(TINY_3D), tmp_path / "m.pt")


def test_export_run_paths(tmp_path):
    run = make_run(tmp_path / "run", TINY_3D, k=2)
    assert export_run(run) == [default_onnx_path(run, 0), default_onnx_path(run, 1)]
    assert default_onnx_path(run, 1) == run / "fold_1" / "model.onnx"
    assert export_run(run, tmp_path / "one.onnx", "1") == [tmp_path / "one.onnx"]
    with pytest.raises(FemursegError, match="--fold"):
        export_run(run, tmp_path / "two.onnx")
    with pytest.raises(FemursegError, match="does not exist"):
        export_run(run, tmp_path / "nope" / "x.onnx", 0)
    with pytest.raises(FemursegError, match="no fold 7"):
        export_run(run, None, 7)


def test_predict_with_onnx_engine_agrees_with_pytorch(tmp_path, monkeypatch):
    monkeypatch.setenv("FEMURSEG_ACCEL", "fused")  # float32 PyTorch (auto may be bfloat16-mixed)
    run = make_run(tmp_path / "run", TINY_3D, k=2, thresholds={"pr": 0.5})
    spacing = (1.5, 0.5, 0.5)
    rng = np.random.default_rng(0)
    vol = io.make_volume((ball((7, 18, 22), radius=3.0, spacing=spacing) * 300 + rng.normal(100, 20, (7, 18, 22)))
                         .astype(np.float32), spacing)
    notes: list[str] = []
    onnx_pred = P.load_predictor(run, engine="onnx", device="cpu", notify=notes.append)
    assert all(default_onnx_path(run, k).is_file() for k in (0, 1))  # created on first use
    assert sum("exporting" in n for n in notes) == 2
    p_torch = P.predict_probability(P.load_predictor(run, device="cpu"), vol)
    p_onnx = P.predict_probability(onnx_pred, vol)
    assert np.abs(p_torch - p_onnx).max() <= 1e-4
    # a given file, one fold
    path = export_run(run, tmp_path / "f0.onnx", 0)[0]
    p0 = P.predict_probability(P.load_predictor(run, folds="0", engine="onnx", onnx_path=path), vol)
    t0 = P.predict_probability(P.load_predictor(run, folds="0"), vol)
    assert np.abs(p0 - t0).max() <= 1e-4
    with pytest.raises(FemursegError, match="single fold"):
        P.load_predictor(run, engine="onnx", onnx_path=path)


def test_cli_export_and_predict_onnx(tmp_path):
    run = make_run(tmp_path / "run", TINY_2D_UNPADDED, k=1)
    r = subprocess.run([sys.executable, "-m", "femurseg.cli", "export", str(run)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"wrote {run / 'fold_0' / 'model.onnx'}" in r.stdout
    spacing = (1.5, 0.5, 0.5)
    io.write_volume(tmp_path / "s.nii.gz", io.make_volume(np.random.default_rng(0).normal(size=(4, 16, 18))
                                                          .astype(np.float32), spacing))
    code = P.predict_command(run, [tmp_path / "s.nii.gz"], tmp_path / "m.nii.gz", engine="onnx", threshold="0.5",
                             tiles=9, echo=lambda m: None, notify=lambda m: None)
    assert code == 0 and (tmp_path / "m.nii.gz").exists()
