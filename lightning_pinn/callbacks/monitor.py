"""``GradientNormMonitor``: per-term gradient norms, the 10² imbalance alarm and a conflict alarm."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from operator import itemgetter
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from lightning_pinn._checks import check_flag, check_term_names
from lightning_pinn._lightning import console_info
from lightning_pinn.alerts import GradientConflictWarning, LossBalanceWarning, TermGradientWarning
from lightning_pinn.callbacks._base import (
    PendingEvents,
    PerTermCallback,
    callbacks_on_loss,
    find_multi_term_loss,
    is_integer,
    logger_tag_prefix,
    show_in_progress_bar,
    tensorboard_loggers,
    tensorboard_writers,
    weight_terms_to_log,
)
from lightning_pinn.diagnostics import GradientReport, imbalance, nearly_satisfied, summarize_gradients
from lightning_pinn.engine import StepMeasurement
from lightning_pinn.loss import pair_key
from lightning_pinn.report import History, write_report
from lightning_pinn.tensorboard import write_layout

__all__ = ["GradientNormMonitor", "MonitorDiagnosis"]


@dataclass
class MonitorDiagnosis:
    """What the monitor saw over a fit (also printed at the end of the fit).

    Attributes:
        measurements: Number of steps measured.
        first_step: First measured step (``None`` before any measurement).
        last_step: Last measured step.
        worst_ratio: Largest gradient-norm ratio seen, and ``worst_ratio_step`` /
            ``worst_pair`` (largest, smallest) where it was seen.
        ratio_alarm_episodes: How many times the ratio alarm started.
        ratio_alarm_measurements: Measurements with the ratio above the threshold.
        ratio_alarm_active: Whether the ratio alarm is on at the last measurement.
        min_cosine: Most negative gradient cosine seen, with ``min_cosine_step`` / ``min_cosine_pair``.
        conflict_alarm_episodes: How many times the conflict alarm started (any pair).
        zero_gradient_terms: Terms seen with an exactly zero gradient.
        zero_weight_terms: Terms seen with ``λ = 0`` and a non-zero gradient (not trained then;
            left out of ``grad_ratio``, whose weighted norm would be 0).
        nonfinite_terms: Terms seen with a NaN or inf gradient.
        ratio_alarm_spans: ``[start_step, end_step]`` of each ratio-alarm episode
            (``end_step`` is ``None`` while it is on).
        conflict_alarm_spans: ``[term_a, term_b, start_step, end_step]`` of each conflict episode.
        ratio_alarm_held: Measurements above the threshold at which the (off) ratio alarm waited
            for an attached balancer's first update (not counted in ``ratio_alarm_measurements``),
            and ``ratio_alarm_held_by`` the balancers it waited for.
        ratio_alarm_pair: (largest, smallest) at the last measurement above the threshold while
            the alarm is on: a measurement without one of them (a term passed as ``None``) cannot
            tell whether that imbalance is over, so it leaves the alarm on.
    """

    measurements: int = 0
    first_step: int | None = None
    last_step: int | None = None
    worst_ratio: float | None = None
    worst_ratio_step: int | None = None
    worst_pair: tuple[str, str] | None = None
    ratio_alarm_episodes: int = 0
    ratio_alarm_measurements: int = 0
    ratio_alarm_active: bool = False
    min_cosine: float | None = None
    min_cosine_step: int | None = None
    min_cosine_pair: tuple[str, str] | None = None
    conflict_alarm_episodes: int = 0
    zero_gradient_terms: list[str] = field(default_factory=list)
    nonfinite_terms: list[str] = field(default_factory=list)
    zero_weight_terms: list[str] = field(default_factory=list)
    ratio_alarm_spans: list[list[int | None]] = field(default_factory=list)
    conflict_alarm_spans: list[list[Any]] = field(default_factory=list)
    ratio_alarm_held: int = 0
    ratio_alarm_held_by: list[str] = field(default_factory=list)
    ratio_alarm_pair: tuple[str, str] | None = None


def _checked_recovery_threshold(value: Any, threshold: float) -> float:
    """``recovery_threshold`` checked against ``threshold``; ``None`` gives ``max(threshold / 2, √threshold)``."""
    default = max(threshold / 2, math.sqrt(threshold))
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 1 < value <= threshold:
        raise ValueError(
            f"GradientNormMonitor: recovery_threshold must be a number in (1, threshold] = (1, {threshold:g}] (the ratio at "
            f"or below which a running ratio alarm ends, e.g. {default:g}), or None for "
            f"max(threshold / 2, sqrt(threshold)); got {value!r}."
        )
    return float(value)


class GradientNormMonitor(PerTermCallback):
    """Log each loss term's gradient norm and raise an alarm when terms are out of balance.

    On every ``every_n_steps``-th optimizer step (starting at step 0) the monitor measures, for
    each term of the module's :class:`~lightning_pinn.MultiTermLoss`, the gradient of the
    unweighted loss over all trainable parameters, ``g_i = ∇θ L_i``, and logs

    * ``grad_norm/<term>`` = ‖g_i‖₂ and ``grad_norm_weighted/<term>`` = λ_i‖g_i‖₂,
    * ``grad_ratio`` = max_i λ_i‖g_i‖ / min_i λ_i‖g_i‖ (and ``grad_ratio_threshold``; at a fit's
      first measurement ``grad_ratio_recovery_threshold``),
    * ``grad_cosine/<a>_vs_<b>`` = cos(g_a, g_b) for each pair of terms,
    * ``loss/<term>`` = L_i (unweighted) and ``weight/<term>`` = λ_i,
    * ``alarm/grad_ratio`` and ``alarm/grad_conflict``: 1 while the alarm is on, else 0.

    A ratio above ``threshold`` is the gradient-flow pathology of Wang, Teng & Perdikaris 2021
    (SIAM J. Sci. Comput. 43(5), A3055): gradient descent then reduces only the term with the
    large gradient. The monitor warns (``LossBalanceWarning``, rank zero) when the ratio first
    exceeds the threshold, naming the two terms, their weighted norms, the ratio and the step,
    and again only if it recovers (falls to ``recovery_threshold``) and comes back. Balanced norms can still stall when the
    gradients point against each other, so a second alarm (``GradientConflictWarning``) fires
    when some pair's cosine stays below ``cosine_threshold`` for ``cosine_patience``
    consecutive measurements while the pair's weighted loss stalls (see
    ``conflict_min_decrease``). With a ``TensorBoardLogger`` the alarms also appear as text
    entries and a custom-scalars layout groups the charts. At the end of the fit the monitor
    prints a short diagnosis (see :attr:`diagnosis`).

    Every measurement goes to every logger with its own step. A ``TensorBoardLogger`` gets each
    step's values as one event; when the monitor measures more often than the Trainer's
    ``log_every_n_steps``, the events are handed to its writer in batches (when Lightning logs,
    at the end of training and on an exception), which keeps an every-step monitor cheap. Other
    loggers get ``log_metrics`` at once.

    Args:
        every_n_steps: Measure every this many optimizer steps (step 0 always included).
        threshold: Alarm when the largest weighted gradient norm exceeds the smallest by more
            than this factor. Must be > 1.
        cosine_threshold: Conflict alarm when a pair's gradient cosine is below this value;
            in ``(-1, 1)`` (a cosine is never below -1), or ``None`` to switch the conflict alarm off
            (cosines are still logged).
        cosine_patience: Consecutive measurements below ``cosine_threshold`` before the
            conflict alarm fires (>= 1). ``None`` picks enough measurements to span about 200
            optimizer steps, at least 3 (``max(3, ceil(200 / every_n_steps))``), so that the
            stall test below is not fooled by a few noisy Adam steps.
        conflict_min_decrease: The conflict alarm fires only if, over those measurements, the
            pair's weighted loss ``λ_a L_a + λ_b L_b`` fell by less than this fraction (the
            conflict has stalled training). Near any stationary point of a two-term loss the two
            gradients cancel (cosine → −1) even while the losses keep falling; this keeps the
            alarm for stalls. ``None`` alarms on the cosine alone.
        loss_module: Attribute name of the ``MultiTermLoss`` to monitor (as in
            ``pl_module.named_modules()``); needed only when the module holds several.
        verbose: Print the end-of-fit diagnosis.
        report: At the end of the fit, write ``diagnosis.md`` (a plain-language report) and
            ``diagnosis.png`` (gradient norms and weights over the steps) into the logger's
            directory (``trainer.log_dir``); needs a logger. A one-off cost of about 0.1 s (plus
            0.3–0.6 s once per process for importing matplotlib).
        print_every_n_steps: Also print a compact table (term, loss, λ, ‖∇L‖, λ‖∇L‖, ratio)
            every this many steps through Lightning's rank-zero info (the textbook advice:
            "print the per-term gradient norms every 100 steps"). ``None``: never.
        progress_bar: Show ``grad_ratio`` in the progress bar (when the Trainer has one),
            refreshed at every measurement.
        log_cosines: Log (and keep for the report) ``grad_cosine/<a>_vs_<b>`` for every pair of
            terms. There are K(K−1)/2 pairs: with many terms (K = 40: 780 series), ``False``
            keeps the event files, the history and the checkpoints small. The conflict alarm
            still watches every pair.
        ratio_terms: The terms ``grad_ratio`` and its alarm compare (at least two); ``None``:
            all. A term with a deliberately small gradient (a weak regulariser or prior) would
            otherwise keep the alarm on for the whole fit. The other terms are still measured,
            logged and watched for conflicts.
        recovery_threshold: The ratio alarm, once on, ends when ``grad_ratio`` falls to this
            value or below (hysteresis: a ratio hovering at ``threshold`` would otherwise start
            a new alarm, and warn, at every crossing). In ``(1, threshold]``; ``threshold``
            itself ends the alarm at the first measurement below the threshold. ``None``:
            ``max(threshold / 2, √threshold)``, 50 for the default threshold of 100.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        threshold: float = 100.0,
        cosine_threshold: float | None = -0.5,
        cosine_patience: int | None = None,
        conflict_min_decrease: float | None = 0.05,
        loss_module: str | None = None,
        verbose: bool = True,
        report: bool = True,
        print_every_n_steps: int | None = None,
        progress_bar: bool = True,
        log_cosines: bool = True,
        ratio_terms: Sequence[str] | None = None,
        recovery_threshold: float | None = None,
    ) -> None:
        super().__init__(every_n_steps, loss_module)
        if ratio_terms is not None:  # a ratio compares two terms
            ratio_terms = check_term_names(
                "GradientNormMonitor", "ratio_terms", ratio_terms, "['pde', 'bc']", "all terms", minimum=2, type_error=TypeError
            )
        self.ratio_terms: list[str] | None = ratio_terms
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold) or threshold <= 1:
            raise ValueError(
                f"GradientNormMonitor: threshold must be a finite number > 1 (the largest allowed ratio of weighted gradient norms, e.g. 100.0), got {threshold!r}."
            )
        if cosine_threshold is not None and (
            isinstance(cosine_threshold, bool) or not isinstance(cosine_threshold, numbers.Real) or not -1.0 < cosine_threshold < 1.0
        ):
            raise ValueError(
                f"GradientNormMonitor: cosine_threshold must be a number in (-1, 1) (e.g. -0.5; a cosine is never below -1, so -1 "
                f"would never alarm), or None to disable the conflict alarm; got {cosine_threshold!r}."
            )
        if cosine_patience is not None and (not is_integer(cosine_patience, low=1)):
            raise ValueError(
                f"GradientNormMonitor: cosine_patience must be an integer >= 1 (consecutive measurements) or None for about 200 steps' worth; got {cosine_patience!r}."
            )
        if cosine_patience is None:
            cosine_patience = max(3, math.ceil(200 / self.every_n_steps))
        if conflict_min_decrease is not None and (
            isinstance(conflict_min_decrease, bool)
            or not isinstance(conflict_min_decrease, numbers.Real)
            or not 0.0 <= conflict_min_decrease < 1.0
        ):
            raise ValueError(
                f"GradientNormMonitor: conflict_min_decrease must be a fraction in [0, 1) (e.g. 0.05), or None to alarm on the cosine alone; got {conflict_min_decrease!r}."
            )
        if cosine_patience == 1 and conflict_min_decrease is not None and cosine_threshold is not None:
            # a stall is a change between measurements of the streak: one measurement has none
            raise ValueError(
                "GradientNormMonitor: cosine_patience=1 leaves no earlier measurement to tell whether the pair's weighted loss "
                f"has stalled (conflict_min_decrease={conflict_min_decrease!r}), so every low cosine would alarm. Use "
                "cosine_patience >= 2, or conflict_min_decrease=None to alarm on the cosine alone."
            )
        self.conflict_min_decrease = None if conflict_min_decrease is None else float(conflict_min_decrease)
        self.threshold = float(threshold)
        self.recovery_threshold = _checked_recovery_threshold(recovery_threshold, self.threshold)
        self.cosine_threshold = None if cosine_threshold is None else float(cosine_threshold)
        self.cosine_patience = int(cosine_patience)
        if print_every_n_steps is not None and (not is_integer(print_every_n_steps, low=1)):
            raise ValueError(f"GradientNormMonitor: print_every_n_steps must be an integer >= 1 or None, got {print_every_n_steps!r}.")
        self.print_every_n_steps = None if print_every_n_steps is None else int(print_every_n_steps)
        self.progress_bar = check_flag("GradientNormMonitor", "progress_bar", progress_bar)
        self.log_cosines = check_flag("GradientNormMonitor", "log_cosines", log_cosines)
        self.verbose = check_flag("GradientNormMonitor", "verbose", verbose)
        self.report = check_flag("GradientNormMonitor", "report", report)
        self.report_path: Path | str | None = None  # a URL for a logger on a remote filesystem
        self._recovery_logged = False  # grad_ratio_recovery_threshold written in this fit
        self._reset_fit_state()
        self._pending = PendingEvents()
        self._balancers: list[Any] = []  # the WeightBalancers on this loss (known at train start)
        self._weight_terms: list[str] = []  # the weight/<term> series this monitor writes (the rest: balancers)

    @property
    def _name(self) -> str:
        """How messages name this monitor: with the loss's path when the module has several losses."""
        return f"GradientNormMonitor[{self._loss_path}]" if self._tag_prefix else "GradientNormMonitor"

    def _reset_fit_state(self) -> None:
        """Forget what earlier fits measured: each fit gets its own alarms, diagnosis and report."""
        self.history = History()
        self.diagnosis = MonitorDiagnosis()
        self._conflict_streak: dict[str, int] = {}
        self._pair_keys: dict[tuple[str, str], str] = {}  # (a, b) -> "a_vs_b", built once per pair
        self._conflict_losses: dict[str, list[list[float]]] = {}  # per pair: its unweighted losses [L_a, L_b] per measurement
        self._conflict_active: dict[str, bool] = {}
        self._conflict_changes: dict[str, float] = {}
        self._term_flags: dict[str, str] = {}
        self.last_report: GradientReport | None = None
        self._absent_for: dict[str, int] = {}  # per term: measurements in a row it has been absent (None)
        self._longest_absence: dict[str, int] = {}  # per term: its longest such run that ended (it came back)

    def _is_due(self, step: int) -> bool:
        return self._on_cadence(step) or self._print_due(step)

    def _on_cadence(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def _print_due(self, step: int) -> bool:
        return self.print_every_n_steps is not None and step % self.print_every_n_steps == 0

    def _identity(self) -> dict[str, Any]:
        return {
            "every_n_steps": self.every_n_steps,
            "threshold": self.threshold,
            "cosine_threshold": self.cosine_threshold,
            "cosine_patience": self.cosine_patience,
            "conflict_min_decrease": self.conflict_min_decrease,
            "loss_module": self.loss_module,
        }

    # ---------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)  # resets the fit state unless the fit resumes
        unknown = [name for name in self.ratio_terms or [] if name not in self.criterion.term_names]
        if unknown:
            raise ValueError(
                f"GradientNormMonitor(ratio_terms=...): unknown term(s) {unknown}; the MultiTermLoss has terms "
                f"{list(self.criterion.term_names)}. Use those names."
            )
        self._refuse_a_second_monitor(trainer, pl_module)
        self._layout_hidden_warned = False
        self._recovery_logged = False
        self._write_layouts(trainer)

    def _write_layouts(self, trainer: pl.Trainer) -> None:
        """Write the dashboard layout to each TensorBoard logger, or restore it where a layout
        written since (the module's own ``on_fit_start`` runs after the callbacks') replaced it."""
        for logger in tensorboard_loggers(trainer):
            shown = write_layout(logger.experiment, self._tag_prefix, logger_tag_prefix(logger), self.criterion.term_names)
            if not shown and not self._layout_hidden_warned:
                self._layout_hidden_warned = True
                self._warn(
                    f"{self._name}: another custom-scalars layout in {logger.log_dir} is read by TensorBoard after "
                    "lightning-pinn's (it was written by another SummaryWriter on that folder), so the Custom Scalars tab "
                    "will not show the lightning-pinn charts. Write your layout with the logger's own writer "
                    "(logger.experiment.add_custom_scalars): the monitor keeps your categories beside its own."
                )

    def _refuse_a_second_monitor(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Two monitors on one loss would write the same tags at the same steps, and one report."""
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if other is self or not isinstance(other, GradientNormMonitor):
                continue
            try:
                path, _ = find_multi_term_loss(pl_module, other.loss_module, type(other).__name__)
            except ValueError:
                continue  # the other monitor reports its own configuration error
            if path == self._loss_path:
                raise ValueError(
                    f"GradientNormMonitor: two GradientNormMonitor callbacks watch the same loss ({path!r}); they would "
                    "write the same tags (grad_norm/<term>, grad_ratio, alarm/...) at the same steps with different "
                    "values, and the same diagnosis.md. Keep one monitor per loss (set its threshold=, every_n_steps=, "
                    "ratio_terms= as needed), or point each at its own MultiTermLoss with loss_module=."
                )

    def _on_measurement(self, trainer: pl.Trainer, pl_module: pl.LightningModule, measurement: StepMeasurement) -> None:
        assert measurement.gradients is not None
        report = summarize_gradients(
            measurement.terms,
            measurement.losses,
            measurement.weights,
            measurement.gradients,
            measurement.present,
            measurement.reached,
            # the K(K−1)/2 cosines serve the cosine tags and the conflict alarm only
            with_cosines=self.log_cosines or self.cosine_threshold is not None,
            ratio_terms=self.ratio_terms,
        )
        step = measurement.step
        if not self._hits(step, self._on_cadence):
            # measured only for print_every_n_steps: print, but keep the logs, the alarms' patience
            # and the diagnosis on the every_n_steps cadence
            console_info(trainer, self._table(report, step))
            return
        self.last_report = report
        self._track_term_health(report, step)
        self._track_absences(report)
        ratio_alarm = self._track_ratio(trainer, report, step)
        conflict_alarm = self._track_conflicts(trainer, report, step)

        metrics: dict[str, float] = {}
        for name, loss, weight, norm, weighted in zip(report.terms, report.losses, report.weights, report.norms, report.weighted_norms):
            # the weights a balancer writes reach the history from it, as they reach the event
            # files: the fit-time report and `lightning-pinn report` then read the same series
            if name in self._weight_terms:
                metrics[f"weight/{name}"] = weight
            if name in report.absent_terms:
                continue  # passed as None throughout this step: nothing was measured
            metrics[f"loss/{name}"] = loss
            metrics[f"grad_norm/{name}"] = norm
            metrics[f"grad_norm_weighted/{name}"] = weighted
        if report.nonfinite_terms:
            # a NaN/inf gradient: say so in the ratio too (EarlyStopping's check_finite stops on it)
            metrics["grad_ratio"] = math.nan
        elif report.ratio is not None:
            metrics["grad_ratio"] = report.ratio
        metrics["grad_ratio_threshold"] = self.threshold
        if not self._recovery_logged:  # once per fit (it is constant): the reports read it from the logs
            metrics["grad_ratio_recovery_threshold"] = self.recovery_threshold
            self._recovery_logged = True
        if self.log_cosines:
            for (a, b), cosine in report.cosines.items():
                metrics[f"grad_cosine/{pair_key(a, b)}"] = cosine
        metrics["alarm/grad_ratio"] = float(ratio_alarm)
        metrics["alarm/grad_conflict"] = float(conflict_alarm)
        # which pair's alarm started or ended: logged only then, so the reports name the pairs that alarmed
        metrics.update(self._conflict_changes)
        # Measurements more frequent than Lightning's own logging wait and go to TensorBoard in
        # batches; sparser ones go at once (batching would save nothing).
        self._log_scalars(trainer, metrics, step, self._pending if self.every_n_steps < trainer.log_every_n_steps else None)
        self.history.add(metrics, step)
        if self.progress_bar and "grad_ratio" in metrics and trainer.progress_bar_callback is not None:
            # the logged value (NaN for a NaN gradient), under the loss's tag with several losses
            show_in_progress_bar(trainer, f"{self._tag_prefix}grad_ratio", metrics["grad_ratio"])
        if self._hits(step, self._print_due):
            console_info(trainer, self._table(report, step))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # TensorBoard gets the waiting measurements (each at its own step) when Lightning logs
        # and flushes the writer itself: every log_every_n_steps optimizer steps. (Nothing waits
        # when log_every_n_steps is 0: see _on_measurement.)
        if self._pending and trainer.global_step % trainer.log_every_n_steps == 0:
            self._pending.flush()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_pinn.callbacks.balancers import WeightBalancer

        self._weight_terms = weight_terms_to_log(trainer, self)
        self._log_weights_set_between_fits(trainer)
        # balancers on the same loss (all callbacks are attached by now): the alarm text says so
        balancers = [cb for cb in callbacks_on_loss(trainer, self._loss) if isinstance(cb, WeightBalancer)]
        self._balancers = balancers
        self._warn_if_watched_less_often(trainer)
        self._write_layouts(trainer)

    def _log_weights_set_between_fits(self, trainer: pl.Trainer) -> None:
        """A fit that goes on from an earlier one (the same Trainer refitted) logs the λ of this
        monitor's weight series where ``set_weights`` changed them in between, at the step it
        starts from, as a balancer does for its own; a measurement due at that step logs them anyway."""
        step = trainer.global_step
        if step == 0 or self._on_cadence(step):
            return
        changed = self._weights_unlike_the_history(self._weight_terms, recorded_only=True)
        if changed:
            self._log_scalars(trainer, changed, step)
            self.history.add(changed, step)

    def _weights_unlike_the_history(self, names: Sequence[str], recorded_only: bool) -> dict[str, float]:
        """``{"weight/<term>": λ}`` for the terms ``names`` whose λ in force differs from the last
        one in :attr:`history` (a λ set by hand since), or that have none there unless ``recorded_only``."""
        weights = self.criterion.weights
        changed = {}
        for name in names:
            tag = f"weight/{name}"
            if tag in self.history:
                if self.history[tag][1][-1] != weights[name]:
                    changed[tag] = weights[name]
            elif not recorded_only:
                changed[tag] = weights[name]
        return changed

    #: Tags this monitor writes (after its loss prefix, if any): what EarlyStopping or
    #: ModelCheckpoint may watch through ``trainer.callback_metrics``.
    _OWN_TAG_PREFIXES = ("grad_norm/", "grad_norm_weighted/", "grad_ratio", "grad_cosine/", "loss/", "weight/", "alarm/")

    def _refresh_cadence(self, tag: str) -> int | None:
        if not tag.startswith(self._OWN_TAG_PREFIXES):
            return None
        if tag.startswith("weight/") and tag.removeprefix("weight/") not in self._weight_terms:
            return None  # a balancer writes this λ
        return self.every_n_steps

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.report_path = None  # until this fit writes its report

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._pending.flush()  # keep what was measured before the failure
        if self.verbose and self._fit_started and self.diagnosis.measurements:
            # a fit stopped by hand (Ctrl-C) or by an error often stops because it looks bad: say what
            # was measured (console only: no report files, no collective under DDP)
            console_info(
                trainer,
                f"{self._name}: the fit stopped ({type(exception).__name__}) after {trainer.global_step} optimizer "
                f"step(s).\n{self.summary()}",
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        self._pending.flush()
        if self._loss is not None:
            self._write_layouts(trainer)  # a layout written during the fit replaced the dashboard's
        if self.diagnosis.measurements == 0:
            return
        if self._loss is not None and trainer.global_step > (self.diagnosis.last_step or 0):
            # the weights the fit ends with, where they differ from the last ones recorded (a λ set
            # by hand after the last measurement); a balancer's last update is already there
            final = self._weights_unlike_the_history(self._loss.term_names, recorded_only=False)
            if final:
                self.history.add(final, trainer.global_step)
        text = self.summary()
        if self.verbose:
            console_info(trainer, text)
        for writer in tensorboard_writers(trainer):
            writer.add_text(f"{self._tag_prefix}diagnosis", _as_markdown(text), global_step=self.diagnosis.last_step)
            writer.flush()
        # trainer.log_dir is a collective under DDP (a broadcast from rank 0): every rank reads it
        log_dir = trainer.log_dir if self.report and trainer.loggers else None
        if log_dir is None:
            if self.report and trainer.loggers and self.verbose:
                why = (
                    "fast_dev_run replaces the loggers with Lightning's DummyLogger, which has no folder; fit without "
                    "fast_dev_run for a report"
                    if trainer.fast_dev_run
                    else f"the first logger ({type(trainer.loggers[0]).__name__}) has no folder (save_dir is None). Put a "
                    "logger with a folder first"
                )
                console_info(trainer, f"{self._name}: no report written: {why}, or read the summary above.")
            return
        try:
            if trainer.is_global_zero:
                name = f"diagnosis_{self._loss_path}" if self._tag_prefix else "diagnosis"
                try:
                    self.report_path, _ = write_report(self.history, log_dir, name=name)
                except Exception as error:  # noqa: BLE001 (the fit is done: a report it cannot write must not fail it)
                    self._warn(
                        f"{self._name}: the fit finished, but its report {name}.md could not be written to {log_dir!r} "
                        f"({type(error).__name__}: {error}). The measurements are in the logger and in this callback's "
                        "`history`; make the logger's folder writable, or run `lightning-pinn report LOGDIR` on a copy of "
                        "the event files, or pass GradientNormMonitor(report=False).",
                        category=UserWarning,
                    )
                else:
                    if self.verbose:
                        console_info(trainer, f"{self._name}: wrote {self.report_path} and {name}.png")
        finally:
            # the other ranks wait for the report (also when writing it failed): a worker that exits
            # first can take rank 0 down with it (a spawned gloo worker may abort at exit, and the
            # launcher then stops the others)
            trainer.strategy.barrier("lightning_pinn_report")

    # ---------------------------------------------------------------- alarms
    def _track_ratio(self, trainer: pl.Trainer, report: GradientReport, step: int) -> bool:
        diagnosis = self.diagnosis
        diagnosis.measurements += 1
        diagnosis.first_step = step if diagnosis.first_step is None else diagnosis.first_step
        diagnosis.last_step = step
        # A term of the alarmed pair absent (None) here: the ratio over the present terms says
        # nothing about that pair (an intermittent data term, say), so the alarm neither ends nor
        # starts again, until the term has been away longer than it ever was before (dropped).
        pair = diagnosis.ratio_alarm_pair if diagnosis.ratio_alarm_active else None
        gone = [t for t in pair or () if t in report.absent_terms]
        dropped = [t for t in gone if self._gone_for_good(t)]
        if report.ratio is None:  # fewer than two usable terms: no ratio to judge
            if dropped:
                self._end_ratio_alarm(trainer, step, None, dropped[0])
                return False
            return diagnosis.ratio_alarm_active
        assert report.largest is not None and report.smallest is not None
        if diagnosis.worst_ratio is None or report.ratio > diagnosis.worst_ratio:
            diagnosis.worst_ratio = report.ratio
            diagnosis.worst_ratio_step = step
            diagnosis.worst_pair = (report.largest, report.smallest)
        above = report.ratio > self.threshold
        holding = [b for b in self._balancers if above and b.holds_ratio_alarm((report.largest, report.smallest), step)]
        unheld = self._unheld_above(report, step) if holding and not diagnosis.ratio_alarm_active else None
        if unheld is not None:
            # The wait is for pairs a waiting balancer may change. A pair that none may change is
            # above the threshold as well, so nothing is waited for: the alarm (about grad_ratio,
            # as always) starts now, and its text names that pair.
            holding = []
        if holding:
            # A balancer that may change one of the two terms has not made its first update yet:
            # λ is still the initial guess it is about to replace, and an alarm (at step 0, say)
            # would only say what it is there to fix. The alarm stays as it is (on or off).
            if diagnosis.ratio_alarm_active:
                diagnosis.ratio_alarm_measurements += 1
            else:
                diagnosis.ratio_alarm_held += 1
                for name in (type(b).__name__ for b in holding):
                    if name not in diagnosis.ratio_alarm_held_by:
                        diagnosis.ratio_alarm_held_by.append(name)
            return diagnosis.ratio_alarm_active
        if not above and gone and not dropped:
            return True
        if above:
            diagnosis.ratio_alarm_measurements += 1
            diagnosis.ratio_alarm_pair = (report.largest, report.smallest)
            if not diagnosis.ratio_alarm_active:
                diagnosis.ratio_alarm_episodes += 1
                diagnosis.ratio_alarm_spans.append([step, None])
                message = self._ratio_message(report, step, unheld)
                self._warn(message, category=LossBalanceWarning)
                self._write_text(trainer, "alarms", message, step)
                diagnosis.ratio_alarm_active = True
        elif diagnosis.ratio_alarm_active:
            if report.ratio > self.recovery_threshold and not dropped:
                return True  # not recovered yet: the alarm stays on (hysteresis)
            self._end_ratio_alarm(trainer, step, report.ratio, dropped[0] if dropped else None)
        return above

    def _waits(self, report: GradientReport, step: int) -> bool:
        """Whether a ratio alarm about ``report`` (above the threshold) waits at ``step``: a balancer
        that may change one of its extreme pair has not made its first update, and no pair of terms
        that no waiting balancer may change is above the threshold too."""
        assert report.largest is not None and report.smallest is not None
        holds = any(b.holds_ratio_alarm((report.largest, report.smallest), step) for b in self._balancers)
        return holds and self._unheld_above(report, step) is None

    def _unheld_above(self, report: GradientReport, step: int) -> GradientReport | None:
        """``report`` with its ratio, largest and smallest over the terms no waiting balancer may
        change (a pair is held while a balancer may change either of its terms), if that ratio is
        above the threshold; ``None`` otherwise (also with fewer than two such terms)."""
        free = [
            weighted
            if (self.ratio_terms is None or name in self.ratio_terms)
            and not any(b.holds_ratio_alarm((name,), step) for b in self._balancers)
            else math.nan
            for name, weighted in zip(report.terms, report.weighted_norms)
        ]
        found = imbalance(free)
        if found is None or not found[0] > self.threshold:
            return None
        ratio, largest, smallest = found
        return replace(report, ratio=ratio, largest=report.terms[largest], smallest=report.terms[smallest])

    def _end_ratio_alarm(self, trainer: pl.Trainer, step: int, ratio: float | None, dropped: str | None) -> None:
        """The ratio alarm ends at ``step`` (``dropped``: a term of its pair that has been away too long)."""
        diagnosis = self.diagnosis
        if diagnosis.ratio_alarm_spans:
            diagnosis.ratio_alarm_spans[-1][1] = step
        message = (
            f"{self._name}: gradient-norm ratio back to {ratio:.3g}x at step {step} (the alarm starts above "
            f"{self.threshold:g}x and ends at {self.recovery_threshold:g}x or below)."
            if ratio is not None
            else f"{self._name}: the loss-balance alarm ends at step {step}."
        )
        if dropped is not None:
            message += (
                f" ('{dropped}', one of the alarmed pair, has been absent from the last {self._absent_for[dropped]} "
                "measurements: the alarm about it ends until it comes back.)"
            )
        console_info(trainer, message)
        self._write_text(trainer, "alarms", message, step)
        diagnosis.ratio_alarm_pair = None
        diagnosis.ratio_alarm_active = False

    def _ratio_message(self, report: GradientReport, step: int, unheld: GradientReport | None = None) -> str:
        """The alarm's text about ``report``'s extreme pair; ``unheld``: the most unequal pair that no
        waiting balancer may change, when it (above the threshold too) is why the alarm does not wait."""
        big, small = report.largest, report.smallest
        assert big is not None and small is not None and report.ratio is not None
        index = report.terms.index
        big_w, small_w = report.weighted_norms[index(big)], report.weighted_norms[index(small)]
        big_loss, small_loss = report.losses[index(big)], report.losses[index(small)]
        # the smaller residual must explain at least half of the ratio (in log scale): per unit of
        # residual the gradients are within √threshold (10x for the default 100x)
        within = nearly_satisfied(big_w, big_loss, small_w, small_loss, math.sqrt(self.threshold))
        satisfied = (
            f"But '{small}' may simply be nearly satisfied: its loss ({small_loss:.3g}) is {big_loss / small_loss:.3g}x below "
            f"'{big}''s ({big_loss:.3g}), and per unit of RMS residual (λ·‖∇L‖/√L) their gradients are within "
            f"{within:.3g}x of each other, so the small gradient comes from a small residual. While its loss stays small "
            f"nothing is neglected; a gradient-norm balancer would still raise its weight roughly as 1/√L, which can "
            f"destabilise the fit (keep '{small}' out of the balancer's terms=..., or cap max_weight). "
            if within is not None
            else ""
        )
        return (
            f"{self._name}: loss-balance alarm at step {step}: the weighted gradient norm of term '{big}' "
            f"(λ·‖∇L‖ = {big_w:.3g}) is {report.ratio:.3g}x that of term '{small}' ({small_w:.3g}) — a ratio "
            f"(grad_ratio) of {report.ratio:.3g}, above the threshold of {self.threshold:g}x. Gradient descent on this loss will mostly reduce '{big}' and neglect "
            f"'{small}'. "
            + satisfied
            + ("" if unheld is None else self._unheld_text((big, small), unheld, step))
            + self._ratio_advice(report, big, small)
        )

    def _ratio_advice(self, report: GradientReport, big: str, small: str) -> str:
        """What to do about ``big`` over ``small``: check the balancers that may change one of them,
        raise a schedule's weight, or (none changes either) raise ``λ_small`` or let a balancer do it."""
        assert report.ratio is not None
        owners = [b for b in self._balancers if _changes(b, big, small)]
        names = [_named(b) for b in owners]
        if owners and all(b._scheduled for b in owners):
            return (
                f"{' and '.join(names)} {'are' if len(names) > 1 else 'is'} attached to this loss and "
                f"set{'' if len(names) > 1 else 's'} λ from {_its(names)} schedule; if the alarm stays on, raise "
                f"the scheduled weight of '{small}' (about {report.ratio:.3g}x would match the norms) or let a "
                "GradNormBalancer / NTKBalancer set it."
            )
        if owners:
            rules = [b for b in owners if not b._scheduled]
            text = (
                f"{self._balancer_updates(owners)} {'are' if len(owners) > 1 else 'is'} attached to this loss; if the alarm stays on, check "
                f"{_its(names)} every_n_steps, terms and max_weight (and, with no update yet, warmup_steps and the warnings it gave)."
            )
            if not any(_changes(b, small) for b in rules):
                return (
                    text + f" None of them changes '{small}', the neglected term: add it to a balancer's terms=, or raise its "
                    f"weight ({_matching_weight(report, small, report.ratio)})."
                )
            if all(b._quantity == "loss" for b in rules):
                return text + (
                    f" {' and '.join(_named(b) for b in rules)} weigh{'' if len(rules) > 1 else 's'} the terms by their losses, "
                    f"not their gradient norms, so {'they' if len(rules) > 1 else 'it'} need not close this ratio: "
                    f"GradNormBalancer / NTKBalancer on '{small}' target it."
                )
            return text
        fix = f"Fix: raise the weight of '{small}' ({_matching_weight(report, small, report.ratio)}), or "
        if self._balancers and all(b._scheduled for b in self._balancers):  # only schedules, of other terms
            return fix + f"give it a schedule too, or let a GradNormBalancer / NTKBalancer change it (terms=['{small}'])."
        if self._balancers:  # attached, but for other terms only
            return fix + f"add '{small}' to the terms= of a balancer (those attached change neither '{big}' nor '{small}')."
        return fix + "add GradNormBalancer / NTKBalancer from lightning_pinn.callbacks to rebalance automatically."

    def _unheld_text(self, pair: tuple[str, str], unheld: GradientReport, step: int) -> str:
        """Why an alarm whose extreme ``pair`` waits for a balancer's first update did not wait."""
        big, small = unheld.largest, unheld.smallest
        assert big is not None and small is not None and unheld.ratio is not None
        waiting = [_named(b) for b in self._balancers if b.holds_ratio_alarm(pair, step)]
        text = (
            f"This pair waits for the first update of {' and '.join(dict.fromkeys(waiting))}, but '{big}' over '{small}' "
            f"({unheld.ratio:.3g}x) is above the threshold too, and no balancer waiting for its first update may change "
            "either of their weights"
        )
        if any(_changes(b, big, small) for b in self._balancers):
            return text + ". "
        matching = _matching_weight(unheld, small, unheld.ratio, "'" + big + "'")
        return (
            text
            + f"; no balancer attached changes them at all: raise the weight of '{small}' ({matching}) or add it to a balancer's terms=. "
        )

    @property
    def _balancer_names(self) -> list[str]:
        return [type(b).__name__ for b in self._balancers]

    def _table(self, report: GradientReport, step: int) -> str:
        """The console table of one measurement, with the alarm's state and (with several losses) the loss."""
        return format_table(report, step, self.threshold, self._table_flag(report, step), self._loss_path if self._tag_prefix else "")

    def _table_flag(self, report: GradientReport, step: int) -> str:
        """The console table's note on a ratio above the threshold: that the alarm waits for a
        balancer, that it is on, or (a row printed between measurements) just that it is above."""
        if report.ratio is None:
            return ""
        if report.ratio <= self.threshold:  # still on until it falls to the recovery threshold
            on = self.diagnosis.ratio_alarm_active and report.ratio > self.recovery_threshold
            return f"<-- ALARM (on until {self.recovery_threshold:g}x or below)" if on else ""
        assert report.largest is not None and report.smallest is not None
        if self.diagnosis.ratio_alarm_active:
            return "<-- ALARM"
        if self._waits(report, step):
            return "(above; the alarm waits for a balancer's first update)"
        return "(above the threshold)"

    def _balancer_updates(self, balancers: list[Any] | None = None) -> str:
        """``balancers`` (default: all attached) with their update counts so far, e.g.
        "GradNormBalancer (3 updates so far)"."""
        return " and ".join(
            f"{_named(b)} ({b.num_updates} update{'' if b.num_updates == 1 else 's'} so far)"
            for b in (self._balancers if balancers is None else balancers)
        )

    def _track_conflicts(self, trainer: pl.Trainer, report: GradientReport, step: int) -> bool:
        diagnosis = self.diagnosis
        self._conflict_changes = {}  # this measurement's per-pair alarm starts (1) and ends (0)
        index_of = {term: i for i, term in enumerate(report.terms)}
        index = index_of.__getitem__  # K² pairs: a dict, not tuple.index scans
        for a, b, *_ in [span for span in diagnosis.conflict_alarm_spans if span[3] is None]:
            # as for the ratio alarm: a term of the pair away longer than it ever was before
            # (dropped for good) ends the pair's alarm; a shorter absence leaves it as it is
            gone = [t for t in (a, b) if self._gone_for_good(t)]
            if gone:
                why = f"'{gone[0]}' has been absent from the last {self._absent_for[gone[0]]} measurements"
                self._end_conflict(trainer, a, b, step, why)
                continue
            # a term whose gradient is now exactly zero (satisfied, frozen, hard-constrained) has
            # no direction to oppose: no cosine is taken, so the alarm would otherwise stay on
            still = [t for t in (a, b) if t in index_of and report.norms[index_of[t]] == 0]
            if still:
                self._end_conflict(trainer, a, b, step, f"the gradient of '{still[0]}' is now exactly zero")
        if report.cosines:
            lowest_pair, lowest = min(report.cosines.items(), key=itemgetter(1))  # the first of equal minima
            if diagnosis.min_cosine is None or lowest < diagnosis.min_cosine:
                diagnosis.min_cosine, diagnosis.min_cosine_step, diagnosis.min_cosine_pair = lowest, step, lowest_pair
        if self.cosine_threshold is None:
            return any(self._conflict_active.values())
        keys = self._pair_keys
        for (a, b), cosine in report.cosines.items():
            key = keys.get((a, b)) or keys.setdefault((a, b), pair_key(a, b))
            if cosine >= self.cosine_threshold:  # the common case, kept cheap: K(K−1)/2 pairs a measurement
                if self._conflict_streak.get(key):
                    self._conflict_streak[key] = 0
                if self._conflict_active.get(key):
                    self._end_conflict(trainer, a, b, step, f"cosine {cosine:.2f}")
                continue
            weight_a, weight_b = report.weights[index(a)], report.weights[index(b)]
            losses = [report.losses[index(a)], report.losses[index(b)]]
            pair_loss = weight_a * losses[0] + weight_b * losses[1]
            streak = self._conflict_streak.get(key, 0) + 1
            self._conflict_streak[key] = streak
            # the pair's weighted loss over the last `cosine_patience` measurements of the streak
            recent = (self._conflict_losses.get(key, []) if streak > 1 else []) + [losses]
            self._conflict_losses[key] = recent[-self.cosine_patience :]
            if streak < self.cosine_patience or self._conflict_active.get(key):
                continue
            # the pair's loss then and now, both weighted with today's λ: a balancer raising a
            # weight in between is not a stall (nor is lowering one progress)
            start_a, start_b = self._conflict_losses[key][0]
            start_loss = weight_a * start_a + weight_b * start_b
            decrease = 1.0 - pair_loss / start_loss if start_loss > 0 else 0.0
            if self.conflict_min_decrease is not None and decrease >= self.conflict_min_decrease:
                continue  # opposed gradients, but the pair's loss is still falling: not a stall
            self._conflict_active[key] = True
            self._conflict_changes[f"alarm/grad_conflict/{key}"] = 1.0
            diagnosis.conflict_alarm_episodes += 1
            diagnosis.conflict_alarm_spans.append([a, b, step, None])
            window = len(self._conflict_losses[key])  # the change is from the first to the last of these
            change = f", {-100 * decrease:+.1f}% across the last {window} measurements" if window > 1 else ""
            message = (
                f"{self._name}: gradient-conflict alarm at step {step}: the gradients of terms '{a}' and '{b}' "
                f"point against each other (cosine {cosine:.2f}, below {self.cosine_threshold:g} for {streak} consecutive "
                + (
                    f"measurements) and their weighted loss has stalled (now {pair_loss:.3g}{change}), "
                    if self.conflict_min_decrease is not None
                    else f"measurements; their weighted loss is now {pair_loss:.3g}{change}), "
                )
                + "so a step that lowers one term raises the other even if their norms "
                "are balanced. Try: hard-constrain the initial/boundary condition, change the weights, lower the "
                "learning rate, or add collocation points where the terms meet."
            )
            self._warn(message, category=GradientConflictWarning)
            self._write_text(trainer, "alarms", message, step)
        return any(self._conflict_active.values())

    def _end_conflict(self, trainer: pl.Trainer, a: str, b: str, step: int, why: str) -> None:
        """The conflict alarm about ``a`` and ``b`` ends at ``step`` (``why``: the cosine, an absence or a zero gradient)."""
        key = pair_key(a, b)
        self._conflict_active[key] = False
        self._conflict_streak[key] = 0
        self._conflict_changes[f"alarm/grad_conflict/{key}"] = 0.0
        for span in reversed(self.diagnosis.conflict_alarm_spans):
            if span[0] == a and span[1] == b and span[3] is None:
                span[3] = step
                break
        self._write_text(trainer, "alarms", f"{self._name}: gradient conflict between '{a}' and '{b}' ended at step {step} ({why}).", step)

    #: Measurements in a row without a term of an alarmed pair that keep the (ratio or conflict)
    #: alarm on, unless the term was once absent for longer and came back (then that long).
    _ABSENCE_TOLERATED = 2

    def _gone_for_good(self, term: str) -> bool:
        """Whether ``term`` has been absent longer than :attr:`_ABSENCE_TOLERATED` measurements and
        than any absence it came back from: an alarm about it ends (a term dropped for good)."""
        return self._absent_for.get(term, 0) > max(self._ABSENCE_TOLERATED, self._longest_absence.get(term, 0))

    def _track_absences(self, report: GradientReport) -> None:
        """Count each term's measurements in a row without it, from its first presence on (a term
        that first appears late has not been "absent and come back")."""
        for name in report.terms:
            if name not in report.absent_terms:
                if self._absent_for.get(name, 0):
                    self._longest_absence[name] = max(self._longest_absence.get(name, 0), self._absent_for[name])
                self._absent_for[name] = 0
            elif name in self._absent_for:
                self._absent_for[name] += 1

    def _track_term_health(self, report: GradientReport, step: int) -> None:
        for name, weight, norm in zip(report.terms, report.weights, report.norms):
            if weight == 0 and norm > 0 and name not in self.diagnosis.zero_weight_terms:  # NaN (absent) fails norm > 0
                self.diagnosis.zero_weight_terms.append(name)
        for name in report.present_terms:
            if name in report.unreached_terms:
                flag = "unreached"
            elif name in report.zero_terms:
                flag = "zero"
            elif name in report.nonfinite_terms:
                flag = "nonfinite"
            else:
                flag = ""
            if flag == self._term_flags.get(name, ""):
                continue
            self._term_flags[name] = flag
            if flag in ("zero", "unreached"):
                if name not in self.diagnosis.zero_gradient_terms:
                    self.diagnosis.zero_gradient_terms.append(name)
                why = (
                    "its loss does not reach any trainable parameter (the parameters it depends on are frozen, or its residual "
                    "is computed from tensors that are not parameters of the model)"
                    if flag == "unreached"
                    else "its loss sits at an exact minimum (e.g. the residual is exactly 0)"
                    if report.losses[report.terms.index(name)] == 0
                    else f"its loss ({report.losses[report.terms.index(name)]:.3g}) does not change with the trainable "
                    "parameters here (e.g. the residual reaches them only through a factor that is 0)"
                )
                self._warn(
                    f"{self._name}: term '{name}' has an exactly zero gradient at step {step}: {why}. It is left out "
                    "of grad_ratio and the cosines; check that its residual is computed from the network output.",
                    category=TermGradientWarning,
                )
            elif flag == "nonfinite":
                if name not in self.diagnosis.nonfinite_terms:
                    self.diagnosis.nonfinite_terms.append(name)
                self._warn(
                    f"{self._name}: term '{name}' has a NaN or infinite gradient at step {step} "
                    f"(loss {report.losses[report.terms.index(name)]:.3g}). The logged grad_ratio is NaN while it lasts and the "
                    "alarm compares the other terms; look for NaN/inf "
                    "in its residual (division by zero, log of a negative number, exploding network output).",
                    category=TermGradientWarning,
                )

    def _write_text(self, trainer: pl.Trainer, tag: str, message: str, step: int) -> None:
        for writer in tensorboard_writers(trainer):
            writer.add_text(f"{self._tag_prefix}{tag}", message, global_step=step)

    # ---------------------------------------------------------------- reporting
    def summary(self) -> str:
        """A short plain-language diagnosis of the fit so far."""
        d = self.diagnosis
        lines = [
            f"{self._name} diagnosis: {d.measurements} measurement(s), steps {d.first_step}-{d.last_step}, every {self.every_n_steps} step(s)."
        ]
        if d.worst_ratio is None and d.zero_weight_terms:
            lines.append(
                "  gradient-norm ratio: fewer than two terms with a non-zero weighted gradient; the weight of "
                f"{', '.join(repr(t) for t in d.zero_weight_terms)} was 0 (its gradient was not), so that term did not train. "
                "If that was not intended, give it a positive weight."
            )
        elif d.worst_ratio is None:
            lines.append("  gradient-norm ratio: fewer than two terms with a non-zero gradient; nothing to compare.")
        else:
            assert d.worst_pair is not None
            verdict = "ABOVE" if d.worst_ratio > self.threshold else "within"
            lines.append(
                f"  worst gradient-norm ratio: {d.worst_ratio:.3g}x at step {d.worst_ratio_step}, '{d.worst_pair[0]}' (largest) "
                f"over '{d.worst_pair[1]}' (smallest); {verdict} the {self.threshold:g}x threshold."
            )
            if d.ratio_alarm_episodes:
                state = "still on at the last measurement" if d.ratio_alarm_active else "off at the last measurement"
                lines.append(
                    f"  loss-balance alarm: {d.ratio_alarm_episodes} episode(s), above threshold at {d.ratio_alarm_measurements} of "
                    f"{d.measurements} measurements, {state}. "
                    + (
                        f"{self._balancer_updates()} {'were' if len(self._balancer_names) > 1 else 'was'} attached."
                        if self._balancer_names
                        else "Try GradNormBalancer or NTKBalancer, or raise the small term's weight."
                    )
                )
            else:
                lines.append("  loss-balance alarm: never fired.")
            if d.ratio_alarm_held:
                lines.append(
                    f"  above the threshold at {d.ratio_alarm_held} measurement(s) before the first update of "
                    f"{' and '.join(d.ratio_alarm_held_by)} (the alarm waited for it)."
                )
        if d.min_cosine is not None and d.min_cosine_pair is not None:
            # a pair is "opposed" only with a negative cosine; otherwise the lowest one says they never were
            label = "most opposed gradients" if d.min_cosine < 0 else "no opposed gradients; lowest cosine"
            lines.append(
                f"  {label}: '{d.min_cosine_pair[0]}' vs '{d.min_cosine_pair[1]}', cosine {d.min_cosine:.2f} at step "
                f"{d.min_cosine_step}; conflict alarm episodes: {d.conflict_alarm_episodes}."
            )
        if d.zero_gradient_terms:
            lines.append(f"  terms seen with a zero gradient: {', '.join(d.zero_gradient_terms)}.")
        if d.zero_weight_terms and d.worst_ratio is not None:
            lines.append(f"  terms seen with weight 0 (not trained then, left out of the ratio): {', '.join(d.zero_weight_terms)}.")
        if d.nonfinite_terms:
            lines.append(f"  terms seen with a NaN/inf gradient: {', '.join(d.nonfinite_terms)}.")
        return "\n".join(lines)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "diagnosis": asdict(self.diagnosis),
            "conflict_streak": dict(self._conflict_streak),
            "conflict_active": dict(self._conflict_active),
            "conflict_losses": {key: [list(pair) for pair in values] for key, values in self._conflict_losses.items()},
            "term_flags": dict(self._term_flags),
            "absent_for": dict(self._absent_for),
            "longest_absence": dict(self._longest_absence),
            "history": self.history.to_state(),  # the report of a resumed fit covers the whole run
        }

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        super()._load_state(state_dict)
        saved = dict(state_dict["diagnosis"])
        for key in ("worst_pair", "min_cosine_pair", "ratio_alarm_pair"):
            if saved.get(key) is not None:
                saved[key] = tuple(saved[key])
        self.diagnosis = MonitorDiagnosis(**saved)
        self._conflict_streak = dict(state_dict.get("conflict_streak", {}))
        self._conflict_active = dict(state_dict.get("conflict_active", {}))
        # (a checkpoint from before the pairs' unweighted losses were kept holds one weighted sum per
        # measurement, which cannot be re-weighted: that pair's window starts again)
        self._conflict_losses = {}
        for key, values in state_dict.get("conflict_losses", {}).items():
            if all(isinstance(pair, (list, tuple)) for pair in values):
                self._conflict_losses[key] = [list(pair) for pair in values]
            else:  # its streak starts again too, so the stall is judged on a full window
                self._conflict_streak[key] = 0
        self._term_flags = dict(state_dict.get("term_flags", {}))
        self._absent_for = dict(state_dict.get("absent_for", {}))
        self._longest_absence = dict(state_dict.get("longest_absence", {}))
        self.history = History.from_state(state_dict.get("history", {}))


def _as_markdown(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())


def format_table(report: GradientReport, step: int, threshold: float, flag: str | None = None, loss_path: str = "") -> str:
    """A compact aligned table of one measurement (for the console): per term its loss, λ, ‖∇L‖,
    λ‖∇L‖ and ratio (λ‖∇L‖ over the smallest one ``grad_ratio`` compares), then ``grad_ratio``.

    ``flag`` follows the ratio line (default: ``"<-- ALARM"`` above the threshold); ``loss_path``
    names the loss in the heading (a module with several).
    """
    # each term's weighted norm over the smallest one grad_ratio compares: its row is 1x, the
    # largest's is grad_ratio
    smallest = report.weighted_norms[report.terms.index(report.smallest)] if report.smallest is not None else math.nan
    rows = [["term", "loss", "λ", "‖∇L‖", "λ‖∇L‖", "ratio"]]
    for name, loss, weight, norm, weighted in zip(report.terms, report.losses, report.weights, report.norms, report.weighted_norms):
        if name in report.absent_terms:
            rows.append([name, "absent", f"{weight:.3g}", "-", "-", "-"])
        else:
            usable = weighted > 0 and smallest > 0 and math.isfinite(weighted / smallest)
            ratio = f"{weighted / smallest:.3g}x" if usable else "-"
            rows.append([name, f"{loss:.3e}", f"{weight:.3g}", f"{norm:.3e}", f"{weighted:.3e}", ratio])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"step {step}{f' ({loss_path})' if loss_path else ''}:"] + [
        "  " + "  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(row, widths))) for row in rows
    ]
    if report.ratio is not None:
        if flag is None:
            flag = "<-- ALARM" if report.ratio > threshold else ""
        lines.append(
            f"  grad_ratio {report.ratio:.3g}x ('{report.largest}' / '{report.smallest}'), threshold {threshold:g}x"
            + (f"  {flag}" if flag else "")
        )
    return "\n".join(lines)


def _changes(balancer: Any, *terms: str) -> bool:
    """Whether ``balancer`` may change the weight of one of ``terms`` (its ``terms=``; all if ``None``)."""
    return balancer.terms is None or any(term in balancer.terms for term in terms)


def _matching_weight(report: GradientReport, term: str, ratio: float, what: str = "the norms") -> str:
    """E.g. "λ = 1 now; about 1e+03 would match the norms": ``term``'s weight, and that times ``ratio``."""
    weight = report.weights[report.terms.index(term)]
    return f"λ = {weight:g} now; about {weight * ratio:.3g} would match {what}"


def _named(balancer: Any) -> str:
    """A balancer's class name, with its terms when it owns only some (two of one class differ)."""
    return type(balancer).__name__ if balancer.terms is None else f"{type(balancer).__name__}(terms={balancer.terms!r})"


def _its(names: list[str]) -> str:
    """The possessive for one named callback or several: "its" or "their"."""
    return "their" if len(names) > 1 else "its"
