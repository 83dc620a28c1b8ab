"""GradientNormMonitor on real fits: the alarm, the logged tags, the dashboard, bad input."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import ExtraTermPoisson, TwoLossPoisson, TwoTermPoisson, flat_gradient, make_trainer
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tb import custom_scalars_layout, load_events, scalar_series, texts

from lightning_pinn import MultiTermLoss
from lightning_pinn.alerts import GradientConflictWarning, LossBalanceWarning, TermGradientWarning
from lightning_pinn.callbacks import GradientNormMonitor, GradNormBalancer, SoftAdaptBalancer, WeightSchedule
from lightning_pinn.diagnostics import gradient_norms, summarize_gradients
from lightning_pinn.problems import HarmonicOscillator
from lightning_pinn.report import diagnose, render_markdown
from lightning_pinn.tensorboard import LAYOUT_CATEGORY


def _fit_harmonic(
    ic_weight: float, steps: int, **monitor_kwargs: Any
) -> tuple[HarmonicOscillator, GradientNormMonitor, list[warnings.WarningMessage]]:
    torch.manual_seed(0)
    model = HarmonicOscillator(ic_weight=ic_weight, steps_per_epoch=steps)
    monitor = GradientNormMonitor(verbose=False, **monitor_kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(steps, [monitor]).fit(model)
    return model, monitor, list(caught)


def _of(caught: list[warnings.WarningMessage], category: type[Warning]) -> list[str]:
    """Messages of warnings of exactly this category (a conflict alarm is not a ratio alarm)."""
    return [str(w.message) for w in caught if w.category is category]


def test_harmonic_crisis_alarms_and_good_weight_does_not() -> None:
    bad, bad_monitor, bad_warnings = _fit_harmonic(1.0, 2000)
    good, good_monitor, good_warnings = _fit_harmonic(100.0, 2000)

    ratio_alarms = _of(bad_warnings, LossBalanceWarning)
    assert len(ratio_alarms) == 1, "the alarm fires once when it starts, not on every step"
    message = ratio_alarms[0]
    assert "'pde'" in message and "'ic'" in message and "step 0" in message and "threshold of 100x" in message
    assert bad_monitor.diagnosis.worst_ratio is not None and bad_monitor.diagnosis.worst_ratio > 100
    assert bad_monitor.diagnosis.worst_pair == ("pde", "ic")
    assert bad.relative_l2_error() > 0.9

    # no ratio alarm; the transient conflict alarm of this fit (a stall at steps 200-1000) is a
    # separate category, so filtering or catching LossBalanceWarning means the ratio alarm only
    assert [w for w in good_warnings if issubclass(w.category, LossBalanceWarning)] == []
    assert good_monitor.diagnosis.ratio_alarm_episodes == 0
    assert good_monitor.diagnosis.worst_ratio is not None and good_monitor.diagnosis.worst_ratio < 100
    assert good.relative_l2_error() < 1e-2

    # λ_IC = 1 then stalls with balanced norms and opposed gradients: the conflict alarm catches it
    assert _of(bad_warnings, GradientConflictWarning), "the stalled λ_IC = 1 run must raise the conflict alarm"


class _OwnDashboard(HarmonicOscillator):
    """A module that writes its own custom-scalars layout in setup(), before the monitor's."""

    def setup(self, stage: str) -> None:
        self.logger.experiment.add_custom_scalars(
            {
                "mine": {
                    "my chart": ["Multiline", ["my_tag", "my_other_tag"]],
                    "my band": ["Margin", ["mean", "low", "high"]],
                }
            }
        )


def test_the_monitors_layout_keeps_a_layout_the_user_wrote_before_it(tmp_path: Any) -> None:
    """TensorBoard shows only a run's last layout: the monitor's must repeat the user's categories
    (it replaced them before), also when the same logger is fitted again."""
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    for _ in range(2):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_trainer(3, [GradientNormMonitor(every_n_steps=1, verbose=False, report=False)], logger=logger).fit(
                _OwnDashboard(steps_per_epoch=3)
            )
        layout = custom_scalars_layout(load_events(tmp_path))
        categories = {category.title: category for category in layout.category}
        assert set(categories) == {"mine", LAYOUT_CATEGORY}
        charts = {chart.title: chart for chart in categories["mine"].chart}
        assert list(charts["my chart"].multiline.tag) == ["my_tag", "my_other_tag"]
        [band] = charts["my band"].margin.series
        assert (band.value, band.lower, band.upper) == ("mean", "low", "high")


class _DashboardAtFitStart(HarmonicOscillator):
    """Writes its layout in on_fit_start, which Lightning calls after the callbacks' on_fit_start."""

    def on_fit_start(self) -> None:
        self.logger.experiment.add_custom_scalars({"lightning-pinn extras": {"mine": ["Multiline", ["my_tag"]]}})


def test_a_layout_written_at_the_modules_fit_start_keeps_the_dashboard_and_its_own_charts(tmp_path: Any) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(3, [GradientNormMonitor(every_n_steps=1, verbose=False, report=False)], logger=logger).fit(
            _DashboardAtFitStart(steps_per_epoch=3)
        )
    titles = [category.title for category in custom_scalars_layout(load_events(tmp_path)).category]
    assert sorted(titles) == [LAYOUT_CATEGORY, "lightning-pinn extras"], "a user's title that merely starts like ours is theirs"


def test_a_layout_from_another_writer_that_hides_the_dashboard_is_warned_about(tmp_path: Any) -> None:
    """TensorBoard reads the folder's event files by name: a second SummaryWriter's file comes
    after the logger's, and its layout is the one shown. The monitor cannot fix that: it says so."""
    from torch.utils.tensorboard import SummaryWriter

    class OwnWriter(HarmonicOscillator):
        def setup(self, stage: str) -> None:
            writer = SummaryWriter(self.logger.log_dir)
            writer.add_custom_scalars({"mine": {"c": ["Multiline", ["x"]]}})
            writer.close()

    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(2, [GradientNormMonitor(every_n_steps=1, verbose=False, report=False)], logger=logger).fit(
            OwnWriter(steps_per_epoch=2)
        )
    hidden = [str(w.message) for w in caught if "is read by TensorBoard after lightning-pinn's" in str(w.message)]
    assert len(hidden) == 1 and "logger.experiment.add_custom_scalars" in hidden[0]


def test_the_layout_is_read_back_past_long_records_and_chunk_boundaries(tmp_path: Any) -> None:
    """Records longer than a layout can be (an image, a long text) are skipped unread, and a
    layout after more than a read chunk of events is still found, whole."""
    from torch.utils.tensorboard import SummaryWriter

    from lightning_pinn.tensorboard import layout_written_by_others

    writer = SummaryWriter(str(tmp_path))
    writer.add_text("long", "x" * (3 << 20))  # one 3 MiB record
    for step in range(40000):  # ≈ 2 MiB of small records
        writer.add_scalar("a", float(step), step)
    writer.add_custom_scalars({"mine": {"c": ["Multiline", ["a"]]}})
    writer.add_scalar("a", 0.0, 40000)
    assert layout_written_by_others(writer) == {"mine": {"c": ["Multiline", ["a"]]}}
    writer.add_custom_scalars({"later": {"d": ["Multiline", ["b"]]}})  # read incrementally on the next call
    assert layout_written_by_others(writer) == {"later": {"d": ["Multiline", ["b"]]}}
    writer.close()


def test_tags_layout_and_alarm_text_in_tensorboard(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = HarmonicOscillator(ic_weight=1.0, steps_per_epoch=60)
    monitor = GradientNormMonitor(every_n_steps=10, verbose=False)
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(60, [monitor], logger=logger, log_every_n_steps=50).fit(model)
    events = load_events(tmp_path)
    tags = set(events.Tags()["scalars"])
    expected = {
        "grad_norm/pde",
        "grad_norm/ic",
        "grad_norm_weighted/pde",
        "grad_norm_weighted/ic",
        "grad_ratio",
        "grad_ratio_threshold",
        "grad_cosine/pde_vs_ic",
        "loss/pde",
        "loss/ic",
        "weight/pde",
        "weight/ic",
        "alarm/grad_ratio",
        "alarm/grad_conflict",
    }
    assert expected <= tags, expected - tags
    assert scalar_series(events, "grad_ratio_recovery_threshold") == [(0, 50.0)]  # once per fit, for the reports
    # one measurement every 10 steps, from step 0, whatever log_every_n_steps says
    assert [step for step, _ in scalar_series(events, "grad_norm/pde")] == [0, 10, 20, 30, 40, 50]
    ratio = dict(scalar_series(events, "grad_ratio"))
    assert ratio[0] > 100 and dict(scalar_series(events, "alarm/grad_ratio"))[0] == 1.0
    assert dict(scalar_series(events, "weight/ic"))[0] == 1.0

    layout = custom_scalars_layout(events)
    categories = {category.title: category for category in layout.category}
    assert LAYOUT_CATEGORY in categories
    charts = {chart.title: list(chart.multiline.tag) for chart in categories[LAYOUT_CATEGORY].chart}
    regexes = [regex for chart in charts.values() for regex in chart]
    for tag in [
        "grad_norm/pde",
        "loss/ic",
        "weight/pde",
        "grad_ratio",
        "grad_ratio_threshold",
        "grad_cosine/pde_vs_ic",
        "alarm/grad_ratio",
    ]:
        import re

        assert any(re.search(regex, tag) for regex in regexes), tag
    for own_tag in ("loss/total", "weight/decay", "loss/pde_step"):  # a module's own self.log tags
        assert not any(re.search(regex, own_tag) for regex in regexes), own_tag
    ratio_chart = next(tags for title, tags in charts.items() if "ratio" in title)
    assert r"^grad_ratio$" in ratio_chart and r"^grad_ratio_threshold$" in ratio_chart

    alarm_texts = texts(events, "alarms")
    assert alarm_texts and alarm_texts[0][0] == 0 and "loss-balance alarm" in alarm_texts[0][1]
    assert texts(events, "diagnosis"), "the end-of-fit diagnosis is written as a text entry"


def test_every_step_measurements_reach_tensorboard_in_batches(tmp_path: Any) -> None:
    """Every measurement is in the event file at its own step and wall time, though TensorBoard
    gets them in batches when Lightning logs (every log_every_n_steps steps) and at the end."""
    model = TwoTermPoisson()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    waiting: list[int] = []

    class Spy(pl.Callback):  # runs after the monitor: how many events wait after each step
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            waiting.append(len(monitor._pending))

    make_trainer(25, [monitor, Spy()], logger=logger, log_every_n_steps=10).fit(model)
    assert waiting[:10] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0] and waiting[10:20] == waiting[:10]
    events = load_events(tmp_path)
    series = events.Scalars("grad_norm/pde")
    assert [event.step for event in series] == list(range(25))
    assert [value for _, value in scalar_series(events, "loss/bc")] == monitor.history["loss/bc"][1]
    wall_times = [event.wall_time for event in series]
    assert wall_times == sorted(wall_times) and len(set(wall_times)) > 1, "each event keeps the time it was measured"


def test_measurements_no_more_frequent_than_lightnings_logging_are_written_at_once(tmp_path: Any) -> None:
    monitor = GradientNormMonitor(every_n_steps=10, verbose=False, report=False)
    waiting: list[int] = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            waiting.append(len(monitor._pending))

    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    make_trainer(25, [monitor, Spy()], logger=logger, log_every_n_steps=10).fit(TwoTermPoisson())
    assert monitor.diagnosis.measurements == 3 and waiting == [0] * 25


def test_tensorboard_gets_everything_when_lightning_never_logs_steps(tmp_path: Any) -> None:
    monitor = GradientNormMonitor(every_n_steps=2, verbose=False, report=False)
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    make_trainer(9, [monitor], logger=logger, log_every_n_steps=0).fit(TwoTermPoisson())
    assert [step for step, _ in scalar_series(load_events(tmp_path), "grad_ratio")] == [0, 2, 4, 6, 8]


def test_measurements_before_a_failure_reach_tensorboard(tmp_path: Any) -> None:
    class FailsAtStep7(TwoTermPoisson):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.global_step == 7:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    monitor = GradientNormMonitor(every_n_steps=1, verbose=False)
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(20, [monitor], logger=logger, log_every_n_steps=50).fit(FailsAtStep7())
    logger.experiment.flush()
    assert [step for step, _ in scalar_series(load_events(tmp_path), "grad_norm/pde")] == list(range(7))


