"""More weighting rules from the field, each a callback on the same engine and base class.

Formulas live in :mod:`lightning_pinn.rules`; these classes hold the state each rule needs
(previous losses, trainable weights and their optimizer) and decide when to update.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_pinn._checks import check_flag, check_number, check_seed
from lightning_pinn.callbacks._base import is_integer
from lightning_pinn.callbacks.balancers import WeightBalancer
from lightning_pinn.diagnostics import gradient_norms
from lightning_pinn.engine import StepMeasurement, TraceRequest
from lightning_pinn.loss import first_unrepresentable
from lightning_pinn.rules import (
    gradient_entry_statistics,
    gradnorm_objective,
    inverse_training_rates,
    lr_annealing_weights,
    relobralo_weights,
    smooth,
    softadapt_weights,
    uncertainty_objective,
)

__all__ = ["SoftAdaptBalancer", "ReLoBRaLoBalancer", "LRAnnealingBalancer", "GradNormWeighting", "UncertaintyWeighting", "WeightSchedule"]


def _comparable(present: list[bool], *histories: list[float] | None) -> list[int]:
    """Indices of the terms present now whose earlier values (``nan``: never seen) are all known.

    The loss-comparing and trained rules work on these terms only: a term passed as ``None``
    has no loss to compare, so it keeps its weight and its history until it comes back.
    """
    return [i for i, here in enumerate(present) if here and all(h is not None and math.isfinite(h[i]) for h in histories)]


def _remember(old: list[float] | None, values: list[float], present: list[bool]) -> list[float]:
    """``values`` for the present terms, the remembered value (``nan`` if none) for the others."""
    return [v if here else (math.nan if old is None else old[i]) for i, (v, here) in enumerate(zip(values, present))]


def _first_seen(first: list[float] | None, values: list[float], present: list[bool]) -> list[float]:
    """Each term's value at the first measurement where it was present (``nan`` until then)."""
    if first is None:
        return _remember(None, values, present)
    return [v if math.isnan(start) and here else start for v, start, here in zip(values, first, present)]


def _scatter(size: int, indices: list[int], values: list[float]) -> list[float]:
    out = [math.nan] * size
    for i, value in zip(indices, values):
        out[i] = value
    return out


class _LossRule(WeightBalancer):
    """A rule that needs only the per-term losses: the engine records them without any backward work."""

    _measurements_before_first_update = 2  # the first measurement only gives the starting losses

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        super()._load_state(state_dict)
        if "rule_measurements" not in state_dict and state_dict.get("previous") is not None:
            # a checkpoint from before the count was saved, taken after the first measurement
            self._rule_measurements = max(self._rule_measurements, 1)

    _quantity = "loss"
    _zero_is_undefined = False

    def _wants(self) -> tuple[bool, TraceRequest | None]:
        return False, None

    def _rule_inputs(self, measurement: StepMeasurement) -> Tensor:
        return measurement.losses


