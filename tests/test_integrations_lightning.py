"""PyTorch Lightning: a module with the CacheDistillation mixin trains as an online-KD LightningModule
does, step for step; indexed() datamodules carry indices, also to 2 DDP processes on gloo."""
import json
import os

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F

from helpers.torchrun import launch
from kdcache import losses
from kdcache.data import load_split
from kdcache.errors import KDCacheError
from kdcache.integrations.lightning import CacheDistillation, indexed
from kdcache.models import build_teacher, create_model
from kdcache.schedules import Schedule


class Digits(L.LightningDataModule):
    """The user's datamodule: digits, shuffled by a seeded generator, (x, y) batches."""

    def setup(self, stage):
        self.train, self.test = load_split("digits", "train").dataset, load_split("digits", "test").dataset

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train, batch_size=64, shuffle=True,
                                           generator=torch.Generator().manual_seed(1))

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.test, batch_size=120)


class OnlineKD(L.LightningModule):
    """Online KD written by hand: the teacher run on every batch, lerp(CE, soft target, weight(pct))."""

    def __init__(self, teacher, weight=0.7):
        super().__init__()
        self.model = create_model("cnn_tiny", num_classes=10)
        self.teacher = (teacher.eval(),)  # a tuple: not a submodule, so Lightning never puts it in train mode
        self.weight, self.steps = weight, []

    def training_step(self, batch, i):
        x, y = batch
        out = self.model(x)
        with torch.no_grad():
            t = self.teacher[0](x)
        w = self.weight * Schedule("cos", 0.0, 1.0)(self.trainer.global_step / self.trainer.estimated_stepping_batches)
        loss = torch.lerp(F.cross_entropy(out, y), losses.soft_target(out, t, 4.0), w)
        self.steps.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)


class CachedKD(CacheDistillation, L.LightningModule):
    """The same student, its teacher read from the cache."""

    def __init__(self, cache, weight=0.7):
        super().__init__()
        self.model = create_model("cnn_tiny", num_classes=10)
        self.configure_distillation(cache, "soft_target", weight=weight, schedule="cos", T=4.0)
        self.steps = []

    def training_step(self, batch, i):
        x, y, index = batch
        loss = self.distill(self.model(x), y, index)
        self.steps.append(loss.item())
        return loss

    def validation_step(self, batch, i):
        x, y, index = batch
        self.log("val_loss", self.distill(self.model(x), y, index))

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)


def fit(make, datamodule):
    L.seed_everything(0, verbose=False)
    module = make()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=8, limit_val_batches=1, accelerator="cpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule)
    return module, trainer


def test_cached_distillation_equals_an_online_kd_module_per_step(teacher_ckpt, fp32_cache):
    teacher = build_teacher(teacher_ckpt, num_classes=10)[0]
    online, _ = fit(lambda: OnlineKD(teacher), Digits())
    cached, trainer = fit(lambda: CachedKD(fp32_cache), indexed(Digits()))
    assert len(cached.steps) == len(online.steps) == 8
    assert cached.steps == pytest.approx(online.steps, rel=1e-5)
    assert "val_loss" in trainer.callback_metrics  # validation distilled from the cache's test split


def test_a_datamodule_without_indices_is_refused_before_the_first_step(fp32_cache):
    with pytest.raises(KDCacheError, match=r"indexed\(dm\)") as e:
        fit(lambda: CachedKD(fp32_cache), Digits())
    assert "\n" not in str(e.value)


def test_ddp_on_two_cpu_processes_trains_each_rank_on_its_own_samples(fp32_cache, tmp_path):
    out = tmp_path / "ranks"
    done = launch([os.path.join(os.path.dirname(__file__), "helpers", "lightning_ddp.py"), fp32_cache, str(out)],
                  nproc=2, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.load(open(out / f"rank{r}.json")) for r in (0, 1)]
    for rank in ranks:
        assert rank["world_size"] == 2 and len(rank["losses"]) == 3
        assert all(loss == loss and 0 < loss < 10 for loss in rank["losses"])  # finite
    seen = [set(rank["indices"]) for rank in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # DistributedSampler split the indexed loader
