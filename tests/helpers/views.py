"""A teacher that keeps every input it is shown, and a user's own transform: what the view tests
need to compare a replayed input with the one a dump's teacher really saw."""
import random

import numpy as np
import torch
import torch.nn as nn

SEEN: list = []  # every batch the recorder was shown, in order


class Recorder(nn.Module):
    """A tiny classifier that appends each input batch [B, C, H, W] to SEEN."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.head = nn.Linear(3, num_classes)

    def forward(self, x):
        SEEN.append(x.detach().clone())
        return self.head(x.mean((2, 3)))


def recorder(num_classes, in_chans=3):
    return Recorder(num_classes)


def noisy_shift():
    """A user's own transform, drawing from all three RNGs: Python's, numpy's and torch's."""

    def transform(x):
        dy, dx = random.randint(-2, 2), int(np.random.randint(-2, 3))
        return torch.roll(x, (dy, dx), dims=(1, 2)) + 0.05 * torch.randn_like(x)

    return transform
