"""Accuracy of the balancers on the harmonic IVP, and the cost of one balancer update.

Part 1 (accuracy): the harmonic oscillator u'' + ω²u = 0, u(0) = 1, u'(0) = 0 (1-32-32-32-1 tanh,
Adam 1e-3, 128 points), fixed λ_IC on the grid 10^-3 … 10^5 against GradNormBalancer (max and
mean rules) and NTKBalancer with their default arguments, each starting from λ = 1. Median
relative L² over the seeds, for ω = 2π and ω = 4π, plus the first step (checked every 100)
at which the median error reaches 1e-2 and 1e-3.

Part 2 (cost): in one fit per balancer, the wall time of every optimizer step is measured;
the ratio of the median time of update steps to the median time of the other (plain) steps
in the same fit is "one update in units of one plain step". Update and plain steps alternate
within the run, so machine noise hits both alike.

    python benchmarks/accuracy.py                      # 5 seeds; ω=2π at 2000/4000 and ω=4π at 2000/6000 steps: ~15 min on 2 cores
    python benchmarks/accuracy.py --seeds 0 1 --budgets 2:2000

Progress (one line per finished fit) goes to stderr, the tables to stdout.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def accuracy_table(omega: float, steps: int, seeds: list[int], workers: int) -> str:
    from lightning_pinn.sweep import FitSpec, grid_weights, run_fits

    methods: list[tuple[str, float]] = [("fixed", w) for w in grid_weights(-3, 5, 1)]
    methods += [("gradnorm-max", 1.0), ("gradnorm-mean", 1.0), ("ntk", 1.0)]
    specs = [FitSpec(method, weight, seed, steps, omega, error_every=100) for method, weight in methods for seed in seeds]
    start = time.perf_counter()

    def progress(done: int, total: int, result: Any) -> None:  # one line per finished fit, as `sweep` prints
        spec = result.spec
        print(
            f"  [{done}/{total}] ω = {omega / math.pi:g}π, {steps} steps: {spec.label}, seed {spec.seed}: "
            f"relative L2 {result.relative_l2:.2e} ({time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
            flush=True,
        )

    results = run_fits(specs, workers=workers, on_result=progress)
    lines = [
        f"ω = {omega / math.pi:g}π, {steps} steps, seeds {' '.join(map(str, seeds))} ({time.perf_counter() - start:.0f} s for {len(specs)} fits)",
        "",
        "| run | median rel. L2 | per seed | median reaches 1e-2 at step | median reaches 1e-3 at step | final λ_IC/λ_PDE (median) |",
        "|---|---|---|---|---|---|",
    ]
    best_fixed = math.inf
    for method, weight in methods:
        group = [r for r in results if r.spec.method == method and r.spec.ic_weight == weight]
        median = statistics.median(r.relative_l2 for r in group)
        curve = [statistics.median(r.errors[i] for r in group) for i in range(len(group[0].errors))]
        steps_at = group[0].error_steps
        to_1e2 = next((s for s, e in zip(steps_at, curve) if e <= 1e-2), None)
        to_1e3 = next((s for s, e in zip(steps_at, curve) if e <= 1e-3), None)
        ratio = statistics.median(r.final_weights["ic"] / r.final_weights["pde"] for r in group)
        label = group[0].spec.label
        if method == "fixed":
            best_fixed = min(best_fixed, median)
        lines.append(
            f"| {label} | {median:.2e} | {' '.join(f'{r.relative_l2:.1e}' for r in group)} | {to_1e2 or '-'} | {to_1e3 or '-'} | {ratio:.3g} |"
        )
    lines.append("")
    lines.append(f"best fixed λ_IC on the grid: median {best_fixed:.2e}")
    return "\n".join(lines)


def update_cost(steps: int) -> str:
    import torch
    from step_timing import update_vs_plain

    from lightning_pinn.callbacks import GradNormBalancer, NTKBalancer
    from lightning_pinn.problems import HarmonicOscillator

    rows = ["| balancer | update every | median update step | median plain step | update / plain |", "|---|---|---|---|---|"]
    configs: list[tuple[str, Any]] = [
        ("GradNormBalancer()", lambda: GradNormBalancer()),
        ("NTKBalancer() exact, N = 128 + 2", lambda: NTKBalancer(every_n_steps=10)),
        ("NTKBalancer(trace_points=32)", lambda: NTKBalancer(every_n_steps=10, trace_points=32)),
    ]
    for name, factory in configs:
        torch.manual_seed(0)
        update, plain = update_vs_plain(HarmonicOscillator(steps_per_epoch=steps), factory(), steps, every=10, warmup=20)
        rows.append(f"| {name} | 10 | {update * 1e3:.2f} ms | {plain * 1e3:.2f} ms | {update / plain:.2f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--budgets",
        nargs="+",
        default=["2:2000", "2:4000", "4:2000", "4:6000"],
        help="runs as OMEGA_OVER_PI:STEPS (default: 2:2000 2:4000 4:2000 4:6000)",
    )
    parser.add_argument("--workers", type=int, default=0, help="parallel fits (default: one per core)")
    parser.add_argument("--skip-accuracy", action="store_true", help="only measure the cost of an update")
    parser.add_argument("--skip-cost", action="store_true", help="only measure accuracy")
    args = parser.parse_args()

    print(f"# benchmarks/accuracy.py  (torch {__import__('torch').__version__}, {__import__('os').cpu_count()} CPU cores)", flush=True)
    if not args.skip_cost:
        print("\n## Cost of one balancer update (harmonic IVP, ratio of medians within one fit of 1000 steps)\n", flush=True)
        print(update_cost(1000), flush=True)
    if args.skip_accuracy:
        return
    for budget in args.budgets:
        omega_over_pi, steps = budget.split(":")
        print("\n## Accuracy: " + accuracy_table(float(omega_over_pi) * math.pi, int(steps), args.seeds, args.workers), flush=True)


if __name__ == "__main__":
    main()
