"""Plain PyTorch: the cached teacher of a split is a function of sample indices; a loop built on it
trains as online KD does; data that is not the cache's is refused before any step."""
import importlib
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import kd_caches
from kdcache.data import load_split
from kdcache.encodings import TopK
from kdcache.errors import KDCacheError
from kdcache.integrations import Distiller, Teacher, WithIndex, evaluate, indexed_loader
from kdcache.models import build_teacher, create_model

feature_cache, topk_cache = kd_caches.feature_cache, kd_caches.topk_cache  # session fixtures


def live(teacher_ckpt):
    model, _ = build_teacher(teacher_ckpt, num_classes=10)
    return model.eval()


def test_teacher_of_a_batch_is_the_live_teacher_on_those_samples(teacher_ckpt, fp32_cache):
    data = load_split("digits", "train")
    teacher = Teacher(fp32_cache, "train", data=data)
    index = torch.tensor([5, 0, 1436, 77])
    x = torch.stack([data.dataset[i][0] for i in index])
    with torch.no_grad():
        expected = live(teacher_ckpt)(x)
    torch.testing.assert_close(teacher(index), expected, rtol=1e-5, atol=1e-5)
    assert len(teacher) == 1437 and teacher.num_classes == 10 and teacher.views == 1


def test_a_plain_loop_from_the_cache_matches_online_kd_step_for_step(teacher_ckpt, fp32_cache):
    data = load_split("digits", "train")
    model = live(teacher_ckpt)

    def run(teacher_of):
        torch.manual_seed(0)
        student = create_model("cnn_tiny", num_classes=10)
        opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
        loader = torch.utils.data.DataLoader(WithIndex(data.dataset), batch_size=64, shuffle=True,
                                             generator=torch.Generator().manual_seed(1))
        losses = []
        for step, (x, y, index) in zip(range(6), loader):
            out = student(x)
            t = teacher_of(x, index)
            loss = torch.lerp(F.cross_entropy(out, y), 16 * F.kl_div(F.log_softmax(out / 4, 1), F.softmax(t / 4, 1),
                                                                     reduction="batchmean"), 0.7)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    def cached_run():
        torch.manual_seed(0)
        student = create_model("cnn_tiny", num_classes=10)
        opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
        loader = torch.utils.data.DataLoader(WithIndex(data.dataset), batch_size=64, shuffle=True,
                                             generator=torch.Generator().manual_seed(1))
        kd = Distiller(Teacher(fp32_cache, "train", data=data), "soft_target", weight=0.7, T=4.0)
        losses = []
        for step, (x, y, index) in zip(range(6), loader):
            loss = kd(student(x), y, index)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    online = run(lambda x, index: model(x).detach())
    cached = cached_run()
    assert cached == pytest.approx(online, rel=1e-5)


def test_indexed_loader_keeps_the_order_and_collate_and_adds_the_index():
    data = load_split("digits", "test")
    loader = torch.utils.data.DataLoader(data.dataset, batch_size=50, shuffle=True,
                                         generator=torch.Generator().manual_seed(3))
    x, y, index = next(iter(indexed_loader(loader)))
    torch.testing.assert_close(x, torch.stack([data.dataset[i][0] for i in index]))
    assert y.tolist() == [int(data.labels[i]) for i in index]
    assert sorted(index.tolist()) != index.tolist()  # the loader's own shuffling, kept

    dicts = torch.utils.data.DataLoader([{"pixel_values": torch.zeros(2), "labels": i % 3} for i in range(8)], batch_size=4)
    batch = next(iter(indexed_loader(dicts)))
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["labels"].tolist() == [0, 1, 2, 0]


def test_a_batch_without_indices_is_refused_with_the_fix(fp32_cache):
    teacher = Teacher(fp32_cache, "train")
    with pytest.raises(KDCacheError, match="WithIndex"):
        teacher(torch.zeros(4, 3, 32, 32))
    with pytest.raises(KDCacheError, match="outside split 'train'"):
        teacher(torch.tensor([0, 1437]))


