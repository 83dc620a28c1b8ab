"""Benchmark problems from the PINN literature, as ready-to-train :class:`~lightning_pinn.PINNModule` s."""

from lightning_pinn.problems.harmonic import HarmonicOscillator

__all__ = ["HarmonicOscillator"]
