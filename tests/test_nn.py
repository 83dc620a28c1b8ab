"""Network building blocks: the modified MLP of Wang, Teng & Perdikaris 2021 computes the paper's gates."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch

from lightning_pinn import MultiTermLoss
from lightning_pinn.callbacks import GradientNormMonitor
from lightning_pinn.nn import ModifiedMLP, mlp
from lightning_pinn.problems import Helmholtz2D


def test_modified_mlp_gates_every_layer_with_the_two_encoders() -> None:
    torch.manual_seed(0)
    net = ModifiedMLP(2, (6, 6, 6), 3)
    x = torch.randn(10, 2)
    u, v = torch.tanh(net.encoder_u(x)), torch.tanh(net.encoder_v(x))
    h = x
    for layer in net.hidden:
        z = torch.tanh(layer(h))
        h = z * u + (1 - z) * v  # H^k = Z^k ⊙ U + (1 − Z^k) ⊙ V
    assert torch.allclose(net(x), net.output(h), atol=1e-6)
    assert net(x).shape == (10, 3)
    # Xavier weights, zero biases, as the papers initialise
    assert all(float(layer.bias.detach().abs().max()) == 0.0 for layer in [net.encoder_u, net.encoder_v, *net.hidden, net.output])


def test_modified_mlp_rejects_uneven_widths_and_unknown_inits() -> None:
    with pytest.raises(ValueError, match=r"hidden must be one width repeated .*got \(50, 20\)"):
        ModifiedMLP(2, (50, 20), 1)
    with pytest.raises(ValueError, match="ModifiedMLP: hidden must be a non-empty sequence of layer widths"):
        ModifiedMLP(2, (), 1)
    with pytest.raises(ValueError, match="ModifiedMLP: hidden must be a non-empty sequence of layer widths"):
        ModifiedMLP(2, 50, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ModifiedMLP: init must be 'default' or 'xavier'"):
        ModifiedMLP(2, (8,), 1, init="he")
    with pytest.raises(ValueError, match="mlp: init must be 'default' or 'xavier'"):
        mlp(2, (8,), 1, init="he")


class _Fit(pl.LightningModule):
    """u'' = -u with a data term, on a ModifiedMLP."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ModifiedMLP(1, (8, 8), 1)
        self.criterion = MultiTermLoss(pde=1.0, data=1.0)

    def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
        t = torch.linspace(0, 1, 16).reshape(-1, 1).requires_grad_(True)
        u = self.net(t)
        du = torch.autograd.grad(u.sum(), t, create_graph=True)[0]
        d2u = torch.autograd.grad(du.sum(), t, create_graph=True)[0]
        return self.criterion(pde=d2u + u, data=self.net(torch.zeros(1, 1)) - 1.0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> list[int]:
        return [0]


def test_monitor_measures_a_modified_mlp_exactly(tmp_path: object) -> None:
    torch.manual_seed(0)
    model = _Fit()
    initial = copy.deepcopy(model)
    monitor = GradientNormMonitor(every_n_steps=1, report=False, verbose=False)
    trainer = pl.Trainer(
        max_steps=1,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model)
    measurement = monitor.last_measurement
    assert measurement is not None and measurement.gradients is not None and measurement.step == 0
    # ∇θ L_i by hand at the parameters step 0 started from
    t = torch.linspace(0, 1, 16).reshape(-1, 1).requires_grad_(True)
    u = initial.net(t)
    du = torch.autograd.grad(u.sum(), t, create_graph=True)[0]
    d2u = torch.autograd.grad(du.sum(), t, create_graph=True)[0]
    losses = [(d2u + u).square().mean(), (initial.net(torch.zeros(1, 1)) - 1.0).square().mean()]
    params = list(initial.parameters())
    expected = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)]) for loss in losses])
    assert torch.allclose(measurement.gradients.to(expected.dtype), expected, rtol=1e-5, atol=1e-7)


def test_helmholtz_takes_the_papers_improved_architecture() -> None:
    torch.manual_seed(0)
    model = Helmholtz2D(network="modified", edge_points=8, residual_points=16)
    assert isinstance(model.net, ModifiedMLP)
    residuals = model.residuals(None)
    assert residuals["pde"].shape == (16, 1) and residuals["bc"].shape == (32, 1)
    assert 0.0 < model.relative_l2_error(grid=10) < 10.0
    with pytest.raises(ValueError, match="network must be 'mlp' .* or 'modified'"):
        Helmholtz2D(network="resnet")
    with pytest.raises(ValueError, match="hidden must be one width repeated"):
        Helmholtz2D(network="modified", hidden=(50, 40))
