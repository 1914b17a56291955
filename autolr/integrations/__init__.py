"""autolr where users already train: one module per framework, imported on demand.

- `autolr.integrations.lightning`: ``AutoLR`` callback and ``find_lr(trainer, module)``
  for Lightning (``pip install "autolr[lightning]"``).
- `autolr.integrations.transformers`: ``find_lr(trainer)`` for the Hugging Face
  ``Trainer`` (``pip install "autolr[transformers]"``).

Each runs `autolr.range_test` on the framework's own training step (through
its ``step_fn`` hook), picks the range with `autolr.select_lr`, restores the
model and optimizer, and installs a step-wise 1cycle
(`autolr.schedules.one_cycle`) through the framework's own scheduler slot.
"""
