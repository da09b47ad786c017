"""The arithmetic decision (femurseg.core.precision): auto per machine class, forced values, records."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from femurseg.core import precision as P
from femurseg.core.errors import FemursegError
from femurseg.training.fit import TrainConfig


def test_auto_on_this_cpu_follows_onednn():
    p = P.resolve_precision("auto", "cpu")
    assert p.name == ("bf16" if P.native_bf16_cpu() else "fp32")
    assert p.requested == "auto" and p.device == "cpu" and p.reason.startswith("auto:")
    assert p.to_dict() == {"requested": "auto", "used": p.name, "device": "cpu", "reason": p.reason}


@pytest.mark.parametrize("isa", ["AVX2", "AVX512_CORE", "AVX512_CORE_VNNI"])
def test_auto_is_float32_where_onednn_has_no_native_bf16(isa):
    """Under ONEDNN_MAX_CPU_ISA=AVX2 (what oneDNN does on an AVX2-only CPU) auto trains in float32;
    also with AVX-512 but no BF16, where oneDNN says bf16 is supported but emulates it."""
    code = ("from femurseg.core.precision import resolve_precision as r; import json; "
            "p = r('auto', 'cpu'); print(json.dumps(p.to_dict()))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    d = json.loads(out.stdout.strip().splitlines()[-1])
    assert d["used"] == "fp32", d
    assert "no native bfloat16" in d["reason"] and isa in d["reason"]


def test_isa_cap_parsing(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert P.onednn_isa_cap() == "AVX2" and "AVX2" in P.cpu_isa_note()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    assert P.onednn_isa_cap() is None and P.cpu_isa_note() == ""


def test_forced_values(monkeypatch):
    assert P.resolve_precision("fp32", "cpu").name == "fp32"
    assert P.resolve_precision(None, "cpu").requested == "auto"
    with pytest.raises(FemursegError, match="fp16"):
        P.resolve_precision("fp16", "cpu")
    with pytest.raises(FemursegError, match="not one of"):
        P.resolve_precision("half", "cpu")
    monkeypatch.setattr(P, "native_bf16_cpu", lambda: False)
    with pytest.warns(P.PrecisionWarning, match="slower"):
        p = P.resolve_precision("bf16", "cpu")
    assert p.name == "bf16" and "emulated" in p.reason
    assert P.resolve_precision("auto", "cpu").name == "fp32"
    monkeypatch.setattr(P, "native_bf16_cpu", lambda: True)
    assert P.resolve_precision("auto", "cpu").name == "bf16"


def test_cuda_rule_without_a_gpu(monkeypatch):
    """The CUDA branch decides from the device type alone (fp16 AMP for auto)."""
    p = P.resolve_precision("auto", "cuda")
    assert p.name == "fp16" and p.grad_scaling and p.dtype == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(FemursegError, match="bfloat16"):
        P.resolve_precision("bf16", "cuda")


def test_autocast_context_and_fallback():
    p = P.Precision("bf16", "auto", "cpu", "x")
    with p.autocast():
        y = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    assert y.dtype == torch.bfloat16
    f = p.fallback("because")
    assert f.name == "fp32" and f.requested == "auto" and "because" in f.reason
    with f.autocast():
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.float32


def test_train_config_precision_and_legacy_amp():
    assert TrainConfig().precision == "auto"
    assert TrainConfig.preset("paper").precision == "auto"
    assert TrainConfig.from_dict({"amp": False}).precision == "fp32"
    assert TrainConfig.from_dict({"amp": True}).precision == "auto"
    assert TrainConfig.from_dict({"amp": None}).precision == "auto"
    with pytest.raises(FemursegError, match="--precision"):
        TrainConfig(precision="int8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_cuda_uses_fp16_amp_and_records_it():
    import numpy as np

    from femurseg.models import build_model
    from femurseg.training.fit import Sample, fit

    rng = np.random.default_rng(0)
    lab = np.zeros((16, 32, 32), np.uint8)
    lab[4:12, 8:24, 8:24] = 1
    samples = [Sample(f"c{i}", (lab + rng.normal(0, 0.3, lab.shape)).astype(np.float32), lab) for i in range(3)]
    torch.manual_seed(0)
    model = build_model({"name": "unet3d", "features": 4, "levels": 2})
    res = fit(model, samples[:2], samples[2:], TrainConfig(max_epochs=2, min_epochs=0), device="cuda", progress=False)
    assert res.precision["used"] == "fp16" and res.precision["device"] == "cuda"
    assert np.isfinite(res.history[-1]["train_loss"])
