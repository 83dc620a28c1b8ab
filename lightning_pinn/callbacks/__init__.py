"""Lightning callbacks that diagnose and rebalance the terms of a :class:`~lightning_pinn.MultiTermLoss`."""

from lightning_pinn.callbacks.balancers import GradNormBalancer, NTKBalancer, WeightBalancer
from lightning_pinn.callbacks.monitor import GradientNormMonitor, MonitorDiagnosis

__all__ = ["GradientNormMonitor", "MonitorDiagnosis", "GradNormBalancer", "NTKBalancer", "WeightBalancer"]
