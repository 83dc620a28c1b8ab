"""Derivatives of network outputs with respect to inputs, for writing PDE residuals."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["derivative", "gradient", "laplacian"]


def gradient(output: Tensor, inputs: Tensor) -> Tensor:
    """``∂output/∂inputs`` point by point, keeping the graph (so it can be differentiated again).

    ``output`` has one value per point (shape ``(N,)`` or ``(N, 1)``) and ``inputs`` shape
    ``(N, d)`` with ``requires_grad=True``; the result has the shape of ``inputs``.
    """
    (grad,) = torch.autograd.grad(output, inputs, grad_outputs=torch.ones_like(output), create_graph=True)
    return grad


def derivative(output: Tensor, inputs: Tensor, dim: int = 0, order: int = 1) -> Tensor:
    """``∂^order output / ∂inputs[:, dim]^order``, shape ``(N, 1)``."""
    if order < 1:
        raise ValueError(f"derivative: order must be >= 1, got {order}.")
    result = output
    for _ in range(order):
        result = gradient(result, inputs)[:, dim : dim + 1]
    return result


def laplacian(output: Tensor, inputs: Tensor) -> Tensor:
    """``Σ_k ∂²output/∂inputs[:, k]²``, shape ``(N, 1)``."""
    first = gradient(output, inputs)
    return sum(gradient(first[:, k : k + 1], inputs)[:, k : k + 1] for k in range(inputs.shape[1]))  # type: ignore[return-value]
