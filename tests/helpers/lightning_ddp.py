"""Run under torchrun with 2 processes: a CacheDistillation student trained 3 steps by Lightning's DDP
on gloo, from an indexed() datamodule. Each rank writes OUT/rank{R}.json: its losses and indices seen.
Usage: lightning_ddp.py CACHE OUT"""
import json
import os
import sys

import lightning.pytorch as L
import torch

from kdcache.data import load_split
from kdcache.integrations.lightning import CacheDistillation, indexed
from kdcache.models import create_model


class Digits(L.LightningDataModule):
    def setup(self, stage):
        self.train = load_split("digits", "train").dataset

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train, batch_size=32, shuffle=True)


class Student(CacheDistillation, L.LightningModule):
    def __init__(self, cache):
        super().__init__()
        self.model = create_model("cnn_tiny", num_classes=10)
        self.configure_distillation(cache, "soft_target", weight=0.5)
        self.losses, self.indices = [], []

    def training_step(self, batch, i):
        x, y, index = batch
        loss = self.distill(self.model(x), y, index)
        self.losses.append(loss.item())
        self.indices += index.tolist()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.05)


def main(cache, out):
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    student = Student(cache)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, accelerator="cpu", devices=2, strategy="ddp",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(student, datamodule=indexed(Digits()))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"world_size": trainer.world_size, "losses": student.losses, "indices": student.indices}, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