class SoftAdaptBalancer(_LossRule):
    """SoftAdapt (Heydari, Thompson & Mehmood 2019, arXiv:1912.12355): weight by loss progress.

    Every ``every_n_steps`` steps, with ``s_i = L_i(t) − L_i(t − n)`` (normalised by
    ``Σ_j |s_j|``), ``λ̂_i = K · softmax(β s)_i`` — the term whose loss falls slowest (or rises)
    gets the largest weight — then ``λ ← m·λ + (1 − m)·λ̂``, from the first update on (the
    targets are bounded by K, so there is no bad start to correct at once). K, the softmax and
    ``Σ_j |s_j|`` run over every present term, also with ``terms=`` a subset (the others keep
    their λ). Needs only the losses, so an update costs almost nothing. Terms may be 0-dim losses.

    Args:
        beta: Softmax temperature β (> 0); larger concentrates the weight on the worst term.
        every_n_steps: Update cadence (the slope is taken over this many steps).
        momentum: Smoothing in ``[0, 1)``.
        normalized: Divide the slopes by ``Σ_j |s_j|`` (the paper's "normalized" variant).
        loss_weighted: Multiply by ``L_i`` (the paper's "loss-weighted" variant).
        terms: Terms whose λ may change (default: all).
        min_weight: Lower clamp for λ.
        max_weight: Upper clamp for λ.
        warmup_steps: No update before this optimizer step (updates stay on the multiples of ``every_n_steps``).
        loss_module: Attribute name of the ``MultiTermLoss``, if the module holds several.
    """

    def __init__(
        self,
        beta: float = 0.1,
        every_n_steps: int = 10,
        momentum: float = 0.0,
        normalized: bool = True,
        loss_weighted: bool = False,
        terms: Sequence[str] | None = None,
        min_weight: float = 1e-6,
        max_weight: float = 1e6,
        warmup_steps: int = 0,
        loss_module: str | None = None,
    ) -> None:
        super().__init__(every_n_steps, momentum, terms, None, min_weight, max_weight, warmup_steps, True, loss_module)
        self.beta = check_number("SoftAdaptBalancer", "beta", beta, low=0.0, low_open=True, hint=" > 0 (e.g. 0.1)")
        self.normalized = check_flag("SoftAdaptBalancer", "normalized", normalized)
        self.loss_weighted = check_flag("SoftAdaptBalancer", "loss_weighted", loss_weighted)
        self._previous: list[float] | None = None

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "beta": self.beta}

    def _propose(self, current: list[float], values: list[float], measurement: StepMeasurement) -> tuple[list[float], list[float]] | None:
        present = measurement.present.tolist()
        previous, self._previous = self._previous, _remember(self._previous, values, present)
        terms = _comparable(present, previous)  # the first measurement only gives the starting losses
        if len(terms) < 2:
            return None
        sub = softadapt_weights([values[i] for i in terms], [previous[i] for i in terms], self.beta, self.normalized, self.loss_weighted)  # type: ignore[index]
        target = _scatter(len(values), terms, sub)
        return smooth(current, target, self.momentum), target  # nan where undefined: those terms keep their λ

    def _reset_fit_state(self) -> None:
        super()._reset_fit_state()
        self._previous = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "previous": self._previous}

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        super()._load_state(state_dict)
        self._previous = state_dict.get("previous")


class ReLoBRaLoBalancer(_LossRule):
    """ReLoBRaLo (Bischof & Kraus 2021, arXiv:2110.09813): relative loss balancing with random lookback.

    Every ``every_n_steps`` steps:

        ``λ_i ← α (ρ λ_i + (1 − ρ) λ̂_i(t, 0)) + (1 − α) λ̂_i(t, t − n)``,
        ``λ̂_i(t, t') = K · softmax_j(L_j(t) / (T · L_j(t')))_i``,

    with ``ρ ~ Bernoulli(expected_rho)`` drawn from a seeded generator (saved in checkpoints).
    "0" is the first measurement that saw the term (step ``warmup_steps`` or later, when a term
    first appears later), "t − n" the term's previous measurement. The term whose loss fell
    least relative to the reference step gets the largest weight. K and the softmax run over
    every present term, also with ``terms=`` a subset (the others keep their λ).
    Needs only the losses. The defaults are the paper's (α = 0.999, E[ρ] = 0.999, T = 0.1).

    Args:
        alpha: Weight of the history against the most recent balance, in ``[0, 1]``.
        expected_rho: Probability of keeping the history (else it restarts from the balance
            against the initial losses), in ``[0, 1]``.
        temperature: Softmax temperature ``T`` (> 0).
        every_n_steps: Update cadence.
        seed: Seed of the Bernoulli draws.
        terms: Terms whose λ may change (default: all).
        min_weight: Lower clamp for λ.
        max_weight: Upper clamp for λ.
        warmup_steps: No update before this optimizer step (updates stay on the multiples of ``every_n_steps``).
        loss_module: Attribute name of the ``MultiTermLoss``, if the module holds several.
    """

    def __init__(
        self,
        alpha: float = 0.999,
        expected_rho: float = 0.999,
        temperature: float = 0.1,
        every_n_steps: int = 1,
        seed: int = 0,
        terms: Sequence[str] | None = None,
        min_weight: float = 1e-6,
        max_weight: float = 1e6,
        warmup_steps: int = 0,
        loss_module: str | None = None,
    ) -> None:
        super().__init__(every_n_steps, 0.0, terms, None, min_weight, max_weight, warmup_steps, True, loss_module)
        self.alpha = check_number("ReLoBRaLoBalancer", "alpha", alpha, low=0.0, high=1.0, hint=" in [0, 1] (e.g. 0.999)")
        self.expected_rho = check_number(
            "ReLoBRaLoBalancer", "expected_rho", expected_rho, low=0.0, high=1.0, hint=" in [0, 1] (e.g. 0.999)"
        )
        self.temperature = check_number("ReLoBRaLoBalancer", "temperature", temperature, low=0.0, low_open=True, hint=" > 0 (e.g. 0.1)")
        self.seed = seed = check_seed("ReLoBRaLoBalancer", seed)
        self._generator = torch.Generator().manual_seed(seed)
        self._initial: list[float] | None = None
        self._previous: list[float] | None = None

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "alpha": self.alpha, "expected_rho": self.expected_rho, "temperature": self.temperature}

    def _propose(self, current: list[float], values: list[float], measurement: StepMeasurement) -> tuple[list[float], list[float]] | None:
        present = measurement.present.tolist()
        previous, initial = self._previous, self._initial
        self._previous = _remember(previous, values, present)
        self._initial = _first_seen(initial, values, present)
        terms = _comparable(present, previous, initial)
        if len(terms) < 2:
            return None
        rho = float(torch.rand((), generator=self._generator).item() < self.expected_rho)
        sub = relobralo_weights(
            [current[i] for i in terms],
            [values[i] for i in terms],
            [previous[i] for i in terms],  # type: ignore[index]
            [initial[i] for i in terms],  # type: ignore[index]
            self.alpha,
            rho,
            self.temperature,
        )
        new = _scatter(len(values), terms, sub)
        return new, new

    def _reset_fit_state(self) -> None:
        super()._reset_fit_state()
        self._generator.manual_seed(self.seed)
        self._initial = None
        self._previous = None

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "initial": self._initial,
            "previous": self._previous,
            "generator_state": self._generator.get_state(),
            "seed": self.seed,
        }

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        super()._load_state(state_dict)
        self._initial = state_dict.get("initial")
        self._previous = state_dict.get("previous")
        if "generator_state" in state_dict:
            self._generator.set_state(state_dict["generator_state"])
            saved = state_dict.get("seed")
            if saved is not None and saved != self.seed:
                self._warn(
                    f"ReLoBRaLoBalancer: the checkpoint's Bernoulli draws were seeded with seed={saved}; the resumed fit "
                    f"continues that stream, as an uninterrupted fit would, and seed={self.seed} given now is not used. "
                    "To draw from a new seed, start a fresh fit (no ckpt_path)."
                )


