"""Small helpers shared across autolr: argument checks (each raising what its caller turns
into one line), the robust noise estimate, and a scoped change of environment variables."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from autolr.errors import ArgumentError


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


def check_int(
    name: str, value: object, minimum: int, *, optional: bool = False, error=ArgumentError
) -> None:
    """Raise ``error`` unless ``value`` is an int (not a bool) >= ``minimum`` (or None if
    ``optional``); the message names the argument, the bound and what came."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = f"{'None or ' if optional else ''}an int >= {minimum}"
        raise error(f"{name} must be {expected}, but got {name}={value!r}.")


def mad_sd(values: np.ndarray) -> float:
    """The sd of ``values``' noise from their median absolute deviation, which a few
    outliers (a bad batch) do not inflate; 1.4826 makes it the sd of Gaussian noise."""
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


@contextlib.contextmanager
def environ(values: Mapping[str, str], *, keep_set: bool = False) -> Iterator[None]:
    """Set environment variables within the block, and put back what was there after.

    ``keep_set``: a variable already in the environment keeps its value (the
    user's setting wins over autolr's default).
    """
    if keep_set:
        values = {key: value for key, value in values.items() if key not in os.environ}
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
