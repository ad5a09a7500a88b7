"""One suite for every store backend: what goes in comes out, attrs survive, partial is never complete."""

import numpy as np
import pytest
import torch

from kdcache import store as stores
from kdcache.encodings import round_float as encode
from kdcache.errors import KDCacheError
from kdcache.encodings import ActivationCodec


class StoreSuite:
    """Subclassed once per backend; `suffix` picks the backend."""

    suffix = ""

    @pytest.fixture
    def path(self, tmp_path):
        return str(tmp_path / f"s{self.suffix}")

    def make(self, path, complete=True):
        s = stores.create_store(path)
        s.update_attrs({"schema_version": stores.SCHEMA_VERSION, "complete": complete, "teacher": {"arch": "x"}})
        return s

    @pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "uint16", "uint8", "int32"])
    def test_every_dtype_round_trips_exactly(self, path, dtype):
        values = (np.random.default_rng(0).random((37, 1, 5)) * 200).astype(dtype)
        with self.make(path) as s:
            a = s.create_array("train/logits", shape=values.shape, dtype=dtype, chunks=(8, 1, 5))
            a[:] = values
        with stores.open_store(path) as s:
            back = s.read("train/logits")
            assert back.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(back, values)

    def test_bfloat16_round_trips_through_uint16_bits(self, path):
        t = torch.randn(16, 1, 7)
        bits = encode(t, "bfloat16").numpy().view(np.uint16)
        with self.make(path) as s:
            s.create_array("train/logits", shape=bits.shape, dtype="uint16", chunks=(4, 1, 7))[:] = bits
        with stores.open_store(path) as s:
            back = ActivationCodec("bfloat16").decode(s.read("train/logits"))  # bfloat16 from its uint16 bits
        assert back.dtype == torch.bfloat16
        torch.testing.assert_close(back, t.to(torch.bfloat16), rtol=0, atol=0)

    def test_attrs_keep_nested_plain_data(self, path):
        attrs = {"teacher": {"arch": "resnet8", "weights_sha256": None}, "splits": ["train", "test"], "topk": None,
                 "views": 1, "schema_version": 1}
        with self.make(path) as s:
            s.update_attrs(attrs)
            s.create_array("train/labels", shape=(3,), dtype="int64", chunks=(3,))
            s.update_attrs({"dataset": {"length": 3, "class_names": ["a", "b"]}}, group="train")
        with stores.open_store(path) as s:
            assert {k: s.get_attrs()[k] for k in attrs} == attrs
            assert s.get_attrs("train")["dataset"] == {"length": 3, "class_names": ["a", "b"]}
            assert s.group_names() == ["train"]

    def test_nested_arrays_are_listed_relative_to_their_split(self, path):
        with self.make(path) as s:
            for name in ("logits", "labels", "activations/layer1.0"):
                s.create_array(f"train/{name}", shape=(4, 2), dtype="float16", chunks=(4, 2))
        with stores.open_store(path) as s:
            assert s.array_names("train") == ["activations/layer1.0", "labels", "logits"]
            assert s.has_array("train/logits") and not s.has_array("train/missing")

    def test_store_without_complete_flag_is_refused_for_training(self, path):
        self.make(path, complete=False).close()
        with stores.open_store(path) as s, pytest.raises(KDCacheError, match="incomplete"):
            stores.check_complete(s)

    def test_interrupted_dump_at_partial_path_is_named_with_the_fix(self, path):
        self.make(stores.partial_path(path), complete=False).close()
        with pytest.raises(KDCacheError, match="--resume"):
            stores.open_store(path)

    def test_newer_schema_is_refused(self, path):
        with self.make(path) as s:
            s.update_attrs({"schema_version": stores.SCHEMA_VERSION + 1})
        with pytest.raises(KDCacheError, match="newer"):
            stores.open_store(path)

    def test_missing_store_says_how_to_make_one(self, path):
        with pytest.raises(KDCacheError, match="dump-teacher"):
            stores.open_store(path)

    def test_read_only_open_can_read_but_not_write(self, path):
        with self.make(path) as s:
            s.create_array("train/labels", shape=(3,), dtype="int64", chunks=(3,))[:] = [1, 2, 3]
        with stores.open_store(path, read_only=True) as s:
            assert list(s.read("train/labels")) == [1, 2, 3]
            with pytest.raises(Exception):
                s.array("train/labels")[:] = [0, 0, 0]

    def test_stored_bytes_are_counted(self, path):
        with self.make(path) as s:
            s.create_array("train/logits", shape=(256, 100), dtype="float32", chunks=(64, 100))[:] = \
                np.random.default_rng(0).random((256, 100), dtype=np.float32)
            assert s.stored_bytes("train/logits") > 50_000


class TestZarrStore(StoreSuite):
    suffix = ".zarr"


class TestHDF5Store(StoreSuite):
    suffix = ".h5"


def test_unknown_suffix_names_the_two_backends(tmp_path):
    with pytest.raises(KDCacheError, match=r"\.zarr.*\.h5"):
        stores.create_store(str(tmp_path / "cache.npz"))


@pytest.mark.parametrize("row_bytes,n", [(20, 10**6), (4000, 10**6), (3 << 20, 100), (20, 7)])
def test_chunk_rows_are_powers_of_two_near_one_mib_and_never_exceed_the_array(row_bytes, n):
    rows = stores.chunk_rows(row_bytes, n)
    assert 1 <= rows <= n
    if rows < n:
        assert rows & (rows - 1) == 0
        assert rows * row_bytes <= stores.CHUNK_BYTES < 2 * rows * row_bytes or rows == 1
