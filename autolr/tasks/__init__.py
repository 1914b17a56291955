"""Built-in tasks and the Task contract.

A task is referenced by a built-in name (``"mnist1d"``) or as
``"module:function"`` for a user's own builder.

Example:
    >>> from autolr.tasks import build_task, resolve
    >>> resolve("digits")
    'autolr.tasks.digits:build'
    >>> build_task(resolve("digits")).name
    'digits'
"""

from __future__ import annotations

from autolr.errors import TaskError
from autolr.tasks.base import Task, build_task, load_builder

# Builders are imported only when used: cifar10 reads from disk, mnist1d generates data.
BUILTIN = {
    "mnist1d": "autolr.tasks.mnist1d:build",  # the default: 1-D CNN + BN, SGD
    "digits": "autolr.tasks.digits:build",  # 2-D CNN + BN, AdamW
    "mnist1d_mlp": "autolr.tasks.mnist1d_mlp:build",  # MLP without BN, AdamW
    "cifar10": "autolr.tasks.cifar10:build",  # ResNet-56, SGD; needs a local CIFAR-10
}


def resolve(name_or_ref: str) -> str:
    """The ``"module:function"`` reference for a built-in task name or a reference."""
    if name_or_ref in BUILTIN:
        return BUILTIN[name_or_ref]
    if ":" in name_or_ref:
        return name_or_ref
    raise TaskError(
        f"task must be a built-in name ({', '.join(BUILTIN)}) or 'module:function', "
        f"but got {name_or_ref!r}."
    )


__all__ = ["BUILTIN", "Task", "build_task", "load_builder", "resolve"]
