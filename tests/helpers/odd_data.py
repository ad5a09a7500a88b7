"""Datasets that do not fit, reached as `helpers.odd_data:NAME` (the module:callable syntax): the
data a user's own loader might hand kdcache. Each is digits-shaped ([3, 32, 32] images, 10 classes)
except in the one way its name says."""
import os

import torch

from kdcache.data import digits_tensors

CLASSES = [str(i) for i in range(10)]


class Samples(torch.utils.data.Dataset):
    def __init__(self, images, targets, classes=CLASSES):
        self.images, self.targets, self.classes = list(images), [int(t) for t in targets], classes

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def _digits(split, n=None):
    images, targets = digits_tensors(split)
    return images[:n], targets[:n]


def empty(split, root=None):
    return Samples([], [])


def one_sample(split, root=None):
    return Samples(*_digits(split, 1))


def label_out_of_range(split, root=None):
    """Ten class names, and a label 12 among the training labels."""
    images, targets = _digits(split, 64)
    targets = targets.copy()
    if split == "train":
        targets[5] = 12
    return Samples(images, targets)


def negative_label(split, root=None):
    images, targets = _digits(split, 64)
    targets = targets.copy()
    targets[3] = -1
    return Samples(images, targets)


def mixed_sizes(split, root=None):
    """Every image 32x32 but one of 28x28, well past the first batch."""
    images, targets = _digits(split, 300)
    images = list(images)
    images[200] = images[200][:, :28, :28].clone()
    return Samples(images, targets)


def changed_after_dump(split, root=None):
    """digits, as they were dumped unless $KDCACHE_TEST_CHANGED is "pixel" (one pixel of the first
    sample changed) or "length" (the last sample dropped): data edited after its cache was made.
    The fingerprint reads 16 evenly spaced samples, the first among them: a change elsewhere in an
    in-memory dataset is not seen."""
    images, targets = digits_tensors(split)
    change = os.environ.get("KDCACHE_TEST_CHANGED")
    if change == "pixel":
        images = images.clone()
        images[0, 0, 10, 10] += 0.5
    n = len(targets) - (change == "length")
    return Samples(images[:n], targets[:n])
