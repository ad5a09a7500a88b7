"""Pure `progress -> value` schedules for the KD weight alpha (and any other scheduled weight).

Each `sched_*(start, end, pos)` maps training progress `pos` in [0, 1] to a value; `Schedule`
binds one of them to its end points, as fasterai's `Schedule` does.
"""
import math
from dataclasses import dataclass


def sched_constant(start: float, end: float, pos: float) -> float:
    """`end` from the first step: `start` is ignored, as in plain KD with a fixed weight."""
    return end


def sched_linear(start: float, end: float, pos: float) -> float:
    return start + (end - start) * pos


def sched_cos(start: float, end: float, pos: float) -> float:
    """Half a cosine: flat at both ends, so the KD term arrives and settles gently."""
    return start + (end - start) * (1 - math.cos(math.pi * pos)) / 2


def sched_step(start: float, end: float, pos: float, at: float = 0.5) -> float:
    """`start` until progress `at`, then `end`: e.g. CE-only warm-up, then full KD."""
    return start if pos < at else end


def sched_one_cycle(start: float, end: float, pos: float, a: float = 14.0, b: float = 6.0) -> float:
    """fasterai's logistic ramp: slow start, steep middle, saturates at `end` when pos = 1."""
    ramp = (1 + math.exp(-a + b)) / (1 + math.exp(-a * pos + b))
    return start + (end - start) * ramp


def sched_agp(start: float, end: float, pos: float) -> float:
    """Cubic ramp of Zhu & Gupta (2017, automated gradual pruning): fast early, gentle late."""
    return end + (start - end) * (1 - pos) ** 3


SCHEDULES = {
    "constant": sched_constant,
    "linear": sched_linear,
    "cos": sched_cos,
    "step": sched_step,
    "one_cycle": sched_one_cycle,
    "agp": sched_agp,
}


@dataclass(frozen=True)
class Schedule:
    """A named schedule between two values; call it with progress in [0, 1]."""

    name: str = "constant"
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        if self.name not in SCHEDULES:
            from kdcache.errors import KDCacheError, closest

            raise KDCacheError(
                f"unknown schedule '{self.name}'; choose one of {', '.join(SCHEDULES)} "
                f"(closest: {closest(self.name, SCHEDULES)})"
            )

    def __call__(self, pos: float) -> float:
        pos = min(max(pos, 0.0), 1.0)  # the last step can land a hair past 1.0
        return SCHEDULES[self.name](self.start, self.end, pos)
