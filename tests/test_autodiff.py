"""The derivative helpers: exact values, and clear errors where autograd would be silently wrong."""

from __future__ import annotations

import pytest
import torch

from lightning_pinn.autodiff import derivative, gradient, laplacian


def test_values_match_closed_forms() -> None:
    x = torch.rand(7, 2, requires_grad=True)
    u = (x[:, 0:1] ** 3) * torch.sin(x[:, 1:2])
    assert torch.allclose(derivative(u, x, dim=0), 3 * x[:, 0:1] ** 2 * torch.sin(x[:, 1:2]))
    assert torch.allclose(derivative(u, x, dim=-1, order=2), -u)
    assert torch.allclose(laplacian(u, x), 6 * x[:, 0:1] * torch.sin(x[:, 1:2]) - u)
    assert gradient(u, x).shape == x.shape


@pytest.mark.parametrize("function", [derivative, gradient, laplacian])
def test_a_multi_component_output_is_refused_not_summed(function) -> None:  # type: ignore[no-untyped-def]
    t = torch.rand(5, 1, requires_grad=True)
    u = torch.cat([t**2, 10 * t], dim=1)  # two components: autograd would return 2t + 10
    with pytest.raises(ValueError, match=r"not one value per point.*u\[:, 0:1\]"):
        function(u, t)


def test_a_coordinate_outside_the_inputs_is_refused() -> None:
    t = torch.rand(5, 1, requires_grad=True)
    with pytest.raises(ValueError, match=r"dim=1 is not a coordinate.*use 0 to 0"):
        derivative(t**2, t, dim=1)
    with pytest.raises(ValueError, match=r"shape \(N, d\).*reshape\(-1, 1\)"):
        s = torch.rand(5, requires_grad=True)
        derivative(s**2, s)
    with pytest.raises(ValueError, match="order must be an integer >= 1"):
        derivative(t**2, t, order=0)
