"""Plumbing shared by the callbacks: finding the loss, the step cadence, the engine, logging."""

from __future__ import annotations

import math
import numbers
import re
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor

from lightning_pinn._lightning import LightningCallback, lightning_classes
from lightning_pinn.alerts import FitWarnings, TermGradientWarning
from lightning_pinn.engine import StepMeasurement, TermGradientEngine, TraceRequest
from lightning_pinn.loss import MultiTermLoss
from lightning_pinn.tensorboard import fast_event_checksums

__all__ = [
    "PerTermCallback",
    "callbacks_on_loss",
    "find_multi_term_loss",
    "log_scalars",
    "PendingEvents",
    "publish",
    "tensorboard_loggers",
    "tensorboard_writers",
]


def find_multi_term_loss(pl_module: torch.nn.Module, name: str | None, owner: str) -> tuple[str, MultiTermLoss]:
    """Return ``(name, loss)`` for the module's :class:`MultiTermLoss`, or raise a clear error.

    Args:
        pl_module: The LightningModule to search (``pl_module.named_modules()``).
        name: The loss's attribute path (as in ``named_modules()``), required when the
            module holds several ``MultiTermLoss`` instances.
        owner: The callback's name, for the error message.
    """
    found = [(path, module) for path, module in pl_module.named_modules() if isinstance(module, MultiTermLoss)]
    model = type(pl_module).__name__
    if name is not None:
        for path, module in found:
            if path == name:
                return path, module
        available = ", ".join(repr(path) for path, _ in found) or "none"
        raise ValueError(
            f"{owner}(loss_module={name!r}): {model} has no MultiTermLoss at {name!r} (found: {available}). Pass the "
            "attribute path of the loss"
            + (f", e.g. loss_module={found[0][0]!r}." if found else "; add a MultiTermLoss to the module first.")
        )
    if not found:
        raise ValueError(
            f"{owner}: {model} has no MultiTermLoss among its submodules, so {owner} has no loss terms to work on. Add "
            "one in __init__, e.g. self.criterion = MultiTermLoss(pde=1.0, ic=1.0), and return "
            "self.criterion(pde=r_pde, ic=r_ic) from training_step. (A MultiTermLoss kept in a plain list, dict or "
            "tuple is not registered with the module: assign it to an attribute, or hold several in nn.ModuleList / "
            "nn.ModuleDict.)"
        )
    if len(found) > 1:
        names = ", ".join(repr(path) for path, _ in found)
        raise ValueError(
            f"{owner}: {model} has several MultiTermLoss modules ({names}); name the one to use, e.g. {owner}(loss_module={found[0][0]!r})."
        )
    return found[0]


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int, pending: PendingEvents | None = None) -> None:
    """Send ``metrics`` to every logger at ``step``, whatever ``log_every_n_steps`` says.

    Like Lightning's ``LearningRateMonitor``, this goes to the loggers directly, so a
    measurement made every 10 steps reaches them every 10 steps (``pl_module.log`` would hold
    it back until ``log_every_n_steps``). Any logger gets ``Logger.log_metrics``; a
    ``TensorBoardLogger`` gets all values of the step in one event, which is about 5x cheaper
    than one ``add_scalar`` per value. With ``pending``, TensorBoard events are queued there
    (with their step and wall time) until :meth:`PendingEvents.flush`. Loggers are rank-zero
    only; on other ranks only ``trainer.callback_metrics`` is updated.

    Every value also becomes the latest entry of ``trainer.callback_metrics`` (on every rank)
    and, with a logger, of ``trainer.logged_metrics``, as ``self.log`` would make it, so
    ``EarlyStopping(monitor="grad_ratio")`` or ``ModelCheckpoint(monitor="loss/pde")`` work and
    the last values can be read after fit.
    """
    if not metrics:
        return
    values = publish(trainer, metrics)
    if not trainer.loggers:
        return
    _connector_metrics(trainer, "logged").update(zip(metrics, values))  # as Lightning's log_metrics does
    if trainer.global_rank != 0:
        return
    for logger in trainer.loggers:
        file_writer = _tensorboard_file_writer(logger)
        if file_writer is None:
            logger.log_metrics(dict(metrics), step=step)
            continue
        prefix = logger_tag_prefix(logger)
        tags = [f"{prefix}{name}" for name in metrics]
        values = [float(value) for value in metrics.values()]
        if pending is None:
            _write_event(file_writer, tags, values, step, time.time())
        else:
            pending.add(file_writer, tags, values, step)


def publish(trainer: pl.Trainer, metrics: Mapping[str, float] | Mapping[str, Tensor]) -> tuple[Tensor, ...]:
    """Make ``metrics`` the latest entries of ``trainer.callback_metrics`` (what ``EarlyStopping``
    and ``ModelCheckpoint`` read), without logging them; returns them as 0-dim float64 tensors.

    Values given as 0-dim tensors stay on their device (no host synchronisation)."""
    given = list(metrics.values())
    if given and all(isinstance(value, Tensor) for value in given):
        values = torch.stack([value.detach() for value in given]).to(torch.float64).unbind()  # type: ignore[union-attr]
    else:
        values = torch.tensor(given, dtype=torch.float64).unbind()
    _connector_metrics(trainer, "callback").update(zip(metrics, values))
    return values


