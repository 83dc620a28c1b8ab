"""GradNormBalancer and NTKBalancer on real fits: direction, timing, options, state, bad input."""

from __future__ import annotations

import copy
import math
import os
import re
import tempfile
import warnings
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import ExtraTermPoisson, TwoTermPoisson, make_trainer
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tb import load_events, scalar_series

from lightning_pinn.alerts import TermGradientWarning, WeightUpdateWarning
from lightning_pinn.callbacks import GradientNormMonitor, GradNormBalancer, NTKBalancer, WeightSchedule
from lightning_pinn.demo import seed_quietly
from lightning_pinn.engine import TermGradientEngine
from lightning_pinn.problems import HarmonicOscillator
from lightning_pinn.rules import grad_norm_weights


class Recorder(pl.Callback):
    """λ seen by each forward pass, and λ after each batch."""

    def __init__(self) -> None:
        self.at_forward: list[dict[str, float]] = []
        self.after_batch: list[dict[str, float]] = []

    def on_before_backward(self, trainer: pl.Trainer, pl_module: Any, loss: torch.Tensor) -> None:
        self.at_forward.append(pl_module.criterion.weights)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.after_batch.append(pl_module.criterion.weights)


def _quiet_fit(model: pl.LightningModule, steps: int, callbacks: list[Any], **kwargs: Any) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(steps, callbacks, **kwargs).fit(model)
    return list(caught)


# ------------------------------------------------------------------ direction and formulas
def test_gradnorm_first_update_equalises_weighted_norms() -> None:
    model = TwoTermPoisson()
    initial = copy.deepcopy(model)
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False)
    balancer = GradNormBalancer(every_n_steps=1)
    _quiet_fit(model, 1, [monitor, balancer])
    report = monitor.last_report
    assert report is not None
    # step 0's norms decide λ for step 1: λ_i ‖g_i‖ = max_j ‖g_j‖
    expected = grad_norm_weights(report.norms, "max")
    assert list(model.criterion.weights.values()) == pytest.approx(expected, rel=1e-5)
    big, small = sorted(range(2), key=lambda i: report.norms[i], reverse=True)
    names = model.criterion.term_names
    assert model.criterion.weights[names[small]] > model.criterion.weights[names[big]], "smaller gradient, larger weight"
    assert initial.criterion.weights == {"pde": 1.0, "bc": 1.0}


def test_ntk_direction_on_a_fit() -> None:
    """Scale one term's residual by 10: its trace grows 100x, so its weight must be ~100x smaller."""

    class Scaled(TwoTermPoisson):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            u = self.net(self.x)
            return self.criterion(pde=10.0 * u, bc=u)

    model = Scaled()
    balancer = NTKBalancer(every_n_steps=1, momentum=0.0)
    _quiet_fit(model, 1, [balancer])
    weights = model.criterion.weights
    assert weights["bc"] / weights["pde"] == pytest.approx(100.0, rel=1e-4)
    assert balancer.last_traces["pde"] / balancer.last_traces["bc"] == pytest.approx(100.0, rel=1e-4)


def test_smoothing_after_the_first_update() -> None:
    model = TwoTermPoisson()
    balancer = GradNormBalancer(every_n_steps=1, momentum=0.5)
    recorder = Recorder()
    _quiet_fit(model, 3, [balancer, recorder])
    first_target = recorder.after_batch[0]
    assert balancer.num_updates == 3
    # the first update takes the target directly: the 'pde' or 'bc' weight jumps off 1
    assert first_target != {"pde": 1.0, "bc": 1.0}
    # later updates move half way (momentum 0.5) from the current λ to the new target
    names = ("pde", "bc")
    before, after = recorder.after_batch[1], recorder.after_batch[2]
    target = balancer.last_target
    for name in names:
        assert after[name] == pytest.approx(0.5 * before[name] + 0.5 * target[name], rel=1e-5)


def test_smooth_first_update_option() -> None:
    model = TwoTermPoisson()
    balancer = GradNormBalancer(every_n_steps=1, momentum=0.9, smooth_first_update=True)
    recorder = Recorder()
    _quiet_fit(model, 1, [balancer, recorder])
    target = balancer.last_target
    for name in ("pde", "bc"):
        assert recorder.after_batch[0][name] == pytest.approx(0.9 * 1.0 + 0.1 * target[name], rel=1e-5)


