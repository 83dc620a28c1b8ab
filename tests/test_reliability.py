"""Reliability: accumulation, mixed precision, frozen/unused parameters, hostile input, resume."""

from __future__ import annotations

import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import ExtraTermPoisson, ManualOptimization, TwoLossPoisson, TwoTermPoisson, flat_gradient, make_trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.precision import MixedPrecision

from lightning_pinn import MultiTermLoss
from lightning_pinn.alerts import LossBalanceWarning, TermGradientWarning, WeightUpdateWarning
from lightning_pinn.callbacks import GradientNormMonitor, GradNormBalancer, NTKBalancer
from lightning_pinn.problems import HarmonicOscillator


def _fit(model: pl.LightningModule, steps: int, callbacks: list[Any], **kwargs: Any) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(steps, callbacks, **kwargs).fit(model)
    return list(caught)


def _messages(caught: list[warnings.WarningMessage], category: type[Warning]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, category)]


class AlternatingBatches(TwoTermPoisson):
    """Each batch uses a different half of the points, so micro-batches differ."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = self.x[batch_idx % 2 :: 2].clone().requires_grad_(True)
        u = self.net(x)
        from lightning_pinn.autodiff import derivative

        r_pde = -derivative(u, x, order=2) - torch.pi**2 * torch.sin(torch.pi * x)
        return self.criterion(pde=r_pde, bc=self.net(self.xb) * (1 + batch_idx % 2))


class GradAtStep(pl.Callback):
    """The flattened parameter gradient the optimizer is about to use, per optimizer step."""

    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.grads.append(torch.cat([p.grad.reshape(-1) for p in pl_module.parameters() if p.requires_grad]).clone())


# ------------------------------------------------------------------ gradient accumulation
def test_accumulation_measures_once_per_optimizer_step_on_the_whole_window() -> None:
    model = AlternatingBatches()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False)
    balancer = GradNormBalancer(every_n_steps=1)
    spy = GradAtStep()
    measurements: list[Any] = []

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if monitor.last_measurement is not None and (not measurements or measurements[-1] is not monitor.last_measurement):
                measurements.append(monitor.last_measurement)

    _fit(model, 3, [monitor, balancer, spy, Keep()], accumulate_grad_batches=2)
    assert monitor.diagnosis.measurements == 3 and balancer.num_updates == 3
    assert [m.micro_batches for m in measurements] == [2, 2, 2]
    for measurement, grad in zip(measurements, spy.grads):
        # Σ_i λ_i ∇θ L_i over the window is exactly the gradient the optimizer steps with
        combined = measurement.weights.float() @ measurement.gradients.float()
        assert torch.allclose(combined, grad, rtol=1e-4, atol=1e-6)


class _MaskedFirstMicroBatch(AlternatingBatches):
    """Every residual of the even batches is multiplied by 0 (an all-padding micro-batch), so
    after its backward every .grad is exactly zero without anything having zeroed it."""

    def __init__(self) -> None:
        super().__init__()
        self.hand: list[dict[str, torch.Tensor]] = []  # the odd batches' unmasked term gradients

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        mask = float(batch_idx % 2)
        residuals = {"pde": self.pde_residual(self.x[batch_idx % 2 :: 2]), "bc": self.net(self.xb)}
        if mask:
            self.hand.append(_hand_term_gradients(self, residuals))
        return self.criterion(pde=mask * residuals["pde"], bc=mask * residuals["bc"])


@pytest.mark.parametrize("manual", [False, True])
def test_a_micro_batch_with_an_exactly_zero_gradient_still_counts(manual: bool) -> None:
    # the zero gradients it leaves looked like a zero_grad, and the window dropped it: the norms
    # logged were twice the mean the optimizer steps with
    class Manual(_MaskedFirstMicroBatch):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> None:  # type: ignore[override]
            optimizer = self.optimizers()
            self.manual_backward(super().training_step(batch, batch_idx))
            if batch_idx % 2 == 1:  # manual accumulation over two batches
                optimizer.step()
                optimizer.zero_grad()

    model = Manual() if manual else _MaskedFirstMicroBatch()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    _fit(model, 2, [monitor], **({} if manual else {"accumulate_grad_batches": 2}))
    measurement = monitor.last_measurement
    assert measurement is not None and measurement.gradients is not None and measurement.micro_batches == 2
    for index, name in enumerate(measurement.terms):  # the mean of a zero and the odd batch's gradient
        torch.testing.assert_close(measurement.gradients[index], model.hand[-1][name] / 2, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ mixed precision
def _step0_norms(**trainer_kwargs: Any) -> tuple[float, ...]:
    torch.manual_seed(0)
    model = TwoTermPoisson()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False)
    _fit(model, 1, [monitor], **trainer_kwargs)
    assert monitor.last_report is not None
    return monitor.last_report.norms


def test_bf16_mixed_norms_match_float32() -> None:
    reference = _step0_norms()
    mixed = _step0_norms(precision="bf16-mixed")
    assert mixed == pytest.approx(reference, rel=3e-2)


@pytest.mark.parametrize(("accumulate", "bc_weight"), [(1, 37.3), (3, 37.3), (3, 0.0)])
def test_bf16_mixed_training_is_unchanged_by_the_capture_with_weights_other_than_one(accumulate: int, bc_weight: float) -> None:
    # Under CPU autocast the boundary residual net(xb) is bfloat16. A backward through bf16 ops
    # is not linear in its cotangent: the capture took each term's gradient with the bare
    # cotangent (1/accumulate) and multiplied by λ afterwards, where a plain backward sends
    # λ·cotangent down the term's graph. The parameters drifted 4e-5 apart after one step.
    # λ = 0 sends nothing down: the term is still measured (from the cotangent × 2^-20).
    class Sgd(AlternatingBatches):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    def fit(callbacks: list[Any]) -> Sgd:
        torch.manual_seed(0)
        model = Sgd(bc_weight=bc_weight)
        _fit(model, 3, callbacks, precision="bf16-mixed", accumulate_grad_batches=accumulate)
        return model

    plain = fit([])
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    monitored = fit([monitor])
    for reference, measured in zip(plain.parameters(), monitored.parameters()):
        torch.testing.assert_close(measured, reference, rtol=1e-6, atol=1e-7)
    measurement = monitor.last_measurement
    assert measurement is not None and measurement.gradients is not None
    assert float(measurement.gradients[measurement.terms.index("bc")].norm()) > 0.1


def test_fp16_grad_scaler_scale_is_removed_from_the_norms() -> None:
    reference = _step0_norms()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaled = _step0_norms(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert scaled == pytest.approx(reference, rel=3e-2), "norms must be of the unscaled loss, not 256x larger"


def _bc_norm_at_step0(model: TwoTermPoisson, **trainer_kwargs: Any) -> tuple[float, float]:
    """(measured, hand) ‖∇θ L_bc‖ of the unweighted boundary loss at the first step."""
    params = [p for p in model.parameters() if p.requires_grad]
    hand = flat_gradient(model.net(model.xb).double().square().mean(), params).norm().item()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    _fit(model, 1, [monitor], **trainer_kwargs)
    measurement = monitor.last_measurement
    assert measurement is not None and measurement.gradients is not None
    return float(measurement.gradients[measurement.terms.index("bc")].norm()), hand


@pytest.mark.parametrize(
    ("weight", "dtype", "precision", "rel"),
    [
        (1e-12, torch.float32, "fp16-scaler", 3e-2),  # λ·(loss scale 256) underflows in the fp16 graph: it measured 0
        (1e-44, torch.float32, None, 1e-6),  # a subnormal float32 λ: 18 % off
        (1e-50, torch.float64, None, 1e-6),  # a float64 λ buffer on a float32 network: λ·c is 0 in float32, it measured NaN
    ],
)
def test_an_extreme_weight_is_measured_on_the_unscaled_loss(weight: float, dtype: torch.dtype, precision: str | None, rel: float) -> None:
    # Each term's backward starts from λ_i × the cotangent, as a plain backward's does; a λ far
    # from 1 is measured by a backward of its own, from the cotangent × 2^±20.
    torch.manual_seed(0)
    model = TwoTermPoisson()
    model.criterion.to(dtype)
    model.criterion.set_weights({"bc": weight})
    kwargs: dict[str, Any] = {}
    if precision == "fp16-scaler":
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))]
    measured, hand = _bc_norm_at_step0(model, **kwargs)
    assert measured == pytest.approx(hand, rel=rel)


class _LargeBoundaryResidual(TwoTermPoisson):
    """A boundary term in physical units (residual ≈ 3e4): its gradient overflows float16 at the
    loss scale 2^8 unless a small λ scales it down."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-9)

    def residuals(self) -> dict[str, torch.Tensor]:
        return {"pde": self.pde_residual(self.x), "bc": self.net(self.xb) - 3.0e4}


def _fp16_fit(bc_weight: float, callbacks: list[Any], **kwargs: Any) -> tuple[_LargeBoundaryResidual, float]:
    torch.manual_seed(0)
    model = _LargeBoundaryResidual(bc_weight=bc_weight)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=10**6)
    _fit(model, 6, callbacks, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], **kwargs)
    return model, scaler.get_scale()


