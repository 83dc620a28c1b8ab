"""The multi-term PINN loss ``L = Σ_i λ_i · L_i``.

A physics-informed loss is a weighted sum of terms (PDE residual, initial and boundary
conditions, data). :class:`MultiTermLoss` takes one tensor per term, reduces each to its
unweighted loss ``L_i`` (the mean of squares of a point-wise residual, or a 0-dim tensor taken
as already reduced) and returns ``Σ_i λ_i L_i``. The weights ``λ_i`` live in a buffer, so they
are saved in checkpoints and broadcast by DDP like any other buffer; callbacks in
:mod:`lightning_pinn.callbacks` read the per-term tensors of the current step and may change
``λ`` between optimizer steps.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import unicodedata
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_pinn.engine import TermGradientEngine

__all__ = ["MultiTermLoss", "term_loss"]


def term_loss(residual: Tensor) -> Tensor:
    """Unweighted loss of one term: ``mean_j |r_j|²`` for a point-wise residual.

    A 0-dim tensor is taken as an already-reduced loss and returned unchanged. A bfloat16/float16
    residual (under autocast) is squared and averaged in float32: in float16 a residual of 300
    would square to inf and one of 1e-4 to 0.
    """
    if residual.dim() == 0:
        return residual  # MultiTermLoss checks that it is real; a negative one is warned about once
    if residual.dtype in (torch.float16, torch.bfloat16):
        residual = residual.float()
    elif residual.dtype == torch.complex32:
        residual = residual.to(torch.complex64)
    squared = residual.abs().square() if residual.is_complex() else residual.square()
    return squared.mean()


def wider_dtype(losses: Sequence[Tensor | None], dtype: torch.dtype) -> torch.dtype:
    """The widest of ``dtype`` (the weights') and the losses' dtypes: a float64 network's losses
    are not rounded to a float32 λ buffer's precision."""
    for loss in losses:
        if loss is not None and loss.dtype != dtype:
            dtype = torch.promote_types(dtype, loss.dtype)
    return dtype


def _check_weight(term: str, value: Any, argument: str) -> float:
    """Return ``value`` as a float, or raise naming the term, the argument and the fix."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{argument}: weight of term '{term}' must be a single number, got a tensor of shape {tuple(value.shape)}.")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars are Real too
        raise TypeError(f"{argument}: weight of term '{term}' must be a number, got {type(value).__name__}. Pass e.g. {term}=1.0.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{argument}: weight of term '{term}' is {value}; weights must be finite. Pass a finite value such as {term}=1.0.")
    if value < 0:
        raise ValueError(
            f"{argument}: weight of term '{term}' is {value}; weights must be >= 0 (a negative weight rewards a larger "
            f"residual). Pass a non-negative value such as {term}=1.0."
        )
    return value


def weight_range(dtype: torch.dtype) -> tuple[float, float]:
    """The smallest positive and the largest weight a buffer of ``dtype`` holds (neither 0 nor inf)."""
    info = torch.finfo(dtype)
    return info.tiny * info.eps, info.max


def stored_as(value: float, dtype: torch.dtype) -> str | None:
    """``"inf"`` or ``"0"`` if a weight buffer of ``dtype`` would store ``value`` as that; ``None`` if it holds it."""
    smallest, largest = weight_range(dtype)
    if value > largest:
        return "inf"
    if 0 < value < smallest:
        return "0"
    return None


_Label = TypeVar("_Label")


def first_unrepresentable(labelled: Iterable[tuple[_Label, float]], dtype: torch.dtype) -> tuple[_Label, float, str, str] | None:
    """The first ``(label, value)`` that a weight buffer of ``dtype`` would store as inf or 0, as
    ``(label, value, what it would store, the range it holds)``; ``None`` if it holds them all.
    The one check behind every "stored as inf/0" error (weights given, loaded, cast; clamp bounds;
    schedules), each of which names its own cause and fix."""
    for label, value in labelled:
        stored = stored_as(value, dtype)
        if stored is not None:
            smallest, largest = weight_range(dtype)
            return label, value, stored, f"[{smallest:.3g}, {largest:.3g}]"
    return None


def _check_representable(names: Sequence[str], values: Sequence[float], dtype: torch.dtype, argument: str) -> None:
    """Refuse weights that the weight buffer's dtype would turn into inf (or a positive one into 0)."""
    found = first_unrepresentable(zip(names, values), dtype)
    if found is not None:
        name, value, stored, held = found
        raise ValueError(
            f"{argument}: weight of term '{name}' is {value:g}, which a {dtype} weight buffer stores as "
            f"{stored}. Use a weight within {held} "
            "(rescale the term's residual instead), or keep the weights in float64 with criterion.double()."
        )


def pair_key(first: str, second: str) -> str:
    """The name of a pair of terms in the pair tags: ``<a>_vs_<b>`` (``grad_cosine/<a>_vs_<b>``,
    ``alarm/grad_conflict/<a>_vs_<b>``); :func:`_check_term_name` keeps it unambiguous."""
    return f"{first}_vs_{second}"


def split_pair_key(key: str) -> tuple[str, str]:
    """``(a, b)`` from :func:`pair_key`'s ``<a>_vs_<b>``."""
    first, _, second = key.partition("_vs_")
    return first, second


def _check_term_name(name: str) -> None:
    """Refuse a term name that would make the logged tags ambiguous.

    Tags are ``<quantity>/<term>`` and pair tags ``grad_cosine/<a>_vs_<b>``: a ``/`` would add a
    level to the first; a ``vs`` word at the start or end of a name, or inside it between
    underscores, would make two pairs share a tag (terms ``a``, ``a_vs``, ``vs_b``, ``b``: both
    ``(a, vs_b)`` and ``(a_vs, b)`` give ``a_vs_vs_b``); whitespace is not kept by every logger.
    """
    if not name or any(c.isspace() for c in name) or "/" in name or re.search(r"(^|_)vs(_|$)", name):
        raise ValueError(
            f"MultiTermLoss: term name {name!r} cannot be used in the logged tags (grad_norm/<term>, "
            "grad_cosine/<a>_vs_<b>): use a name without '/', whitespace or a 'vs' word (as in 'u_vs_v', 'vs_b', "
            "'a_vs'), e.g. 'bc_left'."
        )
    if name == "self":  # nn.Module.__call__(self, *args, **kwargs) takes it as the module itself
        raise ValueError(
            "MultiTermLoss: term name 'self' cannot be passed by keyword to the loss (criterion(self=...) clashes with "
            "Python's `self` in the module's call): rename the term, e.g. 'self_consistency'."
        )
    invisible = [c for c in name if unicodedata.category(c) == "Cc" or c in _INVISIBLE]
    if name[:1] in _JOINERS or name[-1:] in _JOINERS:  # a joiner joins two visible characters, or nothing
        invisible.append(name[0] if name[:1] in _JOINERS else name[-1])
    if invisible:
        raise ValueError(
            f"MultiTermLoss: term name {name!r} holds an invisible character ({', '.join(f'U+{ord(c):04X}' for c in invisible)}: "
            "a control or format character, such as NUL or a zero-width space), so its tags, alarms and report would "
            "show a name that looks like another. Remove it."
        )


#: Format characters that show nothing (soft hyphen, zero-width space, direction marks and
#: overrides, word joiner and invisible operators, byte-order mark). The zero-width (non-)joiners
#: are left out: Persian, Indic scripts and emoji sequences need them between two characters.
_INVISIBLE = frozenset(
    chr(c) for c in (0x00AD, 0x180E, 0x200B, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2060, 0x2065), *range(0x2066, 0x206A), 0xFEFF)
)
_JOINERS = frozenset("\u200c\u200d")


