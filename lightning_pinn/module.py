"""``PINNModule``: a LightningModule base for users starting a PINN from scratch."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_pinn.loss import MultiTermLoss

__all__ = ["PINNModule", "StepIndexLoader"]


class PINNModule(pl.LightningModule):
    """A LightningModule whose training step is ``Σ_i λ_i · mean(r_i²)`` over the residuals you define.

    Subclasses implement :meth:`residuals`, returning one tensor per loss term; the base owns
    the :class:`~lightning_pinn.MultiTermLoss` (``self.criterion``), the training step, an Adam
    optimizer and a training "data loader" that simply counts steps (PINN points usually live
    in the module, as buffers or sampled inside ``residuals``).

    Every fit logs ``loss/<term>`` (unweighted) and ``weight/<term>`` to the Trainer's loggers
    every ``log_every_n_steps`` optimizer steps from step 0, written to the loggers directly (one
    event, no ``self.log`` bookkeeping on the other steps). With a
    :class:`~lightning_pinn.callbacks.GradientNormMonitor` attached, the monitor logs both with
    each of its measurements instead; with a balancer attached, the balancer logs ``weight/<term>``.

    Args:
        weights: Initial weight per term, e.g. ``{"pde": 1.0, "ic": 1.0}``; the keys are the
            term names ``residuals`` must return.
        learning_rate: Adam's learning rate.
        lr_decay: If set, the learning rate is multiplied by ``lr_decay`` every
            ``lr_decay_steps`` optimizer steps, smoothly (``lr · lr_decay^(step/lr_decay_steps)``),
            the schedule of Wang et al.'s PINN papers (e.g. ``0.9`` every 1000 steps).
        lr_decay_steps: See ``lr_decay``.
        steps_per_epoch: Length of the step-counting training loader, i.e. of one epoch.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        learning_rate: float = 1e-3,
        lr_decay: float | None = None,
        lr_decay_steps: int = 1000,
        steps_per_epoch: int = 1000,
    ) -> None:
        super().__init__()
        if not isinstance(weights, Mapping):
            raise TypeError(
                f"PINNModule: weights must be a mapping of term name to initial weight, e.g. {{'pde': 1.0, 'ic': 1.0}}; got {type(weights).__name__}."
            )
        if isinstance(learning_rate, bool) or not (
            isinstance(learning_rate, numbers.Real) and math.isfinite(learning_rate) and learning_rate > 0
        ):
            raise ValueError(f"PINNModule: learning_rate must be a finite number > 0, got {learning_rate!r}.")
        if lr_decay is not None and (isinstance(lr_decay, bool) or not (isinstance(lr_decay, numbers.Real) and 0 < lr_decay <= 1)):
            raise ValueError(f"PINNModule: lr_decay must be in (0, 1] or None, got {lr_decay!r}.")
        if isinstance(lr_decay_steps, bool) or not (isinstance(lr_decay_steps, numbers.Integral) and lr_decay_steps >= 1):
            raise ValueError(f"PINNModule: lr_decay_steps must be an integer >= 1, got {lr_decay_steps!r}.")
        if isinstance(steps_per_epoch, bool) or not (isinstance(steps_per_epoch, numbers.Integral) and steps_per_epoch >= 1):
            raise ValueError(f"PINNModule: steps_per_epoch must be an integer >= 1, got {steps_per_epoch!r}.")
        self.criterion = MultiTermLoss(**weights)
        self.learning_rate = float(learning_rate)
        self.lr_decay = None if lr_decay is None else float(lr_decay)
        self.lr_decay_steps = int(lr_decay_steps)
        self.steps_per_epoch = int(steps_per_epoch)

    def residuals(self, batch: Any) -> Mapping[str, Tensor]:
        """Return ``{term: residual}`` for this step (override in a subclass).

        Each residual is a point-wise tensor (its loss is the mean of its squares) or a 0-dim
        loss, computed from the network output so that it carries gradients.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement residuals(self, batch) -> dict[str, Tensor] returning one tensor per term in {self.criterion.term_names}."
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Evaluate the network; subclasses with an attribute ``net`` get ``self.net(x)``."""
        net = getattr(self, "net", None)
        if net is None:
            raise NotImplementedError(f"{type(self).__name__}: define forward(), or keep the network in self.net.")
        return net(*args, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        residuals = self.residuals(batch)
        if not isinstance(residuals, Mapping):
            raise TypeError(
                f"{type(self).__name__}.residuals() must return a dict of one tensor per term, e.g. "
                f"{{{', '.join(f'{name!r}: r_{name}' for name in self.criterion.term_names)}}}; got {type(residuals).__name__}."
            )
        loss = self.criterion(**residuals)
        watched = self.__dict__.get("_watched_terms")
        if watched:  # renewed before the callbacks' batch-end checks read it (ModelCheckpoint every n steps)
            from lightning_pinn.callbacks._base import publish

            losses = self.criterion.last_losses
            publish(self.trainer, {f"loss/{name}": losses[name] for name in watched if name in losses})
        return loss

    def on_train_start(self) -> None:
        from lightning_pinn.callbacks._base import callbacks_on_loss, watched_tags
        from lightning_pinn.callbacks.balancers import WeightBalancer
        from lightning_pinn.callbacks.monitor import GradientNormMonitor

        # A monitor logs loss/<term> and weight/<term> itself, a balancer weight/<term>: no duplicates.
        # (only callbacks on this module's own loss count: one on a second MultiTermLoss logs that one)
        # Without a logger the values still reach trainer.callback_metrics (ModelCheckpoint, EarlyStopping).
        callbacks = callbacks_on_loss(self.trainer, self.criterion)
        self._log_terms = not any(isinstance(cb, GradientNormMonitor) for cb in callbacks)
        self._log_weights = not any(isinstance(cb, WeightBalancer) for cb in callbacks)
        # tags an EarlyStopping, ModelCheckpoint or plateau scheduler watches are renewed in
        # trainer.callback_metrics at every training step, as self.log(on_step=True) would; the
        # others only when logged (an unwatched renewal would cost every step for nothing)
        ours = {f"loss/{name}" for name in self.criterion.term_names} if self._log_terms else set()
        self.__dict__["_watched_terms"] = [tag[len("loss/") :] for tag in sorted(ours & watched_tags(self.trainer))]
        self.__dict__["_logging_step"] = None  # plain attribute writes: nn.Module.__setattr__ is slow per step

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        step, interval = self.trainer.global_step, self.trainer.log_every_n_steps
        due = getattr(self, "_log_terms", False) and interval > 0 and step % interval == 0
        # the weights in effect for this step (a balancer may change them after it)
        self.__dict__["_logging_step"] = (step, self.criterion.weights) if due else None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        logging_step = self.__dict__.get("_logging_step")
        if logging_step is None or self.trainer.global_step == logging_step[0]:
            return  # not a logging step, or no optimizer step yet in this batch (gradient accumulation)
        from lightning_pinn.callbacks._base import log_scalars

        step, weights = logging_step
        self.__dict__["_logging_step"] = None
        losses = self.criterion.last_losses
        values = torch.stack([loss.detach().to(torch.float64) for loss in losses.values()]).tolist() if losses else []
        metrics = {f"loss/{name}": value for name, value in zip(losses, values)}
        if self._log_weights:
            metrics.update({f"weight/{name}": weight for name, weight in weights.items()})
        log_scalars(self.trainer, metrics, step)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.learning_rate)
        if self.lr_decay is None:
            return optimizer
        gamma = self.lr_decay ** (1.0 / self.lr_decay_steps)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self) -> Iterable[int]:
        """A loader that yields the batch index within the epoch (0 … ``steps_per_epoch`` − 1): one
        "batch" per optimizer step; use ``self.global_step`` for the step.

        It is resumable: a fit resumed from a checkpoint saved mid-epoch goes on with the next
        index, as Lightning's ``batch_idx`` does (see :class:`StepIndexLoader`)."""
        return StepIndexLoader(self.steps_per_epoch, self)


