"""`kdcache convert` re-encodes a finished cache without the teacher, and never invents logits."""
import os
import shutil

import numpy as np
import pytest
import torch

from kdcache import dump_teacher, train_student
from kdcache.store import writer
from kdcache import store as stores
from kdcache.convert import convert_store
from kdcache.encodings import LogitCodec, from_storage, to_storage
from kdcache.errors import KDCacheError
from kdcache.verify import verify_store
from helpers.cli import run

SMALL_CHUNKS = 64 * 40  # 64 float32 logit rows of digits' 10 classes: the test split is 6 blocks


@pytest.fixture(scope="module")
def small_src(teacher_ckpt, tmp_path_factory) -> str:
    """The test split only, float32 logits and one pooled activation, in 64-row blocks."""
    return dump_teacher(teacher=teacher_ckpt, dataset="digits", splits=["test"], activations=["layer1:pool"],
                        dtype="float32", chunk_bytes=SMALL_CHUNKS, out=str(tmp_path_factory.mktemp("s") / "s.zarr"))


@pytest.fixture(scope="module")
def top4(fp32_cache, tmp_path_factory) -> str:
    return convert_store(fp32_cache, tmp_path_factory.mktemp("k") / "top4.zarr", topk=4, dtype="float16")


def contents(path):
    """(root attrs, {split: attrs}, {split/array: values as stored}) of a store."""
    with stores.open_store(path) as s:
        attrs = s.get_attrs()
        splits = {split: s.get_attrs(split) for split in attrs["splits"]}
        arrays = {f"{split}/{a}": np.asarray(s.read(f"{split}/{a}")) for split in splits for a in s.array_names(split)}
    return attrs, splits, arrays


