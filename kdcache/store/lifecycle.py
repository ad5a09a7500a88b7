"""A store's life: created at PATH.partial, resumed, published by a rename, opened, refused when it
is missing, interrupted, newer than this kdcache, or would not fit.

A local store is written at `PATH.partial` and renamed to `PATH` only once complete; a store at a
URL (s3://bucket/c.zarr, Zarr only) is written in place, since object stores have no rename. Either
way the root attrs carry `complete: true` written last, so an interrupted dump never reads as a
finished cache.
"""
from __future__ import annotations

import os

from kdcache.errors import KDCacheError
import kdcache.store.remote as remote
from kdcache.store.base import Store, plan_blocks
from kdcache.store.hdf5_store import HDF5Store
from kdcache.store.records import chunk_checksum
from kdcache.store.remote import is_url
from kdcache.store.zarr_store import ZarrStore

SCHEMA_VERSION = 3  # bump when the layout changes; readers refuse stores newer than they know
# 2: blocks (block_rows, checksums per block, per-writer progress), top-k/int8 arrays. Schema 1 stores
# still load into memory for training and inspect; what needs blocks asks for a new dump (block_rows_of).
# 3: top-k values stored as log-probabilities with the tail's exact log-mass (log_tail). Dense schema-2
# stores read as before; a schema-2 top-k store is refused with the fix (encodings.LogitCodec.from_attrs).
PARTIAL = ".partial"
BACKENDS = (ZarrStore, HDF5Store)


def partial_path(path: str) -> str:
    """Where a dump to `path` writes until it is complete: PATH.partial, or the URL itself."""
    path = str(path).rstrip("/")
    return path if is_url(path) else path + PARTIAL


def backend_for(path: str) -> type[Store]:
    name = str(path).rstrip("/")
    if name.endswith(PARTIAL):
        name = name[: -len(PARTIAL)]
    if is_url(name) and name.endswith(HDF5Store.suffixes):
        raise KDCacheError("HDF5 stores are local files; dump to a .zarr URL, or dump locally and kdcache convert")
    for backend in BACKENDS:
        if name.endswith(backend.suffixes):
            return backend
    raise KDCacheError(f"store path '{path}' has an unknown suffix; use .zarr (Zarr v3 directory) or .h5 (HDF5 file)")


def create_store(path: str) -> Store:
    """A new, empty, writable store at `path` (whatever was there is replaced)."""
    backend = backend_for(path)
    with translate_errors(path):
        remove_store(path)
        return backend(str(path), read_only=False, create=True)


def remove_store(path: str) -> None:
    import shutil

    if is_url(path):
        remote.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def open_store(path: str, *, read_only: bool = True) -> Store:
    """An existing store. Missing stores, interrupted dumps and newer schemas are user errors."""
    path = str(path).rstrip("/")
    backend = backend_for(path)
    if not _exists(path):
        if partial_path(path) != path and os.path.exists(partial_path(path)):
            raise KDCacheError(
                f"cache '{path}' is incomplete: an interrupted dump left '{partial_path(path)}'; "
                "finish it with kdcache dump-teacher ... --resume"
            )
        raise KDCacheError(f"cache '{path}' does not exist; create it with kdcache dump-teacher --out {path}")
    if backend is ZarrStore and not is_url(path):
        _check_metadata(path)
    try:
        with translate_errors(path, write=False):
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


def _check_metadata(path: str) -> None:
    """Refuse a local Zarr store with a damaged zarr.json: zarr reads a group's or array's metadata
    only when it is first used, so a truncated one would end inspect, verify or training midway in a
    JSONDecodeError."""
    import json

    for folder, subfolders, files in os.walk(path):
        if "zarr.json" not in files:
            continue
        name = os.path.join(folder, "zarr.json")
        try:
            with open(name, "rb") as f:
                doc = json.loads(f.read())
            kind = doc.get("node_type") if isinstance(doc, dict) else None
        except (OSError, ValueError):  # truncated, empty, not UTF-8
            kind = None
        if kind not in ("group", "array"):
            raise KDCacheError(f"'{path}' is damaged: {os.path.relpath(name, path)} is not a Zarr metadata "
                               "document (truncated or overwritten); restore the store from a copy or dump it again")
        if kind == "array":
            subfolders[:] = []  # below an array are only its chunks: thousands of files, no metadata


def final_path(path: str) -> str:
    """The store a dump at `path` is for: PATH for PATH.partial, else `path` itself."""
    path = str(path).rstrip("/")
    return path[: -len(PARTIAL)] if path.endswith(PARTIAL) and not is_url(path) else path


def check_complete(store: Store) -> None:
    if not store.get_attrs().get("complete", False):
        # a URL is written in place, so its dump may also be running right now
        why = "its dump was interrupted, or is still running" if is_url(store.path) else "its dump was interrupted"
        raise KDCacheError(
            f"cache '{store.path}' is incomplete ({why}); "
            f"finish it with kdcache dump-teacher ... --out {final_path(store.path)} --resume"
        )


def state(path: str) -> str:
    """What a dump to `path` finds there: "missing", "partial" (an interrupted dump to resume) or "complete".

    Local: "partial" when PATH.partial exists (even beside a complete PATH: an interrupted
    --overwrite), else "complete" when PATH exists. A URL is its own partial: whatever is there
    is "complete" only once its root attrs say so.
    """
    path = str(path).rstrip("/")
    if not is_url(path):
        if os.path.exists(partial_path(path)):
            return "partial"
        return "complete" if os.path.exists(path) else "missing"
    if not remote.exists(path):
        return "missing"
    try:
        with translate_errors(path, write=False), backend_for(path)(path, read_only=True) as store:
            return "complete" if store.get_attrs().get("complete") else "partial"
    except (OSError, ValueError, KeyError):  # objects there but no root zarr.json yet: killed at the start
        return "partial"