class StepIndexLoader:
    """``PINNModule``'s training loader: yields ``0, 1, …, length − 1`` each epoch, resumably.

    ``range(length)`` would restart at 0 after a resume from a checkpoint saved mid-epoch, while
    Lightning's ``batch_idx`` goes on (and Lightning warns that the loader is not resumable), so a
    ``residuals`` that picks its points by the batch value would train on other points than the
    uninterrupted fit. Lightning saves ``state_dict()`` in the checkpoint and hands it back to
    ``load_state_dict`` before the resumed epoch starts.

    The saved position is the number of the epoch's batches Lightning has processed (its own
    resume point), read from the Trainer, not the number of values yielded: Lightning fetches a
    batch ahead, so the count of yielded values is one too many when a checkpoint is written.
    """

    def __init__(self, length: int, module: pl.LightningModule) -> None:
        self.length = int(length)
        self._module = module
        self._resume_at = 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        start, self._resume_at = self._resume_at, 0  # a resume position applies to one epoch
        return iter(range(start, self.length))

    def state_dict(self) -> dict[str, int]:
        """``{"next_index": i}``: the index the resumed epoch starts at (0 when the epoch is done)."""
        trainer = getattr(self._module, "_trainer", None)
        if trainer is None:
            return {"next_index": 0}
        processed = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        # the epoch's length as Lightning counts it (limit_train_batches may shorten it)
        epoch_length = min(float(self.length), float(trainer.num_training_batches))
        return {"next_index": processed if 0 <= processed < epoch_length else 0}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Start the next epoch's iteration at the saved index."""
        index = state_dict.get("next_index", 0)
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < self.length:
            index = 0  # another length (steps_per_epoch changed) or a foreign state: the epoch starts afresh
        self._resume_at = int(index)
