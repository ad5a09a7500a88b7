"""Zarr v3 directory stores (the default backend): one chunk file per chunk, zstd compressed.

A path may also be a URL (s3://bucket/c.zarr, any installed fsspec protocol): one object per chunk.
"""
from __future__ import annotations

import os

import kdcache.store.remote as remote
from kdcache.store.base import Store

ZSTD_LEVEL = 1


class ZarrStore(Store):
    suffixes = (".zarr",)

    def __init__(self, path: str, *, read_only: bool, create: bool = False):
        super().__init__(path, read_only=read_only)
        import zarr  # deferred: importing zarr costs ~0.3 s, and HDF5 users never need it

        mode = "w" if create else ("r" if read_only else "r+")
        store = remote.zarr_store(self.path, read_only=read_only) if remote.is_url(self.path) else self.path
        # zarr_format=3: without it zarr probes for v2 metadata too (8 requests to open a remote group, not 2)
        self._root = zarr.open_group(store=store, mode=mode, zarr_format=3)
        self._opened: dict = {}  # read-only: each array's metadata read once, not on every block (a GET remotely)

    def create_array(self, name, *, shape, dtype, chunks, shards=None):
        from zarr.codecs import Crc32cCodec, ZstdCodec

        if shards is not None and (shards[0] == chunks[0] or shards[0] % chunks[0]):
            # one chunk per shard is only an index to read first; and a split that is a single block
            # of N (not a power of two) rows cannot be cut into whole chunks: plain chunks, written
            # in one call by the block's one writer, do the same job
            shards = None
        # crc32c after zstd: a flipped or truncated chunk fails loudly on read instead of decoding
        # to wrong numbers (a missing chunk is caught by the checksums kdcache records, and by absent_rows,
        # on every load: store.checks.CheckedReads).
        # zstd level 1, chosen by measurement (make bench, section 5: 32k x 1000 logits with class
        # structure): levels 1, 3 and 9 store the same bytes, level 1 writes float16 1.34x faster than
        # 3; no compression costs 9% (int8 13%) more bytes; blosc-lz4 does not compress logits at all
        return self._root.create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards, fill_value=0,
                                       compressors=[ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()])

    def layout(self, name):
        a = self._root[name]
        return {"chunks": list(a.chunks), "shards": list(a.shards) if a.shards else None,
                "compressor": f"zstd(level={ZSTD_LEVEL})+crc32c"}

    def array(self, name):
        if not self.read_only:
            return self._root[name]
        if name not in self._opened:
            self._opened[name] = self._root[name]
        return self._opened[name]

    def read_into(self, name, start, stop, out):
        from zarr.core.buffer import default_buffer_prototype

        # decoded straight into `out`: a load of 100 MB of logits makes no second copy
        self.array(name).get_basic_selection(slice(start, stop),
                                             out=default_buffer_prototype().nd_buffer.from_numpy_array(out))

    def absent_rows(self, name):
        import itertools

        from zarr.core.sync import sync

        a = self.array(name)
        piece = a.shards or a.chunks  # what one stored object holds: a shard, or a chunk
        prefix = f"{a.store_path.path}/"

        async def stored_keys():
            return {key.removeprefix(prefix) async for key in a.store_path.store.list_prefix(prefix)}

        stored = sync(stored_keys())  # one listing of the array's objects (a LIST remotely), no reads
        grid = itertools.product(*(range(-(-n // p)) for n, p in zip(a.shape, piece)))
        return sorted({(c[0] * piece[0], min((c[0] + 1) * piece[0], a.shape[0])) for c in grid
                       if a.metadata.encode_chunk_key(c) not in stored})

    def has_array(self, name):
        import zarr

        try:
            return isinstance(self._root[name], zarr.Array)
        except KeyError:
            return False

    def array_names(self, group=""):
        import zarr

        base = self._root[group] if group else self._root
        names = []
        for key, member in base.members(max_depth=None):
            if isinstance(member, zarr.Array):
                names.append(key)
        return sorted(names)

    def group_names(self, group=""):
        base = self._root[group] if group else self._root
        return sorted(base.group_keys())

    def remove_group(self, name):
        del self._root[name]

    def get_attrs(self, group=""):
        node = self._root[group] if group else self._root
        return dict(node.attrs)

    def update_attrs(self, attrs, group=""):
        node = self._root.require_group(group) if group else self._root
        # one metadata write for all keys: attrs.update() writes key by key, and a kill between two
        # of those writes once left rows_written ahead of the checksums that vouch for those rows
        node.update_attributes(attrs)

    def stored_bytes(self, name):
        if remote.is_url(self.path):
            fs, root = remote.filesystem(f"{self.path}/{name}")
            fs.invalidate_cache(root)  # zarr wrote through its own (async) instance of the filesystem
            sizes = fs.du(root, total=False)  # one listing of the prefix, not a request per chunk
            return sum(size for key, size in sizes.items() if not key.endswith("zarr.json"))
        total = 0
        for dirpath, _, files in os.walk(os.path.join(self.path, name)):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files if f != "zarr.json")
        return total
