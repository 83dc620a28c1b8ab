"""The per-term gradient engine: exact per-term gradients, unchanged training, edge cases."""

from __future__ import annotations

import copy
import gc
import warnings
import weakref
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import TwoTermPoisson, flat_gradient, make_trainer

from lightning_pinn import MultiTermLoss
from lightning_pinn.callbacks import GradientNormMonitor
from lightning_pinn.diagnostics import gradient_norms, imbalance, summarize_gradients
from lightning_pinn.engine import TermGradientEngine


def _hand_gradients(model: TwoTermPoisson) -> dict[str, torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    residuals = model.residuals()
    out = {}
    for name, r in residuals.items():
        out[name] = flat_gradient(r.pow(2).mean(), params)
    return out


def test_monitor_norms_equal_hand_computation() -> None:
    model = TwoTermPoisson(bc_weight=3.0)
    initial = copy.deepcopy(model)
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False)
    make_trainer(1, [monitor]).fit(model)
    report = monitor.last_report
    assert report is not None
    hand = _hand_gradients(initial)
    assert report.norms[0] == pytest.approx(hand["pde"].norm().item(), rel=1e-5)
    assert report.norms[1] == pytest.approx(hand["bc"].norm().item(), rel=1e-5)
    assert report.weighted_norms[1] == pytest.approx(3.0 * hand["bc"].norm().item(), rel=1e-5)
    cosine = torch.nn.functional.cosine_similarity(hand["pde"], hand["bc"], dim=0).item()
    assert report.cosines[("pde", "bc")] == pytest.approx(cosine, abs=1e-5)
    expected_ratio = max(report.weighted_norms) / min(report.weighted_norms)
    assert report.ratio == pytest.approx(expected_ratio)


def test_capture_gives_the_same_parameter_gradients_as_a_plain_backward() -> None:
    model = TwoTermPoisson(pde_weight=0.7, bc_weight=13.0)
    plain = copy.deepcopy(model)
    plain.criterion(**plain.residuals()).backward()

    engine = TermGradientEngine.for_loss(model.criterion)
    params = [p for p in model.parameters() if p.requires_grad]
    engine.request(step=0, batch_key=0, params=params, gradients=True)
    total = model.criterion(**model.residuals())
    (2.5 * total).backward()  # a factor on the total (AMP scale, 1/accumulation) must be removed from the norms
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.allclose(p.grad, 2.5 * q.grad, rtol=1e-5, atol=1e-7)
    measurement = engine.collect(0, model.criterion.term_names)
    assert measurement is not None and measurement.gradients is not None
    hand = _hand_gradients(plain)
    assert torch.allclose(measurement.gradients[0].float(), hand["pde"], rtol=1e-4, atol=1e-7)
    assert torch.allclose(measurement.gradients[1].float(), hand["bc"], rtol=1e-4, atol=1e-7)
    assert measurement.weights.tolist() == pytest.approx([0.7, 13.0])


def test_capture_is_off_outside_requested_steps() -> None:
    model = TwoTermPoisson()
    engine = TermGradientEngine.for_loss(model.criterion)
    assert not engine.is_capturing()
    total = model.criterion(**model.residuals())
    assert total.grad_fn is not None and "CapturedTotal" not in type(total.grad_fn).__name__