def test_progress_bar_and_callback_metrics_show_every_measurement_without_self_log() -> None:
    """With the bar on, ``callback_metrics["grad_ratio"]`` used to stay at the last progress-bar
    refresh (Lightning merges a ``self.log(prog_bar=True)`` value back over it on every read), so
    ``EarlyStopping(monitor="grad_ratio")`` acted on a stale ratio."""
    calls: list[int] = []
    seen: list[tuple[float, float, float]] = []

    class Counting(TwoTermPoisson):
        def log(self, name: str, *args: Any, **kwargs: Any) -> None:
            calls.append(self.global_step)
            super().log(name, *args, **kwargs)

    class Peek(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
            measured = monitor.last_report.ratio
            bar = trainer.progress_bar_callback.get_metrics(trainer, pl_module)["grad_ratio"]
            seen.append((measured, float(trainer.callback_metrics["grad_ratio"]), float(bar)))

    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    trainer = make_trainer(12, [monitor, Peek()], enable_progress_bar=True, log_every_n_steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Counting())
    assert not calls, "pl_module.log costs about 0.5 ms a call with the bar on: the monitor does not use it"
    assert len(seen) == 12 and len({measured for measured, _, _ in seen}) > 1
    for measured, in_callback_metrics, in_bar in seen:
        assert in_callback_metrics == pytest.approx(measured) and in_bar == pytest.approx(measured, rel=1e-3)


def test_existing_lightning_module_with_csv_logger(tmp_path: Any) -> None:
    model = TwoTermPoisson()
    monitor = GradientNormMonitor(every_n_steps=5, verbose=False)
    logger = CSVLogger(str(tmp_path), name="csv")
    make_trainer(20, [monitor], logger=logger).fit(model)
    logger.save()
    import csv

    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    steps = sorted({int(row["step"]) for row in rows if row.get("grad_norm/pde")})
    assert steps == [0, 5, 10, 15]
    assert monitor.diagnosis.measurements == 4


def test_alarm_text_knows_a_balancer_is_attached() -> None:
    from lightning_pinn.callbacks import GradNormBalancer

    _, monitor, caught = _fit_harmonic(1.0, 60, every_n_steps=10, conflict_min_decrease=None)
    alone = _of(caught, LossBalanceWarning)[0]
    assert "add GradNormBalancer / NTKBalancer" in alone

    # a balancer held back by max_weight: the imbalance outlasts its first update (step 0, in
    # force from step 1), so the alarm comes at the next measurement and says it is attached
    torch.manual_seed(0)
    model = HarmonicOscillator(ic_weight=1.0, steps_per_epoch=60)
    monitor = GradientNormMonitor(every_n_steps=10, verbose=False, report=False)
    with warnings.catch_warnings(record=True) as balanced:
        warnings.simplefilter("always")
        make_trainer(60, [monitor, GradNormBalancer(every_n_steps=10, max_weight=2.0)]).fit(model)
    message = _of(list(balanced), LossBalanceWarning)[0]
    assert "step 10" in message and "GradNormBalancer (1 update so far) is attached to this loss" in message
    assert "GradNormBalancer (6 updates so far) was attached" in monitor.summary()


@pytest.mark.parametrize("balancer_first", [False, True])
def test_with_a_balancer_the_ratio_alarm_waits_for_its_first_update(balancer_first: bool) -> None:
    """The README advises warnings.simplefilter("error", LossBalanceWarning) in test suites, and
    GradientNormMonitor() + GradNormBalancer() on the harmonic IVP then failed at once: the alarm
    fired at step 0 (ratio ≈ 500), measured with the initial λ the balancer's first update was
    about to replace. Now the alarm waits until that update is in force (whatever the callback
    order); the worst ratio is still recorded."""
    from lightning_pinn.callbacks import GradNormBalancer

    torch.manual_seed(0)
    model = HarmonicOscillator(ic_weight=1.0, steps_per_epoch=100)
    monitor = GradientNormMonitor(every_n_steps=10, verbose=False, report=False)
    balancer = GradNormBalancer()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossBalanceWarning)
        make_trainer(100, [balancer, monitor] if balancer_first else [monitor, balancer]).fit(model)
    assert monitor.diagnosis.worst_ratio_step == 0 and monitor.diagnosis.worst_ratio > 100
    assert monitor.diagnosis.ratio_alarm_episodes == 0


def test_ratio_alarm_comes_back_after_recovery() -> None:
    from pytorch_lightning import Callback

    model = TwoTermPoisson(bc_weight=1.0)
    monitor = GradientNormMonitor(every_n_steps=1, threshold=1e3, verbose=False)
    # λ_bc far too large on steps 1, 4 and 5: the alarm starts at 1, recovers at 2, starts again at 4
    weights = iter([1.0, 1e6, 1.0, 1.0, 1e6, 1e6, 1.0])

    class SetWeight(Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            pl_module.criterion.set_weights({"bc": next(weights)})

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(7, [SetWeight(), monitor]).fit(model)
    alarms = _of(list(caught), LossBalanceWarning)
    assert len(alarms) == 2
    assert "at step 1:" in alarms[0] and "at step 4:" in alarms[1]
    assert "'bc'" in alarms[0] and "'pde'" in alarms[0]
    assert monitor.diagnosis.ratio_alarm_episodes == 2 and monitor.diagnosis.ratio_alarm_measurements == 3


class _FrozenPoisson(TwoTermPoisson):
    """lr = 0: the per-term norms stay those of step 0, so λ_bc sets the ratio exactly."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit_with_ratios(ratios: list[float], **monitor_kwargs: Any) -> tuple[GradientNormMonitor, list[str]]:
    """A fit whose weighted ratio λ_bc‖g_bc‖/‖g_pde‖ is ``ratios[step]`` at each step."""
    from pytorch_lightning import Callback

    torch.manual_seed(0)
    model = _FrozenPoisson()
    params = list(model.parameters())
    residuals = model.residuals()
    norms = {name: flat_gradient(r.square().mean(), params).norm().item() for name, r in residuals.items()}
    weights = iter([ratio * norms["pde"] / norms["bc"] for ratio in ratios])

    class SetWeight(Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            pl_module.criterion.set_weights({"bc": next(weights)})

    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False, **monitor_kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(len(ratios), [SetWeight(), monitor]).fit(model)
    return monitor, _of(list(caught), LossBalanceWarning)


def test_a_ratio_wavering_at_the_threshold_is_one_alarm_until_it_recovers(caplog: pytest.LogCaptureFixture) -> None:
    # 150x and 70x in turn crossed the threshold of 100 every other step: three alarms (and three
    # warnings) for one problem. The alarm now ends at recovery_threshold (default 50).
    ratios = [10.0, 150.0, 70.0, 150.0, 70.0, 30.0, 150.0, 10.0]
    with caplog.at_level(logging.INFO):
        monitor, alarms = _fit_with_ratios(ratios, print_every_n_steps=1)
    rows = {int(m.split(":")[0][5:]): m for m in (r.getMessage() for r in caplog.records) if m.startswith("step ")}
    assert "<-- ALARM (on until 50x or below)" in rows[2] and "ALARM" not in rows[5]  # the console table agrees
    assert monitor.recovery_threshold == 50.0
    d = monitor.diagnosis
    assert [round(r) for r in monitor.history["grad_ratio"][1]] == [round(r) for r in ratios]
    assert len(alarms) == 2 and "at step 1:" in alarms[0] and "at step 6:" in alarms[1]
    assert d.ratio_alarm_spans == [[1, 5], [6, 7]] and d.ratio_alarm_episodes == 2
    assert d.ratio_alarm_measurements == 3  # only the measurements above the threshold count
    assert monitor.history["alarm/grad_ratio"][1] == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    text = render_markdown(diagnose(monitor.history))  # the report says why 70x did not end an episode
    assert "threshold 100x (an alarm ends when the ratio falls to 50x or below)" in text
    assert "2 episode(s): steps 1–5" in text
    # the threshold itself: no hysteresis, an alarm per crossing
    monitor, alarms = _fit_with_ratios(ratios, recovery_threshold=100.0)
    assert len(alarms) == 3 and monitor.diagnosis.ratio_alarm_spans == [[1, 2], [3, 4], [6, 7]]


def test_default_recovery_threshold_stays_above_one_for_small_thresholds() -> None:
    assert GradientNormMonitor(threshold=1e3).recovery_threshold == 500.0
    assert GradientNormMonitor(threshold=2.0).recovery_threshold == pytest.approx(math.sqrt(2.0))


@pytest.mark.parametrize("value", [1.0, 0.5, 200.0, True, float("nan"), "50"])
def test_recovery_threshold_outside_one_to_threshold_is_an_error(value: Any) -> None:
    with pytest.raises(ValueError, match=r"recovery_threshold must be a number in \(1, threshold\] = \(1, 100\]"):
        GradientNormMonitor(recovery_threshold=value)


def test_zero_gradient_term_is_reported_not_nan() -> None:
    class WithConstantTerm(TwoTermPoisson):
        def __init__(self) -> None:
            super().__init__()
            self.criterion = MultiTermLoss(pde=1.0, bc=1.0, const=1.0)
            self.offset = torch.zeros(3, requires_grad=True)  # requires grad but is not a parameter

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.criterion(**self.residuals(), const=self.offset + 1.0)

    model = WithConstantTerm()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(3, [monitor]).fit(model)
    messages = [str(w.message) for w in caught if issubclass(w.category, TermGradientWarning)]
    assert len(messages) == 1 and "term 'const' has an exactly zero gradient" in messages[0]
    report = monitor.last_report
    assert report is not None and report.zero_terms == ("const",)
    assert report.ratio is not None and report.ratio == report.ratio  # finite, not NaN
    assert report.smallest != "const"
    assert ("pde", "const") not in report.cosines


class Opposed(TwoTermPoisson):
    """Two terms whose gradients point exactly against each other (u → 1 and u → −1)."""

    def __init__(self) -> None:
        super().__init__()
        self.criterion = MultiTermLoss(up=1.0, down=1.0)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        u = self.net(self.x)
        return self.criterion(up=u - 1.0, down=u + 1.0)


def test_a_conflict_alarm_ends_when_a_term_of_the_pair_has_no_gradient_left() -> None:
    """No cosine is taken for a zero gradient, so an alarm on such a pair stayed on to the end."""

    class OpposedThenFrozen(Opposed):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            u = self.net(self.x)
            down = u + 1.0 if self.global_step < 40 else 0.0 * u  # an exactly zero gradient from step 40
            return self.criterion(up=u - 1.0, down=down)

    monitor = GradientNormMonitor(every_n_steps=5, cosine_patience=3, verbose=False, report=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(60, [monitor]).fit(OpposedThenFrozen())
    steps, flags = monitor.history["alarm/grad_conflict/up_vs_down"]
    assert flags == [1.0, 0.0] and steps[0] < 40 and steps[1] == 40, (steps, flags)
    assert [span[3] for span in monitor.diagnosis.conflict_alarm_spans] == [40]
    assert monitor.history["alarm/grad_conflict"][1][-1] == 0.0


def test_conflict_alarm_on_directly_opposed_terms() -> None:
    monitor = GradientNormMonitor(every_n_steps=5, cosine_threshold=-0.5, cosine_patience=3, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(100, [monitor]).fit(Opposed())
    conflicts = [str(w.message) for w in caught if issubclass(w.category, GradientConflictWarning)]
    assert len(conflicts) == 1 and "'up' and 'down'" in conflicts[0]
    # the loss change is over the window of cosine_patience measurements, first to last
    assert "% across the last 3 measurements)" in conflicts[0], conflicts[0]
    assert monitor.diagnosis.conflict_alarm_episodes == 1
    assert monitor.diagnosis.min_cosine is not None and monitor.diagnosis.min_cosine < -0.99
    # the pair's alarm is logged when it starts, so the reports name the pair that alarmed
    steps, flags = monitor.history["alarm/grad_conflict/up_vs_down"]
    assert flags[0] == 1.0 and steps[0] == monitor.diagnosis.conflict_alarm_spans[0][2]


def test_the_report_names_the_pairs_that_alarmed_not_the_most_opposed_one() -> None:
    """a/b alarmed (stalled); a/c is more opposed but its loss was still falling, so it never alarmed."""
    from lightning_pinn.report import History, diagnose, render_markdown

    history = History()
    for step in range(10):
        history.add(
            {
                "grad_norm/a": 1.0,
                "grad_norm/b": 1.0,
                "grad_norm/c": 1.0,
                "grad_cosine/a_vs_b": -0.8,
                "grad_cosine/a_vs_c": -0.95,
                "grad_cosine/b_vs_c": 0.1,
                "alarm/grad_conflict": float(4 <= step < 8),
            },
            step,
        )
    history.add({"alarm/grad_conflict/a_vs_b": 1.0}, 4)
    history.add({"alarm/grad_conflict/a_vs_b": 0.0}, 8)
    diagnosis = diagnose(history)
    assert diagnosis.conflict_spans == [("a", "b", 4, 8, pytest.approx(-0.8))]
    assert "'a' vs 'b': opposed gradients (mean cosine -0.80), conflict alarm on, steps 4–8" in render_markdown(diagnosis)


def test_the_report_counts_rather_than_lists_hundreds_of_episodes() -> None:
    """A ratio hovering at the threshold, measured every step, starts an episode every other step
    (a long-run probe saw 665 in one bullet): the report lists the first ones and counts the rest."""
    from lightning_pinn.report import History, diagnose, render_markdown

    history = History()
    for step in range(200):
        above = step % 2 == 0
        history.add(
            {
                "grad_norm_weighted/a": 1.0,
                "grad_norm_weighted/b": 1 / 101 if above else 1 / 99,
                "grad_norm/a": 1.0,
                "grad_norm/b": 1 / 101 if above else 1 / 99,
                "grad_ratio": 101.0 if above else 99.0,
                "grad_ratio_threshold": 100.0,
                "alarm/grad_ratio": float(above),
                "weight/a": 1.0,
                "weight/b": 1.0,
            },
            step,
        )
    diagnosis = diagnose(history)
    assert len(diagnosis.ratio_spans) == 100
    text = render_markdown(diagnosis)
    line = next(line for line in text.splitlines() if line.startswith("- Above the threshold in 100 episode(s)"))
    assert line.count("step") < 20 and "88 more episodes" in line and "(100 of 200 measurements)" in line, line
    assert "steps 198–199" in line, "the last episode (here: ongoing or not) is always listed"


def test_the_report_names_each_ratio_episodes_own_pair_and_suggests_a_hard_constraint() -> None:
    """'b' is drowned in steps 0-10 and 'c' from step 20: each episode names its own pair (the
    report named only the worst one, so 'b' was never mentioned), and the advice for the drowned
    term mentions the hard constraints too, not only after a conflict alarm."""
    from lightning_pinn.report import History, diagnose, render_markdown

    history = History()
    for step in range(0, 40, 5):
        b = 1e-3 if step < 10 else 1.0
        c = 1e-5 if step >= 20 else 1.0
        history.add(
            {
                "grad_norm_weighted/a": 1.0,
                "grad_norm_weighted/b": b,
                "grad_norm_weighted/c": c,
                "grad_norm/a": 1.0,
                "grad_norm/b": 1.0,
                "grad_norm/c": 1.0,
                "grad_ratio": 1.0 / min(b, c),
                "grad_ratio_threshold": 100.0,
                "alarm/grad_ratio": float(step < 10 or step >= 20),
                "weight/a": 1.0,
                "weight/b": 1.0,
                "weight/c": 1.0,
            },
            step,
        )
    diagnosis = diagnose(history)
    assert diagnosis.ratio_spans == [(0, 10), (20, None)]
    assert diagnosis.ratio_span_pairs == [("a", "b", pytest.approx(1e3)), ("a", "c", pytest.approx(1e5))]
    text = render_markdown(diagnosis)
    assert "steps 0–10 ('a' over 'b', up to 1e+03x), steps 20–end ('a' over 'c', up to 1e+05x)" in text
    assert "hard constraint" in " ".join(diagnosis.advice) and "If 'c' is an initial or boundary condition" in text


def test_summary_is_printed_at_fit_end(caplog: Any) -> None:
    import logging

    monitor = GradientNormMonitor(every_n_steps=2)
    with caplog.at_level(logging.INFO):
        make_trainer(6, [monitor]).fit(TwoTermPoisson())
    assert "GradientNormMonitor diagnosis: 3 measurement(s)" in caplog.text
    assert "worst gradient-norm ratio" in caplog.text


# ------------------------------------------------------------------------- bad input
class _NoLoss(TwoTermPoisson):
    def __init__(self) -> None:
        super().__init__()
        del self.criterion
        self.ran = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.ran = True
        return self.net(self.x).pow(2).mean()


def test_module_without_multi_term_loss_fails_before_training() -> None:
    model = _NoLoss()
    with pytest.raises(ValueError, match=r"_NoLoss has no MultiTermLoss.*self.criterion = MultiTermLoss"):
        make_trainer(2, [GradientNormMonitor()]).fit(model)
    assert not model.ran
    model.losses = [MultiTermLoss(pde=1.0)]  # a plain list does not register it
    with pytest.raises(ValueError, match=r"GradNormBalancer has no loss terms to work on.*plain list.*nn\.ModuleList"):
        make_trainer(2, [GradNormBalancer()]).fit(model)


def test_several_losses_need_a_name() -> None:
    model = TwoTermPoisson()
    model.other = MultiTermLoss(data=1.0)
    with pytest.raises(ValueError, match=r"several MultiTermLoss modules \('criterion', 'other'\).*loss_module='criterion'"):
        make_trainer(2, [GradientNormMonitor()]).fit(model)
    monitor = GradientNormMonitor(every_n_steps=1, loss_module="criterion", verbose=False)
    make_trainer(2, [monitor]).fit(model)
    assert monitor.diagnosis.measurements == 2


def test_two_losses_with_a_monitor_each_keep_their_series_and_reports_apart(tmp_path: Any) -> None:
    """Each loss's tags, alarms and report carry its path, so two monitors never share a series."""

    class TwoLosses(TwoTermPoisson):
        def __init__(self) -> None:
            super().__init__()
            self.second = MultiTermLoss(pde=1.0, bc=1e-3)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            residuals = self.residuals()
            return self.criterion(**residuals) + self.second(**residuals)

    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    monitors = [GradientNormMonitor(every_n_steps=2, loss_module=name, verbose=False) for name in ("criterion", "second")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(6, monitors, logger=logger).fit(TwoLosses())
    assert [m.summary().split(":", 1)[0] for m in monitors] == [
        "GradientNormMonitor[criterion] diagnosis",
        "GradientNormMonitor[second] diagnosis",
    ]
    alarms = [str(w.message) for w in caught if issubclass(w.category, LossBalanceWarning)]
    assert alarms and all(message.startswith("GradientNormMonitor[second]: loss-balance alarm") for message in alarms)
    events = load_events(tmp_path)
    scalars = set(events.Tags()["scalars"])
    for name in ("criterion", "second"):
        assert {f"{name}/grad_norm/pde", f"{name}/grad_ratio", f"{name}/weight/bc"} <= scalars
        assert [step for step, _ in scalar_series(events, f"{name}/grad_ratio")] == [0, 2, 4]
    assert "grad_ratio" not in scalars
    assert scalar_series(events, "second/weight/bc")[0][1] == pytest.approx(1e-3)
    # the progress bar too: one entry per loss (both wrote an unlabelled grad_ratio before)
    bar = make_trainer(
        2,
        [GradientNormMonitor(every_n_steps=1, loss_module=n, verbose=False, report=False) for n in ("criterion", "second")],
        enable_progress_bar=True,
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bar.fit(TwoLosses())
    assert {"criterion/grad_ratio", "second/grad_ratio"} <= set(bar.progress_bar_metrics) and "grad_ratio" not in bar.progress_bar_metrics
    run = tmp_path / "run" / "version_0"
    assert [m.report_path for m in monitors] == [run / "diagnosis_criterion.md", run / "diagnosis_second.md"]
    assert all(
        path.exists() and path.with_suffix(".png").exists() for path in (run / "diagnosis_criterion.md", run / "diagnosis_second.md")
    )
    categories = {category.title for category in custom_scalars_layout(events).category}
    assert {"lightning-pinn (criterion)", "lightning-pinn (second)"} <= categories
    # `lightning-pinn report` rebuilds one report per loss from the event files
    from lightning_pinn.cli import main as cli_main

    fit_end = {name: (run / f"diagnosis_{name}.md").read_text() for name in ("criterion", "second")}
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["report", str(run)]) == 0
    for name in ("criterion", "second"):
        rebuilt = (run / f"diagnosis_{name}.md").read_text()
        assert f"(loss '{name}')" in rebuilt
        assert rebuilt.split("\n", 1)[1] == fit_end[name].split("\n", 1)[1]  # same body, another title
    assert not (run / "diagnosis.md").exists()


def test_unknown_loss_module_name() -> None:
    # the example names a loss that exists (it suggested 'criterion' whatever the module held)
    model = TwoTermPoisson()
    model.physics = torch.nn.Module()
    model.physics.loss = model.criterion
    del model.criterion
    with pytest.raises(ValueError, match=r"loss_module='crit'.*found: 'physics.loss'.*e.g. loss_module='physics.loss'"):
        make_trainer(2, [GradientNormMonitor(loss_module="crit")]).fit(model)


@pytest.mark.parametrize("name", ["", "  "])
def test_a_blank_loss_module_name_is_refused_before_the_fit(name: str) -> None:
    """Checked in __init__ (the Lightning convention), not at the fit's start."""
    for make in (GradientNormMonitor, GradNormBalancer):
        with pytest.raises(ValueError, match=rf"{make.__name__}: loss_module must name the attribute.*got '{name}'"):
            make(loss_module=name)


def test_a_logger_prefix_reaches_the_layout_and_the_report_command(tmp_path: Any) -> None:
    """TensorBoardLogger(prefix="train") writes train-grad_norm/<term>: the custom-scalars layout
    matched nothing and `lightning-pinn report` replaced the fit's report with an empty one."""
    from lightning_pinn.cli import main as cli_main

    logger = TensorBoardLogger(str(tmp_path), name="run", version=0, prefix="train")
    model = TwoTermPoisson()
    model.criterion.set_weights({"bc": 1e-4})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(6, [GradientNormMonitor(every_n_steps=1, verbose=False)], logger=logger).fit(model)
    events = load_events(tmp_path)
    assert "train-grad_norm/pde" in events.Tags()["scalars"]
    patterns = [p for category in custom_scalars_layout(events).category for chart in category.chart for p in chart.multiline.tag]
    assert r"^train\-grad_norm/" in patterns
    run = tmp_path / "run" / "version_0"
    fit_end = (run / "diagnosis.md").read_text()
    assert "6 measurements" in fit_end
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["report", str(run)]) == 0
    assert (run / "diagnosis.md").read_text().split("\n", 1)[1] == fit_end.split("\n", 1)[1]


def test_the_report_command_keeps_a_report_when_it_finds_no_monitor_tags(tmp_path: Any) -> None:
    from lightning_pinn.report import report_runs

    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    logger.log_metrics({"something_else": 1.0}, step=0)
    logger.finalize("success")
    run = tmp_path / "run" / "version_0"
    (run / "diagnosis.md").write_text("the fit's own report\n")
    [(path, text, reason)] = report_runs(run)
    assert path == run / "diagnosis.md" and reason is not None and "report already exists" in reason
    assert path.read_text() == "the fit's own report\n" and "No gradient-norm measurements" in text


def test_a_held_alarm_is_named_in_the_report_and_the_console_table(caplog: pytest.LogCaptureFixture) -> None:
    """diagnosis.md said "Worst ratio: 191x …; threshold 100x" and then "Never above the
    threshold"; the console table said "<-- ALARM" although no alarm was on."""
    import logging

    from lightning_pinn.callbacks import GradNormBalancer
    from lightning_pinn.report import diagnose, render_markdown

    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False, print_every_n_steps=1)
    model = TwoTermPoisson()
    model.criterion.set_weights({"bc": 1e-4})
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(3, [monitor, GradNormBalancer(every_n_steps=1)]).fit(model)
    text = render_markdown(diagnose(monitor.history))
    assert "Never above the threshold" not in text
    assert "Above the threshold at 1 measurement(s) with the alarm off (steps 0–0)" in text
    step0 = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("step 0:"))
    assert "ALARM" not in step0 and "the alarm waits for a balancer's first update" in step0


