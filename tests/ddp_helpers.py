"""Modules and callbacks for the multi-process tests (importable, so ``ddp_spawn`` can pickle them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_pinn import MultiTermLoss
from lightning_pinn.autodiff import derivative


class SplitPoisson(pl.LightningModule):
    """-u'' = π² sin(πx), u(0) = u(1) = 0, with the residual points split across ranks.

    Rank r of W uses points r, r + W, r + 2W, … of ``points`` collocation points, so a run on W
    ranks sees, together, exactly the points of a one-process run. With ``uneven=True`` rank 1
    uses fewer points and drops its 'bc' term on step 1, so the ranks' batches differ; with
    ``drop_bc=True`` rank 1 only drops 'bc' on step 1.
    """

    def __init__(self, points: int = 32, uneven: bool = False, drop_bc: bool = False) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.criterion = MultiTermLoss(pde=1.0, bc=1.0)
        self.register_buffer("x", torch.linspace(0, 1, points).reshape(-1, 1))
        self.register_buffer("xb", torch.tensor([[0.0], [1.0]]))
        self.uneven = uneven
        self.drop_bc = drop_bc  # only: rank 1 drops 'bc' on step 1 (same points otherwise)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        rank, world = self.global_rank, self.trainer.world_size
        x = self.x[rank::world]
        if self.uneven and rank == 1:
            x = x[:5]
        x = x.clone().requires_grad_(True)
        u = self.net(x)
        r_pde = -derivative(u, x, order=2) - torch.pi**2 * torch.sin(torch.pi * x)
        r_bc = self.net(self.xb)
        if (self.uneven or self.drop_bc) and rank == 1 and self.global_step == 1:
            r_bc = None  # absent on this rank for this step
        return self.criterion(pde=r_pde, bc=r_bc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> range:
        return range(50)


class DumpPerStep(pl.Callback):
    """Save, per rank and step, λ after the step and the monitor's last measured norms."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        monitor = next(cb for cb in trainer.callbacks if type(cb).__name__ == "GradientNormMonitor")  # type: ignore[attr-defined]
        report = monitor.last_report
        torch.save(
            {
                "weights": pl_module.criterion.lambdas.detach().clone(),
                "norms": report.norms,
                "losses": report.losses,
                "cosines": report.cosines,
            },
            Path(self.folder) / f"rank{trainer.global_rank}_step{trainer.global_step - 1}.pt",
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        (Path(self.folder) / f"rank{trainer.global_rank}_done").touch()


class ToggledGroupsLoggedOnOneRank(SplitPoisson):
    """Manual optimisation: the network's optimizer steps every batch, a PDE coefficient's every
    other batch (toggle_optimizer); rank 0 alone first evaluates the loss for logging."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.coefficient = torch.nn.Parameter(torch.tensor(1.0))

    def residuals(self) -> dict[str, torch.Tensor]:
        x = self.x[self.global_rank :: self.trainer.world_size].clone().requires_grad_(True)
        u = self.net(x)
        pde = (-derivative(u, x, order=2) - torch.pi**2 * torch.sin(torch.pi * x)) * self.coefficient
        return {"pde": pde, "bc": self.net(self.xb) + 0.1 * self.coefficient}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        if self.global_rank == 0:
            self.criterion(**self.residuals())  # evaluated, never backpropagated
        optimizers = self.optimizers() if batch_idx % 2 == 1 else self.optimizers()[:1]
        for optimizer in optimizers:
            self.toggle_optimizer(optimizer)
            residuals = self.residuals()
            optimizer.zero_grad()
            self.manual_backward(self.criterion(**residuals))
            optimizer.step()
            self.untoggle_optimizer(optimizer)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return [torch.optim.Adam(self.net.parameters(), lr=1e-2), torch.optim.Adam([self.coefficient], lr=1e-2)]