@pytest.mark.parametrize(
    ("bc_weight", "ramp", "accumulate"),
    [
        (0.0, False, 1),  # 0 × (its gradient from the loss scale, inf) was NaN: the scaler skipped every step
        (1e-7, False, 1),  # measured from the bare loss scale it overflowed, read as a skipped step: never measured
        (1e-3, True, 2),  # λ = 0 in each window's first micro-batch (a ramp): the same, through the window's mean λ
    ],
)
def test_a_lightly_weighted_term_that_overflows_float16_unweighted_is_trained_and_measured(
    bc_weight: float, ramp: bool, accumulate: int
) -> None:
    # A plain backward sends λ·(loss scale) into the term's graph, which does not overflow. The
    # capture must train the same, and measure it without overflowing either.
    class Ramp(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            pl_module.criterion.set_weights({"bc": 0.0 if batch_idx % 2 == 0 else bc_weight})

    extra = [Ramp()] if ramp else []
    plain, plain_scale = _fp16_fit(bc_weight, [*extra], accumulate_grad_batches=accumulate)
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    monitored, monitored_scale = _fp16_fit(bc_weight, [*extra, monitor], accumulate_grad_batches=accumulate)
    assert monitored_scale == plain_scale == 2.0**8  # no step skipped
    for reference, measured in zip(plain.parameters(), monitored.parameters()):
        torch.testing.assert_close(measured, reference, rtol=0, atol=0)
    assert monitor.diagnosis.measurements == 6  # every step measured
    measurement = monitor.last_measurement
    assert measurement is not None and measurement.gradients is not None
    assert bool(torch.isfinite(measurement.gradients).all())
    if bc_weight == 1e-7:  # and GradNorm raises the weight that most needs it at its first update
        balancer = GradNormBalancer(every_n_steps=1)
        balanced, _ = _fp16_fit(bc_weight, [balancer], accumulate_grad_batches=accumulate)
        assert balancer.num_updates >= 1 and balanced.criterion.weights["bc"] > 1e-5


def test_a_weighted_loss_that_overflows_blows_up_as_without_the_callbacks() -> None:
    # λ_bc·c = 1e30·1e10 is inf in float32: a plain backward sends inf down the term's graph and
    # every parameter's gradient is inf/NaN. The capture (from c·2^20, times a finite λ/2^20)
    # left 8 of 49 parameters finite, a partial step a plain fit never takes.
    class Scaled(TwoTermPoisson):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return 1e10 * self.criterion(**self.residuals())

    def fit(callbacks: list[Any]) -> Scaled:
        torch.manual_seed(0)
        model = Scaled(bc_weight=1e30)
        _fit(model, 1, callbacks)
        return model

    plain = fit([])
    monitored = fit([GradientNormMonitor(every_n_steps=1, verbose=False, report=False)])
    finite = [int(torch.isfinite(p).sum()) for p in monitored.parameters()]
    assert [int(torch.isfinite(p).sum()) for p in plain.parameters()] == finite == [0] * len(finite)


def test_grad_scaler_overflow_steps_are_skipped_quietly() -> None:
    """At a too-large loss scale the scaler skips the step; so do the callbacks, without alarms."""
    torch.manual_seed(0)
    model = TwoTermPoisson()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False)
    balancer = GradNormBalancer(every_n_steps=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    caught = _fit(model, 12, [monitor, balancer], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert scaler.get_scale() < 2.0**20, "the scaler must have met overflowing steps"
    assert not _messages(caught, TermGradientWarning) and not _messages(caught, WeightUpdateWarning)
    assert 0 < monitor.diagnosis.measurements < 12
    assert balancer.num_updates == monitor.diagnosis.measurements
    assert all(math.isfinite(v) for v in model.criterion.weights.values())


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_trains_as_without_the_callbacks_and_the_norms_are_unclipped(algorithm: str) -> None:
    # Lightning clips the summed gradient after the backward; the per-term norms are those of
    # the unweighted losses, before any clipping, and the clipped step is the plain fit's
    def fit(callbacks: list[Any], steps: int) -> TwoTermPoisson:
        torch.manual_seed(0)
        model = TwoTermPoisson()
        model.criterion.set_weights({"bc": 30.0})
        _fit(model, steps, callbacks, gradient_clip_val=0.01, gradient_clip_algorithm=algorithm)
        return model

    plain = fit([], 5)
    monitored = fit([GradientNormMonitor(every_n_steps=1, verbose=False, report=False)], 5)
    for reference, measured in zip(plain.parameters(), monitored.parameters()):
        assert torch.equal(measured, reference)
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    fit([monitor], 1)
    torch.manual_seed(0)
    fresh = TwoTermPoisson()
    params = [p for p in fresh.parameters() if p.requires_grad]
    hand = [float(flat_gradient(r.square().mean(), params).norm()) for r in fresh.residuals().values()]
    assert monitor.last_measurement is not None and monitor.last_measurement.gradients is not None
    assert monitor.last_measurement.gradients.norm(dim=1).tolist() == pytest.approx(hand, rel=1e-6)
    assert min(hand) > 0.01  # far above the clip value: a clipped gradient would have been measured


# ------------------------------------------------------------------ frozen and unused parameters
def test_frozen_parameters_are_left_out() -> None:
    model = TwoTermPoisson()
    model.net[0].weight.requires_grad_(False)
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False)
    _fit(model, 2, [monitor, GradNormBalancer(every_n_steps=1)])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert monitor.last_measurement is not None and monitor.last_measurement.gradients is not None
    assert monitor.last_measurement.gradients.shape == (2, trainable)
    assert model.net[0].weight.grad is None


class GrowingNetwork(TwoTermPoisson):
    """Progressive growth: at step 2 a correction layer is registered and handed to the optimizer
    (in the module's own on_train_batch_start, which Lightning runs after the callbacks')."""

    def __init__(self) -> None:
        super().__init__()
        self.hand: dict[int, torch.Tensor] = {}

    def pde_residual(self, points: torch.Tensor) -> torch.Tensor:
        residual = super().pde_residual(points)
        return residual + self.head(points) if hasattr(self, "head") else residual

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step == 2:
            self.head = torch.nn.Linear(1, 1)
            self.optimizers().optimizer.add_param_group({"params": list(self.head.parameters())})  # type: ignore[union-attr]
        self.hand[self.global_step] = _hand_term_gradients(self, self.residuals())["pde"]


class LastGradients(pl.Callback):
    def __init__(self, monitor: GradientNormMonitor) -> None:
        self.monitor, self.gradients = monitor, {}  # type: ignore[var-annotated]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        measurement = self.monitor.last_measurement
        assert measurement is not None and measurement.gradients is not None
        self.gradients[trainer.global_step - 1] = measurement.gradients[0].clone()


def test_a_parameter_registered_during_the_fit_is_measured_from_that_step() -> None:
    model = GrowingNetwork()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    record = LastGradients(monitor)
    _fit(model, 4, [monitor, record])
    assert [g.numel() for g in record.gradients.values()] == [49, 49, 51, 51]  # 1-16-1: 49 parameters, + head
    for step, gradient in record.gradients.items():
        torch.testing.assert_close(gradient.to(torch.float32), model.hand[step], rtol=1e-5, atol=1e-6)


def test_term_on_frozen_parameters_only_is_named() -> None:
    class FrozenTerm(TwoTermPoisson):
        def __init__(self) -> None:
            super().__init__()
            self.criterion = MultiTermLoss(pde=1.0, bc=1.0, prior=1.0)
            self.prior_net = torch.nn.Linear(1, 1).requires_grad_(False)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.criterion(**self.residuals(), prior=self.prior_net(self.x))

    with pytest.raises(ValueError, match=r"term 'prior' does not require grad.*frozen parameters"):
        _fit(FrozenTerm(), 2, [GradientNormMonitor(every_n_steps=1, report=False)])


def test_a_loss_in_which_no_term_requires_grad_is_an_error_naming_them() -> None:
    class AllFrozen(TwoTermPoisson):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.criterion(**{name: r.detach() for name, r in self.residuals().items()})

    with pytest.raises(ValueError, match=r"no term requires grad \(terms 'pde', 'bc'\).*frozen parameters"):
        _fit(AllFrozen(), 1, [GradientNormMonitor()])


def test_term_that_reaches_no_trainable_parameter_is_warned() -> None:
    class Detached(TwoTermPoisson):
        def __init__(self) -> None:
            super().__init__()
            self.criterion = MultiTermLoss(pde=1.0, bc=1.0, other=1.0)
            self.leaf = torch.ones(3, requires_grad=True)  # requires grad, but is no parameter

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.criterion(**self.residuals(), other=self.leaf * 2)

    monitor = GradientNormMonitor(every_n_steps=1, verbose=False)
    balancer = GradNormBalancer(every_n_steps=1)
    caught = _fit(Detached(), 3, [monitor, balancer])
    messages = _messages(caught, TermGradientWarning)
    assert any("term 'other'" in m and "does not reach any trainable parameter" in m for m in messages)
    assert monitor.last_report is not None and monitor.last_report.unreached_terms == ("other",)
    assert balancer.criterion.weights["other"] == 1.0, "no defined weight: λ unchanged"


# ------------------------------------------------------------------ hostile input
def test_extreme_gradient_ratios_stay_finite_and_are_clamped() -> None:
    class Extreme(TwoTermPoisson):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            u = self.net(self.x)
            return self.criterion(pde=1e15 * (u - 1), bc=1e-15 * (u + 1))

    monitor = GradientNormMonitor(every_n_steps=1, verbose=False)
    balancer = GradNormBalancer(every_n_steps=1)
    caught = _fit(Extreme(), 2, [monitor, balancer])
    report = monitor.last_report
    assert report is not None and report.ratio is not None and math.isfinite(report.ratio) and report.ratio > 1e25
    assert _messages(caught, LossBalanceWarning)
    weights = balancer.criterion.weights
    assert weights["bc"] == pytest.approx(balancer.max_weight) and all(math.isfinite(v) for v in weights.values())
    assert any("clamped to max_weight" in m for m in _messages(caught, WeightUpdateWarning))


def test_tiny_term_driven_to_the_lower_clamp() -> None:
    class Huge(TwoTermPoisson):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            u = self.net(self.x)
            return self.criterion(pde=u - 1, bc=1e12 * (u + 1))

    balancer = GradNormBalancer(every_n_steps=1, reference="pde", min_weight=1e-8)
    caught = _fit(Huge(), 2, [balancer])
    assert balancer.criterion.weights["bc"] == pytest.approx(1e-8)
    clamps = [m for m in _messages(caught, WeightUpdateWarning) if "clamped to min_weight" in m]
    # the message states the range, not a judgement ("extreme") that a narrow range can make wrong
    assert clamps and f"outside [min_weight, max_weight] = [1e-08, {balancer.max_weight:g}]" in clamps[0], clamps


def test_term_absent_on_some_steps() -> None:
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False)
    balancer = GradNormBalancer(every_n_steps=1, terms=["data"])
    recorded: list[tuple[tuple[str, ...], float]] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
            recorded.append((monitor.last_report.absent_terms, pl_module.criterion.weights["data"]))  # type: ignore[union-attr]

    caught = _fit(ExtraTermPoisson("data", lambda m, i: m.net(m.x[:3]) - 0.5 if i % 3 == 0 else None), 6, [monitor, balancer, Record()])
    assert [absent for absent, _ in recorded] == [(), ("data",), ("data",), (), ("data",), ("data",)]
    # the weight of an absent term does not move on the steps it is absent
    assert recorded[1][1] == recorded[0][1] and recorded[2][1] == recorded[0][1]
    assert recorded[3][1] != recorded[2][1]
    assert not _messages(caught, TermGradientWarning)
    assert all(math.isfinite(w) for _, w in recorded)


