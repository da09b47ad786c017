"""femurseg.inference.accel: every mode gives the model's logits, falls back instead of failing, caches per weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from femurseg.inference import accel
from femurseg.models import build_model


def _unet3d(**kw):
    torch.manual_seed(0)
    cfg = {"name": "unet3d", "features": 4, "levels": 2, "dilations": [1, 2]}
    cfg.update(kw)
    return build_model(cfg).eval()


@pytest.fixture()
def net_and_input():
    model = _unet3d()
    x = torch.randn(1, 1, 8, 20, 20)  # not a multiple of 2**levels: the model pads internally
    with torch.no_grad():
        ref = model(x)
    return model, x, ref


@pytest.mark.parametrize("mode", ["none", "channels-last", "fused", "onnx"])
def test_float32_modes_match_the_model(net_and_input, mode):
    model, x, ref = net_and_input
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fwd = accel.optimise_for_inference(model, tuple(x.shape), "cpu", mode)
    y = fwd(x)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4), (fwd, (y - ref).abs().max())
    assert fwd.requested == mode and fwd.mode in accel.MODES and fwd.mode != "auto"
    # the caller's model is untouched (values and memory format)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.is_contiguous()


def test_bf16_mode_is_close_and_opt_in(net_and_input):
    model, x, ref = net_and_input
    fwd = accel.optimise_for_inference(model, tuple(x.shape), "cpu", "bf16")
    y = fwd(x)
    assert y.dtype == torch.float32
    assert (y - ref).abs().max() < 0.1
    assert accel.resolve_mode("auto", "cpu") not in ("bf16", "compile-bf16")


def test_auto_is_mixed_with_native_bf16_else_fused(net_and_input):
    model, x, ref = net_and_input
    expected = "mixed" if accel.bf16_supported() else "fused"
    assert accel.resolve_mode("auto", "cpu") == expected
    fwd = accel.optimise_for_inference(model, tuple(x.shape), "cpu", "auto")
    assert fwd.mode == expected and fwd.requested == "auto"
    y = fwd(x)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert (y - ref).abs().max() < 0.05


def test_final_stage_convs_are_the_last_full_resolution_block_and_head():
    for cfg, shape in (({"name": "unet3d", "features": 4, "levels": 2, "dilations": [1, 2]}, (1, 1, 8, 20, 20)),
                       ({"name": "vnet", "features": 4, "levels": 2}, (1, 1, 8, 16, 16)),
                       ({"name": "unet2d", "features": 4, "levels": 2}, (2, 3, 16, 16))):
        model = build_model(cfg).eval()
        names = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, accel._CONVS)}
        keep = [names[i] for i in accel.final_stage_convs(model, shape)]
        assert "head" in keep[0] or keep[0] == list(names.values())[-1], (cfg["name"], keep)
        # the kept convolutions are the tail of the forward order, all at full resolution, and
        # never the up-sampling into that stage (its input is coarser)
        assert 2 <= len(keep) < len(names), (cfg["name"], keep)
        assert not any(isinstance(dict(model.named_modules())[n], (torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d))
                       for n in keep), keep
        # the weights of the model are untouched (the trace runs on a meta copy), and a user's
        # forward hooks on the model do not fire during the trace (deepcopy copies them)
        assert all(p.device.type == "cpu" for p in model.parameters())
        fired = []
        hook = model.register_forward_hook(lambda *a: fired.append(1))
        try:
            accel.final_stage_convs(model, shape)
        finally:
            hook.remove()
        assert fired == []


@pytest.mark.skipif(not accel.bf16_supported(), reason="no native bfloat16 on this CPU")
def test_mixed_keeps_the_final_stage_in_float32_and_is_closer_than_bf16(net_and_input):
    model, x, ref = net_and_input
    mixed = accel.optimise_for_inference(model, tuple(x.shape), "cpu", "mixed")
    bf16 = accel.optimise_for_inference(model, tuple(x.shape), "cpu", "bf16")
    assert mixed.mode == "mixed", mixed.reason
    convs = [m for m in mixed._fn.__defaults__[0].modules() if isinstance(m, accel.FusedConv)]
    dtypes = [c.dtype for c in convs]
    assert torch.float32 in dtypes and torch.bfloat16 in dtypes
    keep = set(accel.final_stage_convs(model, tuple(x.shape)))
    assert all((c.dtype == torch.float32) == (id(c.weight) in keep) for c in convs)
    y_mixed, y_bf16 = mixed(x), bf16(x)
    assert y_mixed.dtype == torch.float32
    assert (y_mixed - ref).abs().max() < 0.05
    assert (y_mixed - ref).abs().mean() <= (y_bf16 - ref).abs().mean()


def test_fused_handles_2d_nets_and_norm_layers():
    torch.manual_seed(0)
    for cfg, shape in (({"name": "unet2d", "features": 4, "levels": 2}, (2, 3, 16, 16)),
                       ({"name": "vnet", "features": 4, "levels": 2}, (1, 1, 8, 16, 16)),
                       ({"name": "unet3d", "features": 4, "levels": 2, "norm": "instance"}, (1, 1, 8, 16, 16))):
        model = build_model(cfg).eval()
        x = torch.randn(shape)
        with torch.no_grad():
            ref = model(x)
        y = accel.optimise_for_inference(model, shape, "cpu", "fused")(x)
        assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4), cfg


def test_fused_repacks_for_another_shape(net_and_input):
    model, x, _ = net_and_input
    fwd = accel.optimise_for_inference(model, tuple(x.shape), "cpu", "fused")
    x2 = torch.randn(1, 1, 4, 12, 16)
    with torch.no_grad():
        ref2 = model(x2)
    assert torch.allclose(fwd(x2), ref2, atol=1e-4, rtol=1e-4)


def test_unavailable_mode_falls_back(monkeypatch, net_and_input):
    model, x, ref = net_and_input
    monkeypatch.setattr(accel, "compiler_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="compiler"):
        fwd = accel.optimise_for_inference(model, tuple(x.shape), "cpu", "compile", warn=True)
    assert fwd.mode == accel.FALLBACK["compile"]
    assert "compiler" in fwd.reason
    assert torch.allclose(fwd(x), ref, atol=1e-4)


def test_failure_on_first_call_falls_back(monkeypatch, net_and_input):
    model, x, ref = net_and_input
    real_build = accel._build

    def broken(mode, *args):
        acc = real_build(mode, *args)
        if mode == "fused":
            def boom(_x):
                raise RuntimeError("oneDNN exploded")
            acc._fn = boom
        return acc

    monkeypatch.setattr(accel, "_build", broken)
    fwd = accel.optimise_for_inference(model, tuple(x.shape), "cpu", "fused", warmup=False)
    y = fwd(x)  # fails inside, falls back to channels-last, and answers
    assert fwd.mode == "channels-last" and "exploded" in fwd.reason
    assert torch.allclose(y, ref, atol=1e-4)


def test_real_errors_are_not_swallowed(net_and_input):
    model, _, _ = net_and_input
    fwd = accel.optimise_for_inference(model, (1, 1, 8, 16, 16), "cpu", "fused", warmup=False)
    with pytest.raises(ValueError):
        fwd(torch.zeros(1, 2, 8, 16, 16))  # wrong channel count: the model's own error


def test_cache_follows_the_weights(net_and_input):
    model, x, _ = net_and_input
    accel.clear_cache()
    a = accel.accelerated(model, x.shape, "cpu", "fused")
    assert accel.accelerated(model, x.shape, "cpu", "fused") is a
    a(x)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # an optimiser step / load_state_dict modifies the weights in place
        ref = model(x)
    b = accel.accelerated(model, x.shape, "cpu", "fused")
    assert b is not a
    assert torch.allclose(b(x), ref, atol=1e-4)
    # bounded: older shapes are dropped
    for d in range(4, 4 + accel.MAX_CACHED_SHAPES + 2):
        accel.accelerated(model, (1, 1, d, 8, 8), "cpu", "fused")
    assert len(accel._CACHE[model]) == accel.MAX_CACHED_SHAPES
    # per mode: alternating modes on one shape keeps each prepared callable
    c = accel.accelerated(model, x.shape, "cpu", "channels-last")
    f = accel.accelerated(model, x.shape, "cpu", "fused")
    n = accel.accelerated(model, x.shape, "cpu", "none")
    assert accel.accelerated(model, x.shape, "cpu", "channels-last") is c
    assert accel.accelerated(model, x.shape, "cpu", "fused") is f and n.mode == "none"
    accel.clear_cache()


def test_default_mode_from_environment(monkeypatch):
    monkeypatch.setenv(accel.ENV_MODE, "none")
    assert accel.default_mode() == "none"
    monkeypatch.setenv(accel.ENV_MODE, "no-such-mode")
    assert accel.default_mode() == "auto"
    monkeypatch.delenv(accel.ENV_MODE)
    assert accel.default_mode() == "auto"
    assert accel.resolve_mode("auto", "cpu") == (accel.AUTO_CPU_BF16 if accel.bf16_supported() else accel.AUTO_CPU)
    with pytest.raises(ValueError):
        accel.resolve_mode("turbo", "cpu")


def test_autocast_context():
    with accel.autocast_context("cpu", False):
        assert not torch.is_autocast_enabled("cpu")
    with accel.autocast_context("cpu", True):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_infer_uses_accel_and_agrees_with_plain(monkeypatch):
    from femurseg.inference.tiling import predict_prob

    model = _unet3d()
    image = np.random.default_rng(0).normal(size=(8, 24, 24)).astype(np.float32)
    monkeypatch.setenv(accel.ENV_MODE, "none")
    plain = predict_prob(model, image, device="cpu")
    monkeypatch.setenv(accel.ENV_MODE, "auto")
    accel.clear_cache()
    fast = predict_prob(model, image, device="cpu")
    assert {h.mode for h in accel._CACHE[model].values()} == {accel.resolve_mode("auto", "cpu")}
    np.testing.assert_allclose(fast, plain, atol=1e-5 if accel.resolve_mode("auto", "cpu") == "fused" else 1e-2)
    accel.clear_cache()


def test_onnx_engine_passes_through():
    class ParameterFree(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x, -x], 1)

    m = ParameterFree()
    fwd = accel.accelerated(m, (1, 1, 4, 4, 4), "cpu", "fused")
    assert fwd.mode == "none"
    x = torch.randn(1, 1, 4, 4, 4)
    assert torch.equal(fwd(x), m(x))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["compile", "compile-bf16"])
def test_compiled_modes(net_and_input, mode):
    model, x, ref = net_and_input
    fwd = accel.optimise_for_inference(model, tuple(x.shape), "cpu", mode)
    tol = 1e-4 if mode == "compile" else 0.1
    assert torch.allclose(fwd(x), ref, atol=tol, rtol=tol)


def test_cache_does_not_keep_models_alive():
    import gc
    import weakref

    model = _unet3d()
    ref = weakref.ref(model)
    accel.accelerated(model, (1, 1, 4, 8, 8), "cpu", "fused")(torch.zeros(1, 1, 4, 8, 8))
    accel.accelerated(model, (1, 1, 4, 8, 12), "cpu", "channels-last")
    del model
    gc.collect()
    assert ref() is None
