"""Plain PyTorch: a cache's teacher as a function of sample indices, for any training loop.

`Teacher(cache, split)` gathers a batch's targets by index (`teacher(index) -> logits`); `WithIndex`
and `indexed_loader` make data yield those indices; `Distiller` turns them into one step's KD loss
by fasterai's rule. The fastai, Lightning and Hugging Face integrations are built on these three.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.augment import TrainViews
from kdcache.data import SplitData, WithIndex, load_split
from kdcache.encodings import TopK
from kdcache.errors import KDCacheError
from kdcache.targets import Cache, choose_place, open_cache

__all__ = ["Teacher", "WithIndex", "Distiller", "evaluate", "indexed_loader", "yields_index"]

LABEL_PROBES = 16  # samples whose labels are compared with the cache's when a dataset has no label list


class Teacher:
    """The cached teacher of one split: `teacher(index)` -> logits [B, C] float32 on `device`, or a
    TopK (values, indices [B, K], the row's logsumexp and tail mass) from a top-k cache.

    index: [B] integer rows of the split, as `WithIndex` yields them (the sample index), or, for a
    cache that stores K augmented views per sample, as `teacher.indexed(data)` yields them (the
    replayed view's row, `sample * K + view`). `teacher.activations(index)` gives the activations
    named in `activations` ({name: [B, ...] float32}, in the form they were stored); `gather(index)`
    both. The targets are decoded once into one table in memory (on the GPU when `device` is a GPU
    and they fit): a batch is one gather, never a store read.

    `data`, when given, is checked against the split before anything else: a SplitData or dataset
    name by its fingerprint, any other dataset by its length and labels. A cache made from other
    data is a KDCacheError, not a silent mismatch.
    """

    def __init__(self, cache, split: str = "train", *, data=None, activations=(), device="cpu"):
        self.device = torch.device(device)
        self.cache = cache if isinstance(cache, Cache) else open_cache(cache, device=self.device)
        self.split = split
        if not self.cache.has_split(split):
            self.cache.targets(split)  # the missing-split error, naming the splits it has
        stored = {n: a["form"] for n, a in self.cache.attrs.get("activations", {}).items()}
        self.forms = {}
        for name in activations:
            if name not in stored:
                raise KDCacheError(f"cache '{self.cache.path}' has no activation '{name}' (it holds "
                                   f"{', '.join(stored) or 'none'}); dump it with kdcache dump-teacher --activation {name}")
            self.forms[name] = stored[name]
        if data is not None:
            check_data(self.cache, split, data)
        names = list(self.forms)
        place = choose_place("auto", self.cache.nbytes(split, names), self.device)
        if place == "stream":
            raise KDCacheError(f"the targets of split '{split}' of '{self.cache.path}' do not fit in memory, and "
                               "Teacher gathers by random index; use kdcache train-student --targets-in stream, or a "
                               "compact cache (kdcache convert --topk K, or reduced --activation forms)")
        self.targets = self.cache.targets(split, activations=names, place=place)  # SplitTargets
        self.rows = len(self.targets) * self.targets.views

    def __len__(self) -> int:
        """Samples in the split (rows are samples * views)."""
        return len(self.targets)

    def __repr__(self) -> str:
        return (f"Teacher({self.cache.path!r}, split={self.split!r}, {len(self)} samples x {self.views} views, "
                f"{self.num_classes} classes, activations={list(self.forms)})")

    @property
    def num_classes(self) -> int:
        return self.cache.num_classes

    @property
    def views(self) -> int:
        return self.targets.views

    @property
    def labels(self) -> torch.Tensor:
        """The split's labels as stored, [N] int64."""
        return self.targets.labels

    def __call__(self, index) -> torch.Tensor | TopK:
        return self.gather(index)["logits"]

    def activations(self, index) -> dict:
        return self.gather(index)["activations"]

    def gather(self, index) -> dict:
        """{"logits": [B, C] float32 or TopK, "activations": {name: [B, ...] float32}} on `device`."""
        out = self.targets.gather(self._rows(index), list(self.forms))
        return {"logits": out["logits"].to(self.device),
                "activations": {n: t.to(self.device) for n, t in out["activations"].items()}}

    def _rows(self, index) -> torch.Tensor:
        index = torch.as_tensor(index)
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool or index.dim() != 1:
            raise KDCacheError(f"the teacher takes the batch's sample indices, [B] integers, but got "
                               f"{index.dtype} {list(index.shape)}; wrap the dataset in WithIndex (or "
                               "indexed_loader(loader)) so that each batch carries them: for x, y, index in loader")
        if index.device.type == "cpu" and len(index) and (int(index.min()) < 0 or int(index.max()) >= self.rows):
            raise KDCacheError(f"sample index {int(index.max()) if int(index.max()) >= self.rows else int(index.min())} "
                               f"is outside split '{self.split}' of '{self.cache.path}' ({self.rows} rows); "
                               "the loader is not over the data this cache was dumped from")
        return index

    def predictions(self) -> torch.Tensor:
        """The teacher's class for every sample (its first view), [N] int64 on the CPU."""
        return self.targets.predictions()

    def indexed(self, data, *, seed: int = 0, policy: str = "random", verify: int = 8) -> torch.utils.data.Dataset:
        """The dataset to train on with this teacher, yielding (x, y, index): WithIndex(data) for a cache of
        one view per sample; for a cache of K augmented views, the views the teacher saw, replayed (each
        epoch one view per sample, chosen by `seed`, the epoch and `policy`, random or cycle; call
        `.set_epoch(e)` on it each epoch), first checked by regenerating `verify` views."""
        if self.views == 1 or not (self.cache.attrs.get("augment") or {}).get("splits"):
            return WithIndex(_dataset_of(data))
        from kdcache import augment
        from kdcache import store as stores

        split_data = _split_data(data, self.split)
        check_data(self.cache, self.split, split_data)
        recorded = self.cache.attrs["augment"]
        with stores.open_store(self.cache.path) as store:
            recipe = augment.stored_recipe(store, split_data, recorded)
        augment.check_replay(recipe, recipe.stored["view_digests"], verify, recorded, self.cache.splits[self.split],
                             self.split)
        return TrainViews(recipe, count=recorded["views"], policy=policy, seed=seed, per_view=True)


def _dataset_of(data):
    return data.dataset if isinstance(data, SplitData) else data


def _split_data(data, split: str) -> SplitData:
    if isinstance(data, SplitData):
        return data
    if isinstance(data, str):
        return load_split(data, split)
    raise KDCacheError("replaying a cache's views needs the dataset it was dumped from by name or as SplitData "
                       "(load_split(NAME, split)); a bare dataset has no recipe to replay")


def check_data(cache: Cache, split: str, data) -> None:
    """Refuse data that is not what split `split` of `cache` was dumped from: a SplitData or dataset
    name by fingerprint, a dataset (or anything with `dataset`) by its length and labels."""
    if isinstance(data, str):
        data = load_split(data, split)
    if isinstance(data, SplitData):
        if data.split != split:
            raise KDCacheError(f"data is split '{data.split}' but the teacher reads split '{split}' of "
                               f"'{cache.path}'; give the {split} split")
        cache.check_dataset(data)
        return
    recorded = cache.splits[split].get("dataset", {})
    n = recorded.get("length")
    where = f"split '{split}' of cache '{cache.path}' was dumped from {recorded.get('name')} ({n} samples)"
    if not hasattr(data, "__len__"):
        raise KDCacheError(f"{where}, and a dataset without a length cannot be joined to it by index; "
                           "give a map-style dataset")
    if len(data) != n:
        raise KDCacheError(f"{where}, but this dataset has {len(data)}; use the data the cache was dumped from")
    stored = cache.targets(split, activations=[]).labels.numpy()
    labels = _label_list(data)
    if labels is not None and len(labels) == n:
        bad = np.flatnonzero(labels != stored)
        if len(bad):
            raise KDCacheError(f"{where}, but sample {bad[0]} has label {labels[bad[0]]} where the cache has "
                               f"{stored[bad[0]]}: another dataset or another order; use the dataset in the order it was dumped")
        return
    for i in np.linspace(0, n - 1, num=min(LABEL_PROBES, n), dtype=np.int64):
        y = label_of(data[int(i)])
        if y is not None and int(y) != stored[i]:
            raise KDCacheError(f"{where}, but sample {i} has label {int(y)} where the cache has {stored[i]}: another "
                               "dataset or another order; use the dataset in the order it was dumped")


def label_of(item) -> int | None:
    """The class of one sample, (x, y, ...) or a dict with "labels" or "label"; None for a soft label."""
    y = item.get("labels", item.get("label")) if isinstance(item, dict) else item[1]
    if y is None:
        return None
    y = torch.as_tensor(y)
    return int(y) if y.numel() == 1 and not y.dtype.is_floating_point else None


def _label_list(data) -> np.ndarray | None:
    """The dataset's labels without reading its samples, where it keeps them as a list."""
    for attr in ("targets", "labels"):
        values = getattr(data, attr, None)
        if values is not None and not callable(values):
            try:
                return np.asarray(values, dtype=np.int64).reshape(-1)
            except (TypeError, ValueError):
                return None
    return None


# --- data that carries the index -----------------------------------------------------------

def yields_index(dataset) -> bool:
    """Whether `dataset`'s samples end with their row in the cache (WithIndex, replayed views, _Indexed,
    or a wrapper that says so with a `yields_index` attribute)."""
    return isinstance(dataset, (WithIndex, TrainViews, _Indexed)) or bool(getattr(dataset, "yields_index", False))


class _Indexed(torch.utils.data.Dataset):
    """Sample i as (the dataset's own sample, i): for loaders whose samples are not (x, y) pairs."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i], i


class IndexCollate:
    """The loader's own collate for the samples, the indices stacked beside them: a tuple batch gets
    the index as its last item, a dict batch an "index" key."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items):
        batch = self.collate([item for item, _ in items])
        index = torch.tensor([i for _, i in items], dtype=torch.int64)
        if isinstance(batch, dict):
            return {**batch, "index": index}
        if isinstance(batch, (tuple, list)):
            return (*batch, index)
        return batch, index


def indexed_loader(loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
    """The same loader (sampler, batch size, workers, collate) whose batches also carry the sample
    indices: `(x, y, index)` for a loader of `(x, y)`, an "index" key for a loader of dicts."""
    if isinstance(loader.dataset, torch.utils.data.IterableDataset):
        raise KDCacheError("an iterable-style dataset has no sample indices to join the cache by; use a map-style "
                           "dataset in the order the cache was dumped from")
    kwargs = dict(num_workers=loader.num_workers, collate_fn=IndexCollate(loader.collate_fn),
                  pin_memory=loader.pin_memory, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                  generator=loader.generator, persistent_workers=loader.persistent_workers,
                  multiprocessing_context=loader.multiprocessing_context)
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    if loader.batch_size is None:  # a batch_sampler of its own
        kwargs["batch_sampler"] = loader.batch_sampler
    else:
        kwargs.update(sampler=loader.sampler, batch_size=loader.batch_size, drop_last=loader.drop_last)
    return torch.utils.data.DataLoader(_Indexed(loader.dataset), **kwargs)


# --- one step's loss -------------------------------------------------------------------------

class Distiller:
    """One step's KD loss from the cache, by fasterai's rule: `loss = lerp(task_loss, kd_loss, w)`,
    i.e. (1 - w) task_loss + w kd_loss, with w = weight * schedule(progress).

    loss: a kdcache loss name, on logits (soft_target, logits, mutual, dkd, nkd; at temperature `T`)
    or on activation pairs (fitnet, attention, activation_boundaries, similarity, pkt, rkd; summed
    over pairs, shapes as stored: no adapters), or a fasterai loss or any callable of its protocol,
    `loss(pred=, teacher_pred=, fm_s=, fm_t=, target=)` (fasterai.distill.SoftTarget, FitNet, ...).
    activations_student / activations_teacher: the pairs, i-th with i-th; student layers are dotted
    module paths (captured by `watch`), teacher ones the names of cached activations, in their
    stored form (fasterai's feature losses take full maps: dump them with --activation NAME).
    schedule: None (w = weight), a kdcache schedule name (constant, linear, cos, step, one_cycle,
    agp; from 0 to 1), a fasterai Schedule (its `progress(pct)`), or any callable pct -> [0, 1].
    """

    def __init__(self, teacher, loss="soft_target", *, activations_student=None, activations_teacher=None,
                 weight: float = 0.5, schedule=None, T: float = 4.0, split: str = "train"):
        self.activations_student = _listify(activations_student)
        self.activations_teacher = _listify(activations_teacher)
        if len(self.activations_student) != len(self.activations_teacher):
            raise KDCacheError(f"activations_student names {len(self.activations_student)} layers and "
                               f"activations_teacher {len(self.activations_teacher)}; pair them one to one")
        if not isinstance(teacher, Teacher):
            teacher = Teacher(teacher, split, activations=self.activations_teacher)
        missing = [n for n in self.activations_teacher if n not in teacher.forms]
        if missing:
            raise KDCacheError(f"the teacher was opened without activation {missing[0]}; open it with "
                               f"Teacher(..., activations={self.activations_teacher!r})")
        self.teacher, self.weight, self.T = teacher, float(weight), float(T)
        self.loss, self.schedule = _checked_loss(loss), _progress_of(schedule)

    @property
    def uses_features(self) -> bool:
        return bool(self.activations_student)

    def weight_at(self, pct: float) -> float:
        """w at training progress `pct` in [0, 1]."""
        return self.weight if self.schedule is None else self.weight * float(self.schedule(pct))

    def watch(self, student: torch.nn.Module):
        """Context manager: hooks on the student layers, yielding {layer: output} refreshed every forward."""
        from kdcache.hooks import capture

        return capture(student, self.activations_student)

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, index, *, task_loss: torch.Tensor | None = None,
                 pct: float = 0.0, features: dict | None = None, teacher: Teacher | None = None) -> dict:
        """{"loss", "task_loss", "kd_loss", "weight"} for student logits `pred` [B, C], labels `target`
        [B] and the batch's cache rows `index` [B]; `task_loss` defaults to cross-entropy; `features`
        are what `watch` captured; `teacher` another split's teacher (evaluation), else this one's."""
        if task_loss is None:
            task_loss = F.cross_entropy(pred, target)
        kd = self.kd_loss(pred, target, index, features or {}, teacher or self.teacher)
        w = self.weight_at(pct)
        return {"loss": torch.lerp(task_loss, kd.to(task_loss.dtype), w), "task_loss": task_loss, "kd_loss": kd,
                "weight": w}

    def kd_loss(self, pred, target, index, features: dict, teacher: Teacher) -> torch.Tensor:
        if pred.dim() == 2 and pred.shape[1] != teacher.num_classes:
            raise KDCacheError(f"the student predicts {pred.shape[1]} classes but the cache's teacher "
                               f"{teacher.num_classes}; build the student with num_classes={teacher.num_classes}")
        out = teacher.gather(index)
        logits = out["logits"]  # a tensor, or a compact form (TopK) with its own .to
        if not isinstance(logits, torch.Tensor) or logits.device != pred.device:  # a host table, an accelerator student
            out = {"logits": out["logits"].to(pred.device),
                   "activations": {n: t.to(pred.device) for n, t in out["activations"].items()}}
        fm_s = {}
        for name in self.activations_student:
            if not isinstance(features.get(name), torch.Tensor):
                raise KDCacheError(f"student layer '{name}' gave no tensor this step: its hook is not in place "
                                   "(run the forward inside Distiller.watch) or the module outputs something else")
            fm_s[name] = features[name]
        fm_t = {name: out["activations"][name] for name in self.activations_teacher}
        if isinstance(self.loss, str):
            return self._named_loss(pred, out["logits"], target, fm_s, fm_t)
        if not isinstance(out["logits"], torch.Tensor):
            kind = "top-k" if isinstance(out["logits"], TopK) else type(out["logits"]).__name__
            raise KDCacheError(f"{getattr(self.loss, '__name__', 'this loss')} takes dense teacher logits, and this "
                               f"cache is {kind}; use loss='soft_target' (kdcache's, which reads compact targets)")
        return self.loss(pred=pred, teacher_pred=out["logits"], fm_s=fm_s, fm_t=fm_t, target=target)

    def _named_loss(self, pred, teacher_logits, target, fm_s, fm_t):
        from kdcache import losses

        if self.loss in losses.KD_LOSSES:
            try:
                return losses.logit_kd_loss(self.loss, pred, teacher_logits, target, self.T)
            except ValueError as e:  # a teacher row the loss cannot use, or targets it cannot read
                raise KDCacheError(f"loss '{self.loss}': {str(e).splitlines()[0]}") from None
        if not fm_s:
            raise KDCacheError(f"loss '{self.loss}' compares activations; name the pairs with activations_student "
                               "and activations_teacher")
        try:
            return sum(losses.FEATURE_LOSSES[self.loss](fm_s[s], fm_t[t])
                       for s, t in zip(self.activations_student, self.activations_teacher))
        except ValueError as e:  # the loss's message names both shapes
            raise KDCacheError(f"loss '{self.loss}': {str(e).splitlines()[0]}") from None


def _listify(names) -> list:
    if names is None:
        return []
    return [names] if isinstance(names, str) else list(names)


def _checked_loss(loss):
    from kdcache import losses

    if callable(loss):
        return loss
    names = [*losses.KD_LOSSES, *losses.FEATURE_LOSSES]
    if loss not in names:
        from kdcache.errors import closest

        raise KDCacheError(f"unknown loss {loss!r}; give a kdcache loss name ({', '.join(names)}; closest: "
                           f"{closest(str(loss), names)}) or a callable such as fasterai.distill.SoftTarget")
    return loss


def _progress_of(schedule):
    """pct -> progress in [0, 1] for the schedule as given, or None for a constant weight."""
    if schedule is None:
        return None
    if isinstance(schedule, str):
        from kdcache.schedules import Schedule

        return Schedule(schedule, 0.0, 1.0)
    if hasattr(schedule, "progress"):  # a fasterai Schedule
        return schedule.progress
    if callable(schedule):
        return schedule
    raise KDCacheError(f"schedule {schedule!r} is neither a schedule name, a fasterai Schedule nor a callable")


# --- evaluation ------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: torch.nn.Module, data, *, teacher: Teacher | None = None, batch_size: int = 256,
             device=None) -> dict:
    """{"top1", "top5"} of `model` on `data` (a dataset of (x, y), or a SplitData), and "agreement"
    (top-1 equal to the teacher's class) with `teacher`, the cache's teacher of that split."""
    from kdcache.train import evaluate as evaluate_loader

    dataset = _dataset_of(data)
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    teacher_pred = None
    if teacher is not None:
        check_data(teacher.cache, teacher.split, data)
        teacher_pred = teacher.predictions()
    loader = torch.utils.data.DataLoader(WithIndex(dataset), batch_size=batch_size, shuffle=False)
    modes = {m: m.training for m in model.modules()}
    try:
        return evaluate_loader(model, loader, device, teacher_pred)
    finally:
        for m, mode in modes.items():
            m.training = mode