def logger_tag_prefix(logger: Any) -> str:
    """What a logger puts before each tag: ``"<prefix>-"`` for ``TensorBoardLogger(prefix=...)``
    (its ``LOGGER_JOIN_CHAR``), else ``""``."""
    prefix = getattr(logger, "_prefix", "") or ""
    return f"{prefix}{getattr(logger, 'LOGGER_JOIN_CHAR', '-')}" if prefix else ""


def show_in_progress_bar(trainer: pl.Trainer, name: str, value: float) -> None:
    """Show ``name = value`` in the Trainer's progress bar until the next call.

    Written into the dict behind ``trainer.progress_bar_metrics``, which every progress bar
    reads, rather than through ``pl_module.log(..., prog_bar=True)``: that costs about 0.5 ms
    a call, and Lightning merges a value logged that way back over ``trainer.callback_metrics``
    on every read until the epoch ends, so ``EarlyStopping(monitor=name)`` saw a stale value
    instead of the one :func:`log_scalars` published.
    """
    _connector_metrics(trainer, "progress_bar")[name] = float(value)


def _connector_metrics(trainer: pl.Trainer, kind: str) -> dict[str, Any]:
    """The dict behind ``trainer.callback_metrics`` (``kind="callback"``), ``trainer.logged_metrics``
    (``"logged"``) or ``trainer.progress_bar_metrics`` (``"progress_bar"``).

    The public properties first merge in every value logged with ``self.log`` (computing each
    one) on every access; the dict they return is the logger connector's, which is read here
    directly when it exists, so publishing a measurement stays a dict update.
    """
    target = getattr(getattr(trainer, "_logger_connector", None), f"_{kind}_metrics", None)
    return target if isinstance(target, dict) else getattr(trainer, f"{kind}_metrics")


def _tensorboard_file_writer(logger: Any) -> Any | None:
    """The event-file writer behind a ``TensorBoardLogger``; ``None`` for any other logger.

    A subclass that overrides ``log_metrics`` (to rename, filter or mirror values) gets its
    ``log_metrics`` called like any other logger: writing around it would skip the user's code.
    """
    base = next((cls for cls in lightning_classes("loggers", "TensorBoardLogger") if isinstance(logger, cls)), None)
    if base is None or type(logger).log_metrics is not base.log_metrics:
        return None
    get_file_writer = getattr(logger.experiment, "_get_file_writer", None)
    return None if get_file_writer is None else get_file_writer()  # e.g. tensorboardX: the generic path


def _write_event(file_writer: Any, tags: list[str], values: list[float], step: int, wall_time: float) -> None:
    """One TensorBoard event holding every ``tag = value`` of a step."""
    summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in zip(tags, values)])
    file_writer.add_summary(summary, step, wall_time)


class _CheckpointLoad:
    """What lightning-pinn's callbacks share about one checkpoint being restored: its
    ``global_step`` and whether the "step missing" warning was given."""

    def __init__(self, step: int | None) -> None:
        self.step = step
        self.warned = False


class PendingEvents:
    """TensorBoard events held back and handed to the event writer in batches.

    TensorBoard's writer queues each event for a background thread, and waking that thread once
    per event cost more than the event itself (about 0.15 ms per optimizer step on 2 CPU cores
    with the monitor measuring every step; ``benchmarks/overhead.py``). The events keep the
    step and wall time at which they were measured, so what TensorBoard shows is unchanged;
    they reach the writer when :meth:`flush` is called (the monitor does it when Lightning
    itself logs, every ``log_every_n_steps`` steps, at the end of training and on an
    exception) or when ``limit`` events are waiting.
    """

    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self._events: list[tuple[Any, list[str], list[float], int, float]] = []

    def __len__(self) -> int:
        return len(self._events)

    def add(self, file_writer: Any, tags: list[str], values: list[float], step: int) -> None:
        self._events.append((file_writer, tags, values, step, time.time()))
        if len(self._events) >= self.limit:
            self.flush()

    def flush(self) -> None:
        """Hand every waiting event to its writer, in the order they were measured."""
        events, self._events = self._events, []
        for file_writer, tags, values, step, wall_time in events:
            _write_event(file_writer, tags, values, step, wall_time)


def tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """The ``SummaryWriter`` of each ``TensorBoardLogger`` (rank zero only; empty elsewhere)."""
    return [logger.experiment for logger in tensorboard_loggers(trainer)]


def tensorboard_loggers(trainer: pl.Trainer) -> list[TensorBoardLogger]:
    """Each ``TensorBoardLogger`` of the Trainer (rank zero only; empty elsewhere)."""
    if trainer.global_rank != 0:
        return []
    classes = lightning_classes("loggers", "TensorBoardLogger")
    return [logger for logger in trainer.loggers if isinstance(logger, classes)]


