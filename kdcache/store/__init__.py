"""Cache stores: Zarr v3 (default) or HDF5, chosen by the path's suffix, behind one interface.

A store is written at `PATH.partial` and renamed to `PATH` only once complete, and its root attrs
carry `complete: true` written last, so an interrupted dump never reads as a finished cache.
"""
from __future__ import annotations

import os

from kdcache.errors import KDCacheError
from kdcache.store.base import CHUNK_BYTES, STORAGE_DTYPES, Store, chunk_rows
from kdcache.store.hdf5_store import HDF5Store
from kdcache.store.lock import StoreLock
from kdcache.store.zarr_store import ZarrStore

__all__ = [
    "CHUNK_BYTES", "STORAGE_DTYPES", "SCHEMA_VERSION", "Store", "ZarrStore", "HDF5Store", "StoreLock",
    "chunk_rows", "backend_for", "create_store", "open_store", "partial_path", "check_complete",
]

SCHEMA_VERSION = 1  # bump when the layout changes; readers refuse stores newer than they know
PARTIAL = ".partial"
BACKENDS = (ZarrStore, HDF5Store)


def partial_path(path: str) -> str:
    return str(path).rstrip("/") + PARTIAL


def backend_for(path: str) -> type[Store]:
    name = str(path).rstrip("/")
    if name.endswith(PARTIAL):
        name = name[: -len(PARTIAL)]
    for backend in BACKENDS:
        if name.endswith(backend.suffixes):
            return backend
    raise KDCacheError(f"store path '{path}' has an unknown suffix; use .zarr (Zarr v3 directory) or .h5 (HDF5 file)")


def create_store(path: str) -> Store:
    """A new, empty, writable store at `path` (whatever was there is replaced)."""
    remove_store(path)
    return backend_for(path)(str(path), read_only=False, create=True)


def remove_store(path: str) -> None:
    import shutil

    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def open_store(path: str, *, read_only: bool = True) -> Store:
    """An existing store. Missing stores, interrupted dumps and newer schemas are user errors."""
    path = str(path).rstrip("/")
    backend = backend_for(path)
    if not os.path.exists(path):
        if os.path.exists(partial_path(path)):
            raise KDCacheError(
                f"cache '{path}' is incomplete: an interrupted dump left '{partial_path(path)}'; "
                "finish it with kdcache dump-teacher ... --resume"
            )
        raise KDCacheError(f"cache '{path}' does not exist; create it with kdcache dump-teacher --out {path}")
    try:
        store = backend(path, read_only=read_only)
    except (OSError, ValueError, KeyError) as e:  # zarr and h5py say "not a store" in several ways
        raise KDCacheError(f"'{path}' is not a readable kdcache store ({type(e).__name__}: {e})") from None
    version = store.get_attrs().get("schema_version")
    if version is None:
        store.close()
        raise KDCacheError(f"'{path}' is not a kdcache store (no schema_version attribute)")
    if version > SCHEMA_VERSION:
        store.close()
        raise KDCacheError(
            f"cache '{path}' has schema version {version}, newer than this kdcache reads ({SCHEMA_VERSION}); "
            "upgrade kdcache"
        )
    return store


def check_complete(store: Store) -> None:
    if not store.get_attrs().get("complete", False):
        raise KDCacheError(
            f"cache '{store.path}' is incomplete (its dump was interrupted); "
            "finish it with kdcache dump-teacher ... --resume"
        )
