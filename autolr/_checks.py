"""Checks shared by the stages, each raising what its caller turns into one line."""

from __future__ import annotations

import tempfile
from pathlib import Path


def probe_writable(folder: Path) -> None:
    """Make ``folder`` and write (then drop) a file in it; OSError if either fails.

    Callers check a place before any work, so that a run does not lose its end
    (or sit in a library's retry loop) on a folder it cannot write.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (YAML's and pyarrow's span several)."""
    return " ".join(str(exc).split())
