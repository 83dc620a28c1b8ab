"""Values and refusals pinned exactly, each written against a deliberate bug (a mutant of the
library) that the rest of the suite let pass (second round): the report's advice, weights and
thresholds, reading resumed event files, state keys, logging steps, the dashboard's regexes, the
loss's input checks, NTK traces of complex residuals, diagnostics, the sweep and the CLI."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import pytest
import torch
from conftest import TwoTermPoisson, make_trainer
from test_monitor import _RecordingLogger
from torch.utils.tensorboard import SummaryWriter

import lightning_pinn.callbacks as callbacks
from lightning_pinn import MultiTermLoss
from lightning_pinn.callbacks import GradientNormMonitor
from lightning_pinn.cli import build_parser
from lightning_pinn.diagnostics import nearly_satisfied
from lightning_pinn.ntk import jacobian_row_sq_norms
from lightning_pinn.report import History, diagnose, read_history, render_markdown
from lightning_pinn.sweep import FitResult, FitSpec, grid_weights, summarize
from lightning_pinn.tensorboard import dashboard_layout


# --------------------------------------------------------------------- report
def _ratio_history(ratio: float, ic_weight: float, limits: list[float] | None = None):
    history = History()
    for index, step in enumerate(range(0, 40, 10)):
        history.add(
            {
                "grad_norm_weighted/pde": 1.0,
                "grad_norm_weighted/ic": 1.0 / ratio,
                "grad_norm/pde": 1.0,
                "grad_norm/ic": 1.0 / (ratio * ic_weight),
                "grad_ratio": ratio,
                "alarm/grad_ratio": 1.0,
                "weight/pde": 1.0,
                "weight/ic": ic_weight,
            },
            step,
        )
        if limits is not None:
            history.add({"grad_ratio_threshold": limits[index]}, step)
    return history


def test_report_advice_suggests_the_weight_times_the_ratio() -> None:
    """The advice's λ value is the current λ of the drowned term times the worst ratio (2 x 300 = 600)."""
    diagnosis = diagnose(_ratio_history(300.0, 2.0), threshold=100.0)
    assert diagnosis.worst_pair == ("pde", "ic")
    advice = " ".join(diagnosis.advice)
    assert "raise λ_ic by about 300x (to ≈ 600)" in advice, advice


def test_report_weights_section_gives_the_overall_factor_last_over_first() -> None:
    history = History()
    for step, weight in [(0, 1.0), (10, 2.0), (20, 4.0)]:
        history.add({"grad_norm/pde": 1.0, "grad_norm/ic": 1.0, "weight/pde": 1.0, "weight/ic": weight}, step)
    text = render_markdown(diagnose(history))
    assert "- ic: 1 → 4 (range 1–4, ×4 overall)." in text, text


def test_report_counts_each_measurement_against_its_own_logged_threshold() -> None:
    """A resumed fit may log another threshold: a ratio of 300 is above 100 but not above 1000."""
    history = _ratio_history(300.0, 1.0, limits=[100.0, 100.0, 1000.0, 1000.0])
    diagnosis = diagnose(history)
    assert diagnosis.ratio_measurements_above == 2


def _write(folder, scalars: dict[str, list[tuple[int, float]]]) -> None:
    writer = SummaryWriter(str(folder))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


def test_read_history_another_writers_file_only_adds_points(tmp_path) -> None:
    """Two of this library's files: the second resumes. A third file from another writer (no
    grad_norm/weight tags) must not cut the fit's history at its first step."""
    _write(tmp_path, {"grad_norm/pde": [(0, 1.0), (10, 2.0), (20, 3.0)]})
    time.sleep(1.1)  # event file names hold the second
    _write(tmp_path, {"user/metric": [(5, 7.0)]})
    history = read_history(tmp_path)
    assert history["grad_norm/pde"] == ([0, 10, 20], [1.0, 2.0, 3.0])
    assert history["user/metric"] == ([5], [7.0])


def test_read_history_resume_keeps_points_at_the_resume_step_not_written_again(tmp_path) -> None:
    """A resumed fit's file replaces the earlier file from its first step on; at that step itself
    only the tags it wrote again are replaced (a balancer does not log λ twice there)."""
    _write(tmp_path, {"grad_norm/pde": [(0, 1.0), (10, 2.0), (20, 3.0)], "weight/ic": [(0, 1.0), (10, 5.0), (20, 9.0)]})
    time.sleep(1.1)
    _write(tmp_path, {"grad_norm/pde": [(10, 20.0), (20, 30.0)], "weight/ic": [(20, 6.0)]})
    history = read_history(tmp_path)
    assert history["grad_norm/pde"] == ([0, 10, 20], [1.0, 20.0, 30.0])
    assert history["weight/ic"] == ([0, 10, 20], [1.0, 5.0, 6.0])