def callbacks_on_loss(trainer: pl.Trainer, loss: MultiTermLoss | None) -> list[PerTermCallback]:
    """The Trainer's lightning-pinn callbacks attached to ``loss`` (known from fit start on)."""
    if loss is None:
        return []
    return [cb for cb in trainer.callbacks if isinstance(cb, PerTermCallback) and cb._loss is loss]  # type: ignore[attr-defined]


def weight_terms_to_log(trainer: pl.Trainer, callback: PerTermCallback) -> list[str]:
    """The terms whose ``weight/<term>`` series ``callback`` writes: each series has one writer.

    A balancer writes the terms it may change; the terms no balancer changes are written by the
    first :class:`GradientNormMonitor` on the same loss, else by the first balancer. Two writers
    of one tag would give it two points at a step (or points out of step order).
    """
    from lightning_pinn.callbacks.balancers import WeightBalancer
    from lightning_pinn.callbacks.monitor import GradientNormMonitor

    loss = callback._loss
    if loss is None:
        return []
    mine = callbacks_on_loss(trainer, loss)
    balancers = [cb for cb in mine if isinstance(cb, WeightBalancer)]
    monitors = [cb for cb in mine if isinstance(cb, GradientNormMonitor)]
    fallback = monitors[0] if monitors else balancers[0] if balancers else None
    writers = {}
    for balancer in balancers:
        for name in loss.term_names:
            if balancer.terms is None or name in balancer.terms:
                writers.setdefault(name, balancer)
    return [name for name in loss.term_names if writers.get(name, fallback) is callback]


def is_integer(value: Any, low: int | None = None) -> bool:
    """Whether ``value`` is an integer (Python or numpy, not a bool) and, given ``low``, at least ``low``."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and (low is None or value >= low)


def check_every_n_steps(owner: str, value: Any) -> int:
    """Validate an ``every_n_steps`` argument: an integer ``>= 1``."""
    if not is_integer(value, low=1):
        raise ValueError(f"{owner}: every_n_steps must be an integer >= 1 (1 = every optimizer step), got {value!r}.")
    return int(value)


class _PickledGenerator(NamedTuple):
    """A ``torch.Generator`` in a form every pickler handles: its device and state bytes."""

    device: str
    state: bytes


def _accumulations(trainer: pl.Trainer) -> list[int]:
    """Every number of batches per optimizer step this fit uses: the Trainer's
    ``accumulate_grad_batches`` and, with a ``GradientAccumulationScheduler`` (which sets it at
    each epoch's start, after the checks here run), each value of its schedule."""
    values = [max(1, int(trainer.accumulate_grad_batches))]
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, lightning_classes("callbacks", "GradientAccumulationScheduler")):
            schedule = getattr(callback, "scheduling", {}) or {}
            values += [max(1, int(v)) for v in schedule.values() if isinstance(v, int)]
    return values


