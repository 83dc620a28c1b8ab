"""The other rules of the field: formulas, direction, and each callback on a real fit."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import TwoTermPoisson, flat_gradient, make_trainer

from lightning_pinn import MultiTermLoss
from lightning_pinn.alerts import TermGradientWarning, WeightUpdateWarning
from lightning_pinn.callbacks import (
    GradNormBalancer,
    GradNormWeighting,
    LRAnnealingBalancer,
    NTKBalancer,
    ReLoBRaLoBalancer,
    SoftAdaptBalancer,
    UncertaintyWeighting,
    WeightSchedule,
)
from lightning_pinn.rules import (
    gradient_entry_statistics,
    gradnorm_objective,
    inverse_training_rates,
    lr_annealing_weights,
    relobralo_balance,
    relobralo_weights,
    softadapt_weights,
    uncertainty_objective,
)


# ------------------------------------------------------------------ pure formulas
def test_gradient_entry_statistics_are_max_and_mean_of_the_absolute_entries() -> None:
    gradients = torch.tensor([[3.0, -4.0, 1.0, 0.0], [-0.5, 0.25, 0.0, 0.25]])
    top, bottom = gradient_entry_statistics(gradients, ("max", "mean"))
    assert top == [4.0, 0.5] and bottom == [2.0, 0.25]
    # of the weighted losses' gradients λ_i g_i (the 2021 code's convention)
    (weighted,) = gradient_entry_statistics(gradients, ("mean",), weights=torch.tensor([2.0, 10.0]))
    assert weighted == [4.0, 2.5]


def test_inverse_training_rates_are_the_relative_loss_ratios() -> None:
    # L̃ = (0.5, 1.0, 0.25 / 0.5 = 0.5): mean 2/3, so r = (0.75, 1.5, 0.75)
    assert inverse_training_rates([0.5, 2.0, 0.25], [1.0, 2.0, 0.5]) == pytest.approx([0.75, 1.5, 0.75])
    assert inverse_training_rates([1.0, 3.0], [0.0, 3.0]) == [1.0, 1.0]  # L(0) = 0 counts as L̃ = 1
    assert inverse_training_rates([0.0, 0.0], [1.0, 2.0]) == [1.0, 1.0]  # every loss at 0: no term is behind


def test_softadapt_weights_the_slowest_term_most() -> None:
    weights = softadapt_weights([0.9, 0.5], [1.0, 1.0], beta=5.0)  # 'a' fell by 0.1, 'b' by 0.5
    assert weights[0] > weights[1] and sum(weights) == pytest.approx(2.0)
    slopes = [-0.1 / 0.6, -0.5 / 0.6]
    exps = [math.exp(5 * s) for s in slopes]
    assert weights == pytest.approx([2 * e / sum(exps) for e in exps])
    rising = softadapt_weights([1.2, 0.5], [1.0, 1.0], beta=1.0)
    assert rising[0] > rising[1]


def test_relobralo_balance_and_update() -> None:
    balance = relobralo_balance([1.0, 0.1], [1.0, 1.0], temperature=1.0)  # 'b' fell 10x, 'a' not at all
    assert balance[0] > balance[1] and sum(balance) == pytest.approx(2.0)
    expected = [2 * math.exp(1) / (math.exp(1) + math.exp(0.1)), 2 * math.exp(0.1) / (math.exp(1) + math.exp(0.1))]
    assert balance == pytest.approx(expected)
    new = relobralo_weights([1.0, 1.0], [1.0, 0.1], [1.0, 1.0], [2.0, 2.0], alpha=0.5, rho=1.0, temperature=1.0)
    assert new == pytest.approx([0.5 * 1.0 + 0.5 * expected[0], 0.5 * 1.0 + 0.5 * expected[1]])
    restart = relobralo_weights([1.0, 1.0], [1.0, 0.1], [1.0, 1.0], [1.0, 1.0], alpha=1.0, rho=0.0, temperature=1.0)
    assert restart == pytest.approx(expected), "ρ = 0 replaces the history by the balance against step 0"


def test_relobralo_takes_the_limit_of_an_overflowing_ratio() -> None:
    """A loss ratio that overflows to inf (a previous loss near the smallest float) gives the softmax's
    limit, not NaN for every term (found by review: the whole update was dropped)."""
    assert relobralo_balance([1.0, 1.0], [1e-310, 1.0]) == [2.0, 0.0]
    assert relobralo_balance([1.0, 1.0, 1.0], [1e-310, 1e-310, 1.0]) == [1.5, 1.5, 0.0]
    assert relobralo_balance([1.0, 1.0], [1e-323, 1.0]) == [2.0, 0.0]  # T·L(t') rounds to 0 (was ZeroDivisionError)
    # scores NaN and inf in either order: NaN for every term (the update is skipped), not an answer
    # that depends on the order (max() of a list holding NaN does)
    for losses, reference in (([math.nan, 1.0], [1.0, 1e-323]), ([1.0, math.nan], [1e-323, 1.0])):
        assert all(math.isnan(w) for w in relobralo_balance(losses, reference))
    assert relobralo_balance([1.0, 1.0], [1e-300, 1.0], temperature=1e-30) == [2.0, 0.0]
    new = relobralo_weights([1.0, 1.0], [1.0, 1.0], [1e-310, 1.0], [1.0, 1.0], alpha=0.999, rho=1.0)
    assert all(math.isfinite(w) for w in new) and new == pytest.approx([1.001, 0.999])


def test_lr_annealing_uses_max_over_mean_entries() -> None:
    weights = lr_annealing_weights([8.0, 3.0], [2.0, 0.04], reference=0)
    assert weights == pytest.approx([1.0, 200.0])
    assert weights[1] > weights[0], "the term with smaller gradient entries gets the larger weight"


def test_lr_annealing_paper_formula_and_release_variant_on_a_real_step() -> None:
    """gradients='unweighted': max|∇L_pde| / mean|∇L_bc| by hand; 'weighted' (the 2021 release): that over λ_bc."""
    targets = {}
    for gradients in ("unweighted", "weighted"):
        torch.manual_seed(0)
        model = Unequal()
        model.criterion.set_weights({"bc": 4.0})
        if gradients == "unweighted":
            params = [p for p in model.parameters() if p.requires_grad]
            g_pde = flat_gradient(model.residuals()["pde"].square().mean(), params)
            g_bc = flat_gradient((1e-3 * (model.net(model.x) - 1)).square().mean(), params)
            by_hand = (g_pde.abs().max() / g_bc.abs().mean()).item()
        callback = LRAnnealingBalancer(reference="pde", every_n_steps=1, momentum=0.0, gradients=gradients, max_weight=1e12)
        _fit(callback, steps=1, model=model)
        targets[gradients] = model.criterion.weights["bc"]
    assert targets["unweighted"] == pytest.approx(by_hand, rel=1e-4)
    assert targets["weighted"] == pytest.approx(by_hand / 4.0, rel=1e-4)
    with pytest.raises(ValueError, match="gradients must be 'unweighted'"):
        LRAnnealingBalancer(reference="pde", gradients="scaled")  # type: ignore[arg-type]


def test_gradnorm_objective_raises_the_weight_of_the_small_gradient() -> None:
    weights = torch.tensor([1.0, 1.0], requires_grad=True)
    objective = gradnorm_objective(weights, torch.tensor([10.0, 0.1]), torch.tensor([1.0, 1.0]), alpha=1.5)
    objective.backward()
    assert weights.grad is not None and weights.grad[1] < 0 < weights.grad[0], "descent raises w_small and lowers w_big"


def test_uncertainty_objective_fixed_point_is_inverse_loss() -> None:
    s = torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.Adam([s], lr=0.05)
    losses = torch.tensor([4.0, 0.25])
    for _ in range(2000):
        optimizer.zero_grad()
        uncertainty_objective(s, losses).backward()
        optimizer.step()
    assert torch.exp(-s).tolist() == pytest.approx([0.25, 4.0], rel=1e-2)


# ------------------------------------------------------------------ callbacks on real fits
class Unequal(TwoTermPoisson):
    """'bc' is 1000x smaller in scale than 'pde': smaller loss, smaller gradient."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        residuals = self.residuals()
        return self.criterion(pde=residuals["pde"], bc=1e-3 * (self.net(self.x) - 1))


