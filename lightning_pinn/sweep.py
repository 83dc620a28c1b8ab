"""The λ sweep on the harmonic oscillator: fixed weights on a grid against the balancers.

Reproduces the "manual weight tuner" experiment: one fresh fit per λ_IC on a log grid (the
Goldilocks curve: too small and too large both fail) plus one fit per balancer, which needs no
λ at all. Fits run in worker processes (one thread each) to use all CPU cores.
"""

from __future__ import annotations

import csv
import math
import multiprocessing
import os
import signal
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FitSpec",
    "FitResult",
    "BALANCERS",
    "run_fit",
    "run_fits",
    "grid_size",
    "grid_weights",
    "summarize",
    "write_table",
    "plot_sweep",
    "ranking_error",
]

#: Balancer names accepted by the sweep, and how each is built (with its defaults).
BALANCERS: dict[str, str] = {
    "gradnorm-max": "GradNormBalancer(rule='max')",
    "gradnorm-mean": "GradNormBalancer(rule='mean')",
    "ntk": "NTKBalancer()",
}


@dataclass(frozen=True)
class FitSpec:
    """One harmonic-oscillator fit: a fixed λ_IC, or a balancer starting from λ_IC = 1."""

    method: str  # "fixed" or a key of BALANCERS
    ic_weight: float = 1.0
    seed: int = 0
    steps: int = 2000
    omega: float = 2 * math.pi
    history_every: int = 10
    error_every: int = 0  # evaluate the relative L² error every this many steps (0: only at the end)

    @property
    def label(self) -> str:
        return f"λ_IC={self.ic_weight:g}" if self.method == "fixed" else self.method


@dataclass
class FitResult:
    """What a fit produced."""

    spec: FitSpec
    relative_l2: float
    final_weights: dict[str, float]
    seconds: float
    history_steps: list[int] = field(default_factory=list)
    history_losses: dict[str, list[float]] = field(default_factory=dict)
    history_weights: dict[str, list[float]] = field(default_factory=dict)
    error_steps: list[int] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)


def grid_size(low: float, high: float, step: float) -> int:
    """How many weights :func:`grid_weights` gives for these bounds (without building them)."""
    if step <= 0 or high < low:
        raise ValueError(f"grid: need grid_step > 0 and grid_max >= grid_min, got min={low}, max={high}, step={step}.")
    steps = (high - low) / step
    if not math.isfinite(steps):  # e.g. step=5e-324: more weights than any grid can hold
        raise ValueError(f"grid: grid_step={step} is too small for the range [{low}, {high}] (an unbounded number of weights).")
    return int(math.floor(steps + 1e-9)) + 1


def grid_weights(low: float, high: float, step: float) -> list[float]:
    """``10**e`` for ``e`` from ``low`` to ``high`` (inclusive) in increments of ``step``."""
    return [10.0 ** (low + i * step) for i in range(grid_size(low, high, step))]


def _make_balancer(method: str) -> Any:
    from lightning_pinn.callbacks import GradNormBalancer, NTKBalancer

    builders: dict[str, Callable[[], Any]] = {
        "gradnorm-max": lambda: GradNormBalancer(rule="max"),
        "gradnorm-mean": lambda: GradNormBalancer(rule="mean"),
        "ntk": lambda: NTKBalancer(),
    }
    assert set(builders) == set(BALANCERS)
    if method not in builders:
        raise ValueError(f"unknown balancer {method!r}; choose from {sorted(builders)}.")
    return builders[method]()


