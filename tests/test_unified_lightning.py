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
from conftest import TwoTermPoisson, make_trainer

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
    return make_trainer(max_steps, callbacks, trainer_class=L.Trainer, **kwargs)


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


def test_lightning_cli_builds_the_callbacks_from_yaml(tmp_path: Path) -> None:
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    config = {
        "trainer": {
            "max_steps": 6,
            "logger": False,
            "enable_progress_bar": False,
            "enable_checkpointing": False,
            "callbacks": [
                {"class_path": "lightning_pinn.callbacks.GradientNormMonitor", "init_args": {"every_n_steps": 3, "report": False}},
                {"class_path": "lightning_pinn.callbacks.GradNormBalancer", "init_args": {"every_n_steps": 3, "rule": "mean"}},
            ],
        }
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = LightningCLI(UnifiedPoisson, args={"fit": config}, save_config_callback=None)
    kinds = {type(callback).__name__: callback for callback in cli.trainer.callbacks}
    assert kinds["GradientNormMonitor"].every_n_steps == 3
    assert kinds["GradNormBalancer"].rule == "mean" and kinds["GradNormBalancer"].num_updates == 2


def _messages_by_logger(fit: Any) -> dict[str, list[str]]:
    """The INFO messages each Lightning distribution's rank-zero logger receives during ``fit()``."""
    import logging

    received: dict[str, list[str]] = {}
    handlers = []
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        handler = logging.Handler(logging.INFO)
        handler.emit = lambda record, name=name: received.setdefault(name, []).append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger(name).addHandler(handler)
        handlers.append((name, handler))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit()
    finally:
        for name, handler in handlers:
            logging.getLogger(name).removeHandler(handler)
    return received


@pytest.mark.parametrize(
    ("trainer_of", "subclassed"), [("pytorch_lightning", False), ("lightning.pytorch", False), ("lightning.pytorch", True)]
)
def test_the_console_table_goes_through_the_logger_of_the_trainers_distribution(trainer_of: str, subclassed: bool) -> None:
    class MyTrainer(L.Trainer):  # a user's Trainer subclass, defined in the user's module
        pass

    def fit() -> None:
        monitor = GradientNormMonitor(every_n_steps=5, print_every_n_steps=5, verbose=False, report=False)
        if trainer_of == "pytorch_lightning":
            make_trainer(6, [monitor]).fit(TwoTermPoisson())
        else:
            make_trainer(6, [monitor], trainer_class=MyTrainer if subclassed else L.Trainer).fit(UnifiedPoisson())

    received = _messages_by_logger(fit)
    other = "lightning.pytorch" if trainer_of == "pytorch_lightning" else "pytorch_lightning"
    assert [m.splitlines()[0] for m in received.get(f"{trainer_of}.utilities.rank_zero", []) if m.startswith("step ")] == [
        "step 0:",
        "step 5:",
    ]
    assert not [m for m in received.get(f"{other}.utilities.rank_zero", []) if m.startswith("step ")]


@pytest.mark.parametrize(
    ("imports", "routed_to"),
    [
        ("import lightning_pinn.callbacks", "pytorch_lightning"),
        ("import pytorch_lightning; import lightning_pinn.callbacks", "pytorch_lightning"),
        ("import lightning.pytorch; import lightning_pinn.callbacks", "lightning.pytorch"),
        ("import lightning as L; from lightning_pinn.callbacks import GradNormBalancer", "lightning.pytorch"),
        ("import lightning_pinn.callbacks; import lightning as L", "lightning.pytorch"),
    ],
)
def test_importing_the_package_leaves_lightnings_log_routing_alone(imports: str, routed_to: str) -> None:
    """Each distribution points the rank-zero logging both share at its own logger when imported;
    importing lightning-pinn (which imports both) keeps the routing of the one the user imported."""
    import subprocess
    import sys

    code = f"{imports}; import lightning_utilities.core.rank_zero as shared; print(shared.log.name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == f"{routed_to}.utilities.rank_zero"


@pytest.mark.parametrize(
    ("imports", "subclass"),
    [
        ("import lightning.pytorch as L; import lightning_pinn.callbacks", True),
        ("import lightning_pinn.callbacks; import lightning.pytorch as L", False),
    ],
)
def test_the_callbacks_are_unified_callbacks_where_lightning_was_imported_first(imports: str, subclass: bool) -> None:
    """lightning-pinn does not import lightning.pytorch itself (that would move Lightning's log
    routing away from a user who imports it later), so its callbacks subclass the unified
    package's Callback (what LightningCLI checks) where that was imported first; either way they
    run under its Trainer."""
    import subprocess
    import sys

    code = f"{imports}; from lightning_pinn.callbacks import GradNormBalancer; print(issubclass(GradNormBalancer, L.Callback))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == str(subclass)
