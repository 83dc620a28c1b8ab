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
    shape ``(N, d)`` with ``requires_grad=True``; the result has the shape of ``inputs``.
    """
    _check_one_value_per_point("gradient", output, inputs)
    return _gradient(output, inputs)


def _gradient(output: Tensor, inputs: Tensor) -> Tensor:
    """:func:`gradient` without the shape check, for outputs already known to hold one value per point."""
    (grad,) = torch.autograd.grad(output, inputs, grad_outputs=torch.ones_like(output), create_graph=True)
    return grad


def derivative(output: Tensor, inputs: Tensor, dim: int = 0, order: int = 1) -> Tensor:
    """``∂^order output / ∂inputs[:, dim]^order``, shape ``(N, 1)``; ``output`` has one value per point."""
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"derivative: order must be an integer >= 1, got {order!r}.")
    _check_one_value_per_point("derivative", output, inputs)
    dim = _check_coordinate("derivative", inputs, dim)
    result = output
    for _ in range(order):  # checked once above: each derivative again holds one value per point
        result = _gradient(result, inputs)[..., dim : dim + 1]
    return result


def laplacian(output: Tensor, inputs: Tensor) -> Tensor:
    """``Σ_k ∂²output/∂inputs[:, k]²``, shape ``(N, 1)``; ``output`` has one value per point."""
    _check_coordinate("laplacian", inputs, 0)
    first = gradient(output, inputs)
    return sum(_gradient(first[..., k : k + 1], inputs)[..., k : k + 1] for k in range(inputs.shape[-1]))  # type: ignore[return-value]
