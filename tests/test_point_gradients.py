"""Per-point gradient norms from one backward pass (``lightning_pinn.point_gradients``).

Every value is compared with the vector-Jacobian products for every point
(``jacobian_row_sq_norms(..., one_pass=False)``), the definition of ``‖∂r(x)/∂θ‖²``.
"""

from __future__ import annotations

import pytest
import torch

import lightning_pinn.ntk as ntk
import lightning_pinn.point_gradients as point_gradients
from lightning_pinn.autodiff import derivative
from lightning_pinn.ntk import jacobian_row_sq_norms
from lightning_pinn.point_gradients import one_pass_row_sq_norms


def _mlp(width: int = 16, inputs: int = 1, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(inputs, width), torch.nn.Tanh(), torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)
    ).to(dtype)


def _by_products(residual: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    return jacobian_row_sq_norms(residual, params, one_pass=False)


def _one_pass(residual: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor | None:
    flat = residual.reshape(-1)
    return one_pass_row_sq_norms(flat, params, torch.float64 if flat.dtype == torch.float64 else torch.float32)


def _pinn_residuals(model: torch.nn.Module, n: int = 40) -> dict[str, torch.Tensor]:
    x = torch.rand(n, 1, dtype=torch.float64, requires_grad=True)
    u = model(x)
    u_xx = derivative(u, x, order=2)
    x_data = torch.rand(n, 1, dtype=torch.float64)  # points without requires_grad: a data term
    return {
        "pde": u_xx + 4 * torch.pi**2 * u,
        "squared": derivative(u, x) ** 2 - u,
        "data": model(x_data) - torch.sin(x_data),
    }


@pytest.mark.parametrize("term", ["pde", "squared", "data"])
def test_one_pass_equals_the_products_on_pinn_residuals(term: str) -> None:
    model = _mlp()
    params = list(model.parameters())
    residual = _pinn_residuals(model)[term]
    values = _one_pass(residual, params)
    assert values is not None, "a PINN residual of independent points is one the one-pass method handles"
    assert not values.requires_grad
    torch.testing.assert_close(values, _by_products(residual, params), rtol=1e-10, atol=0)


def test_one_pass_follows_parameters_through_scales_sums_and_quotients() -> None:
    torch.manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(2, 8, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(8, dtype=torch.float64))
    frequencies = torch.nn.Parameter(torch.randn(2, 4, dtype=torch.float64))  # trainable Fourier features
    slope = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))  # an adaptive activation (Jagtap 2020)
    head = torch.nn.Parameter(torch.randn(12, dtype=torch.float64))
    params = [weight, bias, frequencies, slope, head]
    x = torch.rand(30, 2, dtype=torch.float64, requires_grad=True)
    hidden = torch.tanh(10 * slope * (x @ weight + bias))
    features = torch.cat([hidden, torch.sin(x @ frequencies)], dim=1)
    u = (features * head).sum(dim=1) / (1 + slope**2) - bias[0]
    residual = derivative(u, x).sum(dim=1) - u / slope
    values = _one_pass(residual, params)
    assert values is not None
    torch.testing.assert_close(values, _by_products(residual, params), rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    "mix",
    [
        pytest.param(lambda u: u - u.mean(), id="minus-the-mean"),
        pytest.param(lambda u: u - u.flip(0), id="periodic-pairs"),
        pytest.param(lambda u: u[1:] - u[:-1], id="finite-differences"),
        pytest.param(lambda u: u - 1e-3 * u.roll(1, 0), id="weak-coupling"),
    ],
)
def test_residuals_whose_points_mix_get_the_products_values(mix) -> None:
    model = _mlp()
    params = list(model.parameters())
    x = torch.rand(40, 1, dtype=torch.float64, requires_grad=True)
    residual = mix(model(x))
    torch.testing.assert_close(jacobian_row_sq_norms(residual, params), _by_products(residual, params), rtol=1e-10, atol=0)


