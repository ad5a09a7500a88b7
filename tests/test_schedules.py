import math

import pytest

from kdcache.errors import KDCacheError
from kdcache.schedules import Schedule

# (name, value at 0, 0.5, 1) for start=0.2, end=1.0
EXPECTED = {
    "constant": (1.0, 1.0, 1.0),
    "linear": (0.2, 0.6, 1.0),
    "cos": (0.2, 0.6, 1.0),
    "step": (0.2, 1.0, 1.0),
    "one_cycle": (0.2 + 0.8 * (1 + math.exp(-8)) / (1 + math.exp(6)),
                  0.2 + 0.8 * (1 + math.exp(-8)) / (1 + math.exp(-1)), 1.0),
    "agp": (0.2, 1.0 - 0.8 * 0.125, 1.0),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_schedule_values_at_start_middle_and_end(name):
    sched = Schedule(name, start=0.2, end=1.0)
    for pos, want in zip((0.0, 0.5, 1.0), EXPECTED[name]):
        assert sched(pos) == pytest.approx(want, abs=1e-12), (name, pos)


def test_cos_schedule_is_monotone_and_flat_at_the_ends():
    sched = Schedule("cos", 0.0, 1.0)
    values = [sched(i / 100) for i in range(101)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[1] - values[0] < values[51] - values[50]


def test_progress_outside_unit_interval_is_clamped():
    sched = Schedule("linear", 0.0, 1.0)
    assert sched(1.0000001) == 1.0 and sched(-0.1) == 0.0


def test_unknown_schedule_names_the_choices():
    with pytest.raises(KDCacheError, match="cos"):
        Schedule("cosine", 0, 1)
