"""Views that replay: a view cache holds the teacher's outputs on exactly the inputs the student trains on."""
import numpy as np
import pytest
import torch

from helpers import views as helper
from kdcache import augment, dump_teacher, open_cache, train_student
from kdcache import store as stores
from kdcache.config import TrainConfig
from kdcache.data import load_split
from kdcache.errors import KDCacheError
from kdcache.store.records import rows_written
from helpers.crashing import Exploding
from helpers.interrupted import kill_in_epoch

FAST = dict(dataset="digits", epochs=1, batch_size=128)
ON_TEST = dict(train_split="test", test_split="test")  # 360 samples: training on the small split keeps tests fast


@pytest.fixture(scope="module")
def mixed_cache(teacher_ckpt, tmp_path_factory) -> str:
    """2 cutmixed `digits` views of every sample of the test split (the one the tests here train on)."""
    return dump_teacher(teacher=teacher_ckpt, dataset="digits", splits=["test"], augment_splits=["test"],
                        out=str(tmp_path_factory.mktemp("m") / "m.zarr"), dtype="float32", views=2,
                        augment="digits", mix="cutmix")


def test_view_seeds_are_pinned_integers_whatever_the_process():
    # a cache's views are named by these numbers: changing the derivation orphans every cache made before
    assert int(augment.view_seeds(0, 0, 0)) == 16321491304643971414
    assert int(augment.view_seeds(7, 1436, 3)) == 3154336665925143889
    table = augment.view_seeds(3, np.arange(5)[:, None], np.arange(4))
    assert table.shape == (5, 4) and table.dtype == np.uint64
    assert all(int(table[i, v]) == int(augment.view_seeds(3, i, v)) for i in range(5) for v in range(4))


def test_view_choice_is_a_function_of_seed_epoch_and_sample():
    assert [augment.choose_view(0, e, 5, 4, "cycle") for e in range(8)] == [0, 1, 2, 3] * 2
    drawn = [augment.choose_view(0, e, 5, 4) for e in range(64)]
    assert set(drawn) == {0, 1, 2, 3} and drawn == [augment.choose_view(0, e, 5, 4) for e in range(64)]
    assert augment.choose_view(0, 7, 5, None) == 7  # no stored views: a fresh view every epoch


def test_making_a_view_leaves_the_callers_random_streams_where_they_were():
    import random

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    expected = torch.rand(1), np.random.rand(), random.random()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    with augment.seeded(12345):
        torch.rand(3), np.random.rand(3), random.random()
    assert (torch.rand(1), np.random.rand(), random.random()) == expected


CASES = {  # (preset, views, mix)
    "cifar": ("cifar", 2, None), "imagenet": ("imagenet", 2, None), "digits": ("digits", 2, None),
    "none+mixup": ("none", 2, "mixup"), "custom": ("helpers.views:noisy_shift", 2, None),
    "digits+cutmix": ("digits", 2, "cutmix"),
}


@pytest.mark.parametrize("case", CASES)
def test_replayed_inputs_are_bit_for_bit_the_inputs_the_teacher_saw(case, tmp_path):
    preset, views, mix = CASES[case]
    helper.SEEN.clear()
    out = dump_teacher(teacher="helpers.views:recorder", random_teacher=True, dataset="digits", splits=["test"],
                       augment_splits=["test"],
                       out=str(tmp_path / "c.zarr"), views=views, augment=preset, mix=mix, batch_size=64)
    data = load_split("digits", "test")
    seen = torch.cat(helper.SEEN)[-len(data) * views:]  # [N * V, C, H, W] in row order, after the shape probe
    named = preset if ":" in preset else None  # a store's own module:callable runs only when the user names it
    replay = augment.training_views(TrainConfig(students=["x"], cache=out, train_split="test", augment=named), data,
                                    open_cache(out))
    assert replay.count == views and replay.per_view
    for epoch in range(2):  # the student's path: the epoch's view of each sample, and the row of its targets
        replay.set_epoch(epoch)
        for i in range(len(data)):
            x, y, row = replay[i]
            assert torch.equal(x, seen[row]), (case, epoch, i, row)
            assert row // views == i
    assert not torch.equal(seen[0], data.dataset[0][0])  # the teacher did see augmented inputs
    if mix:
        assert y.shape == (10,) and y.sum().item() == pytest.approx(1.0)  # the mixed label


