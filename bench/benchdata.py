"""The benchmark's dataset, named to kdcache as `benchdata:cifar100_like` (a module:callable dataset).

CIFAR-100-shaped images (3 x 32 x 32, 100 classes) held in memory, so that the loader costs next to
nothing and figures 1, 2 and 4 compare kdcache's own overhead with model compute, not with image
decoding (kdcache's `fake` dataset spends ~4 ms/sample in torchvision's FakeData on 2 cores).
"""
from __future__ import annotations

import torch

CLASSES = 100
SIZES = {"train": 1536, "test": 256}  # ~3 s of a resnet8 forward over train on 2 CPU cores
LARGE = {"train": 16384, "test": 1024}  # for a GPU, where the same work takes milliseconds


class ImagesInMemory(torch.utils.data.Dataset):
    """`(x [3, 32, 32] float32, y int)` from one pre-drawn tensor; `targets` and `classes` for kdcache."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 32, 32, generator=g)
        self.targets = torch.randint(0, CLASSES, (n,), generator=g).tolist()
        self.classes = [str(c) for c in range(CLASSES)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def cifar100_like(split: str, root=None) -> ImagesInMemory:
    return ImagesInMemory(SIZES[split], seed={"train": 0, "test": 1}[split])


def cifar100_like_large(split: str, root=None) -> ImagesInMemory:
    return ImagesInMemory(LARGE[split], seed={"train": 0, "test": 1}[split])
