"""Cost of NTK traces: time per NTKBalancer update, batched vs per-point loop, and peak memory.

1. One ``NTKBalancer`` update on the harmonic IVP with N = 128 and N = 1024 collocation points,
   exact and sub-sampled, in units of one plain training step: in one fit, the median time of
   update steps over the median time of the other steps (side by side, same run).
2. Exact traces with ``lightning_pinn.ntk``: its default (every point's gradient norm from four
   or five backward passes, which also check that each row of the graph serves one point) and its products
   alone (``one_pass=False``: vmapped one-hot vector-Jacobian products in automatic chunks),
   against two per-point loops of ``torch.autograd.grad`` calls: one-hot cotangents on the
   residual, and one call per element of ``residual.reshape(-1)`` (ratio of medians, alternated).
3. Exact traces on wider networks (the 1D wave's residual u_tt − 4u_xx, 2-W-W-W-1 tanh, N = 300
   points): the default, which takes each weight matrix's per-point norms from Gram matrices of
   its outer-product factors, against the same route summing every point's gradient (the
   previous code, reached by switching the Gram step off) and against one backward pass of the
   loss (ratio of medians, alternated).
4. Peak memory of one exact trace computation (default; products in automatic chunks; products
   in one unchunked batch where it fits) and one sub-sampled one for N up to 10⁴, each in a
   fresh process (growth of the resident-set high-water mark during the computation), beside
   one plain backward of the same graph for scale.

    python benchmarks/ntk_cost.py                                  # everything, ~2 min on 2 idle cores
    python benchmarks/ntk_cost.py --points 128 --memory-points 128 1024
    python benchmarks/ntk_cost.py --points --memory-points --widths 32 128 500   # only the widths table
    python benchmarks/ntk_cost.py --cuda-memory-points 128 1024 4096 10000   # only the CUDA memory table (GPU)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _harmonic_residual(points: int, device: str = "cpu") -> tuple[Any, list[Any]]:
    import torch

    from lightning_pinn.autodiff import derivative
    from lightning_pinn.nn import mlp

    torch.manual_seed(0)
    net = mlp(1, (32, 32, 32), 1).to(device)
    t = torch.linspace(0, 1, points, device=device).reshape(-1, 1).requires_grad_(True)
    u = net(t)
    return derivative(u, t, order=2) + (2 * math.pi) ** 2 * u, list(net.parameters())


def update_cost(points: int, trace_points: int | None, steps: int = 200, every: int = 20) -> tuple[float, float]:
    """(median update step, median plain step) in seconds, in one fit."""
    import torch
    from step_timing import update_vs_plain

    from lightning_pinn.callbacks import NTKBalancer
    from lightning_pinn.problems import HarmonicOscillator

    torch.manual_seed(0)
    model = HarmonicOscillator(collocation_points=points, steps_per_epoch=steps)
    return update_vs_plain(model, NTKBalancer(every_n_steps=every, trace_points=trace_points), steps, every=every, warmup=every)


def batched_vs_loop(points: int, rounds: int = 5) -> dict[str, float]:
    """Median seconds of exact traces of one residual by each method (``library``: the default,
    ``products``: ``one_pass=False``, ``one-hot`` and ``unbind``: the loops), alternated.

    Two per-point loops of ``torch.autograd.grad``: one differentiates ``residual`` with a one-hot
    cotangent per point (the stronger baseline), the other differentiates each element of
    ``residual.reshape(-1)`` (what a loop over the tensor writes; each element adds a view node).
    """
    import torch

    from lightning_pinn.ntk import jacobian_row_sq_norms

    residual, params = _harmonic_residual(points)
    flat = residual.reshape(-1)

    def one_hot_loop() -> Any:
        values = []
        for index in range(flat.numel()):
            cotangent = torch.zeros_like(flat)
            cotangent[index] = 1
            grads = torch.autograd.grad(flat, params, cotangent, retain_graph=True)
            values.append(sum(g.square().sum() for g in grads))
        return torch.stack(values)

    def unbind_loop() -> Any:
        values = []
        for value in flat:
            grads = torch.autograd.grad(value, params, retain_graph=True)
            values.append(sum(g.square().sum() for g in grads))
        return torch.stack(values)

    times: dict[str, list[float]] = {"library": [], "products": [], "one-hot": [], "unbind": []}
    for _ in range(rounds):
        for name, compute in (
            ("library", lambda: jacobian_row_sq_norms(residual, params)),
            ("products", lambda: jacobian_row_sq_norms(residual, params, one_pass=False)),
            ("one-hot", one_hot_loop),
            ("unbind", unbind_loop),
        ):
            start = time.perf_counter()
            values = compute()
            times[name].append(time.perf_counter() - start)
            if name == "library":
                reference = values
            else:
                assert torch.allclose(values, reference, rtol=1e-4), f"library and {name} loop traces differ"
    return {name: statistics.median(values) for name, values in times.items()}


def _wave_residual(width: int, points: int) -> tuple[Any, list[Any]]:
    import torch

    from lightning_pinn.autodiff import derivative
    from lightning_pinn.nn import mlp

    torch.manual_seed(0)
    net = mlp(2, (width, width, width), 1)
    xt = torch.rand(points, 2, requires_grad=True)
    u = net(xt)
    u_xx = derivative(u, xt, dim=0, order=2)
    u_tt = derivative(u, xt, dim=1, order=2)
    return u_tt - 4 * u_xx, list(net.parameters())


def wide_networks(width: int, points: int = 300, rounds: int = 5) -> dict[str, float]:
    """Median seconds of exact traces by the default route, by the same route summing per-point
    gradients for every parameter, and of one backward pass of ``mean(r²)``; alternated."""
    import torch

    import lightning_pinn.point_gradients as point_gradients
    from lightning_pinn.ntk import jacobian_row_sq_norms

    residual, params = _wave_residual(width, points)
    with_gram = point_gradients._outer_product_leaves

    def summed() -> Any:
        point_gradients._outer_product_leaves = lambda kind, uses: ({}, uses)  # every parameter summed per point
        try:
            return jacobian_row_sq_norms(residual, params)
        finally:
            point_gradients._outer_product_leaves = with_gram

    times: dict[str, list[float]] = {"default": [], "summed": [], "backward": []}
    for _ in range(rounds):
        for name, compute in (
            ("default", lambda: jacobian_row_sq_norms(residual, params)),
            ("summed", summed),
            ("backward", lambda: torch.autograd.grad(residual.square().mean(), params, retain_graph=True, allow_unused=True)),
        ):
            start = time.perf_counter()
            values = compute()
            times[name].append(time.perf_counter() - start)
            if name == "default":
                reference = values
            elif name == "summed":
                assert torch.allclose(values, reference, rtol=1e-4), "the two routes' traces differ"
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {**medians, "parameters": float(sum(p.numel() for p in params))}


def _trace(residual: Any, params: list[Any], mode: str) -> None:
    """One trace computation: ``exact`` (the default: per-point gradients from four or five backward passes), ``products`` (vector-Jacobian
    products in automatic chunks), ``one-chunk`` (the working set of one auto-sized chunk of
    products), ``sampled`` (128 points, default) or ``unchunked`` (one batch of N one-hot cotangents)."""
    import torch

    from lightning_pinn.ntk import auto_chunk_size, jacobian_row_sq_norms, sample_points

    points = residual.numel()
    if mode == "exact":
        jacobian_row_sq_norms(residual, params)
    elif mode == "products":
        jacobian_row_sq_norms(residual, params, one_pass=False)
    elif mode == "one-chunk":
        chunk = auto_chunk_size(points, sum(p.numel() for p in params), residual.device)
        jacobian_row_sq_norms(residual, params, torch.arange(chunk), one_pass=False)
    elif mode == "sampled":
        jacobian_row_sq_norms(residual, params, sample_points(points, 128, torch.Generator().manual_seed(0)))
    elif mode == "backward":  # for scale: what a training step's backward of the same graph adds
        torch.autograd.grad(residual.square().mean(), params, retain_graph=True, allow_unused=True)
    else:
        jacobian_row_sq_norms(residual, params, chunk_size=points, one_pass=False)


def _peak_rss_kib() -> int:
    """This process's resident-set high-water mark in KiB: Linux's VmHWM, which starts afresh
    at exec. (``getrusage``'s ``ru_maxrss`` carries the parent's peak across fork and exec, so a
    child of a parent that once held more shows no growth at all: the 0 MiB this table printed
    before.)"""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _memory_child(points: int, mode: str) -> None:
    """Run in a fresh process: print the peak-RSS growth (MiB) of one trace computation."""
    residual, params = _harmonic_residual(points)
    before = _peak_rss_kib()
    start = time.perf_counter()
    _trace(residual, params, mode)
    seconds = time.perf_counter() - start
    after = _peak_rss_kib()
    print(json.dumps({"mib": (after - before) / 1024, "seconds": seconds}))


def memory(points: int, mode: str, env: dict[str, str] | None = None, repeats: int = 1) -> dict[str, float]:
    """Peak-RSS growth (MiB) and seconds of one trace computation: the median over ``repeats``
    fresh processes (single runs vary by about ±20 %)."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(points), mode],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **(env or {})},
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def cuda_memory(points: int, mode: str) -> dict[str, float]:
    """Peak CUDA memory allocated by one trace computation beyond the residual's graph (MiB), and its time."""
    import torch

    residual, params = _harmonic_residual(points, "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    _trace(residual, params, mode)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"mib": (torch.cuda.max_memory_allocated() - before) / 2**20, "seconds": seconds}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--memory-child":
        _memory_child(int(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--points", type=int, nargs="*", default=[128, 1024], help="N for the update-cost and batched-vs-loop tables (none: skip them)"
    )
    parser.add_argument(
        "--memory-points", type=int, nargs="*", default=[128, 1024, 4096, 10000], help="N for the memory table (none: skip it)"
    )
    parser.add_argument(
        "--cuda-memory-points",
        type=int,
        nargs="*",
        default=[],
        help="N for a CUDA memory table (peak allocated by PyTorch's caching allocator; needs a GPU; default: none)",
    )
    parser.add_argument(
        "--widths", type=int, nargs="*", default=[32, 128, 500], help="hidden widths for the wider-networks table (none: skip it)"
    )
    parser.add_argument("--update-steps", type=int, default=0, help="steps of each update-cost fit (default: 300, 120 for N > 500)")
    args = parser.parse_args()
    import torch

    if args.cuda_memory_points:
        if not torch.cuda.is_available():
            parser.error("--cuda-memory-points measures CUDA memory and needs a CUDA GPU; this PyTorch sees none.")
        print(f"# benchmarks/ntk_cost.py on {torch.cuda.get_device_name()} (torch {torch.__version__})\n")
        print("## Peak CUDA memory of one exact trace computation, beyond the residual's graph (torch.cuda.max_memory_allocated)\n")
        print("| N points | one auto-sized chunk | exact, auto chunks | exact, one unchunked batch |\n|---|---|---|---|")
        for points in args.cuda_memory_points:
            cuda_memory(points, "one-chunk")  # warm-up: CUDA context, kernels
            chunk, exact = cuda_memory(points, "one-chunk"), cuda_memory(points, "exact")
            whole = cuda_memory(points, "unchunked") if points <= 4096 else None
            whole_text = f"{whole['mib']:.0f} MiB, {whole['seconds']:.3f} s" if whole else "not run (N² cotangents)"
            print(f"| {points} | {chunk['mib']:.0f} MiB | {exact['mib']:.0f} MiB, {exact['seconds']:.3f} s | {whole_text} |", flush=True)
        return
    torch.set_num_threads(2)
    print(f"# benchmarks/ntk_cost.py  (torch {torch.__version__}, harmonic IVP network 1-32-32-32-1)\n")
    if args.points:
        print("## One NTKBalancer update, in plain training steps (median update step / median other step, same fit)\n")
        print("| N points | traces | update step | plain step | update / plain |\n|---|---|---|---|---|")
        for points in args.points:
            for trace_points in (None, 64):
                update, plain = update_cost(points, trace_points, steps=args.update_steps or (120 if points > 500 else 300))
                label = "exact" if trace_points is None else f"sampled, {trace_points} points/term"
                print(f"| {points} | {label} | {update * 1e3:.1f} ms | {plain * 1e3:.2f} ms | {update / plain:.1f} |", flush=True)

        print(
            "\n## Exact traces: lightning_pinn.ntk (default: per-point gradients from four or five backward passes; products: one_pass=False) vs per-point "
            "loops of autograd.grad (ratio of medians, alternated)\n"
        )
        print(
            "| N points | library (default) | library (products) | one-hot loop | unbind loop | products / default "
            "| one-hot loop / default | unbind loop / default |\n|---|---|---|---|---|---|---|---|"
        )
        for points in args.points:
            t = batched_vs_loop(points, rounds=5 if points <= 128 else 3)
            print(
                f"| {points} | {t['library'] * 1e3:.1f} ms | {t['products'] * 1e3:.0f} ms | {t['one-hot'] * 1e3:.0f} ms | "
                f"{t['unbind'] * 1e3:.0f} ms | {t['products'] / t['library']:.1f} | {t['one-hot'] / t['library']:.1f} | "
                f"{t['unbind'] / t['library']:.1f} |",
                flush=True,
            )

    if args.widths:
        print("\n## Exact traces on wider networks: wave residual u_tt − 4u_xx, 2-W-W-W-1 tanh, N = 300 (ratio of medians, alternated)\n")
        print(
            "| width W | parameters | default (Gram matrices for weights) | per-point sums (previous route) | one backward "
            "| sums / default | default / backward |\n|---|---|---|---|---|---|---|"
        )
        for width in args.widths:
            t = wide_networks(width, rounds=5 if width <= 128 else 3)
            print(
                f"| {width} | {t['parameters']:.0f} | {t['default'] * 1e3:.1f} ms | {t['summed'] * 1e3:.1f} ms | {t['backward'] * 1e3:.1f} ms "
                f"| {t['summed'] / t['default']:.1f} | {t['default'] / t['backward']:.1f} |",
                flush=True,
            )

    if not args.memory_points:
        return
    print("\n## Peak memory of one trace computation (fresh process each, median of 3 where cheap; growth of peak RSS)\n")
    print(
        "The default keeps the output gradients of four or five backward passes at the nodes where parameters meet the points\n"
        "(O(N), like the graph itself) and per-point gradients for at most 2**22 values at a time; the products keep one\n"
        "chunk of cotangents.\n"
    )
    print(
        "| N points | one plain backward (for scale) | exact (default: four or five backward passes) | exact, products in auto chunks "
        "| products: one auto-sized chunk | sampled, 128 points | products, one unchunked batch |\n|---|---|---|---|---|---|---|"
    )
    for points in args.memory_points:
        backward = memory(points, "backward", repeats=3)
        exact = memory(points, "exact", repeats=3)
        products = memory(points, "products") if points <= 4096 else None
        chunk = memory(points, "one-chunk", repeats=3)
        sampled = memory(points, "sampled", repeats=3)
        whole = memory(points, "unchunked") if points <= 2048 else None
        products_text = f"{products['mib']:.0f} MiB, {products['seconds']:.2f} s" if products else "not run (slow: O(N²))"
        whole_text = f"{whole['mib']:.0f} MiB, {whole['seconds']:.2f} s" if whole else "not run (N² cotangents)"
        print(
            f"| {points} | {backward['mib']:.0f} MiB | {exact['mib']:.0f} MiB, {exact['seconds']:.2f} s | {products_text} | {chunk['mib']:.0f} MiB "
            f"| {sampled['mib']:.0f} MiB, {sampled['seconds']:.2f} s | {whole_text} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
