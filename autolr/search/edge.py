"""The LR scales' one adaptive step: past the edge of the range when the best lies on it.

The search tries the curve's pick times each of ``lr_scales`` in turn. When the
best of those trials trained at the lowest or the highest scale, the best LR may
lie beyond the range, and the trial that would have repeated the pick goes one
step of the scales' own spacing past that edge instead (``5 * 5 / 3.3`` above,
``0.2 * 0.2 / 0.3`` below). On the selection suite the best of the first 9
trials lay on an edge in 8 of 36 pipeline runs; on the linear-MLP regression it
was the highest scale in both runs, 0.2 decade below the grid's best LR, which
cost it +8.9 % of MSE, the suite's worst regression gap. The rule, `autolr.confirm.edge_step`,
is shared with `autolr.confirm_lr`; this module keeps Tune's side of it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

from ray.tune.search import BasicVariantGenerator

from autolr.confirm import edge_step

log = logging.getLogger(__name__)


class ExtendAtEdge(BasicVariantGenerator):
    """Tune's BasicVariantGenerator with the same draws and points, but for one trial.

    The trial that comes after one trial of each scale (the ``len(scales) + 1``-th)
    waits until those have ended (and so do the trials after it); if their best
    trained at an edge scale (`edge_step`), it trains at `beyond_edge` of it,
    otherwise at its own point's scale. Only its ``lr_scale`` changes: its weight
    decay and BN momentum are the draws it would have had, so every other trial is
    the one a plain generator gives. The state pickles with the generator's, so a
    resumed search keeps its decision.
    """

    def __init__(
        self,
        *,
        scales: list[float],
        metric: str,
        higher_is_better: bool,
        max_t: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.scales = sorted(scales)
        self.metric_key, self.higher_is_better, self.max_t = metric, higher_is_better, max_t
        self.first: dict[str, float] = {}  # trial id -> scale, of the first len(scales)
        self.ended: dict[str, tuple[float, bool]] = {}  # trial id -> (metric, full budget)
        self.decided = False
        self.extension: float | None = None  # the scale tried past the edge, if any

    def next_trial(self):
        if len(self.first) == len(self.scales) and not self.decided:
            if len(self.ended) < len(self.scales):
                return None  # Tune asks again after its next event
            self._decide()
        with _quiet(logging.getLogger("ray.tune.search.variant_generator"), "Pre-set value"):
            # Tune warns that the scale past the edge is not one of lr_scale's choices.
            trial = super().next_trial()
        if trial is not None and len(self.first) < len(self.scales):
            self.first[trial.trial_id] = float(trial.config["lr_scale"])
        return trial

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        super().on_trial_result(trial_id, result)
        # running again: a trial that erred before a resume (resume_errored) is retried
        self.ended.pop(trial_id, None)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        super().on_trial_complete(trial_id, result=result, error=error)
        if trial_id in self.first:
            result = result or {}
            value = float(result.get(self.metric_key, math.nan))
            self.ended[trial_id] = (value, int(result.get("epoch", 0)) >= self.max_t)

    def _decide(self) -> None:
        self.decided = True
        ended = [(self.first[t], value, full) for t, (value, full) in self.ended.items()]
        self.extension = edge_step(self.scales, ended, self.higher_is_better)
        # The points not yet drawn: private to Tune's generator (ray 2.60), read here so
        # that the trial keeps the weight decay and BN momentum it would have drawn.
        iterators = getattr(self, "_iterators", None) or [None]
        upcoming = getattr(iterators[-1], "points_to_evaluate", None)
        if upcoming is None:
            log.warning("this Ray's Tune keeps its points elsewhere; no trial past the edge")
            self.extension = None
        if self.extension is None or not upcoming:
            return
        upcoming[0]["lr_scale"] = self.extension
        log.info(
            "the best of the first %d trials trained at an edge LR scale; the next tries %g",
            len(self.scales),
            self.extension,
        )


@contextlib.contextmanager
def _quiet(logger: logging.Logger, prefix: str) -> Iterator[None]:
    """Drop ``logger``'s records whose message starts with ``prefix`` within the block."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
