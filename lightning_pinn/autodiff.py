"""Derivatives of network outputs with respect to inputs, for writing PDE residuals."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["derivative", "gradient", "laplacian"]


def _check_one_value_per_point(function: str, output: Tensor, inputs: Tensor) -> None:
    """Refuse an output with several components per point: its gradient would silently be that of their sum."""
    points = inputs.numel() // inputs.shape[-1] if inputs.dim() >= 2 and inputs.shape[-1] > 0 else inputs.numel()
    if output.numel() != points:
        raise ValueError(
            f"{function}: output has shape {tuple(output.shape)} for inputs of shape {tuple(inputs.shape)}, i.e. not one value "
            f"per point ({points} points). Differentiate one component at a time, e.g. {function}(u[:, 0:1], x) and "
            f"{function}(u[:, 1:2], x) for a 2-component output: with several components autograd would return the "
            "derivative of their sum."
        )


def _check_coordinate(function: str, inputs: Tensor, dim: int) -> int:
    if inputs.dim() < 2:
        raise ValueError(
            f"{function}: inputs must have one row per point and one column per coordinate, shape (N, d); got shape "
            f"{tuple(inputs.shape)}. Use x.reshape(-1, 1) for a single coordinate."
        )
    coordinates = inputs.shape[-1]
    if isinstance(dim, bool) or not isinstance(dim, int) or not -coordinates <= dim < coordinates:
        raise ValueError(
            f"{function}: dim={dim!r} is not a coordinate of inputs of shape {tuple(inputs.shape)}; "
            f"use 0 to {coordinates - 1} (the column of the variable to differentiate by)."
        )
    return dim % coordinates


def gradient(output: Tensor, inputs: Tensor) -> Tensor:
    """``∂output/∂inputs`` point by point, keeping the graph (so it can be differentiated again).

    ``output`` has one value per point (shape ``(N,)`` or ``(N, 1)``; a multi-component output
    is refused, since autograd would give the gradient of the components' sum) and ``inputs``
    shape ``(N, d)`` with ``requires_grad=True``; the result has the shape of ``inputs``. A
    complex output is differentiated part by part, ``∂(Re u)/∂x + i·∂(Im u)/∂x`` (autograd alone
    would keep only the real part); the inputs must be real.
    """
    _check_one_value_per_point("gradient", output, inputs)
    return _gradient(output, inputs, "gradient")


def _gradient(output: Tensor, inputs: Tensor, function: str = "gradient", again: bool = False) -> Tensor:
    """:func:`gradient` without the shape check, for outputs already known to hold one value per point.

    ``again``: ``output`` is itself a derivative. One that no longer depends on ``inputs`` (the
    first derivative of something linear in them) has a zero gradient, as ``torch.func.hessian``
    gives it; the first differentiation of the user's output must find ``inputs`` in its graph.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{function}: inference mode is on (Lightning's trainer.validate/test/predict run in it unless the Trainer "
            "has inference_mode=False), and no autograd graph is recorded there even inside `torch.enable_grad()`, "
            "so no derivative can be taken. Create the Trainer with inference_mode=False and wrap the residual in "
            "`with torch.enable_grad():`."
        )
    if not torch.is_grad_enabled():
        raise RuntimeError(
            f"{function}: gradient computation is off here (torch.no_grad, e.g. Lightning's validation loop during "
            "fit), so no derivative can be taken. Wrap the residual in `with torch.enable_grad():` (and, for "
            "trainer.validate/test/predict, create the Trainer with inference_mode=False)."
        )
    if not inputs.requires_grad:
        raise ValueError(
            f"{function}: the inputs do not require grad, so nothing can be differentiated by them. Create the points "
            "with x = x.detach().requires_grad_(True) before passing them through the network."
        )
    zero_dtype = output.dtype if output.is_complex() else inputs.dtype
    if again and not output.requires_grad:  # a constant of the inputs: its derivative is zero
        return torch.zeros_like(inputs, dtype=zero_dtype)
    if not output.requires_grad:
        raise ValueError(
            f"{function}: the output does not depend on the inputs (it has no graph: computed from detached "
            "tensors?). Pass the points that went through the network, with requires_grad=True."
        )
    if inputs.is_complex():
        raise ValueError(
            f"{function}: the inputs are complex ({inputs.dtype}); derivatives are taken by real coordinates. Pass real "
            "points (e.g. x and y as two real columns for z = x + iy) and build complex values inside the network."
        )
    if output.is_complex():
        # autograd differentiates a complex output by a real input as if it were its real part:
        # take the real and imaginary parts separately (each with its own graph, for higher orders)
        real, imag = (_part_gradient(part, inputs) for part in (output.real, output.imag))
        if real is None and imag is None:
            grad = None
        else:
            grad = torch.complex(torch.zeros_like(inputs) if real is None else real, torch.zeros_like(inputs) if imag is None else imag)
    else:
        grad = _part_gradient(output, inputs)
    if grad is None and not again:
        raise ValueError(
            f"{function}: the output does not depend on these inputs (its graph does not contain them: were other "
            "points passed through the network, e.g. u = net(x_raw) after x = x_raw.clone().requires_grad_(True)?). "
            "Pass the points that went through the network, with requires_grad=True."
        )
    return torch.zeros_like(inputs, dtype=zero_dtype) if grad is None else grad


def _part_gradient(output: Tensor, inputs: Tensor) -> Tensor | None:
    """``∂output/∂inputs`` point by point (the gradient of the sum over points: each point's output
    depends on its own point only), with its graph; ``None`` if ``output`` has no graph or misses ``inputs``."""
    if not output.requires_grad:
        return None
    (grad,) = torch.autograd.grad(output, inputs, grad_outputs=torch.ones_like(output), create_graph=True, allow_unused=True)
    return grad


def derivative(output: Tensor, inputs: Tensor, dim: int = 0, order: int = 1) -> Tensor:
    """``∂^order output / ∂inputs[:, dim]^order``, shape ``(N, 1)``; ``output`` has one value per point."""
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"derivative: order must be an integer >= 1, got {order!r}.")
    _check_one_value_per_point("derivative", output, inputs)
    dim = _check_coordinate("derivative", inputs, dim)
    result = output
    for index in range(order):  # checked once above: each derivative again holds one value per point
        result = _gradient(result, inputs, "derivative", again=index > 0)[..., dim : dim + 1]
    return result


def laplacian(output: Tensor, inputs: Tensor) -> Tensor:
    """``Σ_k ∂²output/∂inputs[:, k]²``, shape ``(N, 1)``; ``output`` has one value per point."""
    _check_coordinate("laplacian", inputs, 0)
    _check_one_value_per_point("laplacian", output, inputs)
    first = _gradient(output, inputs, "laplacian")
    return sum(_gradient(first[..., k : k + 1], inputs, "laplacian", again=True)[..., k : k + 1] for k in range(inputs.shape[-1]))  # type: ignore[return-value]