def _fit(callback: pl.Callback, steps: int = 30, model: pl.LightningModule | None = None) -> pl.LightningModule:
    model = model or Unequal()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(steps, [callback]).fit(model)
    return model


@pytest.mark.parametrize(
    "callback",
    [
        lambda: LRAnnealingBalancer(reference="pde", every_n_steps=1),
        lambda: GradNormWeighting(learning_rate=0.05),
        lambda: UncertaintyWeighting(learning_rate=0.1),
    ],
    ids=["lr-annealing", "gradnorm", "uncertainty"],
)
def test_small_term_gets_the_larger_weight(callback: Any) -> None:
    model = _fit(callback())
    weights = model.criterion.weights
    assert weights["bc"] > weights["pde"], weights
    assert all(math.isfinite(v) and v > 0 for v in weights.values())


@pytest.mark.parametrize(
    "callback",
    [lambda: SoftAdaptBalancer(beta=10.0, every_n_steps=2), lambda: ReLoBRaLoBalancer(alpha=0.5, temperature=1.0)],
    ids=["softadapt", "relobralo"],
)
def test_loss_rules_favour_the_stalled_term(callback: Any) -> None:
    class Stalled(TwoTermPoisson):
        """'fixed' cannot improve (its residual ignores the network's output); 'pde' can."""

        def __init__(self) -> None:
            super().__init__()
            self.criterion = MultiTermLoss(pde=1.0, fixed=1.0)
            self.offset = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.criterion(pde=self.residuals()["pde"], fixed=1.0 + 0.0 * self.offset + torch.zeros(4))

    model = _fit(callback(), steps=20, model=Stalled())
    weights = model.criterion.weights
    assert weights["fixed"] > weights["pde"], weights


