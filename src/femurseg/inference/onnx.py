"""ONNX export of femurseg models and an ONNX Runtime engine that stands in for the PyTorch model.

* :func:`export_onnx` writes one model as ONNX (legacy TorchScript exporter, opset 17; the
  dynamo exporter needs ``onnxscript``, which femurseg does not depend on). The batch axis and
  every spatial axis are dynamic, so one file serves any input size the PyTorch model accepts.
  The model's registry config is stored in the ONNX metadata (``femurseg_config``), and the
  export is checked against PyTorch on two input sizes (max |logit difference| <= ``atol``).
* :class:`OnnxModel` wraps an ``onnxruntime.InferenceSession`` as a parameter-free
  ``torch.nn.Module``: ``OnnxModel(path)(x)`` returns the same logits as the PyTorch model, and it
  has the same attributes (``spatial_dims``, ``in_channels``, ``num_classes``, ``padded``,
  ``size_divisor``, ``config``, ``output_size``, ``valid_input_size``), so the inference code
  (:mod:`femurseg.inference.tiling`) runs it unchanged (``femurseg predict --engine onnx``).
* :func:`export_run` / :func:`onnx_models_for_run`: the run-level helpers behind
  ``femurseg export RUN`` and ``--engine onnx`` (default file: ``RUN/fold_<k>/model.onnx``).

Padded nets pad their input internally to a multiple of ``size_divisor``. A traced graph would
freeze that padding to the example's size, so the export uses an example that needs none and
:class:`OnnxModel` does the padding itself (the same :func:`~femurseg.models.blocks.pad_to_multiple`
the PyTorch model uses) before calling the session, then crops the logits back.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from femurseg.core.errors import FemursegError, atomic_path

OPSET = 17
CONFIG_KEY = "femurseg_config"
ONNX_NAME = "model.onnx"


def _is_padded(model: nn.Module) -> bool:
    return bool(getattr(model, "padded", True))


def _example_sizes(model: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Two spatial input sizes the model accepts (export size, check size); small for speed."""
    sd = int(model.spatial_dims)
    if hasattr(model, "patch_size"):  # patch classifier: fixed patch, dynamic batch only
        p = int(model.patch_size)
        return (p, p), (p, p)
    div = int(getattr(model, "size_divisor", 1))
    if _is_padded(model):
        a = max(div, 8)
        return (a,) * sd, tuple(a + div * (i + 1) for i in range(sd))
    first = model.valid_input_size(1)
    second = model.valid_input_size(first + 1)
    return (first,) * sd, tuple(second if i == sd - 1 else first for i in range(sd))


def export_onnx(model: nn.Module, path: str | os.PathLike, *, atol: float = 1e-4) -> Path:
    """Export ``model`` (a femurseg network) to ONNX at ``path`` with dynamic batch/spatial axes.

    The model is exported on the CPU in eval mode; the result is verified with ONNX Runtime
    against PyTorch on two input sizes and raises :class:`FemursegError` if the logits differ by
    more than ``atol``. Written atomically. Returns ``path``.
    """
    import onnx

    p = Path(path)
    if not p.name.lower().endswith(".onnx"):
        raise FemursegError(f"{p}: ONNX output must end in .onnx")
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("export_onnx: model has no .config (build it with femurseg.models.build_model)")
    model = copy.deepcopy(model).cpu().eval()  # the caller's model keeps its device and mode
    size_a, size_b = _example_sizes(model)
    sd = int(model.spatial_dims)
    x = torch.zeros((1, int(model.in_channels), *size_a))
    dyn_axes = [0] if hasattr(model, "patch_size") else [0, *range(2, 2 + sd)]
    names = {0: "batch", 2: "d0", 3: "d1", 4: "d2"}
    dynamic = {"image": {a: names[a] for a in dyn_axes},
               "logits": {a: ("batch" if a == 0 else f"out_{names[a]}") for a in dyn_axes}}
    with atomic_path(p) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings about shape checks frozen at export time
            torch.onnx.export(model, (x,), str(tmp), dynamo=False, input_names=["image"], output_names=["logits"],
                              dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=True)
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto)
        entry = proto.metadata_props.add()
        entry.key, entry.value = CONFIG_KEY, json.dumps(config)
        proto.producer_name = "femurseg"
        onnx.save(proto, str(tmp))
        engine = OnnxModel(tmp)
        for size in (size_a, size_b):
            diff = _max_diff(model, engine, size)
            if not diff <= atol:
                raise FemursegError(f"{p}: ONNX export disagrees with PyTorch by {diff:.3g} (> {atol}) "
                                    f"on input size {size}")
    return p