def run_fit(spec: FitSpec) -> FitResult:
    """Train the harmonic IVP as described by ``spec`` and record its history."""
    import pytorch_lightning as pl

    from lightning_pinn.demo import quiet_lightning, quiet_trainer, seed_quietly
    from lightning_pinn.problems import HarmonicOscillator
    from lightning_pinn.recording import HistoryRecorder

    seed_quietly(spec.seed)
    model = HarmonicOscillator(omega=spec.omega, ic_weight=spec.ic_weight, steps_per_epoch=spec.steps)
    recorder = HistoryRecorder(history_every=spec.history_every, error_every=spec.error_every)
    callbacks: list[pl.Callback] = [recorder]  # first: it records the weights each step trained with
    if spec.method != "fixed":
        callbacks.append(_make_balancer(spec.method))
    with quiet_lightning(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = quiet_trainer(spec.steps, callbacks)
        start = time.perf_counter()
        trainer.fit(model)
        seconds = time.perf_counter() - start
    history = recorder.history
    return FitResult(
        spec=spec,
        relative_l2=model.relative_l2_error(),
        final_weights=model.criterion.weights,
        seconds=seconds,
        history_steps=history.steps,
        history_losses=history.losses,
        history_weights=history.weights,
        error_steps=history.error_steps,
        errors=history.errors,
    )


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)
    # Ctrl-C goes to the whole process group: let the main process handle it (it keeps the fits
    # that finished and stops the pool), instead of a traceback from every worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_fits(specs: Sequence[FitSpec], workers: int = 0, on_result: Callable[[int, int, FitResult], None] | None = None) -> list[FitResult]:
    """Run the fits, ``workers`` at a time (0: one per CPU core), in the order of ``specs``.

    ``on_result(done, total, result)`` is called as each fit finishes (for progress output).
    """
    workers = workers or (os.cpu_count() or 1)
    results: list[FitResult | None] = [None] * len(specs)

    def finished() -> Iterator[tuple[int, FitResult]]:
        if workers == 1:
            import torch

            # one thread, as in the pool's workers: the fits are tiny, and on a busy machine a
            # thread pool per fit was 30-100x slower (the time column must also compare)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for index, spec in enumerate(specs):
                    yield index, run_fit(spec)
            finally:
                torch.set_num_threads(threads)
            return
        context = multiprocessing.get_context("spawn")
        # the workers inherit an ignored SIGINT while they start (importing torch takes seconds):
        # Ctrl-C then reaches only this process, which stops the pool
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            pool = context.Pool(processes=min(workers, len(specs)), initializer=_worker_init)
        finally:
            signal.signal(signal.SIGINT, handler)
        with pool:
            yield from pool.imap_unordered(_indexed_run, list(enumerate(specs)))

    for done, (index, result) in enumerate(finished(), start=1):
        results[index] = result
        if on_result is not None:
            on_result(done, len(specs), result)
    return [result for result in results if result is not None]


def _indexed_run(item: tuple[int, FitSpec]) -> tuple[int, FitResult]:
    index, spec = item
    return index, run_fit(spec)


@dataclass
class MethodSummary:
    """Median over seeds for one method (a fixed λ_IC or a balancer)."""

    label: str
    method: str
    ic_weight: float
    median_l2: float
    l2_by_seed: list[float]
    final_ic_over_pde: float
    median_seconds: float


def summarize(results: Sequence[FitResult]) -> list[MethodSummary]:
    """Group results by method (and λ_IC for fixed weights) and take medians over seeds."""
    groups: dict[tuple[str, float | None], list[FitResult]] = {}
    for result in results:
        key = (result.spec.method, result.spec.ic_weight if result.spec.method == "fixed" else None)
        groups.setdefault(key, []).append(result)
    summaries = []
    for (method, _), group in groups.items():
        group.sort(key=lambda r: r.spec.seed)
        ratios = [r.final_weights["ic"] / r.final_weights["pde"] if r.final_weights.get("pde") else math.nan for r in group]
        summaries.append(
            MethodSummary(
                label=group[0].spec.label,
                method=method,
                ic_weight=group[0].spec.ic_weight,
                median_l2=statistics.median(r.relative_l2 for r in group),
                l2_by_seed=[r.relative_l2 for r in group],
                final_ic_over_pde=statistics.median(ratios),
                median_seconds=statistics.median(r.seconds for r in group),
            )
        )
    return summaries


