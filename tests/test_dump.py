"""dump-teacher writes the teacher's raw outputs in dataset order, and never a half store as whole."""
import os

import pytest
import torch

import kdcache.dump as dump_mod
from kdcache import dump_teacher, open_cache
from kdcache import store as stores
from kdcache.data import load_split
from kdcache.errors import KDCacheError
from kdcache.models import build_teacher
from kdcache.store.records import rows_written
from helpers.crashing import Exploding


def teacher_logits(ckpt, split="train"):
    model, _ = build_teacher(ckpt, num_classes=None)
    x = torch.stack([x for x, _ in load_split("digits", split).dataset])
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_cached_logits_are_the_teachers_raw_logits_in_dataset_order(teacher_ckpt, tmp_path, suffix):
    out = dump_teacher(teacher=teacher_ckpt, dataset="digits", out=str(tmp_path / f"c{suffix}"), dtype="float32",
                       batch_size=100)
    cache = open_cache(out)
    expected = teacher_logits(teacher_ckpt)
    torch.testing.assert_close(cache["train"].logits[:, 0], expected, rtol=1e-5, atol=1e-5)
    assert cache["train"].labels.tolist() == load_split("digits", "train").labels.tolist()
    assert set(cache.splits) == {"train", "test"}


@pytest.mark.parametrize("dtype,tol", [("float16", 1e-2), ("bfloat16", 6e-2)])
def test_half_precision_caches_stay_close_to_the_teacher(teacher_ckpt, tmp_path, dtype, tol):
    out = dump_teacher(teacher=teacher_ckpt, dataset="digits", splits=["test"], out=str(tmp_path / "c.zarr"), dtype=dtype)
    cache = open_cache(out)
    got = cache["test"].logits[:, 0].float()
    torch.testing.assert_close(got, teacher_logits(teacher_ckpt, "test"), rtol=tol, atol=tol)
    assert cache.attrs["dtype"] == dtype


def test_store_attrs_say_how_it_was_made(teacher_ckpt, fp32_cache):
    with stores.open_store(fp32_cache) as s:
        attrs = s.get_attrs()
        split = s.get_attrs("train")
    assert attrs["complete"] is True and attrs["schema_version"] == stores.SCHEMA_VERSION
    assert attrs["teacher"]["arch"] == "cnn_small" and len(attrs["teacher"]["weights_sha256"]) == 64
    assert attrs["config"]["teacher"] == teacher_ckpt and attrs["views"] == 1
    assert split["dataset"]["length"] == 1437 and split["dataset"]["fingerprint"] == load_split("digits", "train").fingerprint()
    assert split["rows_written"] == 1437


def test_interrupted_dump_never_reads_as_complete_and_resume_gives_the_same_store(teacher_ckpt, tmp_path, monkeypatch):
    small = dict(dtype="float32", chunk_bytes=64 * 40)  # 64-row chunks of logits: a crash lands mid-split
    full = dump_teacher(teacher=teacher_ckpt, dataset="digits", out=str(tmp_path / "full.zarr"), **small)

    real_load = dump_mod.load_split

    def crashing(name, split, root=None):
        data = real_load(name, split, root=root)
        if split == "train":
            data.dataset = Exploding(data.dataset, at=1000)
        return data

    out = str(tmp_path / "c.zarr")
    monkeypatch.setattr(dump_mod, "load_split", crashing)
    with pytest.raises(RuntimeError, match="simulated"):
        dump_teacher(teacher=teacher_ckpt, dataset="digits", out=out, batch_size=50, **small)
    assert not os.path.exists(out) and os.path.exists(out + ".partial")
    with pytest.raises(KDCacheError, match="incomplete"):
        open_cache(out)
    with stores.open_store(out + ".partial") as s:
        done = rows_written(s, "train")
    assert 0 < done <= 1000 and done % 64 == 0

    with pytest.raises(KDCacheError, match="--resume"):  # a fresh start would throw the work away
        dump_teacher(teacher=teacher_ckpt, dataset="digits", out=out, dtype="float32")
    monkeypatch.setattr(dump_mod, "load_split", real_load)
    dump_teacher(teacher=teacher_ckpt, dataset="digits", out=out, batch_size=50, resume=True, **small)
    a, b = open_cache(out), open_cache(full)
    for split in ("train", "test"):
        torch.testing.assert_close(a[split].logits, b[split].logits, rtol=1e-5, atol=1e-6)  # batches of 50 vs 256


def test_resume_refuses_a_different_encoding(teacher_ckpt, tmp_path):
    out = str(tmp_path / "c.zarr")
    s = stores.create_store(out + ".partial")
    s.update_attrs({"schema_version": stores.SCHEMA_VERSION, "complete": False, "teacher": {}, "splits": ["train", "test"],
                    "dtype": "float32", "activations": {}})
    s.close()
    with pytest.raises(KDCacheError, match="cannot resume"):
        dump_teacher(teacher=teacher_ckpt, dataset="digits", out=out, resume=True)


