"""Shared by the benchmarks: time every optimizer step of a fit, to compare update steps with plain ones."""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any


def update_vs_plain(model: Any, callback: Any, steps: int, every: int, warmup: int) -> tuple[float, float]:
    """Fit ``model`` with ``callback`` for ``steps`` steps; return (median time of steps ``s % every == 0``,
    median time of the other steps), both after ``warmup`` steps. Update and plain steps alternate in
    the same run, so machine noise affects both alike."""
    import pytorch_lightning as pl

    from lightning_pinn.demo import quiet_lightning, quiet_trainer

    times: dict[int, float] = {}
    clock: list[float] = [0.0]

    class StepTimer(pl.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            clock[0] = time.perf_counter()

        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            times[trainer.global_step - 1] = time.perf_counter() - clock[0]

    with quiet_lightning(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = quiet_trainer(steps, [callback, StepTimer()])
        trainer.fit(model)
    measured = {s: t for s, t in times.items() if s >= warmup}
    update = statistics.median(t for s, t in measured.items() if s % every == 0)
    plain = statistics.median(t for s, t in measured.items() if s % every)
    return update, plain


if __name__ == "__main__":  # a helper module: say so instead of doing nothing silently
    print(__doc__.strip() + "\nNot a script: benchmarks/accuracy.py and benchmarks/ntk_cost.py import it.")
