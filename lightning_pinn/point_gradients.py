"""Per-point gradient norms ``‖∂r(x)/∂θ‖²`` of a residual from four or five backward passes.

A PINN residual evaluates one network at every point, so (for the usual residuals) each row of
every tensor in its graph serves one residual point, through the same parameters. Where that
holds, one backward pass of ``Σ_n r(x_n)`` already carries every point's own gradient: at a node
where a parameter-derived tensor ``W`` meets the points (``y = a·W``, ``y = a ⊙ w``, ``y = a + b``,
``y = a / w``), row ``m`` of the node's output gradient is ``δ_m = ∂r(x_n)/∂y_m`` for the point
``n`` that row serves, and the point's gradient through this use of ``W`` is ``a_mᵀ δ_m``
(``a_m ⊙ δ_m``, ``δ_m``, ``−a_m δ_m / w²``). Summing these contributions over every use of a
parameter, including the uses autograd created for the residual's derivatives
(``torch.autograd.grad(..., create_graph=True)``), and over the rows serving the point, and
squaring gives

    ‖∂r(x_n)/∂θ‖² = Σ_θ ‖Σ_uses Σ_(rows m serving n) (contribution of row m)‖²        for every n,

at the cost of four or five backward passes plus ``O(N · number of parameters)`` work, instead
of N vector-Jacobian products of ``O(N)`` each. This is Goodfellow's per-example gradient trick
("Efficient per-example gradient computations", arXiv:1510.01799, 2015) applied to every use of a
parameter in the graph. Contributions that pass through operations on the parameters alone
(a transpose, a cast, ``2·a``) are carried back to the parameters by calling those nodes'
backward functions under ``torch.func.vmap``.

A weight matrix that the points reach only through matrix products (directly or transposed; a
layer's weight in the network and in every derivative autograd built from it) needs no
per-point gradient at all: each row's contribution is an outer product ``a_m ⊗ δ_m``, so
``‖Σ_m a_m ⊗ δ_m‖² = Σ_(m,m') (a_m·a_m')(δ_m·δ_m')`` over the rows serving the point, from two
small Gram matrices per point (the "ghost norm" of per-example gradient clipping; Li et al.
2022, arXiv:2110.05679). That is ``O(R²·(k + m))`` per point for R rows of a k×m weight instead
of ``O(R·k·m)``: exact traces 2.9× faster at width 128 and 3.5× at width 500 than summing the
per-point gradients (``benchmarks/ntk_cost.py --widths``).

Which point a row serves is checked with three more backward passes, with codes ``ρ_n ∈ [1, 2)``
on point ``n`` (``1 + frac(n·φ)``, which separates neighbours by at least 0.38, and two
independent uniform random codes): a row serving point ``n`` alone gets ``ρ_n`` times its first
gradient across the whole row, which a row serving several points does not, whatever their
indices (two points whose indices average to a third; a weak coupling between neighbours). Where
row ``m`` fails this for ``ρ_m`` (the rows are reordered: a slice of one network call over several
terms' points, a permutation, a periodic pair ``u(x_n) − u(x'_n)``), a fifth pass with cotangent
``n + 1`` names the point it serves (``(n + 1)`` times its first gradient), and the codes are
checked for that point. A row serving several points (``u(x_n) − u(x_{n+1})``, ``u − mean(u)``, a
point used
twice) makes :func:`one_pass_row_sq_norms` return ``None``, as does an operation where
parameters meet the points that this module does not know. :mod:`lightning_pinn.ntk` also checks
the values on six to nine points against exact vector-Jacobian products before using them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

__all__ = ["one_pass_row_sq_norms", "ONE_PASS_CHUNK_BUDGET"]

#: torch >= 2.5 names it torch.OutOfMemoryError; earlier releases only torch.cuda.OutOfMemoryError.
_OUT_OF_MEMORY: type[Exception] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

#: The nodes where parameters may meet the points (see :func:`_boundary_contributions`).
_KNOWN_MEETINGS = frozenset({"AddmmBackward0", "MmBackward0", "MulBackward0", "DivBackward0", "AddBackward0", "SubBackward0"})

#: Relative tolerance of the row tests, in machine epsilons of the gradients' dtype.
ROW_TOLERANCE_EPS = 2_000

#: Values of per-point gradients held at once (points per chunk × values per point, summed over
#: the parameter uses); 2²² float32 values are 16 MiB. Smaller budgets (2²⁰) saved little memory
#: at N = 10⁴ and cost time on wide networks (more chunks, more vmapped node calls).
ONE_PASS_CHUNK_BUDGET = 1 << 22


class _Unsupported(Exception):
    """The graph is not one this module can split into per-point gradients."""


#: PyTorch's notice that an op has no batching rule (vmap then loops over that op).
_NO_BATCHING_RULE = "There is a performance drop because we have not yet implemented the batching rule"

_Contribution = Callable[[Tensor | slice], Tensor]
#: A contribution that is an outer product per row: rows -> (p, q) with p of shape (rows, k), q (rows, m)
_Factors = Callable[[Tensor | slice], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class _Use:
    """One use of a parameter-derived tensor where it meets the points."""

    target: Any  # the parameter-side node the contribution flows into
    point_of_row: Tensor | None  # the point each row serves (None: row n serves point n)
    contribution: _Contribution  # rows -> per-row gradients, (rows, *target's shape)
    factors: _Factors | None = None  # set where each row's contribution is an outer product p ⊗ q
    factor_sizes: tuple[int, int] | None = None  # (k, m): the target's shape for such a use


#: Parameter-side nodes that only transpose a matrix: a row's outer product p ⊗ q passes as q ⊗ p.
_TRANSPOSES = frozenset({"TBackward0"})


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


def one_pass_row_sq_norms(
    flat: Tensor, params: Sequence[Tensor], out_dtype: torch.dtype, reordered: list[Tensor] | None = None
) -> Tensor | None:
    """``‖∂flat[n]/∂θ‖²`` for every ``n`` from four or five backward passes, or ``None`` (see the module docstring).

    Args:
        flat: A real residual, flattened, with its autograd graph (retained).
        params: The parameters ``θ``.
        out_dtype: The dtype of the returned values.
        reordered: If given, filled with tensors of the points worth checking first: where a
            node has one row per point, the points of the rows that do not serve their own index
            (the point the row serves, and the row's own index). These are where a row serving several
            points could pass the row tests by chance.

    The values are right where every row of the graph's tensors serves one point; rows serving
    several points are detected (the coded passes), and the caller checks a few values
    against vector-Jacobian products (:func:`lightning_pinn.ntk.jacobian_row_sq_norms` does).
    """
    num_points = flat.numel()
    root = flat.grad_fn
    if root is None or num_points == 0:
        return None
    params = list(params)
    if len({id(p) for p in params}) != len(params) or any(not p.is_leaf or p._backward_hooks for p in params):
        # a repeated parameter (the products count it twice), a non-leaf "parameter" (its uses are
        # not found at a leaf) or a gradient hook on one (autograd applies it, this walk cannot)
        return None
    try:
        with torch.no_grad():  # the hooks' backward still builds no graph; the node calls must not
            return _one_pass(flat, root, params, out_dtype, reordered)
    except _OUT_OF_MEMORY:
        raise
    except (_Unsupported, AttributeError, TypeError, LookupError, ValueError):
        return None
    except RuntimeError as error:
        if "can't allocate memory" in str(error):
            raise
        return None  # e.g. a parameter-only node whose backward cannot run under vmap


def _one_pass(flat: Tensor, root: Any, params: list[Tensor], out_dtype: torch.dtype, reordered: list[Tensor] | None) -> Tensor:
    """:func:`one_pass_row_sq_norms`; raises :class:`_Unsupported` for a graph it cannot treat."""
    num_points = flat.numel()
    param_index = {id(p): i for i, p in enumerate(params)}
    order = _topological_order(root)
    # Only a node with an operand computed from parameters alone can be where parameters meet
    # the points: those nodes' output gradients are kept; of the others only the shapes.
    from_parameters: dict[Any, bool] = {}
    for node in order:
        if _is_leaf(node):
            from_parameters[node] = id(node.variable) in param_index
        else:
            from_parameters[node] = all(child is None or from_parameters[child] for child, _ in node.next_functions)
    candidates = {
        node for node in order if not _is_leaf(node) and any(c is not None and from_parameters[c] for c, _ in node.next_functions)
    }
    hooked = [node for node in order if not _is_leaf(node)]
    # Backward passes of Σ_n r_n, of Σ_n ρ_n·r_n for two codes ρ in [1, 2), and, where a row may
    # serve a point other than its own, of Σ_n (n+1)·r_n. Where row m of a node serves point n
    # alone, the coded gradients are ρ_n times the first, which a row serving several points
    # would not be, whatever their indices (a weak coupling between neighbours; two points whose
    # indices average to a third), and the last is (n+1) times the first, which names the point.
    ones = torch.ones_like(flat)
    indices = torch.arange(1, num_points + 1, device=flat.device).to(flat.dtype)
    # 1 + frac(n·φ): neighbours' codes differ by at least 0.38 (φ the golden ratio); and uniform
    # random codes, which no pattern of indices defeats
    golden = 1 + torch.remainder(torch.arange(num_points, dtype=torch.float64) * ((5**0.5 - 1) / 2), 1.0)
    generator = torch.Generator().manual_seed(num_points)
    random = [1 + torch.rand(num_points, generator=generator, dtype=torch.float64) for _ in range(2)]
    codes = [code.to(flat.device, flat.dtype) for code in (golden, *random)]
    plain, output_shapes, several_outputs = _output_gradients(flat, params, ones, hooked, candidates)
    kind = _classify(order, from_parameters, output_shapes, num_points)
    if kind[root] != "b":
        raise _Unsupported("the residual does not reach the points through the graph")
    if any(kind[node] == "p" for node in several_outputs):
        raise _Unsupported("a node of the parameters alone has several outputs")
    # the nodes where parameters meet the points and a gradient arrived (others contribute nothing)
    meetings = [
        node
        for node in order
        if kind[node] == "b" and node in plain and any(c is not None and kind[c] == "p" for c, _ in node.next_functions)
    ]
    for node in meetings:  # decline an unknown meeting before the coded passes
        if type(node).__name__ not in _KNOWN_MEETINGS:
            raise _Unsupported(f"parameters meet the points in {type(node).__name__}")

    candidate_list = [node for node in hooked if node in candidates]  # the later passes need no shapes
    checks = [(code, _output_gradients(flat, params, code, candidate_list, candidates)[0]) for code in codes]
    coded: dict[Any, Tensor] | None = None  # the n+1 pass, run only where a row may serve another point

    def shape_of(node: Any) -> torch.Size:
        if _is_leaf(node):
            return node.variable.shape
        if node not in output_shapes:
            raise _Unsupported("a parameter-derived operand received no gradient")
        return output_shapes[node]

    uses: list[_Use] = []
    for node in meetings:
        delta = plain[node]
        if delta.dim() == 0:
            raise _Unsupported("a node where parameters meet the points has no rows")
        if delta.is_complex():
            raise _Unsupported("complex gradients (the contributions would need conjugates)")
        node_checks = [(code, checked[node]) for code, checked in checks]
        if delta.shape[0] == num_points and _serves_own_point(delta, node_checks):
            point_of_row = None  # the usual case: row n serves point n alone
        else:
            if coded is None:
                coded = _output_gradients(flat, params, indices, candidate_list, candidates)[0]
            point_of_row = _points_of_rows(delta, coded[node], node_checks, num_points)
            if reordered is not None and point_of_row is not None and point_of_row.shape[0] == num_points:
                own = torch.arange(num_points, device=point_of_row.device)
                moved = point_of_row != own
                reordered += [point_of_row[moved & (point_of_row >= 0)], own[moved]]
        uses += [replace(use, point_of_row=point_of_row) for use in _boundary_contributions(node, delta, kind, shape_of)]

    target_sizes = {use.target: int(shape_of(use.target).numel()) for use in uses}
    if max(target_sizes.values(), default=0) > 4 * sum(p.numel() for p in params) + 4096:
        raise _Unsupported("a per-point gradient larger than the parameters")  # not parameter-derived after all
    result = torch.zeros(num_points, dtype=out_dtype, device=flat.device)
    outer, uses = _outer_product_leaves(kind, uses)
    for leaf_uses in outer.values():
        if not _add_outer_product_norms(leaf_uses, num_points, result):
            uses += [use for use, _ in leaf_uses]  # summed per point after all
    chunk = max(1, ONE_PASS_CHUNK_BUDGET // max(sum(target_sizes[use.target] for use in uses), 1))
    _add_materialised_norms(order, kind, uses, num_points, chunk, result, output_shapes)
    return result


def _classify(order: list[Any], from_parameters: dict[Any, bool], output_shapes: dict[Any, torch.Size], num_points: int) -> dict[Any, str]:
    """``"p"`` for a node computed from parameters alone (one value for all points), ``"b"`` for one
    with the points' rows.

    A node with a constant operand (no graph: points without ``requires_grad``, or the ``ones``
    that ``autograd.grad(create_graph=True)`` starts a derivative from) has the points' rows when
    its output has as many rows as the residual, as a tensor of points that requires grad, or as
    constant points fed to a matrix product.
    """
    point_rows = {num_points}
    point_rows |= {int(n.variable.shape[0]) for n in order if _is_leaf(n) and not from_parameters[n] and n.variable.dim()}
    point_rows |= {rows for node in order if (rows := _constant_points_rows(node)) is not None}
    kind: dict[Any, str] = {}
    for node in order:
        if _is_leaf(node):
            kind[node] = "p" if from_parameters[node] else "b"
            continue
        children = [child for child, _ in node.next_functions]
        shape = output_shapes.get(node)
        if any(child is not None and kind[child] == "b" for child in children):
            kind[node] = "b"
        elif None in children and shape is not None and len(shape) > 0 and shape[0] in point_rows:
            kind[node] = "b"
        else:
            kind[node] = "p"
    return kind


def _sorted_rows(point_of_row: Tensor) -> tuple[Tensor, Tensor]:
    """The rows serving a point, sorted by that point: ``(points served, rows)`` (rows serving none left out)."""
    served = torch.nonzero(point_of_row >= 0).reshape(-1)
    points_served, order_of_rows = torch.sort(point_of_row[served], stable=True)
    return points_served, served[order_of_rows]


def _outer_product_leaves(kind: dict[Any, str], uses: list[_Use]) -> tuple[dict[Any, list[tuple[_Use, bool]]], list[_Use]]:
    """Split ``uses`` into those of parameters reached only by outer products, and the rest.

    A parameter qualifies when every use that reaches it is a matrix product's per-row outer
    product ``p ⊗ q`` reaching it directly or through transposes (``(use, transposed)`` pairs,
    per parameter node); its per-point norms then need no per-point gradient
    (:func:`_add_outer_product_norms`). The rest are summed per point (:func:`_add_materialised_norms`).
    """
    below: dict[Any, frozenset[Any]] = {}

    def leaves_below(node: Any) -> frozenset[Any]:  # the parameters a parameter-side node's gradient reaches
        if node not in below:
            if _is_leaf(node):
                below[node] = frozenset({node})
            else:
                found: set[Any] = set()
                for child, _ in node.next_functions:
                    if child is not None and kind[child] == "p":
                        found |= leaves_below(child)
                below[node] = frozenset(found)
        return below[node]

    def through_transposes(use: _Use) -> tuple[Any, bool] | None:
        node, transposed = use.target, False
        while not _is_leaf(node):
            children = [child for child, _ in node.next_functions if child is not None]
            if type(node).__name__ not in _TRANSPOSES or len(children) != 1 or kind[children[0]] != "p":
                return None
            node, transposed = children[0], not transposed
        if use.factors is None or use.factor_sizes is None:
            return None
        k, m = use.factor_sizes
        return (node, transposed) if tuple(node.variable.shape) == ((m, k) if transposed else (k, m)) else None

    outer: dict[Any, list[tuple[_Use, bool]]] = {}
    elsewhere: set[Any] = set()  # parameters reached by some other kind of use
    for use in uses:
        end = through_transposes(use)
        if end is None:
            elsewhere |= leaves_below(use.target)
        else:
            outer.setdefault(end[0], []).append((use, end[1]))
    rest = [use for use in uses if (end := through_transposes(use)) is None or end[0] in elsewhere]
    return {leaf: found for leaf, found in outer.items() if leaf not in elsewhere}, rest


def _add_outer_product_norms(uses: list[tuple[_Use, bool]], num_points: int, result: Tensor) -> bool:
    """Add each point's ``‖∂r_n/∂W‖²`` to ``result`` for a parameter ``W`` reached only by outer
    products; ``False`` (nothing added) where a point has so many rows R that ``R² > k·m`` (a
    quadrature over many network rows per point: summing the point's gradient is cheaper).

    The point's gradient is ``G_n = Σ_j p_j ⊗ q_j`` over the rows ``j`` serving it in all uses
    (``q ⊗ p`` through a transpose), so ``‖G_n‖² = Σ_(i,j) (p_i·p_j)(q_i·q_j)``: the sum of the
    elementwise product of two Gram matrices, ``O(R²·(k + m))`` per point for R rows instead of the
    ``O(R·k·m)`` of forming ``G_n`` (the "ghost norm" of per-example gradient clipping, Li et al.
    2022, arXiv:2110.05679, extended to a sum of uses). The Gram matrices are taken in float64:
    uses whose contributions cancel (as derivatives of a residual's terms do) lose no digits.
    """
    layouts = []  # per use: rows sorted by point, each row's slot among the rows serving its point, slots
    for use, _ in uses:
        if use.point_of_row is None:
            layouts.append(None)
            continue
        points_served, rows = _sorted_rows(use.point_of_row)
        first_of_point = torch.searchsorted(points_served, points_served)
        slot = torch.arange(points_served.numel(), device=points_served.device) - first_of_point
        layouts.append((points_served, rows, slot, int(slot.max()) + 1 if slot.numel() else 0))
    width = sum(1 if layout is None else layout[3] for layout in layouts)  # rows per point, over all uses
    k, m = uses[0][0].factor_sizes or (1, 1)
    if width * width > k * m:
        return False
    chunk = max(1, ONE_PASS_CHUNK_BUDGET // max(width * (k + m), width * width, 1))
    gram_dtype = torch.float32 if result.device.type == "mps" else torch.float64  # MPS has no float64
    for start in range(0, num_points, chunk):
        stop = min(start + chunk, num_points)
        lefts, rights = [], []
        for (use, transposed), layout in zip(uses, layouts):
            assert use.factors is not None
            if layout is None:
                p, q = use.factors(slice(start, stop))
                p, q = p.unsqueeze(1), q.unsqueeze(1)
            else:
                points_served, rows, slot, slots = layout
                first, last = torch.searchsorted(points_served, torch.tensor([start, stop], device=points_served.device)).tolist()
                if first == last:
                    continue
                row_p, row_q = use.factors(rows[first:last])
                at = (points_served[first:last] - start, slot[first:last])
                p = row_p.new_zeros((stop - start, slots, row_p.shape[1])).index_put_(at, row_p)
                q = row_q.new_zeros((stop - start, slots, row_q.shape[1])).index_put_(at, row_q)
            lefts.append(q if transposed else p)
            rights.append(p if transposed else q)
        if not lefts:
            continue
        left = torch.cat(lefts, dim=1).to(gram_dtype)
        right = torch.cat(rights, dim=1).to(gram_dtype)
        gram = torch.bmm(left, left.transpose(1, 2)) * torch.bmm(right, right.transpose(1, 2))
        result[start:stop] += gram.sum(dim=(1, 2)).clamp(min=0).to(result.dtype)
    return True


def _add_materialised_norms(
    order: list[Any],
    kind: dict[Any, str],
    uses: list[_Use],
    num_points: int,
    chunk: int,
    result: Tensor,
    output_shapes: dict[Any, torch.Size],
) -> None:
    """Sum each point's contributions per parameter, ``chunk`` points at a time, carry them through the
    nodes of parameters alone (vmapped backward calls), and add ``Σ_θ ‖per-point gradient‖²`` to ``result``."""
    if not uses:
        return
    # each use's rows, sorted by the point they serve (rows serving no point left out)
    sorted_uses: list[tuple[Any, Tensor | None, Tensor | None, _Contribution]] = []
    for use in uses:
        if use.point_of_row is None:
            sorted_uses.append((use.target, None, None, use.contribution))
            continue
        points_served, rows = _sorted_rows(use.point_of_row)
        sorted_uses.append((use.target, points_served, rows, use.contribution))
    out_dtype = result.dtype
    leaf_nodes = {node for node in order if _is_leaf(node) and kind[node] == "p"}
    reverse = [node for node in reversed(order) if kind[node] == "p"]
    # each node of parameters alone as a per-point function: its backward, with every input's gradient
    # reduced to that input's shape (a node called directly returns broadcast shapes: a·W gives the
    # scalar a a gradient shaped like W, which the autograd engine, not the node, sums)
    # (only nodes a gradient reached in the first pass: contributions flow along the same edges)
    backwards: dict[Any, tuple[Callable[[Tensor], tuple[Tensor, ...]], list[torch.Size | None]]] = {}
    for node in reverse:
        if node not in leaf_nodes and node in output_shapes:
            shapes = [_parameter_side_shape(child, kind, output_shapes) for child, _ in node.next_functions]
            backwards[node] = (torch.func.vmap(_backward_of(node, shapes)), shapes)
    with warnings.catch_warnings():  # an op without a batching rule: vmap loops over it, correctly
        warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE)
        for start in range(0, num_points, chunk):
            _accumulate_chunk(start, min(start + chunk, num_points), sorted_uses, reverse, leaf_nodes, backwards, result, out_dtype)


def _parameter_side_shape(child: Any, kind: dict[Any, str], output_shapes: dict[Any, torch.Size]) -> torch.Size | None:
    """The shape of the gradient a node of parameters alone passes to ``child`` (``None``: nothing to
    carry on: not a parameter-side node, or one no gradient reached in the first pass)."""
    if child is None or kind[child] != "p":
        return None
    if _is_leaf(child):
        return child.variable.shape
    return output_shapes.get(child)


def _accumulate_chunk(
    start: int,
    stop: int,
    sorted_uses: list[tuple[Any, Tensor | None, Tensor | None, _Contribution]],
    reverse: list[Any],
    leaf_nodes: set[Any],
    backwards: dict[Any, tuple[Callable[[Tensor], tuple[Tensor, ...]], list[torch.Size | None]]],
    result: Tensor,
    out_dtype: torch.dtype,
) -> None:
    """Add ``Σ_θ ‖per-point gradient‖²`` of points ``start:stop`` to ``result``."""
    pending: dict[Any, Tensor] = {}
    for target, points_served, rows, contribution in sorted_uses:
        if points_served is None or rows is None:  # row n serves point n
            _add(pending, target, contribution(slice(start, stop)))
            continue
        first, last = torch.searchsorted(points_served, torch.tensor([start, stop], device=points_served.device)).tolist()
        if first == last:
            continue
        per_row = contribution(rows[first:last])
        per_point = per_row.new_zeros((stop - start, *per_row.shape[1:]))
        per_point.index_add_(0, points_served[first:last] - start, per_row)
        _add(pending, target, per_point)
    for node in reverse:  # consumers before producers
        gradient = pending.pop(node, None)
        if gradient is None:
            continue
        if node in leaf_nodes:  # a parameter
            value = torch.view_as_real(gradient) if gradient.is_complex() else gradient
            result[start:stop] += value.reshape(value.shape[0], -1).to(out_dtype).square().sum(dim=1)
            continue
        if node not in backwards:
            raise _Unsupported("a contribution reached a node the first pass did not")
        backward, shapes = backwards[node]
        inputs = backward(gradient)  # the caller silences the no-batching-rule notice
        for (child, _), child_gradient, shape in zip(node.next_functions, inputs, shapes, strict=True):
            if shape is not None:
                _add(pending, child, child_gradient)


def _constant_points_rows(node: Any) -> int | None:
    """Rows of a constant left operand of a matrix product (points without ``requires_grad`` fed to a layer)."""
    name = type(node).__name__
    if name == "AddmmBackward0" and node.next_functions[1][0] is None:
        return _rows(node._saved_mat1)
    if name == "MmBackward0" and node.next_functions[0][0] is None:
        return _rows(node._saved_self)
    return None


def _output_gradients(
    flat: Tensor, params: list[Tensor], cotangent: Tensor, hooked: list[Any], kept: set[Any]
) -> tuple[dict[Any, Tensor], dict[Any, torch.Size], set[Any]]:
    """One backward pass of ``flat`` with ``cotangent``: the output gradients of the ``kept`` nodes,
    the output shapes of all ``hooked`` nodes, and the nodes with several outputs."""
    gradients: dict[Any, Tensor] = {}
    shapes: dict[Any, torch.Size] = {}
    several: set[Any] = set()

    def hook_for(node: Any) -> Callable[[tuple[Tensor | None, ...]], None]:
        keep = node in kept

        def hook(grad_outputs: tuple[Tensor | None, ...]) -> None:
            if len(grad_outputs) != 1:
                several.add(node)
            if grad_outputs and grad_outputs[0] is not None:
                shapes[node] = grad_outputs[0].shape
                if keep:
                    gradients[node] = grad_outputs[0]

        return hook

    handles = [node.register_prehook(hook_for(node)) for node in hooked]
    try:
        torch.autograd.grad(flat, params, grad_outputs=cotangent, retain_graph=True, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return gradients, shapes, several


def _serves_own_point(plain: Tensor, checks: list[tuple[Tensor, Tensor]]) -> bool:
    """Whether row n of a node serves point n alone: every coded gradient is ``ρ_n·plain`` (see
    :func:`_points_of_rows` for the tolerance). A row with a zero first gradient must then be zero
    in every pass."""
    rows = plain.shape[0]
    plain_rows = plain.reshape(rows, -1)
    if not bool(torch.isfinite(plain_rows).all()):
        raise _Unsupported("a non-finite gradient")  # NaN/inf residuals: the products report them
    tolerance = min(ROW_TOLERANCE_EPS * torch.finfo(plain.dtype).eps, 1e-2)
    for codes, checked in checks:
        expected = codes.to(plain.dtype).reshape(-1, 1) * plain_rows
        mismatch = torch.linalg.vector_norm(checked.reshape(rows, -1) - expected, dim=1)
        if not bool((mismatch <= tolerance * torch.linalg.vector_norm(expected, dim=1)).all()):  # NaN fails too
            return False
    return True


def _points_of_rows(plain: Tensor, coded: Tensor, checks: list[tuple[Tensor, Tensor]], num_points: int) -> Tensor | None:
    """The residual point each row of a node serves (−1: none), from its output gradients for the
    cotangents 1 (``plain``), n+1 (``coded``) and random codes ρ (``checks``: pairs of the codes and
    the node's gradient for them): a row that serves point n alone has ``coded = (n+1)·plain`` and
    ``checked = ρ_n·plain``. ``None``: row n serves point n, for every n.

    Raises :class:`_Unsupported` where a row serves several points: ``coded/plain`` is not one
    integer across the row, or a ``checked`` is not ``ρ_n·plain``, to a relative tolerance of
    ``ROW_TOLERANCE_EPS`` machine epsilons of the gradients' dtype (2.4e-4 in float32, 4.4e-13 in
    float64; at most 1e-2). Honest rows measured 1–6 epsilons for the problems of
    :mod:`lightning_pinn.problems` and common architectures, up to ~700 with a hard constraint's
    product in float32 (a row that fails only costs the fallback to products). A row serving
    points a and b passes only if every code matches by chance, ``|ρ_a − ρ_b|·coupling ≲ tolerance``
    for the golden-ratio code (which separates neighbours by ≥ 0.38) and both random ones (the
    golden code is affine in n, like the n+1 code, so alone it cannot tell two duplicates from
    their midpoint); the odds grow like N²·tolerance² per duplicated pair (a review counted 14
    fooling pairs of 5·10⁷ at N = 10⁴ in float32, and a probe built one at N = 7000); such a row
    is a reordered one, and :func:`lightning_pinn.ntk.jacobian_row_sq_norms` checks three of the
    points of reordered rows (``reordered``) against exact products, besides its six points. In
    float16/bfloat16 the tolerance is capped at 1e-2, and the n+1 codes stop being exact beyond
    2048/256 points (reordered rows are then declined).
    """
    rows = plain.shape[0]
    tolerance = min(ROW_TOLERANCE_EPS * torch.finfo(plain.dtype).eps, 1e-2)
    plain_rows, coded_rows = plain.reshape(rows, -1), coded.reshape(rows, -1)
    plain_norm = torch.linalg.vector_norm(plain_rows, dim=1)
    pivot_index = plain_rows.abs().argmax(dim=1, keepdim=True)
    pivot = plain_rows.gather(1, pivot_index).reshape(-1)
    used = pivot != 0
    ratio = coded_rows.gather(1, pivot_index).reshape(-1) / torch.where(used, pivot, torch.ones_like(pivot))
    code = ratio.round()
    # every comparison is written so that NaN fails it; a non-finite code never becomes an index
    bad = ~torch.isfinite(ratio) | ~torch.isfinite(plain_norm) | ~torch.isfinite(coded_rows).all(dim=1)
    bad |= ~((code >= 1) & (code <= num_points) & ((ratio - code).abs() <= 0.25))
    bad |= ~(torch.linalg.vector_norm(coded_rows - code.reshape(-1, 1) * plain_rows, dim=1) <= tolerance * code.abs() * plain_norm)
    point_of_row = torch.where(used & ~bad, code, torch.ones_like(code)).long().clamp(1, num_points) - 1
    nonzero_elsewhere = (coded_rows != 0).any(dim=1)
    for codes, checked in checks:
        checked_rows = checked.reshape(rows, -1)
        expected = codes.to(plain.dtype)[point_of_row].reshape(-1, 1) * plain_rows
        bad |= ~(torch.linalg.vector_norm(checked_rows - expected, dim=1) <= tolerance * expected.norm(dim=1))
        nonzero_elsewhere |= (checked_rows != 0).any(dim=1)
    if bool((used & bad).any()):
        raise _Unsupported("a row serves several points")
    # a row whose first gradient vanishes must carry no other: contributions that cancel in Σ_n r_n
    if bool((nonzero_elsewhere & ~used).any()):
        raise _Unsupported("a row serves points whose contributions cancel")
    point_of_row = torch.where(used, point_of_row, torch.full_like(point_of_row, -1))
    if rows == num_points and bool((point_of_row == torch.arange(rows, device=point_of_row.device)).all()):
        return None
    return point_of_row


def _backward_of(node: Any, shapes: list[torch.Size | None]) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """``node``'s backward as a function vmap accepts, each input's gradient summed to ``shapes``
    (as the autograd engine does after calling a node); an input without a shape gets a 0."""

    def backward(gradient: Tensor) -> tuple[Tensor, ...]:
        inputs = node(gradient)
        inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        reduced = []
        for value, shape in zip(inputs, shapes, strict=True):
            if shape is None:
                reduced.append(gradient.new_zeros(()))  # not carried on
            elif value is None:
                reduced.append(gradient.new_zeros(shape))  # no gradient for this input: zeros of its shape
            else:
                reduced.append(value if value.shape == shape else value.sum_to_size(shape))
        return tuple(reduced)

    return backward


def _add(pending: dict[Any, Tensor], node: Any, gradient: Tensor) -> None:
    pending[node] = pending[node] + gradient if node in pending else gradient


def _rows(tensor: Tensor | None) -> int | None:
    return None if tensor is None or tensor.dim() == 0 else int(tensor.shape[0])


def _boundary_contributions(node: Any, delta: Tensor, kind: dict[Any, str], shape_of: Callable[[Any], torch.Size]) -> list[_Use]:
    """The uses of the parameter-derived operands of ``node``, given its output gradient ``delta``
    (with ``point_of_row`` still ``None``): for each, its per-row gradients as a function of row
    indices returning ``(len(rows), *operand shape)``, and for a matrix product's operand the same
    as an outer product's factors ``(p, q)`` with their sizes ``(k, m)``."""
    name = type(node).__name__
    num_rows = delta.shape[0]
    children = [child for child, _ in node.next_functions]

    def parameter_side(position: int) -> bool:
        child = children[position] if position < len(children) else None
        return child is not None and kind[child] == "p"

    found: list[_Use] = []
    if name in ("AddmmBackward0", "MmBackward0"):
        left, right = (1, 2) if name == "AddmmBackward0" else (0, 1)
        if parameter_side(left):
            raise _Unsupported("parameters on the left of a matrix product with the points")
        if parameter_side(right):
            points = node._saved_mat1 if name == "AddmmBackward0" else node._saved_self
            scale = node._saved_alpha if name == "AddmmBackward0" else 1
            if _rows(points) != num_rows or points.dim() != 2 or delta.dim() != 2:
                raise _Unsupported("matrix product rows")
            found.append(
                _Use(
                    children[right],
                    None,
                    lambda rows, a=points, d=delta, s=scale: s * a[rows, :, None] * d[rows, None, :],
                    lambda rows, a=points, d=delta, s=scale: (s * a[rows], d[rows]),
                    (int(points.shape[1]), int(delta.shape[1])),
                )
            )
        if name == "AddmmBackward0" and parameter_side(0):
            shape = shape_of(children[0])
            beta = node._saved_beta
            found.append(_Use(children[0], None, lambda rows, d=delta, s=shape, b=beta: _sum_to(b * d[rows], s)))
    elif name in ("MulBackward0", "DivBackward0"):
        numerator, denominator = node._saved_self, node._saved_other
        for position in (0, 1):
            if not parameter_side(position):
                continue
            shape = shape_of(children[position])
            if name == "MulBackward0":  # ∂(a·b)/∂a = b
                other = denominator if position == 0 else numerator
                found.append(
                    _Use(
                        children[position], None, lambda rows, d=delta, o=other, s=shape: _sum_to(d[rows] * _rows_of(o, rows, num_rows), s)
                    )
                )
            elif position == 0:  # ∂(a/b)/∂a = 1/b
                found.append(
                    _Use(children[0], None, lambda rows, d=delta, o=denominator, s=shape: _sum_to(d[rows] / _rows_of(o, rows, num_rows), s))
                )
            else:  # ∂(a/b)/∂b = −a/b²
                found.append(
                    _Use(
                        children[1],
                        None,
                        lambda rows, d=delta, a=numerator, o=denominator, s=shape: _sum_to(
                            -d[rows] * _rows_of(a, rows, num_rows) / o**2,
                            s,  # o: the parameter side, no rows
                        ),
                    )
                )
    elif name in ("AddBackward0", "SubBackward0"):
        alpha = node._saved_alpha
        for position, sign in ((0, 1), (1, alpha if name == "AddBackward0" else -alpha)):
            if parameter_side(position):
                shape = shape_of(children[position])
                found.append(_Use(children[position], None, lambda rows, d=delta, s=shape, c=sign: _sum_to(c * d[rows], s)))
    else:
        raise _Unsupported(f"parameters meet the points in {name}")
    return found


def _rows_of(tensor: Tensor, rows: Tensor | slice, num_rows: int) -> Tensor:
    """The given rows of an operand that has the node's rows; a broadcast operand as it is."""
    if tensor.dim() >= 1 and tensor.shape[0] == num_rows:
        return tensor[rows]
    return tensor