@pytest.mark.parametrize("value", [0, -5, 2.5, True])
def test_bad_every_n_steps(value: Any) -> None:
    with pytest.raises(ValueError, match="every_n_steps must be an integer >= 1"):
        GradientNormMonitor(every_n_steps=value)


@pytest.mark.parametrize("value", [1.0, 0.5, -3, float("nan"), float("inf")])
def test_bad_threshold(value: float) -> None:
    with pytest.raises(ValueError, match="threshold must be a finite number > 1"):
        GradientNormMonitor(threshold=value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cosine_threshold": 1.0},
        {"cosine_threshold": -1.0},
        {"cosine_threshold": -1.5},
        {"cosine_patience": 0},
        {"conflict_min_decrease": 1.0},
    ],
)
def test_bad_conflict_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        GradientNormMonitor(**kwargs)


def test_a_stall_test_over_one_measurement_is_refused() -> None:
    """With cosine_patience=1 the stall test has nothing to compare with (every low cosine would
    alarm, even while the pair's loss halves): refused, naming both ways out."""
    with pytest.raises(
        ValueError, match=r"cosine_patience=1 .*conflict_min_decrease=0\.05.*cosine_patience >= 2, or conflict_min_decrease=None"
    ):
        GradientNormMonitor(cosine_patience=1)
    GradientNormMonitor(cosine_patience=1, conflict_min_decrease=None)  # the cosine alone: a stall is not asked for
    GradientNormMonitor(cosine_patience=1, cosine_threshold=None)  # no conflict alarm at all


# ------------------------------------------------------------------ one monitor, several fits
def test_a_reused_monitor_starts_each_fit_afresh(tmp_path: Any) -> None:
    """One monitor object in a λ sweep: each fit raises its own alarm and writes its own report."""
    monitor = GradientNormMonitor(every_n_steps=5, verbose=False)
    alarms = []
    for index, ic_weight in enumerate([1e-4, 1e-4, 100.0]):
        model = HarmonicOscillator(ic_weight=ic_weight)
        logger = TensorBoardLogger(str(tmp_path), name="sweep", version=index)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer(20, [monitor], logger=logger).fit(model)
        alarms.append(sum(issubclass(w.category, LossBalanceWarning) for w in caught))
        assert monitor.diagnosis.measurements == 4
        text = (tmp_path / "sweep" / f"version_{index}" / "diagnosis.md").read_text()
        assert "4 measurements, steps 0–15." in text
    assert alarms[:2] == [1, 1]  # the second fit's alarm is not swallowed by the first's (still on at its end)
    assert alarms[2] == 0 and "Never above the threshold" in text


