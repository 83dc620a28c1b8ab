"""The harmonic oscillator initial-value problem, the motivating example of loss imbalance.

    u''(t) + ω² u(t) = 0  on t ∈ [0, 1],   u(0) = 1,   u'(0) = 0,   exact u = cos(ω t).

With ω = 2π and a 1-32-32-32-1 tanh network, the PDE term's gradient is about 10² times the
initial-condition term's at initialisation, so λ_IC = 1 converges to u ≈ 0 (relative L² ≈ 1),
λ_IC ≈ 10² recovers cos(ωt), and λ_IC = 10⁵ fails again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_pinn._checks import check_finite, check_flag, check_hidden, check_points
from lightning_pinn.autodiff import derivative
from lightning_pinn.constraints import IVPAnsatz
from lightning_pinn.module import PINNModule
from lightning_pinn.nn import mlp

__all__ = ["HarmonicOscillator"]

#: The largest ω² a float32 residual holds (u'' + ω² u would be inf beyond it).
MAX_OMEGA_SQUARED = float(torch.finfo(torch.float32).max)


class HarmonicOscillator(PINNModule):
    """PINN for ``u'' + ω²u = 0``, ``u(0) = 1``, ``u'(0) = 0`` on ``[0, 1]``; terms ``pde`` and ``ic``.

    Args:
        omega: Angular frequency ω.
        ic_weight: Initial weight λ_IC of the initial-condition term.
        pde_weight: Initial weight λ_PDE of the residual term.
        hidden: Hidden layer widths of the tanh network.
        collocation_points: Uniformly spaced residual points on ``[0, 1]`` (fixed, full batch).
        learning_rate: Adam's learning rate.
        hard_ic: Impose the initial conditions exactly, ``u = 1 + t²·N(t)``
            (:class:`~lightning_pinn.constraints.IVPAnsatz`): the ``ic`` term disappears.
        **kwargs: Passed to :class:`~lightning_pinn.PINNModule` (e.g. ``lr_decay``).

    The IC term's residual is the vector ``[u(0) − 1, u'(0)]``.
    """

    def __init__(
        self,
        omega: float = 2 * math.pi,
        ic_weight: float = 1.0,
        pde_weight: float = 1.0,
        hidden: Sequence[int] = (32, 32, 32),
        collocation_points: int = 128,
        learning_rate: float = 1e-3,
        hard_ic: bool = False,
        **kwargs: Any,
    ) -> None:
        owner = type(self).__name__
        omega = check_finite(owner, "omega", omega, positive=True)
        if not omega * omega <= MAX_OMEGA_SQUARED:
            raise ValueError(
                f"{owner}: omega must be at most {math.sqrt(MAX_OMEGA_SQUARED):.3g} (ω² multiplies u in the residual and must fit in float32), got {omega!r}."
            )
        hidden = check_hidden(owner, hidden)
        collocation_points = check_points(owner, "collocation_points", collocation_points)
        weights = {"pde": pde_weight} if hard_ic else {"pde": pde_weight, "ic": ic_weight}
        super().__init__(weights=weights, learning_rate=learning_rate, **kwargs)
        self.omega = omega
        self.hard_ic = check_flag(type(self).__name__, "hard_ic", hard_ic)
        free = mlp(1, hidden, 1)
        self.net: nn.Module = IVPAnsatz(free, u0=1.0, v0=0.0) if hard_ic else free
        self.register_buffer("t_collocation", torch.linspace(0.0, 1.0, collocation_points).reshape(-1, 1))
        self.register_buffer("t_initial", torch.zeros(1, 1))

    def residuals(self, batch: Any) -> dict[str, Tensor]:
        t = self.t_collocation.clone().requires_grad_(True)
        u = self.net(t)
        r_pde = derivative(u, t, order=2) + self.omega**2 * u
        if self.hard_ic:
            return {"pde": r_pde}
        t0 = self.t_initial.clone().requires_grad_(True)
        u0 = self.net(t0)
        r_ic = torch.cat([u0 - 1.0, derivative(u0, t0)]).reshape(-1)
        return {"pde": r_pde, "ic": r_ic}

    def exact(self, t: Tensor) -> Tensor:
        """The exact solution ``cos(ω t)``."""
        return torch.cos(self.omega * t)

    @torch.no_grad()
    def relative_l2_error(self, points: int = 1000) -> float:
        """``‖u_θ − u‖₂ / ‖u‖₂`` on ``points`` uniformly spaced points of ``[0, 1]``."""
        t = torch.linspace(0.0, 1.0, points, device=self.t_collocation.device, dtype=self.t_collocation.dtype).reshape(-1, 1)
        exact = self.exact(t)
        return ((self.net(t) - exact).norm() / exact.norm()).item()
