"""Stores at URLs, against a real S3-compatible server on loopback (moto, IAM enforced): dump to
s3://, inspect, verify and train from it, read-only credentials, crash safety, requests per chunk."""
import itertools
import logging

import numpy as np
import pytest
import torch

from kdcache import dump_teacher, train_student
from kdcache import store as stores
from kdcache.errors import KDCacheError
from kdcache.targets import open_cache
from kdcache.store.records import rows_written
from helpers.cli import run
from test_store import StoreSuite

_n = itertools.count()


def point_at(s3_server, monkeypatch, creds=None):
    """`s3_server.apply` without forgetting fsspec's cached filesystems: kdcache passes the key and
    endpoint to fsspec, so they are in its cache key, and a new filesystem costs 0.5-3 s (botocore
    loads the S3 service model for each): reusing them keeps each test well under a second."""
    from s3server import _AWS_CLEARED

    for k in _AWS_CLEARED:
        monkeypatch.delenv(k, raising=False)
    for k, v in s3_server.env(creds).items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def admin(s3_server, monkeypatch):
    point_at(s3_server, monkeypatch)


@pytest.fixture
def read_only(s3_server, monkeypatch):
    """Credentials that may list and get every bucket's objects, and nothing else."""
    point_at(s3_server, monkeypatch, s3_server.read_only_credentials())


@pytest.fixture(scope="module")
def module_bucket(s3_server):
    return s3_server.create_bucket(f"kdc-remote-{next(_n)}")


@pytest.fixture
def bucket(module_bucket, admin):
    """A folder of its own in this module's bucket, with admin credentials in the environment."""
    return f"{module_bucket}/t{next(_n)}"


SMALL = dict(dataset="digits", dtype="float32", chunk_bytes=32 * 40)  # 32-row chunks: 45 of train's logits, 12 of test's


@pytest.fixture(scope="module")
def s3_cache(s3_server, module_bucket, teacher_ckpt):
    """A float32 digits cache dumped to s3:// with admin credentials (fp32_cache's values, smaller chunks)."""
    url = f"{module_bucket}/runs/c.zarr"
    with pytest.MonkeyPatch.context() as mp:
        point_at(s3_server, mp)
        assert dump_teacher(teacher=teacher_ckpt, out=url, **SMALL) == url
    return url


class TestS3Store(StoreSuite):
    """The backends' suite, on a Zarr store at an s3:// URL."""

    suffix = ".zarr"

    @pytest.fixture
    def path(self, bucket):
        return f"{bucket}/s{self.suffix}"

    def test_interrupted_dump_at_partial_path_is_named_with_the_fix(self, path):
        # no rename on an object store: a URL is its own partial, refused until marked complete
        assert stores.partial_path(path) == path
        self.make(path, complete=False).close()
        assert stores.state(path) == "partial"
        with stores.open_store(path) as s, pytest.raises(KDCacheError, match="--resume"):
            stores.check_complete(s)


def test_hdf5_at_a_url_is_refused_in_one_line(admin):
    with pytest.raises(KDCacheError, match="^HDF5 stores are local files; dump to a .zarr URL"):
        dump_teacher(teacher="x", dataset="digits", out="s3://bucket/c.h5")


def test_store_state_tells_missing_partial_and_complete_apart(bucket):
    url = f"{bucket}/c.zarr"
    assert stores.state(url) == "missing"
    s = stores.create_store(url)
    s.update_attrs({"schema_version": stores.SCHEMA_VERSION, "complete": False})
    assert stores.state(url) == "partial"
    s.update_attrs({"complete": True})
    assert stores.state(url) == "complete"
    stores.publish(url, url)  # in place already: nothing moves
    assert stores.state(url) == "complete"


def test_dump_to_s3_then_inspect_and_verify_it_and_its_logits_equal_a_local_dump(s3_cache, fp32_cache, admin, capsys):
    code, out, err = run(capsys, "inspect", s3_cache)
    assert code == 0 and "(complete" in out and "teacher top-1" in out, err
    logits = next(line for line in out.splitlines() if line.strip().startswith("logits"))
    on_disk = int(logits.split("B/sample")[1].split("B on disk")[0].replace(",", ""))  # fsspec's du of the chunks
    assert 0 < on_disk < 1437 * 40  # zstd-compressed float32
    code, out, err = run(capsys, "verify", s3_cache)
    assert code == 0 and "OK" in out, err
    remote, local = open_cache(s3_cache), open_cache(fp32_cache)
    for split in ("train", "test"):
        torch.testing.assert_close(remote[split].logits, local[split].logits, rtol=0, atol=0)