def test_data_of_another_split_or_order_is_refused(fp32_cache):
    with pytest.raises(KDCacheError, match="1437 samples.*has 360"):
        Teacher(fp32_cache, "train", data=load_split("digits", "test").dataset)
    train = load_split("digits", "train").dataset
    reversed_order = torch.utils.data.Subset(train, list(range(len(train)))[::-1])
    with pytest.raises(KDCacheError, match="another order"):
        Teacher(fp32_cache, "train", data=reversed_order)
    with pytest.raises(KDCacheError, match="fingerprint mismatch"):
        Teacher(fp32_cache, "train", data=load_split("fake:size=1437", "train"))


def test_activations_by_name_and_top_k_targets(teacher_ckpt, feature_cache, topk_cache):
    data = load_split("digits", "train")
    index = torch.tensor([3, 9])
    x = torch.stack([data.dataset[i][0] for i in index])
    from kdcache.hooks import capture

    model = live(teacher_ckpt)
    with torch.no_grad(), capture(model, ["layer3"]) as acts:
        model(x)
    teacher = Teacher(feature_cache, "train", activations=["layer3"])
    torch.testing.assert_close(teacher.activations(index)["layer3"], acts["layer3"], rtol=1e-5, atol=1e-5)
    with pytest.raises(KDCacheError, match="no activation 'layer2'.*--activation layer2"):
        Teacher(feature_cache, "train", activations=["layer2"])

    top_teacher = Teacher(topk_cache, "train")
    top = top_teacher(index)
    assert isinstance(top, TopK) and top.indices.shape == (2, 3)
    dense_only = Distiller(top_teacher, lambda **kw: kw["teacher_pred"].sum())  # a fasterai-style loss
    with pytest.raises(KDCacheError, match="top-k"):
        dense_only(torch.zeros(2, 10), torch.tensor([0, 1]), index)
    parts = Distiller(top_teacher, "soft_target")(torch.zeros(2, 10, requires_grad=True), torch.tensor([0, 1]), index)
    assert torch.isfinite(parts["kd_loss"])


def test_views_are_replayed_with_the_rows_of_their_targets(teacher_ckpt, view_cache):
    data = load_split("digits", "train")
    teacher = Teacher(view_cache, "train")
    dataset = teacher.indexed(data, seed=0)
    x, y, row = dataset[10]
    assert row in (20, 21)  # sample 10's views are rows 2 * 10 + v
    with torch.no_grad():
        expected = live(teacher_ckpt)(x[None])
    torch.testing.assert_close(teacher(torch.tensor([row])), expected, rtol=1e-5, atol=1e-5)


def test_evaluate_reports_top1_and_agreement_with_the_cached_teacher(teacher_ckpt, fp32_cache):
    test = load_split("digits", "test")
    metrics = evaluate(live(teacher_ckpt), test, teacher=Teacher(fp32_cache, "test"))
    assert metrics["agreement"] == 100.0 and metrics["top1"] > 50


@pytest.mark.parametrize("framework, extra", [("fastai", "fastai"), ("lightning", "lightning"), ("hf", "hf")])
def test_a_framework_that_is_not_installed_names_its_extra(framework, extra, monkeypatch):
    module = importlib.import_module(f"kdcache.integrations.{framework}")
    entry = {"fastai": lambda: module.indexed(None),
             "lightning": lambda: module.indexed(object()),
             "hf": lambda: module.DistillationTrainer}[framework]
    for cached in ("_callback_class", "_trainer_class"):
        if hasattr(module, cached):
            monkeypatch.setattr(module, cached, getattr(module, cached).__wrapped__)  # no class built earlier
    for name in ("fastai.callback.core", "lightning.pytorch", "transformers"):
        monkeypatch.setitem(sys.modules, name, None)  # what an absent package looks like to import
    with pytest.raises(KDCacheError, match=rf"pip install 'kdcache\[{extra}\]'") as e:
        entry()
    assert "\n" not in str(e.value)
