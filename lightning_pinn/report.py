"""A plain-language diagnosis of a fit, from the scalars the monitor logs.

The same report is written at the end of a fit (from the monitor's own record of what it
logged) and by ``lightning-pinn report LOGDIR`` (from TensorBoard event files): a Markdown
file that says which pairs of terms crossed the gradient-ratio threshold, when and for how
long, which pairs fought (the conflict alarm: opposed gradients, by default while the pair's loss
stalled), how the weights λ moved,
and what to try; and a PNG of the per-term gradient norms and weights over the steps.
"""

from __future__ import annotations

import bisect
import math
import os
import re
import warnings
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from lightning_pinn.diagnostics import nearly_satisfied
from lightning_pinn.loss import split_pair_key
from lightning_pinn.tensorboard import losses_in_layout, terms_in_layout

__all__ = [
    "History",
    "Diagnosis",
    "read_history",
    "diagnose",
    "render_markdown",
    "plot_history",
    "write_report",
    "find_runs",
    "report_runs",
    "own_series",
]


def _as_tensor(values: array, dtype: torch.dtype) -> Tensor:
    """A copy of ``values`` (an ``array`` of 8-byte items) as a 1-D tensor, without a Python-level loop."""
    return torch.frombuffer(values, dtype=dtype).clone() if len(values) else torch.zeros(0, dtype=dtype)


