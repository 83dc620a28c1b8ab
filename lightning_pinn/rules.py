"""Loss-weighting rules as pure functions of per-term gradient norms or NTK traces.

Notation: terms ``i = 1..K``, unweighted losses ``L_i``, gradients ``g_i = ∇θ L_i`` over all
trainable parameters, weights ``λ_i``; the total loss is ``Σ_i λ_i L_i``.

Every rule returns the *target* weights ``λ̂``; :func:`smooth` blends them into the current
weights. The direction is the same for all rules: a term with a **smaller** gradient (or
smaller NTK trace) gets a **larger** weight, so that the weighted terms pull equally hard.

Rules
-----
* max gradient-norm ("learning-rate annealing"), Wang, Teng & Perdikaris 2021, SIAM J. Sci.
  Comput. 43(5) A3055: ``λ̂_i = max_j ‖g_j‖ / ‖g_i‖``.
* mean gradient-norm, Wang, Sankaran, Wang & Perdikaris 2023, "An expert's guide to training
  physics-informed neural networks", arXiv:2308.08468: ``λ̂_i = mean_j ‖g_j‖ / ‖g_i‖``.
* NTK trace, Wang, Yu & Perdikaris 2022, J. Comput. Phys. 449 110768, with the per-point
  trace of the 2023 guide: ``λ̂_i = Σ_j t_j / t_i``, ``t_i = mean_x ‖∂r_i(x)/∂θ‖²``.
* With a reference term ``r`` (held at ``λ = 1``): ``λ̂_i = ‖g_r‖ / ‖g_i‖`` (gradient norm; the
  same for "max" and "mean", which differ only by a common factor) or ``λ̂_i = t_r / t_i`` (NTK).

The gradients must be those of the **unweighted** losses: differentiating ``λ_i L_i`` instead
(as the 2021 release did) moves the fixed point to the square root of the intended ratio.

Smoothing (both papers): ``λ ← m·λ + (1 − m)·λ̂`` with momentum ``m`` (0.9 in the 2021 code
and the 2023 guide).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

__all__ = ["GradNormRule", "grad_norm_weights", "ntk_trace_weights", "inverse_ratio_weights", "smooth"]

GradNormRule = Literal["max", "mean"]

# The rules work on plain Python floats: K is small (a handful of terms), the inputs are K
# numbers already reduced from the gradients, and list arithmetic costs microseconds where a
# chain of tiny tensor operations costs tens of them on every update.


def _usable(value: float) -> bool:
    return math.isfinite(value) and value > 0


def inverse_ratio_weights(values: Sequence[float], scale: float) -> list[float]:
    """``λ̂_i = scale / values_i`` for positive finite ``values_i``; ``nan`` where undefined.

    A term whose value is zero or not finite has no defined weight (it would be infinite or
    NaN); callers keep that term's current weight.
    """
    return [scale / value if _usable(value) else math.nan for value in values]


def _reference_weights(values: Sequence[float], reference: int) -> list[float]:
    """``values[reference] / values_i``; all ``nan`` if the reference value is zero or not finite."""
    scale = values[reference]
    if not _usable(scale):
        return [math.nan] * len(values)
    return inverse_ratio_weights(values, scale)


def grad_norm_weights(norms: Sequence[float], rule: GradNormRule = "max", reference: int | None = None) -> list[float]:
    """Target weights from per-term gradient norms ``‖∇θ L_i‖`` of the unweighted losses.

    Args:
        norms: The K gradient norms.
        rule: ``"max"`` (Wang, Teng & Perdikaris 2021) or ``"mean"`` (Wang et al. 2023).
        reference: Index of the term held at ``λ = 1`` (``λ̂_i = ‖g_ref‖ / ‖g_i‖``), or ``None``.

    Returns:
        K target weights; ``nan`` for terms whose norm is zero or not finite (and for all
        terms if the reference's norm is unusable or no term has a usable norm).
    """
    if rule not in ("max", "mean"):
        raise ValueError(f"grad_norm_weights: rule must be 'max' or 'mean', got {rule!r}.")
    norms = [float(v) for v in norms]
    if reference is not None:
        return _reference_weights(norms, reference)
    usable = [v for v in norms if _usable(v)]
    if not usable:
        return [math.nan] * len(norms)
    scale = max(usable) if rule == "max" else sum(usable) / len(usable)
    return inverse_ratio_weights(norms, scale)


def ntk_trace_weights(traces: Sequence[float], reference: int | None = None) -> list[float]:
    """Target weights from per-term NTK traces ``t_i`` (Wang, Yu & Perdikaris 2022).

    ``λ̂_i = Σ_j t_j / t_i``, or ``t_ref / t_i`` with a reference term. Returns ``nan`` where a
    trace is zero or not finite.
    """
    traces = [float(v) for v in traces]
    if reference is not None:
        return _reference_weights(traces, reference)
    usable = [v for v in traces if _usable(v)]
    if not usable:
        return [math.nan] * len(traces)
    return inverse_ratio_weights(traces, sum(usable))


def smooth(current: Sequence[float], target: Sequence[float], momentum: float) -> list[float]:
    """Exponential moving average ``m·current + (1 − m)·target``, term by term."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"smooth: momentum must be in [0, 1), got {momentum}.")
    return [momentum * c + (1.0 - momentum) * t for c, t in zip(current, target)]