class LRAnnealingBalancer(WeightBalancer):
    """Learning-rate annealing with max/mean gradient statistics (Wang, Teng & Perdikaris 2021).

    ``λ̂_i = stat_num(|∇θ L_ref|) / stat_den(|∇θ L_i|)`` over all entries of the gradient
    (every trainable parameter, biases included); like the released code, ``max`` for the
    reference (PDE residual) term and ``mean`` for the others, then ``λ ← 0.9·λ + 0.1·λ̂``
    every 10 steps. The released code takes the statistics over the weight matrices only, the
    denominator as the mean of the per-layer means, which gives somewhat smaller weights
    (≈ 2.8× on a 2-50-50-50-1 network); ``benchmarks/helmholtz_reference.py`` reproduces
    that variant exactly. Compared with
    :class:`GradNormBalancer` (norms), the max/mean statistics give larger weights.

    Which gradients: the paper's Algorithm 1 differentiates the *unweighted* losses
    (``gradients="unweighted"``, the default), so λ settles where ``max|∇L_ref| = λ·mean|∇L_i|``.
    The released code differentiated the already-weighted ``λ·L_i``, so ``λ̂ = max/(λ·mean)``
    and λ settles at the *square root* of that ratio — much smaller weights, and the ones behind
    the paper's reported errors. ``gradients="weighted"`` reproduces the release.

    Args:
        reference: The term whose gradient is the numerator and whose λ stays 1 (e.g. "pde").
        numerator: ``"max"`` (the code) or ``"mean"`` of ``|∇θ L_ref|``.
        denominator: ``"mean"`` (the code) or ``"max"`` of ``|∇θ L_i|``.
        gradients: ``"unweighted"`` (the paper's formula: ``∇θ L_i``) or ``"weighted"`` (the
            released code: ``∇θ (λ_i L_i)``, whose fixed point is the square root of the ratio).
        every_n_steps: Update cadence.
        momentum: Smoothing in ``[0, 1)``.
        terms: Terms whose λ may change (default: all; the reference's target is 1, so its λ
            goes to 1 at the first update unless it is left out of ``terms``).
        min_weight: Lower clamp for λ.
        max_weight: Upper clamp for λ.
        warmup_steps: No update before this optimizer step (updates stay on the multiples of ``every_n_steps``).
        smooth_first_update: Smooth the first update too.
        loss_module: Attribute name of the ``MultiTermLoss``, if the module holds several.
    """

    def __init__(
        self,
        reference: str,
        numerator: Literal["max", "mean"] = "max",
        denominator: Literal["max", "mean"] = "mean",
        gradients: Literal["unweighted", "weighted"] = "unweighted",
        every_n_steps: int = 10,
        momentum: float = 0.9,
        terms: Sequence[str] | None = None,
        min_weight: float = 1e-6,
        max_weight: float = 1e6,
        warmup_steps: int = 0,
        smooth_first_update: bool = False,
        loss_module: str | None = None,
    ) -> None:
        if not isinstance(reference, str) or not reference:
            raise ValueError(
                f"LRAnnealingBalancer: reference must name the residual term whose λ stays 1, e.g. reference='pde' "
                f"(it is required: the rule scales every other term against it); got {reference!r}."
            )
        for name, value in (("numerator", numerator), ("denominator", denominator)):
            if value not in ("max", "mean"):
                raise ValueError(f"LRAnnealingBalancer: {name} must be 'max' or 'mean', got {value!r}.")
        if gradients not in ("unweighted", "weighted"):
            raise ValueError(
                f"LRAnnealingBalancer: gradients must be 'unweighted' (the paper's formula) or 'weighted' (the released code), got {gradients!r}."
            )
        self.numerator, self.denominator, self.gradients = numerator, denominator, gradients
        self._statistics: tuple[list[float], ...] = ([], [])  # this update's (numerator, denominator) per term
        super().__init__(every_n_steps, momentum, terms, reference, min_weight, max_weight, warmup_steps, smooth_first_update, loss_module)

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "numerator": self.numerator, "denominator": self.denominator, "gradients": self.gradients}

    def _rule_inputs(self, measurement: StepMeasurement) -> Tensor:
        assert measurement.gradients is not None
        # |∇θ(λ_i L_i)| = λ_i |∇θ L_i| for "weighted", with the λ in force at the measured step
        weights = measurement.weights if self.gradients == "weighted" else None
        self._statistics = gradient_entry_statistics(measurement.gradients, (self.numerator, self.denominator), weights)
        return gradient_norms(measurement.gradients)  # for the finiteness and zero checks

    _rule_applies_reference = True

    def _rule(self, values: list[float]) -> list[float]:
        assert self._reference_index is not None
        top, bottom = self._statistics
        return lr_annealing_weights(top, bottom, self._reference_index)


