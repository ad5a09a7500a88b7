"""A real S3-compatible server on loopback for tests: moto's server in a subprocess, IAM auth enforced.

    with S3Server() as s3:
        s3.create_bucket("kd")
        env = s3.env(s3.admin)                        # full access
        ro = s3.env(s3.read_only_credentials("kd"))   # s3:GetObject + s3:ListBucket only

In conftest.py:  `from s3server import s3_fixture` then `s3_server = s3_fixture()` (session-scoped).

How read-only is enforced: moto checks signatures and IAM policies only once its count of
"initial no-auth actions" is used up (settings.INITIAL_NO_AUTH_ACTION_COUNT, infinite by default).
The server starts with auth off, we create an admin IAM user (policy "*") through it, then POST
`/moto-api/reset-auth` with 0, and from then on every request must be signed by a known IAM key and
allowed by that user's policies. A subprocess (not ThreadedMotoServer) keeps that global setting and
moto's state out of the test process.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

REGION = "us-east-1"

# variables that would make a client pick up credentials or settings other than the ones we give it
_AWS_CLEARED = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE",
)


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str
    user: str = ""


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the test process dies, even by SIGKILL (Linux)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class S3Server:
    """moto's server on 127.0.0.1:<free port>, started by `start()`/`with`, stopped by `stop()`."""

    def __init__(self, host: str = "127.0.0.1", region: str = REGION, enforce_auth: bool = True,
                 startup_timeout: float = 60.0):
        self.host, self.region, self.enforce_auth = host, region, enforce_auth
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.admin: Credentials | None = None
        self._users = 0

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "S3Server":
        last = ""
        for _ in range(3):  # the free port can be taken between probe and bind: retry on another
            self.port = free_port(self.host)
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
            # a file, not a pipe: werkzeug logs every request to stderr, and a pipe nobody reads fills up
            self._log = tempfile.TemporaryFile()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log, env=env,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
            if self._wait_ready():
                break
            last = self._kill()
        else:
            raise RuntimeError(f"moto server did not start on {self.host}: {last[-2000:]}")
        atexit.register(self._kill)  # even if the caller never reaches stop()
        try:
            self._bootstrap()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=2):
                    return True
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        return False

    def _kill(self) -> str:
        proc, self.proc = self.proc, None
        if proc is None:
            return ""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log, self._log = self._log, None
        if log is None:
            return ""
        log.seek(0)
        err = log.read().decode(errors="replace")
        log.close()
        return err

    def stop(self) -> None:
        self._kill()
        atexit.unregister(self._kill)

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _post(self, path: str, data: bytes) -> bytes:
        req = urllib.request.Request(f"{self.endpoint}{path}", data=data, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read()

    def _bootstrap(self) -> None:
        """Create the admin user while auth is off, then switch IAM enforcement on."""
        self._post("/moto-api/reset-auth", b"inf")
        self.admin = self._new_user("kdcache-admin", {"Effect": "Allow", "Action": "*", "Resource": "*"},
                                    Credentials("bootstrap", "bootstrap"))
        if self.enforce_auth:
            self._post("/moto-api/reset-auth", b"0")

    # -- clients and credentials -----------------------------------------------------------------
    def client(self, service: str = "s3", creds: Credentials | None = None):
        import boto3

        creds = creds or self.admin
        return boto3.client(service, endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=creds.access_key_id, aws_secret_access_key=creds.secret_access_key)

    def _new_user(self, name: str, statement: dict, creds: Credentials) -> Credentials:
        iam = self.client("iam", creds)
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy",
                            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [statement]}))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return Credentials(key["AccessKeyId"], key["SecretAccessKey"], name)

    def create_user(self, actions: list[str], resources: list[str], name: str | None = None) -> Credentials:
        """An IAM user allowed only `actions` on `resources` (ARNs); returns its access key."""
        self._users += 1
        name = name or f"kdcache-user-{self._users}"
        return self._new_user(name, {"Effect": "Allow", "Action": actions, "Resource": resources}, self.admin)

    def read_only_credentials(self, bucket: str = "*") -> Credentials:
        """s3:GetObject and s3:ListBucket on `bucket` (every bucket by default), nothing else."""
        return self.create_user(["s3:GetObject", "s3:ListBucket"],
                                [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"])

    def create_bucket(self, name: str) -> str:
        """Create `name` (admin credentials) and return its URL, s3://name."""
        self.client("s3").create_bucket(Bucket=name)
        return f"s3://{name}"

    def env(self, creds: Credentials | None = None) -> dict[str, str]:
        """The variables a client needs for this server with `creds` (admin by default).

        Apply them on top of os.environ (subprocess env=, or monkeypatch.setenv). AWS_CONFIG_FILE and
        AWS_SHARED_CREDENTIALS_FILE point at nothing so ~/.aws cannot add a profile or a key; other
        AWS settings already in the environment (_AWS_CLEARED) are dropped by `clean_environ`/`apply`.
        """
        creds = creds or self.admin
        return {
            "AWS_ACCESS_KEY_ID": creds.access_key_id,
            "AWS_SECRET_ACCESS_KEY": creds.secret_access_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def clean_environ(self, creds: Credentials | None = None, base: dict | None = None) -> dict[str, str]:
        """A whole environment for a subprocess: `base` (os.environ) less other AWS settings, plus env(creds)."""
        base = dict(os.environ if base is None else base)
        for k in _AWS_CLEARED:
            base.pop(k, None)
        base.update(self.env(creds))
        return base

    def apply(self, monkeypatch, creds: Credentials | None = None) -> None:
        """Point this process's environment at the server with `creds`; forgets cached s3fs instances."""
        for k in _AWS_CLEARED:
            monkeypatch.delenv(k, raising=False)
        for k, v in self.env(creds).items():
            monkeypatch.setenv(k, v)
        clear_fsspec_cache()


def clear_fsspec_cache() -> None:
    """Forget fsspec's cached filesystem instances (s3fs keeps one per set of arguments, with the
    credentials it resolved when first made), so the next one reads the environment anew."""
    try:
        import s3fs
    except ImportError:
        return
    for fs in list(s3fs.S3FileSystem._cache.values()):
        creator = getattr(fs, "_s3creator", None)
        if fs.asynchronous and creator is not None:
            # zarr's instances live on zarr's event loop: close their HTTP sessions there, or
            # aiohttp warns "Unclosed client session" when they are collected
            try:
                from zarr.core.sync import sync

                sync(creator.__aexit__(None, None, None))
            except Exception:
                pass
    s3fs.S3FileSystem.clear_instance_cache()


def s3_fixture(name: str = "s3_server", scope: str = "session"):
    """A pytest fixture yielding a started S3Server; in conftest.py: `s3_server = s3_fixture()`."""
    import pytest

    @pytest.fixture(scope=scope, name=name)
    def _s3_server():
        with S3Server() as server:
            yield server

    return _s3_server
