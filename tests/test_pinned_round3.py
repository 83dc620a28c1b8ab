"""Pinned behaviour found missing by a third mutation-testing round (CPU only, a few seconds).

Every expected value is computed independently: by hand formulas, by plain ``torch.autograd``,
or from the problem's exact solution.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import make_trainer
from test_monitor import _RecordingLogger

import lightning_pinn.recording as recording
from lightning_pinn import PINNModule
from lightning_pinn._lightning import console_info
from lightning_pinn.alerts import FitWarnings, LossBalanceWarning, TermGradientWarning
from lightning_pinn.autodiff import derivative, laplacian
from lightning_pinn.constraints import DirichletAnsatz1D
from lightning_pinn.module import StepIndexLoader
from lightning_pinn.nn import mlp
from lightning_pinn.point_gradients import one_pass_row_sq_norms
from lightning_pinn.problems import HarmonicOscillator, Helmholtz2D, Wave1D
from lightning_pinn.recording import FitHistory, HistoryRecorder


def _per_point_sq_norms(flat: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """``‖∂flat[n]/∂θ‖²`` by one plain autograd call per point (the definition)."""
    values = []
    for n in range(flat.numel()):
        grads = torch.autograd.grad(flat[n], params, retain_graph=True, allow_unused=True)
        values.append(sum(float(g.square().sum()) for g in grads if g is not None))
    return torch.tensor(values, dtype=torch.float64)


# --- point_gradients ---------------------------------------------------------------------------


def test_one_pass_scales_a_matrix_products_weight_and_bias_by_addmms_alpha_and_beta() -> None:
    """torch.addmm(b, h, W, beta=β, alpha=α) = β·b + α·h@W: the per-point gradients carry α and β."""
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(1, 8, dtype=torch.float64))
    b1 = torch.nn.Parameter(torch.randn(8, dtype=torch.float64))
    w2 = torch.nn.Parameter(torch.randn(8, 1, dtype=torch.float64))
    b2 = torch.nn.Parameter(torch.randn(1, dtype=torch.float64))
    params = [w1, b1, w2, b2]
    x = torch.rand(12, 1, dtype=torch.float64, requires_grad=True)
    u = torch.addmm(b2, torch.tanh(torch.addmm(b1, x, w1)), w2, beta=0.5, alpha=2.0)
    residual = (derivative(u, x) + u - 1).reshape(-1)
    values = one_pass_row_sq_norms(residual, params, torch.float64)
    assert values is not None
    torch.testing.assert_close(values, _per_point_sq_norms(residual, params), rtol=1e-10, atol=0)


def test_one_pass_never_drops_rows_whose_contributions_cancel_in_the_plain_pass() -> None:
    """r_n = u(x_n) − u(x_(n−1)): Σ_n r_n has a zero gradient on every row of u, yet no point's
    gradient is zero. The one-pass route must decline (None) or give the true values, not zeros."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    params = list(net.parameters())
    u = net(torch.rand(10, 1, dtype=torch.float64))
    residual = (u - u.roll(1, 0)).reshape(-1)
    values = one_pass_row_sq_norms(residual, params, torch.float64)
    if values is not None:
        torch.testing.assert_close(values, _per_point_sq_norms(residual, params), rtol=1e-10, atol=0)


# --- autodiff ----------------------------------------------------------------------------------


def test_higher_derivatives_of_a_complex_linear_output_are_complex_zeros() -> None:
    t = torch.linspace(0, 1, 5, dtype=torch.float64).reshape(-1, 1).requires_grad_(True)
    u = (2 + 3j) * t
    torch.testing.assert_close(derivative(u, t), torch.full_like(u, 2 + 3j).detach())
    second = derivative(u, t, order=2)
    assert second.dtype == u.dtype and bool((second == 0).all())
    xy = torch.rand(4, 2, dtype=torch.float64, requires_grad=True)
    lap = laplacian((1 - 2j) * xy[:, :1] + 1j * xy[:, 1:], xy)
    assert lap.dtype == torch.complex128 and bool((lap == 0).all())


# --- constraints -------------------------------------------------------------------------------


def test_dirichlet_ansatz_refuses_an_empty_interval_at_construction() -> None:
    with pytest.raises(ValueError, match=r"DirichletAnsatz1D: need a < b, got a=1.0, b=1.0"):
        DirichletAnsatz1D(mlp(1, (4,), 1), a=1.0, b=1.0, ua=0.0, ub=0.0)