def test_a_term_first_present_later_takes_its_first_target_directly() -> None:
    """A data term switched on at step 3: its first update is λ̂, not m·1 + (1 − m)·λ̂."""
    model = ExtraTermPoisson("data", lambda m, batch_idx: None if m.trainer.global_step < 3 else 0.1 * m.net(m.x))
    balancer = GradNormBalancer(every_n_steps=1, momentum=0.5)
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False)
    recorder = Recorder()
    _quiet_fit(model, 5, [monitor, balancer, recorder])
    steps, norms = monitor.history["grad_norm/data"]
    assert steps[0] == 3
    _, pde_norms = monitor.history["grad_norm/pde"]
    _, bc_norms = monitor.history["grad_norm/bc"]
    at3 = steps.index(3)
    target = max(pde_norms[3], bc_norms[3], norms[at3]) / norms[at3]
    assert recorder.after_batch[2]["data"] == 1.0  # absent: kept
    assert recorder.after_batch[3]["data"] == pytest.approx(target, rel=1e-5)  # first update: the target itself
    # the others were already updated: smoothed as usual
    assert recorder.after_batch[3]["bc"] != pytest.approx(max(pde_norms[3], bc_norms[3], norms[at3]) / bc_norms[3], rel=1e-3)


# ------------------------------------------------------------------ when weights change
def test_weights_change_only_after_optimizer_steps_and_apply_from_the_next_step() -> None:
    model = TwoTermPoisson()
    recorder = Recorder()
    _quiet_fit(model, 25, [GradNormBalancer(every_n_steps=10), recorder])
    changes = [step for step in range(1, 25) if recorder.after_batch[step] != recorder.after_batch[step - 1]]
    assert changes == [10, 20], "updates after steps 0, 10, 20 only"
    assert recorder.after_batch[0] != {"pde": 1.0, "bc": 1.0}
    for step in range(1, 25):
        # the forward pass of step s uses what was set after step s-1: never a change mid-step
        assert recorder.at_forward[step] == recorder.after_batch[step - 1]


