"""The arithmetic a network runs in on the machine at hand: one decision for training and inference.

femurseg trains and predicts in one of three precisions:

``"fp32"``
    float32 everywhere (eager PyTorch).
``"bf16"``
    bfloat16 autocast (float32 weights and optimiser state; convolutions and matrix products in
    bfloat16 with float32 accumulation).
``"fp16"``
    float16 autocast with a gradient scaler (CUDA only): PyTorch's and nnU-Net's AMP.

``"auto"`` (the default everywhere) picks, for the device at hand, what its hardware runs
natively (:func:`resolve_precision`):

* a CUDA device: ``"fp16"`` (every CUDA GPU of the last decade has native float16 tensor or
  vector units; nnU-Net trains this way);
* a CPU with native bfloat16 dot products (AVX512-BF16 or AMX; :func:`native_bf16_cpu`):
  ``"bf16"``, a demo training step in 0.25-0.33 s against 0.69 s in float32 (1 thread);
* any other CPU (AVX2-only laptops, desktops, AMD Zen 2/3 servers, most cloud VMs, AVX-512
  CPUs without BF16): ``"fp32"``. There oneDNN emulates bfloat16; a demo training step under
  bfloat16 autocast took 42 s instead of 1.24 s in float32 (``ONEDNN_MAX_CPU_ISA=AVX2``) and
  1.58 s instead of 0.69 s (``ONEDNN_MAX_CPU_ISA=AVX512_CORE``).

(Demo 3D U-Net F16 L3, instance norm, Dice + CE, one Adam step on 48 x 64 x 64, 1 thread,
torch 2.13.0 CPU, Intel Xeon with AMX, 2026-12-05.)

The decision honours ``ONEDNN_MAX_CPU_ISA``: with ``ONEDNN_MAX_CPU_ISA=AVX2`` a CPU with AMX
is treated as the AVX2-only CPU oneDNN then pretends it is, which is how the AVX2 rows of
``make bench`` and CI's AVX2 smoke run are produced on a machine that has AMX.

A forced precision is obeyed, with a one-line :class:`PrecisionWarning` where it is slow here
(``"bf16"`` on a CPU without native bfloat16) and a :class:`~femurseg.core.errors.FemursegError`
where it cannot run (``"fp16"`` on a CPU; ``"bf16"`` on a GPU without bfloat16).

The decision is made again on every machine: a run trained with ``"auto"`` in bfloat16 on an AMX
server predicts in float32 on an AVX2 laptop. Runs record what they used and why
(:meth:`Precision.to_dict`, in the run's ``config.json`` and each fold's ``state.json``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from femurseg.core.errors import FemursegError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""Accepted values of ``--precision`` / ``TrainConfig.precision``."""

EMULATED_BF16_SLOWDOWN = 35
"""Measured slowdown of a bfloat16-autocast training step against float32 where oneDNN emulates
bfloat16 with AVX2 (demo 3D U-Net F16 L3 on 48 x 64 x 64, 1 thread, ``ONEDNN_MAX_CPU_ISA=AVX2``:
42 s against 1.24 s; 60.2 s against 1.64 s on another machine); quoted by the warning for a forced
``"bf16"`` on such a CPU (with AVX-512 but no BF16 the factor is ~2)."""


class PrecisionWarning(UserWarning):
    """A forced precision that runs, but far slower than float32 on this machine."""


ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
               "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
               "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "ALL")
"""oneDNN's ``ONEDNN_MAX_CPU_ISA`` values, lowest first (aliases side by side)."""


def onednn_isa_cap() -> str | None:
    """The instruction-set cap set by ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``), upper case, or None."""
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        isa = os.environ.get(var, "").strip().upper()
        if isa and isa != "ALL":
            return isa
    return None