def test_a_float16_interval_whose_bump_fits_is_accepted() -> None:
    """On [0, 300] the largest (x − a)(b − x) is 150² = 22500 < 65504 (float16's max): usable;
    on [0, 600] it is 90000: refused."""
    free = mlp(1, (4,), 1)
    torch.nn.init.zeros_(free[2].weight)
    torch.nn.init.zeros_(free[2].bias)  # N = 0: u is the straight line through the end values
    ansatz = DirichletAnsatz1D(free, a=0.0, b=300.0, ua=2.0, ub=-1.0).half()
    x = torch.tensor([[0.0], [75.0], [150.0], [300.0]], dtype=torch.float16)
    line = 2.0 * (300 - x.double()) / 300 - 1.0 * x.double() / 300
    torch.testing.assert_close(ansatz(x).double(), line, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="overflows inside it"):
        DirichletAnsatz1D(mlp(1, (4,), 1), a=0.0, b=600.0, ua=0.0, ub=1.0).half()(x)


# --- nn ----------------------------------------------------------------------------------------


def test_mlp_has_no_activation_after_its_output_layer() -> None:
    torch.manual_seed(0)
    net = mlp(2, (5,), 3)
    assert [type(layer) for layer in net] == [torch.nn.Linear, torch.nn.Tanh, torch.nn.Linear]
    with torch.no_grad():
        net[2].weight.mul_(20)
    x = torch.randn(16, 2)
    out = net(x).detach()
    torch.testing.assert_close(out, net[2](torch.tanh(net[0](x))).detach())
    assert float(out.abs().max()) > 1  # not squashed by a final tanh


def test_xavier_init_draws_glorot_normal_not_uniform_weights() -> None:
    """Glorot-normal: std √(2/(fan_in+fan_out)); about 8.3% of the weights lie beyond √3·std, the
    bound of Glorot-uniform weights of the same std."""
    torch.manual_seed(0)
    weight = mlp(400, (400,), 1, init="xavier")[0].weight.detach()
    std = math.sqrt(2 / 800)
    assert float(weight.std()) == pytest.approx(std, rel=0.02)
    beyond = float((weight.abs() > math.sqrt(3) * std).double().mean())
    assert 0.07 < beyond < 0.1


# --- alerts ------------------------------------------------------------------------------------


def test_held_warnings_are_shown_in_order_when_released() -> None:
    fit_warnings = FitWarnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_warnings.hold()
        fit_warnings.warn("first", LossBalanceWarning)
        fit_warnings.warn("second", TermGradientWarning)
        assert not caught
        fit_warnings.release()
    assert [str(w.message) for w in caught] == ["first", "second"]


def test_the_first_held_warning_turned_into_an_error_is_the_one_raised() -> None:
    fit_warnings = FitWarnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_warnings.hold()
        fit_warnings.warn("first", LossBalanceWarning)
        fit_warnings.warn("second", TermGradientWarning)
        with pytest.raises(LossBalanceWarning, match="first"):
            fit_warnings.release()


def test_a_failing_step_releases_its_warnings_without_raising_them() -> None:
    fit_warnings = FitWarnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", LossBalanceWarning)
        fit_warnings.hold()
        fit_warnings.warn("an error", LossBalanceWarning)
        fit_warnings.warn("shown", TermGradientWarning)
        fit_warnings.release(failing=True)  # the step's own exception is the one that propagates
    assert [str(w.message) for w in caught] == ["shown"]


# --- module ------------------------------------------------------------------------------------


def test_lr_decay_multiplies_the_rate_by_lr_decay_every_lr_decay_steps() -> None:
    module = PINNModule({"pde": 1.0}, learning_rate=0.1, lr_decay=0.5, lr_decay_steps=4)
    module.net = torch.nn.Linear(1, 1)
    config: Any = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(8):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[1] == pytest.approx(0.1 * 0.5 ** (2 / 4), rel=1e-12)
    assert rates[3] == pytest.approx(0.05, rel=1e-12) and rates[7] == pytest.approx(0.025, rel=1e-12)


def test_lr_decay_of_one_is_accepted() -> None:
    assert PINNModule({"pde": 1.0}, lr_decay=1.0).lr_decay == 1.0
    with pytest.raises(ValueError, match=r"lr_decay must be in \(0, 1\]"):
        PINNModule({"pde": 1.0}, lr_decay=1.5)


def test_the_step_loader_starts_afresh_from_a_position_at_or_past_its_end() -> None:
    loader = StepIndexLoader(5, None)  # type: ignore[arg-type]
    loader.load_state_dict({"next_index": 3})
    assert list(loader) == [3, 4] and list(loader) == [0, 1, 2, 3, 4]
    for past in (5, 7):
        loader.load_state_dict({"next_index": past})
        assert list(loader) == [0, 1, 2, 3, 4]