@pytest.mark.parametrize(
    "callback",
    [
        lambda: SoftAdaptBalancer(beta=10.0, every_n_steps=1),
        lambda: ReLoBRaLoBalancer(alpha=0.5, temperature=1.0),
        lambda: GradNormWeighting(learning_rate=0.05),
        lambda: UncertaintyWeighting(learning_rate=0.1),
    ],
    ids=["softadapt", "relobralo", "gradnorm", "uncertainty"],
)
def test_a_term_passed_as_none_keeps_its_weight(callback: Any) -> None:
    """A term absent from a step (``None``) has no loss to compare: its λ and history stay put.

    These rules used to read the absent term's loss as 0 (λ drifting every step), and
    GradNormWeighting fixed the ratio of a term absent at its first update at 1 for good.
    """

    class Intermittent(TwoTermPoisson):
        """'data' is given only on steps 0-1 and from step 12 on."""

        def __init__(self) -> None:
            super().__init__()
            self.criterion = MultiTermLoss(pde=1.0, bc=1.0, data=1.0)
            self.seen: list[tuple[int, float]] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            step = self.trainer.global_step
            self.seen.append((step, self.criterion.weights["data"]))
            data = None if 2 <= step < 12 else 0.1 * (self.net(self.x) - 1)
            return self.criterion(**self.residuals(), data=data)

    model = _fit(callback(), steps=16, model=Intermittent())
    weights = dict(model.seen)
    # absent on steps 2..11: the weight used on step 12 is the one set after step 1's update
    assert [weights[s] for s in range(3, 13)] == [weights[2]] * 10, weights
    assert weights[15] != weights[12]  # back in the rule once it is present again
    assert all(math.isfinite(v) and v > 0 for v in model.criterion.weights.values())


