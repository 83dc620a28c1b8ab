"""Hard constraints hold exactly, and remove their term from the loss."""

from __future__ import annotations

import pytest
import torch

from lightning_pinn.autodiff import derivative
from lightning_pinn.constraints import DirichletAnsatz1D, IVPAnsatz
from lightning_pinn.nn import mlp
from lightning_pinn.problems import HarmonicOscillator


def test_ivp_ansatz_holds_value_and_slope() -> None:
    torch.manual_seed(0)
    u = IVPAnsatz(mlp(1, (8,), 1), u0=1.5, v0=-2.0, t0=0.25)
    t0 = torch.tensor([[0.25]], requires_grad=True)
    value = u(t0)
    assert value.item() == 1.5
    assert derivative(value, t0).item() == -2.0


def test_dirichlet_ansatz_holds_both_ends() -> None:
    torch.manual_seed(0)
    u = DirichletAnsatz1D(mlp(1, (8,), 1), a=-1.0, b=2.0, ua=3.0, ub=-4.0)
    ends = u(torch.tensor([[-1.0], [2.0]]))
    assert ends.flatten().tolist() == [3.0, -4.0]


def test_hard_ic_harmonic_has_only_the_pde_term() -> None:
    model = HarmonicOscillator(hard_ic=True)
    assert model.criterion.term_names == ("pde",)
    assert set(model.residuals(None)) == {"pde"}
    t0 = torch.zeros(1, 1, requires_grad=True)
    u0 = model.net(t0)
    assert u0.item() == 1.0 and derivative(u0, t0).item() == 0.0


def test_dirichlet_ends_hold_exactly_in_float32_for_any_interval() -> None:
    ansatz = DirichletAnsatz1D(mlp(1, (8,), 1), a=0.1, b=0.7, ua=0.3, ub=-2.0)
    ends = torch.tensor([[0.1], [0.7]], dtype=torch.float32)
    u = ansatz(ends).detach()
    assert u[0, 0].item() == torch.tensor(0.3).item() and u[1, 0].item() == -2.0


def test_an_interval_with_no_length_in_the_points_dtype_is_refused() -> None:
    """a < b in float64, but both ends round to one float32 value: a clear error, not u(a) = NaN (found by review)."""
    ansatz = DirichletAnsatz1D(mlp(1, (8,), 1), a=1e8, b=1e8 + 1, ua=0.5, ub=-0.5)
    with pytest.raises(ValueError, match=r"no length in the points' dtype torch.float32.*float64"):
        ansatz(torch.tensor([[1e8], [1e8 + 1]]))
    u = ansatz.double()(torch.tensor([[1e8], [1e8 + 1]], dtype=torch.float64)).detach()
    assert u.flatten().tolist() == [0.5, -0.5]
    # float16: an end that overflows, or a bump (x − a)(b − x) that does (found by review: NaN and −inf)
    for b, why in ((70000.0, "an end overflows"), (1000.0, "overflows inside it")):
        with pytest.raises(ValueError, match=why):
            DirichletAnsatz1D(mlp(1, (8,), 1), a=0.0, b=b, ua=0.0, ub=1.0).half()(torch.tensor([[0.0], [1.0]], dtype=torch.float16))
    # an ansatz pickled before the check existed still runs
    old = DirichletAnsatz1D(mlp(1, (8,), 1), a=0.0, b=1.0, ua=0.0, ub=1.0)
    del old.__dict__["_unusable_in"]
    assert old(torch.tensor([[0.0], [1.0]])).detach().flatten().tolist() == [0.0, 1.0]


def test_dirichlet_ansatz_is_exact_at_both_ends_for_any_values() -> None:
    # ua·(b−x)/L rounded twice (ua=0.1 at a=0, b=3 gave 0.10000000000000002): the ratios come first
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        for _ in range(200):
            a, length, ua, ub = (torch.rand(4, generator=generator, dtype=torch.float64) * 4 - 1).tolist()
            b = a + abs(length) + 0.1
            ansatz = DirichletAnsatz1D(mlp(1, (4,), 1).to(dtype), a=a, b=b, ua=ua, ub=ub)
            ends = ansatz(torch.tensor([[a], [b]], dtype=dtype)).flatten()
            assert ends.tolist() == torch.tensor([ua, ub], dtype=dtype).tolist()
    ansatz = DirichletAnsatz1D(mlp(1, (4,), 1).double(), a=0.0, b=3.0, ua=0.1, ub=0.7)
    assert ansatz(torch.tensor([[0.0], [3.0]], dtype=torch.float64)).flatten().tolist() == [0.1, 0.7]


def test_numpy_and_integer_values_are_taken_like_floats() -> None:
    """u0=np.float32(1.0) (e.g. read from a NumPy array) was refused as 'not a finite number'."""
    import numpy as np

    points = torch.tensor([[0.0]], dtype=torch.float64)
    ivp = IVPAnsatz(mlp(1, (4,), 1).double(), u0=np.float32(1.5), v0=np.int64(2))
    assert ivp(points).item() == 1.5
    ansatz = DirichletAnsatz1D(mlp(1, (4,), 1).double(), a=np.float64(0.0), b=2, ua=np.float32(0.25), ub=1)
    assert ansatz(torch.tensor([[0.0], [2.0]], dtype=torch.float64)).flatten().tolist() == [0.25, 1.0]


def test_misuse_of_the_ansatzes_gets_a_clear_error() -> None:
    import pytest

    with pytest.raises(ValueError, match=r"IVPAnsatz: u0 must be a finite number, got nan"):
        IVPAnsatz(mlp(1, (4,), 1), u0=float("nan"))
    with pytest.raises(ValueError, match=r"DirichletAnsatz1D: b must be a finite number, got inf"):
        DirichletAnsatz1D(mlp(1, (4,), 1), a=0.0, b=float("inf"), ua=0.0, ub=1.0)
    flat = IVPAnsatz(torch.nn.Sequential(mlp(1, (4,), 1), torch.nn.Flatten(0)), u0=1.0)  # returns (N,)
    with pytest.raises(ValueError, match=r"free network returned shape \(5,\).*shape \(N, 1\)"):
        flat(torch.rand(5, 1))
    with pytest.raises(ValueError, match=r"points must have shape \(N, 1\), got \(5, 2\)"):
        DirichletAnsatz1D(mlp(2, (4,), 1), a=0.0, b=1.0, ua=0.0, ub=1.0)(torch.rand(5, 2))


def test_the_dirichlet_ansatz_compiles_as_one_graph() -> None:
    """Its dtype check is a lookup made at construction: no data-dependent branch in forward (a
    review found that an in-forward check broke torch.compile(fullgraph=True))."""
    ansatz = DirichletAnsatz1D(mlp(1, (8,), 1), a=0.0, b=2.0, ua=1.0, ub=-1.0)
    x = torch.linspace(0, 2, 5).reshape(-1, 1)
    compiled = torch.compile(ansatz, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), ansatz(x))
