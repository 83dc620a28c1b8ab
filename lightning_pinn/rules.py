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
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "GradNormRule",
    "grad_norm_weights",
    "ntk_trace_weights",
    "inverse_ratio_weights",
    "held_at_reference",
    "smooth",
    "softadapt_weights",
    "relobralo_balance",
    "relobralo_weights",
    "gradient_entry_statistics",
    "lr_annealing_weights",
    "inverse_training_rates",
    "gradnorm_objective",
    "uncertainty_objective",
]

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


def held_at_reference(targets: Sequence[float], reference: int) -> list[float]:
    """A rule's targets rescaled so that the reference term's is 1: ``λ̂_i / λ̂_ref``.

    For a rule of the form ``λ̂_i = c / q_i`` (gradient-norm max/mean, NTK ``Σ t / t_i``) this is
    ``q_ref / q_i``, the reference form of Wang, Teng & Perdikaris 2021. All ``nan`` (no weight
    changes) when the reference's target is zero, negative or not finite.
    """
    targets = [float(v) for v in targets]
    scale = targets[reference]
    if not _usable(scale):
        return [math.nan] * len(targets)
    return [v / scale for v in targets]


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


# --------------------------------------------------------------------------- loss-based rules
def _softmax_times_k(scores: Sequence[float]) -> list[float]:
    """``K · softmax(scores)``: weights that average to 1.

    Scores of ``+inf`` (a ratio that overflowed, e.g. a previous loss near the smallest float)
    take the softmax's limit: they share ``K`` and the others get 0.
    """
    if any(math.isnan(score) for score in scores):
        return [math.nan] * len(scores)  # (max() of a list holding NaN depends on the order)
    top = max(scores)
    if top == math.inf:
        infinite = [score == math.inf for score in scores]
        return [len(scores) / sum(infinite) if inf else 0.0 for inf in infinite]
    exps = [math.exp(score - top) for score in scores]
    total = sum(exps)
    return [len(scores) * e / total for e in exps]


def softadapt_weights(
    losses: Sequence[float], previous: Sequence[float], beta: float = 0.1, normalized: bool = True, loss_weighted: bool = False
) -> list[float]:
    """SoftAdapt: weight each term by how badly its loss is progressing.

    Heydari, Thompson & Mehmood 2019, "SoftAdapt: techniques for adaptive loss weighting of
    neural networks with multi-part loss functions", arXiv:1912.12355. With the rate of change
    ``s_i = L_i(t) − L_i(t−1)`` (divided by ``Σ_j |s_j|`` when ``normalized``),

        ``λ̂_i = K · exp(β s_i) / Σ_j exp(β s_j)``      (``loss_weighted``: ``∝ L_i exp(β s_i)``),

    so a term whose loss falls slowest (or rises) gets the largest weight. The weights average
    to 1.
    """
    slopes = [now - before for now, before in zip(losses, previous)]
    if normalized:
        scale = sum(abs(s) for s in slopes)
        slopes = [s / scale if scale > 0 else 0.0 for s in slopes]
    weights = _softmax_times_k([beta * s for s in slopes])
    if loss_weighted:
        scaled = [w * loss for w, loss in zip(weights, losses)]
        total = sum(scaled)
        weights = [len(scaled) * v / total for v in scaled] if total > 0 else weights
    return weights


def relobralo_balance(losses: Sequence[float], reference: Sequence[float], temperature: float = 0.1) -> list[float]:
    """ReLoBRaLo's balancing term ``λ̂_i(t, t') = K · softmax_i(L_i(t) / (T · L_i(t')))``.

    Bischof & Kraus 2021, "Multi-objective loss balancing for physics-informed deep learning",
    arXiv:2110.09813. A term whose loss fell least since ``t'`` (largest ratio) gets the largest
    weight.
    """
    # divided in turn: T·L(t') can round to 0 for a tiny previous loss, where L(t)/L(t') overflows to inf
    return _softmax_times_k([now / before / temperature if before > 0 else 0.0 for now, before in zip(losses, reference)])


def relobralo_weights(
    current: Sequence[float],
    losses: Sequence[float],
    previous: Sequence[float],
    initial: Sequence[float],
    alpha: float = 0.999,
    rho: float = 1.0,
    temperature: float = 0.1,
) -> list[float]:
    """One ReLoBRaLo update (Bischof & Kraus 2021, eq. 11):

        ``λ_i(t) = α (ρ λ_i(t−1) + (1 − ρ) λ̂_i(t, 0)) + (1 − α) λ̂_i(t, t−1)``

    where ``ρ`` is a Bernoulli draw ("saudade": with probability ``1 − E[ρ]`` the history is
    replaced by the balance against the initial losses) and ``λ̂`` is :func:`relobralo_balance`.
    """
    against_start = relobralo_balance(losses, initial, temperature)
    against_last = relobralo_balance(losses, previous, temperature)
    return [alpha * (rho * old + (1 - rho) * start) + (1 - alpha) * last for old, start, last in zip(current, against_start, against_last)]


