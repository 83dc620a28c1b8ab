"""Fitting the ecosystem: LightningCLI configs, a live TensorBoard server, the report, the console."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ManualOptimization, TwoTermPoisson, make_trainer
from pytorch_lightning.loggers import TensorBoardLogger

import lightning_pinn.tensorboard
from lightning_pinn.callbacks import GradientNormMonitor, GradNormBalancer
from lightning_pinn.cli import main as cli_main
from lightning_pinn.problems import HarmonicOscillator

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the example a user copies
def test_existing_trainer_example_logs_every_tag(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from existing_trainer import Poisson1D
    finally:
        sys.path.pop(0)
    from tb import load_events

    model = Poisson1D()
    trainer = make_trainer(
        40, [GradientNormMonitor(every_n_steps=20, verbose=False)], logger=TensorBoardLogger(str(tmp_path), name="example")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    tags = set(load_events(trainer.log_dir).Tags()["scalars"])
    for tag in ("grad_norm/pde", "grad_norm/bc", "grad_ratio", "loss/pde", "weight/bc", "grad_cosine/pde_vs_bc"):
        assert tag in tags, (tag, sorted(tags))
    assert (Path(trainer.log_dir) / "diagnosis.md").exists()


def test_poisson2d_example_balances_checkpoints_and_resumes(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from poisson2d_balanced import main as poisson2d
    finally:
        sys.path.pop(0)
    root = str(tmp_path / "runs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = poisson2d(["--steps", "3", "--root", root])
        print(first.trainer.callback_metrics)
        assert first.criterion.weights["bc"] > 10 * first.criterion.weights["pde"], "the small boundary gradient gets the large λ"
        assert (tmp_path / "runs" / "gradnorm" / "version_0" / "checkpoints" / "last.ckpt").exists()
        resumed = poisson2d(["--steps", "5", "--root", root, "--resume"])
        assert Path(resumed.trainer.log_dir).name == "version_0", "the resumption logs beside its fit"
        assert len(list((tmp_path / "runs" / "gradnorm" / "version_0").glob("events.out.tfevents.*"))) == 2
        ntk = poisson2d(["--steps", "2", "--root", root, "--balancer", "ntk"])
    assert resumed.trainer.global_step == 5
    assert ntk.criterion.weights != {"pde": 1.0, "bc": 1.0}  # (at step 0 the PDE's NTK trace is the smaller one here)


# ------------------------------------------------------------------ LightningCLI
def test_example_config_runs_through_lightning_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("jsonargparse")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from cli import main as lightning_cli
    finally:
        sys.path.pop(0)
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = lightning_cli(
            [
                "fit",
                "--config",
                str(ROOT / "examples" / "harmonic_balanced.yaml"),
                "--trainer.max_steps",
                "60",
                "--trainer.enable_progress_bar",
                "false",
            ]
        )
    assert isinstance(cli.model, HarmonicOscillator)
    kinds = {type(callback).__name__: callback for callback in cli.trainer.callbacks}
    assert kinds["GradientNormMonitor"].every_n_steps == 50 and kinds["GradientNormMonitor"].print_every_n_steps == 500
    assert kinds["GradNormBalancer"].rule == "max" and kinds["GradNormBalancer"].num_updates == 6
    assert cli.model.criterion.weights["ic"] > 10
    assert list(tmp_path.rglob("diagnosis.md")), "the monitor's report is written beside the logs"


# ------------------------------------------------------------------ live TensorBoard
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback only
        return json.loads(response.read().decode())


def test_live_tensorboard_serves_the_tags_and_the_layout(tmp_path: Path) -> None:
    torch.manual_seed(0)
    logger = TensorBoardLogger(str(tmp_path), name="live", version=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(40, [GradientNormMonitor(every_n_steps=10, verbose=False, report=False)], logger=logger).fit(TwoTermPoisson())
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(tmp_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--load_fast",
        "false",
        "--reload_interval",
        "1",
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        tags: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"tensorboard exited early: {server.stderr.read().decode()[-2000:] if server.stderr else ''}")
            try:
                tags = _get_json(f"http://127.0.0.1:{port}/data/plugin/scalars/tags")
                if tags and any("grad_ratio" in run_tags for run_tags in tags.values()):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert tags, "tensorboard did not serve any scalar tags within 60 s"
        run_tags = next(iter(tags.values()))
        for tag in [
            "grad_norm/pde",
            "grad_norm/bc",
            "grad_norm_weighted/bc",
            "grad_ratio",
            "grad_cosine/pde_vs_bc",
            "loss/pde",
            "weight/bc",
            "alarm/grad_ratio",
        ]:
            assert tag in run_tags, tag
        layout = _get_json(f"http://127.0.0.1:{port}/data/plugin/custom_scalars/layout")
        category = next(c for c in layout["category"] if c["title"] == "lightning-pinn")
        regexes = [regex for chart in category["chart"] for regex in chart["multiline"]["tag"]]
        assert r"^grad_norm/" in regexes and r"^grad_ratio$" in regexes and r"^weight/(?:pde|bc)$" in regexes
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


# ------------------------------------------------------------------ the report
def test_report_from_event_files_and_at_fit_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = HarmonicOscillator(ic_weight=1.0, steps_per_epoch=600)
    logger = TensorBoardLogger(str(tmp_path), name="harmonic", version=0)
    monitor = GradientNormMonitor(every_n_steps=20, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(600, [monitor], logger=logger).fit(model)
    run = tmp_path / "harmonic" / "version_0"
    at_fit_end = (run / "diagnosis.md").read_text()
    assert monitor.report_path == run / "diagnosis.md" and (run / "diagnosis.png").stat().st_size > 10_000
    for needle in [
        "Worst ratio: 499x at step 0 ('pde' over 'ic')",
        "steps 0–40",
        "'pde' vs 'ic'",
        "GradNormBalancer",
        "hard constraint",
        "stalled",
    ]:
        assert needle in at_fit_end, needle

    (run / "diagnosis.md").unlink()
    (run / "diagnosis.png").unlink()
    assert cli_main(["report", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    from_events = (run / "diagnosis.md").read_text()
    assert "Worst ratio: 499x at step 0 ('pde' over 'ic')" in printed and (run / "diagnosis.png").exists()
    # the same facts from the event files as from the monitor's memory
    assert from_events.split("## Gradient-norm ratio")[1] == at_fit_end.split("## Gradient-norm ratio")[1]


def test_report_reads_only_the_event_file_it_is_given_and_survives_a_read_only_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(4, [GradientNormMonitor(every_n_steps=1, verbose=False, report=False)], logger=logger).fit(
            HarmonicOscillator(hidden=(8,))
        )
        logger.experiment.flush()
        first = sorted((tmp_path / "run" / "version_0").glob("events.out.tfevents.*"))
        second_logger = TensorBoardLogger(str(tmp_path), name="run", version=0)  # a second run into the same folder
        make_trainer(2, [GradientNormMonitor(every_n_steps=1, verbose=False, report=False)], logger=second_logger).fit(
            HarmonicOscillator(hidden=(8,))
        )
        second_logger.experiment.flush()
    run_report_path = tmp_path / "run" / "version_0" / "diagnosis.md"
    # the folder: the second fit's points replace the first's from its first step (0) on
    assert cli_main(["report", str(tmp_path)]) == 0 and "2 measurements" in run_report_path.read_text()
    assert cli_main(["report", str(first[0])]) == 0
    assert "4 measurements" in capsys.readouterr().out, "only the given file (it used to read the whole folder)"
    assert "2 measurements" in run_report_path.read_text(), "the run's own report is not overwritten"
    assert (run_report_path.parent / f"diagnosis.{first[0].name.removeprefix('events.out.tfevents.')}.md").exists()

    import lightning_pinn.report as report_module

    def read_only(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(report_module, "_write_report_files", read_only)  # the files of a report (running as root, chmod would not stop it)
    assert cli_main(["report", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "Loss-balance diagnosis" in captured.out and "could not write it: Permission denied" in captured.err


class _LogsItsOwnTags(TwoTermPoisson):
    """A module that logs tags of its own under the library's families, as users do."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.criterion(**self.residuals())
        self.log("loss/total", loss)
        self.log("weight/decay", 1e-4)
        self.log("loss/pde", self.criterion.last_losses["pde"].detach(), on_step=True, on_epoch=True, batch_size=1)  # pde_step, _epoch
        return loss


