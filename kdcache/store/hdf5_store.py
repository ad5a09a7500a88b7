"""HDF5 file stores: one file, chunked datasets, attrs kept as JSON strings."""
from __future__ import annotations

import json

from kdcache.store.base import Store


class HDF5Store(Store):
    suffixes = (".h5", ".hdf5")

    def __init__(self, path: str, *, read_only: bool, create: bool = False):
        super().__init__(path, read_only=read_only)
        import h5py  # deferred: only HDF5 users pay for it

        mode = "w" if create else ("r" if read_only else "r+")
        # A chunk cache of 64 MiB holds a few whole chunk rows of every array during sequential
        # reads; h5py's 1 MiB default re-decompresses a chunk for every partial read.
        self._file = h5py.File(self.path, mode, rdcc_nbytes=64 << 20)

    def create_array(self, name, *, shape, dtype, chunks):
        # lzf: fast both ways and always available in h5py; gzip costs several times the write time.
        # fletcher32: HDF5's per-chunk checksum, so a corrupted chunk fails on read
        return self._file.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, compression="lzf",
                                         fletcher32=True)

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

    def group_names(self):
        import h5py

        return sorted(k for k, v in self._file.items() if isinstance(v, h5py.Group))

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

    def close(self):
        if self._file.id.valid:
            self._file.close()