def test_all_terms_none_is_an_error() -> None:
    with pytest.raises(ValueError, match="every term is None"):
        MultiTermLoss(pde=1.0)(pde=None)


def test_callback_attached_twice_is_refused() -> None:
    monitor = GradientNormMonitor()
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `GradientNormMonitor`"):
        make_trainer(1, [monitor, monitor])
    with pytest.raises(RuntimeError, match="state_key"):
        make_trainer(1, [GradNormBalancer(), GradNormBalancer()])


def test_replacing_the_loss_mid_training_is_a_clear_error() -> None:
    class Replacer(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
            if trainer.global_step == 2:
                pl_module.criterion = MultiTermLoss(pde=1.0, bc=1.0, extra=1.0)

    with pytest.raises(RuntimeError, match=r"was replaced during training \(terms \('pde', 'bc'\) -> \('pde', 'bc', 'extra'\)\)"):
        _fit(TwoTermPoisson(), 5, [Replacer(), GradientNormMonitor(every_n_steps=1, verbose=False)])


def test_two_monitors_with_different_arguments_keep_their_own_state() -> None:
    # (two monitors on one loss are refused: test_monitor.py; on two losses each keeps its own)
    fast = GradientNormMonitor(every_n_steps=1, verbose=False, loss_module="criterion")
    slow = GradientNormMonitor(every_n_steps=3, verbose=False, loss_module="data_loss")
    _fit(TwoLossPoisson(), 6, [fast, slow])
    assert (fast.diagnosis.measurements, slow.diagnosis.measurements) == (6, 2)
    assert fast.state_key != slow.state_key


# ------------------------------------------------------------------ checkpoints and resume
def _resume_case(tmp_path: Path, interrupted: bool, total: int = 60, split: int = 30) -> tuple[HarmonicOscillator, list[Any]]:
    torch.manual_seed(0)
    model = HarmonicOscillator(steps_per_epoch=1000)
    callbacks = lambda: [  # noqa: E731
        GradientNormMonitor(every_n_steps=5, verbose=False),
        GradNormBalancer(every_n_steps=7, terms=["ic"]),
        NTKBalancer(every_n_steps=11, terms=["pde"], trace_points=16, seed=3),
    ]
    first = callbacks()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not interrupted:
            make_trainer(total, first).fit(model)
            return model, first
        trainer = make_trainer(split, first, default_root_dir=str(tmp_path))
        trainer.fit(model)
        path = tmp_path / "mid.ckpt"
        trainer.save_checkpoint(path)
        torch.manual_seed(123)  # a different process state: everything must come from the checkpoint
        resumed_model = HarmonicOscillator(steps_per_epoch=1000)
        second = callbacks()
        make_trainer(total, second, default_root_dir=str(tmp_path)).fit(resumed_model, ckpt_path=str(path))
    return resumed_model, second


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path: Path) -> None:
    straight, straight_callbacks = _resume_case(tmp_path, interrupted=False)
    resumed, resumed_callbacks = _resume_case(tmp_path, interrupted=True)
    assert resumed.criterion.weights == straight.criterion.weights
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    monitor_a, grad_a, ntk_a = straight_callbacks
    monitor_b, grad_b, ntk_b = resumed_callbacks
    assert monitor_b.diagnosis == monitor_a.diagnosis
    assert (grad_b.num_updates, grad_b.last_target) == (grad_a.num_updates, grad_a.last_target)
    assert (ntk_b.num_updates, ntk_b.last_traces) == (ntk_a.num_updates, ntk_a.last_traces)
    assert torch.equal(ntk_b._generator.get_state(), ntk_a._generator.get_state())


def test_every_callbacks_checkpoint_state_loads_with_torch_load_weights_only(tmp_path: Path) -> None:
    """torch.load's default since torch 2.6 (weights_only=True) refuses any pickled class: the
    callbacks' state holds only tensors, numbers, strings, lists and dicts."""
    from lightning_pinn.callbacks import (
        GradNormWeighting,
        LRAnnealingBalancer,
        ReLoBRaLoBalancer,
        SoftAdaptBalancer,
        UncertaintyWeighting,
    )

    callbacks = [
        GradientNormMonitor(every_n_steps=2, verbose=False, report=False),
        GradNormBalancer(every_n_steps=3, terms=["bc"]),
        NTKBalancer(every_n_steps=3, trace_points=8, terms=["pde"]),
    ]
    others = [SoftAdaptBalancer(), ReLoBRaLoBalancer(), UncertaintyWeighting(), GradNormWeighting(), LRAnnealingBalancer(reference="pde")]
    for index, group in enumerate([callbacks, *([other] for other in others)]):
        folder = tmp_path / str(index)
        model = TwoTermPoisson()
        saver = ModelCheckpoint(dirpath=str(folder), every_n_train_steps=5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_trainer(10, [*group, saver], enable_checkpointing=True).fit(model)
        saved = torch.load(folder / "epoch=0-step=10.ckpt", weights_only=True)
        assert all(callback.state_key in saved["callbacks"] for callback in group)


def test_weights_only_checkpoint_keeps_weights_and_says_balancer_state_is_not_saved(tmp_path: Path) -> None:
    model = TwoTermPoisson()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True, every_n_train_steps=3)
    caught = _fit(model, 3, [GradNormBalancer(every_n_steps=1), checkpoint], enable_checkpointing=True)
    assert any("save_weights_only=True" in m and "not this balancer's state" in m for m in _messages(caught, WeightUpdateWarning))
    saved = torch.load(next(tmp_path.glob("*.ckpt")), weights_only=False)
    assert "callbacks" not in saved
    restored = TwoTermPoisson()
    restored.load_state_dict(saved["state_dict"])
    assert restored.criterion.weights == model.criterion.weights != {"pde": 1.0, "bc": 1.0}


# ------------------------------------------------------------------ other optimisation loops
def test_manual_optimization_is_measured_and_balanced() -> None:
    model = ManualOptimization()
    initial = TwoTermPoisson()
    initial.load_state_dict(model.state_dict())
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    balancer = GradNormBalancer(every_n_steps=2)
    _fit(model, 4, [monitor, balancer])
    assert monitor.diagnosis.measurements == 4 and balancer.num_updates == 2
    # the step-0 measurement equals a hand computation on the initial network
    residuals = initial.residuals()
    params = [p for p in initial.parameters() if p.requires_grad]
    hand = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(r.square().mean(), params, allow_unused=True) if g is not None]).norm().item()
        for r in residuals.values()
    ]
    assert monitor.history["grad_norm/pde"][1][0] == pytest.approx(hand[0], rel=1e-4)
    assert monitor.history["grad_norm/bc"][1][0] == pytest.approx(hand[1], rel=1e-4)
    assert all(math.isfinite(w) and w > 0 for w in model.criterion.weights.values())


