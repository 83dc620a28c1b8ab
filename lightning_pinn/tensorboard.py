"""The TensorBoard custom-scalars layout that groups lightning-pinn's charts.

Open TensorBoard's *Custom Scalars* tab to see, in one place, the per-term gradient norms,
the imbalance ratio against its alarm threshold, the losses, the weights, the gradient
cosines and the alarm flags.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = ["LAYOUT_CATEGORY", "dashboard_layout", "losses_in_layout", "terms_in_layout", "write_layout"]

#: Name of the custom-scalars category lightning-pinn writes.
LAYOUT_CATEGORY = "lightning-pinn"


def dashboard_layout(prefix: str = "", logger_prefix: str = "", terms: Sequence[str] | None = None) -> dict[str, dict[str, list[Any]]]:
    """The layout passed to ``SummaryWriter.add_custom_scalars`` (tag regexes, one chart each).

    ``prefix`` is a loss's tag prefix (``"<loss path>/"`` when a module holds several
    ``MultiTermLoss``); each loss then gets its own category. ``logger_prefix`` is what the
    logger puts before every tag (``"train-"`` for ``TensorBoardLogger(prefix="train")``).
    ``terms``, the loss's term names, keep the loss and weight charts to those terms (a module's
    own ``self.log("loss/total")`` shares the ``loss/`` family).
    """
    p = re.escape(logger_prefix + prefix)
    names = f"(?:{'|'.join(re.escape(t) for t in terms)})$" if terms else ""
    category = f"{LAYOUT_CATEGORY} ({prefix.rstrip('/')})" if prefix else LAYOUT_CATEGORY
    return {
        category: {
            "gradient norm per term  ‖∇θ L_i‖": ["Multiline", [rf"^{p}grad_norm/"]],
            "weighted gradient norm per term  λ_i‖∇θ L_i‖": ["Multiline", [rf"^{p}grad_norm_weighted/"]],
            "gradient-norm ratio (max/min weighted) vs alarm threshold": [
                "Multiline",
                [rf"^{p}grad_ratio$", rf"^{p}grad_ratio_threshold$"],
            ],
            "loss per term  L_i (unweighted)": ["Multiline", [rf"^{p}loss/{names}"]],
            "weight per term  λ_i": ["Multiline", [rf"^{p}weight/{names}"]],
            "gradient cosine per pair": ["Multiline", [rf"^{p}grad_cosine/"]],
            "alarms (1 = on)": ["Multiline", [rf"^{p}alarm/"]],
        }
    }


def write_layout(writer: Any, prefix: str = "", logger_prefix: str = "", terms: Sequence[str] | None = None) -> None:
    """Write the layout to a ``SummaryWriter``, once per writer, prefix and terms.

    TensorBoard keeps the last layout written to a run, so with several losses the layout
    written holds every loss's category seen so far.
    """
    written: dict[tuple[str, str], tuple[str, ...] | None] = getattr(writer, "_lightning_pinn_layouts", {})
    key, names = (prefix, logger_prefix), tuple(terms) if terms is not None else None
    if key in written and written[key] == names:
        return
    written[key] = names
    layout: dict[str, dict[str, list[Any]]] = {}
    for (each, each_logger), each_terms in sorted(written.items(), key=lambda item: item[0]):
        layout.update(dashboard_layout(each, each_logger, each_terms))
    writer.add_custom_scalars(layout)
    writer._lightning_pinn_layouts = written


def _unescape(escaped: str) -> str:
    """Undo :func:`re.escape` (as :func:`dashboard_layout` applied it to prefixes and term names)."""
    return re.sub(r"\\(.)", r"\1", escaped)


def terms_in_layout(categories: list[tuple[str, list[str]]]) -> dict[str, list[str]]:
    """``{tag prefix: the loss's term names}`` read back from a written layout (``categories``
    holds each category's title and all its charts' tag regexes): the names
    :func:`dashboard_layout` put in the weight chart's ``^<prefix>weight/(?:a|b)$``. Layouts
    written without term names give nothing."""
    found: dict[str, list[str]] = {}
    for title, patterns in categories:
        if not title.startswith(LAYOUT_CATEGORY):
            continue
        for pattern in patterns:
            match = re.fullmatch(r"\^(.*)weight/\(\?:(.*)\)\$", pattern)
            if match:
                found[_unescape(match.group(1))] = [_unescape(name) for name in re.split(r"(?<!\\)\|", match.group(2))]
    return found


def losses_in_layout(categories: list[tuple[str, str]]) -> dict[str, str]:
    """``{tag prefix: loss path}`` read back from a written layout, the inverse of
    :func:`dashboard_layout`: ``categories`` holds each category's title and its first chart's
    first tag regex (``"^<escaped logger and loss prefix>grad_norm/"``). Other categories are
    skipped. The layout gives the exact split between a logger's prefix and a loss path, which
    the tags alone leave ambiguous when a path holds a ``-``."""
    found: dict[str, str] = {}
    for title, pattern in categories:
        if title.startswith(LAYOUT_CATEGORY) and pattern.startswith("^") and pattern.endswith("grad_norm/"):
            prefix = _unescape(pattern[1 : -len("grad_norm/")])
            found[prefix] = title[len(LAYOUT_CATEGORY) :].strip().removeprefix("(").removesuffix(")")
    return found
