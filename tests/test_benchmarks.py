"""The benchmark scripts run for a new user: each one, with a tiny budget, in a fresh process.

These check that the scripts work and print what benchmarks/README.md says they print; the
numbers themselves come from full runs (see benchmarks/results/), never from a test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, stderr: bool = False) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr if stderr else done.stdout


def test_overhead_script_prints_ratios() -> None:
    out = _run("benchmarks/overhead.py", "--rounds", "1", "--steps", "10")
    for name in (
        "monitor-default / lightning",
        "capture-every / lightning",
        "balancer-every / lightning",
        "monitor-every-unbatched / lightning",
        "lightning / plain-loop",
        "median of the per-round ratios",
    ):
        assert name in out


def test_ntk_cost_script_prints_its_tables() -> None:
    out = _run("benchmarks/ntk_cost.py", "--points", "16", "--memory-points", "32", "--update-steps", "40", "--widths", "8")
    assert "| 16 | exact |" in out and "| 16 | sampled, 64 points/term |" in out
    assert "one-hot loop / default" in out and "products / default" in out and "| 32 |" in out
    assert "| 8 | 177 |" in out and "sums / default" in out  # 2-8-8-8-1: 177 parameters


def test_helmholtz_reference_loop_prints_its_table() -> None:
    out = _run("benchmarks/helmholtz_reference.py", "--steps", "12", "--seeds", "0", "--workers", "1")
    assert "| plain |" in out and "| annealing |" in out


def test_accuracy_script_prints_the_table() -> None:
    out = _run("benchmarks/accuracy.py", "--seeds", "0", "--budgets", "2:10", "--skip-cost", "--workers", "1", stderr=True)
    assert "gradnorm-max" in out and "ntk" in out and "λ_IC=1000" in out
    assert "[1/12] ω = 2π, 10 steps: λ_IC=0.001, seed 0: relative L2" in out and "[12/12]" in out  # progress, one line per fit


@pytest.mark.parametrize("problem", ["harmonic", "wave", "helmholtz"])
def test_papers_script_writes_sections_and_results(tmp_path: Path, problem: str) -> None:
    out = _run(
        "benchmarks/papers.py",
        "--problems",
        problem,
        "--seeds",
        "0",
        "--harmonic-steps",
        "10",
        "--wave-steps",
        "10",
        "--wave-width",
        "8",
        "--helmholtz-steps",
        "10",
        "--workers",
        "2",
        "--sections-dir",
        str(tmp_path),
        "--output",
        str(tmp_path / "RESULTS.md"),
    )
    assert "| plain |" in out
    section = (tmp_path / f"papers_{problem}.md").read_text()
    assert section.startswith("## ") and "| method | median rel. L2 |" in section
    assert section in (tmp_path / "RESULTS.md").read_text()


def test_wave_weights_script_writes_its_tables(tmp_path: Path) -> None:
    output = tmp_path / "wave_weights.md"
    _run(
        "benchmarks/wave_weights.py",
        "--methods",
        "gradnorm-max",
        "--seeds",
        "0",
        "--steps",
        "10",
        "--every",
        "5",
        "--width",
        "8",
        "--output",
        str(output),
    )
    text = output.read_text()
    assert "### gradnorm-max, seed 0" in text and "| 10 |" in text


@pytest.mark.skipif(not __import__("torch").distributed.is_available(), reason="torch.distributed is not available")
def test_gloo_exit_abort_script_counts_both_variants() -> None:
    out = _run("benchmarks/gloo_exit_abort.py", "--launches", "1")
    assert "without destroy_process_group(): " in out and "with    destroy_process_group(): " in out


def test_many_terms_script_prints_one_row_per_k() -> None:
    out = _run("benchmarks/many_terms.py", "--terms", "2", "3", "--rounds", "1", "--steps", "5")
    assert "| 2 |" in out and "| 3 |" in out and "monitor-every-no-pairs" in out and "balancer-every" in out