class _PartlyUnused(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(2, 1)
        self.b = torch.nn.Linear(2, 1)
        self.unused = torch.nn.Linear(2, 1)
        self.criterion = MultiTermLoss(first=1.0, second=1.0)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return self.criterion(first=self.a(x), second=self.a(x) + self.b(x))


def test_terms_that_miss_parameters_and_unused_parameters() -> None:
    model = _PartlyUnused()
    engine = TermGradientEngine.for_loss(model.criterion)
    params = list(model.parameters())
    engine.request(step=0, batch_key=0, params=params, gradients=True)
    model.loss(torch.randn(8, 2)).backward()
    assert model.unused.weight.grad is None, "a parameter no term reaches must get no gradient, as with a plain backward"
    assert model.b.weight.grad is not None
    measurement = engine.collect(0, model.criterion.term_names)
    assert measurement is not None and measurement.gradients is not None
    # 'first' does not reach b: its gradient entries for b are exactly zero, not NaN
    b_slice = slice(3, 6)
    assert torch.count_nonzero(measurement.gradients[0, b_slice]) == 0
    assert torch.isfinite(measurement.gradients).all()


def test_imbalance_ignores_zero_and_nonfinite_norms() -> None:
    assert imbalance([10.0, 0.0, 0.1]) == (pytest.approx(100.0), 0, 2)
    assert imbalance([float("nan"), 2.0, 4.0]) == (pytest.approx(2.0), 2, 1)
    assert imbalance([0.0, 5.0]) is None


def test_summary_of_zero_and_nonfinite_gradients() -> None:
    g = torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 0.0], [float("inf"), 1.0]])
    report = summarize_gradients(("a", "b", "zero", "bad"), torch.ones(4), torch.tensor([1.0, 1.0, 1.0, 1.0]), g)
    assert report.norms[:3] == (1.0, 2.0, 0.0)
    assert report.cosines == {("a", "b"): pytest.approx(-1.0)}
    assert report.zero_terms == ("zero",) and report.nonfinite_terms == ("bad",)
    assert report.ratio == pytest.approx(2.0) and (report.largest, report.smallest) == ("b", "a")


def test_norms_and_cosines_of_float64_gradients_near_the_top_of_the_range() -> None:
    """A sum of squares overflowed for float64 entries above ~1e154: a finite gradient got an
    infinite norm (reported as NaN/inf, grad_ratio NaN, every balancer update skipped)."""
    big = torch.tensor([[3e200, -4e200, 0.0], [1.0, 2.0, 2.0], [3e160, 4e160, 0.0], [float("inf"), 1.0, 0.0]], dtype=torch.float64)
    norms = gradient_norms(big)
    assert norms[:3].tolist() == pytest.approx([5e200, 3.0, 5e160], rel=1e-12)
    assert torch.isinf(norms[3])  # an infinite entry is still reported as such
    report = summarize_gradients(("a", "b", "c", "bad"), torch.ones(4), torch.ones(4, dtype=torch.float64), big)
    assert report.norms[:3] == pytest.approx((5e200, 3.0, 5e160), rel=1e-12)
    assert report.nonfinite_terms == ("bad",)
    assert report.ratio == pytest.approx(5e200 / 3.0, rel=1e-12)
    assert report.cosines == {
        ("a", "b"): pytest.approx((3 - 8) / 15, rel=1e-12),
        ("a", "c"): pytest.approx((9 - 16) / 25, rel=1e-12),
        ("b", "c"): pytest.approx((3 + 8) / 15, rel=1e-12),
    }
    assert gradient_norms(torch.tensor([[3.0, 4.0]])).tolist() == [5.0]  # the usual case, unchanged


def _engine_for(model: TwoTermPoisson, **request: object) -> TermGradientEngine:
    engine = TermGradientEngine.for_loss(model.criterion)
    engine.request(step=0, batch_key=0, params=[p for p in model.parameters() if p.requires_grad], **request)  # type: ignore[arg-type]
    return engine


def test_a_call_whose_result_is_not_backpropagated_is_ignored() -> None:
    """A second call of the loss in the same step (e.g. for logging) must not replace the measured one."""
    model = TwoTermPoisson()
    hand = _hand_gradients(copy.deepcopy(model))
    for needs_gradients in (True, False):  # the gradient path and the losses-only path
        engine = _engine_for(model, gradients=needs_gradients)
        residuals = model.residuals()
        total = model.criterion(**residuals)
        model.criterion(pde=model.residuals()["pde"] + 1.0, bc=model.residuals()["bc"])  # evaluated, never backpropagated
        total.backward()
        measurement = engine.collect(0, model.criterion.term_names)
        assert measurement is not None and measurement.micro_batches == 1
        assert measurement.losses[0].item() == pytest.approx(residuals["pde"].pow(2).mean().item(), rel=1e-6)
        if needs_gradients:
            assert measurement.gradients is not None
            assert torch.allclose(measurement.gradients[0].float(), hand["pde"], rtol=1e-4, atol=1e-7)
        model.zero_grad()