def write_table(summaries: Sequence[MethodSummary], path: Path) -> str:
    """Write the summaries as CSV to ``path`` and return them as a Markdown table."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "ic_weight_initial", "median_relative_l2", "relative_l2_by_seed", "final_ic_over_pde", "median_seconds"])
        for s in summaries:
            writer.writerow(
                [
                    s.method,
                    s.ic_weight,
                    f"{s.median_l2:.4g}",
                    " ".join(f"{v:.3g}" for v in s.l2_by_seed),
                    f"{s.final_ic_over_pde:.4g}",
                    f"{s.median_seconds:.2f}",
                ]
            )
    lines = ["| run | median rel. L2 | per seed | final λ_IC/λ_PDE | time/fit |", "|---|---|---|---|---|"]
    for s in summaries:
        lines.append(
            f"| {s.label} | {s.median_l2:.2e} | {' '.join(f'{v:.1e}' for v in s.l2_by_seed)} | {s.final_ic_over_pde:.3g} | {s.median_seconds:.1f} s |"
        )
    return "\n".join(lines)


def ranking_error(summary: MethodSummary) -> float:
    """The median error, a diverged fit's NaN counted as the worst (``min``/``max`` misorder NaN)."""
    return summary.median_l2 if not math.isnan(summary.median_l2) else math.inf


def plot_sweep(summaries: Sequence[MethodSummary], results: Sequence[FitResult], path: Path, title: str) -> None:
    """PNG: relative L² against λ_IC (balancers as horizontal lines), and per-term loss histories
    of a bad fixed weight (λ_IC = 1, or the grid's worst where 1 is not on it), the best fixed one
    and the best balancer.

    Uses matplotlib's object API with the Agg canvas: no pyplot state, and the caller's backend
    (a notebook's, say) is left as it is.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fixed = sorted((s for s in summaries if s.method == "fixed"), key=lambda s: s.ic_weight)
    balanced = [s for s in summaries if s.method != "fixed"]
    figure = Figure(figsize=(13, 8.5), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 3, height_ratios=[1.25, 1])
    curve = figure.add_subplot(grid[0, :])
    if fixed:
        curve.loglog([s.ic_weight for s in fixed], [s.median_l2 for s in fixed], "o-", color="black", label="fixed λ_IC (λ_PDE = 1)")
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for colour, s in zip(colours, balanced):
        curve.axhline(
            s.median_l2, color=colour, linestyle="--", label=f"{s.label} (starts at λ = 1; ends at λ_IC/λ_PDE ≈ {s.final_ic_over_pde:.3g})"
        )
    curve.set_xlabel("λ_IC")
    curve.set_ylabel("relative L² error (median over seeds)")
    curve.set_title(title)
    curve.grid(True, which="both", alpha=0.3)
    curve.legend(loc="best", fontsize=9)

    seed = min(r.spec.seed for r in results)
    by_label = {r.spec.label: r for r in results if r.spec.seed == seed}
    cases: list[tuple[str, FitResult]] = []
    # those with a fit of this seed (an interrupted sweep may lack some)
    fixed_here = [s for s in fixed if s.label in by_label]
    if "λ_IC=1" in by_label:
        cases.append(("bad: λ_IC = 1", by_label["λ_IC=1"]))
    elif len(fixed_here) > 1:  # λ_IC = 1 is not on the grid: its worst weight instead
        worst = max(fixed_here, key=ranking_error)
        cases.append((f"bad: worst fixed {worst.label}", by_label[worst.label]))
    if fixed_here:
        best = min(fixed_here, key=ranking_error)
        cases.append((f"good: best fixed {best.label}", by_label[best.label]))
    balanced_here = [s for s in balanced if s.label in by_label]
    if balanced_here:
        best_balanced = min(balanced_here, key=ranking_error)
        cases.append((f"balanced: {best_balanced.label}", by_label[best_balanced.label]))
    for column, (name, result) in enumerate(cases[:3]):
        axis = figure.add_subplot(grid[1, column])
        for term, values in result.history_losses.items():
            axis.semilogy(result.history_steps, values, label=f"L_{term}")
        axis.set_title(f"{name}\nrel. L² = {result.relative_l2:.2e} (seed {seed})", fontsize=10)
        axis.set_xlabel("step")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.savefig(path, dpi=110)


def results_as_dicts(results: Sequence[FitResult]) -> list[dict[str, Any]]:
    """Plain dictionaries (for JSON)."""
    return [asdict(r) for r in results]
