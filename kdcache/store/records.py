"""Which blocks of a split are on disk, with a crc32 per array and block: written by each writer,
read by resume, verify, inspect and every checked read.

Every writer (rank) keeps its own record (STORE/<split>/progress/<first>-<stop>), so ranks of a
distributed dump never write the same metadata object, and a resumed dump (with any number of
ranks) skips exactly the blocks that are whole; the records are merged into the split's
`checksums` when it completes.
"""
from __future__ import annotations

import threading
import time
import zlib

import numpy as np


PROGRESS = "progress"  # STORE/<split>/progress/<first>-<stop>: one writer's record, merged away at the end


def chunk_checksum(values: np.ndarray) -> int:
    """crc32 of a block's values as stored (dtype, C order): recorded at write, checked by verify."""
    return zlib.crc32(np.ascontiguousarray(values).view(np.uint8).reshape(-1)) & 0xFFFFFFFF



class ProgressRecord:
    """One writer's record of blocks [first, stop) of a split, kept in its own group's attrs.

    `checksums` {array (relative to the split): [crc32 or None per block]} is written whole, in one
    metadata write, at most every `every` seconds and at `flush()`: rewriting it after each of an
    ImageNet dump's 2,500 blocks cost 13 ms a block (quadratic in the blocks), about as much as
    writing the blocks. A kill loses at most the last `every` seconds of progress, which a resumed
    dump writes again; it never records a block that is not whole.
    """

    def __init__(self, store, split: str, first: int, stop: int, known: dict, every: float = 1.0):
        self.store, self.split, self.first, self.stop = store, split, first, stop
        self.group = f"{split}/{PROGRESS}/{first}-{stop}"
        self.checksums = {name: sums[first:stop] for name, sums in known.items()}
        self.every = every
        self._written = 0.0  # when the record was last written (time.monotonic)
        self._pending = False
        self._lock = threading.Lock()

    def record(self, block: int, sums: dict) -> None:
        with self._lock:
            for path, crc in sums.items():
                self.checksums[path.removeprefix(self.split + "/")][block - self.first] = crc
            self._pending = True
            if time.monotonic() - self._written >= self.every:
                self._write()

    def flush(self, after_failure: bool = False) -> None:
        """Write what is recorded and not yet written (at the end, or after a failure upstream).

        `after_failure`: best effort. When the write fails too (the disk that stopped the dump is
        full), the blocks not on record are written again by --resume, and the first error stands."""
        with self._lock:
            if not self._pending:
                return
            try:
                self._write()
            except OSError:
                if not after_failure:
                    raise

    def _write(self) -> None:
        self.store.update_attrs({"first": self.first, "stop": self.stop, "checksums": self.checksums},
                                group=self.group)
        self._written, self._pending = time.monotonic(), False


def read_progress(store, split: str, arrays, n_blocks: int) -> dict:
    """{array: [crc32 or None per block]}: the union of every writer's record of `split` (and of the
    split's merged checksums), over `arrays` (names relative to the split)."""
    merged = {name: [None] * n_blocks for name in arrays}
    sources = [(0, store.get_attrs(split).get("checksums", {}))]
    root = f"{split}/{PROGRESS}"
    if PROGRESS in store.group_names(split):
        for name in store.group_names(root):
            attrs = store.get_attrs(f"{root}/{name}")
            if "first" in attrs:
                sources.append((attrs["first"], attrs["checksums"]))
    for first, sums in sources:
        for name, values in sums.items():
            if name in merged:
                for i, crc in enumerate(values):
                    if crc is not None and first + i < n_blocks:
                        merged[name][first + i] = crc
    return merged


def blocks_done(checksums: dict, n_blocks: int) -> set[int]:
    """Blocks whole in every array."""
    return {b for b in range(n_blocks) if all(sums[b] is not None for sums in checksums.values())}


def finish_split(store, split: str, checksums: dict, rows: int) -> None:
    """Merge the writers' records into the split's attrs, mark it complete, drop the records."""
    sums = dict(store.get_attrs(split).get("checksums", {}), **checksums)
    store.update_attrs({"checksums": sums, "rows_written": rows, "complete": True}, group=split)
    if PROGRESS in store.group_names(split):
        store.remove_group(f"{split}/{PROGRESS}")


def rows_written(store, split: str) -> int:
    """Leading rows of `split` whole in every array, for reports on partial stores."""
    attrs = store.get_attrs(split)
    if attrs.get("complete"):
        return attrs.get("rows_written", 0)
    n, block_rows = attrs["dataset"]["length"], attrs["block_rows"]
    n_blocks = -(-n // block_rows)
    names = [a for a in store.array_names(split) if a != "labels"]
    done = blocks_done(read_progress(store, split, names, n_blocks), n_blocks)
    k = 0
    while k in done:
        k += 1
    return min(k * block_rows, n)
