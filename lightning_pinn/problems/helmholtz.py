"""2D Helmholtz equation, the benchmark of Wang, Teng & Perdikaris 2021 (SIAM J. Sci. Comput. 43(5)).

    Δu + k² u = q  on [−1, 1]²,   u = 0 on the boundary,
    exact u = sin(a₁πx) sin(a₂πy),  q = (k² − (a₁² + a₂²)π²) u.

With a₁ = 1, a₂ = 4 the residual term's gradients dwarf the boundary term's, and a plain PINN
stalls around 10⁻¹ relative L² error.

As in the paper's released code, the boundary loss is the *sum* of the four edges' mean squares,
and the network sees standardised inputs ``(x − μ)/σ`` (μ = 0, σ = 1/√3, the moments of the
uniform residual sampler on [−1, 1]); derivatives are taken with respect to the original
coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_pinn._checks import check_finite, check_flag, check_hidden, check_points, like
from lightning_pinn.autodiff import laplacian
from lightning_pinn.module import PINNModule
from lightning_pinn.nn import ModifiedMLP, mlp

__all__ = ["Helmholtz2D"]


class Helmholtz2D(PINNModule):
    """PINN for the 2D Helmholtz problem; terms ``pde`` and ``bc``.

    Every step draws fresh uniform points: ``residual_points`` in the square and
    ``edge_points`` on each of the four edges. The ``bc`` residual is ``2·u`` on all
    4·edge_points boundary points, so its loss (mean of squares) equals the paper's sum of the
    four edges' mean squares (``edge_loss="sum"``); ``edge_loss="mean"`` uses ``u`` (their mean).

    Args:
        k: Wave number.
        a1: Frequency in x.
        a2: Frequency in y.
        hidden: Hidden widths (the paper: 50, 50, 50).
        residual_points: Interior points per step (paper: 128).
        edge_points: Points per edge per step (paper: 128).
        bc_weight: Initial λ_bc.
        edge_loss: ``"sum"`` (the paper) or ``"mean"`` of the four edge losses.
        standardize_inputs: Feed the network ``x/σ`` with σ = 1/√3 (the paper's code).
        network: ``"mlp"`` (a plain tanh MLP, Xavier init: the paper's M1/M2) or ``"modified"``
            (:class:`~lightning_pinn.nn.ModifiedMLP`, the paper's improved architecture: M3/M4).
        learning_rate: Adam's learning rate (paper: 1e-3, decayed by 0.9 every 1000 steps).
        **kwargs: Passed to :class:`~lightning_pinn.PINNModule` (e.g. ``lr_decay=0.9``).
    """

    def __init__(
        self,
        k: float = 1.0,
        a1: float = 1.0,
        a2: float = 4.0,
        hidden: Sequence[int] = (50, 50, 50),
        residual_points: int = 128,
        edge_points: int = 128,
        bc_weight: float = 1.0,
        learning_rate: float = 1e-3,
        edge_loss: str = "sum",
        standardize_inputs: bool = True,
        network: str = "mlp",
        **kwargs: Any,
    ) -> None:
        if edge_loss not in ("sum", "mean"):
            raise ValueError(f"Helmholtz2D: edge_loss must be 'sum' (the paper) or 'mean', got {edge_loss!r}.")
        if network not in ("mlp", "modified"):
            raise ValueError(f"Helmholtz2D: network must be 'mlp' (the paper's M1/M2) or 'modified' (M3/M4), got {network!r}.")
        owner = type(self).__name__
        k, a1, a2 = (check_finite(owner, name, value) for name, value in (("k", k), ("a1", a1), ("a2", a2)))
        for name, value in (("a1", a1), ("a2", a2)):
            if value == 0 or abs(value) > 1000 or not float(value).is_integer():
                raise ValueError(
                    f"{owner}: {name} must be a non-zero integer of at most 1000 in size (e.g. 1 or 4), got {value!r}: the "
                    f"exact solution sin(a1·πx)·sin(a2·πy) vanishes on the edges of [-1, 1]² (the problem's u = 0) only then."
                )
        hidden = check_hidden(owner, hidden)
        residual_points = check_points(owner, "residual_points", residual_points)
        edge_points = check_points(owner, "edge_points", edge_points)
        super().__init__(weights={"pde": 1.0, "bc": bc_weight}, learning_rate=learning_rate, **kwargs)
        self.edge_loss, self.standardize_inputs = edge_loss, check_flag(owner, "standardize_inputs", standardize_inputs)
        self.k, self.a1, self.a2 = k, a1, a2
        self.residual_points, self.edge_points = residual_points, edge_points
        self.network = network
        self.net = mlp(2, hidden, 1, init="xavier") if network == "mlp" else ModifiedMLP(2, hidden, 1, init="xavier")

    def u(self, xy: Tensor) -> Tensor:
        """The network's solution at ``xy`` (shape ``(N, 2)``), with the input standardisation."""
        return self.net(xy * math.sqrt(3.0) if self.standardize_inputs else xy)

    def exact(self, xy: Tensor) -> Tensor:
        """The exact solution ``sin(a₁πx) sin(a₂πy)``, shape ``(N, 1)``."""
        return torch.sin(self.a1 * math.pi * xy[:, :1]) * torch.sin(self.a2 * math.pi * xy[:, 1:2])

    def source(self, xy: Tensor) -> Tensor:
        """The forcing ``q = (k² − (a₁² + a₂²)π²) u``."""
        return (self.k**2 - (self.a1**2 + self.a2**2) * math.pi**2) * self.exact(xy)

    def _boundary(self) -> Tensor:
        factory = like(next(self.net.parameters()))  # the network's device and dtype (float64 after precision='64-true')
        n = self.edge_points
        s = 2 * torch.rand(n, 1, **factory) - 1
        one = torch.ones(n, 1, **factory)
        return torch.cat([torch.cat([s, -one], 1), torch.cat([s, one], 1), torch.cat([-one, s], 1), torch.cat([one, s], 1)])

    def residuals(self, batch: Any) -> dict[str, Tensor]:
        factory = like(next(self.net.parameters()))  # the network's device and dtype (float64 after precision='64-true')
        xy = (2 * torch.rand(self.residual_points, 2, **factory) - 1).requires_grad_(True)
        u = self.u(xy)
        r_pde = laplacian(u, xy) + self.k**2 * u - self.source(xy)
        edge_scale = 2.0 if self.edge_loss == "sum" else 1.0  # mean((2u)²) over 4 equal edges = Σ_edges mean(u²)
        return {"pde": r_pde, "bc": edge_scale * self.u(self._boundary())}

    @torch.no_grad()
    def relative_l2_error(self, grid: int = 100) -> float:
        """Relative L² error on a ``grid × grid`` uniform grid of [−1, 1]²."""
        factory = like(next(self.net.parameters()))  # the network's device and dtype (float64 after precision='64-true')
        axis = torch.linspace(-1, 1, grid, **factory)
        xy = torch.cartesian_prod(axis, axis)
        exact = self.exact(xy)
        return ((self.u(xy) - exact).norm() / exact.norm()).item()