@pytest.mark.parametrize("monitored", [True, False])
def test_report_leaves_out_the_modules_own_tags(tmp_path: Path, monitored: bool) -> None:
    # before: "total: 4.13 → 1.09", "decay: fixed at 0.0001", "pde_step: …" listed as terms, and the
    # command replaced the fit's correct report with that one
    callbacks = [GradientNormMonitor(every_n_steps=5, verbose=False)] if monitored else [GradNormBalancer(every_n_steps=5)]
    trainer = make_trainer(20, callbacks, logger=TensorBoardLogger(str(tmp_path), name="run"), log_every_n_steps=5, limit_train_batches=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_LogsItsOwnTags())
    assert cli_main(["report", str(tmp_path)]) == 0
    text = (Path(trainer.log_dir) / "diagnosis.md").read_text()
    for user_tag in ("total", "decay", "pde_step", "pde_epoch"):
        assert f"- {user_tag}:" not in text
    assert "- pde:" in text and "- bc:" in text  # the loss's own terms (weights, and losses when measured)


def test_report_keeps_a_balanced_term_the_monitor_never_measured(tmp_path: Path) -> None:
    # present on odd steps only, measured on even ones: no grad_norm/data, but its λ moved
    from conftest import ExtraTermPoisson

    model = ExtraTermPoisson("data", lambda m, i: m.net(m.x[::4]) - 0.5 if i % 2 else None)
    callbacks = [GradientNormMonitor(every_n_steps=2, verbose=False), GradNormBalancer(every_n_steps=1, terms=["data"])]
    trainer = make_trainer(12, callbacks, logger=TensorBoardLogger(str(tmp_path), name="run"), log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    fit_end = (Path(trainer.log_dir) / "diagnosis.md").read_text()
    assert "- data: 1 →" in fit_end
    assert cli_main(["report", str(tmp_path)]) == 0
    assert "- data: 1 →" in (Path(trainer.log_dir) / "diagnosis.md").read_text()


def test_report_on_a_folder_without_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", str(tmp_path)]) == 2
    assert "holds no TensorBoard event files" in capsys.readouterr().err
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    (tmp_path / "notes.txt").write_text("not an event file")
    assert cli_main(["report", str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt is not a TensorBoard event file" in capsys.readouterr().err


# ------------------------------------------------------------------ console
def test_console_table_and_progress_bar(caplog: pytest.LogCaptureFixture) -> None:
    monitor = GradientNormMonitor(every_n_steps=50, print_every_n_steps=20, verbose=False)
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(41, [monitor], enable_progress_bar=True)
        trainer.fit(TwoTermPoisson())
    tables = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [t.splitlines()[0] for t in tables] == ["step 0:", "step 20:", "step 40:"]
    assert "λ‖∇L‖" in tables[0] and "grad_ratio" in tables[0] and "pde" in tables[0]
    # the per-term ratio column: the smallest weighted norm reads 1x, the largest grad_ratio
    assert tables[0].splitlines()[1].split()[-1] == "ratio" and "1x" in [row.split()[-1] for row in tables[0].splitlines()[2:4]]
    report = monitor.last_report  # step 0's (steps 20 and 40 were measured for the table only)
    assert report is not None and report.ratio is not None
    largest_row = next(line for line in tables[0].splitlines() if line.split()[0] == report.largest)
    assert largest_row.split()[-1] == f"{report.ratio:.3g}x"
    assert "grad_ratio" in trainer.progress_bar_metrics


def test_package_is_typed() -> None:
    import lightning_pinn

    assert (Path(lightning_pinn.__file__).parent / "py.typed").exists()


def test_balancer_config_round_trip() -> None:
    """Callback arguments are plain serialisable values (what LightningCLI writes to config.yaml)."""
    balancer = GradNormBalancer(rule="mean", terms=["ic"], reference=None, every_n_steps=5)
    assert balancer.state_key == GradNormBalancer(rule="mean", terms=("ic",), every_n_steps=5).state_key
    assert shutil.which(sys.executable)


@pytest.mark.parametrize(
    "arguments",
    [
        ["sweep", "--grid-max", "inf"],
        ["sweep", "--grid-min", "400", "--grid-max", "400"],
        ["sweep", "--grid-step", "nan"],
        ["sweep", "--workers", "-1"],
        ["sweep", "--omega", "nan"],
        ["demo", "--omega", "1e200"],  # ω² overflowed in the residual (OverflowError) after the set-up
        ["demo", "--ic-weights", "1e39"],
        ["demo", "--ic-weights", "1", "1e-46"],  # stored as 0: refused after the λ = 1 fit had run
    ],
)
def test_cli_refuses_values_that_cannot_work(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(arguments)
    assert exited.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_measurements_reach_callback_metrics_for_early_stopping_and_checkpoints(tmp_path: Path) -> None:
    """Every logged value is the latest ``trainer.callback_metrics`` entry, also without a logger."""
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    torch.manual_seed(0)
    monitor = GradientNormMonitor(every_n_steps=5, report=False)
    # the first epoch-end check already meets the threshold: the fit stops after one epoch
    stop = EarlyStopping(monitor="grad_ratio", stopping_threshold=1e12, mode="min", check_on_train_epoch_end=True)
    best = ModelCheckpoint(dirpath=tmp_path, monitor="loss/pde", mode="min", save_on_train_epoch_end=True)
    trainer = make_trainer(200, [monitor, GradNormBalancer(every_n_steps=5), stop, best], limit_train_batches=10, enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # measured often enough for the checks: no warning
        warnings.filterwarnings("ignore", message=".*(LeafSpec|does not have many workers|Checkpoint directory).*")
        trainer.fit(TwoTermPoisson())
    assert trainer.global_step == 10
    metrics = trainer.callback_metrics
    for tag in ("grad_norm/pde", "grad_norm_weighted/bc", "grad_ratio", "loss/pde", "weight/bc", "weight_target/bc"):
        assert tag in metrics, tag
    steps, values = monitor.history["grad_norm/pde"]
    assert steps[-1] == 5 and float(metrics["grad_norm/pde"]) == pytest.approx(values[-1], rel=1e-12)
    assert best.best_model_path and Path(best.best_model_path).exists()


def test_a_pinn_module_without_logger_or_monitor_still_publishes_its_term_losses(tmp_path: Path) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    from lightning_pinn.problems import HarmonicOscillator

    torch.manual_seed(0)
    best = ModelCheckpoint(dirpath=tmp_path, monitor="loss/pde", mode="min", save_on_train_epoch_end=True)
    trainer = make_trainer(6, [best], enable_checkpointing=True, log_every_n_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "could not find the monitored key"
        warnings.filterwarnings("ignore", message=".*(LeafSpec|does not have many workers|Checkpoint directory).*")
        trainer.fit(HarmonicOscillator(hidden=(8,), collocation_points=16, steps_per_epoch=6))
    assert float(trainer.callback_metrics["loss/pde"]) > 0 and "weight/ic" in trainer.callback_metrics
    assert best.best_model_path and Path(best.best_model_path).exists()


def test_a_check_more_frequent_than_the_measurements_is_warned_about(tmp_path: Path) -> None:
    """EarlyStopping on a tag checked every epoch (4 steps) while the monitor measures every 50."""
    from pytorch_lightning.callbacks import EarlyStopping

    stop = EarlyStopping(monitor="loss/pde", patience=3, check_on_train_epoch_end=True)
    trainer = make_trainer(40, [GradientNormMonitor(report=False), stop], limit_train_batches=4)
    with pytest.warns(
        UserWarning,
        match=r"EarlyStopping\(monitor='loss/pde'\) checks about every 4 optimizer.*"
        r"counts such repeats as no improvement.*every_n_steps=4.*EarlyStopping\(patience=13\)",
    ):
        trainer.fit(TwoTermPoisson())


class _ValidatedPoisson(TwoTermPoisson):
    """TwoTermPoisson with a one-batch validation loop (8 training batches per epoch)."""

    def train_dataloader(self) -> range:
        return range(8)

    def val_dataloader(self) -> range:
        return range(1)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass


@pytest.mark.parametrize(
    ("watcher", "every_n_steps", "options", "expected"),
    [
        # validation every 2 batches: EarlyStopping checks after each run, every 2 steps (it once
        # went unwarned, saw the step-0 value three times and stopped the fit at step 6)
        ("early-stopping", 8, {"val_check_interval": 2}, 2),
        ("early-stopping", 8, {"val_check_interval": 0.25}, 2),
        ("checkpoint", 8, {"val_check_interval": 2}, 2),
        # validation every second epoch (16 steps): a fresh value at every check (once a false alarm)
        ("early-stopping", 16, {"check_val_every_n_epoch": 2}, None),
        ("checkpoint", 16, {"check_val_every_n_epoch": 2}, None),
        ("early-stopping", 24, {"check_val_every_n_epoch": 2}, 16),
        # a GradientAccumulationScheduler's 4 batches per step: 2 steps per epoch (once unwarned)
        ("early-stopping", 4, {"accumulation_schedule": {0: 4}, "limit_val_batches": 0}, 2),
        ("early-stopping", 4, {"accumulate_grad_batches": 4, "limit_val_batches": 0}, 2),
    ],
)
def test_the_cadence_warning_follows_when_lightnings_callbacks_really_check(
    tmp_path: Path, watcher: str, every_n_steps: int, options: dict[str, Any], expected: int | None
) -> None:
    from pytorch_lightning.callbacks import EarlyStopping, GradientAccumulationScheduler, ModelCheckpoint

    options = dict(options)
    extra: list[Any] = []
    if "accumulation_schedule" in options:
        extra.append(GradientAccumulationScheduler(options.pop("accumulation_schedule")))
    if watcher == "early-stopping":
        check: Any = EarlyStopping(monitor="loss/pde", patience=2)
    else:
        check = ModelCheckpoint(dirpath=tmp_path, monitor="loss/pde", mode="min")
    monitor = GradientNormMonitor(every_n_steps=every_n_steps, verbose=False, report=False)
    trainer = make_trainer(
        -1, [monitor, check, *extra], max_epochs=1, num_sanity_val_steps=0, enable_checkpointing=watcher == "checkpoint", **options
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_ValidatedPoisson())
    messages = [str(w.message) for w in caught if "checks about every" in str(w.message)]
    if expected is None:
        assert messages == []
    else:
        assert len(messages) == 1 and f"checks about every {expected} optimizer step(s)" in messages[0], messages


def test_a_check_on_a_weight_is_warned_about_by_the_callback_that_renews_it(tmp_path: Path) -> None:
    # λ_bc is written by the balancer (every 5 steps), not by the monitor (every 10): no warning;
    # λ_pde, which no balancer changes, is the monitor's tag and still warned about
    from pytorch_lightning.callbacks import ModelCheckpoint

    from lightning_pinn.callbacks import GradNormBalancer

    def fit(watched: str) -> list[str]:
        best = ModelCheckpoint(dirpath=tmp_path / watched.replace("/", "_"), monitor=watched, mode="max")
        monitor = GradientNormMonitor(every_n_steps=10, verbose=False, report=False)
        trainer = make_trainer(
            10, [monitor, GradNormBalancer(every_n_steps=5, terms=["bc"]), best], limit_train_batches=5, enable_checkpointing=True
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(TwoTermPoisson())
        return [str(w.message) for w in caught if "checks about every" in str(w.message)]

    assert fit("weight/bc") == []
    assert len(fit("weight/pde")) == 1
    # a balancer's λ renewed less often than it is checked is warned about by the balancer
    best = ModelCheckpoint(dirpath=tmp_path / "balancer", monitor="weight/bc", mode="max")
    trainer = make_trainer(4, [GradNormBalancer(every_n_steps=20), best], limit_train_batches=4, enable_checkpointing=True)
    with pytest.warns(
        UserWarning,
        match=r"GradNormBalancer: ModelCheckpoint\(monitor='weight/bc'\) checks about every 4 .*every 20 steps.*"
        r"measured up to 20 steps earlier.*GradNormBalancer\(every_n_steps=4\).*keep it as it is if that is fine",
    ):
        trainer.fit(TwoTermPoisson())


def test_a_tensorboard_logger_subclass_that_overrides_log_metrics_gets_every_measurement(tmp_path: Path) -> None:
    calls: list[tuple[int, list[str]]] = []

    class RenamingTensorBoard(TensorBoardLogger):
        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            calls.append((int(step or 0), sorted(metrics)))
            super().log_metrics({f"pinn/{key}": value for key, value in metrics.items()}, step)

    logger = RenamingTensorBoard(str(tmp_path), name="run")
    trainer = make_trainer(20, [GradientNormMonitor(every_n_steps=5, report=False)], logger=logger)
    trainer.fit(TwoTermPoisson())
    measured = [step for step, keys in calls if "grad_norm/pde" in keys]
    assert measured == [0, 5, 10, 15]
    # with a logger, the values logged are also in trainer.logged_metrics (the last of each tag)
    assert float(trainer.logged_metrics["grad_norm/pde"]) == float(trainer.callback_metrics["grad_norm/pde"]) > 0


def test_the_fit_time_and_event_file_reports_date_the_first_weight_change_alike(tmp_path: Path) -> None:
    from lightning_pinn.report import diagnose, read_history

    torch.manual_seed(0)
    monitor = GradientNormMonitor(every_n_steps=3, report=False)
    trainer = make_trainer(
        20, [monitor, GradNormBalancer(every_n_steps=5)], logger=TensorBoardLogger(str(tmp_path), name="run"), log_every_n_steps=7
    )
    trainer.fit(TwoTermPoisson())
    from_events = diagnose(read_history(trainer.logger.log_dir))
    at_fit_time = diagnose(monitor.history)
    # the first update (step 0) applies from step 1; the monitor's next measurement is step 3
    assert from_events.weights_first_changed == at_fit_time.weights_first_changed == 1
    # the same weight series, so the same λ ranges (the monitor's measurements between two throttled
    # balancer logs used to add points the event files do not have)


def test_the_fit_time_and_event_file_reports_read_the_same_weight_series(tmp_path: Path) -> None:
    """The balancer logs λ once per log_every_n_steps; the monitor measures between those points."""
    from lightning_pinn.report import diagnose, read_history

    torch.manual_seed(0)
    monitor = GradientNormMonitor(every_n_steps=2, report=False)
    trainer = make_trainer(
        30,
        [monitor, GradNormBalancer(every_n_steps=1, momentum=0.5)],
        logger=TensorBoardLogger(str(tmp_path), name="run"),
        log_every_n_steps=10,
    )
    trainer.fit(TwoTermPoisson())
    events = read_history(trainer.logger.log_dir)
    for term in ("pde", "bc"):
        logged = dict(zip(*events[f"weight/{term}"]))
        assert dict(zip(*monitor.history[f"weight/{term}"])) == pytest.approx(logged, rel=1e-6), term
    from_events, at_fit_time = diagnose(events), diagnose(monitor.history)
    for term, values in at_fit_time.weights.items():
        assert values == pytest.approx(from_events.weights[term], rel=1e-6), term
    steps, _ = monitor.history["weight/bc"]
    assert steps == sorted(steps)


def test_demo_runs_into_the_same_folder_get_their_own_version(tmp_path: Path) -> None:
    """Two runs' event files in one folder were read as one run (by TensorBoard and the report)."""
    from lightning_pinn.demo import run_harmonic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = run_harmonic(1.0, steps=2, every_n_steps=1, log_dir=tmp_path)
        second = run_harmonic(1.0, steps=2, every_n_steps=1, log_dir=tmp_path)
    assert first.log_dir is not None and second.log_dir is not None
    assert Path(first.log_dir).name == "seed_0" and Path(second.log_dir).name == "seed_0_2"


def test_the_demo_trains_a_repeated_ic_weight_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli_main(["demo", "--ic-weights", "1", "1", "100", "--steps", "2", "--no-hard-ic", "--logdir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("training with λ_IC = 1 ...") == 1 and out.count("training with λ_IC = 100 ...") == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ic_weight_1", "ic_weight_100"]


def test_the_command_without_a_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main([]) == 2
    assert "demo" in capsys.readouterr().err


def test_the_command_has_a_version_and_runs_as_a_module() -> None:
    """The version is the installed distribution's (pyproject.toml's), not a second copy of it."""
    from importlib.metadata import version

    import lightning_pinn

    done = subprocess.run([sys.executable, "-m", "lightning_pinn", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"lightning-pinn {version('lightning-pinn')}" == f"lightning-pinn {lightning_pinn.__version__}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{version("lightning-pinn")}"' in pyproject
    assert subprocess.run([sys.executable, "-m", "lightning_pinn"], capture_output=True, text=True).returncode == 2


@pytest.mark.parametrize("encoding", ["ascii", "cp1252"])
def test_the_command_prints_on_a_console_without_unicode_and_writes_utf8_files(tmp_path: Path, encoding: str) -> None:
    """A console that cannot encode λ, – or → (PYTHONIOENCODING=ascii, a cp1252 Windows console)
    gets '?' for them; the command must not stop with a UnicodeEncodeError, and the files it
    writes are UTF-8 whatever the console's or the platform's encoding."""
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(6, [GradientNormMonitor(every_n_steps=1, verbose=False, report=False)], logger=logger).fit(TwoTermPoisson())
    env = {**os.environ, "PYTHONIOENCODING": encoding, "PYTHONUTF8": "0"}
    done = subprocess.run([sys.executable, "-m", "lightning_pinn", "report", str(tmp_path)], capture_output=True, env=env)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    printed = done.stdout.decode(encoding)
    assert "Worst ratio" in printed and "?" in printed  # the dash of "steps 0–5" or λ, replaced
    written = (tmp_path / "run" / "version_0" / "diagnosis.md").read_bytes().decode("utf-8")
    assert "–" in written or "λ" in written


def test_the_report_piped_into_a_reader_that_stops_early_ends_quietly(tmp_path: Path) -> None:
    """`lightning-pinn report LOGDIR | head` printed a BrokenPipeError traceback once head had gone."""
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(6, [GradientNormMonitor(every_n_steps=1, verbose=False, report=False)], logger=logger).fit(TwoTermPoisson())
    child = subprocess.Popen(
        [sys.executable, "-m", "lightning_pinn", "report", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # the reader goes away before the report is printed
    errors = child.stderr.read().decode(errors="replace")
    child.wait(timeout=120)
    assert "Traceback" not in errors and "BrokenPipeError" not in errors, errors[-2000:]
    assert child.returncode == 1
    assert (tmp_path / "run" / "version_0" / "diagnosis.md").exists()  # the files are written before the printing


def test_a_broken_pipe_that_is_not_stdouts_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only stdout's closed reader ends quietly: a worker's broken pipe is reported, not hidden (and
    stdout replaced by an object without a file descriptor is left alone)."""
    import io

    import lightning_pinn.cli as cli

    def broken(args: Any) -> int:
        raise BrokenPipeError("a worker's pipe")

    monkeypatch.setattr(cli, "run_report", broken)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    with pytest.raises(BrokenPipeError, match="a worker's pipe"):
        cli.main(["report", str(tmp_path)])


def test_the_report_warns_about_event_files_it_cannot_read(tmp_path: Path) -> None:
    from lightning_pinn.report import read_history

    (tmp_path / "events.out.tfevents.123.host.1").write_text("garbage")
    with pytest.warns(UserWarning, match="no events could be read"):
        assert len(read_history(tmp_path)) == 0


def test_the_report_lists_the_weights_in_the_losss_order() -> None:
    from lightning_pinn.report import History, diagnose

    history = History()
    history.add({"weight/ic": 2.0}, 0)  # a schedule of one term logs first
    history.add({"loss/pde": 1.0, "loss/ic": 0.5, "weight/pde": 1.0}, 0)
    history.add({"weight/ic": 3.0, "weight/pde": 1.0}, 10)
    assert list(diagnose(history).weights) == ["pde", "ic"]


def test_report_reads_a_resumed_attempt_over_the_first_and_keeps_a_report_that_covers_more(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from lightning_pinn.report import read_history, report_runs

    def write(folder: Path, steps: range, extra: str | None = None) -> None:
        writer = SummaryWriter(str(folder))
        writer.add_scalar("hp_metric", -1.0, 0)  # as Lightning logs at every fit's start, resumed or not
        for step in steps:
            writer.add_scalar("grad_norm/pde", 1.0 + step, step)
            writer.add_scalar("grad_norm/bc", 1.0, step)
            if extra is not None and step >= 11:
                writer.add_scalar(extra, 1.0, step)  # a tag only the abandoned attempt wrote
        writer.close()

    # a fit that crashed after step 14, resumed from its step-10 checkpoint into the same folder:
    # the second attempt's points replace the first's from step 10 on (steps 10-14 were counted
    # twice), for every tag, also one the second attempt never writes
    same = tmp_path / "same"
    write(same, range(0, 15, 2), extra="alarm/grad_conflict/bc_vs_data")
    time.sleep(1.1)  # (event file names start with the time in seconds)
    write(same, range(10, 29, 2))
    history = read_history(same)
    steps, values = history["grad_norm/pde"]
    assert steps == list(range(0, 29, 2)) and values == [1.0 + s for s in steps]
    assert "alarm/grad_conflict/bc_vs_data" not in history
    # a report of an abandoned longer branch does not block the rewrite (it does not start earlier)
    (same / "diagnosis.md").write_text("<!-- lightning-pinn coverage: measurements=40 first_step=0 -->\n")
    [(path, _, reason)] = report_runs(same)
    assert reason is None and "15 measurements" in path.read_text()

    # another writer's file in the run's folder (your own SummaryWriter, a later trainer.test())
    # is not a resumption: it dropped every point after its first step (30 measurements -> 1)
    other = tmp_path / "other"
    write(other, range(0, 29, 2))
    time.sleep(1.1)
    writer = SummaryWriter(str(other))
    writer.add_scalar("extra/rel_l2", 0.5, 2)
    writer.close()
    steps, _ = read_history(other)["grad_norm/pde"]
    assert steps == list(range(0, 29, 2)) and read_history(other)["extra/rel_l2"] == ([2], [0.5])
    # ... also when its file is the older one (a writer opened before the logger's)
    older = tmp_path / "older"
    writer = SummaryWriter(str(older))
    for step in (2, 12, 22):
        writer.add_scalar("extra/rel_l2", 0.5, step)
    writer.close()
    time.sleep(1.1)
    write(older, range(0, 29, 2))
    assert read_history(older)["extra/rel_l2"][0] == [2, 12, 22]
    # a resumed fit's file replaces the earlier ones from its first step, not from its first
    # measurement: the user's own self.log'd tags between the two are counted once
    mixed = tmp_path / "mixed"
    for measured, logged in ((range(0, 101, 50), range(0, 130, 10)), (range(100, 151, 50), range(80, 160, 10))):
        writer = SummaryWriter(str(mixed))
        for step in measured:
            writer.add_scalar("grad_norm/pde", 1.0, step)
        for step in logged:
            writer.add_scalar("train_loss", float(step), step)
        writer.close()
        time.sleep(1.1)
    assert read_history(mixed)["train_loss"][0] == list(range(0, 160, 10))

    # a fit resumed into a new version folder: its fit-time report covers the whole run (from the
    # monitor's checkpointed history), the folder's event files only the resumed part
    resumed = tmp_path / "version_1"
    write(resumed, range(20, 29, 2))
    kept = "# Loss-balance diagnosis\n\n15 measurements, steps 0–28.\n\n<!-- lightning-pinn coverage: measurements=15 first_step=0 -->\n"
    (resumed / "diagnosis.md").write_text(kept)
    [(path, _, reason)] = report_runs(resumed)
    assert path.read_text() == kept and reason is not None and "covers more of the run" in reason


@pytest.mark.parametrize(
    ("scheduler_config", "accumulate", "plateau", "warned"),
    [
        ({"interval": "step"}, 1, True, "interval='step', frequency=1"),
        ({"interval": "step", "frequency": 10}, 1, True, None),
        # Lightning counts `frequency` in batches: with 2 batches per optimizer step, 10 batches are 5 steps
        ({"interval": "step", "frequency": 10}, 2, True, "interval='step', frequency=10"),
        # only plateau schedulers get the monitored value
        ({"interval": "step"}, 1, False, None),
    ],
)
def test_an_lr_scheduler_on_a_rarely_renewed_tag_is_warned_about(
    scheduler_config: dict[str, Any], accumulate: int, plateau: bool, warned: str | None
) -> None:
    """ReduceLROnPlateau stepped every step on a tag renewed every 10 reads nine repeats out of ten as a plateau."""

    class ScheduledPoisson(TwoTermPoisson):
        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
            if plateau:
                scheduler: Any = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=5)
            else:
                scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "loss/pde", **scheduler_config}}

    monitor = GradientNormMonitor(every_n_steps=10, verbose=False, report=False)
    trainer = make_trainer(4, [monitor], accumulate_grad_batches=accumulate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ScheduledPoisson())
    messages = [str(w.message) for w in caught if "checks about every" in str(w.message)]
    if warned:
        assert len(messages) == 1 and f"ReduceLROnPlateau (monitor='loss/pde', {warned})" in messages[0], messages
        assert "ReduceLROnPlateau(patience=" in messages[0]
    else:
        assert messages == []


def test_a_scheduler_under_manual_optimisation_is_not_warned_about() -> None:
    """Lightning steps no scheduler under manual optimisation (it drops the config's monitor), so
    nothing reads the tag at a cadence and nothing is warned about."""

    class ManualPlateau(ManualOptimization):
        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": "loss/pde", "interval": "step"}}

    trainer = make_trainer(4, [GradientNormMonitor(every_n_steps=10, verbose=False, report=False)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ManualPlateau())
    assert not [w for w in caught if "checks about every" in str(w.message)]


# ------------------------------------------------------------------ TensorBoard's event checksums in C
def _event_records(folder: Path) -> bytes:
    (events,) = folder.glob("events.out.tfevents.*")
    return events.read_bytes()


def _write_fixed_events(folder: Path) -> bytes:
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for step in range(5):
        values = [Summary.Value(tag=f"grad_cosine/t{i}_vs_t{j}", simple_value=0.1 * i - 0.01 * j) for i in range(30) for j in range(i)]
        writer._get_file_writer().add_summary(Summary(value=values), step, walltime=1000.0 + step)
    writer.close()
    data = _event_records(folder)
    first = 8 + 4 + int.from_bytes(data[:8], "little") + 4  # the file-version record holds the creation time
    return data[first:]


_C_CHECKSUMS = lightning_pinn.tensorboard.c_crc32c() is not None


@pytest.mark.skipif(not _C_CHECKSUMS, reason="google-crc32c without its C build (the checksums then stay TensorBoard's own)")
def test_event_checksums_in_c_write_the_same_bytes_and_fits_use_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
    from tensorboard.summary.writer import record_writer

    from lightning_pinn.tensorboard import fast_event_checksums

    monkeypatch.setattr(record_writer, "masked_crc32c", pywrap_tensorflow.masked_crc32c)  # TensorBoard's pure Python
    pure = _write_fixed_events(tmp_path / "pure")
    assert fast_event_checksums() and record_writer.masked_crc32c is not pywrap_tensorflow.masked_crc32c
    assert _write_fixed_events(tmp_path / "c") == pure
    sample = bytes(range(256)) * 5
    for data in (sample, bytearray(sample), memoryview(sample), b""):  # every bytes-like type TensorBoard's own takes
        assert record_writer.masked_crc32c(data) == pywrap_tensorflow.masked_crc32c(data)

    # a fit with a TensorBoardLogger makes the swap, and TensorBoard (which checks every checksum) reads it
    monkeypatch.setattr(record_writer, "masked_crc32c", pywrap_tensorflow.masked_crc32c)
    logger = TensorBoardLogger(str(tmp_path), name="fit")
    make_trainer(4, [GradientNormMonitor(every_n_steps=1, verbose=False, report=False)], logger=logger).fit(TwoTermPoisson())
    assert record_writer.masked_crc32c is not pywrap_tensorflow.masked_crc32c
    from tb import load_events

    assert len(load_events(logger.log_dir).Scalars("grad_norm/pde")) == 4

    # a checksum function someone else put there is left alone
    def theirs(data: bytes) -> int:
        return pywrap_tensorflow.masked_crc32c(data)

    monkeypatch.setattr(record_writer, "masked_crc32c", theirs)
    assert not fast_event_checksums() and record_writer.masked_crc32c is theirs