# --------------------------------------------------------------------------- gradient statistics
def gradient_entry_statistics(
    gradients: Tensor, statistics: Sequence[GradNormRule], weights: Tensor | None = None
) -> tuple[list[float], ...]:
    """The statistics of learning-rate annealing: ``max_j |g_ij|`` or ``mean_j |g_ij|`` per term ``i``.

    ``gradients`` is the ``(K, P)`` matrix of the terms' flattened gradients ``g_i = ∇θ L_i``; the
    statistic is taken over its ``P`` entries (all trainable parameters). With ``weights``, over
    ``|λ_i g_ij|`` instead: the gradient of the *weighted* loss, as Wang, Teng & Perdikaris's 2021
    code differentiated it. One list of ``K`` floats per name in ``statistics``, in order.
    """
    magnitudes = gradients.abs()
    if weights is not None:
        magnitudes = magnitudes * weights.to(device=magnitudes.device, dtype=magnitudes.dtype).unsqueeze(1)
    reduce = {"max": lambda t: t.max(dim=1).values, "mean": lambda t: t.mean(dim=1)}
    return tuple(reduce[name](magnitudes).tolist() for name in statistics)


def lr_annealing_weights(numerator_stats: Sequence[float], denominator_stats: Sequence[float], reference: int) -> list[float]:
    """Learning-rate annealing as in the 2021 code of Wang, Teng & Perdikaris.

    ``λ̂_i = stat₁(|∇θ L_ref|) / stat₂(|∇θ L_i|)`` where the statistics are taken over the
    gradient's entries: the released code uses ``max`` for the reference (PDE residual) term
    and ``mean`` for the others (``numerator_stats[ref] = max |∇θ L_ref|``,
    ``denominator_stats[i] = mean |∇θ L_i|``). Unlike the norm rule this compares the largest
    single entry with a typical one, so the weights come out larger. ``nan`` where undefined;
    the reference term gets 1.
    """
    top = numerator_stats[reference]
    if not _usable(top):
        return [math.nan] * len(denominator_stats)
    weights = inverse_ratio_weights(denominator_stats, top)
    weights[reference] = 1.0
    return weights


# --------------------------------------------------------------------------- weights trained by gradient
def inverse_training_rates(losses: Sequence[float], initial_losses: Sequence[float]) -> list[float]:
    """GradNorm's inverse training rates ``r_i = L̃_i / mean_j L̃_j`` with ``L̃_i = L_i(t) / L_i(0)``
    (Chen, Badrinarayanan, Lee & Rabinovich 2018): above 1 for a term whose loss falls slower
    than the others'. A term with ``L_i(0) = 0`` counts as ``L̃_i = 1``; all rates are 1 when
    every ``L̃`` is 0."""
    ratios = [loss / initial if initial > 0 else 1.0 for loss, initial in zip(losses, initial_losses)]
    mean_ratio = sum(ratios) / len(ratios)
    return [ratio / mean_ratio if mean_ratio > 0 else 1.0 for ratio in ratios]


def gradnorm_objective(weights: Tensor, grad_norms: Tensor, loss_ratios: Tensor, alpha: float) -> Tensor:
    """GradNorm's gradient loss (Chen, Badrinarayanan, Lee & Rabinovich 2018, ICML), to minimise over ``weights``.

    With ``G_i = w_i ‖∇θ L_i‖`` (the paper takes the last shared layer; here all trainable
    parameters), the inverse training rate ``r_i = L̃_i / mean_j L̃_j`` (``L̃_i = L_i(t)/L_i(0)``)
    and the target ``mean_j G_j · r_i^α`` held constant:

        ``L_grad = Σ_i |G_i − mean_j G_j · r_i^α|``.

    A term with a small gradient (or a slow-falling loss) has ``G_i`` below target, so
    gradient descent raises its weight.
    """
    import torch

    g = weights * grad_norms
    target = (g.mean() * loss_ratios.pow(alpha)).detach()
    return torch.sum(torch.abs(g - target))


def uncertainty_objective(log_variances: Tensor, losses: Tensor) -> Tensor:
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla 2018, CVPR), to minimise over ``s = log σ²``.

        ``Σ_i exp(−s_i) L_i + s_i``   (the regression form ``L_i/(2σ_i²) + log σ_i``, times 2),

    whose minimum is at ``exp(−s_i) = 1 / L_i``: the weight ``λ_i = exp(−s_i)`` of a term with a
    smaller loss grows.
    """
    import torch

    return torch.sum(torch.exp(-log_variances) * losses + log_variances)
