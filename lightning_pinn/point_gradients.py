"""Per-point gradient norms ``‖∂r(x)/∂θ‖²`` of a residual in one backward pass.

A PINN residual evaluates one network at every point, so (for the usual residuals) row ``n``
of every tensor in its graph depends on point ``n`` only, through the same parameters. Where
that holds, one backward pass of ``Σ_n r(x_n)`` already carries every point's own gradient:
at a node where a parameter-derived tensor ``W`` meets the points (``y = a·W``, ``y = a ⊙ w``,
``y = a + b``), row ``n`` of the node's output gradient is ``δ_n = ∂r(x_n)/∂y_n``, and the point's
gradient through this use of ``W`` is ``a_nᵀ δ_n`` (``a_n ⊙ δ_n``, ``δ_n``). Summing these per-point
contributions over every use of a parameter, including the uses autograd created for the
residual's derivatives (``torch.autograd.grad(..., create_graph=True)``), and squaring gives

    ‖∂r(x_n)/∂θ‖² = Σ_θ ‖Σ_uses (per-point contribution of the use)‖²        for every n,

at the cost of one backward pass plus ``O(N · number of parameters)`` work, instead of N
vector-Jacobian products of ``O(N)`` each. This is Goodfellow's per-example gradient trick
("Efficient per-example gradient computations", arXiv:1510.01799, 2015) applied to every use of a
parameter in the graph. Contributions that pass through operations on the parameters alone
(a transpose, a cast, ``2·a``) are carried back to the parameters by calling those nodes'
backward functions under ``torch.func.vmap``.

:func:`one_pass_row_sq_norms` returns ``None`` for a graph it cannot treat this way (an operation
where parameters meet the points that this module does not know, a row count that does not
match the residual's). It cannot tell from the graph alone that the points never mix (a residual
comparing ``u(x_n)`` with ``u(x_{n+1})`` mixes them), so :mod:`lightning_pinn.ntk` checks its
values on a few points against exact vector-Jacobian products before using them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["one_pass_row_sq_norms", "ONE_PASS_CHUNK_BUDGET"]

#: Values of per-point gradients held at once (points per chunk × values per point, summed over
#: the parameter uses); 2²⁰ float32 values are 4 MiB. Measured on 2 CPU cores (harmonic IVP,
#: 1-32-32-32-1): as fast as 2²² from N = 128 to 10⁴, with peak memory at N = 10⁴ close to that
#: of one plain backward pass.
ONE_PASS_CHUNK_BUDGET = 1 << 20


class _Unsupported(Exception):
    """The graph is not one this module can split into per-point gradients."""


_Contribution = Callable[[slice], Tensor]


def _topological_order(root: Any) -> list[Any]:
    """Nodes reachable from ``root``, every node after all the nodes it depends on (post-order)."""
    order: list[Any] = []
    visited: set[Any] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if node in visited:
            continue
        visited.add(node)
        stack.append((node, True))
        stack.extend((child, False) for child, _ in node.next_functions if child is not None and child not in visited)
    return order


def _is_leaf(node: Any) -> bool:
    return type(node).__name__ == "AccumulateGrad"


def _sum_to(per_point: Tensor, shape: torch.Size) -> Tensor:
    """Reduce per-point values ``(N, *out)`` to ``(N, *shape)``, ``shape`` broadcast against ``out``'s rows."""
    full = per_point.shape
    if len(shape) > len(full):
        raise _Unsupported("operand of higher rank than its result")
    padded = (1,) * (len(full) - len(shape)) + tuple(shape)
    if padded[0] != 1:
        raise _Unsupported("a parameter-derived operand spans the points' dimension")
    dims = [d for d in range(1, len(full)) if padded[d] == 1 and full[d] != 1]
    if dims:
        per_point = per_point.sum(dim=dims, keepdim=True)
    return per_point.reshape((full[0], *shape))


def one_pass_row_sq_norms(flat: Tensor, params: Sequence[Tensor], out_dtype: torch.dtype) -> Tensor | None:
    """``‖∂flat[n]/∂θ‖²`` for every ``n`` from one backward pass, or ``None`` (see the module docstring).

    Args:
        flat: A real residual, flattened, with its autograd graph (retained).
        params: The parameters ``θ``.
        out_dtype: The dtype of the returned values.

    The values are right only where row ``n`` of the graph's tensors depends on point ``n``
    alone; the caller checks that (:func:`lightning_pinn.ntk.jacobian_row_sq_norms` does).
    """
    num_points = flat.numel()
    root = flat.grad_fn
    if root is None or num_points == 0:
        return None
    try:
        with torch.no_grad():  # the hooks' backward still builds no graph; the node calls must not
            return _one_pass(flat, root, list(params), out_dtype)
    except (_Unsupported, AttributeError, TypeError, IndexError, ValueError):
        return None
    except RuntimeError as error:
        if "can't allocate memory" in str(error):
            raise
        return None  # e.g. a parameter-only node whose backward cannot run under vmap


