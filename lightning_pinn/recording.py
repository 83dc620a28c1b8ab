"""Record a fit as it trains: per-term losses and weights, and the error against an exact solution.

Used by the λ sweep and the benchmarks, so that every table and plot of this project reads its
histories the same way. The model must hold its ``MultiTermLoss`` as ``criterion`` and, for
error tracking, have a ``relative_l2_error()`` method (as the problems in
:mod:`lightning_pinn.problems` do).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl

from lightning_pinn._lightning import LightningCallback

__all__ = ["FitHistory", "HistoryRecorder"]


@dataclass
class FitHistory:
    """What a :class:`HistoryRecorder` saw.

    Attributes:
        steps: Optimizer steps (0-based: the step just taken) at which losses and weights were recorded.
        losses: Unweighted loss of each term at those steps (``nan`` where the term was absent).
        weights: Weight λ of each term at those steps (after any update made at that step by a
            balancer that runs before the recorder).
        error_steps: Numbers of optimizer steps taken when the error was evaluated.
        errors: Relative L² error at those points.
        error_seconds: Training wall time (evaluations excluded) when the error was evaluated.
        train_seconds: Training wall time of the whole fit, evaluations excluded.
    """

    steps: list[int] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=dict)
    weights: dict[str, list[float]] = field(default_factory=dict)
    error_steps: list[int] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    error_seconds: list[float] = field(default_factory=list)
    train_seconds: float = 0.0

    def first_reaching(self, target: float) -> tuple[int, float] | None:
        """``(steps taken, training seconds)`` at the first evaluation with error ``<= target``."""
        for step, seconds, error in zip(self.error_steps, self.error_seconds, self.errors):
            if error <= target:
                return step, seconds
        return None


class HistoryRecorder(LightningCallback):
    """Fill a :class:`FitHistory`: losses and weights every ``history_every`` steps, the error every ``error_every``.

    Args:
        history_every: Record losses and weights when ``step % history_every == 0`` (0: never).
        error_every: Evaluate ``pl_module.relative_l2_error()`` after every ``error_every``-th
            optimizer step (0: never). The evaluation's time is not counted as training time.
    """

    def __init__(self, history_every: int = 0, error_every: int = 0) -> None:
        self.history_every = history_every
        self.error_every = error_every
        self.history = FitHistory()
        self._started = 0.0
        self._last_global_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_global_step = trainer.global_step  # a recorder reused for another fit (or a resumed one)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        history = self.history
        history.train_seconds += time.perf_counter() - self._started
        if trainer.global_step == self._last_global_step:
            return  # no optimizer step in this batch (gradient accumulation)
        self._last_global_step = trainer.global_step
        step = trainer.global_step - 1  # the optimizer step just taken
        if self.history_every and step % self.history_every == 0:
            history.steps.append(step)
            losses = pl_module.criterion.last_losses  # the terms given at this step
            for name in pl_module.criterion.term_names:  # nan for an absent term: every list stays aligned with steps
                history.losses.setdefault(name, []).append(float(losses[name].detach()) if name in losses else math.nan)
            for name, weight in pl_module.criterion.weights.items():
                history.weights.setdefault(name, []).append(weight)
        if self.error_every and trainer.global_step % self.error_every == 0:
            history.error_steps.append(trainer.global_step)
            history.errors.append(pl_module.relative_l2_error())  # type: ignore[operator]
            history.error_seconds.append(history.train_seconds)
