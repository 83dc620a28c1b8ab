"""The per-term gradient engine: exact per-term gradients, unchanged training, edge cases."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TwoTermPoisson, make_trainer

from lightning_pinn import MultiTermLoss
from lightning_pinn.callbacks import GradientNormMonitor
from lightning_pinn.diagnostics import imbalance, summarize_gradients
from lightning_pinn.engine import TermGradientEngine


def _hand_gradients(model: TwoTermPoisson) -> dict[str, torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    residuals = model.residuals()
    out = {}
    for name, r in residuals.items():
        grads = torch.autograd.grad(r.pow(2).mean(), params, retain_graph=True, allow_unused=True)
        out[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
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
