"""autolr: automatic learning-rate selection for PyTorch.

range test -> Savitzky-Golay smoothing -> change points -> max/min LR
-> (confirmed by training) -> 1cycle.
"""

from autolr.confirm import confirm_lr
from autolr.errors import (
    ArgumentError,
    AutoLRError,
    ConfigError,
    CurveError,
    TaskError,
    TrainingDivergedError,
)
from autolr.range_test import range_test
from autolr.results import (
    ConfirmedLR,
    EpochMetrics,
    LRChoice,
    LRTrial,
    RangeTestResult,
    TrainResult,
)
from autolr.selection import select_lr
from autolr.tasks.base import Task

__all__ = [
    "ArgumentError",
    "AutoLRError",
    "ConfigError",
    "ConfirmedLR",
    "CurveError",
    "EpochMetrics",
    "LRChoice",
    "LRTrial",
    "RangeTestResult",
    "Task",
    "TaskError",
    "TrainResult",
    "TrainingDivergedError",
    "confirm_lr",
    "range_test",
    "select_lr",
]
__version__ = "0.1.0"
