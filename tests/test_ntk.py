"""NTK traces: exact against closed forms, the batched path against a loop, and sampling error."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import make_trainer

from lightning_pinn import MultiTermLoss
from lightning_pinn.autodiff import derivative
from lightning_pinn.callbacks import NTKBalancer
from lightning_pinn.engine import TermGradientEngine, TraceRequest
from lightning_pinn.ntk import auto_chunk_size, jacobian_row_sq_norms, sample_points


def _loop_reference(residual: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    out = []
    for value in residual.reshape(-1):
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        out.append(sum(g.pow(2).sum() for g in grads if g is not None))
    return torch.stack(out)


def test_linear_model_traces_in_closed_form() -> None:
    """For r(x) = c·(w·x + b − y), ∂r/∂θ = c·[x, 1], so ‖∂r/∂θ‖² = c²(‖x‖² + 1) exactly."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    params = list(model.parameters())
    x = torch.randn(50, 3)
    y = torch.randn(50, 1)
    for c in (1.0, 3.0):
        residual = c * (model(x) - y)
        values = jacobian_row_sq_norms(residual, params, chunk_size=16)
        expected = c**2 * (x.pow(2).sum(dim=1) + 1)
        assert torch.allclose(values, expected, rtol=1e-5)


def test_engine_traces_of_two_terms_in_closed_form() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    criterion = MultiTermLoss(a=1.0, b=1.0)
    engine = TermGradientEngine.for_loss(criterion)
    x_a, x_b = torch.randn(40, 2), 5 * torch.randn(7, 2)
    engine.request(step=0, batch_key=0, params=list(model.parameters()), traces=TraceRequest(None, chunk_size=8))
    criterion(a=model(x_a), b=0.1 * model(x_b)).backward()
    measurement = engine.collect(0, criterion.term_names)
    assert measurement is not None and measurement.traces is not None
    expected = torch.stack([(x_a.pow(2).sum(1) + 1).mean(), 0.01 * (x_b.pow(2).sum(1) + 1).mean()]).double()
    assert torch.allclose(measurement.traces, expected, rtol=1e-5)
    assert measurement.trace_points.tolist() == [40.0, 7.0]


def test_batched_traces_equal_a_per_point_loop_on_a_pinn_residual() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    params = list(net.parameters())
    t = torch.linspace(0, 1, 37).reshape(-1, 1).requires_grad_(True)
    u = net(t)
    (du,) = torch.autograd.grad(u.sum(), t, create_graph=True)
    (ddu,) = torch.autograd.grad(du.sum(), t, create_graph=True)
    residual = ddu + 39.5 * u
    reference = _loop_reference(residual, params)
    for chunk_size in (None, 1, 10, 64):  # automatic, one product per point, batched, one batch
        values = jacobian_row_sq_norms(residual, params, chunk_size=chunk_size)
        assert torch.allclose(values, reference, rtol=1e-4, atol=1e-6), chunk_size


def test_complex_residual_counts_both_parts() -> None:
    model = torch.nn.Linear(2, 1)
    x = torch.randn(5, 2)
    real = model(x)
    residual = torch.complex(real, 2 * real)  # ‖∂Re‖² + ‖∂Im‖² = 5 ‖∂u‖²
    values = jacobian_row_sq_norms(residual, list(model.parameters()))
    assert torch.allclose(values, 5 * (x.pow(2).sum(1) + 1), rtol=1e-5)


