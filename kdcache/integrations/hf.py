"""Hugging Face Trainer: a Trainer whose compute_loss reads the teacher from a cache, and the index
column that joins each sample to its row, kept through `remove_unused_columns`.

    from kdcache.integrations.hf import DistillationTrainer, indexed
    trainer = DistillationTrainer(model=student, args=args, train_dataset=indexed(train),
                                  teacher="cache.zarr", kd_loss="soft_target", weight=0.5)
    trainer.train()

The Trainer drops every column its model's forward does not name (`remove_unused_columns=True`, the
default), and with it the sample index an offline-KD loss needs; DistillationTrainer keeps "index".
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.errors import KDCacheError
from kdcache.imports import require
from kdcache.integrations.plain import Distiller, Teacher, check_data, label_of, yields_index

__all__ = ["IndexCollator", "IndexedDataset", "indexed"]  # and DistillationTrainer, built on first use (__getattr__)

INDEX = "index"  # the column that carries each sample's row in the cache


class IndexedDataset(torch.utils.data.Dataset):
    """Sample i as a dict with its "index": a dict sample gains the key, an (x, y) sample becomes
    {input_name: x, "labels": y, "index": i}. For a `datasets.Dataset` the same can be had with
    `ds.map(lambda _, i: {"index": i}, with_indices=True)`."""

    yields_index = True

    def __init__(self, dataset, input_name: str = "pixel_values"):
        self.dataset, self.input_name = dataset, input_name

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        if isinstance(item, dict):
            return {**item, INDEX: i}
        x, y = item[0], item[1]
        return {self.input_name: x, "labels": y, INDEX: i}


def indexed(dataset, input_name: str = "pixel_values") -> IndexedDataset:
    """`dataset` with an "index" key in every sample (see IndexedDataset)."""
    return IndexedDataset(dataset, input_name)


class IndexCollator:
    """A data collator that keeps the index: takes "index" off each feature, collates the rest with
    `collate` (the Trainer's default when None), and puts the indices back as an int64 tensor."""

    def __init__(self, collate=None):
        if collate is None:
            collate = require("transformers", "hf", "kdcache.integrations.hf").default_data_collator
        self.collate = collate

    def __call__(self, features):
        if not features or not isinstance(features[0], dict) or INDEX not in features[0]:
            return self.collate(features)
        index = torch.tensor([int(f[INDEX]) for f in features], dtype=torch.int64)
        batch = self.collate([{k: v for k, v in f.items() if k != INDEX} for f in features])
        batch[INDEX] = index
        return batch


def _carries_index(dataset) -> bool:
    if dataset is None:
        return False
    if yields_index(dataset) or INDEX in (getattr(dataset, "column_names", None) or []):
        return True
    first = dataset[0] if len(dataset) else None
    return isinstance(first, dict) and INDEX in first


def _check_rows(teacher: Teacher, dataset) -> None:
    """The dataset's samples carry the rows of `teacher`'s split: by position for our wrapper (its
    source checked as a whole), else each probed sample's label against the cache at its index."""
    if isinstance(dataset, IndexedDataset):
        check_data(teacher.cache, teacher.split, dataset.dataset)
        return
    stored = teacher.labels
    for p in np.linspace(0, len(dataset) - 1, num=min(16, len(dataset)), dtype=np.int64):
        item = dataset[int(p)]
        row, y = int(item[INDEX]), label_of(item)
        if not 0 <= row < len(stored):
            raise KDCacheError(f"sample {p} has index {row}, outside split '{teacher.split}' of '{teacher.cache.path}' "
                               f"({len(stored)} samples); the index column must be the row of the dumped dataset")
        if y is not None and y != int(stored[row]):
            raise KDCacheError(f"sample {p} (index {row}) has label {y} where split '{teacher.split}' of "
                               f"'{teacher.cache.path}' has {int(stored[row])}: another dataset or order; use the data "
                               "the cache was dumped from")


@functools.cache
def _trainer_class():
    transformers = require("transformers", "hf", "kdcache.integrations.hf")

    class DistillationTrainer(transformers.Trainer):
        """transformers.Trainer whose loss is lerp(CE, KD from the cache, weight * schedule(progress)).

        teacher: a cache (path, Cache) or Teacher of the training split; kd_loss, weight, schedule,
        temperature, activations_student (dotted paths of the model) / activations_teacher: as
        plain.Distiller. Evaluation batches read `eval_split` when the cache holds it, else their
        loss is CE. The model's logits are `outputs.logits`.
        """

        loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it for gradient accumulation

        def __init__(self, *args, teacher, kd_loss="soft_target", weight: float = 0.5, schedule=None,
                     temperature: float = 4.0, activations_student=None, activations_teacher=None,
                     split: str = "train", eval_split: str | None = "test", **kwargs):
            if not isinstance(teacher, Teacher):
                names = [activations_teacher] if isinstance(activations_teacher, str) else list(activations_teacher or [])
                teacher = Teacher(teacher, split, activations=names)
            self.distiller = Distiller(teacher, kd_loss, activations_student=activations_student,
                                       activations_teacher=activations_teacher, weight=weight, schedule=schedule,
                                       T=temperature)
            self.eval_split, self._eval_teacher = eval_split, None
            super().__init__(*args, **kwargs)
            # the remove_unused_columns trap: "index" is no argument of the model's forward, so the
            # Trainer would drop it from datasets and batches; keep it as if it were one
            self._set_signature_columns_if_needed()
            if INDEX not in self._signature_columns:
                self._signature_columns.append(INDEX)
            if not isinstance(self.data_collator, IndexCollator):
                self.data_collator = IndexCollator(self.data_collator)

        def train(self, *args, **kwargs):
            if not _carries_index(self.train_dataset):
                raise KDCacheError("the training dataset has no 'index' column, which the cache is joined by; wrap it "
                                   "with kdcache.integrations.hf.indexed(dataset)")
            _check_rows(self.distiller.teacher, self.train_dataset)
            return super().train(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if INDEX not in inputs:
                raise KDCacheError("this batch has no 'index' column: the dataset does not carry it (wrap it with "
                                   "kdcache.integrations.hf.indexed) or a collator dropped it (wrap it in IndexCollator)")
            inputs = dict(inputs)
            index, labels = inputs.pop(INDEX), inputs.pop("labels")
            kd = self.distiller
            watched = contextlib.nullcontext({})
            if kd.uses_features:
                watched = kd.watch(self.accelerator.unwrap_model(model))
            with watched as features:
                outputs = model(**inputs)
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            teacher = kd.teacher if model.training else self._teacher_for_eval()
            if teacher is None:
                loss = F.cross_entropy(logits, labels)
            else:
                pct = self.state.global_step / max(1, self.state.max_steps)
                loss = kd(logits, labels, index, pct=pct, features=dict(features), teacher=teacher)["loss"]
            return (loss, outputs) if return_outputs else loss

        def _teacher_for_eval(self):
            teacher = self.distiller.teacher
            if self._eval_teacher is None and self.eval_split and teacher.cache.has_split(self.eval_split):
                self._eval_teacher = Teacher(teacher.cache, self.eval_split, device=teacher.device,
                                             activations=self.distiller.activations_teacher)
            return self._eval_teacher

    return DistillationTrainer


def __getattr__(name):  # deferred: the class subclasses transformers.Trainer, imported only when asked for
    if name == "DistillationTrainer":
        return _trainer_class()
    raise AttributeError(f"module 'kdcache.integrations.hf' has no attribute {name!r}")
