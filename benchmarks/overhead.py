"""Overhead of lightning-pinn's callbacks, measured side by side.

Trains the harmonic IVP (1-32-32-32-1 tanh, 128 points, Adam) for ``--steps`` steps in
several configurations, alternating them round-robin so that machine noise hits all alike,
and prints the median wall time of each and the ratios of medians. Nothing here asserts an
absolute time.

    python benchmarks/overhead.py                 # default: 9 rounds of 2000 steps
    python benchmarks/overhead.py --rounds 7 --steps 1000
    python benchmarks/overhead.py --only lightning empty-callback monitor-per-step monitor-default

Configurations:
    plain-loop        plain PyTorch loop, no Lightning (the floor)
    lightning         PINNModule fit, TensorBoardLogger, no callback
    empty-callback    + a bare ``pl.Callback()`` that overrides nothing: what Lightning's hook
                      dispatch costs for any one callback (the floor for ours)
    monitor-default   + GradientNormMonitor() with all defaults (every 50 steps, end-of-fit report)
    monitor-per-step  + GradientNormMonitor(report=False): the per-step cost alone, without the
                      one-off end-of-fit report (diagnosis.md + PNG, ~0.1 s)
    monitor-every     + GradientNormMonitor(every_n_steps=1, report=False): per-term gradients and
                      13 scalars logged on every step
    monitor-every-nolog  the same with no logger at all (the difference is TensorBoard's writer)
    monitor-every-bar  the every-step monitor with Lightning's progress bar on (as for users), its
                      grad_ratio shown in the bar at every measurement; -hidden: the same with
                      GradientNormMonitor(progress_bar=False), so the ratio is the bar entry's cost
    monitor-every-unbatched  the same with TensorBoard, each event handed to TensorBoard's writer
                      as soon as it is measured (PendingEvents(limit=1)) instead of in batches
                      when Lightning logs: what the batching saves
    balancer-every    + GradNormBalancer(every_n_steps=1): a weight update on every step
    capture-every     + a callback that only asks for the per-term gradients on every step
                      (the engine's cost alone, without logging or rules)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_pinn.autodiff import derivative  # noqa: E402
from lightning_pinn.callbacks import GradientNormMonitor, GradNormBalancer  # noqa: E402
from lightning_pinn.callbacks._base import PendingEvents, PerTermCallback  # noqa: E402
from lightning_pinn.demo import quiet_lightning, quiet_trainer  # noqa: E402
from lightning_pinn.nn import mlp  # noqa: E402
from lightning_pinn.problems import HarmonicOscillator  # noqa: E402


class CaptureOnly(PerTermCallback):
    """Requests the per-term gradients every step and does nothing with them."""

    def __init__(self) -> None:
        super().__init__(every_n_steps=1, loss_module=None)

    def _on_measurement(self, trainer: pl.Trainer, pl_module: pl.LightningModule, measurement: object) -> None:
        pass


def plain_loop(steps: int, ic_weight: float = 100.0, omega: float = 2 * math.pi) -> float:
    """The same fit as a bare PyTorch loop; returns seconds."""
    torch.manual_seed(0)
    net = mlp(1, (32, 32, 32), 1)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    t_col = torch.linspace(0, 1, 128).reshape(-1, 1)
    start = time.perf_counter()
    for _ in range(steps):
        t = t_col.clone().requires_grad_(True)
        u = net(t)
        r_pde = derivative(u, t, order=2) + omega**2 * u
        t0 = torch.zeros(1, 1, requires_grad=True)
        u0 = net(t0)
        r_ic = torch.cat([u0 - 1.0, derivative(u0, t0)]).reshape(-1)
        loss = r_pde.square().mean() + ic_weight * r_ic.square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def lightning_fit(
    steps: int, callbacks: Callable[[], list[pl.Callback]], log_root: str, tensorboard: bool = True, progress_bar: bool = False
) -> float:
    """A PINNModule fit with a TensorBoardLogger (or none) and the given callbacks; returns seconds of ``fit``.

    With ``progress_bar``, Lightning's progress bar is on (as by default for users), drawn into
    a discarded stream.
    """
    torch.manual_seed(0)
    model = HarmonicOscillator(ic_weight=100.0, steps_per_epoch=steps)
    # the bar draws to stdout: into a discarded stream, so the printed results stay readable
    with quiet_lightning(), warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logger = TensorBoardLogger(log_root, name="bench") if tensorboard else False
        trainer = quiet_trainer(steps, callbacks(), logger=logger, enable_progress_bar=progress_bar)
        start = time.perf_counter()
        trainer.fit(model)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="runs of each configuration (default 9)")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per run (default 2000)")
    parser.add_argument("--only", nargs="+", metavar="CONFIG", help="run only these configurations (names as listed above; default all)")
    args = parser.parse_args()

    def every_step_monitor() -> list[pl.Callback]:
        return [GradientNormMonitor(every_n_steps=1, verbose=False, report=False)]

    def every_step_monitor_unbatched() -> list[pl.Callback]:
        monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
        monitor._pending = PendingEvents(limit=1)  # every event reaches the writer at once
        return [monitor]

    def every_step_monitor_bar_hidden() -> list[pl.Callback]:
        return [GradientNormMonitor(every_n_steps=1, verbose=False, report=False, progress_bar=False)]

    with tempfile.TemporaryDirectory() as log_root:
        configs: dict[str, Callable[[], float]] = {
            "plain-loop": lambda: plain_loop(args.steps),
            "lightning": lambda: lightning_fit(args.steps, lambda: [], log_root),
            "empty-callback": lambda: lightning_fit(args.steps, lambda: [pl.Callback()], log_root),
            "monitor-default": lambda: lightning_fit(args.steps, lambda: [GradientNormMonitor(verbose=False)], log_root),
            "monitor-per-step": lambda: lightning_fit(args.steps, lambda: [GradientNormMonitor(verbose=False, report=False)], log_root),
            "monitor-every": lambda: lightning_fit(args.steps, every_step_monitor, log_root),
            "monitor-every-nolog": lambda: lightning_fit(args.steps, every_step_monitor, log_root, tensorboard=False),
            "monitor-every-unbatched": lambda: lightning_fit(args.steps, every_step_monitor_unbatched, log_root),
            "balancer-every": lambda: lightning_fit(args.steps, lambda: [GradNormBalancer(every_n_steps=1)], log_root),
            "capture-every": lambda: lightning_fit(args.steps, lambda: [CaptureOnly()], log_root),
            "monitor-every-bar": lambda: lightning_fit(args.steps, every_step_monitor, log_root, progress_bar=True),
            "monitor-every-bar-hidden": lambda: lightning_fit(args.steps, every_step_monitor_bar_hidden, log_root, progress_bar=True),
        }
        if args.only:
            unknown = sorted(set(args.only) - set(configs))
            if unknown:
                parser.error(f"unknown configuration(s) {unknown}; choose from {sorted(configs)}")
            configs = {name: run for name, run in configs.items() if name in args.only}
        for run in configs.values():  # warm-up: imports, allocator, first TensorBoard writer
            run()
        times: dict[str, list[float]] = {name: [] for name in configs}
        for round_index in range(args.rounds):
            for name, run in configs.items():
                times[name].append(run())
            print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), flush=True)

    medians = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"\nharmonic IVP, {args.steps} steps, {args.rounds} alternating rounds, torch {torch.__version__}, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}"
    )
    width = max(len("configuration"), *map(len, medians)) + 2
    print(f"{'configuration':<{width}}{'median':>9}")
    for name, value in medians.items():
        print(f"{name:<{width}}{value:>8.3f}s")
    comparisons = [
        ("monitor-default", "lightning", "GradientNormMonitor(), all defaults"),
        ("monitor-per-step", "lightning", "default cadence, without the one-off end-of-fit report"),
        ("empty-callback", "lightning", "a callback that does nothing: Lightning's hook dispatch"),
        ("monitor-per-step", "empty-callback", "the monitor's per-step cost beyond any callback's dispatch"),
        ("capture-every", "lightning", "per-term gradients on every step, engine only"),
        ("balancer-every", "lightning", "GradNormBalancer updating every step"),
        ("monitor-every", "lightning", "monitor logging 13 scalars every step, report=False"),
        ("monitor-every-nolog", "lightning", "the same monitor without a logger: what TensorBoard's writer costs"),
        ("monitor-every-unbatched", "lightning", "the every-step monitor handing each event to TensorBoard at once"),
        ("monitor-every-bar", "monitor-every-bar-hidden", "progress bar on: grad_ratio in the bar at every measurement vs not shown"),
        ("lightning", "plain-loop", "Lightning itself"),
        ("monitor-default", "plain-loop", "end to end, with the monitor"),
    ]
    # The ratio of medians is the headline; the median of the per-round ratios (each round runs
    # every configuration back to back) is steadier when the machine's speed drifts during a run.
    print("\nratio of medians, and in brackets the median of the per-round ratios:")
    for numerator, denominator, label in comparisons:
        if numerator not in times or denominator not in times:
            continue
        paired = statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))
        name = f"{numerator} / {denominator}"
        print(f"  {name:<42} = {medians[numerator] / medians[denominator]:.3f}  [{paired:.3f}]   ({label})")


if __name__ == "__main__":
    main()