def assert_same_arrays(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for name, values in expected.items():
        assert got[name].dtype == values.dtype, name
        np.testing.assert_array_equal(got[name], values, err_msg=name)


ROOT_KEYS = ("schema_version", "teacher", "splits", "dtype", "topk", "num_classes", "encoding", "activation_dtype",
             "views", "augment", "activations", "config")
SPLIT_KEYS = ("dataset", "transform", "views", "view_transform", "rows_written", "complete", "block_rows", "checksums")


def test_zarr_to_hdf5_and_back_is_value_for_value_identical(small_src, tmp_path):
    h5 = convert_store(small_src, tmp_path / "c.h5")
    back = convert_store(h5, tmp_path / "c.zarr")
    attrs0, splits0, arrays0 = contents(small_src)
    for path in (h5, back):
        attrs, splits, arrays = contents(path)
        assert_same_arrays(arrays, arrays0)
        assert {k: attrs[k] for k in ROOT_KEYS} == {k: attrs0[k] for k in ROOT_KEYS}
        assert {s: {k: a[k] for k in SPLIT_KEYS} for s, a in splits.items()} == \
               {s: {k: a[k] for k in SPLIT_KEYS} for s, a in splits0.items()}
        assert attrs["complete"] is True and attrs["converted_from"]["dtype"] == "float32"
        assert verify_store(path) == []
    assert isinstance(stores.open_store(h5), stores.HDF5Store)
    assert sorted(os.listdir(tmp_path)) == ["c.h5", "c.zarr"]  # no lock, no partial left behind


@pytest.mark.parametrize("dtype", [None, "float16", "bfloat16"])
def test_float32_to_topk_stores_what_encoding_the_teachers_logits_gives(fp32_cache, tmp_path, dtype):
    out = convert_store(fp32_cache, tmp_path / "k.h5", topk=4, dtype=dtype)
    _, _, source = contents(fp32_cache)
    attrs, _, got = contents(out)
    codec = LogitCodec(dtype or "float32", 4, 10)
    assert {k: attrs[k] for k in ("dtype", "topk", "encoding")} == \
           {k: codec.attrs()[k] for k in ("dtype", "topk", "encoding")}
    for split in ("train", "test"):
        expected = codec.encode(torch.from_numpy(source[f"{split}/logits"]))
        for name, (_, dt) in codec.arrays().items():
            np.testing.assert_array_equal(got[f"{split}/{name}"], to_storage(expected[name], dt), err_msg=name)
        np.testing.assert_array_equal(got[f"{split}/labels"], source[f"{split}/labels"])
    assert verify_store(out) == []


def test_float32_to_topk_equals_dumping_with_topk(teacher_ckpt, fp32_cache, tmp_path):
    dumped = dump_teacher(teacher=teacher_ckpt, dataset="digits", splits=["test"], dtype="float32", topk=4,
                          out=str(tmp_path / "d.zarr"))
    converted = convert_store(fp32_cache, tmp_path / "c.zarr", topk=4)
    _, _, want = contents(dumped)
    _, _, got = contents(converted)
    assert_same_arrays({k: v for k, v in got.items() if k.startswith("test/")}, want)


def test_topk_to_a_smaller_k_keeps_the_first_k_and_the_logsumexp(top4, tmp_path):
    top2 = convert_store(top4, tmp_path / "k2.h5", topk=2)
    wide = convert_store(top4, tmp_path / "k4.h5", dtype="float32")  # same K, wider values: exact
    _, _, four = contents(top4)
    _, _, two = contents(top2)
    _, _, f32 = contents(wide)
    for split in ("train", "test"):
        np.testing.assert_array_equal(two[f"{split}/logits"], four[f"{split}/logits"][..., :2])
        np.testing.assert_array_equal(two[f"{split}/topk_indices"], four[f"{split}/topk_indices"][..., :2])
        np.testing.assert_array_equal(two[f"{split}/logsumexp"], four[f"{split}/logsumexp"])
        # float16 top-k values are log-probabilities; float32 ones raw logits: lse + the same values
        raw = four[f"{split}/logits"].astype(np.float32) + four[f"{split}/logsumexp"][..., None]
        np.testing.assert_array_equal(f32[f"{split}/logits"], raw)
        np.testing.assert_array_equal(f32[f"{split}/log_tail"], four[f"{split}/log_tail"])
    assert verify_store(top2) == []
    assert contents(top2)[0]["converted_from"]["converted_from"]["dtype"] == "float32"  # the whole chain


def test_a_new_dtype_applies_to_activations_as_dump_teacher_would(small_src, tmp_path):
    from kdcache import open_cache

    out = convert_store(small_src, tmp_path / "b.h5", dtype="bfloat16")
    assert contents(out)[0]["activation_dtype"] == "bfloat16"
    want = open_cache(small_src)["test"].activations["layer1"]
    got = open_cache(out)["test"].activations["layer1"]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.bfloat16().float(), rtol=0, atol=0)


def test_dense_to_int8_is_within_its_error_bound_and_back_to_float16(fp32_cache, tmp_path):
    q = convert_store(fp32_cache, tmp_path / "q.h5", dtype="int8")
    attrs, _, got = contents(q)
    _, _, source = contents(fp32_cache)
    assert attrs["dtype"] == "int8" and attrs["activation_dtype"] == "float16"  # as dump-teacher --dtype int8
    codec = LogitCodec("int8", None, 10)
    tables = {name: from_storage(got[f"train/{name}"], dt) for name, (_, dt) in codec.arrays().items()}
    decoded = codec.decode(tables)
    source_logits = torch.from_numpy(source["train/logits"])
    error = (decoded - source_logits).abs()
    bound = tables["logits_scale"].unsqueeze(-1) / 2
    assert (error <= bound * (1 + 1e-4) + 1e-5 * source_logits.abs()).all()  # float32 at |logit| ~ 20: 2e-6
    half = convert_store(q, tmp_path / "h.zarr", dtype="float16")
    _, _, back = contents(half)
    np.testing.assert_array_equal(back["train/logits"], decoded.half().numpy())


