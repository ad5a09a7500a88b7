"""Digits that tell a test, by a file, where a process is, and can stop it there until a signal:
a dump, convert or training caught mid-way for real, with no sleeps and no races in the test.

`helpers.pausing:digits` is plain digits unless $KDCACHE_TEST_READY names a folder. Then each
process that reads a sample writes READY/<pid> at its first read, and a process that reaches its
$KDCACHE_TEST_PAUSE_AT-th read of the train split (or, for `test_digits`, of the test split)
writes READY/paused and waits there for a signal. `start(ARGS, ..., module="helpers.pausing")`
runs `kdcache ARGS` with the same pause before convert's $KDCACHE_TEST_PAUSE_AT-th piece of rows.
"""
import os
import signal
import subprocess
import sys
import time

import torch

from kdcache.data import digits_tensors

_reads = {}  # (pid, pausing) -> samples read by that process (a DataLoader worker has its own count)


def _announce(name: str) -> None:
    with open(os.path.join(os.environ["KDCACHE_TEST_READY"], name), "w"):
        pass


def _read(pausing: bool) -> None:
    if "KDCACHE_TEST_READY" not in os.environ:
        return
    pid = os.getpid()
    if not any(key[0] == pid for key in _reads):
        _announce(str(pid))
    reads = _reads[pid, pausing] = _reads.get((pid, pausing), 0) + 1
    if pausing and reads == int(os.environ.get("KDCACHE_TEST_PAUSE_AT", "0")):
        _announce("paused")
        signal.pause()  # until a signal; its handler raises (KeyboardInterrupt, kdcache's Terminated)


class PausingDigits(torch.utils.data.Dataset):
    def __init__(self, split, pausing, size=None):
        images, targets = digits_tensors(split)
        self.images, self.targets = images[:size], targets[:size]
        self.pausing = pausing

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        _read(self.pausing)
        return self.images[i], int(self.targets[i])


def digits(split, root=None):
    return PausingDigits(split, pausing=split == "train")


def test_digits(split, root=None):
    return PausingDigits(split, pausing=split == "test")


def few_digits(split, root=None):
    """The first 256 training and 64 test digits: a training of a few seconds an epoch."""
    return PausingDigits(split, pausing=split == "train", size=256 if split == "train" else 64)


# --- driving a kdcache process from a test ------------------------------------------------------

def start(argv, ready, pause_at=None, module="kdcache.cli") -> subprocess.Popen:
    """`kdcache ARGV` (or `python -m module ARGV`) in a process of its own, reporting to folder `ready`.

    SIGINT is reset to its default in the child, so that Python turns it into KeyboardInterrupt even
    when the test itself runs in the background (where a shell starts it with SIGINT ignored)."""
    env = dict(os.environ, KDCACHE_TEST_READY=str(ready), PYTHONPATH=os.path.dirname(os.path.dirname(__file__)),
               OMP_NUM_THREADS="2")  # the threads of tests/conftest.py: the same sums as the test's own runs
    if pause_at is not None:
        env["KDCACHE_TEST_PAUSE_AT"] = str(pause_at)
    code = f"import sys; from {module} import main; main(sys.argv[1:])"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(path, proc: subprocess.Popen, timeout: float = 120.0, count: int = 1) -> None:
    """Until `path` exists (a folder: holds `count` files), failing if `proc` ends first."""
    deadline = time.monotonic() + timeout
    while not (len(os.listdir(path)) >= count if os.path.isdir(path) else os.path.exists(path)):
        if proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {path}: {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)  # polling a file the process writes: the wait ends on its event, not on a guess


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc: children, their children, ...)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, ended and not yet reaped, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _pause_in_convert():
    import kdcache.convert as convert

    real, calls = convert.convert_logits, []

    def pausing(*args, **kwargs):
        calls.append(1)
        if len(calls) == int(os.environ.get("KDCACHE_TEST_PAUSE_AT", "0")):
            _announce("paused")
            signal.pause()
        return real(*args, **kwargs)

    convert.convert_logits = pausing


def main(argv):
    """`kdcache ARGV`, pausing in convert (see the module docstring)."""
    from kdcache.cli import main as kdcache

    _pause_in_convert()
    kdcache(argv)
