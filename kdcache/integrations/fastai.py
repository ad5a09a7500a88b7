"""fastai / fasterai: fasterai's KnowledgeDistillationCallback with the live teacher replaced by a cache.

    from kdcache.integrations.fastai import KnowledgeDistillationCallback, indexed
    dls = indexed(dls)  # batches also carry each sample's index, the cache's row
    learn = Learner(dls, student, cbs=KnowledgeDistillationCallback("cache.zarr", SoftTarget, weight=0.5))

Same signature and rule as fasterai 0.4 (`loss`, `activations_student` / `activations_teacher` by
dotted path, `weight`, `schedule`; `loss = lerp(loss, kd, weight * progress)` after each loss),
with `teacher` a cache: its logits and activations for the batch are one gather by index.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from kdcache.errors import KDCacheError
from kdcache.imports import require
from kdcache.integrations.plain import Distiller, Teacher, check_data, yields_index

__all__ = ["KnowledgeDistillationCallback", "indexed"]


def _fastai_core():
    return require("fastai.callback.core", "fastai", "kdcache.integrations.fastai")


class _Appended:
    """Sample i as (*the dataset's sample, i): a fastai tuple of any length, then its index."""

    yields_index = True  # plain.yields_index: its samples end with their row in the cache

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return (*item, i) if isinstance(item, tuple) else (item, i)


def indexed(dls):
    """The same DataLoaders (transforms, batch size, shuffling stream, inputs) whose batches end with
    the samples' indices; the callback takes them off the batch before the loss sees it."""
    _fastai_core()
    loaders = []
    for dl in dls.loaders:
        new = dl.new(_Appended(dl.dataset))
        new.rng.setstate(dl.rng.getstate())  # the order this loader would have shuffled into
        loaders.append(new)
    out = type(dls)(*loaders, path=dls.path)
    if getattr(dls, "_device", None) is not None:
        out.device = dls.device
    return out


def _carries_index(dl) -> bool:
    return yields_index(getattr(dl, "dataset", None))


def _source(dataset):
    """The user's dataset inside an index wrapper, for the data check."""
    return getattr(dataset, "dataset", dataset)


def _take_index(learn):
    """The batch's indices, taken off `learn.yb` once per batch (several KD callbacks share them);
    None where the loader carries none (a prediction on unindexed data)."""
    if getattr(learn, "_kdcache_batch", None) is learn.xb:
        return learn._kdcache_index
    index = None
    if _carries_index(learn.dl) and len(learn.yb):
        index, learn.yb = learn.yb[-1], learn.yb[:-1]
    learn._kdcache_batch, learn._kdcache_index = learn.xb, index
    return index


@functools.cache
def _callback_class():
    Callback = _fastai_core().Callback

    class CachedKnowledgeDistillation(Callback):
        """fasterai's KnowledgeDistillationCallback, the teacher read from a cache (see the module doc)."""

        def __init__(self, teacher, loss, activations_student=None, activations_teacher=None, weight: float = 0.5,
                     schedule=None, *, split: str = "train", valid_split: str | None = "test", T: float = 4.0):
            super().__init__()
            students = [s.removeprefix("model.") for s in _names(activations_student)]  # fasterai's paths start at the Learner
            if not isinstance(teacher, Teacher):
                teacher = Teacher(teacher, split, activations=_names(activations_teacher))
            self.kd = Distiller(teacher, loss, activations_student=students, activations_teacher=activations_teacher,
                                weight=weight, schedule=schedule, T=T)
            self.valid_split, self.valid_teacher = valid_split, None
            self.current_weight = weight
            self._hooks, self._features = contextlib.ExitStack(), {}

        def __call__(self, event_name):
            try:
                return super().__call__(event_name)
            except KDCacheError as e:  # fastai prefixes the callback and event on a new line: keep one line
                raise KDCacheError(str(e.args[0]).split("\n\t", 1)[-1]) from None

        def before_fit(self):
            train = self.dls.train
            if not _carries_index(train):
                raise KDCacheError("the training batches carry no sample index, which the cache is joined by; "
                                   "pass the DataLoaders through kdcache.integrations.fastai.indexed(dls)")
            teacher = self.kd.teacher
            check_data(teacher.cache, teacher.split, _source(train.dataset))
            valid = self.dls.valid if len(self.dls.loaders) > 1 else None
            if (self.valid_split and valid is not None and _carries_index(valid)
                    and teacher.cache.has_split(self.valid_split)):
                self.valid_teacher = Teacher(teacher.cache, self.valid_split, activations=self.kd.activations_teacher,
                                             data=_source(valid.dataset), device=teacher.device)
            self._hooks.close()
            self._features = self._hooks.enter_context(self.kd.watch(self.learn.model))

        def before_batch(self):
            self._index = _take_index(self.learn)
            self.current_weight = self.kd.weight_at(self.pct_train)

        def after_loss(self):
            teacher = self.kd.teacher if self.training else self.valid_teacher
            if self._index is None or teacher is None:
                return  # validation without a cached split, or a prediction on other data: the loss as it is
            kd = self.kd.kd_loss(self.pred, self.y, self._index, self._features, teacher)
            self.learn.loss_grad = torch.lerp(self.learn.loss_grad, kd.to(self.learn.loss_grad.dtype),
                                             self.current_weight)
            self.learn.loss = self.learn.loss_grad.clone()

        def after_batch(self):
            self._features.clear()  # as fasterai: no activations held between batches

        def after_fit(self):
            self._hooks.close()

    return CachedKnowledgeDistillation


def _names(names) -> list:
    if names is None:
        return []
    return [names] if isinstance(names, str) else list(names)


def KnowledgeDistillationCallback(teacher, loss, activations_student=None, activations_teacher=None,
                                  weight: float = 0.5, schedule=None, *, split: str = "train",
                                  valid_split: str | None = "test", T: float = 4.0):
    """fasterai's callback with `teacher` a cache (path, Cache or Teacher) instead of a model.

    loss: a fasterai loss (SoftTarget, Attention, FitNet, ...), any callable of its protocol, or a
    kdcache loss name ("soft_target" at temperature T reads top-k caches). activations_student:
    dotted paths of the student as fasterai writes them (from the Learner: "model.layer3"; "layer3"
    works too); activations_teacher: names of activations stored in the cache (fasterai's feature
    losses take full maps). schedule: a fasterai Schedule or a kdcache schedule name; the weight at
    each batch is weight * schedule.progress(pct_train), as in fasterai. Training batches read split
    `split`; validation batches `valid_split` when the cache holds it (else their loss is the task loss).
    """
    return _callback_class()(teacher, loss, activations_student, activations_teacher, weight, schedule,
                             split=split, valid_split=valid_split, T=T)
