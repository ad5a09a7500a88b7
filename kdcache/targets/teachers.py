"""The teacher side of a training run, one interface whatever the teacher is: cached (a table or a
stream) or run live (online KD). train.fit calls it without asking which."""
from __future__ import annotations

import torch

from kdcache.targets.streamed import StreamedSplit, StreamTeacherTargets


# The teacher side of training, one interface whatever the teacher is (trainer's `fit` never asks):
#   teacher(x, rows) -> {"logits": [B, C] tensor | TopK | Sampled, "activations": {name: [B, ...]}}
#   teacher.follow(sampler) -> the teacher for a run whose batches come from `sampler`
#   teacher.start_epoch(epoch), teacher.close()


class CachedTeacher:
    """The teacher, taken out of the loop: its outputs for a batch are a gather from the cache."""

    def __init__(self, targets, activations=(), device="cpu"):
        self.targets = targets  # SplitTargets, StreamedSplit, or the StreamTeacherTargets of one run
        self.activations = list(activations)  # only what the losses use is gathered per batch
        self.device = torch.device(device)

    def follow(self, sampler) -> CachedTeacher:
        """Streamed targets read their blocks in `sampler`'s order (a table in memory has no order)."""
        if isinstance(self.targets, StreamedSplit):
            return CachedTeacher(self.targets.stream(sampler), self.activations, self.device)
        return self

    def start_epoch(self, epoch: int) -> None:
        if isinstance(self.targets, StreamTeacherTargets):
            self.targets.start_epoch(epoch)  # prefetch this epoch's blocks

    def close(self) -> None:
        if isinstance(self.targets, StreamTeacherTargets):
            self.targets.close()

    def __call__(self, x: torch.Tensor, rows: torch.Tensor) -> dict:
        out = self.targets.gather(rows, self.activations)
        # targets held on the host (memory, stream) go to the student's device after the gather: a
        # batch's worth, not the table
        return {"logits": out["logits"].to(self.device),  # a tensor, or a TopK
                "activations": {n: t.to(self.device) for n, t in out["activations"].items()}}


class OnlineTeacher:
    """The teacher run live on each batch (online KD, for comparison): same outputs, same forms."""

    def __init__(self, model: torch.nn.Module, activations: dict | None = None):
        self.model = model.eval()
        self.activations = activations or {}  # {name: form}, as a cache would store them

    def follow(self, sampler) -> OnlineTeacher:
        return self  # any order: the teacher sees each batch as it comes

    def start_epoch(self, epoch: int) -> None:
        pass

    def close(self) -> None:
        pass

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> dict:
        from kdcache.hooks import REDUCTIONS, capture

        with torch.no_grad(), capture(self.model, list(self.activations)) as acts:
            logits = self.model(x).float()
            feats = {n: REDUCTIONS[form](acts[n].float()) for n, form in self.activations.items()}
        return {"logits": logits, "activations": feats}
