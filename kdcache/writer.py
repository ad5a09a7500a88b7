"""The background writer: takes batches of rows and writes whole blocks, and records what is done.

The teacher never waits on the disk: batches go into a bounded queue and one thread turns them
into block writes, so no block (zarr shard) is ever written by two writers or written in pieces.
What is on disk is recorded per block, with a checksum of each array's block, in a progress
record of its own per writer: ranks of a distributed dump never write the same metadata object,
and a resumed dump (with any number of ranks) skips exactly the blocks that are whole.
"""
from __future__ import annotations

import queue
import threading
import time
import zlib

import numpy as np

from kdcache.errors import KDCacheError

_DONE = object()
PROGRESS = "progress"  # STORE/<split>/progress/<first>-<stop>: one writer's record, merged away at the end


def chunk_checksum(values: np.ndarray) -> int:
    """crc32 of a block's values as stored (dtype, C order): recorded at write, checked by verify."""
    return zlib.crc32(np.ascontiguousarray(values).view(np.uint8).reshape(-1)) & 0xFFFFFFFF


class BlockWriter:
    """Writes `{path: rows}` batches of one split into whole blocks; `put` the rows of `blocks`, in
    that order, then `close`.

    `arrays` maps array path -> array (all with the split's N rows); a block is rows
    [k * block_rows, (k + 1) * block_rows) of every array. `on_block(k, {path: crc32})` is called
    from the writer thread once block k of every array is on disk.
    """

    def __init__(self, arrays: dict, *, block_rows: int, blocks, max_pending: int = 8, on_block=None):
        self._arrays = arrays
        self._n = next(iter(arrays.values())).shape[0]
        self._block_rows = block_rows
        self._blocks = list(blocks)
        self._buffers = {p: np.empty((block_rows,) + tuple(a.shape[1:]), dtype=a.dtype) for p, a in arrays.items()}
        self._next = 0  # position in self._blocks of the block being filled
        self._fill = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)  # bounds host memory held by pending batches
        self._error: BaseException | None = None
        self._on_block = on_block
        self._thread = threading.Thread(target=self._run, name="kdcache-writer", daemon=True)
        self._thread.start()

    def put(self, rows: dict, ready=None) -> None:
        """Queue one batch. `ready` is an optional CUDA event to wait on before reading `rows`
        (device-to-host copies issued with non_blocking=True are not done until it fires)."""
        if self._error is not None:
            self._raise()
        self._queue.put((rows, ready))

    def close(self) -> None:
        """Write what is queued; raise any write error."""
        self._queue.put(_DONE)
        self._thread.join()
        if self._error is not None:
            self._raise()
        assert self._next == len(self._blocks), f"rows for {len(self._blocks) - self._next} blocks never came"

    def abort(self) -> None:
        """After a failure upstream: write the whole blocks already queued; a partly filled block is
        dropped, and a resumed dump writes it again."""
        self._queue.put(_DONE)
        self._thread.join()

    def _raise(self):
        error = self._error
        if isinstance(error, OSError) and error.errno == 28:  # ENOSPC
            raise KDCacheError(
                "disk full while writing the cache; free space and rerun with --resume to finish it"
            ) from error
        raise error

    def _block_span(self) -> tuple[int, int]:
        start = self._blocks[self._next] * self._block_rows
        return start, min(start + self._block_rows, self._n)

    def _add(self, rows: dict) -> None:
        count = len(next(iter(rows.values())))
        offset = 0
        while offset < count:
            assert self._next < len(self._blocks), "more rows than the blocks to write"
            start, stop = self._block_span()
            take = min(stop - start - self._fill, count - offset)
            for path, values in rows.items():
                self._buffers[path][self._fill : self._fill + take] = values[offset : offset + take]
            self._fill += take
            offset += take
            if self._fill == stop - start:
                self._write_block(start, stop)

    def _write_block(self, start: int, stop: int) -> None:
        sums = {}
        for path, array in self._arrays.items():
            values = self._buffers[path][: stop - start]
            array[start:stop] = values
            sums[path] = chunk_checksum(values)
        block = self._blocks[self._next]
        self._next += 1
        self._fill = 0
        if self._on_block is not None:
            self._on_block(block, sums)

    def _run(self) -> None:
        done = False
        try:
            while True:
                item = self._queue.get()
                if item is _DONE:
                    done = True
                    break
                rows, ready = item
                if ready is not None:
                    ready.synchronize()
                self._add({p: v.numpy() if hasattr(v, "numpy") else v for p, v in rows.items()})
        except BaseException as e:  # surfaced in the main thread on its next put or close
            self._error = e
            while not done:  # keep draining so the producer never blocks forever
                done = self._queue.get() is _DONE


# --- progress records: which blocks are whole, with their checksums --------------------------

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

    def flush(self) -> None:
        """Write what is recorded and not yet written (at the end, or after a failure upstream)."""
        with self._lock:
            if self._pending:
                self._write()

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
