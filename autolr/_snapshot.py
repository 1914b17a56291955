"""A snapshot of everything an LR range test changes, and its exact restore."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from torch import nn


@dataclass
class SavedState:
    """Everything a range test changes, by reference and as a deep copy.

    The restore writes the copies back *into* the original tensors and dicts,
    so the model and optimizer keep their own objects and whatever else holds
    them (a CUDA graph, a logger, a second optimizer sharing state) is restored
    too. ``optimizer.load_state_dict`` would install new tensors instead.
    """

    tensors: list[tuple[torch.Tensor, torch.Tensor]]  # (live tensor, its copy)
    buffers: list[tuple[dict, str, torch.Tensor | None]]  # (module._buffers, name, original)
    extra: dict  # the model's state_dict entries that are not tensors (get_extra_state)
    groups: list[tuple[dict, dict, dict]]  # (live dict, its original items, deep copy)
    states: dict[torch.Tensor, tuple[dict, dict, dict]]  # param -> the same, for its state
    grads: list[tuple[torch.Tensor, torch.Tensor | None]]
    training: list[tuple[nn.Module, bool]]
    rng: tuple

    @classmethod
    def capture(cls, model: nn.Module, optimizer: torch.optim.Optimizer, cuda: bool) -> SavedState:
        opt_params = (p for group in optimizer.param_groups for p in group["params"])
        params = list({id(p): p for p in chain(model.parameters(), opt_params)}.values())
        # Every buffer, persistent or not (state_dict skips the latter), and every
        # parameter the optimizer steps, in the model or not (a learnable loss
        # temperature): the sweep can change any of them.
        buffers = [
            (module._buffers, name, buffer)
            for module in model.modules()
            for name, buffer in module._buffers.items()
        ]
        live = {id(t): t for t in chain(params, (b for _, _, b in buffers if b is not None))}
        return cls(
            tensors=[(t, t.detach().clone()) for t in live.values()],
            buffers=buffers,
            extra=copy.deepcopy(
                {k: v for k, v in model.state_dict().items() if not isinstance(v, torch.Tensor)}
            ),
            groups=[
                (
                    group,
                    dict(group),
                    {k: copy.deepcopy(v) for k, v in group.items() if k != "params"},
                )
                for group in optimizer.param_groups
            ],
            states={p: (s, dict(s), copy.deepcopy(s)) for p, s in optimizer.state.items()},
            # The sweep sets every grad to None before its first backward, so the
            # original grad tensors are never written to: references suffice.
            grads=[(p, p.grad) for p in params],
            training=[(module, module.training) for module in model.modules()],
            rng=(
                random.getstate(),
                np.random.get_state(),
                torch.get_rng_state(),
                torch.cuda.get_rng_state_all() if cuda else None,
            ),
        )

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            for tensor, saved in self.tensors:
                tensor.copy_(saved)  # into the existing tensors: whoever holds them sees it
        for owner, name, buffer in self.buffers:
            owner[name] = buffer  # undoes a buffer the sweep replaced rather than updated
        if self.extra:
            model.load_state_dict(self.extra, strict=False)
        for live, items, saved in self.groups:
            _put_back(live, items, saved)
        for param in [p for p in optimizer.state if p not in self.states]:
            del optimizer.state[param]
        for param, (live, items, saved) in self.states.items():
            _put_back(live, items, saved)
            optimizer.state[param] = live
        for param, grad in self.grads:
            param.grad = grad
        for module, training in self.training:
            module.training = training
        python_rng, numpy_rng, torch_rng, cuda_rng = self.rng
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
        torch.set_rng_state(torch_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


@torch.no_grad()
def _put_back(live: dict, items: dict, saved: dict) -> None:
    """Make ``live`` hold ``items`` again, tensors refilled in place from ``saved``."""
    for key, value in saved.items():
        if isinstance(items[key], torch.Tensor):
            items[key].copy_(value)
        else:
            items[key] = value
    live.clear()  # drops keys the sweep added
    live.update(items)
