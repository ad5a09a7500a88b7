"""A digits dataset that SIGKILLs its own process at sample $KDCACHE_TEST_KILL_AT: a dump killed
for real at a chosen moment, with no sleeps and no races in the test."""
import os
import signal

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
            os.kill(os.getpid(), signal.SIGKILL)
        return self.images[i], int(self.targets[i])


def digits(split, root=None):
    return DyingDigits(split)
