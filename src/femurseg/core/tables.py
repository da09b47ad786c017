"""Plain CSV tables: the one writer every femurseg command uses for its ``*.csv`` outputs.

Rows are dicts; columns are the union of their keys in first-seen order unless given. Floats
are written with 6 significant digits, NaN as ``nan`` and infinities as ``inf`` / ``-inf``
(what ``float()`` reads back, and what pandas and R read as missing / infinite), ``None`` as an
empty cell. Files are written atomically (:func:`femurseg.core.errors.atomic_path`), so a killed
command never leaves half a table.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from femurseg.core.errors import atomic_path


def format_cell(v: Any) -> str:
    """One CSV cell: floats (Python or NumPy) to 6 significant digits, nan/inf spelled out."""
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{float(v):.6g}"
    return "" if v is None else str(v)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, columns: Sequence[str] | None = None,
              missing: Any = "") -> Path:
    """Write dict rows as a CSV table atomically; ``missing`` fills a column a row lacks."""
    path = Path(path)
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for r in rows:
            w.writerow([format_cell(r.get(c, missing)) for c in columns])
    return path
