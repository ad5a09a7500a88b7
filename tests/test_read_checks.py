"""What training and inspect read is checked as it is read: a damaged store stops the run before its
first step with one line naming the block and `kdcache verify`, never trains on wrong numbers.

Each case copies a good store and changes one thing: a chunk deleted, a valid chunk of another
teacher's store copied in, a chunk of garbage, a killed dump marked complete by hand."""
import os
import shutil

import numpy as np
import pytest
import torch

import kdcache.store.writer as writer_mod
from kdcache import dump_teacher, open_cache, train_student
from kdcache import store as stores
from kdcache.cli import main
from kdcache.errors import KDCacheError

TRAIN = ["--dataset", "digits", "--student", "cnn_tiny", "--epochs", "1"]


@pytest.fixture(scope="module")
def h5_cache(teacher_ckpt, tmp_path_factory) -> str:
    """fp32_cache's twin in HDF5."""
    return dump_teacher(teacher=teacher_ckpt, dataset="digits", out=str(tmp_path_factory.mktemp("h") / "t.h5"),
                        dtype="float32")


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory) -> dict:
    """{suffix: store} of another teacher's float32 digits train split: its chunks are valid, only not ours."""
    out = tmp_path_factory.mktemp("other")
    train_student(students=["cnn_tiny"], dataset="digits", epochs=1, seed=1, out=str(out / "teacher"))
    ckpt = str(out / "teacher" / "cnn_tiny" / "model.pt")
    return {suffix: dump_teacher(teacher=ckpt, dataset="digits", splits=["train"], out=str(out / f"o{suffix}"),
                                 dtype="float32") for suffix in (".zarr", ".h5")}


def copy_of(store: str, tmp_path) -> str:
    path = str(tmp_path / ("copy" + os.path.splitext(store)[1]))
    (shutil.copytree if os.path.isdir(store) else shutil.copy)(store, path)
    return path


def zarr_chunk(path: str, array: str = "train/logits", block: int = 0) -> str:
    return os.path.join(path, array, "c", str(block), "0", "0")  # block 0 is the only one of fp32_cache's splits


def delete_chunk(path: str, array: str = "train/logits") -> None:
    """Chunk 0 of `array` never stored: a zarr file removed; an HDF5 dataset rebuilt without it."""
    if path.endswith(".zarr"):
        os.remove(zarr_chunk(path, array))
        return
    import h5py

    with h5py.File(path, "r+") as f:
        old = f[array]
        new = f.create_dataset(array + "_rebuilt", shape=old.shape, dtype=old.dtype, chunks=old.chunks,
                               compression=old.compression, fletcher32=old.fletcher32)
        for i in range(old.id.get_num_chunks()):
            offset = old.id.get_chunk_info(i).chunk_offset
            if offset[0] != 0:
                mask, data = old.id.read_direct_chunk(offset)
                new.id.write_direct_chunk(offset, data, mask)
        del f[array]
        f.move(array + "_rebuilt", array)


def copy_chunk(path: str, source: str, array: str = "train/logits") -> None:
    """Chunk 0 of `array` replaced by `source`'s, byte for byte: it passes the backend's own checksum."""
    if path.endswith(".zarr"):
        shutil.copy(zarr_chunk(source, array), zarr_chunk(path, array))
        return
    import h5py

    with h5py.File(source, "r") as src, h5py.File(path, "r+") as dst:
        offset = (0,) * src[array].ndim
        mask, data = src[array].id.read_direct_chunk(offset)
        dst[array].id.write_direct_chunk(offset, data, mask)


def garble_chunk(path: str, array: str = "train/logits") -> None:
    """Chunk 0 of `array` overwritten in the middle with random bytes (zarr: the whole file)."""
    rng = np.random.default_rng(0)
    if path.endswith(".zarr"):
        f = zarr_chunk(path, array)
        open(f, "wb").write(rng.bytes(os.path.getsize(f)))
        return
    import h5py

    with h5py.File(path, "r") as f:
        info = f[array].id.get_chunk_info(0)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        f.write(rng.bytes(16))


