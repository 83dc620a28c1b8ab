"""Why gradient-norm balancing fails on the 1D wave benchmark: the weights and losses over training.

Trains ``Wave1D`` (the setup of ``benchmarks/papers.py``: 2-W-W-W-1 tanh, Adam 1e-3·0.9^(step/1000),
fresh points every step) with each method and prints, every ``--every`` steps, the relative L²
error, the weights λ and the unweighted losses of the three terms (``u``: initial and boundary
values, ``ut``: initial velocity, ``pde``). Writes the same tables to
``benchmarks/results/wave_weights.md``.

    python benchmarks/wave_weights.py                       # GradNorm max and mean, NTK; seeds 1 2; 4000 steps
    python benchmarks/wave_weights.py --methods gradnorm-mean --seeds 0 --steps 2000
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("plain", "gradnorm-max", "gradnorm-mean", "ntk")


def trace(job: tuple[str, int, int, int, int]) -> tuple[str, int, list[tuple[int, float, dict[str, float], dict[str, float]]], float]:
    """One fit; returns (method, seed, rows of (step, error, weights, losses), seconds)."""
    import pytorch_lightning as pl
    import torch

    from lightning_pinn.callbacks import GradNormBalancer, NTKBalancer
    from lightning_pinn.demo import quiet_lightning, quiet_trainer, seed_quietly
    from lightning_pinn.problems import Wave1D

    method, seed, steps, width, every = job
    torch.set_num_threads(1)

    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.rows: list[tuple[int, float, dict[str, float], dict[str, float]]] = []

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
            step = trainer.global_step
            if step % every == 0 or step == 1:
                losses = {name: float(loss) for name, loss in pl_module.criterion.last_losses.items()}
                self.rows.append((step, pl_module.relative_l2_error(), pl_module.criterion.weights, losses))

    seed_quietly(seed)
    # raw inputs: the setup of the recorded results/wave_weights.md (before standardize_inputs existed)
    model = Wave1D(hidden=(width, width, width), standardize_inputs=False, lr_decay=0.9, steps_per_epoch=steps)
    callbacks: list[Any] = {
        "plain": [],
        "gradnorm-max": [GradNormBalancer(rule="max")],
        "gradnorm-mean": [GradNormBalancer(rule="mean")],
        "ntk": [NTKBalancer(every_n_steps=100)],
    }[method]
    recorder = Recorder()
    start = time.perf_counter()
    with quiet_lightning(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(steps, [*callbacks, recorder]).fit(model)
    return method, seed, recorder.rows, time.perf_counter() - start


def render(method: str, seed: int, rows: list[tuple[int, float, dict[str, float], dict[str, float]]], seconds: float) -> str:
    lines = [
        f"### {method}, seed {seed} ({seconds:.0f} s)",
        "",
        "| step | rel. L2 | λ_u | λ_ut | λ_pde | L_u | L_ut | L_pde |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for step, error, weights, losses in rows:
        lines.append(
            f"| {step} | {error:.3f} | {weights['u']:.3g} | {weights['ut']:.3g} | {weights['pde']:.3g} | "
            f"{losses.get('u', float('nan')):.1e} | {losses.get('ut', float('nan')):.1e} | {losses.get('pde', float('nan')):.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["gradnorm-max", "gradnorm-mean", "ntk"], choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--every", type=int, default=500, help="record every this many steps (default 500)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results" / "wave_weights.md")
    args = parser.parse_args()

    jobs = [(m, s, args.steps, args.width, args.every) for m in args.methods for s in args.seeds]
    results = []
    with multiprocessing.get_context("spawn").Pool(processes=max(1, min(args.workers, len(jobs)))) as pool:
        for result in pool.imap_unordered(trace, jobs):
            print(f"  done: {result[0]} seed {result[1]} ({result[3]:.0f} s)", flush=True)
            results.append(result)
    results.sort(key=lambda r: (args.methods.index(r[0]), r[1]))
    header = (
        f"## 1D wave: weights and losses over training (2-{args.width}-{args.width}-{args.width}-1 tanh, {args.steps} steps)\n\n"
        f"`python benchmarks/wave_weights.py --methods {' '.join(args.methods)} --seeds {' '.join(map(str, args.seeds))} "
        f"--steps {args.steps} --width {args.width}`\n"
    )
    text = header + "\n" + "\n\n".join(render(*r) for r in results) + "\n"
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
