"""Values pinned exactly, each written against a deliberate bug (a mutant of the library) that
the rest of the suite let pass: the weighted total on measured steps, leaf gradients, sampled
traces, rule details (SoftAdapt, ReLoBRaLo, GradNorm), threshold boundaries, and state that must
survive a checkpoint."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from conftest import ExtraTermPoisson, TwoTermPoisson, flat_gradient, make_trainer

from lightning_pinn import MultiTermLoss
from lightning_pinn.callbacks import (
    GradientNormMonitor,
    GradNormBalancer,
    GradNormWeighting,
    NTKBalancer,
    ReLoBRaLoBalancer,
    SoftAdaptBalancer,
    UncertaintyWeighting,
)
from lightning_pinn.rules import gradnorm_objective, relobralo_balance, softadapt_weights


def _quiet_fit(steps: int, callbacks: list[Any], model: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(steps, callbacks).fit(model)


class _Recorded(TwoTermPoisson):
    """λ = (1, 7); records the returned loss against a hand computation, and ∂loss/∂(boundary points)."""

    def __init__(self) -> None:
        super().__init__(pde_weight=1.0, bc_weight=7.0)
        self.totals: list[tuple[float, float]] = []
        self.point_grads: list[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        xb = self.xb.clone().requires_grad_(True)
        r_pde, r_bc = self.pde_residual(self.x), self.net(xb)
        loss = self.criterion(pde=r_pde, bc=r_bc)
        self.totals.append((loss.item(), (r_pde.square().mean() + 7.0 * r_bc.square().mean()).item()))
        self.point_grads.append(torch.autograd.grad(loss, xb, retain_graph=True)[0])
        return loss


def test_a_measured_step_returns_and_differentiates_the_weighted_total() -> None:
    torch.manual_seed(0)
    plain = _Recorded()
    torch.manual_seed(0)
    measured = _Recorded()
    make_trainer(1).fit(plain)
    make_trainer(2, [GradientNormMonitor(every_n_steps=1, verbose=False, report=False)]).fit(measured)
    for got, want in measured.totals:
        assert got == pytest.approx(want, rel=1e-6)  # Σ λ_i L_i, not Σ L_i
    # a leaf outside the parameters (the boundary points) gets Σ λ_i ∂L_i/∂x, as without the callback
    torch.testing.assert_close(measured.point_grads[0], plain.point_grads[0], rtol=1e-5, atol=1e-7)


class _UnitRows(TwoTermPoisson):
    """r_pde = a over 32 points, r_bc = a over 2 points: every point's ‖∂r/∂θ‖² is 1."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.ones(()))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.criterion(pde=self.a * torch.ones(32), bc=self.a * torch.ones(2))


def test_a_sampled_trace_is_the_mean_over_the_sampled_points() -> None:
    balancer = NTKBalancer(every_n_steps=1, trace_points=4)
    _quiet_fit(1, [balancer], _UnitRows())
    assert balancer.last_traces == pytest.approx({"pde": 1.0, "bc": 1.0})


def test_softadapt_normalises_by_the_sum_of_absolute_slopes() -> None:
    weights = softadapt_weights([0.9, 1.5], [1.0, 1.0], beta=1.0)  # slopes −0.1, +0.5: Σ|s| = 0.6
    exps = [math.exp(-0.1 / 0.6), math.exp(0.5 / 0.6)]
    assert weights == pytest.approx([2 * e / sum(exps) for e in exps])
    assert sum(softadapt_weights([0.9, 0.5], [1.0, 1.0], beta=1.0, loss_weighted=True)) == pytest.approx(2.0)


def test_relobralo_divides_by_the_temperature() -> None:
    exps = [math.exp(1.0 / 0.5), math.exp(0.1 / 0.5)]
    assert relobralo_balance([1.0, 0.1], [1.0, 1.0], temperature=0.5) == pytest.approx([2 * e / sum(exps) for e in exps])


def test_the_gradnorm_target_is_held_constant() -> None:
    """With K = 3 a target that is differentiated changes the gradient (with K = 2 it does not)."""
    w = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    gradnorm_objective(w, torch.tensor([10.0, 1.0, 0.1]), torch.ones(3), alpha=1.5).backward()
    assert w.grad is not None and w.grad.tolist() == pytest.approx([10.0, -1.0, -0.1])  # sign(G_i − mean G)·g_i


class _Scripted(TwoTermPoisson):
    """Losses scripted by step through one parameter a = 1 that never moves: L_pde(t) = s(t)², L_bc = 1."""

    def __init__(self, scale: Any) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.ones(()))
        self.scale = scale

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        s = self.scale(self.trainer.global_step)
        return self.criterion(pde=s * self.a * torch.ones(4), bc=self.a * torch.ones(4))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_relobralo_with_expected_rho_one_keeps_its_history() -> None:
    model = _Scripted(lambda t: 1.0 / (t + 1))
    _quiet_fit(6, [ReLoBRaLoBalancer(alpha=1.0, expected_rho=1.0)], model)  # λ ← ρ·λ with ρ = 1 always
    assert model.criterion.weights == {"pde": 1.0, "bc": 1.0}