class History:
    """Scalar series by tag: ``history[tag] -> (steps, values)``, stored compactly."""

    def __init__(self) -> None:
        self._steps: dict[str, array] = {}
        self._values: dict[str, array] = {}
        #: ``{tag prefix: loss path}`` of each loss, as the monitor's custom-scalars layout in the
        #: event files names them (empty when there is none; see :func:`loss_prefixes`)
        self.layout_losses: dict[str, str] = {}
        self.layout_terms: dict[str, list[str]] = {}  # {tag prefix: term names} from the same layout

    def add(self, metrics: Mapping[str, float], step: int) -> None:
        """Add one measurement (``{tag: value}`` at ``step``); each tag's series stays in step order."""
        for tag, value in metrics.items():
            if tag not in self._steps:
                self._steps[tag], self._values[tag] = array("q"), array("d")
            steps = self._steps[tag]
            if not steps or steps[-1] <= step:
                steps.append(step)
                self._values[tag].append(float(value))
            else:  # e.g. a balancer's weight, logged at the step it applies from, after a later measurement
                index = bisect.bisect_right(steps, step)
                steps.insert(index, step)
                self._values[tag].insert(index, float(value))

    def drop_from(self, step: int) -> None:
        """Forget every tag's points at ``step`` and later (an abandoned attempt's, see :func:`read_history`)."""
        for tag in list(self._steps):
            self._drop(tag, bisect.bisect_left(self._steps[tag], step), len(self._steps[tag]))

    def drop_at(self, tag: str, step: int) -> None:
        """Forget ``tag``'s points at exactly ``step``."""
        if tag in self._steps:
            steps = self._steps[tag]
            self._drop(tag, bisect.bisect_left(steps, step), bisect.bisect_right(steps, step))

    def _drop(self, tag: str, start: int, stop: int) -> None:
        del self._steps[tag][start:stop]
        del self._values[tag][start:stop]
        if not self._steps[tag]:  # a tag with no points left is no tag at all (no term, no series)
            del self._steps[tag], self._values[tag]

    def __contains__(self, tag: str) -> bool:
        return tag in self._steps

    def __getitem__(self, tag: str) -> tuple[list[int], list[float]]:
        return list(self._steps[tag]), list(self._values[tag])

    def tags(self) -> list[str]:
        return list(self._steps)

    def terms(self, prefix: str) -> list[str]:
        """Names after ``prefix/`` among the tags, in first-seen order (e.g. terms of ``grad_norm``)."""
        return [tag.split("/", 1)[1] for tag in self._steps if tag.startswith(prefix + "/")]

    def terms_in_loss_order(self, prefix: str) -> list[str]:
        """:meth:`terms` of ``prefix``, ordered like the ``loss/`` tags (logged all at once, in the
        loss's order); terms without a loss tag last, in first-seen order."""
        order = {term: index for index, term in enumerate(self.terms("loss"))}
        return sorted(self.terms(prefix), key=lambda term: order.get(term, len(order)))

    def __len__(self) -> int:
        return len(self._steps)

    def to_state(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{tag: (int64 steps, float64 values)}`` tensors, for a callback's checkpoint state.

        Tensors load under ``torch.load(weights_only=True)`` and save about 20× faster than lists
        of Python numbers (a 10⁶-point history: 0.02 s against 0.5 s per checkpoint).
        """
        return {tag: (_as_tensor(self._steps[tag], torch.int64), _as_tensor(self._values[tag], torch.float64)) for tag in self._steps}

    @classmethod
    def from_state(cls, state: Mapping[str, tuple[Sequence[int] | Tensor, Sequence[float] | Tensor]]) -> History:
        """The inverse of :meth:`to_state` (also reads the lists that earlier versions saved)."""
        history = cls()
        for tag, (steps, values) in state.items():
            if isinstance(steps, Tensor):
                steps, values = steps.tolist(), values.tolist()  # type: ignore[union-attr]
            history._steps[tag], history._values[tag] = array("q", steps), array("d", values)
        return history


def read_history(run_dir: str | Path) -> History:
    """All scalars of the TensorBoard run in ``run_dir`` (a folder holding event files, or one event file).

    A folder's event files are read oldest first, and a file that holds this library's tags
    (gradient norms, weights, NTK traces), after an earlier such file, replaces what the earlier
    files hold from its first step on: a fit resumed from an earlier checkpoint into the same folder (after a crash,
    say) writes those steps again, in a new file, and the abandoned attempt's points from there
    on are not part of the run. A file without them (your own ``SummaryWriter`` in the run's
    folder, a later ``trainer.test()``) only adds its points. (TensorBoard's own out-of-order
    purge does not run on today's event files.)
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = Path(run_dir)
    files = [path] if path.is_file() else sorted(path.glob("events.out.tfevents.*"), key=_natural_key)
    history = History()
    readable = seen_fit = False
    for file in files:
        accumulator = EventAccumulator(str(file), size_guidance={"scalars": 0})
        accumulator.Reload()
        readable = readable or any(tags for tags in accumulator.Tags().values() if isinstance(tags, list))
        points = [(tag, event.step, event.value) for tag in accumulator.Tags().get("scalars", []) for event in accumulator.Scalars(tag)]
        # a file with this library's tags after another such file is a resumed fit: it replaces
        # the earlier files from its first step (not Lightning's hp_metric, logged at step 0 by
        # every fit); another writer's file only adds its points
        fit = any(_RESUMED_TAG.search(tag) for tag, _, _ in points)
        resumes, seen_fit = fit and seen_fit, seen_fit or fit
        steps = [step for tag, step, _ in points if resumes and not tag.endswith("hp_metric")]
        first = min(steps) if steps else None
        if first is not None:
            # after the resume step everything is written again; at the step itself, only what
            # the resumed fit wrote again (a balancer does not log its λ twice at that step)
            history.drop_from(first + 1)
            for tag in {tag for tag, step, _ in points if step == first}:
                history.drop_at(tag, first)
        for tag, step, value in points:
            history.add({tag: value}, step)
        losses, terms = _read_layouts(accumulator)
        history.layout_losses.update(losses)
        history.layout_terms.update(terms)
    if not readable:
        warnings.warn(
            f"lightning-pinn report: no events could be read from {run_dir} (its event files are empty, truncated or "
            "not TensorBoard event files); the report below has nothing to go on.",
            stacklevel=2,
        )
    return history


#: Tags of the families a resumed fit writes again (the monitor's, the balancers', PINNModule's
#: weights), after any logger or loss prefix: they mark an event file as a resumption.
_RESUMED_TAG = re.compile(r"(^|[/\-])(grad_norm|grad_norm_weighted|grad_ratio|weight|weight_target|ntk_trace)/")


def _read_layouts(accumulator: Any) -> tuple[dict[str, str], dict[str, list[str]]]:
    """``{tag prefix: loss path}`` and ``{tag prefix: term names}`` from the monitor's
    custom-scalars layouts in the event files (:func:`~lightning_pinn.tensorboard.losses_in_layout`,
    :func:`~lightning_pinn.tensorboard.terms_in_layout`); empty if there is none."""
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.util import tensor_util

    if "custom_scalars__config__" not in accumulator.Tags().get("tensors", []):
        return {}, {}
    losses: dict[str, str] = {}
    terms: dict[str, list[str]] = {}
    for event in accumulator.Tensors("custom_scalars__config__"):
        layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())
        firsts = [(c.title, c.chart[0].multiline.tag[0]) for c in layout.category if c.chart and c.chart[0].multiline.tag]
        losses.update(losses_in_layout(firsts))
        terms.update(terms_in_layout([(c.title, [tag for chart in c.chart for tag in chart.multiline.tag]) for c in layout.category]))
    return losses, terms


def find_runs(logdir: str | Path) -> list[Path]:
    """Folders under ``logdir`` (itself included) that hold TensorBoard event files."""
    root = Path(logdir)
    if root.is_file() and root.name.startswith("events.out.tfevents."):
        return [root.parent]  # an event file itself: its run folder
    return sorted({path.parent for path in root.rglob("events.out.tfevents.*")})


@dataclass
class Diagnosis:
    """What :func:`diagnose` found; :func:`render_markdown` turns it into text."""

    terms: int = 0  # terms with a gradient-norm series
    first_step: int | None = None
    last_step: int | None = None
    measurements: int = 0
    threshold: float | None = None
    worst_ratio: float | None = None
    worst_ratio_step: int | None = None
    worst_pair: tuple[str, str] | None = None
    # per unit of RMS residual, the worst pair's gradients were within this factor (≤ √threshold):
    # the smaller gradient came from a smaller residual (diagnostics.nearly_satisfied); else None
    worst_pair_nearly_satisfied: float | None = None
    ratio_spans: list[tuple[int, int | None]] = field(default_factory=list)
    # per ratio episode: (largest, smallest, ratio) at the episode's worst measurement, or None
    ratio_span_pairs: list[tuple[str, str, float] | None] = field(default_factory=list)
    ratio_measurements_above: int = 0
    recovery_threshold: float | None = None  # a running ratio alarm ended at or below this (logged once per fit)
    # measurements above the threshold with the alarm off: it waited for a balancer's first update
    ratio_held_steps: list[int] = field(default_factory=list)
    conflict_spans: list[tuple[str, str, int, int | None, float]] = field(default_factory=list)
    weights: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)  # first, last, min, max
    weights_first_changed: int | None = None  # first step at which a weight differs from its first value
    weights_changed_at: dict[str, int] = field(default_factory=dict)  # per term: the first step its weight differs
    losses: dict[str, tuple[float, float]] = field(default_factory=dict)  # first, last
    # terms whose loss stopped improving in the last quarter: last/first loss of that quarter
    last_quarter_change: dict[str, float] = field(default_factory=dict)
    zero_gradient_terms: list[str] = field(default_factory=list)  # last measured gradient exactly 0
    nonfinite_steps: dict[str, int] = field(default_factory=dict)  # first step with a NaN/inf gradient norm
    advice: list[str] = field(default_factory=list)

    @property
    def stalled_terms(self) -> list[str]:
        """Terms whose loss stopped improving (or rose) in the last quarter of the fit."""
        return list(self.last_quarter_change)


def _spans(steps: list[int], flags: list[bool]) -> list[tuple[int, int | None]]:
    spans: list[tuple[int, int | None]] = []
    start: int | None = None
    for step, on in zip(steps, flags):
        if on and start is None:
            start = step
        elif not on and start is not None:
            spans.append((start, step))
            start = None
    if start is not None:
        spans.append((start, None))
    return spans


