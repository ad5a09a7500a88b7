"""Shared fixtures: a digits teacher trained by kdcache itself (seconds), caches made from it, an S3 server."""
import os

import pytest
import torch
from s3server import s3_fixture

# the CI machine has 2 cores; more threads only contend. KDCACHE_TEST_THREADS=1 runs the suite on one
# thread, to find a test whose result depends on the thread count (CONTRIBUTING.md, "Tests")
torch.set_num_threads(int(os.environ.get("KDCACHE_TEST_THREADS", "2")))

s3_server = s3_fixture()  # a moto S3 server on loopback with IAM enforced, started on first use, once per session


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> str:
    """A small digits teacher, trained by plain `train_student` (no cache)."""
    from kdcache import train_student

    out = tmp_path_factory.mktemp("teacher")
    train_student(students=["cnn_small"], dataset="digits", epochs=4, out=str(out))
    return os.path.join(out, "cnn_small", "model.pt")


@pytest.fixture(scope="session")
def fp32_cache(teacher_ckpt, tmp_path_factory) -> str:
    from kdcache import dump_teacher

    return dump_teacher(teacher=teacher_ckpt, dataset="digits", out=str(tmp_path_factory.mktemp("c") / "t.zarr"),
                        dtype="float32")


@pytest.fixture(scope="session")
def view_cache(teacher_ckpt, tmp_path_factory) -> str:
    """The teacher on 2 `digits`-augmented views of every training sample (test split: one clean view)."""
    from kdcache import dump_teacher

    return dump_teacher(teacher=teacher_ckpt, dataset="digits", out=str(tmp_path_factory.mktemp("v") / "v.zarr"),
                        dtype="float32", views=2, augment="digits")
