"""The pipeline's MLflow run as one handle: its tracker and its run id, logged to by every stage."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autolr.tracking import Tracker


@dataclass(frozen=True)
class ParentRun:
    """The pipeline's MLflow run, the parent of its trials' runs: every stage logs through it."""

    tracker: Tracker
    run_id: str

    @property
    def tracking_uri(self) -> str:
        return self.tracker.tracking_uri

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.tracker.log_params(self.run_id, params)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self.tracker.log_metrics(self.run_id, metrics, step=step)

    def log_series(self, series: Mapping[str, Sequence[float]]) -> None:
        self.tracker.log_series(self.run_id, series)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.tracker.log_artifact(self.run_id, path, folder)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tracker.set_tags(self.run_id, tags)

    def system_metrics(self, *, resume: bool) -> contextlib.AbstractContextManager[None]:
        return self.tracker.system_metrics(self.run_id, resume=resume)

    def end_trial_runs(self, status: str) -> None:
        """End the trial runs under this run that are still RUNNING."""
        from autolr.tracking import PARENT_TAG

        for record in self.tracker.find_runs({PARENT_TAG: self.run_id}):
            if record.status == "RUNNING":
                self.tracker.end_run(record.run_id, status)

    def end(self, status: str) -> None:
        self.tracker.end_run(self.run_id, status)