def test_graphs_it_does_not_know_are_declined() -> None:
    model = _mlp()
    params = list(model.parameters())
    x = torch.rand(20, 1, dtype=torch.float64, requires_grad=True)
    u = model(x)
    # two residual values (u and u') from one point: its rows are not the residual's points
    initial = torch.cat([u[:1] - 1, derivative(u, x)[:1]])
    assert _one_pass(initial, params) is None
    # the parameters on the left of a product with the points
    matrix = torch.nn.Parameter(torch.randn(3, 20, dtype=torch.float64))
    assert _one_pass(matrix @ torch.tanh(x), [matrix]) is None
    # no path from the residual to the points
    assert _one_pass(params[0].sum(dim=1), params) is None
    for residual in (initial, matrix @ torch.tanh(x)):
        wanted = params if residual is initial else [matrix]
        torch.testing.assert_close(jacobian_row_sq_norms(residual, wanted), _by_products(residual, wanted))


def test_chunks_of_points_give_the_same_values(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _mlp()
    params = list(model.parameters())
    residual = _pinn_residuals(model, n=50)["pde"]
    whole = _one_pass(residual, params)
    monkeypatch.setattr(point_gradients, "ONE_PASS_CHUNK_BUDGET", 1)  # one point per chunk
    chunked = _one_pass(residual, params)
    assert whole is not None and chunked is not None
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)


def test_sampled_points_and_float32_and_a_three_dimensional_batch() -> None:
    model = _mlp(dtype=torch.float32)
    params = list(model.parameters())
    x = torch.rand(64, 1, requires_grad=True)
    residual = derivative(model(x), x, order=2) + model(x)
    points = torch.tensor([5, 0, 63, 17])
    sampled = jacobian_row_sq_norms(residual, params, points)
    torch.testing.assert_close(sampled, _by_products(residual, params)[points], rtol=1e-4, atol=0)
    # a (points, 1, features) batch: nn.Linear flattens the leading dimensions
    grid = torch.rand(64, 1, 1, requires_grad=True)
    stacked = model(grid).reshape(-1)
    torch.testing.assert_close(jacobian_row_sq_norms(stacked, params), _by_products(stacked, params), rtol=1e-4, atol=0)


def test_mixed_precision_values_match_the_products_within_bfloat16_rounding() -> None:
    model = _mlp(dtype=torch.float32)
    params = list(model.parameters())
    x = torch.rand(32, 1, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        residual = model(x).float() - 1
    torch.testing.assert_close(jacobian_row_sq_norms(residual, params), _by_products(residual, params), rtol=2e-2, atol=0)


def test_one_network_call_over_every_term_then_sliced_and_periodic_pairs_take_the_one_pass_route() -> None:
    model = _mlp()
    params = list(model.parameters())
    interior = torch.rand(30, 1, dtype=torch.float64)
    boundary = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    x = torch.cat([interior, boundary]).requires_grad_(True)  # one call for every term, as DeepXDE does
    u = model(x)
    u_xx = derivative(u, x, order=2)
    left, right = torch.zeros(8, 1, dtype=torch.float64), torch.ones(8, 1, dtype=torch.float64)
    both_sides = model(torch.cat([left, right]))
    residuals = {
        "pde": u_xx[:30] + u[:30],
        "bc": u[30:] - 1,
        "reversed": u.flip(0),  # a permutation of the points is not a mixture
        "periodic": both_sides[:8] - both_sides[8:],  # each residual from two rows, each row serving one residual
    }
    for name, residual in residuals.items():
        values = _one_pass(residual, params)
        assert values is not None, name
        torch.testing.assert_close(values, _by_products(residual, params), rtol=1e-10, atol=0, msg=name)
    # a row that serves two residual values is declined
    assert _one_pass(u[:10] + u[10:20].flip(0) + u[5:15], params) is None


def test_non_finite_gradients_are_declined_and_the_products_report_them() -> None:
    model = _mlp()
    params = list(model.parameters())
    x = torch.rand(20, 1, dtype=torch.float64, requires_grad=True)
    u = model(x)
    broken = u * torch.where(torch.arange(20).reshape(-1, 1) == 7, torch.tensor(float("inf"), dtype=torch.float64), 1.0)
    assert _one_pass(broken, params) is None
    values = jacobian_row_sq_norms(broken, params)
    assert not bool(torch.isfinite(values).all())  # 0·inf in the products: NaN, which the balancers skip with a warning


class _ModifiedMLP(torch.nn.Module):
    """Wang, Teng & Perdikaris 2021's modified MLP: two encoders mixed by every layer's output."""

    def __init__(self, width: int = 12) -> None:
        super().__init__()
        self.encoder_u, self.encoder_v = torch.nn.Linear(1, width), torch.nn.Linear(1, width)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(1, width), torch.nn.Linear(width, width)])
        self.out = torch.nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v, h = torch.tanh(self.encoder_u(x)), torch.tanh(self.encoder_v(x)), x
        for layer in self.layers:
            z = torch.tanh(layer(h))
            h = (1 - z) * u + z * v
        return self.out(h)


