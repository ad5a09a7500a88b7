"""Synthetic teacher caches for the bench: logits with class structure, written the way
`dump-teacher` writes them (plan_blocks, sharded arrays, BlockWriter, per-block checksums).

Logits are not iid noise (which no compressor shrinks, and which no teacher outputs): each class
has an embedding near its super-class's (1000 classes in 100 groups of 10, like ImageNet's dog
breeds), a sample is its class's embedding plus noise, and its logits are its similarity to every
class, scaled, plus per-class noise and a per-row offset: the true class leads by ~10, its
siblings come next, the rest scatter around 0 (std ~2), as a trained teacher's logits do.
Drawing them costs ~30 ns a value on one core, more than zstd takes to compress them; so a large
store takes its rows from a bank of such rows, each with its own random offset (`LogitBank`),
which leaves every stored float16 row distinct and costs one add and one cast per value.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from kdcache.store import records
from kdcache import store as stores
from kdcache.store import writer
from kdcache.encodings import LogitCodec, to_storage

GROUP = 10  # classes per super-class: siblings share most of their embedding
RANK = 64  # embedding size: the logits are low rank plus noise
SCALE = 10.0  # logit of the true class over an unrelated one (a confident teacher)
SAMPLE_NOISE = 0.5  # a sample's distance from its class embedding: ~85% top-1, errors mostly siblings
LOGIT_NOISE = 1.0  # per-class noise on every logit
ROW_SHIFT = 2.0  # std of a per-row offset (softmax ignores it; the stored bits do not)


def class_embeddings(classes: int, generator: torch.Generator) -> torch.Tensor:
    """[C, RANK], unit rows; classes of one group share 3/4 of their direction."""
    groups = torch.randn(-(-classes // GROUP), RANK, generator=generator)
    own = torch.randn(classes, RANK, generator=generator)
    e = 0.75 * groups.repeat_interleave(GROUP, 0)[:classes] + 0.5 * own
    return e / e.norm(dim=1, keepdim=True)


def draw_logits(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [n, C] float32, labels [n] int64): n samples of the teacher described above."""
    g = torch.Generator().manual_seed(seed)
    e = class_embeddings(classes, torch.Generator().manual_seed(12345))  # the same classes in every call
    labels = torch.randint(0, classes, (n,), generator=g)
    h = e[labels] + SAMPLE_NOISE / math.sqrt(RANK) * torch.randn(n, RANK, generator=g)
    logits = SCALE * (h @ e.T) + LOGIT_NOISE * torch.randn(n, classes, generator=g)
    logits += ROW_SHIFT * torch.randn(n, 1, generator=g)
    return logits, labels


class LogitBank:
    """Rows for stores too large to draw value by value: bank row i plus a fresh per-row offset.

    Every encoding shifts with the offset (top-k values and logsumexp by it, int8's offset by it,
    its codes not at all), so a batch's arrays come from the bank's encodings by one gather and
    one add, without the top-k or quantization pass over the batch.
    """

    def __init__(self, classes: int, rows: int = 1 << 16, seed: int = 0):
        self.classes = classes
        self.logits, self.labels = draw_logits(rows, classes, seed)
        self._encoded: dict = {}

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(bank rows, offsets [n, 1]) of rows [start, stop), the same on every call."""
        g = torch.Generator().manual_seed(start)
        rows = torch.randint(0, len(self.labels), (stop - start,), generator=g)
        return rows, ROW_SHIFT * torch.randn(stop - start, 1, generator=g)

    def encode(self, codec: LogitCodec, rows: torch.Tensor, shift: torch.Tensor) -> dict:
        """codec.encode(bank[rows] + shift) as {name: tensor [n, ...]}, up to float rounding."""
        if codec.topk is None and codec.dtype != "int8":
            return codec.encode(self.logits[rows] + shift)
        key = (codec.dtype, codec.topk)
        if key not in self._encoded:  # once per codec: the bank's encoding in float32
            base = LogitCodec("float32", codec.topk, codec.num_classes)
            self._encoded[key] = codec.encode(self.logits) if codec.topk is None else base.encode(self.logits)
        enc = {k: t[rows] for k, t in self._encoded[key].items()}
        s = shift.squeeze(1)
        if codec.topk is None:  # int8: the codes and scale are those of the bank row
            enc["logits_offset"] = enc["logits_offset"] + s
            return enc
        # rounded to the codec's value dtype by a dense codec of K "classes"
        enc["logits"] = LogitCodec(codec.dtype, None, codec.topk).encode(enc["logits"] + shift)["logits"]
        enc["logsumexp"] = enc["logsumexp"] + s
        return enc

    def labels_of(self, rows: torch.Tensor) -> torch.Tensor:
        return self.labels[rows]


# --- stores --------------------------------------------------------------------------------------

def root_attrs(codec: LogitCodec, activations=()) -> dict:
    """A store's root attrs as dump_teacher writes them, for a synthetic teacher."""
    return {"schema_version": stores.SCHEMA_VERSION, "kdcache_version": "bench", "complete": False,
            "teacher": {"arch": "synthetic", "num_classes": codec.num_classes}, "splits": ["train"],
            **codec.attrs(), "activation_dtype": "float16" if codec.dtype == "int8" else codec.dtype,
            "views": 1, "augment": None, "activations": {name: {"form": "full"} for name in activations},
            "config": {"source": "bench/synthetic.py"}}


