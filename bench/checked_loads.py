"""Section 9 of bench/run.py: what checking every block as the targets load costs.

The store: a CIFAR-sized split (50,000 samples) of an ImageNet-sized teacher, 1000 float16 logits
a sample (100 MB), with class structure (bench/synthetic.py: written as `dump-teacher` writes it,
a crc32 recorded per block), in zarr and in HDF5. Read from the page cache, so the figure is the
check's CPU cost over the load's, the worst case for it (a disk read only adds to both sides).

Sides, alternating, round after round, each opening the store afresh:
  unchecked  the load as it was before the check: one `store.read` per array (logits, labels),
             each made a tensor of its storage dtype
  checked    `SplitTargets(store, "train")`, as `--targets-in memory` loads: absent pieces looked
             for in one listing per array, then each array read into one table 16 MiB a call, the
             crc32 of every block of a piece compared with the one recorded, in threads, while the
             next piece is read (kdcache.store.checks.CheckedReads)
Figure: unchecked / checked load time (median of per-round ratios), target >= 0.9, for zarr (9) and
HDF5 (9b). `train-student --verify` (every array of the whole store, before training) is not timed.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from kdcache import store as stores
from kdcache.encodings import LogitCodec, from_storage
from kdcache.targets import SplitTargets
from kdcache.store.checks import CHECK_THREADS, PIECE_BYTES
from synthetic import LogitBank, write_logit_stores
from timing import Figure, alternate, best, paired

ROWS = 50_000  # CIFAR's train split
CLASSES = 1000  # ImageNet's: 2,000 B of float16 logits a sample
BACKENDS = {"9": ".zarr", "9b": ".h5"}


def unchecked(path: str) -> dict:
    """The arrays of a memory load, read whole without any check (the load before the checks)."""
    with stores.open_store(path) as store:
        codec = LogitCodec.from_attrs(store.get_attrs())
        tables = {name: from_storage(store.read(f"train/{name}"), dt) for name, (_, dt) in codec.arrays().items()}
        tables["labels"] = torch.from_numpy(np.asarray(store.read("train/labels"), dtype=np.int64))
        return tables


def checked(path: str) -> SplitTargets:
    with stores.open_store(path) as store:
        return SplitTargets(store, "train")


def bench_checked_loads(work: str, rounds: int, rows: int = ROWS) -> tuple[list[Figure], str]:
    codec = LogitCodec("float16", None, CLASSES)
    paths = {key: os.path.join(work, f"checked{suffix}") for key, suffix in BACKENDS.items()}
    write_logit_stores({path: codec for path in paths.values()}, LogitBank(CLASSES, rows=min(rows, 1 << 16)), rows)
    figures = []
    try:
        with stores.open_store(paths["9"]) as store:
            block_rows = store.get_attrs("train")["block_rows"]
        for key, path in paths.items():
            a, b = unchecked(path), checked(path)  # warm-up: codec pipelines, thread pools, the page cache
            assert torch.equal(a["logits"], b.tables["logits"]) and torch.equal(a["labels"], b.labels)
            times = alternate({"unchecked": lambda p=path: unchecked(p), "checked": lambda p=path: checked(p)}, rounds)
            ratio = lambda unchecked, checked: unchecked / checked  # noqa: E731
            mb = rows * CLASSES * 2 / 1e6
            figures.append(Figure(key, f"targets load speed, checked / unchecked, {BACKENDS[key][1:]}",
                                  paired(times, ratio), best(times, ratio), 0.9, ">= 0.9",
                                  note=f"unchecked {mb / min(times['unchecked']):,.0f} MB/s, checked "
                                       f"{mb / min(times['checked']):,.0f} MB/s (best rounds)"))
    finally:
        for path in paths.values():
            stores.remove_store(path)
    blocks = -(-rows // block_rows)
    info = (f"   stores for 9: {rows:,} x {CLASSES} float16 logits ({rows * CLASSES * 2 / 1e6:.0f} MB) + labels, "
            f"{blocks} blocks of {block_rows} rows, read {PIECE_BYTES >> 20} MiB a call, checked in {CHECK_THREADS} threads")
    return figures, info
