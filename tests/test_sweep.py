"""The λ sweep (`lightning-pinn sweep`) and the history recorder it is built on."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_trainer

from lightning_pinn.callbacks import GradNormBalancer
from lightning_pinn.problems import HarmonicOscillator
from lightning_pinn.recording import HistoryRecorder
from lightning_pinn.sweep import grid_weights


def _sweep_command() -> list[str]:
    installed = shutil.which("lightning-pinn", path=str(Path(sys.executable).parent))
    return [installed] if installed else [sys.executable, "-m", "lightning_pinn.cli"]


def test_sweep_command_writes_table_plot_and_histories(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = ["sweep", "--grid-min", "0", "--grid-max", "2", "--steps", "30", "--balancers", "gradnorm-max", "ntk"]
    done = subprocess.run([*_sweep_command(), *args, "--workers", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # progress: one line per fit as it finishes (3 fixed weights + 2 balancers)
    progress = [line for line in done.stdout.splitlines() if line.startswith("  [")]
    assert len(progress) == 5 and progress[-1].startswith("  [5/5]") and all("rel. L2" in line for line in progress)
    for name in ("sweep.csv", "sweep.md", "sweep.png", "sweep.json"):
        assert (out / name).stat().st_size > 0
    table = (out / "sweep.md").read_text()
    for label in ("λ_IC=1", "λ_IC=10", "λ_IC=100", "gradnorm-max", "ntk"):
        assert f"| {label} |" in table
    fits = json.loads((out / "sweep.json").read_text())
    assert len(fits) == 5
    balanced = next(fit for fit in fits if fit["spec"]["method"] == "gradnorm-max")
    assert balanced["history_weights"]["ic"][0] == 1.0  # the balancer starts from λ_IC = 1 ...
    assert balanced["final_weights"]["ic"] > 10  # ... and raises it (the IC gradient is ~250x smaller)
    assert all(math.isfinite(fit["relative_l2"]) for fit in fits)


def test_sweep_rejects_an_empty_grid() -> None:
    with pytest.raises(ValueError, match="grid_max >= grid_min"):
        grid_weights(2, 1, 1)
    assert grid_weights(-1, 1, 1) == pytest.approx([0.1, 1.0, 10.0])
    with pytest.raises(ValueError, match="grid_step=5e-324 is too small"):  # an OverflowError before
        grid_weights(-3, 5, 5e-324)


def test_sweep_refuses_an_unwritable_folder_and_bad_seeds_before_training(tmp_path: Path) -> None:
    """A folder that cannot be written used to fail after every fit had run (all work lost); a
    seed NumPy cannot take failed inside a worker after the folder was made."""
    from lightning_pinn.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["sweep", "--steps", "1", "--grid-min", "0", "--grid-max", "0", "--out", str(blocker / "sweep")]) == 2
    with pytest.raises(SystemExit) as exited:
        main(["sweep", "--seeds", "-1", "--out", str(tmp_path / "never")])
    assert exited.value.code == 2 and not (tmp_path / "never").exists()
    assert main(["sweep", "--grid-step", "0.001", "--out", str(tmp_path / "fine")]) == 2  # 8001 fits: refused
    # counted, not built: 6e10 weights used to be materialised before the check
    assert main(["sweep", "--grid-min", "-30", "--grid-max", "30", "--grid-step", "1e-9", "--out", str(tmp_path / "huge")]) == 2


def test_sweep_in_one_process_keeps_one_thread_and_dedupes_seeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_pinn.cli import main

    threads = torch.get_num_threads()
    args = ["sweep", "--grid-min", "0", "--grid-max", "0", "--balancers", "--steps", "2", "--seeds", "0", "0", "--workers", "1"]
    assert main([*args, "--out", str(tmp_path / "s")]) == 0
    assert torch.get_num_threads() == threads, "the caller's thread count is restored"
    assert "1 seed(s)" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "s" / "sweep.json").read_text())) == 1


def test_history_recorder_records_losses_weights_and_errors() -> None:
    torch.manual_seed(0)
    model = HarmonicOscillator(steps_per_epoch=20)
    recorder = HistoryRecorder(history_every=5, error_every=10)
    balancer = GradNormBalancer(every_n_steps=5)
    make_trainer(20, [recorder, balancer]).fit(model)
    history = recorder.history
    assert history.steps == [0, 5, 10, 15]
    assert set(history.losses) == {"pde", "ic"} and all(len(v) == 4 for v in history.losses.values())
    # the recorder runs before the balancer: it sees the weights each recorded step trained with
    assert history.weights["ic"][0] == 1.0 and history.weights["ic"][1] > 10
    assert history.error_steps == [10, 20] and history.errors[-1] == pytest.approx(model.relative_l2_error())
    assert 0 < history.error_seconds[0] <= history.error_seconds[1] <= history.train_seconds
    reached: Any = history.first_reaching(10.0)
    assert reached == (10, history.error_seconds[0])
    assert history.first_reaching(0.0) is None


def test_history_recorder_keeps_an_absent_terms_losses_aligned_with_the_steps() -> None:
    """A term passed as None on some steps got no entry there, so its losses were paired with the
    wrong steps (and a plot against the steps failed on the unequal lengths)."""
    from conftest import ExtraTermPoisson

    model = ExtraTermPoisson("data", lambda m, _: None if m.global_step < 4 else m.net(m.x[:4]) - 0.3)
    recorder = HistoryRecorder(history_every=1)
    make_trainer(6, [recorder]).fit(model)
    history = recorder.history
    assert history.steps == [0, 1, 2, 3, 4, 5] and all(len(values) == 6 for values in history.losses.values())
    data = history.losses["data"]
    assert all(math.isnan(value) for value in data[:4]) and all(math.isfinite(value) for value in data[4:])


def test_history_recorder_records_each_optimizer_step_once_under_gradient_accumulation() -> None:
    torch.manual_seed(0)
    model = HarmonicOscillator(steps_per_epoch=40, hidden=(8,))
    recorder = HistoryRecorder(history_every=2, error_every=2)
    make_trainer(8, [recorder], accumulate_grad_batches=2).fit(model)
    assert recorder.history.steps == [0, 2, 4, 6]
    assert recorder.history.error_steps == [2, 4, 6, 8]


def test_a_history_recorder_reused_for_a_second_fit_records_its_first_step() -> None:
    """Suspected by review: the recorder's last seen step was kept across fits, so a new Trainer's
    first step (global_step 1 again) looked like an accumulation micro-batch and was skipped."""
    torch.manual_seed(0)
    recorder = HistoryRecorder(history_every=1)
    make_trainer(1, [recorder]).fit(HarmonicOscillator(steps_per_epoch=10, hidden=(8,)))
    make_trainer(2, [recorder]).fit(HarmonicOscillator(steps_per_epoch=10, hidden=(8,)))
    assert recorder.history.steps == [0, 0, 1]


def test_an_interrupted_sweep_writes_the_fits_that_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_pinn.sweep as sweep_module
    from lightning_pinn.cli import main

    real_run_fits = sweep_module.run_fits

    def interrupted_after_one(specs: Any, workers: int = 0, on_result: Any = None) -> Any:
        [result] = real_run_fits(specs[:1], workers=1)
        on_result(1, len(specs), result)
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_module, "run_fits", interrupted_after_one)
    out = tmp_path / "s"
    assert main(["sweep", "--grid-min", "0", "--grid-max", "1", "--balancers", "--steps", "2", "--out", str(out)]) == 130
    assert "(interrupted: 1 of 2 fits)" in (out / "sweep.md").read_text()
    assert len(json.loads((out / "sweep.json").read_text())) == 1


def test_an_interrupted_sweep_plots_a_balancer_whose_first_seed_had_not_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fits finish out of order: Ctrl-C after a balancer's seed-1 fit but before its seed-0 fit
    crashed the plot with a KeyError, and only sweep.csv was written."""
    import lightning_pinn.sweep as sweep_module
    from lightning_pinn.cli import main

    def interrupted(specs: Any, workers: int = 0, on_result: Any = None) -> Any:
        done = [s for s in specs if s.method == "fixed" and s.seed == 0] + [s for s in specs if s.method == "ntk" and s.seed == 1]
        for index, spec in enumerate(done, 1):
            losses = {"pde": [1.0, 0.1], "ic": [1.0, 0.1]}
            result = sweep_module.FitResult(spec, 0.5, {"pde": 1.0, "ic": 1.0}, 1.0, history_steps=[0, 10], history_losses=losses)
            on_result(index, len(specs), result)
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_module, "run_fits", interrupted)
    out = tmp_path / "s"
    args = ["sweep", "--seeds", "0", "1", "--balancers", "ntk", "--grid-min", "0", "--grid-max", "1", "--out", str(out)]
    assert main(args) == 130
    assert sorted(path.name for path in out.iterdir()) == ["sweep.csv", "sweep.json", "sweep.md", "sweep.png"]


