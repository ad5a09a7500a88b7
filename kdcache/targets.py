"""Stage 2's view of a cache: the teacher's targets of a split, in memory, gathered by index.

Targets are decoded once into one tensor per array; a batch's targets are one gather by the
sample indices the DataLoader yields, never a store call per sample or per batch.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from kdcache import store as stores
from kdcache.encodings import LogitCodec, activation_dtype, from_storage
from kdcache.errors import KDCacheError
from kdcache.progress import log


def decode(values: np.ndarray, encoding: str | None) -> torch.Tensor:
    """Stored dense array -> tensor of its logical dtype (bfloat16 comes back from its uint16 bits)."""
    t = torch.from_numpy(np.ascontiguousarray(values))
    if encoding == "bfloat16-as-uint16":
        t = t.view(torch.bfloat16)
    return t


def activation_encoding(attrs: dict) -> str | None:
    """How a store's activations are kept: bfloat16 as uint16 bits, or as their own dtype."""
    return "bfloat16-as-uint16" if attrs.get("activation_dtype", attrs.get("dtype")) == "bfloat16" else None


def _stored(reads, name: str, device) -> torch.Tensor:
    """A whole stored array, every block checked as read, as a tensor of its storage width (uint16
    as int16 bits), on `device`."""
    values = reads.read(name)
    return from_storage(values, str(values.dtype)).to(device)


def _checked_reads(store, split: str, codec: LogitCodec, activations: list, attrs: dict) -> stores.CheckedReads:
    """The checked reads of a load of the split's targets: logits, the named activations, labels,
    each of the storage dtype the root attrs say."""
    act_dtype = stores.STORAGE_DTYPES[attrs.get("activation_dtype") or activation_dtype(codec.dtype)][0]
    dtypes = {**{k: dt for k, (_, dt) in codec.arrays().items()}, **{f"activations/{n}": act_dtype for n in activations}}
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
        act_encoding = activation_encoding(attrs)
        self.activations = {name: decode(reads.read(f"activations/{name}"), act_encoding).to(device) for name in names}
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
        self._act_encoding = activation_encoding(attrs)

    def __len__(self) -> int:
        return self.n

    def sampler(self, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        from kdcache.reader import BlockShuffleSampler

        return BlockShuffleSampler(self.n, block_rows=self.block_rows, batch_size=batch_size,
                                   buffer_blocks=self.buffer_blocks, seed=seed, rank=rank, world_size=world_size)

    def load_block(self, b: int) -> dict:
        """Block b of every array, as stored, rows flattened to [rows * V, ...]."""
        tables = {k: from_storage(self._reads.read_block(k, b), dt).flatten(0, 1) for k, (_, dt) in self.codec.arrays().items()}
        acts = {n: decode(self._reads.read_block(f"activations/{n}", b), self._act_encoding).flatten(0, 1)
                for n in self.activations}
        return {"logits": tables, "activations": acts}

    def stream(self, sampler) -> "StreamTeacherTargets":
        from kdcache.reader import StreamTargets

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


def available_memory() -> int:
    """Bytes this machine can still give a process without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


MEMORY_SHARE = 0.5  # auto keeps targets in RAM (or on the GPU) only while they take at most half of what is free
FIT_SHARE = 0.9  # an explicit --targets-in memory|gpu is refused above this: the rest is for the model and images


def choose_place(requested: str, need: int, device) -> str:
    """memory, gpu or stream for targets of `need` bytes, as asked or (auto) as they fit."""
    device = torch.device(device)
    gpu_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    ram_free = available_memory()
    gib = 2**30
    if requested == "gpu":
        if device.type != "cuda":
            raise KDCacheError("--targets-in gpu needs training on a CUDA device; use --targets-in memory here")
        if need > FIT_SHARE * gpu_free:
            raise KDCacheError(f"the targets take {need / gib:.2f} GiB but the GPU has {gpu_free / gib:.2f} GiB free; "
                               "use --targets-in memory or stream")
        return "gpu"
    if requested == "memory":
        if need > FIT_SHARE * ram_free:
            raise KDCacheError(f"the targets take {need / gib:.2f} GiB but only {ram_free / gib:.2f} GiB of memory is "
                               "available; use --targets-in stream (or a compact cache: kdcache convert --topk K)")
        return "memory"
    if requested == "stream":
        return "stream"
    if device.type == "cuda" and need <= MEMORY_SHARE * gpu_free:
        return "gpu"  # a batch is one gather where the student is: no host-to-device copy of targets
    return "memory" if need <= MEMORY_SHARE * ram_free else "stream"


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


# The teacher side of training, one interface whatever the teacher is (trainer's `fit` never asks):
#   teacher(x, rows) -> {"logits": [B, C] tensor | TopK | Sampled, "activations": {name: [B, ...]}}
#   teacher.follow(sampler) -> the teacher for a run whose batches come from `sampler`
#   teacher.start_epoch(epoch), teacher.close()


class CachedTeacher:
    """The teacher, taken out of the loop: its outputs for a batch are a gather from the cache."""

    def __init__(self, targets, activations=(), device="cpu"):
        self.targets = targets  # SplitTargets, StreamedSplit, or the StreamTeacherTargets of one run
        self.activations = list(activations)  # only what the losses use is gathered per batch
        self.device = torch.device(device)

    def follow(self, sampler) -> CachedTeacher:
        """Streamed targets read their blocks in `sampler`'s order (a table in memory has no order)."""
        if isinstance(self.targets, StreamedSplit):
            return CachedTeacher(self.targets.stream(sampler), self.activations, self.device)
        return self

    def start_epoch(self, epoch: int) -> None:
        if isinstance(self.targets, StreamTeacherTargets):
            self.targets.start_epoch(epoch)  # prefetch this epoch's blocks

    def close(self) -> None:
        if isinstance(self.targets, StreamTeacherTargets):
            self.targets.close()

    def __call__(self, x: torch.Tensor, rows: torch.Tensor) -> dict:
        out = self.targets.gather(rows, self.activations)
        # targets held on the host (memory, stream) go to the student's device after the gather: a
        # batch's worth, not the table
        return {"logits": out["logits"].to(self.device),  # a tensor, or a TopK
                "activations": {n: t.to(self.device) for n, t in out["activations"].items()}}


class OnlineTeacher:
    """The teacher run live on each batch (online KD, for comparison): same outputs, same forms."""

    def __init__(self, model: torch.nn.Module, activations: dict | None = None):
        self.model = model.eval()
        self.activations = activations or {}  # {name: form}, as a cache would store them

    def follow(self, sampler) -> OnlineTeacher:
        return self  # any order: the teacher sees each batch as it comes

    def start_epoch(self, epoch: int) -> None:
        pass

    def close(self) -> None:
        pass

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> dict:
        from kdcache.hooks import REDUCTIONS, capture

        with torch.no_grad(), capture(self.model, list(self.activations)) as acts:
            logits = self.model(x).float()
            feats = {n: REDUCTIONS[form](acts[n].float()) for n, form in self.activations.items()}
        return {"logits": logits, "activations": feats}
