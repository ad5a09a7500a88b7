"""Caches the integration tests share, dumped once per session from conftest's `teacher_ckpt`:
float32 logits with the full `layer3` map (feature losses), and top-3 logits."""
import os

import pytest


def _dump_once(tmp_path_factory, name: str, **options) -> str:
    # one store per session even when several test modules import the fixture
    path = os.path.join(tmp_path_factory.getbasetemp(), f"{name}.zarr")
    if not os.path.exists(path):
        from kdcache import dump_teacher

        dump_teacher(out=path, **options)
    return path


@pytest.fixture(scope="session")
def feature_cache(teacher_ckpt, tmp_path_factory) -> str:
    return _dump_once(tmp_path_factory, "features", teacher=teacher_ckpt, dataset="digits", dtype="float32",
                      activations=["layer3"])


@pytest.fixture(scope="session")
def topk_cache(teacher_ckpt, tmp_path_factory) -> str:
    return _dump_once(tmp_path_factory, "top3", teacher=teacher_ckpt, dataset="digits", topk=3)
