"""Fast inference of femurseg networks on the CPU: the levers that pay, behind one call.

:func:`optimise_for_inference` turns a network into a callable ``fwd(x) -> logits`` that gives the
same logits as ``model(x)`` (float32, same shape, on ``x``'s device) but faster, by one of these
**modes**:

``"none"``
    ``model(x)`` under ``torch.inference_mode`` (float32, eager): the reference.
``"channels-last"``
    float32 eager with the weights and the input in ``torch.channels_last_3d`` (NDHWC) memory
    format, so oneDNN runs its blocked convolution kernels without reordering every tensor.
``"fused"``
    float32 eager, channels-last, with every convolution (and transposed convolution) and the
    ReLU after it replaced by one oneDNN call (``torch.ops.mkldnn._convolution_pointwise``,
    ReLU fused as a post-op) on weights **pre-packed** once into oneDNN's blocked layout for
    the input shape -- what inductor's freezing does, without compiling anything. Same
    numbers as ``"none"`` up to float32 rounding (max |logit difference| ~1e-6); the packing
    happens on the first call (a fraction of a second) and keeps one packed copy of the weights.
``"compile"``
    ``torch.compile`` (inductor, C++ back-end) with **freezing** (weights become constants, so
    oneDNN pre-packs them and fuses bias + ReLU into the convolutions), channels-last, float32.
    Same numbers as ``"none"`` up to float32 rounding (max |logit difference| ~1e-6). Costs a
    one-off compilation per input shape (tens of seconds on 2 cores, see
    ``benchmarks/results/SUMMARY.md``); needs a C++ compiler.
``"mixed"``
    ``"fused"`` with bfloat16 weights and activations (float32 accumulation inside oneDNN) in
    every convolution **except the final full-resolution stage** (:func:`final_stage_convs`:
    for the U-Nets and the V-Net the last decoder block and the 1x1 head), which stays float32.
    Measured on the paper-size 3D U-Net with random weights (``benchmarks/``): 65 % of the
    arithmetic in bfloat16, mask Dice against float32 0.9992 after the predict path (restore,
    threshold, largest component); all-bfloat16 gives 0.9980. The rounding of the last
    full-resolution convolutions puts voxel-sized noise on the logits, which flips voxels whose
    margin is tiny; the rounding of the coarser stages reaches the output smoothed by them
    (measured: bfloat16 only in the full-resolution convolutions flips as many voxels as
    all-bfloat16). **The default on CPUs with native bfloat16** (see ``"auto"``).
``"bf16"`` / ``"compile-bf16"``
    ``"fused"`` with bfloat16 weights and activations everywhere, or ``"compile"`` under
    bfloat16 autocast: fastest on CPUs with AVX512-BF16/AMX, but the logits move by ~1e-2,
    which flips voxels whose foreground/background margin is that small. A trained network has
    few such voxels (demo 3D U-Net trained by ``femurseg cv``: mask Dice against float32 >=
    0.9996 on 6 unseen phantoms); a network with random weights has many (Dice 0.998 after the
    predict path at paper size), so these modes are opt-in only (``FEMURSEG_ACCEL=bf16``).
``"onnx"``
    ONNX Runtime (CPU execution provider, all graph optimisations), via
    :func:`femurseg.inference.onnx.export_onnx` and :class:`femurseg.inference.onnx.OnnxModel`.
``"auto"``
    On a CPU with native bfloat16 (AVX512-BF16 or AMX; :func:`bf16_supported`): ``"mixed"``
    (:data:`AUTO_CPU_BF16`), as nnU-Net predicts under float16 autocast on a GPU; on other CPUs
    the fastest float32-exact mode, ``"fused"`` (:data:`AUTO_CPU`). Measured on the reference
    machine (``benchmarks/run_all.py``); :func:`resolve_mode`. On CUDA: ``"none"`` (the caller's
    float16 autocast applies, as in :mod:`femurseg.inference.tiling`). ``FEMURSEG_ACCEL=fused`` gives
    float32-exact masks on any CPU.

**Fallback.** A mode that cannot run here (no C++ compiler for inductor, no onnxruntime, no
oneDNN or bfloat16 support, an export or compile error, a failure on the first call) falls back
to the next one in :data:`FALLBACK` -- never to an error -- and the returned callable records why
in ``.reason`` (``warn=True`` also issues a :class:`RuntimeWarning`).

**Where it is used.** :func:`femurseg.inference.tiling.predict_classes` runs every float32 forward pass
through :func:`accelerated` with :func:`default_mode` (``$FEMURSEG_ACCEL``, default "auto");
``FEMURSEG_ACCEL=none`` restores plain eager PyTorch, ``FEMURSEG_ACCEL=compile`` or ``bf16`` opt
in to the other levers. Autocast runs (``amp=True``, CUDA) keep infer's own autocast path.

**Caching.** :func:`accelerated` memoises the callable per (model, weights version, input shape,
device, mode), so the inference loop can ask for it on every forward pass: the compile/export
cost is paid once per shape and redone automatically when the weights change (a training loop
validating every epoch never sees stale weights).

All callables take ``(B, C, *S)`` float tensors as the model does and return float32 logits
``(B, num_classes, *S_out)``; they never modify the caller's model (they work on a copy when they
change its memory format or dtype).
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from femurseg.core.precision import native_bf16_cpu

MODES = ("auto", "none", "channels-last", "fused", "mixed", "compile", "bf16", "compile-bf16", "onnx")
"""Accepted ``mode`` values of :func:`optimise_for_inference`."""

AUTO_CPU = "fused"
"""What ``mode="auto"`` means on a CPU without native bfloat16: the fastest float32-exact mode
without a set-up cost, measured on the reference machine (2-core AMD EPYC;
``benchmarks/results/SUMMARY.md``): "fused" is as fast as "compile" without its compilation (tens
of seconds per process and input shape, redone whenever the weights change, e.g. every
validation epoch)."""

AUTO_CPU_BF16 = "mixed"
"""What ``mode="auto"`` means on a CPU with native bfloat16 (:func:`bf16_supported`): the
bfloat16 mode whose masks agree with float32 to Dice >= 0.999 on the paper-size benchmark network
even with random weights ("bf16" everywhere does not: 0.998)."""

FALLBACK = {
    "compile-bf16": "bf16",
    "compile": "fused",
    "onnx": "fused",
    "bf16": "fused",
    "mixed": "fused",
    "fused": "channels-last",
    "channels-last": "none",
}
"""Where a mode falls back to when it cannot run here."""

MAX_CACHED_SHAPES = 2
"""Prepared callables kept per model and mode (least recently used shapes are dropped; each holds
a packed or compiled copy of the weights). Per mode, so that alternating modes (a benchmark, or
float32 next to the default) does not re-prepare on every call."""

ENV_MODE = "FEMURSEG_ACCEL"
"""Environment variable that overrides the default mode of :func:`default_mode` (e.g. ``none``)."""


# ---------------------------------------------------------------------------------------------
# Small helpers


def autocast_context(device: torch.device | str, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on the CPU, float16 on CUDA, or a null context when not ``enabled``."""
    dev = torch.device(device)
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=torch.bfloat16 if dev.type == "cpu" else torch.float16)


