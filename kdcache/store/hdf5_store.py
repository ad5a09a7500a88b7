"""HDF5 file stores: one file, chunked datasets, attrs kept as JSON strings."""
from __future__ import annotations

import json

import numpy as np

from kdcache.store.base import Store

CHUNK_CACHE_BYTES = 64 << 20
CHUNK_CACHE_SLOTS = 100_003


class HDF5Store(Store):
    suffixes = (".h5", ".hdf5")
    supports_concurrent_writers = False  # one writer per file without MPI-enabled HDF5

    def __init__(self, path: str, *, read_only: bool, create: bool = False):
        super().__init__(path, read_only=read_only)
        import h5py  # deferred: only HDF5 users pay for it

        mode = "w" if create else ("r" if read_only else "r+")
        # Reads are whole arrays (targets in memory) or whole blocks (streamed): a chunk cache of
        # 64 MiB holds a block's chunks of an array, so a block read never decompresses a chunk twice;
        # h5py's 1 MiB default re-decompresses a chunk for every partial read. Many slots (a prime)
        # keep the thousands of small chunks of a block from colliding in the hash.
        self._file = h5py.File(self.path, mode, rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=CHUNK_CACHE_SLOTS)

    def create_array(self, name, *, shape, dtype, chunks, shards=None):
        # HDF5 has no shards: a block is several chunks written in one call by one writer.
        # lzf: fast both ways and always available in h5py; gzip costs several times the write time.
        # fletcher32: HDF5's per-chunk checksum, so a corrupted chunk fails on read
        return self._file.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, compression="lzf",
                                         fletcher32=True)

    def layout(self, name):
        return {"chunks": list(self._file[name].chunks), "shards": None, "compressor": "lzf+fletcher32",
                "chunk_cache_bytes": CHUNK_CACHE_BYTES}

    def array(self, name):
        return self._file[name]

    def has_array(self, name):
        import h5py

        return isinstance(self._file.get(name), h5py.Dataset)

    def array_names(self, group=""):
        import h5py

        base = self._file[group] if group else self._file
        names = []
        base.visititems(lambda key, obj: names.append(key) if isinstance(obj, h5py.Dataset) else None)
        return sorted(names)

    def group_names(self, group=""):
        import h5py

        base = self._file[group] if group else self._file
        return sorted(k for k, v in base.items() if isinstance(v, h5py.Group))

    def remove_group(self, name):
        del self._file[name]

    def get_attrs(self, group=""):
        node = self._file[group] if group else self._file
        return {k: json.loads(v) for k, v in node.attrs.items()}

    def update_attrs(self, attrs, group=""):
        node = self._file.require_group(group) if group else self._file
        for key, value in attrs.items():  # in the caller's order: progress markers come last
            node.attrs[key] = json.dumps(value)
        self._file.flush()

    def stored_bytes(self, name):
        return self._file[name].id.get_storage_size()

    def read_into(self, name, start, stop, out):
        self._file[name].read_direct(out, source_sel=np.s_[start:stop])

    def absent_rows(self, name):
        import itertools

        ds = self._file[name]
        if ds.chunks is None:  # contiguous: allocated whole (kdcache makes only chunked datasets)
            return []
        grid = [range(0, n, c) for n, c in zip(ds.shape, ds.chunks)]
        stored = ds.id.get_num_chunks()
        if stored == int(np.prod([len(g) for g in grid])):  # the usual answer, from one call
            return []
        present = {ds.id.get_chunk_info(i).chunk_offset for i in range(stored)}
        rows = ds.chunks[0]
        return sorted({(o[0], min(o[0] + rows, ds.shape[0])) for o in itertools.product(*grid) if o not in present})

    def close(self):
        if self._file.id.valid:
            self._file.close()
