"""Token caches in your own loop or the Hugging Face Trainer: the cached next-token teacher of a
batch of sequences in one gather, the cache's own sequences as a dataset, and the loss by parts.

    from kdcache.integrations.tokens import TokenDistillationTrainer, TokenTeacher, sequences
    teacher = TokenTeacher("cache.zarr")
    trainer = TokenDistillationTrainer(model=student, args=args, train_dataset=sequences(teacher),
                                       teacher=teacher, kd_loss="soft_target", weight=0.5)

Labels are kdcache's, already shifted (next_token_labels[t] = token t + 1, or -100): a causal LM
given `labels=` shifts them again, so they travel under their own name and never reach the model.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from kdcache import losses
from kdcache import store as stores
from kdcache.encodings import TopK
from kdcache.errors import KDCacheError
from kdcache.imports import require
from kdcache.integrations.hf import INDEX, IndexCollator
from kdcache.integrations.plain import _progress_of
from kdcache.targets import Cache, choose_place, open_cache

__all__ = ["TokenSequences", "TokenTeacher", "sequences", "token_loss"]  # and TokenDistillationTrainer (__getattr__)

LABELS = "next_token_labels"  # not "labels": HF causal LMs shift `labels` themselves, and these are shifted already
IGNORE = -100  # a position without a target, as torch's cross_entropy ignores it


def _check_token_cache(cache: Cache) -> None:
    if cache.attrs.get("kind") != "tokens":
        raise KDCacheError(f"cache '{cache.path}' holds image targets, and TokenTeacher reads token caches (kdcache "
                           "dump-teacher --dataset pydoc or text:...); for an image cache use "
                           "kdcache.integrations.plain.Teacher")


def _read(cache: Cache, split: str, name: str) -> torch.Tensor:
    """One [N, L] array of a split as int64, every block checked against its checksum."""
    with stores.open_store(cache.path) as store:
        return torch.from_numpy(np.asarray(stores.CheckedReads(store, split, [name]).read(name)).astype(np.int64))


class TokenTeacher:
    """The cached next-token teacher of one split of a token cache: `teacher(rows)` -> a TopK with
    values, indices [B, L, K] and logsumexp, log_tail [B, L] (or dense logits [B, L, V] float32) on
    `device`, row t of a sequence being the teacher's distribution over its token t + 1.

    rows: [B] integer sequence indices of the split (the "index" that `sequences` yields). The
    targets are loaded once, as stored, every block checked against its checksum (SplitTargets);
    a batch is one gather per array, then decoded, never a store read.

    tokens [N, L] and labels [N, L] (int64, on the CPU): the ids the teacher ran on and the next
    token at each position with a target, else -100. `check_batch` refuses input_ids that are not
    those tokens: the cheap per-batch guard against a re-tokenized, shifted or reordered dataset.
    """

    def __init__(self, cache, split: str = "train", *, device="cpu"):
        self.device = torch.device(device)
        self.cache = cache if isinstance(cache, Cache) else open_cache(cache, device=self.device)
        self.split = split
        _check_token_cache(self.cache)
        if not self.cache.has_split(split):
            self.cache.targets(split)  # the missing-split error, naming the splits it has
        place = choose_place("auto", self.cache.nbytes(split, []), self.device)
        if place == "stream":
            raise KDCacheError(f"the targets of split '{split}' of '{self.cache.path}' do not fit in memory, and "
                               "TokenTeacher gathers by random index; store fewer classes (dump-teacher --topk K) "
                               "or fewer sequences (--max-sequences)")
        self.targets = self.cache.targets(split, activations=[], place=place)  # SplitTargets, tables [N, L, ...]
        self.tokens = _read(self.cache, split, "tokens")
        self.labels = self.targets.labels
        # the positions that decide the loss: 0 .. the last one with a target (a causal model's logits
        # there see no later token, so right padding after it may be anything)
        has_target = self.labels != IGNORE
        last = torch.where(has_target, torch.arange(self.seq_len), -1).amax(dim=1)
        self._reach = last + 1  # [N]: compare input_ids[:reach]

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return (f"TokenTeacher({self.cache.path!r}, split={self.split!r}, {len(self)} sequences x {self.seq_len} "
                f"tokens, vocabulary {self.vocab_size})")

    @property
    def seq_len(self) -> int:
        return int(self.cache.attrs["tokens"]["seq_len"])

    @property
    def vocab_size(self) -> int:
        """The teacher's output size, which the student's logits must have."""
        return self.cache.num_classes

    @property
    def tokenizer(self) -> dict:
        """The tokenizer as the dump recorded it (sha256, vocab_size, eos_id, pad_id, source)."""
        return self.cache.attrs["tokens"]["tokenizer"]

    def __call__(self, rows) -> TopK | torch.Tensor:
        rows = self._rows(rows)
        picked = {k: t.index_select(0, rows.to(t.device)) for k, t in self.targets.tables.items()}
        return self.targets.codec.decode(picked).to(self.device)

    def _rows(self, rows) -> torch.Tensor:
        rows = torch.as_tensor(rows)
        if rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dtype == torch.bool or rows.dim() != 1:
            raise KDCacheError(f"the teacher takes the batch's sequence indices, [B] integers, but got {rows.dtype} "
                               f"{list(rows.shape)}; train on sequences(teacher), whose batches carry them as 'index'")
        if rows.device.type == "cpu" and len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(self)):
            bad = int(rows.max()) if int(rows.max()) >= len(self) else int(rows.min())
            raise KDCacheError(f"sequence index {bad} is outside split '{self.split}' of '{self.cache.path}' "
                               f"({len(self)} sequences); the data is not the cache's")
        return rows

    def check_batch(self, rows, input_ids, labels=None) -> None:
        """Refuse a batch whose input_ids [B, L] are not the cache's tokens at `rows`, at every
        position up to the row's last target, or whose labels (when given, [B, L]) put a target
        where the cache has another one or none. One comparison on the batch's device."""
        rows = self._rows(rows).cpu()
        input_ids = torch.as_tensor(input_ids)
        if input_ids.shape != (len(rows), self.seq_len):
            raise KDCacheError(f"input_ids are {list(input_ids.shape)} but the batch has {len(rows)} sequences of "
                               f"the cache's {self.seq_len} tokens; feed the cache's own sequences, sequences(teacher)")
        where = f"split '{self.split}' of '{self.cache.path}'"
        expected = self.tokens.index_select(0, rows).to(input_ids.device)
        checked = torch.arange(self.seq_len, device=input_ids.device) < self._reach[rows].to(input_ids.device)[:, None]
        bad = (input_ids != expected) & checked
        if bool(bad.any()):
            b, t = (int(i) for i in bad.nonzero()[0])
            shifted = " (they are its tokens shifted by one)" if _is_shift(input_ids[b], expected[b]) else ""
            raise KDCacheError(f"input_ids of batch item {b} are not row {int(rows[b])} of {where}{shifted}: token "
                               f"{int(input_ids[b, t])} at position {t} where the teacher read {int(expected[b, t])}; "
                               "feed the cache's own sequences (sequences(teacher)) with their 'index'")
        if labels is None:
            return
        labels = torch.as_tensor(labels).to(input_ids.device, torch.int64)
        expected = self.labels.index_select(0, rows).to(input_ids.device)
        bad = (labels != IGNORE) & (labels != expected)
        if bool(bad.any()):
            b, t = (int(i) for i in bad.nonzero()[0])
            raise KDCacheError(f"labels of batch item {b} (row {int(rows[b])} of {where}) are {int(labels[b, t])} at "
                               f"position {t} where the cache's next-token label is {int(expected[b, t])} (-100: no "
                               "target); labels are already shifted (labels[t] = token t + 1): do not shift them again "
                               f"or copy input_ids, use the '{LABELS}' of sequences(teacher)")