class _TrainedWeights(WeightBalancer):
    """Base for rules that train the weights by gradient descent with their own optimizer.

    The weights' optimizer lives in the callback (and its state in the callback's checkpoint
    state), so the user's ``configure_optimizers`` stays as it is.
    """

    def __init__(
        self,
        learning_rate: float,
        every_n_steps: int,
        terms: Sequence[str] | None,
        min_weight: float,
        max_weight: float,
        warmup_steps: int,
        loss_module: str | None,
    ) -> None:
        super().__init__(every_n_steps, 0.0, terms, None, min_weight, max_weight, warmup_steps, True, loss_module)
        self.learning_rate = check_number(
            type(self).__name__, "learning_rate", learning_rate, low=0.0, low_open=True, hint=" > 0 (e.g. 0.01)"
        )
        self._parameter: Tensor | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict[str, Any] | None = None

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "learning_rate": self.learning_rate}

    def _initial_parameter(self, weights: list[float], left_out: Sequence[int]) -> Tensor:
        """The trained parameter at the first update, from the λ in force; ``left_out``: the
        terms the rule leaves out of that update (e.g. a zero gradient)."""
        raise NotImplementedError

    def _weights_of(self, parameter: Tensor) -> Tensor:
        """The λ a value of the trained parameter stands for (before the clamp)."""
        raise NotImplementedError

    def _parameter_for(self, weights: Tensor) -> Tensor:
        """The trained parameter's value for the λ ``weights`` (the inverse of :meth:`_weights_of`)."""
        raise NotImplementedError

    def _ensure_parameter(self, left_out: Sequence[int] = ()) -> Tensor:
        if self._parameter is not None:
            self._follow_weights_set_by_hand()
            return self._parameter
        self._parameter = self._initial_parameter(self.criterion.lambdas.tolist(), left_out).requires_grad_(True)
        self._optimizer = torch.optim.Adam([self._parameter], lr=self.learning_rate)
        if self._pending_state is not None:
            with torch.no_grad():
                self._parameter.copy_(self._pending_state["parameter"])
            self._optimizer.load_state_dict(self._pending_state["optimizer"])
            self._pending_state = None
            self._follow_weights_set_by_hand()
        return self._parameter

    def _follow_weights_set_by_hand(self) -> None:
        """Start again from a λ set by hand (``set_weights``) since this rule last set it: its
        entry of the trained parameter is re-seeded from that λ and the weights' Adam optimizer
        restarts, as the smoothing rules go on from the λ in force. Without this the next update
        returned to the rule's own value and dropped yours."""
        assert self._parameter is not None and self._optimizer is not None
        lambdas = self.criterion.lambdas
        in_force = lambdas.detach().to(device="cpu", dtype=torch.float64)
        applied = self._weights_of(self._parameter.detach()).clamp(min=self.min_weight, max=self.max_weight)
        # λ is stored in the loss's dtype (float32 by default): within its rounding it is the rule's own
        tolerance = max(1e-5, 8 * torch.finfo(lambdas.dtype).eps)
        changed = [
            i
            for i, adaptive in enumerate(self._adaptive)
            if adaptive and not math.isclose(float(in_force[i]), float(applied[i]), rel_tol=tolerance)
        ]
        if not changed:
            return
        with torch.no_grad():
            self._parameter[changed] = self._parameter_for(in_force[changed].clamp(min=self.min_weight, max=self.max_weight))
        # a fresh Adam (its step count is shared by all entries, so zeroing only their moments
        # would make the next step a bias-corrected one of arbitrary size)
        self._optimizer.state.clear()

    def _step(self, objective: Tensor, terms: list[int]) -> Tensor:
        """One optimizer step on ``objective`` (built from the entries ``terms``); return the entries before it.

        The other entries (terms absent from this measurement) are put back after the step, so
        Adam's momentum does not move a weight whose term was not seen.
        """
        assert self._optimizer is not None and self._parameter is not None
        before = self._parameter.detach().clone()
        self._optimizer.zero_grad()
        objective.backward()
        self._optimizer.step()
        with torch.no_grad():
            kept = torch.ones_like(before, dtype=torch.bool)
            kept[terms] = False
            self._parameter[kept] = before[kept]
        return before

    def _reset_fit_state(self) -> None:
        super()._reset_fit_state()
        self._parameter = None
        self._optimizer = None
        self._pending_state = None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._parameter is not None and self._optimizer is not None:
            state.update(parameter=self._parameter.detach().clone(), optimizer=self._optimizer.state_dict())
        elif self._pending_state is not None:  # resumed, no update yet: what was loaded is still the state
            state.update(self._pending_state)
        return state

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        super()._load_state(state_dict)
        if "parameter" in state_dict:
            self._parameter = None
            self._pending_state = {"parameter": state_dict["parameter"], "optimizer": state_dict["optimizer"]}


