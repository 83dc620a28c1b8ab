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
working: the cotangent ``c`` reaching the total carries the AMP loss scale and the
``1/accumulate_grad_batches`` factor. Term i's backward starts from ``λ_i · c``, as in a plain
backward, so the parameters receive what a plain backward would give them (also through a
bfloat16/float16 autocast graph, which is not linear in its cotangent), up to the order in
which the K gradients are summed; the stored per-term gradients are divided by ``λ_i · c`` to
recover ``∇θ L_i`` of the unscaled, unweighted losses. Gradients flow into the parameters through the
usual accumulation nodes, so DDP's reducer hooks all-reduce them as usual; the per-term
gradients themselves are rank-local and are all-reduced by :meth:`TermGradientEngine.collect`.

A measurement covers one optimizer step: with gradient accumulation the per-term losses,
gradients and traces are averaged over the micro-batches of the window (that is the gradient
the optimizer steps with). Only a call of the loss whose result is backpropagated counts: a
second call in the same training step whose result is discarded (e.g. evaluated for logging) is
ignored, and so is a call only differentiated by ``torch.autograd.grad`` (e.g. for ``∂L/∂x``)
when another call's backward reaches the parameters' ``.grad``. Several backpropagated calls in
one batch are told apart at their backward:

* the gradients were zeroed since the previous call's backward, with the same parameters
  trainable: a closure optimizer (L-BFGS) evaluating the loss again; the last evaluation counts
  (only the optimizers' parameters are looked at: a trainable leaf outside them keeps its
  gradient);
* every parameter the call trains was trained by an earlier call and stepped by its optimizer
  since (manual optimisation with an inner loop of ``zero_grad``, backward, ``step``, or a
  second optimizer stepped ``n_critic`` times): a later step's call, not measured (the
  optimizers' steps are watched with step hooks while a measured batch runs);
* the gradients were not zeroed (``loss = criterion(...) + criterion(...)``, or manual
  optimisation calling ``manual_backward`` on chunks of points before one ``step``):
  micro-batches of the step, averaged as above. The same test runs between the batches of a
  step not yet taken: a batch whose gradients the next one zeroed before its backward (manual
  optimisation that skipped a step) is dropped from the measurement;
