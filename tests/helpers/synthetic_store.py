"""Stores of synthetic teacher logits with class structure, written as dump-teacher writes them
(plan_blocks, BlockWriter, per-block checksums), for tests that need more classes than digits has."""
from __future__ import annotations

import math

import numpy as np
import torch

from kdcache.store import records
from kdcache import store as stores
from kdcache.store import writer
from kdcache.encodings import LogitCodec, to_storage


def structured_logits(n: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [n, C] float32, labels [n]): classes in groups of 10 sharing most of an embedding, each
    sample near its class's, logits its similarity to every class: the true class leads by ~10, its
    siblings follow, the rest scatter around 0, and ~15% of samples are wrong (mostly a sibling)."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.randn(-(-classes // 10), 32, generator=g).repeat_interleave(10, 0)[:classes]
    e = 0.75 * groups + 0.5 * torch.randn(classes, 32, generator=g)
    e = e / e.norm(dim=1, keepdim=True)
    labels = torch.randint(0, classes, (n,), generator=g)
    h = e[labels] + 0.5 / math.sqrt(32) * torch.randn(n, 32, generator=g)
    logits = 10.0 * h @ e.T + torch.randn(n, classes, generator=g) + 2.0 * torch.randn(n, 1, generator=g)
    return logits, labels


def write_store(path: str, logits: torch.Tensor, labels: torch.Tensor, codec: LogitCodec, *,
                chunk_bytes: int | None = None) -> str:
    """A complete one-split ("train") store of `logits` [N, C] (one view) encoded by `codec`."""
    n = len(labels)
    specs = {k: ((n, 1, *tail), dt) for k, (tail, dt) in codec.arrays().items()}
    with stores.create_store(path) as store:
        store.update_attrs({"schema_version": stores.SCHEMA_VERSION, "kdcache_version": "test", "complete": False,
                            "teacher": {"arch": "synthetic", "num_classes": codec.num_classes}, "splits": ["train"],
                            **codec.attrs(), "activation_dtype": "float16", "views": 1, "augment": None,
                            "activations": {}, "config": {"chunk_bytes": chunk_bytes}})
        dataset = {"name": "synthetic", "split": "train", "length": n, "fingerprint": "synthetic"}
        stores.create_split(store, "train", specs, labels.numpy(), chunk_bytes,
                            {"dataset": dataset, "transform": None, "views": 1, "view_transform": None})
        block = store.get_attrs("train")["block_rows"]
        n_blocks = -(-n // block)
        record = records.ProgressRecord(store, "train", 0, n_blocks, {k: [None] * n_blocks for k in specs})
        out = writer.BlockWriter({f"train/{k}": store.array(f"train/{k}") for k in specs}, block_rows=block,
                                 blocks=range(n_blocks), on_block=record.record)
        for start in range(0, n, 256):
            encoded = codec.encode(logits[start : start + 256].unsqueeze(1))
            out.put({f"train/{k}": to_storage(t, specs[k][1]) for k, t in encoded.items()})
        out.close()
        record.flush()
        records.finish_split(store, "train", record.checksums, n)
        store.update_attrs({"complete": True})
    return path


def stored(path: str, split: str = "train") -> dict:
    """{array: values as stored} of a split, labels included."""
    with stores.open_store(path) as s:
        return {a: np.asarray(s.read(f"{split}/{a}")) for a in s.array_names(split)}
