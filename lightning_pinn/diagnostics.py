"""Pure functions that turn per-term gradients into the numbers the monitor reports.

Notation: terms ``i = 1..K``, unweighted losses ``L_i``, gradients ``g_i = ∇θ L_i`` over all
trainable parameters, weights ``λ_i``.

* gradient norm ``‖g_i‖₂`` and weighted norm ``λ_i ‖g_i‖₂``;
* imbalance ratio ``max_i λ_i‖g_i‖ / min_i λ_i‖g_i‖`` over the terms with a non-zero, finite
  weighted norm — the quantity whose size (10²–10³) signals the gradient-flow pathology of
  Wang, Teng & Perdikaris 2021 (SIAM J. Sci. Comput. 43(5), A3055);
* cosine ``⟨g_a, g_b⟩ / (‖g_a‖ ‖g_b‖)`` between two terms' gradients: a strongly negative
  value means a step that lowers one term raises the other (gradient conflict; see Yu et al.
  2020, "Gradient surgery for multi-task learning", for the same diagnosis in multi-task
  learning), which can stall training even when the norms are balanced;
* residual-scaled ratio ``(λ_a‖g_a‖/√L_a) / (λ_b‖g_b‖/√L_b)``: the imbalance per unit of RMS
  residual, which tells a neglected term from a nearly satisfied one (see
  :func:`residual_scaled_ratio`).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GradientReport", "gradient_norms", "imbalance", "nearly_satisfied", "residual_scaled_ratio", "summarize_gradients"]


def gradient_norms(gradients: Tensor) -> Tensor:
    """Row-wise Euclidean norms ``‖g_i‖₂`` of a ``(K, P)`` matrix of flattened gradients.

    Computed in float64. A sum of squares overflows once entries pass ~1e154 and underflows
    (to 0, or to a subnormal that has lost digits) once they fall below ~1e-154 (float64
    gradients can do both), so such rows are recomputed scaled, ``‖g‖ = s·‖g/s‖`` with
    ``s = max_j |g_j|``: only a gradient with a NaN or infinite entry has a non-finite norm,
    and only an exactly zero one has a zero norm.
    """
    return _norms_and_directions(gradients.to(torch.float64))[0]


#: Above this, a squared norm or a product of two norms (the Gram matrix) may overflow float64.
_OVERFLOW_RISK = 1e150
#: Below this (0 included), a squared norm or a product of two norms may have underflowed float64.
_UNDERFLOW_RISK = 1e-140


def _norms_and_directions(grads: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(‖g_i‖, G', ‖g'_i‖)`` for float64 rows ``G``: ``G' = G`` unless a norm is large enough
    for ``G Gᵀ`` (or the norm itself) to overflow, or small enough to have underflowed; then
    each row is divided by its largest entry, which leaves the cosines
    ``(G' G'ᵀ)_ab / (‖g'_a‖ ‖g'_b‖)`` unchanged."""
    norms = torch.linalg.vector_norm(grads, dim=1)
    if not grads.numel() or bool(((norms <= _OVERFLOW_RISK) & (norms >= _UNDERFLOW_RISK)).all()):
        return norms, grads, norms  # the usual case (a NaN or zero norm falls through to the check below)
    entries_finite = torch.isfinite(grads).all(dim=1)
    scale = grads.abs().amax(dim=1)
    scale = torch.where(entries_finite & (scale > 0), scale, torch.ones_like(scale))
    directions = grads / scale[:, None]
    direction_norms = torch.linalg.vector_norm(directions, dim=1)
    return torch.where(entries_finite, scale * direction_norms, norms), directions, direction_norms


def imbalance(weighted_norms: list[float]) -> tuple[float, int, int] | None:
    """``(ratio, index of largest, index of smallest)`` over finite, non-zero weighted norms.

    Terms whose weighted norm is zero (the gradient is zero, or ``λ_i = 0``) or not finite
    are left out rather than turned into an infinite or NaN ratio. Returns ``None`` when fewer
    than two terms remain.
    """
    valid = [(value, i) for i, value in enumerate(weighted_norms) if math.isfinite(value) and value > 0]
    if len(valid) < 2:
        return None
    largest_value, largest = max(valid)
    smallest_value, smallest = min(valid)
    return largest_value / smallest_value, largest, smallest


def residual_scaled_ratio(norm_a: float, loss_a: float, norm_b: float, loss_b: float) -> float | None:
    """``(‖g_a‖/√L_a) / (‖g_b‖/√L_b)``: a gradient-norm ratio per unit of RMS residual.

    ``norm_a``/``norm_b`` are both weighted (``λ‖∇L‖``) or both unweighted (``‖∇L‖``). For
    ``L = mean(r²)`` over ``N`` points, ``g = ∇θL = (2/N) Jᵀr``, so a term's gradient shrinks
    with its residual: a term that is nearly satisfied has a small gradient without being
    neglected. Dividing by ``√L`` (the RMS residual) removes that factor. ``None`` when a value
    is not positive and finite (e.g. a 0-dim term given as a negative loss).
    """
    if not all(math.isfinite(v) and v > 0 for v in (norm_a, loss_a, norm_b, loss_b)):
        return None
    return (norm_a / math.sqrt(loss_a)) / (norm_b / math.sqrt(loss_b))


