"""Lightning callbacks that diagnose and rebalance the terms of a :class:`~lightning_pinn.MultiTermLoss`."""

from lightning_pinn.callbacks.balancers import GradNormBalancer, NTKBalancer, WeightBalancer
from lightning_pinn.callbacks.monitor import GradientNormMonitor, MonitorDiagnosis
from lightning_pinn.callbacks.more_balancers import (
    GradNormWeighting,
    LRAnnealingBalancer,
    ReLoBRaLoBalancer,
    SoftAdaptBalancer,
    UncertaintyWeighting,
    WeightSchedule,
)

__all__ = [
    "GradientNormMonitor",
    "MonitorDiagnosis",
    "GradNormBalancer",
    "NTKBalancer",
    "WeightBalancer",
    "SoftAdaptBalancer",
    "ReLoBRaLoBalancer",
    "LRAnnealingBalancer",
    "GradNormWeighting",
    "UncertaintyWeighting",
    "WeightSchedule",
]
