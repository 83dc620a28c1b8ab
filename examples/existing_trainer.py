"""Add per-term gradient monitoring to a LightningModule you already have.

The model below is an ordinary LightningModule for the 1D Poisson problem
-u'' = π² sin(πx) on [0, 1], u(0) = u(1) = 0. Two lines make it observable:

1. hold the loss terms in a ``MultiTermLoss`` and return ``self.criterion(pde=..., bc=...)``;
2. add ``GradientNormMonitor()`` to the Trainer's callbacks.

Run it, then look at the dashboard:

    python examples/existing_trainer.py
    tensorboard --logdir lightning_pinn_runs/example     # open the "Custom Scalars" tab
"""

import math

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_pinn import MultiTermLoss
from lightning_pinn.autodiff import derivative
from lightning_pinn.callbacks import GradientNormMonitor


class Poisson1D(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
        )
        self.criterion = MultiTermLoss(pde=1.0, bc=1.0)  # (1) the loss terms, with their initial weights
        self.register_buffer("x", torch.linspace(0, 1, 64).reshape(-1, 1))
        self.register_buffer("x_boundary", torch.tensor([[0.0], [1.0]]))

    def training_step(self, batch, batch_idx):
        x = self.x.clone().requires_grad_(True)
        u = self.net(x)
        r_pde = -derivative(u, x, order=2) - math.pi**2 * torch.sin(math.pi * x)  # point-wise residuals
        r_bc = self.net(self.x_boundary)
        return self.criterion(pde=r_pde, bc=r_bc)  # Σ λ_i · mean(r_i²)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return range(1000)  # full-batch PINN: one "batch" per step


if __name__ == "__main__":
    trainer = pl.Trainer(
        max_steps=1000,
        logger=TensorBoardLogger("lightning_pinn_runs", name="example"),
        callbacks=[GradientNormMonitor(every_n_steps=20)],  # (2) the monitor
        enable_checkpointing=False,
    )
    model = Poisson1D()
    trainer.fit(model)
    print("final weights:", model.criterion.weights)