class GradNormWeighting(_TrainedWeights):
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich 2018, ICML): weights trained to equalise gradient norms.

    Each update takes one Adam step on trainable weights ``w`` for

        ``L_grad = Σ_i |w_i ‖∇θ L_i‖ − mean_j(w_j ‖∇θ L_j‖) · r_i^α|``,
        ``r_i = (L_i(t)/L_i(0)) / mean_j (L_j(t)/L_j(0))``  (target held constant),

    where ``L_i(0)`` is the term's loss at the first measurement that saw it (the first update
    after ``warmup_steps``, or the term's first appearance),

    then renormalises ``Σ_i w_i = K`` and sets ``λ = w`` (owning every term, it starts from
    your λ rescaled to ``Σ = K``). A term with a zero gradient is left out of ``L_grad`` and of
    ``Σ w = K`` (K does not count it) and keeps its λ. A term with a small gradient, or a loss falling slower than
    the others, gets a growing weight; ``α`` sets how strongly the
    training rates pull. Gradient norms are taken over all trainable parameters (the paper
    uses the last shared layer). Shares the per-term gradients with the monitor.

    Args:
        alpha: Asymmetry α (≥ 0; the paper uses 0.12–3, 1.5 typical).
        learning_rate: Adam learning rate of the weights.
        every_n_steps: Update cadence.
        terms: Terms whose λ may change (default: all).
        min_weight: Lower clamp for λ.
        max_weight: Upper clamp for λ.
        warmup_steps: No update before this optimizer step (updates stay on the multiples of ``every_n_steps``).
        loss_module: Attribute name of the ``MultiTermLoss``, if the module holds several.
    """

    def __init__(
        self,
        alpha: float = 1.5,
        learning_rate: float = 0.01,
        every_n_steps: int = 1,
        terms: Sequence[str] | None = None,
        min_weight: float = 1e-6,
        max_weight: float = 1e6,
        warmup_steps: int = 0,
        loss_module: str | None = None,
    ) -> None:
        super().__init__(learning_rate, every_n_steps, terms, min_weight, max_weight, warmup_steps, loss_module)
        self.alpha = check_number("GradNormWeighting", "alpha", alpha, low=0.0, hint=" >= 0 (e.g. 1.5)")
        self._initial_losses: list[float] | None = None

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "alpha": self.alpha}

    def _wants(self) -> tuple[bool, TraceRequest | None]:
        return True, None

    def _rule_inputs(self, measurement: StepMeasurement) -> Tensor:
        assert measurement.gradients is not None
        return gradient_norms(measurement.gradients)

    def _weights_of(self, parameter: Tensor) -> Tensor:
        return parameter  # λ = w

    def _parameter_for(self, weights: Tensor) -> Tensor:
        return weights

    def _initial_parameter(self, weights: list[float], left_out: Sequence[int]) -> Tensor:
        if not all(self._adaptive):  # the fixed terms' λ set the scale: start from the λ in force
            return torch.tensor(weights, dtype=torch.float64)
        # your λ rescaled to Σ = K over the terms that share it; a term left out (a zero gradient)
        # keeps its λ and is not counted in K
        shared = [i for i in range(len(weights)) if i not in left_out]
        total = sum(weights[i] for i in shared)
        start = list(weights)
        for i in shared:  # every shared λ 0: nothing sets the scale, start from equal weights
            start[i] = len(shared) * weights[i] / total if total > 0 else 1.0
        return torch.tensor(start, dtype=torch.float64)

    def _propose(self, current: list[float], values: list[float], measurement: StepMeasurement) -> tuple[list[float], list[float]] | None:
        present = measurement.present.tolist()
        losses = measurement.losses.tolist()
        self._initial_losses = _first_seen(self._initial_losses, losses, present)
        # a term with a zero gradient norm is left out, as by the other gradient rules: it keeps its λ
        # (a hard-constrained or exactly satisfied term must not take a share of Σw = K)
        terms = [i for i in _comparable(present, self._initial_losses) if values[i] > 0]
        trained = [i for i in terms if self._adaptive[i]]
        if len(terms) < 2 or not trained:
            return None
        weights = self._ensure_parameter(left_out=[i for i, here in enumerate(present) if here and i not in terms])
        rates = inverse_training_rates([losses[i] for i in terms], [self._initial_losses[i] for i in terms])
        inverse_rates = torch.tensor(rates, dtype=torch.float64)
        norms = torch.tensor([values[i] for i in terms], dtype=torch.float64)
        # a term outside `terms` enters the objective with the λ it keeps (a constant), not a trained w
        used = torch.stack([weights[i] if self._adaptive[i] else weights.new_tensor(current[i]) for i in terms])
        before = self._step(gradnorm_objective(used, norms, inverse_rates, self.alpha), trained)
        with torch.no_grad():
            weights[trained] = weights[trained].clamp(min=self.min_weight)  # positive before the rescale
            if len(trained) == len(terms):  # Σ w = K over the terms it saw (with fixed terms, their λ anchor the scale)
                # K itself, not the sum before the step (a λ clamped at a bound last time must not
                # shrink or grow the scale for good); a term absent from this step keeps its w,
                # and the present ones share what it leaves of K
                absent = [i for i, (here, mine) in enumerate(zip(present, self._adaptive)) if mine and not here]
                share = len(terms) + len(absent) - float(weights[absent].sum()) if absent else float(len(terms))
                if share <= 0:  # the absent terms' w alone exceed K: keep the present terms' scale
                    share = float(before[trained].sum())
                weights[trained] = weights[trained] * (share / weights[trained].sum())
            # proposed unclamped: the base class clamps λ to [min_weight, max_weight] and warns when it does
            proposed = _scatter(len(values), trained, weights[trained].tolist())  # nan: the other terms keep their λ
            weights[trained] = weights[trained].clamp(min=self.min_weight, max=self.max_weight)  # w stays where λ is clamped
        return proposed, proposed

    def _reset_fit_state(self) -> None:
        super()._reset_fit_state()
        self._initial_losses = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initial_losses": self._initial_losses}

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        super()._load_state(state_dict)
        self._initial_losses = state_dict.get("initial_losses")


class UncertaintyWeighting(_TrainedWeights):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla 2018, CVPR).

    Trains one log-variance ``s_i`` per term with its own Adam optimizer on

        ``Σ_i exp(−s_i) L_i + s_i``   (the regression form ``L_i / (2σ_i²) + log σ_i``, doubled),

    and sets ``λ_i = exp(−s_i)``. The fixed point is ``λ_i = 1 / L_i``: a term with a smaller
    loss gets a larger weight. Since ``s`` does not change the network's gradient except
    through λ, training it in a callback is the same as adding it to the model's loss.
    Needs only the losses.

    Args:
        learning_rate: Adam learning rate of the log-variances.
        every_n_steps: Update cadence.
        terms: Terms whose λ may change (default: all).
        min_weight: Lower clamp for λ.
        max_weight: Upper clamp for λ.
        warmup_steps: No update before this optimizer step (updates stay on the multiples of ``every_n_steps``).
        loss_module: Attribute name of the ``MultiTermLoss``, if the module holds several.
    """

    _quantity = "loss"
    _zero_is_undefined = False

    def __init__(
        self,
        learning_rate: float = 0.01,
        every_n_steps: int = 1,
        terms: Sequence[str] | None = None,
        min_weight: float = 1e-6,
        max_weight: float = 1e6,
        warmup_steps: int = 0,
        loss_module: str | None = None,
    ) -> None:
        super().__init__(learning_rate, every_n_steps, terms, min_weight, max_weight, warmup_steps, loss_module)

    def _wants(self) -> tuple[bool, TraceRequest | None]:
        return False, None

    def _rule_inputs(self, measurement: StepMeasurement) -> Tensor:
        return measurement.losses

    def _weights_of(self, parameter: Tensor) -> Tensor:
        return torch.exp(-parameter)  # λ = exp(−s)

    def _parameter_for(self, weights: Tensor) -> Tensor:
        return -torch.log(weights)

    def _initial_parameter(self, weights: list[float], left_out: Sequence[int]) -> Tensor:
        # each s_i sets its own λ_i: nothing is shared, so nothing is left out of a scale
        return torch.tensor([-math.log(max(w, 1e-30)) for w in weights], dtype=torch.float64)

    def _propose(self, current: list[float], values: list[float], measurement: StepMeasurement) -> tuple[list[float], list[float]] | None:
        present = measurement.present.tolist()
        terms = _comparable(present)
        if not terms:
            return None
        log_variances = self._ensure_parameter()
        self._step(uncertainty_objective(log_variances[terms], torch.tensor([values[i] for i in terms], dtype=torch.float64)), terms)
        # proposed unclamped: the base class clamps λ to [min_weight, max_weight] and warns when it does
        proposed = self._weights_of(log_variances.detach()).tolist()
        with torch.no_grad():  # λ = exp(−s) within [min_weight, max_weight]: s stays where λ is clamped
            log_variances[terms] = log_variances[terms].clamp(min=-math.log(self.max_weight), max=-math.log(self.min_weight))
        target = [1.0 / values[i] if present[i] and values[i] > 0 else math.nan for i in range(len(values))]
        return proposed, target


