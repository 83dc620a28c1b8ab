"""Benchmark problems from the PINN literature, as ready-to-train :class:`~lightning_pinn.PINNModule` s."""

from lightning_pinn.problems.harmonic import HarmonicOscillator
from lightning_pinn.problems.helmholtz import Helmholtz2D
from lightning_pinn.problems.wave import Wave1D

__all__ = ["HarmonicOscillator", "Helmholtz2D", "Wave1D"]
