"""One writer per store: a lock file beside it, naming the process that holds it.

A lock whose process is gone (killed, crashed) on this host is taken over; one held by a live
process makes the second writer fail at once with a message naming the holder. Taking over is
atomic: of the processes that find one stale lock at the same moment, exactly one takes it.

A store at a URL takes no lock: one writer per remote store is the user's job. An object store
has no portable atomic create-if-absent (S3's conditional PUT is recent and missing from many
S3-compatible servers; other fsspec protocols differ again), and a lock left by a killed writer on
another host could never be proven stale, so every interrupted dump would need a manual delete
before --resume: a lock that would cost more than the mistake it prevents.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket

from kdcache.errors import KDCacheError

TRIES = 4  # create, take over, create again; more only if other writers keep coming and going


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _parse(text: str) -> dict:
    """The holder a lock file names, {} when it names none (being written right now, or garbage:
    treated as held by an unknown live writer)."""
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    ok = isinstance(holder, dict) and isinstance(holder.get("pid"), int) and holder["pid"] > 0
    return holder if ok else {}  # pid 0 or -1 would make os.kill signal a whole process group


class StoreLock:
    """`with StoreLock(path):` holds `path + '.lock'` for the duration."""

    def __init__(self, path: str, what: str = "dump"):
        from kdcache.store.remote import is_url

        self.path = None if is_url(path) else str(path).rstrip("/") + ".lock"  # URLs: no lock, see above
        self.what = what  # the job that writes `path`, for messages: dump, convert, training
        self.held = False

    def acquire(self) -> None:
        if self.path is None:
            return
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)  # --out may name a new folder
        for _ in range(TRIES):
            if self._create(me) or self._take_over_if_stale(me):
                self.held = True
                return
        raise KDCacheError(f"could not take the lock {self.path}; delete it if no {self.what} is running")

    def _create(self, me: dict) -> bool:
        """Create the lock file naming `me`; False if there is one already."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True

    def _take_over_if_stale(self, me: dict) -> bool:
        """Replace the lock file by ours if the process it names is gone; fail if that process is
        alive; False when the file changed under us (the caller looks again).

        Atomic: each process that finds the lock stale flocks that very file (the kernel drops an
        flock when its process dies, so a crash here blocks nobody) and replaces it only if the path
        still names the file it judged. The first to get the flock replaces it before letting go;
        the others then find the winner's lock there, and fail as for any live writer.
        """
        try:
            f = open(self.path)
        except FileNotFoundError:
            return False  # released meanwhile
        with f:
            holder = _parse(f.read())
            if holder.get("host") == me["host"] and not _alive(holder["pid"]):
                fcntl.flock(f, fcntl.LOCK_EX)
                if not self._names(f):
                    return False  # another process took it over first
                os.remove(self.path)  # its writer died: the partial store is ours to resume
                return self._create(me)  # still under the flock
        who = f"pid {holder['pid']} on {holder.get('host')}" if holder else "its lock names no process yet"
        raise KDCacheError(
            f"another {self.what} ({who}) is writing {self.path[:-len('.lock')]}; "
            f"wait for it, or if that process is gone for good, delete {self.path}"
        )

    def _names(self, f) -> bool:
        """Whether the lock path still names the open file `f` (an open file's inode is never reused)."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        was = os.fstat(f.fileno())
        return (now.st_dev, now.st_ino) == (was.st_dev, was.st_ino)

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
