"""A digits dataset that SIGKILLs its own process at sample $KDCACHE_TEST_KILL_AT: a dump killed
for real at a chosen moment. With $KDCACHE_TEST_KILL_WHEN_WRITTEN (a store's .partial path) it first
waits until the dump's writer thread has recorded a block there: on a loaded machine that thread
may lag a few batches behind the teacher, and a test expecting progress on disk would race it.
$KDCACHE_TEST_KILL_WHEN_RECORD names the progress record (a rank's, such as 24-45) to wait for."""
import os
import signal
import time

import torch

from kdcache.data import digits_tensors


class DyingDigits(torch.utils.data.Dataset):
    def __init__(self, split):
        self.images, self.targets = digits_tensors(split)
        self.kill_at = int(os.environ.get("KDCACHE_TEST_KILL_AT", "-1"))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        if i == self.kill_at:
            _wait_for_a_block(os.environ.get("KDCACHE_TEST_KILL_WHEN_WRITTEN"), os.environ.get("KDCACHE_TEST_KILL_WHEN_RECORD"))
            os.kill(os.getpid(), signal.SIGKILL)
        return self.images[i], int(self.targets[i])


def digits(split, root=None):
    return DyingDigits(split)


def _wait_for_a_block(path, record=None, timeout=120.0):
    if not path:
        return
    from kdcache import store as stores
    from kdcache.store.records import PROGRESS, rows_written

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with stores.backend_for(path)(path, read_only=True) as s:
                if (record in s.group_names(f"train/{PROGRESS}")) if record else rows_written(s, "train") > 0:
                    return
        except Exception:  # the store or its record is being written: look again
            pass
        time.sleep(0.05)
