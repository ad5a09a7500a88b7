"""The small interface every store backend implements, and what they share.

A store is a tree of named arrays (`train/logits`) with JSON attributes on the root and on each
split group. Backends differ only in how they put bytes on disk; everything else lives here.
"""
from __future__ import annotations

import numpy as np

CHUNK_BYTES = 1 << 20  # ~1 MiB uncompressed chunks: big enough for fast sequential reads, small enough to rewrite on resume

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


class Store:
    """Base class: arrays addressed by '/'-separated paths, attrs as plain JSON data.

    Subclasses implement the `_`-prefixed methods; keyword-only arguments everywhere so a call
    reads the same for every backend.
    """

    suffixes: tuple[str, ...] = ()
    supports_partial_chunk_writes = True

    def __init__(self, path: str, *, read_only: bool):
        self.path = str(path)
        self.read_only = read_only

    # --- to implement --------------------------------------------------------------------
    def create_array(self, name: str, *, shape: tuple, dtype: str, chunks: tuple):
        raise NotImplementedError

    def array(self, name: str):
        """The array at `name`: supports `shape`, `dtype`, `a[slice]` and `a[slice] = values`."""
        raise NotImplementedError

    def has_array(self, name: str) -> bool:
        raise NotImplementedError

    def array_names(self, group: str = "") -> list[str]:
        """Every array under `group`, as paths relative to it (`activations/layer3`)."""
        raise NotImplementedError

    def group_names(self) -> list[str]:
        """Top-level groups: the splits."""
        raise NotImplementedError

    def get_attrs(self, group: str = "") -> dict:
        raise NotImplementedError

    def update_attrs(self, attrs: dict, group: str = "") -> None:
        raise NotImplementedError

    def stored_bytes(self, name: str) -> int:
        """Bytes the array takes on disk (compressed)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    # --- shared --------------------------------------------------------------------------
    def read(self, name: str) -> np.ndarray:
        """The whole array, one call: the fast path for loading targets into memory."""
        return self.array(name)[...]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
