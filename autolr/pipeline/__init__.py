"""The pipeline: range test -> selection -> Ray Tune search -> final 1cycle model, in MLflow.

``python -m autolr.pipeline`` runs it (`cli`); `run` is the same from Python and
returns a `PipelineResult`, which the summary JSON and the console are rendered from.

    stages.py      run(): the stages in order, their MLflow logging, the result
    parent_run.py  the pipeline's MLflow run as one handle
    resume.py      the resume-state file, finding a resumable run, dead drivers
    final.py       the final model: the best trial's checkpoint, or trained; the test split
    signals.py     SIGINT/SIGTERM as `Interrupted`, the runs ended as KILLED
    cli.py         argparse, the console summary, main()
"""

from autolr.pipeline.cli import DEFAULT_CONFIG, config_from_args, format_summary, main, parse_args
from autolr.pipeline.final import MODEL_ARTIFACT
from autolr.pipeline.final import _best_trial_state as _best_trial_state
from autolr.pipeline.parent_run import ParentRun
from autolr.pipeline.resume import (
    CONFIG_TAG,
    DRIVER_TAG,
    FOLDER_TAG,
    ROLE_TAG,
    STATE_FILE,
)
from autolr.pipeline.resume import _config_key as _config_key
from autolr.pipeline.resume import _find_resumable as _find_resumable
from autolr.pipeline.resume import _in_use as _in_use
from autolr.pipeline.resume import _new_state as _new_state
from autolr.pipeline.resume import _start_time as _start_time
from autolr.pipeline.signals import Interrupted
from autolr.pipeline.signals import _SignalStop as _SignalStop
from autolr.pipeline.stages import range_test_table, run, run_range_test, run_search, run_selection
from autolr.results import PipelineResult

__all__ = [
    "CONFIG_TAG",
    "DEFAULT_CONFIG",
    "DRIVER_TAG",
    "FOLDER_TAG",
    "MODEL_ARTIFACT",
    "ROLE_TAG",
    "STATE_FILE",
    "Interrupted",
    "ParentRun",
    "PipelineResult",
    "config_from_args",
    "format_summary",
    "main",
    "parse_args",
    "range_test_table",
    "run",
    "run_range_test",
    "run_search",
    "run_selection",
]
