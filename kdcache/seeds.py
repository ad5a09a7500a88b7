"""Seeds as pure functions of integers (splitmix64): the same in every process, worker, rank and
run, so a view, a mix partner or an epoch's order is named by its numbers and replayed exactly.
Every derived seed in kdcache comes from `seed_hash`.
"""
from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment: keeps 0 from hashing to 0
# domain tags: seeds of views, per-epoch view choices, mix partners and epoch orders never collide
VIEW, CHOICE, PARTNER, EPOCH_ORDER = 1, 2, 3, 4


def splitmix(z):
    """splitmix64's finalizer (Steele et al. 2014): a bijection of uint64 whose outputs for
    neighbouring inputs look independent. Python ints (masked to 64 bits) or uint64 arrays."""
    if isinstance(z, int):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def seed_hash(*parts):
    """uint64 hash of non-negative integers; no process, worker or hash seed enters it. All ints give
    an int (the per-sample path: 10x faster than numpy scalars); any array gives a broadcast array."""
    if all(isinstance(p, (int, np.integer)) for p in parts):
        h = 0
        for part in parts:
            h = splitmix(((h ^ (int(part) & MASK64)) + GOLDEN) & MASK64)
        return h
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        h = np.zeros((), dtype=np.uint64)
        for part in parts:
            part = np.asarray(part & MASK64 if isinstance(part, int) else part).astype(np.uint64)
            h = splitmix((h ^ part) + np.uint64(GOLDEN))
        return h