def _is_shift(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return bool((got[1:] == expected[:-1]).all() or (got[:-1] == expected[1:]).all())


class TokenSequences(torch.utils.data.Dataset):
    """Sequence i of a token cache as {"input_ids": [L] int64, "next_token_labels": [L] int64, "index": i}.

    next_token_labels[t] is token t + 1 where position t has a target, else -100: compare them with
    logits[:, t] directly. Not named "labels" on purpose: `model(input_ids, labels=...)` of a causal
    LM shifts its labels once more (a loss of logits[t] against token t + 2), and a plain Trainer
    would pass "labels" to the model; this name the model never takes."""

    yields_index = True

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor):
        self.tokens, self.labels = tokens, labels

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], LABELS: self.labels[i], INDEX: i}


def sequences(cache_or_teacher, split: str | None = None) -> TokenSequences:
    """The sequences the cache's targets were computed on, in the cache's order, as a dataset (no
    re-tokenizing); split: the teacher's own when given a TokenTeacher, else "train"."""
    if isinstance(cache_or_teacher, TokenTeacher) and split in (None, cache_or_teacher.split):
        return TokenSequences(cache_or_teacher.tokens, cache_or_teacher.labels)
    cache = cache_or_teacher.cache if isinstance(cache_or_teacher, TokenTeacher) else cache_or_teacher
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    _check_token_cache(cache)
    split = split or "train"
    if not cache.has_split(split):
        cache.targets(split)  # the missing-split error
    return TokenSequences(_read(cache, split, "tokens"), _read(cache, split, "labels"))


