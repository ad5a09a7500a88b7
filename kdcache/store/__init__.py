"""Cache stores: Zarr v3 (default) or HDF5, chosen by the path's suffix, behind one interface.

    base.py        the Store interface both backends implement, chunk and block planning
    zarr_store.py, hdf5_store.py, remote.py   the backends (remote: fsspec URLs, s3://)
    lifecycle.py   create at PATH.partial, resume, publish, open, refuse what is not a finished store
    records.py     which blocks are on disk, with a crc32 per array and block
    checks.py      reads that check every block against its record as it arrives
    lock.py        one writer per local store

This module only re-exports.
"""
from kdcache.store import remote
from kdcache.store.base import BLOCK_BYTES, CHUNK_BYTES, STORAGE_DTYPES, Store, chunk_rows, plan_blocks
from kdcache.store.checks import CheckedReads
from kdcache.store.hdf5_store import HDF5Store
from kdcache.store.lifecycle import (BACKENDS, PARTIAL, SCHEMA_VERSION, backend_for, block_rows_of, check_complete,
                                     check_room, create_split, create_store, decide, final_path, open_store,
                                     partial_path, publish, remove_store, state, translate_errors)
from kdcache.store.lock import StoreLock
from kdcache.store.remote import is_url
from kdcache.store.zarr_store import ZarrStore

__all__ = [
    "BACKENDS", "BLOCK_BYTES", "CHUNK_BYTES", "CheckedReads", "HDF5Store", "PARTIAL", "SCHEMA_VERSION", "STORAGE_DTYPES",
    "Store", "StoreLock", "ZarrStore", "backend_for", "block_rows_of", "check_complete", "check_room", "chunk_rows",
    "create_split", "create_store", "decide", "final_path", "is_url", "open_store", "partial_path", "plan_blocks",
    "publish", "remote", "remove_store", "state", "translate_errors",
]