def test_a_call_after_the_backward_does_not_erase_the_measurement() -> None:
    """Manual optimisation: backward, then the loss evaluated again (not backpropagated) before the step ends."""
    model = TwoTermPoisson()
    hand = _hand_gradients(copy.deepcopy(model))
    engine = _engine_for(model, gradients=True)
    model.criterion(**model.residuals()).backward()
    model.criterion(**model.residuals())  # e.g. re-evaluated for a progress bar
    measurement = engine.collect(0, model.criterion.term_names)
    assert measurement is not None and measurement.gradients is not None
    assert torch.allclose(measurement.gradients[1].float(), hand["bc"], rtol=1e-4, atol=1e-7)


def test_several_backpropagated_calls_count_as_micro_batches() -> None:
    model = TwoTermPoisson()
    hand = _hand_gradients(copy.deepcopy(model))
    engine = _engine_for(model, gradients=True)
    residuals = model.residuals()
    half = {name: r[: max(1, len(r) // 2)] for name, r in residuals.items()}
    (model.criterion(**residuals) + model.criterion(**half)).backward()
    measurement = engine.collect(0, model.criterion.term_names)
    assert measurement is not None and measurement.micro_batches == 2 and measurement.gradients is not None
    half_model_pde = torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(
                torch.autograd.grad(half["pde"].pow(2).mean(), list(model.parameters()), retain_graph=True, allow_unused=True),
                model.parameters(),
            )
        ]
    )
    assert torch.allclose(measurement.gradients[0].float(), (hand["pde"] + half_model_pde) / 2, rtol=1e-4, atol=1e-7)


def test_fit_whose_training_step_evaluates_the_loss_twice_is_measured() -> None:
    class EvaluatesTwice(TwoTermPoisson):
        def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
            loss = self.criterion(**self.residuals())
            self.criterion(**self.residuals())  # e.g. a user computing it again for a log line
            return loss

    model = EvaluatesTwice()
    initial = copy.deepcopy(model)
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    make_trainer(3, [monitor]).fit(model)
    assert monitor.diagnosis.measurements == 3
    first = monitor.history["grad_norm/pde"][1][0]
    assert first == pytest.approx(_hand_gradients(initial)["pde"].norm().item(), rel=1e-5)


@pytest.mark.parametrize("hook", ["setup", "configure_model"])
def test_network_and_loss_built_in_a_late_hook_are_found(hook: str) -> None:
    """Lightning runs the callbacks' setup before the module's setup() and configure_model()."""

    class BuiltLate(TwoTermPoisson):
        def __init__(self) -> None:
            super().__init__()
            del self.net, self.criterion

        def _build(self) -> None:
            if not hasattr(self, "net"):
                torch.manual_seed(0)
                self.net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
                self.criterion = MultiTermLoss(pde=1.0, bc=1.0)

        def setup(self, stage: str) -> None:
            if hook == "setup":
                self._build()

        def configure_model(self) -> None:
            if hook == "configure_model":
                self._build()

    model = BuiltLate()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    from lightning_pinn.callbacks import GradNormBalancer

    balancer = GradNormBalancer(every_n_steps=1)
    make_trainer(2, [monitor, balancer]).fit(model)
    reference = TwoTermPoisson()
    torch.manual_seed(0)
    reference.net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    assert monitor.history["grad_norm/pde"][1][0] == pytest.approx(_hand_gradients(reference)["pde"].norm().item(), rel=1e-5)
    assert balancer.num_updates == 2


# ------------------------------------------------------------------ leaves outside the parameters, (un)freezing
class _InverseProblem(TwoTermPoisson):
    """u' = k·u with an unknown k kept as a plain tensor (not an nn.Parameter) in the optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.criterion = MultiTermLoss(pde=1.0, data=1.0)
        self.k = torch.zeros((), requires_grad=True)
        self.k_grads: list[float | None] = []
        self.point_grads: list[torch.Tensor] = []

    def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
        x = self.x.clone().requires_grad_(True)
        u = self.net(x)
        du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
        loss = self.criterion(pde=du - self.k * u, data=u - torch.exp(2 * self.x))
        # where the loss is most sensitive to the points (as adaptive sampling does)
        self.point_grads.append(torch.autograd.grad(loss, x, retain_graph=True)[0])
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.k_grads.append(None if self.k.grad is None else self.k.grad.item())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([*self.parameters(), self.k], lr=1e-2)


def test_leaves_outside_the_parameters_get_their_gradient_on_measured_steps() -> None:
    """A coefficient optimised outside the module's parameters, and the loss's gradient with
    respect to the points, are what a plain backward gives (they were lost on measured steps)."""
    plain, measured = _InverseProblem(), _InverseProblem()
    measured.load_state_dict(plain.state_dict())
    make_trainer(4).fit(plain)
    make_trainer(4, [GradientNormMonitor(every_n_steps=1, verbose=False, report=False)]).fit(measured)
    assert None not in measured.k_grads
    assert measured.k_grads == pytest.approx(plain.k_grads, rel=1e-5)
    assert measured.k.item() == pytest.approx(plain.k.item(), rel=1e-5)
    for a, b in zip(measured.point_grads, plain.point_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("change", ["freeze", "unfreeze"])
def test_layers_frozen_or_unfrozen_in_the_modules_batch_hook_are_honoured(change: str) -> None:
    """The module's on_train_batch_start runs after the callbacks': the engine reads
    requires_grad at the forward pass, so training equals a fit without callbacks."""

    class Switching(TwoTermPoisson):
        def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
            if self.trainer.global_step == 2:
                self.net[0].weight.requires_grad_(change == "unfreeze")

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    def run(callbacks: list[GradientNormMonitor]) -> Switching:
        torch.manual_seed(0)
        model = Switching()
        model.net[0].weight.requires_grad_(change == "freeze")
        make_trainer(4, callbacks).fit(model)
        return model

    plain = run([])
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    measured = run([monitor])
    for p, q in zip(measured.parameters(), plain.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
    trainable = sum(p.numel() for p in measured.parameters() if p.requires_grad)
    assert monitor.last_measurement is not None and monitor.last_measurement.gradients is not None
    assert monitor.last_measurement.gradients.shape == (2, trainable)


def test_a_loss_returned_times_zero_is_measured_and_trains_like_a_plain_backward() -> None:
    """``ramp · criterion(...)`` with ``ramp = 0`` at the first step (a term phased in): the
    per-term norms are those of the unweighted losses, not 0/0 = NaN, and the parameters get
    the zero gradient a plain backward gives them."""
    from lightning_pinn.alerts import TermGradientWarning

    class Ramped(TwoTermPoisson):
        def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
            return min(1.0, float(self.trainer.global_step)) * self.criterion(**self.residuals())

    plain, measured = Ramped(), Ramped()
    measured.load_state_dict(plain.state_dict())
    initial = copy.deepcopy(plain)
    make_trainer(3).fit(plain)
    monitor = GradientNormMonitor(every_n_steps=2, verbose=False, report=False)
    first: list[list[float]] = []

    class First(pl.Callback):
        def on_train_batch_end(self, *args: object) -> None:
            if monitor.last_report is not None and not first:
                first.append(list(monitor.last_report.norms))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(3, [monitor, First()]).fit(measured)
    assert not [w for w in caught if issubclass(w.category, TermGradientWarning)]
    hand = _hand_gradients(initial)
    assert first[0] == pytest.approx([hand["pde"].norm().item(), hand["bc"].norm().item()], rel=1e-5)
    for p, q in zip(measured.parameters(), plain.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)


def test_complex_parameters_count_real_and_imaginary_parts() -> None:
    """A complex parameter is two real coordinates: ‖g‖² = Σ|g|², cosines over the real pairs."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(2, 3, dtype=torch.cfloat)
    criterion = MultiTermLoss(a=1.0, b=2.0)
    x = torch.randn(8, 2, dtype=torch.cfloat)
    params = list(layer.parameters())

    def residuals() -> dict[str, torch.Tensor]:
        out = layer(x)
        return {"a": out[:, 0] - 1, "b": out[:, 1:].abs() - 0.5}

    hand = {}
    for name in ("a", "b"):
        loss = residuals()[name].abs().square().mean()
        grads = torch.autograd.grad(loss, params)
        hand[name] = torch.cat([torch.view_as_real(g).reshape(-1) for g in grads])
    engine = TermGradientEngine.for_loss(criterion)
    engine.request(step=0, batch_key=0, params=params, gradients=True)
    criterion(**residuals()).backward()
    measurement = engine.collect(0, criterion.term_names)
    assert measurement is not None and measurement.gradients is not None
    assert torch.allclose(measurement.gradients[0].float(), hand["a"], rtol=1e-5, atol=1e-7)
    assert torch.allclose(measurement.gradients[1].float(), hand["b"], rtol=1e-5, atol=1e-7)
    assert hand["a"].norm() > 0 and hand["b"].norm() > 0


def test_a_compiled_backward_with_donated_buffers_gets_an_error_that_names_the_setting() -> None:
    """torch.compile's backward refuses retain_graph=True when it donated its buffers (simulated here)."""

    class RefusesRetainGraph(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def]
            return x.clone()

        @staticmethod
        def backward(ctx, grad):  # type: ignore[no-untyped-def]
            raise RuntimeError(
                "This backward function was compiled with non-empty donated buffers which requires create_graph=False and "
                "retain_graph=False."
            )

    class Compiled(TwoTermPoisson):
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            residuals = self.residuals()
            return self.criterion(pde=RefusesRetainGraph.apply(residuals["pde"]), bc=residuals["bc"])

    with pytest.raises(RuntimeError, match=r"torch._functorch.config.donated_buffer = False"):
        make_trainer(1, [GradientNormMonitor(verbose=False)]).fit(Compiled())


def test_residual_scaled_ratio_and_nearly_satisfied_by_hand() -> None:
    from lightning_pinn.diagnostics import nearly_satisfied, residual_scaled_ratio

    # ‖g‖/√L: 4/√4 = 2 against 0.002/√1e-6 = 2 -> equal per unit of RMS residual
    assert residual_scaled_ratio(4.0, 4.0, 0.002, 1e-6) == pytest.approx(1.0)
    assert nearly_satisfied(4.0, 4.0, 0.002, 1e-6, within=100) == pytest.approx(1.0)
    # the small term's gradient is small for its residual too (1e3x): neglected, not satisfied
    assert nearly_satisfied(4.0, 4.0, 2e-6, 1e-6, within=100) is None
    # far *larger* per unit of residual (1e-3x) is no "within" either (the alarm said "within 1e+03x")
    assert nearly_satisfied(4.0, 4.0, 2.0, 1e-6, within=100) is None
    # a small term whose loss is not the smaller one, or a negative (0-dim) loss: no note
    assert nearly_satisfied(4.0, 1e-6, 0.002, 4.0, within=100) is None
    assert residual_scaled_ratio(4.0, 4.0, 0.002, -1.0) is None


class _FailsOnceAfterBackward(TwoTermPoisson):
    """Fresh points on every call of ``training_step``; raises once after the backward of step 4."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.hand: dict[int, torch.Tensor] = {}  # step -> ‖∇L_pde‖ of the step's last call
        self.failed = False

    def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
        self.calls += 1
        residuals = {"pde": self.pde_residual(self.x[self.calls % 3 :: 3]), "bc": self.net(self.xb)}
        params = list(self.parameters())
        grads = torch.autograd.grad(residuals["pde"].pow(2).mean(), params, retain_graph=True, allow_unused=True)
        self.hand[self.trainer.global_step] = torch.cat([g.reshape(-1) for g in grads if g is not None]).norm()
        return self.criterion(**residuals)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.failed and self.trainer.global_step == 4:
            self.failed = True
            raise RuntimeError("a user's gradient check fails once")


def test_refit_after_an_exception_measures_the_failed_step_afresh() -> None:
    # The failed fit's backward of step 4 must not be averaged into the refit's measurement of
    # step 4 as a second micro-batch: the optimizer steps with the refit's gradient alone.
    model = _FailsOnceAfterBackward()
    monitor = GradientNormMonitor(every_n_steps=2, verbose=False, report=False)
    trainer = make_trainer(8, [monitor])
    with pytest.raises(RuntimeError, match="fails once"):
        trainer.fit(model)
    trainer.fit(model)
    steps, norms = monitor.history["grad_norm/pde"]
    assert 4 in steps
    assert norms[steps.index(4)] == pytest.approx(float(model.hand[4]), rel=1e-5)


def test_the_step_buffers_are_freed_at_the_end_of_a_fit() -> None:
    # a review measured the engine's last window (per-term gradients and capture) kept after the
    # fit: about the model's size times K, on top of `last_measurement`
    model = TwoTermPoisson()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    make_trainer(3, [monitor]).fit(model)
    engine = TermGradientEngine.for_loss(model.criterion)
    assert engine._window is None and not engine.is_capturing()
    assert monitor.last_measurement is not None and monitor.last_measurement.gradients is not None  # kept for inspection
    make_trainer(6, [monitor]).fit(model)  # a later fit finds its parameters again
    assert monitor.diagnosis.measurements == 6


class _HessianVectorProducts(pl.LightningModule):
    """Manual optimisation that differentiates its loss twice (a Hessian-vector product, as
    Newton-CG or AdaHessian do) and steps with the product, so a wrong product changes training."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
        self.criterion = MultiTermLoss(pde=1.0, bc=2.0)
        self.automatic_optimization = False
        self.products: list[torch.Tensor] = []

    def training_step(self, batch: object, batch_idx: int) -> None:
        x = torch.linspace(0, 1, 16, dtype=torch.float64).reshape(-1, 1).requires_grad_(True)
        u = self.net(x)
        du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
        params = list(self.parameters())
        loss = self.criterion(pde=du - torch.cos(x), bc=self.net(x[:1]))
        grads = torch.autograd.grad(loss, params, create_graph=True)
        product = torch.autograd.grad(grads, params, grad_outputs=[torch.ones_like(p) for p in params])
        self.products.append(torch.cat([p.reshape(-1) for p in product]).detach())
        optimizer = self.optimizers()
        optimizer.zero_grad()
        for p, g, h in zip(params, grads, product):
            p.grad = (g + 0.1 * h).detach()
        optimizer.step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> object:
        return range(4)


@pytest.mark.parametrize("every_n_steps", [1, 2])
def test_second_derivatives_through_a_measured_loss_are_exact(every_n_steps: int) -> None:
    """``create_graph=True`` through the measured total: the per-term capture used to return a
    gradient with no graph, so a Hessian-vector product silently lost the loss's part of it."""

    def products(callbacks: list[pl.Callback]) -> torch.Tensor:
        torch.manual_seed(0)
        model = _HessianVectorProducts()
        trainer = pl.Trainer(
            max_epochs=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=callbacks,
        )
        trainer.fit(model)
        return torch.stack(model.products)

    plain = products([])
    monitor = GradientNormMonitor(every_n_steps=every_n_steps, verbose=False, report=False)
    measured = products([monitor])
    assert monitor.last_report is not None and monitor.last_report.norms[0] > 0
    torch.testing.assert_close(measured, plain, rtol=1e-12, atol=1e-14)


class _GradientPenalty(pl.LightningModule):
    """Automatic optimisation whose training step adds a penalty on the loss's own gradient
    (``create_graph=True``), so Lightning's backward differentiates the captured gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
        self.criterion = MultiTermLoss(pde=1.0, bc=2.0)

    def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
        x = torch.linspace(0, 1, 16, dtype=torch.float64).reshape(-1, 1)
        loss = self.criterion(pde=self.net(x) - torch.sin(3 * x), bc=self.net(x[:1]))
        grads = torch.autograd.grad(loss, list(self.parameters()), create_graph=True)
        return loss + 0.1 * sum((g**2).sum() for g in grads)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> object:
        return range(20)


def test_a_gradient_penalty_on_the_measured_loss_trains_as_without_callbacks() -> None:
    def trained(callbacks: list[pl.Callback]) -> torch.Tensor:
        torch.manual_seed(0)
        model = _GradientPenalty()
        make_trainer(20, callbacks).fit(model)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    plain = trained([])
    torch.testing.assert_close(trained([GradientNormMonitor(every_n_steps=1, verbose=False, report=False)]), plain, rtol=1e-12, atol=1e-14)


class _HookedModel(pl.LightningModule):
    """Two terms; the first layer's weight has a tensor hook that rescales or clips its gradient."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.criterion = MultiTermLoss(pde=1.0, bc=10.0)
        self.calls = 0

        def hook(grad: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return grad * 3.0 if mode == "scale" else grad.clamp(-0.05, 0.05)

        self.handle = self.net[0].weight.register_hook(hook)

    def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
        x = torch.linspace(0, 1, 16, dtype=self.dtype)[:, None]
        return self.criterion(pde=self.net(x) - x**2, bc=self.net(torch.zeros(1, 1, dtype=self.dtype)) - 1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> list[int]:
        return [0] * 6


@pytest.mark.parametrize("mode", ["scale", "clip"])
def test_a_parameter_hook_runs_once_per_step_on_the_weighted_sum(mode: str) -> None:
    """A register_hook on a parameter ran once per term and again on Σ λ_i hook(g_i) on measured
    steps (a 3x rescaling hook gave 9x steps); held back during the per-term passes, it runs once,
    on Σ λ_i g_i, as in a plain backward."""

    def fit(callbacks: list[pl.Callback]) -> _HookedModel:
        model = _HookedModel(mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_trainer(6, callbacks, precision="64-true").fit(model)
        return model

    plain = fit([])
    measured = fit([GradientNormMonitor(every_n_steps=1, verbose=False, report=False)])
    assert plain.calls == measured.calls == 6
    for p, q in zip(plain.parameters(), measured.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert len(measured.net[0].weight._backward_hooks) == 1  # still registered, and removable
    measured.handle.remove()
    assert len(measured.net[0].weight._backward_hooks) == 0


class _SavedActivation(TwoTermPoisson):
    """Keeps a weak reference to a tensor that autograd saves for the backward (sin saves its input)."""

    def __init__(self) -> None:
        super().__init__(points=64)
        self.saved: list[Any] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        z = self.net(self.x)  # held only by sin's backward node once this step returns
        self.saved.append(weakref.ref(z))
        return self.criterion(pde=torch.sin(z) - 0.5, bc=self.net(self.xb))


@pytest.mark.parametrize("every_n_steps", [1, 2])
def test_a_measured_step_frees_its_graph_like_a_plain_backward(every_n_steps: int) -> None:
    """Found by a long-run probe: the per-term passes retain the graph, and the loss's last_residuals
    kept the measured step's saved activations alive until the next step (and after the fit)."""
    model = _SavedActivation()
    seen_alive: list[bool] = []

    class Check(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            gc.collect()
            seen_alive.append(model.saved[-1]() is not None)

    make_trainer(4, [GradientNormMonitor(every_n_steps=every_n_steps, verbose=False, report=False), Check()]).fit(model)
    gc.collect()
    assert seen_alive == [False] * 4 and all(ref() is None for ref in model.saved)
    # the values stay readable, without a graph to differentiate
    assert model.criterion.last_losses["pde"].item() > 0 and set(model.criterion.last_residuals) == {"pde", "bc"}


def test_a_second_backward_through_a_measured_loss_needs_retain_graph_as_in_pytorch() -> None:
    model = TwoTermPoisson()
    engine = _engine_for(model, gradients=True)
    total = model.criterion(**model.residuals())
    total.backward(retain_graph=True)  # kept: a second backward works
    total.backward()
    with pytest.raises(RuntimeError, match=r"backward through the graph a second time.*retain_graph=True"):
        total.backward()
    assert engine.collect(0, model.criterion.term_names) is not None
