"""Diagonal blocks of the empirical neural tangent kernel (NTK) of a PINN.

For a term with point-wise residual ``r_i(x)`` the diagonal block of the NTK is
``K_ii = J_i J_iᵀ`` with ``J_i = ∂r_i/∂θ`` (one row per point). Wang, Yu & Perdikaris 2022
("When and why PINNs fail to train: a neural tangent kernel perspective", J. Comput. Phys.
449, 110768) weight the terms by the traces of these blocks; following the 2023 guide
(Wang, Sankaran, Wang & Perdikaris, arXiv:2308.08468) we use the per-point mean

    t_i = (1/N_i) · Σ_x ‖∂r_i(x)/∂θ‖²  =  tr(K_ii) / N_i.

This module computes ``‖∂r(x)/∂θ‖²`` for a set of points from a residual tensor that still
holds its autograd graph. First it tries :mod:`lightning_pinn.point_gradients`: every point's
value from four or five backward passes, for residuals whose graph rows each serve one point, and keeps those values
if they match vector-Jacobian products on six to nine points (:func:`_agrees_with_products`). Otherwise it uses
batched vector-Jacobian products (one-hot cotangents, vmapped by ``torch.func.vmap`` around
``torch.autograd.grad``) in chunks so that memory stays bounded, or one product per point where
batching does not pay (large N on a CPU, see :func:`auto_chunk_size`). A graph whose backward
cannot be vmapped (a custom ``autograd.Function`` that leaves torch, e.g. through numpy) falls
back to the per-point products, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_pinn.point_gradients import _NO_BATCHING_RULE, _OUT_OF_MEMORY, one_pass_row_sq_norms

__all__ = ["jacobian_row_sq_norms", "sample_points", "auto_chunk_size", "CHUNK_BUDGET", "ACCELERATOR_CHUNK_BUDGET"]

#: CPU: target working set of one batched vector-Jacobian product (used where the one-pass
#: method of :mod:`lightning_pinn.point_gradients` does not apply), in values: points per chunk
#: c × points in the residual N × the network's width, estimated as √(number of parameters).
#: The residual's graph runs over all N points, so each product costs O(N) whatever the
#: cotangent, and exact traces cost O(N²) in total; batching only amortises the per-call
#: overhead, and a working set beyond the caches makes it slower than one call per point.
#: Measured with ``benchmarks/ntk_cost.py``-style timings on 2 CPU cores (1-32-32-32-1 and
#: 2-128-128-128-1 tanh MLPs, second-derivative residuals): the best chunk keeps c·N·√P near
#: 4·10⁵, and below 8 points per chunk a plain loop of one product per point is as fast or faster
#: (N ≳ 1000 for the 3×32 network, N ≳ 300 for 3×128).
CHUNK_BUDGET = 400_000

#: Widest residual ``(N, c)`` whose columns get the one-pass route one at a time (each column
#: costs four or five backward passes); wider residuals are tried as one flat residual only.
MAX_ONE_PASS_COLUMNS = 16

#: A residual ``(N, c)`` with at most this many columns is tried column by column first (a system of equations).
FEW_COLUMNS = 4

#: GPU (any non-CPU device): points per chunk × N. Per-call latency dominates there, so larger
#: chunks pay (measured on an H100: one unchunked batch ran 4× faster than chunks of this budget,
#: at N² memory); this keeps memory bounded while amortising the launches.
ACCELERATOR_CHUNK_BUDGET = 16384


def auto_chunk_size(num_points: int, num_parameters: int, device: torch.device | str = "cpu") -> int:
    """Points per batched vector-Jacobian product for a residual of ``num_points`` points.

    CPU: ``CHUNK_BUDGET / (N·√P)`` within ``[1, N]``, and 1 (one product per point, no vmap)
    where that is below 8. Other devices: ``ACCELERATOR_CHUNK_BUDGET / N`` within ``[8, N]``.
    """
    num_points = max(num_points, 1)
    if torch.device(device).type != "cpu":
        return max(1, min(num_points, max(8, ACCELERATOR_CHUNK_BUDGET // num_points)))
    chunk = int(CHUNK_BUDGET / (num_points * max(num_parameters, 1) ** 0.5))
    return min(num_points, chunk) if chunk >= 8 else 1


def jacobian_row_sq_norms(
    residual: Tensor,
    params: Sequence[Tensor],
    points: Tensor | None = None,
    chunk_size: int | None = None,
    term: str | None = None,
    warned: set[str] | None = None,
    one_pass: bool = True,
) -> Tensor:
    """Return ``‖∂r(x)/∂θ‖²`` for the selected points of ``residual``.

    Args:
        residual: Point-wise residual with its autograd graph (any shape; points are its
            elements in row-major order). For a complex residual a point's value is
            ``‖∂Re r/∂θ‖² + ‖∂Im r/∂θ‖²``.
        params: The parameters ``θ``; a parameter the residual does not reach contributes 0.
        points: Flat indices of the points to evaluate (default: all points).
        chunk_size: Points per batched vector-Jacobian product (default: :func:`auto_chunk_size`);
            1 computes one product per point, without vmap.
        term: The loss term ``residual`` belongs to, named in warnings.
        warned: Terms already warned about falling back to one product per point: the
            warning is given only for a term not in it, which is then added (one warning per
            term across calls). ``None``: warn on every call that falls back.
        one_pass: Try :func:`lightning_pinn.point_gradients.one_pass_row_sq_norms` first (all
            points from four or five backward passes, for a real residual whose graph rows each serve one point),
            and use its values when they match vector-Jacobian products on a few points
            (:func:`_agrees_with_products`, on the rows :func:`_check_rows` picks); otherwise, or with ``False``, the products for every point.

    Returns:
        A float tensor of shape ``(len(points),)``. The graph of ``residual`` is retained.
    """
    if residual.dim() == 0:
        raise ValueError("jacobian_row_sq_norms needs a point-wise residual, got a 0-dim tensor.")
    params = list(params)
    if chunk_size is None:
        chunk_size = auto_chunk_size(residual.numel(), sum(p.numel() for p in params), residual.device)
    if chunk_size < 1:
        raise ValueError(
            f"jacobian_row_sq_norms: chunk_size must be an integer >= 1 (points per batched product), or None for the automatic "
            f"size (lightning_pinn.ntk.auto_chunk_size: a fixed budget of points x parameters per product); got {chunk_size}."
        )
    components = 2 if residual.is_complex() else 1
    with torch.enable_grad():  # may run inside a backward pass, where grad mode is off
        flat = torch.view_as_real(residual).reshape(-1) if components == 2 else residual.reshape(-1)
    num_points = residual.numel()
    if points is None:
        points = torch.arange(num_points, device=residual.device)
    elif points.dtype == torch.bool or points.is_floating_point() or points.is_complex():
        raise TypeError(f"points must be integer (flat) indices of the residual's points, got a {points.dtype} tensor.")
    else:
        points = points.to(device=residual.device, dtype=torch.long).reshape(-1)
    out_dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    if one_pass and components == 1 and num_points > len(_check_rows(num_points)):
        reordered: list[Tensor] = []
        every_point = _one_pass_values(residual, flat, params, out_dtype, reordered)
        if every_point is not None and _agrees_with_products(every_point, flat, params, out_dtype, reordered):
            return every_point[points]
    # The output is allocated once, before the loop: small tensors kept alive between the chunks'
    # large, short-lived buffers pin holes in the allocator's heap, and the process's peak memory
    # then grows with N although the live working set (one chunk) does not.
    values = torch.zeros(len(points), dtype=out_dtype, device=flat.device)
    if len(points) == 0:
        return values
    batched = chunk_size > 1
    for chunk, squared in zip(points.split(chunk_size), values.split(chunk_size)):
        rows = chunk.repeat_interleave(components) * components
        if components == 2:
            rows = rows + torch.arange(2, device=rows.device).repeat(len(chunk))
        if batched:
            try:
                row_values = _vmapped_row_sq_norms(flat, params, rows, out_dtype)
            except _OUT_OF_MEMORY:
                raise
            except RuntimeError as error:
                if "can't allocate memory" in str(error) or "donated buffers" in str(error):
                    raise  # the CPU allocator's out-of-memory; a compiled backward refusing retain_graph
                # Not every backward can run under vmap (a custom Function that leaves torch).
                # Any other failure recurs in the plain loop below and propagates from there.
                row_values = _looped_row_sq_norms(flat, params, rows, out_dtype)
                batched = False
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
                of_term = f" of term '{term}'" if term is not None else ""
                if warned is None or (term or "") not in warned:
                    if warned is not None:
                        warned.add(term or "")
                    warnings.warn(
                        f"lightning_pinn.ntk: the backward of the residual{of_term} cannot be vmapped ({reason}); "
                        "its NTK traces are computed with one torch.autograd.grad call per point instead (exact, "
                        "slower). To speed them up, use NTKBalancer(trace_points=...) or make the backward "
                        "vmappable (e.g. a custom autograd.Function using torch operations only).",
                        stacklevel=2,
                    )
        else:
            row_values = _looped_row_sq_norms(flat, params, rows, out_dtype)
        # one value per (point, real/imaginary part); a point's value sums its parts
        squared += row_values.reshape(len(chunk), components).sum(dim=1)
    return values


def _one_pass_values(
    residual: Tensor, flat: Tensor, params: list[Tensor], out_dtype: torch.dtype, reordered: list[Tensor]
) -> Tensor | None:
    """:func:`~lightning_pinn.point_gradients.one_pass_row_sq_norms` of every point of ``residual``.

    A residual of shape ``(N, c)`` (a system of ``c ≤ MAX_ONE_PASS_COLUMNS`` equations from one
    network call) has ``c`` values per graph row; each column has one, so the columns are done
    one at a time and interleaved back into the residual's row-major order. A residual on a grid
    ``(Nx, Nt)`` from one call on the flattened points has one graph row per entry: the flat
    residual is tried as well, first where the trailing size exceeds ``FEW_COLUMNS`` (a grid
    more likely than a system). ``reordered`` is filled as by ``one_pass_row_sq_norms``, with
    indices into ``flat``.
    """
    columns = residual.numel() // residual.shape[0] if residual.dim() >= 2 and residual.shape[0] > 0 else 1
    if columns == 1:
        return one_pass_row_sq_norms(flat, params, out_dtype, reordered)
    for as_flat in (False, True) if columns <= FEW_COLUMNS else (True, False):
        reordered.clear()
        if as_flat:
            values = one_pass_row_sq_norms(flat, params, out_dtype, reordered)
        else:
            values = _by_columns(residual, params, out_dtype, columns, reordered)
        if values is not None:
            return values
    return None


def _by_columns(residual: Tensor, params: list[Tensor], out_dtype: torch.dtype, columns: int, reordered: list[Tensor]) -> Tensor | None:
    if columns > MAX_ONE_PASS_COLUMNS:
        return None  # each column costs four or five backward passes
    with torch.enable_grad():
        table = residual.reshape(residual.shape[0], columns)
        column_residuals = [table[:, column] for column in range(columns)]
    per_column = []
    for column, column_residual in enumerate(column_residuals):
        in_column: list[Tensor] = []
        values = one_pass_row_sq_norms(column_residual, params, out_dtype, in_column)
        if values is None:
            return None
        reordered += [points * columns + column for points in in_column]  # the entries' indices in the flat residual
        per_column.append(values)
    return torch.stack(per_column, dim=1).reshape(-1)


def _check_rows(num_points: int) -> list[int]:
    """Points on which one-pass values are checked: the first, the last and two spread between
    (:func:`_agrees_with_products` adds the largest and the smallest value)."""
    return sorted({0, num_points // 3, (2 * num_points) // 3 + 1, num_points - 1} & set(range(num_points)))


def _agrees_with_products(
    values: Tensor, flat: Tensor, params: list[Tensor], out_dtype: torch.dtype, reordered: Sequence[Tensor] = ()
) -> bool:
    """Whether one-pass ``values`` match vector-Jacobian products on :func:`_check_rows`, at the
    points of the largest and the smallest value (where a wrong value stands out most), and at
    the first, middle and last of the ``reordered`` points (served by rows of another index:
    where a row serving two points could pass the row tests by chance, it is one of these).

    A residual whose points mix (``u(x_n) − u(x_{n+1})``) gives values off by the other points'
    gradients, far outside the tolerance (1e-3 relative where the residual or a parameter is
    float32 or narrower, 1e-9 where all are float64, against the rounding differences of two
    orders of summation: a float32 network's residual cast to float64 carries float32 rounding).
    """
    extremes = [int(values.argmax()), int(values.argmin())] if bool(torch.isfinite(values).all()) else []
    moved = torch.unique(torch.cat(list(reordered))) if reordered else torch.zeros(0, dtype=torch.long)  # sorted
    spread = moved[torch.tensor([0, len(moved) // 2, len(moved) - 1], device=moved.device)].tolist() if len(moved) else []
    rows = torch.tensor(sorted(set(_check_rows(flat.numel()) + extremes + spread)), device=flat.device)
    # one plain product per point: vmap over the user's graph would leave batched tensors in the
    # .grad of any intermediate tensor the user called retain_grad() on
    exact = _looped_row_sq_norms(flat, params, rows, out_dtype)
    fast = values[rows]
    if not bool(torch.isfinite(fast).all()) or not bool(torch.isfinite(exact).all()):
        return False
    all_float64 = flat.dtype == torch.float64 and all(p.dtype in (torch.float64, torch.complex128) for p in params)
    rtol = 1e-9 if all_float64 else 1e-3
    scale = torch.maximum(exact.abs(), fast.abs()) + rtol * values.abs().mean()
    return bool(((fast - exact).abs() <= rtol * scale).all())


def _squared_norm(grads: Sequence[Tensor | None], out_dtype: torch.dtype, device: torch.device) -> Tensor:
    """``Σ ‖g‖²`` over the gradients (``None``: a parameter not reached, contributing 0)."""
    total = torch.zeros((), dtype=out_dtype, device=device)
    for grad in grads:
        if grad is not None:  # a complex parameter's gradient counts its real and imaginary parts
            total = total + (torch.view_as_real(grad) if grad.is_complex() else grad).to(out_dtype).square().sum()
    return total


def _vmapped_row_sq_norms(flat: Tensor, params: list[Tensor], rows: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``‖∂flat[row]/∂θ‖²`` for each row, by vector-Jacobian products vmapped over one-hot cotangents."""
    cotangents = torch.zeros(len(rows), flat.numel(), dtype=flat.dtype, device=flat.device)
    cotangents[torch.arange(len(rows), device=rows.device), rows] = 1

    def squared_norm(cotangent: Tensor) -> Tensor:
        grads = torch.autograd.grad(flat, params, grad_outputs=cotangent, retain_graph=True, allow_unused=True)
        return _squared_norm(grads, out_dtype, flat.device)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE)
        return torch.func.vmap(squared_norm)(cotangents)