def token_loss(logits: torch.Tensor, labels: torch.Tensor, teacher=None, *, kd_loss: str = "soft_target",
               weight: float = 0.5, temperature: float = 1.0, beta: float = 0.5) -> dict:
    """{"loss", "task_loss", "kd_loss", "weight"}: loss = lerp(CE, KD, weight), i.e.
    (1 - weight) * CE(logits, next tokens) + weight * losses.token_kd(logits, teacher), both means
    over the positions with a target (labels != -100).

    logits [B, L, V] (the student's, unshifted); labels [B, L] next-token labels (kdcache's, already
    shifted); teacher: what TokenTeacher gives for the batch (TopK [B, L, K] or dense [B, L, V]), or
    None for CE alone. kd_loss: a losses.TOKEN_LOSSES name; temperature, beta: as token_kd."""
    logits = logits.float()  # as HF's own causal-LM loss: softmax over a large vocabulary in float32
    labels = labels.to(logits.device)
    mask = labels != IGNORE
    task = F.cross_entropy(logits[mask], labels[mask]) if bool(mask.any()) else logits.sum() * 0.0
    if teacher is None:
        return {"loss": task, "task_loss": task}
    teacher = teacher.to(logits.device)
    try:
        kd = losses.token_kd(logits, teacher, loss=kd_loss, T=temperature, beta=beta, mask=mask)
    except ValueError as e:  # a loss name, beta or shapes the loss cannot use
        raise KDCacheError(f"kd_loss '{kd_loss}': {str(e).splitlines()[0]}") from None
    return {"loss": torch.lerp(task, kd, weight), "task_loss": task, "kd_loss": kd, "weight": weight}


def _missing_columns(dataset) -> list[str]:
    """The columns the loss needs that `dataset` lacks; a stream is checked batch by batch instead."""
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset):
        return []
    names = getattr(dataset, "column_names", None)
    if names is None:
        first = dataset[0] if len(dataset) else {}
        names = list(first) if isinstance(first, dict) else []
    return [k for k in ("input_ids", LABELS, INDEX) if k not in names]