def nearly_satisfied(norm_big: float, loss_big: float, norm_small: float, loss_small: float, within: float) -> float | None:
    """Whether term "small"'s smaller gradient comes from its smaller residual, not its scale.

    True (returned as the factor ``≥ 1`` between the two gradients per unit of RMS residual,
    :func:`residual_scaled_ratio`) when ``loss_small < loss_big`` and that factor is at most
    ``within``, either way; ``None`` otherwise. Gradient-norm balancing (Wang, Teng &
    Perdikaris 2021) still raises such a term's weight roughly as ``1/√L``, which can
    destabilise a fit; an NTK trace does not shrink with the residual.
    """
    scaled = residual_scaled_ratio(norm_big, loss_big, norm_small, loss_small)
    if scaled is None or not loss_small < loss_big:
        return None
    factor = max(scaled, 1 / scaled)
    return factor if factor <= within else None


@dataclass(frozen=True)
class GradientReport:
    """Everything the monitor logs about one measurement (plain Python numbers).

    Attributes:
        terms: Term names in order.
        losses: Unweighted losses ``L_i`` (``nan`` for an absent term).
        weights: Weights ``λ_i`` in effect for the step.
        norms: ``‖∇θ L_i‖₂`` of the unweighted losses (``nan`` for an absent term).
        weighted_norms: ``λ_i · ‖∇θ L_i‖₂``.
        ratio: Largest over smallest weighted norm (``None`` with fewer than two usable terms),
            over the monitor's ``ratio_terms`` when it has them.
        largest: Term with the largest weighted norm (``None`` when ``ratio`` is ``None``).
        smallest: Term with the smallest weighted norm.
        cosines: ``{(a, b): cos(g_a, g_b)}`` for each pair ``a`` before ``b`` whose gradients
            are both non-zero and finite.
        zero_terms: Present terms whose gradient is exactly zero.
        unreached_terms: Present terms whose loss reaches no trainable parameter at all (a
            subset of ``zero_terms``).
        nonfinite_terms: Terms whose gradient contains NaN or inf.
        absent_terms: Terms passed as ``None`` throughout the step (left out of everything).
    """

    terms: tuple[str, ...]
    losses: tuple[float, ...]
    weights: tuple[float, ...]
    norms: tuple[float, ...]
    weighted_norms: tuple[float, ...]
    ratio: float | None
    largest: str | None
    smallest: str | None
    cosines: dict[tuple[str, str], float]
    zero_terms: tuple[str, ...]
    unreached_terms: tuple[str, ...]
    nonfinite_terms: tuple[str, ...]
    absent_terms: tuple[str, ...]

    @property
    def present_terms(self) -> tuple[str, ...]:
        """Terms measured in this step."""
        return tuple(name for name in self.terms if name not in self.absent_terms)


def summarize_gradients(
    terms: tuple[str, ...],
    losses: Tensor,
    weights: Tensor,
    gradients: Tensor,
    present: Tensor | None = None,
    reached: Tensor | None = None,
    with_cosines: bool = True,
    ratio_terms: Collection[str] | None = None,
) -> GradientReport:
    """Compute norms, weighted norms, the imbalance ratio and pairwise cosines for one step.

    The norms and the Gram matrix ``G Gᵀ`` (for ``cos(g_a, g_b) = (G Gᵀ)_ab / (‖g_a‖ ‖g_b‖)``)
    are moved to Python in one transfer (rows scaled first where they could overflow float64).
    Absent terms (``present`` false) are left out. With ``ratio_terms``, the imbalance ratio
    compares those terms only (e.g. to leave a small regulariser out of it); everything else
    still covers every term.
    """
    count = len(terms)
    is_present = [True] * count if present is None else [bool(v) for v in present.tolist()]
    did_reach = [True] * count if reached is None else [bool(v) for v in reached.tolist()]
    norms_t, directions, direction_norms = _norms_and_directions(gradients.to(torch.float64))
    rows = torch.cat([norms_t[:, None], direction_norms[:, None], directions @ directions.T], dim=1).tolist()
    norms = [row[0] if is_present[i] else math.nan for i, row in enumerate(rows)]
    scaled_norms = [row[1] for row in rows]
    gram = [row[2:] for row in rows]
    lambdas = weights.to(torch.float64).tolist()
    weighted = [(lam * norm if lam != 0 else 0.0) if is_present[i] else math.nan for i, (lam, norm) in enumerate(zip(lambdas, norms))]
    absent = tuple(name for name, here in zip(terms, is_present) if not here)
    nonfinite = tuple(name for name, norm, here in zip(terms, norms, is_present) if here and not math.isfinite(norm))
    zero = tuple(name for name, norm in zip(terms, norms) if norm == 0)
    unreached = tuple(name for name, here, hit in zip(terms, is_present, did_reach) if here and not hit)
    found = imbalance(weighted if ratio_terms is None else [w if name in ratio_terms else math.nan for name, w in zip(terms, weighted)])
    ratio, largest, smallest = (found[0], terms[found[1]], terms[found[2]]) if found else (None, None, None)
    cosines: dict[tuple[str, str], float] = {}
    if with_cosines:
        usable = [norm > 0 and math.isfinite(norm) for norm in norms]
        for a in range(count):
            for b in range(a + 1, count):
                if usable[a] and usable[b]:
                    cosines[(terms[a], terms[b])] = max(-1.0, min(1.0, gram[a][b] / (scaled_norms[a] * scaled_norms[b])))
    return GradientReport(
        terms=terms,
        losses=tuple(losses.tolist()),
        weights=tuple(lambdas),
        norms=tuple(norms),
        weighted_norms=tuple(weighted),
        ratio=ratio,
        largest=largest,
        smallest=smallest,
        cosines=cosines,
        zero_terms=zero,
        unreached_terms=unreached,
        nonfinite_terms=nonfinite,
        absent_terms=absent,
    )
