"""Shared helpers for the test suite: small real fits on CPU."""

from __future__ import annotations

import contextlib

with contextlib.suppress(ImportError):  # (in the dev extras) imported first, as its users do: see test_unified_lightning.py
    import lightning.pytorch  # noqa: F401

from collections.abc import Callable  # noqa: E402
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lightning_pinn import MultiTermLoss
from lightning_pinn.autodiff import derivative


def flat_gradient(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """``∇θ loss`` flattened over ``params`` (zeros for a parameter the loss does not reach); the
    graph is kept, so several terms' gradients can be taken from one forward pass."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])


def make_trainer(max_steps: int, callbacks: list[Any] | None = None, trainer_class: type[Any] = pl.Trainer, **kwargs: Any) -> Any:
    """A quiet CPU trainer for tests (``trainer_class``: e.g. ``lightning.pytorch.Trainer``)."""
    options: dict[str, Any] = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks or [],
    )
    options.update(kwargs)
    return trainer_class(**options)


class TwoTermPoisson(pl.LightningModule):
    """A plain LightningModule (not a PINNModule): -u'' = π² sin(πx) on [0, 1], u(0) = u(1) = 0.

    It uses a MultiTermLoss the way an existing user's module would.
    """

    def __init__(self, pde_weight: float = 1.0, bc_weight: float = 1.0, points: int = 32, width: int = 16) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(1, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
        self.criterion = MultiTermLoss(pde=pde_weight, bc=bc_weight)
        self.register_buffer("x", torch.linspace(0, 1, points).reshape(-1, 1))
        self.register_buffer("xb", torch.tensor([[0.0], [1.0]]))

    def pde_residual(self, points: torch.Tensor) -> torch.Tensor:
        """-u'' - π² sin(πx) at ``points`` (a copy that requires grad is differentiated)."""
        x = points.clone().requires_grad_(True)
        u = self.net(x)
        return -derivative(u, x, order=2) - torch.pi**2 * torch.sin(torch.pi * x)

    def residuals(self) -> dict[str, torch.Tensor]:
        return {"pde": self.pde_residual(self.x), "bc": self.net(self.xb)}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.criterion(**self.residuals())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> range:
        return range(100)


class ManualOptimization(TwoTermPoisson):
    """Manual optimisation: the user calls manual_backward and steps the optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        loss = self.criterion(**self.residuals())
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss.detach()


class ExtraTermPoisson(TwoTermPoisson):
    """:class:`TwoTermPoisson` with a third term ``name`` whose residual is ``extra(model, batch_idx)``
    (``None``: absent from that step), for tests that need one more term."""

    def __init__(self, name: str, extra: Callable[[Any, int], torch.Tensor | None], weight: float = 1.0) -> None:
        super().__init__()
        self.criterion = MultiTermLoss(pde=1.0, bc=1.0, **{name: weight})
        self.extra_name, self.extra = name, extra

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.criterion(**self.residuals(), **{self.extra_name: self.extra(self, batch_idx)})


class TwoLossPoisson(TwoTermPoisson):
    """:class:`TwoTermPoisson` with a second ``MultiTermLoss`` (``data_loss``, one term ``data``)."""

    def __init__(self) -> None:
        super().__init__()
        self.data_loss = MultiTermLoss(data=1.0)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.criterion(**self.residuals()) + self.data_loss(data=self.net(self.x) - 0.5)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