def decide(path: str, *, overwrite: bool, resume: bool, what: str = "dump", flag: str = "--out") -> str:
    """What a job writing a store at `path` does: "create", "resume" or "done" (resuming a store
    that is complete already); or the user error that stops it (`what` names the job, `flag` the
    option that chose `path`). Shared by dump-teacher and convert."""
    if final_path(path) != path:  # resuming "X.partial" would write X.partial.partial and report success
        raise KDCacheError(f"{flag} '{path}' is where an interrupted {what} of '{final_path(path)}' waits; "
                           f"pass {flag} {final_path(path)} --resume to finish it (or --overwrite to start over)")
    found = state(path)  # missing, partial (an interrupted job at partial_path) or complete
    partial = partial_path(path)
    if found == "complete" and not (overwrite or resume):
        raise KDCacheError(f"output '{path}' already exists; pass --overwrite to replace it or choose another {flag}")
    if found == "partial" and not (overwrite or resume):
        raise KDCacheError(f"an interrupted {what} exists at '{partial}'; pass --resume to finish it or --overwrite "
                           "to start over")
    if resume and found != "partial":
        if found == "complete":
            return "done"
        where = f"'{path}' does not exist" if partial == path else f"neither '{partial}' nor '{path}' exists"
        raise KDCacheError(f"nothing to resume: {where}; run without --resume")
    return "resume" if resume else "create"


def check_room(path: str, need: int, fix: str) -> None:
    """Refuse before writing a byte when `need` bytes (uncompressed: an upper bound) do not fit
    where `path` goes: better than ENOSPC hours in. `fix` ends the message. Skipped for URLs: an
    object store reports no free space to check against."""
    import shutil

    if is_url(path):
        return
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    if need > free:
        raise KDCacheError(f"'{path}' needs up to {need / 2**20:,.1f} MiB but only {free / 2**20:,.1f} MiB is free "
                           f"there; free space, {fix}")


def publish(partial: str, path: str) -> None:
    """Put the complete store written at `partial` in place at `path` (replacing what was there).

    A URL was written in place (`partial_path(url) == url`): nothing to move.
    """
    if is_url(path):
        assert partial == path, (partial, path)
        return
    if not os.path.isdir(path):  # an HDF5 file, or nothing: one atomic rename (an open reader keeps the old file)
        os.replace(partial, path)
        return
    # --overwrite of a Zarr directory, which no rename can replace: moved aside first, so that a reader
    # finds the old store, the new one, or (between two renames) none, never one half deleted
    old = f"{path}.replaced-{os.getpid()}"
    os.replace(path, old)
    os.replace(partial, path)
    remove_store(old)


def translate_errors(path: str, write: bool = True):
    """For a URL, a context turning "access denied" into a one-line KDCacheError; a no-op locally
    (a local PermissionError already names the file)."""
    import contextlib

    return remote.translate_errors(path, write=write) if is_url(path) else contextlib.nullcontext()


def _exists(path: str) -> bool:
    return remote.exists(path) if is_url(path) else os.path.exists(path)


def create_split(store: Store, split: str, specs: dict, labels, chunk_bytes: int | None, attrs: dict) -> None:
    """Create a split's arrays (`specs`: {name: (shape, storage dtype)}, blocks planned from their
    row sizes), its labels and its attrs (`attrs` plus layout, block_rows and the labels'
    checksums). A resumed store keeps a split it finished making; one killed while its arrays were
    being made is made again."""
    import numpy as np
    if split in store.group_names():
        if "block_rows" in store.get_attrs(split):
            return
        store.remove_group(split)
    n = len(labels)
    row_bytes = {k: int(np.prod(shape[1:])) * np.dtype(dt).itemsize for k, (shape, dt) in specs.items()}
    block, chunks = plan_blocks(row_bytes, n, chunk_bytes)
    for key, (shape, dt) in specs.items():
        store.create_array(f"{split}/{key}", shape=shape, dtype=dt, chunks=(chunks[key],) + shape[1:],
                           shards=(block,) + shape[1:])
    labels = np.asarray(labels)  # [N] int64 classes, or [N, L] int32 next tokens (-100: no target) of a token store
    store.create_array(f"{split}/labels", shape=labels.shape, dtype=str(labels.dtype), chunks=(block,) + labels.shape[1:])[:] = labels
    sums = [chunk_checksum(labels[i : i + block]) for i in range(0, n, block)]
    layout = {key: store.layout(f"{split}/{key}") for key in (*specs, "labels")}
    # the progress markers last: a split with block_rows has all its arrays
    store.update_attrs(dict(attrs, layout=layout, rows_written=0, complete=False, checksums={"labels": sums},
                            block_rows=block), group=split)


def block_rows_of(store: Store, split: str) -> int:
    """The split's rows per block; a schema-1 store (written before blocks) is a user error here."""
    rows = store.get_attrs(split).get("block_rows")
    if rows is None:
        raise KDCacheError(f"'{store.path}' was written by an older kdcache (schema {store.get_attrs().get('schema_version')}, "
                           "before blocks): it can be trained from in memory, but streaming, convert and resume "
                           "need a store dumped by this version; dump the teacher again")
    return rows