def diagnose(history: History, threshold: float | None = None, cosine_threshold: float | None = None) -> Diagnosis:
    """Read the verdict out of a history of the monitor's scalars (see the README's tag table).

    ``threshold``: the ratio threshold, if the history does not hold the ``grad_ratio_threshold``
    the monitor logs; the conflict alarm's spans are read from its ``alarm/grad_conflict/<a>_vs_<b>`` tags.
    ``cosine_threshold`` is accepted for old callers and ignored (deprecated): the spans are
    the monitor's own verdicts.
    """
    _deprecated_cosine_threshold("diagnose", cosine_threshold)
    result = Diagnosis()
    terms = history.terms("grad_norm")
    result.terms = len(terms)
    if "grad_ratio_threshold" in history and threshold is None:
        threshold = history["grad_ratio_threshold"][1][-1]
    result.threshold = threshold
    if "grad_ratio_recovery_threshold" in history:
        result.recovery_threshold = history["grad_ratio_recovery_threshold"][1][-1]
    if terms:
        steps, _ = history[f"grad_norm/{terms[0]}"]
        result.first_step, result.last_step, result.measurements = steps[0], steps[-1], len(steps)

    if "grad_ratio" in history:
        steps, ratios = history["grad_ratio"]
        finite = [index for index, ratio in enumerate(ratios) if math.isfinite(ratio)]  # NaN: a NaN/inf gradient
        weighted = {t: dict(zip(*history[f"grad_norm_weighted/{t}"])) for t in history.terms("grad_norm_weighted")}
        if finite:
            worst = max(finite, key=ratios.__getitem__)
            result.worst_ratio, result.worst_ratio_step = ratios[worst], steps[worst]
            result.worst_pair = _pair_at(steps[worst], ratios[worst], weighted)
            if result.worst_pair is not None:
                limit = threshold if threshold is not None else _DEFAULT_THRESHOLD
                result.worst_pair_nearly_satisfied = _nearly_satisfied_at(history, result.worst_pair, steps[worst], weighted, limit)
        if "alarm/grad_ratio" in history:
            flag_steps, flags = history["alarm/grad_ratio"]
            result.ratio_spans = _spans(flag_steps, [f > 0.5 for f in flags])
            result.ratio_measurements_above = sum(f > 0.5 for f in flags)
            if threshold is not None:
                # each step against its own threshold (a resumed fit may have changed it)
                limits = dict(zip(*history["grad_ratio_threshold"])) if "grad_ratio_threshold" in history else {}
                above = {s for s, r in zip(steps, ratios) if r > limits.get(s, threshold)}
                nan = {s for s, r in zip(steps, ratios) if math.isnan(r)}  # a term's NaN gradient: above, at fit time
                on = {step for step, flag in zip(flag_steps, flags) if flag > 0.5}
                off = set(flag_steps) - on
                # an alarm stays on at a measurement without one of its pair's terms (below the
                # threshold, or no ratio logged at all): not counted
                result.ratio_measurements_above = len(on & (above | nan))
                result.ratio_held_steps = [s for s in steps if s in above and s in off]
        elif threshold is not None:
            result.ratio_spans = _spans(steps, [r > threshold for r in ratios])
            result.ratio_measurements_above = sum(r > threshold for r in ratios)

        for start, end in result.ratio_spans:
            inside = [i for i in finite if start <= steps[i] and (end is None or steps[i] < end)]
            pair = None
            if inside:
                episode = max(inside, key=ratios.__getitem__)
                at = _pair_at(steps[episode], ratios[episode], weighted)
                pair = None if at is None else (*at, ratios[episode])
            result.ratio_span_pairs.append(pair)

    pair_flags = [tag for tag in history.tags() if tag.startswith("alarm/grad_conflict/")]
    if pair_flags:
        # each pair's alarm, logged when it started (1) and ended (0): the pairs that actually alarmed
        cosines = {tag.split("/", 1)[1]: dict(zip(*history[tag])) for tag in history.tags() if tag.startswith("grad_cosine/")}
        measured = history["alarm/grad_conflict"][0] if "alarm/grad_conflict" in history else []
        for tag in pair_flags:
            pair = tag.split("/", 2)[2]
            flag_steps, flags = history[tag]
            for start, end in _spans(flag_steps, [f > 0.5 for f in flags]):
                series = cosines.get(pair, {})
                values = [series[s] for s in measured if s >= start and (end is None or s < end) and s in series]
                a, b = split_pair_key(pair)
                result.conflict_spans.append((a, b, start, end, sum(values) / len(values) if values else math.nan))
        result.conflict_spans.sort(key=lambda span: (span[2], span[0], span[1]))
    elif "alarm/grad_conflict" in history:  # event files written before the per-pair flags: the most opposed pair
        flag_steps, flags = history["alarm/grad_conflict"]
        cosines = {tag.split("/", 1)[1]: dict(zip(*history[tag])) for tag in history.tags() if tag.startswith("grad_cosine/")}
        for start, end in _spans(flag_steps, [f > 0.5 for f in flags]):
            inside = [s for s in flag_steps if s >= start and (end is None or s < end)]
            best: tuple[str, float] | None = None
            for pair, series in cosines.items():
                values = [series[s] for s in inside if s in series]
                if values and (best is None or sum(values) / len(values) < best[1]):
                    best = (pair, sum(values) / len(values))
            if best is not None:
                a, b = split_pair_key(best[0])
                result.conflict_spans.append((a, b, start, end, best[1]))

    for term in terms:
        steps, values = history[f"grad_norm/{term}"]
        bad = next((step for step, value in zip(steps, values) if not math.isfinite(value)), None)
        if bad is not None:
            result.nonfinite_steps[term] = bad
        if values and values[-1] == 0:
            result.zero_gradient_terms.append(term)

    for term in history.terms_in_loss_order("weight"):
        steps, values = history[f"weight/{term}"]
        result.weights[term] = (values[0], values[-1], min(values), max(values))
        changed = next((step for step, value in zip(steps, values) if value != values[0]), None)
        if changed is not None:
            result.weights_changed_at[term] = changed
    result.weights_first_changed = min(result.weights_changed_at.values(), default=None)
    for term in history.terms("loss"):
        steps, values = history[f"loss/{term}"]
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            result.losses[term] = (finite[0], finite[-1])
            tail = [v for s, v in zip(steps, values) if math.isfinite(v) and s >= steps[0] + 0.75 * (steps[-1] - steps[0])]
            if len(tail) >= 3 and tail[0] > 0 and tail[-1] / tail[0] > 0.9 and finite[-1] > 1e-3 * finite[0]:
                result.last_quarter_change[term] = tail[-1] / tail[0]
    result.advice = _advice(result)
    return result


