"""lightning-pinn: per-term gradient diagnostics and loss balancing for PINNs in PyTorch Lightning."""

# first: it imports Lightning without changing where Lightning logs (see lightning_pinn._lightning)
from lightning_pinn import _lightning  # noqa: F401
from lightning_pinn.loss import MultiTermLoss
from lightning_pinn.module import PINNModule

__all__ = ["MultiTermLoss", "PINNModule", "__version__"]
__version__ = "0.1.0"