def test_loss_rules_do_no_backward_work(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_pinn.engine import TermGradientEngine

    calls: list[int] = []
    original = TermGradientEngine.weighted_total
    monkeypatch.setattr(TermGradientEngine, "weighted_total", lambda *a, **k: calls.append(1) or original(*a, **k))
    balancer = SoftAdaptBalancer(every_n_steps=1)
    _fit(balancer, steps=5)
    assert calls == [] and balancer.num_updates == 4


def test_weight_schedule_linear_and_step() -> None:
    recorded: list[float] = []

    class Record(pl.Callback):
        def on_before_backward(self, trainer: pl.Trainer, pl_module: Any, loss: torch.Tensor) -> None:
            recorded.append(pl_module.criterion.weights["bc"])

    schedule = WeightSchedule({"bc": [(0, 1.0), (4, 5.0)]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(7, [schedule, Record()]).fit(TwoTermPoisson())
    assert recorded == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0])
    step = WeightSchedule({"bc": [(0, 1.0), (2, 10.0)]}, interpolation="step")
    assert [step.weight_at("bc", s) for s in range(4)] == [1.0, 1.0, 10.0, 10.0]


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: WeightSchedule({}), "schedule must map"),
        (lambda: WeightSchedule({"bc": [(5, 1.0), (2, 2.0)]}), r"schedule=.*term 'bc' must be strictly increasing"),
        (lambda: WeightSchedule({"bc": [(0, -1.0)]}), r"schedule=.*term 'bc' must be finite and >= 0"),
        (lambda: WeightSchedule({"bc": []}), r"schedule=.*term 'bc' has no knots.*\{'bc': \[\(0, 1.0\)\]\}"),
        (lambda: WeightSchedule({"bc": 3}), r"schedule=.*knots of term 'bc' must be \(step, weight\) pairs"),
        # a key that is not a term name: the message once said "a list of term names ... or None"
        (lambda: WeightSchedule({"": [(0, 1.0)]}), r"schedule=.*keys must be term names .*got ''"),
        (lambda: WeightSchedule({5: [(0, 1.0)]}), r"schedule=.*keys must be term names .*got 5"),  # type: ignore[dict-item]
        (lambda: WeightSchedule({"bc": [(0, 1.0)]}, interpolation="cubic"), "interpolation"),
        (lambda: SoftAdaptBalancer(beta=0), "beta"),
        (lambda: ReLoBRaLoBalancer(alpha=2), "alpha"),
        (lambda: LRAnnealingBalancer(reference=None), "reference"),  # type: ignore[arg-type]
        # the message must not offer None, which the same check refuses (it once said "or None")
        (lambda: LRAnnealingBalancer(reference=""), r"reference must name the residual term .*it is required"),
        (lambda: LRAnnealingBalancer(reference="pde", numerator="median"), "numerator"),  # type: ignore[arg-type]
        (lambda: GradNormWeighting(learning_rate=0), "learning_rate"),
        (lambda: UncertaintyWeighting(learning_rate=-1), "learning_rate"),
    ],
)
def test_bad_arguments(factory: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize(
    "factory",
    [
        lambda: SoftAdaptBalancer(every_n_steps=1),
        lambda: ReLoBRaLoBalancer(expected_rho=0.5, seed=1),
        lambda: GradNormWeighting(),
        lambda: UncertaintyWeighting(),
    ],
    ids=["softadapt", "relobralo", "gradnorm", "uncertainty"],
)
def test_resume_is_exact(tmp_path: Any, factory: Any) -> None:
    def run(interrupted: bool) -> dict[str, float]:
        torch.manual_seed(0)
        model = Unequal()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not interrupted:
                make_trainer(12, [factory()]).fit(model)
                return model.criterion.weights
            trainer = make_trainer(6, [factory()], default_root_dir=str(tmp_path))
            trainer.fit(model)
            trainer.save_checkpoint(tmp_path / "mid.ckpt")
            resumed = Unequal()
            make_trainer(12, [factory()], default_root_dir=str(tmp_path)).fit(resumed, ckpt_path=str(tmp_path / "mid.ckpt"))
            return resumed.criterion.weights

    assert run(True) == run(False)


def test_relobralo_resumed_with_another_seed_continues_the_checkpoints_draws_and_says_so(tmp_path: Any) -> None:
    model = Unequal()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(4, [ReLoBRaLoBalancer(expected_rho=0.5, seed=7)], default_root_dir=str(tmp_path))
        trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(6, [ReLoBRaLoBalancer(expected_rho=0.5, seed=8)]).fit(Unequal(), ckpt_path=str(tmp_path / "mid.ckpt"))
    messages = [str(w.message) for w in caught if "ReLoBRaLoBalancer" in str(w.message)]
    assert len(messages) == 1 and "seed=7" in messages[0] and "seed=8 given now is not used" in messages[0]


@pytest.mark.parametrize("make", [GradNormWeighting, UncertaintyWeighting], ids=["gradnorm", "uncertainty"])
def test_a_weight_set_by_hand_between_fits_is_where_the_trained_rule_goes_on_from(make: Any) -> None:
    """The next update returned to the rule's own trained value (λ_bc 100 -> 0.90), where the
    smoothing rules go on from the λ in force."""
    model, balancer = Unequal(), make(every_n_steps=1)
    trainer = make_trainer(10, [balancer])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
        pde = model.criterion.weights["pde"]
        model.criterion.set_weights({"bc": 100.0 * pde})
        trainer.fit_loop.epoch_loop.max_steps = 11  # one more step: one more update
        trainer.fit(model)
    weights = model.criterion.weights
    if make is UncertaintyWeighting:  # each λ_i = exp(−s_i) on its own: one Adam step from 100·λ_pde
        assert weights["bc"] == pytest.approx(100.0 * pde, rel=0.05)
    else:  # renormalised to Σ w = K = 2, in the ratio you gave (one Adam step from it)
        assert weights["bc"] / weights["pde"] == pytest.approx(100.0, rel=0.2) and sum(weights.values()) == pytest.approx(2.0)


@pytest.mark.parametrize("make", [GradNormWeighting, UncertaintyWeighting], ids=["gradnorm", "uncertainty"])
def test_a_second_resume_before_the_next_update_keeps_the_trained_weights(tmp_path: Any, make: Any) -> None:
    """A checkpoint written after a resume but before the next update held no trained parameter
    or Adam state (they waited, loaded, for that update): resuming from it restarted them from λ."""

    def fit(stops: list[int]) -> dict[str, float]:
        checkpoint = None
        for index, steps in enumerate(stops):
            torch.manual_seed(0)
            model = Unequal()
            trainer = make_trainer(steps, [make(every_n_steps=5)], default_root_dir=str(tmp_path))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.fit(model, ckpt_path=checkpoint)
            checkpoint = str(tmp_path / f"stop{index}.ckpt")
            trainer.save_checkpoint(checkpoint)
        return model.criterion.weights

    assert fit([7, 9, 16]) == fit([16])  # updates at steps 5, 10, 15: none between 7 and 9


@pytest.mark.parametrize(
    "factory",
    [
        lambda: GradNormBalancer(every_n_steps=2),
        lambda: NTKBalancer(every_n_steps=2, trace_points=8),
        lambda: SoftAdaptBalancer(beta=10.0, every_n_steps=2),
        lambda: ReLoBRaLoBalancer(alpha=0.5, temperature=1.0),
        lambda: GradNormWeighting(learning_rate=0.05),
        lambda: UncertaintyWeighting(learning_rate=0.1),
    ],
    ids=["gradnorm", "ntk", "softadapt", "relobralo", "gradnorm-weighting", "uncertainty"],
)
def test_a_balancer_reused_for_another_fit_starts_afresh(factory: Any) -> None:
    """One balancer object used for two fits (a seed sweep, say): the second fit's weights are
    those of a fresh balancer (the first update takes λ̂ directly, no state from the first fit)."""

    def fit(balancer: Any) -> dict[str, float]:
        torch.manual_seed(0)
        return _fit(balancer, steps=6, model=Unequal()).criterion.weights

    reused = factory()
    fit(reused)
    assert fit(reused) == pytest.approx(fit(factory()), rel=1e-6)


def test_the_base_class_is_not_a_balancer_by_itself() -> None:
    from lightning_pinn.callbacks import WeightBalancer

    with pytest.raises(TypeError, match="WeightBalancer is the base class.*use GradNormBalancer"):
        WeightBalancer(1, 0.9, None, None, 1e-6, 1e6, 0, False, None)


def test_a_scheduled_term_absent_for_a_while_comes_back_with_its_scheduled_weight() -> None:
    from conftest import ExtraTermPoisson, make_trainer

    from lightning_pinn.callbacks import WeightSchedule

    seen: list[tuple[int, float]] = []

    def data(model, batch_idx):  # type: ignore[no-untyped-def]
        step = model.trainer.global_step
        seen.append((step, model.criterion.weights["data"]))
        return None if step < 10 else 0.1 * model.net(model.x)

    model = ExtraTermPoisson("data", data, weight=0.0)
    make_trainer(12, [WeightSchedule({"data": [(0, 0.0), (20, 20.0)]})]).fit(model)
    assert dict(seen)[10] == pytest.approx(10.0) and dict(seen)[11] == pytest.approx(11.0)


def test_gradnorm_weighting_with_a_terms_subset_uses_the_fixed_terms_lambda() -> None:
    """terms=['bc']: λ_pde = 5 stays, enters the objective as a constant, and anchors the scale."""
    from conftest import TwoTermPoisson, make_trainer

    from lightning_pinn.callbacks import GradientNormMonitor
    from lightning_pinn.rules import gradnorm_objective

    model = TwoTermPoisson(pde_weight=5.0, bc_weight=2.0)
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    balancer = GradNormWeighting(learning_rate=0.05, every_n_steps=1, terms=["bc"])
    make_trainer(1, [monitor, balancer]).fit(model)
    assert model.criterion.weights["pde"] == 5.0
    # the hand computation of one Adam step (lr 0.05: the first step moves w_bc by ±0.05) from w_bc = 2
    norms = torch.tensor([monitor.history["grad_norm/pde"][1][0], monitor.history["grad_norm/bc"][1][0]], dtype=torch.float64)
    w = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    objective = gradnorm_objective(torch.cat([torch.tensor([5.0], dtype=torch.float64), w]), norms, torch.ones(2, dtype=torch.float64), 1.5)
    objective.backward()
    expected = 2.0 - 0.05 * float(torch.sign(w.grad))
    assert model.criterion.weights["bc"] == pytest.approx(expected, rel=1e-4)


def test_two_balancers_on_one_loss_give_the_same_weights_in_either_order() -> None:
    """LRAnnealingBalancer(gradients="weighted") reads λ_pde, which GradNormBalancer owns: the λ in force at the measured step."""
    from conftest import TwoTermPoisson, make_trainer

    from lightning_pinn.callbacks import GradNormBalancer

    results = []
    for order in (0, 1):
        torch.manual_seed(0)
        model = TwoTermPoisson()
        callbacks = [
            GradNormBalancer(rule="mean", every_n_steps=1, momentum=0.5, terms=["pde"]),
            LRAnnealingBalancer(reference="pde", gradients="weighted", every_n_steps=1, terms=["bc"]),
        ]
        make_trainer(6, callbacks if order == 0 else callbacks[::-1]).fit(model)
        results.append(model.criterion.weights)
    assert results[0]["pde"] != 1.0 and results[0]["bc"] != 1.0
    assert results[0] == pytest.approx(results[1], rel=1e-12)


def test_trained_weights_stay_where_their_lambda_is_clamped() -> None:
    from conftest import TwoTermPoisson, make_trainer

    for balancer in (UncertaintyWeighting(learning_rate=0.5, max_weight=2.0), GradNormWeighting(learning_rate=0.5, max_weight=1.2)):
        model = TwoTermPoisson()
        with pytest.warns(WeightUpdateWarning, match="was clamped to (max|min)_weight"):
            make_trainer(20, [balancer]).fit(model)
        parameter = balancer._parameter
        assert parameter is not None
        internal = torch.exp(-parameter) if isinstance(balancer, UncertaintyWeighting) else parameter
        applied = torch.tensor(list(model.criterion.weights.values()), dtype=torch.float64)
        assert torch.allclose(internal.detach(), applied, rtol=1e-5), type(balancer).__name__


def test_gradnorm_weighting_starts_from_equal_weights_when_every_weight_is_zero() -> None:
    model = TwoTermPoisson(pde_weight=0.0, bc_weight=0.0)
    balancer = GradNormWeighting(learning_rate=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(3, [balancer]).fit(model)  # divided by Σλ = 0 before
    weights = model.criterion.weights
    assert all(math.isfinite(w) and w > 0 for w in weights.values())
    assert sum(weights.values()) == pytest.approx(2.0, rel=1e-5)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SoftAdaptBalancer(normalized="false"), "normalized must be True or False"),
        (lambda: SoftAdaptBalancer(loss_weighted="no"), "loss_weighted must be True or False"),
        (lambda: WeightSchedule({"ic": [(0, 1.0), (99.9, 5.0)]}), r"integers >= 0 \(optimizer steps\), got 99.9"),
        (lambda: WeightSchedule({"ic": [(0, 1.0), (10, True)]}), "must be numbers, got True"),
        (lambda: WeightSchedule({"ic": [(0, np.array([1.0, 2.0]))]}), r"weights of term 'ic' must be numbers, got array\(\[1\., 2\.\]\)"),
        (lambda: WeightSchedule({"ic": [(0, torch.tensor([1.0, 2.0]))]}), r"weights of term 'ic' must be numbers, got tensor"),
        (lambda: WeightSchedule({"ic": [(0, "1.0")]}), r"weights of term 'ic' must be numbers, got '1\.0'"),
    ],
)
def test_loose_arguments_are_refused_by_name(make: Any, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        make()


def test_the_alarm_advice_fits_a_weight_schedule() -> None:
    from lightning_pinn.alerts import LossBalanceWarning
    from lightning_pinn.callbacks import GradientNormMonitor

    model = TwoTermPoisson(bc_weight=1e-6)
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(2, [monitor, WeightSchedule({"bc": [(0, 1e-6)]})]).fit(model)
    alarms = [str(w.message) for w in caught if issubclass(w.category, LossBalanceWarning)]
    assert alarms and "sets λ from its schedule" in alarms[0] and "every_n_steps" not in alarms[0]


def test_a_loss_rule_resumed_from_a_checkpoint_without_its_measurement_count() -> None:
    """Checkpoints from before the count was saved: a SoftAdapt state with its first losses held
    the ratio alarm one cadence too long after the resume."""
    balancer = SoftAdaptBalancer()
    balancer.load_state_dict({"terms": ["pde", "bc"], "num_updates": 0, "previous": [1.0, 2.0]})
    assert balancer._rule_measurements == 1
    fresh = SoftAdaptBalancer()
    fresh.load_state_dict({"terms": ["pde", "bc"], "num_updates": 0, "previous": None})
    assert fresh._rule_measurements == 0


class WithSatisfiedTerm(Unequal):
    """``Unequal`` plus a third term that is exactly zero (a hard-constrained condition): zero gradient."""

    def __init__(self, exact_weight: float = 1.0) -> None:
        super().__init__()
        self.criterion = MultiTermLoss(pde=1.0, bc=1.0, exact=exact_weight)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        residuals = self.residuals()
        u = self.net(self.x)
        return self.criterion(pde=residuals["pde"], bc=1e-3 * (u - 1), exact=0.0 * u)


@pytest.mark.filterwarnings("ignore:GradNormWeighting. the weight of term .pde.*was clamped")
@pytest.mark.parametrize("exact_weight", [1.0, 3.0])
def test_gradnorm_weighting_leaves_a_zero_gradient_term_out_and_keeps_its_weight(exact_weight: float) -> None:
    # The term with a zero gradient keeps its λ and takes no share of Σw = K: the other terms'
    # weights follow exactly the fit without it (before the fix, λ_exact drifted up and took
    # its share from the others; and until a later fix, the first update's rescale of your λ to
    # Σ = K counted λ_exact, so with λ_exact = 3 the others summed to 1.2 instead of 2).
    torch.manual_seed(0)
    with_zero = WithSatisfiedTerm(exact_weight)
    torch.manual_seed(0)
    without = Unequal()
    with pytest.warns(TermGradientWarning, match="'exact' has a zero gradient norm"):
        make_trainer(30, [GradNormWeighting(learning_rate=0.05)]).fit(with_zero)
    _fit(GradNormWeighting(learning_rate=0.05), model=without)
    assert with_zero.criterion.weights["exact"] == exact_weight
    assert without.criterion.weights["bc"] > 1.5  # the rule did move the weights
    for term in ("pde", "bc"):
        assert with_zero.criterion.weights[term] == pytest.approx(without.criterion.weights[term], rel=1e-5)


@pytest.mark.parametrize(
    "make, bound, term",
    [
        (lambda: UncertaintyWeighting(learning_rate=2.0, max_weight=1e3), "max_weight=1000", "bc"),
        (lambda: GradNormWeighting(learning_rate=0.5, min_weight=1e-2), "min_weight=0.01", "pde"),
    ],
    ids=["uncertainty", "gradnorm"],
)
def test_trained_weights_warn_when_their_lambda_is_clamped(make: Any, bound: str, term: str) -> None:
    balancer = make()
    model = Unequal()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(12, [balancer]).fit(model)
    clamped = [str(w.message) for w in caught if issubclass(w.category, WeightUpdateWarning) and "clamped" in str(w.message)]
    assert len(clamped) == 1 and f"term '{term}'" in clamped[0] and bound in clamped[0], clamped  # once per episode


def test_gradnorm_weighting_renormalises_to_k_after_a_clamp_not_to_the_clamped_sum() -> None:
    """Chen et al. renormalise Σ w = K every update; keeping the sum before each update instead
    let a weight clamped at max_weight shrink the scale for good (it ended at Σ w = 1.5 for K = 2)."""
    balancer = GradNormWeighting(learning_rate=0.5, max_weight=1.5)
    model = _fit(balancer, steps=40)
    assert model.criterion.weights["bc"] == 1.5  # clamped: the rule wants more
    # each update proposes (and targets) weights that sum to K = 2, the clamp then applies
    assert sum(balancer.last_target.values()) == pytest.approx(2.0, rel=1e-9)


def test_gradnorm_weighting_keeps_sum_k_over_all_terms_when_one_is_absent_on_some_steps() -> None:
    """With 'data' given every other step, rescaling only the present terms to their count made
    Σλ swing (3.0, 3.03, 3.0, 3.05, …); the present terms now share what the absent one leaves of K."""
    from conftest import ExtraTermPoisson

    sums: list[float] = []

    class Sums(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
            sums.append(sum(pl_module.criterion.weights.values()))

    model = ExtraTermPoisson("data", lambda m, _: None if m.global_step % 2 else m.net(m.x[:4]) - 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(10, [GradNormWeighting(learning_rate=0.05), Sums()]).fit(model)
    assert len(sums) == 10 and sums == pytest.approx([3.0] * 10, rel=1e-6)


def test_uncertainty_weighting_warns_when_it_pulls_a_starting_weight_into_range() -> None:
    model = Unequal()
    model.criterion.set_weights({"bc": 1e9})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(1, [UncertaintyWeighting()]).fit(model)
    assert any(
        issubclass(w.category, WeightUpdateWarning) and "term 'bc'" in str(w.message) and "max_weight=1e+06" in str(w.message)
        for w in caught
    )
    assert model.criterion.weights["bc"] == 1e6
