"""Argument checks shared by the problem classes and the callbacks: a clear error at construction, not at the first step."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor


def check_points(owner: str, name: str, value: Any) -> int:
    """A point count: an integer ``>= 1``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}: {name} must be an integer >= 1 (points per step), got {value!r}.")
    return int(value)


def check_finite(owner: str, name: str, value: Any, positive: bool = False) -> float:
    """A finite real number (``> 0`` if ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{owner}: {name} must be a finite number{' > 0' if positive else ''}, got {value!r}.")
    return float(value)


def check_number(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """A finite real number (a Python or NumPy scalar, not a bool) within the given bounds, as a float.

    ``hint`` states the allowed range and an example (" in [0, 1) (e.g. 0.9)"); without one, the
    violated bound is named.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number{hint}, got {value!r}.")
    if low is not None and (value < low or (low_open and value == low)):
        bound = hint or f" {'>' if low_open else '>='} {low:g}"
        raise ValueError(f"{owner}: {name} must be{bound}, got {value!r}.")
    if high is not None and (value > high or (high_open and value == high)):
        bound = hint or f" {'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{owner}: {name} must be{bound}, got {value!r}.")
    return float(value)


def check_hidden(owner: str, hidden: Any) -> tuple[int, ...]:
    """Hidden-layer widths: at least one layer (the PDE needs derivatives of a nonlinear network), each ``>= 1``."""
    if (
        isinstance(hidden, (str, bytes))
        or not isinstance(hidden, Sequence)
        or len(hidden) == 0
        or any(isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1 for w in hidden)
    ):
        raise ValueError(f"{owner}: hidden must be a non-empty sequence of layer widths >= 1, e.g. (32, 32, 32); got {hidden!r}.")
    return tuple(int(w) for w in hidden)


def like(tensor: Tensor) -> dict[str, Any]:
    """Factory arguments (``device``, ``dtype``) for new points made to match ``tensor``: a
    problem's points follow its network, e.g. to float64 after ``precision="64-true"``."""
    return {"device": tensor.device, "dtype": tensor.dtype}


def check_flag(owner: str, name: str, value: Any) -> bool:
    """A ``True``/``False`` switch (a string such as ``"no"`` would otherwise read as ``True``)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{owner}: {name} must be True or False, got {value!r}.")
    return bool(value)


def check_term_names(
    owner: str, name: str, value: Any, example: str, none_means: str, minimum: int = 1, type_error: type[Exception] = ValueError
) -> list[str]:
    """A list of at least ``minimum`` term names (non-empty strings), duplicates dropped, order kept.

    A set is sorted: its iteration order changes between processes (string hashing), and the
    names make a callback's ``state_key``, which must be the same when a fit is resumed.

    ``none_means`` says what ``None`` does instead (for the message), e.g. ``"all terms"``;
    ``type_error`` is raised for a value that is not a list of names (a bare string, a number).
    """
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, (Sequence, set, frozenset))
        or not all(isinstance(item, str) and item for item in value)
    ):
        raise type_error(f"{owner}: {name} must be a list of term names (e.g. {example}) or None for {none_means}, got {value!r}.")
    names = sorted(value) if isinstance(value, (set, frozenset)) else list(dict.fromkeys(value))
    if len(names) < minimum:
        raise ValueError(
            f"{owner}: {name} must be a non-empty list of term names naming at least {minimum} different term"
            f"{'s' if minimum > 1 else ''} (e.g. {example}), or None for {none_means}; got {value!r}."
        )
    return names


def check_seed(owner: str, value: Any) -> int:
    """A random seed: an integer that ``torch.Generator.manual_seed`` takes, in ``[-2**63, 2**64)``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not -(2**63) <= value < 2**64:
        raise ValueError(f"{owner}: seed must be an integer in [-2**63, 2**64) (e.g. 0), got {value!r}.")
    return int(value)