def test_training_from_a_view_cache_matches_online_kd_on_the_same_views_step_for_step(teacher_ckpt, view_cache, tmp_path):
    kd = dict(students=["cnn_tiny"], alpha=0.7, alpha_schedule="linear", **FAST)
    cached = train_student(cache=view_cache, out=str(tmp_path / "a"), **kd)
    online = train_student(teacher=teacher_ckpt, augment="digits", views=2, out=str(tmp_path / "b"), **kd)
    a, b = cached[0]["step_losses"], online[0]["step_losses"]
    assert len(a) == len(b) == 12
    for step, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(y)), (step, x, y)
    # and the student really saw augmented views: plain training on clean inputs goes elsewhere
    clean = train_student(teacher=teacher_ckpt, out=str(tmp_path / "c"), **kd)
    assert clean[0]["step_losses"][1:] != a[1:]


def test_mixed_views_from_a_cache_match_online_kd_mixing_the_same_partners(teacher_ckpt, mixed_cache, tmp_path):
    kd = dict(students=["cnn_tiny"], alpha=0.5, dataset="digits", epochs=2, batch_size=64, **ON_TEST)
    cached = train_student(cache=mixed_cache, out=str(tmp_path / "a"), **kd)
    online = train_student(teacher=teacher_ckpt, augment="digits", views=2, mix="cutmix", out=str(tmp_path / "b"), **kd)
    a, b = cached[0]["step_losses"], online[0]["step_losses"]
    assert len(a) == len(b) == 12
    for step, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(y)), (step, x, y)
    with stores.open_store(mixed_cache) as s:
        partner, lam, box = s.read("test/mix_partner"), s.read("test/mix_lambda"), s.read("test/mix_box")
    assert partner.shape == lam.shape == (360, 2) and box.shape == (360, 2, 4)
    assert (partner != np.arange(360)[:, None]).all() and ((lam > 0) & (lam <= 1)).all()


def test_the_replay_check_stops_training_when_the_transform_changed(view_cache, tmp_path, monkeypatch):
    from torchvision.transforms import v2

    monkeypatch.setitem(augment.PRESETS, "digits", lambda size, fill: v2.RandomAffine(degrees=20, fill=fill))
    with pytest.raises(KDCacheError, match=r"replay check failed: train sample 0 view 0 .* the transform changed "
                                           r"\(dumped with RandomAffine\(degrees=\[-10.0, 10.0\].*now RandomAffine"
                                           r"\(degrees=\[-20.0, 20.0\]"):
        train_student(cache=view_cache, students=["cnn_tiny"], out=str(tmp_path / "o"), **FAST)
    assert not (tmp_path / "o").exists()
    from kdcache.verify import verify_store

    assert [p[:40] for p in verify_store(view_cache)] == ["replay check failed: train sample 0 view"]


def test_the_replay_check_names_changed_libraries_when_the_transform_reads_the_same(view_cache, tmp_path, monkeypatch):
    dumped = augment.PRESETS["digits"]

    class Drifted:  # the same transform description, other pixels: what a library upgrade can do
        def __init__(self, size, fill):
            self.inner = dumped(size, fill)

        def __call__(self, x):
            return self.inner(x) + 1e-6

        def __repr__(self):
            return repr(self.inner)

    monkeypatch.setitem(augment.PRESETS, "digits", Drifted)
    monkeypatch.setattr(augment, "library_versions", lambda: {"torch": torch.__version__, "torchvision": "99.0",
                                                              "numpy": np.__version__})
    with pytest.raises(KDCacheError, match=r"the libraries that run the transform changed \(torchvision .* -> 99.0\)"):
        train_student(cache=view_cache, students=["cnn_tiny"], out=str(tmp_path / "o"), **FAST)


def test_mixing_from_a_cache_dumped_without_it_is_refused_not_approximated(fp32_cache, tmp_path):
    with pytest.raises(KDCacheError, match="unmixed inputs.*dump the cache with --mix cutmix"):
        train_student(cache=fp32_cache, students=["cnn_tiny"], mix="cutmix", out=str(tmp_path / "o"), **FAST)