@functools.lru_cache(maxsize=None)
def native_bf16_cpu() -> bool:
    """Whether bfloat16 convolutions run natively on this CPU: AVX512-BF16 or AMX in the hardware,
    oneDNN's bfloat16 kernels available, and no ``ONEDNN_MAX_CPU_ISA`` cap below
    ``AVX512_CORE_BF16``.

    oneDNN itself reports bfloat16 support from AVX-512 alone (``_is_mkldnn_bf16_supported`` is
    true under ``ONEDNN_MAX_CPU_ISA=AVX512_CORE``), but there it emulates the dot products: a
    demo training step took 1.58 s in bfloat16 against 0.69 s in float32 (1 thread). Cached:
    oneDNN reads the cap once per process.
    """
    try:
        onednn = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        hardware = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False
    cap = onednn_isa_cap()
    if cap in ONEDNN_ISAS and ONEDNN_ISAS.index(cap) < ONEDNN_ISAS.index("AVX512_CORE_BF16"):
        return False
    return onednn and hardware


def cpu_isa_note() -> str:
    """``" (ONEDNN_MAX_CPU_ISA=AVX2)"`` when the environment caps oneDNN's instruction set, else ``""``."""
    cap = onednn_isa_cap()
    return f" (ONEDNN_MAX_CPU_ISA={cap})" if cap else ""


@dataclass(frozen=True)
class Precision:
    """A resolved precision for one device.

    Attributes:
        name: "fp32", "bf16" or "fp16".
        requested: what was asked for ("auto" or one of the three).
        device: the device type ("cpu" or "cuda").
        reason: one sentence saying why ``name`` was chosen (for config.json and logs).
    """

    name: str
    requested: str
    device: str
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for float32."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    @property
    def autocast_enabled(self) -> bool:
        return self.dtype is not None

    @property
    def grad_scaling(self) -> bool:
        """Whether training needs a gradient scaler (float16 only: bfloat16 has float32's range)."""
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` for this precision on its device, or a null context for float32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "used": self.name, "device": self.device, "reason": self.reason}

    def fallback(self, reason: str) -> Precision:
        """float32 on the same device, keeping ``requested``, with ``reason`` appended."""
        return Precision("fp32", self.requested, self.device, f"{self.reason}; float32 instead: {reason}")


def resolve_precision(requested: str | None, device: torch.device | str, *, warn: bool = True) -> Precision:
    """The precision to run in on ``device`` for ``requested`` (None or "auto": the module's rule).

    Raises:
        FemursegError: an unknown name, ``"fp16"`` on a CPU, or ``"bf16"`` on a GPU without it.
    """
    req = "auto" if requested is None else str(requested).strip().lower()
    if req not in PRECISIONS:
        raise FemursegError(f"--precision: {requested!r} is not one of {', '.join(PRECISIONS)}")
    dev = torch.device(device).type
    if dev == "cuda":
        if req in ("auto", "fp16"):
            why = "auto: float16 autocast with gradient scaling on CUDA" if req == "auto" else "forced"
            return Precision("fp16", req, dev, why)
        if req == "bf16":
            if not torch.cuda.is_bf16_supported():
                raise FemursegError("--precision bf16: this GPU has no bfloat16 support; use fp16 or fp32")
            return Precision("bf16", req, dev, "forced")
        return Precision("fp32", req, dev, "forced")
    if dev != "cpu":
        if req not in ("auto", "fp32"):
            raise FemursegError(f"--precision {req}: not supported on device {dev!r}; use fp32")
        return Precision("fp32", req, dev, f"{'auto' if req == 'auto' else 'forced'}: float32 on {dev}")
    native = native_bf16_cpu()
    note = cpu_isa_note()
    if req == "auto":
        if native:
            return Precision("bf16", req, dev, f"auto: this CPU has native bfloat16 (AVX512-BF16/AMX){note}")
        return Precision("fp32", req, dev, f"auto: this CPU has no native bfloat16{note}, float32 is fastest")
    if req == "fp16":
        raise FemursegError("--precision fp16: float16 autocast is for CUDA devices; on a CPU use auto, bf16 or fp32")
    if req == "bf16" and not native:
        if warn:
            warnings.warn(f"--precision bf16: this CPU has no native bfloat16{note}; oneDNN emulates it, expect "
                          f"~{EMULATED_BF16_SLOWDOWN}x slower training than --precision fp32", PrecisionWarning,
                          stacklevel=2)
        return Precision("bf16", req, dev, f"forced (emulated: this CPU has no native bfloat16{note})")
    return Precision(req, req, dev, "forced")


def get_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a torch.device; None or "auto": CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FemursegError(f"--device {device}: CUDA is not available on this machine")
    return dev
