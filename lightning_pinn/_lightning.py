"""Lightning's classes as both of its distributions spell them.

Lightning ships the same Trainer twice: ``pytorch_lightning`` (this package's dependency) and
the unified ``lightning`` package (``import lightning as L``; ``lightning.pytorch``). Their
classes are distinct: a ``lightning.pytorch.loggers.TensorBoardLogger`` is not an instance of
``pytorch_lightning.loggers.TensorBoardLogger``. The callbacks call only duck-typed Trainer
methods, so they run under either Trainer, but wherever they ask "is this a TensorBoard logger /
an EarlyStopping / a ModelCheckpoint?" they must accept both spellings, or a user of
``lightning.pytorch`` silently loses the dashboard layout and the cadence warnings. Three things
live here:

* :func:`lightning_classes` — a class under both spellings, for ``isinstance``;
* :class:`LightningCallback` — the base of this package's callbacks: a subclass of
  ``pytorch_lightning``'s ``Callback`` and, when ``lightning.pytorch`` was imported before this
  package, of its ``Callback`` too, so ``lightning.pytorch.cli.LightningCLI`` (which checks
  ``issubclass(cls, Callback)`` before building a callback from YAML) accepts them. This package
  never imports ``lightning.pytorch`` itself: that import would point Lightning's shared
  rank-zero logging (below) away from the distribution the user imports later;
* :func:`console_info` — the callbacks' console messages, through the rank-zero logger of the
  distribution whose Trainer runs the fit.

Importing both distributions has a side effect this module undoes: each one, when imported,
points the rank-zero logging that both share (``lightning_utilities.core.rank_zero``) at its own
logger, so whichever came last would decide where *all* of Lightning's messages go. This
package imports ``pytorch_lightning``; after a user's ``import lightning``, it puts that routing
back as it found it.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import TYPE_CHECKING, Any

__all__ = ["LightningCallback", "console_info", "lightning_classes"]

_DISTRIBUTIONS = ("pytorch_lightning", "lightning.pytorch")
#: What each distribution's import sets in ``lightning_utilities.core.rank_zero`` for itself.
_SHARED_SETTINGS = ("log", "rank_zero_deprecation_category")


def _import_keeping_log_routing(name: str) -> Any:
    """``importlib.import_module(name)``, restoring the shared rank-zero logging settings that
    Lightning's import overwrites (its logger and its deprecation-warning class) when another
    distribution had set them already (also when the import fails halfway)."""
    if name in sys.modules:
        return sys.modules[name]
    shared = sys.modules.get("lightning_utilities.core.rank_zero")
    set_by_another = shared is not None and any(distribution in sys.modules for distribution in _DISTRIBUTIONS)
    before = {key: getattr(shared, key) for key in _SHARED_SETTINGS if hasattr(shared, key)} if set_by_another else {}
    try:
        return importlib.import_module(name)
    finally:
        for key, value in before.items():
            setattr(shared, key, value)


_import_keeping_log_routing("pytorch_lightning")
# the unified package's Callback, where the user imported it before this package
_UNIFIED_CALLBACK: type[Any] | None = getattr(sys.modules.get("lightning.pytorch"), "Callback", None)

if TYPE_CHECKING:
    from pytorch_lightning import Callback as LightningCallback
elif _UNIFIED_CALLBACK is None:
    from pytorch_lightning import Callback as LightningCallback
else:
    from pytorch_lightning import Callback as _PytorchLightningCallback

    class LightningCallback(_PytorchLightningCallback, _UNIFIED_CALLBACK):
        """A ``Callback`` of both ``pytorch_lightning`` and ``lightning.pytorch``."""


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


def console_info(trainer: Any, message: str) -> None:
    """Log ``message`` at INFO on rank zero, through ``<distribution>.utilities.rank_zero``:
    the logger Lightning's own messages use under the Trainer running the fit
    (``pytorch_lightning`` or ``lightning.pytorch``), whatever was imported last."""
    if getattr(trainer, "global_rank", 0) != 0:
        return
    unified = sys.modules.get("lightning.pytorch")
    distribution = "lightning.pytorch" if unified is not None and isinstance(trainer, unified.Trainer) else "pytorch_lightning"
    logging.getLogger(f"{distribution}.utilities.rank_zero").info(message)
