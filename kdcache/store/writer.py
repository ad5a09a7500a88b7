"""The background writer: takes batches of rows and writes whole blocks.

The teacher never waits on the disk: batches go into a bounded queue and one thread turns them
into block writes, so no block (zarr shard) is ever written by two writers or written in pieces.
Each whole block is handed to `on_block` (a store.records.ProgressRecord) with its checksums.
"""
from __future__ import annotations

import queue
import threading

import numpy as np

from kdcache.errors import KDCacheError
from kdcache.store.records import chunk_checksum

_DONE = object()


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


def to_host(batch: dict, cuda: bool) -> tuple[dict, object]:
    """A batch of device tensors on its way to the host, for write_blocks: (copies, event). On CUDA the
    copies are queued behind the kernels that made them (non_blocking) and the writer thread waits on
    the event before reading them; on the CPU there is nothing to wait for (event None)."""
    host = {k: t.to("cpu", non_blocking=cuda) for k, t in batch.items()}
    if not cuda:
        return host, None
    import torch  # deferred: the store layer is plain numpy everywhere else

    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def write_blocks(arrays: dict, batches, *, block_rows: int, blocks, record, max_pending: int = 8) -> None:
    """Write every batch of `batches` (`{path: rows}`, or `({path: rows}, cuda_event)`) into the whole
    blocks `blocks` through a BlockWriter, recording each whole block in `record` (a ProgressRecord).

    The one write loop of dump-teacher and convert. Whatever stops it (a teacher error, Ctrl-C, a
    full disk), the whole blocks already written stay on record, so `--resume` skips them; when the
    disk itself is what failed, recording is best effort and its own error never hides the first.
    """
    out = BlockWriter(arrays, block_rows=block_rows, blocks=blocks, max_pending=max_pending, on_block=record.record)
    try:
        for batch in batches:
            out.put(*batch) if isinstance(batch, tuple) else out.put(batch)
    except BaseException:
        out.abort()
        record.flush(after_failure=True)
        if hasattr(batches, "close"):
            batches.close()  # a generator's own cleanup (hooks, bars) now, not when the traceback is freed
        raise
    try:
        out.close()
    except BaseException:
        record.flush(after_failure=True)
        raise
    record.flush()
