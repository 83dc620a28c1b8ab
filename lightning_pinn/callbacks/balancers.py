"""Callbacks that rebalance the weights λ of a ``MultiTermLoss`` during training.

The callbacks orchestrate; the formulas live in :mod:`lightning_pinn.rules`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_pinn._checks import check_flag, check_number, check_seed, check_term_names
from lightning_pinn.alerts import TermGradientWarning, WeightUpdateWarning
from lightning_pinn.callbacks._base import PendingEvents, PerTermCallback, callbacks_on_loss, is_integer, publish, weight_terms_to_log
from lightning_pinn.diagnostics import gradient_norms, nearly_satisfied
from lightning_pinn.engine import StepMeasurement, TraceRequest, untraceable_term_error
from lightning_pinn.loss import first_unrepresentable
from lightning_pinn.rules import GradNormRule, grad_norm_weights, held_at_reference, ntk_trace_weights, smooth

__all__ = ["WeightBalancer", "GradNormBalancer", "NTKBalancer"]


def _logged_weights(metrics: Mapping[str, float]) -> dict[str, float]:
    """``{term: λ}`` from logged ``weight/<term>`` metrics."""
    return {tag.removeprefix("weight/"): value for tag, value in metrics.items() if tag.startswith("weight/")}


def _last_batch_of_fit(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether the fit stops after this batch by ``max_steps`` or ``max_epochs`` (a stop by
    ``max_time`` or a callback is known only later)."""
    if trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    batches = trainer.num_training_batches
    return (
        max_epochs is not None
        and max_epochs >= 0
        and trainer.current_epoch + 1 >= max_epochs
        and isinstance(batches, int)
        and batch_idx + 1 >= batches
    )


def _owning(balancer: WeightBalancer, terms: list[str]) -> str:
    """How ``balancer`` is told to change only ``terms`` (a schedule changes the terms it lists)."""
    if balancer._scheduled:
        return f"{type(balancer).__name__}({{{terms[0]!r}: [...]}}) (a schedule changes exactly the terms it lists)"
    return f"{type(balancer).__name__}(terms={terms!r})"