def default_mode() -> str:
    """The mode :mod:`femurseg.inference.tiling` uses: ``$FEMURSEG_ACCEL`` if set (one of :data:`MODES`), else "auto"."""
    mode = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    return mode if mode in MODES else "auto"


def bf16_supported() -> bool:
    """Whether this CPU has native bfloat16 dot products (AVX512-BF16 or AMX; the same test as
    training's precision decision, :func:`femurseg.core.precision.native_bf16_cpu`)."""
    return native_bf16_cpu()


def compiler_available() -> bool:
    """Whether inductor's C++ back-end can find a compiler (``$CXX``, g++, c++ or clang++)."""
    if os.environ.get("CXX") and shutil.which(os.environ["CXX"]):
        return True
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def resolve_mode(mode: str, device: torch.device | str) -> str:
    """``mode`` with "auto" replaced by the concrete mode for ``device`` (no availability checks)."""
    if mode not in MODES:
        raise ValueError(f"accel: mode {mode!r} is not one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    if torch.device(device).type != "cpu":
        return "none"
    return AUTO_CPU_BF16 if bf16_supported() else AUTO_CPU


def _weights_version(model: nn.Module) -> tuple:
    """Changes whenever a parameter/buffer is modified in place (optimiser steps, load_state_dict)."""

    def version(t: torch.Tensor) -> int:
        try:
            return int(t._version)
        except RuntimeError:  # inference tensors have no version counter (and cannot be modified)
            return -1

    return tuple((t.data_ptr(), version(t)) for t in (*model.parameters(), *model.buffers()))


# ---------------------------------------------------------------------------------------------
# The callable


class Accelerated:
    """``fwd(x)`` -> float32 logits; made by :func:`optimise_for_inference`.

    Attributes:
        mode: the mode actually used (after "auto" and any fallback).
        requested: the mode asked for.
        reason: why ``mode`` differs from the requested one ("" if it does not).
        setup_s: seconds spent preparing (copy, export; with ``warmup`` also the compilation and
            the first pass).
        model: the original network (unchanged; cached callables hold it weakly).

    A mode that fails on its first real call (e.g. a compiler error inside ``torch.compile``)
    is replaced, for that call and all later ones, by its :data:`FALLBACK`; later failures
    propagate (they are not a missing lever but a real error).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], mode: str, requested: str, model: nn.Module,
                 reason: str = "", setup_s: float = 0.0, memory_format: torch.memory_format | None = None,
                 bf16: bool = False) -> None:
        self._fn = fn
        self.mode = mode
        self.requested = requested
        self.reason = reason
        self.setup_s = setup_s
        self._model: nn.Module | None = model
        self._model_ref = weakref.ref(model)
        self._memory_format = memory_format
        self._bf16 = bf16
        self._checked = mode == "none"
        self._device: torch.device | None = None
        self._warn = False

    @property
    def model(self) -> nn.Module:
        """The original network (held weakly by cached callables, see :func:`accelerated`)."""
        m = self._model if self._model is not None else self._model_ref()
        if m is None:
            raise RuntimeError("accel: the model of this callable no longer exists")
        return m

    def _hold_weakly(self) -> None:
        """Drop the strong reference to the model (cache entries must not keep their key alive)."""
        self._model = None
        if self.mode == "none":
            ref = self._model_ref
            self._fn = lambda x: ref()(x)  # noqa: E731

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            mf = self._memory_format
            if mf is not None and x.dim() == (5 if mf == torch.channels_last_3d else 4):
                x = x.contiguous(memory_format=mf)
            with autocast_context(x.device, self._bf16):
                y = self._fn(x)
            return y.float().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._checked:
            return self._run(x)
        try:
            y = self._run(x)
        except Exception as exc:  # noqa: BLE001 - an optional lever failed: fall back
            if self.mode not in FALLBACK:
                raise
            nxt = _prepare(self.model, FALLBACK[self.mode], self._device or x.device,
                           [*([self.reason] if self.reason else []), f"{self.mode} failed ({_first_line(exc)})"])
            nxt.requested = self.requested
            if self._model is None:
                nxt._hold_weakly()
            if self._warn:
                warnings.warn(f"accel: using mode {nxt.mode!r}: {nxt.reason}", RuntimeWarning, stacklevel=2)
            self.__dict__.update({k: v for k, v in nxt.__dict__.items() if k != "_warn"})
            return self(x)
        self._checked = True
        return y

    def __repr__(self) -> str:
        extra = f", reason={self.reason!r}" if self.reason else ""
        return f"Accelerated(mode={self.mode!r}, requested={self.requested!r}, setup_s={self.setup_s:.1f}{extra})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _prepare(model: nn.Module, mode: str, dev: torch.device, reasons: list[str],
             shape: tuple[int, ...] | None = None) -> Accelerated:
    """Build ``mode`` (or, when it is unavailable here, the first available one of its fallbacks)."""
    while True:
        t0 = time.perf_counter()
        try:
            why = _unavailable(mode, model, dev)
            if why:
                raise _Unavailable(why)
            acc = _build(mode, model, dev, shape)
            acc.setup_s = time.perf_counter() - t0
            acc.reason = "; ".join(reasons)
            acc._device = dev
            return acc
        except Exception as exc:  # noqa: BLE001 - any failure of an optional lever falls back
            if mode not in FALLBACK:
                raise
            reasons = [*reasons, f"{mode} unavailable ({_first_line(exc)})"]
            mode = FALLBACK[mode]


def optimise_for_inference(model: nn.Module, example_shape: Sequence[int], device: torch.device | str = "cpu",
                           mode: str = "auto", *, warmup: bool = True, warn: bool = False) -> Accelerated:
    """Prepare ``model`` for fast inference on inputs of ``example_shape`` ``(B, C, *S)``.

    Args:
        model: a femurseg network (moved to ``device`` and put in eval mode; otherwise unchanged).
        example_shape: the input shape the callable will mostly see; compiled modes specialise
            to it (another shape still works: it triggers one more compilation), fused modes
            pack their weights for it (another shape repacks, in milliseconds).
        device: where to run.
        mode: one of :data:`MODES` (see the module docstring).
        warmup: run one pass on zeros of ``example_shape`` now, so the compilation and any
            fallback happen here and ``setup_s`` is the whole one-off cost. Without it they
            happen on the first call.
        warn: issue a RuntimeWarning when falling back to another mode.

    Returns:
        :class:`Accelerated`; ``fwd(x)`` returns float32 logits like ``model(x)``.
    """
    dev = torch.device(device)
    model = model.to(dev).eval()
    shape = tuple(int(s) for s in example_shape)
    acc = _prepare(model, resolve_mode(mode, dev), dev, [], shape)
    acc.requested = mode
    acc._warn = warn
    if acc.reason and warn:
        warnings.warn(f"accel: using mode {acc.mode!r}: {acc.reason}", RuntimeWarning, stacklevel=2)
    if warmup:
        t0 = time.perf_counter()
        acc(torch.zeros(shape, device=dev))
        acc.setup_s += time.perf_counter() - t0
    return acc


class _Unavailable(RuntimeError):
    pass


def _unavailable(mode: str, model: nn.Module, dev: torch.device) -> str:
    """Why ``mode`` cannot run here ("" if it can)."""
    if mode in ("compile", "compile-bf16") and dev.type == "cpu" and not compiler_available():
        return "no C++ compiler for torch.compile's inductor back-end"
    if mode in ("fused", "mixed", "bf16") and (dev.type != "cpu" or not torch.backends.mkldnn.is_available()):
        return "oneDNN fused convolutions need the CPU with oneDNN (mkldnn)"
    if mode in ("mixed", "bf16", "compile-bf16") and dev.type == "cpu" and not bf16_supported():
        return "this CPU has no native bfloat16 support"
    if mode != "none" and not any(True for _ in model.parameters()):
        return "the model has no PyTorch parameters (e.g. an ONNX Runtime engine already)"
    if mode == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime is not installed"
        if not hasattr(model, "config"):
            return "the model has no femurseg config (needed for the ONNX export)"
    return ""


def _channels_last_copy(model: nn.Module, dev: torch.device) -> nn.Module:
    return copy.deepcopy(model).to(dev).eval().to(memory_format=torch.channels_last_3d)


def _build(mode: str, model: nn.Module, dev: torch.device, shape: tuple[int, ...] | None) -> Accelerated:
    three_d = int(getattr(model, "spatial_dims", 3 if shape is None else len(shape) - 2)) == 3
    cl = torch.channels_last_3d if three_d else None
    if mode == "none":
        return Accelerated(model, mode, mode, model)
    if mode == "channels-last":
        net = _channels_last_copy(model, dev) if three_d else model
        return Accelerated(net, mode, mode, model, memory_format=cl)
    if mode in ("fused", "mixed", "bf16"):
        dtype = torch.float32 if mode == "fused" else torch.bfloat16
        net = fuse_conv_relu(model, dtype)
        if mode == "mixed":
            if shape is None:
                raise ValueError("accel: mode 'mixed' needs the input shape")
            keep = set(final_stage_convs(model, shape))
            for fc in net.modules():
                if isinstance(fc, FusedConv) and id(fc.weight) in keep:
                    fc.dtype = torch.float32
        mf = cl if three_d else torch.channels_last

        def run_fused(x: torch.Tensor, _net=net, _dtype=dtype) -> torch.Tensor:
            return _net(x.to(_dtype))

        return Accelerated(run_fused, mode, mode, model, memory_format=mf)
    if mode in ("compile", "compile-bf16"):
        net = _channels_last_copy(model, dev) if three_d else copy.deepcopy(model).eval()
        compiled = torch.compile(net, dynamic=False)

        def run(x: torch.Tensor, _compiled=compiled) -> torch.Tensor:
            import torch._inductor.config as inductor_config

            with inductor_config.patch(freezing=True):  # read when a graph is compiled (first call / new shape)
                return _compiled(x)

        return Accelerated(run, mode, mode, model, memory_format=cl, bf16=mode == "compile-bf16")
    if mode == "onnx":
        from femurseg.inference.onnx import OnnxModel, export_onnx

        tmp = Path(tempfile.mkdtemp(prefix="femurseg-accel-"))
        try:
            path = export_onnx(model, tmp / "model.onnx")
            engine = OnnxModel(path, device=str(dev), threads=torch.get_num_threads())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the session holds the model in memory
        return Accelerated(engine, mode, mode, model)
    raise ValueError(f"accel: mode {mode!r} is not one of {', '.join(MODES)}")


# ---------------------------------------------------------------------------------------------
# "fused": oneDNN convolution + ReLU with pre-packed weights, no compiler


class FusedConv(nn.Module):
    """A ``Conv{2,3}d`` / ``ConvTranspose{2,3}d`` (optionally followed by ReLU) as one oneDNN call.

    The weight is reordered once per input shape into oneDNN's blocked layout
    (``torch.ops.mkldnn._reorder_convolution_weight``), in ``dtype``; the bias stays as is (float32
    bias with bfloat16 weights is what oneDNN expects). Inference only (no autograd).
    """

    def __init__(self, conv: nn.Module, relu: bool, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.transposed = isinstance(conv, (nn.ConvTranspose2d, nn.ConvTranspose3d))
        self.weight = conv.weight  # shared with the original model, never modified
        self.bias = conv.bias
        self.padding = list(conv.padding)
        self.stride = list(conv.stride)
        self.dilation = list(conv.dilation)
        self.groups = int(conv.groups)
        self.output_padding = list(getattr(conv, "output_padding", [0] * len(self.padding)))
        self.attr = "relu" if relu else "none"
        self.dtype = dtype
        self._packed: torch.Tensor | None = None
        self._packed_for: tuple[int, ...] | None = None
        self._bias: torch.Tensor | None = None

    def _pack(self, shape: tuple[int, ...]) -> None:
        mk = torch.ops.mkldnn
        w = self.weight.detach().to(self.dtype)
        if self.transposed:
            self._packed = mk._reorder_convolution_transpose_weight(
                w, self.padding, self.output_padding, self.stride, self.dilation, self.groups, list(shape))
        else:
            self._packed = mk._reorder_convolution_weight(w, self.padding, self.stride, self.dilation, self.groups,
                                                          list(shape))
        self._bias = None if self.bias is None else self.bias.detach().to(self.dtype)
        self._packed_for = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:  # "mixed": the precision changes between stages
            x = x.to(self.dtype)
        shape = tuple(x.shape)
        if self._packed_for != shape:
            self._pack(shape)
        mk = torch.ops.mkldnn
        if self.transposed:
            return mk._convolution_transpose_pointwise(x, self._packed, self._bias, self.padding, self.output_padding,
                                                       self.stride, self.dilation, self.groups, self.attr, [], "")
        return mk._convolution_pointwise(x, self._packed, self._bias, self.padding, self.stride, self.dilation,
                                         self.groups, self.attr, [], "")


_CONVS = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def fuse_conv_relu(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of ``model`` (sharing its parameters) whose convolutions run as :class:`FusedConv`.

    In every ``nn.Sequential`` a convolution followed by ``nn.Identity`` layers (femurseg's
    ``norm="none"``) and an ``nn.ReLU`` becomes one fused call; other convolutions become fused
    calls without a post-op. Convolutions followed by a real normalisation layer keep the
    normalisation after them (no folding). The caller's model is not modified.
    """
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    net = copy.deepcopy(model, memo).eval()

    def convert(mod: nn.Module) -> None:
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.Sequential):
                layers = list(child)
                out: list[nn.Module] = []
                i = 0
                while i < len(layers):
                    layer = layers[i]
                    if isinstance(layer, _CONVS):
                        j = i + 1
                        while j < len(layers) and isinstance(layers[j], nn.Identity):
                            j += 1
                        relu = j < len(layers) and isinstance(layers[j], nn.ReLU)
                        out.append(FusedConv(layer, relu, dtype))
                        i = j + 1 if relu else i + 1
                        continue
                    convert(layer)
                    out.append(layer)
                    i += 1
                child._modules.clear()  # keep the Sequential subclass (e.g. ConvBlock) and its attributes
                for k, layer in enumerate(out):
                    child.add_module(str(k), layer)
            elif isinstance(child, _CONVS):
                setattr(mod, name, FusedConv(child, False, dtype))
            else:
                convert(child)

    convert(net)
    return net


