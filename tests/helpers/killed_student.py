"""A student whose process is killed outright (SIGKILL, as the out-of-memory killer does) on its
first batch: a --jobs job that ends without a word to the sweep."""
import os
import signal

import torch.nn as nn


class _Killed(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.fc = nn.Linear(1, num_classes)

    def forward(self, x):
        os.kill(os.getpid(), signal.SIGKILL)


def net(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return _Killed(num_classes)