class SplitWriter:
    """One split of a new store, laid out and recorded as `dump-teacher` does (`_prepare_split`,
    `_dump_split`): `put({name: array [b, 1, ...]})` batches in row order, then `close()`.

    `specs` {name relative to the split: (per-row shape, storage dtype)}; `labels` [n] int64.
    """

    def __init__(self, store, specs: dict, labels: np.ndarray, *, split: str = "train", chunk_bytes: int | None = None):
        n = len(labels)
        self.store, self.split, self.n = store, split, n
        row_bytes = {k: math.prod(shape) * np.dtype(dtype).itemsize for k, (shape, dtype) in specs.items()}
        self.block, chunks = stores.plan_blocks(row_bytes, n, chunk_bytes)
        for key, (shape, dtype) in specs.items():
            store.create_array(f"{split}/{key}", shape=(n, *shape), dtype=dtype, chunks=(chunks[key], *shape),
                               shards=(self.block, *shape))
        store.create_array(f"{split}/labels", shape=(n,), dtype="int64", chunks=(self.block,))[:] = labels
        sums = [records.chunk_checksum(labels[i:i + self.block]) for i in range(0, n, self.block)]
        layout = {key: store.layout(f"{split}/{key}") for key in (*specs, "labels")}
        store.update_attrs({"dataset": {"name": "synthetic", "split": split, "length": n, "fingerprint": "synthetic"},
                            "transform": None, "views": 1, "view_transform": None, "layout": layout,
                            "rows_written": 0, "complete": False, "checksums": {"labels": sums},
                            "block_rows": self.block}, group=split)
        n_blocks = -(-n // self.block)
        self.record = records.ProgressRecord(store, split, 0, n_blocks, {k: [None] * n_blocks for k in specs})
        arrays = {f"{split}/{k}": store.array(f"{split}/{k}") for k in specs}
        self.writer = writer.BlockWriter(arrays, block_rows=self.block, blocks=range(n_blocks),
                                         on_block=self.record.record)

    def put(self, rows: dict) -> None:
        self.writer.put({f"{self.split}/{k}": v for k, v in rows.items()})

    def close(self) -> None:
        self.writer.close()
        records.finish_split(self.store, self.split, self.record.checksums, self.n)


def codec_specs(codec: LogitCodec) -> dict:
    """{array: ((views=1, *tail), storage dtype)} of a codec's logits, as a dump lays them out."""
    return {name: ((1, *tail), dtype) for name, (tail, dtype) in codec.arrays().items()}


def host_rows(encoded: dict, codec: LogitCodec) -> dict:
    """codec.encode's tensors [b, ...] -> numpy arrays [b, 1, ...] of their storage dtypes."""
    dtypes = codec.arrays()
    return {k: to_storage(t.unsqueeze(1), dtypes[k][1]) for k, t in encoded.items()}


def write_logit_stores(paths: dict, bank: LogitBank, n: int, batch: int = 8192) -> None:
    """Stores `{path: codec}` of n rows each from one pass over the bank: every batch is drawn
    once and encoded for every store; each store's writer thread compresses while the next batch
    is drawn."""
    rows_of = [bank.batch(s, min(s + batch, n)) for s in range(0, n, batch)]  # index draws only: cheap
    labels = torch.cat([bank.labels_of(r) for r, _ in rows_of]).numpy()
    opened = {path: stores.create_store(path) for path in paths}
    try:
        writers = {}
        for path, codec in paths.items():
            opened[path].update_attrs(root_attrs(codec))
            writers[path] = SplitWriter(opened[path], codec_specs(codec), labels)
        for rows, shift in rows_of:
            for path, codec in paths.items():
                writers[path].put(host_rows(bank.encode(codec, rows, shift), codec))
        for path in paths:
            writers[path].close()
            opened[path].update_attrs({"complete": True})
    finally:
        for store in opened.values():
            store.close()