def _is_number(value: Any) -> bool:
    """A real number: a Python/NumPy scalar or a one-element tensor (not a bool, a string or an array of several)."""
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        return False
    try:
        float(value)
    except (TypeError, ValueError):  # e.g. a NumPy array or tensor of several values
        return False
    return True


#: How WeightSchedule's errors about its knots name the argument.
_SCHEDULE_ARGUMENT = "WeightSchedule(schedule=...)"


class WeightSchedule(WeightBalancer):
    """A fixed schedule for λ: piecewise linear or stepwise in the optimizer step.

    ``schedule`` maps a term to ``[(step, λ), ...]`` knots (sorted by step). Before the first
    knot λ is the first knot's value, after the last the last's; in between it is interpolated
    linearly (``interpolation="linear"``) or held from the previous knot (``"step"``). λ is set
    after each optimizer step for the next, like every balancer here, and at the start of the
    fit (also on resume).

    Args:
        schedule: ``{term: [(step, weight), ...]}``, e.g. ``{"ic": [(0, 1.0), (1000, 100.0)]}``.
        interpolation: ``"linear"`` or ``"step"``.
        loss_module: Attribute name of the ``MultiTermLoss``, if the module holds several.
    """

    _quantity = "loss"
    _zero_is_undefined = False
    _scheduled = True
    _terms_argument = "schedule"

    def __init__(
        self,
        schedule: Mapping[str, Sequence[tuple[int, float]]],
        interpolation: Literal["linear", "step"] = "linear",
        loss_module: str | None = None,
    ) -> None:
        if not isinstance(schedule, Mapping) or not schedule:
            raise ValueError(
                "WeightSchedule: schedule must map term names to [(step, weight), ...] knots, e.g. {'ic': [(0, 1.0), (1000, 100.0)]}."
            )
        knots: dict[str, list[tuple[int, float]]] = {}
        for term, points in schedule.items():
            if not isinstance(term, str) or not term:
                raise ValueError(
                    f"{_SCHEDULE_ARGUMENT}: its keys must be term names (non-empty strings), got {term!r}; "
                    "e.g. {'ic': [(0, 1.0), (1000, 100.0)]}."
                )
            try:
                given = [(step, weight) for step, weight in points]
            except (TypeError, ValueError):
                raise ValueError(
                    f"{_SCHEDULE_ARGUMENT}: the knots of term '{term}' must be (step, weight) pairs, got {points!r}."
                ) from None
            for step, weight in given:
                if not is_integer(step, low=0):
                    raise ValueError(
                        f"{_SCHEDULE_ARGUMENT}: the steps of term '{term}' must be integers >= 0 (optimizer steps), got {step!r} in {points!r}."
                    )
                if not _is_number(weight):
                    raise ValueError(f"{_SCHEDULE_ARGUMENT}: the weights of term '{term}' must be numbers, got {weight!r} in {points!r}.")
            pairs = [(int(step), float(weight)) for step, weight in given]
            if not pairs:
                raise ValueError(
                    f"{_SCHEDULE_ARGUMENT}: term '{term}' has no knots; give at least one (step, weight), e.g. {{'{term}': [(0, 1.0)]}}."
                )
            steps = [step for step, _ in pairs]
            if steps != sorted(steps) or len(set(steps)) != len(steps):
                raise ValueError(
                    f"{_SCHEDULE_ARGUMENT}: the steps of term '{term}' must be strictly increasing, got {steps}; list each step once, in order."
                )
            for step, weight in pairs:
                if not math.isfinite(weight) or weight < 0:
                    raise ValueError(f"{_SCHEDULE_ARGUMENT}: weight {weight!r} at step {step} of term '{term}' must be finite and >= 0.")
            knots[term] = pairs
        if interpolation not in ("linear", "step"):
            raise ValueError(f"WeightSchedule: interpolation must be 'linear' or 'step', got {interpolation!r}.")
        super().__init__(1, 0.0, list(knots), None, 1e-300, 1e300, 0, True, loss_module)
        self.schedule = knots
        self.interpolation = interpolation

    def _identity(self) -> dict[str, Any]:
        return {
            "schedule": tuple((k, tuple(v)) for k, v in self.schedule.items()),
            "interpolation": self.interpolation,
            "loss_module": self.loss_module,
        }

    def weight_at(self, term: str, step: int) -> float:
        """The scheduled λ of ``term`` at optimizer step ``step``."""
        pairs = self.schedule[term]
        steps = [s for s, _ in pairs]
        index = bisect.bisect_right(steps, step)
        if index == 0:
            return pairs[0][1]
        if index == len(pairs) or self.interpolation == "step":
            return pairs[index - 1][1]
        (s0, w0), (s1, w1) = pairs[index - 1], pairs[index]
        return w0 + (w1 - w0) * (step - s0) / (s1 - s0)

    def _wants(self) -> tuple[bool, TraceRequest | None]:
        return False, None

    def _rule_inputs(self, measurement: StepMeasurement) -> Tensor:
        return torch.zeros_like(measurement.losses)  # the schedule depends on the step alone

    def _rule_present(self, measurement: StepMeasurement) -> list[bool]:
        # a term absent from this step still follows the schedule (it gets its value when it comes back)
        return [True] * len(measurement.terms)

    def _clamped(self, name: str, value: float, step: int, hint: Callable[[], str] | None = None) -> float:
        return value  # the schedule is the user's explicit choice; it was validated at construction

    def _check_representable(self, dtype: torch.dtype) -> None:
        entries = (((term, step), weight) for term, pairs in self.schedule.items() for step, weight in pairs)
        found = first_unrepresentable(entries, dtype)
        if found is not None:
            (term, step), weight, stored, held = found
            raise ValueError(
                f"{_SCHEDULE_ARGUMENT}: weight {weight:g} at step {step} of term '{term}' is stored as "
                f"{stored} by the loss's {dtype} weight buffer. Use weights within "
                f"{held} (or 0), or keep the weights in float64 with criterion.double()."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.criterion.set_weights({term: self.weight_at(term, trainer.global_step) for term in self.schedule})
        super().on_train_start(trainer, pl_module)

    def _propose(self, current: list[float], values: list[float], measurement: StepMeasurement) -> tuple[list[float], list[float]] | None:
        new = [self.weight_at(name, self._applied_step) if name in self.schedule else old for name, old in zip(measurement.terms, current)]
        return new, new