def test_subsampled_trace_is_unbiased_within_the_documented_error() -> None:
    """The sampled mean of m of N values has relative standard error sqrt((1 − m/N)/m)·CV."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    params = list(net.parameters())
    x = torch.linspace(-3, 3, 400).reshape(-1, 1)
    residual = net(x) * (1 + x**2)  # per-point values vary a lot along x
    exact_values = jacobian_row_sq_norms(residual, params)
    exact = exact_values.mean().item()
    cv = (exact_values.std(unbiased=True) / exact_values.mean()).item()  # divisor N − 1: exact without replacement
    m, n = 40, 400
    documented_rse = math.sqrt((1 - m / n) / m) * cv
    generator = torch.Generator().manual_seed(1)
    estimates = []
    for _ in range(200):
        points = sample_points(n, m, generator)
        assert points is not None and len(points) == m and len(set(points.tolist())) == m
        estimates.append(jacobian_row_sq_norms(residual, params, points).mean().item())
    estimates_t = torch.tensor(estimates)
    relative_errors = (estimates_t - exact) / exact
    # unbiased: the mean of 200 estimates is within 4 standard errors of the mean
    assert abs(relative_errors.mean().item()) < 4 * documented_rse / math.sqrt(200)
    # the spread matches the documented standard error (within 25 %)
    assert relative_errors.std().item() == pytest.approx(documented_rse, rel=0.25)


def test_sample_points_returns_none_when_all_points_are_wanted() -> None:
    assert sample_points(10, None, None) is None
    assert sample_points(10, 10, None) is None
    assert sample_points(10, 50, None) is None


class _TimesThreeThroughNumpy(torch.autograd.Function):
    """A user's custom op whose backward leaves torch (numpy), so it cannot run under vmap."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return 3 * x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.from_numpy(3 * grad.detach().numpy())


