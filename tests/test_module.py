"""PINNModule: the per-term losses and weights it logs on its own."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import make_trainer
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tb import load_events, scalar_series

from lightning_pinn import PINNModule
from lightning_pinn.autodiff import derivative
from lightning_pinn.callbacks import GradientNormMonitor, GradNormBalancer
from lightning_pinn.problems import HarmonicOscillator


def _fit(tmp_path: Any, steps: int, callbacks: list[Any], **kwargs: Any) -> HarmonicOscillator:
    torch.manual_seed(0)
    model = HarmonicOscillator(ic_weight=1.0, steps_per_epoch=steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(steps, callbacks, **kwargs).fit(model)
    return model


def test_every_fit_logs_term_losses_and_weights_at_the_trainers_cadence(tmp_path: Any) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    _fit(tmp_path, 25, [], logger=logger, log_every_n_steps=10)
    events = load_events(tmp_path)
    assert [step for step, _ in scalar_series(events, "loss/pde")] == [0, 10, 20]
    assert [step for step, _ in scalar_series(events, "loss/ic")] == [0, 10, 20]
    assert scalar_series(events, "weight/ic") == [(0, 1.0), (10, 1.0), (20, 1.0)]


def test_with_a_balancer_the_weights_are_logged_by_the_balancer_only(tmp_path: Any) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    balancer = GradNormBalancer(every_n_steps=5)
    _fit(tmp_path, 25, [balancer], logger=logger, log_every_n_steps=10)
    events = load_events(tmp_path)
    assert [step for step, _ in scalar_series(events, "loss/ic")] == [0, 10, 20]
    steps = [step for step, _ in scalar_series(events, "weight/ic")]
    assert len(steps) == len(set(steps)), "one weight/ic per step: no duplicate from PINNModule"
    assert 1 in steps and 0 in steps  # the balancer's first update (applied from step 1) and the initial weight


def test_a_watched_term_loss_is_fresh_in_callback_metrics_at_every_check(tmp_path: Any) -> None:
    """EarlyStopping(monitor="loss/pde") checked every epoch (4 steps) while the loggers get a
    value every 50 steps: it read step 0's loss at every check and stopped a falling fit."""
    from pytorch_lightning.callbacks import EarlyStopping

    seen: list[tuple[float, float]] = []

    class Peek(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
            seen.append((float(trainer.callback_metrics["loss/pde"]), float(pl_module.criterion.last_losses["pde"].detach())))

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
            # where ModelCheckpoint(every_n_train_steps=...) checks: before the module's own batch-end hook
            if trainer.callback_metrics.get("loss/pde") is not None:
                at_batch_end.append(float(trainer.callback_metrics["loss/pde"]) == float(pl_module.criterion.last_losses["pde"].detach()))

    at_batch_end: list[bool] = []

    class Poisson(PINNModule):
        """-u'' = π² sin(πx), u(0) = u(1) = 0: a loss that falls from the first step at this rate."""

        def __init__(self) -> None:
            super().__init__(weights={"pde": 1.0, "bc": 1.0}, learning_rate=1e-2, steps_per_epoch=4)
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
            self.register_buffer("x", torch.linspace(0, 1, 16).unsqueeze(1))

        def residuals(self, batch: Any) -> dict[str, torch.Tensor]:
            x = self.x.clone().requires_grad_(True)
            u = self.net(x)
            return {"pde": derivative(u, x, order=2) + math.pi**2 * torch.sin(math.pi * x), "bc": self.net(self.x[[0, -1]])}

    stop = EarlyStopping(monitor="loss/pde", mode="min", patience=2)
    trainer = make_trainer(40, [Peek(), stop], log_every_n_steps=50)
    trainer.fit(Poisson())
    assert trainer.global_step == 40 and not trainer.should_stop  # it stopped at step 12 on step 0's value
    assert len(seen) == 10 and all(published == last for published, last in seen)
    assert len(at_batch_end) == 40 and all(at_batch_end)  # this step's loss, not the previous one
    # unwatched tags are renewed when logged only (nothing to pay every step)
    seen.clear()
    make_trainer(8, [Peek()], log_every_n_steps=50).fit(Poisson())
    assert len({published for published, _ in seen}) == 1


def test_term_losses_reach_a_csv_logger(tmp_path: Any) -> None:
    logger = CSVLogger(str(tmp_path), name="csv")
    _fit(tmp_path, 12, [], logger=logger, log_every_n_steps=4)
    logger.save()
    import csv

    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    assert sorted(int(row["step"]) for row in rows if row.get("loss/pde")) == [0, 4, 8]
    assert all(float(row["weight/ic"]) == 1.0 for row in rows if row.get("weight/ic"))


def test_with_a_monitor_the_monitor_logs_them_once(tmp_path: Any) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    _fit(tmp_path, 20, [GradientNormMonitor(every_n_steps=3, verbose=False, report=False)], logger=logger, log_every_n_steps=10)
    assert [step for step, _ in scalar_series(load_events(tmp_path), "loss/pde")] == [0, 3, 6, 9, 12, 15, 18]


def test_residuals_must_be_a_dict_and_a_monitor_on_another_loss_does_not_silence_the_modules_logging(tmp_path: Any) -> None:
    import pytest

    from lightning_pinn import MultiTermLoss

    class Listy(HarmonicOscillator):
        def residuals(self, batch: Any) -> Any:
            return list(super().residuals(batch).values())

    with pytest.raises(
        TypeError, match=r"Listy.residuals\(\) must return a dict of one tensor per term, e.g. \{'pde': r_pde, 'ic': r_ic\}"
    ):
        make_trainer(1).fit(Listy())

    class Second(HarmonicOscillator):
        def __init__(self) -> None:
            super().__init__()
            self.second = MultiTermLoss(data=1.0)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return super().training_step(batch, batch_idx) + self.second(data=self.net(torch.ones(2, 1)) - 1)

    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    monitor = GradientNormMonitor(every_n_steps=2, loss_module="second", verbose=False, report=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(4, [monitor], logger=logger, log_every_n_steps=2).fit(Second())
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss/pde", "loss/ic", "weight/pde", "weight/ic", "second/grad_norm/data"} <= set(header)


def test_the_readmes_pinnmodule_example_runs_as_printed(tmp_path: Any, monkeypatch: Any) -> None:
    """The README's "Starting fresh with PINNModule" block, executed verbatim: it trains, and the
    balancer gives the boundary term (the smaller gradient) the larger weight."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    after_marker = readme.split("<!-- test:pinnmodule -->\n", 1)[1]
    code = after_marker.split("```python\n", 1)[1].split("\n```", 1)[0]
    monkeypatch.chdir(tmp_path)  # the example's Trainer writes lightning_logs/ in the working directory
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "README.md:pinnmodule", "exec"), namespace)
    assert namespace["trainer"].global_step == 1000
    weights = namespace["model"].criterion.weights
    assert weights["pde"] == 1.0 and weights["bc"] > 10.0
    assert (tmp_path / "lightning_logs").is_dir()


class _BatchRecorder(HarmonicOscillator):
    """Records (global step, loader value, batch_idx) of every training batch."""

    def __init__(self) -> None:
        super().__init__(ic_weight=1.0, steps_per_epoch=5)
        self.seen: list[tuple[int, int, int]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.seen.append((self.global_step, int(batch), batch_idx))
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(
    "every, checkpoint, limit", [(3, "epoch=1-step=9.ckpt", 1.0), (5, "epoch=0-step=5.ckpt", 1.0), (4, "epoch=0-step=4.ckpt", 4)]
)
def test_the_step_loader_resumes_mid_epoch_at_the_next_index(tmp_path: Any, every: int, checkpoint: str, limit: float) -> None:
    """Mid-epoch (step 9: the second epoch's fifth batch is next), at an epoch's end (step 5), and
    at the end of an epoch that limit_train_batches=4 cut short (the next epoch starts at 0)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    full = _BatchRecorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpoints = ModelCheckpoint(str(tmp_path), every_n_train_steps=every, save_top_k=-1)
        make_trainer(12, [checkpoints], enable_checkpointing=True, limit_train_batches=limit).fit(full)
    resumed = _BatchRecorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(12, [], limit_train_batches=limit).fit(resumed, ckpt_path=str(tmp_path / checkpoint))
    assert not [w for w in caught if "not resumable" in str(w.message)]
    # the loader's value goes on with Lightning's batch_idx, as in the uninterrupted fit
    step = int(checkpoint.split("step=")[1].split(".")[0])
    assert resumed.seen == full.seen[step:]
    epoch_length = 5 if limit == 1.0 else int(limit)
    assert resumed.seen[0] == (step, step % epoch_length, step % epoch_length)
    assert all(value == index for _, value, index in full.seen)