@functools.cache
def _trainer_class():
    transformers = require("transformers", "hf", "kdcache.integrations.tokens")

    class TokenDistillationTrainer(transformers.Trainer):
        """transformers.Trainer for a causal LM: loss = token_loss(model(input_ids).logits, the batch's
        next_token_labels, the cached teacher of its "index"), with weight * schedule(progress).

        teacher: a token cache (path, Cache) or TokenTeacher of the training split; kd_loss in
        losses.TOKEN_LOSSES; weight, schedule: as plain.Distiller (schedule None: constant weight);
        temperature, beta: as losses.token_kd. Each batch's input_ids and labels are checked against
        the cache (TokenTeacher.check_batch) before the forward. Evaluation batches read `eval_split`
        when the cache holds it, else their loss is CE. Every other column goes to the model
        (attention_mask, ...), but a "labels" column is refused (see TokenSequences).
        """

        loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it for gradient accumulation

        def __init__(self, *args, teacher, kd_loss: str = "soft_target", weight: float = 0.5, schedule=None,
                     temperature: float = 1.0, beta: float = 0.5, split: str = "train",
                     eval_split: str | None = "test", **kwargs):
            # temperature 1: token_kd's default, where a top-k cache's K + 1 bins are exact
            if kd_loss not in losses.TOKEN_LOSSES:
                raise KDCacheError(f"kd_loss {kd_loss!r} is not a token loss; use one of "
                                   f"{', '.join(losses.TOKEN_LOSSES)}")
            self.teacher = teacher if isinstance(teacher, TokenTeacher) else TokenTeacher(teacher, split)
            self.kd_loss, self.weight, self.schedule = kd_loss, float(weight), _progress_of(schedule)
            self.temperature, self.beta = float(temperature), float(beta)
            self.eval_split, self._eval_teacher = eval_split, None
            super().__init__(*args, **kwargs)
            # remove_unused_columns would drop both: neither is an argument of the model's forward
            self._set_signature_columns_if_needed()
            self._signature_columns += [k for k in (INDEX, LABELS) if k not in self._signature_columns]
            if self.args.label_names is None:
                self.label_names = [LABELS]  # evaluation computes the loss, and hands these to compute_metrics
            if not isinstance(self.data_collator, IndexCollator):
                self.data_collator = IndexCollator(self.data_collator)

        def weight_at(self, pct: float) -> float:
            return self.weight if self.schedule is None else self.weight * float(self.schedule(pct))

        def train(self, *args, **kwargs):
            missing = _missing_columns(self.train_dataset)
            if missing:
                raise KDCacheError(f"the training dataset has no {', '.join(repr(k) for k in missing)} column; "
                                   "train on kdcache.integrations.tokens.sequences(teacher), the cache's own sequences")
            return super().train(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            missing = [k for k in ("input_ids", LABELS, INDEX) if k not in inputs]
            if missing:
                raise KDCacheError(f"this batch has no {', '.join(repr(k) for k in missing)}: the dataset does not "
                                   "carry it (use sequences(teacher)) or a collator dropped it (wrap that collator "
                                   "in IndexCollator)")
            if "labels" in inputs:
                raise KDCacheError(f"this batch has a 'labels' column, which a causal LM shifts by itself; the loss "
                                   f"reads '{LABELS}' (already shifted): drop 'labels'")
            inputs = dict(inputs)
            index, labels = inputs.pop(INDEX), inputs.pop(LABELS)
            teacher = self.teacher if model.training else self._teacher_for_eval()
            if teacher is not None:
                teacher.check_batch(index, inputs["input_ids"], labels)
            outputs = model(**inputs)
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            if teacher is not None and logits.shape[-1] != teacher.vocab_size:
                raise KDCacheError(f"the student scores {logits.shape[-1]} tokens but the cache's teacher "
                                   f"{teacher.vocab_size}; build it with vocab_size={teacher.vocab_size}")
            pct = self.state.global_step / max(1, self.state.max_steps)
            parts = token_loss(logits, labels, None if teacher is None else teacher(index), kd_loss=self.kd_loss,
                               weight=self.weight_at(pct), temperature=self.temperature, beta=self.beta)
            return (parts["loss"], outputs) if return_outputs else parts["loss"]

        def _teacher_for_eval(self):
            if self._eval_teacher is None and self.eval_split and self.teacher.cache.has_split(self.eval_split):
                self._eval_teacher = TokenTeacher(self.teacher.cache, self.eval_split, device=self.teacher.device)
            return self._eval_teacher

    return TokenDistillationTrainer


def __getattr__(name):  # deferred: the class subclasses transformers.Trainer, imported only when asked for
    if name == "TokenDistillationTrainer":
        return _trainer_class()
    raise AttributeError(f"module 'kdcache.integrations.tokens' has no attribute {name!r}")
