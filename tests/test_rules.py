"""The weighting rules as pure functions: formulas from the papers, and their direction."""

from __future__ import annotations

import math

import pytest

from lightning_pinn.rules import grad_norm_weights, ntk_trace_weights, smooth


def test_max_rule_matches_wang_2021() -> None:
    norms = [250.0, 2.5, 25.0]  # pde, ic, bc
    weights = grad_norm_weights(norms, "max")
    assert weights == pytest.approx([1.0, 100.0, 10.0])
    # after weighting, every term pulls with the largest norm
    assert [w * n for w, n in zip(weights, norms)] == pytest.approx([250.0] * 3)


def test_mean_rule_matches_the_2023_guide() -> None:
    norms = [250.0, 2.5, 25.0]
    weights = grad_norm_weights(norms, "mean")
    mean = (250 + 2.5 + 25) / 3
    assert weights == pytest.approx([mean / 250, mean / 2.5, mean / 25])
    assert [w * n for w, n in zip(weights, norms)] == pytest.approx([mean] * 3)


def test_reference_term_is_held_at_one() -> None:
    norms = [4.0, 0.5]
    for rule in ("max", "mean"):
        assert grad_norm_weights(norms, rule, reference=0) == pytest.approx([1.0, 8.0])
    assert grad_norm_weights(norms, "max", reference=1) == pytest.approx([0.125, 1.0])


@pytest.mark.parametrize("rule", ["max", "mean"])
def test_smaller_gradient_gets_larger_weight(rule: str) -> None:
    norms = [3.0, 0.03, 0.3, 30.0]
    weights = grad_norm_weights(norms, rule)  # type: ignore[arg-type]
    by_norm = [w for _, w in sorted(zip(norms, weights))]
    assert all(a > b for a, b in zip(by_norm, by_norm[1:])), "weights must fall as gradient norms rise"


def test_ntk_rule_matches_wang_yu_perdikaris_2022() -> None:
    traces = [1000.0, 10.0]
    weights = ntk_trace_weights(traces)
    assert weights == pytest.approx([1010.0 / 1000.0, 1010.0 / 10.0])
    assert weights[1] > weights[0], "the term with the smaller NTK trace gets the larger weight"
    # after weighting, every term's trace contributes the same: λ_i t_i = Σ_j t_j
    assert [w * t for w, t in zip(weights, traces)] == pytest.approx([1010.0, 1010.0])
    assert ntk_trace_weights(traces, reference=0) == pytest.approx([1.0, 100.0])


def test_zero_or_nonfinite_inputs_give_nan_not_inf() -> None:
    weights = grad_norm_weights([2.0, 0.0, 1.0], "max")
    assert weights[0] == pytest.approx(1.0) and weights[2] == pytest.approx(2.0)
    assert math.isnan(weights[1])
    assert all(math.isnan(w) for w in ntk_trace_weights([0.0, 0.0]))
    assert not any(math.isnan(w) for w in grad_norm_weights([1.0, 2.0], "max", reference=None))
    assert all(math.isnan(w) for w in grad_norm_weights([0.0, 2.0], "max", reference=0))
    assert grad_norm_weights([math.inf, 2.0, 4.0], "mean") == pytest.approx([math.nan, 1.5, 0.75], nan_ok=True)


def test_smooth_is_an_exponential_moving_average() -> None:
    assert smooth([1.0], [11.0], 0.9) == pytest.approx([2.0])
    assert smooth([1.0], [11.0], 0.0) == pytest.approx([11.0])
    with pytest.raises(ValueError, match="momentum"):
        smooth([1.0], [1.0], 1.0)


def test_unknown_rule() -> None:
    with pytest.raises(ValueError, match="'max' or 'mean'"):
        grad_norm_weights([1.0, 1.0], "median")  # type: ignore[arg-type]


def _readme_block(marker: str) -> str:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    return readme.split(f"<!-- test:{marker} -->\n", 1)[1].split("```python\n", 1)[1].split("\n```", 1)[0]


