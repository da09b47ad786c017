"""Progress of long work: a bar on a terminal, a few plain lines in a log file.

:func:`progress` takes tqdm's arguments. When the stream (stderr by default) is a terminal it is
``tqdm`` itself. Otherwise (a cluster job, CI, ``nohup``, ``make demo > log``) a bar's redraws would
each become a line of the log, so it writes plain lines instead: one every :data:`LOG_INTERVAL_S`
seconds while work goes on ("fold 1/4 epoch 3: 5/12 batch, 41 s"), and a closing line with the
count and time for bars that are kept (``leave=True``, tqdm's default); transient bars
(``leave=False``) close silently, because the caller prints its own summary line (e.g. one line
per training epoch).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 60.0
"""Seconds between two progress lines when the output is not a terminal."""

ENV_FORCE = "FEMURSEG_PROGRESS"
"""``bar`` forces tqdm bars, ``lines`` forces plain lines (else: bars on a terminal only)."""


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (stderr by default) is a terminal, or ``$FEMURSEG_PROGRESS`` says to act as one."""
    forced = os.environ.get(ENV_FORCE, "").strip().lower()
    if forced in ("bar", "lines"):
        return forced == "bar"
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """tqdm's interface (iteration, ``update``, ``set_postfix``, ``close``, ``write``, context manager)
    writing plain lines; see the module docstring."""

    def __init__(self, iterable: Iterable[Any] | None = None, desc: str | None = "", total: float | None = None,
                 unit: str = "it", leave: bool | None = True, file: TextIO | None = None, disable: bool = False,
                 **_: Any) -> None:
        self.iterable = iterable
        self.desc = (desc or "").rstrip(": ")
        self.unit = unit
        self.leave = leave is None or bool(leave)
        self.file = file
        self.disable = disable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.n = 0
        self.postfix = ""
        self.start = self.last = time.perf_counter()
        self.closed = False

    def _say(self, text: str) -> None:
        print(text, file=self.file if self.file is not None else sys.stderr, flush=True)

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LineProgress: nothing to iterate")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _count(self) -> str:
        total = f"/{int(self.total)}" if self.total else ""
        return f"{int(self.n)}{total} {self.unit}"

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if not self.disable and now - self.last >= LOG_INTERVAL_S and (not self.total or self.n < self.total):
            self.last = now
            self._say(f"{self.desc}: {self._count()}, {now - self.start:.0f} s{self.postfix}")

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(dict(ordered_dict) if ordered_dict else {}), **kwargs}
        self.postfix = ", " + ", ".join(f"{k}={v}" for k, v in items.items()) if items else ""

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = (desc or "").rstrip(": ")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.disable and self.leave:
            self._say(f"{self.desc}: {self._count()} in {time.perf_counter() - self.start:.1f} s{self.postfix}")

    @staticmethod
    def write(text: str, file: TextIO | None = None, end: str = "\n", nolock: bool = False) -> None:
        print(text, file=file if file is not None else sys.stdout, end=end, flush=True)


def progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """A progress bar (tqdm) on a terminal, else a :class:`LineProgress`; tqdm's arguments."""
    if kwargs.get("disable") or is_terminal(kwargs.get("file")):
        return tqdm(iterable, **kwargs)
    return LineProgress(iterable, **kwargs)


def write(text: str) -> None:
    """A message line that does not break a running bar (``tqdm.write`` on a terminal, ``print`` otherwise)."""
    if is_terminal():
        tqdm.write(text)
    else:
        print(text, flush=True)
