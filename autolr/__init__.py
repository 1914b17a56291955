"""autolr: automatic learning-rate selection for PyTorch.

range test -> Savitzky-Golay smoothing -> change points -> max/min LR -> 1cycle.
"""

from autolr.errors import (
    ArgumentError,
    AutoLRError,
    ConfigError,
    CurveError,
    TaskError,
    TrainingDivergedError,
)
from autolr.range_test import range_test
from autolr.results import EpochMetrics, LRChoice, RangeTestResult, TrainResult
from autolr.selection import select_lr
from autolr.tasks.base import Task

__all__ = [
    "ArgumentError",
    "AutoLRError",
    "ConfigError",
    "CurveError",
    "EpochMetrics",
    "LRChoice",
    "RangeTestResult",
    "Task",
    "TaskError",
    "TrainResult",
    "TrainingDivergedError",
    "range_test",
    "select_lr",
]
__version__ = "0.1.0"