class _AdaptiveSkip(torch.nn.Module):
    """Adaptive activations (trainable slopes, Jagtap et al. 2020), a skip connection, no output bias."""

    def __init__(self, width: int = 12) -> None:
        super().__init__()
        self.first, self.hidden = torch.nn.Linear(1, width), torch.nn.Linear(width, width)
        self.slopes = torch.nn.Parameter(torch.full((2,), 0.1))
        self.out = torch.nn.Linear(width, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(10 * self.slopes[0] * self.first(x))
        return self.out(h + torch.sin(10 * self.slopes[1] * self.hidden(h)))


class _FourierFeatures(torch.nn.Module):
    """Trainable Fourier features and a weight-normalised layer."""

    def __init__(self, width: int = 12) -> None:
        super().__init__()
        self.frequencies = torch.nn.Parameter(torch.randn(1, 6))
        self.layer = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(12, width))
        self.out = torch.nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x @ self.frequencies
        return self.out(torch.tanh(self.layer(torch.cat([torch.sin(z), torch.cos(z)], dim=1))))


@pytest.mark.parametrize("architecture", [_ModifiedMLP, _AdaptiveSkip, _FourierFeatures])
def test_common_pinn_architectures_and_a_hard_constraint_take_the_one_pass_route(architecture) -> None:
    torch.manual_seed(0)
    network = architecture().double()
    params = list(network.parameters())
    x = torch.rand(40, 1, dtype=torch.float64, requires_grad=True)
    u = x * (1 - x) * network(x) + 1  # a hard boundary condition
    residual = derivative(u, x, order=2) + u
    values = _one_pass(residual, params)
    assert values is not None
    torch.testing.assert_close(values, _by_products(residual, params), rtol=1e-10, atol=0)


def test_a_system_residual_is_done_column_by_column_and_layer_norm_gets_the_products() -> None:
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(1, 12), torch.nn.Tanh(), torch.nn.Linear(12, 2)).double()
    params = list(network.parameters())
    x = torch.rand(30, 1, dtype=torch.float64, requires_grad=True)
    uv = network(x)
    u, v = uv[:, 0:1], uv[:, 1:2]
    system = torch.cat([derivative(u, x) - v, derivative(v, x) + u], dim=1)  # (N, 2): two values per row
    assert _one_pass(system, params) is None  # as one flat residual, each row serves two values
    values = ntk._one_pass_values(system, system.reshape(-1), params, torch.float64, [])
    assert values is not None
    torch.testing.assert_close(values, _by_products(system, params), rtol=1e-10, atol=0)

    normed = torch.nn.Sequential(torch.nn.Linear(1, 12), torch.nn.LayerNorm(12), torch.nn.Tanh(), torch.nn.Linear(12, 1)).double()
    normed_params = list(normed.parameters())
    residual = derivative(normed(x), x) - 1
    assert _one_pass(residual, normed_params) is None  # layer_norm's parameters: not an operation it knows
    torch.testing.assert_close(jacobian_row_sq_norms(residual, normed_params), _by_products(residual, normed_params))