def _deprecated_cosine_threshold(function: str, value: float | None) -> None:
    if value is not None:
        warnings.warn(
            f"{function}(cosine_threshold=...) is deprecated and ignored: the report reads the conflict alarm's spans "
            "from the monitor's alarm/grad_conflict/<a>_vs_<b> tags. Drop the argument.",
            DeprecationWarning,
            stacklevel=3,
        )


#: The monitor's default ratio threshold, for a history that did not log its own.
_DEFAULT_THRESHOLD = 100.0


def _nearly_satisfied_at(
    history: History, pair: tuple[str, str], step: int, weighted: dict[str, dict[int, float]], threshold: float
) -> float | None:
    """:func:`~lightning_pinn.diagnostics.nearly_satisfied` for ``(largest, smallest)`` at ``step``,
    within ``√threshold`` as the monitor's alarm tests it; None if a loss was not logged there."""
    losses = [dict(zip(*history[f"loss/{term}"])).get(step) if f"loss/{term}" in history else None for term in pair]
    if losses[0] is None or losses[1] is None:
        return None
    big, small = pair
    return nearly_satisfied(weighted[big][step], losses[0], weighted[small][step], losses[1], math.sqrt(threshold))


def _pair_at(step: int, ratio: float, weighted: dict[str, dict[int, float]]) -> tuple[str, str] | None:
    """(largest, smallest): the pair of terms whose weighted gradient norms at ``step`` give the
    logged ``ratio`` (with the monitor's ratio_terms, the largest and smallest of all terms need not
    be it); None with fewer than two non-zero norms."""
    norms = {t: series[step] for t, series in weighted.items() if step in series and series[step] > 0}
    if len(norms) < 2:
        return None
    logged = math.log(ratio)
    return min(
        ((a, b) for a in norms for b in norms if a != b and norms[a] >= norms[b]),
        key=lambda pair: abs(math.log(norms[pair[0]] / norms[pair[1]]) - logged),
    )


def _zero_weight_terms(d: Diagnosis) -> list[str]:
    """Terms whose λ was 0 at every recorded step (they did not train), sorted."""
    return sorted(term for term, (_, _, _, high) in d.weights.items() if high == 0)


def _alarmed_terms(d: Diagnosis) -> set[str]:
    """The terms of the pairs the ratio alarm was about (every term with a weight when unknown)."""
    terms = {term for pair in d.ratio_span_pairs if pair is not None for term in pair[:2]}
    return terms | set(d.worst_pair or ()) if terms else set(d.weights)


