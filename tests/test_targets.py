"""Where the teacher's targets live while a student trains: compact encodings decode to the same
loss, the table is placed by size (memory, GPU or streamed), and loader workers never copy it."""

import numpy as np
import pytest
import torch

from kdcache import dump_teacher, open_cache, train_student
from kdcache.targets import placement as targets_mod
from kdcache.convert import convert_store
from kdcache.errors import KDCacheError

FAST = dict(dataset="digits", epochs=1, batch_size=128, students=["cnn_tiny"])


@pytest.mark.parametrize("reconstruction", ["sparse", "dense"])
def test_a_top_k_cache_holding_every_class_trains_exactly_like_the_dense_cache(fp32_cache, tmp_path, reconstruction):
    full_topk = convert_store(fp32_cache, str(tmp_path / "k10.zarr"), topk=10)  # K = C: nothing dropped
    dense = train_student(cache=fp32_cache, out=str(tmp_path / "d"), **FAST)
    topk = train_student(cache=full_topk, out=str(tmp_path / "k"), topk_reconstruction=reconstruction, **FAST)
    np.testing.assert_allclose(topk[0]["step_losses"], dense[0]["step_losses"], rtol=1e-5)


def test_an_int8_cache_trains_close_to_the_dense_one(fp32_cache, tmp_path):
    int8 = convert_store(fp32_cache, str(tmp_path / "q.zarr"), dtype="int8")
    dense = train_student(cache=fp32_cache, out=str(tmp_path / "d"), **FAST)
    quantized = train_student(cache=int8, out=str(tmp_path / "q"), **FAST)
    np.testing.assert_allclose(quantized[0]["step_losses"], dense[0]["step_losses"], rtol=2e-2)


def test_a_small_top_k_cache_trains_and_its_teacher_predictions_are_the_top_class(fp32_cache, tmp_path):
    top3 = convert_store(fp32_cache, str(tmp_path / "k3.zarr"), topk=3)
    rows = train_student(cache=top3, out=str(tmp_path / "k"), **FAST)
    assert np.isfinite(rows[0]["step_losses"]).all()
    dense = open_cache(fp32_cache)["test"].predictions()
    assert torch.equal(open_cache(top3)["test"].predictions(), dense)


def test_only_the_activations_a_run_uses_are_loaded(teacher_ckpt, tmp_path):
    out = dump_teacher(teacher=teacher_ckpt, dataset="digits", out=str(tmp_path / "a.zarr"), splits=["train"],
                       activations=["layer1:attention", "layer2:pool"])
    cache = open_cache(out)
    assert list(cache.targets("train", activations=[]).activations) == []
    assert list(cache.targets("train", activations=["layer2"]).activations) == ["layer2"]
    assert cache.nbytes("train", []) < cache.nbytes("train", None)


def test_auto_placement_streams_what_would_not_fit_and_memory_refuses_it(monkeypatch):
    monkeypatch.setattr(targets_mod, "available_memory", lambda: 1000 * 2**20)
    assert targets_mod.choose_place("auto", 100 * 2**20, "cpu") == "memory"
    assert targets_mod.choose_place("auto", 600 * 2**20, "cpu") == "stream"
    with pytest.raises(KDCacheError, match="--targets-in stream"):
        targets_mod.choose_place("memory", 950 * 2**20, "cpu")
    with pytest.raises(KDCacheError, match="CUDA"):
        targets_mod.choose_place("gpu", 1, "cpu")


def test_training_from_streamed_targets_sees_every_sample_once_per_epoch_with_its_own_target(teacher_ckpt, tmp_path):
    # 32-sample blocks: the 1,437 train samples stream through 45 blocks, 4 at a time
    cache = dump_teacher(teacher=teacher_ckpt, dataset="digits", out=str(tmp_path / "s.zarr"), dtype="float32",
                         chunk_bytes=32 * 40)
    split = open_cache(cache).targets("train", place="stream", buffer_blocks=4)
    table = open_cache(cache)["train"]
    sampler = split.sampler(64, seed=0)
    stream = split.stream(sampler)
    seen = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        stream.start_epoch(epoch)
        rows = [torch.as_tensor(batch) for batch in sampler]
        for batch in rows:
            torch.testing.assert_close(stream.gather(batch)["logits"], table.gather(batch)["logits"], rtol=0, atol=0)
        seen.append(torch.cat(rows).sort().values)
    stream.close()
    assert torch.equal(seen[0], torch.arange(1437)) and torch.equal(seen[1], torch.arange(1437))
    rows = train_student(cache=cache, out=str(tmp_path / "t"), targets_in="stream", buffer_blocks=4, **FAST)
    assert np.isfinite(rows[0]["step_losses"]).all() and len(rows[0]["step_losses"]) == 12