def _one_pass(flat: Tensor, root: Any, params: list[Tensor], out_dtype: torch.dtype) -> Tensor:
    num_points = flat.numel()
    param_index = {id(p): i for i, p in enumerate(params)}
    order = _topological_order(root)
    # Every node's output gradient from one backward pass of Σ_n r_n (its row n is ∂r_n/∂(row n)
    # where the rows stay apart); the classification below also needs the outputs' shapes.
    # Only nodes with an operand computed from parameters alone can be where parameters meet the
    # points: their gradients are kept; of the others, only the shapes (memory stays that of a
    # few of the graph's tensors).
    from_parameters: dict[Any, bool] = {}
    for node in order:
        if _is_leaf(node):
            from_parameters[node] = id(node.variable) in param_index
        else:
            from_parameters[node] = all(child is None or from_parameters[child] for child, _ in node.next_functions)
    candidates = {
        node for node in order if not _is_leaf(node) and any(c is not None and from_parameters[c] for c, _ in node.next_functions)
    }
    output_gradients: dict[Any, Tensor] = {}
    output_shapes: dict[Any, torch.Size] = {}
    several_outputs: set[Any] = set()

    def keep_gradient(node: Any) -> Callable[[tuple[Tensor | None, ...]], None]:
        keep = node in candidates

        def hook(grad_outputs: tuple[Tensor | None, ...]) -> None:
            if len(grad_outputs) != 1:
                several_outputs.add(node)
            if grad_outputs and grad_outputs[0] is not None:
                output_shapes[node] = grad_outputs[0].shape
                if keep:
                    output_gradients[node] = grad_outputs[0]

        return hook

    handles = [node.register_prehook(keep_gradient(node)) for node in order if not _is_leaf(node)]
    try:
        with torch.enable_grad():
            ones = torch.ones_like(flat)
        torch.autograd.grad(flat, params, grad_outputs=ones, retain_graph=True, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()

    # "p": computed from parameters alone, one value for all points; "b": has the points' rows.
    # A node with a constant operand (no graph: points without requires_grad, or the ``ones``
    # that autograd.grad(create_graph=True) starts a derivative from) has the points' rows
    # when its output has N of them.
    kind: dict[Any, str] = {}
    for node in order:
        if _is_leaf(node):
            kind[node] = "p" if id(node.variable) in param_index else "b"
            continue
        children = [child for child, _ in node.next_functions]
        if any(child is not None and kind[child] == "b" for child in children):
            kind[node] = "b"
        elif None in children and node in output_shapes and len(output_shapes[node]) > 0 and output_shapes[node][0] == num_points:
            kind[node] = "b"
        else:
            kind[node] = "p"
    if kind[root] != "b":
        raise _Unsupported("the residual does not reach the points through the graph")
    boundary = [node for node in order if kind[node] == "b" and any(c is not None and kind[c] == "p" for c, _ in node.next_functions)]
    if any(kind[node] == "p" for node in several_outputs):
        raise _Unsupported("a node of the parameters alone has several outputs")

    def shape_of(node: Any) -> torch.Size:
        if _is_leaf(node):
            return node.variable.shape
        if node not in output_shapes:
            raise _Unsupported("a parameter-derived operand received no gradient")
        return output_shapes[node]

    contributions: list[tuple[Any, _Contribution]] = []
    for node in boundary:
        delta = output_gradients.get(node)
        if delta is None:
            continue  # no gradient reached this use: it contributes nothing
        if delta.dim() == 0 or delta.shape[0] != num_points:
            raise _Unsupported("a node's rows are not the residual's points")
        contributions += _boundary_contributions(node, delta, kind, shape_of, num_points)

    target_sizes = [int(shape_of(target).numel()) for target in {t for t, _ in contributions}]
    if max(target_sizes, default=0) > 4 * sum(p.numel() for p in params) + 4096:
        raise _Unsupported("a per-point gradient larger than the parameters")  # not parameter-derived after all
    values_per_point = sum(target_sizes)
    chunk = max(1, ONE_PASS_CHUNK_BUDGET // max(values_per_point, 1))
    result = torch.zeros(num_points, dtype=out_dtype, device=flat.device)
    leaf_nodes = {node for node in order if _is_leaf(node) and kind[node] == "p"}
    reverse = [node for node in reversed(order) if kind[node] == "p"]
    for start in range(0, num_points, chunk):
        rows = slice(start, min(start + chunk, num_points))
        pending: dict[Any, Tensor] = {}
        for target, contribution in contributions:
            _add(pending, target, contribution(rows))
        for node in reverse:  # consumers before producers
            gradient = pending.pop(node, None)
            if gradient is None:
                continue
            if node in leaf_nodes:
                value = torch.view_as_real(gradient) if gradient.is_complex() else gradient
                result[rows] += value.reshape(value.shape[0], -1).to(out_dtype).square().sum(dim=1)
                continue
            inputs = torch.func.vmap(_backward_of(node))(gradient)
            for (child, _), child_gradient in zip(node.next_functions, inputs, strict=False):
                if child is not None and kind[child] == "p":
                    _add(pending, child, child_gradient)
    return result


def _backward_of(node: Any) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """``node``'s backward as a function vmap accepts (an input without a gradient gets a 0)."""

    def backward(gradient: Tensor) -> tuple[Tensor, ...]:
        inputs = node(gradient)
        inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        return tuple(gradient.new_zeros(()) if value is None else value for value in inputs)

    return backward


def _add(pending: dict[Any, Tensor], node: Any, gradient: Tensor) -> None:
    pending[node] = pending[node] + gradient if node in pending else gradient


def _rows(tensor: Tensor | None) -> int | None:
    return None if tensor is None or tensor.dim() == 0 else int(tensor.shape[0])


def _boundary_contributions(
    node: Any, delta: Tensor, kind: dict[Any, str], shape_of: Callable[[Any], torch.Size], num_points: int
) -> list[tuple[Any, _Contribution]]:
    """Per-point gradients of the parameter-derived operands of ``node``, given its output gradient ``delta``."""
    name = type(node).__name__
    children = [child for child, _ in node.next_functions]

    def parameter_side(position: int) -> bool:
        child = children[position] if position < len(children) else None
        return child is not None and kind[child] == "p"

    found: list[tuple[Any, _Contribution]] = []
    if name in ("AddmmBackward0", "MmBackward0"):
        left, right = (1, 2) if name == "AddmmBackward0" else (0, 1)
        if parameter_side(left):
            raise _Unsupported("parameters on the left of a matrix product with the points")
        if parameter_side(right):
            points = node._saved_mat1 if name == "AddmmBackward0" else node._saved_self
            scale = node._saved_alpha if name == "AddmmBackward0" else 1
            if _rows(points) != num_points or points.dim() != 2 or delta.dim() != 2:
                raise _Unsupported("matrix product rows")
            found.append((children[right], lambda rows, a=points, d=delta, s=scale: s * a[rows, :, None] * d[rows, None, :]))
        if name == "AddmmBackward0" and parameter_side(0):
            shape = shape_of(children[0])
            beta = node._saved_beta
            found.append((children[0], lambda rows, d=delta, s=shape, b=beta: _sum_to(b * d[rows], s)))
    elif name in ("MulBackward0", "DivBackward0"):
        numerator, denominator = node._saved_self, node._saved_other
        for position in (0, 1):
            if not parameter_side(position):
                continue
            shape = shape_of(children[position])
            if name == "MulBackward0":  # ∂(a·b)/∂a = b
                other = denominator if position == 0 else numerator
                found.append(
                    (children[position], lambda rows, d=delta, o=other, s=shape: _sum_to(d[rows] * _row_slice(o, rows, num_points), s))
                )
            elif position == 0:  # ∂(a/b)/∂a = 1/b
                found.append(
                    (children[0], lambda rows, d=delta, o=denominator, s=shape: _sum_to(d[rows] / _row_slice(o, rows, num_points), s))
                )
            else:  # ∂(a/b)/∂b = −a/b²
                found.append(
                    (
                        children[1],
                        lambda rows, d=delta, a=numerator, o=denominator, s=shape: _sum_to(
                            -d[rows] * _row_slice(a, rows, num_points) / _row_slice(o, rows, num_points) ** 2, s
                        ),
                    )
                )
    elif name in ("AddBackward0", "SubBackward0"):
        alpha = node._saved_alpha
        for position, sign in ((0, 1), (1, alpha if name == "AddBackward0" else -alpha)):
            if parameter_side(position):
                shape = shape_of(children[position])
                found.append((children[position], lambda rows, d=delta, s=shape, c=sign: _sum_to(c * d[rows], s)))
    else:
        raise _Unsupported(f"parameters meet the points in {name}")
    return found


def _row_slice(tensor: Tensor, rows: slice, num_points: int) -> Tensor:
    """The chunk's rows of an operand that has the points' rows; a broadcast operand as it is."""
    if tensor.dim() >= 1 and tensor.shape[0] == num_points:
        return tensor[rows]
    return tensor
