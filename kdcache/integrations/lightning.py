"""PyTorch Lightning: a LightningModule mixin whose `distill` reads the teacher from a cache, and
`indexed(datamodule)`, whose loaders also carry each sample's index (DDP's sampler included).

    class Student(CacheDistillation, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = create_model("cnn_small", num_classes=10)
            self.configure_distillation("cache.zarr", "soft_target", weight=0.5)
        def training_step(self, batch, i):
            x, y, index = batch
            return self.distill(self.model(x), y, index)
"""
from __future__ import annotations

import contextlib

from kdcache.errors import KDCacheError
from kdcache.imports import require
from kdcache.integrations.plain import Distiller, Teacher, check_data, indexed_loader, yields_index

__all__ = ["CacheDistillation", "indexed"]

LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader")


def _lightning():
    return require("lightning.pytorch", "lightning", "kdcache.integrations.lightning")


class CacheDistillation:
    """Mixin for a LightningModule (list it first): `configure_distillation(...)` once in `__init__`,
    then `loss = self.distill(logits, y, index)` in `training_step` (and `validation_step`).

    The loss is fasterai's rule, lerp(task loss, KD loss, weight * schedule(progress)), progress =
    optimizer steps done / steps of the fit; see plain.Distiller for the losses and schedules. Student
    layers (`activations_student`) are dotted paths from the LightningModule ("model.layer3"),
    hooked from the start of fit to its end. The parts are logged as kd/task_loss, kd/kd_loss, kd/weight.
    """

    def configure_distillation(self, teacher, loss="soft_target", *, activations_student=None,
                               activations_teacher=None, weight: float = 0.5, schedule=None, T: float = 4.0,
                               split: str = "train", valid_split: str | None = "test") -> None:
        if not isinstance(teacher, Teacher):
            names = [activations_teacher] if isinstance(activations_teacher, str) else list(activations_teacher or [])
            teacher = Teacher(teacher, split, activations=names)
        self._kd = Distiller(teacher, loss, activations_student=activations_student,
                             activations_teacher=activations_teacher, weight=weight, schedule=schedule, T=T)
        self._kd_valid_split, self._kd_valid = valid_split, None
        self._kd_hooks, self._kd_features = contextlib.ExitStack(), {}

    def _distiller(self) -> Distiller:
        if getattr(self, "_kd", None) is None:
            raise KDCacheError("distill() before configure_distillation(); call self.configure_distillation(cache, ...) "
                               "in the LightningModule's __init__")
        return self._kd

    def on_fit_start(self) -> None:
        super().on_fit_start()
        kd = self._distiller()
        self._kd_hooks.close()
        self._kd_features = self._kd_hooks.enter_context(kd.watch(self))

    def on_fit_end(self) -> None:
        self._kd_hooks.close()
        super().on_fit_end()

    def on_train_start(self) -> None:
        super().on_train_start()
        kd = self._distiller()
        loader = self.trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if not yields_index(dataset):
            raise KDCacheError("the training loader carries no sample index, which the cache is joined by; pass the "
                               "datamodule through kdcache.integrations.lightning.indexed(dm), or the loader through "
                               "indexed_loader(loader)")
        check_data(kd.teacher.cache, kd.teacher.split, dataset.dataset)

    def distill(self, logits, y, index, *, task_loss=None):
        """This step's loss from student `logits` [B, C], labels `y` [B] and the batch's `index` [B]."""
        kd = self._distiller()
        teacher = kd.teacher
        if not self.training:
            teacher = self._valid_teacher()
            if teacher is None:  # no cached validation split: the task loss alone
                import torch.nn.functional as F

                return F.cross_entropy(logits, y) if task_loss is None else task_loss
        total = self.trainer.estimated_stepping_batches
        parts = kd(logits, y, index, task_loss=task_loss, pct=self.trainer.global_step / max(1, total),
                   features=self._kd_features, teacher=teacher)
        # training parts on the steps the trainer writes logs (every log_every_n_steps): a log_dict call
        # per step cost more than the KD term itself (bench/integrations.py); validation's epoch means
        # need every batch
        every = max(1, getattr(self.trainer, "log_every_n_steps", 1) or 1)
        if not self.training or self.trainer.global_step % every == 0:
            stage = "kd" if self.training else "kd_val"
            self.log_dict({f"{stage}/task_loss": parts["task_loss"].detach(), f"{stage}/kd_loss": parts["kd_loss"].detach(),
                           f"{stage}/weight": float(parts["weight"])}, on_step=self.training, on_epoch=not self.training,
                          batch_size=len(y), sync_dist=not self.training)
        return parts["loss"]

    def _valid_teacher(self):
        kd = self._kd
        if self._kd_valid is None and self._kd_valid_split and kd.teacher.cache.has_split(self._kd_valid_split):
            self._kd_valid = Teacher(kd.teacher.cache, self._kd_valid_split, activations=kd.activations_teacher,
                                     device=kd.teacher.device)
        return self._kd_valid


def indexed(source):
    """A LightningDataModule (or a DataLoader, or a list or dict of them) whose loaders also yield
    each sample's index: `(x, y, index)` batches for `(x, y)` samples, an "index" key for dicts. The
    loaders keep their sampler, batch size, workers and collate; under DDP Lightning still swaps in
    its DistributedSampler."""
    import torch

    if isinstance(source, torch.utils.data.DataLoader):
        return indexed_loader(source)
    if isinstance(source, (list, tuple)):
        return type(source)(indexed(s) for s in source)
    if isinstance(source, dict):
        return {k: indexed(v) for k, v in source.items()}
    L = _lightning()
    if not isinstance(source, L.LightningDataModule):
        raise KDCacheError(f"indexed() takes a LightningDataModule or DataLoaders, not a {type(source).__name__}")
    from lightning.pytorch.utilities.model_helpers import is_overridden

    def loader(name):
        return lambda self: indexed(getattr(self.inner, name)())

    # only the loaders the user's datamodule defines: Lightning runs a stage when its hook is overridden
    methods = {name: loader(name) for name in LOADERS if is_overridden(name, source, L.LightningDataModule)}
    cls = type(f"Indexed{type(source).__name__}", (_datamodule_base(L),), methods)
    return cls(source)


def _datamodule_base(L):
    class IndexedDataModule(L.LightningDataModule):
        """A user's datamodule with index-carrying loaders; every other hook is the user's."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def prepare_data(self):
            self.inner.prepare_data()

        def setup(self, stage):
            self.inner.trainer = self.trainer
            self.inner.setup(stage)

        def teardown(self, stage):
            self.inner.teardown(stage)

        def state_dict(self):
            return self.inner.state_dict()

        def load_state_dict(self, state_dict):
            self.inner.load_state_dict(state_dict)

    return IndexedDataModule
