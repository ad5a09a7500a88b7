"""Reads that check what they read: every block of a split against the crc32 its writer recorded,
as it arrives, so training (targets in memory, on the GPU or streamed), inspect and replayed views
never use a chunk that is missing, garbled or another store's.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kdcache.errors import KDCacheError
from kdcache.store.lifecycle import final_path
from kdcache.store.records import chunk_checksum, rows_written

PIECE_BYTES = 16 << 20  # rows per backend call in a whole-array load: zarr's per-call cost spread thin, and the checks of one piece overlap the read of the next
CHECK_THREADS = min(8, os.cpu_count() or 1)  # zlib's crc32 lets go of the GIL: blocks are checked on every core while the next piece is read


class CheckedReads:
    """One split's arrays read block by block, each block checked as it arrives against the crc32
    its writer recorded: training (targets in memory, on the GPU or streamed) and inspect read what
    the dump wrote, or stop with one line naming the block and `kdcache verify`. The crc is taken
    over the very bytes read (storage dtype, before any decoding), as the writer took it, so each
    array is read once. Before any read, a split that is not whole is refused, and pieces that were
    never stored (which both backends read as zeros) are looked for in one listing per array.

    `names`: the arrays that will be read, relative to the split. `dtypes`: {name: storage dtype}
    that the root attrs say an array holds; an array whose own metadata says another is refused, as
    its bytes (and their checksum) are unchanged but would decode as other numbers. A schema-1 split
    (written before blocks) has no checksums: it is read unchecked, a chunk's rows standing for a
    block, except that an absent piece of a float array is refused (no teacher output is a chunk of
    exact zeros; labels can be).
    """

    def __init__(self, store, split: str, names, *, dtypes: dict | None = None):
        self.store, self.split, self.names = store, split, list(names)
        attrs = store.get_attrs(split)
        self.checked = attrs.get("block_rows") is not None
        self._check_arrays(dtypes or {})
        if self.checked:
            self._check_records(attrs)
        first = store.array(f"{split}/{self.names[0]}")
        # rows per read: a block, or (schema 1) the first array's chunk
        self.block_rows = attrs["block_rows"] if self.checked else (first.chunks or first.shape)[0]
        self.sums: dict = {}  # name -> [crc32 per block]
        self.absent: dict = {}  # name -> {block: (start, stop) of its rows never stored}
        if self.checked:
            self._check_recorded(attrs)
        for name in self.names:
            self._check_present(name)

    def read(self, name: str) -> np.ndarray:
        """The whole array, every block checked: read a piece of whole blocks at a time, each piece's
        blocks checked in threads while the next is read."""
        a = self.store.array(f"{self.split}/{name}")
        out = np.empty(a.shape, a.dtype)
        n_blocks = -(-a.shape[0] // self.block_rows)
        per_piece = max(1, PIECE_BYTES // max(1, out[:1].nbytes * self.block_rows))  # blocks per backend call
        pool = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="kdcache-check")
        checks = []
        try:
            for first in range(0, n_blocks, per_piece):
                last = min(first + per_piece, n_blocks)
                self._read_span(name, a, first, last, out[first * self.block_rows : last * self.block_rows])
                if self.checked:
                    checks += [pool.submit(self._check, name, b, out[slice(*self._rows(a, b))]) for b in range(first, last)]
            for check in checks:  # in block order: the first damaged block is the one named
                check.result()
        finally:
            pool.shutdown(cancel_futures=True)
        return out

    def read_block(self, name: str, b: int) -> np.ndarray:
        """Rows of block `b` of the array, checked."""
        a = self.store.array(f"{self.split}/{name}")
        start, stop = self._rows(a, b)
        out = np.empty((stop - start, *a.shape[1:]), a.dtype)
        self._read_span(name, a, b, b + 1, out)
        if self.checked:
            self._check(name, b, out)
        return out

    # --- the checks ---------------------------------------------------------------------------
    def _rows(self, a, b: int) -> tuple[int, int]:
        return b * self.block_rows, min((b + 1) * self.block_rows, a.shape[0])

    def _read_span(self, name: str, a, first: int, last: int, out: np.ndarray) -> None:
        """Blocks [first, last) into `out`, one backend call; an error names the block it is in."""
        path = f"{self.split}/{name}"
        try:
            self.store.read_into(path, first * self.block_rows, self._rows(a, last - 1)[1], out)
            return
        except KDCacheError:
            raise
        except Exception as e:  # the backend's own per-chunk checksum (crc32c, fletcher32) or decompressor failed
            error = e
        offset = first * self.block_rows
        for b in range(first, last):  # which block: only on this path, a block at a time
            start, stop = self._rows(a, b)
            try:
                self.store.read_into(path, start, stop, out[start - offset : stop - offset])
            except Exception as e:
                raise self._damaged(name, b, f"cannot be read ({_why(e)})") from None
        raise self._damaged(name, first, f"cannot be read with its neighbours ({_why(error)})") from None

    def _check(self, name: str, b: int, values: np.ndarray) -> None:
        if chunk_checksum(values) != self.sums[name][b]:
            if b in self.absent.get(name, {}):
                lo, hi = self.absent[name][b]
                raise self._damaged(name, b, f"is missing rows {lo}-{hi - 1} from the store (they read as zeros)")
            raise self._damaged(name, b, "does not match the checksum recorded when it was written "
                                         "(changed, or copied from another store)")

    def _check_arrays(self, dtypes: dict) -> None:
        for name in self.names:
            path = f"{self.split}/{name}"
            if not self.store.has_array(path):
                raise self._error(f"{path} is missing from the store")
            stored, expected = np.dtype(self.store.array(path).dtype), dtypes.get(name)
            if expected is not None and stored != np.dtype(expected):
                raise self._error(f"{path} is stored as {stored}, but the store's encoding says {expected} "
                                  "(its metadata was edited)")

    def _check_records(self, attrs: dict) -> None:
        """The records the checks stand on have the form their writer gives them (a hand edit or
        another tool could leave anything there)."""
        rows, sums = attrs["block_rows"], attrs.get("checksums", {})
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
            raise self._error(f"split '{self.split}' records block_rows {rows!r}, not a whole number of rows above 0")
        if not isinstance(sums, dict):
            raise self._error(f"split '{self.split}' records its checksums as {type(sums).__name__}, "
                              "not {array: [crc32 per block]}")
        for name in self.names:
            if name in sums and not isinstance(sums[name], list):
                raise self._error(f"split '{self.split}' records the checksums of {name} as "
                                  f"{type(sums[name]).__name__}, not a list of crc32 per block")

    def _check_recorded(self, attrs: dict) -> None:
        """Refuse a split without a checksum for every block of every array read: a store marked
        complete by hand, or by a tool other than kdcache, over a dump that never finished."""
        if not attrs.get("complete"):
            n = self.store.array(f"{self.split}/{self.names[0]}").shape[0]
            self._refuse(f"was never finished ({rows_written(self.store, self.split)} of {n} rows written)")
        recorded = attrs.get("checksums", {})
        for name in self.names:
            n_blocks = -(-self.store.array(f"{self.split}/{name}").shape[0] // self.block_rows)
            sums = recorded.get(name)
            if sums is None:
                self._refuse(f"has no block checksums for {name}")
            missing = [b for b in range(n_blocks) if b >= len(sums) or sums[b] is None]
            if missing:
                self._refuse(f"has no checksum for {len(missing)} of the {n_blocks} blocks of {name} "
                             f"(first: block {missing[0]})")
            self.sums[name] = sums[:n_blocks]

    def _check_present(self, name: str) -> None:
        """Pieces never stored: a whole block is refused here unless its checksum is that of zeros
        (zarr stores no all-zero chunk); part of a block is left to the block's checksum, read later."""
        path = f"{self.split}/{name}"
        a = self.store.array(path)
        for start, stop in self.store.absent_rows(path):
            for b in range(start // self.block_rows, (stop - 1) // self.block_rows + 1):
                lo, hi = self._rows(a, b)
                if not self.checked:
                    if np.dtype(a.dtype).kind == "f":
                        raise self._damaged(name, b, "is missing from the store (it would read as zeros)")
                elif start <= lo and hi <= stop:  # the whole block
                    if self.sums[name][b] != chunk_checksum(np.zeros((hi - lo, *a.shape[1:]), a.dtype)):
                        raise self._damaged(name, b, "is missing from the store (it would read as zeros)")
                else:
                    self.absent.setdefault(name, {})[b] = (max(start, lo), min(stop, hi))

    def _damaged(self, name: str, b: int, what: str) -> KDCacheError:
        start, stop = self._rows(self.store.array(f"{self.split}/{name}"), b)
        return self._error(f"{self.split}/{name} block {b} (rows {start}-{stop - 1}) {what}")

    def _error(self, what: str) -> KDCacheError:
        fix = (f"run kdcache verify {self.store.path} to list every damaged block, then dump the teacher again"
               if self.checked else "dump the teacher again (a store written before block checksums cannot be verified)")
        return KDCacheError(f"cache '{self.store.path}': {what}; {fix}")

    def _refuse(self, why: str):
        path = self.store.path
        raise KDCacheError(f"cache '{path}' says it is complete but its split '{self.split}' {why}: its dump never "
                           f"finished (kdcache verify {path} lists what is missing); finish an interrupted dump with "
                           f"kdcache dump-teacher ... --out {final_path(path)} --resume, or dump the "
                           "teacher again")


def _why(e: BaseException) -> str:
    """An exception in a few words: a backend's message can run over lines, and carry raw bytes."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0].split('. ')[0][:160]}" if lines else type(e).__name__
