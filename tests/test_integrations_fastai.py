"""fastai / fasterai: the cached callback trains as fasterai's own online KnowledgeDistillationCallback
does, step for step, with the same teacher, seed and data order; loaders without indices are refused."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: nothing here may reach the network

import functools  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fastai.callback.core import Callback  # noqa: E402
from fastai.callback.training import ShortEpochCallback  # noqa: E402
from fastai.data.core import DataLoaders  # noqa: E402
from fastai.learner import Learner  # noqa: E402
from fastai.optimizer import SGD  # noqa: E402
from fasterai.core.schedule import lin  # noqa: E402
from fasterai.distill.distillation_callback import KnowledgeDistillationCallback as OnlineKD  # noqa: E402
from fasterai.distill.losses import Attention, SoftTarget  # noqa: E402

from helpers import kd_caches  # noqa: E402
from kdcache.data import load_split  # noqa: E402
from kdcache.errors import KDCacheError  # noqa: E402
from kdcache.integrations import fastai as kdfastai  # noqa: E402
from kdcache.models import build_teacher, create_model  # noqa: E402

feature_cache = kd_caches.feature_cache  # session fixture


class StepLosses(Callback):
    """The loss of every training step and validation batch, after every callback changed it."""

    order = 100

    def __init__(self):
        super().__init__()
        self.steps, self.valid = [], []

    def after_batch(self):
        (self.steps if self.training else self.valid).append(self.learn.loss.item())


def loaders():
    random.seed(0)  # a fastai loader draws its shuffling stream from `random` when it is made
    return DataLoaders.from_dsets(load_split("digits", "train").dataset, load_split("digits", "test").dataset,
                                  bs=64, num_workers=0)


def fit(dls, callback):
    torch.manual_seed(0)
    losses = StepLosses()
    learn = Learner(dls, create_model("cnn_tiny", num_classes=10), loss_func=F.cross_entropy, opt_func=SGD, lr=0.05,
                    cbs=[callback, losses, ShortEpochCallback(0.35)])  # 9 of 22 steps and 4 of 6 validation batches run
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)
    return losses.steps, losses.valid


def teacher(ckpt):
    return build_teacher(ckpt, num_classes=10)[0]


def same(cached, online, rel=1e-5):
    steps, valid = cached
    online_steps, online_valid = online
    assert len(steps) == len(online_steps) == 8  # the last one ends its loop (ShortEpochCallback) before it is recorded
    assert steps == pytest.approx(online_steps, rel=rel)
    assert len(valid) == 3 and valid == pytest.approx(online_valid, rel=rel)  # distilled from the cache's test split


def test_soft_target_from_the_cache_equals_fasterai_online_per_step(teacher_ckpt, fp32_cache):
    online = fit(loaders(), OnlineKD(teacher(teacher_ckpt), SoftTarget, weight=0.5))
    cached = fit(kdfastai.indexed(loaders()), kdfastai.KnowledgeDistillationCallback(fp32_cache, SoftTarget, weight=0.5))
    same(cached, online)


def test_attention_on_a_cached_feature_map_equals_fasterai_online_per_step(teacher_ckpt, feature_cache):
    online = fit(loaders(), OnlineKD(teacher(teacher_ckpt), Attention, "model.layer3", "layer3", weight=0.5))
    cached = fit(kdfastai.indexed(loaders()),
                 kdfastai.KnowledgeDistillationCallback(feature_cache, Attention, "model.layer3", "layer3", weight=0.5))
    same(cached, online)


def test_kdcache_loss_and_schedule_names_equal_fasterai_objects(teacher_ckpt, fp32_cache):
    online = fit(loaders(), OnlineKD(teacher(teacher_ckpt), functools.partial(SoftTarget, T=4), weight=0.8, schedule=lin))
    cached = fit(kdfastai.indexed(loaders()), kdfastai.KnowledgeDistillationCallback(
        fp32_cache, "soft_target", weight=0.8, schedule="linear", T=4.0))
    # two float32 routes to one KL (kdcache's per-row sum, torch's kl_div): 20 steps of SGD carry
    # their ~1e-7 differences to ~2e-5 of the loss (measured); a wrong T or schedule changes it by percents
    same(cached, online, rel=1e-4)


def test_loaders_without_indices_are_refused_before_the_first_step(fp32_cache):
    callback = kdfastai.KnowledgeDistillationCallback(fp32_cache, SoftTarget)
    with pytest.raises(KDCacheError) as e:
        fit(loaders(), callback)
    assert "indexed(dls)" in str(e.value) and "\n" not in str(e.value)


def test_loaders_of_other_data_are_refused(fp32_cache):
    swapped = kdfastai.indexed(DataLoaders.from_dsets(load_split("digits", "test").dataset,
                                                      load_split("digits", "test").dataset, bs=64, num_workers=0))
    with pytest.raises(KDCacheError, match="1437 samples.*has 360"):
        fit(swapped, kdfastai.KnowledgeDistillationCallback(fp32_cache, SoftTarget))
