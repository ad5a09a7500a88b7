"""Section 6 of bench/run.py: streamed feature maps against a sequential read of the same store.

The store: a CIFAR-sized split (50,000 samples) of a CIFAR-100 teacher with its layer3 maps kept
whole, [64, 8, 8] float16 (8 KiB a sample, 410 MB: more than a trainer would hold for one layer),
plus its float16 logits, laid out as kdcache plans it: blocks of 4096 samples (the logits' chunk),
feature maps in 1 MiB chunks inside one zarr shard per block (bench/synthetic.py writes it as a dump
does). The maps are post-ReLU-like: low rank, about half zeros, so zstd has what it has in a real one.

Sides, alternating, round after round (a fresh epoch's block order each round):
  sequential  `load_block(b)` for every block in order: one store read per array per block, the
              fastest a reader of this store can go (the same function the streamed side uses)
  streamed    BlockShuffleSampler + StreamTargets over one epoch: blocks read by the background
              thread in the epoch's shuffled order, and every batch of 256 gathered
              (`targets.gather(rows)`, float32 out) as a trainer would, without the model.
Figure: streamed / sequential samples per second (median of per-round ratios), target >= 0.8,
for windows of 4 blocks (6) and train-student's default of 8 (6b, two windows an epoch here).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from kdcache import store as stores
from kdcache.encodings import LogitCodec, from_storage
from kdcache.reader import BlockShuffleSampler, StreamTargets
from synthetic import SplitWriter, codec_specs, draw_logits, host_rows, root_attrs
from timing import Figure, alternate, best, paired

ROWS = 50_000  # CIFAR's train split
CLASSES = 100  # CIFAR-100: its logits' chunk (4096 rows of 200 B) sets the block
FEATURE = (64, 8, 8)  # a CIFAR ResNet's layer3 output
BATCH = 256
BUFFERS = {"6": 4, "6b": 8}  # figure -> buffer_blocks (8: TrainConfig's default)


def feature_maps(n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 64, 8, 8] float16: relu of a rank-16 mix of random spatial maps, about half zeros."""
    c, h, w = FEATURE
    mix = torch.randn(c, 16, generator=torch.Generator().manual_seed(7)) / 4
    z = torch.randn(n, 16, h * w, generator=generator)
    return torch.relu(mix @ z - 0.05).reshape(n, c, h, w).half()


def write_feature_store(path: str, rows: int) -> None:
    codec = LogitCodec("float16", None, CLASSES)
    specs = {**codec_specs(codec), "activations/layer3": ((1, *FEATURE), "float16")}
    logits, labels = draw_logits(rows, CLASSES, seed=2)
    g = torch.Generator().manual_seed(3)
    with stores.create_store(path) as store:
        store.update_attrs(root_attrs(codec, activations=["layer3"]))
        split = SplitWriter(store, specs, labels.numpy())
        for start in range(0, rows, 4096):
            stop = min(start + 4096, rows)
            batch = host_rows(codec.encode(logits[start:stop]), codec)
            batch["activations/layer3"] = feature_maps(stop - start, g).numpy()[:, None]
            split.put(batch)
        split.close()
        store.update_attrs({"complete": True})


def block_loader(store, block_rows: int):
    """load_block(b) -> {"logits": [R, C], "activations": {"layer3": [R, 64, 8, 8]}} as stored:
    one read per array of block b's rows (views flattened into rows: one view here)."""
    arrays = {"logits": store.array("train/logits"), "layer3": store.array("train/activations/layer3")}
    n = arrays["logits"].shape[0]

    def load_block(b: int) -> dict:
        start, stop = b * block_rows, min((b + 1) * block_rows, n)
        read = {k: torch.flatten(from_storage(np.asarray(a[start:stop]), str(a.dtype)), 0, 1) for k, a in arrays.items()}
        return {"logits": read["logits"], "activations": {"layer3": read["layer3"]}}

    return load_block


def sequential(load_block, blocks: int) -> None:
    for b in range(blocks):
        load_block(b)


def streamed(targets: StreamTargets, sampler: BlockShuffleSampler, epoch: list) -> None:
    """One epoch of gathers; `epoch` counts the calls, so every round reads a fresh block order."""
    targets.start_epoch(epoch[0])
    epoch[0] += 1
    for batch in sampler:
        targets.gather(torch.tensor(batch))


def bench_stream(work: str, rounds: int, rows: int = ROWS) -> tuple[list[Figure], str]:
    path = os.path.join(work, "features.zarr")
    write_feature_store(path, rows)
    with stores.open_store(path) as store:
        block_rows = store.get_attrs("train")["block_rows"]
        layout = store.get_attrs("train")["layout"]["activations/layer3"]
        on_disk = store.stored_bytes("train/activations/layer3")
        load_block = block_loader(store, block_rows)
        blocks = -(-rows // block_rows)
        sides = {"sequential": lambda: sequential(load_block, blocks)}
        readers = {}
        for key, buffer in BUFFERS.items():
            sampler = BlockShuffleSampler(rows, block_rows=block_rows, batch_size=BATCH, buffer_blocks=buffer, seed=0)
            readers[key] = (StreamTargets(load_block, sampler, views=1), sampler, [0])
            sides[key] = lambda r=readers[key]: streamed(*r)
        sides["6"]()  # warm-up: the first zarr reads set up its codec pipeline and thread pool
        try:
            times = alternate(sides, rounds)
        finally:
            for targets, _, _ in readers.values():
                targets.close()
    stores.remove_store(path)
    rate = lambda side: lambda **t: rows / t[side]  # noqa: E731
    figures = []
    for key, buffer in BUFFERS.items():
        ratio = lambda key=key, **t: t["sequential"] / t[key]  # noqa: E731
        figures.append(Figure(key, f"streamed / sequential read, feature maps, windows of {buffer}",
                              paired(times, ratio), best(times, ratio), 0.8, ">= 0.8",
                              note=f"streamed {best(times, rate(key)):,.0f}/s, sequential "
                                   f"{best(times, rate('sequential')):,.0f}/s (best rounds); {blocks} blocks of "
                                   f"{block_rows}, batches of {BATCH}"))
    info = (f"   store for 6: {rows:,} x {list(FEATURE)} float16 feature maps ({rows * 8192 / 1e6:.0f} MB, "
            f"{on_disk / 1e6:.0f} MB on disk) + {CLASSES} float16 logits; chunks {layout['chunks'][0]} rows in "
            f"shards of {layout['shards'][0] if layout['shards'] else '-'} (kdcache's plan_blocks)")
    return figures, info
