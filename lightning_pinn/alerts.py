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


class GradientConflictWarning(UserWarning):
    """Two terms' gradients point against each other (cosine below the threshold) for several
    measurements while their loss stalls. A separate category from the ratio alarm's
    :class:`LossBalanceWarning`, so each alarm is filtered on its own."""


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
    measurement that raised it is recorded, logged and acted on by this callback.

    Rank zero shows the warnings. The other ranks show nothing but apply the same filters, so a
    warning an ``"error"`` filter turns into an exception stops every rank at the same step (the
    measurements are reduced across ranks, so every rank warns alike); a rank left running alone
    would wait in the next collective until the process group times out.
    """

    _registry: dict[Any, Any] = field(default_factory=dict)
    _held: list[_Held] | None = None

    def new_fit(self) -> None:
        """Forget which warnings were shown: the next fit shows them again."""
        self._registry = {}

    def warn(self, message: str, category: type[Warning] = UserWarning, stacklevel: int = 1) -> None:
        """``warnings.warn(message, category)`` attributed to the caller ``stacklevel`` frames up."""
        frame = sys._getframe(stacklevel)
        held = _Held(message, category, frame.f_code.co_filename, frame.f_lineno, frame.f_globals)
        if self._held is not None:
            self._held.append(held)
        else:
            self._show(held)

    def hold(self) -> None:
        """Keep warnings back until :meth:`release`."""
        self._held = []

    def release(self, failing: bool = False) -> None:
        """Show the warnings held back, in order.

        One that an ``"error"`` filter turns into an exception is raised after the others are
        shown. While the step is failing anyway (``failing``) it is not raised: the step's own
        exception is the one that propagates, and the warnings held (a NaN gradient, say) are
        still shown, since they may explain it.
        """
        held, self._held = self._held or [], None
        raised: Warning | None = None
        for item in held:
            try:
                self._show(item)
            except Warning as error:
                raised = raised or error
        if raised is not None and not failing:
            raise raised

    def _show(self, held: _Held) -> None:
        if _rank() == 0:
            self._warn_explicit(held)
            return
        with warnings.catch_warnings():
            warnings.showwarning = _show_nothing  # (restored on exit)
            self._warn_explicit(held)

    def _warn_explicit(self, held: _Held) -> None:
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


def _show_nothing(*args: Any, **kwargs: Any) -> None:
    """A ``warnings.showwarning`` for ranks other than zero."""


def _rank() -> int:
    from pytorch_lightning.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0))