def _advice(d: Diagnosis) -> list[str]:
    advice = []
    # only the weights of the alarmed pairs' terms can have caused, or fixed, a crossing (a balancer
    # or schedule of a third term changes nothing about 'pde' over 'bc')
    involved = _alarmed_terms(d)
    changed = min((step for term, step in d.weights_changed_at.items() if term in involved), default=None)
    adapted = changed is not None  # such a weight moved at some step (also one put back later, e.g. by hand)
    # a weight that moved by at least 2x: enough to credit the balancing with the ratio's fall
    rebalanced = any(low > 0 and high / low >= 2 for term, (_, _, low, high) in d.weights.items() if term in involved)
    if d.ratio_spans and rebalanced and changed is not None and all(end is not None and start < changed for start, end in d.ratio_spans):
        # e.g. the step-0 measurement, taken before a balancer's first update
        ends = max(end for _, end in d.ratio_spans if end is not None)
        advice.append(
            f"The ratio was above the threshold only before the weights first changed (step {changed}) and was back "
            f"below it by step {ends}: the new weights brought it down, nothing to fix there."
        )
    elif d.ratio_spans and adapted and not rebalanced and all(end is not None for _, end in d.ratio_spans):
        ends = max(end for _, end in d.ratio_spans if end is not None)
        advice.append(
            f"The ratio was back below the threshold by step {ends}, but the weights changed by less than 2x, so the "
            "balancing did not bring it down. If it crosses again in a longer fit, add `GradNormBalancer()` (or "
            "`NTKBalancer()`) for the terms involved."
        )
    elif d.ratio_spans and not adapted and all(end is not None for _, end in d.ratio_spans):
        ends = max(end for _, end in d.ratio_spans if end is not None)
        advice.append(
            f"The ratio was back below the threshold by step {ends} with the weights of the terms involved unchanged: "
            "training itself evened the gradients out. Nothing to fix unless it crosses again in a longer fit; then add "
            "`GradNormBalancer()` (or `NTKBalancer()`) for the terms involved."
        )
    elif d.ratio_spans:
        # still on at the end, and the neglected term of every episode kept its weight throughout:
        # whatever changed the other weights (a balancer of other terms), nothing raised that one
        neglected = {pair[1] for pair in d.ratio_span_pairs if pair is not None}
        untouched = bool(neglected) and not neglected & set(d.weights_changed_at) and d.ratio_spans[-1][1] is None
        if adapted and not untouched:
            advice.append(
                "The weights did change during the fit, but the ratio still crossed the threshold: if a balancer changed "
                "them, check that its max_weight does not cap the neglected term's weight, update more often (smaller "
                "every_n_steps) or let it start earlier (warmup_steps=0); if a WeightSchedule or you set them, raise the "
                "neglected term's weight, or add `GradNormBalancer()` (or `NTKBalancer()`) so λ follows the gradients."
            )
        elif d.worst_pair and d.worst_ratio and d.worst_pair_nearly_satisfied is not None:
            big, small = d.worst_pair
            advice.append(
                f"'{small}' may simply be nearly satisfied: at step {d.worst_ratio_step} its small gradient came from its small "
                f"residual (per unit of RMS residual, λ·‖∇L‖/√L, the two gradients were within "
                f"{d.worst_pair_nearly_satisfied:.3g}x), so nothing was neglected. Raising λ_{small} by the ratio, by hand or "
                f"with a gradient-norm balancer (which raises it roughly as 1/√L), can destabilise the fit: keep '{small}' out "
                "of the balancer's terms=..., or cap max_weight; `NTKBalancer()` does not shrink a term's trace with its residual."
            )
        elif d.worst_pair and d.worst_ratio:
            big, small = d.worst_pair
            now = d.weights.get(small, (1.0,))[0]
            advice.append(
                f"Add `GradNormBalancer()` (or `NTKBalancer()`) to the Trainer's callbacks (or, if one is attached for "
                f"other terms, add '{small}' to its terms=) so λ follows the gradients, or raise "
                f"λ_{small} by about {d.worst_ratio:.3g}x (to ≈ {now * d.worst_ratio:.3g}) so that its gradient is not "
                f"drowned by '{big}'. If '{small}' is an initial or boundary condition, a hard constraint "
                "(`lightning_pinn.constraints.IVPAnsatz`, `DirichletAnsatz1D`) imposes it exactly and removes the term."
            )
    ongoing = sorted({f"'{a}' and '{b}'" for a, b, _, end, _ in d.conflict_spans if end is None})
    cleared = sorted({f"'{a}' and '{b}'" for a, b, _, end, _ in d.conflict_spans if end is not None} - set(ongoing))
    if ongoing:
        advice.append(
            f"The gradients of {', '.join(ongoing)} still fought at the end (the conflict alarm was on). Reweighting cannot fix "
            "opposed gradients: impose the initial/boundary condition exactly with a hard constraint "
            "(`lightning_pinn.constraints.IVPAnsatz`, `DirichletAnsatz1D`), which removes that term, or lower the learning rate."
        )
    if cleared:
        advice.append(
            f"The gradients of {', '.join(cleared)} fought for a while, and the conflict alarm cleared: a phase of the fit, "
            "nothing to fix unless it comes back and stays in a longer fit (then see the hard constraints in "
            "`lightning_pinn.constraints`, or lower the learning rate)."
        )
    for term, step in d.nonfinite_steps.items():
        advice.append(
            f"Term '{term}' had a NaN/inf gradient from step {step}: look for NaN/inf in its residual (a division by zero, "
            "the log or square root of a non-positive value), or lower the learning rate if the fit diverged."
        )
    if d.zero_gradient_terms:
        advice.append(
            f"Term(s) {', '.join(repr(t) for t in d.zero_gradient_terms)} ended with an exactly zero gradient: the residual "
            "reaches no trainable parameter (is it computed from the network's output?) or is already exactly satisfied; "
            "no weight can change that."
        )
    unweighted = _zero_weight_terms(d)
    if unweighted:
        advice.append(
            f"Term(s) {', '.join(repr(t) for t in unweighted)} had λ = 0 throughout, so they did not train: give them a "
            "positive weight if that was not intended."
        )
    stalled = [t for t in d.stalled_terms if t not in d.zero_gradient_terms and t not in d.nonfinite_steps]
    if stalled and not ongoing:
        advice.append(
            f"Term(s) {', '.join(repr(t) for t in stalled)} stopped improving in the last quarter of the fit; "
            "train longer with a decaying learning rate, or add points where their residual is large."
        )
    if not advice:
        advice.append("Nothing to fix: no alarm fired and no term stalled.")
    return advice


def _steps_text(start: int, end: int | None) -> str:
    return f"steps {start}–{'end' if end is None else end}"


def render_markdown(d: Diagnosis, title: str = "Loss-balance diagnosis") -> str:
    """The diagnosis as a short Markdown document in plain language."""
    lines = [f"# {title}", ""]
    if d.measurements == 0:
        lines.append(
            "No gradient-norm measurements were found: attach a GradientNormMonitor to the Trainer for the gradient-norm "
            "ratio and the conflict analysis."
        )
        if not d.weights and not d.losses:
            return "\n".join(lines) + "\n"
        lines += _weights_and_losses(d)
        return "\n".join(lines) + "\n"
    if d.measurements == 1:
        lines.append(f"1 measurement, step {d.first_step}.")
    else:
        lines.append(f"{d.measurements} measurements, steps {d.first_step}–{d.last_step}.")
    lines += ["", "## Gradient-norm ratio", ""]
    if d.worst_ratio is None and d.terms < 2:
        lines.append("- The loss has one term: there is no ratio to compare.")
    elif d.worst_ratio is None:
        zero_weight = _zero_weight_terms(d)
        if zero_weight:
            lines.append(
                f"- Fewer than two terms had a finite, non-zero weighted gradient: the weight of "
                f"{', '.join(repr(t) for t in zero_weight)} was 0 throughout, so that term did not train at all. "
                "If that was not intended, give it a positive weight."
            )
        else:
            lines.append("- Fewer than two terms had a finite, non-zero gradient: there was nothing to compare.")
    else:
        threshold = f"{d.threshold:g}x" if d.threshold else "the threshold"
        pair = f" ('{d.worst_pair[0]}' over '{d.worst_pair[1]}')" if d.worst_pair else ""
        clears = (
            f" (an alarm ends when the ratio falls to {d.recovery_threshold:g}x or below)"
            if d.recovery_threshold is not None and d.threshold and d.recovery_threshold < d.threshold
            else ""
        )
        lines.append(f"- Worst ratio: {d.worst_ratio:.3g}x at step {d.worst_ratio_step}{pair}; threshold {threshold}{clears}.")
        if d.ratio_spans:
            pairs = d.ratio_span_pairs or [None] * len(d.ratio_spans)
            spans = ", ".join(
                _first_listed(
                    [
                        _steps_text(s, e) + ("" if pair is None else f" ('{pair[0]}' over '{pair[1]}', up to {pair[2]:.3g}x)")
                        for (s, e), pair in zip(d.ratio_spans, pairs)
                    ],
                    "episodes",
                )
            )
            lines.append(
                f"- Above the threshold in {len(d.ratio_spans)} episode(s): {spans} ({d.ratio_measurements_above} of {d.measurements} measurements)."
            )
        elif not d.ratio_held_steps:
            lines.append("- Never above the threshold.")
        if d.ratio_held_steps:
            held = d.ratio_held_steps
            lines.append(
                f"- Above the threshold at {len(held)} measurement(s) with the alarm off (steps {held[0]}–{held[-1]}): it "
                "waited for an attached balancer's first update, which replaces the initial λ."
            )
    lines += ["", "## Gradient conflict", ""]
    if d.conflict_spans:
        lines += _first_listed(
            [
                f"- '{a}' vs '{b}': opposed gradients{'' if math.isnan(cosine) else f' (mean cosine {cosine:.2f})'}, conflict "
                f"alarm on, {_steps_text(start, end)}."
                for a, b, start, end, cosine in d.conflict_spans
            ],
            "conflict episodes",
            bullet=True,
        )
    else:
        lines.append("- No conflict alarm.")
    lines += _weights_and_losses(d)
    lines += ["", "## What to try", ""]
    lines += [f"- {item}" for item in d.advice]
    return "\n".join(lines) + "\n"