def test_the_sweep_plot_shows_a_bad_case_off_a_grid_without_one_and_leaves_the_backend_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grid without λ_IC = 1 left the "bad" panel out (an empty slot); and the plot switched the
    caller's matplotlib backend to Agg (a notebook's inline figures stopped showing)."""
    import matplotlib
    from matplotlib.figure import Figure

    import lightning_pinn.sweep as sweep_module

    results = []
    for method, weight, error in (("fixed", 100.0, 3e-3), ("fixed", 1000.0, 1e-3), ("fixed", 1e5, 0.9), ("gradnorm-max", 1.0, 2e-3)):
        spec = sweep_module.FitSpec(method, weight, seed=0, steps=20)
        losses = {"pde": [1.0, 0.1], "ic": [1.0, 0.1]}
        results.append(sweep_module.FitResult(spec, error, {"pde": 1.0, "ic": weight}, 1.0, history_steps=[0, 10], history_losses=losses))
    titles: list[str] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (titles.extend(ax.get_title() for ax in self.axes), save(self, *a, **k)))
    backend = matplotlib.get_backend()
    sweep_module.plot_sweep(sweep_module.summarize(results), results, tmp_path / "sweep.png", "title")
    assert matplotlib.get_backend() == backend
    panels = [title.split("\n")[0] for title in titles[1:]]
    assert panels == ["bad: worst fixed λ_IC=100000", "good: best fixed λ_IC=1000", "balanced: gradnorm-max"], panels
    assert (tmp_path / "sweep.png").stat().st_size > 0


@pytest.mark.parametrize("diverged_at", [0, 2])
def test_a_diverged_fit_is_the_worst_fixed_weight_never_the_best(tmp_path: Path, diverged_at: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """min/max with a NaN key answer by the NaN's position: a diverged fit was shown as the best."""
    from matplotlib.figure import Figure

    import lightning_pinn.sweep as sweep_module

    errors = [0.5, 0.01, 0.2]
    errors[diverged_at] = math.nan
    results = []
    for weight, error in zip((0.1, 10.0, 100.0), errors):
        spec = sweep_module.FitSpec("fixed", weight, seed=0, steps=20)
        results.append(
            sweep_module.FitResult(spec, error, {"pde": 1.0, "ic": weight}, 1.0, history_steps=[0, 10], history_losses={"ic": [1.0, 0.1]})
        )
    titles: list[str] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (titles.extend(ax.get_title() for ax in self.axes), save(self, *a, **k)))
    summaries = sweep_module.summarize(results)
    sweep_module.plot_sweep(summaries, results, tmp_path / "sweep.png", "title")
    diverged = results[diverged_at].spec.label
    assert [title.split("\n")[0] for title in titles[1:]] == [f"bad: worst fixed {diverged}", "good: best fixed λ_IC=10"]
    assert min(summaries, key=sweep_module.ranking_error).label == "λ_IC=10"