def test_the_readmes_rule_examples_give_the_values_in_their_comments() -> None:
    """Each line of the README's block is a call followed by ``# <expected value>: ...``."""
    code = _readme_block("rules")
    namespace: dict[str, object] = {}
    checked = 0
    for line in code.splitlines():
        if "#" not in line or line.startswith("from "):
            exec(line, namespace)
            continue
        call, comment = line.split("#", 1)
        expected = comment.split(":", 1)[0].strip()
        assert eval(call, namespace) == pytest.approx(eval(expected)), line
        checked += 1
    assert checked == 4


def test_the_readmes_custom_rule_trains_and_weights_the_smaller_gradient_more() -> None:
    import warnings

    from conftest import TwoTermPoisson, make_trainer

    from lightning_pinn.callbacks import GradientNormMonitor

    namespace: dict[str, object] = {"__name__": "readme_custom_rule"}
    exec(compile(_readme_block("custom-rule"), "README.md:custom-rule", "exec"), namespace)
    balancer = namespace["balancer"]
    monitor = GradientNormMonitor(every_n_steps=10, verbose=False, report=False)
    model = TwoTermPoisson(bc_weight=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(21, [monitor, balancer]).fit(model)
    assert balancer.num_updates == 3
    first = monitor.history["grad_norm/pde"][1][0], monitor.history["grad_norm/bc"][1][0]
    # two terms: the median is their mean, so λ̂ = mean/‖g‖ gives the smaller gradient the larger weight
    smaller, larger = ("bc", "pde") if first[1] < first[0] else ("pde", "bc")
    weights = model.criterion.weights
    assert weights[smaller] > weights[larger] and all(math.isfinite(w) for w in weights.values())


def test_held_at_reference_divides_by_the_reference_target() -> None:
    from lightning_pinn.rules import held_at_reference

    assert held_at_reference([4.0, 2.0, 8.0], 1) == [2.0, 1.0, 4.0]
    # a gradient-norm rule's targets c/‖g_i‖, held at the reference, are ‖g_ref‖/‖g_i‖ whatever c
    norms = [3.0, 0.5, 12.0]
    assert held_at_reference(grad_norm_weights(norms, "mean"), 0) == pytest.approx(grad_norm_weights(norms, "max", reference=0))
    for unusable in (0.0, math.nan, math.inf, -1.0):
        assert all(math.isnan(v) for v in held_at_reference([1.0, unusable, 2.0], 1))


@pytest.mark.parametrize("absent_from", [None, 10])
def test_a_custom_rule_holds_its_reference_at_one_like_the_built_in_rules(absent_from: int | None) -> None:
    """README: a rule of your own inherits ``reference=``: held at λ = 1, and no weight changes
    (one warning) while the reference term is absent."""
    import warnings

    import torch
    from conftest import ExtraTermPoisson, make_trainer

    from lightning_pinn.alerts import WeightUpdateWarning
    from lightning_pinn.callbacks import GradNormBalancer

    namespace: dict[str, object] = {"__name__": "readme_custom_rule"}
    exec(compile(_readme_block("custom-rule"), "README.md:custom-rule", "exec"), namespace)
    custom_rule = namespace["MedianNormBalancer"]

    def extra(model: object, batch_idx: int) -> object:
        return None if absent_from is not None and batch_idx >= absent_from else 0.01 * (model.net(model.x) - 1)  # type: ignore[attr-defined]

    results = []
    for balancer in (custom_rule(every_n_steps=5, reference="data"), GradNormBalancer(every_n_steps=5, reference="data")):
        torch.manual_seed(0)
        model = ExtraTermPoisson("data", extra, weight=2.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer(21, [balancer]).fit(model)
        about_reference = [w for w in caught if issubclass(w.category, WeightUpdateWarning) and "reference term 'data'" in str(w.message)]
        assert len(about_reference) == (0 if absent_from is None else 1)
        results.append(model.criterion.weights)
    # median/‖g_i‖ held at the reference is ‖g_data‖/‖g_i‖: the built-in rule's target, step for step
    assert results[0] == pytest.approx(results[1], rel=1e-6)
    assert results[0]["data"] == pytest.approx(1.0)
