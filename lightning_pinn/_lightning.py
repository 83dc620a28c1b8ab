"""Lightning's classes as both of its distributions spell them.

Lightning ships the same Trainer twice: ``pytorch_lightning`` (this package's dependency) and
the unified ``lightning`` package (``import lightning as L``; ``lightning.pytorch``). Their
classes are distinct: a ``lightning.pytorch.loggers.TensorBoardLogger`` is not an instance of
``pytorch_lightning.loggers.TensorBoardLogger``. The callbacks call only duck-typed Trainer
methods, so they run under either Trainer, but wherever they ask "is this a TensorBoard logger /
an EarlyStopping / a ModelCheckpoint?" they must accept both spellings, or a user of
``lightning.pytorch`` silently loses the dashboard layout and the cadence warnings.

The ``lightning.pytorch`` classes are looked up only once that package has been imported (a
Trainer or logger from it cannot exist before), so users of ``pytorch_lightning`` alone never
pay for importing it.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__all__ = ["lightning_classes"]

_DISTRIBUTIONS = ("pytorch_lightning", "lightning.pytorch")


def lightning_classes(module: str, name: str) -> tuple[type[Any], ...]:
    """``<distribution>.<module>.<name>`` for each Lightning distribution that is loaded.

    Example: ``lightning_classes("loggers", "TensorBoardLogger")`` is
    ``(pytorch_lightning.loggers.TensorBoardLogger,)``, plus
    ``lightning.pytorch.loggers.TensorBoardLogger`` once ``lightning.pytorch`` is imported.
    """
    found: list[type[Any]] = []
    for distribution in _DISTRIBUTIONS:
        if distribution != _DISTRIBUTIONS[0] and distribution not in sys.modules:
            continue
        found.append(getattr(importlib.import_module(f"{distribution}.{module}"), name))
    return tuple(found)