def _max_diff(model: nn.Module, engine: OnnxModel, size: tuple[int, ...]) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, int(model.in_channels), *size), generator=g)
    with torch.no_grad():
        a = model(x)
        b = engine(x)
    return float((a - b).abs().max())


class OnnxModel(nn.Module):
    """An ONNX Runtime session behaving like the PyTorch femurseg model it was exported from.

    ``forward(x)``: ``(B, C, *S)`` float tensor -> logits ``(B, num_classes, *S_out)`` on ``x``'s
    device (computed by ONNX Runtime; on the CPU unless ``onnxruntime-gpu`` is installed and
    ``device='cuda'``). It has no parameters; ``.to()``/``.eval()`` are harmless.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FemursegError(f"{self.path}: ONNX model not found")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... exceptions
            raise FemursegError(f"{self.path}: cannot load ONNX model: {str(exc).splitlines()[0]}") from None
        meta = self._session.get_modelmeta().custom_metadata_map
        if CONFIG_KEY not in meta:
            raise FemursegError(f"{self.path}: not a femurseg ONNX export (no {CONFIG_KEY} metadata)")
        self.config: dict[str, Any] = json.loads(meta[CONFIG_KEY])
        from femurseg.models import build_model

        with torch.device("meta"):  # architecture only, for sizes and attributes; no weights
            self.__dict__["_meta"] = build_model(self.config)  # not registered as a submodule
        self.spatial_dims = int(self._meta.spatial_dims)
        self.in_channels = int(self._meta.in_channels)
        self.num_classes = int(self._meta.num_classes)
        self.padded = _is_padded(self._meta)
        self.size_divisor = int(getattr(self._meta, "size_divisor", 1))
        self.input_name = self._session.get_inputs()[0].name
        self.providers = self._session.get_providers()

    def output_size(self, input_size):
        return self._meta.output_size(input_size)

    def valid_input_size(self, n: int) -> int:
        return self._meta.valid_input_size(n) if hasattr(self._meta, "valid_input_size") else n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from femurseg.models.blocks import check_input, crop_to, pad_to_multiple

        check_input(x, self.spatial_dims, self.in_channels)
        crop = None
        if self.padded and self.size_divisor > 1 and not hasattr(self._meta, "patch_size"):
            x, crop = pad_to_multiple(x, self.size_divisor)
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        out = torch.from_numpy(self._session.run(None, {self.input_name: arr})[0]).to(x.device)
        return crop_to(out, crop) if crop is not None else out

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, providers={self.providers}"


# ---------------------------------------------------------------------------------------------
# Run folders


def default_onnx_path(run_dir: str | os.PathLike, fold: int) -> Path:
    """Where ``femurseg export`` and ``--engine onnx`` keep fold ``fold``'s model: ``RUN/fold_<k>/model.onnx``."""
    return Path(run_dir) / f"fold_{int(fold)}" / ONNX_NAME


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
               fold: str | int | None = None) -> list[Path]:
    """Export a run's fold models to ONNX (``femurseg export``).

    Args:
        run_dir: a run folder (:func:`femurseg.inference.run.load_run`).
        out: the ``.onnx`` file; needs a single fold (``fold`` given or a one-fold run).
            None: every chosen fold to ``RUN/fold_<k>/model.onnx`` (where ``--engine onnx`` looks).
        fold: "all"/None (every fold) or one fold number.

    Returns:
        the written files.
    """
    from femurseg.inference.run import load_run, parse_folds

    run = load_run(run_dir)
    folds = parse_folds(fold, list(range(run.k)), run.path)
    if out is not None:
        if len(folds) != 1:
            raise FemursegError(f"{out}: the run has {len(folds)} folds; choose one with --fold K, "
                                f"or leave out --onnx to write RUN/fold_<k>/{ONNX_NAME} for each")
        paths = [Path(out)]
    else:
        paths = [default_onnx_path(run.path, k) for k in folds]
    for p in paths:  # fail on an unwritable destination before exporting anything
        parent = p.parent if str(p.parent) else Path(".")
        if not p.name.lower().endswith(".onnx"):
            raise FemursegError(f"{p}: ONNX output must end in .onnx")
        if not parent.is_dir():
            raise FemursegError(f"{p}: output folder {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise FemursegError(f"{p}: output folder {parent} is not writable")
    models = run.load_models(folds, "cpu")
    return [export_onnx(m, p) for m, p in zip(models, paths)]