def trace_convs(model: nn.Module, shape: Sequence[int]) -> tuple[list[tuple[str, tuple[int, ...], tuple[int, ...]]], tuple[int, ...] | None]:
    """The convolutions ``model`` runs for inputs of ``shape``, in forward order.

    Traced on the ``meta`` device (shapes only, no arithmetic, ``model`` untouched). Returns
    ``([(module name, input spatial size, output spatial size), ...], output spatial size)``,
    the latter None when the output is not a map (patch classifiers).
    """
    meta = copy.deepcopy(model).to("meta").eval()
    for m in meta.modules():  # deepcopy copies the user's hooks too; the trace must not fire them
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    calls: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: calls.append((n, tuple(i[0].shape[2:]), tuple(o.shape[2:]))))
             for n, m in meta.named_modules() if isinstance(m, _CONVS)]
    try:
        with torch.no_grad():
            out = meta(torch.empty(tuple(int(s) for s in shape), device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return calls, (tuple(out.shape[2:]) if out.dim() > 2 else None)


def final_stage_convs(model: nn.Module, shape: Sequence[int]) -> list[int]:
    """``id()`` of the weights of the convolutions of ``model``'s final full-resolution stage.

    From :func:`trace_convs` for inputs of ``shape``: the longest run of convolutions at the end
    of the forward pass whose input and output have the spatial size of the network's output
    (for femurseg's U-Nets and V-Net: the last decoder block and the 1x1 head; not the
    up-sampling into it). A network whose output is not a map (patch classifiers) keeps only its
    last convolution. Used by mode ``"mixed"``.
    """
    by_name = {n: m for n, m in model.named_modules() if isinstance(m, _CONVS)}
    calls, out_sp = trace_convs(model, shape)
    keep: list[str] = []
    for name, i_sp, o_sp in reversed(calls):
        if out_sp is None:
            keep = [name]
            break
        if i_sp != out_sp or o_sp != out_sp:
            break
        keep.append(name)
    return [id(by_name[n].weight) for n in keep if n in by_name]


# ---------------------------------------------------------------------------------------------
# Memoised access for the inference loop

_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Accelerated]] = weakref.WeakKeyDictionary()


