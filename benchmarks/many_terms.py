"""Cost of the every-step callbacks as the number of loss terms K grows.

A 2D Poisson-type problem (3×32 tanh network): a PDE term −Δu − f on its own 64 points and
K − 1 boundary/data terms, each on its own 64 points (the usual PINN layout, so the K per-term
gradients cost about one backward pass together), a TensorBoardLogger, Adam, no progress bar.
For each K the fixed-weight fit and each callback's fit alternate, ``--rounds`` times; printed
are the ratios of medians (callback fit / fixed-weight fit) and the range of the per-round
ratios. The monitor logs K(K−1)/2 pair cosines and keeps a conflict window per pair, so its
own bookkeeping grows with K² where a balancer's grows with K.

    python benchmarks/many_terms.py                     # K = 2, 10, 30; 5 rounds of 300 steps: ~2–3 min on 2 cores
    python benchmarks/many_terms.py --terms 2 30 --rounds 3 --steps 100
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402

from lightning_pinn import MultiTermLoss  # noqa: E402
from lightning_pinn.autodiff import laplacian  # noqa: E402
from lightning_pinn.callbacks import GradientNormMonitor, GradNormBalancer  # noqa: E402
from lightning_pinn.nn import mlp  # noqa: E402

CALLBACKS: dict[str, Callable[[], pl.Callback]] = {
    "monitor-default": lambda: GradientNormMonitor(verbose=False, report=False),
    "monitor-every": lambda: GradientNormMonitor(every_n_steps=1, verbose=False, report=False),
    "monitor-every-no-pairs": lambda: GradientNormMonitor(
        every_n_steps=1, verbose=False, report=False, log_cosines=False, cosine_threshold=None
    ),
    "balancer-every": lambda: GradNormBalancer(every_n_steps=1),
}


class ManyTerms(pl.LightningModule):
    """−Δu = f on [0, 1]² with K − 1 boundary/data terms, every term on its own points."""

    def __init__(self, terms: int, points: int = 64) -> None:
        super().__init__()
        self.net = mlp(2, (32, 32, 32), 1)
        self.names = ["pde"] + [f"data{i}" for i in range(terms - 1)]
        self.criterion = MultiTermLoss(**dict.fromkeys(self.names, 1.0))
        generator = torch.Generator().manual_seed(1)
        self.register_buffer("x", torch.rand(terms, points, 2, generator=generator))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = self.x[0].clone().requires_grad_(True)
        u = self.net(x)
        residuals = {"pde": -laplacian(u, x) - torch.sin(math.pi * x).prod(dim=1, keepdim=True)}
        for i, name in enumerate(self.names[1:], start=1):
            residuals[name] = self.net(self.x[i]) - torch.cos(self.x[i].sum(dim=1, keepdim=True) + i)
        return self.criterion(**residuals)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> range:
        return range(10**9)


def fit_seconds(terms: int, steps: int, callback: str | None, log_root: str) -> float:
    torch.manual_seed(0)
    model = ManyTerms(terms)
    callbacks = [CALLBACKS[callback]()] if callback else []
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(
            max_steps=steps,
            accelerator="cpu",
            logger=TensorBoardLogger(log_root, name=callback or "fixed"),
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            callbacks=callbacks,
        )
        start = time.perf_counter()
        trainer.fit(model)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--terms", type=int, nargs="+", default=[2, 10, 30], help="values of K (default 2 10 30)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per fit (default 300)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--only", nargs="+", choices=sorted(CALLBACKS), help="measure these callbacks only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    names = args.only or list(CALLBACKS)
    print(
        f"2D Poisson-type problem, 3×32 network, 64 points per term, {args.steps} steps, {args.rounds} alternating rounds, torch {torch.__version__}"
    )
    print("\n| K | fixed-weight fit, median | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    with tempfile.TemporaryDirectory() as log_root:
        for terms in args.terms:
            fit_seconds(terms, min(args.steps, 20), names[0], log_root)  # warm-up
            times: dict[str | None, list[float]] = {None: [], **{name: [] for name in names}}
            for _ in range(args.rounds):
                for callback in times:
                    times[callback].append(fit_seconds(terms, args.steps, callback, log_root))
            base = statistics.median(times[None])
            cells = []
            for name in names:
                rounds = [t / b for t, b in zip(times[name], times[None])]
                cells.append(f"{statistics.median(times[name]) / base:.2f} [{min(rounds):.2f}–{max(rounds):.2f}]")
            print(f"| {terms} | {base:.2f} s ({1e3 * base / args.steps:.2f} ms/step) | " + " | ".join(cells) + " |", flush=True)
    print("\ncells: ratio of medians (callback fit / fixed-weight fit) [range of the per-round ratios]")


if __name__ == "__main__":
    main()
