"""What a search is given besides its space: where it writes, and how every trial trains.

Plain frozen records, checked when made, so that `search` takes two typed
objects instead of ten loose keywords (six of them plumbing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from autolr._checks import check_int
from autolr.config import RangeTestConfig
from autolr.errors import ArgumentError


@dataclass(frozen=True)
class SearchSite:
    """Where a search writes: the trials' MLflow runs, Tune's storage, the Ray cluster.

    Attributes:
        tracking_uri: an absolute MLflow URI: trials run in other working directories.
        experiment_id, parent_run_id: where the trials' child runs go; the driver
            must have created both (a fresh sqlite store races otherwise). No parent:
            the trials' runs are top-level.
        storage_path: where Tune keeps trial checkpoints and the experiment state, a
            local folder (made absolute) or a URI such as ``s3://bucket/prefix`` (see
            `check_storage`); a multi-node cluster needs one that every node reaches.
        name: the experiment's folder under ``storage_path``; also tagged on runs.
        ray_address: a Ray cluster to attach to (default: ``$RAY_ADDRESS``, else a
            private local Ray on all CPUs). A Ray that is already initialised is used.
    """

    tracking_uri: str
    experiment_id: str
    parent_run_id: str | None
    storage_path: str
    name: str
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[\w.-]+", self.name):
            raise ArgumentError(
                f"name must be a folder name of letters, digits, _ . -, but got name={self.name!r}."
            )

    @property
    def experiment_path(self) -> str:
        """The Tune experiment's folder or URI: ``storage_path/name``."""
        return f"{self.storage_path.rstrip('/')}/{self.name}"


@dataclass(frozen=True)
class TrialPlan:
    """How every trial trains, besides the point it samples.

    Attributes:
        epochs: the 1cycle budget of a trial (ASHA's ``max_t``).
        seed: the seed of every trial's training (None: the search's ``cfg.seed``).
            A final run with this seed, `trial_threads` threads and the best
            trial's settings and budget reproduces that trial.
        range_test: every trial steps its optimizer once per
            ``range_test.accumulation_steps`` batches, the effective batch the LR
            was picked for; in wd-aware mode (``cfg.wd_aware``) each trial re-runs
            this range test at its weight decay and BN momentum ...
        selection_method: ... and picks from it with this method.
    """

    epochs: int
    seed: int | None = None
    range_test: RangeTestConfig = field(default_factory=RangeTestConfig)
    selection_method: str = "changepoint"

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, minimum=1)
