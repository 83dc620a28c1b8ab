"""The harmonic-oscillator demonstration of the loss-balance crisis and its fix.

``lightning-pinn demo`` trains :class:`~lightning_pinn.problems.HarmonicOscillator` with a
:class:`~lightning_pinn.callbacks.GradientNormMonitor` attached, once per λ_IC, and prints
what the monitor saw beside the accuracy each weight reached.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_pinn.alerts import GradientConflictWarning, LossBalanceWarning
from lightning_pinn.callbacks import GradientNormMonitor
from lightning_pinn.problems import HarmonicOscillator

__all__ = ["HarmonicRun", "run_harmonic", "format_table", "quiet_lightning"]


@dataclass
class HarmonicRun:
    """Outcome of one harmonic-oscillator fit (see :func:`run_harmonic`)."""

    label: str
    ic_weight: float
    relative_l2: float
    final_losses: dict[str, float]
    final_weights: dict[str, float]
    worst_ratio: float | None
    worst_ratio_step: int | None
    ratio_alarms: list[str]
    conflict_alarms: list[str]
    seconds: float
    log_dir: str | None
    monitor: GradientNormMonitor


def quiet_trainer(max_steps: int, callbacks: Sequence[pl.Callback] = (), **overrides: Any) -> pl.Trainer:
    """A single-CPU ``Trainer`` without progress bar, model summary, checkpoints or logger (``overrides`` win).

    The Trainer the demo, the sweep and the benchmarks train with; build it inside
    :func:`quiet_lightning` to silence the start-up banners too.
    """
    options: dict[str, Any] = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    options.update(overrides)
    return pl.Trainer(**options)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's start-up banners (GPU available…, tips) for a tidy console."""
    names = ["pytorch_lightning", "lightning", "lightning_fabric", "lightning.pytorch"]
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def seed_quietly(seed: int) -> None:
    """``pl.seed_everything(seed)`` without its "Seed set to …" message (or the messages of any
    Lightning version that words it differently)."""
    with quiet_lightning():
        pl.seed_everything(seed)


def _fresh_version(folder: Path, version: str) -> str:
    """``version``, or ``version_2``, ``version_3``, ... if a run already wrote there: two runs'
    event files in one folder would be read as one run (by TensorBoard and by the report)."""
    candidate, index = version, 1
    while (folder / candidate).exists() and any((folder / candidate).glob("events.out.tfevents.*")):
        index += 1
        candidate = f"{version}_{index}"
    return candidate


