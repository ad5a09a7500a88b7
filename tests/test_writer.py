"""The background writer writes whole chunks, in order, exactly the rows it was given."""
import numpy as np
import pytest

from kdcache import store as stores
from kdcache.writer import ChunkWriter


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_batches_that_straddle_chunks_land_exactly(tmp_path, suffix):
    s = stores.create_store(str(tmp_path / f"w{suffix}"))
    values = np.arange(103 * 3, dtype=np.float32).reshape(103, 3)
    a = s.create_array("x", shape=values.shape, dtype="float32", chunks=(16, 3))
    b = s.create_array("y", shape=(103,), dtype="int64", chunks=(64,))
    seen = []
    w = ChunkWriter({"x": (a, 16), "y": (b, 64)}, on_progress=lambda rows, sums: seen.append(rows))
    for start in range(0, 103, 10):  # batches of 10 never align with chunks of 16 or 64
        w.put({"x": values[start:start + 10], "y": np.arange(start, min(start + 10, 103))})
    w.close()
    np.testing.assert_array_equal(s.read("x"), values)
    np.testing.assert_array_equal(s.read("y"), np.arange(103))
    assert seen == sorted(seen) and seen[-1] == 103 and 64 in seen  # progress = rows whole in every array
    s.close()


def test_every_chunk_written_gets_the_checksum_of_its_values(tmp_path):
    from kdcache.writer import chunk_checksum

    s = stores.create_store(str(tmp_path / "w.zarr"))
    a = s.create_array("x", shape=(20,), dtype="int64", chunks=(8,))
    got = {}
    w = ChunkWriter({"x": (a, 8)}, on_progress=lambda rows, sums: got.update(sums))
    w.put({"x": np.arange(20)})
    w.close()
    assert got["x"] == [chunk_checksum(np.arange(i, min(i + 8, 20))) for i in (0, 8, 16)]


def test_writer_restarts_at_a_chunk_boundary_without_touching_earlier_rows(tmp_path):
    s = stores.create_store(str(tmp_path / "w.zarr"))
    a = s.create_array("x", shape=(40,), dtype="int64", chunks=(8,))
    a[:] = -1
    w = ChunkWriter({"x": (a, 8)}, start_row=16)
    w.put({"x": np.arange(16, 40)})
    w.close()
    np.testing.assert_array_equal(s.read("x"), np.r_[np.full(16, -1), np.arange(16, 40)])


def test_a_failing_write_is_raised_in_the_producer(tmp_path):
    class Broken:
        shape, dtype = (10,), np.dtype("int64")

        def __setitem__(self, key, value):
            raise OSError(5, "I/O error")

    w = ChunkWriter({"x": (Broken(), 4)})
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

    w = ChunkWriter({"x": (Full(), 4)})
    w.put({"x": np.arange(4)})
    with pytest.raises(KDCacheError, match="--resume"):
        w.close()
