"""The back-end argument of the long-running entry points (cross-validation, batch prediction).

Training and inference run here by default; the scale-out back-ends (:mod:`femurseg.scale`) live
above them and are passed in as objects, never imported by them. A back-end object has the
method the entry point needs (``train_folds`` for :func:`femurseg.training.cv.run_cv`,
``predict_many`` for :func:`femurseg.inference.predict.predict_command`) and optionally
``connect()``.
"""

from __future__ import annotations

from typing import Any

from femurseg.core.errors import FemursegError


def local_or_backend(backend: Any) -> Any:
    """None for "local"/None; a back-end object as is, connected first when it has ``connect()``
    (so that a missing Ray or an unreachable cluster fails before anything is written)."""
    if backend is None or (isinstance(backend, str) and backend.strip().lower() == "local"):
        return None
    if isinstance(backend, str):
        raise FemursegError(f"backend {backend!r}: pass a back-end object (femurseg.scale.distributed.resolve_backend)")
    if hasattr(backend, "connect"):
        backend.connect()
    return backend
