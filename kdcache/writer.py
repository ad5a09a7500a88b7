"""The background writer: takes batches of rows in dataset order and writes whole chunks.

The teacher never waits on the disk: batches go into a bounded queue and one thread turns them
into chunk-aligned writes, so no chunk is ever written by two writers or written in pieces.
"""
from __future__ import annotations

import queue
import threading
import zlib

import numpy as np

from kdcache.errors import KDCacheError

_DONE = object()


class _ArrayBuffer:
    """Rows of one array waiting to fill a chunk, flushed whole."""

    def __init__(self, array, rows: int, start: int, checksums: list | None = None):
        self.array, self.rows = array, rows
        n_chunks = -(-array.shape[0] // rows)
        self.checksums = list(checksums) if checksums else [None] * n_chunks  # crc32 of each chunk's values
        self.buf = np.empty((rows,) + tuple(array.shape[1:]), dtype=array.dtype)
        self.start = start  # first row of the chunk being filled (always chunk-aligned)
        self.fill = 0

    def add(self, values: np.ndarray) -> None:
        offset = 0
        while offset < len(values):
            take = min(self.rows - self.fill, len(values) - offset)
            self.buf[self.fill : self.fill + take] = values[offset : offset + take]
            self.fill += take
            offset += take
            if self.fill == self.rows:
                self.flush()

    def flush(self) -> None:
        if self.fill:
            values = self.buf[: self.fill]
            self.array[self.start : self.start + self.fill] = values
            self.checksums[self.start // self.rows] = chunk_checksum(values)
            self.start += self.fill
            self.fill = 0


def chunk_checksum(values: np.ndarray) -> int:
    """crc32 of a chunk's values as stored (dtype, C order): recorded at write, checked by verify."""
    return zlib.crc32(np.ascontiguousarray(values).view(np.uint8).reshape(-1)) & 0xFFFFFFFF


class ChunkWriter:
    """Writes `{name: rows}` batches of one split; call `put` in row order, then `close`.

    `arrays` maps array path -> (array, rows per chunk). Writing starts at `start_row`, which
    must be a chunk boundary of every array. `on_progress(rows, checksums)` is called from the
    writer thread with the number of leading rows safely on disk in every array, and each array's
    list of chunk checksums (None for chunks not written yet); `checksums` seeds those lists.
    """

    def __init__(self, arrays: dict, *, start_row: int = 0, max_pending: int = 8, on_progress=None,
                 checksums: dict | None = None):
        for name, (array, rows) in arrays.items():
            assert start_row % rows == 0 or start_row == array.shape[0], (name, start_row, rows)
        checksums = checksums or {}
        self._buffers = {name: _ArrayBuffer(a, rows, start_row, checksums.get(name))
                         for name, (a, rows) in arrays.items()}
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)  # bounds host memory held by pending batches
        self._error: BaseException | None = None
        self._on_progress = on_progress
        self._reported = start_row
        self._flush_tail = True
        self._thread = threading.Thread(target=self._run, name="kdcache-writer", daemon=True)
        self._thread.start()

    def put(self, rows: dict, ready=None) -> None:
        """Queue one batch. `ready` is an optional CUDA event to wait on before reading `rows`
        (device-to-host copies issued with non_blocking=True are not done until it fires)."""
        if self._error is not None:
            self._raise()
        self._queue.put((rows, ready))

    def close(self) -> None:
        """Write what is queued and the last (short) chunk of each array; raise any write error."""
        self._queue.put(_DONE)
        self._thread.join()
        if self._error is not None:
            self._raise()

    def abort(self) -> None:
        """After a failure upstream: write the whole chunks already queued, never a partial one,
        so a resumed dump restarts from a chunk boundary."""
        self._flush_tail = False
        self._queue.put(_DONE)
        self._thread.join()

    def _raise(self):
        error = self._error
        if isinstance(error, OSError) and error.errno == 28:  # ENOSPC
            raise KDCacheError(
                "disk full while writing the cache; free space and rerun with --resume to finish it"
            ) from error
        raise error

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
                for name, values in rows.items():
                    if hasattr(values, "numpy"):
                        values = values.numpy()
                    self._buffers[name].add(values)
                self._report()
            if self._flush_tail:
                for buffer in self._buffers.values():
                    buffer.flush()
                self._report()
        except BaseException as e:  # surfaced in the main thread on its next put or close
            self._error = e
            while not done:  # keep draining so the producer never blocks forever
                done = self._queue.get() is _DONE

    def _report(self):
        done = min(b.start for b in self._buffers.values())
        if self._on_progress is not None and done != self._reported:  # attrs writes are not free: only on change
            self._reported = done
            self._on_progress(done, {name: b.checksums for name, b in self._buffers.items()})