def _check_distinct_names(names: tuple[str, ...]) -> None:
    """Refuse two names that are the same text in two Unicode spellings (``'é'`` as one code point
    or as ``e`` + combining accent): they would look identical in every tag, alarm and report."""
    seen: dict[str, str] = {}
    for name in names:
        canonical = unicodedata.normalize("NFC", name)
        if canonical in seen:
            raise ValueError(
                f"MultiTermLoss: term names {seen[canonical]!r} and {name!r} are the same text in two Unicode spellings "
                "(they differ only in how an accented letter is encoded), so they would look identical in the tags, "
                "alarms and report. Use one spelling, or distinct names."
            )
        seen[canonical] = name


class MultiTermLoss(nn.Module):
    """Weighted sum of PINN loss terms, ``L = Σ_i λ_i · L_i`` with ``L_i = mean_j r_i(x_j)²``.

    Args:
        **initial_weights: One keyword per term, its initial weight ``λ_i`` (finite, ``>= 0``).
            The keywords fix the term names and their order, e.g. ``MultiTermLoss(pde=1.0, ic=1.0)``.

    The forward call takes one tensor per term, by the same keywords: a point-wise residual of
    any shape (its loss is the mean of its squares) or a 0-dim tensor (taken as an already
    reduced loss). It returns the weighted total and keeps this step's per-term tensors, with
    their graphs, in :attr:`last_residuals` and :attr:`last_losses` for the callbacks.

    Example::

        self.criterion = MultiTermLoss(pde=1.0, ic=1.0)
        ...
        return self.criterion(pde=r_pde, ic=r_ic)
    """

    lambdas: Tensor

    def __init__(self, /, *args: Any, **initial_weights: float) -> None:
        super().__init__()
        if args:
            raise TypeError(
                f"MultiTermLoss takes the terms by keyword, with their initial weights, e.g. MultiTermLoss(pde=1.0, ic=1.0); "
                f"got {len(args)} positional argument(s)."
            )
        if not initial_weights:
            raise ValueError("MultiTermLoss needs at least one term, e.g. MultiTermLoss(pde=1.0, ic=1.0).")
        for name in initial_weights:
            _check_term_name(name)
        _check_distinct_names(tuple(initial_weights))
        values = [_check_weight(name, value, "MultiTermLoss") for name, value in initial_weights.items()]
        self._term_names: tuple[str, ...] = tuple(initial_weights)
        _check_representable(self._term_names, values, torch.float32, "MultiTermLoss")
        self._term_set = frozenset(self._term_names)
        self._sign_checked: set[str] = set()  # 0-dim terms already checked for a negative value
        self._negative_warned: set[str] = set()  # terms already warned about a negative loss
        self.register_buffer("lambdas", torch.tensor(values, dtype=torch.float32))
        self._last: tuple[dict[str, Tensor], dict[str, Tensor]] = ({}, {})
        self._last_token: object | None = None  # identifies the call whose graph _graph_releaser may drop
        self._engine: TermGradientEngine | None = None

    def _apply(self, fn: Any, recurse: bool = True) -> MultiTermLoss:
        """Move and cast the λ buffer with the module, but never below float32.

        ``precision="bf16-true"`` / ``"16-true"`` cast every buffer to the half type, where λ has
        three significant digits: a balancer's smoothing ``λ ← m·λ + (1 − m)·λ̂`` then stalls
        once ``(1 − m)·|λ̂ − λ|`` is below the rounding step. float64 (``"64-true"``) is kept.
        """
        before = self.lambdas
        super()._apply(fn, recurse)
        after = self.lambdas
        if after.dtype != before.dtype and after.dtype not in (torch.float16, torch.bfloat16):
            self._check_cast(before, after)
        if after.dtype in (torch.float16, torch.bfloat16):
            with torch.no_grad():  # the values before the cast, on the new device
                self.lambdas = before.to(
                    device=after.device, dtype=torch.float32 if before.dtype in (torch.float16, torch.bfloat16) else before.dtype
                )
        return self

    def _check_cast(self, before: Tensor, after: Tensor) -> None:
        """Refuse a cast of the λ buffer to a narrower dtype (float64 → float32) that turns a weight into inf or 0;
        the buffer is restored first, so the loss keeps its weights."""
        found = first_unrepresentable(zip(self._term_names, before.detach().cpu().tolist()), after.dtype)
        if found is not None:
            self.lambdas = before
            name, value, stored, held = found
            raise ValueError(
                f"MultiTermLoss: casting the weights to {after.dtype} would store the weight of term '{name}' "
                f"({value:g}) as {stored} ({after.dtype} holds {held}). Keep the loss in "
                "float64, or bring that weight into range with set_weights before the cast."
            )

    def warn_negative_loss(self, name: str, value: float, step: int | None = None, stacklevel: int = 2) -> None:
        """Warn, once per term, that term ``name``'s loss is negative.

        Only a 0-dim term can be negative (it is taken as an already-reduced loss and minimised
        as it is): typically a one-point residual squeezed to 0-dim, which gradient descent then
        drives to -inf instead of 0. The forward checks a term's first value; the callbacks
        check every measured loss (they read the values anyway), so a residual that starts
        positive and turns negative is caught too.
        """
        if name in self._negative_warned:
            return
        self._negative_warned.add(name)
        when = "" if step is None else f" at step {step}"
        warnings.warn(
            f"MultiTermLoss: term '{name}' was given as a 0-dim tensor, which is taken as an already-reduced loss and "
            f"minimised as it is, and it is negative ({value:.3g}){when}. If it is a residual at a single point, pass it "
            f"with a dimension (e.g. r.reshape(1)) so that its square is minimised.",
            stacklevel=stacklevel,
        )

    @property
    def last_residuals(self) -> dict[str, Tensor]:
        """This step's residual per present term, as passed to forward (with its graph; detached once a
        step whose per-term gradients or NTK traces a callback measured has been backpropagated
        without ``retain_graph=True``)."""
        return self._last[0]

    @property
    def last_losses(self) -> dict[str, Tensor]:
        """This step's unweighted loss ``L_i`` per present term (with its graph, or detached, as
        :attr:`last_residuals`)."""
        return self._last[1]

    # ------------------------------------------------------------------ weights
    @property
    def term_names(self) -> tuple[str, ...]:
        """The term names, in the order given to the constructor."""
        return self._term_names

    @property
    def weights(self) -> dict[str, float]:
        """The current weights ``λ`` as ``{term: value}``."""
        return dict(zip(self._term_names, self.lambdas.tolist()))

    def set_weights(self, weights: Mapping[str, float] | Tensor) -> None:
        """Replace some or all weights (in place, without touching autograd).

        Args:
            weights: ``{term: value}`` for the terms to change, or a tensor holding every
                weight in term order. Values must be finite and ``>= 0``.

        Call this between optimizer steps (e.g. in ``on_train_batch_end``): changing a weight
        between the forward pass and the backward pass of a step would change a tensor that
        autograd saved.
        """
        if not isinstance(weights, (Tensor, Mapping)):
            raise TypeError(
                f"set_weights: pass a dict {{term: weight}} (e.g. set_weights({{'{self._term_names[0]}': 2.0}})) or a tensor "
                f"holding every weight in term order {self._term_names}; got {type(weights).__name__}."
            )
        if isinstance(weights, Tensor):
            if weights.shape != self.lambdas.shape:
                raise ValueError(
                    f"set_weights: expected {len(self._term_names)} weights for terms {self._term_names}, got shape {tuple(weights.shape)}."
                )
            if weights.is_complex() or weights.dtype == torch.bool:
                raise TypeError(
                    f"set_weights: weights must be real numbers, got a {weights.dtype} tensor for terms {self._term_names}; "
                    f"pass e.g. torch.tensor({[1.0] * len(self._term_names)})."
                )
            values = weights.detach().tolist()
            if all(math.isfinite(value) and value >= 0 for value in values):  # fast path: one transfer, no tensor ops
                _check_representable(self._term_names, values, self.lambdas.dtype, "set_weights")
                self.lambdas.copy_(weights.detach())
                return
            new = [_check_weight(name, value, "set_weights") for name, value in zip(self._term_names, values)]
        else:
            self._check_names(weights.keys(), context="set_weights", require_all=False)
            current = self.weights
            current.update({name: _check_weight(name, value, "set_weights") for name, value in weights.items()})
            new = [current[name] for name in self._term_names]
        _check_representable(self._term_names, new, self.lambdas.dtype, "set_weights")
        with torch.no_grad():
            self.lambdas.copy_(torch.tensor(new, dtype=self.lambdas.dtype, device=self.lambdas.device))

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **residuals: Tensor | None) -> Tensor:
        """Return ``Σ_i λ_i · L_i`` for the given per-term residuals (see the class docstring).

        A term passed as ``None`` is absent from this step (e.g. a data term with no points in
        this batch): it adds nothing to the loss, and the callbacks leave it out of this step's
        measurement and keep its weight.
        """
        if args:
            raise TypeError(
                f"MultiTermLoss takes the residuals by keyword, e.g. criterion({', '.join(f'{n}=r_{n}' for n in self._term_names)}); "
                f"got {len(args)} positional argument(s)."
            )
        if residuals.keys() != self._term_set:
            self._check_names(residuals.keys(), context="MultiTermLoss.forward", require_all=True)
        grad_enabled = torch.is_grad_enabled()
        ordered = [self._checked_residual(name, residuals[name]) for name in self._term_names]
        if all(residual is None for residual in ordered):
            raise ValueError(f"MultiTermLoss.forward: every term is None; pass a residual for at least one of {self._term_names}.")
        if grad_enabled:
            self._check_requires_grad(ordered)
        losses = [None if residual is None else term_loss(residual) for residual in ordered]
        # one plain-object write: nn.Module.__setattr__ costs ~20 µs, noticeable on a PINN step
        self.__dict__["_last"] = (
            {name: r for name, r in zip(self._term_names, ordered) if r is not None},
            {name: loss for name, loss in zip(self._term_names, losses) if loss is not None},
        )
        self.__dict__["_last_token"] = None  # see _graph_releaser

        engine = self._engine
        # whatever the module's train/eval mode (Lightning keeps the mode the user left it in):
        # the engine captures only inside a training step's window, never during validation
        if engine is not None and grad_enabled and engine.is_capturing():
            if engine.needs_backward():
                return engine.weighted_total(self._term_names, ordered, losses, self.lambdas, self._graph_releaser())
            return engine.record_losses(losses, self.lambdas, self._weighted_sum(losses))
        return self._weighted_sum(losses)

    def _graph_releaser(self) -> Callable[[], None]:
        """A function that detaches this call's ``last_residuals``/``last_losses`` (values kept), unless a
        later call replaced them. The engine calls it after a backward that does not keep the graph:
        its per-term passes retained the graph's saved tensors, which these references would
        otherwise keep alive until the next step (or after the fit), where a plain backward frees them.
        Holds neither the module nor the tensors, so a capture that is never backpropagated keeps nothing alive.
        """
        token = object()
        self.__dict__["_last_token"] = token
        module = weakref.ref(self)

        def release() -> None:
            owner = module()
            if owner is not None and owner.__dict__.get("_last_token") is token:
                residuals, losses = owner.__dict__["_last"]
                owner.__dict__["_last"] = (
                    {name: r.detach() for name, r in residuals.items()},
                    {name: loss.detach() for name, loss in losses.items()},
                )

        return release

    def _weighted_sum(self, losses: list[Tensor | None]) -> Tensor:
        # in the wider of λ's and the losses' dtypes: a float64 network with a float32 λ buffer
        # keeps float64 losses and gradients
        lambdas = self.lambdas
        if all(loss is not None for loss in losses):
            dtype = wider_dtype(losses, lambdas.dtype)
            stacked = torch.stack([loss if loss.dtype == dtype else loss.to(dtype) for loss in losses])  # type: ignore[union-attr]
            return torch.dot(lambdas if lambdas.dtype == dtype else lambdas.to(dtype), stacked)
        return sum(lambdas[i] * loss for i, loss in enumerate(losses) if loss is not None)  # type: ignore[return-value]

    def _checked_residual(self, name: str, residual: Any) -> Tensor | None:
        if residual is None:
            return None
        if not isinstance(residual, Tensor):
            raise TypeError(
                f"MultiTermLoss: term '{name}' must be a torch.Tensor (a point-wise residual or a 0-dim loss) or None "
                f"(absent this step), got {type(residual).__name__}. Compute it from the network output with torch operations."
            )
        if not (residual.is_floating_point() or residual.is_complex()):
            raise TypeError(
                f"MultiTermLoss: term '{name}' has dtype {residual.dtype}; residuals must be floating point. "
                "Compute it from the network output (e.g. u - u_target), not from integer data."
            )
        if residual.numel() == 0:
            raise ValueError(
                f"MultiTermLoss: term '{name}' is an empty tensor (shape {tuple(residual.shape)}), so its mean square is "
                f"undefined. Give the term at least one point, or pass {name}=None to leave it out of this step."
            )
        if residual.dim() == 0:
            if residual.is_complex():
                raise TypeError(
                    f"MultiTermLoss: term '{name}' is a 0-dim complex tensor; a 0-dim term is taken as an already-reduced loss, "
                    f"which must be real. Pass the residual with its points (at least 1-dim, e.g. r.reshape(1)) to have |r|² "
                    "averaged, or reduce it yourself (r.abs().square().mean())."
                )
            if name not in self._sign_checked:  # once per term: .item() synchronises with the device
                self._sign_checked.add(name)
                value = residual.detach().item()
                if value < 0:
                    self.warn_negative_loss(name, value, stacklevel=4)
        return residual

    def _check_requires_grad(self, ordered: list[Tensor | None]) -> None:
        """With grad enabled, every term given must require grad: one that does not trains nothing.

        An error naming the term(s), raised before the total is formed (issue contract: "a
        residual that does not require grad" is bad input). Such a term was computed under
        ``torch.no_grad()``, detached, or depends only on frozen parameters. Where the freezing
        is deliberate for one call (Lightning's ``toggle_optimizer`` with one optimizer per
        parameter group, so a data term on the network is constant while a PDE coefficient
        trains), the term is absent from that call: pass it as ``None`` there.
        """
        constant = [name for name, r in zip(self._term_names, ordered) if r is not None and not r.requires_grad]
        if not constant:
            return
        listed = ", ".join(f"'{name}'" for name in constant)
        # the message's words, in agreement with the number of terms named
        if len(constant) == 1:
            terms, they, them, they_were, depend, does, are = "term", "it", "it", "It was", "depends", "does", "is"
            gradients = "its gradient"
        else:
            terms, they, them, they_were, depend, does, are = "terms", "they", "them", "They were", "depend", "do", "are"
            gradients = "their gradients"
        causes = (
            f"{they_were} computed under torch.no_grad(), detached with .detach()/.item()/.numpy(), or {depend} only on "
            f"frozen parameters (requires_grad=False); compute {them} from the trainable network's output with torch operations."
        )
        if len(constant) == sum(r is not None for r in ordered):
            raise ValueError(f"MultiTermLoss: no term requires grad ({terms} {listed}), so the loss cannot train the network. {causes}")
        absent = ", ".join(f"{name}=None" for name in constant)
        raise ValueError(
            f"MultiTermLoss: {terms} {listed} {does} not require grad, so {they} cannot train the network (grad is enabled). "
            f"{causes} If the parameters {they} {depend} on are frozen on purpose in this call (Lightning's toggle_optimizer, "
            f"one optimizer per parameter group), pass {absent} in that call: the {terms} {are} "
            f"then absent from it, and the callbacks take {gradients} from the calls that train {them}."
        )

    def _check_names(self, given: Any, *, context: str, require_all: bool) -> None:
        given = list(given)
        known = set(self._term_names)
        unknown = [name for name in given if name not in known]
        if unknown:
            raise ValueError(
                f"{context}: unknown term(s) {', '.join(repr(n) for n in unknown)}; this MultiTermLoss has terms "
                f"{self._term_names}. Add the term to the constructor, e.g. MultiTermLoss(..., {unknown[0]}=1.0), "
                "or fix the keyword."
            )
        if require_all:
            missing = [name for name in self._term_names if name not in given]
            if missing:
                raise ValueError(
                    f"{context}: missing term(s) {', '.join(repr(n) for n in missing)}; every term given to "
                    f"MultiTermLoss{self._term_names} needs a residual at each call, e.g. "
                    f"criterion({', '.join(f'{n}=...' for n in self._term_names)}), or None where the term is absent "
                    f"from this step (e.g. a data loader that ran out: {missing[0]}=None; the term then adds nothing and "
                    "the callbacks leave it out)."
                )

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> Tensor:
        """Saved with the state dict, so a checkpoint records which term each weight belongs to.

        The term names as a JSON list, UTF-8 encoded in a ``uint8`` tensor, so that every value of
        the module's ``state_dict()`` is a tensor: copies such as ``{k: v.clone() for k, v in ...}``,
        safetensors files and EMA helpers that walk the state dict work with a ``MultiTermLoss``
        inside the model. Checkpoints that recorded the names as a dict (before 2026-11-28) still load.
        """
        return torch.tensor(list(json.dumps(list(self._term_names)).encode()), dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # check the terms before any buffer is copied: a refused checkpoint leaves λ untouched
        key = prefix + "lambdas"
        if prefix + "_extra_state" in state_dict:
            saved = self._check_saved_terms(state_dict[prefix + "_extra_state"], prefix)
        else:
            saved = ()
            if key in state_dict:
                self._warn_weights_by_position(state_dict[key], prefix)
        if saved and saved != self._term_names and isinstance(state_dict, dict) and key in state_dict:
            # the same terms in another order: take each λ by its name (torch's load_state_dict
            # hands the modules its own copy of the dict, so the caller's is not changed)
            saved_lambdas = state_dict[key]
            state_dict[key] = saved_lambdas[[saved.index(name) for name in self._term_names]]
        if key in state_dict:
            self._check_saved_weights(state_dict[key], prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    def _check_saved_weights(self, saved: Any, prefix: str) -> None:
        """Refuse a checkpoint whose λ are NaN, infinite or negative (a corrupted or hand-edited file):
        loaded, they would turn the loss NaN with warnings that blame the terms' gradients."""
        if not isinstance(saved, Tensor) or saved.shape != self.lambdas.shape or saved.is_complex():
            return  # torch's own load reports a shape mismatch, naming the key
        for name, value in zip(self._term_names, saved.detach().tolist()):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"MultiTermLoss: the checkpoint's weight of term '{name}' is {value}; weights must be finite and >= 0, so "
                    "this checkpoint's λ cannot be used (the file was edited or damaged, or saved after λ went bad). Load an "
                    f"earlier checkpoint; or remove '{prefix}lambdas' and '{prefix}_extra_state' from its state dict, load "
                    "it with strict=False and set the weights with set_weights."
                )
        dtype = self.lambdas.dtype
        found = first_unrepresentable(zip(self._term_names, saved.detach().tolist()), dtype)
        if found is not None:
            name, value, stored, held = found
            raise ValueError(
                f"MultiTermLoss: the checkpoint's weight of term '{name}' is {value:g}, which this loss's {dtype} weight "
                f"buffer would store as {stored} (it holds {held}); the checkpoint was saved "
                "with wider weights (e.g. a precision='64-true' fit). Load it into a float64 loss (criterion.double() "
                "before loading, or the same precision as the fit that saved it)."
            )

    def _warn_weights_by_position(self, saved: Any, prefix: str) -> None:
        """A state dict with the weights but without the term names (filtered by hand, then loaded
        with ``strict=False``): each λ is taken by its position. Said where it matters, i.e. the
        saved λ differ, so a loss that lists its terms in another order would get them swapped."""
        if not isinstance(saved, Tensor) or saved.shape != self.lambdas.shape or saved.numel() < 2:
            return
        if bool((saved == saved.reshape(-1)[0]).all()):
            return
        warnings.warn(
            f"MultiTermLoss: the state dict holds '{prefix}lambdas' but not '{prefix}_extra_state' (the term names), so each "
            f"weight is loaded by its position, in this loss's order {self._term_names}; if the saved loss listed its terms "
            f"in another order, the weights are now misassigned. Keep '{prefix}_extra_state' together with "
            f"'{prefix}lambdas' when filtering a state dict (it is a uint8 tensor), or set the weights with set_weights.",
            stacklevel=4,
        )

    def set_extra_state(self, state: Any) -> None:
        """Refuse a checkpoint whose terms differ from this loss's: the weights would be misassigned."""
        self._check_saved_terms(state, "")

    def _check_saved_terms(self, state: Any, prefix: str) -> tuple[str, ...]:
        """The checkpoint's term names (empty for a checkpoint that does not record them);
        refuses terms other than this loss's (the same terms in another order are taken by name)."""
        saved = _decode_saved_terms(state)
        if saved is None:
            raise ValueError(
                f"MultiTermLoss: the checkpoint's '{prefix}_extra_state' (the term names its weights belong to) cannot be "
                f"read: expected the JSON list of names that get_extra_state writes as a uint8 tensor, got "
                f"{_describe(state)}. The file was edited or damaged, so its weights cannot be matched to terms. Load an "
                f"earlier checkpoint; or remove '{prefix}lambdas' and '{prefix}_extra_state' from its state dict, load it "
                "with strict=False and set the weights with set_weights."
            )
        if saved and sorted(saved) != sorted(self._term_names):
            # (PyTorch hands every module strict=True and applies strict=False only to missing/unexpected keys,
            # so a loss cannot tell a lenient load from a strict one: the refusal holds for both)
            raise ValueError(
                f"MultiTermLoss: the checkpoint holds weights for terms {saved}, but this MultiTermLoss has terms "
                f"{self._term_names}. Build the loss with the same terms as the run that saved it (any order); "
                f"or, to load the rest of the checkpoint anyway (e.g. to fine-tune with an added term), remove "
                f"'{prefix}lambdas' and '{prefix}_extra_state' from its state dict and load it with strict=False: this "
                "loss then keeps the λ it was built with (set them with set_weights)."
            )
        return saved

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value:g}" for name, value in self.weights.items())

    def __getstate__(self) -> dict[str, Any]:
        # The engine and the last step's tensors are transient (they hold autograd graphs and
        # references to parameters); they are rebuilt on the next step. Dropping them keeps the
        # module picklable for ``ddp_spawn`` and deep copies cheap.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_engine"] = None
        state["_last"] = ({}, {})
        state["_last_token"] = None
        return state


def _decode_saved_terms(state: Any) -> tuple[str, ...] | None:
    """The term names a checkpoint recorded (see ``MultiTermLoss.get_extra_state``); ``None`` if unreadable.

    Reads the ``uint8`` tensor form and the dict form ``{"terms": [...]}`` of earlier checkpoints.
    """
    names: Any = None
    if isinstance(state, dict):
        names = state.get("terms")
    elif isinstance(state, Tensor) and state.dtype == torch.uint8 and state.dim() == 1:
        try:
            names = json.loads(bytes(state.tolist()).decode())
        except (UnicodeDecodeError, ValueError):
            return None
    if isinstance(names, (list, tuple)) and names and all(isinstance(name, str) for name in names):
        return tuple(names)
    return None


def _describe(value: Any) -> str:
    """A short description of an unexpected saved value, for error messages."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'…' if len(text) > 60 else ''}"