def killed_dump_marked_complete(teacher_ckpt, tmp_path, suffix: str, monkeypatch) -> str:
    """A dump that stopped after 10 of its 45 train blocks, its root then marked complete and renamed
    into place, as a user who "fixed" it by hand would."""
    real_write, writes = writer_mod.BlockWriter._write_block, []

    def write_until_killed(self, start, stop):
        writes.append(1)
        if len(writes) > 10:
            raise RuntimeError("killed")
        real_write(self, start, stop)

    out = str(tmp_path / f"killed{suffix}")
    monkeypatch.setattr(writer_mod.BlockWriter, "_write_block", write_until_killed)
    with pytest.raises(RuntimeError, match="killed"):
        dump_teacher(teacher=teacher_ckpt, dataset="digits", out=out, dtype="float32", chunk_bytes=32 * 40)
    monkeypatch.setattr(writer_mod.BlockWriter, "_write_block", real_write)
    with stores.backend_for(out)(stores.partial_path(out), read_only=False) as s:
        s.update_attrs({"complete": True})
    os.rename(stores.partial_path(out), out)
    return out


def run_cli(capsys, *argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:  # success returns: a damaged store trained on fails here
        main(list(argv))
    return e.value.code, capsys.readouterr().err


DAMAGE = {  # case -> what the one line says
    "deleted chunk": "train/logits block 0 (rows 0-1436) is missing from the store",
    "chunk of another teacher": "train/logits block 0 (rows 0-1436) does not match the checksum",
    "garbage chunk": "train/logits block 0 (rows 0-1436) cannot be read",
    "killed dump marked complete": "its split 'train' was never finished (320 of 1437 rows written)",
}


@pytest.fixture
def damaged(request, fp32_cache, h5_cache, other_teacher, teacher_ckpt, tmp_path, monkeypatch):
    """(store, expected message) for the case and backend named by the test's parameters."""
    case, suffix = request.param
    if case == "killed dump marked complete":
        return killed_dump_marked_complete(teacher_ckpt, tmp_path, suffix, monkeypatch), DAMAGE[case]
    path = copy_of(fp32_cache if suffix == ".zarr" else h5_cache, tmp_path)
    if case == "deleted chunk":
        delete_chunk(path)
    elif case == "chunk of another teacher":
        copy_chunk(path, other_teacher[suffix])
    else:
        garble_chunk(path)
    return path, DAMAGE[case]


CASES = [(case, suffix) for case in DAMAGE for suffix in (".zarr", ".h5")]


@pytest.mark.parametrize("damaged", CASES, indirect=True, ids=[f"{c}-{s[1:]}" for c, s in CASES])
@pytest.mark.parametrize("place", ["memory", "stream"])
def test_training_on_a_damaged_store_stops_before_its_first_step_naming_the_block(damaged, place, capsys, tmp_path):
    path, expected = damaged
    out = tmp_path / "students"
    code, err = run_cli(capsys, "train-student", "--cache", path, *TRAIN, "--targets-in", place, "--out", str(out))
    assert code == 2 and err.count("\n") == 1 and err.startswith("kdcache: error: "), err
    assert expected in err and f"kdcache verify {path}" in err, err
    assert not (out / "cnn_tiny" / "model.pt").exists()


def test_the_killed_dump_is_told_how_to_finish_or_redo_it(teacher_ckpt, tmp_path, monkeypatch):
    path = killed_dump_marked_complete(teacher_ckpt, tmp_path, ".zarr", monkeypatch)
    with pytest.raises(KDCacheError, match=f"--out {path} --resume, or dump the teacher again"):
        open_cache(path)["train"]


@pytest.mark.parametrize("damage", [delete_chunk, garble_chunk], ids=["deleted chunk", "garbage chunk"])
@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_inspect_of_a_damaged_chunk_is_one_line_naming_the_block(damage, suffix, fp32_cache, h5_cache, tmp_path,
                                                                 capsys):
    path = copy_of(fp32_cache if suffix == ".zarr" else h5_cache, tmp_path)
    damage(path, "test/logits")
    code, err = run_cli(capsys, "inspect", path)
    assert code == 2 and err.count("\n") == 1, err
    assert "test/logits block 0 (rows 0-359)" in err and f"kdcache verify {path}" in err, err


@pytest.fixture(scope="module")
def blocks_cache(teacher_ckpt, tmp_path_factory) -> str:
    """The train split in 45 blocks of 32 rows, with an activation no run below asks for."""
    return dump_teacher(teacher=teacher_ckpt, dataset="digits", out=str(tmp_path_factory.mktemp("b") / "b.zarr"),
                        splits=["train"], dtype="float32", chunk_bytes=32 * 40, activations=["layer1:pool"])


def test_only_the_arrays_a_run_uses_are_read_each_row_once(blocks_cache, monkeypatch):
    out = blocks_cache
    reads = []
    real = stores.ZarrStore.read_into
    monkeypatch.setattr(stores.ZarrStore, "read_into",
                        lambda self, name, start, stop, o: (reads.append((name, start, stop)), real(self, name, start, stop, o)))
    open_cache(out).targets("train", activations=[])
    assert {name for name, _, _ in reads} == {"train/logits", "train/labels"}
    for array in ("train/logits", "train/labels"):
        rows = np.concatenate([np.arange(start, stop) for name, start, stop in reads if name == array])
        assert np.array_equal(np.sort(rows), np.arange(1437)), array  # every row, once


def test_a_load_in_pieces_reads_the_same_table_and_names_the_damaged_block_inside_a_piece(blocks_cache, tmp_path,
                                                                                           monkeypatch):
    import kdcache.store.checks as checks_mod

    monkeypatch.setattr(checks_mod, "PIECE_BYTES", 3 * 32 * 40)  # 3 blocks a backend call: 15 calls, 45 blocks
    with stores.open_store(blocks_cache) as s:
        whole = s.read("train/logits")
    torch.testing.assert_close(open_cache(blocks_cache)["train"].tables["logits"], torch.from_numpy(whole), rtol=0, atol=0)
    path = copy_of(blocks_cache, tmp_path)
    shutil.copy(zarr_chunk(path, block=8), zarr_chunk(path, block=10))  # a valid chunk in the wrong place
    with pytest.raises(KDCacheError, match=r"train/logits block 10 \(rows 320-351\) does not match the checksum"):
        open_cache(path)["train"]
    open(zarr_chunk(path, block=7), "wb").write(b"garbage")  # in the piece of blocks 6-8: found by a block's read
    with pytest.raises(KDCacheError, match=r"train/logits block 7 \(rows 224-255\) cannot be read"):
        open_cache(path)["train"]


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_backends_name_the_rows_never_stored_and_read_rows_into_a_given_array(suffix, tmp_path):
    values = np.arange(1, 61, dtype=np.float32).reshape(20, 3)
    with stores.create_store(str(tmp_path / f"s{suffix}")) as s:
        a = s.create_array("train/logits", shape=(20, 3), dtype="float32", chunks=(4, 3))
        a[0:8], a[12:16] = values[0:8], values[12:16]
        assert s.absent_rows("train/logits") == [(8, 12), (16, 20)]
        out = np.zeros((4, 3), np.float32)
        s.read_into("train/logits", 2, 6, out)
        np.testing.assert_array_equal(out, values[2:6])


def test_a_chunk_zarr_left_out_for_being_all_zeros_is_not_damage(tmp_path):
    """zarr stores no chunk that is all fill value: a block of class-0 labels has no file, and its
    recorded checksum, that of zeros, says that is right."""
    from kdcache.encodings import LogitCodec
    from kdcache.store.writer import BlockWriter
    from kdcache.store.records import chunk_checksum, finish_split

    path = str(tmp_path / "zeros.zarr")
    labels = np.repeat(np.arange(4), 32)  # block 0: all class 0
    logits = np.random.default_rng(0).standard_normal((128, 1, 4)).astype(np.float32)
    codec = LogitCodec("float32", None, 4)
    with stores.create_store(path) as s:
        s.update_attrs({"schema_version": stores.SCHEMA_VERSION, "complete": False, "splits": ["train"],
                        "teacher": {"arch": "x", "num_classes": 4}, **codec.attrs(), "activations": {}})
        stores.create_split(s, "train", {"logits": ((128, 1, 4), "float32")}, labels, 32 * 16, {"dataset": {}})
        w = BlockWriter({"train/logits": s.array("train/logits")}, block_rows=32, blocks=range(4))
        w.put({"train/logits": logits})
        w.close()
        finish_split(s, "train", {"logits": [chunk_checksum(logits[i:i + 32]) for i in range(0, 128, 32)]}, 128)
        s.update_attrs({"complete": True})
        assert s.absent_rows("train/labels") == [(0, 32)]
    targets = open_cache(path)["train"]
    assert torch.equal(targets.labels, torch.from_numpy(labels))
    torch.testing.assert_close(targets.tables["logits"], torch.from_numpy(logits), rtol=0, atol=0)


def as_schema_1(path: str) -> None:
    """What a store written before blocks looks like: no block_rows, no checksums."""
    import zarr

    root = zarr.open_group(path, mode="r+")
    root.attrs["schema_version"] = 1
    for split in ("train", "test"):
        for key in ("block_rows", "checksums"):
            del root[split].attrs[key]


def test_a_schema_1_store_trains_from_memory_with_a_one_line_warning(fp32_cache, tmp_path, capsys):
    path = copy_of(fp32_cache, tmp_path)
    as_schema_1(path)
    rows = train_student(cache=path, dataset="digits", students=["cnn_tiny"], epochs=1, out=str(tmp_path / "s"))
    assert np.isfinite(rows[0]["step_losses"]).all()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "before per-block checksums" in warnings[0], warnings


def test_a_schema_1_store_with_a_missing_logits_chunk_is_refused(fp32_cache, tmp_path):
    path = copy_of(fp32_cache, tmp_path)
    as_schema_1(path)
    delete_chunk(path)
    with pytest.raises(KDCacheError, match=r"train/logits block 0 \(rows 0-1436\) is missing from the store"):
        open_cache(path)["train"]


def test_replayed_views_read_their_seeds_checked_too(view_cache, tmp_path, capsys):
    # view_seeds decide which inputs the student sees: a garbled chunk must not replay other views
    path = copy_of(view_cache, tmp_path)
    seeds = os.path.join(path, "train", "view_seeds", "c")
    chunk = os.path.join(seeds, *next((os.path.relpath(os.path.join(d, f), seeds).split(os.sep)
                                        for d, _, files in os.walk(seeds) for f in files)))
    with open(chunk, "r+b") as f:
        data = bytearray(f.read())
        data[len(data) // 2] ^= 0xFF
        f.seek(0)
        f.write(bytes(data))
    with pytest.raises(SystemExit) as e:
        main(["train-student", "--cache", path, *TRAIN, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "train/view_seeds block 0" in err and "kdcache verify" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o" / "cnn_tiny" / "model.pt").exists()


def edit_split_attrs(path: str, edit) -> None:
    import zarr

    node = zarr.open_group(path, mode="r+")["train"]
    attrs = dict(node.attrs)
    edit(attrs)
    node.attrs.put(attrs)


RECORDS = {  # a hand edit of the split's records -> what the one line says
    "checksums not a mapping": (lambda a: a.update(checksums=7), "records its checksums as int"),
    "checksums of logits a string": (lambda a: a["checksums"].update(logits="abc"),
                                     "records the checksums of logits as str"),
    "block_rows 0": (lambda a: a.update(block_rows=0), "records block_rows 0"),
    "block_rows text": (lambda a: a.update(block_rows="1437"), "records block_rows '1437'"),
}


@pytest.mark.parametrize("case", RECORDS)
@pytest.mark.parametrize("place", ["memory", "stream"])
def test_records_edited_into_another_form_are_one_line(case, place, fp32_cache, tmp_path, capsys):
    edit, expected = RECORDS[case]
    path = copy_of(fp32_cache, tmp_path)
    edit_split_attrs(path, edit)
    code, err = run_cli(capsys, "train-student", "--cache", path, *TRAIN, "--targets-in", place,
                        "--out", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and expected in err and f"kdcache verify {path}" in err, err


def edit_array_metadata(path: str, array: str, **fields) -> None:
    import json

    name = os.path.join(path, array, "zarr.json")
    doc = json.load(open(name))
    doc.update(fields)
    json.dump(doc, open(name, "w"))


@pytest.mark.parametrize("place", ["memory", "stream"])
def test_an_array_whose_dtype_was_edited_is_refused_though_its_bytes_match_their_checksums(place, fp32_cache,
                                                                                           tmp_path, capsys):
    # the same bytes read as int32 would train on other numbers under the recorded checksums
    path = copy_of(fp32_cache, tmp_path)
    edit_array_metadata(path, "train/logits", data_type="int32")
    code, err = run_cli(capsys, "train-student", "--cache", path, *TRAIN, "--targets-in", place,
                        "--out", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1, err
    assert "train/logits is stored as int32, but the store's encoding says float32" in err, err


@pytest.mark.parametrize("place", ["memory", "stream"])
def test_a_missing_array_is_one_line_naming_it(place, fp32_cache, tmp_path, capsys):
    path = copy_of(fp32_cache, tmp_path)
    shutil.rmtree(os.path.join(path, "train", "logits"))
    code, err = run_cli(capsys, "train-student", "--cache", path, *TRAIN, "--targets-in", place,
                        "--out", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and "train/logits is missing from the store" in err, err


@pytest.mark.parametrize("place", ["memory", "stream"])
def test_a_missing_activation_is_refused_not_left_out_of_the_targets(place, blocks_cache, tmp_path):
    path = copy_of(blocks_cache, tmp_path)
    shutil.rmtree(os.path.join(path, "train", "activations", "layer1"))
    with pytest.raises(KDCacheError, match="train/activations/layer1 is missing from the store"):
        open_cache(path).targets("train", activations=["layer1"], place=place)


VERIFY = {  # damage -> the problem verify lists
    **{case: (lambda p, edit=edit: edit_split_attrs(p, edit), why) for case, (edit, why) in {
        "checksums not a mapping": (RECORDS["checksums not a mapping"][0], "its checksums are recorded as int"),
        "checksums of logits a string": (RECORDS["checksums of logits a string"][0],
                                         "train/logits: its checksums are recorded as str"),
        "block_rows 0": (RECORDS["block_rows 0"][0], "block_rows 0 is not a whole number"),
    }.items()},
    "dtype edited": (lambda p: edit_array_metadata(p, "train/logits", data_type="int32"),
                     "train/logits: stored as int32, but the store's encoding says float32"),
    "array removed": (lambda p: shutil.rmtree(os.path.join(p, "train", "logits")), "train/logits: missing"),
    "activation removed": (lambda p: shutil.rmtree(os.path.join(p, "train", "activations", "layer1")),
                           "train/activations/layer1: missing"),
}


@pytest.mark.parametrize("case", VERIFY)
def test_verify_lists_what_the_checked_reads_refuse(case, blocks_cache, tmp_path):
    from kdcache.verify import verify_store

    damage, expected = VERIFY[case]
    path = copy_of(blocks_cache, tmp_path)
    damage(path)
    problems = verify_store(path)
    assert any(expected in p for p in problems), problems


def test_inspect_of_an_array_whose_dtype_was_edited_is_one_line(fp32_cache, tmp_path, capsys):
    path = copy_of(fp32_cache, tmp_path)
    edit_array_metadata(path, "test/logits", data_type="int32")  # its top-1 would be of other numbers
    code, err = run_cli(capsys, "inspect", path)
    assert code == 2 and err.count("\n") == 1, err
    assert "test/logits is stored as int32, but the store's encoding says float32" in err, err
