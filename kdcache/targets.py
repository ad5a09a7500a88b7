"""Stage 2's view of a cache: the teacher's targets of a split, in memory, gathered by index.

Targets are decoded once into one tensor per array; a batch's targets are one gather by the
sample indices the DataLoader yields, never a store call per sample or per batch.
"""
from __future__ import annotations

import numpy as np
import torch

from kdcache import store as stores
from kdcache.errors import KDCacheError


def decode(values: np.ndarray, encoding: str | None) -> torch.Tensor:
    """Stored array -> tensor of its logical dtype (bfloat16 comes back from its uint16 bits)."""
    t = torch.from_numpy(np.ascontiguousarray(values))
    if encoding == "bfloat16-as-uint16":
        t = t.view(torch.bfloat16)
    return t


class SplitTargets:
    """Cached teacher outputs of one split. `targets[rows]` -> {"logits": [B, C] float32, ...}.

    A row is one view: `sample * V + view` in the flattened [N * V] table, which is the sample
    index itself for a cache of one view per sample (V = 1).

    Kept in the stored dtype (half the memory of float32 for float16 caches) and converted per
    batch, after the gather, where it costs a few microseconds.
    """

    def __init__(self, store: stores.Store, split: str, *, device="cpu"):
        attrs = store.get_attrs()
        encoding = attrs.get("encoding")
        self.split = split
        self.attrs = store.get_attrs(split)
        self.logits = decode(store.read(f"{split}/logits"), encoding).to(device)  # [N, V, C]
        self.labels = torch.from_numpy(np.asarray(store.read(f"{split}/labels"), dtype=np.int64))
        self.activations = {
            name: decode(store.read(f"{split}/activations/{name}"), encoding).to(device)
            for name in attrs.get("activations", {})
            if store.has_array(f"{split}/activations/{name}")
        }

    def __len__(self) -> int:
        return self.logits.shape[0]

    @property
    def views(self) -> int:
        return self.logits.shape[1]

    def __getitem__(self, rows: torch.Tensor) -> dict:
        return self.gather(rows)

    def gather(self, rows: torch.Tensor, activations=None) -> dict:
        """Targets of the views at `rows` [B]: logits [B, C] float32 and the named activations (all
        when `activations` is None). One index_select on the [N * V, ...] view, which flattening a
        contiguous tensor gives for free; not `t[index, 0]`: mixing a tensor and an int index takes
        torch's slow path (bench: 0.65M vs 1.2M samples/s, 200k x 1000 fp16)."""
        rows = rows.to(self.logits.device)
        names = self.activations if activations is None else activations
        return {
            "logits": self.logits.flatten(0, 1).index_select(0, rows).float(),
            "activations": {n: self.activations[n].flatten(0, 1).index_select(0, rows).float() for n in names},
        }


class Cache:
    """An opened, complete teacher cache: attrs, splits, and their targets on demand."""

    def __init__(self, path: str, *, device="cpu"):
        self.path = str(path)
        self.device = device
        with stores.open_store(self.path) as store:
            stores.check_complete(store)
            self.attrs = store.get_attrs()
            self.splits = {s: store.get_attrs(s) for s in store.group_names()}
        self._targets: dict = {}

    @property
    def teacher(self) -> dict:
        return self.attrs["teacher"]

    @property
    def num_classes(self) -> int:
        return int(self.attrs["teacher"]["num_classes"])

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def targets(self, split: str) -> SplitTargets:
        if split not in self.splits:
            raise KDCacheError(f"cache '{self.path}' has no split '{split}'; it has {', '.join(self.splits)}; "
                               f"dump it with kdcache dump-teacher --split {split}")
        if split not in self._targets:
            with stores.open_store(self.path) as store:
                self._targets[split] = SplitTargets(store, split, device=self.device)
        return self._targets[split]

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


class CachedTeacher:
    """The teacher, taken out of the loop: its outputs for a batch are a gather from the cache."""

    def __init__(self, targets: SplitTargets, activations=()):
        self.targets = targets
        self.activations = list(activations)  # only what the losses use is gathered per batch

    def __call__(self, x: torch.Tensor, rows: torch.Tensor) -> dict:
        return self.targets.gather(rows, self.activations)


class OnlineTeacher:
    """The teacher run live on each batch (online KD, for comparison): same outputs, same forms."""

    def __init__(self, model: torch.nn.Module, activations: dict | None = None):
        self.model = model.eval()
        self.activations = activations or {}  # {name: form}, as a cache would store them

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> dict:
        from kdcache.hooks import REDUCTIONS, capture

        with torch.no_grad(), capture(self.model, list(self.activations)) as acts:
            logits = self.model(x).float()
            feats = {n: REDUCTIONS[form](acts[n].float()) for n, form in self.activations.items()}
        return {"logits": logits, "activations": feats}