def run_harmonic(
    ic_weight: float = 1.0,
    *,
    steps: int = 2000,
    omega: float = 2 * math.pi,
    seed: int = 0,
    every_n_steps: int = 50,
    log_dir: str | Path | None = None,
    run_name: str | None = None,
    callbacks: Sequence[pl.Callback] = (),
    label: str | None = None,
    on_warning: Callable[[str, str], None] | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    hard_ic: bool = False,
) -> HarmonicRun:
    """Train the harmonic IVP once with a :class:`GradientNormMonitor` attached.

    Args:
        ic_weight: Initial λ_IC (λ_PDE = 1).
        steps: Adam steps (full batch, 128 points, lr 1e-3).
        omega: Angular frequency ω.
        seed: Seed for the network's initialisation.
        every_n_steps: The monitor's cadence.
        log_dir: TensorBoard directory (``None``: no logger).
        run_name: Sub-directory of ``log_dir`` for this run.
        callbacks: Extra callbacks (e.g. a balancer).
        label: Name of the run in tables (default: ``λ_IC=<value>``).
        on_warning: Called with ``(label, message)`` for each alarm as it is raised.
        trainer_kwargs: Extra ``pl.Trainer`` arguments.
        hard_ic: Impose the initial conditions exactly (no ``ic`` term; ``ic_weight`` unused).
    """
    label = label or ("hard IC" if hard_ic else f"λ_IC={ic_weight:g}")
    seed_quietly(seed)
    model = HarmonicOscillator(omega=omega, ic_weight=ic_weight, steps_per_epoch=steps, hard_ic=hard_ic)
    monitor = GradientNormMonitor(every_n_steps=every_n_steps, verbose=False)
    logger: TensorBoardLogger | bool = False
    if log_dir is not None:
        name = run_name or ("hard_ic" if hard_ic else f"ic_weight_{ic_weight:g}")
        logger = TensorBoardLogger(
            str(log_dir), name=name, version=_fresh_version(Path(log_dir) / name, f"seed_{seed}"), default_hp_metric=False
        )
    options: dict[str, Any] = dict(logger=logger, log_every_n_steps=every_n_steps)
    options.update(trainer_kwargs or {})
    ratio_alarms: list[str] = []
    conflict_alarms: list[str] = []
    with warnings.catch_warnings(record=True) as caught, quiet_lightning():
        warnings.simplefilter("always")
        trainer = quiet_trainer(steps, [monitor, *callbacks], **options)
        start = time.perf_counter()
        trainer.fit(model)
        seconds = time.perf_counter() - start
    for item in caught:
        message = str(item.message)
        if item.category is LossBalanceWarning:
            ratio_alarms.append(message)
        elif item.category is GradientConflictWarning:
            conflict_alarms.append(message)
        else:
            continue
        if on_warning is not None:
            on_warning(label, message)
    with torch.enable_grad():
        model.criterion(**model.residuals(None))
    final_losses = {name: loss.item() for name, loss in model.criterion.last_losses.items()}
    diagnosis = monitor.diagnosis
    return HarmonicRun(
        label=label,
        ic_weight=ic_weight,
        relative_l2=model.relative_l2_error(),
        final_losses=final_losses,
        final_weights=model.criterion.weights,
        worst_ratio=diagnosis.worst_ratio,
        worst_ratio_step=diagnosis.worst_ratio_step,
        ratio_alarms=ratio_alarms,
        conflict_alarms=conflict_alarms,
        seconds=seconds,
        log_dir=str(trainer.logger.log_dir) if trainer.logger is not None else None,
        monitor=monitor,
    )


def warm_up() -> None:
    """A 5-step fit with a logger and the report, so the first timed run does not pay one-off start-up costs
    (imports, the first TensorBoard writer, matplotlib) that the later ones do not."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        run_harmonic(1.0, steps=5, every_n_steps=1, log_dir=folder)


def _spans_cell(spans: Sequence[tuple[int, int | None]]) -> str:
    """``"steps 0-50"`` / ``"steps 250-end"`` for the alarm episodes, ``"-"`` if none."""
    if not spans:
        return "-"
    parts = [f"{start}-{'end' if end is None else end}" for start, end in spans[:2]]
    more = f" +{len(spans) - 2}" if len(spans) > 2 else ""
    return "steps " + ", ".join(parts) + more


def format_table(runs: Sequence[HarmonicRun]) -> str:
    """An aligned text table of the runs: alarms, final losses and accuracy."""
    header = ["run", "worst grad ratio", "ratio alarm on", "conflict alarm on", "L_pde", "L_ic", "rel. L2 error", "verdict", "time"]
    rows = [header]
    for run in runs:
        ratio = "-" if run.worst_ratio is None else f"{run.worst_ratio:.3g}x (step {run.worst_ratio_step})"
        verdict = "solved" if run.relative_l2 < 1e-2 else "poor" if run.relative_l2 <= 0.3 else "FAILED"  # NaN: FAILED
        rows.append(
            [
                run.label,
                ratio,
                _spans_cell([(start, end) for start, end in run.monitor.diagnosis.ratio_alarm_spans]),
                _spans_cell([(start, end) for _, _, start, end in run.monitor.diagnosis.conflict_alarm_spans]),
                f"{run.final_losses['pde']:.2e}" if "pde" in run.final_losses else "-",
                f"{run.final_losses['ic']:.2e}" if "ic" in run.final_losses else "- (exact)",
                f"{run.relative_l2:.2e}",
                verdict,
                f"{run.seconds:.1f}s",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