class WeightBalancer(PerTermCallback):
    """Base class: update λ from a rule every ``every_n_steps`` optimizer steps.

    Subclasses define :meth:`_rule_inputs` (the per-term quantity the rule needs, e.g. gradient
    norms) and :meth:`_rule` (target weights ``λ̂`` from it). This class validates the inputs,
    smooths ``λ ← m·λ + (1 − m)·λ̂``, clamps, keeps ranks identical, writes λ between optimizer
    steps (never mid-graph, never during validation), logs ``weight/<term>`` and saves its
    state in checkpoints.

    Args:
        every_n_steps: Update every this many optimizer steps (after the optimizer step).
        momentum: Smoothing ``m`` in ``[0, 1)``; 0 takes ``λ̂`` directly.
        terms: Names of the terms whose λ may change (default: all); the others stay fixed
            but still enter the rule (e.g. the max over all norms).
        reference: A term held at ``λ = 1``: ``λ̂_i = q_ref / q_i`` for the rule's quantity
            ``q``. ``None`` uses the rule's own normalisation.
        min_weight: Lower clamp for λ (> 0, so a weight never collapses to 0).
        max_weight: Upper clamp for λ.
        warmup_steps: No update before this optimizer step (updates stay on the multiples of ``every_n_steps``).
        smooth_first_update: If ``False`` (default), the first update takes ``λ̂`` directly,
            so a badly chosen initial λ is corrected at once; if ``True`` it is smoothed too.
        loss_module: Attribute name of the ``MultiTermLoss``, if the module holds several.
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        momentum: float = 0.9,
        terms: Sequence[str] | None = None,
        reference: str | None = None,
        min_weight: float = 1e-6,
        max_weight: float = 1e6,
        warmup_steps: int = 0,
        smooth_first_update: bool = False,
        loss_module: str | None = None,
    ) -> None:
        if type(self) is WeightBalancer:
            raise TypeError(
                "WeightBalancer is the base class of the balancers and has no rule of its own: use GradNormBalancer, "
                "NTKBalancer, SoftAdaptBalancer, ReLoBRaLoBalancer, LRAnnealingBalancer, GradNormWeighting, "
                "UncertaintyWeighting or WeightSchedule, or subclass it and implement _rule_inputs and _rule."
            )
        super().__init__(every_n_steps, loss_module)
        owner = type(self).__name__
        self.momentum = check_number(owner, "momentum", momentum, low=0.0, high=1.0, high_open=True, hint=" in [0, 1) (e.g. 0.9)")
        if terms is not None:
            terms = check_term_names(owner, self._terms_argument, terms, "['ic', 'bc']", "all terms")
        self.terms = terms
        if reference is not None and (not isinstance(reference, str) or not reference):
            raise ValueError(f"{owner}: reference must be a term name (e.g. 'pde') or None, got {reference!r}.")
        if reference is not None and terms is not None and terms == [reference]:
            raise ValueError(
                f"{owner}: reference={reference!r} is also the only term in terms={terms!r}: the rule holds the reference at "
                "λ = 1, so no weight could ever change. Let the other terms adapt (e.g. terms=None) or choose another reference."
            )
        self.reference = reference
        self.min_weight = check_number(owner, "min_weight", min_weight, low=0.0, low_open=True, hint=" > 0 (e.g. 1e-6)")
        self.max_weight = check_number(owner, "max_weight", max_weight, low=0.0, low_open=True, hint=" > 0 (e.g. 1e6)")
        if self.max_weight <= self.min_weight:
            raise ValueError(f"{owner}: max_weight ({max_weight!r}) must be larger than min_weight ({min_weight!r}).")
        if not is_integer(warmup_steps, low=0):
            raise ValueError(
                f"{owner}: warmup_steps must be an integer >= 0 (optimizer steps before the first update), got {warmup_steps!r}."
            )
        self.warmup_steps = int(warmup_steps)
        self.smooth_first_update = check_flag(owner, "smooth_first_update", smooth_first_update)
        self.num_updates = 0
        self.skipped_updates = 0
        self.last_target: dict[str, float] = {}
        # the monitor's ratio alarm about this balancer's terms waits for its first update of the fit:
        self._rule_measurements = 0  # due measurements the rule has seen (a loss-change rule needs two for a λ)
        self._holding = False  # whether this fit started before the rule could give its first λ
        self._hold_until: int | None = None  # the step from which that first λ applies, once measured
        self._updated_terms: set[str] = set()  # terms whose λ this balancer has set at least once
        self._adaptive: list[bool] = []
        self._reference_index: int | None = None
        self._zero_warned: set[str] = set()
        self._clamp_warned: set[str] = set()
        self._nonfinite_warned: set[str] = set()  # terms whose NaN/inf rule input was warned about
        self._reference_warned = False
        self._last_logged_step: int | None = None  # step of the last logged weights (saved: a resumed fit goes on from it)
        self._last_logged_weights: dict[str, float] = {}  # and their values (a refit of the same Trainer compares them)
        # from a checkpoint, until the fit starts: (step of its last logged weights, whether those are the λ in force)
        self._resumed_logging: tuple[int | None, bool] = (None, False)
        self._log_dir: str | None = None  # the first logger's folder this fit logs to (saved: see _on_attach)
        self._resumed_log_dir: str | None = None
        self._skip_start_log = False
        self._unlogged: tuple[int, int, dict[str, float], dict[str, float]] | None = None  # (step, applied step, measured, applied)
        self._final_update_logged_at: int | None = None  # applied step of the fit's last update, logged off the cadence
        self._applied_step = 0  # the step from which the weights of the latest measurement apply
        self._weight_terms: list[str] = []  # the weight/<term> series this balancer writes

    # ---------------------------------------------------------------- subclass API
    def holds_ratio_alarm(self, terms: Sequence[str], step: int) -> bool:
        """Whether the monitor's ratio alarm about ``terms`` waits at measured ``step``.

        It does while this balancer may change one of the terms and the rule has not yet had the
        measurements for its first λ of the fit, or has had them but that λ applies after ``step``:
        until then λ is the initial guess the rule replaces. The wait ends there, also when that
        update is skipped or changes nothing, so an imbalance the balancer does not fix is alarmed
        at the next measurement. (Followed at run time, not predicted: warm-up, a custom
        :meth:`_is_due`, several optimizer steps per batch and resumes all count as they happen.)
        """
        if not self._holding or (self._hold_until is not None and step >= self._hold_until):
            return False
        return any(self.terms is None or name in self.terms for name in terms)

    #: Due measurements before the rule can give its first λ (a rule of loss changes needs two).
    _measurements_before_first_update = 1

    def _rule_inputs(self, measurement: StepMeasurement) -> Tensor:
        """The per-term quantity the rule uses, shape ``(K,)`` (e.g. gradient norms)."""
        raise NotImplementedError

    def _rule(self, values: list[float]) -> list[float]:
        """Target weights ``λ̂`` from :meth:`_rule_inputs`; ``nan`` where undefined."""
        raise NotImplementedError

    #: Whether :meth:`_rule` applies ``reference`` itself; otherwise :meth:`_propose` rescales its
    #: targets so that the reference's is 1 (:func:`~lightning_pinn.rules.held_at_reference`).
    _rule_applies_reference = False

    _quantity = "gradient norm"
    _zero_cause = "it reaches no trainable parameter, or its loss is exactly minimal"
    #: Whether a zero input means the rule cannot weight the term (true for gradients and traces).
    _zero_is_undefined = True
    #: Whether λ follows a fixed schedule (nothing measured moves it: the monitor's alarm then
    #: advises on the schedule, not on the cadence and bounds of an adaptive rule).
    _scheduled = False

    def _extra_metrics(self, measurement: StepMeasurement) -> dict[str, float]:
        """More scalars to log at the measured step (e.g. the NTK traces)."""
        return {}

    def _rule_present(self, measurement: StepMeasurement) -> list[bool]:
        """Which terms the rule sees at this measurement (the others keep their weight)."""
        return measurement.present.tolist()

    # ---------------------------------------------------------------- identity
    def _identity(self) -> dict[str, Any]:
        return {
            "every_n_steps": self.every_n_steps,
            "momentum": self.momentum,
            "terms": None if self.terms is None else tuple(self.terms),
            "reference": self.reference,
            "loss_module": self.loss_module,
        }

    def _is_due(self, step: int) -> bool:
        return step >= self.warmup_steps and step % self.every_n_steps == 0

    # ---------------------------------------------------------------- hooks
    def _on_attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = self.criterion.term_names
        owner = type(self).__name__
        # warnings about what a fit meets (NaN/inf terms, an unusable reference) come once per
        # term and fit: also in a resumed fit, or one that continues this Trainer's earlier fit
        self._nonfinite_warned = set()
        self._reference_warned = False
        resumed_step, resumed_in_force = self._resumed_logging
        self._resumed_logging = (None, False)
        self._log_dir = trainer.log_dir if trainer.loggers else None  # (a collective under DDP: every rank reads it)
        if resumed_step is None and trainer.global_step > 0:
            # the same Trainer fitted again (max_steps raised): the last fit ended by logging the
            # λ in force at this step (on_train_end), so the start needs no second point here
            # (unless the weights were changed by hand in between, e.g. with set_weights)
            weights = self.criterion.weights
            self._skip_start_log = trainer.global_step in (self._last_logged_step, self._final_update_logged_at) and all(
                weights.get(name) == value for name, value in self._last_logged_weights.items()
            )
        else:
            # resumed, and the λ in force were logged before the checkpoint: no second point at this
            # step, unless this fit logs into another folder (a new version), which starts its
            # series at the resume step
            same_folder = self._resumed_log_dir is None or self._log_dir == self._resumed_log_dir
            self._last_logged_step, self._skip_start_log = resumed_step, resumed_in_force and same_folder
        self._resumed_log_dir = None
        self._unlogged = None
        self._final_update_logged_at = None
        for name in list(self.terms or []) + ([self.reference] if self.reference is not None else []):
            if name not in names:
                argument = "reference" if name == self.reference and name not in (self.terms or []) else self._terms_argument
                raise ValueError(
                    f"{owner}({argument}=...): unknown term {name!r}; the MultiTermLoss has terms {names}. Use one of those names."
                )
        self._check_representable(self.criterion.lambdas.dtype)
        # a fit that goes on after the rule's first λ (resumed, refitted) holds nothing back; a schedule's λ are never a guess
        self._holding = self._rule_measurements < self._measurements_before_first_update and not self._scheduled
        self._hold_until = None
        self._adaptive = [self.terms is None or name in self.terms for name in names]
        self._reference_index = None if self.reference is None else names.index(self.reference)
        self._check_no_other_balancer_owns_my_terms(trainer, names)
        for checkpoint in trainer.checkpoint_callbacks:
            if getattr(checkpoint, "save_weights_only", False):
                self._warn(
                    f"{type(self).__name__}: {type(checkpoint).__name__}(save_weights_only=True) saves the weights λ (they "
                    "are buffers of the MultiTermLoss) but not this balancer's state (its update count, smoothing and last "
                    "target), and Lightning cannot resume a fit (ckpt_path=...) from such a file. Loading it with "
                    "load_from_checkpoint or load_state_dict restores λ; a new fit from there restarts the balancer, whose "
                    "first update takes the rule's target directly. Save full checkpoints to resume exactly.",
                    category=WeightUpdateWarning,
                )

    #: The constructor argument that names the terms this balancer changes (for error messages).
    _terms_argument = "terms"

    def _check_representable(self, dtype: torch.dtype) -> None:
        """Refuse a clamp bound that the weight buffer would store as 0 or inf (λ would then be 0 or inf)."""
        # both bounds are > 0 (checked in __init__)
        found = first_unrepresentable((("min_weight", self.min_weight), ("max_weight", self.max_weight)), dtype)
        if found is not None:
            argument, value, stored, held = found
            raise ValueError(
                f"{type(self).__name__}: {argument}={value:g} is stored as {stored} by the loss's "
                f"{dtype} weight buffer. Use a value within {held}, or keep the weights in "
                "float64 with criterion.double()."
            )

    def _check_no_other_balancer_owns_my_terms(self, trainer: pl.Trainer, names: tuple[str, ...]) -> None:
        mine = {name for name, adaptive in zip(names, self._adaptive) if adaptive}
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if other is self or not isinstance(other, WeightBalancer) or other._loss is not self._loss:
                continue
            theirs = set(names) if other.terms is None else set(other.terms)
            shared = sorted(mine & theirs, key=names.index)
            if shared:
                rest = [n for n in names if n != shared[0]]
                raise ValueError(
                    f"{type(self).__name__} and {type(other).__name__} would both change the weight of term(s) "
                    f"{', '.join(repr(n) for n in shared)} of the same MultiTermLoss (terms {list(names)}). Give each "
                    f"its own terms, e.g. {_owning(self, shared[:1])} and {_owning(other, rest[:1] or list(names))}."
                )

    def _on_measurement(self, trainer: pl.Trainer, pl_module: pl.LightningModule, measurement: StepMeasurement) -> None:
        names = measurement.terms
        step = measurement.step
        # the step the next forward pass runs at: step + 1, or more when one batch steps several optimizers
        self._applied_step = max(trainer.global_step, step + 1)
        self._rule_measurements += 1
        if self._holding and self._hold_until is None and self._rule_measurements >= self._measurements_before_first_update:
            self._hold_until = self._applied_step  # whatever this update does (it may be skipped)
        present = self._rule_present(measurement)
        # A term absent (None) for the whole step has nothing to measure: the rule gets 0 for it,
        # which leaves its weight unchanged and keeps it out of the max/mean/sum over terms.
        values = [value if here else 0.0 for value, here in zip(self._rule_inputs(measurement).tolist(), present)]
        # the rule reads the λ in force at the measured step (another balancer on this loss may
        # already have written its terms' next λ: the result must not depend on callback order)
        current = measurement.weights.tolist()
        latest = self.criterion.lambdas.tolist()
        # a NaN/inf loss of a term given this step skips a measured update too (an NTK trace stays
        # finite for an infinite residual); a schedule reads no measurement
        losses, given = measurement.losses.tolist(), measurement.present.tolist()
        bad = [
            name
            for name, value, loss, here in zip(names, values, losses, given)
            if not math.isfinite(value) or (not self._scheduled and here and not math.isfinite(loss))
        ]
        if self._scheduled:  # nothing to skip (a schedule reads no measurement), but say so once per term
            self._warn_nonfinite_losses_once(names, losses, given, step)
        if bad:
            self.skipped_updates += 1
            if not set(bad) <= self._nonfinite_warned:  # once per term and fit; later skips are only counted
                self._nonfinite_warned.update(bad)
                quantity = self._quantity if self._quantity == "loss" else f"{self._quantity} or the loss"
                self._warn(
                    f"{type(self).__name__}: skipped the weight update at step {step}: the {quantity} of term(s) "
                    f"{', '.join(repr(n) for n in bad)} is NaN or infinite. The weights keep their last good values "
                    f"{dict(zip(names, current))}. Look for NaN/inf in those residuals. Later skips for these terms "
                    "are counted in skipped_updates, not warned again.",
                    category=WeightUpdateWarning,
                )
            return
        if self._zero_is_undefined:
            self._warn_zero_terms(names, values, present, step)
        proposal = self._propose(current, values, measurement)
        if proposal is None:
            return
        proposed, target = proposal
        if not any(math.isfinite(t) for t, adaptive in zip(target, self._adaptive) if adaptive):
            self._warn_unusable_reference(names, values, present, step)
            return  # nothing to update (e.g. the reference term is absent): not counted as an update
        new = [
            self._clamped(name, value, step, lambda name=name: self._satisfied_hint(name, values, measurement))
            if adaptive and here and math.isfinite(value)
            else old
            for name, value, old, adaptive, here in zip(names, proposed, latest, self._adaptive, present)
        ]  # a term absent from the whole step keeps its weight, whatever the rule (and another balancer's, its latest)
        new = trainer.strategy.broadcast(new, src=0)  # bit-identical on every rank
        self.criterion.set_weights(torch.tensor(new, dtype=self.criterion.lambdas.dtype, device=self.criterion.lambdas.device))
        self.num_updates += 1
        self._updated_terms.update(
            name
            for name, value, adaptive, here in zip(names, proposed, self._adaptive, present)
            if adaptive and here and math.isfinite(value)
        )
        # the targets of the terms this balancer changes (another term's λ̂ is never applied)
        self.last_target = {
            name: value for name, value, adaptive in zip(names, target, self._adaptive) if adaptive and math.isfinite(value)
        }
        # the new weights, and the targets that produced them, apply from the next optimizer step on
        weights = self.criterion.weights
        applied = {f"weight/{name}": weights[name] for name in self._weight_terms}
        applied.update({f"weight_target/{name}": self.last_target[name] for name in self._weight_terms if name in self.last_target})
        measured = self._extra_metrics(measurement)
        applied_step = self._applied_step
        if not self._logging_due(trainer, applied_step):
            self._unlogged = (step, applied_step, measured, applied)  # written at the end of the fit unless a later update is logged
            # but EarlyStopping / ModelCheckpoint watching weight/<term> (or ntk_trace/<term>) see
            # the values of this update
            publish(trainer, {f"{self._tag_prefix}{tag}": value for tag, value in {**measured, **applied}.items()})
            return
        self._log_scalars(trainer, measured, step)
        self._log_scalars(trainer, applied, applied_step)
        self._last_logged_step, self._unlogged = applied_step, None
        self._last_logged_weights = _logged_weights(applied)

    def _warn_nonfinite_losses_once(self, names: tuple[str, ...], losses: list[float], given: list[bool], step: int) -> None:
        """Warn once per term and fit that a term's loss is NaN/inf, for a rule that goes on regardless."""
        bad = [
            name
            for name, loss, here in zip(names, losses, given)
            if here and not math.isfinite(loss) and name not in self._nonfinite_warned
        ]
        if bad:
            self._nonfinite_warned.update(bad)
            self._warn(
                f"{type(self).__name__}: the loss of term(s) {', '.join(repr(n) for n in bad)} is NaN or infinite at step {step}. "
                "The schedule goes on (it reads no loss), but training on that loss will not recover: look for NaN/inf in "
                "those residuals. Not warned again for these terms in this fit.",
                category=WeightUpdateWarning,
            )

    def _logging_due(self, trainer: pl.Trainer, applied_step: int) -> bool:
        """Whether to log this update: the first one, then at most one per ``trainer.log_every_n_steps`` steps.

        Like Lightning's ``LearningRateMonitor``, the weights follow the Trainer's logging
        cadence: a balancer updating every step would otherwise write a logger event every
        step, which with TensorBoard costs more than the update itself. Updates sparser than
        ``log_every_n_steps`` are all logged; the last update of a fit is always logged.
        """
        interval = trainer.log_every_n_steps
        return self._last_logged_step is None or interval <= 1 or applied_step - self._last_logged_step >= interval

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # all callbacks are attached now: which weight series this balancer writes, starting
        # with the weights in force at the first step (also after a resume or a warm-up)
        self._weight_terms = weight_terms_to_log(trainer, self)
        self._warn_if_watched_less_often(trainer)
        if self._skip_start_log:
            return
        weights = self.criterion.weights
        self._log_scalars(trainer, {f"weight/{name}": weights[name] for name in self._weight_terms}, trainer.global_step)

    def _refresh_cadence(self, tag: str) -> int | None:
        family, _, term = tag.partition("/")
        if term not in self.criterion.term_names:
            return None
        if family in self._extra_metric_families:  # measured for every term, at each update
            return self.every_n_steps
        mine = self.terms is None or term in self.terms
        if mine and (family == "weight_target" or (family == "weight" and term in self._weight_terms)):
            return self.every_n_steps
        return None  # (a fixed λ this balancer also logs never changes: nothing to wait for)

    #: Tag families of :meth:`_extra_metrics` (e.g. ``"ntk_trace"``).
    _extra_metric_families: tuple[str, ...] = ()

    def _log_scalars(self, trainer: pl.Trainer, metrics: Mapping[str, float], step: int, pending: PendingEvents | None = None) -> None:
        """Log, and give the weights to the monitors on this loss, whose reports then date λ's
        changes by the steps they apply from (as the logged series does), not by the monitor's
        next measurement."""
        super()._log_scalars(trainer, metrics, step, pending)
        weights = {tag: value for tag, value in metrics.items() if tag.startswith("weight/")}
        if weights:
            from lightning_pinn.callbacks.monitor import GradientNormMonitor

            for callback in callbacks_on_loss(trainer, self._loss):
                if isinstance(callback, GradientNormMonitor):
                    callback.history.add(weights, step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._unlogged is not None and _last_batch_of_fit(trainer, batch_idx):
            # The fit's last update is logged now rather than at on_train_end: Lightning's checkpoint
            # callbacks run after this one and save the state of the fit's end, and a fit resumed from
            # that checkpoint must know that the λ in force were logged (no second point at its start).
            # This extra point does not move the logging cadence, so a resumed fit logs at the steps
            # an uninterrupted one would.
            self._log_unlogged(trainer, off_cadence=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the last update is always logged, before a monitor writes its report (on_fit_end)
        self._log_unlogged(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        try:
            self._log_unlogged(trainer)  # an interrupted fit's files end with the λ in force, too
        except Exception:  # noqa: BLE001 - best effort: the fit's own exception is the one to see
            self._warn(f"{type(self).__name__}: could not log the last weight update after the fit failed.")

    def _log_unlogged(self, trainer: pl.Trainer, off_cadence: bool = False) -> None:
        """Log the update held back by the logging cadence, if any; ``off_cadence``: as an extra
        point that leaves the cadence where it was (the fit's last update, logged at its last batch)."""
        if self._unlogged is not None:
            step, applied_step, measured, applied = self._unlogged
            self._log_scalars(trainer, measured, step)
            self._log_scalars(trainer, applied, applied_step)
            if off_cadence:
                self._final_update_logged_at = applied_step
            else:
                self._last_logged_step = applied_step
            self._unlogged = None
            self._last_logged_weights = _logged_weights(applied)

    def _propose(self, current: list[float], values: list[float], measurement: StepMeasurement) -> tuple[list[float], list[float]] | None:
        """``(proposed λ, rule target λ̂)`` for this update, or ``None`` to skip it.

        The default applies :meth:`_rule` and smooths: ``λ ← m·λ + (1 − m)·λ̂``. A term's first
        update takes ``λ̂`` directly unless ``smooth_first_update`` (also a term first present
        after other terms' first updates, e.g. a data term switched on later). Entries that are
        ``nan`` keep their current weight.
        """
        target = self._rule(values)
        if self._reference_index is not None and not self._rule_applies_reference:
            # a rule written without the reference (e.g. your own): hold the reference at λ = 1 by
            # rescaling its targets; while the reference is absent (or zero where that is undefined), none apply
            ref = self._reference_index
            usable = bool(measurement.present[ref]) and (values[ref] != 0 or not self._zero_is_undefined)
            target = held_at_reference(target, ref) if usable else [math.nan] * len(target)
        smoothed = smooth(current, target, self.momentum)
        if self.smooth_first_update:
            return smoothed, target
        first = [name not in self._updated_terms for name in measurement.terms]
        return [t if is_first and math.isfinite(t) else m for t, m, is_first in zip(target, smoothed, first)], target

    def _warn_unusable_reference(self, names: tuple[str, ...], values: list[float], present: list[bool], step: int) -> None:
        """Say once per fit that the reference term stopped every update (absent, or a zero measure)."""
        index = self._reference_index
        if index is None or self._reference_warned or (present[index] and values[index] != 0):
            return
        self._reference_warned = True
        why = "is absent (None) from" if not present[index] else f"has a zero {self._quantity} at"
        self._warn(
            f"{type(self).__name__}: the reference term '{names[index]}' {why} step {step}, so the rule has no scale and "
            "no weight changes at this update (nor at later ones while this lasts). Choose a reference term that is present "
            "with a non-zero "
            f"{self._quantity} on every step, or leave reference=None.",
            category=WeightUpdateWarning,
        )

    def _warn_zero_terms(self, names: tuple[str, ...], values: list[float], present: list[bool], step: int) -> None:
        for name, value, here in zip(names, values, present):
            if here and value == 0 and name not in self._zero_warned:
                self._zero_warned.add(name)
                self._warn(
                    f"{type(self).__name__}: term '{name}' has a zero {self._quantity} at step {step} ({self._zero_cause}), "
                    "so the rule gives it no weight; its λ is left unchanged.",
                    category=TermGradientWarning,
                )

    def _clamped(self, name: str, value: float, step: int, hint: Callable[[], str] | None = None) -> float:
        """``value`` clamped to ``[min_weight, max_weight]``, warning once per episode when it is
        (``hint`` adds to the warning for the upper bound)."""
        clamped = min(max(value, self.min_weight), self.max_weight)
        if clamped == value:
            self._clamp_warned.discard(name)
        elif name not in self._clamp_warned:
            self._clamp_warned.add(name)
            bound = "max_weight" if value > clamped else "min_weight"
            extra = hint() if hint is not None and bound == "max_weight" else ""
            shown = next((text for text in (f"{value:.3g}", f"{value:.6g}") if text != f"{clamped:.6g}"), repr(value))
            self._warn(
                f"{type(self).__name__}: the weight of term '{name}' ({shown}) was clamped to {bound}={clamped:g} "
                f"at step {step}: the rule's value for it, set by its {self._quantity} relative to the other terms', "
                f"is outside [min_weight, max_weight] = [{self.min_weight:g}, {self.max_weight:g}]; "
                + (extra or f"check its residual's scale, or widen the range with {bound}=... ."),
                category=WeightUpdateWarning,
            )
        return clamped

    def _satisfied_hint(self, name: str, norms: list[float], measurement: StepMeasurement) -> str:
        """For a gradient-norm rule: the advice when term ``name``'s unweighted gradient is small
        because its residual is: per unit of RMS residual it is within 10x of the largest-gradient
        term's, as for the monitor's note at its default 100x threshold
        (:func:`~lightning_pinn.diagnostics.nearly_satisfied`)."""
        if self._quantity != "gradient norm":
            return ""  # an NTK trace does not shrink with the residual
        names = list(measurement.terms)
        losses = measurement.losses.tolist()
        i = names.index(name)
        j = max(range(len(names)), key=lambda k: norms[k] if math.isfinite(norms[k]) else -math.inf)
        within = None if j == i else nearly_satisfied(norms[j], losses[j], norms[i], losses[i], within=10.0)
        if within is None:
            return ""
        return (
            f"but its loss ({losses[i]:.3g}) is {losses[j] / losses[i]:.3g}x below '{names[j]}''s ({losses[j]:.3g}), and per unit "
            f"of RMS residual the two gradients are within {within:.3g}x of each other: the term is nearly "
            "satisfied, and the gradient-norm rule asks a weight that grows as 1/√L. A weight this large can destabilise "
            f"the fit: leave '{name}' out of terms=... (its weight then stays fixed), or set a smaller max_weight."
        )

    # ---------------------------------------------------------------- state
    def _reset_fit_state(self) -> None:
        self.num_updates = 0
        self._rule_measurements = 0
        self._last_logged_step = None
        self._last_logged_weights = {}
        self.skipped_updates = 0
        self.last_target = {}
        self._updated_terms = set()
        self._zero_warned = set()
        self._clamp_warned = set()
        # (_nonfinite_warned and _reference_warned are per fit: emptied in _on_attach at every fit start)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "num_updates": self.num_updates,
            "rule_measurements": self._rule_measurements,
            "skipped_updates": self.skipped_updates,
            "last_target": dict(self.last_target),
            "updated_terms": sorted(self._updated_terms),
            "last_logged_step": self._last_logged_step,
            "logged_to": self._log_dir,
            "unlogged_pending": self._unlogged is not None,
            "zero_warned": sorted(self._zero_warned),
            "clamp_warned": sorted(self._clamp_warned),
        }

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        super()._load_state(state_dict)
        self.num_updates = int(state_dict["num_updates"])
        default = self._measurements_before_first_update if self.num_updates else 0  # (older checkpoints)
        self._rule_measurements = int(state_dict.get("rule_measurements", default))
        self.skipped_updates = int(state_dict.get("skipped_updates", 0))
        self.last_target = dict(state_dict.get("last_target", {}))
        # (checkpoints from before per-term first updates: the terms the last update targeted)
        self._updated_terms = set(state_dict.get("updated_terms", self.last_target if self.num_updates else []))
        last_logged = state_dict.get("last_logged_step")
        self._resumed_logging = (last_logged, last_logged is not None and not state_dict.get("unlogged_pending", True))
        self._resumed_log_dir = state_dict.get("logged_to")
        self._zero_warned = set(state_dict.get("zero_warned", []))
        self._clamp_warned = set(state_dict.get("clamp_warned", []))


class GradNormBalancer(WeightBalancer):
    """Balance λ by per-term gradient norms of the unweighted losses.

    On the optimizer steps that are multiples of ``every_n_steps``, from ``warmup_steps`` on:

    * ``rule="max"`` — Wang, Teng & Perdikaris 2021 (SIAM J. Sci. Comput. 43(5) A3055):
      ``λ̂_i = max_j ‖∇θ L_j‖ / ‖∇θ L_i‖``;
    * ``rule="mean"`` — Wang, Sankaran, Wang & Perdikaris 2023 (arXiv:2308.08468):
      ``λ̂_i = mean_j ‖∇θ L_j‖ / ‖∇θ L_i‖``;

    then ``λ ← m·λ + (1 − m)·λ̂`` (the first update takes ``λ̂`` directly unless
    ``smooth_first_update=True``). The target makes all weighted norms ``λ̂_i‖∇θ L_i‖`` equal
    (to the largest norm for "max", to the mean norm for "mean"); the first update reaches it
    (and every update with ``momentum=0``), later ones move a fraction ``1 − m`` of the way. The gradients are the
    ones the engine captures during the ordinary backward pass, so this costs about one
    backward pass per update, shared with a :class:`GradientNormMonitor` on the same step.

    Args:
        rule: ``"max"`` or ``"mean"``.
        every_n_steps: Update cadence in optimizer steps (the 2021 code used 10).
        momentum: Smoothing ``m`` in ``[0, 1)`` (0.9 in both papers).
        terms: Terms whose λ may change (default: all).
        reference: Term held at ``λ = 1`` (``λ̂_i = ‖∇L_ref‖ / ‖∇L_i‖``), e.g. ``"pde"`` as in
            the 2021 paper; ``None`` for the rule's own normalisation.
        min_weight: Lower clamp for λ.
        max_weight: Upper clamp for λ.
        warmup_steps: No update before this optimizer step (updates stay on the multiples of ``every_n_steps``).
        smooth_first_update: Smooth the first update too (default: take ``λ̂`` directly).
        loss_module: Attribute name of the ``MultiTermLoss``, if the module holds several.
    """

    def __init__(
        self,
        rule: GradNormRule = "max",
        every_n_steps: int = 10,
        momentum: float = 0.9,
        terms: Sequence[str] | None = None,
        reference: str | None = None,
        min_weight: float = 1e-6,
        max_weight: float = 1e6,
        warmup_steps: int = 0,
        smooth_first_update: bool = False,
        loss_module: str | None = None,
    ) -> None:
        if rule not in ("max", "mean"):
            raise ValueError(
                f"GradNormBalancer: rule must be 'max' (Wang, Teng & Perdikaris 2021) or 'mean' (Wang et al. 2023), got {rule!r}."
            )
        self.rule: GradNormRule = rule
        super().__init__(every_n_steps, momentum, terms, reference, min_weight, max_weight, warmup_steps, smooth_first_update, loss_module)

    def _identity(self) -> dict[str, Any]:
        return {"rule": self.rule, **super()._identity()}

    def _wants(self) -> tuple[bool, TraceRequest | None]:
        return True, None

    def _rule_inputs(self, measurement: StepMeasurement) -> Tensor:
        assert measurement.gradients is not None
        return gradient_norms(measurement.gradients)

    _rule_applies_reference = True

    def _rule(self, values: list[float]) -> list[float]:
        return grad_norm_weights(values, self.rule, self._reference_index)


class NTKBalancer(WeightBalancer):
    """Balance λ by the traces of the neural tangent kernel's diagonal blocks.

    Every ``every_n_steps`` optimizer steps, for each term ``i`` with point-wise residual
    ``r_i``, the per-point mean NTK trace

        ``t_i = (1/N_i) Σ_x ‖∂r_i(x)/∂θ‖²``   (the diagonal of ``K_ii = J_i J_iᵀ``, averaged)

    is computed on the current residual points, and ``λ̂_i = Σ_j t_j / t_i`` (Wang, Yu &
    Perdikaris 2022, J. Comput. Phys. 449 110768; per-point mean as in Wang et al. 2023), then
    ``λ ← m·λ + (1 − m)·λ̂``. A term given to the loss as a 0-dim loss has no point-wise
    Jacobian: it is refused with an error naming it, unless it is outside ``terms`` (and not the
    ``reference``), where it keeps its λ and is left out of ``Σ_j t_j``.

    The traces are exact by default. Where a term's points are independent (each row of the
    residual's graph serves one point, as for a network evaluated point by point and its
    autograd derivatives), every point's ``‖∂r_i(x)/∂θ‖²`` comes from four or five backward passes
    (``lightning_pinn.point_gradients``; O(N)), checked on six to nine points against vector-Jacobian
    products. Otherwise (points that mix, as in finite differences between points; operations
    that module does not know) it is one vector-Jacobian product per point, batched with
    ``torch.func.vmap`` over ``torch.autograd.grad`` in chunks of ``chunk_size`` points, so
    memory stays bounded (on a CPU, one product per point where batching does not pay); each
    product runs through the residual's graph over all N points, so such an update costs
    O(N²): use ``trace_points`` for large N. With ``trace_points=m``, each term's trace is estimated from ``m``
    points drawn uniformly without replacement (unbiased; relative standard error
    ``sqrt((1 − m/N)/m) · CV`` where CV is the coefficient of variation of
    ``‖∂r(x)/∂θ‖²`` over the term's points, standard deviation with divisor N − 1 — see ``lightning_pinn.ntk.sample_points``).

    Args:
        every_n_steps: Update cadence (100 in the 2022 paper).
        momentum: Smoothing ``m`` in ``[0, 1)`` (0.9 in the 2023 guide; 0 is the 2022 paper's
            direct assignment).
        trace_points: Points per term for a sub-sampled trace (``None``: all points, exact).
        chunk_size: Points per batched vector-Jacobian product, where products are used; 1
            computes one product per point (``None``: automatic, from N, the parameter count and the device; see
            ``lightning_pinn.ntk.auto_chunk_size``).
        seed: Seed of the point sampler (used only with ``trace_points``).
        terms: Terms whose λ may change (default: all).
        reference: Term held at ``λ = 1`` (``λ̂_i = t_ref / t_i``); ``None``: ``Σ_j t_j / t_i``.
        min_weight: Lower clamp for λ.
        max_weight: Upper clamp for λ.
        warmup_steps: No update before this optimizer step (updates stay on the multiples of ``every_n_steps``).
        smooth_first_update: Smooth the first update too (default: take ``λ̂`` directly).
        loss_module: Attribute name of the ``MultiTermLoss``, if the module holds several.
        one_pass: Try the O(N) per-point route first (checked against products on six to nine points;
            see above). ``False`` computes every trace with vector-Jacobian products: O(N²),
            the same values to rounding; a switch for a graph the route gets wrong or is slow on.
    """

    _quantity = "NTK trace"
    _zero_cause = "its residual does not change with any trainable parameter at these points"

    def __init__(
        self,
        every_n_steps: int = 100,
        momentum: float = 0.9,
        trace_points: int | None = None,
        chunk_size: int | None = None,
        seed: int = 0,
        terms: Sequence[str] | None = None,
        reference: str | None = None,
        min_weight: float = 1e-6,
        max_weight: float = 1e6,
        warmup_steps: int = 0,
        smooth_first_update: bool = False,
        loss_module: str | None = None,
        one_pass: bool = True,
    ) -> None:
        super().__init__(every_n_steps, momentum, terms, reference, min_weight, max_weight, warmup_steps, smooth_first_update, loss_module)
        self.one_pass = check_flag("NTKBalancer", "one_pass", one_pass)
        if trace_points is not None and (not is_integer(trace_points, low=1)):
            raise ValueError(
                f"NTKBalancer: trace_points must be an integer >= 1 (points sampled per term) or None for exact traces, got {trace_points!r}."
            )
        if chunk_size is not None and (not is_integer(chunk_size, low=1)):
            raise ValueError(
                f"NTKBalancer: chunk_size must be an integer >= 1 (points per batched vector-Jacobian product) or None for automatic, got {chunk_size!r}."
            )
        self.trace_points = None if trace_points is None else int(trace_points)
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.seed = seed = check_seed("NTKBalancer", seed)
        self._generator = torch.Generator().manual_seed(seed)
        self._sampled_step: int | None = None  # the optimizer step of the latest draw, and
        self._micro_batch = 0  # which micro-batch of that step it was (gradient accumulation)
        self.last_traces: dict[str, float] = {}
        self._fallback_warned: set[str] = set()  # terms whose traces could not be vmapped (warned once each)
        self._residuals_checked = False  # whether the first batch's residuals were checked for 0-dim terms

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "trace_points": self.trace_points}

    def _wants(self) -> tuple[bool, TraceRequest | None]:
        # terms this balancer does not change (nor uses as reference) may be 0-dim losses: no trace
        names = self.criterion.term_names
        untraced_ok = frozenset(name for name, adaptive in zip(names, self._adaptive) if not adaptive and name != self.reference)
        return False, TraceRequest(self.trace_points, self.chunk_size, self._generator, untraced_ok, self._fallback_warned, self.one_pass)

    def _on_attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super()._on_attach(trainer, pl_module)
        self._residuals_checked = False
        self._sampled_step = None  # every fit's first batch is micro-batch 0 of its step (also a resumed one)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # The sampled points depend only on (seed, step, micro-batch of the step): a fit resumed
        # from any checkpoint (even one OnExceptionCheckpoint wrote in the middle of a step, after
        # the draw, or one written at an epoch's end, after which Lightning may number the batches
        # differently) samples what the uninterrupted fit sampled; no generator state is saved.
        step = trainer.global_step
        self._micro_batch = self._micro_batch + 1 if step == self._sampled_step else 0
        self._sampled_step = step
        self._generator.manual_seed(_sample_seed(self.seed, step, self._micro_batch))
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self._residuals_checked and self._loss is not None:
            # fail on the fit's first batch, not at the first update (after a warm-up, say)
            self._residuals_checked = True
            untraced_ok = self._wants()[1].untraced_ok  # type: ignore[union-attr]
            for name, residual in self._loss.last_residuals.items():
                if residual.dim() == 0 and name not in untraced_ok:
                    raise untraceable_term_error(name)

    def _rule_present(self, measurement: StepMeasurement) -> list[bool]:
        # a term given as a 0-dim loss outside `terms` has no trace: left out of Σ_j t_j
        assert measurement.trace_points is not None
        return [bool(here) and points > 0 for here, points in zip(measurement.present.tolist(), measurement.trace_points.tolist())]

    def _rule_inputs(self, measurement: StepMeasurement) -> Tensor:
        assert measurement.traces is not None
        self.last_traces = dict(zip(measurement.terms, measurement.traces.tolist()))
        return measurement.traces

    _rule_applies_reference = True

    def _rule(self, values: list[float]) -> list[float]:
        return ntk_trace_weights(values, self._reference_index)

    _extra_metric_families = ("ntk_trace",)

    def _extra_metrics(self, measurement: StepMeasurement) -> dict[str, float]:
        return {f"ntk_trace/{name}": value for name, value in self.last_traces.items() if math.isfinite(value)}

    def _reset_fit_state(self) -> None:
        super()._reset_fit_state()
        self.last_traces = {}
        self._fallback_warned = set()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_traces": dict(self.last_traces)}

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        super()._load_state(state_dict)
        self.last_traces = dict(state_dict.get("last_traces", {}))


def _sample_seed(seed: int, step: int, micro_batch: int) -> int:
    """A 64-bit seed for the trace sampler at one (step, micro-batch), mixed from the user's ``seed``."""
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + micro_batch * 0x94D049BB133111EB + 1) % 2**64
