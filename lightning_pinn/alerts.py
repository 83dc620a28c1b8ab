"""Warning categories raised by lightning-pinn, so users can filter or escalate them.

Example: turn the loss-balance alarm into an error in a test suite::

    import warnings
    from lightning_pinn.alerts import LossBalanceWarning
    warnings.simplefilter("error", LossBalanceWarning)
"""

from __future__ import annotations

__all__ = ["LossBalanceWarning", "GradientConflictWarning", "TermGradientWarning", "WeightUpdateWarning"]


class LossBalanceWarning(UserWarning):
    """Two terms' weighted gradient norms differ by more than the monitor's threshold."""


class GradientConflictWarning(LossBalanceWarning):
    """Two terms' gradients point against each other (cosine below the threshold) for several measurements."""


class TermGradientWarning(UserWarning):
    """A term's gradient is exactly zero or not finite, so it cannot be balanced."""


class WeightUpdateWarning(UserWarning):
    """A balancer skipped or clamped a weight update."""