def accelerated(model: nn.Module, example_shape: Sequence[int], device: torch.device | str = "cpu",
                mode: str | None = None) -> Accelerated:
    """:func:`optimise_for_inference`, memoised per (model, weights version, shape, device, mode).

    ``mode=None`` uses :func:`default_mode`. A model whose weights changed since (an optimiser
    step, ``load_state_dict``) gets a fresh callable; older entries of that model are dropped.
    """
    mode = default_mode() if mode is None else mode
    dev = torch.device(device)
    shape = tuple(int(s) for s in example_shape)
    if resolve_mode(mode, dev) == "none" or not any(True for _ in model.parameters()):
        return Accelerated(model, "none", mode, model)  # nothing to prepare or cache (e.g. an ONNX engine)
    version = _weights_version(model)
    key = (version, shape, str(dev), mode)
    per_model = _CACHE.setdefault(model, {})
    hit = per_model.pop(key, None)
    if hit is None:
        for k in [k for k in per_model if k[0] != version]:
            del per_model[k]
        same_mode = [k for k in per_model if k[3] == mode]  # least recently used first
        while len(same_mode) >= MAX_CACHED_SHAPES:
            del per_model[same_mode.pop(0)]
        hit = optimise_for_inference(model, shape, dev, mode, warmup=False, warn=True)
        hit._hold_weakly()
    per_model[key] = hit  # (re)insert as the most recently used
    return hit


def clear_cache() -> None:
    """Forget every memoised callable (frees compiled graphs and ONNX sessions)."""
    _CACHE.clear()


def describe() -> dict[str, Any]:
    """What this machine supports (for logs and the benchmark summary)."""
    return {
        "auto_cpu": resolve_mode("auto", "cpu"),
        "bf16_supported": bf16_supported(),
        "compiler_available": compiler_available(),
        "threads": torch.get_num_threads(),
    }