class TwoOptimizers(TwoTermPoisson):
    """Manual optimisation stepping two optimizers per batch: global_step advances by 2."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.steps_seen: list[tuple[int, float]] = []  # (global_step at the forward, λ_bc used)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        first, last = list(self.net.parameters())[:2], list(self.net.parameters())[2:]
        return [torch.optim.Adam(first, lr=1e-3), torch.optim.Adam(last, lr=1e-3)]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_seen.append((self.trainer.global_step, self.criterion.weights["bc"]))
        loss = self.criterion(**self.residuals())
        for optimizer in self.optimizers():
            optimizer.zero_grad()
        self.manual_backward(loss)
        for optimizer in self.optimizers():
            optimizer.step()
        return loss.detach()


def test_with_two_optimizers_the_weights_are_logged_at_the_step_they_apply_from() -> None:
    from lightning_pinn.callbacks import WeightSchedule

    model = TwoOptimizers()
    monitor = GradientNormMonitor(every_n_steps=2, verbose=False, report=False)
    _fit(model, 8, [monitor, GradNormBalancer(every_n_steps=2, terms=["bc"])], log_every_n_steps=1)
    used = dict(model.steps_seen)  # global steps 0, 2, 4, 6: one batch each
    assert sorted(used) == [0, 2, 4, 6]
    logged = dict(zip(*monitor.history["weight/bc"]))
    for step, weight in logged.items():
        if step in used:
            assert weight == pytest.approx(used[step]), step
    assert set(logged) == {0, 2, 4, 6, 8}, "λ logged at the steps forward passes run at (8: after the last batch)"

    schedule_model = TwoOptimizers()
    _fit(schedule_model, 8, [WeightSchedule({"bc": [(0, 1.0), (6, 4.0)]})])
    assert dict(schedule_model.steps_seen) == {0: 1.0, 2: 2.0, 4: 3.0, 6: 4.0}  # the schedule's value at each forward's step


def test_with_two_optimizers_an_odd_cadence_is_kept() -> None:
    """Each batch steps two optimizers, so global_step is 0, 2, 4, ... at batch starts: a cadence
    of 5 used to fire only at multiples of 10. The batch after a jumped-over due step is measured."""
    monitor = GradientNormMonitor(every_n_steps=5, verbose=False, report=False)
    balancer = GradNormBalancer(every_n_steps=3, warmup_steps=7)
    _fit(TwoOptimizers(), 40, [monitor, balancer])
    assert monitor.history["loss/pde"][0] == [0, 6, 10, 16, 20, 26, 30, 36]
    # due at 9, 12, 15, ... (warm-up 7): measured at the batches starting at 10, 12, 16, 18, 22, 24, 28, 30, 34, 36
    assert balancer.num_updates == 10


class ClosureOptimizer(TwoTermPoisson):
    """L-BFGS evaluates the loss several times per optimizer step through a closure."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=4)


def test_lbfgs_closure_is_measured_once_per_step() -> None:
    model = ClosureOptimizer()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    balancer = GradNormBalancer(every_n_steps=1)
    caught = _fit(model, 3, [monitor, balancer])
    assert monitor.diagnosis.measurements == 3 and balancer.num_updates == 3
    steps, norms = monitor.history["grad_norm/pde"]
    assert steps == [0, 1, 2] and all(math.isfinite(n) and n > 0 for n in norms)
    assert not _messages(caught, WeightUpdateWarning)


class _ReorderedTerms(TwoTermPoisson):
    def __init__(self) -> None:
        super().__init__()
        self.criterion = MultiTermLoss(bc=1.0, pde=1.0)


def test_resuming_callbacks_into_a_loss_with_its_terms_reordered_is_refused(tmp_path: Path) -> None:
    """λ load by name in any order, but a loss-history balancer keeps per-position lists: resumed
    into (bc, pde) from (pde, bc) it gave each term the other's history (different λ than a
    same-order resume). Now refused at fit start, naming the saved order; the model alone loads."""
    from lightning_pinn.callbacks import SoftAdaptBalancer

    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(4, [SoftAdaptBalancer(every_n_steps=1), checkpoint], enable_checkpointing=True).fit(TwoTermPoisson())
        path = str(tmp_path / "epoch=0-step=4.ckpt")
        with pytest.raises(ValueError, match=r"saved with the terms in the order \['pde', 'bc'\].*MultiTermLoss\(pde=\.\.\., bc=\.\.\.\)"):
            make_trainer(6, [SoftAdaptBalancer(every_n_steps=1)]).fit(_ReorderedTerms(), ckpt_path=path)
    model = _ReorderedTerms()
    model.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    saved = torch.load(path, weights_only=False)["state_dict"]["criterion.lambdas"].tolist()
    assert model.criterion.weights == {"bc": saved[1], "pde": saved[0]}


