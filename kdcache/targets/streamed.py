"""A split's targets streamed from the store block by block while training (--targets-in stream),
for targets larger than memory: the same gathers as a table in memory, in kdcache.reader's order."""
from __future__ import annotations

import numpy as np
import torch

from kdcache import store as stores
from kdcache.encodings import ActivationCodec, LogitCodec, from_storage
from kdcache.reader import BlockShuffleSampler, StreamTargets
from kdcache.targets.tables import _checked_reads


class StreamedSplit:
    """A split's targets read from the store block by block while training (--targets-in stream):
    for targets larger than memory, such as full feature maps.

    `sampler()` gives the order both the images and the targets follow (kdcache.reader: whole
    blocks, shuffled in windows of `buffer_blocks`); `stream(sampler)` the StreamTargets that
    prefetch those blocks in the background and gather each batch from them. One store read per
    array per block, never per sample; each block checked against its recorded checksum as it is
    read (store.CheckedReads), and absent pieces looked for before the first.
    """

    def __init__(self, path: str, split: str, *, device="cpu", activations=None, buffer_blocks: int = 8):
        self.path, self.split, self.device, self.buffer_blocks = path, split, device, buffer_blocks
        self._store = stores.open_store(path)  # kept open: the prefetch thread reads through it
        attrs = self._store.get_attrs()
        self.attrs = self._store.get_attrs(split)
        self.codec = LogitCodec.from_attrs(attrs)
        self.block_rows = stores.block_rows_of(self._store, split)
        self.activations = [n for n in attrs.get("activations", {}) if activations is None or n in activations]
        self._reads = _checked_reads(self._store, split, self.codec, self.activations, attrs)
        logits = self._store.array(f"{split}/logits")
        self.n, self.views = logits.shape[0], logits.shape[1]
        self.labels = torch.from_numpy(np.asarray(self._reads.read("labels"), dtype=np.int64))
        self._act = ActivationCodec.from_attrs(attrs)

    def __len__(self) -> int:
        return self.n

    def sampler(self, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        return BlockShuffleSampler(self.n, block_rows=self.block_rows, batch_size=batch_size,
                                   buffer_blocks=self.buffer_blocks, seed=seed, rank=rank, world_size=world_size)

    def load_block(self, b: int) -> dict:
        """Block b of every array, as stored, rows flattened to [rows * V, ...]."""
        tables = {k: from_storage(self._reads.read_block(k, b), dt).flatten(0, 1) for k, (_, dt) in self.codec.arrays().items()}
        acts = {n: self._act.decode(self._reads.read_block(f"activations/{n}", b)).flatten(0, 1)
                for n in self.activations}
        return {"logits": tables, "activations": acts}

    def stream(self, sampler) -> "StreamTeacherTargets":
        return StreamTeacherTargets(self, StreamTargets(self.load_block, sampler, views=self.views, device=self.device))

    def gather(self, rows: torch.Tensor, activations=None) -> dict:
        """Targets of a few rows in any order, read from their blocks (each once): for probes
        (adapter shapes), not for training, which gathers through `stream()` in the sampler's order."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        per_block = self.block_rows * self.views
        blocks = {b: self.load_block(b) for b in (rows // per_block).unique().tolist()}
        picked = [_pick(blocks[row // per_block], row % per_block) for row in rows.tolist()]
        joined = _join(picked)
        acts = {n: t.float() for n, t in joined["activations"].items() if activations is None or n in activations}
        return {"logits": self.codec.decode(joined["logits"]), "activations": acts}

    def predictions(self) -> torch.Tensor:
        """The teacher's class for every sample's first view, a block at a time."""
        out = []
        for b in range(-(-self.n // self.block_rows)):
            tables = {k: t.unflatten(0, (-1, self.views))[:, 0] for k, t in self.load_block(b)["logits"].items()}
            out.append(self.codec.predictions(tables))
        return torch.cat(out)

    def close(self) -> None:
        self._store.close()


class StreamTeacherTargets:
    """One training run's view of a StreamedSplit: gathers decoded targets in the sampler's order."""

    def __init__(self, split: StreamedSplit, stream):
        self.split, self.stream = split, stream

    def start_epoch(self, epoch: int) -> None:
        self.stream.start_epoch(epoch)

    def gather(self, rows: torch.Tensor, activations=None) -> dict:
        picked = self.stream.gather(rows, activations)
        acts = {n: t.float() for n, t in picked["activations"].items()}  # bfloat16 already viewed by load_block
        return {"logits": self.split.codec.decode(picked["logits"]), "activations": acts}

    def close(self) -> None:
        self.stream.close()


def _pick(block: dict, i: int) -> dict:
    """Row i of a block's nested arrays, as [1, ...] tensors."""
    return {group: {k: t[i : i + 1] for k, t in arrays.items()} for group, arrays in block.items()}


def _join(rows: list) -> dict:
    return {group: {k: torch.cat([r[group][k] for r in rows]) for k in rows[0][group]} for group in rows[0]}
