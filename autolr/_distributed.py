"""What the range test and training need from torch.distributed, and nothing when it is off.

Every rank runs the same code; a decision taken from a rank's own loss (stop the
sweep, raise on NaN) must be taken from the mean over the ranks, or one rank
leaves the collective that the others wait in.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Ranks in the default process group; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """``value`` averaged over the ranks (a copy); ``value`` itself on a single process."""
    size = world_size()
    if size == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)  # SUM: gloo has no AVG
    return total / size


def sum_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over the ranks (a copy); ``value`` itself on a single process."""
    if world_size() == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total
