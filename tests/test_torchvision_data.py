"""torchvision datasets are read from --data-root as torchvision lays them out, never downloaded."""
import os
import struct

import numpy as np
import pytest

from kdcache.data import load_split
from kdcache.errors import KDCacheError


def write_idx(path, array: np.ndarray) -> None:
    """The IDX format of the MNIST files: magic (ubyte, ndim), big-endian dims, raw bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.fixture
def mnist_root(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return str(tmp_path)


def test_mnist_from_a_local_root_becomes_3x32x32(mnist_root):
    train, test = load_split("mnist", "train", root=mnist_root), load_split("mnist", "test", root=mnist_root)
    assert (len(train), len(test)) == (12, 5) and train.num_classes == 10
    x, y = train.dataset[3]
    assert x.shape == (3, 32, 32) and y == 3 and list(train.labels[:3]) == [0, 1, 2]
    assert train.fingerprint() != test.fingerprint()


def test_a_root_without_the_dataset_says_kdcache_never_downloads(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(KDCacheError, match="never downloads"):
        load_split("cifar10", "train", root=str(tmp_path / "empty"))
