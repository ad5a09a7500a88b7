"""Nothing lost, nothing wrong: killed dumps resume to identical stores, corruption never reads as data."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import kdcache.store.writer as writer_mod
from kdcache import dump_teacher, open_cache
from kdcache import store as stores
from kdcache.errors import KDCacheError
from kdcache.verify import verify_store
from kdcache.store.records import rows_written

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(dtype="float32", chunk_bytes=32 * 40, batch_size=40)  # 32-row logit chunks: many chunks to lose


def dump_cli(args, env=None):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests") + os.pathsep + ROOT, **(env or {}))
    return subprocess.run([sys.executable, "-m", "kdcache", "dump-teacher", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_dump_killed_at_random_points_resumes_to_the_uninterrupted_store(teacher_ckpt, tmp_path):
    full = dump_teacher(teacher=teacher_ckpt, dataset="helpers.dying_data:digits", out=str(tmp_path / "full.zarr"), **SMALL)
    out = str(tmp_path / "c.zarr")
    args = ["--teacher", teacher_ckpt, "--dataset", "helpers.dying_data:digits", "--out", out,
            "--config", str(tmp_path / "small.yaml")]
    (tmp_path / "small.yaml").write_text("dtype: float32\nchunk_bytes: 1280\nbatch_size: 40\n")
    kill_points = sorted(np.random.default_rng(7).choice(np.arange(100, 1437), size=3, replace=False))
    for i, at in enumerate(kill_points):  # killed three times in a row, each time further in
        run = dump_cli(args + (["--resume"] if i else []), env={"KDCACHE_TEST_KILL_AT": str(at)})
        assert run.returncode == -9, run.stderr  # SIGKILL: no cleanup ran
        assert not os.path.exists(out) and os.path.exists(out + ".partial")
        assert os.path.exists(out + ".lock")  # left behind by the dead process, taken over next time
        with stores.open_store(out + ".partial") as s:
            assert not s.get_attrs()["complete"]
            assert rows_written(s, "train") <= at
    run = dump_cli(args + ["--resume"])
    assert run.returncode == 0, run.stderr
    a, b = open_cache(out), open_cache(full)
    for split in ("train", "test"):
        torch.testing.assert_close(a[split].logits, b[split].logits, rtol=0, atol=0)
        assert torch.equal(a[split].labels, b[split].labels)
    assert verify_store(out) == [] and not os.path.exists(out + ".lock")


def test_disk_full_stops_with_a_clear_error_and_resume_completes(teacher_ckpt, tmp_path, monkeypatch):
    full = dump_teacher(teacher=teacher_ckpt, dataset="digits", out=str(tmp_path / "full.h5"), **SMALL)
    real_write, writes = writer_mod.BlockWriter._write_block, []

    def write_until_full(self, start, stop):
        writes.append(1)
        if len(writes) > 10:
            raise OSError(28, "No space left on device")
        real_write(self, start, stop)

    out = str(tmp_path / "c.h5")
    monkeypatch.setattr(writer_mod.BlockWriter, "_write_block", write_until_full)
    with pytest.raises(KDCacheError, match="disk full.*--resume"):
        dump_teacher(teacher=teacher_ckpt, dataset="digits", out=out, **SMALL)
    monkeypatch.setattr(writer_mod.BlockWriter, "_write_block", real_write)  # space freed
    dump_teacher(teacher=teacher_ckpt, dataset="digits", out=out, resume=True, **SMALL)
    torch.testing.assert_close(open_cache(out)["train"].logits, open_cache(full)["train"].logits, rtol=0, atol=0)
    assert verify_store(out) == []


def test_a_second_writer_fails_at_once_naming_the_first(teacher_ckpt, tmp_path):
    out = str(tmp_path / "c.zarr")
    with stores.StoreLock(out):  # this process plays the running dump
        with pytest.raises(KDCacheError, match=f"pid {os.getpid()}"):
            dump_teacher(teacher=teacher_ckpt, dataset="digits", out=out)
    assert not os.path.exists(out + ".partial")


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import json
    import socket

    lock = tmp_path / "c.zarr.lock"
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with stores.StoreLock(str(tmp_path / "c.zarr")) as held:
        assert held.held and json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


# --- corruption: each case is reported by verify, never read as data ----------------------------

@pytest.fixture
def store_copy(fp32_cache, tmp_path):
    import shutil

    path = str(tmp_path / "copy.zarr")
    shutil.copytree(fp32_cache, path)
    return path


def chunk_file(path, array="train/logits", index=0):
    return os.path.join(path, array, "c", str(index), "0", "0")


def test_intact_store_verifies_clean(store_copy):
    assert verify_store(store_copy) == []


def test_flipped_byte_is_detected(store_copy):
    f = chunk_file(store_copy)
    data = bytearray(open(f, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(f, "wb").write(bytes(data))
    problems = verify_store(store_copy)
    assert len(problems) == 1 and "train/logits: block 0" in problems[0]


def test_truncated_chunk_is_detected(store_copy):
    f = chunk_file(store_copy)
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 3])
    assert any("train/logits: block 0" in p for p in verify_store(store_copy))


def test_deleted_chunk_is_detected_not_read_as_fill(store_copy):
    os.remove(chunk_file(store_copy, "test/logits"))
    problems = verify_store(store_copy)
    assert any("test/logits: block 0" in p and "fill" in p for p in problems)


def test_flipped_byte_in_hdf5_is_detected(teacher_ckpt, tmp_path):
    import h5py

    out = dump_teacher(teacher=teacher_ckpt, dataset="digits", splits=["test"], out=str(tmp_path / "c.h5"))
    with h5py.File(out, "r") as f:
        offset = f["test/logits"].id.get_chunk_info(0).byte_offset
    with open(out, "r+b") as f:
        f.seek(offset + 10)
        byte = f.read(1)
        f.seek(offset + 10)
        f.write(bytes([byte[0] ^ 0x01]))
    assert any("test/logits: block 0" in p for p in verify_store(out))


def test_verify_cli_exits_non_zero_on_a_problem(store_copy, capsys):
    from kdcache.cli import main

    os.remove(chunk_file(store_copy, "test/logits"))
    with pytest.raises(SystemExit) as e:
        main(["verify", store_copy])
    assert e.value.code == 1 and "problem" in capsys.readouterr().out


def test_complete_store_opens_read_only_without_changing_a_file(store_copy):
    from kdcache.report import describe_store

    def snapshot():
        return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
                for d, _, files in os.walk(store_copy) for f in files}

    before = snapshot()
    describe_store(store_copy)
    verify_store(store_copy)
    open_cache(store_copy)["train"]
    assert snapshot() == before