class _NeighbourSumThroughNumpy(torch.autograd.Function):
    """Like :class:`_TimesThreeThroughNumpy`, and it mixes the points: row n is 3·(x[n] + x[n−1])."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return 3 * (x + x.roll(1, 0))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = grad.detach().numpy()
        return torch.from_numpy(3 * (g + np.roll(g, -1, axis=0)))


def _neighbour_sum_values(x: torch.Tensor) -> torch.Tensor:
    """``‖∂r_n/∂θ‖²`` for ``r = _NeighbourSumThroughNumpy(Linear(x))``: 9·(‖x_n + x_{n−1}‖² + 2²)."""
    return 9 * ((x + x.roll(1, 0)).pow(2).sum(dim=1) + 4)


def test_a_backward_that_cannot_be_vmapped_falls_back_to_an_exact_loop_with_a_warning() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    params = list(model.parameters())
    x = torch.randn(20, 3)
    residual = _TimesThreeThroughNumpy.apply(model(x))
    with pytest.warns(UserWarning, match="cannot be vmapped.*one torch.autograd.grad call per point"):
        values = jacobian_row_sq_norms(residual, params, chunk_size=8, one_pass=False)
    assert torch.allclose(values, 9 * (x.pow(2).sum(dim=1) + 1), rtol=1e-5)
    # the fallback also works where grad mode is off (the engine computes traces inside backward)
    with torch.no_grad(), pytest.warns(UserWarning, match="cannot be vmapped"):
        again = jacobian_row_sq_norms(residual, params, chunk_size=8, one_pass=False)
    assert torch.equal(again, values)
    # the one-pass method needs no vmap where the points' rows stay apart: exact, and no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_pass = jacobian_row_sq_norms(residual, params, chunk_size=8)
    assert torch.allclose(one_pass, values, rtol=1e-5)
    # where the custom op also mixes the rows, the one-pass values fail the check: products again
    mixed = _NeighbourSumThroughNumpy.apply(model(x))
    with pytest.warns(UserWarning, match="cannot be vmapped"):
        mixed_values = jacobian_row_sq_norms(mixed, params, chunk_size=8)
    assert torch.allclose(mixed_values, _neighbour_sum_values(x), rtol=1e-5)


def test_the_fallback_warning_names_the_term_and_other_errors_propagate_without_it() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    criterion = MultiTermLoss(a=1.0, b=1.0)
    engine = TermGradientEngine.for_loss(criterion)
    x_a, x_b = torch.randn(6, 2), torch.randn(5, 2)
    engine.request(step=0, batch_key=0, params=list(model.parameters()), traces=TraceRequest(None, chunk_size=4))
    with pytest.warns(UserWarning, match="residual of term 'b' cannot be vmapped"):
        criterion(a=model(x_a), b=_NeighbourSumThroughNumpy.apply(model(x_b))).backward()
    measurement = engine.collect(0, criterion.term_names)
    assert measurement is not None and measurement.traces is not None
    expected = torch.stack([(x_a.pow(2).sum(1) + 1).mean(), _neighbour_sum_values(x_b).mean()]).double()
    assert torch.allclose(measurement.traces, expected, rtol=1e-5)

    # a failure that has nothing to do with vmap is raised as it is, with no fallback warning
    frozen = torch.nn.Linear(2, 1).requires_grad_(False)
    residual = model(x_a) + frozen(x_a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="does not require grad"):
            jacobian_row_sq_norms(residual, [*model.parameters(), *frozen.parameters()])


def test_points_must_be_integer_indices_and_may_be_empty() -> None:
    model = torch.nn.Linear(3, 1)
    residual = model(torch.randn(5, 3))
    params = list(model.parameters())
    assert jacobian_row_sq_norms(residual, params, torch.tensor([], dtype=torch.long)).shape == (0,)
    with pytest.raises(TypeError, match="integer"):
        jacobian_row_sq_norms(residual, params, torch.ones(5, dtype=torch.bool))


def test_automatic_chunks_batch_small_problems_and_loop_over_large_ones_on_a_cpu() -> None:
    small_net, wide_net = 2209, 33537  # parameters of 1-32-32-32-1 and 2-128-128-128-1 MLPs
    assert 8 <= auto_chunk_size(128, small_net) <= 128
    assert auto_chunk_size(100, 10) == 100  # never more than the points
    assert auto_chunk_size(128, wide_net) < auto_chunk_size(128, small_net)  # a wider graph, smaller chunks
    assert auto_chunk_size(4096, small_net) == 1  # one product per point
    assert auto_chunk_size(4096, small_net, "cuda") >= 8  # GPUs batch whatever N


def test_a_residual_that_is_a_view_of_a_parameter_has_unit_rows_in_every_mode() -> None:
    """∂w_j/∂w = e_j: the per-point loop must not read a gradient that aliases its cotangent after resetting it."""
    w = torch.nn.Parameter(torch.randn(6))
    for chunk_size in (1, 4, None):
        assert torch.equal(jacobian_row_sq_norms(w.view(2, 3), [w], chunk_size=chunk_size), torch.ones(6))


def test_complex_parameters_count_real_and_imaginary_parts() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(2, 1, dtype=torch.cfloat)
    x = torch.randn(6, 2, dtype=torch.cfloat)
    residual = layer(x).real  # a real residual of complex parameters
    params = list(layer.parameters())
    reference = []
    for j in range(6):
        grads = torch.autograd.grad(residual[j, 0], params, retain_graph=True)
        reference.append(sum(torch.view_as_real(g).square().sum() for g in grads))
    for chunk_size in (1, 3, None):
        values = jacobian_row_sq_norms(residual, params, chunk_size=chunk_size)
        assert torch.allclose(values, torch.stack(reference), rtol=1e-5), chunk_size


def test_an_ntk_balancer_warns_once_per_term_about_the_fallback() -> None:
    from conftest import TwoTermPoisson, make_trainer

    from lightning_pinn.callbacks import NTKBalancer

    class ThroughNumpy(TwoTermPoisson):
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            residuals = self.residuals()
            return self.criterion(pde=residuals["pde"], bc=_TimesThreeThroughNumpy.apply(residuals["bc"]))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(6, [NTKBalancer(every_n_steps=2, chunk_size=2)]).fit(ThroughNumpy())
    fallbacks = [w for w in caught if "cannot be vmapped" in str(w.message)]
    assert len(fallbacks) == 1 and "term 'bc'" in str(fallbacks[0].message)


class _DropoutBatchNormPoisson(pl.LightningModule):
    """-u'' = π² sin(πx) with a network that draws dropout masks and keeps batch statistics."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(1, 16),
            torch.nn.Tanh(),
            torch.nn.Linear(16, 16),
            torch.nn.BatchNorm1d(16),
            torch.nn.Tanh(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(16, 1),
        )
        self.criterion = MultiTermLoss(pde=1.0, bc=1.0)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = torch.linspace(0, 1, 24).reshape(-1, 1).requires_grad_(True)
        residual = -derivative(self.net(x), x, order=2) - math.pi**2 * torch.sin(math.pi * x)
        return self.criterion(pde=residual, bc=self.net(torch.tensor([[0.0], [0.5], [1.0]])))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(range(8), batch_size=1)