def test_a_view_cache_brings_its_own_views_and_refuses_others(view_cache, tmp_path):
    with pytest.raises(KDCacheError, match="--views 4: cache .* replays the views it was dumped with"):
        train_student(cache=view_cache, students=["cnn_tiny"], views=4, out=str(tmp_path / "o"), **FAST)
    with pytest.raises(KDCacheError, match="--augment cifar"):
        train_student(cache=view_cache, students=["cnn_tiny"], augment="cifar", out=str(tmp_path / "o"), **FAST)


def test_a_student_augmenting_over_a_clean_cache_reads_one_target_per_sample(fp32_cache):
    data = load_split("digits", "train")
    cfg = TrainConfig(students=["x"], cache=fp32_cache, augment="digits")
    views = augment.training_views(cfg, data, open_cache(fp32_cache))  # the inconsistent case, for comparison
    x, y, row = views[17]
    assert row == 17 and not views.per_view and not torch.equal(x, data.dataset[17][0])


def test_replay_is_the_same_in_dataloader_workers(mixed_cache):
    # other processes: view seeds are the pinned integers above, whatever the process computes them
    cfg, data = TrainConfig(students=["x"], cache=mixed_cache, **ON_TEST), load_split("digits", "test")
    views = augment.training_views(cfg, data, open_cache(mixed_cache))
    views.set_epoch(3)
    subset = torch.utils.data.Subset(views, range(96))
    here = [torch.cat(t) for t in zip(*torch.utils.data.DataLoader(subset, batch_size=32))]
    workers = [torch.cat(t) for t in zip(*torch.utils.data.DataLoader(subset, batch_size=32, num_workers=2))]
    assert all(torch.equal(a, b) for a, b in zip(here, workers))  # inputs, mixed labels, rows


def test_killed_training_on_views_resumes_to_the_same_metrics(mixed_cache, tmp_path, monkeypatch):
    opts = dict(cache=mixed_cache, students=["cnn_tiny"], dataset="digits", epochs=2, batch_size=64, **ON_TEST)
    train_student(out=str(tmp_path / "full"), **opts)
    revive = kill_in_epoch(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="killed"):
        train_student(out=str(tmp_path / "run"), **opts)
    revive()
    train_student(out=str(tmp_path / "run"), resume=True, **opts)

    def metrics(folder):
        import json

        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in open(folder / "metrics.jsonl")]

    assert metrics(tmp_path / "run" / "cnn_tiny") == metrics(tmp_path / "full" / "cnn_tiny")


def test_an_interrupted_view_dump_resumes_to_the_same_store(teacher_ckpt, tmp_path, monkeypatch):
    import kdcache.dump as dump_mod

    small = dict(dataset="digits", splits=["test"], augment_splits=["test"], dtype="float32", views=2, augment="cifar",
                 mix="mixup", chunk_bytes=32 * 80, batch_size=40)  # 32-sample chunks of [2, 10] float32 logits
    full = dump_teacher(teacher=teacher_ckpt, out=str(tmp_path / "full.zarr"), **small)
    real_load = dump_mod.load_split

    def crashing(name, split, root=None):
        data = real_load(name, split, root=root)
        data.dataset = Exploding(data.dataset, at=250)
        return data

    out = str(tmp_path / "c.zarr")
    monkeypatch.setattr(dump_mod, "load_split", crashing)
    with pytest.raises(RuntimeError, match="simulated"):
        dump_teacher(teacher=teacher_ckpt, out=out, **small)
    with stores.open_store(out + ".partial") as s:
        done = rows_written(s, "test")
    assert 0 < done <= 250 and done % 32 == 0  # the records' chunks follow the logits': progress is kept
    monkeypatch.setattr(dump_mod, "load_split", real_load)
    dump_teacher(teacher=teacher_ckpt, out=out, resume=True, **small)
    with stores.open_store(out) as a, stores.open_store(full) as b:
        names = a.array_names("test")
        assert set(names) >= {"logits", "view_seeds", "view_digests", "mix_partner", "mix_lambda", "mix_box"}
        for name in names:
            assert np.array_equal(a.read(f"test/{name}"), b.read(f"test/{name}")), name


def test_inspect_shows_views_and_what_a_view_costs(view_cache, capsys):
    from kdcache.cli import main

    main(["inspect", view_cache])
    out = capsys.readouterr().out
    assert "views      2 per sample of train: --augment digits" in out
    assert "1437 samples x 2 views" in out and "teacher top-1 over its 2 views" in out and "B/view" in out