# --------------------------------------------------------------- callbacks' base
@pytest.mark.parametrize("kind", ["GradientNormMonitor", "GradNormBalancer", "NTKBalancer"])
def test_state_key_tells_callbacks_of_different_losses_apart(kind: str) -> None:
    """Two callbacks of one kind on two losses of one module must not share a checkpoint entry."""
    first, second = getattr(callbacks, kind)(loss_module="a"), getattr(callbacks, kind)(loss_module="b")
    assert first.state_key != second.state_key


def test_monitor_logs_each_measurement_at_the_step_it_was_measured(tmp_path: Path) -> None:
    """every_n_steps=3 measures steps 0, 3, 6: its scalars go to the logger at those steps
    (the history's steps), not at the step after (trainer.global_step once the step is done)."""
    logger = _RecordingLogger(str(tmp_path))
    monitor = GradientNormMonitor(every_n_steps=3, verbose=False, report=False)
    make_trainer(7, [monitor], logger=logger, log_every_n_steps=100).fit(TwoTermPoisson())
    steps = sorted({step for step, metrics in logger.metrics if "grad_ratio" in metrics})
    assert steps == [0, 3, 6]
    assert monitor.history["grad_ratio"][0] == [0, 3, 6]


# ------------------------------------------------------------------ tensorboard
def test_dashboard_layout_term_regexes_are_anchored_and_prefixes_escaped() -> None:
    (charts,) = dashboard_layout(logger_prefix="run.1-", terms=["pde", "bc"]).values()
    weight = charts["weight per term  λ_i"][1][0]
    assert re.search(weight, "run.1-weight/pde")
    assert not re.search(weight, "run.1-weight/pde_old"), "a term's chart must not take another tag that starts with its name"
    norms = charts["gradient norm per term  ‖∇θ L_i‖"][1][0]
    assert not re.search(norms, "runX1-grad_norm/pde"), "the logger prefix is matched literally"
    ratio_chart = charts["gradient-norm ratio (max/min weighted) vs alarm threshold"][1]
    assert any(re.search(p, "run.1-grad_ratio_threshold") for p in ratio_chart)
    assert any(re.search(p, "run.1-grad_ratio") for p in ratio_chart)


# ------------------------------------------------------------- loss validation
@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_constructor_refuses_negative_and_non_finite_weights(value: float) -> None:
    with pytest.raises(ValueError, match="weight of term 'pde'"):
        MultiTermLoss(pde=value, bc=1.0)


@pytest.mark.parametrize("value", [-1.0, math.nan])
def test_set_weights_refuses_bad_values_as_dict_and_tensor(value: float) -> None:
    loss = MultiTermLoss(pde=1.0, bc=1.0)
    with pytest.raises(ValueError, match="'bc'"):
        loss.set_weights({"bc": value})
    with pytest.raises(ValueError, match="'bc'"):
        loss.set_weights(torch.tensor([1.0, value]))
    assert loss.weights == {"pde": 1.0, "bc": 1.0}


def test_forward_refuses_a_missing_term() -> None:
    loss = MultiTermLoss(pde=1.0, bc=1.0)
    with pytest.raises(ValueError, match="missing term"):
        loss(pde=torch.ones(3, requires_grad=True))


def test_checkpoint_weights_load_by_name_under_a_cyclic_reordering() -> None:
    saved = MultiTermLoss(a=1.0, b=2.0, c=3.0)
    loaded = MultiTermLoss(b=0.0, c=0.0, a=0.0)
    loaded.load_state_dict(saved.state_dict())
    assert loaded.weights == {"b": 2.0, "c": 3.0, "a": 1.0}


def test_checkpoint_with_a_negative_weight_is_refused() -> None:
    state = MultiTermLoss(pde=1.0, bc=1.0).state_dict()
    state["lambdas"] = torch.tensor([1.0, -2.0], dtype=state["lambdas"].dtype)
    loaded = MultiTermLoss(pde=1.0, bc=1.0)
    with pytest.raises(ValueError, match="'bc' is -2.0"):
        loaded.load_state_dict(state)
    assert loaded.weights == {"pde": 1.0, "bc": 1.0}


