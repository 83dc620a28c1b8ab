"""1D wave equation, the benchmark of Wang, Yu & Perdikaris 2022 (J. Comput. Phys. 449, 110768).

    u_tt = c² u_xx  on (x, t) ∈ [0, 1]²,  c = 2,
    u(0, t) = u(1, t) = 0,  u(x, 0) = sin(πx) + 0.5 sin(4πx),  u_t(x, 0) = 0,
    exact u = sin(πx) cos(2πt) + 0.5 sin(4πx) cos(8πt).

The residual term's NTK eigenvalues are far larger than the boundary terms', so a plain PINN
fits the PDE and misses the data (relative L² ≈ 0.45 in the paper).

As in the paper's released code, the network sees standardised inputs ``(x − μ)/σ`` (μ = ½,
σ = 1/√12, the moments of the uniform residual sampler on [0, 1]); derivatives are taken with
respect to the original coordinates. With the paper's 3×500 network this matters: NTK-balanced
fits reach 1e-2 within 20,000–36,000 steps (three seeds) where the same fit on raw inputs stalled
at 0.50 (``benchmarks/results/wave_width500.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_pinn._checks import check_finite, check_flag, check_hidden, check_points, like
from lightning_pinn.autodiff import derivative, gradient
from lightning_pinn.module import PINNModule
from lightning_pinn.nn import mlp

__all__ = ["Wave1D"]


class Wave1D(PINNModule):
    """PINN for the 1D wave equation; terms ``u`` (initial and boundary values), ``ut`` (initial velocity), ``pde``.

    As in the paper, every step draws fresh uniform points: ``residual_points`` in the domain,
    ``initial_points`` at t = 0 and ``boundary_points`` on each of x = 0 and x = 1.

    Args:
        c: Wave speed.
        hidden: Hidden widths (the paper: 500, 500, 500).
        residual_points: Interior points per step (paper: 300).
        initial_points: Points on t = 0 per step (paper: 100).
        boundary_points: Points per boundary per step (paper: 100).
        learning_rate: Adam's learning rate (paper: 1e-3 decayed by 0.9 every 1000 steps).
        standardize_inputs: Feed the network ``(xt − ½)·√12`` (the paper's code); ``False`` feeds
            the raw coordinates in [0, 1]².
        **kwargs: Passed to :class:`~lightning_pinn.PINNModule`.
    """

    def __init__(
        self,
        c: float = 2.0,
        hidden: Sequence[int] = (500, 500, 500),
        residual_points: int = 300,
        initial_points: int = 100,
        boundary_points: int = 100,
        learning_rate: float = 1e-3,
        standardize_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        owner = type(self).__name__
        c = check_finite(owner, "c", c, positive=True)
        hidden = check_hidden(owner, hidden)
        points = [
            check_points(owner, name, value)
            for name, value in (
                ("residual_points", residual_points),
                ("initial_points", initial_points),
                ("boundary_points", boundary_points),
            )
        ]
        super().__init__(weights={"u": 1.0, "ut": 1.0, "pde": 1.0}, learning_rate=learning_rate, **kwargs)
        self.c = c
        self.standardize_inputs = check_flag(owner, "standardize_inputs", standardize_inputs)
        self.residual_points, self.initial_points, self.boundary_points = points
        self.net = mlp(2, hidden, 1, init="xavier")

    def u(self, xt: Tensor) -> Tensor:
        """The network's solution at ``xt`` (shape ``(N, 2)``, columns (x, t)), with the input standardisation."""
        return self.net((xt - 0.5) * math.sqrt(12.0) if self.standardize_inputs else xt)

    def exact(self, xt: Tensor) -> Tensor:
        """The exact solution ``sin(πx)cos(cπt) + ½ sin(4πx)cos(4cπt)``, shape ``(N, 1)``; columns of ``xt`` are (x, t)."""
        x, t = xt[:, :1], xt[:, 1:2]
        c = self.c
        return torch.sin(math.pi * x) * torch.cos(c * math.pi * t) + 0.5 * torch.sin(4 * math.pi * x) * torch.cos(4 * c * math.pi * t)

    def residuals(self, batch: Any) -> dict[str, Tensor]:
        factory = like(self.net[0].weight)  # the network's device and dtype (float64 after precision='64-true')
        # initial values u(x, 0) and boundary values u(0, t), u(1, t)
        x0 = torch.rand(self.initial_points, 1, **factory)
        initial = torch.cat([x0, torch.zeros_like(x0)], 1)
        tb = torch.rand(self.boundary_points, 1, **factory)
        boundary = torch.cat([torch.cat([torch.zeros_like(tb), tb], 1), torch.cat([torch.ones_like(tb), tb], 1)])
        values = torch.cat([initial, boundary])
        r_u = self.u(values) - self.exact(values)
        # initial velocity u_t(x, 0) = 0
        x0t = torch.cat([torch.rand(self.initial_points, 1, **factory), torch.zeros(self.initial_points, 1, **factory)], 1).requires_grad_(
            True
        )
        r_ut = gradient(self.u(x0t), x0t)[:, 1:2]
        # PDE residual u_tt − c² u_xx
        xt = torch.rand(self.residual_points, 2, **factory).requires_grad_(True)
        u = self.u(xt)
        r_pde = derivative(u, xt, dim=1, order=2) - self.c**2 * derivative(u, xt, dim=0, order=2)
        return {"u": r_u, "ut": r_ut, "pde": r_pde}

    @torch.no_grad()
    def relative_l2_error(self, grid: int = 100) -> float:
        """Relative L² error on a ``grid × grid`` uniform grid of [0, 1]²."""
        factory = like(self.net[0].weight)  # the network's device and dtype (float64 after precision='64-true')
        axis = torch.linspace(0, 1, grid, **factory)
        xt = torch.cartesian_prod(axis, axis)
        exact = self.exact(xt)
        return ((self.u(xt) - exact).norm() / exact.norm()).item()