def _res_and_u(n: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    model = _mlp()
    x = torch.rand(n, 1, dtype=torch.float64, requires_grad=True)
    u = model(x)
    return derivative(u, x, order=2) + u, u, list(model.parameters())


@pytest.mark.parametrize(
    "build",
    [
        # one row used by two points whose indices average to a third (26 and 30 → 28)
        pytest.param(lambda res, u: res[torch.cat([torch.arange(30), torch.tensor([26]), torch.arange(31, 60)])], id="duplicate-rows"),
        # sampling with replacement from one evaluated pool
        pytest.param(lambda res, u: res[torch.randint(0, 60, (40,), generator=torch.Generator().manual_seed(3))], id="with-replacement"),
        # a row used with opposite signs: its contributions cancel in Σ_n r_n
        pytest.param(lambda res, u: torch.cat([res[:30], u[30:31] - u[31:32], u[31:32] - u[32:33], res[33:]]), id="cancelling-row"),
        # a weak coupling between neighbours far from the four checked points
        pytest.param(lambda res, u: torch.cat([res[:45], res[45:46] + 0.1 * res[46:47], res[46:]]), id="weak-neighbour"),
        pytest.param(lambda res, u: torch.cat([res[:45], res[45:46] + 1e-8 * res[46:47], res[46:]]), id="very-weak-neighbour"),
    ],
)
def test_rows_serving_several_points_never_give_wrong_values(build) -> None:
    res, u, params = _res_and_u(60)
    residual = build(res, u)
    torch.testing.assert_close(jacobian_row_sq_norms(residual, params), _by_products(residual, params), rtol=1e-9, atol=0)


def test_a_parameter_denominator_as_wide_as_the_batch_is_not_indexed_by_rows() -> None:
    torch.manual_seed(0)
    layer, out = torch.nn.Linear(1, 32).double(), torch.nn.Linear(32, 1).double()
    scale = torch.nn.Parameter(torch.rand(32, dtype=torch.float64) + 0.5)  # as many entries as points
    params = [*layer.parameters(), scale, *out.parameters()]
    x = torch.rand(32, 1, dtype=torch.float64, requires_grad=True)
    residual = out(torch.tanh(layer(x)) / scale)
    values = _one_pass(residual, params)
    assert values is not None
    torch.testing.assert_close(values, _by_products(residual, params), rtol=1e-10, atol=0)


def test_a_retained_intermediate_gradient_does_not_break_the_next_backward() -> None:
    model = _mlp()
    params = list(model.parameters())
    x = torch.rand(20, 1, dtype=torch.float64, requires_grad=True)
    hidden = model[0](x)
    hidden.retain_grad()  # PyTorch fills it on every backward pass through it
    u = model[4](model[3](model[2](model[1](hidden))))
    jacobian_row_sq_norms(u, params)  # the one-pass route and its check: no vmap over this graph
    u.sum().backward()  # raised "tensor escaped from vmap" when the check vmapped its products
    assert hidden.grad is not None and hidden.grad.shape == hidden.shape


def test_an_ntk_balancer_fit_computes_its_traces_by_the_one_pass_route(monkeypatch: pytest.MonkeyPatch) -> None:
    import pytorch_lightning as pl

    from lightning_pinn.callbacks import NTKBalancer
    from lightning_pinn.problems import HarmonicOscillator

    products: list[int] = []  # points per call of the vector-Jacobian products
    for name in ("_vmapped_row_sq_norms", "_looped_row_sq_norms"):
        original = getattr(ntk, name)

        def counted(flat, params, rows, out_dtype, original=original):
            products.append(len(rows))
            return original(flat, params, rows, out_dtype)

        monkeypatch.setattr(ntk, name, counted)
    one_pass_calls: list[int] = []
    original_one_pass = ntk.one_pass_row_sq_norms
    monkeypatch.setattr(ntk, "one_pass_row_sq_norms", lambda flat, *a: one_pass_calls.append(flat.numel()) or original_one_pass(flat, *a))
    torch.manual_seed(0)
    model = HarmonicOscillator(collocation_points=64, steps_per_epoch=10)
    trainer = pl.Trainer(
        max_steps=10, callbacks=[NTKBalancer(every_n_steps=5)], logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model)
    assert one_pass_calls.count(64) == 2  # the pde term at both updates
    # only the checks (four spread points, the largest and the smallest value) and the two-point
    # initial-condition term used products
    assert products and max(products) <= 6


def test_float32_rows_serving_two_points_never_give_wrong_values() -> None:
    # a second probe found float32 positions where one random code matched a duplicated or weakly
    # coupled row by chance (10 % off in the trace); two independent codes make that negligible
    model = _mlp(dtype=torch.float32)
    params = list(model.parameters())
    x = torch.rand(60, 1, requires_grad=True)
    u = model(x)
    res = derivative(u, x, order=2) + u
    reference = _by_products(res, params)
    for copied, into in [(38, 48), (10, 20), (3, 57), (30, 31), (44, 50), (12, 36)]:
        index = torch.arange(60)
        index[into] = copied
        duplicated = res[index]
        torch.testing.assert_close(jacobian_row_sq_norms(duplicated, params), reference[index], rtol=1e-4, atol=0)
    for n in range(5, 55, 8):
        coupled = torch.cat([res[:n], res[n : n + 1] + 0.01 * res[n + 1 : n + 2], res[n + 1 :]])
        torch.testing.assert_close(jacobian_row_sq_norms(coupled, params), _by_products(coupled, params), rtol=1e-4, atol=0)


def test_a_duplicate_whose_indices_average_to_a_third_point_in_float32_at_n_1000() -> None:
    # a review found 166 such (copied, into) pairs at N = 1000 that passed the row tests when the
    # golden-ratio code (affine in n, like the n+1 code) had only one random code beside it
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    params = list(model.parameters())
    x = torch.rand(1000, 1, requires_grad=True)
    u = model(x)
    res = derivative(u, x, order=2) + u
    for copied, into in [(6, 458), (17, 325), (3, 97)]:
        index = torch.arange(1000)
        index[into] = copied
        duplicated = res[index]
        torch.testing.assert_close(jacobian_row_sq_norms(duplicated, params), _by_products(duplicated, params), rtol=1e-4, atol=0)


def test_an_ntk_balancer_with_one_pass_off_uses_products_and_gets_the_same_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import pytorch_lightning as pl

    from lightning_pinn.callbacks import NTKBalancer
    from lightning_pinn.problems import HarmonicOscillator

    one_pass_calls: list[int] = []
    original_one_pass = ntk.one_pass_row_sq_norms
    monkeypatch.setattr(ntk, "one_pass_row_sq_norms", lambda flat, *a: one_pass_calls.append(flat.numel()) or original_one_pass(flat, *a))

    def fit(one_pass: bool) -> tuple[dict[str, float], dict[str, float]]:
        torch.manual_seed(0)
        model = HarmonicOscillator(collocation_points=64, steps_per_epoch=10)
        balancer = NTKBalancer(every_n_steps=5, one_pass=one_pass)
        trainer = pl.Trainer(max_steps=10, callbacks=[balancer], logger=False, enable_checkpointing=False, enable_progress_bar=False)
        trainer.fit(model)
        return balancer.last_traces, model.criterion.weights

    traces_off, weights_off = fit(one_pass=False)
    assert one_pass_calls == []
    traces_on, weights_on = fit(one_pass=True)
    assert one_pass_calls
    for name in traces_on:
        assert traces_off[name] == pytest.approx(traces_on[name], rel=1e-4)
        assert weights_off[name] == pytest.approx(weights_on[name], rel=1e-4)


def test_ntk_balancer_refuses_a_non_boolean_one_pass() -> None:
    from lightning_pinn.callbacks import NTKBalancer

    with pytest.raises(TypeError, match="one_pass must be True or False"):
        NTKBalancer(one_pass="no")  # type: ignore[arg-type]


def _spy_outer_products(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, int], int]]:
    """Record each parameter the outer-product route handles: (its shape, rows per point)."""
    seen: list[tuple[tuple[int, int], int]] = []
    original = point_gradients._add_outer_product_norms

    def spy(uses, num_points, result):  # type: ignore[no-untyped-def]
        use, transposed = uses[0]
        k, m = use.factor_sizes
        rows = sum(num_points if u.point_of_row is None else int((u.point_of_row >= 0).sum()) for u, _ in uses)
        seen.append(((m, k) if transposed else (k, m), rows // num_points))
        return original(uses, num_points, result)

    monkeypatch.setattr(point_gradients, "_add_outer_product_norms", spy)
    return seen


@pytest.mark.parametrize("term", ["pde", "squared", "data"])
def test_layer_weights_take_the_outer_product_route_with_the_same_values(term: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy_outer_products(monkeypatch)
    model = _mlp()
    params = list(model.parameters())
    residual = _pinn_residuals(model)[term]
    values = _one_pass(residual, params)
    assert values is not None
    # every weight matrix, through every use the derivatives added (u_xx uses each weight several times)
    assert sorted(shape for shape, _ in seen) == [(1, 16), (16, 1), (16, 16)]
    if term == "pde":
        assert min(rows for _, rows in seen) >= 2
    torch.testing.assert_close(values, _by_products(residual, params), rtol=1e-10, atol=0)


def test_outer_products_of_rows_reordered_or_two_per_point(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy_outer_products(monkeypatch)
    model = _mlp()
    params = list(model.parameters())
    left, right = torch.rand(8, 1, dtype=torch.float64), torch.rand(8, 1, dtype=torch.float64) + 1
    both_sides = model(torch.cat([left, right]))
    permutation = torch.randperm(16)
    for residual in (both_sides[:8] - 2 * both_sides[8:], both_sides[permutation]):
        seen.clear()
        values = _one_pass(residual, params)
        assert values is not None and len(seen) == 3
        torch.testing.assert_close(values, _by_products(residual, params), rtol=1e-10, atol=0)
    assert _one_pass(both_sides[:8] - 2 * both_sides[8:], params) is not None
    assert max(rows for _, rows in seen) == 2  # the periodic pair: two rows serve each point


def test_a_weight_also_used_outside_a_matrix_product_is_summed_per_point(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy_outer_products(monkeypatch)
    torch.manual_seed(2)
    weight = torch.nn.Parameter(torch.randn(8, 2, dtype=torch.float64))
    head = torch.nn.Parameter(torch.randn(1, 8, dtype=torch.float64))
    x = torch.rand(20, 2, dtype=torch.float64, requires_grad=True)
    hidden = torch.tanh(x @ weight.t())
    u = (hidden @ head.t()).reshape(-1) * weight[0, 0] + (x * weight[1]).sum(dim=1)  # weight in mul, weight[1] sliced
    residual = derivative(u, x).sum(dim=1) + u
    values = _one_pass(residual, [weight, head])
    assert values is not None
    assert [shape for shape, _ in seen] == [(1, 8)]  # only the head: the weight's other uses need its per-point sum
    torch.testing.assert_close(values, _by_products(residual, [weight, head]), rtol=1e-10, atol=0)


def test_outer_products_lose_no_more_digits_than_per_point_sums_where_uses_cancel(monkeypatch: pytest.MonkeyPatch) -> None:
    # r = u(x) − u(x + h): the two calls' contributions nearly cancel; float32 against a float64 reference
    model32 = _mlp(width=32, dtype=torch.float32)
    model64 = _mlp(width=32, dtype=torch.float64)
    x = torch.rand(50, 1)
    reference = _by_products((model64(x.double()) - model64(x.double() + 1e-3)).reshape(-1), list(model64.parameters()))
    values = _one_pass((model32(x) - model32(x + 1e-3)).reshape(-1), list(model32.parameters()))
    monkeypatch.setattr(point_gradients, "_outer_product_leaves", lambda kind, uses: ({}, uses))
    summed = _one_pass((model32(x) - model32(x + 1e-3)).reshape(-1), list(model32.parameters()))
    assert values is not None and summed is not None
    error, summed_error = (((v.double() - reference) / reference).abs().max().item() for v in (values, summed))
    assert error < 1e-3 and error < 2 * summed_error


@pytest.mark.parametrize(
    "effective_weight",
    [
        pytest.param(lambda v, s, a: a * v, id="scalar-times-weight"),
        pytest.param(lambda v, s, a: torch.exp(s)[:, None] * v, id="random-weight-factorisation"),
        pytest.param(lambda v, s, a: v + s[:, None], id="weight-plus-broadcast-column"),
        pytest.param(lambda v, s, a: a * v / torch.linalg.vector_norm(v, dim=1, keepdim=True), id="hand-written-weight-norm"),
    ],
)
def test_parameters_combined_by_broadcasting_before_they_meet_the_points(effective_weight) -> None:  # type: ignore[no-untyped-def]
    # a node of parameters alone, called directly, returns its inputs' gradients in the broadcast
    # shape (the scalar a got a gradient shaped like V); they must be summed to each input's shape
    torch.manual_seed(3)
    first = torch.nn.Linear(1, 12).double()
    v = torch.nn.Parameter(torch.randn(12, 12, dtype=torch.float64))
    s = torch.nn.Parameter(0.1 * torch.randn(12, dtype=torch.float64))
    a = torch.nn.Parameter(torch.tensor(1.3, dtype=torch.float64))
    head = torch.nn.Linear(12, 1).double()
    params = [*first.parameters(), v, s, a, *head.parameters()]
    x = torch.rand(25, 1, dtype=torch.float64, requires_grad=True)
    u = head(torch.tanh(torch.nn.functional.linear(torch.tanh(first(x)), effective_weight(v, s, a))))
    residual = derivative(u, x, order=2) + u
    values = _one_pass(residual, params)
    assert values is not None
    torch.testing.assert_close(values, _by_products(residual, params), rtol=1e-10, atol=0)


def test_a_float32_network_with_its_residual_cast_to_float64_keeps_the_one_pass_values(monkeypatch: pytest.MonkeyPatch) -> None:
    # the check's tolerance follows the least precise of the residual and the parameters
    model = _mlp(width=16, dtype=torch.float32)
    params = list(model.parameters())
    x = torch.rand(200, 1, requires_grad=True)
    u = model(x)
    residual = (derivative(u, x, order=2) + u).double()
    products: list[int] = []
    original = ntk._vmapped_row_sq_norms
    monkeypatch.setattr(
        ntk, "_vmapped_row_sq_norms", lambda flat, p, rows, dtype: products.append(len(rows)) or original(flat, p, rows, dtype)
    )
    values = jacobian_row_sq_norms(residual, params)
    assert products == []  # no fallback to the O(N²) products
    torch.testing.assert_close(values, _by_products(residual, params), rtol=1e-5, atol=0)


def test_a_wrong_one_pass_value_at_the_largest_point_falls_back_to_the_products(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _mlp()
    params = list(model.parameters())
    residual = _pinn_residuals(model, n=60)["pde"]
    exact = _by_products(residual, params)
    right = ntk.one_pass_row_sq_norms

    def wrong_at_the_largest(flat, p, dtype, reordered):  # type: ignore[no-untyped-def]
        values = right(flat, p, dtype, reordered).clone()
        peak = int(values.argmax())
        assert peak not in ntk._check_rows(values.numel())  # the spread points alone would miss it
        values[peak] *= 1.1
        return values

    monkeypatch.setattr(ntk, "one_pass_row_sq_norms", wrong_at_the_largest)
    torch.testing.assert_close(jacobian_row_sq_norms(residual, params), exact, rtol=1e-10, atol=0)


@pytest.mark.parametrize("grid", [(12, 25), (30, 6)])
def test_a_residual_on_a_grid_from_one_network_call_takes_the_one_pass_route(
    grid: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # (Nx, Nt) from one call on the flattened grid: one graph row per entry, so the flat residual
    # works whatever the trailing size (it used to be declined beyond 16 columns)
    model = _mlp(width=12, inputs=2)
    params = list(model.parameters())
    x, t = torch.meshgrid(
        torch.linspace(0, 1, grid[0], dtype=torch.float64), torch.linspace(0, 1, grid[1], dtype=torch.float64), indexing="ij"
    )
    xt = torch.stack([x, t], dim=-1).requires_grad_(True)
    u = model(xt).squeeze(-1)
    gradient = torch.autograd.grad(u.sum(), xt, create_graph=True)[0]
    u_xx = torch.autograd.grad(gradient[..., 0].sum(), xt, create_graph=True)[0][..., 0]
    residual = gradient[..., 1] - 0.01 * u_xx
    checked: list[int] = []
    original = ntk._looped_row_sq_norms
    monkeypatch.setattr(
        ntk, "_looped_row_sq_norms", lambda flat, p, rows, dtype: checked.append(len(rows)) or original(flat, p, rows, dtype)
    )
    monkeypatch.setattr(ntk, "_vmapped_row_sq_norms", None)  # the O(N²) products must not run
    values = jacobian_row_sq_norms(residual, params)
    assert checked and max(checked) <= 6
    monkeypatch.undo()
    torch.testing.assert_close(values, _by_products(residual, params), rtol=1e-10, atol=0)


def test_parameters_the_graph_walk_cannot_follow_are_declined() -> None:
    model = _mlp()
    params = list(model.parameters())
    residual = _pinn_residuals(model)["pde"]
    assert _one_pass(residual, params) is not None
    assert _one_pass(residual, [*params, params[2]]) is None  # listed twice
    assert _one_pass(residual, [*params[:-1], params[-1] * 1.0]) is None  # not a leaf
    handle = params[2].register_hook(lambda grad: 2 * grad)  # autograd applies it; the walk could not
    try:
        assert _one_pass(residual, params) is None
        torch.testing.assert_close(jacobian_row_sq_norms(residual, params), _by_products(residual, params), rtol=1e-10, atol=0)
    finally:
        handle.remove()


def test_a_row_serving_two_points_whose_codes_average_to_a_third_is_caught_by_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    # A float32 probe built such a row (two points sharing a partner whose three codes, and
    # indices, average to a third point's within the row tolerance); the one-pass values then
    # moved the shared row to the third point. Forced here by making every row test pass: the
    # check then must test the points of the reordered rows and fall back to the products.
    model = _mlp()
    params = list(model.parameters())
    x = torch.rand(40, 1, dtype=torch.float64, requires_grad=True)
    y = torch.rand(40, 1, dtype=torch.float64)
    partner = torch.arange(40)
    partner[30] = 10  # the row of y[10] serves points 10 and 30; the row of y[30] none
    residual = derivative(model(x), x, order=2).reshape(-1) + model(y).reshape(-1)[partner]
    exact = _by_products(residual, params)

    def fooled(plain, coded, checks, num_points):  # type: ignore[no-untyped-def]
        points = torch.arange(plain.shape[0])
        points[10], points[30] = 20, -1  # what the probe's codes named
        return points

    monkeypatch.setattr(point_gradients, "_points_of_rows", fooled)
    monkeypatch.setattr(point_gradients, "_serves_own_point", lambda plain, checks: False)
    reordered: list[torch.Tensor] = []
    wrong = one_pass_row_sq_norms(residual, params, torch.float64, reordered)
    assert wrong is not None and not torch.allclose(wrong[[10, 30]], exact[[10, 30]], rtol=1e-3)
    assert sorted(torch.unique(torch.cat(reordered)).tolist()) == [10, 20, 30]
    assert not any(point in ntk._check_rows(40) for point in (10, 20, 30))
    checked: list[list[int]] = []
    looped = ntk._looped_row_sq_norms
    monkeypatch.setattr(
        ntk, "_looped_row_sq_norms", lambda flat, p, rows, dtype: checked.append(rows.tolist()) or looped(flat, p, rows, dtype)
    )
    torch.testing.assert_close(jacobian_row_sq_norms(residual, params), exact, rtol=1e-10, atol=0)
    assert {10, 20, 30} <= set(checked[0])  # the first, middle and last reordered point


def test_many_rows_per_point_sum_the_point_gradient_instead_of_gram_matrices(monkeypatch: pytest.MonkeyPatch) -> None:
    # a quadrature over Q network rows per point: Gram matrices of (uses·Q)² entries per point
    # would outgrow the k×m weight itself (1.5 GB in a review's case); the point's gradient is summed
    answers: list[bool] = []
    original = point_gradients._add_outer_product_norms
    monkeypatch.setattr(point_gradients, "_add_outer_product_norms", lambda *a: answers.append(original(*a)) or answers[-1])
    model = _mlp(width=6)
    params = list(model.parameters())
    x = torch.rand(10, 1, dtype=torch.float64)
    offsets = torch.linspace(-0.1, 0.1, 16, dtype=torch.float64)
    points = (x + offsets).reshape(-1, 1).requires_grad_(True)
    residual = derivative(model(points), points, order=2).reshape(10, 16).mean(dim=1)
    values = _one_pass(residual, params)
    assert values is not None and answers and not any(answers)
    torch.testing.assert_close(values, _by_products(residual, params), rtol=1e-10, atol=0)