def test_term_losses_are_logged_once_per_optimizer_step_under_gradient_accumulation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    logger = _RecordingLogger(str(tmp_path))
    model = HarmonicOscillator(hidden=(8,), steps_per_epoch=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(3, [], logger=logger, log_every_n_steps=1, accumulate_grad_batches=2).fit(model)
    assert [step for step, metrics in logger.metrics if "loss/pde" in metrics] == [0, 1, 2]


# --- recording ---------------------------------------------------------------------------------


def test_first_reaching_counts_an_error_equal_to_the_target() -> None:
    history = FitHistory(error_steps=[10, 20], errors=[0.5, 0.1], error_seconds=[1.0, 2.0])
    assert history.first_reaching(0.1) == (20, 2.0)
    assert history.first_reaching(0.5) == (10, 1.0)
    assert history.first_reaching(0.09) is None


def test_training_seconds_add_up_over_the_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter(range(10_000))
    monkeypatch.setattr(recording, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))  # 1 s per call
    torch.manual_seed(0)
    recorder = HistoryRecorder(error_every=2)
    make_trainer(4, [recorder]).fit(HarmonicOscillator(hidden=(8,), steps_per_epoch=10))
    # each batch: started at tick k, ended at tick k + 1
    assert recorder.history.train_seconds == 4.0
    assert recorder.history.error_seconds == [2.0, 4.0]


# --- problems ----------------------------------------------------------------------------------


class _Exact(torch.nn.Module):
    """A "network" that returns ``solution`` of the problem's coordinates (undoing the input scaling)."""

    def __init__(self, solution: Any, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.solution = solution
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=dtype))  # the problems read device/dtype here

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.solution(z)


def test_the_harmonic_residuals_vanish_on_the_exact_solution() -> None:
    model = HarmonicOscillator(hidden=(4,), omega=3.0)
    model.net = _Exact(lambda t: torch.cos(3.0 * t))
    residuals = model.residuals(None)
    assert residuals["pde"].abs().max().item() < 1e-4
    assert residuals["ic"].abs().max().item() < 1e-6
    model.net = _Exact(lambda t: 2 * torch.cos(3.0 * t))  # u(0) = 2, u'(0) = 0
    torch.testing.assert_close(model.residuals(None)["ic"].detach(), torch.tensor([1.0, 0.0]))


def test_the_wave_residuals_vanish_on_the_exact_solution() -> None:
    torch.manual_seed(0)
    model = Wave1D(hidden=(4,), residual_points=32, initial_points=16, boundary_points=16).double()
    model.net = torch.nn.Sequential(_Exact(lambda z: model.exact(z / math.sqrt(12.0) + 0.5), torch.float64))
    residuals = model.residuals(None)
    for name in ("u", "ut"):
        assert residuals[name].abs().max().item() < 1e-9, name
    assert residuals["pde"].abs().max().item() < 1e-8


def test_the_wave_value_term_covers_both_boundaries_and_the_initial_line() -> None:
    torch.manual_seed(0)
    model = Wave1D(hidden=(4,), residual_points=8, initial_points=16, boundary_points=16).double()
    model.net = torch.nn.Sequential(_Exact(lambda z: z[:, :1] / math.sqrt(12.0) + 0.5, torch.float64))  # u = x
    r_u = model.residuals(None)["u"].detach().reshape(-1)  # x − exact(x, t)
    assert int((r_u.abs() < 1e-9).sum()) == 16  # x = 0: 0 − 0
    assert int(((r_u - 1).abs() < 1e-9).sum()) == 16  # x = 1: 1 − 0
    assert r_u.numel() == 48


def test_the_helmholtz_boundary_term_covers_all_four_edges() -> None:
    torch.manual_seed(0)
    model = Helmholtz2D(hidden=(4,), residual_points=8, edge_points=8)
    for column in (0, 1):
        model.net = _Exact(lambda z, c=column: z[:, c : c + 1] / math.sqrt(3.0))  # u = x, then u = y
        coordinate = (model.residuals(None)["bc"].detach() / 2).reshape(-1)  # bc = 2u
        assert int(((coordinate + 1).abs() < 1e-6).sum()) == 8 and int(((coordinate - 1).abs() < 1e-6).sum()) == 8


# --- _lightning --------------------------------------------------------------------------------


def test_console_messages_are_logged_on_rank_zero_only() -> None:
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    seen: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        console_info(SimpleNamespace(global_rank=1), "from rank one")
        console_info(SimpleNamespace(global_rank=0), "from rank zero")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert seen == ["from rank zero"]
