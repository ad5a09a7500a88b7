"""Stores at URLs (s3://bucket/path.zarr, or any fsspec protocol whose package is installed).

Credentials come from the protocol's usual environment and configuration: for s3://, s3fs and
botocore read AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE,
~/.aws/{credentials,config}, AWS_ENDPOINT_URL(_S3) and AWS_DEFAULT_REGION by themselves.

fsspec caches filesystem instances by their constructor arguments, and an s3fs instance keeps the
credentials it resolved when it was made. So that a change of environment (another key, another
endpoint) gets a new instance rather than a stale one, the AWS variables that are set are also
passed explicitly (`storage_options`), which puts them in the cache key; values are the same ones
botocore would have read itself.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Iterator

from kdcache.errors import KDCacheError

# a scheme of 2+ characters then "://" (so "C://x" is not one), or an fsspec chain "simplecache::s3://..."
_URL = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.\-]*::)*[A-Za-z][A-Za-z0-9+.\-]+://")

# error codes that mean "these credentials may not do that" (S3 and S3-compatible servers)
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "InvalidAccessKeyId",
                 "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "403", "Forbidden"}


def is_url(path: Any) -> bool:
    """True for 's3://b/x.zarr', 'gs://...', 'memory://...', 'file:///...'; False for local paths."""
    return isinstance(path, str) and bool(_URL.match(path))


def protocol(url: str) -> str:
    """'s3' for 's3://b/x'; the outermost (last) protocol of a chained URL."""
    return url.split("::")[-1].split("://", 1)[0].lower()


def local_path(url: str) -> str | None:
    """The local path of a file:// URL (or of a plain path); None for any other URL."""
    if not is_url(url):
        return str(url)
    if "::" not in url and protocol(url) in ("file", "local"):
        return url.split("://", 1)[1]
    return None


def storage_options(url: str) -> dict[str, Any]:
    """Options for fsspec for `url`, from the environment (see the module doc for why)."""
    opts: dict[str, Any] = {}
    if protocol(url) in ("s3", "s3a"):
        env = os.environ
        if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
            opts["key"] = env["AWS_ACCESS_KEY_ID"]
            opts["secret"] = env["AWS_SECRET_ACCESS_KEY"]
            if env.get("AWS_SESSION_TOKEN"):
                opts["token"] = env["AWS_SESSION_TOKEN"]
        if env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() != "true":
            endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
            if endpoint:
                opts["endpoint_url"] = endpoint
        if env.get("AWS_PROFILE") and "key" not in opts:
            opts["profile"] = env["AWS_PROFILE"]
    return opts


def _fs_errors(url: str, exc: Exception) -> KDCacheError:
    name = protocol(url)
    if isinstance(exc, ImportError):
        return KDCacheError(f"cannot open {url}: {exc}; install the package for '{name}://' "
                            f"(for s3: pip install 'kdcache[s3]')")
    return KDCacheError(f"cannot open {url}: {exc}; use a local path or a URL of an installed fsspec protocol")


def filesystem(url: str, **options: Any):
    """(fsspec filesystem, path inside it) for `url`, with credentials from the environment."""
    import fsspec.core

    opts = {**storage_options(url), **options}
    try:
        return fsspec.core.url_to_fs(url, **opts)
    except (ImportError, ValueError) as exc:
        raise _fs_errors(url, exc) from exc


def exists(url: str) -> bool:
    """Whether anything (an object or a prefix with objects under it) is at `url`."""
    fs, path = filesystem(url)
    with translate_errors(url, write=False):
        fs.invalidate_cache(path)  # another instance (zarr's async one) may have written since
        return fs.exists(path)


def remove(url: str) -> bool:
    """Delete everything at `url`, recursively; False if there was nothing to delete."""
    fs, path = filesystem(url)
    with translate_errors(url, write=True):
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return False
        fs.rm(path, recursive=True)
        fs.invalidate_cache(path)
        # s3fs deletes in bulk (DeleteObjects) and ignores the per-key errors in its answer, so a
        # denied delete "succeeds": look again, and delete one leftover alone to surface the error
        left = fs.find(path) if fs.exists(path) else []
        if left:
            fs.rm_file(left[0])
            raise KDCacheError(f"could not delete {len(left)} objects under {url}; delete them by hand")
        return True


def zarr_store(url: str, read_only: bool = False):
    """A zarr.storage.FsspecStore for `url` (an async filesystem; zarr wraps sync ones itself)."""
    from zarr.storage import FsspecStore

    opts = storage_options(url)
    if protocol(url) in ("s3", "s3a"):
        # s3fs HEADs every whole-object read to decide whether to split it into parallel ranged GETs
        # (objects over its 50 MiB block size): chunks are ~1 MiB and zarr already fetches many at
        # once, so this makes one request per chunk instead of two (training on digits: 256 requests -> 137)
        opts["max_concurrency"] = 1
    try:
        return FsspecStore.from_url(url, storage_options=opts, read_only=read_only)
    except (ImportError, ValueError) as exc:
        raise _fs_errors(url, exc) from exc


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_permission_error(exc: BaseException) -> bool:
    """True if `exc` (or what caused it) says the credentials may not do this.

    Through zarr + s3fs a denied PUT/DELETE is a PermissionError ("Access Denied") whose __cause__ is
    botocore's ClientError with code AccessDenied; other protocols raise PermissionError too, or an
    error carrying an HTTP 403.
    """
    for e in _chain(exc):
        if isinstance(e, PermissionError):
            return True
        code = getattr(e, "response", None)
        if isinstance(code, dict) and str(code.get("Error", {}).get("Code")) in _DENIED_CODES:
            return True
        if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            return True
        for attr in ("code", "status", "status_code"):
            if getattr(e, attr, None) == 403:
                return True
    return False


def _reason(exc: BaseException) -> str:
    for e in _chain(exc):
        text = str(e).strip()
        if text:
            return text.splitlines()[0]
    return type(exc).__name__


_UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError",
                "ServerDisconnectedError", "ConnectionRefusedError", "ConnectionResetError", "gaierror")


def environment_error(exc: BaseException) -> str | None:
    """A one-line account of an object store that cannot be used as it stands (its endpoint cannot
    be reached, its bucket does not exist), or None when `exc` is something else."""
    for e in _chain(exc):
        name = type(e).__name__
        if name in _UNREACHABLE:
            return (f"cannot reach the object store ({_reason(e)}); check the endpoint (AWS_ENDPOINT_URL, the "
                    "URL's host) and the network, then run the same command again")
        code = getattr(e, "response", None)
        if isinstance(code, dict) and str(code.get("Error", {}).get("Code")) == "NoSuchBucket":
            bucket = code.get("Error", {}).get("BucketName") or "the URL's bucket"
            return f"bucket {bucket} does not exist ({_reason(e)}); create it first, or check the URL"
    return None


def permission_error(url: str, exc: BaseException, write: bool = True) -> KDCacheError:
    """The one-line KDCacheError for a denied access to `url`."""
    if write:
        return KDCacheError(f"no write access to {url}: {_reason(exc)}; "
                            f"use credentials that can write or a local --out")
    return KDCacheError(f"no read access to {url}: {_reason(exc)}; "
                        f"check the credentials for {protocol(url)}:// (environment or its config files)")


@contextlib.contextmanager
def translate_errors(url: str, write: bool = True) -> Iterator[None]:
    """Re-raise permission errors inside the block as one-line KDCacheErrors about `url`."""
    try:
        yield
    except KDCacheError:
        raise
    except Exception as exc:
        if is_permission_error(exc):
            raise permission_error(url, exc, write) from exc
        raise
