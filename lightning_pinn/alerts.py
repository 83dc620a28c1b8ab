"""Warning categories raised by lightning-pinn, so users can filter or escalate them.

Example: turn the loss-balance alarm into an error in a test suite::

    import warnings
    from lightning_pinn.alerts import LossBalanceWarning
    warnings.simplefilter("error", LossBalanceWarning)
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LossBalanceWarning", "GradientConflictWarning", "TermGradientWarning", "WeightUpdateWarning", "FitWarnings"]


class LossBalanceWarning(UserWarning):
    """Two terms' weighted gradient norms differ by more than the monitor's threshold."""


class GradientConflictWarning(LossBalanceWarning):
    """Two terms' gradients point against each other (cosine below the threshold) for several measurements."""


class TermGradientWarning(UserWarning):
    """A term's gradient is exactly zero or not finite, so it cannot be balanced."""


class WeightUpdateWarning(UserWarning):
    """A balancer skipped or clamped a weight update."""


@dataclass
class _Held:
    message: str
    category: type[Warning]
    filename: str
    lineno: int
    module_globals: dict[str, Any]


@dataclass
class FitWarnings:
    """A callback's warnings: shown once per fit, not once per process, and raised after a step's
    bookkeeping rather than in the middle of it.

    ``warnings.warn`` records each (text, category, line) it showed in the calling module's
    ``__warningregistry__``, and Python's default filter then hides the same warning for the rest
    of the process: a notebook re-running the same bad fit (same seed, same numbers) would see
    its loss-balance alarm the first time only. Each callback instead keeps its own registry,
    emptied by :meth:`new_fit`, and passes it to ``warnings.warn_explicit``. Filters apply as
    usual (``"error"`` raises, ``"ignore"`` hides), except that CPython's ``"once"`` keeps its
    record in the registry given, so it too means once per fit here.

    Between :meth:`hold` and :meth:`release` warnings wait, so a warning turned into an error
    (``warnings.simplefilter("error", LossBalanceWarning)``) stops the fit only after the
    measurement that raised it is recorded, logged and acted on. Only rank zero warns.
    """

    _registry: dict[Any, Any] = field(default_factory=dict)
    _held: list[_Held] | None = None

    def new_fit(self) -> None:
        """Forget which warnings were shown: the next fit shows them again."""
        self._registry = {}

    def warn(self, message: str, category: type[Warning] = UserWarning, stacklevel: int = 1) -> None:
        """``warnings.warn(message, category)`` attributed to the caller ``stacklevel`` frames up."""
        if _rank() != 0:
            return
        frame = sys._getframe(stacklevel)
        held = _Held(message, category, frame.f_code.co_filename, frame.f_lineno, frame.f_globals)
        if self._held is not None:
            self._held.append(held)
        else:
            self._show(held)

    def hold(self) -> None:
        """Keep warnings back until :meth:`release`."""
        self._held = []

    def release(self, show: bool = True) -> None:
        """Show the warnings held back (``show=False``: drop them, e.g. after a failure)."""
        held, self._held = self._held or [], None
        if show:
            for item in held:
                self._show(item)

    def _show(self, held: _Held) -> None:
        globals_ = held.module_globals
        warnings.warn_explicit(
            held.message,
            held.category,
            held.filename,
            held.lineno,
            module=globals_.get("__name__", "<string>"),
            registry=self._registry,
            module_globals=globals_,
        )


def _rank() -> int:
    from pytorch_lightning.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0))