* the trainable parameters changed to a disjoint set (manual optimisation with one optimizer per
  parameter group, Lightning's ``toggle_optimizer`` pattern): parts of one measurement, each
  parameter's gradient from the call in which it was trainable (traces add up).

Each parameter's gradient is averaged over the micro-batches (and ranks) where the term was
present and the parameter trained. Two limits: calls only ever differentiated by
``torch.autograd.grad`` (gradients assigned to ``.grad`` by hand) cannot be told apart from a
closure's re-evaluations, so the last one counts; and the average is per call, so under DDP a
rank that splits its loss into several calls (``(criterion(a) + criterion(b)) / 2``) weighs more
than one that makes one call (the mean differs from the DDP gradient by the spread between them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_pinn.loss import wider_dtype
from lightning_pinn.ntk import jacobian_row_sq_norms, sample_points

__all__ = ["TermGradientEngine", "StepMeasurement", "TraceRequest"]


@dataclass(frozen=True)
class TraceRequest:
    """Which NTK traces to compute: all points (``sample_size=None``) or a uniform sample."""

    sample_size: int | None = None
    chunk_size: int | None = None  # None: lightning_pinn.ntk.auto_chunk_size
    generator: torch.Generator | None = None
    untraced_ok: frozenset[str] = frozenset()  # terms that may be given as 0-dim losses (they get no trace)
    #: terms already warned about (traces computed without vmap): the requester's, one warning per term and fit
    fallback_warned: set[str] | None = field(default=None, compare=False)
    #: try the O(N) per-point route (``lightning_pinn.point_gradients``) before vector-Jacobian products
    one_pass: bool = True

    def merged(self, other: TraceRequest | None) -> TraceRequest:
        """The request that satisfies both ``self`` and ``other`` (exact beats sampled)."""
        if other is None:
            return self
        if self.sample_size is None or other.sample_size is None:
            size = None
        else:
            size = max(self.sample_size, other.sample_size)
        chunks = [c for c in (self.chunk_size, other.chunk_size) if c is not None]
        untraced_ok = self.untraced_ok & other.untraced_ok  # a term one requester needs a trace of must have one
        warned = self.fallback_warned if self.fallback_warned is not None else other.fallback_warned
        one_pass = self.one_pass and other.one_pass  # a requester that switched it off gets products
        return TraceRequest(size, min(chunks) if chunks else None, self.generator or other.generator, untraced_ok, warned, one_pass)


@dataclass(frozen=True)
class StepMeasurement:
    """Per-term quantities of one optimizer step, averaged over its micro-batches and all ranks.

    Attributes:
        step: The optimizer step (``trainer.global_step`` before the step was taken).
        terms: Term names, in the loss's order.
        losses: Unweighted losses ``L_i`` (mean over the micro-batches where the term was
            present), shape ``(K,)``; ``nan`` for a term absent from the whole step.
        weights: The weights ``λ_i`` used in this step, shape ``(K,)``.
        present: Whether each term was given (not ``None``) in at least one micro-batch.
        reached: Whether each term's gradient reached at least one trainable parameter
            (``None`` if gradients were not requested). A present term that never reaches a
            parameter has a zero gradient by construction, not by accident.
        gradients: ``∇θ L_i`` of the unweighted losses, flattened over the trainable
            parameters, shape ``(K, P)``: the mean over the step's micro-batches and ranks
            where the term was present, like ``losses`` (so with every term present, the
            gradient the optimizer steps with); ``None`` if not requested.
        traces: Per-point mean NTK traces ``t_i``, shape ``(K,)``; ``None`` if not requested,
            ``nan`` for an absent term.
        trace_points: Number of points each trace is the per-point mean over (all ranks and
            micro-batches; a sampled trace estimates that mean from ``trace_points`` of them per
            micro-batch), shape ``(K,)``.
        micro_batches: Number of backward passes (over all ranks) the measurement averages.
    """

    step: int
    terms: tuple[str, ...]
    losses: Tensor
    weights: Tensor
    present: Tensor
    reached: Tensor | None
    gradients: Tensor | None
    traces: Tensor | None
    trace_points: Tensor | None
    micro_batches: int


@dataclass
class _Capture:
    """What one forward pass in capture mode records; filled in by the backward pass."""

    engine: TermGradientEngine
    params: list[Tensor]  # the window's parameters (their order is the layout of the flat gradients)
    losses: list[Tensor | None]  # None: the term is absent from this micro-batch
    present: list[bool]
    residuals: list[Tensor | None]
    lambdas: Tensor
    loss_values: Tensor  # detached L_i (0 where absent), in the wider of the losses' and the weights' dtypes
    trace_request: TraceRequest | None
    want_gradients: bool
    trainable: list[bool] | None = None  # which of ``params`` required grad at the forward pass
    layout: list[bool] | None = None  # which of ``params`` the flat gradients cover (the window's first forward)
    term_gradients: list[list[Tensor]] | None = None  # per term, per trainable parameter, times the term's cotangent
    reached: list[bool] | None = None
    cotangent: Tensor | None = None  # per term, what its backward started from: λ_i × the total's cotangent
    trace_sums: Tensor | None = None
    trace_counts: Tensor | None = None
    backward_done: bool = False
    after_any_backward: bool = False  # called after an earlier call's backward (of any kind) in the same batch
    after_backward: bool = False  # called after an earlier call's backward into the parameters' .grad
    previous: _Capture | None = None  # that earlier call (if after_backward)
    mode: str = ""  # set at the backward: "backward" (into .grad), "grad" (torch.autograd.grad), "none" (not into θ)
    reached_params: list[bool] | None = None  # which of ``params`` the backward gave a gradient (gradient path)
    restarts: bool = False  # set at the backward: a new evaluation of the batch (L-BFGS closure), not a micro-batch
    names: tuple[str, ...] = ()  # the terms, in the order of ``losses`` (set where traces are recorded)
    release_graph: Callable[[], None] | None = None  # drops the loss module's references to this call's graph
    steps_mark: int | None = None  # how many optimizer steps the window had seen at the forward pass (None: not watched)
    optimizers: Callable[[], Sequence[torch.optim.Optimizer]] | None = None  # whose zero_grad zeroes which parameters


#: Per-term accumulators of a window, in the order they are packed for the all-reduce.
_SUMS = ("weights", "losses", "present", "reached", "trace_sum", "trace_count")


@dataclass
class _Window:
    """Accumulators for the optimizer step being measured (sums over its micro-batches)."""

    step: int
    params: list[Tensor]  # all of the module's parameters; those requiring grad are read at each forward pass
    params_source: Callable[[], Iterable[Tensor]] | None = None  # re-read at the window's first forward (see read_params)
    optimizers: Callable[[], Sequence[torch.optim.Optimizer]] | None = None  # the trainer's optimizers
    steps_taken: list[torch.optim.Optimizer] = field(default_factory=list)  # each optimizer step since the window opened, in order
    step_hooks: list[Any] | None = None  # the handles of the optimizers' step hooks that fill steps_taken
    layout: list[bool] | None = None  # the parameters that required grad at the window's first forward pass
    want_gradients: bool = False
    trace_request: TraceRequest | None = None
    batch_key: Any = None
    pending: list[_Capture] = field(default_factory=list)  # this batch's calls of the loss, in order
    batches: int = 0
    sums: dict[str, Tensor] = field(default_factory=dict)  # each (K,), float64
    gradient_sum: Tensor | None = None  # (K, P)
    trained_count: Tensor | None = None  # (K, len(params)): micro-batches where the term was present and the parameter trained
    only: _Capture | None = None  # the window's single micro-batch, until a second one arrives
    last_committed: _Capture | None = None  # the last call of the batches committed so far that reached .grad
    result: StepMeasurement | None = None
    collected: bool = False

    def read_params(self) -> None:
        """Take the module's parameters as they are at the window's first forward pass.

        A parameter registered during the fit (a layer grown at some step and handed to the
        optimizer, possibly in a hook that runs after the request) is measured from the next
        window whose first forward sees it; the window keeps that list for its other micro-batches.
        """
        if self.params_source is not None:
            self.params = list(self.params_source())
            self.params_source = None

    def add(self, name: str, value: Tensor) -> None:
        value = value.to(torch.float64)
        self.sums[name] = value if name not in self.sums else self.sums[name] + value

    def watch_optimizers(self) -> None:
        """Note every step of the trainer's optimizers from now on (see :func:`_this_step_only`)."""
        if self.step_hooks is not None or self.optimizers is None:
            return
        record = self.steps_taken.append
        self.step_hooks = [
            optimizer.register_step_post_hook(lambda optimizer, args, kwargs: record(optimizer)) for optimizer in self.optimizers()
        ]

    def unwatch_optimizers(self) -> None:
        """Stop noting the optimizers' steps (at the collect, the release, or a new window)."""
        for handle in self.step_hooks or []:
            handle.remove()
        self.step_hooks = None

    def restart(self) -> None:
        """Drop the micro-batches committed so far: their gradients were zeroed before the step."""
        self.batches, self.sums, self.gradient_sum, self.trained_count, self.only = 0, {}, None, None, None

    def relayout(self, layout: list[bool]) -> None:
        """Cover the parameters of ``layout`` (a superset of the current one): the gradient sums
        so far get zero columns for the added parameters."""
        if self.layout is not None and layout != self.layout and self.gradient_sum is not None:
            self.gradient_sum = _pad_columns(self.gradient_sum, self.params, self.layout, layout)
        self.layout = layout


class _CapturedTotal(torch.autograd.Function):
    """Identity on the total loss value whose backward assembles ``Σ λ_i ∇θ L_i`` per term.

    Its inputs are every tensor a plain backward of the total would give a gradient to: the
    trainable parameters and any other leaf of the graph that requires grad (collocation points,
    a coefficient kept outside the module's parameters). The per-term losses and residuals are
    held by the node, so they are freed with the graph. A backward may run more than once (e.g.
    the user differentiates the returned loss with ``retain_graph=True`` before Lightning's own
    backward): each run recomputes the capture, and the last one counts.
    """

    @staticmethod
    def forward(ctx: Any, capture: _Capture, total: Tensor, *inputs: Tensor) -> Tensor:  # noqa: D102
        ctx.capture, ctx.inputs = capture, inputs
        ctx.losses, ctx.residuals = capture.losses, capture.residuals
        capture.losses, capture.residuals = [], []
        return total.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        # Not @once_differentiable: under ``create_graph=True`` (a Hessian-vector product, a
        # gradient penalty) autograd runs this with grad mode on, and the gradient returned is
        # then built differentiably from the per-term gradients (see ``_backward``); otherwise
        # grad mode is off here, as with once_differentiable.
        capture: _Capture = ctx.capture
        if ctx.losses is None:
            raise RuntimeError(_SECOND_BACKWARD)
        keeps_graph = _backward_keeps_graph()
        try:
            # the inputs' own tensor hooks run once, when they receive the sum returned below
            with _leaf_hooks_suspended(ctx.inputs):
                grads = capture.engine._backward(capture, ctx.losses, ctx.residuals, ctx.inputs, grad_output)
        except RuntimeError as error:
            if _DONATED_BUFFERS in str(error):
                raise RuntimeError(_COMPILED_WITH_DONATED_BUFFERS) from error
            if any(text in str(error) for text in _REENTRANT_CHECKPOINT):
                raise RuntimeError(_CHECKPOINTED_REENTRANTLY) from error
            raise
        if not keeps_graph:
            # The per-term passes kept the graph (retain_graph=True), but this backward does not:
            # nothing can differentiate this call again, so let its saved tensors go as a plain
            # backward would (else the loss's last_residuals kept the whole graph's activations
            # alive until the next step, or after the fit).
            ctx.losses = ctx.residuals = None
            if capture.release_graph is not None:
                capture.release_graph()
        return (None, None, *grads)


def _backward_keeps_graph() -> bool:
    """Whether the running backward keeps its graph (``retain_graph=True``); ``True`` where PyTorch does not say."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if query is None:
        return True
    try:
        return bool(query())
    except RuntimeError:
        return True


_SECOND_BACKWARD = (
    "Trying to backward through the graph a second time: lightning-pinn's per-term measurement of this loss freed "
    "the graph after its first backward, as PyTorch does. Specify retain_graph=True on the first backward (or "
    "manual_backward) if you need to backpropagate through the same loss twice."
)


#: PyTorch's error when a torch.compile'd backward that donated its buffers is run with retain_graph=True.
_DONATED_BUFFERS = "donated buffers"

_COMPILED_WITH_DONATED_BUFFERS = (
    "lightning-pinn: a torch.compile'd part of the model has a compiled backward that frees its buffers after one "
    "use ('donated buffers'), but measuring per-term gradients (and NTK traces) differentiates each term through the "
    "shared graph, which needs retain_graph=True. Before the fit, set `import torch._functorch.config; "
    "torch._functorch.config.donated_buffer = False` (the model stays compiled; the measurements are exact), or "
    "remove GradientNormMonitor and the balancers from the Trainer."
)


#: PyTorch's error when torch.autograd.grad meets activation checkpointing with use_reentrant=True
#: (its wording in recent versions, and in older ones).
_REENTRANT_CHECKPOINT = ("use_reentrant=True", "Checkpointing is not compatible with .grad()")

_CHECKPOINTED_REENTRANTLY = (
    "lightning-pinn: the model uses activation checkpointing (torch.utils.checkpoint) with use_reentrant=True, which "
    "PyTorch can only differentiate with a plain backward, but measuring per-term gradients (and NTK traces) "
    "differentiates each term with torch.autograd.grad. Pass use_reentrant=False to torch.utils.checkpoint.checkpoint "
    "(PyTorch's recommended setting; training and the measurements are then exact), or remove GradientNormMonitor "
    "and the balancers from the Trainer."
)


class _BackwardMarker(torch.autograd.Function):
    """Identity on a total loss whose backward marks its capture as backpropagated."""

    @staticmethod
    def forward(ctx: Any, capture: _Capture, total: Tensor) -> Tensor:  # noqa: D102
        ctx.capture = capture
        return total.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        # an identity: differentiable as it is (create_graph=True keeps the cotangent's graph)
        _mark_backward(ctx.capture)
        ctx.capture = None
        return None, grad_output


def _mark_backward(capture: _Capture) -> None:
    """Record that ``capture``'s total was backpropagated, how, and whether it starts a new evaluation.

    Called from its backward, before its own gradients reach the parameters. ``mode``: whether
    this backward accumulates into the parameters' ``.grad`` (``"backward"``), is a
    ``torch.autograd.grad`` call (``"grad"``), or reaches no parameter (``"none"``, e.g.
    ``backward(inputs=[points])``). A call made after an earlier call's backward into ``.grad``
    re-evaluates the batch (a closure optimizer) where the gradients that earlier call gave were
    zeroed since and the same parameters are trainable; otherwise it adds to the step (see the
    module docstring).
    """
    if capture.backward_done and capture.mode == "backward":
        return  # already counted as a backward into .grad (a second run with retain_graph=True)
    trainable = [p for p, grad in zip(capture.params, capture.trainable or []) if grad]
    mode = _backward_mode(trainable)
    if capture.backward_done and mode != "backward":
        return  # e.g. torch.autograd.grad twice: it stays what the first run found
    capture.mode = mode  # a torch.autograd.grad run followed by a real backward counts as the latter
    previous = capture.previous
    if capture.mode == "backward" and capture.after_backward and previous is not None:
        given = previous.reached_params or previous.trainable or []
        earlier = [p for p, hit in zip(previous.params, given) if hit]
        if capture.optimizers is not None:  # zero_grad zeroes the optimizers' parameters only
            owned = {id(p) for optimizer in capture.optimizers() for p in _parameters_of(optimizer)}
            earlier = [p for p in earlier if id(p) in owned] or earlier
        # all-zero gradients show a zeroing only where the earlier call gave them something (a
        # masked micro-batch, every residual 0, leaves them at exactly zero by itself)
        contributed = bool(((previous.lambdas.to(previous.loss_values.dtype) != 0) & (previous.loss_values != 0)).any())
        zeroed = any(p.grad is None for p in earlier) or (contributed and all(not bool(p.grad.any()) for p in earlier))  # type: ignore[union-attr]
        capture.restarts = zeroed and capture.trainable == previous.trainable
    capture.backward_done = True


@contextlib.contextmanager
def _leaf_hooks_suspended(leaves: Sequence[Tensor]) -> Iterator[None]:
    """Hold back the tensor hooks (``register_hook``) of ``leaves`` during the per-term passes.

    ``torch.autograd.grad`` runs a leaf's hooks on the gradient it returns, so without this a
    parameter's hook would run once per term and once more on ``Σ λ_i g_i`` when the parameter
    receives it (``hook(Σ λ_i hook(g_i))``: a rescaling or clipping hook would change the step).
    Emptied and refilled in place: PyTorch reads the hooks from the tensor's ``_backward_hooks``
    dict when it runs them. If a PyTorch version keeps them elsewhere, nothing changes here, and
    ``tests/test_engine.py`` (a rescaling hook trains as without callbacks) says so.
    """
    held: list[tuple[dict[Any, Any], list[tuple[Any, Any]]]] = []
    for leaf in leaves:
        hooks = getattr(leaf, "_backward_hooks", None)
        if isinstance(hooks, dict) and hooks:
            held.append((hooks, list(hooks.items())))
            hooks.clear()
    try:
        yield
    finally:
        for hooks, items in held:
            hooks.update(items)


def _backward_mode(trainable: list[Tensor]) -> str:
    """How the running backward treats the parameters: see :func:`_mark_backward`."""
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    if will_execute is None or not trainable:
        return "backward"
    try:
        for p in trainable:
            if will_execute(_gradient_accumulator(p)):
                return "backward"
    except RuntimeError:  # PyTorch does not answer for leaves inside torch.autograd.grad
        return "grad"
    return "none"


def _gradient_accumulator(p: Tensor) -> Any:
    """The autograd node that accumulates ``p``'s gradient into ``p.grad``."""
    edge = getattr(torch.autograd.graph, "get_gradient_edge", None)
    if edge is not None:
        return edge(p).node
    return p.view_as(p).grad_fn.next_functions[0][0]  # type: ignore[union-attr]


def _in_layout_of(grad: Tensor, x: Tensor) -> Tensor:
    """``grad`` with ``x``'s strides, as AccumulateGrad and DDP's gradient buckets expect
    (autograd may hand back a transposed view; a parameter may be channels_last)."""
    if grad.stride() == x.stride():
        return grad
    if x.is_contiguous():  # a reshape, no copy where only size-1 dimensions' strides differ
        return grad.contiguous().view(-1).view(x.shape)
    return torch.empty_like(x, dtype=grad.dtype).copy_(grad)  # empty_like keeps a dense tensor's strides


def _loss_values(losses: Sequence[Tensor | None], weights: Tensor) -> Tensor:
    """Detached ``L_i`` (0 where absent), in the wider of the losses' and the weights' dtypes."""
    dtype = wider_dtype(losses, weights.dtype)
    if all(loss is not None for loss in losses):
        return torch.stack([loss.detach() for loss in losses]).to(dtype)  # type: ignore[union-attr]
    zero = weights.new_zeros((), dtype=dtype)
    return torch.stack([zero if loss is None else loss.detach().to(dtype) for loss in losses])


#: A weight outside [2⁻²⁰, 2²⁰] is measured by a backward of its own, from the cotangent times the
#: nearer bound: λ·c sent down a float16 graph (or a subnormal λ in float32) under- or overflows there.
_MEASURED_APART = (2.0**-20, 2.0**20)


class _TermCotangents(NamedTuple):
    """How each term's backward starts (see :func:`_term_cotangents`)."""

    sent: Tensor  # (K,) what the term's training backward starts from
    factors: list[Tensor | None]  # what its gradient is still multiplied by for the step (None: 1)
    measured_from: Tensor  # (K,) the cotangent its measured gradient is divided by
    apart: list[bool]  # measured by a backward of its own (from ``measured_from``)


def _term_cotangents(cotangent: Tensor, lambdas: Tensor, dtypes: list[torch.dtype], cotangent_value: float) -> _TermCotangents:
    """The cotangent each term's backward starts from, and how its gradient is measured.

    A plain backward of ``Σ λ_i L_i`` sends ``λ_i · c`` (``c``: the cotangent of the total),
    rounded to the loss's dtype (``dtypes``), into term i's graph. Starting there, not from
    ``c`` with ``λ_i`` multiplied in afterwards, gives the parameters exactly a plain backward's
    gradient also where the graph runs in bfloat16/float16 (autocast), which is not linear in its
    cotangent; the measured gradient is that divided by ``λ_i · c``.

    A weight outside ``_MEASURED_APART`` = [2⁻²⁰, 2²⁰] is measured from ``c · a_i`` instead, with
    ``a_i = |λ_i|`` clamped to that range (a power of two): ``λ_i · c`` can under- or overflow in a
    float16 graph (``λ = 1e-12`` under a GradScaler measured 0) and lose digits as a subnormal
    float32, while the bare ``c`` can overflow for a large, lightly weighted term. Training still
    starts from ``λ_i · c``, and the measurement takes a backward of its own. Where ``λ_i · c`` is
    zero or not finite in the loss's dtype (``λ_i = 0``: nothing to divide out), the one backward
    starts from ``c · a_i`` and the gradient is multiplied by ``λ_i · c / (c · a_i)`` for the step
    (exact zeros for ``λ_i = 0``; inf where ``λ_i · c`` overflowed, which a plain backward sends down).
    ``cotangent_value`` is ``c`` as a Python float: with the weights as floats, the usual case is
    decided without a tensor operation.
    """
    scaled = cotangent * lambdas.to(cotangent.dtype)
    lambda_values = lambdas.tolist()
    low, high = _MEASURED_APART
    same_dtypes = all(dtype == cotangent.dtype for dtype in dtypes)
    if (
        cotangent.dtype in (torch.float32, torch.float64)
        and same_dtypes
        and 2.0**-100 <= abs(cotangent_value) <= 2.0**100  # so |λ·c| is within float32's normal range
        and all(low <= abs(value) <= high for value in lambda_values)
    ):
        return _TermCotangents(scaled, [None] * len(lambda_values), scaled, [False] * len(lambda_values))

    def as_received(values: Tensor) -> Tensor:  # rounded to each loss's dtype, as its backward receives it
        if same_dtypes:
            return values
        return torch.stack([value.to(dtype).to(cotangent.dtype) for value, dtype in zip(values, dtypes)])

    scaled = as_received(scaled)
    anchors = [min(max(abs(value), low), high) for value in lambda_values]
    anchored = as_received(cotangent * torch.tensor(anchors, dtype=cotangent.dtype, device=cotangent.device))
    usable = ((scaled != 0) & torch.isfinite(scaled)).tolist()
    apart = [ok and not low <= abs(value) <= high for ok, value in zip(usable, lambda_values)]
    keep = torch.tensor(usable, device=scaled.device)
    return _TermCotangents(
        sent=torch.where(keep, scaled, anchored),
        # λ_i·c / (c·a_i): 0 for a zero weight (exact zeros); inf where λ_i·c overflowed, as a plain backward's
        factors=[None if ok else scaled[i] / anchored[i] for i, ok in enumerate(usable)],
        measured_from=torch.where(keep & ~torch.tensor(apart, device=scaled.device), scaled, anchored),
        apart=apart,
    )


def _summed(per_term: list[list[Tensor]], factors: list[Tensor | None]) -> list[Tensor]:
    """``Σ_i factor_i · per_term[i]`` per parameter (a missing factor is 1), in new tensors.

    New: the recorded per-term gradients must not be the tensors handed to autograd, which may
    keep one as a parameter's ``.grad`` and accumulate the next micro-batch into it in place.
    """
    terms = [grads if factor is None else _times(grads, factor) for grads, factor in zip(per_term, factors)]
    if len(terms) == 1:
        return [grad.clone() for grad in terms[0]] if factors[0] is None else list(terms[0])
    combined = list(torch._foreach_add(terms[0], terms[1]))
    for grads in terms[2:]:
        torch._foreach_add_(combined, grads)
    return combined


def _times(grads: list[Tensor], factor: Tensor) -> list[Tensor]:
    """``factor · grads``, exact zeros for a zero factor: a plain backward sends a zero weight's term
    a zero cotangent, where 0 · (a gradient that overflowed in float16) would be NaN."""
    if bool(factor == 0):
        return [torch.zeros_like(grad) for grad in grads]
    return list(torch._foreach_mul(grads, factor))


def _other_leaves(roots: list[Tensor], params: list[Tensor]) -> list[Tensor]:
    """Leaves of the roots' graph that require grad and are not in ``params``.

    A plain ``backward`` gives these a gradient too (collocation points created with
    ``requires_grad=True``, a coefficient optimised outside the module's parameters), so the
    captured total must reach them. A walk over the graph's nodes, linear in their number:
    about 20 µs for a 3-layer PINN with second derivatives (≈ 170 nodes), a few % of the
    per-term gradients it goes with; a probe measured ≈ 3.5 ms per step with 30 terms, each
    with its own forward pass (thirty such graphs).
    """
    known = {id(p) for p in params}
    seen: set[Any] = set()
    stack = [root.grad_fn for root in roots if root.grad_fn is not None]
    push, leaves = stack.append, []
    while stack:
        node = stack.pop()
        if type(node) is _ACCUMULATE_GRAD:  # a leaf that requires grad
            variable = node.variable
            if id(variable) not in known:
                known.add(id(variable))
                leaves.append(variable)
            continue
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                push(child)
    return leaves


def _parameters_of(optimizer: torch.optim.Optimizer) -> Iterator[Tensor]:
    """The parameters ``optimizer`` steps (and its ``zero_grad`` zeroes), over its groups."""
    return (p for group in optimizer.param_groups for p in group["params"])


def _this_step_only(captures: list[_Capture], steps_taken: Sequence[torch.optim.Optimizer]) -> list[_Capture]:
    """The calls without those that belong to a later optimizer step.

    A call belongs to a later step when every parameter it trains (of those the optimizers that
    stepped own) was trained by an earlier call kept and has been stepped since: manual
    optimisation that steps one optimizer twice in a batch (``zero_grad``, backward, ``step``,
    twice over), or one optimizer of several ``n_critic`` times, in any order (critic first or
    last). Its gradients are those of the next step's parameters, so the step is measured on its
    first evaluation of each group. A call that trains a parameter not stepped since it was last
    trained is a part of this step (a second optimizer's group, with ``toggle_optimizer``; a
    trainable leaf outside every optimizer does not count), and L-BFGS's re-evaluations all come
    before its step.
    """
    marks = [capture.steps_mark for capture in captures]
    if len(set(marks)) <= 1 or None in marks:  # no step between the calls (the usual case)
        return captures
    owned_by = [{id(p) for p in _parameters_of(optimizer)} for optimizer in steps_taken]
    stepped = set().union(*owned_by)
    last_trained: dict[int, int] = {}  # a parameter → the mark of the last call kept that trained it
    kept = []
    for capture in captures:
        mark = capture.steps_mark
        assert mark is not None
        mine = {id(p) for p, trains in zip(capture.params, capture.trainable or []) if trains and id(p) in stepped}
        if mine and all(q in last_trained and any(q in owned for owned in owned_by[last_trained[q] : mark]) for q in mine):
            continue  # a later step of parameters already measured
        last_trained.update(dict.fromkeys(mine, mark))
        kept.append(capture)
    return kept


def _disjoint(first: list[bool] | None, second: list[bool] | None) -> bool:
    """Whether two calls trained disjoint, non-empty sets of parameters."""
    if first is None or second is None or not any(first) or not any(second):
        return False
    return not any(a and b for a, b in zip(first, second))


def _merge_parts(first: _Capture, second: _Capture) -> _Capture:
    """One capture from two calls that trained disjoint parameter groups (one optimizer each).

    Each parameter's per-term gradient comes from the call in which it was trainable (each
    divided by its own cotangent); the losses are averaged where both calls have the term; the
    NTK traces add up (a point's squared gradient norm over the union of disjoint groups is the
    sum of its norms over each).
    """
    assert first.trainable is not None and second.trainable is not None
    trainable = [a or b for a, b in zip(first.trainable, second.trainable)]
    present = [a or b for a, b in zip(first.present, second.present)]
    both = torch.tensor([a and b for a, b in zip(first.present, second.present)], device=first.loss_values.device)
    loss_values = torch.where(both, (first.loss_values + second.loss_values) / 2, first.loss_values + second.loss_values)
    term_gradients = reached = cotangent = None
    if first.term_gradients is not None and second.term_gradients is not None:
        assert first.cotangent is not None and second.cotangent is not None
        term_gradients = []
        for term, (grads_a, grads_b) in enumerate(zip(first.term_gradients, second.term_gradients)):
            found_a, found_b = iter(grads_a), iter(grads_b)
            term_gradients.append(
                [
                    (next(found_a) / first.cotangent[term]) if in_a else (next(found_b) / second.cotangent[term])
                    for in_a, in_b in zip(first.trainable, second.trainable)
                    if in_a or in_b
                ]
            )
        reached = [a or b for a, b in zip(first.reached or [], second.reached or [])]
        cotangent = torch.ones_like(first.cotangent)
    trace_sums = trace_counts = None
    if first.trace_sums is not None and second.trace_sums is not None:
        assert first.trace_counts is not None and second.trace_counts is not None
        # a point's squared norm over two disjoint groups is the sum of its norms over each: the
        # per-point means add (a side where the term had no points adds nothing)
        means = [
            torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
            for sums, counts in ((first.trace_sums, first.trace_counts), (second.trace_sums, second.trace_counts))
        ]
        trace_counts = torch.maximum(first.trace_counts, second.trace_counts)
        trace_sums = (means[0] + means[1]) * trace_counts
    return _Capture(
        engine=first.engine,
        params=first.params,
        losses=[],
        present=present,
        residuals=[],
        lambdas=first.lambdas,
        loss_values=loss_values,
        trace_request=first.trace_request,
        want_gradients=first.want_gradients,
        trainable=trainable,
        layout=trainable,
        term_gradients=term_gradients,
        reached=reached,
        cotangent=cotangent,
        trace_sums=trace_sums,
        trace_counts=trace_counts,
        backward_done=True,
        names=first.names,
    )


def _pad_columns(sums: Tensor, params: list[Tensor], old: list[bool], new: list[bool]) -> Tensor:
    """``(K, P_old)`` per-term gradients laid out over the ``old`` parameters, as ``(K, P_new)``
    over the ``new`` ones (a superset), zeros in the added columns."""
    pieces, start = [], 0
    for p, before, after in zip(params, old, new):
        width = _width(p)
        if before:
            pieces.append(sums[:, start : start + width])
            start += width
        elif after:
            pieces.append(sums.new_zeros(sums.shape[0], width))
    return torch.cat(pieces, dim=1) if pieces else sums


def _width(p: Tensor) -> int:
    """Columns of ``p`` in the flat per-term gradients (a complex parameter counts twice)."""
    return p.numel() * (2 if p.is_complex() else 1)


def _measured(window: _Window) -> list[bool]:
    """The parameters the window's flat gradients cover (its layout, else those trainable now)."""
    return list(window.layout) if window.layout is not None else [p.requires_grad for p in window.params]


def untraceable_term_error(name: str) -> ValueError:
    """The error for a term given as a 0-dim loss where its NTK trace is needed."""
    return ValueError(
        f"NTK traces need point-wise residuals, but term '{name}' was given as a 0-dim (already reduced) "
        f"loss. Pass the residual vector for '{name}' (its loss is then the mean of its squares), or "
        f"leave '{name}' out of NTKBalancer(terms=[...]) (and out of reference=): such a term keeps its "
        "weight and is left out of the traces' sum."
    )


def _real_flat(tensor: Tensor) -> Tensor:
    """``tensor`` flattened to real numbers: a complex tensor as its (real, imaginary) pairs.

    A complex parameter ``z = x + iy`` is two real coordinates; its gradient ``∂L/∂x + i∂L/∂y``
    contributes ``|∂L/∂x|² + |∂L/∂y|²`` to ``‖∇θ L‖²`` and its real and imaginary parts to the
    inner products between term gradients.
    """
    return torch.view_as_real(tensor).reshape(-1) if tensor.is_complex() else tensor.reshape(-1)


#: The autograd node that accumulates a leaf's gradient (its ``variable`` is the leaf).
_ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad


class TermGradientEngine:
    """Computes per-term gradients and NTK traces once per optimizer step, for all callbacks.

    Obtain it with :meth:`for_loss`; callbacks call :meth:`request` at the start of each batch
    of a step they want measured and :meth:`collect` after the optimizer step.
    """

    def __init__(self) -> None:
        self._window: _Window | None = None
        self._capturing = False
        self._paused = False  # a validation run inside a step's capture window (mid-accumulation)

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
        params: Sequence[Tensor] | Callable[[], Iterable[Tensor]],
        gradients: bool = False,
        traces: TraceRequest | None = None,
        optimizers: Callable[[], Sequence[torch.optim.Optimizer]] | None = None,
        watch_steps: bool = True,
    ) -> None:
        """Ask for a measurement of optimizer step ``step``; call at the start of each of its batches.

        ``params`` are the module's parameters (those requiring grad are read at each forward
        pass), or a callable that gives them (e.g. ``module.parameters``), read at the step's
        first forward pass so that parameters registered in between are measured too. Several
        callbacks may ask for the same batch: their requests are merged.

        ``optimizers`` (e.g. ``lambda: trainer.optimizers``) tell a batch's calls of the loss apart
        where it holds several (see the module docstring): only their parameters are zeroed by
        their ``zero_grad`` (a trainable leaf outside every optimizer keeps its gradient); and with
        ``watch_steps``, their steps are watched while the window is open, so that a call made
        after the optimizer of its parameters stepped belongs to a later step. Under Lightning's
        automatic optimisation no step comes between a batch's calls (L-BFGS evaluates its closure
        inside its step), so the callbacks watch only under manual optimisation.
        """
        window = self._window
        if window is None or window.step != step or window.collected:
            if window is not None:
                window.unwatch_optimizers()
            if callable(params):
                window = self._window = _Window(step=step, params=[], params_source=params)
            else:
                window = self._window = _Window(step=step, params=list(params))
        if window.batch_key != batch_key:
            self._commit_pending(window)
            window.batch_key = batch_key
        window.want_gradients = window.want_gradients or gradients
        if optimizers is not None and window.optimizers is None:
            window.optimizers = optimizers
        if watch_steps:
            window.watch_optimizers()
        if traces is not None:
            window.trace_request = traces.merged(window.trace_request)
        self._capturing = True

    def is_capturing(self) -> bool:
        """Whether the next training forward pass should record per-term quantities."""
        return self._capturing and not self._paused

    def pause(self, paused: bool) -> None:
        """Hold capture back (``True``) while a validation run interrupts a training step, e.g.
        between the micro-batches of an accumulated step, and let it go on (``False``) after."""
        self._paused = paused

    def needs_backward(self) -> bool:
        """Whether the request needs per-term gradients or traces (else only the losses are recorded)."""
        window = self._window
        return window is not None and (window.want_gradients or window.trace_request is not None)

    def record_losses(self, losses: list[Tensor | None], lambdas: Tensor, total: Tensor) -> Tensor:
        """Record this call's per-term losses only (for rules that need no gradients); return ``total``.

        The returned total is ``total`` itself, passed through an identity whose backward marks
        the call as backpropagated (only such calls count, see the module docstring).
        """
        window = self._window
        assert window is not None
        window.read_params()
        weights = lambdas.detach().clone()
        capture = _Capture(
            engine=self,
            params=window.params,
            losses=[],
            present=[loss is not None for loss in losses],
            residuals=[],
            lambdas=weights,
            loss_values=_loss_values(losses, weights),
            trace_request=None,
            want_gradients=False,
            trainable=[p.requires_grad for p in window.params],
            steps_mark=len(window.steps_taken) if window.step_hooks is not None else None,
            optimizers=window.optimizers,
        )
        self._add_pending(window, capture)
        return _BackwardMarker.apply(capture, total)

    def stop_capturing(self) -> None:
        """Leave capture mode (e.g. when a batch ends without an optimizer step being measured)."""
        self._capturing = False

    def release(self) -> None:
        """Drop the step's accumulators, measured or not (at the end of a fit, or when it fails).

        Frees the per-term gradient buffers and captured graphs between fits. A later fit that
        runs a failed fit's step again (the same Trainer refitted) measures it afresh: the
        abandoned backward passes are not its micro-batches, since Lightning zeroes the gradients
        before the step runs again.
        """
        if self._window is not None:
            self._window.unwatch_optimizers()
        self._window = None
        self._capturing = self._paused = False

    # ---------------------------------------------------------------- forward / backward
    def weighted_total(
        self,
        names: tuple[str, ...],
        residuals: list[Tensor | None],
        losses: list[Tensor | None],
        lambdas: Tensor,
        release_graph: Callable[[], None] | None = None,
    ) -> Tensor:
        """Return ``Σ λ_i L_i`` (over the present terms) whose backward also records per-term gradients.

        ``release_graph`` is called after a backward that does not keep the graph, to drop the
        caller's own references to it (the per-term passes retain the graph's saved tensors).
        """
        window = self._window
        assert window is not None
        window.read_params()
        if window.trace_request is not None:
            untraced_ok = window.trace_request.untraced_ok
            for name, residual in zip(names, residuals):
                if residual is not None and residual.dim() == 0 and name not in untraced_ok:
                    raise untraceable_term_error(name)
        weights = lambdas.detach().clone()
        loss_values = _loss_values(losses, weights)
        trainable = [p.requires_grad for p in window.params]  # read now: a hook may have (un)frozen some
        capture = _Capture(
            engine=self,
            params=window.params,
            losses=losses,
            present=[loss is not None for loss in losses],
            residuals=residuals if window.trace_request is not None else [],
            lambdas=weights,
            loss_values=loss_values,
            trace_request=window.trace_request,
            want_gradients=window.want_gradients,
            trainable=trainable,
            layout=window.layout,  # widened at the commit over every call that trained (see _widen_layout)
            names=tuple(names),
            release_graph=release_graph,
            steps_mark=len(window.steps_taken) if window.step_hooks is not None else None,
            optimizers=window.optimizers,
        )
        self._add_pending(window, capture)
        inputs = [p for p, grad in zip(window.params, trainable) if grad]
        inputs += _other_leaves([loss for loss in losses if loss is not None], window.params)
        return _CapturedTotal.apply(capture, torch.dot(weights.to(loss_values.dtype), loss_values), *inputs)

    @staticmethod
    def _add_pending(window: _Window, capture: _Capture) -> None:
        """Queue a call of the loss; a call after a backward may start a new evaluation (see :func:`_mark_backward`)."""
        capture.after_any_backward = any(earlier.backward_done for earlier in window.pending)
        into_grad = [earlier for earlier in window.pending if earlier.backward_done and earlier.mode == "backward"]
        if into_grad:
            capture.after_backward = True
            capture.previous = into_grad[-1]
        elif window.last_committed is not None and window.step_hooks is not None:
            # a later batch of a step not yet taken under manual optimisation (accumulation, or a
            # skipped step); Lightning's automatic optimisation never zeroes inside a window
            capture.after_backward = True
            capture.previous = window.last_committed
        window.pending.append(capture)

    def _backward(
        self,
        capture: _Capture,
        losses: list[Tensor | None],
        residuals: list[Tensor | None],
        inputs: tuple[Tensor, ...],
        grad_output: Tensor,
    ) -> list[Tensor | None]:
        """``Σ λ_i ∇L_i`` for each input (times the cotangent); records the per-term gradients.

        Under ``create_graph=True`` (grad mode on in a backward) the per-term gradients are taken
        with ``create_graph=True`` and summed out of place, so the returned gradient can be
        differentiated again (Hessian-vector products); what is recorded is detached.
        """
        assert capture.trainable is not None
        create_graph = torch.is_grad_enabled()
        num_params = sum(capture.trainable)  # the first inputs; the rest are other leaves of the graph
        if capture.trace_request is not None:
            with torch.no_grad():
                self._record_traces(capture, residuals, list(inputs[:num_params]))
        # A zero cotangent (the user returned 0·loss, e.g. a ramped-in term at its first step)
        # would leave nothing to divide out: take the per-term gradients with a unit cotangent,
        # and give the inputs a zero gradient, as a plain backward would.
        cotangent_value = grad_output.item()
        zero_cotangent = cotangent_value == 0
        cotangent = torch.ones_like(grad_output) if zero_cotangent else grad_output
        params = inputs[:num_params]
        # Each term's backward starts from λ_i × the cotangent, as a plain backward of Σ λ_i L_i
        # sends it down (a bf16/fp16 graph is not linear in its cotangent: scaling afterwards
        # would change the training gradient by half-precision rounding); see _term_cotangents for
        # a zero or overflowing λ_i·c (a factor still to apply) and an extreme λ_i (measured apart).
        dtypes = [cotangent.dtype if loss is None else loss.dtype for loss in losses]
        starts = _term_cotangents(cotangent, capture.lambdas.to(grad_output.device), dtypes, 1.0 if zero_cotangent else cotangent_value)
        factors = starts.factors
        measured_apart: dict[int, list[Tensor]] = {}
        reached_input = [False] * len(inputs)
        reached_term = []
        per_term: list[list[Tensor]] = []  # per term, per parameter (zeros where the term does not reach it)
        # the other leaves (e.g. collocation points with requires_grad) are mostly reached by one
        # term each: summed sparsely, so K terms with K point sets cost no K² zero tensors
        others: list[Tensor | None] = [None] * (len(inputs) - num_params)
        for i, loss in enumerate(losses):
            if loss is None:  # absent from this call
                per_term.append([torch.zeros_like(x) for x in params])
                reached_term.append(False)
                continue
            grads = torch.autograd.grad(
                loss, inputs, grad_outputs=starts.sent[i].to(loss.dtype), retain_graph=True, create_graph=create_graph, allow_unused=True
            )
            filled = []
            for j, (grad, x) in enumerate(zip(grads[:num_params], params)):
                if grad is None:
                    filled.append(torch.zeros_like(x))
                else:
                    reached_input[j] = True
                    filled.append(grad)
            per_term.append(filled)
            reached_term.append(any(grad is not None for grad in grads[:num_params]))
            if starts.apart[i] and capture.want_gradients:  # an extreme λ: measured by a backward of its own
                again = torch.autograd.grad(
                    loss, params, grad_outputs=starts.measured_from[i].detach().to(loss.dtype), retain_graph=True, allow_unused=True
                )
                measured_apart[i] = [torch.zeros_like(x) if grad is None else grad for grad, x in zip(again, params)]
            for k, grad in enumerate(grads[num_params:]):
                if grad is not None:
                    reached_input[num_params + k] = True
                    if factors[i] is not None:
                        grad = _times([grad], factors[i])[0]
                    others[k] = grad if others[k] is None else others[k] + grad  # type: ignore[operator]
        # Σ_i λ_i ∇ L_i (already multiplied by the cotangent): the inputs' gradient
        combined: list[Tensor] = []
        if params and create_graph:  # out of place, so the sum stays differentiable
            combined = [
                sum(grads[j] if factor is None else factor * grads[j] for factor, grads in zip(factors, per_term))
                for j in range(num_params)
            ]
        elif params:
            combined = _summed(per_term, factors)
        combined += [torch.zeros_like(x) if grad is None else grad for grad, x in zip(others, inputs[num_params:])]
        if zero_cotangent:
            combined = [grad * 0.0 for grad in combined]  # a rare step: out of place, so it stays differentiable
        if capture.want_gradients:
            capture.term_gradients = [
                measured_apart[i] if i in measured_apart else [grad.detach() for grad in grads] if create_graph else grads
                for i, grads in enumerate(per_term)
            ]
            capture.reached = reached_term
            capture.cotangent = starts.measured_from.detach()
        hits = iter(reached_input[:num_params])
        capture.reached_params = [bool(next(hits)) if trainable else False for trainable in capture.trainable]
        _mark_backward(capture)
        return [_in_layout_of(grad, x) if hit else None for grad, x, hit in zip(combined, inputs, reached_input)]

    def _record_traces(self, capture: _Capture, residuals: list[Tensor | None], params: list[Tensor]) -> None:
        request = capture.trace_request
        assert request is not None
        sums: list[Tensor] = []
        counts: list[float] = []
        for name, residual in zip(capture.names, residuals, strict=True):
            if residual is None or residual.dim() == 0:  # absent, or a reduced loss allowed without a trace
                sums.append(torch.zeros((), dtype=torch.float64))
                counts.append(0.0)
                continue
            points = sample_points(residual.numel(), request.sample_size, request.generator)
            values = jacobian_row_sq_norms(
                residual, params, points, request.chunk_size, term=name, warned=request.fallback_warned, one_pass=request.one_pass
            )
            # a sample of m of the N points stands for all N: its sum scaled by N/m estimates their
            # sum without bias, so micro-batches and ranks with unequal N pool to the mean over the
            # union of their points (as exact traces do), not to an equal-weight mean of samples
            total = values.to(torch.float64).sum().cpu()
            sums.append(total if points is None else total * (residual.numel() / values.numel()))
            counts.append(float(residual.numel()))
        capture.trace_sums = torch.stack(sums)
        capture.trace_counts = torch.tensor(counts, dtype=torch.float64)

    # ---------------------------------------------------------------- collecting
    def _commit_pending(self, window: _Window) -> None:
        """Add the batch's backpropagated calls of its last evaluation to the window: micro-batches
        each, except that a call whose trainable parameters are disjoint from the previous call's
        is merged into it (one optimizer per parameter group, see the module docstring)."""
        captures, window.pending = window.pending, []
        into_grad = _this_step_only([c for c in captures if c.backward_done and c.mode == "backward"], window.steps_taken)
        if into_grad:
            starts = [index for index, capture in enumerate(into_grad) if capture.restarts]
            evaluation = into_grad[starts[-1] :] if starts else into_grad
        else:  # torch.autograd.grad calls only (gradients assigned by hand): a call after a backward re-evaluates
            done = [capture for capture in captures if capture.backward_done and capture.mode == "grad"]
            starts = [index for index, capture in enumerate(done) if capture.after_any_backward]
            evaluation = done[starts[-1] :] if starts else done
        merged: list[_Capture] = []
        for capture in evaluation:
            if merged and _disjoint(merged[-1].trainable, capture.trainable):
                merged[-1] = _merge_parts(merged[-1], capture)
            else:
                merged.append(capture)
        if not merged:
            return
        first = evaluation[0]
        if first.restarts and first.previous is not None and first.previous is window.last_committed:
            # the gradients of the window's earlier batches were zeroed before this one (manual
            # optimisation that skipped its step, a NaN guard say): the step is this batch's alone
            window.restart()
        window.last_committed = evaluation[-1] if into_grad else None
        self._widen_layout(window, merged)
        for capture in merged:
            self._commit(window, capture)

    @staticmethod
    def _widen_layout(window: _Window, captures: list[_Capture]) -> None:
        """Lay the window's gradients out over every parameter trained by any of its calls so far.

        Parameter groups trained by separate calls (one optimizer each) widen the layout of the
        window's first forward; the sums so far are padded with zeros for the new columns.
        """
        layout = list(window.layout or [False] * len(window.params))
        for capture in captures:
            for index, trained in enumerate(capture.trainable or []):
                layout[index] = layout[index] or trained
        window.relayout(layout)
        for capture in [*captures, *([window.only] if window.only is not None else [])]:
            capture.layout = layout

    def _commit(self, window: _Window, capture: _Capture) -> None:
        # The usual window has one micro-batch: keep it as is and only start summing when a
        # second one arrives (gradient accumulation), so the common case does no extra work.
        if window.batches == 0:
            window.only = capture
        else:
            if window.only is not None:
                self._accumulate(window, window.only)
                window.only = None
            self._accumulate(window, capture)
        window.batches += 1

    @staticmethod
    def _flat_gradients(capture: _Capture) -> Tensor | None:
        """``(K, P)`` per-term gradients of the unscaled, unweighted losses (cotangent removed)."""
        if capture.term_gradients is None or capture.cotangent is None:
            return None
        dtype = torch.float64 if any(p.dtype in (torch.float64, torch.complex128) for p in capture.params) else torch.float32
        # one concatenation of all K·(number of parameters) pieces, viewed as (K, P) over the
        # parameters trainable at the window's first forward pass (a later micro-batch in which
        # one was frozen holds zeros for it; one unfrozen since is trained but not measured)
        trainable, layout = capture.trainable, capture.layout
        if trainable is None or trainable == layout:
            pieces = [_real_flat(g) for grads in capture.term_gradients for g in grads]
        else:
            assert layout is not None
            pieces = []
            for grads in capture.term_gradients:
                found = iter(grads)
                for p, now, measured in zip(capture.params, trainable, layout):
                    grad = next(found) if now else None
                    if measured:
                        pieces.append(_real_flat(p.new_zeros(p.shape)) if grad is None else _real_flat(grad))
        flat = torch.cat(pieces).view(len(capture.term_gradients), -1) if pieces else torch.zeros(len(capture.term_gradients), 0)
        if flat.dtype != dtype:
            flat = flat.to(dtype)
        return flat.div_(capture.cotangent.to(dtype).view(-1, 1))  # each term's own cotangent

    @staticmethod
    def _accumulate(window: _Window, capture: _Capture) -> None:
        window.add("weights", capture.lambdas)
        window.add("losses", capture.loss_values)
        window.add("present", torch.tensor(capture.present, dtype=torch.float64))
        grads = TermGradientEngine._flat_gradients(capture)
        if grads is not None and capture.reached is not None:
            window.add("reached", torch.tensor(capture.reached, dtype=torch.float64))
            window.gradient_sum = grads if window.gradient_sum is None else window.gradient_sum + grads
            trained = torch.tensor(capture.trainable or [p.requires_grad for p in capture.params], dtype=torch.float64)
            counts = torch.outer(torch.tensor(capture.present, dtype=torch.float64), trained)
            window.trained_count = counts if window.trained_count is None else window.trained_count + counts
        if capture.trace_sums is not None and capture.trace_counts is not None:
            window.add("trace_sum", capture.trace_sums)
            window.add("trace_count", capture.trace_counts)

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
        window.read_params()  # a rank that never called the loss this step still reduces the same shapes
        self._commit_pending(window)
        window.unwatch_optimizers()
        window.collected = True
        window.result = self._reduce(window, terms, all_reduce_sum)
        return window.result

    def _reduce(self, window: _Window, terms: tuple[str, ...], all_reduce_sum: Callable[[Tensor], Tensor] | None) -> StepMeasurement | None:
        num_terms = len(terms)
        if window.only is not None and all_reduce_sum is None:
            return self._single(window, window.only, terms)
        if window.only is not None:
            self._accumulate(window, window.only)
            window.only = None
        zeros = torch.zeros(num_terms, dtype=torch.float64)
        gradient_sum = window.gradient_sum
        if all_reduce_sum is None:  # one process: nothing to exchange
            batches = window.batches
            sums = {name: window.sums[name].cpu() if name in window.sums else zeros for name in _SUMS}
        else:
            # The packed shapes depend only on what was requested, never on local data, so every
            # rank joins the same collectives even if its own micro-batches produced no capture.
            device = window.params[0].device if window.params else torch.device("cpu")
            packed = torch.cat(
                [torch.tensor([float(window.batches)], dtype=torch.float64)] + [window.sums.get(name, zeros).cpu() for name in _SUMS]
            )
            packed = all_reduce_sum(packed.to(device)).cpu()
            if window.want_gradients:
                # the ranks' layouts may differ (a rank whose calls trained other parameters):
                # agree on their union first, so every rank reduces tensors of one shape
                local = _measured(window)
                union = all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=device)).cpu() > 0
                window.layout = local
                window.relayout(union.tolist())
                gradient_sum = window.gradient_sum
                if gradient_sum is None:
                    size = sum(_width(p) for p, measured in zip(window.params, _measured(window)) if measured)
                    gradient_sum = torch.zeros(num_terms, size, dtype=torch.float64, device=device)
                gradient_sum = all_reduce_sum(gradient_sum.to(torch.float64))
                trained_count = window.trained_count
                if trained_count is None:
                    trained_count = torch.zeros(num_terms, len(window.params), dtype=torch.float64)
                window.trained_count = all_reduce_sum(trained_count.to(device)).cpu()
            batches = int(packed[0].item())
            sums = dict(zip(_SUMS, packed[1:].split(num_terms)))
        if batches == 0:
            return None
        present = sums["present"] > 0
        nan = torch.full((num_terms,), float("nan"), dtype=torch.float64)
        traces = None
        if window.trace_request is not None:
            counts = sums["trace_count"]
            traces = torch.where(counts > 0, sums["trace_sum"] / counts.clamp(min=1), nan)
        return StepMeasurement(
            step=window.step,
            terms=terms,
            losses=torch.where(present, sums["losses"] / sums["present"].clamp(min=1), nan),
            weights=sums["weights"] / batches,
            present=present,
            reached=(sums["reached"] > 0) if window.want_gradients else None,
            # like the losses, each term's gradient is the mean over the micro-batches and ranks
            # where it was present (and, per parameter, where that parameter trained): the
            # gradient of the loss on the union of their points
            gradients=None if gradient_sum is None else gradient_sum / self._divisor(window, gradient_sum),
            traces=traces,
            trace_points=sums["trace_count"] if window.trace_request is not None else None,
            micro_batches=batches,
        )

    @staticmethod
    def _divisor(window: _Window, gradient_sum: Tensor) -> Tensor:
        """``(K, P)``: for each term and gradient column, the micro-batches (and ranks) where the
        term was present and the column's parameter trained (at least 1)."""
        assert window.trained_count is not None
        widths = torch.tensor([_width(p) for p, measured in zip(window.params, _measured(window)) if measured])
        counts = window.trained_count[:, torch.tensor(_measured(window), dtype=torch.bool)]
        return counts.repeat_interleave(widths, dim=1).clamp(min=1).to(gradient_sum.device, gradient_sum.dtype)

    @staticmethod
    def _single(window: _Window, capture: _Capture, terms: tuple[str, ...]) -> StepMeasurement:
        """The measurement of a one-process window with a single micro-batch (the common case)."""
        present = torch.tensor(capture.present)
        losses = capture.loss_values.to(torch.float64)
        traces = None
        if capture.trace_sums is not None and capture.trace_counts is not None:
            counts = capture.trace_counts
            traces = torch.where(counts > 0, capture.trace_sums / counts.clamp(min=1), torch.full_like(counts, float("nan")))
        return StepMeasurement(
            step=window.step,
            terms=terms,
            losses=losses
            if all(capture.present)
            else torch.where(present, losses.cpu(), torch.full((len(terms),), float("nan"), dtype=torch.float64)),
            weights=capture.lambdas.to(torch.float64),
            present=present,
            reached=None if capture.reached is None else torch.tensor(capture.reached),
            gradients=TermGradientEngine._flat_gradients(capture),
            traces=traces,
            trace_points=capture.trace_counts,
            micro_batches=1,
        )
