"""A split's targets in memory: one table per stored array, decoded per batch after one gather.

Targets are kept as stored (float16, int8 with its scales, top-k values and indices) and decoded
after the gather by the sample indices the DataLoader yields, never a store call per sample or batch.
"""
from __future__ import annotations

import numpy as np
import torch

from kdcache import store as stores
from kdcache.encodings import ActivationCodec, LogitCodec, from_storage, stored_dtypes


def _stored(reads, name: str, device) -> torch.Tensor:
    """A whole stored array, every block checked as read, as a tensor of its storage width (uint16
    as int16 bits), on `device`."""
    values = reads.read(name)
    return from_storage(values, str(values.dtype)).to(device)


def _checked_reads(store, split: str, codec: LogitCodec, activations: list, attrs: dict) -> stores.CheckedReads:
    """The checked reads of a load of the split's targets: logits, the named activations, labels,
    each of the storage dtype the root attrs say."""
    dtypes = stored_dtypes(codec, ActivationCodec.from_attrs(attrs), activations)
    return stores.CheckedReads(store, split, [*dtypes, "labels"], dtypes=dtypes)


class SplitTargets:
    """Cached teacher outputs of one split, in memory. `targets[rows]` -> {"logits": [B, C] float32
    (or a TopK for a top-k cache), "activations": {name: [B, ...] float32}}.

    A row is one view: `sample * V + view` in the flattened [N * V] table, which is the sample
    index itself for a cache of one view per sample (V = 1).

    Every array is kept as stored (float16, int8 with its scales, top-k values and indices: a
    quarter to a hundredth of float32) and decoded per batch, after the gather, where it costs
    microseconds. Only the activations named are loaded (all of them when None), and every block
    of what is loaded is checked against its recorded checksum as it is read (store.CheckedReads).
    """

    def __init__(self, store: stores.Store, split: str, *, device="cpu", activations=None):
        attrs = store.get_attrs()
        self.split = split
        self.attrs = store.get_attrs(split)
        self.codec = LogitCodec.from_attrs(attrs)
        # every split of a dump holds every activation the root attrs name: one that is absent is refused
        names = [n for n in attrs.get("activations", {}) if activations is None or n in activations]
        reads = _checked_reads(store, split, self.codec, names, attrs)
        self.tables = {name: _stored(reads, name, device) for name in self.codec.arrays()}  # [N, V, ...]
        act = ActivationCodec.from_attrs(attrs)
        self.activations = {name: act.decode(reads.read(f"activations/{name}")).to(device) for name in names}
        self.labels = torch.from_numpy(np.asarray(reads.read("labels"), dtype=np.int64))

    def __len__(self) -> int:
        return self.tables["logits"].shape[0]

    @property
    def views(self) -> int:
        return self.tables["logits"].shape[1]

    @property
    def logits(self):
        """Every row's logits decoded at once: [N, V, C] float32, or a TopK. For inspection and
        tests; training gathers a batch at a time."""
        return self.codec.decode(self.tables)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.tables.values(), *self.activations.values()))

    def __getitem__(self, rows: torch.Tensor) -> dict:
        return self.gather(rows)

    def gather(self, rows: torch.Tensor, activations=None) -> dict:
        """Targets of the views at `rows` [B]: logits [B, C] float32 (or TopK) and the named activations
        (all loaded when `activations` is None). One index_select per array on the [N * V, ...] view,
        which flattening a contiguous tensor gives for free; not `t[index, 0]`: mixing a tensor and an
        int index takes torch's slow path (bench: 0.65M vs 1.2M samples/s, 200k x 1000 fp16)."""
        rows = rows.to(self.tables["logits"].device)
        names = self.activations if activations is None else activations
        picked = {k: t.flatten(0, 1).index_select(0, rows) for k, t in self.tables.items()}
        return {
            "logits": self.codec.decode(picked),
            "activations": {n: self.activations[n].flatten(0, 1).index_select(0, rows).float() for n in names},
        }

    def predictions(self) -> torch.Tensor:
        """The teacher's class for every sample's first view [N] (eval splits have one clean view)."""
        return self.codec.predictions({k: t[:, 0] for k, t in self.tables.items()}).cpu()
