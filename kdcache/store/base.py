"""The small interface every store backend implements, and what they share.

A store is a tree of named arrays (`train/logits`) with JSON attributes on the root and on each
split group. Backends differ only in how they put bytes on disk; everything else lives here.
"""
from __future__ import annotations

import numpy as np

CHUNK_BYTES = 1 << 20  # ~1 MiB uncompressed chunks: big enough for fast sequential reads, small enough to rewrite on resume
BLOCK_BYTES = 64 << 20  # cap on one array's share of a block: the writer holds a block of every array in memory

# Storage dtypes. Neither zarr v3 nor HDF5 knows bfloat16, so it is kept bit for bit in a uint16
# array and the store's attrs say so (`encoding`).
STORAGE_DTYPES = {
    "float32": ("float32", None),
    "float16": ("float16", None),
    "bfloat16": ("uint16", "bfloat16-as-uint16"),
}


def chunk_rows(row_bytes: int, n_rows: int, target: int | None = None) -> int:
    """Rows per chunk: a power of two near `target` bytes, never more than the array holds.

    Powers of two make every array's chunk boundaries line up with the largest one's, so a
    resumed dump can restart at a row where every array starts a fresh chunk.
    """
    target = target or CHUNK_BYTES
    rows = 1
    while rows * 2 * max(row_bytes, 1) <= target:
        rows *= 2
    return max(1, min(rows, n_rows))


def plan_blocks(row_bytes: dict, n_rows: int, chunk_target: int | None = None,
                block_target: int | None = None, anchor: str = "logits") -> tuple[int, dict]:
    """(rows per block, {array: rows per chunk}) for the arrays of one split.

    A block is the unit of writing, of resuming, of a rank's share of a distributed dump and of
    streamed reads: every array's rows [k * block, (k + 1) * block) are written whole, at once, by
    one writer. A chunk is the unit of reading, about `chunk_target` bytes. The block is the
    `anchor` array's chunk (the logits': what every student reads), capped so that no array's
    block exceeds `block_target` bytes. Arrays with smaller rows (view seeds, top-k indices) are
    chunked like the block; arrays with larger rows (feature maps) get 1 MiB chunks inside zarr
    shards of one block (the "sharding where it helps": a 32 KiB-row feature map has 32-row chunks
    in 512-row shards, written in 16 MiB pieces, read in 1 MiB ones).
    Powers of two throughout, so every chunk boundary is a block boundary's divisor.
    """
    chunks = {name: chunk_rows(b, n_rows, chunk_target) for name, b in row_bytes.items()}
    cap = chunk_rows(max(row_bytes.values()), n_rows, block_target or BLOCK_BYTES)
    block = max(1, min(chunks.get(anchor, max(chunks.values())), cap))
    return block, {name: min(rows, block) for name, rows in chunks.items()}


class Store:
    """Base class: arrays addressed by '/'-separated paths, attrs as plain JSON data.

    Subclasses implement the `_`-prefixed methods; keyword-only arguments everywhere so a call
    reads the same for every backend.
    """

    suffixes: tuple[str, ...] = ()
    supports_concurrent_writers = True  # processes writing disjoint blocks at once (a distributed dump)

    def __init__(self, path: str, *, read_only: bool):
        self.path = str(path)
        self.read_only = read_only

    # --- to implement --------------------------------------------------------------------
    def create_array(self, name: str, *, shape: tuple, dtype: str, chunks: tuple, shards: tuple | None = None):
        """A new array. `shards` (zarr): chunks grouped into one object each, written whole."""
        raise NotImplementedError

    def array(self, name: str):
        """The array at `name`: supports `shape`, `dtype`, `a[slice]` and `a[slice] = values`."""
        raise NotImplementedError

    def has_array(self, name: str) -> bool:
        raise NotImplementedError

    def array_names(self, group: str = "") -> list[str]:
        """Every array under `group`, as paths relative to it (`activations/layer3`)."""
        raise NotImplementedError

    def group_names(self, group: str = "") -> list[str]:
        """Groups directly under `group`: the splits at the top level."""
        raise NotImplementedError

    def remove_group(self, name: str) -> None:
        raise NotImplementedError

    def get_attrs(self, group: str = "") -> dict:
        raise NotImplementedError

    def update_attrs(self, attrs: dict, group: str = "") -> None:
        raise NotImplementedError

    def layout(self, name: str) -> dict:
        """How the array sits on disk (chunks, shards, compressor), for the store's attrs."""
        raise NotImplementedError

    def stored_bytes(self, name: str) -> int:
        """Bytes the array takes on disk (compressed)."""
        raise NotImplementedError

    def absent_rows(self, name: str) -> list[tuple[int, int]]:
        """Row ranges [start, stop) of the array whose stored pieces (chunks, zarr shards) were never
        written. Both backends read those as the fill value, 0, without a word; zarr also leaves out
        a chunk that is all zeros (write_empty_chunks=False), so an absent piece is damage only where
        the recorded checksum says the rows were not zeros."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    # --- shared --------------------------------------------------------------------------
    def read(self, name: str) -> np.ndarray:
        """The whole array, one call: the fast path for loading targets into memory."""
        return self.array(name)[...]

    def read_into(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        """Rows [start, stop) of the array into `out` (C-contiguous, of their shape): one block of a
        load that checks each block as it arrives. Backends override it to read without a copy."""
        out[...] = self.array(name)[start:stop]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