def _hand_term_gradients(model: TwoTermPoisson, residuals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """∇ of each unweighted term loss over the trainable parameters, flattened (zeros where unreached)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for name, residual in residuals.items():
        if residual is None or not residual.requires_grad:  # absent from this call, or constant in it (its parameters frozen)
            out[name] = torch.cat([torch.zeros_like(p).reshape(-1) for p in params])
            continue
        out[name] = flat_gradient(residual.square().mean(), params)
    return out


class _BoundaryPointsWithGrad(TwoTermPoisson):
    def residuals(self) -> dict[str, torch.Tensor]:
        residuals = super().residuals()
        # boundary points that require grad: the term keeps a graph while the network is frozen
        return {"pde": residuals["pde"], "bc": self.net(self.xb.clone().requires_grad_(True))}


class TogglingInverseProblem(_BoundaryPointsWithGrad):
    """Manual optimisation, one optimizer for the network and one for a PDE coefficient, each
    stepped after its own forward and backward (Lightning's toggle_optimizer pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.coefficient = torch.nn.Parameter(torch.tensor(2.0))
        self.hand: list[dict[str, torch.Tensor]] = []  # per call: the hand gradients over that call's trainable parameters

    def residuals(self) -> dict[str, torch.Tensor | None]:
        residuals = super().residuals()
        return {"pde": residuals["pde"] * self.coefficient, "bc": residuals["bc"]}

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return [torch.optim.Adam(self.net.parameters(), lr=1e-2), torch.optim.Adam([self.coefficient], lr=1e-2)]

    def training_step(self, batch: Any, batch_idx: int) -> None:
        for optimizer in self.optimizers():
            self.toggle_optimizer(optimizer)
            residuals = self.residuals()
            self.hand.append(_hand_term_gradients(self, residuals))
            optimizer.zero_grad()
            self.manual_backward(self.criterion(**residuals))
            optimizer.step()
            self.untoggle_optimizer(optimizer)


def test_one_optimizer_per_parameter_group_measures_each_group_in_its_own_call() -> None:
    # every norm used to be 0 here (the second call replaced the first, as an L-BFGS re-evaluation
    # would, and the layout was the first call's), with false zero-gradient warnings and no λ update
    model = TogglingInverseProblem()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    balancer = GradNormBalancer(every_n_steps=2)
    caught = _fit(model, 6, [monitor, balancer])
    assert not _messages(caught, TermGradientWarning)
    measurement = monitor.last_measurement
    assert measurement is not None and measurement.gradients is not None and measurement.micro_batches == 1
    network_part, coefficient_part = model.hand[-2], model.hand[-1]  # the last batch's two calls
    for index, name in enumerate(measurement.terms):
        expected = torch.cat([coefficient_part[name], network_part[name]])  # module order: its own parameter, then the net's
        torch.testing.assert_close(measurement.gradients[index], expected, rtol=1e-5, atol=1e-8)
    assert balancer.num_updates > 0 and model.criterion.weights["bc"] != 1.0


def test_merging_two_toggled_calls_keeps_to_the_losses_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The merge's presence mask was made on the CPU and met the loss values in torch.where, which
    fails for CUDA losses; a 'meta' copy of the losses stands in for a non-CPU device here."""
    import dataclasses

    from lightning_pinn import engine

    merge, merged_elsewhere = engine._merge_parts, []

    def merge_also_on_meta(first: Any, second: Any) -> Any:
        on_meta = [dataclasses.replace(c, loss_values=c.loss_values.to("meta")) for c in (first, second)]
        merged_elsewhere.append(merge(*on_meta).loss_values.device.type)
        return merge(first, second)

    monkeypatch.setattr(engine, "_merge_parts", merge_also_on_meta)
    _fit(TogglingInverseProblem(), 2, [GradientNormMonitor(every_n_steps=1, verbose=False, report=False)])
    assert merged_elsewhere and set(merged_elsewhere) == {"meta"}


def _hand_by_parameter(model: pl.LightningModule, residuals: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """term → parameter name → ∇ of the unweighted term loss, over the parameters trainable now."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    out: dict[str, dict[str, torch.Tensor]] = {}
    for term, residual in residuals.items():
        grads = torch.autograd.grad(residual.square().mean(), [p for _, p in named], retain_graph=True, allow_unused=True)
        out[term] = {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(named, grads)}
    return out


class _TogglingWithAnOutsideShift(TogglingInverseProblem):
    """Toggled optimizers (network; coefficient), the coefficient's stepped ``critic_steps`` times,
    and a trainable shift in no optimizer: toggle_optimizer leaves it trainable in every call."""

    def __init__(self, critic_steps: int = 1, overlapping: bool = False, critic_first: bool = False) -> None:
        super().__init__()
        self.shift = torch.nn.Parameter(torch.tensor(0.1))
        self.critic_steps = critic_steps
        self.overlapping = overlapping
        self.critic_first = critic_first
        self.calls: list[dict[str, dict[str, torch.Tensor]]] = []

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        if not self.overlapping:
            return super().configure_optimizers()
        # the coefficient in both; each optimizer also owns one layer of the network
        first, second = self.net[0], self.net[2]
        return [
            torch.optim.Adam([*first.parameters(), self.coefficient], lr=1e-2),
            torch.optim.Adam([*second.parameters(), self.coefficient], lr=1e-2),
        ]

    def residuals(self) -> dict[str, torch.Tensor | None]:
        residuals = super().residuals()
        return {"pde": residuals["pde"] + self.shift, "bc": residuals["bc"]}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        network, coefficient = self.optimizers()
        order = [coefficient] * self.critic_steps + [network] if self.critic_first else [network] + [coefficient] * self.critic_steps
        for optimizer in order:
            self.toggle_optimizer(optimizer)
            residuals = self.residuals()
            self.calls.append(_hand_by_parameter(self, residuals))
            optimizer.zero_grad()
            self.manual_backward(self.criterion(**residuals))
            optimizer.step()
            self.untoggle_optimizer(optimizer)


@pytest.mark.parametrize(
    ("critic_steps", "overlapping", "critic_first"),
    [(1, False, False), (2, False, False), (1, True, False), (2, False, True), (3, False, True)],
)
def test_toggled_optimizers_measure_each_group_where_it_is_stepped_also_with_a_parameter_in_none(
    critic_steps: int, overlapping: bool, critic_first: bool
) -> None:
    # the shift, trainable in both calls, made them look like one group's second evaluation after
    # its step: the coefficient's call was dropped and its parameter went unmeasured. With the
    # coefficient's optimizer stepped twice (n_critic), the last call replaced the first two.
    # A parameter in both optimizers (overlapping) is averaged over the two calls, like the shift.
    # Critic first ([coefficient] * n + [network]): the later-step calls were cut with every call
    # after them, the network's among them, so its parameters went unmeasured.
    model = _TogglingWithAnOutsideShift(critic_steps, overlapping, critic_first)
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    _fit(model, 2 * (1 + critic_steps), [monitor])
    measurement = monitor.last_measurement
    assert measurement is not None and measurement.gradients is not None
    batch = model.calls[-1 - critic_steps :]  # the last batch's calls: each group's first counts
    network_call, coefficient_call = (batch[-1], batch[0]) if critic_first else (batch[0], batch[1])
    for index, term in enumerate(measurement.terms):
        expected = []
        for name, _ in model.named_parameters():  # each from the calls that trained it; their mean where both did
            trained = [call[term][name] for call in (network_call, coefficient_call) if name in call[term]]
            expected.append(sum(trained) / len(trained))
        torch.testing.assert_close(measurement.gradients[index], torch.cat([g.reshape(-1) for g in expected]), rtol=1e-5, atol=1e-8)


class TogglingWithPlainBoundaryPoints(TogglingInverseProblem):
    """The same, with boundary points that do not require grad (the usual case): while the
    coefficient's optimizer is toggled the network is frozen, so the bc term requires no grad
    there, and the README's pattern passes it as None in that call."""

    def __init__(self, absent_when_frozen: bool = True) -> None:
        super().__init__()
        self.absent_when_frozen = absent_when_frozen

    def residuals(self) -> dict[str, torch.Tensor | None]:
        residuals = TwoTermPoisson.residuals(self)
        bc = self.net(self.xb)
        return {"pde": residuals["pde"] * self.coefficient, "bc": None if self.absent_when_frozen and not bc.requires_grad else bc}


def test_a_term_absent_while_its_parameters_are_toggled_off_is_measured_from_the_calls_that_train_it() -> None:
    model = TogglingWithPlainBoundaryPoints()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    caught = _fit(model, 6, [monitor, NTKBalancer(every_n_steps=2)])
    assert not _messages(caught, TermGradientWarning)
    measurement = monitor.last_measurement
    assert measurement is not None and measurement.gradients is not None and measurement.traces is not None
    network_part, coefficient_part = model.hand[-2], model.hand[-1]
    for index, name in enumerate(measurement.terms):
        expected = torch.cat([coefficient_part[name], network_part[name]])
        torch.testing.assert_close(measurement.gradients[index], expected, rtol=1e-5, atol=1e-8)
    assert bool(torch.isfinite(measurement.traces).all()) and bool((measurement.traces > 0).all())
    assert all(math.isfinite(w) for w in model.criterion.weights.values())


def test_a_term_constant_while_its_parameters_are_toggled_off_is_an_error_that_says_to_pass_none() -> None:
    """Issue 2's contract: a residual that does not require grad is bad input (it was briefly a
    warning, which let a detached term train nothing without stopping the fit). The error names
    the term and the toggle_optimizer fix."""
    with pytest.raises(ValueError, match=r"term 'bc' does not require grad.*toggle_optimizer.*pass bc=None in that call"):
        _fit(TogglingWithPlainBoundaryPoints(absent_when_frozen=False), 2, [GradientNormMonitor(every_n_steps=1, report=False)])
    with pytest.raises(ValueError, match=r"term 'bc' does not require grad"):
        _fit(TogglingWithPlainBoundaryPoints(absent_when_frozen=False), 2, [])  # without callbacks too


class ChunkedManualAccumulation(TwoTermPoisson):
    """Manual optimisation: manual_backward on two chunks of points, one optimizer step."""

    def __init__(self, bc_in_second_chunk: bool = True) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.bc_in_second_chunk = bc_in_second_chunk
        self.stepped_with: list[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        for chunk in range(2):
            bc = self.net(self.xb) if chunk == 0 or self.bc_in_second_chunk else None
            self.manual_backward(self.criterion(pde=self.pde_residual(self.x[chunk::2]), bc=bc) / 2)
        self.stepped_with.append(torch.cat([p.grad.reshape(-1) for p in self.parameters()]).clone())
        optimizer.step()


@pytest.mark.parametrize("bc_in_second_chunk", [True, False])
def test_manual_backward_on_chunks_before_one_step_is_measured_as_micro_batches(bc_in_second_chunk: bool) -> None:
    # only the last chunk used to count (each manual_backward after the first was taken for an
    # L-BFGS re-evaluation); a term absent from the last chunk was never measured
    model = ChunkedManualAccumulation(bc_in_second_chunk)
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    balancer = GradNormBalancer(every_n_steps=1)
    caught = _fit(model, 3, [monitor, balancer])
    assert not _messages(caught, TermGradientWarning)
    measurement = monitor.last_measurement
    assert measurement is not None and measurement.gradients is not None and measurement.micro_batches == 2
    assert monitor.history["grad_norm/bc"][0] == [0, 1, 2]
    if bc_in_second_chunk:  # Σ λ_i ∇L_i is then the gradient the optimizer stepped with (the loss is halved per chunk)
        combined = (measurement.weights.unsqueeze(1) * measurement.gradients).sum(0)
        torch.testing.assert_close(combined.float(), model.stepped_with[-1], rtol=1e-5, atol=1e-7)
    assert balancer.num_updates == 3 and model.criterion.weights["bc"] != 1.0


def test_half_precision_true_keeps_the_weights_in_float32() -> None:
    # "bf16-true" casts every buffer to bfloat16, where λ has three significant digits: a target
    # of 20.596 was applied as 20.625, and smoothing stalled once its steps fell below that rounding
    model = TwoTermPoisson(bc_weight=20.596)
    balancer = GradNormBalancer(every_n_steps=1, momentum=0.0)
    _fit(model, 2, [balancer], precision="bf16-true")
    assert next(model.net.parameters()).dtype == torch.bfloat16
    assert model.criterion.lambdas.dtype == torch.float32
    assert balancer.num_updates == 2
    applied = model.criterion.weights
    for name, target in balancer.last_target.items():
        assert applied[name] == pytest.approx(target, rel=1e-6)  # float32, not bfloat16 rounding (2⁻⁸)


class _LBFGSWithAParameterItDoesNotHold(TwoTermPoisson):
    """L-BFGS over the network only; a trainable scale outside the optimizer keeps its .grad."""

    def __init__(self, log_another_call: bool = False, set_to_none: bool = True) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.log_another_call = log_another_call
        self.set_to_none = set_to_none
        self.hand: list[dict[str, torch.Tensor]] = []

    def residuals(self) -> dict[str, torch.Tensor]:
        residuals = super().residuals()
        return {"pde": residuals["pde"] * self.scale, "bc": residuals["bc"]}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        residuals = self.residuals()
        self.hand.append(_hand_term_gradients(self, residuals))
        loss = self.criterion(**residuals)
        if self.log_another_call:  # evaluated, never backpropagated
            self.criterion(**self.residuals())
        return loss

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=self.set_to_none)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.LBFGS(self.net.parameters(), lr=0.5, max_iter=4)


@pytest.mark.parametrize(("log_another_call", "set_to_none"), [(False, True), (True, True), (False, False)])
def test_an_lbfgs_step_counts_its_last_evaluation_whatever_else_keeps_a_gradient(log_another_call: bool, set_to_none: bool) -> None:
    # a trainable parameter outside the optimizer keeps its .grad across the closure's evaluations,
    # and an extra call that is not backpropagated sits between them: neither makes them micro-batches.
    # With zero_grad(set_to_none=False) the optimizer's gradients are zeros, not None, while the
    # outside parameter's is not zero: only the optimizer's parameters tell a re-evaluation
    # (before, the four evaluations were averaged as micro-batches)
    model = _LBFGSWithAParameterItDoesNotHold(log_another_call, set_to_none)
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    _fit(model, 1, [monitor])
    measurement = monitor.last_measurement
    assert measurement is not None and measurement.gradients is not None
    assert len(model.hand) == 4 and measurement.micro_batches == 1
    for index, name in enumerate(measurement.terms):
        torch.testing.assert_close(measurement.gradients[index].float(), model.hand[-1][name], rtol=1e-5, atol=1e-7)


class _OneOptimizerSteppedTwicePerBatch(TwoTermPoisson):
    """Manual optimisation: zero_grad, backward and step twice on each batch (an inner loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.hand: dict[int, dict[str, torch.Tensor]] = {}  # optimizer step → the gradients it stepped with

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        for _ in range(2):
            optimizer.zero_grad()
            residuals = self.residuals()
            self.hand[self.trainer.global_step] = _hand_term_gradients(self, residuals)
            self.manual_backward(self.criterion(**residuals))
            optimizer.step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_an_optimizer_stepped_twice_in_a_batch_is_measured_at_the_step_it_is_logged_at() -> None:
    # the batch's second call came after the optimizer stepped: it was taken for an L-BFGS
    # re-evaluation, so the norms logged at step s were those of step s + 1's parameters
    model = _OneOptimizerSteppedTwicePerBatch()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    trainer = make_trainer(6, [monitor])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    # the engine watches the optimizer's steps only while a measured batch runs
    assert not getattr(trainer.optimizers[0], "_optimizer_step_post_hooks", {})
    steps, logged = monitor.history["grad_norm/pde"]
    assert steps == [0, 2, 4]
    for step, value in zip(steps, logged):
        assert value == pytest.approx(model.hand[step]["pde"].norm().item(), rel=1e-5), step
        assert value != pytest.approx(model.hand[step + 1]["pde"].norm().item(), rel=1e-3)


class _ReentrantCheckpointing(TwoTermPoisson):
    """The network's hidden layer under activation checkpointing with use_reentrant=True."""

    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant

    def residuals(self) -> dict[str, torch.Tensor]:
        from torch.utils.checkpoint import checkpoint

        def net(points: torch.Tensor) -> torch.Tensor:
            hidden = checkpoint(lambda z: torch.tanh(self.net[0](z)), points, use_reentrant=self.use_reentrant)
            return self.net[2](hidden)

        # points that require grad, as a PINN's do: else a reentrant checkpoint's output has no graph at all
        x, xb = self.x.clone().requires_grad_(True), self.xb.clone().requires_grad_(True)
        return {"pde": net(x) - torch.sin(self.x), "bc": net(xb)}


def test_reentrant_activation_checkpointing_gets_an_error_naming_the_fix() -> None:
    # PyTorch's own error spoke of .grad(), which the user's code never calls
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    with pytest.raises(RuntimeError, match=r"use_reentrant=True.*Pass use_reentrant=False.*or remove GradientNormMonitor"):
        _fit(_ReentrantCheckpointing(use_reentrant=True), 1, [monitor])
    reference, measured = _ReentrantCheckpointing(use_reentrant=False), _ReentrantCheckpointing(use_reentrant=False)
    measured.load_state_dict(reference.state_dict())
    _fit(reference, 3, [])
    _fit(measured, 3, [GradientNormMonitor(every_n_steps=1, verbose=False, report=False)])
    for p, q in zip(reference.parameters(), measured.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


class _ManualStepGuarded(TwoTermPoisson):
    """Manual optimisation on alternating halves of the points: batch 1 skips its step (a NaN
    guard, say); with ``zero_each_batch`` every batch zeroes the gradients first, so the step
    taken at batch 2 uses batch 2's gradient alone; without, it uses batches 1 and 2 together
    (manual accumulation), zeroing after each step."""

    def __init__(self, zero_each_batch: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.zero_each_batch = zero_each_batch
        self.hand: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        if self.zero_each_batch:
            optimizer.zero_grad()
        x = self.x[batch_idx % 2 :: 2]
        residuals = {"pde": self.pde_residual(x), "bc": self.net(self.xb) * (1 + batch_idx % 2)}
        self.hand.append(_hand_term_gradients(self, residuals))
        self.manual_backward(self.criterion(**residuals))
        if batch_idx != 1:
            optimizer.step()
            optimizer.zero_grad()


@pytest.mark.parametrize("zero_each_batch", [True, False])
def test_a_skipped_manual_step_counts_only_if_its_gradients_were_kept(zero_each_batch: bool) -> None:
    # the skipped batch was averaged into the next step's measurement even when that batch zeroed
    # the gradients first, so the logged norm was not the gradient the optimizer stepped with
    model = _ManualStepGuarded(zero_each_batch)
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    _fit(model, 2, [monitor])
    measurement = monitor.last_measurement  # step 1, taken at batch 2
    assert measurement is not None and measurement.step == 1 and measurement.gradients is not None
    skipped, taken = model.hand[1], model.hand[2]
    assert measurement.micro_batches == (1 if zero_each_batch else 2)
    for index, name in enumerate(measurement.terms):
        expected = taken[name] if zero_each_batch else (skipped[name] + taken[name]) / 2
        torch.testing.assert_close(measurement.gradients[index], expected, rtol=1e-5, atol=1e-7)


class _PointsMovedByTheLossGradient(TwoTermPoisson):
    """Adversarial collocation: ∂L/∂x of a first call (torch.autograd.grad) moves the points."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = self.x.clone().requires_grad_(True)
        probe = self.criterion(pde=self.pde_residual(x), bc=self.net(self.xb))
        (toward,) = torch.autograd.grad(probe, x)
        moved = (self.x + 0.01 * toward.sign()).clamp(0, 1)
        return self.criterion(pde=self.pde_residual(moved), bc=self.net(self.xb))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_call_differentiated_only_for_its_points_is_not_a_micro_batch(accumulate: int) -> None:
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    _fit(_PointsMovedByTheLossGradient(), 2, [monitor], accumulate_grad_batches=accumulate)
    assert monitor.last_measurement is not None and monitor.last_measurement.micro_batches == accumulate


class _TogglingWithADataTerm(TogglingInverseProblem):
    """The coefficient's call also fits data (a term the network's call does not have), with NTK traces."""

    def __init__(self) -> None:
        super().__init__()
        self.criterion = MultiTermLoss(pde=1.0, bc=1.0, data=1.0)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        for index, optimizer in enumerate(self.optimizers()):
            self.toggle_optimizer(optimizer)
            residuals = self.residuals()
            data = (self.coefficient - 3.0).reshape(1) * torch.ones(4) if index == 1 else None
            optimizer.zero_grad()
            self.manual_backward(self.criterion(**residuals, data=data))
            optimizer.step()
            self.untoggle_optimizer(optimizer)


def test_merged_parameter_groups_add_their_traces_and_keep_a_term_only_one_of_them_has() -> None:
    model = _TogglingWithADataTerm()
    balancer = NTKBalancer(every_n_steps=1, momentum=0.0)
    _fit(model, 2, [balancer])
    traces = balancer.last_traces
    assert all(math.isfinite(value) and value > 0 for value in traces.values()), traces
    assert traces["data"] == pytest.approx(1.0)  # ∂(c − 3)/∂c = 1 at every point
    assert model.criterion.weights["data"] != 1.0


class _GroupsInSomeMicroBatches(TogglingInverseProblem):
    """Manual accumulation over two batches; the coefficient trains only in the second."""

    def training_step(self, batch: Any, batch_idx: int) -> None:
        stepping = batch_idx % 2 == 1
        optimizers = self.optimizers() if stepping else self.optimizers()[:1]
        for optimizer in optimizers:
            self.toggle_optimizer(optimizer)
            residuals = self.residuals()
            self.hand.append(_hand_term_gradients(self, residuals))
            self.manual_backward(self.criterion(**residuals) / 2)
            if stepping:
                optimizer.step()
                optimizer.zero_grad()
            self.untoggle_optimizer(optimizer)


def test_each_parameter_is_averaged_over_the_micro_batches_that_trained_it() -> None:
    # the window's layout widens when the second batch trains the coefficient too: the first
    # batch's sums are padded (this crashed), and the coefficient's gradient is not halved by the
    # batch that did not train it
    model = _GroupsInSomeMicroBatches()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    _fit(model, 2, [monitor])  # two optimizer steps: global step 0 after the window's second batch
    measurement = monitor.last_measurement
    assert measurement is not None and measurement.gradients is not None and measurement.micro_batches == 2
    first_net, second_net, coefficient = model.hand[0], model.hand[1], model.hand[2]
    for index, name in enumerate(measurement.terms):
        expected = torch.cat([coefficient[name], (first_net[name] + second_net[name]) / 2])
        torch.testing.assert_close(measurement.gradients[index].float(), expected, rtol=1e-5, atol=1e-7)


class _OneCallAlsoDifferentiatedForItsPoints(TwoTermPoisson):
    """Two halves of the points; the first half's loss is also differentiated for its points first."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        losses = []
        for half in (self.x[:16], self.x[16:]):
            x = half.clone().requires_grad_(True)
            losses.append(self.criterion(pde=self.pde_residual(x), bc=self.net(self.xb)))
            if len(losses) == 1:
                torch.autograd.grad(losses[0], x, retain_graph=True)  # e.g. to pick new points; then trained on
        return (losses[0] + losses[1]) / 2


def test_a_call_first_differentiated_for_its_points_then_backpropagated_counts() -> None:
    # its first backward (torch.autograd.grad) used to fix it as "not into .grad", so it was dropped
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    _fit(_OneCallAlsoDifferentiatedForItsPoints(), 2, [monitor])
    assert monitor.last_measurement is not None and monitor.last_measurement.micro_batches == 2


class _Validated(TwoTermPoisson):
    """TwoTermPoisson with a validation loop (the PDE residual needs autograd under inference mode)."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        with torch.inference_mode(False), torch.enable_grad():
            self.log("val_pde", self.pde_residual(self.x.clone()).square().mean().detach(), batch_size=1)

    def val_dataloader(self) -> range:
        return range(1)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def test_dataloader(self) -> range:
        return range(1)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(self.x)

    def predict_dataloader(self) -> range:
        return range(1)


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_validate_with_ckpt_path_leaves_the_callbacks_state_alone(tmp_path: Path, stage: str) -> None:
    """Lightning restores callbacks for validate(ckpt_path=...) too. The monitor's history and the
    balancer's smoothing state once came from that checkpoint, so the next fit (without
    ckpt_path) continued them: 12 measurements from steps 0-7 and 0-3, and a first update smoothed
    instead of taken directly. Now that fit is the same as one from the weights alone."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(
            8,
            [GradientNormMonitor(every_n_steps=1, verbose=False, report=False), GradNormBalancer(every_n_steps=1), checkpoint],
            enable_checkpointing=True,
            limit_val_batches=0,
        ).fit(_Validated())

        def fit_after(load: str) -> tuple[GradientNormMonitor, GradNormBalancer, dict[str, float]]:
            model = _Validated()
            monitor, balancer = GradientNormMonitor(every_n_steps=1, verbose=False, report=False), GradNormBalancer(every_n_steps=1)
            trainer = make_trainer(4, [monitor, balancer])
            if load == "evaluate":
                if stage == "predict":
                    trainer.predict(model, ckpt_path=str(tmp_path / "last.ckpt"))
                else:
                    getattr(trainer, stage)(model, ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)
            else:
                model.load_state_dict(torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"])
            trainer.fit(model)
            return monitor, balancer, model.criterion.weights

        monitor, balancer, weights = fit_after("evaluate")
        reference_monitor, reference_balancer, reference_weights = fit_after("weights")
    assert (monitor.diagnosis.measurements, monitor.diagnosis.first_step, monitor.diagnosis.last_step) == (4, 0, 3)
    assert balancer.num_updates == reference_balancer.num_updates == 4
    assert weights == pytest.approx(reference_weights, rel=1e-6)
    assert monitor.diagnosis == reference_monitor.diagnosis


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -5.0])
def test_a_checkpoint_with_a_bad_weight_is_refused_naming_the_term(tmp_path: Path, bad: float) -> None:
    """A NaN/inf/negative λ in a checkpoint (edited or damaged file) was loaded silently: the fit
    then ran on a NaN loss, with warnings blaming both terms' gradients."""
    model = TwoTermPoisson()
    state = model.state_dict()
    state["criterion.lambdas"] = torch.tensor([1.0, bad])
    with pytest.raises(ValueError, match=rf"checkpoint's weight of term 'bc' is {bad}.*finite and >= 0.*set_weights"):
        TwoTermPoisson().load_state_dict(state)
    path = tmp_path / "bad.ckpt"
    trainer = make_trainer(2, [GradNormBalancer(every_n_steps=1)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
        trainer.save_checkpoint(path)
        saved = torch.load(path, weights_only=False)
        saved["state_dict"]["criterion.lambdas"][1] = bad
        torch.save(saved, path)
        with pytest.raises(ValueError, match="checkpoint's weight of term 'bc'"):
            make_trainer(4, [GradNormBalancer(every_n_steps=1)]).fit(TwoTermPoisson(), ckpt_path=str(path))


@pytest.mark.parametrize(("wide", "stored"), [(1e300, "inf"), (1e-300, "0")])
def test_a_float64_weight_a_float32_loss_cannot_hold_is_refused_at_load_and_cast(wide: float, stored: str) -> None:
    """A float64 λ (a precision="64-true" fit's) outside float32's range was loaded into a float32
    loss, or cast with .float(), as inf or 0 without a word; the next fit's parameters went NaN."""
    source = MultiTermLoss(pde=1.0, bc=1.0).double()
    source.set_weights({"bc": wide})
    target = MultiTermLoss(pde=1.0, bc=2.0)
    with pytest.raises(
        ValueError, match=rf"weight of term 'bc' is {re.escape(f'{wide:g}')}.*float32 weight buffer would store as {stored}.*double"
    ):
        target.load_state_dict(source.state_dict())
    assert target.weights == {"pde": 1.0, "bc": 2.0}  # a refused load changes nothing
    with pytest.raises(ValueError, match=rf"casting the weights to torch.float32 would store the weight of term 'bc'.*as {stored}"):
        source.float()
    assert source.lambdas.dtype == torch.float64 and source.weights["bc"] == wide  # the loss keeps its weights
    fine = MultiTermLoss(pde=1.0, bc=1.0).double()
    fine.set_weights({"bc": 1e30})
    assert fine.float().weights["bc"] == pytest.approx(1e30, rel=1e-6)  # within float32's range: cast as before
    MultiTermLoss(pde=1.0, bc=1.0).load_state_dict(fine.double().state_dict())


def test_sampled_ntk_traces_resume_exactly_from_a_checkpoint_written_mid_step(tmp_path: Path) -> None:
    """OnExceptionCheckpoint after the backward of a measured step saved the sampler's generator
    already advanced by that step's draw: the replayed step sampled other points (λ 2807 vs 2834).
    The sample now depends only on (seed, step, batch)."""
    from pytorch_lightning.callbacks import OnExceptionCheckpoint

    class FailsOnce(pl.Callback):
        def __init__(self) -> None:
            self.failed = False

        def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.global_step == 4 and not self.failed:
                self.failed = True
                raise RuntimeError("interrupted")

    balancer = lambda: NTKBalancer(every_n_steps=2, trace_points=8, seed=5)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        straight = TwoTermPoisson()
        make_trainer(8, [balancer()]).fit(straight)
        torch.manual_seed(0)
        interrupted = TwoTermPoisson()
        with pytest.raises(RuntimeError, match="interrupted"):
            make_trainer(8, [balancer(), FailsOnce(), OnExceptionCheckpoint(dirpath=str(tmp_path))], enable_checkpointing=True).fit(
                interrupted
            )
        resumed = TwoTermPoisson()
        make_trainer(8, [balancer()]).fit(resumed, ckpt_path=str(tmp_path / "on_exception.ckpt"))
    assert resumed.criterion.weights == straight.criterion.weights


@pytest.mark.parametrize("finder", ["tuner", "callback"])
def test_lr_find_does_not_carry_an_earlier_fits_state_into_the_next_fit(finder: str) -> None:
    """Callback objects reused from an earlier fit, with the Tuner's lr_find before the next fit:
    lr_find restores its step-0 checkpoint, which held the earlier fit's callback state, and the
    next fit continued it (10 measurements for a 4-step fit). A fit at step 0 now starts afresh."""
    from pytorch_lightning.tuner import Tuner

    monitor, balancer = GradientNormMonitor(every_n_steps=1, verbose=False, report=False), GradNormBalancer(every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(6, [monitor, balancer]).fit(TwoTermPoisson())
        model = TwoTermPoisson()
        if finder == "tuner":
            trainer = make_trainer(4, [monitor, balancer])
            Tuner(trainer).lr_find(model, num_training=5, update_attr=False)
        else:  # the callback's restore sets trainer.ckpt_path to its own file: that is no resume either
            from pytorch_lightning.callbacks import LearningRateFinder

            trainer = make_trainer(4, [LearningRateFinder(num_training_steps=5, update_attr=False), monitor, balancer])
        trainer.fit(model)
    assert (monitor.diagnosis.measurements, monitor.diagnosis.first_step, monitor.diagnosis.last_step) == (4, 0, 3)
    assert balancer.num_updates == 4


@pytest.mark.parametrize("case", ["epoch-end checkpoint", "two optimizers"])
def test_resume_is_exact_from_epoch_ends_and_with_several_optimizer_steps_per_batch(tmp_path: Path, case: str) -> None:
    """Two resumes that drifted: after an epoch-end checkpoint Lightning may number the batches
    differently, and the trace sample was seeded with the batch index (λ_ic 1.02497 vs 1.02435);
    with two optimizers per batch, a due step the last batch jumped over (3, measured at 4) was
    forgotten at the resume. The sample now follows (seed, step, micro-batch of the step) and the
    last batch's start step is saved."""
    model_class = TwoOptimizers if case == "two optimizers" else TwoTermPoisson
    options: dict[str, Any] = {"limit_train_batches": 4, "max_epochs": -1} if case == "epoch-end checkpoint" else {}
    callbacks = lambda: [GradNormBalancer(every_n_steps=2, terms=["bc"]), NTKBalancer(every_n_steps=3, trace_points=8, terms=["pde"])]  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        straight = model_class()
        make_trainer(12, callbacks(), **options).fit(straight)
        torch.manual_seed(0)
        checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, **({} if options else {"every_n_train_steps": 2}))
        make_trainer(12, [*callbacks(), checkpoint], enable_checkpointing=True, **options).fit(model_class())
        resumed = model_class()
        path = next(str(p) for p in sorted(tmp_path.glob("*.ckpt")) if "step=4" in p.name)
        make_trainer(12, callbacks(), **options).fit(resumed, ckpt_path=path)
    assert resumed.criterion.weights == straight.criterion.weights


def test_a_checkpoint_saved_before_the_callbacks_processed_its_step_says_so(tmp_path: Path) -> None:
    """A user callback listed before ours that saves a checkpoint in on_train_batch_end stores our
    state from before that step's measurement and update: the resume cannot be exact, and said nothing."""

    class Saver(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 3:
                trainer.save_checkpoint(tmp_path / "early.ckpt")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(4, [Saver(), GradNormBalancer(every_n_steps=1)]).fit(TwoTermPoisson())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(5, [GradNormBalancer(every_n_steps=1)]).fit(TwoTermPoisson(), ckpt_path=str(tmp_path / "early.ckpt"))
    warned = [str(w.message) for w in caught if "before the lightning-pinn callbacks had processed it" in str(w.message)]
    assert len(warned) == 1 and "(their state is from step 2)" in warned[0]


def test_a_reused_ntk_balancer_draws_each_fits_first_sample_as_a_fresh_one() -> None:
    """The sampler's micro-batch count carried over between fits: an object reused for a fit
    whose first batch was at the step it last drew at (a 1-step sweep, a resume with the same
    objects) seeded with micro-batch 1 and sampled other points than a fresh object."""
    reused = NTKBalancer(every_n_steps=1, trace_points=4, terms=["pde"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            torch.manual_seed(0)
            make_trainer(1, [reused]).fit(TwoTermPoisson())
        fresh = NTKBalancer(every_n_steps=1, trace_points=4, terms=["pde"])
        torch.manual_seed(0)
        make_trainer(1, [fresh]).fit(TwoTermPoisson())
    assert reused.last_traces == fresh.last_traces


def test_a_resume_inside_a_batch_that_steps_two_optimizers_keeps_its_jumped_over_step(tmp_path: Path) -> None:
    """A checkpoint written inside the batch starting at step 4 (two optimizers: it follows the
    batch at 2, which jumped over the due step 3) recorded 4 as the last batch start, so the
    replayed batch no longer saw step 3 as jumped over and the NTK update of step 4 was lost."""
    from pytorch_lightning.callbacks import OnExceptionCheckpoint

    class FailOnce(pl.Callback):
        failed = False

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
            if trainer.global_step == 4 and not FailOnce.failed:
                FailOnce.failed = True
                raise RuntimeError("boom")

    balancer = lambda: NTKBalancer(every_n_steps=3, trace_points=8, terms=["pde"])  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        straight_balancer = balancer()
        make_trainer(12, [straight_balancer]).fit(TwoOptimizers())
        torch.manual_seed(0)
        with pytest.raises(RuntimeError, match="boom"):
            make_trainer(12, [balancer(), FailOnce(), OnExceptionCheckpoint(dirpath=str(tmp_path))], enable_checkpointing=True).fit(
                TwoOptimizers()
            )
        resumed_balancer = balancer()
        make_trainer(12, [resumed_balancer]).fit(TwoOptimizers(), ckpt_path=str(tmp_path / "on_exception.ckpt"))
    assert resumed_balancer.num_updates == straight_balancer.num_updates


def test_a_callback_without_saved_state_keeps_nothing_of_the_checkpoint(tmp_path: Path) -> None:
    """on_load_checkpoint kept the whole loaded checkpoint (weights, optimizer states) on a callback
    Lightning had no saved state for (added at the resume, or with other arguments), for good."""
    path = tmp_path / "a.ckpt"
    trainer = make_trainer(3, [GradientNormMonitor(every_n_steps=1, verbose=False, report=False)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TwoTermPoisson())
        trainer.save_checkpoint(path)
        added = GradientNormMonitor(every_n_steps=2, verbose=False, report=False)  # another state_key
        make_trainer(5, [added]).fit(TwoTermPoisson(), ckpt_path=str(path))
    assert not any(isinstance(value, dict) and "state_dict" in value for value in vars(added).values())
    assert added._checkpoint_load is None


def test_callbacks_pickle_after_a_fit_and_the_copies_fit_again() -> None:
    """ddp_spawn pickles the callbacks into its processes, so a callback reused after a first fit
    must pickle; the weak reference to the last fit's loss did not ("cannot pickle 'weakref'")."""
    import pickle

    callbacks = [
        GradNormBalancer(every_n_steps=1, terms=["bc"]),
        NTKBalancer(every_n_steps=1, terms=["pde"]),
        GradientNormMonitor(every_n_steps=1, verbose=False),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(2, callbacks).fit(TwoTermPoisson())
        copies = [pickle.loads(pickle.dumps(callback)) for callback in callbacks]
        model = TwoTermPoisson()
        make_trainer(2, copies).fit(model)
    assert [copy.num_updates for copy in copies[:2]] == [2, 2] and copies[2].diagnosis.measurements == 2
    assert model.criterion.weights != {"pde": 1.0, "bc": 1.0}


def test_barebones_trainer_runs_the_callbacks(tmp_path: Path, monkeypatch: Any) -> None:
    """Trainer(barebones=True) refuses self.log and has no logger: the callbacks still measure and update."""
    monkeypatch.chdir(tmp_path)
    monitor, balancer = GradientNormMonitor(every_n_steps=1, verbose=False), GradNormBalancer(every_n_steps=2)
    model = TwoTermPoisson()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(barebones=True, max_steps=4, callbacks=[monitor, balancer]).fit(model)
    assert monitor.diagnosis.measurements == 4 and balancer.num_updates == 2
    assert model.criterion.weights != {"pde": 1.0, "bc": 1.0}
    assert monitor.report_path is None


@pytest.mark.parametrize("verbose", [False, True])
def test_fast_dev_run_runs_the_callbacks_and_writes_no_files(tmp_path: Path, monkeypatch: Any, caplog: Any, verbose: bool) -> None:
    """Lightning swaps the logger for a dummy under fast_dev_run: the callbacks measure and update,
    and nothing is written (no event files, no report); the console says why, not "put a logger
    with a folder first" (the user's logger had one)."""
    monkeypatch.chdir(tmp_path)
    monitor, balancer = GradientNormMonitor(every_n_steps=1, verbose=verbose), GradNormBalancer(every_n_steps=1)
    model = TwoTermPoisson()
    with warnings.catch_warnings(), caplog.at_level(logging.INFO):
        warnings.simplefilter("ignore")
        pl.Trainer(fast_dev_run=3, callbacks=[monitor, balancer], enable_progress_bar=False, enable_model_summary=False).fit(model)
    assert monitor.diagnosis.measurements == 3 and balancer.num_updates == 3
    assert model.criterion.weights != {"pde": 1.0, "bc": 1.0}
    assert monitor.report_path is None and list(tmp_path.iterdir()) == []
    said = [r.getMessage() for r in caplog.records if "no report written" in r.getMessage()]
    assert len(said) == verbose and all("fast_dev_run replaces the loggers" in text for text in said), said
