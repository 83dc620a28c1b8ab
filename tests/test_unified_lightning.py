"""The callbacks under the unified ``lightning`` package (``import lightning as L``).

Its Trainer, loggers and callbacks are classes distinct from ``pytorch_lightning``'s; these
tests fit a ``lightning.pytorch.LightningModule`` with ``lightning.pytorch``'s own Trainer,
TensorBoardLogger, EarlyStopping and ModelCheckpoint and check what a ``pytorch_lightning`` user
gets: the dashboard layout, the text summary, the one-event-per-step writer, the cadence
warnings, and a resume that carries the balancer's state.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TwoTermPoisson

from lightning_pinn import MultiTermLoss
from lightning_pinn.callbacks import GradientNormMonitor, GradNormBalancer

L = pytest.importorskip("lightning.pytorch", reason="the unified `lightning` package is in the dev extras")


class UnifiedPoisson(L.LightningModule):
    """conftest's ``TwoTermPoisson`` (a ``pytorch_lightning`` module) as a ``lightning.pytorch`` one."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.criterion = MultiTermLoss(pde=1.0, bc=1.0)
        self.register_buffer("x", torch.linspace(0, 1, 32).reshape(-1, 1))
        self.register_buffer("xb", torch.tensor([[0.0], [1.0]]))

    pde_residual = TwoTermPoisson.pde_residual
    residuals = TwoTermPoisson.residuals
    training_step = TwoTermPoisson.training_step
    configure_optimizers = TwoTermPoisson.configure_optimizers
    train_dataloader = TwoTermPoisson.train_dataloader


def unified_trainer(max_steps: int, callbacks: list[Any], **kwargs: Any) -> Any:
    options: dict[str, Any] = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


def test_the_dashboard_layout_summary_and_fast_writer_reach_a_lightning_tensorboard_logger(tmp_path: Path) -> None:
    from tb import custom_scalars_layout, load_events, scalar_series, texts

    from lightning_pinn.callbacks._base import _tensorboard_file_writer

    logger = L.loggers.TensorBoardLogger(str(tmp_path), name="unified")
    assert _tensorboard_file_writer(logger) is not None  # one event per step, not one log_metrics call per tag
    trainer = unified_trainer(20, [GradientNormMonitor(every_n_steps=5, verbose=False), GradNormBalancer(every_n_steps=5)], logger=logger)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(UnifiedPoisson())
    events = load_events(trainer.log_dir)
    assert [step for step, _ in scalar_series(events, "grad_norm/bc")] == [0, 5, 10, 15]
    assert [step for step, _ in scalar_series(events, "weight/bc")][:2] == [0, 1]
    charts = [chart.title for category in custom_scalars_layout(events).category for chart in category.chart]
    assert "gradient norm per term  ‖∇θ L_i‖" in charts, charts
    assert texts(events, "diagnosis"), "the end-of-fit text summary is missing"
    assert (Path(trainer.log_dir) / "diagnosis.md").exists()


def test_lightning_early_stopping_on_a_rarely_renewed_tag_is_warned_about() -> None:
    stop = L.callbacks.EarlyStopping(monitor="loss/pde", patience=3, check_on_train_epoch_end=True)
    trainer = unified_trainer(40, [GradientNormMonitor(report=False), stop], limit_train_batches=4)
    with pytest.warns(UserWarning, match=r"EarlyStopping\(monitor='loss/pde'\) checks about every 4 optimizer.*every_n_steps=4"):
        trainer.fit(UnifiedPoisson())


def test_a_lightning_checkpoint_resumes_the_balancer_exactly(tmp_path: Path) -> None:
    def fit(steps: int, ckpt_path: str | None = None) -> dict[str, float]:
        torch.manual_seed(0)
        model = UnifiedPoisson()
        saver = L.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=10, save_top_k=-1)
        balancer = GradNormBalancer(every_n_steps=3)
        trainer = unified_trainer(steps, [balancer, saver], enable_checkpointing=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, ckpt_path=ckpt_path)
        return model.criterion.weights

    straight = fit(20)
    resumed = fit(20, ckpt_path=str(tmp_path / "epoch=0-step=10.ckpt"))
    assert resumed == pytest.approx(straight, rel=1e-6)