def test_traces_of_a_network_with_dropout_and_batch_norm_run_nothing_forward_again() -> None:
    # The traces differentiate the training step's own graph: no extra forward pass draws dropout
    # masks (the global random stream ends where a plain fit's does) or updates BatchNorm's
    # running statistics (as many batches tracked as steps taken).
    def fit(callbacks: list[Any]) -> tuple[_DropoutBatchNormPoisson, torch.Tensor]:
        torch.manual_seed(1)
        model = _DropoutBatchNormPoisson()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_trainer(6, callbacks).fit(model)
        return model, torch.get_rng_state()

    plain, plain_rng = fit([])
    balancer = NTKBalancer(every_n_steps=1)
    balanced, balanced_rng = fit([balancer])
    assert torch.equal(balanced_rng, plain_rng)
    assert int(balanced.net[3].num_batches_tracked) == int(plain.net[3].num_batches_tracked) == 12  # two calls per step
    assert balancer.num_updates == 6
    assert all(math.isfinite(t) and t > 0 for t in balancer.last_traces.values())


class _UnequalMicroBatches(pl.LightningModule):
    """Two micro-batches per step (accumulation): 4 points near 0, then 20 points near 1 (fixed
    parameters, lr = 0, so every step measures the same residuals)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(1, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
        self.criterion = MultiTermLoss(pde=1.0, bc=1.0)
        self.estimates: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        first = batch_idx % 2 == 0
        x = (0.0 if first else 0.7) + 0.3 * torch.rand(4 if first else 20, 1, generator=torch.Generator().manual_seed(batch_idx % 2))
        residual = (1 + 8 * x) * (torch.sin(3 * x) - self.net(x))
        return self.criterion(pde=residual, bc=self.net(torch.tensor([[0.0], [1.0]])) - 1.0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> range:
        return range(10_000)


def test_sampled_traces_of_unequal_micro_batches_estimate_the_mean_over_all_their_points() -> None:
    # Each micro-batch's sample was pooled with weight m, so the estimate converged to the
    # equal-weight mean of the micro-batches (99 here) instead of the exact per-point mean over
    # their union (160), the quantity the exact traces give (the same held for ranks under DDP).
    class Record(pl.Callback):
        def __init__(self, balancer: NTKBalancer) -> None:
            self.balancer = balancer

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx % 2 == 1:
                pl_module.estimates.append(self.balancer.last_traces["pde"])

    def fit(trace_points: int | None, steps: int) -> list[float]:
        model, balancer = _UnequalMicroBatches(), NTKBalancer(every_n_steps=1, trace_points=trace_points)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_trainer(steps, [balancer, Record(balancer)], accumulate_grad_batches=2).fit(model)
        return model.estimates

    (exact,) = fit(None, 1)
    sampled = np.array(fit(3, 300))
    error = sampled.std(ddof=1) / math.sqrt(len(sampled))
    assert abs(sampled.mean() - exact) < 5 * error and error < 0.02 * exact, (sampled.mean(), exact, error)
