"""The benchmark problems are the papers' problems: exact solutions solve them, losses are the papers'."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from lightning_pinn.autodiff import laplacian
from lightning_pinn.problems import HarmonicOscillator, Helmholtz2D, Wave1D


def test_helmholtz_source_matches_the_exact_solution() -> None:
    model = Helmholtz2D()
    xy = (2 * torch.rand(64, 2) - 1).requires_grad_(True)
    u = model.exact(xy)
    residual = laplacian(u, xy) + model.k**2 * u - model.source(xy)
    assert residual.abs().max().item() < 1e-3 * model.source(xy).abs().max().item()


def test_helmholtz_boundary_loss_is_the_papers_sum_over_four_edges() -> None:
    torch.manual_seed(0)
    summed = Helmholtz2D(edge_points=16)
    averaged = Helmholtz2D(edge_points=16, edge_loss="mean")
    averaged.load_state_dict(summed.state_dict())
    torch.manual_seed(1)
    bc_sum = summed.residuals(None)["bc"]
    torch.manual_seed(1)
    bc_mean = averaged.residuals(None)["bc"]
    edges = bc_mean.reshape(4, 16)  # the four edges, 16 points each
    assert bc_sum.square().mean().item() == pytest.approx(edges.square().mean(dim=1).sum().item(), rel=1e-5)
    assert bc_mean.square().mean().item() == pytest.approx(edges.square().mean().item(), rel=1e-5)


def test_helmholtz_standardises_inputs_but_differentiates_in_original_coordinates() -> None:
    torch.manual_seed(0)
    model = Helmholtz2D()
    xy = torch.tensor([[0.5, -0.25]])
    assert torch.allclose(model.u(xy), model.net(xy * math.sqrt(3.0)))
    plain = Helmholtz2D(standardize_inputs=False)
    plain.load_state_dict(model.state_dict())
    assert torch.allclose(plain.u(xy), model.net(xy))
    with pytest.raises(ValueError, match="edge_loss must be 'sum'"):
        Helmholtz2D(edge_loss="max")


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: Wave1D(residual_points=0), "residual_points must be an integer >= 1"),
        (lambda: Wave1D(initial_points=2.5), "initial_points must be an integer >= 1"),
        (lambda: Wave1D(hidden=()), "hidden must be a non-empty sequence"),
        (lambda: Wave1D(c=float("nan")), "c must be a finite number > 0"),
        (lambda: Helmholtz2D(edge_points=0), "edge_points must be an integer >= 1"),
        (lambda: Helmholtz2D(hidden=(-4,)), "hidden must be a non-empty sequence"),
        (lambda: Helmholtz2D(k=float("inf")), "k must be a finite number"),
        (lambda: Helmholtz2D(a1=0.5), "a1 must be a non-zero integer"),
        (lambda: Helmholtz2D(a2=0), "a2 must be a non-zero integer"),
        (lambda: HarmonicOscillator(collocation_points=0), "collocation_points must be an integer >= 1"),
        (lambda: HarmonicOscillator(omega=0.0), "omega must be a finite number > 0"),
        (lambda: HarmonicOscillator(omega=1e200), r"omega must be at most 1\.84e\+19 \(ω² multiplies u"),
    ],
)
def test_problems_refuse_bad_arguments_at_construction(factory: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize("c", [1.0, 2.0, 3.5])
def test_the_wave_problems_exact_solution_solves_its_own_equation(c: float) -> None:
    """u_tt = c² u_xx, u = 0 at x = 0 and 1, u_t(x, 0) = 0, for the problem's own c (not always c = 2)."""
    from lightning_pinn.autodiff import derivative

    problem = Wave1D(c=c, hidden=(8,))
    xt = torch.rand(64, 2, dtype=torch.float64, requires_grad=True)
    u = problem.exact(xt)
    residual = derivative(u, xt, dim=1, order=2) - c**2 * derivative(u, xt, dim=0, order=2)
    assert residual.abs().max().item() < 1e-9 * (1 + c**2) * 100
    t0 = torch.cat([xt[:, :1], torch.zeros_like(xt[:, :1])], 1)
    assert derivative(problem.exact(t0), t0, dim=1).abs().max().item() < 1e-9
    edges = torch.tensor([[0.0, 0.3], [1.0, 0.7]], dtype=torch.float64)
    assert problem.exact(edges).abs().max().item() < 1e-12


@pytest.mark.parametrize("problem", [HarmonicOscillator, Helmholtz2D, Wave1D])
def test_problems_evaluate_in_their_networks_dtype_after_a_float64_fit(problem: Any) -> None:
    """After precision="64-true" the network is float64 but PyTorch's default dtype is float32
    again: relative_l2_error() failed with "mat1 and mat2 must have the same dtype"."""
    model = problem(hidden=(8,))
    model.double()
    assert math.isfinite(model.relative_l2_error())
    if problem is not HarmonicOscillator:
        assert all(r.dtype == torch.float64 for r in model.residuals(None).values())


def test_problem_switches_must_be_booleans() -> None:
    with pytest.raises(TypeError, match="hard_ic must be True or False, got 'no'"):
        HarmonicOscillator(hard_ic="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="standardize_inputs must be True or False"):
        Helmholtz2D(standardize_inputs=0)  # type: ignore[arg-type]
    import numpy as np

    assert HarmonicOscillator(hard_ic=np.True_, hidden=(4,)).hard_ic is True  # e.g. from a NumPy/pandas grid


class _Standardise(torch.nn.Module):
    def forward(self, xt: torch.Tensor) -> torch.Tensor:
        return (xt - 0.5) * math.sqrt(12.0)


def test_wave_standardised_inputs_are_a_change_of_the_networks_coordinates_only() -> None:
    """Standardised inputs (the paper's code) give the residuals of the raw-input problem whose
    network first applies the same affine map: derivatives stay in the original (x, t)."""
    standardised = Wave1D(hidden=(8,), residual_points=5, initial_points=4, boundary_points=3).double()
    raw = Wave1D(hidden=(8,), residual_points=5, initial_points=4, boundary_points=3, standardize_inputs=False).double()
    first = raw.net[0]
    raw.net = torch.nn.Sequential(standardised.net[0], *standardised.net[1:])
    raw.net.insert(0, _Standardise())
    raw.net[0].weight = first.weight  # residuals() reads the dtype from net[0]
    torch.manual_seed(3)
    expected = raw.residuals(None)
    torch.manual_seed(3)
    got = standardised.residuals(None)
    for name in ("u", "ut", "pde"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-12)
    assert standardised.standardize_inputs and not raw.standardize_inputs
    with pytest.raises(TypeError, match="standardize_inputs must be True or False"):
        Wave1D(hidden=(8,), standardize_inputs="yes")  # type: ignore[arg-type]