def test_relobralo_compares_with_the_first_losses() -> None:
    model = _Scripted(lambda t: 1.0 / (t + 1))
    _quiet_fit(4, [ReLoBRaLoBalancer(alpha=1.0, expected_rho=0.0, temperature=1.0)], model)
    exps = [math.exp(1 / 16), math.exp(1.0)]  # λ = 2·softmax(L(3)/L(0)), L_pde(3)/L_pde(0) = 1/16
    assert model.criterion.weights == pytest.approx({"pde": 2 * exps[0] / sum(exps), "bc": 2 * exps[1] / sum(exps)}, rel=1e-6)


def test_a_ratio_equal_to_the_threshold_does_not_alarm() -> None:
    """'more than 10²': ‖∇L_pde‖ = 2·100·a and ‖∇L_bc‖ = 2·a give a ratio of exactly 100."""
    monitor = GradientNormMonitor(every_n_steps=1, threshold=100.0, verbose=False, report=False)
    _quiet_fit(1, [monitor], _Scripted(lambda t: 10.0))
    assert monitor.diagnosis.worst_ratio == 100.0 and monitor.diagnosis.ratio_alarm_episodes == 0


def test_the_default_conflict_patience_spans_200_steps() -> None:
    assert GradientNormMonitor(every_n_steps=30).cosine_patience == 7  # ceil(200 / 30)


def test_the_alarm_suggests_raising_the_small_terms_weight_by_the_ratio() -> None:
    monitor = GradientNormMonitor(every_n_steps=1, threshold=10.0, verbose=False, report=False)
    with pytest.warns(UserWarning) as caught:
        make_trainer(1, [monitor]).fit(_Scripted(lambda t: 10.0))  # ratio 100 over 'bc' at λ_bc = 1
    text = " ".join(str(w.message) for w in caught)
    assert "'bc'" in text and "about 100" in text, text


class _Opposed(TwoTermPoisson):
    """Gradients exactly opposed (u → 1 and u → −1) while the loss stalls: the conflict streak grows."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        u = self.net(self.x)
        return self.criterion(pde=u - 1.0, bc=u + 1.0)


def test_the_monitor_and_balancer_states_that_a_checkpoint_must_carry() -> None:
    """A resumed fit must continue the conflict streak, the absence counts, the skipped-update
    count and the clamp warnings already given (else the alarm comes late or warns twice)."""
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False, cosine_patience=50)
    _quiet_fit(4, [monitor], _Opposed())
    assert max(monitor._conflict_streak.values()) >= 3
    restored = GradientNormMonitor(every_n_steps=1, verbose=False, report=False, cosine_patience=50)
    restored.load_state_dict(monitor.state_dict())
    assert restored._conflict_streak == monitor._conflict_streak

    absent = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    _quiet_fit(3, [absent], ExtraTermPoisson("data", lambda m, _: None if m.global_step >= 1 else m.net(m.x) - 0.3))
    assert absent._absent_for.get("data", 0) >= 2
    restored = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    restored.load_state_dict(absent.state_dict())
    assert restored._absent_for == absent._absent_for

    balancer = GradNormBalancer(every_n_steps=1, max_weight=2.0)
    model = ExtraTermPoisson("data", lambda m, _: (m.net(m.x) - 0.3) * (float("nan") if m.global_step == 1 else 1e-4))
    _quiet_fit(3, [balancer], model)
    assert balancer.skipped_updates >= 1 and balancer._clamp_warned
    restored_balancer = GradNormBalancer(every_n_steps=1, max_weight=2.0)
    restored_balancer.load_state_dict(balancer.state_dict())
    assert restored_balancer.skipped_updates == balancer.skipped_updates and restored_balancer._clamp_warned == balancer._clamp_warned


# ---------------------------------------------------------------- measurements over several calls
class _HalfPresent(ExtraTermPoisson):
    """A 'data' term present in the first micro-batch of each accumulated step only; records its loss."""

    def __init__(self) -> None:
        self.data_losses: list[float] = []

        def data(model: Any, batch_idx: int) -> torch.Tensor | None:
            if batch_idx % 2:
                return None
            residual = model.net(model.x) - 0.3
            self.data_losses.append(residual.square().mean().item())
            return residual

        super().__init__("data", data)


def test_a_term_absent_from_one_micro_batch_is_averaged_over_the_ones_it_was_in() -> None:
    model = _HalfPresent()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(1, [monitor], accumulate_grad_batches=2).fit(model)
    measurement = monitor.last_measurement
    assert measurement is not None and measurement.micro_batches == 2
    assert measurement.losses[2].item() == pytest.approx(model.data_losses[0], rel=1e-6)  # not halved


def test_two_toggled_calls_of_one_step_average_their_losses() -> None:
    """One optimizer per parameter group: the step's two calls are merged into one measurement,
    whose losses are the mean of the two calls' (not their sum)."""
    from test_reliability import TogglingInverseProblem

    class Recorded(TogglingInverseProblem):
        def __init__(self) -> None:
            super().__init__()
            self.call_losses: list[dict[str, float]] = []

        def training_step(self, batch: Any, batch_idx: int) -> None:
            for optimizer in self.optimizers():
                self.toggle_optimizer(optimizer)
                loss = self.criterion(**self.residuals())
                self.call_losses.append({name: value.item() for name, value in self.criterion.last_losses.items()})
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()
                self.untoggle_optimizer(optimizer)

    model = Recorded()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    _quiet_fit(2, [monitor], model)
    measurement = monitor.last_measurement
    assert measurement is not None
    first, second = model.call_losses[-2:]
    for index, name in enumerate(measurement.terms):
        assert measurement.losses[index].item() == pytest.approx((first[name] + second[name]) / 2, rel=1e-6)


