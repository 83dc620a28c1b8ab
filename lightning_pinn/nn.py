"""Small building blocks for PINN networks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["mlp"]


def mlp(
    in_features: int, hidden: Sequence[int], out_features: int, activation: type[nn.Module] = nn.Tanh, init: str = "default"
) -> nn.Sequential:
    """A fully connected network ``in → hidden[0] → … → out`` with ``activation`` between layers.

    Args:
        init: ``"default"`` keeps PyTorch's initialisation; ``"xavier"`` uses Glorot-normal
            weights and zero biases, as in the PINN papers of Wang et al.
    """
    if init not in ("default", "xavier"):
        raise ValueError(f"mlp: init must be 'default' or 'xavier', got {init!r}.")
    sizes = [in_features, *hidden, out_features]
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(fan_in, fan_out)
        if init == "xavier":
            nn.init.xavier_normal_(linear.weight)
            nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)
