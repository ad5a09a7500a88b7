"""kdcache.store.remote against a real S3-compatible server (moto, in a subprocess, IAM enforced)."""
import itertools
import subprocess
import sys

import numpy as np
import pytest
import zarr

from kdcache.errors import KDCacheError
from kdcache.store import remote

_n = itertools.count()


@pytest.fixture
def bucket(s3_server, monkeypatch):
    """A new bucket, and this process's environment pointed at the server with admin credentials."""
    s3_server.apply(monkeypatch)
    return s3_server.create_bucket(f"kdc-test-{next(_n)}")


def _write(url):
    g = zarr.open_group(store=remote.zarr_store(url), mode="w", zarr_format=3)
    g.create_array("logits", shape=(20, 3), chunks=(5, 3), dtype="f4")[:] = np.arange(60).reshape(20, 3)
    g.update_attributes({"complete": True})


@pytest.mark.parametrize("path,url", [
    ("s3://bucket/x.zarr", True), ("gs://b/x.zarr", True), ("memory://x.zarr", True),
    ("file:///tmp/x.zarr", True), ("simplecache::s3://b/x.zarr", True), ("s3a://b/x", True),
    ("runs/x.zarr", False), ("/tmp/x.zarr", False), ("x.zarr", False), ("./s3:/x", False),
    ("C://x", False), ("", False), (None, False),
])
def test_is_url(path, url):
    assert remote.is_url(path) is url


def test_local_path():
    assert remote.local_path("file:///tmp/x.zarr") == "/tmp/x.zarr"
    assert remote.local_path("runs/x.zarr") == "runs/x.zarr"
    assert remote.local_path("s3://b/x.zarr") is None


def test_round_trip_exists_remove(bucket):
    url = f"{bucket}/run/t.zarr"
    assert not remote.exists(url)
    with pytest.raises(FileNotFoundError):  # zarr's GroupNotFoundError
        zarr.open_group(store=remote.zarr_store(url, read_only=True), mode="r", zarr_format=3)
    _write(url)
    assert remote.exists(url)
    g = zarr.open_group(store=remote.zarr_store(url, read_only=True), mode="r", zarr_format=3)
    assert g.attrs["complete"] is True
    np.testing.assert_array_equal(g["logits"][:], np.arange(60).reshape(20, 3))
    fs, path = remote.filesystem(url)
    assert path == url[len("s3://"):] and fs.protocol[0] == "s3"
    assert remote.remove(url) is True
    assert not remote.exists(url)
    assert remote.remove(url) is False


def test_read_only_credentials(s3_server, bucket, monkeypatch):
    url = f"{bucket}/t.zarr"
    _write(url)
    s3_server.apply(monkeypatch, s3_server.read_only_credentials(bucket[len("s3://"):]))

    g = zarr.open_group(store=remote.zarr_store(url), mode="r+", zarr_format=3)  # reading works
    assert g["logits"][19, 2] == 59
    with pytest.raises(PermissionError) as raw:  # what zarr + s3fs raise for a denied PUT
        g.update_attributes({"complete": False})
    assert remote.is_permission_error(raw.value)
    with pytest.raises(KDCacheError, match=r"^no write access to s3://.*local --out$"):
        with remote.translate_errors(url):
            g["logits"][0] = 1
    with pytest.raises(KDCacheError, match="no write access"):
        remote.remove(url)
    with pytest.raises(KDCacheError, match="no write access"), remote.translate_errors(f"{bucket}/new.zarr"):
        zarr.open_group(store=remote.zarr_store(f"{bucket}/new.zarr"), mode="w", zarr_format=3)
    assert remote.exists(url) and not remote.exists(f"{bucket}/new.zarr")
    assert zarr.open_group(store=remote.zarr_store(url, read_only=True), mode="r").attrs["complete"] is True


def test_wrong_secret_is_a_permission_error(s3_server, bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(KDCacheError, match="no read access"):
        remote.exists(f"{bucket}/t.zarr")


def test_subprocess_uses_environment(s3_server, bucket):
    """What a `kdcache` subprocess sees: only environment variables, read-only credentials."""
    url = f"{bucket}/t.zarr"
    _write(url)
    code = ("import sys, zarr; from kdcache.store import remote; u = sys.argv[1]; "
            "print(zarr.open_group(store=remote.zarr_store(u, read_only=True), mode='r')['logits'][1, 0]); "
            "remote.remove(u)")
    env = s3_server.clean_environ(s3_server.read_only_credentials())
    r = subprocess.run([sys.executable, "-c", code, url], env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "3.0"
    assert r.returncode == 1 and "KDCacheError: no write access to " + url in r.stderr


def test_other_protocols():
    url = "memory://kdcache-test/t.zarr"
    _write(url)
    assert remote.exists(url)
    assert zarr.open_group(store=remote.zarr_store(url, read_only=True), mode="r")["logits"][2, 1] == 7
    assert remote.remove(url) and not remote.exists(url)
    with pytest.raises(KDCacheError, match="Protocol not known"):
        remote.zarr_store("nosuchproto://b/x.zarr")


def test_server_starts_and_stops():
    from s3server import S3Server

    with S3Server() as server:
        proc, endpoint = server.proc, server.endpoint
        assert proc.poll() is None and endpoint.startswith("http://127.0.0.1:")
        with pytest.raises(Exception, match="InvalidClientTokenId|InvalidAccessKeyId|not valid"):
            server.client("s3", type(server.admin)("AKIANOTAKEY", "x")).list_buckets()  # IAM is enforced
    assert proc.poll() is not None and server.proc is None