#: How many episodes the report lists one by one; the rest are counted (a ratio hovering at the
#: threshold, measured every step, can start hundreds of short episodes).
_LISTED_EPISODES = 12


def _first_listed(items: list[str], what: str, bullet: bool = False) -> list[str]:
    """``items`` up to :data:`_LISTED_EPISODES`: beyond that the first ones, one entry counting
    those in between, and the last one (which says whether the alarm was still on at the end)."""
    if len(items) <= _LISTED_EPISODES:
        return items
    rest = len(items) - _LISTED_EPISODES
    more = f"{rest} more {what if rest > 1 else what.rstrip('s')} (the logged alarm/* series show every one)"
    return items[: _LISTED_EPISODES - 1] + [f"- … {more} …" if bullet else f"… {more} …"] + items[-1:]


def _weights_and_losses(d: Diagnosis) -> list[str]:
    """The report's sections on the weights' and the losses' course."""
    lines = ["", "## Weights λ", ""] if d.weights else []
    for term, (first, last, low, high) in d.weights.items():
        if first == last == low == high:
            lines.append(f"- {term}: {first:.4g} throughout (unchanged).")
        else:
            lines.append(
                f"- {term}: {first:.4g} → {last:.4g} (range {low:.4g}–{high:.4g}, ×{last / first:.3g} overall)."
                if first
                else f"- {term}: {first:.4g} → {last:.4g}."
            )
    if d.losses:
        lines += ["", "## Losses", ""]
    for term, (first, last) in d.losses.items():
        note = ""
        if term in d.last_quarter_change:
            change = d.last_quarter_change[term]
            note = f" — rose ×{change:.3g} in the last quarter" if change > 1.1 else " — stalled in the last quarter"
        lines.append(f"- {term}: {first:.3g} → {last:.3g}{note}.")
    return lines


