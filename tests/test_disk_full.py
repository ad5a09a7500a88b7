"""A full disk, met while writing blocks or while making a split's arrays, is one line that says
to free space and --resume, and nothing already written is lost: the resumed dump equals one that
never stopped."""
import errno
import os

import numpy as np
import pytest
import zarr

import kdcache.store.writer as writer_mod
from kdcache.cli import main
from kdcache.store import records
from kdcache.store.zarr_store import ZarrStore

SMALL = ["--dataset", "digits", "--split", "test", "--dtype", "float32"]


def dump(capsys, teacher, out, *extra):
    try:
        main(["dump-teacher", "--teacher", teacher, *SMALL, "--out", out, *map(str, extra)])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def full():
    return OSError(errno.ENOSPC, "No space left on device", "/fake/disk")


def same_store(a: str, b: str):
    x, y = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    np.testing.assert_array_equal(x["test/logits"][:], y["test/logits"][:])


def test_disk_full_while_writing_blocks_is_one_line_even_when_recording_fails_too(teacher_ckpt, tmp_path, capsys,
                                                                                  monkeypatch):
    whole = str(tmp_path / "whole.zarr")
    assert dump(capsys, teacher_ckpt, whole)[0] == 0
    out = str(tmp_path / "c.zarr")
    real_write, real_record = writer_mod.BlockWriter._write_block, records.ProgressRecord._write
    written = []

    def fills_up(self, start, stop):
        if len(written) == 2:
            raise full()
        written.append(start)
        real_write(self, start, stop)

    def record_fails_when_full(self):
        if len(written) == 2:
            raise full()  # the progress record lives on the same full disk
        real_record(self)

    monkeypatch.setattr(writer_mod.BlockWriter, "_write_block", fills_up)
    monkeypatch.setattr(records.ProgressRecord, "_write", record_fails_when_full)
    small_blocks = tmp_path / "small-blocks.yaml"
    small_blocks.write_text("chunk_bytes: 1280\n")  # blocks of 32 rows of 40 bytes: 12 blocks to fill
    code, err = dump(capsys, teacher_ckpt, out, "--config", small_blocks)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "disk full" in lines[0] and "--resume" in lines[0], err
    monkeypatch.setattr(writer_mod.BlockWriter, "_write_block", real_write)
    monkeypatch.setattr(records.ProgressRecord, "_write", real_record)
    assert dump(capsys, teacher_ckpt, out, "--config", small_blocks, "--resume")[0] == 0
    same_store(out, whole)


def test_disk_full_while_making_a_splits_arrays_is_one_line_and_resumable(teacher_ckpt, tmp_path, capsys,
                                                                          monkeypatch):
    out = str(tmp_path / "c.zarr")
    real = ZarrStore.create_array
    calls = []

    def fills_up(self, name, **kwargs):
        calls.append(name)
        if len(calls) == 2:
            raise full()
        return real(self, name, **kwargs)

    monkeypatch.setattr(ZarrStore, "create_array", fills_up)
    code, err = dump(capsys, teacher_ckpt, out)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "No space left on device" in lines[0] and "--resume" in lines[0], err
    assert not os.path.exists(out)  # never mistaken for a complete store
    monkeypatch.setattr(ZarrStore, "create_array", real)
    assert dump(capsys, teacher_ckpt, out, "--resume")[0] == 0
    assert zarr.open_group(out, mode="r").attrs["complete"] is True


def test_a_write_error_of_the_recording_itself_is_not_swallowed_when_nothing_else_failed(tmp_path):
    class FullStore:  # a store whose every metadata write fails
        path = str(tmp_path / "s.zarr")

        def update_attrs(self, *a, **k):
            raise full()

    record = records.ProgressRecord(FullStore(), "train", 0, 2, {"logits": [None, None]}, every=1e9)
    record.record(0, {"train/logits": 1})
    with pytest.raises(OSError):
        record.flush()
    record.flush(after_failure=True)  # best effort after another failure: the first error stands