def test_topk_holding_every_class_converts_back_to_dense_exactly(fp32_cache, tmp_path):
    every = convert_store(fp32_cache, tmp_path / "k10.zarr", topk=10)
    dense = convert_store(every, tmp_path / "d.h5", topk=0)
    _, _, source = contents(fp32_cache)
    _, _, got = contents(dense)
    assert_same_arrays(got, source)


@pytest.mark.parametrize("options,what", [(dict(topk=0), "dense logits"), (dict(topk=6), "the top 6"),
                                          (dict(dtype="int8"), "dense int8 logits")])
def test_topk_to_dense_or_a_larger_k_is_refused(top4, tmp_path, options, what):
    with pytest.raises(KDCacheError, match=f"cannot give {what}: the tail classes' logits were never stored; dump"):
        convert_store(top4, tmp_path / "x.zarr", **options)
    assert os.listdir(tmp_path) == []  # refused before anything was made


def test_view_cache_converts_with_its_view_records(view_cache, tmp_path):
    out = convert_store(view_cache, tmp_path / "v.h5", topk=3)
    attrs0, splits0, arrays0 = contents(view_cache)
    attrs, splits, arrays = contents(out)
    assert attrs["augment"] == attrs0["augment"] and attrs["views"] == 2
    records = [k for k in arrays0 if k.split("/", 1)[1] in ("view_seeds", "view_digests", "labels")]
    assert "train/view_seeds" in records and "train/view_digests" in records
    assert_same_arrays({k: arrays[k] for k in records}, {k: arrays0[k] for k in records})
    assert arrays["train/logits"].shape == (1437, 2, 3)
    assert splits["train"]["view_transform"] == splits0["train"]["view_transform"]
    assert verify_store(out) == []  # replays a sample of the views against their digests


@pytest.mark.parametrize("name,options", [("q.h5", dict(dtype="int8")), ("k.zarr", dict(topk=4, dtype="float16"))])
def test_students_train_from_a_converted_store(fp32_cache, tmp_path, name, options):
    cache = convert_store(fp32_cache, tmp_path / name, **options)
    train_student(cache=cache, students=["cnn_tiny"], dataset="digits", epochs=1, out=str(tmp_path / "s"))
    assert os.path.exists(tmp_path / "s" / "cnn_tiny" / "model.pt")


def test_interrupted_convert_never_reads_as_complete_and_resume_gives_the_same_store(small_src, tmp_path, monkeypatch):
    options = dict(dtype="float16", chunk_bytes=64 * 20)  # 64-row blocks of float16 logits: 6 blocks
    full = convert_store(small_src, tmp_path / "full.h5", **options)
    real = writer.BlockWriter._write_block
    written = []

    def dies_after_two(self, start, stop):
        if len(written) == 2:
            raise RuntimeError("simulated kill")
        written.append(start)
        real(self, start, stop)

    dst = tmp_path / "c.h5"
    monkeypatch.setattr(writer.BlockWriter, "_write_block", dies_after_two)
    with pytest.raises(RuntimeError, match="simulated kill"):
        convert_store(small_src, dst, **options)
    assert not dst.exists() and os.path.exists(stores.partial_path(dst))
    assert not os.path.exists(f"{dst}.lock")
    with pytest.raises(KDCacheError, match="incomplete"):
        stores.open_store(dst)
    with stores.open_store(stores.partial_path(dst)) as s:
        with pytest.raises(KDCacheError, match="incomplete"):
            stores.check_complete(s)
    with pytest.raises(KDCacheError, match="--resume"):
        convert_store(small_src, dst, **options)

    written.clear()
    monkeypatch.setattr(writer.BlockWriter, "_write_block", lambda self, a, b: (written.append(a), real(self, a, b)))
    convert_store(small_src, dst, resume=True, **options)
    assert written == [128, 192, 256, 320]  # only the blocks the kill left unwritten
    _, splits_full, arrays_full = contents(full)
    _, splits, arrays = contents(dst)
    assert_same_arrays(arrays, arrays_full)
    assert splits["test"]["checksums"] == splits_full["test"]["checksums"]
    assert verify_store(str(dst)) == []