def _validation_interval(trainer: pl.Trainer, steps_per_epoch: int, accumulate: int) -> int | None:
    """The fewest optimizer steps between two validation runs of the fit (Lightning's
    ``val_check_interval`` and ``check_val_every_n_epoch``), or ``None`` if validation never
    runs or runs on a wall-clock interval."""
    if getattr(trainer, "_val_check_time_interval", None) is not None or not getattr(trainer, "enable_validation", False):
        return None
    batches = trainer.num_training_batches
    every_n_epochs = trainer.check_val_every_n_epoch
    check_batch = getattr(trainer, "val_check_batch", None)
    if check_batch is None:
        return None
    if every_n_epochs is None:  # every `val_check_interval` batches, counted across epochs
        return max(1, int(check_batch) // accumulate) if math.isfinite(check_batch) else None
    if math.isfinite(check_batch) and check_batch < batches:  # several runs per validated epoch
        return max(1, int(check_batch) // accumulate)
    return steps_per_epoch * max(1, int(every_n_epochs))  # at the end of every n-th epoch


def _early_stopping_interval(callback: Any, trainer: pl.Trainer, steps_per_epoch: int, validation: int | None) -> int | None:
    """Every how many optimizer steps an ``EarlyStopping`` checks (``None``: never, or unknown).

    It checks at each training epoch's end or, by default whenever validation runs more than
    once per epoch or not every epoch, after each validation run (``EarlyStopping.setup``)."""
    on_train_epoch_end = getattr(callback, "_check_on_train_epoch_end", None)
    if on_train_epoch_end is None:
        on_train_epoch_end = trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1
    return steps_per_epoch if on_train_epoch_end else validation


def _checkpoint_interval(callback: Any, trainer: pl.Trainer, steps_per_epoch: int, validation: int | None) -> int | None:
    """Every how many optimizer steps a ``ModelCheckpoint`` compares its ``monitor`` (``None``:
    never, or on a wall-clock interval): every ``every_n_train_steps`` steps, and every
    ``every_n_epochs`` epochs at a training epoch's end or after validation, as
    ``ModelCheckpoint._should_save_on_train_epoch_end`` decides."""
    intervals = []
    every_n_train_steps = getattr(callback, "_every_n_train_steps", 0) or 0
    if every_n_train_steps:
        intervals.append(int(every_n_train_steps))
    every_n_epochs = getattr(callback, "_every_n_epochs", 0) or 0
    if every_n_epochs:
        on_train_epoch_end = getattr(callback, "_save_on_train_epoch_end", None)
        if on_train_epoch_end is None:
            if getattr(trainer, "_val_check_time_interval", None) is not None or trainer.check_val_every_n_epoch != 1:
                on_train_epoch_end = False
            else:
                on_train_epoch_end = not getattr(trainer, "enable_validation", False) or trainer.val_check_interval == 1.0
        if on_train_epoch_end:
            intervals.append(steps_per_epoch * int(every_n_epochs))
        elif validation is not None:
            # after validation, in the epochs that are multiples of every_n_epochs
            intervals.append(validation if validation < steps_per_epoch else max(validation, steps_per_epoch * int(every_n_epochs)))
    return min(intervals) if intervals else None


def _watching_callbacks(trainer: pl.Trainer) -> list[tuple[Any, str]]:
    """``(callback, tag)`` for each ``EarlyStopping`` and ``ModelCheckpoint`` that has a ``monitor``."""
    watchers = lightning_classes("callbacks", "EarlyStopping") + lightning_classes("callbacks", "ModelCheckpoint")
    return [(c, c.monitor) for c in trainer.callbacks if isinstance(c, watchers) and isinstance(c.monitor, str)]  # type: ignore[attr-defined]


def _watching_schedulers(trainer: pl.Trainer) -> list[tuple[Any, str]]:
    """``(lr_scheduler_config, tag)`` for each plateau scheduler with a ``monitor`` (Lightning
    hands the monitored value to plateau schedulers only)."""
    configs = getattr(trainer, "lr_scheduler_configs", None) or []
    return [(c, c.monitor) for c in configs if c.reduce_on_plateau and isinstance(c.monitor, str)]


def watched_tags(trainer: pl.Trainer) -> set[str]:
    """The tags the fit's ``EarlyStopping``, ``ModelCheckpoint`` and plateau LR schedulers read
    from ``trainer.callback_metrics`` (their ``monitor``); known from ``on_train_start`` on."""
    return {tag for _, tag in _watching_callbacks(trainer) + _watching_schedulers(trainer)}


#: What a repeated value does to an EarlyStopping or a plateau scheduler.
_COUNTS_REPEATS = "it counts such repeats as no improvement"


def _tag_watchers(trainer: pl.Trainer, steps_per_epoch: int, accumulations: list[int]) -> list[tuple[str, str, int, str, str]]:
    """``(who, tag, checks every n optimizer steps, what a repeat does, the fix)`` for each EarlyStopping,
    ModelCheckpoint and LR scheduler of the Trainer that reads a tag from ``callback_metrics``."""
    early_stopping = lightning_classes("callbacks", "EarlyStopping")
    validation = _validation_interval(trainer, steps_per_epoch, max(accumulations))
    watchers: list[tuple[str, str, int, str, str]] = []
    for callback, watched in _watching_callbacks(trainer):
        if isinstance(callback, early_stopping):
            interval = _early_stopping_interval(callback, trainer, steps_per_epoch, validation)
        else:
            interval = _checkpoint_interval(callback, trainer, steps_per_epoch, validation)
        if interval is not None:
            who = f"{type(callback).__name__}(monitor={watched!r})"
            if isinstance(callback, early_stopping):
                harm, fix = _COUNTS_REPEATS, "let it wait for {checks} repeats (e.g. EarlyStopping(patience={checks}) or more)"
            else:  # repeats leave its ranking as it was, but label a checkpoint with an older value
                harm = "a checkpoint it saves can carry a value measured up to {stale} steps earlier"
                fix = "keep it as it is if that is fine (repeated values do not change which checkpoint ranks best)"
            watchers.append((who, watched, interval, harm, fix))
    for config, watched in _watching_schedulers(trainer):
        frequency = max(1, int(config.frequency))
        if config.interval == "step":
            # Lightning steps it on the batches whose number (from 1, within the epoch) is a
            # multiple of `frequency`, among those that end with an optimizer step
            interval = min(math.lcm(frequency, accumulate) // accumulate for accumulate in accumulations)
        else:
            interval = frequency * steps_per_epoch
        scheduler = type(config.scheduler).__name__
        watchers.append(
            (
                f"the LR scheduler {scheduler} (monitor={watched!r}, interval={config.interval!r}, frequency={frequency})",
                watched,
                interval,
                _COUNTS_REPEATS,
                f"let it wait for {{checks}} repeats (e.g. {scheduler}(patience={{checks}}) or more)",
            )
        )
    return watchers


class PerTermCallback(LightningCallback):
    """Base for callbacks that read per-term quantities from the shared engine on a step cadence.

    Subclasses say what they need with :meth:`_wants` and act on it in :meth:`_on_measurement`,
    which runs after the optimizer step of every due step, on every rank, with the measurement
    already reduced across ranks.
    """

    def __init__(self, every_n_steps: int, loss_module: str | None) -> None:
        self.every_n_steps = check_every_n_steps(type(self).__name__, every_n_steps)
        if loss_module is not None and not isinstance(loss_module, str):
            raise TypeError(
                f"{type(self).__name__}: loss_module must be the attribute name of a MultiTermLoss (a string) or None, got {type(loss_module).__name__}."
            )
        if loss_module is not None and not loss_module.strip():
            raise ValueError(
                f"{type(self).__name__}: loss_module must name the attribute that holds the MultiTermLoss (e.g. "
                f"loss_module='criterion'), or be None to find the module's only MultiTermLoss; got {loss_module!r}."
            )
        self.loss_module = loss_module
        self._fit_warnings = FitWarnings()
        self._fitted_loss: weakref.ref[MultiTermLoss] | None = None  # the loss of the last fit
        self._fit_started = False  # whether on_fit_start attached the current fit
        self._loss: MultiTermLoss | None = None
        self._loss_path = ""
        self._tag_prefix = ""
        self._engine: TermGradientEngine | None = None
        self._step_at_batch_start: int | None = None
        self.last_measurement: StepMeasurement | None = None
        self._scaler_skips = 0
        self._state_key: str | None = None
        self._restored = False  # set by load_state_dict: the next fit resumes instead of starting afresh
        self._last_step: int | None = None  # the global step after this callback's latest batch (saved with the state)
        self._checkpoint_load: _CheckpointLoad | None = None  # the checkpoint Lightning is restoring, if any (shared)
        self._replayed_previous: int | None = None
        self._saved_terms: tuple[str, ...] = ()  # the term order of the restored state, checked at fit start
        self._trainer_id: int | None = None  # id() of the Trainer whose fit this state belongs to
        self._stage: str | None = None  # the Trainer function running ("fit", "validate", ...), between setup and teardown
        self._decided_step: int | None = None  # the last step _due_at_batch decided, and its answer
        self._due = False
        self._previous_step: int | None = None  # the step decided before it (the previous batch's)

    # ---------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        """Picklable state: a ``torch.Generator`` travels as its state's bytes, and the weak
        reference to the last fit's loss is dropped (a copy cannot refer to that loss anyway).

        ``ddp_spawn`` pickles the callbacks into each new process, and a bare ``torch.Generator``
        does not survive that ("unable to resize file ... Invalid argument" in the child); a
        weak reference cannot be pickled at all.
        """
        state = self.__dict__.copy()
        state["_fitted_loss"] = None
        for name, value in state.items():
            if isinstance(value, torch.Generator):
                state[name] = _PickledGenerator(str(value.device), bytes(value.get_state().numpy()))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            if isinstance(value, _PickledGenerator):
                generator = torch.Generator(device=value.device)
                generator.set_state(torch.frombuffer(bytearray(value.state), dtype=torch.uint8))
                state[name] = generator
        self.__dict__.update(state)

    # ---------------------------------------------------------------- subclass API
    def _is_due(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def _wants(self) -> tuple[bool, TraceRequest | None]:
        """``(gradients, traces)`` this callback needs on its due steps."""
        return True, None

    def _on_measurement(self, trainer: pl.Trainer, pl_module: pl.LightningModule, measurement: StepMeasurement) -> None:
        raise NotImplementedError

    def _identity(self) -> dict[str, Any]:
        """The arguments that tell two instances apart (they make the ``state_key``)."""
        return {"every_n_steps": self.every_n_steps, "loss_module": self.loss_module}

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints, built from its identifying arguments.

        Cached: Lightning reads it on every hook call (for its profiler), and the arguments
        are fixed once the callback is built.
        """
        if self._state_key is None:
            self._state_key = self._generate_state_key(**self._identity())
        return self._state_key

    @property
    def criterion(self) -> MultiTermLoss:
        """The :class:`MultiTermLoss` this callback works on (known once the fit starts)."""
        if self._loss is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a fit yet; its loss is found when the fit starts.")
        return self._loss

    # ---------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_warnings.new_fit()  # each fit shows its warnings, also one re-run with the same numbers
        if tensorboard_loggers(trainer):
            fast_event_checksums()  # TensorBoard's record checksums in C from now on (same bytes; a no-op once done)
        # Found here, not in setup(): Lightning runs the callbacks' setup before the module's own
        # setup() and configure_model(), where a user may still be building the network or the loss.
        self._loss_path, self._loss = find_multi_term_loss(pl_module, self.loss_module, type(self).__name__)
        # With several losses in one module, each loss's tags (and report) carry its path, e.g.
        # "criterion_b/grad_norm/pde", so two monitors never write the same series.
        several = sum(isinstance(m, MultiTermLoss) for m in pl_module.modules()) > 1
        if several and re.search(r"[/\s]", self._loss_path):
            renamed = " and ".join(repr(re.sub(r"[/\s]+", "_", part)) for part in self._loss_path.split(".") if re.search(r"[/\s]", part))
            raise ValueError(
                f"{type(self).__name__}: the MultiTermLoss at {self._loss_path!r} is one of several in the module, so its "
                f"path prefixes its tags ('{self._loss_path}/grad_norm/<term>') and names its report "
                f"(diagnosis_{self._loss_path}.md); a '/' or whitespace there would split the tags or break the file "
                f"name. Rename it, e.g. the nn.ModuleDict key to {renamed}."
            )
        self._tag_prefix = f"{self._loss_path}/" if several else ""
        self._engine = TermGradientEngine.for_loss(self._loss)
        # A callback object reused for another fit (one object in a λ sweep, say) starts afresh;
        # a fit that resumes from a checkpoint (Lightning restored this state just before) or
        # continues a trainer's earlier fit (global_step > 0, e.g. max_steps raised) goes on.
        self._checkpoint_load = None  # (set for a callback Lightning had no state for)
        if self._restored:
            self._check_saved_term_order()
        else:
            if trainer.global_step > 0 and self._trainer_id not in (None, id(trainer)):
                self._warn(
                    f"{type(self).__name__}: this callback object last ran in another Trainer's fit, so it no longer "
                    f"holds this Trainer's earlier state; it starts afresh at step {trainer.global_step}. Give each "
                    "Trainer its own callback objects."
                )
                self._start_afresh()
            elif trainer.global_step > 0 and self._fitted_loss is not None and self._fitted_loss() is not self._loss:
                self._warn(
                    f"{type(self).__name__}: this Trainer's earlier fit trained another model (another MultiTermLoss, "
                    f"now with terms {list(self._loss.term_names)}), so this callback starts afresh at step "
                    f"{trainer.global_step} instead of continuing that fit's history. For a new model, use a new Trainer."
                )
                self._start_afresh()
            elif trainer.global_step == 0:
                self._start_afresh()
        self._restored = False
        self._trainer_id = id(trainer)
        self._fitted_loss = weakref.ref(self._loss)
        self._fit_started = True
        # The last batch's start step (of a resumed or continued fit) becomes the step decided
        # before this fit's first batch: a due step that batch jumped over, with several optimizer
        # steps per batch, is still measured; this fit's first step is decided afresh.
        self._replayed_previous = self._previous_step  # for a first batch that replays the last one's start
        self._previous_step, self._decided_step = self._decided_step, None
        self._on_attach(trainer, pl_module)

    def _warn(self, message: str, category: type[Warning] = UserWarning) -> None:
        """A warning shown on rank zero, once per fit; every rank applies the filters (see
        :class:`~lightning_pinn.alerts.FitWarnings`)."""
        self._fit_warnings.warn(message, category, stacklevel=2)

    def _start_afresh(self) -> None:
        self._last_step = self._decided_step = None
        self._reset_fit_state()

    def _reset_fit_state(self) -> None:
        """Subclass hook: forget what earlier fits left in this callback (not on a resumed fit)."""

    def state_dict(self) -> dict[str, Any]:
        """The loss's term order; subclasses add their own state, some of it in that order."""
        if self._loss is None:
            return {}
        return {
            "terms": list(self._loss.term_names),
            "step": self._last_step,
            "batch_start_step": self._decided_step,
            "previous_batch_start_step": self._previous_step,
        }

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage = stage  # Lightning runs setup before it restores a checkpoint
        if stage == "fit":
            self._fit_started = False  # until on_fit_start has attached this fit

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state a checkpoint saved, for a fit that resumes from it.

        Lightning restores callbacks for ``validate``/``test``/``predict(ckpt_path=...)`` too. This
        state belongs to training, so it is left as it was then: a later ``fit`` without
        ``ckpt_path`` neither continues the checkpoint's history and smoothing nor loses this
        callback's own. Subclasses extend :meth:`_load_state`.
        """
        load, self._checkpoint_load = self._checkpoint_load, None
        if self._stage in ("validate", "test", "predict"):
            return
        saved_step = state_dict.get("step")
        checkpoint_step = None if load is None or saved_step is None else load.step
        if checkpoint_step is not None and saved_step > checkpoint_step:
            # a state from later in training than the checkpoint that carries it: the Tuner's
            # lr_find (Tuner or LearningRateFinder/BatchSizeFinder callback) saves a step-0
            # checkpoint holding what these objects held then (an earlier fit's state, when they
            # are reused) and restores it after its trial steps; that state is not this fit's
            return
        if checkpoint_step is not None and saved_step < checkpoint_step:
            assert load is not None
            if not load.warned:  # one warning for all our callbacks
                load.warned = True
                self._warn(
                    f"lightning-pinn: the checkpoint was saved at step {checkpoint_step}, after that step's optimizer step but "
                    f"before the lightning-pinn callbacks had processed it (their state is from step {saved_step}): the fit "
                    "failed or was interrupted in between (OnExceptionCheckpoint), or a callback listed before them saved the "
                    "checkpoint from on_train_batch_end. That step's measurement and weight update are not in it, so the "
                    "resumed fit goes on without them. If a callback of yours saves checkpoints from on_train_batch_end, list "
                    "lightning-pinn's callbacks before it (Lightning's ModelCheckpoint always runs last, which is right)."
                )
        self._saved_terms = tuple(state_dict.get("terms", ()))
        self._load_state(state_dict)
        self._last_step = saved_step
        self._decided_step = state_dict.get("batch_start_step")
        self._previous_step = state_dict.get("previous_batch_start_step")
        self._restored = True

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning calls this just before load_state_dict with the same checkpoint
        # one small object in the loaded dict (not the file), shared by our callbacks: never keep the
        # checkpoint itself (Lightning calls load_state_dict only for callbacks it has state for)
        step = checkpoint.get("global_step")
        self._checkpoint_load = checkpoint.setdefault("_lightning_pinn_load", _CheckpointLoad(step if isinstance(step, int) else None))

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        """Subclass hook: take this subclass's part of a restored state (see :meth:`load_state_dict`)."""

    def _check_saved_term_order(self) -> None:
        """Refuse to resume this callback's state into a loss whose terms come in another order.

        ``MultiTermLoss`` takes λ by name from such a checkpoint, but callback state kept per
        position (loss histories, trained weights with their optimizer state, pair keys
        ``<a>_vs_<b>``) would be given to the wrong terms.
        """
        saved, self._saved_terms = self._saved_terms, ()
        names = self.criterion.term_names
        if saved and tuple(saved) != tuple(names):
            raise ValueError(
                f"{type(self).__name__}: the checkpoint's state for this callback was saved with the terms in the order "
                f"{list(saved)}, but this MultiTermLoss has {list(names)}. Its state is kept per term position, so it "
                f"cannot be resumed into another order: build the MultiTermLoss with the terms in the saved order "
                f"(MultiTermLoss({', '.join(f'{n}=...' for n in saved)})). Loading only the model (load_from_checkpoint, "
                "load_state_dict) takes each λ by name in any order."
            )

    def _log_scalars(self, trainer: pl.Trainer, metrics: Mapping[str, float], step: int, pending: PendingEvents | None = None) -> None:
        """:func:`log_scalars` with this loss's tag prefix (empty when the module has one loss)."""
        prefix = self._tag_prefix
        log_scalars(trainer, {f"{prefix}{tag}": value for tag, value in metrics.items()} if prefix else metrics, step, pending)

    def _on_attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Subclass hook: the loss and parameters are known (at fit start, before the first step)."""

    def _refresh_cadence(self, tag: str) -> int | None:
        """Every how many optimizer steps this callback gives ``tag`` (after the loss's prefix) a
        new value in ``trainer.callback_metrics``; ``None`` if it does not write that tag."""
        return None

    def _warn_if_watched_less_often(self, trainer: pl.Trainer) -> None:
        """Warn when EarlyStopping, ModelCheckpoint or an LR scheduler's ``monitor`` watch one of
        our tags more often than we renew it.

        They read ``trainer.callback_metrics`` at their checks (an epoch's end, by default); with
        fewer new values than checks some checks see the previous value again, and an
        ``EarlyStopping`` or a ``ReduceLROnPlateau`` counts those repeats as "no improvement".
        """
        batches = trainer.num_training_batches
        if not isinstance(batches, int) or batches <= 0:  # inf: an iterable without a length
            return
        accumulations = _accumulations(trainer)
        steps_per_epoch = max(1, batches // max(accumulations))  # the shortest epoch, in optimizer steps
        name = type(self).__name__
        for watcher, watched, interval, harm, fix in _tag_watchers(trainer, steps_per_epoch, accumulations):
            if not watched.startswith(self._tag_prefix):
                continue
            cadence = self._refresh_cadence(watched[len(self._tag_prefix) :])
            if cadence is not None and cadence > interval:
                checks = math.ceil(cadence / interval)
                self._warn(
                    f"{name}: {watcher} checks about every {interval} optimizer "
                    f"step(s), but {name} renews '{watched}' every {cadence} steps (every_n_steps), so some checks see the "
                    f"previous value again ({harm.format(stale=cadence)}). Use {name}(every_n_steps={interval}) or a "
                    f"smaller value, or {fix.format(checks=checks, cadence=cadence)}."
                )

    def _due_at_batch(self, step: int) -> bool:
        """Whether the batch that starts at optimizer step ``step`` is measured: :meth:`_is_due`
        through :meth:`_hits`, decided once per step so every micro-batch of an accumulated step
        agrees."""
        if step != self._decided_step:
            if self._decided_step is not None:
                self._previous_step = self._decided_step
            elif step == self._previous_step:
                # the fit's first batch starts where the last one did (a resume from a checkpoint
                # written inside that batch, e.g. by OnExceptionCheckpoint): the same jumped-over steps
                self._previous_step = self._replayed_previous
            self._decided_step = step
            self._due = self._hits(step, self._is_due)
        return self._due

    def _hits(self, step: int, due: Callable[[int], bool]) -> bool:
        """Whether the cadence ``due`` holds at ``step``, or at a step the previous batch jumped over.

        A batch that steps several optimizers (two in manual optimisation, say) advances
        ``global_step`` by more than one, so a due step can be skipped (``every_n_steps=5``
        with two optimizers saw only steps 0, 2, 4, ...): the first batch after it is due instead.
        """
        previous = self._previous_step
        skipped = range(previous + 1, step) if previous is not None and 0 < step - previous <= 64 else range(0)
        return due(step) or any(due(k) for k in skipped)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        self._step_at_batch_start = step
        if self._engine is None or not self._due_at_batch(step):
            return
        self._check_loss_not_replaced(pl_module)
        gradients, traces = self._wants()
        self._engine.request(
            step=step,
            batch_key=(trainer.current_epoch, batch_idx),
            # read at the step's first forward pass, with requires_grad: layers may be frozen, or added, mid-fit
            params=pl_module.parameters,
            gradients=gradients,
            traces=traces,
            optimizers=lambda: trainer.optimizers,
            watch_steps=not pl_module.automatic_optimization,  # only manual optimisation steps between a batch's calls
        )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a validation_step that evaluates the loss with grad enabled (for derivatives) is not
        # part of the training step, also when it runs between an accumulated step's micro-batches
        if self._engine is not None:
            self._engine.pause(True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._engine is not None:
            self._engine.pause(False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._last_step = trainer.global_step
        step = self._step_at_batch_start
        if step is None or self._engine is None or trainer.global_step == step:
            return  # no optimizer step in this batch (gradient accumulation, or a skipped step)
        self._step_at_batch_start = None
        if not self._due_at_batch(step):
            return
        measurement = self._engine.collect(step, self.criterion.term_names, _all_reduce_sum(trainer))
        if measurement is None:
            return
        if _scaler_skipped(trainer, measurement):
            # A GradScaler found inf/NaN in the scaled gradients and skipped this optimizer
            # step: that is its normal way of finding the loss scale, not a broken term.
            self._scaler_skips += 1
            if self._scaler_skips == 30:  # a GradScaler halves its scale per skip: 30 skips is no calibration
                self._warn(
                    f"{type(self).__name__}: 30 measured steps in a row had inf/NaN gradients under the AMP GradScaler and "
                    "were skipped. If this goes on, a residual itself is NaN/inf (not just the loss scale).",
                    category=TermGradientWarning,
                )
            return
        self._scaler_skips = 0
        self.last_measurement = measurement
        if trainer.is_global_zero:
            # only a 0-dim term's loss can be negative (nan, for an absent term, is not): a few floats
            for name, value in zip(measurement.terms, measurement.losses.tolist()):
                if value < 0:
                    self.criterion.warn_negative_loss(name, value, step)
        # warnings wait for the end of the measurement: one turned into an error stops the fit
        # only after this step is recorded, logged and acted on
        self._fit_warnings.hold()
        try:
            self._on_measurement(trainer, pl_module, measurement)
        except BaseException:
            self._fit_warnings.release(failing=True)
            raise
        self._fit_warnings.release()

    def _check_loss_not_replaced(self, pl_module: pl.LightningModule) -> None:
        """Fail clearly if the module's MultiTermLoss was swapped for another during the fit."""
        try:
            current = pl_module.get_submodule(self._loss_path)
        except AttributeError:
            current = None
        if current is not self._loss:
            old_terms = self.criterion.term_names
            new_terms = current.term_names if isinstance(current, MultiTermLoss) else None
            raise RuntimeError(
                f"{type(self).__name__}: the MultiTermLoss at {self._loss_path!r} was replaced during training "
                f"(terms {old_terms} -> {new_terms}). Weights, balancer state and logged series would no longer match. "
                "Create the MultiTermLoss once, in __init__, with every term the model will ever use, and pass "
                "term=None on steps where a term is absent."
            )

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stage = None  # Lightning skips teardown after most exceptions
        self._release()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()

    def _release(self) -> None:
        """Free what only the fit needed: the engine's step buffers. ``last_measurement`` stays
        for inspection."""
        if self._engine is not None:
            self._engine.release()


def _scaler_skipped(trainer: pl.Trainer, measurement: StepMeasurement) -> bool:
    """Whether an AMP GradScaler is in use and this step's gradients overflowed (so it skipped the step).

    Only terms with a nonzero λ count: a zero weight's term adds exact zeros to the step's
    gradient, so its measurement (taken from a cotangent of its own) can overflow without a skip.
    """
    if getattr(trainer.precision_plugin, "scaler", None) is None:
        return False
    values = [t for t in (measurement.gradients, measurement.traces) if t is not None]
    in_step = measurement.present.cpu() & (measurement.weights != 0).cpu()
    return any(not bool(torch.isfinite(t[in_step]).all()) for t in values)


def _all_reduce_sum(trainer: pl.Trainer):  # type: ignore[no-untyped-def]
    if trainer.world_size <= 1:
        return None
    strategy = trainer.strategy

    def reduce(tensor: Tensor) -> Tensor:
        return strategy.reduce(tensor, reduce_op="sum")

    return reduce