def test_the_report_of_a_resumed_fit_covers_the_whole_run(tmp_path: Any) -> None:
    """The history behind diagnosis.md is checkpointed with the alarm state, so the report and
    the end-of-fit summary of a resumed fit tell the same story."""
    model = HarmonicOscillator(ic_weight=1e-4)
    first = make_trainer(10, [GradientNormMonitor(every_n_steps=5, verbose=False, report=False)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first.fit(model)
    first.save_checkpoint(tmp_path / "half.ckpt")
    monitor = GradientNormMonitor(every_n_steps=5, verbose=False)
    logger = TensorBoardLogger(str(tmp_path), name="resumed", version=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(20, [monitor], logger=logger).fit(HarmonicOscillator(ic_weight=1e-4), ckpt_path=tmp_path / "half.ckpt")
    assert monitor.diagnosis.measurements == 4 and monitor.diagnosis.first_step == 0
    text = (tmp_path / "resumed" / "version_0" / "diagnosis.md").read_text()
    assert "4 measurements, steps 0–15." in text
    assert re.search(r"steps 0–end \('pde' over 'ic', up to [0-9.e+]+x\) \(4 of 4 measurements\)", text), text


def test_the_report_does_not_blame_a_balancer_for_the_step_before_its_first_update() -> None:
    from lightning_pinn.report import History, diagnose

    history = History()
    for step, ratio, weight in [(0, 500.0, 1.0), (50, 2.0, 480.0), (100, 1.5, 500.0)]:
        history.add({"grad_norm/pde": 1.0, "grad_norm/ic": 1.0 / ratio, "grad_ratio": ratio, "weight/ic": weight}, step)
        history.add({"alarm/grad_ratio": float(ratio > 100), "weight/pde": 1.0}, step)
    advice = " ".join(diagnose(history, threshold=100.0).advice)
    assert "only before the weights first changed (step 50)" in advice and "update more often" not in advice
    history.add({"grad_ratio": 900.0, "alarm/grad_ratio": 1.0, "weight/ic": 500.0}, 150)  # and again later
    assert "update more often" in " ".join(diagnose(history, threshold=100.0).advice)


def test_a_zero_gradient_with_a_nonzero_loss_is_not_called_a_minimum() -> None:
    flat = ExtraTermPoisson("flat", lambda m, _: 0.0 * m.net(m.x) + 1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(1, [GradientNormMonitor(every_n_steps=1, verbose=False, report=False)]).fit(flat)
    [message] = [str(w.message) for w in caught if issubclass(w.category, TermGradientWarning)]
    assert "term 'flat' has an exactly zero gradient" in message and "its loss (1) does not change" in message


def test_a_trainer_fitted_again_continues_its_callbacks_state(tmp_path: Path) -> None:
    """The same Trainer fitted again with a higher max_steps continues (global_step > 0): the
    monitor's diagnosis and the balancer's update count go on, unlike a fresh fit, and the
    weight series gets no second point where the first fit ended (it used to)."""
    from lightning_pinn.callbacks import GradNormBalancer

    model = TwoTermPoisson()
    monitor = GradientNormMonitor(every_n_steps=2, verbose=False, report=False)
    balancer = GradNormBalancer(every_n_steps=3)
    logger = TensorBoardLogger(str(tmp_path), name="refit", version=0)
    trainer = make_trainer(10, [monitor, balancer], logger=logger, log_every_n_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
        trainer.fit_loop.epoch_loop.max_steps = 20
        trainer.fit(model)
    assert trainer.global_step == 20
    assert monitor.diagnosis.measurements == 10 and monitor.diagnosis.first_step == 0
    assert balancer.num_updates == 7
    logger.experiment.flush()
    steps = [step for step, _ in scalar_series(load_events(tmp_path), "weight/bc")]
    assert 10 in steps and len(steps) == len(set(steps)), steps
    # weights set by hand between two fits: the series shows the new value where the next fit starts
    model.criterion.set_weights({"bc": 7.0})
    trainer.fit_loop.epoch_loop.max_steps = 21
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    logger.experiment.flush()
    assert [value for step, value in scalar_series(load_events(tmp_path), "weight/bc") if step == 20][-1] == 7.0


def test_a_weight_set_by_hand_between_fits_gets_its_point_where_the_next_fit_starts_without_a_balancer() -> None:
    """The monitor's own weight series (no balancer) had no point at step 25 and dated the change
    to its next measurement (30), unlike a balancer's."""
    model = TwoTermPoisson()
    monitor = GradientNormMonitor(every_n_steps=10, verbose=False, report=False)
    trainer = make_trainer(25, [monitor])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
        model.criterion.set_weights({"bc": 7.0})
        trainer.fit_loop.epoch_loop.max_steps = 40
        trainer.fit(model)
    assert monitor.history["weight/bc"] == ([0, 10, 20, 25, 30], [1.0, 1.0, 1.0, 7.0, 7.0])
    assert monitor.history["weight/pde"][0] == [0, 10, 20, 30]  # unchanged: no extra point


def test_the_report_tells_a_rising_loss_from_a_stalled_one() -> None:
    from lightning_pinn.report import History, diagnose, render_markdown

    history = History()
    for step in range(0, 101, 10):
        rising = 0.155 if step < 75 else 0.155 * (1 + (step - 70) / 10)  # ×4 over the last quarter
        history.add({"loss/pde": 10.0 / (1 + step), "loss/bc": rising, "loss/ic": 0.5}, step)
        history.add({"grad_norm/pde": 1.0, "grad_norm/bc": 1.0, "grad_norm/ic": 1.0, "grad_ratio": 1.0, "alarm/grad_ratio": 0.0}, step)
    text = render_markdown(diagnose(history, threshold=100.0))
    assert "- bc: 0.155 → 0.62 — rose ×" in text
    assert "- ic: 0.5 → 0.5 — stalled in the last quarter." in text
    assert "- pde: 10 → 0.099." in text


class _DivergingPoisson(TwoTermPoisson):
    """Every residual turns NaN from step 2 on (as after an fp16 overflow)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        residuals = self.residuals()
        if self.global_step >= 2:
            residuals = {name: r * float("nan") for name, r in residuals.items()}
        return self.criterion(**residuals)


def test_a_nan_gradient_makes_grad_ratio_nan_so_early_stopping_sees_it() -> None:
    from pytorch_lightning.callbacks import EarlyStopping

    from lightning_pinn.report import diagnose, render_markdown

    torch.manual_seed(0)
    monitor = GradientNormMonitor(every_n_steps=1, report=False, verbose=False)
    stop = EarlyStopping(monitor="grad_ratio", mode="min", check_finite=True, check_on_train_epoch_end=True)
    trainer = make_trainer(30, [monitor, stop], limit_train_batches=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_DivergingPoisson())
    assert trainer.global_step == 3  # stopped at the first epoch end, on the NaN ratio
    steps, ratios = monitor.history["grad_ratio"]
    assert steps == [0, 1, 2] and all(math.isfinite(r) for r in ratios[:2]) and math.isnan(ratios[2])
    diagnosis = diagnose(monitor.history)
    assert diagnosis.worst_ratio == max(ratios[:2]) and diagnosis.worst_ratio_step in (0, 1)
    assert "Worst ratio" in render_markdown(diagnosis)


def test_a_one_term_report_says_so() -> None:
    from lightning_pinn.report import History, diagnose, render_markdown

    history = History()
    for step in (0, 50):
        history.add({"grad_norm/pde": 1.0, "grad_norm_weighted/pde": 1.0, "loss/pde": 1.0 / (1 + step)}, step)
    assert "The loss has one term: there is no ratio to compare." in render_markdown(diagnose(history))


def test_a_report_without_gradient_norms_still_shows_the_losses_and_weights(tmp_path: Path) -> None:
    from lightning_pinn.report import History, write_report

    history = History()
    for step in range(0, 100, 10):
        history.add({"loss/pde": 1.0 / (step + 1), "loss/ic": 0.5, "weight/ic": 1.0 + step}, step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. matplotlib's "No artists with labels found to put in legend"
        markdown, picture = write_report(history, tmp_path)
    text = markdown.read_text()
    assert "attach a GradientNormMonitor" in text
    assert "- ic: 1 → 91" in text and "## Losses" in text and "- pde: 1 → 0.011" in text
    assert picture.stat().st_size > 0


def test_the_history_is_checkpointed_as_tensors_and_reads_the_older_list_form(tmp_path: Path) -> None:
    import io

    from lightning_pinn.report import History

    history = History()
    for step in range(5):
        history.add({"grad_norm/pde": 0.5 * step, "weight/ic": 2.0}, step)
    history.add({"weight/ic": 3.0}, 2)  # out of order: kept sorted
    state = history.to_state()
    steps, values = state["grad_norm/pde"]
    assert steps.dtype == torch.int64 and values.dtype == torch.float64 and steps.tolist() == [0, 1, 2, 3, 4]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = History.from_state(torch.load(buffer, weights_only=True))
    for tag in history.tags():
        assert restored[tag] == history[tag]
    older = {tag: history[tag] for tag in history.tags()}  # lists, as checkpoints before stop 13 held
    assert History.from_state(older)["weight/ic"] == history["weight/ic"]
    assert History.from_state(History().to_state()).tags() == []


def test_log_cosines_false_keeps_the_pairs_out_of_the_logs_but_still_alarms() -> None:
    monitor = GradientNormMonitor(every_n_steps=5, cosine_patience=3, verbose=False, log_cosines=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(100, [monitor]).fit(Opposed())
    assert not [tag for tag in monitor.history.tags() if tag.startswith("grad_cosine/")]
    assert len([w for w in caught if issubclass(w.category, GradientConflictWarning)]) == 1
    from lightning_pinn.report import diagnose, render_markdown

    diagnosis = diagnose(monitor.history)
    assert [span[:2] for span in diagnosis.conflict_spans] == [("up", "down")]
    assert "'up' vs 'down': opposed gradients, conflict alarm on" in render_markdown(diagnosis)
    assert monitor.diagnosis.min_cosine == pytest.approx(-1.0, abs=1e-6)  # the alarm's cosines, still computed


def test_with_the_cosine_tags_and_the_conflict_alarm_off_no_cosine_is_computed() -> None:
    """The K(K−1)/2 cosines serve only the tags and the alarm (a K = 30 monitor spent its time there)."""
    from lightning_pinn import diagnostics

    calls: list[bool] = []
    original = diagnostics.summarize_gradients

    def spy(*args: Any, **kwargs: Any) -> Any:
        report = original(*args, **kwargs)
        calls.append(bool(report.cosines))
        return report

    monitor = GradientNormMonitor(every_n_steps=5, verbose=False, log_cosines=False, cosine_threshold=None, report=False)
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch.setattr("lightning_pinn.callbacks.monitor.summarize_gradients", spy)
        make_trainer(20, [monitor]).fit(Opposed())
    assert calls == [False] * 4 and monitor.diagnosis.min_cosine is None


def test_the_report_plot_of_many_terms_has_one_legend_entry_per_term(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    from lightning_pinn.report import History, plot_history

    legends: list[list[str]] = []
    original = Figure.legend

    def spy(self, handles, labels, *args, **kwargs):  # type: ignore[no-untyped-def]
        legends.append(list(labels))
        return original(self, handles, labels, *args, **kwargs)

    monkeypatch.setattr(Figure, "legend", spy)
    history = History()
    for step in range(0, 100, 10):
        history.add({f"{tag}/t{k}": 1.0 + k for k in range(20) for tag in ("grad_norm", "grad_norm_weighted", "weight")}, step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_history(history, tmp_path / "many.png")
    assert legends == [[f"t{k}" for k in range(20)]]  # one entry per term, not three
    assert (tmp_path / "many.png").stat().st_size > 0


def test_the_report_names_zero_and_nan_gradient_terms_with_fitting_advice() -> None:
    from lightning_pinn.report import History, diagnose, render_markdown

    history = History()
    for step in range(0, 100, 10):
        history.add(
            {
                "grad_norm/pde": 1.0,
                "grad_norm/const": 0.0,
                "grad_norm/data": math.nan if step >= 50 else 1.0,
                "loss/pde": 1.0 / (step + 1),
                "loss/const": 1.0,
                "loss/data": 1.0,
            },
            step,
        )
    diagnosis = diagnose(history)
    assert diagnosis.zero_gradient_terms == ["const"] and diagnosis.nonfinite_steps == {"data": 50}
    text = render_markdown(diagnosis)
    assert "'const' ended with an exactly zero gradient" in text and "Term 'data' had a NaN/inf gradient from step 50" in text
    assert "train longer" not in text  # the stalled 'const' is explained by its zero gradient, not by too few steps


def test_printing_more_often_than_measuring_does_not_change_the_measurements(caplog: Any) -> None:
    import logging

    monitor = GradientNormMonitor(every_n_steps=20, print_every_n_steps=5, verbose=False, report=False)
    with caplog.at_level(logging.INFO):
        make_trainer(20, [monitor]).fit(TwoTermPoisson())
    assert monitor.diagnosis.measurements == 1  # step 0 only: the cadence (and the alarms' patience) is every_n_steps
    assert monitor.history["grad_norm/pde"][0] == [0]
    assert sum(f"step {s}" in caplog.text for s in (0, 5, 10, 15)) == 4  # but the table is printed every 5 steps


def test_a_resumed_fit_logs_no_second_weight_point_at_the_resume_step(tmp_path: Path) -> None:
    from lightning_pinn.callbacks import GradNormBalancer

    def callbacks() -> list[Any]:
        return [GradientNormMonitor(every_n_steps=3, verbose=False, report=False), GradNormBalancer(every_n_steps=2)]

    torch.manual_seed(0)
    whole = callbacks()
    make_trainer(12, whole, log_every_n_steps=4).fit(TwoTermPoisson())
    torch.manual_seed(0)
    first = make_trainer(6, callbacks(), log_every_n_steps=4)
    first.fit(TwoTermPoisson())
    first.save_checkpoint(tmp_path / "half.ckpt")
    resumed = callbacks()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")
        make_trainer(12, resumed, log_every_n_steps=4).fit(TwoTermPoisson(), ckpt_path=tmp_path / "half.ckpt")
    steps, values = resumed[0].history["weight/bc"]
    assert len(steps) == len(set(steps)), steps
    assert (steps, values) == whole[0].history["weight/bc"]  # the same points as the uninterrupted fit


def test_a_fit_resumed_from_lightnings_own_end_of_fit_checkpoint_logs_no_second_weight_point(tmp_path: Path) -> None:
    """The fit's last update, off the logging cadence, was logged at on_train_end, after Lightning's
    ModelCheckpoint had saved the state with that update still pending: the resumed fit logged the
    same λ at the resume step again (weight/bc at steps [0, 1, 8, 10, 10, 15, 20])."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from lightning_pinn.callbacks import GradNormBalancer
    from lightning_pinn.report import read_history

    def fit(steps: int, folder: str, ckpt: Path | None = None) -> None:
        torch.manual_seed(0)
        checkpoints = ModelCheckpoint(dirpath=tmp_path / folder / "ckpt")
        trainer = make_trainer(
            steps,
            [GradNormBalancer(every_n_steps=1), checkpoints],
            logger=TensorBoardLogger(str(tmp_path), name=folder, version=0),
            log_every_n_steps=7,
            enable_checkpointing=True,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(TwoTermPoisson(), ckpt_path=ckpt)

    fit(20, "whole")
    fit(10, "parts")
    fit(20, "parts", tmp_path / "parts" / "ckpt" / "epoch=0-step=10.ckpt")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    whole, _ = read_history(tmp_path / "whole" / "version_0")["weight/bc"]
    parts = []  # each event file on its own: TensorBoard's reader drops a series' points at a step it sees again
    for events in sorted((tmp_path / "parts" / "version_0").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        parts += [event.step for event in accumulator.Scalars("weight/bc")]
    assert len(parts) == len(set(parts)), parts
    assert sorted(parts) == sorted({*whole, 10})  # the uninterrupted fit's points, plus the first part's last λ


@pytest.mark.parametrize("version", [0, 1])
def test_a_resume_into_a_new_version_folder_starts_its_weight_series_at_the_resume_step(tmp_path: Path, version: int) -> None:
    # the λ in force at the checkpoint was logged in version 0 (log_every_n_steps=1); a resume
    # into version 1 logs it again there, a resume into version 0 adds no second point
    from lightning_pinn.callbacks import GradNormBalancer
    from lightning_pinn.report import read_history

    def fit(steps: int, logger_version: int, ckpt: Path | None = None) -> pl.Trainer:
        trainer = make_trainer(
            steps, [GradNormBalancer(every_n_steps=1)], logger=TensorBoardLogger(str(tmp_path), name="run", version=logger_version)
        )
        trainer.log_every_n_steps = 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(TwoTermPoisson(), ckpt_path=ckpt)
        return trainer

    first = fit(6, 0)
    first.save_checkpoint(tmp_path / "half.ckpt")
    fit(9, version, tmp_path / "half.ckpt")
    steps, _ = read_history(tmp_path / "run" / f"version_{version}")["weight/bc"]
    assert steps == (list(range(0, 10)) if version == 0 else [6, 7, 8, 9]), steps


def test_the_report_credits_the_balancing_only_when_the_weights_moved_substantially() -> None:
    from lightning_pinn.report import History, diagnose

    history = History()
    for step, ratio, weight in [(0, 500.0, 1.0), (50, 2.0, 1.005), (100, 1.5, 1.006)]:
        history.add({"grad_norm/pde": 1.0, "grad_norm/ic": 1.0 / ratio, "grad_ratio": ratio, "weight/pde": weight}, step)
        history.add({"alarm/grad_ratio": float(ratio > 100), "weight/ic": 1.0}, step)
    advice = " ".join(diagnose(history, threshold=100.0).advice)
    assert "the new weights brought it down" not in advice and "changed by less than 2x" in advice
    history = History()  # the same with λ_ic raised 500x (by a balancer or by hand: the report cannot tell)
    for step, ratio, weight in [(0, 500.0, 1.0), (50, 2.0, 500.0), (100, 1.5, 600.0)]:
        history.add({"grad_norm/pde": 1.0, "grad_norm/ic": 1.0 / ratio * weight, "grad_ratio": ratio, "weight/ic": weight}, step)
        history.add({"alarm/grad_ratio": float(ratio > 100), "weight/pde": 1.0}, step)
    advice = " ".join(diagnose(history, threshold=100.0).advice)
    assert "the new weights brought it down, nothing to fix there" in advice and "balancing worked" not in advice


def test_the_report_does_not_scale_a_weight_by_a_ratio_that_a_weight_put_back_had_caused() -> None:
    """λ_pde raised 10⁴x by hand for a while, then put back: the crossing was its doing, and the
    report used to advise raising λ_ic by that ratio (it compared only the first and last λ)."""
    from lightning_pinn.report import History, diagnose

    history = History()
    for step, weight in [(0, 1.0), (10, 1e4), (15, 1e4), (20, 1.0), (25, 1.0)]:
        ratio = 5.0 * weight
        history.add({"grad_norm/pde": 5.0, "grad_norm/ic": 1.0, "grad_ratio": ratio, "weight/pde": weight, "weight/ic": 1.0}, step)
        history.add({"grad_norm_weighted/pde": 5.0 * weight, "grad_norm_weighted/ic": 1.0, "alarm/grad_ratio": float(ratio > 100)}, step)
    advice = " ".join(diagnose(history, threshold=100.0).advice)
    assert "raise λ_ic" not in advice and "The weights did change during the fit" in advice, advice


def test_the_report_names_a_term_kept_at_zero_weight_instead_of_saying_nothing_to_fix() -> None:
    from lightning_pinn.report import History, diagnose, render_markdown

    history = History()
    history.add({"grad_norm/pde": 1.0, "grad_norm/ic": 0.5, "weight/pde": 1.0, "weight/ic": 0.0, "alarm/grad_ratio": 0.0}, 0)
    diagnosis = diagnose(history, threshold=100.0)
    advice = " ".join(diagnosis.advice)
    assert "'ic' had λ = 0 throughout, so they did not train" in advice and "Nothing to fix" not in advice
    assert "1 measurement, step 0." in render_markdown(diagnosis)


def test_one_callback_object_in_two_trainers_warns_and_starts_afresh() -> None:
    """Trainer A, then Trainer B, then A again with the same callback objects: the state is B's by
    then, so A's continued fit used to append to B's history (A's own steps 0-4 were gone)."""
    from lightning_pinn.callbacks import GradNormBalancer

    monitor = GradientNormMonitor(every_n_steps=2, verbose=False, report=False)
    balancer = GradNormBalancer(every_n_steps=2)
    first, second = make_trainer(6, [monitor, balancer]), make_trainer(4, [monitor, balancer])
    model = TwoTermPoisson()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first.fit(model)
        second.fit(TwoTermPoisson())
        assert not [w for w in caught if "another Trainer" in str(w.message)], "a fresh fit (step 0) starts afresh silently"
        first.fit_loop.epoch_loop.max_steps = 10
        first.fit(model)
    messages = [str(w.message) for w in caught if "another Trainer" in str(w.message)]
    assert len(messages) == 2 and "starts afresh at step 6" in messages[0] and "its own callback objects" in messages[0]
    assert monitor.history["loss/pde"][0] == [6, 8]
    assert balancer.num_updates == 2


def test_a_zero_dim_loss_that_turns_negative_later_is_warned_about_once() -> None:
    """A one-point residual squeezed to 0-dim is minimised unsquared. The loss checks only a
    term's first value (a device sync), so one that started positive went unnoticed; the
    callbacks read every measured loss and warn, once per term, with monitor and balancer both."""
    from lightning_pinn.callbacks import GradNormBalancer

    squeezed = ExtraTermPoisson("tip", lambda m, _: (m.net(m.x[:1]) * 0.0).sum() + 1.0 - 0.3 * m.global_step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = GradientNormMonitor(every_n_steps=2, verbose=False, report=False)
        make_trainer(10, [monitor, GradNormBalancer(every_n_steps=1)]).fit(squeezed)
    messages = [str(w.message) for w in caught if "term 'tip'" in str(w.message) and "negative" in str(w.message)]
    assert len(messages) == 1 and "at step 4" in messages[0] and "r.reshape(1)" in messages[0], messages


def _offset(scale: float, offset: float) -> Any:
    """A residual ``scale · (u − u.detach()) + offset``: constant value ``offset`` (loss offset²)
    whose gradient is ``2·offset·scale·∇u``, i.e. ``scale`` sets the term's sensitivity."""
    return lambda m, _: scale * (m.net(m.x[:4]) - m.net(m.x[:4]).detach()) + offset


@pytest.mark.parametrize(("scale", "noted"), [(1.0, True), (0.03, False), (1e-3, False)])
def test_the_ratio_alarm_tells_a_nearly_satisfied_term_from_a_neglected_one(scale: float, noted: bool) -> None:
    """A term whose residual is already tiny has a tiny gradient without being neglected: the
    alarm used to advise raising its weight ~1e3x (and a gradient-norm balancer drove it to
    max_weight and ruined a coupled-oscillator fit). A term that is small because of its scale
    (a residual multiplied by 1e-3) is neglected, and gets no such note; so does one whose
    gradient per unit of residual is 13x smaller (more than √threshold = 10x: the small residual
    explains less than half of the ratio)."""
    offset = 1e-2 if scale == 1e-3 else 1e-5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = ExtraTermPoisson("tip", _offset(scale, offset))
        make_trainer(1, [GradientNormMonitor(every_n_steps=1, verbose=False, report=False)]).fit(model)
    [alarm] = [str(w.message) for w in caught if issubclass(w.category, LossBalanceWarning)]
    assert "neglect 'tip'" in alarm
    assert ("'tip' may simply be nearly satisfied" in alarm) is noted, alarm


@pytest.mark.parametrize(("scale", "noted"), [(1.0, True), (1e-3, False)])
def test_the_report_advice_agrees_with_the_alarm_on_a_nearly_satisfied_term(scale: float, noted: bool) -> None:
    """The alarm said "'tip' may simply be nearly satisfied … keep it out of the balancer's terms"
    while the end-of-fit report advised raising λ_tip by the ratio: both now read the same test."""
    from lightning_pinn.report import diagnose

    offset = 1e-2 if scale == 1e-3 else 1e-5
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(2, [monitor]).fit(ExtraTermPoisson("tip", _offset(scale, offset)))
    advice = " ".join(diagnose(monitor.history).advice)
    assert ("'tip' may simply be nearly satisfied" in advice) is noted, advice
    assert ("raise λ_tip by about" in advice) is not noted, advice


def test_the_reports_old_cosine_threshold_keyword_is_deprecated_not_refused(tmp_path: Any) -> None:
    from lightning_pinn.report import History, diagnose, write_report

    history = History()
    history.add({"grad_norm/pde": 1.0, "grad_norm/bc": 0.5}, 0)
    with pytest.warns(DeprecationWarning, match=r"diagnose\(cosine_threshold=...\) is deprecated and ignored"):
        assert diagnose(history, cosine_threshold=-0.5).measurements == 1
    with pytest.warns(DeprecationWarning, match=r"write_report\(cosine_threshold=...\)"):
        write_report(history, tmp_path, "title", -0.5)  # its old position
    assert (tmp_path / "diagnosis.md").exists()


def test_a_balancer_clamping_a_nearly_satisfied_term_says_why() -> None:
    from lightning_pinn.alerts import WeightUpdateWarning
    from lightning_pinn.callbacks import GradNormBalancer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = ExtraTermPoisson("tip", _offset(1.0, 1e-5))
        make_trainer(1, [GradNormBalancer(every_n_steps=1, max_weight=100.0)]).fit(model)
    [clamp] = [str(w.message) for w in caught if issubclass(w.category, WeightUpdateWarning) and "clamped" in str(w.message)]
    assert "term 'tip'" in clamp and "nearly satisfied" in clamp and "leave 'tip' out of terms=..." in clamp


def test_ratio_terms_leave_a_weak_regulariser_out_of_the_ratio_and_its_alarm() -> None:
    model = ExtraTermPoisson("prior", _offset(1e-3, 1e-2))
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False, ratio_terms=["pde", "bc"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(3, [monitor]).fit(model)
    assert not [w for w in caught if issubclass(w.category, LossBalanceWarning)]
    report = monitor.last_report
    norms = dict(zip(report.terms, report.weighted_norms))
    assert report.ratio == pytest.approx(max(norms["pde"], norms["bc"]) / min(norms["pde"], norms["bc"]))
    assert max(norms.values()) / norms["prior"] > 100, "without ratio_terms the prior would alarm"
    assert "grad_norm/prior" in monitor.history, "the prior is still measured and logged"
    from lightning_pinn.report import diagnose

    # the report names the pair behind the logged ratio (it used to name 'pde' over 'prior')
    assert diagnose(monitor.history).worst_pair == monitor.diagnosis.worst_pair
    assert set(monitor.diagnosis.worst_pair or ()) == {"pde", "bc"}
    with pytest.raises(ValueError, match="at least 2 different terms"):
        GradientNormMonitor(ratio_terms=["pde"])
    with pytest.raises(TypeError, match="list of term names"):
        GradientNormMonitor(ratio_terms="pde")
    with pytest.raises(ValueError, match=r"ratio_terms=\.\.\.\): unknown term\(s\) \['pdf'\]"):
        make_trainer(1, [GradientNormMonitor(ratio_terms=["pdf", "bc"])]).fit(ExtraTermPoisson("prior", _offset(1e-3, 1e-2)))


def test_the_report_says_when_a_zero_weight_left_nothing_to_compare() -> None:
    from lightning_pinn.report import diagnose, render_markdown

    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    make_trainer(3, [monitor]).fit(TwoTermPoisson(bc_weight=0.0))
    text = render_markdown(diagnose(monitor.history))
    assert "the weight of 'bc' was 0 throughout" in text, text


def test_a_term_with_weight_zero_is_named_in_the_diagnosis_not_called_gradient_free() -> None:
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    make_trainer(3, [monitor]).fit(TwoTermPoisson(bc_weight=0.0))
    assert monitor.diagnosis.zero_weight_terms == ["bc"] and monitor.diagnosis.zero_gradient_terms == []
    summary = monitor.summary()
    assert "the weight of 'bc' was 0 (its gradient was not)" in summary and "nothing to compare" not in summary
    # with a third term there is a ratio; the zero-weight term is still named
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    make_trainer(3, [monitor]).fit(_ThreeTerms(extra_weight=0.0))
    assert monitor.diagnosis.worst_ratio is not None
    assert "terms seen with weight 0 (not trained then, left out of the ratio): extra" in monitor.summary()


class _Aligned(TwoTermPoisson):
    """Two terms on one residual: their gradients are parallel (cosine +1) at every step."""

    def residuals(self) -> dict[str, torch.Tensor]:
        r = self.net(self.x) - 1.0
        return {"pde": r, "bc": 3.0 * r}


def test_the_diagnosis_calls_no_pair_opposed_when_no_cosine_is_negative() -> None:
    """Found by a blind test: a pair at cosine +1 was named the 'most opposed gradients'."""
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    make_trainer(3, [monitor]).fit(_Aligned())
    assert monitor.diagnosis.min_cosine == pytest.approx(1.0, abs=1e-5)
    summary = monitor.summary()
    assert "most opposed" not in summary and "no opposed gradients; lowest cosine: 'pde' vs 'bc', cosine 1.00" in summary, summary
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    make_trainer(3, [monitor]).fit(Opposed())
    assert monitor.diagnosis.min_cosine < 0 and "most opposed gradients: 'up' vs 'down'" in monitor.summary()


class _ThreeTerms(TwoTermPoisson):
    def __init__(self, extra_weight: float) -> None:
        super().__init__()
        self.criterion = MultiTermLoss(pde=1.0, bc=1.0, extra=extra_weight)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        residuals = self.residuals()
        return self.criterion(**residuals, extra=self.net(self.x[:4]) - 1)


def test_conflict_stall_is_judged_at_the_current_weights() -> None:
    """A balancer raising λ_ic tenfold inside the conflict window made the pair's weighted loss
    grow (+2385 % in a probe) and the alarm called that a stall, although at fixed λ the loss
    fell by more than conflict_min_decrease. Both ends are now weighted with today's λ."""
    from lightning_pinn.diagnostics import GradientReport

    def report(ic_weight: float, ic_loss: float) -> GradientReport:
        return GradientReport(
            terms=("pde", "ic"),
            losses=(1.0, ic_loss),
            weights=(1.0, ic_weight),
            norms=(1.0, 1.0),
            weighted_norms=(1.0, ic_weight),
            ratio=None,
            largest=None,
            smallest=None,
            cosines={("pde", "ic"): -0.9},
            zero_terms=(),
            unreached_terms=(),
            nonfinite_terms=(),
            absent_terms=(),
        )

    class NoLoggers:  # the part of a Trainer the alarm's text entry reads
        loggers: list[Any] = []
        global_rank = 0
        is_global_zero = True

    def alarms(history: list[tuple[float, float]]) -> bool:
        monitor = GradientNormMonitor(every_n_steps=1, cosine_patience=3, conflict_min_decrease=0.05, verbose=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [monitor._track_conflicts(NoLoggers(), report(w, loss), step) for step, (w, loss) in enumerate(history)][-1]  # type: ignore[arg-type]

    # L_ic falls from 1.0 to 0.6 while λ_ic rises 1 -> 10: at λ_ic = 10 the pair's loss fell 36 %
    assert not alarms([(1.0, 1.0), (5.0, 0.8), (10.0, 0.6)])
    # the same weights with L_ic flat: a stall, alarmed
    assert alarms([(1.0, 1.0), (5.0, 1.0), (10.0, 1.0)])


def _imbalanced_poisson() -> ExtraTermPoisson:
    """pde, bc and a 'data' term absent throughout; λ_bc = 1e-6 keeps the ratio far above 100."""
    model = ExtraTermPoisson("data", lambda m, i: None)
    model.criterion.set_weights({"bc": 1e-6})
    return model


def _ratio_alarm_steps(caught: list[warnings.WarningMessage]) -> list[int]:
    return [int(str(w.message).split("alarm at step ")[1].split(":")[0]) for w in caught if w.category is LossBalanceWarning]


def test_the_ratio_alarm_waits_only_for_a_balancer_that_may_change_the_pair_and_only_until_its_first_due_update() -> None:
    """The wait must not hide an imbalance: a balancer of other terms (here of a term absent all
    fit) holds nothing back, and one of the pair's terms holds the alarm only until its first
    update is due to be in force, even when that update cannot fix the ratio (max_weight)."""
    from lightning_pinn.callbacks import GradNormBalancer

    def run(balancer: GradNormBalancer) -> tuple[GradientNormMonitor, list[int]]:
        monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer(8, [monitor, balancer]).fit(_imbalanced_poisson())
        return monitor, _ratio_alarm_steps(list(caught))

    monitor, steps = run(GradNormBalancer(terms=["data"]))  # never updates: 'data' is never present
    assert steps == [0] and monitor.diagnosis.ratio_alarm_held == 0
    # first due update at step 4 (warm-up), in force from step 5; it is clamped, so the ratio stays
    monitor, steps = run(GradNormBalancer(terms=["bc"], warmup_steps=4, every_n_steps=1, max_weight=1e-5))
    assert steps == [5] and monitor.diagnosis.ratio_alarm_held == 5
    assert "before the first update of GradNormBalancer (the alarm waited for it)" in monitor.summary()


def test_the_wait_holds_only_pairs_a_waiting_balancer_may_change() -> None:
    """The extreme pair ('data' over 'bc') waits for the balancer of 'data'; 'pde' over 'bc', a
    pair no balancer changes, is far above the threshold too, so the alarm must not wait (the
    whole warm-up was silent). The alarm is about grad_ratio as always; its text names both."""
    from lightning_pinn.callbacks import GradNormBalancer

    def run(bc_weight: float) -> tuple[GradientNormMonitor, list[str]]:
        model = ExtraTermPoisson("data", lambda m, i: m.net(m.x) - 0.5, weight=1e4)
        model.criterion.set_weights({"bc": bc_weight})
        monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
        balancer = GradNormBalancer(terms=["data"], warmup_steps=6, every_n_steps=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer(4, [monitor, balancer]).fit(model)
        assert monitor.last_report is not None and monitor.last_report.largest == "data"  # the extreme pair waits
        return monitor, [str(w.message) for w in caught if w.category is LossBalanceWarning]

    monitor, messages = run(1e-6)
    assert len(messages) == 1 and "alarm at step 0" in messages[0] and monitor.diagnosis.ratio_alarm_held == 0
    assert (
        "term 'data'" in messages[0]
        and "term 'bc'" in messages[0]
        and "waits for the first update of GradNormBalancer(terms=['data'])" in messages[0]
    )
    assert "but 'pde' over 'bc'" in messages[0] and "no balancer attached changes them at all" in messages[0]
    assert monitor.diagnosis.ratio_alarm_pair == ("data", "bc") and monitor.diagnosis.ratio_alarm_spans == [[0, None]]
    # with 'pde' and 'bc' within the threshold, the whole alarm waits, as before
    monitor, messages = run(1.0)
    assert messages == [] and monitor.diagnosis.ratio_alarm_held == 4


def test_a_row_printed_between_measurements_says_the_alarm_waits_only_when_it_would(caplog: pytest.LogCaptureFixture) -> None:
    """Each term's loss is c·(one base loss), lr = 0, so the weighted norms are exactly λ·c·‖g‖:
    'pde' over 'ic' waits for the balancer of 'ic'; from step 3 'pde' over 'bc' (500x), a pair no
    balancer changes, is above the threshold too. The row printed at step 3 (no measurement) said
    the alarm waited; the alarm starts at the next measurement, step 4."""
    import logging

    from lightning_pinn.callbacks import GradNormBalancer

    class Scaled(TwoTermPoisson):
        def __init__(self) -> None:
            super().__init__()
            self.criterion = MultiTermLoss(pde=1.0, bc=1.0, ic=1.0)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            base = (self.net(self.x) - 0.5).square().mean()
            return self.criterion(pde=(30.0 if self.global_step < 3 else 500.0) * base, bc=base, ic=1e-3 * base)

    monitor = GradientNormMonitor(every_n_steps=2, print_every_n_steps=1, verbose=False, report=False)
    balancer = GradNormBalancer(terms=["ic"], warmup_steps=10, every_n_steps=1)
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(6, [monitor, balancer]).fit(Scaled())
    rows = {int(m.split(":")[0][5:]): m for m in (r.getMessage() for r in caplog.records) if m.startswith("step ")}
    assert "the alarm waits" in rows[2] and "(above the threshold)" in rows[3] and "<-- ALARM" in rows[4]
    assert monitor.diagnosis.ratio_alarm_spans == [[4, None]] and monitor.diagnosis.ratio_alarm_held == 2


class _ConstantTerms(pl.LightningModule):
    """'pde' over 'bc' at 1000x (a third term 'data'), and lr = 0: the norms never change."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.r, self.d = (torch.nn.Parameter(torch.ones(1)) for _ in range(3))
        self.criterion = MultiTermLoss(pde=1.0, bc=1.0, data=1.0)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.criterion(pde=1000**0.5 * self.q * torch.ones(8), bc=self.r * torch.ones(4), data=3 * self.d * torch.ones(2))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> range:
        return range(100)


@pytest.mark.parametrize(
    ("make_balancer", "expected"),
    [
        # owns only the big term: its every_n_steps cannot help 'bc'
        (
            lambda: GradNormBalancer(terms=["pde"], every_n_steps=10),
            "None of them changes 'bc', the neglected term: add it to a balancer's terms=",
        ),
        # weighs by losses, not gradient norms
        (lambda: SoftAdaptBalancer(every_n_steps=10), "weighs the terms by their losses, not their gradient norms"),
    ],
)
def test_the_alarm_says_when_the_attached_balancer_cannot_close_the_ratio(make_balancer: Any, expected: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(30, [make_balancer(), GradientNormMonitor(every_n_steps=10, verbose=False, report=False)]).fit(_ConstantTerms())
    alarms = [str(w.message) for w in caught if w.category is LossBalanceWarning]
    assert alarms and expected in alarms[0], alarms


def test_the_report_says_an_alarm_that_ended_with_no_weight_changed_needs_nothing() -> None:
    # it advised raising λ_bc by the worst ratio, after the gradients had evened out by themselves
    from lightning_pinn.report import History, diagnose

    history = History()
    for step, ratio in [(0, 500.0), (50, 300.0), (100, 2.0), (150, 1.5)]:
        history.add({"grad_norm/pde": 1.0, "grad_norm/bc": 1.0 / ratio, "grad_ratio": ratio, "weight/pde": 1.0, "weight/bc": 1.0}, step)
        history.add({"grad_norm_weighted/pde": 1.0, "grad_norm_weighted/bc": 1.0 / ratio, "alarm/grad_ratio": float(ratio > 100)}, step)
    advice = " ".join(diagnose(history, threshold=100.0).advice)
    assert "back below the threshold by step 100" in advice and "training itself evened" in advice and "raise λ_bc" not in advice


@pytest.mark.parametrize(
    "make_other", [lambda: GradNormBalancer(terms=["data"], every_n_steps=10), lambda: WeightSchedule({"data": [(0, 1.0), (60, 2.0)]})]
)
def test_an_unrelated_weight_changing_does_not_turn_the_advice_into_check_your_balancer(tmp_path: Path, make_other: Any) -> None:
    """'pde' over 'bc' at 1000x, neither weight ever changes; only a third term's λ moves (a
    balancer or a schedule of 'data'). The alarm said "check its every_n_steps" / "raise the
    scheduled weight of 'bc'" and the report "update more often": nothing there changes 'bc'."""
    from pytorch_lightning.loggers import TensorBoardLogger

    monitor = GradientNormMonitor(every_n_steps=10, verbose=False)
    other = make_other()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(60, [other, monitor], logger=TensorBoardLogger(str(tmp_path), name="run")).fit(_ConstantTerms())
    assert other.num_updates > 0
    (alarm,) = [str(w.message) for w in caught if w.category is LossBalanceWarning]
    assert "neglect 'bc'" in alarm and "raise the weight of 'bc' (λ = 1 now; about 1e+03" in alarm
    if isinstance(other, WeightSchedule):  # a schedule has no terms= to add 'bc' to
        assert "give it a schedule too, or let a GradNormBalancer / NTKBalancer change it (terms=['bc'])" in alarm
    else:
        assert "add 'bc' to the terms= of a balancer (those attached change neither 'pde' nor 'bc')" in alarm
    assert "every_n_steps" not in alarm and "scheduled weight" not in alarm
    advice = Path(str(monitor.report_path)).read_text(encoding="utf-8").split("## What to try")[1]
    assert "raise λ_bc by about 1e+03x" in advice and "hard constraint" in advice and "update more often" not in advice


def test_an_alarm_that_is_on_stays_on_while_a_new_balancer_is_awaited(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Resumed with a balancer added (as the alarm advises), the wait for its first update closed
    the running alarm ("back to 2.5e6x") and opened a second episode one measurement later (and
    the console table said the alarm waited while it was on)."""
    import logging

    from pytorch_lightning.callbacks import ModelCheckpoint

    from lightning_pinn.callbacks import GradNormBalancer

    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="mid")
    with warnings.catch_warnings(), caplog.at_level(logging.INFO):
        warnings.simplefilter("ignore")
        make_trainer(3, [monitor, checkpoint], enable_checkpointing=True).fit(_imbalanced_poisson())
        assert monitor.diagnosis.ratio_alarm_active
        resumed = GradientNormMonitor(every_n_steps=1, verbose=False, report=False, print_every_n_steps=1)
        balancer = GradNormBalancer(terms=["bc"], warmup_steps=5, every_n_steps=1, max_weight=1e-5)
        make_trainer(7, [resumed, balancer]).fit(_imbalanced_poisson(), ckpt_path=str(tmp_path / "mid.ckpt"))
    assert resumed.diagnosis.ratio_alarm_episodes == 1 and resumed.diagnosis.ratio_alarm_spans == [[0, None]]
    # steps 3, 4, 5 waited for the balancer (first update in force from step 6), with the alarm on all along
    assert resumed.diagnosis.ratio_alarm_held == 0 and resumed.diagnosis.ratio_alarm_measurements == 7
    step3 = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("step 3:"))
    assert "<-- ALARM" in step3 and "waits" not in step3


def test_the_wait_follows_what_the_balancer_does_not_a_prediction(tmp_path: Path) -> None:
    """The first version predicted the wait's end at fit start, when a resume has not restored
    global_step yet: a balancer added on resume at step 5 (every 4 steps, first update at 8) let the
    alarm through at step 5 and its text said the balancer had "updated λ already". The wait now
    ends at the step the balancer's first update applies from, as it happens."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from lightning_pinn.callbacks import GradNormBalancer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(5, [ModelCheckpoint(dirpath=tmp_path, filename="mid")], enable_checkpointing=True).fit(_imbalanced_poisson())
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    balancer = GradNormBalancer(terms=["bc"], every_n_steps=4, max_weight=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(12, [monitor, balancer]).fit(_imbalanced_poisson(), ckpt_path=str(tmp_path / "mid.ckpt"))
    assert _ratio_alarm_steps(list(caught)) == [9] and monitor.diagnosis.ratio_alarm_held == 4  # steps 5-8
    message = next(str(w.message) for w in caught if w.category is LossBalanceWarning)
    assert "GradNormBalancer(terms=['bc']) (1 update so far) is attached to this loss" in message


def test_the_report_separates_the_logger_prefix_from_loss_paths_with_dashes() -> None:
    """Loss paths may hold '-' (nn.ModuleDict keys): splitting tags at the last '-' merged two
    losses into one report named 'loss'. The logger's prefix is the common start of all tags."""
    from lightning_pinn.report import History, logger_prefix, loss_prefixes

    for before in ("", "train-"):
        history = History()
        for loss in ("losses.pde-loss/", "losses.data-loss/"):
            history.add({f"{before}{loss}grad_norm/u-x": 1.0, f"{before}{loss}grad_ratio_threshold": 100.0}, 0)
        assert logger_prefix(history) == before
        assert loss_prefixes(history) == [f"{before}losses.pde-loss/", f"{before}losses.data-loss/"]
    lone = History()
    lone.add({"grad_norm/u-x": 1.0}, 0)
    assert logger_prefix(lone) == "" and loss_prefixes(lone) == [""]


def test_the_report_judges_each_step_against_its_own_threshold() -> None:
    """A fit resumed with a lower threshold: its earlier points, below their own (higher)
    threshold, were reported as held for a balancer in a run that had none."""
    from lightning_pinn.report import History, diagnose

    history = History()
    for step in range(4):
        history.add({"grad_ratio": 500.0, "grad_ratio_threshold": 1e6, "alarm/grad_ratio": 0.0}, step)
    for step in range(4, 6):
        history.add({"grad_ratio": 500.0, "grad_ratio_threshold": 100.0, "alarm/grad_ratio": 1.0}, step)
    assert diagnose(history).ratio_held_steps == []


def test_the_report_takes_loss_paths_from_the_layout(tmp_path: Any) -> None:
    """Loss paths sharing a dashed start (ModuleDict keys 'loss-a', 'loss-b') were read as a logger
    prefix 'losses.loss-' and reported as losses 'a' and 'b', beside the fit's own reports."""
    from lightning_pinn.report import report_runs

    class DashedLosses(TwoTermPoisson):
        def __init__(self) -> None:
            super().__init__()
            self.losses = torch.nn.ModuleDict({"loss-a": MultiTermLoss(pde=1.0, bc=1.0), "loss-b": MultiTermLoss(pde=1.0, bc=1e-3)})
            del self.criterion

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            residuals = self.residuals()
            return sum(loss(**residuals) for loss in self.losses.values())

    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    monitors = [GradientNormMonitor(every_n_steps=1, loss_module=f"losses.{key}", verbose=False) for key in ("loss-a", "loss-b")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(3, monitors, logger=logger).fit(DashedLosses())
    written = sorted(path.name for path, _, _ in report_runs(tmp_path / "run" / "version_0"))
    assert written == ["diagnosis_losses.loss-a.md", "diagnosis_losses.loss-b.md"]


def test_the_layout_reads_back_the_prefixes_it_was_built_with() -> None:
    from lightning_pinn.tensorboard import dashboard_layout, losses_in_layout, terms_in_layout

    terms = ["pde", "u.x", "v|w", "a(b)+c", "λ_ic", "z\\q", "ends\\", "w"]  # a trailing backslash before a '|' too
    for loss, logger in [("", ""), ("losses.loss-a/", ""), ("a+b(c)/", "train-"), ("λ_pde/", "a-b-")]:
        [(title, charts)] = dashboard_layout(loss, logger, terms).items()
        first = next(iter(charts.values()))[1][0]
        assert losses_in_layout([(title, first)]) == {logger + loss: loss.rstrip("/")}
        assert terms_in_layout([(title, [regex for chart in charts.values() for regex in chart[1]])]) == {logger + loss: terms}
        [(title, charts)] = dashboard_layout(loss, logger).items()  # as written before the layout named the terms
        assert terms_in_layout([(title, [regex for chart in charts.values() for regex in chart[1]])]) == {}
    assert losses_in_layout([("someone else's", "^grad_norm/")]) == {}


class _PathLosses(TwoTermPoisson):
    """Two losses in an nn.ModuleDict, under a key chosen by the test."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        self.losses = torch.nn.ModuleDict({key: MultiTermLoss(u=1.0, v=1.0)})

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        u = self.net(self.x)
        return self.criterion(**self.residuals()) + self.losses[self.key](u=u - 1, v=10 * u)


@pytest.mark.parametrize("key", ["bc/left", "bc right"])
def test_a_loss_path_that_would_split_its_tags_or_file_name_is_refused_at_fit_start(key: str) -> None:
    model = _PathLosses(key)
    with pytest.raises(ValueError, match=r"a '/' or whitespace there would split the tags.*key to 'bc_(left|right)'"):
        make_trainer(2, [GradientNormMonitor(loss_module=f"losses.{key}", verbose=False)]).fit(model)
    assert model.trainer.global_step == 0
    nested = _PathLosses("inner")
    nested.losses = torch.nn.ModuleDict({"outer loss": torch.nn.ModuleDict({"inner": MultiTermLoss(u=1.0, v=1.0)})})
    with pytest.raises(ValueError, match=r"key to 'outer_loss'\."):  # the key that holds the space
        make_trainer(2, [GradientNormMonitor(loss_module="losses.outer loss.inner", verbose=False)]).fit(nested)


def test_the_report_reads_no_loss_into_a_modules_own_tags_and_follows_a_logger_prefix() -> None:
    """A module's own "val/weight_target/x" is not a balancer's (no weight/x beside it); a logger
    prefix is recognised from the balancers' tags alone (it named the reports "train-criterion")."""
    from lightning_pinn.report import History, logger_prefix, loss_prefixes

    own = History()
    for tag in ["grad_norm/pde", "grad_norm/bc", "weight/bc", "weight_target/bc", "val/weight_target/x"]:
        own.add({tag: 1.0}, 0)
    assert loss_prefixes(own) == [""]
    prefixed = History()
    for tag in [
        "train-criterion/weight/pde",
        "train-criterion/weight_target/pde",
        "train-losses.extra/weight/u",
        "train-losses.extra/weight_target/u",
        "train-epoch",
    ]:
        prefixed.add({tag: 1.0}, 0)
    assert logger_prefix(prefixed) == "train-"
    assert loss_prefixes(prefixed) == ["train-criterion/", "train-losses.extra/"]


def test_the_report_command_writes_a_report_per_loss_that_only_balancers_watched(tmp_path: Any) -> None:
    """No monitor: each loss's weights are still reported (the command found no loss before)."""
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    balancers = [GradNormBalancer(loss_module="criterion", every_n_steps=5), GradNormBalancer(loss_module="losses.extra", every_n_steps=5)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(20, balancers, logger=logger).fit(_PathLosses("extra"))
    from lightning_pinn.report import report_runs

    reports = {path.name: text for path, text, reason in report_runs(tmp_path) if reason is None}
    assert set(reports) == {"diagnosis_criterion.md", "diagnosis_losses.extra.md"}
    assert "u: 1 →" in reports["diagnosis_losses.extra.md"] and "v: 1 throughout (unchanged)" in reports["diagnosis_losses.extra.md"]
    assert "bc: 1 →" in reports["diagnosis_criterion.md"]


def test_an_absent_term_of_the_alarmed_pair_neither_ends_nor_restarts_the_ratio_alarm() -> None:
    # A data term with a tiny λ, present on odd batches only; measured every 5 steps, so every
    # other measurement lacks it. The imbalance never changes: one episode, on throughout.
    model = ExtraTermPoisson("data", lambda m, i: m.net(m.x[::4]) - 0.5 if i % 2 else None, weight=1e-6)
    monitor = GradientNormMonitor(every_n_steps=5, verbose=False, report=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(31, [monitor]).fit(model)
    alarms = [w for w in caught if issubclass(w.category, LossBalanceWarning)]
    d = monitor.diagnosis
    assert len(alarms) == 1 and d.ratio_alarm_episodes == 1
    assert d.ratio_alarm_spans == [[5, None]] and d.ratio_alarm_active
    assert d.ratio_alarm_pair is not None and "data" in d.ratio_alarm_pair
    # the measurements without the term are not counted as above the threshold
    assert d.ratio_alarm_measurements == 3  # steps 5, 15, 25
    report = diagnose(monitor.history)  # what diagnosis.md and `lightning-pinn report` say
    assert report.ratio_spans == [(5, None)] and report.ratio_measurements_above == 3
    # the pair is kept in the checkpoint state, so a resumed fit keeps the alarm too
    restored = GradientNormMonitor(every_n_steps=5, verbose=False, report=False)
    restored._load_state(monitor.state_dict())
    assert restored.diagnosis.ratio_alarm_pair == d.ratio_alarm_pair


class _RecordingLogger(pl.loggers.Logger):
    """A logger that keeps metrics in memory and names ``save_dir`` (where the report goes)."""

    def __init__(self, save_dir: str) -> None:
        super().__init__()
        self._save_dir = save_dir
        self.metrics: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    @property
    def save_dir(self) -> str:
        return self._save_dir

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def test_a_report_that_cannot_be_written_warns_and_the_fit_still_finishes(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "a_file"
    not_a_folder.write_text("x")
    monitor = GradientNormMonitor(every_n_steps=2, verbose=False)
    after = pl.callbacks.LambdaCallback(on_fit_end=lambda trainer, module: setattr(trainer, "_after_ran", True))
    trainer = make_trainer(4, [monitor, after], logger=_RecordingLogger(str(not_a_folder)))
    with pytest.warns(UserWarning, match=r"the fit finished, but its report diagnosis\.md could not be written"):
        trainer.fit(TwoTermPoisson())
    assert trainer.state.status == "finished" and getattr(trainer, "_after_ran", False)
    assert monitor.report_path is None and len(monitor.history["grad_norm/pde"][0]) == 2


def test_the_report_goes_through_a_remote_loggers_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fsspec = pytest.importorskip("fsspec")
    monkeypatch.chdir(tmp_path)  # (a local folder named "memory:" would appear here)
    monitor = GradientNormMonitor(every_n_steps=2, verbose=False)
    logger = CSVLogger("memory://lightning_pinn_test_logs", name="run")
    make_trainer(4, [monitor], logger=logger).fit(TwoTermPoisson())
    memory = fsspec.filesystem("memory")
    try:
        assert monitor.report_path == f"{logger.log_dir}/diagnosis.md"
        assert "Loss-balance diagnosis" in memory.cat(monitor.report_path).decode()
        assert memory.cat(f"{logger.log_dir}/diagnosis.png").startswith(b"\x89PNG")
        assert not any(tmp_path.iterdir()), "nothing written to a local folder"
    finally:
        memory.rm("/lightning_pinn_test_logs", recursive=True)


def test_two_monitors_on_one_loss_are_refused_and_on_two_losses_allowed() -> None:
    first = GradientNormMonitor(threshold=100.0, verbose=False, report=False)
    second = GradientNormMonitor(threshold=10.0, verbose=False, report=False)
    with pytest.raises(ValueError, match=r"two GradientNormMonitor callbacks watch the same loss \('criterion'\).*loss_module="):
        make_trainer(2, [first, second]).fit(TwoTermPoisson())

    a = GradientNormMonitor(loss_module="criterion", verbose=False, report=False)
    b = GradientNormMonitor(loss_module="data_loss", threshold=10.0, verbose=False, report=False)
    make_trainer(2, [a, b]).fit(TwoLossPoisson())
    assert "grad_norm/pde" in a.history and "grad_norm/data" in b.history


def test_a_first_logger_without_a_folder_is_named_instead_of_a_silent_skip(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    monitor = GradientNormMonitor(every_n_steps=2)
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(4, [monitor], logger=_RecordingLogger(None)).fit(TwoTermPoisson())  # type: ignore[arg-type]
    assert monitor.report_path is None
    assert any("no report written: the first logger (_RecordingLogger) has no folder" in r.getMessage() for r in caplog.records)


def test_the_report_counts_an_alarm_at_a_nan_ratio_but_not_one_held_over_an_absent_term(tmp_path: Path) -> None:
    from lightning_pinn.report import History, plot_history

    for ratios, above in (([200.0, float("nan")], 2), ([200.0, 5.0], 1)):
        history = History()
        for step, ratio in zip((0, 10), ratios):
            history.add({"grad_norm/a": 1.0, "grad_ratio": ratio, "grad_ratio_threshold": 100.0, "alarm/grad_ratio": 1.0}, step)
        assert diagnose(history).ratio_measurements_above == above
    plot_history(history, tmp_path / "history.svg")  # the format follows the file name
    assert "<svg" in (tmp_path / "history.svg").read_text()[:2000]


@pytest.mark.parametrize("ratio_terms", [None, ["pde", "data"]])
def test_the_ratio_alarm_ends_when_a_term_of_its_pair_is_dropped_for_good(
    caplog: pytest.LogCaptureFixture, ratio_terms: list[str] | None
) -> None:
    # present at steps 0-3 only (a curriculum dropping a term): the alarm about it ends after
    # three measurements without it, longer than it was ever absent before, and says why; also
    # where no ratio is left without it (ratio_terms of two, or a two-term loss)
    import logging

    model = ExtraTermPoisson("data", lambda m, i: m.net(m.x[::4]) - 0.5 if m.global_step < 4 else None, weight=1e-6)
    monitor = GradientNormMonitor(every_n_steps=1, report=False, ratio_terms=ratio_terms)
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(12, [monitor]).fit(model)
    d = monitor.diagnosis
    assert d.ratio_alarm_spans == [[0, 6]] and not d.ratio_alarm_active and d.ratio_alarm_pair is None
    ended = [r.getMessage() for r in caplog.records if "one of the alarmed pair" in r.getMessage()]
    assert len(ended) == 1 and "'data', one of the alarmed pair, has been absent from the last 3 measurements" in ended[0]
    assert diagnose(monitor.history).ratio_measurements_above == d.ratio_alarm_measurements == 4


def test_a_term_that_first_appears_late_has_not_been_absent_and_come_back() -> None:
    # present at steps 8-10 only: its absence before step 8 does not lengthen the wait after it is dropped
    model = ExtraTermPoisson("data", lambda m, i: m.net(m.x[::4]) - 0.5 if 8 <= m.global_step <= 10 else None, weight=1e-6)
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(20, [monitor]).fit(model)
    assert monitor.diagnosis.ratio_alarm_spans[-1] == [8, 13]  # three measurements without it (11-13)


def test_the_advice_on_a_conflict_depends_on_whether_it_cleared() -> None:
    # a solved fit with a temporary conflict (the demo's λ_IC = 100) was told to use a hard constraint
    from lightning_pinn.report import History, render_markdown

    def report(flags: list[float]) -> str:
        history = History()
        for step, flag in zip((0, 250, 850, 1000), flags):
            history.add({"grad_norm/pde": 1.0, "grad_norm/ic": 1.0, "grad_cosine/pde_vs_ic": -0.9}, step)
            history.add({"alarm/grad_conflict/pde_vs_ic": flag}, step)
        return render_markdown(diagnose(history))

    cleared, ongoing = report([0.0, 1.0, 0.0, 0.0]), report([0.0, 1.0, 1.0, 1.0])
    assert "conflict alarm cleared: a phase of the fit" in cleared and "still fought" not in cleared
    assert "hard constraint" in ongoing and "still fought at the end" in ongoing


def test_a_conflict_alarm_ends_when_a_term_of_its_pair_is_dropped_for_good() -> None:
    # 'data' pulls u at the boundary to 1 where 'bc' pulls it to 0 (opposed gradients), then is
    # dropped at step 4: the pair's alarm ends after three measurements without it
    model = ExtraTermPoisson("data", lambda m, i: m.net(m.xb) - 1.0 if m.global_step < 4 else None)
    monitor = GradientNormMonitor(every_n_steps=1, cosine_patience=2, conflict_min_decrease=None, verbose=False, report=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(12, [monitor]).fit(model)
    spans = [span for span in monitor.diagnosis.conflict_alarm_spans if "data" in span[:2]]
    assert spans == [["bc", "data", 1, 6]]
    report = render_markdown(diagnose(monitor.history)).splitlines()
    assert not any("'data'" in line and "still fought" in line for line in report)


def test_a_rerun_of_the_same_bad_fit_shows_its_alarm_again_under_the_default_filter() -> None:
    """Python's default filter shows a warning once per text and line for the whole process: a
    notebook re-running the same bad fit (same seed, so the same message) saw its alarm once.
    Each callback keeps its own registry per fit, so each fit shows it, with a new monitor or the
    same one."""

    def bad_fit(monitor: GradientNormMonitor) -> None:
        torch.manual_seed(0)
        make_trainer(20, [monitor]).fit(HarmonicOscillator(ic_weight=1.0, steps_per_epoch=20))

    reused = GradientNormMonitor(every_n_steps=10, verbose=False, report=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for monitor in (GradientNormMonitor(every_n_steps=10, verbose=False, report=False), reused, reused):
            bad_fit(monitor)
    alarms = _of(list(caught), LossBalanceWarning)
    assert len(alarms) == 3 and len(set(alarms)) == 1, alarms


def test_an_alarm_turned_into_an_error_stops_the_fit_after_its_measurement_is_recorded() -> None:
    """The README suggests warnings.simplefilter("error", LossBalanceWarning). The error used to
    come out in the middle of the step-0 measurement: the alarm was counted but the measurement
    was neither in the history nor in the logs, and a refit of the same Trainer reported two
    episodes and a worst ratio from step 10."""
    torch.manual_seed(0)
    model = HarmonicOscillator(ic_weight=1.0, steps_per_epoch=40)
    monitor = GradientNormMonitor(every_n_steps=10, verbose=False, report=False)
    trainer = make_trainer(40, [monitor])
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossBalanceWarning)
        with pytest.raises(LossBalanceWarning, match="alarm at step 0"):
            trainer.fit(model)
    assert monitor.history["grad_ratio"][0] == [0] and monitor.history["alarm/grad_ratio"][1] == [1.0]
    assert trainer.callback_metrics["grad_ratio"] > 100
    diagnosis = monitor.diagnosis
    assert (diagnosis.measurements, diagnosis.ratio_alarm_episodes, diagnosis.ratio_alarm_active) == (1, 1, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)  # the same Trainer goes on from step 1
    assert monitor.diagnosis.ratio_alarm_episodes == 1 and monitor.diagnosis.worst_ratio_step == 0
    assert monitor.history["grad_ratio"][0] == [0, 10, 20, 30]


def test_a_new_model_fitted_on_the_same_trainer_starts_the_callbacks_afresh(tmp_path: Path) -> None:
    """Raising max_steps and fitting another model on the same Trainer continued the first model's
    history (grad_norm/pde across both networks) and the balancer's smoothing."""
    from conftest import ExtraTermPoisson

    from lightning_pinn.callbacks import GradNormBalancer

    monitor = GradientNormMonitor(every_n_steps=5, verbose=False, report=False)
    balancer = GradNormBalancer(every_n_steps=5)
    trainer = make_trainer(10, [monitor, balancer])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TwoTermPoisson())
    assert balancer.num_updates == 2
    trainer.fit_loop.epoch_loop.max_steps = 20
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ExtraTermPoisson("data", lambda model, batch_idx: model.net(model.x) - 0.5))
    messages = [str(w.message) for w in caught if "trained another model" in str(w.message)]
    assert len(messages) == 2 and "['pde', 'bc', 'data']" in messages[0]
    assert monitor.history["grad_norm/pde"][0] == [10, 15] and monitor.diagnosis.first_step == 10
    assert balancer.num_updates == 2  # counted afresh: its first update took λ̂ directly


def test_a_stopped_fit_prints_what_was_measured_and_a_later_fit_has_no_stale_report_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pytorch_lightning.loggers import TensorBoardLogger

    monitor = GradientNormMonitor(every_n_steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(10, [monitor], logger=TensorBoardLogger(str(tmp_path))).fit(TwoTermPoisson())
    assert monitor.report_path is not None

    class Stops(TwoTermPoisson):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if batch_idx == 7:
                raise RuntimeError("stopped by the user")
            return super().training_step(batch, batch_idx)

    with caplog.at_level(logging.INFO), warnings.catch_warnings(), pytest.raises(RuntimeError, match="stopped by the user"):
        warnings.simplefilter("ignore")
        make_trainer(10, [monitor]).fit(Stops())
    stopped = [r.getMessage() for r in caplog.records if "the fit stopped" in r.getMessage()]
    assert len(stopped) == 1 and "(RuntimeError) after 7 optimizer step(s)" in stopped[0] and "2 measurement(s), steps 0-5" in stopped[0]
    assert monitor.report_path is None

    # a fit that fails before the monitor is attached to it has measured nothing: no summary of the last fit
    class NoOptimizer(TwoTermPoisson):
        def configure_optimizers(self) -> Any:
            raise RuntimeError("no optimizer")

    caplog.clear()
    with caplog.at_level(logging.INFO), warnings.catch_warnings(), pytest.raises(RuntimeError, match="no optimizer"):
        warnings.simplefilter("ignore")
        make_trainer(10, [monitor]).fit(NoOptimizer())
    assert not [r for r in caplog.records if "the fit stopped" in r.getMessage()]


def test_the_warnings_of_a_measurement_that_fails_are_still_shown() -> None:
    """A NaN gradient's warning held until the end of the measurement was dropped when the
    measurement failed later (here: a logger that cannot write), though it explains the failure."""
    from conftest import ExtraTermPoisson
    from pytorch_lightning.loggers import Logger

    class FullDiskLogger(Logger):
        name, version = "full", 0

        @property
        def experiment(self) -> None:
            return None

        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            raise OSError("No space left on device")

    model = ExtraTermPoisson("data", lambda model, batch_idx: model.net(model.x) * float("nan"))
    monitor = GradientNormMonitor(every_n_steps=10, verbose=False, report=False)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(OSError, match="No space"):
        warnings.simplefilter("always")
        make_trainer(20, [monitor], logger=FullDiskLogger()).fit(model)
    assert any("'data'" in message for message in _of(list(caught), TermGradientWarning))


def test_other_ranks_show_no_warning_but_stop_where_rank_zero_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DDP only rank zero shows a warning; an "error" filter must stop every rank at the same
    step, or rank zero stops while the others wait in the next collective until a timeout."""
    from pytorch_lightning.utilities import rank_zero_only

    from lightning_pinn.alerts import FitWarnings

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    channel = FitWarnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        channel.warn("shown on rank zero only", LossBalanceWarning)
        assert caught == []
        warnings.simplefilter("error", LossBalanceWarning)
        with pytest.raises(LossBalanceWarning, match="rank zero only"):
            channel.warn("shown on rank zero only", LossBalanceWarning)


class HugeBoundaryScale(TwoTermPoisson):
    """A float64 model whose 'bc' residual is scaled by 1e100: finite gradients of ~1e200."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        residuals = self.residuals()
        return self.criterion(pde=residuals["pde"], bc=1e100 * residuals["bc"])


def test_finite_float64_gradients_beyond_1e154_are_measured_not_called_infinite() -> None:
    torch.manual_seed(0)
    model = HugeBoundaryScale().double()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    balancer = GradNormBalancer(every_n_steps=1)
    trainer = make_trainer(3, [monitor, balancer])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    assert not [w for w in caught if "NaN or infinite" in str(w.message)]
    metrics = trainer.callback_metrics
    assert 1e190 < float(metrics["grad_norm/bc"]) < math.inf
    assert math.isfinite(float(metrics["grad_ratio"]))
    assert -1.0 <= float(metrics["grad_cosine/pde_vs_bc"]) <= 1.0
    assert balancer.skipped_updates == 0 and balancer.num_updates == 3


class TinyBoundaryScale(TwoTermPoisson):
    """A float64 model whose 'bc' residual is scaled by 1e-100: non-zero gradients of ~1e-200."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        residuals = self.residuals()
        return self.criterion(pde=residuals["pde"], bc=1e-100 * residuals["bc"])


@pytest.mark.parametrize("scale", [1e-100, 1e-158, 1e-200])
def test_tiny_float64_gradient_norms_and_cosines_are_exact_not_underflowed(scale: float) -> None:
    gradients = torch.tensor([[3.0, 4.0, 0.0], [1.0, 2.0, 2.0]], dtype=torch.float64) * scale
    assert gradient_norms(gradients).tolist() == pytest.approx([5.0 * scale, 3.0 * scale], rel=1e-14)
    report = summarize_gradients(("a", "b"), torch.ones(2), torch.ones(2, dtype=torch.float64), gradients)
    assert report.norms == pytest.approx((5.0 * scale, 3.0 * scale), rel=1e-14)
    assert report.zero_terms == ()
    assert report.ratio == pytest.approx(5.0 / 3.0, rel=1e-14)
    assert report.cosines[("a", "b")] == pytest.approx(11.0 / 15.0, rel=1e-14)
    assert gradient_norms(torch.zeros(2, 3, dtype=torch.float64)).tolist() == [0.0, 0.0]


def test_a_float64_term_with_gradients_of_1e_minus_200_is_measured_not_called_zero() -> None:
    torch.manual_seed(0)
    model = TinyBoundaryScale().double()
    residuals = model.residuals()
    params = [p for p in model.parameters() if p.requires_grad]
    expected = flat_gradient((1e-100 * residuals["bc"]).square().mean(), params)
    expected_norm = math.sqrt(float(((expected / expected.abs().max()) ** 2).sum())) * float(expected.abs().max())
    pde = flat_gradient(residuals["pde"].square().mean(), params)
    expected_cosine = float(torch.nn.functional.cosine_similarity(pde, expected / expected.abs().max(), dim=0))
    assert 1e-230 < expected_norm < 1e-170
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    trainer = make_trainer(1, [monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    assert not [w for w in caught if "zero gradient" in str(w.message)]
    metrics = trainer.callback_metrics
    assert float(metrics["grad_norm/bc"]) == pytest.approx(expected_norm, rel=1e-12)
    assert "grad_ratio" in metrics and math.isfinite(float(metrics["grad_ratio"]))
    assert float(metrics["grad_cosine/pde_vs_bc"]) == pytest.approx(expected_cosine, rel=1e-9, abs=1e-12)
