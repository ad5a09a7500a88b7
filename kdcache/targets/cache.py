"""A complete cache opened for training: its attrs and splits, and each split's targets on demand
(in memory, on the GPU or streamed), checked against the dataset they are joined to."""
from __future__ import annotations

import numpy as np
import torch

from kdcache import store as stores
from kdcache.encodings import LogitCodec
from kdcache.errors import KDCacheError
from kdcache.progress import log
from kdcache.targets.streamed import StreamedSplit
from kdcache.targets.tables import SplitTargets


class Cache:
    """An opened, complete teacher cache: attrs, splits, and their targets on demand."""

    def __init__(self, path: str, *, device="cpu"):
        self.path = str(path)
        self.device = device
        with stores.open_store(self.path) as store:
            stores.check_complete(store)
            self.attrs = store.get_attrs()
            self.splits = {s: store.get_attrs(s) for s in store.group_names()}
        if any("block_rows" not in a for a in self.splits.values()):  # schema 1: what it is, said once per cache
            log.warning(f"kdcache: warning: cache '{self.path}' was written before per-block checksums (schema "
                        f"{self.attrs.get('schema_version')}): its targets load unchecked; dump the teacher again to "
                        "have every block checked as it is read")
        self._targets: dict = {}

    @property
    def teacher(self) -> dict:
        return self.attrs["teacher"]

    @property
    def num_classes(self) -> int:
        return int(self.attrs["teacher"]["num_classes"])

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def targets(self, split: str, *, activations=None, place: str | None = None, buffer_blocks: int = 8):
        """The split's targets: in memory (SplitTargets on the CPU, or on the GPU with place="gpu"; the
        default: the cache's device), or streamed from the store (StreamedSplit); only the named
        activations (None: all)."""
        place = place or ("gpu" if torch.device(self.device).type == "cuda" else "memory")
        if split not in self.splits:
            raise KDCacheError(f"cache '{self.path}' has no split '{split}'; it has {', '.join(self.splits)}; "
                               f"dump it with kdcache dump-teacher --split {split}")
        key = (split, None if activations is None else tuple(sorted(activations)), place)
        if key not in self._targets:
            if place == "stream":
                self._targets[key] = StreamedSplit(self.path, split, device=self.device, activations=activations,
                                                   buffer_blocks=buffer_blocks)
            else:
                with stores.open_store(self.path) as store:
                    device = self.device if place == "gpu" else "cpu"
                    self._targets[key] = SplitTargets(store, split, device=device, activations=activations)
        return self._targets[key]

    def nbytes(self, split: str, activations=None) -> int:
        """Bytes the split's targets take in memory, as stored (what SplitTargets would hold)."""
        with stores.open_store(self.path) as store:
            names = list(LogitCodec.from_attrs(self.attrs).arrays())
            names += [f"activations/{n}" for n in self.attrs.get("activations", {}) if activations is None or n in activations]
            total = 0
            for name in filter(lambda name: store.has_array(f"{split}/{name}"), names):  # an absent one: the load refuses it
                a = store.array(f"{split}/{name}")
                total += int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
            return total

    def check_dataset(self, data) -> None:
        """Refuse to join a cache to data it was not made from (length, labels, bytes in order)."""
        split = data.split
        if split not in self.splits:
            self.targets(split)  # raises the missing-split error
        recorded = self.splits[split].get("dataset", {})
        if recorded.get("fingerprint") != data.fingerprint():
            raise KDCacheError(
                f"cache '{self.path}' split '{split}' was made from {recorded.get('name')} "
                f"({recorded.get('length')} samples) and does not match dataset {data.name} ({len(data)} samples) "
                "(fingerprint mismatch); use the dataset the cache was dumped from or dump a new cache"
            )

    def __getitem__(self, split: str) -> SplitTargets:
        return self.targets(split)


def open_cache(path: str, *, device="cpu") -> Cache:
    """Open a complete cache for reading: `open_cache("c.zarr")["train"][idx]["logits"]`."""
    return Cache(path, device=device)
