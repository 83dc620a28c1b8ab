"""lightning-pinn: per-term gradient diagnostics and loss balancing for PINNs in PyTorch Lightning."""

from importlib import metadata as _metadata

# first: it imports Lightning without changing where Lightning logs (see lightning_pinn._lightning)
from lightning_pinn import _lightning  # noqa: F401
from lightning_pinn.loss import MultiTermLoss
from lightning_pinn.module import PINNModule

__all__ = ["MultiTermLoss", "PINNModule", "__version__"]
try:
    __version__ = _metadata.version("lightning-pinn")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
