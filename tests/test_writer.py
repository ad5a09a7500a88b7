"""The background writer writes whole blocks, exactly the rows it was given, and records each one."""
import numpy as np
import pytest

from kdcache import store as stores
from kdcache.store.writer import BlockWriter
from kdcache.store.records import ProgressRecord, blocks_done, chunk_checksum, read_progress


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_batches_that_straddle_blocks_land_exactly(tmp_path, suffix):
    s = stores.create_store(str(tmp_path / f"w{suffix}"))
    values = np.arange(103 * 3, dtype=np.float32).reshape(103, 3)
    a = s.create_array("x", shape=values.shape, dtype="float32", chunks=(8, 3), shards=(16, 3))
    b = s.create_array("y", shape=(103,), dtype="int64", chunks=(16,))
    seen = []
    w = BlockWriter({"x": a, "y": b}, block_rows=16, blocks=range(7), on_block=lambda k, sums: seen.append(k))
    for start in range(0, 103, 10):  # batches of 10 never align with blocks of 16
        w.put({"x": values[start:start + 10], "y": np.arange(start, min(start + 10, 103))})
    w.close()
    np.testing.assert_array_equal(s.read("x"), values)
    np.testing.assert_array_equal(s.read("y"), np.arange(103))
    assert seen == list(range(7))  # the short last block too
    s.close()


def test_every_block_written_gets_the_checksum_of_its_values(tmp_path):
    s = stores.create_store(str(tmp_path / "w.zarr"))
    a = s.create_array("x", shape=(20,), dtype="int64", chunks=(8,))
    got = {}
    w = BlockWriter({"x": a}, block_rows=8, blocks=range(3), on_block=lambda k, sums: got.update({k: sums["x"]}))
    w.put({"x": np.arange(20)})
    w.close()
    assert got == {k: chunk_checksum(np.arange(k * 8, min(k * 8 + 8, 20))) for k in range(3)}


def test_writer_fills_only_the_blocks_it_is_given_without_touching_others(tmp_path):
    s = stores.create_store(str(tmp_path / "w.zarr"))
    a = s.create_array("x", shape=(40,), dtype="int64", chunks=(8,))
    a[:] = -1
    w = BlockWriter({"x": a}, block_rows=8, blocks=[1, 3, 4])  # a resumed rank: blocks 0 and 2 are done
    w.put({"x": np.r_[np.arange(8, 16), np.arange(24, 40)]})
    w.close()
    expected = np.full(40, -1)
    expected[8:16], expected[24:40] = np.arange(8, 16), np.arange(24, 40)
    np.testing.assert_array_equal(s.read("x"), expected)


def test_an_aborted_writer_never_writes_a_partial_block(tmp_path):
    s = stores.create_store(str(tmp_path / "w.zarr"))
    a = s.create_array("x", shape=(16,), dtype="int64", chunks=(8,))
    a[:] = -1
    done = []
    w = BlockWriter({"x": a}, block_rows=8, blocks=range(2), on_block=lambda k, sums: done.append(k))
    w.put({"x": np.arange(12)})  # block 0 whole, block 1 half
    w.abort()
    assert done == [0]
    np.testing.assert_array_equal(s.read("x"), np.r_[np.arange(8), np.full(8, -1)])


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_progress_records_of_several_writers_merge_into_the_blocks_done(tmp_path, suffix):
    s = stores.create_store(str(tmp_path / f"p{suffix}"))
    s.update_attrs({"checksums": {}}, group="train")
    empty = {"logits": [None] * 6}
    first, second = ProgressRecord(s, "train", 0, 3, empty), ProgressRecord(s, "train", 3, 6, empty)
    first.record(0, {"train/logits": 11})
    first.record(1, {"train/logits": 12})
    second.record(4, {"train/logits": 15})
    assert read_progress(s, "train", ["logits"], 6)["logits"][:2] == [11, None]  # written at most once a second
    first.flush()
    merged = read_progress(s, "train", ["logits"], 6)
    assert merged == {"logits": [11, 12, None, None, 15, None]}
    assert blocks_done(merged, 6) == {0, 1, 4}
    s.close()


def test_a_failing_write_is_raised_in_the_producer(tmp_path):
    class Broken:
        shape, dtype = (10,), np.dtype("int64")

        def __setitem__(self, key, value):
            raise OSError(5, "I/O error")

    w = BlockWriter({"x": Broken()}, block_rows=4, blocks=range(3))
    with pytest.raises(OSError, match="I/O"):
        for i in range(0, 10, 2):
            w.put({"x": np.arange(i, i + 2)})
        w.close()


def test_disk_full_becomes_a_user_error_that_says_resume(tmp_path):
    from kdcache.errors import KDCacheError

    class Full:
        shape, dtype = (4,), np.dtype("int64")

        def __setitem__(self, key, value):
            raise OSError(28, "No space left on device")

    w = BlockWriter({"x": Full()}, block_rows=4, blocks=range(1))
    w.put({"x": np.arange(4)})
    with pytest.raises(KDCacheError, match="--resume"):
        w.close()
