"""lightning-pinn: per-term gradient diagnostics and loss balancing for PINNs in PyTorch Lightning."""

from lightning_pinn.loss import MultiTermLoss
from lightning_pinn.module import PINNModule

__all__ = ["MultiTermLoss", "PINNModule", "__version__"]
__version__ = "0.1.0"
