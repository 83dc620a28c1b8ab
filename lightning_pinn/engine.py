"""One engine per :class:`~lightning_pinn.MultiTermLoss` computes per-term gradients once a step.

Every callback that needs per-term gradients ``g_i = ∇θ L_i`` (the monitor, the balancers)
asks this engine for them at the start of a batch; the engine captures them during the normal
backward pass and hands the same measurement to every callback after the optimizer step.

How the capture works (and why it costs about one backward pass)
------------------------------------------------------------------
On a step where a measurement was requested, :meth:`TermGradientEngine.weighted_total` returns
the total loss ``Σ λ_i L_i`` through a custom autograd function whose inputs are the trainable
parameters. When Lightning (or the user) calls ``backward`` on the total, that function's
backward computes the K per-term gradients with ``torch.autograd.grad`` on the per-term
losses, stores them, and returns ``Σ λ_i g_i`` as the parameters' gradient. So the total
gradient is assembled from the per-term gradients instead of being computed by a second
traversal of the graph: terms evaluated on different point sets touch mostly disjoint parts of
the graph, and the K calls together cost about one ordinary backward.

Because the capture happens inside ``backward``, everything Lightning does around it keeps
working: the cotangent reaching the total carries the AMP loss scale and the
``1/accumulate_grad_batches`` factor, so the parameters receive exactly what a plain backward
would give them, and the stored per-term gradients are divided by that cotangent to recover
``∇θ L_i`` of the unscaled, unweighted losses. Gradients flow into the parameters through the
usual accumulation nodes, so DDP's reducer hooks all-reduce them as usual; the per-term
gradients themselves are rank-local and are all-reduced by :meth:`TermGradientEngine.collect`.

A measurement covers one optimizer step: with gradient accumulation the per-term losses,
gradients and traces are averaged over the micro-batches of the window (that is the gradient
the optimizer steps with); with a closure optimizer (L-BFGS) that evaluates the loss several
times per batch, the last evaluation of each batch counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_pinn.ntk import DEFAULT_CHUNK_SIZE, jacobian_row_sq_norms, sample_points

__all__ = ["TermGradientEngine", "StepMeasurement", "TraceRequest"]


@dataclass(frozen=True)
class TraceRequest:
    """Which NTK traces to compute: all points (``sample_size=None``) or a uniform sample."""

    sample_size: int | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    generator: torch.Generator | None = None

    def merged(self, other: TraceRequest | None) -> TraceRequest:
        """The request that satisfies both ``self`` and ``other`` (exact beats sampled)."""
        if other is None:
            return self
        if self.sample_size is None or other.sample_size is None:
            size = None
        else:
            size = max(self.sample_size, other.sample_size)
        return TraceRequest(size, min(self.chunk_size, other.chunk_size), self.generator or other.generator)


@dataclass(frozen=True)
class StepMeasurement:
    """Per-term quantities of one optimizer step, averaged over its micro-batches and all ranks.

    Attributes:
        step: The optimizer step (``trainer.global_step`` before the step was taken).
        terms: Term names, in the loss's order.
        losses: Unweighted losses ``L_i``, shape ``(K,)``.
        weights: The weights ``λ_i`` used in this step, shape ``(K,)``.
        gradients: ``∇θ L_i`` of the unweighted losses, flattened over the trainable
            parameters, shape ``(K, P)``; ``None`` if not requested.
        traces: Per-point mean NTK traces ``t_i``, shape ``(K,)``; ``None`` if not requested.
        trace_points: Number of points each trace averages over (all ranks), shape ``(K,)``.
        micro_batches: Number of backward passes (over all ranks) the measurement averages.
    """

    step: int
    terms: tuple[str, ...]
    losses: Tensor
    weights: Tensor
    gradients: Tensor | None
    traces: Tensor | None
    trace_points: Tensor | None
    micro_batches: int


@dataclass
class _Capture:
    """What one forward pass in capture mode records; filled in by the backward pass."""

    engine: TermGradientEngine
    batch_key: Any
    params: list[Tensor]
    losses: list[Tensor]
    residuals: list[Tensor]
    names: tuple[str, ...]
    lambdas: Tensor
    loss_values: Tensor  # detached L_i, in the dtype of the weights
    trace_request: TraceRequest | None
    want_gradients: bool
    term_gradients: list[list[Tensor]] | None = None  # per term, per parameter, times the cotangent
    cotangent: Tensor | None = None  # gradient reaching the total: AMP scale × 1/accumulation × user factor
    trace_sums: Tensor | None = None
    trace_counts: Tensor | None = None
    backward_done: bool = False


@dataclass
class _Window:
    """Accumulators for the optimizer step being measured."""

    step: int
    params: list[Tensor]
    want_gradients: bool = False
    trace_request: TraceRequest | None = None
    batch_key: Any = None
    pending: _Capture | None = None
    batches: int = 0
    loss_sum: Tensor | None = None
    weights: Tensor | None = None
    gradient_sum: Tensor | None = None
    trace_sum: Tensor | None = None
    trace_count: Tensor | None = None
    result: StepMeasurement | None = None
    collected: bool = False


class _CapturedTotal(torch.autograd.Function):
    """Identity on the total loss value whose backward assembles ``Σ λ_i ∇θ L_i`` per term."""

    @staticmethod
    def forward(ctx: Any, capture: _Capture, total: Tensor, *params: Tensor) -> Tensor:  # noqa: D102
        ctx.capture = capture
        return total.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        capture: _Capture = ctx.capture
        ctx.capture = None
        param_grads = capture.engine._backward(capture, grad_output)
        return (None, None, *param_grads)


class TermGradientEngine:
    """Computes per-term gradients and NTK traces once per optimizer step, for all callbacks.

    Obtain it with :meth:`for_loss`; callbacks call :meth:`request` at the start of each batch
    of a step they want measured and :meth:`collect` after the optimizer step.
    """

    def __init__(self) -> None:
        self._window: _Window | None = None
        self._capturing = False

    @classmethod
    def for_loss(cls, loss: Any) -> TermGradientEngine:
        """The engine attached to ``loss`` (a :class:`~lightning_pinn.MultiTermLoss`), created once."""
        if loss._engine is None:
            loss._engine = cls()
        return loss._engine

    # ---------------------------------------------------------------- requests
    def request(
        self,
        *,
        step: int,
        batch_key: Any,
        params: Sequence[Tensor],
        gradients: bool = False,
        traces: TraceRequest | None = None,
    ) -> None:
        """Ask for a measurement of optimizer step ``step``; call at the start of each of its batches.

        Several callbacks may ask for the same batch: their requests are merged.
        """
        window = self._window
        if window is None or window.step != step or window.collected:
            window = self._window = _Window(step=step, params=list(params))
        if window.batch_key != batch_key:
            self._commit_pending(window)
            window.batch_key = batch_key
        window.want_gradients = window.want_gradients or gradients
        if traces is not None:
            window.trace_request = traces.merged(window.trace_request)
        self._capturing = True

    def is_capturing(self) -> bool:
        """Whether the next training forward pass should record per-term quantities."""
        return self._capturing

    def stop_capturing(self) -> None:
        """Leave capture mode (e.g. when a batch ends without an optimizer step being measured)."""
        self._capturing = False

    # ---------------------------------------------------------------- forward / backward
    def weighted_total(self, names: tuple[str, ...], residuals: list[Tensor], losses: list[Tensor], lambdas: Tensor) -> Tensor:
        """Return ``Σ λ_i L_i`` whose backward also records the per-term gradients."""
        window = self._window
        assert window is not None
        if window.trace_request is not None:
            for name, residual in zip(names, residuals):
                if residual.dim() == 0:
                    raise ValueError(
                        f"NTK traces need point-wise residuals, but term '{name}' was given as a 0-dim (already reduced) "
                        f"loss. Pass the residual vector for '{name}' (its loss is then the mean of its squares), or "
                        "exclude the term from the NTK balancer."
                    )
        weights = lambdas.detach().clone()
        loss_values = torch.stack([loss.detach() for loss in losses]).to(weights.dtype)
        capture = _Capture(
            engine=self,
            batch_key=window.batch_key,
            params=window.params,
            losses=losses,
            residuals=residuals if window.trace_request is not None else [],
            names=names,
            lambdas=weights,
            loss_values=loss_values,
            trace_request=window.trace_request,
            want_gradients=window.want_gradients,
        )
        window.pending = capture
        return _CapturedTotal.apply(capture, torch.dot(weights, loss_values), *window.params)

    def _backward(self, capture: _Capture, grad_output: Tensor) -> list[Tensor | None]:
        params = capture.params
        if capture.trace_request is not None:
            self._record_traces(capture)
        reached = [False] * len(params)
        per_term: list[list[Tensor]] = []
        for loss in capture.losses:
            grads = torch.autograd.grad(loss, params, grad_outputs=grad_output.to(loss.dtype), retain_graph=True, allow_unused=True)
            filled = []
            for j, (grad, param) in enumerate(zip(grads, params)):
                if grad is None:
                    filled.append(torch.zeros_like(param))
                else:
                    reached[j] = True
                    filled.append(grad)
            per_term.append(filled)
        # Σ_i λ_i ∇θ L_i (already multiplied by the cotangent): the parameters' gradient
        lambdas = capture.lambdas.to(grad_output.device)
        combined = torch._foreach_mul(per_term[0], lambdas[0])
        for i in range(1, len(per_term)):
            torch._foreach_add_(combined, torch._foreach_mul(per_term[i], lambdas[i]))
        if capture.want_gradients:
            capture.term_gradients = per_term
            capture.cotangent = grad_output.detach()
        capture.backward_done = True
        capture.losses = []
        capture.residuals = []
        return [grad if hit else None for grad, hit in zip(combined, reached)]

    def _record_traces(self, capture: _Capture) -> None:
        request = capture.trace_request
        assert request is not None
        sums, counts = [], []
        for residual in capture.residuals:
            points = sample_points(residual.numel(), request.sample_size, request.generator)
            values = jacobian_row_sq_norms(residual, capture.params, points, request.chunk_size)
            sums.append(values.to(torch.float64).sum())
            counts.append(float(values.numel()))
        capture.trace_sums = torch.stack(sums)
        capture.trace_counts = torch.tensor(counts, dtype=torch.float64, device=capture.trace_sums.device)

    # ---------------------------------------------------------------- collecting
    def _commit_pending(self, window: _Window) -> None:
        capture, window.pending = window.pending, None
        if capture is None or not capture.backward_done:
            return
        window.batches += 1
        values = capture.loss_values.to(torch.float64)
        window.loss_sum = values if window.loss_sum is None else window.loss_sum + values
        window.weights = capture.lambdas
        if capture.term_gradients is not None and capture.cotangent is not None:
            dtype = torch.float64 if any(p.dtype == torch.float64 for p in capture.params) else torch.float32
            flat = torch.stack([torch.cat([g.reshape(-1) for g in grads]).to(dtype) for grads in capture.term_gradients])
            grads = flat / capture.cotangent.to(dtype)  # ∇θ L_i of the unscaled, unweighted loss
            window.gradient_sum = grads if window.gradient_sum is None else window.gradient_sum + grads
        if capture.trace_sums is not None:
            window.trace_sum = capture.trace_sums if window.trace_sum is None else window.trace_sum + capture.trace_sums
            window.trace_count = capture.trace_counts if window.trace_count is None else window.trace_count + capture.trace_counts

    def collect(
        self,
        step: int,
        terms: tuple[str, ...],
        all_reduce_sum: Callable[[Tensor], Tensor] | None = None,
    ) -> StepMeasurement | None:
        """The measurement of optimizer step ``step``, reduced over ranks; ``None`` if there is none.

        Call after the optimizer step, on every rank (the reduction is a collective whose shape
        depends only on what was requested, never on local data). The first call does the work
        and later calls for the same step return the same object.
        """
        self._capturing = False
        window = self._window
        if window is None or window.step != step:
            return None
        if window.collected:
            return window.result
        self._commit_pending(window)
        window.collected = True
        window.result = self._reduce(window, terms, all_reduce_sum)
        return window.result

    def _reduce(self, window: _Window, terms: tuple[str, ...], all_reduce_sum: Callable[[Tensor], Tensor] | None) -> StepMeasurement | None:
        num_terms = len(terms)
        want_traces = window.trace_request is not None
        if all_reduce_sum is None:  # one process: nothing to exchange
            batches = window.batches
            loss_sum, trace_sum, trace_count, gradient_sum = window.loss_sum, window.trace_sum, window.trace_count, window.gradient_sum
            weights = window.weights
            if batches == 0 or loss_sum is None or weights is None:
                return None
            weights = weights.to(torch.float64)
        else:
            num_params = sum(p.numel() for p in window.params)
            device = window.params[0].device if window.params else torch.device("cpu")
            # The packed shape depends only on what was requested, never on local data, so every
            # rank joins the same collective even if its own batch produced no capture.
            sizes = [1, num_terms, num_terms]
            parts = [
                torch.tensor([float(window.batches)], dtype=torch.float64, device=device),
                _or_zeros(window.loss_sum, (num_terms,), device),
                _or_zeros(window.weights, (num_terms,), device).to(torch.float64) * window.batches,
            ]
            if want_traces:
                sizes += [num_terms, num_terms]
                parts += [_or_zeros(window.trace_sum, (num_terms,), device), _or_zeros(window.trace_count, (num_terms,), device)]
            if window.want_gradients:
                sizes.append(num_terms * num_params)
                parts.append(_or_zeros(window.gradient_sum, (num_terms, num_params), device).reshape(-1))
            packed = all_reduce_sum(torch.cat([part.to(device=device, dtype=torch.float64).reshape(-1) for part in parts]))
            chunks = list(packed.split(sizes))
            batches = int(chunks.pop(0).item())
            if batches == 0:
                return None
            loss_sum, weights = chunks.pop(0), chunks.pop(0) / batches
            trace_sum, trace_count = (chunks.pop(0), chunks.pop(0)) if want_traces else (None, None)
            gradient_sum = chunks.pop(0).reshape(num_terms, num_params) if window.want_gradients else None
        return StepMeasurement(
            step=window.step,
            terms=terms,
            losses=loss_sum / batches,
            weights=weights,
            gradients=None if gradient_sum is None else gradient_sum / batches,
            traces=None if trace_sum is None or trace_count is None else trace_sum / trace_count,
            trace_points=trace_count,
            micro_batches=batches,
        )


def _or_zeros(value: Tensor | None, shape: tuple[int, ...], device: torch.device) -> Tensor:
    return value if value is not None else torch.zeros(shape, dtype=torch.float64, device=device)