def test_existing_dst_or_dst_equal_to_src_is_refused(small_src, tmp_path):
    (tmp_path / "x.zarr").mkdir()
    with pytest.raises(KDCacheError, match="already exists; pass --overwrite"):
        convert_store(small_src, tmp_path / "x.zarr")
    with pytest.raises(KDCacheError, match="is SRC itself"):
        convert_store(small_src, small_src)
    out = convert_store(small_src, tmp_path / "x.zarr", overwrite=True, topk=2)
    assert contents(out)[0]["topk"] == 2


# --- the command line ----------------------------------------------------------------------------


def test_cli_converts_as_the_readme_shows(fp32_cache, tmp_path, capsys, monkeypatch):
    os.makedirs(tmp_path / "runs" / "digits")
    os.symlink(fp32_cache, tmp_path / "runs" / "digits" / "cache.zarr")
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "convert", "runs/digits/cache.zarr", "runs/digits/cache-top4.h5", "--topk", "4")
    assert code == 0 and out == "wrote runs/digits/cache-top4.h5\n", err
    code, out, err = run(capsys, "verify", "runs/digits/cache-top4.h5")
    assert code == 0 and "OK" in out


@pytest.mark.parametrize("argv,says", [
    (["missing.zarr", "out.h5"], "does not exist"),
    (["SRC", "exists.zarr"], "already exists"),
    (["SRC", "out.h5", "--dtype", "float64"], "--dtype"),
    (["SRC", "out.h5", "--topk", "11"], "--topk"),
    (["SRC", "out.txt"], "unknown suffix"),
])
def test_cli_bad_input_is_one_line_and_exit_2(small_src, tmp_path, capsys, monkeypatch, argv, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exists.zarr").mkdir()
    code, out, err = run(capsys, "convert", *[small_src if a == "SRC" else a for a in argv])
    assert code == 2 and out == "" and err.count("\n") == 1 and says in err, err


def chunk_file(path: str, array: str, block: int) -> str:
    folder = os.path.join(path, "test", array, "c", str(block))
    return next(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files)


DAMAGE = {  # what is done to a copy of small_src -> what the one line says, and whether the damage is seen before DST is made
    "deleted chunk": (lambda p: os.remove(chunk_file(p, "logits", 3)),
                      "test/logits block 3 (rows 192-255) is missing from the store", True),
    "deleted activation chunk": (lambda p: os.remove(chunk_file(p, "activations/layer1", 1)),
                                 "test/activations/layer1 block 1 (rows 64-127) is missing from the store", True),
    "garbage chunk": (lambda p: open(chunk_file(p, "logits", 2), "wb").write(b"garbage"),
                      "test/logits block 2 (rows 128-191) cannot be read", False),
    "another block's chunk": (lambda p: shutil.copy(chunk_file(p, "logits", 1), chunk_file(p, "logits", 4)),
                              "test/logits block 4 (rows 256-319) does not match the checksum", False),
    "checksums edited into a number": (lambda p: edit_checksums(p, 7), "records its checksums as int", True),
}


def edit_checksums(path: str, value) -> None:
    import zarr

    node = zarr.open_group(path, mode="r+")["test"]
    node.attrs["checksums"] = value


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_src_is_one_line_naming_the_block(case, small_src, tmp_path, capsys):
    damage, says, before = DAMAGE[case]
    src, dst = tmp_path / "src.zarr", tmp_path / "dst.h5"
    shutil.copytree(small_src, src)
    damage(str(src))
    code, out, err = run(capsys, "convert", src, dst, "--dtype", "int8")
    assert code == 2 and err.count("\n") == 1 and says in err and f"kdcache verify {src}" in err, err
    assert not dst.exists() and (not before or not os.path.exists(stores.partial_path(str(dst))))
