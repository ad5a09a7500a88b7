"""The cache inside other training loops, measured on digits: for each integration (plain PyTorch,
fastai, Lightning, the Hugging Face Trainer), the wall time of 3 students trained from one cache
against the same students with that framework's online KD (fasterai's callback for fastai), in one
run, and the per-step overhead of the integration over that framework's plain training.

Teacher: the demo's resnet20 (runs/digits/teacher) when `make demo` has run, else one trained here;
its float16 cache of digits is dumped once. The overhead is (cached - plain) / plain seconds per
step for --overhead-student (target: at most 3% for a student of cnn_small's size); the modes of each
student run back to back, in rotating order, so a busy machine slows them alike.
Run: `.venv/bin/python bench/integrations.py --threads 1` (the full table: 12 epochs); the quick
check: `--epochs 1 --students cnn_tiny,cnn_small --teacher CKPT` (any kdcache checkpoint of digits).
Writes runs/integrations/ (replaced on each run) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import functools
import os
import random
import shutil
import sys
import time

import torch
import torch.nn.functional as F

from kdcache import dump_teacher, losses
from kdcache.data import WithIndex, load_split
from kdcache.integrations.plain import Distiller, Teacher
from kdcache.models import build_teacher, create_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # digits_experiment.py, run as a script
from digits_experiment import teacher_checkpoint  # noqa: E402

WEIGHT, T, LR, BATCH = 0.9, 4.0, 0.05, 64  # the demo's KD weight and temperature; plain SGD, batches of 64
MODES = ("cached", "online", "plain")


def kd_term(out, t):
    return losses.soft_target(out, t, T)


# --- one student, one framework, one mode: seconds and optimizer steps ----------------------------

def run_plain(mode, name, cache, teacher, epochs):
    data = load_split("digits", "train")
    torch.manual_seed(0)
    student = create_model(name, num_classes=10)
    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9)
    loader = torch.utils.data.DataLoader(WithIndex(data.dataset), batch_size=BATCH, shuffle=True)
    kd = Distiller(Teacher(cache, "train"), "soft_target", weight=WEIGHT, T=T) if mode == "cached" else None
    steps, started = 0, time.perf_counter()
    for _ in range(epochs):
        for x, y, index in loader:
            out = student(x)
            if mode == "cached":
                loss = kd(out, y, index)["loss"]
            elif mode == "online":
                with torch.no_grad():
                    t = teacher(x)
                loss = torch.lerp(F.cross_entropy(out, y), kd_term(out, t), WEIGHT)
            else:
                loss = F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    return time.perf_counter() - started, steps


def run_fastai(mode, name, cache, teacher, epochs):
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.optimizer import SGD
    from fasterai.distill.distillation_callback import KnowledgeDistillationCallback as OnlineKD
    from fasterai.distill.losses import SoftTarget

    from kdcache.integrations import fastai as kdfastai

    random.seed(0)
    dls = DataLoaders.from_dsets(load_split("digits", "train").dataset, load_split("digits", "test").dataset,
                                 bs=BATCH, num_workers=0)
    cbs = []
    if mode == "cached":
        dls = kdfastai.indexed(dls)
        cbs = [kdfastai.KnowledgeDistillationCallback(cache, "soft_target", weight=WEIGHT, T=T, valid_split=None)]
    elif mode == "online":
        cbs = [OnlineKD(teacher, functools.partial(SoftTarget, T=T), weight=WEIGHT)]
    torch.manual_seed(0)
    learn = Learner(dls, create_model(name, num_classes=10), loss_func=F.cross_entropy, opt_func=SGD, lr=LR, cbs=cbs)
    started = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        learn.fit(epochs)
    return time.perf_counter() - started, epochs * len(dls.train)


def run_lightning(mode, name, cache, teacher, epochs):
    import lightning.pytorch as L

    from kdcache.integrations.lightning import CacheDistillation, indexed

    class Data(L.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(load_split("digits", "train").dataset, batch_size=BATCH, shuffle=True)

    class Student(L.LightningModule):  # plain training, or online KD by hand
        def __init__(self):
            super().__init__()
            self.model = create_model(name, num_classes=10)
            self.teacher = (teacher,)  # not a submodule: Lightning would put it in train mode

        def training_step(self, batch, i):
            x, y = batch
            out = self.model(x)
            if mode == "plain":
                return F.cross_entropy(out, y)
            with torch.no_grad():
                t = self.teacher[0](x)
            return torch.lerp(F.cross_entropy(out, y), kd_term(out, t), WEIGHT)

        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=LR, momentum=0.9)

    class Cached(CacheDistillation, Student):
        def __init__(self):
            super().__init__()
            self.configure_distillation(cache, "soft_target", weight=WEIGHT, T=T)

        def training_step(self, batch, i):
            x, y, index = batch
            return self.distill(self.model(x), y, index)

    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    module = Cached() if mode == "cached" else Student()
    data = indexed(Data()) if mode == "cached" else Data()
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return time.perf_counter() - started, trainer.global_step


def run_hf(mode, name, cache, teacher, epochs):
    from transformers import Trainer, TrainingArguments

    from kdcache.integrations.hf import DistillationTrainer, indexed

    class Pixels(torch.utils.data.Dataset):
        def __init__(self):
            self.data = load_split("digits", "train").dataset

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            x, y = self.data[i]
            return {"pixel_values": x, "labels": y}

    class Logits(torch.nn.Module):  # a kdcache student as a transformers model: forward(pixel_values) -> .logits
        def __init__(self):
            super().__init__()
            self.net = create_model(name, num_classes=10)

        def forward(self, pixel_values, labels=None):
            return {"logits": self.net(pixel_values)}

    class Online(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            out = model(**inputs)
            if mode == "plain":
                loss = F.cross_entropy(out["logits"], labels)
            else:
                with torch.no_grad():
                    t = teacher(inputs["pixel_values"])
                loss = torch.lerp(F.cross_entropy(out["logits"], labels), kd_term(out["logits"], t), WEIGHT)
            return (loss, out) if return_outputs else loss

    args = TrainingArguments(output_dir=os.path.join(OUT, "hf"), num_train_epochs=epochs, per_device_train_batch_size=BATCH,
                             learning_rate=LR, optim="sgd", lr_scheduler_type="constant", seed=0, use_cpu=True,
                             report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True)
    torch.manual_seed(0)
    if mode == "cached":
        trainer = DistillationTrainer(model=Logits(), args=args, train_dataset=indexed(Pixels()), teacher=cache,
                                      kd_loss="soft_target", weight=WEIGHT, temperature=T)
    else:
        trainer = Online(model=Logits(), args=args, train_dataset=Pixels())
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started, trainer.state.global_step


RUNNERS = {"plain": run_plain, "fastai": run_fastai, "lightning": run_lightning, "hf": run_hf}
OUT = "runs/integrations"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", default="plain,fastai,lightning,hf")
    parser.add_argument("--students", default="cnn_tiny,cnn_small,cnn_medium", help="the demo's three students")
    parser.add_argument("--overhead-student", default="cnn_small", help="the size the 3%% target is stated for")
    parser.add_argument("--epochs", type=int, default=12, help="as the demo's students")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--teacher", default=None, help="a kdcache checkpoint instead of the demo's resnet20")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    ckpt = args.teacher or teacher_checkpoint(OUT)
    cache = dump_teacher(teacher=ckpt, dataset="digits", out=os.path.join(OUT, "cache.zarr"))
    teacher = build_teacher(ckpt, num_classes=10)[0].eval()
    students = args.students.split(",")
    rows = []
    for framework in args.frameworks.split(","):
        seconds = {m: 0.0 for m in MODES}
        per_step = {}
        for k, name in enumerate(students):
            order = MODES[k % 3:] + MODES[:k % 3]  # rotate which mode runs first
            for mode in order:
                s, steps = RUNNERS[framework](mode, name, cache, teacher, args.epochs)
                seconds[mode] += s
                if name == args.overhead_student:
                    per_step[mode] = s / max(1, steps)
        overhead = (per_step["cached"] / per_step["plain"] - 1) * 100 if per_step else None
        rows.append((framework, seconds, overhead))
        print(f"{framework}: cached {seconds['cached']:.1f}s, online {seconds['online']:.1f}s, plain "
              f"{seconds['plain']:.1f}s", flush=True)
    print(f"\n{len(students)} students ({', '.join(students)}), {args.epochs} epochs, {args.threads} threads\n")
    print("| framework | from the cache (s) | online KD (s) | online / cached | plain (s) | per-step overhead vs plain |")
    print("|---|---|---|---|---|---|")
    for framework, s, overhead in rows:
        over = f"{overhead:+.1f}% ({args.overhead_student})" if overhead is not None else "-"
        print(f"| {framework} | {s['cached']:.1f} | {s['online']:.1f} | {s['online'] / s['cached']:.2f} | "
              f"{s['plain']:.1f} | {over} |")


if __name__ == "__main__":
    main()