def test_the_gradient_norm_rule_reads_unweighted_norms() -> None:
    """The 2021 release's trap: with λ_bc = 5 in force, λ̂ must come from ‖∇L_i‖, not ‖∇(λ_i L_i)‖."""
    torch.manual_seed(0)
    model = TwoTermPoisson(bc_weight=5.0)
    params = [p for p in model.parameters() if p.requires_grad]
    residuals = model.residuals()
    norms = [flat_gradient(residuals[name].square().mean(), params).norm().item() for name in ("pde", "bc")]
    balancer = GradNormBalancer(every_n_steps=1, momentum=0.0)
    _quiet_fit(1, [balancer], model)
    big = max(norms)
    assert balancer.last_target == pytest.approx({"pde": big / norms[0], "bc": big / norms[1]}, rel=1e-5)


def test_accumulated_micro_batches_sample_different_ntk_points(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_pinn import engine

    drawn: list[list[int]] = []
    original = engine.sample_points

    def recording(*args: Any, **kwargs: Any) -> Any:
        points = original(*args, **kwargs)
        drawn.append([] if points is None else points.tolist())
        return points

    monkeypatch.setattr(engine, "sample_points", recording)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(1, [NTKBalancer(every_n_steps=1, trace_points=8)], accumulate_grad_batches=2).fit(TwoTermPoisson(points=64))
    pde_draws = [points for points in drawn if points and max(points) > 1]  # the 64-point term (bc has 2 points)
    assert len(pde_draws) == 2 and pde_draws[0] != pde_draws[1]


# ---------------------------------------------------------------- loss-based and trained rules
class _ScriptedThree(TwoTermPoisson):
    """Scripted losses through a = 1 that never moves: L_pde = s(t)², L_bc = 4, L_data = 0.25 or absent."""

    def __init__(self, scale: Any, data_absent: Any) -> None:
        super().__init__()
        self.criterion = MultiTermLoss(pde=1.0, bc=1.0, data=1.0)
        self.a = torch.nn.Parameter(torch.ones(()))
        self.scale, self.data_absent = scale, data_absent

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        step = self.trainer.global_step
        data = None if self.data_absent(step) else 0.5 * self.a * torch.ones(4)
        return self.criterion(pde=self.scale(step) * self.a * torch.ones(4), bc=2.0 * self.a * torch.ones(4), data=data)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_softadapt_compares_a_returning_term_with_its_last_loss() -> None:
    """'data' is absent at steps 1-2: at step 3 its change is taken against its step-0 loss, not against 0."""
    model = _ScriptedThree(lambda t: 1.0 / (t + 1), lambda t: t in (1, 2))
    _quiet_fit(4, [SoftAdaptBalancer(every_n_steps=1, beta=1.0)], model)
    expected = softadapt_weights([1 / 16, 4.0, 0.25], [1 / 9, 4.0, 0.25], beta=1.0)
    assert list(model.criterion.weights.values()) == pytest.approx(expected, rel=1e-6)


def test_uncertainty_weighting_leaves_an_absent_terms_weight_alone() -> None:
    weights, trained = [], []
    for steps in (1, 3):  # 'data' absent at steps 1 and 2: neither its λ nor its s = −log λ moves
        model = _ScriptedThree(lambda t: 1.0, lambda t: t >= 1)
        balancer = UncertaintyWeighting(every_n_steps=1)
        _quiet_fit(steps, [balancer], model)
        weights.append(model.criterion.weights["data"])
        trained.append(float(balancer._parameter.detach()[2]))
    assert weights[1] == weights[0] != 1.0 and trained[1] == trained[0]
    assert balancer.last_target["bc"] == pytest.approx(1 / 4.0)  # the rule's target λ = 1/L


def test_gradnorm_weighting_measures_training_rates_from_the_first_losses() -> None:
    """r_i = (L_i(t)/L_i(0)) / mean_j(…): with the PDE loss falling, alpha changes the weights
    (were L_i(0) replaced by the latest loss, every r_i would be 1 and alpha would do nothing)."""
    final = {}
    for alpha in (0.0, 1.5):
        model = _ScriptedThree(lambda t: 1.0 / (t + 1), lambda t: False)
        _quiet_fit(4, [GradNormWeighting(alpha=alpha, every_n_steps=1)], model)
        final[alpha] = model.criterion.weights
    assert final[1.5]["pde"] < final[0.0]["pde"]  # the fastest-falling term trains least
