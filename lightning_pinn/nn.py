"""Small building blocks for PINN networks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_pinn._checks import check_hidden

__all__ = ["ModifiedMLP", "mlp"]


def _check_init(owner: str, init: str) -> None:
    if init not in ("default", "xavier"):
        raise ValueError(f"{owner}: init must be 'default' or 'xavier', got {init!r}.")


def _linear(fan_in: int, fan_out: int, init: str) -> nn.Linear:
    """A linear layer; ``init="xavier"``: Glorot-normal weights and zero biases."""
    linear = nn.Linear(fan_in, fan_out)
    if init == "xavier":
        nn.init.xavier_normal_(linear.weight)
        nn.init.zeros_(linear.bias)
    return linear


def mlp(
    in_features: int, hidden: Sequence[int], out_features: int, activation: type[nn.Module] = nn.Tanh, init: str = "default"
) -> nn.Sequential:
    """A fully connected network ``in → hidden[0] → … → out`` with ``activation`` between layers.

    Args:
        init: ``"default"`` keeps PyTorch's initialisation; ``"xavier"`` uses Glorot-normal
            weights and zero biases, as in the PINN papers of Wang et al.
    """
    _check_init("mlp", init)
    sizes = [in_features, *hidden, out_features]
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(_linear(fan_in, fan_out, init))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class ModifiedMLP(nn.Module):
    """The "improved fully-connected architecture" of Wang, Teng & Perdikaris 2021 (SIAM J. Sci.
    Comput. 43(5) A3055, §4), also the default network of the 2023 expert's guide.

    Two encoders of the input, ``U = σ(X W_U + b_U)`` and ``V = σ(X W_V + b_V)``, gate every
    hidden layer: with ``H⁰ = X``,

        Z^k = σ(H^(k−1) W^k + b^k),   H^k = Z^k ⊙ U + (1 − Z^k) ⊙ V,   k = 1 … L,

    and the output is the linear map ``H^L W + b``. The multiplicative gates carry the input
    into every layer, which the paper found makes the residual's gradients less stiff (its
    Helmholtz "M3/M4" runs; M4 adds the learning-rate annealing). This follows the authors'
    released code, where the gates act from the first layer on. All hidden layers must have the
    width of the encoders.

    Args:
        in_features: Input size.
        hidden: Hidden widths, all equal (e.g. ``(50, 50, 50)``).
        out_features: Output size.
        activation: ``σ`` (default ``nn.Tanh``).
        init: ``"xavier"`` (Glorot-normal weights, zero biases; the papers') or ``"default"``.
    """

    def __init__(
        self, in_features: int, hidden: Sequence[int], out_features: int, activation: type[nn.Module] = nn.Tanh, init: str = "xavier"
    ) -> None:
        super().__init__()
        _check_init("ModifiedMLP", init)
        widths = check_hidden("ModifiedMLP", hidden)
        if len(set(widths)) != 1:
            raise ValueError(
                f"ModifiedMLP: hidden must be one width repeated (every layer is gated by encoders of that width), e.g. "
                f"(50, 50, 50); got {tuple(hidden)!r}."
            )
        width = widths[0]
        self.encoder_u = _linear(in_features, width, init)
        self.encoder_v = _linear(in_features, width, init)
        self.hidden = nn.ModuleList(_linear(in_features if k == 0 else width, width, init) for k in range(len(widths)))
        self.output = _linear(width, out_features, init)
        self.activation = activation()

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        u = self.activation(self.encoder_u(x))
        v = self.activation(self.encoder_v(x))
        h = x
        for layer in self.hidden:
            z = self.activation(layer(h))
            h = torch.addcmul(v, z, u - v)  # z·u + (1 − z)·v
        return self.output(h)