def _looped_row_sq_norms(flat: Tensor, params: list[Tensor], rows: Tensor, out_dtype: torch.dtype) -> Tensor:
    """The same values as :func:`_vmapped_row_sq_norms`, one ``torch.autograd.grad`` call per row."""
    values = torch.zeros(len(rows), dtype=out_dtype, device=flat.device)
    # not flat[row]: indexing needs grad mode, which is off inside a backward pass
    cotangent = torch.zeros_like(flat)
    for index, row in enumerate(rows.tolist()):
        cotangent[row] = 1
        grads = torch.autograd.grad(flat, params, grad_outputs=cotangent, retain_graph=True, allow_unused=True)
        values[index] = _squared_norm(grads, out_dtype, flat.device)
        cotangent[row] = 0  # after the squares: a gradient may be a view of the cotangent
    return values


def sample_points(num_points: int, sample_size: int | None, generator: torch.Generator | None) -> Tensor | None:
    """Indices of a uniform sample of ``sample_size`` points without replacement.

    Returns ``None`` (meaning: all points) when ``sample_size`` is ``None`` or not smaller
    than ``num_points``. The mean of ``‖∂r(x)/∂θ‖²`` over such a sample is an unbiased
    estimate of the trace ``t_i``; its relative standard error is
    ``sqrt((1 − m/N)/m) · s/t`` where ``s`` is the standard deviation of the per-point values
    over all N points with divisor N − 1 (exact for sampling without replacement).
    """
    if sample_size is None or sample_size >= num_points:
        return None
    return torch.randperm(num_points, generator=generator)[:sample_size]