def test_read_only_credentials_allow_everything_but_writing(s3_cache, teacher_ckpt, read_only, capsys, tmp_path):
    code, out, err = run(capsys, "inspect", s3_cache)
    assert code == 0 and "(complete" in out, err
    code, out, err = run(capsys, "verify", s3_cache)
    assert code == 0 and "OK" in out, err
    code, out, err = run(capsys, "train-student", "--cache", s3_cache, "--student", "cnn_tiny", "--dataset", "digits",
                         "--epochs", "1", "--out", str(tmp_path / "s"))
    assert code == 0 and (tmp_path / "s" / "cnn_tiny" / "model.pt").exists(), err
    new = s3_cache.replace("c.zarr", "new.zarr")
    for argv in (["--out", new], ["--out", s3_cache, "--overwrite"]):
        code, out, err = run(capsys, "dump-teacher", "--teacher", teacher_ckpt, "--dataset", "digits", *argv)
        assert code == 2 and err.startswith("kdcache: error: no write access to s3://") and err.count("\n") == 1, err
    assert stores.state(new) == "missing" and stores.state(s3_cache) == "complete"


def test_training_from_s3_makes_requests_per_chunk_not_per_sample(s3_cache, admin, caplog, tmp_path):
    with stores.open_store(s3_cache) as s:  # every chunk object of every array of every split
        arrays = [s.array(f"{split}/{name}") for split in s.group_names() for name in s.array_names(split)]
        chunks = sum(int(np.prod([-(-n // c) for n, c in zip(a.shape, a.chunks)])) for a in arrays)
    samples = 1437 + 360
    assert chunks >= 100  # a reader that asked per sample would show ~1800 requests, or ~30 per batch
    caplog.set_level(logging.DEBUG, logger="s3fs")  # s3fs logs every request it makes: "CALL: get_object - ..."
    train_student(cache=s3_cache, students=["cnn_tiny"], dataset="digits", epochs=1, out=str(tmp_path / "s"))
    calls = [r.getMessage() for r in caplog.records if r.name == "s3fs" and r.getMessage().startswith("CALL:")]
    gets = [c for c in calls if c.startswith("CALL: get_object")]
    print(f"{len(calls)} requests ({len(gets)} GETs) for {chunks} chunks of {samples} samples")
    # each chunk once, plus metadata (zarr.json of the root, the splits and the arrays, on each open)
    assert chunks <= len(gets) <= chunks + 40, (len(gets), chunks)
    assert len(calls) <= chunks + 50 < samples / 4, (len(calls), chunks)


def test_interrupted_dump_to_s3_never_reads_as_complete_and_resume_finishes_it(
        teacher_ckpt, fp32_cache, module_bucket, admin, monkeypatch):
    import kdcache.store.writer

    url, real, written = f"{module_bucket}/resumed/c.zarr", kdcache.store.writer.BlockWriter._write_block, itertools.count()

    def dies_after_three_blocks(self, start, stop):
        if next(written) == 3:
            raise RuntimeError("simulated crash")
        real(self, start, stop)

    with monkeypatch.context() as crashing:
        crashing.setattr(kdcache.store.writer.BlockWriter, "_write_block", dies_after_three_blocks)
        with pytest.raises(RuntimeError, match="simulated crash"):
            dump_teacher(teacher=teacher_ckpt, out=url, **SMALL)
    assert stores.state(url) == "partial"
    with stores.open_store(url) as s:
        assert rows_written(s, "train") == 3 * 32
    with pytest.raises(KDCacheError, match="incomplete.*--resume"):
        open_cache(url)
    with pytest.raises(KDCacheError, match="--resume to finish it or --overwrite"):  # a fresh start would lose the work
        dump_teacher(teacher=teacher_ckpt, out=url, **SMALL)

    dump_teacher(teacher=teacher_ckpt, out=url, resume=True, **SMALL)
    assert stores.state(url) == "complete"
    remote, local = open_cache(url), open_cache(fp32_cache)
    for split in ("train", "test"):
        torch.testing.assert_close(remote[split].logits, local[split].logits, rtol=0, atol=0)


def test_an_unreachable_endpoint_is_one_line(admin, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port: nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries would only make the test slower
    code, out, err = run(capsys, "inspect", "s3://kdc-nowhere/c.zarr")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "cannot reach the object store" in lines[0], err


def test_a_missing_bucket_is_one_line_for_reading_and_for_writing(admin, teacher_ckpt, capsys):
    code, _, err = run(capsys, "inspect", "s3://kdc-no-such-bucket/c.zarr")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    code, out, err = run(capsys, "dump-teacher", "--teacher", teacher_ckpt, "--dataset", "digits", "--split", "test",
                         "--out", "s3://kdc-no-such-bucket/c.zarr")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
