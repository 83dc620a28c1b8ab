"""Hard constraints: wrap a network so an initial or boundary condition holds exactly.

A condition imposed exactly is a loss term that disappears: nothing to weight, nothing to
balance, no gradient conflict with the PDE term. This is often the most effective remedy for
the loss-balance crisis (Lagaris, Likas & Fotiadis 1998, IEEE Trans. Neural Netw. 9(5); Lu et
al. 2021, "Physics-informed neural networks with hard constraints for inverse design").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_pinn._checks import check_finite

__all__ = ["IVPAnsatz", "DirichletAnsatz1D"]


def _finite(owner: str, **values: float) -> tuple[float, ...]:
    """The values as floats; a NaN or infinite one is refused (the ansatz would output NaN everywhere)."""
    return tuple(check_finite(owner, name, value) for name, value in values.items())


def _free_network(owner: str, net: nn.Module, points: Tensor) -> Tensor:
    """``net(points)`` for ``(N, 1)`` points, checked to be ``(N, 1)``: a ``(N,)`` output would
    broadcast against the ``(N, 1)`` terms of the ansatz into an ``(N, N)`` matrix."""
    if points.dim() != 2 or points.shape[1] != 1:
        raise ValueError(f"{owner}: the points must have shape (N, 1), got {tuple(points.shape)}; use x.reshape(-1, 1).")
    out = net(points)
    if out.shape != points.shape:
        raise ValueError(
            f"{owner}: the free network returned shape {tuple(out.shape)} for points of shape {tuple(points.shape)}; it must "
            "return one value per point, shape (N, 1) (e.g. end it with nn.Linear(width, 1), or reshape its output)."
        )
    return out


class IVPAnsatz(nn.Module):
    """``u(t) = u₀ + v₀ (t − t₀) + (t − t₀)² N(t)``: ``u(t₀) = u₀`` and ``u'(t₀) = v₀`` exactly.

    Args:
        net: The free network ``N``, mapping ``(N, 1)`` times to ``(N, 1)`` outputs.
        u0: Initial value.
        v0: Initial velocity (first derivative).
        t0: Initial time.
    """

    def __init__(self, net: nn.Module, u0: float, v0: float = 0.0, t0: float = 0.0) -> None:
        super().__init__()
        self.net = net
        self.u0, self.v0, self.t0 = _finite("IVPAnsatz", u0=u0, v0=v0, t0=t0)

    def forward(self, t: Tensor) -> Tensor:
        shifted = t - self.t0
        return self.u0 + self.v0 * shifted + shifted.square() * _free_network("IVPAnsatz", self.net, t)


class DirichletAnsatz1D(nn.Module):
    """``u(x) = u_a (b − x)/(b − a) + u_b (x − a)/(b − a) + (x − a)(b − x) N(x)``: ``u(a) = u_a``, ``u(b) = u_b`` exactly.

    Args:
        net: The free network ``N``, mapping ``(N, 1)`` points to ``(N, 1)`` outputs.
        a: Left end of the interval.
        b: Right end of the interval.
        ua: Value at ``a``.
        ub: Value at ``b``.
    """

    def __init__(self, net: nn.Module, a: float, b: float, ua: float, ub: float) -> None:
        super().__init__()
        a, b, ua, ub = _finite("DirichletAnsatz1D", a=a, b=b, ua=ua, ub=ub)
        if not b > a:
            raise ValueError(f"DirichletAnsatz1D: need a < b, got a={a}, b={b}.")
        self.net = net
        self.a, self.b, self.ua, self.ub = a, b, ua, ub
        # per floating dtype, why the interval cannot be used in it (None: it can); read by forward
        self._unusable_in: dict[torch.dtype, str | None] = {dtype: _interval_problem(a, b, dtype) for dtype in _FLOAT_DTYPES}

    def forward(self, x: Tensor) -> Tensor:
        # (b - x) and (x - a) are in x's dtype, so the length must be too: in float32 the two
        # ratios are then exactly 1 and 0 at the ends, and u(a) = ua, u(b) = ub hold exactly
        problem = self.__dict__.get("_unusable_in", {}).get(x.dtype)  # a plain lookup: torch.compile traces it
        if problem is not None:
            raise ValueError(f"DirichletAnsatz1D: {problem}")
        length = x.new_tensor(self.b) - x.new_tensor(self.a)
        line = self.ua * ((self.b - x) / length) + self.ub * ((x - self.a) / length)  # ratios first: exactly 1 and 0 at the ends
        return line + (x - self.a) * (self.b - x) * _free_network("DirichletAnsatz1D", self.net, x)


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _interval_problem(a: float, b: float, dtype: torch.dtype) -> str | None:
    """Why ``[a, b]`` cannot carry the ansatz in ``dtype`` (ends that round together or overflow,
    a bump ``(x − a)(b − x)`` that overflows), or ``None``."""
    ends = torch.tensor([a, b], dtype=torch.float64).to(dtype)
    wider = [d for d in (torch.float32, torch.float64) if torch.finfo(d).bits > torch.finfo(dtype).bits]
    rescale = "shift and scale the coordinate to an interval near [0, 1]"
    fix = f"Use {wider[-1]} points (and model), or {rescale}." if wider else f"{rescale[0].upper()}{rescale[1:]}."
    if not bool(torch.isfinite(ends).all()):
        return f"the interval a={a}, b={b} does not fit in the points' dtype {dtype} (an end overflows). {fix}"
    if not bool(ends[1] > ends[0]):
        return f"the interval a={a}, b={b} has no length in the points' dtype {dtype} (both ends round to {ends[0].item()}). {fix}"
    bump = ((ends[1] - ends[0]) / 2).square()  # the largest (x − a)(b − x)
    if not bool(torch.isfinite(bump)):
        return f"the interval a={a}, b={b} is too long for the points' dtype {dtype}: (x − a)(b − x) overflows inside it. {fix}"
    return None
