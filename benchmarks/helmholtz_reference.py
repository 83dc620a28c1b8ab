"""The 2021 paper's Helmholtz problem in a plain PyTorch loop, without lightning-pinn.

A cross-check for ``benchmarks/papers.py``: if the library's balanced Helmholtz error is far from
the paper's, is the library wrong, or does the paper's algorithm not reach its number on this
setup? This script trains the paper's setup (Δu + u = q on [−1,1]², u = sin(πx)·sin(4πy)) with the learning-rate
annealing *as the released code ran it*, written independently of the library:

* inputs standardised by the mean and standard deviation of 10⁵ uniform domain points, the
  Laplacian divided by σ² accordingly;
* boundary loss = sum of the four edges' mean squared errors, one weight λ for it;
* every 10 steps, *after* the optimizer step and on the same batch:
  ``λ̂ = max_layers max|∇_W L_r| / mean_layers mean|∇_W (λ·L_b)|`` over the weight matrices
  only (no biases), ``λ ← 0.9·λ + 0.1·λ̂`` starting from λ = 1 (so the first update is
  smoothed too);
* 2-50-50-50-1 tanh, Xavier-normal weights and zero biases, Adam lr 1e-3·0.9^(step/1000),
  fresh batches of 128 residual points and 128 points per edge each step, relative L² on a
  100×100 grid.

    python benchmarks/helmholtz_reference.py                       # plain and annealed, seeds 0 1 2
    python benchmarks/helmholtz_reference.py --steps 2000 --seeds 0 --methods annealing

Prints a markdown table (one fit per process, two processes at a time).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import platform
import statistics
import time
from datetime import date

A1, A2, K = 1.0, 4.0, 1.0
EDGES = (((-1.0, -1.0), (1.0, -1.0)), ((1.0, -1.0), (1.0, 1.0)), ((1.0, 1.0), (-1.0, 1.0)), ((-1.0, 1.0), (-1.0, -1.0)))


def fit(method: str, seed: int, steps: int, batch: int = 128) -> dict[str, float | str | int]:
    """Train one network; return its relative L² error, final λ and wall time."""
    import torch

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    def exact(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(A1 * math.pi * x[:, :1]) * torch.sin(A2 * math.pi * x[:, 1:])

    def forcing(x: torch.Tensor) -> torch.Tensor:
        return (K - (A1 * math.pi) ** 2 - (A2 * math.pi) ** 2) * exact(x)

    def uniform(low: tuple[float, float], high: tuple[float, float], n: int) -> torch.Tensor:
        lo, hi = torch.tensor(low), torch.tensor(high)
        return lo + (hi - lo) * torch.rand(n, 2, generator=generator, dtype=torch.float64)

    domain = uniform((-1.0, -1.0), (1.0, 1.0), 100_000)
    mean, std = domain.mean(0), domain.std(0, unbiased=False)
    widths = [2, 50, 50, 50, 1]
    weights = [torch.nn.Parameter(torch.randn(a, b) * math.sqrt(2.0 / (a + b))) for a, b in zip(widths, widths[1:])]
    biases = [torch.nn.Parameter(torch.zeros(1, b)) for b in widths[1:]]

    def net(x: torch.Tensor) -> torch.Tensor:
        h = x
        for w, b in zip(weights[:-1], biases[:-1]):
            h = torch.tanh(h @ w + b)
        return h @ weights[-1] + biases[-1]

    def scaled(x: torch.Tensor) -> torch.Tensor:
        return ((x - mean) / std).float()

    def losses(edge_points: list[torch.Tensor], points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        boundary = sum(((net(scaled(p)) - exact(p).float()) ** 2).mean() for p in edge_points)
        z = scaled(points).requires_grad_(True)
        u = net(z)
        (du,) = torch.autograd.grad(u.sum(), z, create_graph=True)
        (d2x,) = torch.autograd.grad(du[:, 0].sum(), z, create_graph=True)
        (d2y,) = torch.autograd.grad(du[:, 1].sum(), z, create_graph=True)
        laplacian = d2x[:, :1] / float(std[0]) ** 2 + d2y[:, 1:] / float(std[1]) ** 2
        residual = laplacian + K * u - forcing(points).float()
        return (residual**2).mean(), boundary  # type: ignore[return-value]

    optimizer = torch.optim.Adam([*weights, *biases], lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9 ** (step / 1000))
    weight = 1.0
    start = time.perf_counter()
    for step in range(steps):
        edge_points = [uniform(a, b, batch) for a, b in EDGES]
        points = uniform((-1.0, -1.0), (1.0, 1.0), batch)
        residual_loss, boundary_loss = losses(edge_points, points)
        optimizer.zero_grad()
        (residual_loss + weight * boundary_loss).backward()
        optimizer.step()
        schedule.step()
        if method == "annealing" and step % 10 == 0:
            residual_loss, boundary_loss = losses(edge_points, points)
            residual_grads = torch.autograd.grad(residual_loss, weights, retain_graph=True)
            boundary_grads = torch.autograd.grad(weight * boundary_loss, weights)
            largest = max(g.abs().max().item() for g in residual_grads)
            mean_of_means = statistics.fmean(g.abs().mean().item() for g in boundary_grads)
            weight = 0.9 * weight + 0.1 * largest / mean_of_means
    seconds = time.perf_counter() - start
    side = torch.linspace(-1, 1, 100, dtype=torch.float64)
    grid = torch.cartesian_prod(side, side)
    with torch.no_grad():
        error = (torch.linalg.norm(net(scaled(grid)).double() - exact(grid)) / torch.linalg.norm(exact(grid))).item()
    return {"method": method, "seed": seed, "error": error, "weight": weight, "seconds": seconds}


def _fit(args: tuple[str, int, int]) -> dict[str, float | str | int]:
    return fit(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40_001, help="optimizer steps per fit (the paper's 40,001)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one fit per seed and method")
    parser.add_argument(
        "--methods", nargs="+", choices=["plain", "annealing"], default=["plain", "annealing"], help="λ_bc = 1, or the released annealing"
    )
    parser.add_argument("--workers", type=int, default=2, help="fits in parallel, one process and one thread each")
    args = parser.parse_args()
    import torch

    jobs = [(method, seed, args.steps) for method in args.methods for seed in args.seeds]
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        results = pool.map(_fit, jobs)
    wall = time.perf_counter() - started
    seeds = " ".join(map(str, args.seeds))
    print(
        f"`python benchmarks/helmholtz_reference.py --steps {args.steps} --seeds {seeds}` on {date.today()}; "
        f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, one thread per fit, "
        f"{args.workers} fits in parallel; wall time {wall:.0f} s.\n"
    )
    print("| method (plain PyTorch loop) | median rel. L2 | per seed | final λ_bc per seed | median training time |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        rows = [r for r in results if r["method"] == method]
        errors = [float(r["error"]) for r in rows]
        per_seed = " ".join(f"{e:.2e}" for e in errors)
        weights = " ".join(f"{float(r['weight']):.3g}" for r in rows)
        seconds = statistics.median(float(r["seconds"]) for r in rows)
        print(f"| {method} | {statistics.median(errors):.2e} | {per_seed} | {weights} | {seconds:.0f} s |")


if __name__ == "__main__":
    main()