def test_resume_refuses_a_dump_started_in_another_precision(teacher_ckpt, fp32_cache, tmp_path):
    import shutil

    import zarr

    out = str(tmp_path / "c.zarr")
    shutil.copytree(fp32_cache, out + ".partial")
    # as if started under float16 autocast on a GPU (--amp), and resumed here on the CPU in float32
    zarr.open_group(out + ".partial", mode="r+").attrs.update({"complete": False, "autocast": "float16"})
    with pytest.raises(KDCacheError, match="cannot resume .*its autocast differs from this run's \\(float16 vs None\\)"):
        dump_teacher(teacher=teacher_ckpt, dataset="digits", out=out, dtype="float32", resume=True)


def test_overwrite_replaces_a_store_only_once_the_new_one_is_whole(teacher_ckpt, fp32_cache, tmp_path):
    out = str(tmp_path / "c.zarr")
    dump_teacher(teacher=teacher_ckpt, dataset="digits", splits=["test"], out=out)
    with pytest.raises(KDCacheError, match="already exists"):
        dump_teacher(teacher=teacher_ckpt, dataset="digits", splits=["test"], out=out)
    dump_teacher(teacher=teacher_ckpt, dataset="digits", splits=["train"], out=out, overwrite=True)
    assert set(open_cache(out).splits) == {"train"} and not os.path.exists(out + ".partial")


def test_a_reader_during_overwrite_finds_the_old_store_or_the_new_one_never_half_deleted(teacher_ckpt, tmp_path,
                                                                                          monkeypatch):
    from kdcache.store import lifecycle

    out = str(tmp_path / "c.zarr")
    dump_teacher(teacher=teacher_ckpt, dataset="digits", splits=["test"], out=out, dtype="float32")
    old = open_cache(out)["test"].logits.clone()
    real_remove, seen = lifecycle.remove_store, []

    def slow_remove(path):  # deletes file by file, and a reader opens OUT after each deletion
        for root, _, files in os.walk(path):
            for name in files:
                os.remove(os.path.join(root, name))
                try:
                    seen.append(open_cache(out)["test"].logits.clone())
                except Exception as e:
                    seen.append(e)
        real_remove(path)

    monkeypatch.setattr(lifecycle, "remove_store", slow_remove)
    dump_teacher(teacher=teacher_ckpt, dataset="digits", splits=["test"], out=out, dtype="float16", overwrite=True)
    new = open_cache(out)["test"].logits
    assert seen and all(isinstance(s, torch.Tensor) and (torch.equal(s, old) or torch.equal(s, new)) for s in seen), \
        [s for s in seen if not isinstance(s, torch.Tensor)][:1]
    assert sorted(os.listdir(tmp_path)) == ["c.zarr"]  # the old store moved aside is gone too


def test_non_finite_teacher_output_stops_the_dump_naming_the_sample(tmp_path):
    from kdcache.encodings import check_finite

    with pytest.raises(KDCacheError, match="sample 7"):
        check_finite(torch.tensor([[0.0, 1.0]] * 3 + [[float("nan"), 0.0]]), first_row=4)


def test_teacher_for_another_class_count_is_refused(tmp_path, teacher_ckpt):
    with pytest.raises(KDCacheError, match="10 classes"):
        dump_teacher(teacher=teacher_ckpt, dataset="fake:size=8,classes=5", out=str(tmp_path / "c.zarr"))


def test_dump_refuses_when_the_disk_cannot_hold_the_store(teacher_ckpt, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(KDCacheError, match="free"):
        dump_teacher(teacher=teacher_ckpt, dataset="digits", out=str(tmp_path / "c.zarr"), activations=["layer1"])
    assert os.listdir(tmp_path) == []


def test_store_size_estimate_bounds_what_is_written(teacher_ckpt, tmp_path):
    from kdcache.distributed import resolve_device
    from kdcache.dump import ImageDump
    from kdcache.config import DumpConfig

    cfg = DumpConfig(teacher=teacher_ckpt, out=str(tmp_path / "c.zarr"), activations=["layer1"])
    need = ImageDump(cfg, resolve_device("cpu")).estimate_bytes()
    out = dump_teacher(cfg)
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    assert (2 * 1797 * 10 + 8 * 1797) < need and on_disk < need


def test_resume_refuses_a_partial_store_of_another_schema(teacher_ckpt, tmp_path):
    out = str(tmp_path / "c.zarr")
    s = stores.create_store(out + ".partial")
    s.update_attrs({"schema_version": 1, "complete": False})
    s.close()
    with pytest.raises(KDCacheError, match="schema 1.*--overwrite"):
        dump_teacher(teacher=teacher_ckpt, dataset="digits", out=out, resume=True)
