"""The derivative helpers: exact values, and clear errors where autograd would be silently wrong."""

from __future__ import annotations

from typing import Any

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


def test_higher_derivatives_of_something_linear_are_zero_not_an_error() -> None:
    # the first derivative of a linear function no longer depends on x: autograd refused to
    # differentiate it again, where torch.func.hessian gives zeros
    x = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)
    linear = torch.nn.Linear(2, 1).double()
    assert torch.equal(derivative(linear(x), x, dim=0, order=2), torch.zeros(6, 1, dtype=torch.float64))
    assert torch.equal(derivative(3 * x[:, 0:1], x, dim=0, order=3), torch.zeros(6, 1, dtype=torch.float64))
    assert torch.equal(laplacian(x[:, 0:1] + x[:, 1:2], x), torch.zeros(6, 1, dtype=torch.float64))
    assert torch.allclose(derivative(linear(x), x, dim=1), linear.weight[0, 1].expand(6, 1))


def test_inputs_outputs_and_grad_mode_that_cannot_be_differentiated_get_a_clear_error() -> None:
    x = torch.rand(5, 1)
    with pytest.raises(ValueError, match=r"derivative: the inputs do not require grad.*requires_grad_\(True\)"):
        derivative(x**2, x)
    x.requires_grad_(True)
    with pytest.raises(ValueError, match=r"laplacian: the output does not depend on the inputs"):
        laplacian(x.detach() ** 2, x)
    # a graph that does not contain the points (other points went through the network): PyTorch
    # said "Set allow_unused=True", an argument derivative() does not have
    net, x_raw = torch.nn.Linear(1, 1), torch.rand(5, 1)
    x_marked = x_raw.clone().requires_grad_(True)
    for function in (derivative, gradient, laplacian):
        with pytest.raises(ValueError, match=rf"{function.__name__}: the output does not depend on these inputs.*u = net\(x_raw\)"):
            function(net(x_raw), x_marked)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"gradient computation is off.*enable_grad.*inference_mode=False"):
        gradient(x**2, x)


def test_inference_mode_is_named_even_inside_enable_grad() -> None:
    """trainer.validate() runs in inference mode; `torch.enable_grad()` inside it records no graph."""
    net = torch.nn.Linear(1, 1)
    with torch.inference_mode(), torch.enable_grad():
        x = torch.rand(5, 1).requires_grad_(True)
        with pytest.raises(RuntimeError, match=r"derivative: inference mode is on.*inference_mode=False.*enable_grad"):
            derivative(net(x), x)


def test_validation_during_fit_differentiates_inside_enable_grad() -> None:
    """Lightning's validation loop inside fit runs under no_grad (not inference mode), so enable_grad suffices there."""
    import pytorch_lightning as pl

    seen: list[float] = []

    class Validated(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(1, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch).pow(2).mean()

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            with torch.enable_grad():
                x = batch.clone().requires_grad_(True)
                seen.append(derivative(self.net(x), x).mean().item())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    data = torch.utils.data.DataLoader(torch.rand(4, 1), batch_size=2)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    model = Validated()
    trainer.fit(model, data, data)
    assert seen and seen[-1] == pytest.approx(model.net.weight.item())
    with pytest.raises(RuntimeError, match=r"inference mode is on"):
        trainer.validate(model, data, verbose=False)


def test_a_complex_output_keeps_its_imaginary_part() -> None:
    """Autograd differentiates a complex output by real points as if it were its real part:
    the helpers differentiate both parts (found by review: the imaginary part was dropped)."""
    k = 3.0
    t = torch.linspace(0, 1, 5, dtype=torch.float64).reshape(-1, 1).requires_grad_(True)
    h = torch.exp(1j * k * t)
    exact = torch.exp(1j * k * t).detach()
    torch.testing.assert_close(derivative(h, t), 1j * k * exact)
    torch.testing.assert_close(derivative(h, t, order=2), -(k**2) * exact)
    torch.testing.assert_close(derivative(h, t, order=3), -1j * k**3 * exact)
    xy = torch.rand(4, 2, dtype=torch.float64, requires_grad=True)
    wave = torch.exp(1j * (2 * xy[:, :1] + xy[:, 1:]))
    torch.testing.assert_close(gradient(wave, xy), torch.cat([2j * wave, 1j * wave], dim=1).detach())
    torch.testing.assert_close(laplacian(wave, xy), -5 * wave.detach())
    # a network with complex parameters, against autograd on the two parts
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8, dtype=torch.complex128), torch.nn.Tanh(), torch.nn.Linear(8, 1, dtype=torch.complex128))
    u = net(t.to(torch.complex128))
    (real,) = torch.autograd.grad(u.real.sum(), t, retain_graph=True)
    (imag,) = torch.autograd.grad(u.imag.sum(), t, retain_graph=True)
    torch.testing.assert_close(derivative(u, t), torch.complex(real, imag))


def test_complex_points_are_refused() -> None:
    z = torch.rand(3, 1, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match=r"inputs are complex .*real coordinates"):
        derivative(z * z, z)
