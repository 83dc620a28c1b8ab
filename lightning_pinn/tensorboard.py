"""The TensorBoard custom-scalars layout that groups lightning-pinn's charts.

Open TensorBoard's *Custom Scalars* tab to see, in one place, the per-term gradient norms,
the imbalance ratio against its alarm threshold, the losses, the weights, the gradient
cosines and the alarm flags.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["LAYOUT_CATEGORY", "dashboard_layout", "losses_in_layout", "write_layout"]

#: Name of the custom-scalars category lightning-pinn writes.
LAYOUT_CATEGORY = "lightning-pinn"


def dashboard_layout(prefix: str = "", logger_prefix: str = "") -> dict[str, dict[str, list[Any]]]:
    """The layout passed to ``SummaryWriter.add_custom_scalars`` (tag regexes, one chart each).

    ``prefix`` is a loss's tag prefix (``"<loss path>/"`` when a module holds several
    ``MultiTermLoss``); each loss then gets its own category. ``logger_prefix`` is what the
    logger puts before every tag (``"train-"`` for ``TensorBoardLogger(prefix="train")``).
    """
    p = re.escape(logger_prefix + prefix)
    category = f"{LAYOUT_CATEGORY} ({prefix.rstrip('/')})" if prefix else LAYOUT_CATEGORY
    return {
        category: {
            "gradient norm per term  ‖∇θ L_i‖": ["Multiline", [rf"^{p}grad_norm/"]],
            "weighted gradient norm per term  λ_i‖∇θ L_i‖": ["Multiline", [rf"^{p}grad_norm_weighted/"]],
            "gradient-norm ratio (max/min weighted) vs alarm threshold": [
                "Multiline",
                [rf"^{p}grad_ratio$", rf"^{p}grad_ratio_threshold$"],
            ],
            "loss per term  L_i (unweighted)": ["Multiline", [rf"^{p}loss/"]],
            "weight per term  λ_i": ["Multiline", [rf"^{p}weight/"]],
            "gradient cosine per pair": ["Multiline", [rf"^{p}grad_cosine/"]],
            "alarms (1 = on)": ["Multiline", [rf"^{p}alarm/"]],
        }
    }


def write_layout(writer: Any, prefix: str = "", logger_prefix: str = "") -> None:
    """Write the layout to a ``SummaryWriter``, once per writer and prefix.

    TensorBoard keeps the last layout written to a run, so with several losses the layout
    written holds every loss's category seen so far.
    """
    written: set[tuple[str, str]] = getattr(writer, "_lightning_pinn_layouts", set())
    if (prefix, logger_prefix) in written:
        return
    written.add((prefix, logger_prefix))
    layout: dict[str, dict[str, list[Any]]] = {}
    for each, each_logger in sorted(written):
        layout.update(dashboard_layout(each, each_logger))
    writer.add_custom_scalars(layout)
    writer._lightning_pinn_layouts = written


def losses_in_layout(categories: list[tuple[str, str]]) -> dict[str, str]:
    """``{tag prefix: loss path}`` read back from a written layout, the inverse of
    :func:`dashboard_layout`: ``categories`` holds each category's title and its first chart's
    first tag regex (``"^<escaped logger and loss prefix>grad_norm/"``). Other categories are
    skipped. The layout gives the exact split between a logger's prefix and a loss path, which
    the tags alone leave ambiguous when a path holds a ``-``."""
    found: dict[str, str] = {}
    for title, pattern in categories:
        if title.startswith(LAYOUT_CATEGORY) and pattern.startswith("^") and pattern.endswith("grad_norm/"):
            prefix = re.sub(r"\\(.)", r"\1", pattern[1 : -len("grad_norm/")])  # undo re.escape
            found[prefix] = title[len(LAYOUT_CATEGORY) :].strip().removeprefix("(").removesuffix(")")
    return found