def plot_history(history: History, path: str | Path | BinaryIO, title: str = "") -> None:
    """PNG: per-term gradient norms (raw and weighted) and weights λ over the steps.

    ``path`` may also be a binary file object, which receives PNG bytes; a file name's suffix
    picks the format (``.png``, ``.svg``, ``.pdf``).

    Uses matplotlib's object API with the Agg canvas (no pyplot state, no GUI backend) and a
    fixed layout, so the end-of-fit report stays a small one-off cost.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    names: list[str] = []  # every term, in first-seen order: one colour per term on both axes
    for prefix in ("grad_norm", "loss", "weight"):
        names += [term for term in history.terms(prefix) if term not in names]
    many = len(names) > 8  # one legend beside the axes, terms only, and colours that do not repeat
    if many:
        from matplotlib import colormaps

        turbo = colormaps["turbo"]
        colours = {term: turbo(0.05 + 0.9 * index / (len(names) - 1)) for index, term in enumerate(names)}
    else:
        colours = {term: f"C{index}" for index, term in enumerate(names)}
    figure = Figure(figsize=(11, 7) if many else (9, 7))
    FigureCanvasAgg(figure)
    norms_axis, weights_axis = figure.subplots(2, 1, sharex=True)
    figure.subplots_adjust(left=0.08 if many else 0.1, right=0.8 if many else 0.97, top=0.94 if title else 0.97, bottom=0.08, hspace=0.08)

    def positive(values: list[float]) -> list[float]:
        return [v if v > 0 else math.nan for v in values]

    for term in history.terms("grad_norm"):
        steps, values = history[f"grad_norm/{term}"]
        norms_axis.semilogy(steps, positive(values), color=colours[term], label=term if many else f"‖∇L_{term}‖")
        if f"grad_norm_weighted/{term}" in history:
            steps, values = history[f"grad_norm_weighted/{term}"]
            label = "_" if many else f"λ‖∇L_{term}‖"  # "_": no legend entry
            norms_axis.semilogy(steps, positive(values), color=colours[term], linestyle="--", label=label)
    norms_axis.set_ylabel("gradient norm (dashed: λ·norm)" if many else "gradient norm")
    if not history.terms("grad_norm"):  # no monitor: the losses instead
        for term in history.terms("loss"):
            steps, values = history[f"loss/{term}"]
            norms_axis.semilogy(steps, positive(values), color=colours[term], label=term if many else f"L_{term}")
        norms_axis.set_ylabel("loss (no gradient norms measured)")
        if not history.terms("loss"):  # a loss only a balancer watched: its weights alone were logged
            norms_axis.set_ylabel("")
            norms_axis.text(
                0.5,
                0.5,
                "no gradient norms or losses logged\n(attach a GradientNormMonitor to this loss)",
                ha="center",
                va="center",
                transform=norms_axis.transAxes,
            )
    for term in history.terms_in_loss_order("weight"):
        steps, values = history[f"weight/{term}"]
        weights_axis.semilogy(steps, positive(values), color=colours[term], label="_" if many else f"λ_{term}")
    weights_axis.set_ylabel("weight λ")
    weights_axis.set_xlabel("step")
    if many:
        handles, labels = norms_axis.get_legend_handles_labels()
        if not handles:  # weights only
            handles, labels = weights_axis.get_legend_handles_labels()
        figure.legend(
            handles, labels, loc="upper left", bbox_to_anchor=(0.81, 0.97), fontsize=6, ncol=1 if len(names) <= 36 else 2, title="terms"
        )
    else:
        for axis, columns in ((norms_axis, 2), (weights_axis, 1)):
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=8, ncol=columns)
    norms_axis.grid(True, alpha=0.3)
    weights_axis.grid(True, alpha=0.3)
    if title:
        norms_axis.set_title(title)
    for axis in (norms_axis, weights_axis):
        # Drawing cost is in the ticks: no minor ticks on the log axes, and plain "1e+02" labels
        # instead of mathtext ones (which go through a parser on every draw).
        axis.minorticks_off()
        axis.yaxis.set_major_formatter(LogFormatter())
    if isinstance(path, (str, Path)):  # the format from the file name (.png, .svg, .pdf)
        suffix = Path(path).suffix.lower()
        options: dict[str, Any] = {"pil_kwargs": {"compress_level": 1}} if suffix == ".png" else {}
        figure.savefig(path, dpi=90, **options)
    else:
        figure.savefig(path, format="png", dpi=90, pil_kwargs={"compress_level": 1})


def write_report(
    history: History,
    folder: str | Path,
    title: str = "Loss-balance diagnosis",
    cosine_threshold: float | None = None,
    name: str = "diagnosis",
) -> tuple[Path | str, Path | str]:
    """Write ``<name>.md`` and ``<name>.png`` into ``folder``; return their paths.

    ``folder`` may be a local path or an fsspec URL (``s3://…``, ``memory://…``: a logger's remote
    ``save_dir``), written through its filesystem; for a URL the paths returned are URLs (``str``).
    """
    _deprecated_cosine_threshold("write_report", cosine_threshold)
    diagnosis = diagnose(history)
    return _write_report_files(_report_markdown(diagnosis, title, name), history, folder, title, name)


def _report_markdown(diagnosis: Diagnosis, title: str, name: str) -> str:
    """The text of ``<name>.md``: the diagnosis, a link to ``<name>.png`` and a note of what it covers."""
    text = render_markdown(diagnosis, title)
    text += f"\n![gradient norms and weights]({name}.png)\n"
    if diagnosis.measurements:  # what the report covers, for `lightning-pinn report` to compare
        text += f"\n<!-- {_COVERAGE} measurements={diagnosis.measurements} first_step={diagnosis.first_step} -->\n"
    return text


def _write_report_files(text: str, history: History, folder: str | Path, title: str, name: str) -> tuple[Path | str, Path | str]:
    """Write ``text`` as ``<name>.md`` and the chart of ``history`` as ``<name>.png`` into ``folder``."""
    if "://" in str(folder):  # a remote folder: through fsspec, as Lightning's loggers write there
        from lightning_fabric.utilities.cloud_io import get_filesystem

        url = str(folder).rstrip("/")
        filesystem = get_filesystem(url)
        filesystem.makedirs(url, exist_ok=True)
        with filesystem.open(f"{url}/{name}.md", "w", encoding="utf-8") as handle:
            handle.write(text)
        with filesystem.open(f"{url}/{name}.png", "wb") as handle:
            plot_history(history, handle, title)
        return f"{url}/{name}.md", f"{url}/{name}.png"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    markdown = folder / f"{name}.md"
    picture = folder / f"{name}.png"
    markdown.write_text(text, encoding="utf-8")
    plot_history(history, picture, title)
    return markdown, picture


_COVERAGE = "lightning-pinn coverage:"


def _coverage(markdown: Path) -> tuple[int, int] | None:
    """(measurements, first step) an existing report covers, from the note :func:`write_report` leaves."""
    try:
        found = re.search(rf"<!-- {re.escape(_COVERAGE)} measurements=(\d+) first_step=(\d+) -->", markdown.read_text(encoding="utf-8"))
    except OSError:
        return None
    return (int(found.group(1)), int(found.group(2))) if found else None


def _natural_key(path: Path) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def logger_prefix(history: History) -> str:
    """What the logger put before every tag of the run: ``"train-"`` for
    ``TensorBoardLogger(prefix="train")`` (the common start of all tags, up to its last ``-``)."""
    common = os.path.commonprefix(history.tags())
    candidate = common[: common.rfind("-") + 1]
    # (not a cut through the monitor's or a balancer's own tags, e.g. the lone tag grad_norm/u-x)
    families = ("grad_norm/", "weight_target/")
    return candidate if any(family in tag[len(candidate) :] for tag in history.tags() for family in families) else ""


def loss_prefixes(history: History) -> list[str]:
    """The losses a run's monitors measured: ``""`` for the one-loss tags (``grad_norm/<term>``),
    ``"<loss path>/"`` for each loss of a module with several (``second/grad_norm/<term>``), and
    for each such loss that only a balancer watched (``second/weight_target/<term>``); each after
    the logger's own prefix, if any (:func:`logger_prefix`: ``train-grad_norm/<term>``)."""
    tags = history.tags()
    before = logger_prefix(history)
    prefixes: list[str] = []
    if history.layout_losses:
        prefixes = [p for p in history.layout_losses if any(tag.startswith(f"{p}grad_norm/") for tag in tags)]
    else:
        for tag in tags:
            head, found, _ = tag[len(before) :].partition("grad_norm/")
            if found and (head == "" or head.endswith("/")) and before + head not in prefixes:
                prefixes.append(before + head)
    # a loss of a module with several that only a balancer watched: "<loss path>/" (one segment: a
    # path with '/' is refused) before weight_target/<term>, with the weight/<term> every balancer
    # logs beside it (a tag of the module's own, e.g. "val/weight_target/x", has none)
    names = set(tags)
    for tag in tags:
        head, found, term = tag[len(before) :].partition("weight_target/")
        if (
            found
            and head.count("/") == 1
            and head.endswith("/")
            and f"{before}{head}weight/{term}" in names
            and before + head not in prefixes
        ):
            prefixes.append(before + head)
    return prefixes


