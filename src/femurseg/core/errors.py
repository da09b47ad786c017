"""User-facing errors.

Every problem a user can cause (a missing file, a bad label, a wrong run folder)
raises :class:`FemursegError` with one line that names the file and the problem.
The CLI prints that line and exits with status 1; it never shows a traceback for
these. Programming errors are left to propagate as ordinary exceptions.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


class FemursegError(Exception):
    """An error caused by the user's input, reported as a single line."""


def atomic_path(final: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """Context manager yielding a temporary path beside ``final``.

    Write to the yielded path; on success it is renamed onto ``final`` (atomic on
    POSIX), on error it is removed, so no partial output is ever left behind.
    The temporary name keeps ``final``'s suffixes (``.nii.gz``) so writers that
    pick the format from the extension still work.
    """
    return _atomic_path(Path(final))


@contextlib.contextmanager
def _atomic_path(final: Path) -> Iterator[Path]:
    parent = final.parent if str(final.parent) else Path(".")
    if not parent.is_dir():
        raise FemursegError(f"{final}: output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise FemursegError(f"{final}: output folder {parent} is not writable")
    suffix = "".join(final.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name.split('.')[0]}.", suffix=suffix, dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
