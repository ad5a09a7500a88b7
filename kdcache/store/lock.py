"""One writer per store: a lock file beside it, naming the process that holds it.

A lock whose process is gone (killed, crashed) on this host is taken over; one held by a live
process makes the second writer fail at once with a message naming the holder.

A store at a URL takes no lock: one writer per remote store is the user's job. An object store
has no portable atomic create-if-absent (S3's conditional PUT is recent and missing from many
S3-compatible servers; other fsspec protocols differ again), and a lock left by a killed writer on
another host could never be proven stale, so every interrupted dump would need a manual delete
before --resume: a lock that would cost more than the mistake it prevents.
"""
from __future__ import annotations

import json
import os
import socket

from kdcache.errors import KDCacheError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class StoreLock:
    """`with StoreLock(path):` holds `path + '.lock'` for the duration."""

    def __init__(self, path: str):
        from kdcache.store.remote import is_url

        self.path = None if is_url(path) else str(path).rstrip("/") + ".lock"  # URLs: no lock, see above
        self.held = False

    def acquire(self) -> None:
        if self.path is None:
            return
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)  # --out may name a new folder
        for _ in range(2):  # second try after taking over a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
                    os.remove(self.path)  # its writer died: the partial store is ours to resume
                    continue
                raise KDCacheError(
                    f"another dump (pid {holder.get('pid')} on {holder.get('host')}) is writing this store; "
                    f"wait for it, or if that process is gone for good, delete {self.path}"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise KDCacheError(f"could not take the lock {self.path}; delete it if no dump is running")

    def _holder(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}  # being written right now, or garbage: treat as held by an unknown live writer

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