# ------------------------------------------------------------------------- NTK
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_jacobian_row_sq_norms_of_a_complex_residual_sums_real_and_imaginary_parts(chunk_size: int) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    params = list(net.parameters())
    x = torch.linspace(0, 1, 7, dtype=torch.float64).reshape(-1, 1)
    out = net(x)
    residual = torch.complex(out[:, 0], 3.0 * out[:, 1])
    values = jacobian_row_sq_norms(residual, params, chunk_size=chunk_size)
    expected = []
    for n in range(len(x)):
        total = 0.0
        for part in (residual[n].real, residual[n].imag):
            grads = torch.autograd.grad(part, params, retain_graph=True, allow_unused=True)
            total += sum(float(g.square().sum()) for g in grads if g is not None)
        expected.append(total)
    torch.testing.assert_close(values, torch.tensor(expected, dtype=values.dtype))


# ---------------------------------------------------------------- diagnostics
def test_nearly_satisfied_returns_the_factor_either_way_and_needs_the_smaller_loss() -> None:
    # per unit of RMS residual: big 1/1 = 1, small 0.02/0.01 = 2 -> factor 2 (scaled ratio 0.5)
    assert nearly_satisfied(1.0, 1.0, 0.02, 1e-4, within=10.0) == pytest.approx(2.0)
    # the "small" term's loss is not smaller: its small gradient is not explained by its residual
    assert nearly_satisfied(1.0, 1.0, 0.5, 2.0, within=10.0) is None


# ---------------------------------------------------------------------- sweep
def test_grid_weights_include_the_upper_bound_despite_rounding() -> None:
    assert len(grid_weights(0.0, 0.3, 0.1)) == 4
    assert grid_weights(0.0, 0.7, 0.1)[-1] == pytest.approx(10**0.7)


def test_summarize_takes_medians_and_lists_seeds_in_order() -> None:
    results = [
        FitResult(FitSpec("ntk", seed=2), 0.3, {"pde": 1.0, "ic": 10.0}, 1.0),
        FitResult(FitSpec("ntk", seed=0), 0.1, {"pde": 1.0, "ic": 1.0}, 2.0),
        FitResult(FitSpec("ntk", seed=1), 0.2, {"pde": 1.0, "ic": 2.0}, 9.0),
    ]
    (summary,) = summarize(results)
    assert summary.l2_by_seed == [0.1, 0.2, 0.3]
    assert summary.median_l2 == 0.2 and summary.final_ic_over_pde == 2.0 and summary.median_seconds == 2.0


# ------------------------------------------------------------------------ CLI
@pytest.mark.parametrize(
    "argv",
    [["sweep", "--steps", "0"], ["demo", "--every-n-steps", "0"], ["sweep", "--grid-step", "0"], ["sweep", "--grid-step", "-1"]],
)
def test_cli_refuses_zero_steps_cadence_and_grid_step(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)


# ------------------------------------------------------------------ README's table of arguments
_COMMON = {"terms": None, "min_weight": 1e-06, "max_weight": 1e06, "warmup_steps": 0, "loss_module": None}


def _readme_arguments() -> dict[str, dict[str, object]]:
    """Each row of the README's arguments table: callback → {argument: default, or ``inspect._empty`` if required}."""
    import ast
    import inspect

    text = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- arguments-table -->", 1)[1].strip().split("\n\n", 1)[0]
    rows: dict[str, dict[str, object]] = {}
    for line in block.splitlines()[2:]:  # after the header and its rule
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        name = cells[0].strip("`")
        arguments: dict[str, object] = {}
        for item, required in re.findall(r"`([^`]+)`( \(required\))?", " ".join(cells[1:])):
            key, _, default = item.partition("=")
            arguments[key] = inspect.Parameter.empty if required else ast.literal_eval(default)
        rows[name] = arguments
    return rows


def test_the_readme_table_of_arguments_matches_the_signatures() -> None:
    """Every argument and default of every balancer, as the README's table states them (a new user's reference)."""
    import inspect

    rows = _readme_arguments()
    expected = {name for name in callbacks.__all__ if name not in ("GradientNormMonitor", "MonitorDiagnosis", "WeightBalancer")}
    assert set(rows) == expected
    for name, stated in rows.items():
        parameters = inspect.signature(getattr(callbacks, name)).parameters
        actual = {key: parameter.default for key, parameter in parameters.items()}
        if name != "WeightSchedule":
            assert {key: actual.pop(key) for key in _COMMON} == _COMMON, name
        assert actual == stated, (name, actual, stated)


def test_the_readme_table_of_monitor_arguments_matches_the_signature() -> None:
    import ast
    import inspect

    text = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    block = text.split("### `GradientNormMonitor` arguments", 1)[1].strip().split("\n\n", 1)[0]
    stated = {}
    for line in block.splitlines()[2:]:
        name, default = (cell.strip().strip("`") for cell in line.strip("|").split("|")[:2])
        stated[name] = ast.literal_eval(default)
    parameters = inspect.signature(GradientNormMonitor).parameters
    assert stated == {key: parameter.default for key, parameter in parameters.items()}