def test_validation_and_test_loops_never_change_weights() -> None:
    class WithValidation(TwoTermPoisson):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            with torch.enable_grad():
                self.log("val_loss", self.criterion(**self.residuals()), batch_size=1)

        test_step = validation_step

        def val_dataloader(self) -> range:
            return range(3)

        test_dataloader = val_dataloader

    model = WithValidation()
    balancer = GradNormBalancer(every_n_steps=1)
    trainer = make_trainer(6, [balancer], val_check_interval=2, num_sanity_val_steps=2, inference_mode=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    assert balancer.num_updates == 6
    before = model.criterion.weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(model, verbose=False)
        trainer.test(model, verbose=False)
    assert model.criterion.weights == before
    assert balancer.num_updates == 6


def test_a_model_left_in_eval_mode_is_measured_and_balanced() -> None:
    """Lightning keeps the module's train/eval mode: after model.eval() (say, to plot it) a refit
    trains in eval mode, and every callback did nothing, silently (no measurement, no update)."""
    model = TwoTermPoisson()
    model.eval()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    balancer = GradNormBalancer(every_n_steps=2)
    _quiet_fit(model, 4, [monitor, balancer])
    assert not model.criterion.training  # still in eval mode, as Lightning left it
    assert monitor.diagnosis.measurements == 4 and balancer.num_updates == 2


def test_a_validation_run_between_accumulated_micro_batches_is_not_measured() -> None:
    """Validation every batch with 2 batches per optimizer step runs inside a step's capture
    window; a validation_step that evaluates and differentiates the loss with grad enabled must not
    count as one of the step's micro-batches. The module's eval mode no longer tells it apart (see
    the test above): the callbacks pause the engine during validation."""

    class ValidatedWithGrad(TwoTermPoisson):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            with torch.enable_grad():
                residuals = self.residuals()
                loss = self.criterion(pde=10.0 * residuals["pde"], bc=10.0 * residuals["bc"])  # 100x the training losses
                # a backward (e.g. for a validation gradient norm), the step's gradients put back after it
                params = list(self.parameters())
                kept = [None if p.grad is None else p.grad.clone() for p in params]
                loss.backward()
                for p, grad in zip(params, kept):
                    p.grad = grad

        def val_dataloader(self) -> range:
            return range(1)

    model = ValidatedWithGrad()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    trainer = make_trainer(3, [monitor], accumulate_grad_batches=2, val_check_interval=1, num_sanity_val_steps=0, inference_mode=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    measurement = monitor.last_measurement
    assert measurement is not None and measurement.micro_batches == 2
    training = model.criterion.last_losses  # the last call: a validation run (100x), after the step
    assert float(measurement.losses[0]) < float(training["pde"].detach()) / 50


def test_warmup_terms_and_reference() -> None:
    model = ExtraTermPoisson("data", lambda m, _: m.net(m.x[:4]) - 0.3, weight=2.0)
    recorder = Recorder()
    balancer = GradNormBalancer(every_n_steps=1, warmup_steps=3, terms=["bc", "pde"], reference="pde")
    _quiet_fit(model, 5, [balancer, recorder])
    assert all(weights == {"pde": 1.0, "bc": 1.0, "data": 2.0} for weights in recorder.after_batch[:3]), "no update before warm-up"
    assert balancer.num_updates == 2
    final = model.criterion.weights
    assert final["data"] == 2.0, "terms outside `terms` stay fixed"
    assert final["pde"] == pytest.approx(1.0), "the reference term is held at 1"
    assert final["bc"] != 1.0


def test_clamping_is_warned() -> None:
    class Tiny(TwoTermPoisson):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            u = self.net(self.x)
            return self.criterion(pde=u, bc=1e-6 * u)

    model = Tiny()
    caught = _quiet_fit(model, 2, [GradNormBalancer(every_n_steps=1, max_weight=100.0)])
    assert model.criterion.weights["bc"] == pytest.approx(100.0)
    messages = [str(w.message) for w in caught if issubclass(w.category, WeightUpdateWarning)]
    assert len(messages) == 1 and "term 'bc'" in messages[0] and "max_weight=100" in messages[0]


class _CorruptsBc(TwoTermPoisson):
    """Replaces the 'bc' residual r by ``corrupt(r)`` at the steps ``when`` selects."""

    def __init__(self, when: Any, corrupt: Any) -> None:
        super().__init__()
        self.when, self.corrupt = when, corrupt

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        residuals = self.residuals()
        if self.when(self.global_step):
            residuals["bc"] = self.corrupt(residuals["bc"])
        return self.criterion(**residuals)


def test_nonfinite_norms_skip_the_update_and_keep_the_last_good_weights() -> None:
    model = _CorruptsBc(lambda step: step >= 2, lambda r: r * float("nan"))
    balancer = GradNormBalancer(every_n_steps=1)
    recorder = Recorder()
    caught = _quiet_fit(model, 6, [balancer, recorder])
    assert balancer.num_updates == 2 and balancer.skipped_updates == 4
    good = recorder.after_batch[1]
    assert all(math.isfinite(v) for v in good.values())
    assert model.criterion.weights == good, "λ keeps its last good value"
    skipped = [str(w.message) for w in caught if issubclass(w.category, WeightUpdateWarning)]
    assert len(skipped) == 2, "one warning per term that turns NaN: steps 4 and 5 are counted, not warned"
    assert "step 2" in skipped[0] and "of term(s) 'bc' is NaN" in skipped[0]
    # after the NaN step the parameters are NaN too, so every term is named
    assert "step 3" in skipped[1] and "'pde', 'bc'" in skipped[1]


def test_an_infinite_residual_skips_an_ntk_update_although_its_trace_is_finite() -> None:
    """∂(r + inf)/∂θ = ∂r/∂θ, so the traces stay finite for an infinite residual: the update
    must still be skipped (and warned, naming the term), since the step's loss is infinite."""
    model = _CorruptsBc(lambda step: step == 2, lambda r: r + float("inf"))
    balancer = NTKBalancer(every_n_steps=1)
    recorder = Recorder()
    caught = _quiet_fit(model, 3, [balancer, recorder])
    assert balancer.num_updates == 2 and balancer.skipped_updates == 1
    assert model.criterion.weights == recorder.after_batch[1], "λ keeps its last good value"
    skipped = [str(w.message) for w in caught if issubclass(w.category, WeightUpdateWarning)]
    assert len(skipped) == 1 and "step 2" in skipped[0] and "loss of term(s) 'bc' is NaN or infinite" in skipped[0]


@pytest.mark.parametrize(("terms", "expected"), [(None, 1.0), (["bc"], 4.0)])
def test_a_reference_starting_away_from_one_moves_to_one_only_if_the_balancer_owns_it(terms: list[str] | None, expected: float) -> None:
    model = TwoTermPoisson()
    model.criterion.set_weights({"pde": 4.0})
    _quiet_fit(model, 2, [GradNormBalancer(every_n_steps=1, reference="pde", terms=terms)])
    assert model.criterion.weights["pde"] == expected and model.criterion.weights["bc"] != 1.0


def test_a_continued_fit_warns_again_about_a_term_that_turns_nan_again() -> None:
    # "once per term and fit": the same Trainer fitted again (max_steps raised) counted the second
    # fit's skip silently, because the first fit had warned about the term
    class Guarded(_CorruptsBc):
        def on_before_optimizer_step(self, optimizer: Any) -> None:  # the user's NaN guard keeps the parameters finite
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.nan_to_num_(0.0, 0.0, 0.0)

    model = Guarded(lambda step: step in (2, 7), lambda r: r * float("nan"))
    balancer = GradNormBalancer(every_n_steps=1)
    trainer = make_trainer(5, [balancer])

    def fit() -> list[warnings.WarningMessage]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model)
        return list(caught)

    first = fit()
    trainer.fit_loop.epoch_loop.max_steps = 10
    second = fit()
    for caught, step in ((first, 2), (second, 7)):
        messages = [str(w.message) for w in caught if issubclass(w.category, WeightUpdateWarning)]
        assert len(messages) == 1 and f"step {step}" in messages[0] and "'bc'" in messages[0], messages
    assert balancer.skipped_updates == 2


def test_a_weight_schedule_follows_its_knots_through_a_nan_loss_and_says_so_once() -> None:
    # a schedule reads no measurement, so nothing is skipped; but a NaN loss is still named once
    model = _CorruptsBc(lambda step: step >= 2, lambda r: r * float("nan"))
    schedule = WeightSchedule({"bc": [(0, 1.0), (5, 6.0)]})
    caught = _quiet_fit(model, 5, [schedule])
    assert model.criterion.weights["bc"] == pytest.approx(6.0) and schedule.skipped_updates == 0
    messages = [str(w.message) for w in caught if issubclass(w.category, WeightUpdateWarning)]
    assert len(messages) == 2, messages  # 'bc' at step 2, then 'pde' (the parameters are NaN) at step 3
    assert "'bc' is NaN or infinite at step 2" in messages[0] and "schedule goes on" in messages[0]
    assert "'pde' is NaN or infinite at step 3" in messages[1]


def test_ntk_balancer_refuses_zero_dim_terms() -> None:
    class Reduced(TwoTermPoisson):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            residuals = self.residuals()
            return self.criterion(pde=residuals["pde"], bc=residuals["bc"].pow(2).mean())

    with pytest.raises(ValueError, match="term 'bc' was given as a 0-dim"):
        _quiet_fit(Reduced(), 2, [NTKBalancer(every_n_steps=1)])
    with pytest.raises(ValueError, match="term 'bc' was given as a 0-dim"):  # a reference needs its trace
        _quiet_fit(Reduced(), 2, [NTKBalancer(every_n_steps=1, terms=["pde"], reference="bc")])
    # after a warm-up too, the error comes on the first step, not at the first update
    model = Reduced()
    with pytest.raises(ValueError, match="term 'bc' was given as a 0-dim"):
        _quiet_fit(model, 200, [NTKBalancer(every_n_steps=100, warmup_steps=100)])
    assert model.trainer.global_step <= 1


def test_ntk_balancer_leaves_a_zero_dim_term_outside_its_terms_out_of_the_sum() -> None:
    """The error's advice works: a reduced data misfit outside ``terms`` keeps its weight."""

    model = ExtraTermPoisson("data", lambda m, _: torch.nn.functional.mse_loss(m.net(m.x), torch.ones_like(m.x)))  # 0-dim
    balancer = NTKBalancer(every_n_steps=1, terms=["pde", "bc"])
    caught = _quiet_fit(model, 1, [balancer, GradNormBalancer(every_n_steps=1, terms=["data"])])
    assert not [w for w in caught if issubclass(w.category, (WeightUpdateWarning, TermGradientWarning))]
    traces = balancer.last_traces
    assert math.isnan(traces["data"]) and traces["pde"] > 0 and traces["bc"] > 0
    total = traces["pde"] + traces["bc"]
    weights = model.criterion.weights
    assert weights["pde"] == pytest.approx(total / traces["pde"], rel=1e-5)
    assert weights["bc"] == pytest.approx(total / traces["bc"], rel=1e-5)


# ------------------------------------------------------------------ sharing, logging, state
def test_monitor_and_balancer_share_one_gradient_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = TermGradientEngine._backward

    def counting(self: TermGradientEngine, capture: Any, losses: list[Any], *args: Any) -> Any:
        calls.append(len(losses))
        return original(self, capture, losses, *args)

    monkeypatch.setattr(TermGradientEngine, "_backward", counting)
    grad_calls: list[int] = []
    original_grad = torch.autograd.grad

    def counting_grad(*args: Any, **kwargs: Any) -> Any:
        grad_calls.append(1)
        return original_grad(*args, **kwargs)

    model = TwoTermPoisson()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False)
    balancer = GradNormBalancer(every_n_steps=1)
    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    _quiet_fit(model, 3, [monitor, balancer])
    assert calls == [2, 2, 2], "one capture per step, K = 2 per-term gradients"
    per_step_residual_derivatives = 2  # u' and u'' in TwoTermPoisson.residuals
    assert len(grad_calls) == 3 * (2 + per_step_residual_derivatives)
    assert monitor.diagnosis.measurements == 3 and balancer.num_updates == 3


