"""The TensorBoard custom-scalars layout that groups lightning-pinn's charts.

Open TensorBoard's *Custom Scalars* tab to see, in one place, the per-term gradient norms,
the imbalance ratio against its alarm threshold, the losses, the weights, the gradient
cosines and the alarm flags.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LAYOUT_CATEGORY", "dashboard_layout", "write_layout"]

#: Name of the custom-scalars category lightning-pinn writes.
LAYOUT_CATEGORY = "lightning-pinn"


def dashboard_layout() -> dict[str, dict[str, list[Any]]]:
    """The layout passed to ``SummaryWriter.add_custom_scalars`` (tag regexes, one chart each)."""
    return {
        LAYOUT_CATEGORY: {
            "gradient norm per term  ‖∇θ L_i‖": ["Multiline", [r"^grad_norm/"]],
            "weighted gradient norm per term  λ_i‖∇θ L_i‖": ["Multiline", [r"^grad_norm_weighted/"]],
            "gradient-norm ratio (max/min weighted) vs alarm threshold": ["Multiline", [r"^grad_ratio$", r"^grad_ratio_threshold$"]],
            "loss per term  L_i (unweighted)": ["Multiline", [r"^loss/"]],
            "weight per term  λ_i": ["Multiline", [r"^weight/"]],
            "gradient cosine per pair": ["Multiline", [r"^grad_cosine/"]],
            "alarms (1 = on)": ["Multiline", [r"^alarm/"]],
        }
    }


def write_layout(writer: Any) -> None:
    """Write the layout once to a ``SummaryWriter`` (a second call on the same writer does nothing)."""
    if getattr(writer, "_lightning_pinn_layout_written", False):
        return
    writer.add_custom_scalars(dashboard_layout())
    writer._lightning_pinn_layout_written = True