def without_prefix(history: History, prefix: str) -> History:
    """The series of one loss, with its prefix removed (``prefix=""``: the unprefixed tags)."""
    out = History()
    longer = [p for p in loss_prefixes(history) if p != prefix and p.startswith(prefix)]  # other losses' tags
    for tag in history.tags():
        if not tag.startswith(prefix) or any(tag.startswith(p) for p in longer):
            continue
        name = tag[len(prefix) :]
        out._steps[name], out._values[name] = history._steps[tag], history._values[tag]
    return out


def own_series(history: History, term_names: Sequence[str] | None = None) -> History:
    """One loss's series without the ``loss/…`` and ``weight/…`` tags lightning-pinn did not write.

    A module's own ``self.log("loss/total")`` or ``self.log("weight/ic", on_step=True,
    on_epoch=True)`` (Lightning writes ``weight/ic_step`` and ``weight/ic_epoch``) share the
    library's tag families; read as terms they would be reported as losses and weights. The
    terms are ``term_names`` (the monitor's layout names them); else those measured or set
    (``grad_norm/``, ``weight_target/``, ``ntk_trace/<term>``) and the weights logged at the
    same steps as theirs (the loss's other terms); with none of these, a ``_step``/``_epoch``
    pair is dropped.
    """
    terms: set[str] | None = set(term_names) if term_names else None
    if terms is None:
        known = set(history.terms("grad_norm") + history.terms("weight_target") + history.terms("ntk_trace"))
        if known:
            steps = {tuple(history[f"weight/{t}"][0]) for t in known if f"weight/{t}" in history}
            terms = known | {t for t in history.terms("weight") if tuple(history[f"weight/{t}"][0]) in steps}

    def lightning_pair(family: str, term: str) -> bool:
        for suffix, other in (("_step", "_epoch"), ("_epoch", "_step")):
            if term.endswith(suffix) and f"{family}/{term.removesuffix(suffix)}{other}" in history:
                return True
        return False

    out = History()
    out.layout_losses = history.layout_losses
    out.layout_terms = history.layout_terms
    for tag in history.tags():
        family, _, term = tag.partition("/")
        if family in ("loss", "weight") and term and (term not in terms if terms is not None else lightning_pair(family, term)):
            continue
        out._steps[tag], out._values[tag] = history._steps[tag], history._values[tag]
    return out


def report_runs(logdir: str | Path) -> list[tuple[Path, str, str | None]]:
    """Write a report beside every run under ``logdir`` (one per loss in a run with several
    ``MultiTermLoss``); return ``(Markdown file, its text, None)`` per report, the PNG beside it.

    ``logdir`` may also be one event file: then only that file is read (a folder's event files
    are read together, as TensorBoard does, e.g. a run and its resumption). Where the report
    cannot be written (a read-only folder), the text is still returned, with the reason as the
    third element instead of ``None``.
    """
    root = Path(logdir)
    single = root.is_file() and root.name.startswith("events.out.tfevents.")
    out: list[tuple[Path, str, str | None]] = []
    for run in [root.parent] if single else sorted(find_runs(logdir), key=_natural_key):
        history = read_history(root if single else run)
        prefixes = loss_prefixes(history)
        before = logger_prefix(history)
        for prefix in prefixes or [""]:
            loss = history.layout_losses.get(prefix, prefix[len(before) :].rstrip("/"))
            title = f"Loss-balance diagnosis: {root if single else run}" + (f" (loss '{loss}')" if loss else "")
            name = f"diagnosis_{loss}" if loss else "diagnosis"
            if single:  # beside the run's own report (which covers all its event files), not over it
                name += "." + root.name.removeprefix("events.out.tfevents.")
            series = own_series(without_prefix(history, prefix), history.layout_terms.get(prefix))
            existing = run / f"{name}.md"
            diagnosis, covered = diagnose(series), _coverage(existing)
            reason = None
            if not prefixes and existing.exists():
                # nothing measured in these files (e.g. a logger that renamed the tags): keep the
                # report the fit wrote rather than replace it with an empty one
                reason = "not written: no monitor tags found here, and a report already exists"
            elif covered and diagnosis.first_step is not None and covered[1] < diagnosis.first_step:
                # e.g. the report of a fit resumed into a new version folder, which covers the whole
                # run from the monitor's checkpointed history, while these files hold only its end
                reason = (
                    f"not written: the existing report covers more of the run ({covered[0]} measurements from step "
                    f"{covered[1]}) than these event files ({diagnosis.measurements} from step {diagnosis.first_step}), "
                    "e.g. a fit resumed into a new version folder"
                )
            else:
                text = _report_markdown(diagnosis, title, name)
                try:
                    markdown_path, _ = _write_report_files(text, series, run, title, name)
                except OSError as error:
                    reason = f"could not write it: {error.strerror or error}"
                else:
                    out.append((Path(markdown_path), text, None))
                    continue
            out.append((existing, render_markdown(diagnosis, title), reason))
    return out
