"""Side-by-side timing for bench/run.py: alternate the sides of a comparison, round after round.

Absolute times on a shared machine drift by tens of percent between minutes, and on a busy 2-core
machine a side that shares the CPUs with another process can run several times slower. So every
side runs once per round, alternating, and a figure is computed twice: as the median of the
per-round ratios (`paired`: interference that hits both sides of a round cancels; ratios are judged
on it) and from each side's best round (`best`: what the code costs when nothing else runs; rates,
which interference can only lower, are judged on it). On an idle machine the two agree.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
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


def best(times: dict[str, list[float]], fn: Callable[..., float]) -> float:
    """`fn(**each side's fastest time)`: the figure when no other process interfered."""
    return fn(**{k: min(v) for k, v in times.items()})


def med(values: list[float]) -> float:
    return statistics.median(values)


@dataclass
class Figure:
    """One line of the final table: a ratio is judged on its median, a rate on its best round;
    a figure that is not a timing (a memory size, an accuracy difference) says how with `judge`."""

    key: str  # "1a", "2", ...
    what: str  # what is compared
    median: float  # median of the per-round values
    best: float | None  # from each side's fastest round; None where there are no rounds to pick from
    target: float
    target_shown: str  # the target as printed
    unit: str = ""  # "/s" for a rate (judged on best), "" for a ratio (judged on median), or any other unit
    note: str = ""  # the times or rates behind the value
    judge: str = ""  # "median" or "best"; default: "best" for a rate, "median" otherwise
    at_most: bool = False  # the target is a ceiling (a memory size), not a floor
    fmt: str = ""  # the value's format; default: ",.0f" for a rate, ".3f" otherwise

    @property
    def judged_by(self) -> str:
        return self.judge or ("best" if self.unit == "/s" else "median")

    @property
    def judged(self) -> float:
        return getattr(self, self.judged_by)

    def shown(self, which: str) -> str:
        """`which` is "median" or "best"; the judged one carries a `*`."""
        value = getattr(self, which)
        if value is None:
            return "- "
        fmt = self.fmt or (",.0f" if self.unit == "/s" else ".3f")
        return f"{value:{fmt}}{self.unit}" + ("*" if which == self.judged_by else " ")

    @property
    def verdict(self) -> str:
        ok = self.judged <= self.target if self.at_most else self.judged >= self.target
        return "PASS" if ok else ("ABOVE" if self.at_most else "BELOW")


@contextmanager
def timed_parts(record: dict, loader_module, loader_name: str):
    """Inside, a dump runs timed versions of two names: record["loop"] gets the batch loop's seconds
    (a BlockWriter's life, created before the first batch, closed after the last block: loader,
    teacher, encode, copies, writes), record["data"] those of `loader_module.loader_name`, the
    data loading (kdcache.dump's load_split, or kdcache.tokens.text's load_token_split). Dumps reach
    their writer as `writer.BlockWriter` (`from kdcache.store import writer`), so the class is
    swapped in kdcache.store.writer; both names are looked up at each call."""
    import kdcache.store.writer

    writer_class, load = kdcache.store.writer.BlockWriter, getattr(loader_module, loader_name)

    class TimedWriter(writer_class):
        def __init__(self, *args, **kwargs):
            self._born = time.perf_counter()
            super().__init__(*args, **kwargs)

        def close(self):
            try:
                super().close()
            finally:
                record["loop"] = record.get("loop", 0.0) + time.perf_counter() - self._born

    def timed_load(*args, **kwargs):
        start = time.perf_counter()
        try:
            return load(*args, **kwargs)
        finally:
            record["data"] = record.get("data", 0.0) + time.perf_counter() - start

    kdcache.store.writer.BlockWriter = TimedWriter
    setattr(loader_module, loader_name, timed_load)
    try:
        yield record
    finally:
        kdcache.store.writer.BlockWriter = writer_class
        setattr(loader_module, loader_name, load)
