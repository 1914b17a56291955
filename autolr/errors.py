"""autolr's exceptions. Every message says what was expected and what came."""

from __future__ import annotations


class AutoLRError(Exception):
    """Base class of autolr's own errors."""


class ArgumentError(AutoLRError, ValueError):
    """An argument of an autolr function is out of its range or of the wrong kind.

    A ValueError too, as Python's convention for bad argument values has it; the
    CLI reports it in one line, while a plain ValueError from elsewhere (a bug)
    keeps its traceback.
    """


class CurveError(AutoLRError, ValueError):
    """A range-test curve has no usable structure to pick learning rates from.

    The message names the cause (NaN from the first steps, a flat curve, too few
    finite points, divergence at once) and the remedy.
    """


class ConfigError(AutoLRError, ValueError):
    """A configuration key or value is not what autolr expects."""


class TaskError(AutoLRError, ValueError):
    """A task, or a task builder, does not meet the `autolr.Task` contract."""


class TrainingDivergedError(AutoLRError, ValueError):
    """Training produced a NaN or infinite loss (the learning rate is too high)."""