def test_two_balancers_on_the_same_term_are_refused() -> None:
    with pytest.raises(ValueError, match=r"would both change the weight of term\(s\) 'bc'"):
        _quiet_fit(TwoTermPoisson(), 1, [GradNormBalancer(terms=["bc"]), NTKBalancer(terms=["bc", "pde"])])
    # the suggested fix names the callbacks attached and the loss's own terms (a schedule has no terms=)
    with pytest.raises(ValueError, match=r"e\.g\. WeightSchedule\(\{'pde': \[\.\.\.\]\}\).* and GradNormBalancer\(terms=\['bc'\]\)"):
        _quiet_fit(TwoTermPoisson(), 1, [GradNormBalancer(), WeightSchedule({"pde": [(0, 1.0)]})])


def test_two_balancers_on_different_terms_each_keep_their_state() -> None:
    a, b = GradNormBalancer(every_n_steps=1, terms=["bc"]), NTKBalancer(every_n_steps=2, terms=["data"])
    _quiet_fit(ExtraTermPoisson("data", lambda m, _: m.net(m.x[:4]) - 0.3), 4, [a, b])
    assert (a.num_updates, b.num_updates) == (4, 2)
    assert a.state_key != b.state_key


def test_terms_given_as_a_set_make_the_same_state_key_in_every_process() -> None:
    """A set's order follows string hashing, which changes between processes: the key a resumed
    fit looks its state up by must not (Lightning skips a key it cannot find, silently)."""
    import subprocess
    import sys

    script = (
        "from lightning_pinn.callbacks import GradNormBalancer, GradientNormMonitor; "
        "print(GradNormBalancer(terms={'ic', 'bc', 'data', 'pde'}).state_key); "
        "print(GradientNormMonitor(ratio_terms={'ic', 'bc', 'data', 'pde'}).state_key)"
    )
    keys = {
        subprocess.run(
            [sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, check=True
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(keys) == 1, keys
    assert "('bc', 'data', 'ic', 'pde')" in keys.pop()


@pytest.mark.parametrize(
    ("log_every_n_steps", "expected_steps"),
    [
        (1, [0, 1, 11, 21, 31]),  # every update, at the step from which it applies (step 0: initial λ)
        (20, [0, 1, 21, 31]),  # at most one per 20 steps; the fit's last update is always written
        (50, [0, 1, 31]),
    ],
)
def test_weights_are_logged_at_the_trainers_cadence(tmp_path: Any, log_every_n_steps: int, expected_steps: list[int]) -> None:
    model = TwoTermPoisson()
    logger = TensorBoardLogger(str(tmp_path), name="bal", version=0)
    balancer = GradNormBalancer(every_n_steps=10)
    _quiet_fit(model, 31, [balancer], logger=logger, log_every_n_steps=log_every_n_steps)
    assert balancer.num_updates == 4
    events = load_events(tmp_path)
    series = scalar_series(events, "weight/bc")
    assert [step for step, _ in series] == expected_steps
    assert series[-1][1] == pytest.approx(model.criterion.weights["bc"])
    assert [step for step, _ in scalar_series(events, "weight_target/bc")] == expected_steps[1:]


def test_balancer_state_and_weights_survive_a_checkpoint(tmp_path: Any) -> None:
    model = TwoTermPoisson()
    balancer = GradNormBalancer(every_n_steps=2)
    trainer = make_trainer(6, [balancer], enable_checkpointing=True, default_root_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    restored_model = TwoTermPoisson.load_from_checkpoint(path) if False else TwoTermPoisson()
    checkpoint = torch.load(path, weights_only=False)
    restored_model.load_state_dict(checkpoint["state_dict"])
    assert restored_model.criterion.weights == model.criterion.weights
    fresh = GradNormBalancer(every_n_steps=2)
    fresh.load_state_dict(checkpoint["callbacks"][balancer.state_key])
    assert fresh.num_updates == balancer.num_updates == 3
    assert fresh.last_target == balancer.last_target


# ------------------------------------------------------------------ accuracy (a few seconds)
@pytest.mark.parametrize("balancer", [lambda: GradNormBalancer(), lambda: NTKBalancer()], ids=["gradnorm", "ntk"])
def test_balanced_harmonic_fit_beats_unit_weights_by_far(balancer: Any) -> None:
    seed_quietly(0)
    model = HarmonicOscillator(ic_weight=1.0, steps_per_epoch=2000)
    _quiet_fit(model, 2000, [balancer()])
    error = model.relative_l2_error()
    assert error < 1e-2, f"balanced error {error:.2e}; λ_IC = 1 gives ≈ 1"
    assert model.criterion.weights["ic"] / model.criterion.weights["pde"] > 50


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: GradNormBalancer(rule="median"), "rule must be 'max'"),
        (lambda: GradNormBalancer(every_n_steps=0), "every_n_steps"),
        (lambda: GradNormBalancer(momentum=1.0), r"momentum must be in \[0, 1\) \(e.g. 0.9\), got 1.0\.$"),
        (lambda: GradNormBalancer(momentum=-0.1), r"momentum must be in \[0, 1\) \(e.g. 0.9\), got -0.1\.$"),
        (lambda: GradNormBalancer(momentum=float("nan")), "momentum must be a finite number"),
        (lambda: GradNormBalancer(min_weight=0.0), r"min_weight must be > 0 \(e.g. 1e-6\), got 0.0\.$"),
        (lambda: GradNormBalancer(max_weight=-1.0), r"max_weight must be > 0 \(e.g. 1e6\), got -1.0\.$"),
        (lambda: GradNormBalancer(min_weight=10.0, max_weight=1.0), "max_weight"),
        (lambda: GradNormBalancer(warmup_steps=-1), "warmup_steps"),
        (lambda: GradNormBalancer(terms=[]), "terms must be a non-empty list"),
        (lambda: GradNormBalancer(terms="ic"), "terms must be a list of term names"),
        (lambda: GradNormBalancer(terms=True), "terms must be a list of term names"),  # was "'bool' object is not iterable"
        (lambda: GradNormBalancer(reference=""), "reference must be a term name"),  # was a bare tuple.index error at fit start
        (lambda: NTKBalancer(seed=1.5), r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
        (lambda: NTKBalancer(seed=2**64), "seed must be an integer"),  # was "Overflow when unpacking long long"
        (lambda: NTKBalancer(trace_points=0), "trace_points"),
        (lambda: NTKBalancer(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_arguments(factory: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize(
    "factory",
    [
        lambda: GradNormBalancer(smooth_first_update="False"),
        lambda: GradientNormMonitor(report="False"),
        lambda: GradientNormMonitor(verbose="no"),
        lambda: GradientNormMonitor(progress_bar=None),
        lambda: GradientNormMonitor(log_cosines="False"),
    ],
)
def test_switches_refuse_anything_but_true_or_false(factory: Any) -> None:
    """A string such as "False" read as True: smooth_first_update="False" smoothed the first update."""
    with pytest.raises(TypeError, match="must be True or False"):
        factory()


def test_unknown_term_names_fail_at_fit_start() -> None:
    with pytest.raises(ValueError, match=r"terms=\.\.\.\): unknown term 'ic'.*\('pde', 'bc'\)"):
        _quiet_fit(TwoTermPoisson(), 1, [GradNormBalancer(terms=["ic"])])
    with pytest.raises(ValueError, match=r"reference=\.\.\.\): unknown term 'u'"):
        _quiet_fit(TwoTermPoisson(), 1, [NTKBalancer(reference="u")])


# ------------------------------------------------------------------ one writer per weight series
@pytest.mark.parametrize("monitor_every", [1, 10])
def test_monitor_and_balancers_write_each_weight_series_once(tmp_path: Any, monitor_every: int) -> None:
    """With a monitor and two balancers on one loss, each ``weight/<term>`` has one point per
    step, in step order, from its single writer; the end-of-fit report and one rebuilt from the
    event files give the same final weights."""
    from lightning_pinn.report import diagnose, read_history

    model = ExtraTermPoisson("data", lambda m, _: 0.01 * (m.net(m.x) - 1))
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    monitor = GradientNormMonitor(every_n_steps=monitor_every, verbose=False)
    callbacks = [monitor, GradNormBalancer(every_n_steps=3, terms=["bc"]), NTKBalancer(every_n_steps=4, terms=["data"])]
    _quiet_fit(model, 23, callbacks, logger=logger, log_every_n_steps=5)
    events = load_events(tmp_path)
    for term in ("pde", "bc", "data"):
        steps = [step for step, _ in scalar_series(events, f"weight/{term}")]
        assert steps == sorted(set(steps)), (term, steps)
        assert steps[0] == 0
        if f"weight_target/{term}" in events.Tags()["scalars"]:  # also one writer (the term's balancer)
            steps = [step for step, _ in scalar_series(events, f"weight_target/{term}")]
            assert steps == sorted(set(steps)), (term, steps)
    assert scalar_series(events, "weight/bc")[-1][1] == pytest.approx(model.criterion.weights["bc"])
    assert scalar_series(events, "weight/data")[-1][1] == pytest.approx(model.criterion.weights["data"])
    at_fit_end = diagnose(monitor.history).weights
    from_files = diagnose(read_history(tmp_path / "run" / "version_0")).weights
    assert {t: w[1] for t, w in at_fit_end.items()} == pytest.approx({t: w[1] for t, w in from_files.items()})
    assert {t: w[1] for t, w in at_fit_end.items()} == pytest.approx(model.criterion.weights)


def test_an_update_that_changes_nothing_is_not_the_first_update() -> None:
    """With the reference term absent at the first due step there is no target: the next update
    still takes λ̂ directly (it used to be smoothed as if a first update had happened)."""

    class LateReference(TwoTermPoisson):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            residuals = self.residuals()
            return self.criterion(pde=residuals["pde"], bc=None if self.trainer.global_step == 0 else residuals["bc"])

    model = LateReference()
    monitor = GradientNormMonitor(every_n_steps=2, verbose=False)
    balancer = GradNormBalancer(every_n_steps=2, reference="bc")
    _quiet_fit(model, 3, [monitor, balancer])
    assert balancer.num_updates == 1
    report = monitor.last_report
    assert report is not None and report.norms[1] > 0
    assert model.criterion.weights["pde"] == pytest.approx(report.norms[1] / report.norms[0], rel=1e-5)


def test_the_last_update_logs_its_ntk_traces_too(tmp_path: Any) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="ntk", version=0)
    _quiet_fit(TwoTermPoisson(), 6, [NTKBalancer(every_n_steps=1)], logger=logger, log_every_n_steps=4)
    events = load_events(tmp_path)
    targets = [step for step, _ in scalar_series(events, "weight_target/bc")]
    traces = [step for step, _ in scalar_series(events, "ntk_trace/bc")]
    assert targets[-1] == 6 and traces == [step - 1 for step in targets]


def test_a_float64_network_keeps_float64_losses_with_a_float32_weight_buffer() -> None:
    """Only the network is float64 (λ stays a float32 buffer): losses, the total and the
    gradients stay float64, with and without a measurement."""
    model = TwoTermPoisson(bc_weight=3.0)
    model.net.double()
    model.x, model.xb = model.x.double(), model.xb.double()
    assert model.criterion.lambdas.dtype == torch.float32
    residuals = model.residuals()
    exact = residuals["pde"].pow(2).mean() + 3.0 * residuals["bc"].pow(2).mean()
    total = model.criterion(**residuals)
    assert total.dtype == torch.float64 and total.item() == exact.item()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False)
    losses = {name: r.pow(2).mean().item() for name, r in model.residuals().items()}
    make_trainer(1, [monitor]).fit(model)
    assert monitor.last_report is not None
    assert list(monitor.last_report.losses) == [losses["pde"], losses["bc"]]


def test_a_reference_that_is_absent_is_warned_about_once_and_stops_updates() -> None:
    model = ExtraTermPoisson("data", lambda m, batch_idx: None)
    balancer = GradNormBalancer(every_n_steps=1, reference="data")
    caught = _quiet_fit(model, 4, [balancer])
    messages = [str(w.message) for w in caught if issubclass(w.category, WeightUpdateWarning)]
    assert len([m for m in messages if "reference term 'data' is absent" in m]) == 1, messages
    assert balancer.num_updates == 0 and model.criterion.weights == {"pde": 1.0, "bc": 1.0, "data": 1.0}


def test_the_reference_as_the_only_adaptive_term_is_refused() -> None:
    with pytest.raises(ValueError, match=r"reference='ic' is also the only term in terms=\['ic'\].*no weight could ever change"):
        GradNormBalancer(terms=["ic"], reference="ic")


def test_targets_are_logged_only_for_the_terms_the_balancer_changes() -> None:
    balancer = GradNormBalancer(every_n_steps=1, terms=["bc"], reference="pde")
    _quiet_fit(TwoTermPoisson(pde_weight=5.0), 2, [balancer])
    assert set(balancer.last_target) == {"bc"}


def test_numpy_scalars_are_accepted_as_arguments() -> None:
    np = pytest.importorskip("numpy")
    balancer = GradNormBalancer(every_n_steps=np.int64(2), momentum=np.float32(0.5), warmup_steps=np.int32(1), min_weight=np.float64(1e-3))
    assert (balancer.every_n_steps, balancer.warmup_steps) == (2, 1) and type(balancer.every_n_steps) is int
    assert balancer.momentum == 0.5
    ntk = NTKBalancer(trace_points=np.int64(8), seed=np.int64(3))
    assert (ntk.trace_points, ntk.seed) == (8, 3)


@pytest.mark.parametrize(
    ("argument", "value", "stored"),
    [("min_weight", 1e-50, "0"), ("max_weight", 1e39, "inf")],
)
def test_a_clamp_bound_the_float32_weights_cannot_hold_is_refused_at_fit_start(argument: str, value: float, stored: str) -> None:
    balancer = GradNormBalancer(**{argument: value})
    with pytest.raises(
        ValueError, match=re.escape(f"{argument}={value:g} is stored as {stored} by the loss's torch.float32 weight buffer")
    ):
        _quiet_fit(TwoTermPoisson(), 1, [balancer])
    double = TwoTermPoisson()
    double.criterion.double()  # a float64 buffer holds it
    _quiet_fit(double, 1, [GradNormBalancer(**{argument: value})])


def test_a_schedule_weight_the_float32_weights_cannot_hold_is_refused_at_fit_start() -> None:
    from lightning_pinn.callbacks import WeightSchedule

    with pytest.raises(ValueError, match=r"WeightSchedule\(schedule=...\): weight 1e\+39 at step 10 of term 'bc' is stored as inf"):
        _quiet_fit(TwoTermPoisson(), 1, [WeightSchedule({"bc": [(0, 1.0), (10, 1e39)]})])
    with pytest.raises(ValueError, match=r"WeightSchedule\(schedule=...\): unknown term 'ic'"):
        _quiet_fit(TwoTermPoisson(), 1, [WeightSchedule({"ic": [(0, 1.0)]})])


def test_callback_metrics_hold_the_weights_in_force_between_logged_updates() -> None:
    """A balancer logs weight/<term> at most once per log_every_n_steps steps; EarlyStopping or
    ModelCheckpoint watching it read trainer.callback_metrics, which kept the last *logged* λ
    (5.245 while 5.316 → 5.494 were in force, and EarlyStopping stopped a fit at step 30)."""
    seen: dict[int, tuple[float, float]] = {}

    class Watch(pl.Callback):  # after the balancer, as EarlyStopping/ModelCheckpoint run
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            seen[trainer.global_step] = (float(trainer.callback_metrics["weight/bc"]), pl_module.criterion.weights["bc"])

    model = TwoTermPoisson()
    trainer = make_trainer(35, [GradNormBalancer(every_n_steps=10), Watch()], log_every_n_steps=50, logger=CSVLogger(tempfile.mkdtemp()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    for step in (11, 21, 31):  # after the updates at steps 10, 20, 30, none of them logged
        watched, in_force = seen[step]
        assert watched == pytest.approx(in_force), step


def test_an_interrupted_fit_logs_the_last_weight_update(tmp_path: Any) -> None:
    """After an exception (Ctrl-C) the event files ended at the last *logged* update, so
    `lightning-pinn report` showed a stale final λ."""

    class Interrupt(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
            if trainer.global_step == 25:
                raise RuntimeError("stop")

    model = TwoTermPoisson()
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="stop"):
        warnings.simplefilter("ignore")
        make_trainer(100, [GradNormBalancer(every_n_steps=10), Interrupt()], logger=logger, log_every_n_steps=50).fit(model)
    logger.experiment.flush()
    series = scalar_series(load_events(tmp_path), "weight/bc")
    assert series[-1] == (21, pytest.approx(model.criterion.weights["bc"]))  # the update at step 20, in force from 21


def test_callback_metrics_hold_each_updates_ntk_traces_between_logged_points() -> None:
    # ntk_trace/<term> reached callback_metrics only when an update was logged (every 50 steps
    # here), so a ModelCheckpoint watching it saw one value all fit
    seen: list[tuple[float, float]] = []

    class Peek(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if "ntk_trace/pde" in trainer.callback_metrics:
                seen.append((float(trainer.callback_metrics["ntk_trace/pde"]), balancer.last_traces["pde"]))

    balancer = NTKBalancer(every_n_steps=2, terms=["bc"])  # traces of every term, also those it does not change
    _quiet_fit(TwoTermPoisson(), 12, [balancer, Peek()])
    assert len(seen) >= 10 and len({published for published, _ in seen}) >= 5
    assert all(published == pytest.approx(latest) for published, latest in seen)
