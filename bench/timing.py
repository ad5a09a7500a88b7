"""Side-by-side timing for bench/run.py: alternate the sides of a comparison, round after round.

Absolute times on a shared machine drift by tens of percent between minutes; a ratio of two sides
timed back to back in the same round does not, so every figure is a median of per-round ratios.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so a timer stops when the work is done, not when it is queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], float | None]) -> float:
    """Seconds `fn()` took; a side that times only part of its work returns that time itself."""
    start = time.perf_counter()
    inner = fn()
    elapsed = time.perf_counter() - start
    return inner if isinstance(inner, float) else elapsed


def alternate(sides: dict[str, Callable], rounds: int) -> dict[str, list[float]]:
    """Run every side once per round, the order reversed every other round, so that neither
    side always runs first (after a cold cache) or last (after the other side warmed the CPU)."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(rounds):
        for name in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            times[name].append(timed(sides[name]))
    return times


def paired(times: dict[str, list[float]], fn: Callable[..., float]) -> float:
    """Median over rounds of `fn(**one round's times)`: a ratio of sides timed side by side."""
    n = len(next(iter(times.values())))
    return statistics.median(fn(**{k: v[r] for k, v in times.items()}) for r in range(n))


def med(values: list[float]) -> float:
    return statistics.median(values)


@dataclass
class Figure:
    """One line of the final table."""

    key: str  # "1a", "2", ...
    what: str  # what is compared
    value: float
    target: float
    shown: str  # the value as printed
    target_shown: str  # the target as printed
    note: str = ""  # the times or rates behind the value

    @property
    def verdict(self) -> str:
        return "PASS" if self.value >= self.target else "BELOW"