def _private_bytes(pid: int) -> int:
    """Memory only this process holds (its copy-on-write copies included): Private_Clean + Private_Dirty."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


class _TableInside(torch.utils.data.Dataset):
    """The design kdcache avoids: a dataset that carries the table and returns targets per item."""

    def __init__(self, images, table):
        self.images, self.table = images, table

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        return self.images[i % len(self.images)][0], self.table[i]


def _worker_peak(loader, each_batch=lambda batch: None) -> int:
    it = iter(loader)
    peak = 0
    for batch in it:
        each_batch(batch)
        peak = max([peak] + [_private_bytes(w.pid) for w in it._workers])
    return peak


def test_loader_workers_share_the_in_memory_table_instead_of_copying_it(tmp_path):
    """A 252 MiB table in the training process; the training loader's workers each hold far less than
    one copy privately, because the gather happens in the training process. The control, a dataset
    that carries the table into spawned workers, shows the measurement sees a copy when there is one.
    (A forked worker's own overhead grows with the parent's heap: ~34 MB late in the full suite,
    after the framework integrations' tests, hence a table large enough to tell it from a copy.)"""
    from kdcache.config import TrainConfig
    from kdcache.data import WithIndex, load_split
    from kdcache.distributed import GlobalBatchSampler
    from kdcache.train import _loader

    n, classes = 1437, 92_000  # 1437 x 92k float16 = 252 MiB of logits
    store_path = str(tmp_path / "big.zarr")
    _synthetic_cache(store_path, n, classes)
    targets = open_cache(store_path)["train"]
    assert targets.nbytes > 240 * 2**20
    data = load_split("digits", "train")
    cfg = TrainConfig(students=["x"], num_workers=2, batch_size=64)
    loader = _loader(WithIndex(data.dataset), cfg, sampler=GlobalBatchSampler(n, 64, seed=0))
    shared = _worker_peak(loader, lambda batch: targets.gather(batch[2]))
    assert shared < targets.nbytes / 4, (shared, targets.nbytes)

    table = targets.tables["logits"].numpy()  # pickled by value into each spawned worker
    control = torch.utils.data.DataLoader(_TableInside(data.dataset, table), batch_size=64, num_workers=2,
                                          multiprocessing_context="spawn")
    assert _worker_peak(control) > table.nbytes * 0.9


def _synthetic_cache(path, n, classes):
    """A complete cache of random float16 logits for digits' train split, written as dump does."""
    from kdcache import store as stores
    from kdcache.data import load_split
    from kdcache.encodings import LogitCodec
    from kdcache.store.writer import BlockWriter
    from kdcache.store.records import ProgressRecord, chunk_checksum, finish_split

    data = load_split("digits", "train")
    codec = LogitCodec("float16", None, classes)
    s = stores.create_store(path)
    s.update_attrs({"schema_version": stores.SCHEMA_VERSION, "complete": False, "splits": ["train"],
                    "teacher": {"arch": "synthetic", "num_classes": classes}, **codec.attrs(), "activations": {}})
    block, _ = stores.plan_blocks({"logits": classes * 2}, n)
    a = s.create_array("train/logits", shape=(n, 1, classes), dtype="float16", chunks=(block, 1, classes))
    s.create_array("train/labels", shape=(n,), dtype="int64", chunks=(block,))[:] = data.labels
    labels = [chunk_checksum(np.asarray(data.labels[i : i + block], dtype=np.int64)) for i in range(0, n, block)]
    s.update_attrs({"dataset": data.describe(), "block_rows": block, "checksums": {"labels": labels}}, group="train")
    blocks = range(-(-n // block))
    record = ProgressRecord(s, "train", 0, len(blocks), {"logits": [None] * len(blocks)})
    w = BlockWriter({"train/logits": a}, block_rows=block, blocks=blocks, on_block=record.record)
    w.put({"train/logits": np.random.default_rng(0).standard_normal((n, 1, classes)).astype(np.float16)})
    w.close()
    finish_split(s, "train", record.checksums, n)
    s.update_attrs({"complete": True})
    s.close()
