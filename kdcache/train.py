"""Stage 2: train one student from cached soft targets (a sweep of them is kdcache/sweep.py).

dataset (x, y, row; augment.TrainViews replays a view cache's views) -> student (+ hooks, adapters)
-> objective(student out, teacher targets[row], alpha(progress), feature losses) -> optimizer
-> evaluate each epoch -> OUT/<student>/{metrics.jsonl, model.pt, curves.png}.
With no cache it is plain training (teachers, baselines); with --teacher, online KD.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kdcache import augment, distributed, features, losses
from kdcache.config import TrainConfig, as_dict
from kdcache.data import WithIndex, load_split, loader as data_loader
from kdcache.errors import KDCacheError
from kdcache.hooks import capture
from kdcache.models import build_teacher, count_parameters, create_model, save_checkpoint
from kdcache.progress import Progress, log
from kdcache.schedules import Schedule
from kdcache.targets import CachedTeacher, OnlineTeacher, StreamedSplit, choose_place, open_cache


# --- the objective -------------------------------------------------------------------------

def objective(out: torch.Tensor, y: torch.Tensor, teacher: dict | None, alpha: float, cfg: TrainConfig,
              feature_losses: dict | None = None, feature_weight: float = 0.0) -> dict:
    """losses.kd_objective with this run's --loss, --temperature and --topk-reconstruction; CE alone
    without a teacher. `y` is [B] classes, or [B, C] mixed labels for mixed views. A teacher row
    the loss cannot use (NaN, +inf, kept with --allow-nonfinite) is a user error, in one line."""
    if teacher is None:
        task = F.cross_entropy(out, y)
        return {"loss": task, "task_loss": task}
    try:
        return losses.kd_objective(out, teacher["logits"], y, alpha, cfg.temperature, loss=cfg.loss,
                                   reconstruction=cfg.topk_reconstruction, feature_losses=feature_losses,
                                   feature_weight=feature_weight)
    except ValueError as e:
        raise KDCacheError(f"--loss {cfg.loss}: {e} (kept by dump-teacher --allow-nonfinite)") from None


def lr_factor(kind: str, pos: float) -> float:
    """LR multiplier at training progress `pos` in [0, 1]."""
    if kind == "cos":
        return 0.5 * (1 + math.cos(math.pi * pos))  # cosine to zero
    return 0.1 ** ((pos >= 0.5) + (pos >= 0.75))  # step: x0.1 at 50% and again at 75%


# --- one epoch, evaluation -----------------------------------------------------------------

# (objective part, label): what the bar, the progress lines and the epoch line show of the loss
LOSS_PARTS = (("loss", "loss"), ("task_loss", "task"), ("kd_loss", "kd"), ("feature_loss", "feature"))


@dataclass
class Run:
    """One student's training run: what every step of every epoch reads (train_one_epoch's inputs).

    `model` is the module trained (DistributedDataParallel-wrapped under torchrun); `teacher` the
    teacher side (kdcache/targets/teachers.py; None: plain training) with its `alpha` schedule;
    `feature_kd` the feature pairs' adapters with their `feature_weight` schedule."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    device: torch.device
    total_steps: int
    teacher: object | None = None
    alpha: Schedule | None = None
    feature_kd: features.FeatureKD | None = None
    feature_weight: Schedule | None = None
    dist: distributed.Dist = field(default_factory=distributed.Dist)


def train_one_epoch(run: Run, loader, *, step: int, progress: Progress | None = None) -> dict:
    """One pass over `loader` from global step `step`; returns mean losses, the last alpha (and
    feature weight) and LR, and per-step losses. With feature KD, the student layers are hooked
    for the epoch.

    Under DDP (`run.dist.world_size` > 1) each rank's loss is scaled so that DDP's mean of the
    ranks' gradients is the mean over the global batch (GlobalBatchSampler.loss_scale), the
    adapters' gradients are averaged by hand (they are outside the wrapped model), and the epoch's
    mean losses are summed over every rank. `progress` counts this rank's samples."""
    model, optimizer, teacher, cfg, device, dist = run.model, run.optimizer, run.teacher, run.cfg, run.device, run.dist
    feature_kd = run.feature_kd
    model.train()
    first_step = step
    sums: dict = {}
    step_losses = []
    alpha = weight = 0.0
    seen = 0
    sampler = loader.batch_sampler
    scaled = dist.world_size > 1 and hasattr(sampler, "loss_scale")
    module = getattr(model, "module", model)  # hooks address the student's own module names
    with capture(module, feature_kd.student_layers if feature_kd is not None else []) as feats:
        for i, (x, y, row) in enumerate(loader):  # row: the view's row in the cache (the sample index without views)
            pos = step / run.total_steps
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg.lr_schedule, pos)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            targets = teacher(x, row) if teacher is not None else None
            alpha = run.alpha(pos) if run.alpha is not None else 0.0
            out = model(x)
            matched = None
            if feature_kd is not None:
                weight = run.feature_weight(pos)
                matched = feature_kd(feats, targets["activations"])
            parts = objective(out, y, targets, alpha, cfg, matched, weight)
            optimizer.zero_grad(set_to_none=True)
            (parts["loss"] * sampler.loss_scale(i) if scaled else parts["loss"]).backward()
            if feature_kd is not None and dist.world_size > 1:
                distributed.average_gradients(feature_kd)
            optimizer.step()
            step += 1
            values = {k: v.detach() for k, v in parts.items()}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v * len(y)
            seen += len(y)
            step_losses.append(values["loss"])
            if progress is not None:  # the losses are read (a device sync) only when the bar or a line shows them
                progress.update(len(y), **{label: (lambda v=values[key]: float(v)) for key, label in LOSS_PARTS
                                           if key in values})
    names = sorted(sums)
    totals = distributed.all_reduce_sum(torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device)
                                                     for k in names] + [torch.tensor(float(seen), dtype=torch.float64,
                                                                                     device=device)]), dist)
    if not torch.isfinite(totals).all():  # every rank sees the all-reduced totals, so every rank stops here
        _stop_nonfinite(step_losses, first_step, len(loader))
    stats = {k: float(v) / float(totals[-1]) for k, v in zip(names, totals[:-1])}  # one sync per epoch, not per step
    stats.update(alpha=alpha, lr=optimizer.param_groups[0]["lr"], step_losses=[float(v) for v in step_losses])
    if feature_kd is not None:
        stats["feature_weight"] = weight
    return stats


def _stop_nonfinite(step_losses: list, first_step: int, steps_per_epoch: int) -> None:
    """A NaN or inf training loss: stop with the epoch and step instead of training on (checked once an epoch)."""
    bad = [i for i, v in enumerate(step_losses) if not torch.isfinite(v)]
    where = f"step {bad[0] + 1} of {steps_per_epoch}" if bad else "a step of another rank"
    raise KDCacheError(f"training loss became NaN or inf in epoch {first_step // max(1, steps_per_epoch) + 1}, {where}; "
                       "nothing of this epoch is kept: lower --lr, check the cache with kdcache verify, then --resume")


@torch.no_grad()
def evaluate(model, loader, device, teacher_pred: torch.Tensor | None = None) -> dict:
    """Top-1, top-5 and agreement with the teacher's predictions [N] over `loader` (x, y, index)."""
    model.eval()
    correct1 = correct5 = agree = n = 0
    for x, y, index in loader:
        out = model(x.to(device))
        y = y.to(device)
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        if teacher_pred is not None:
            agree += (top[:, 0].cpu() == teacher_pred[index]).sum().item()
        n += len(y)
    # top-5 of 5 classes or fewer is 100% by construction: reported as None ("-"), not as a result
    metrics = {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n if out.shape[1] > 5 else None}
    if teacher_pred is not None:
        metrics["agreement"] = 100.0 * agree / n
    return metrics


# --- a whole run ---------------------------------------------------------------------------

def _loader(dataset, cfg: TrainConfig, *, batch_size=None, sampler=None):
    """Batches of (x, y, row) from `dataset` (WithIndex or augment.TrainViews): in `sampler`'s
    order (training), or in dataset order (evaluation)."""
    if sampler is not None:
        return data_loader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers)
    return data_loader(dataset, batch_size=batch_size or cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)


def make_optimizer(cfg: TrainConfig, *modules: torch.nn.Module) -> torch.optim.Optimizer:
    """One optimizer over the parameters of `modules` (the student, and its feature adapters or None)."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Setup:
    """What every student of a run shares: data, the teacher (cached, online or none), the
    teacher's test predictions, feature pairs, the student's views."""

    def __init__(self, cfg: TrainConfig, device, dist: distributed.Dist, announce: bool = True):
        self.cfg, self.device, self.dist = cfg, device, dist
        self.announce = announce and dist.is_main  # --jobs: the parent says it once, not every job
        self.train_data = load_split(cfg.dataset, cfg.train_split, root=cfg.data_root)
        if len(self.train_data) < 2:  # a batch of one: BatchNorm after global pooling fails, KD learns nothing
            raise KDCacheError(f"dataset '{cfg.dataset}' split '{cfg.train_split}' holds one sample; training needs "
                               "at least 2 (BatchNorm normalises over a batch): check the dataset and split")
        self.test_data = load_split(cfg.dataset, cfg.test_split, root=cfg.data_root)
        self.teacher, self.teacher_pred, self.mode, self.pairs, self.cache = None, None, "plain", [], None
        self.targets = None  # SplitTargets (memory, gpu) or StreamedSplit (stream)
        if cfg.cache:
            self._from_cache(cfg, device)
        elif cfg.teacher:
            model, info = build_teacher(cfg.teacher, num_classes=self.train_data.num_classes, weights=cfg.weights,
                                        random_ok=cfg.random_teacher)
            self.pairs = features.pairs_for_teacher(cfg.features, model)
            self.teacher, self.mode = OnlineTeacher(model.to(device), features.teacher_forms(self.pairs)), "online_kd"
            self.teacher_pred = _predict(model, _loader(WithIndex(self.test_data.dataset), cfg, batch_size=256), device)
        # the student's inputs: a view cache's views (replay-checked here), its own augmentation, or the data as is
        self.views = augment.training_views(cfg, self.train_data, self.cache)

    def _from_cache(self, cfg: TrainConfig, device) -> None:
        cache = self.cache = open_cache(cfg.cache, device=device)
        if cfg.verify:
            from kdcache.verify import verify_store

            problems = verify_store(cfg.cache, dataset=cfg.dataset, augment=cfg.augment, data_root=cfg.data_root)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise KDCacheError(f"cache '{cfg.cache}' fails verification: {problems[0]}{more}; "
                                   f"see kdcache verify {cfg.cache}, then dump it again")
        cache.check_dataset(self.train_data)
        drawn_at = cache.attrs.get("sample_temperature")  # sampled targets: unbiased at that T, for soft_target only
        if drawn_at is not None and (cfg.loss != "soft_target" or not math.isclose(cfg.temperature, drawn_at)):
            raise KDCacheError(f"cache '{cfg.cache}' holds targets sampled at temperature {drawn_at:g}, an unbiased KD "
                               f"loss only for --loss soft_target --temperature {drawn_at:g}; train with those")
        if cache.num_classes != self.train_data.num_classes:
            raise KDCacheError(f"cache has {cache.num_classes} classes, dataset {self.train_data.num_classes}")
        stored = cache.attrs.get("activations", {})  # {name: {form}}, as dump-teacher recorded them
        self.pairs = features.pairs_from_cache(cfg.features, {n: a["form"] for n, a in stored.items()})
        used = sorted({p.teacher for p in self.pairs})  # only these activations are loaded
        need = cache.nbytes(cfg.train_split, used)
        self.place = choose_place(cfg.targets_in, need, device)
        self.targets = cache.targets(cfg.train_split, activations=used, place=self.place, buffer_blocks=cfg.buffer_blocks)
        if self.announce:
            log.info(f"teacher targets: {need / 2**20:,.2f} MiB, {self.place}"
                     f"{' (auto)' if cfg.targets_in == 'auto' else ''}")
        self.teacher, self.mode = CachedTeacher(self.targets, used, device), "kd"
        if cache.has_split(cfg.test_split):
            cache.check_dataset(self.test_data)
            # eval splits: one clean view; read a block at a time when the split is streamed
            self.teacher_pred = cache.targets(cfg.test_split, activations=[], place="stream" if self.place == "stream"
                                              else "memory").predictions()

    def sampler(self, dataset):
        """This rank's batches of each epoch: whole blocks in shuffled windows when the targets are
        streamed (the images follow the same order), else one global permutation cut into global
        batches, each rank taking its slice."""
        cfg, d = self.cfg, self.dist
        if isinstance(self.targets, StreamedSplit):
            local = max(1, cfg.batch_size // d.world_size)
            return self.targets.sampler(local, seed=cfg.seed, rank=d.rank, world_size=d.world_size)
        return distributed.GlobalBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed, rank=d.rank,
                                              world_size=d.world_size)


def fit(name: str, kind: str, setup: Setup, folder: str) -> dict:
    """Train one student from scratch; write its metrics and checkpoint; return its summary row.

    With feature pairs (and a teacher), adapters are built for this student and trained with it;
    the checkpoint holds the student alone. With views, the student trains on those views of the
    training data (replayed from a view cache, or its own augmentation), else on the data as it
    is. Under torchrun the student is wrapped in DistributedDataParallel; rank 0 alone evaluates
    and writes.
    """
    student = _Student(name, kind, setup, folder)
    run, model, data = student.start()
    try:
        metrics, history = student.train(run, model, data)
    finally:
        if run.teacher is not None:
            run.teacher.close()
    return student.finish(model, metrics, history)


class _Loaders(NamedTuple):
    dataset: object  # WithIndex or augment.TrainViews
    sampler: object  # GlobalBatchSampler, or reader.BlockShuffleSampler for streamed targets
    train: torch.utils.data.DataLoader
    test: torch.utils.data.DataLoader


class _Student:
    """fit's steps for one student of a sweep: build its run, train its epochs (resumable), finish."""

    def __init__(self, name: str, kind: str, setup: Setup, folder: str):
        self.name, self.kind, self.setup, self.folder = name, kind, setup, folder
        self.cfg, self.dist = setup.cfg, setup.dist
        self.state_path = os.path.join(folder, "last.pt")
        self.metrics_path = os.path.join(folder, "metrics.jsonl")
        self.config = dict(as_dict(self.cfg), student=name, kind=kind,
                           views_used=setup.views.describe() if setup.views else None, world_size=self.dist.world_size)

    def start(self) -> tuple[Run, torch.nn.Module, _Loaders]:
        """The student (same init for its KD and baseline runs, on every rank), its adapters, optimizer,
        data order and teacher side; config.json written."""
        cfg, setup, device = self.cfg, self.setup, self.setup.device
        teacher = None if self.kind == "baseline" else setup.teacher
        torch.manual_seed(cfg.seed)
        train_data = setup.train_data
        model = create_model(self.name, num_classes=train_data.num_classes, in_chans=train_data.in_chans).to(device)
        feature_kd = feature_weight = None
        if teacher is not None and setup.pairs:  # after the student, so its init is the same with or without adapters
            feature_kd = features.build_feature_kd(setup.pairs, model, teacher, features.probe_batch(train_data.dataset, device))
            feature_weight = Schedule(cfg.feature_weight_schedule, cfg.feature_weight_start, cfg.feature_weight)
        optimizer = make_optimizer(cfg, model, feature_kd)
        dataset = setup.views or WithIndex(train_data.dataset)
        sampler = setup.sampler(dataset)
        if teacher is not None:
            teacher = teacher.follow(sampler)  # streamed targets are read in this run's order
        data = _Loaders(dataset, sampler, _loader(dataset, cfg, sampler=sampler),
                        _loader(WithIndex(setup.test_data.dataset), cfg, batch_size=256))  # eval transform, one view
        trained = model
        if self.dist.world_size > 1:
            trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        alpha = Schedule(cfg.alpha_schedule, cfg.alpha_start, cfg.alpha) if teacher is not None else None
        run = Run(trained, optimizer, cfg, device, cfg.epochs * len(data.train), teacher,
                  alpha, feature_kd, feature_weight, self.dist)
        if self.dist.is_main:
            os.makedirs(self.folder, exist_ok=True)
            with open(os.path.join(self.folder, "config.json"), "w") as f:
                json.dump(self.config, f, indent=2)
        return run, model, data

    def train(self, run: Run, model: torch.nn.Module, data: _Loaders) -> tuple[dict, list]:
        """Every epoch from the saved state on (--resume), each evaluated, logged and saved by rank 0;
        returns the last epoch's metrics (on every rank) and the per-step losses."""
        cfg, dist, views = self.cfg, self.dist, self.setup.views
        started = time.perf_counter()
        history, first_epoch = [], 0
        if cfg.resume and os.path.exists(self.state_path):
            first_epoch, history, elapsed = load_training_state(self.state_path, model, run.optimizer, run.feature_kd)
            started -= elapsed
            if dist.is_main:
                log.info(f"{self.name}: resuming after epoch {first_epoch}")
        if dist.is_main:
            _keep_lines(self.metrics_path, first_epoch)  # epochs past the saved state are trained again
        metrics = {}
        for epoch in range(first_epoch, cfg.epochs):
            if views is not None:
                views.set_epoch(epoch)  # which view each sample trains on: a function of seed, epoch, sample
            data.sampler.set_epoch(epoch)  # the order: a function of seed and epoch, so resuming needs no RNG state
            if run.teacher is not None:
                run.teacher.start_epoch(epoch)
            epoch_started = time.perf_counter()
            with Progress(len(data.dataset) // dist.world_size, f"{self.name} {self.kind} epoch {epoch + 1}/{cfg.epochs}",
                          enabled=dist.is_main) as progress:
                stats = train_one_epoch(run, data.train, step=epoch * len(data.train), progress=progress)
            history.extend(stats.pop("step_losses"))
            if dist.is_main:
                metrics = {"epoch": epoch + 1, **stats, **evaluate(model, data.test, run.device, self.setup.teacher_pred),
                           "seconds": round(time.perf_counter() - started, 3)}
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                log.info(epoch_line(self.name, self.kind, cfg.epochs, metrics, time.perf_counter() - epoch_started))
                save_training_state(self.state_path, epoch + 1, history, metrics["seconds"], model, run.optimizer,
                                    run.feature_kd)
            distributed.barrier(dist)  # the others wait while rank 0 evaluates and saves
        return distributed.broadcast_object(metrics, dist), history

    def finish(self, model: torch.nn.Module, metrics: dict, history: list) -> dict:
        """model.pt (the student alone: the adapters are a training aid), curves.png, the student's line."""
        train_data = self.setup.train_data
        row = {"student": self.name, "kind": self.kind, "params": count_parameters(model), "epochs": self.cfg.epochs,
               "top1": metrics["top1"], "top5": metrics["top5"], "agreement": metrics.get("agreement"),
               "seconds": metrics["seconds"], "folder": self.folder}
        if self.dist.is_main:
            save_checkpoint(os.path.join(self.folder, "model.pt"), model.cpu(), arch=self.name, arch_kwargs={},
                            num_classes=train_data.num_classes, in_chans=train_data.in_chans,
                            config=self.config, metrics=metrics)
            os.remove(self.state_path)  # the finished checkpoint supersedes it
            from kdcache.plots import plot_history  # deferred: matplotlib only once a student is done

            plot_history(_read_metrics(self.metrics_path), os.path.join(self.folder, "curves.png"),
                         title=f"{self.name} ({self.kind})")
            log.info(student_line(row))  # as soon as it is trained, not after the whole sweep
        distributed.barrier(self.dist)
        row["step_losses"] = history
        return row


def save_training_state(path, epoch, history, seconds, model, optimizer, feature_kd) -> None:
    """Everything the next epoch depends on: weights, optimizer moments, adapters and torch's RNG.
    LR and alpha are pure functions of the step, the data order of seed and epoch: no state."""
    state = {
        "epoch": epoch, "seconds": seconds, "history": torch.tensor(history, dtype=torch.float64),
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "adapters": feature_kd.state_dict() if feature_kd is not None else None,
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(state, path + ".partial")
    os.replace(path + ".partial", path)  # a kill mid-save keeps the previous epoch's state


def load_training_state(path, model, optimizer, feature_kd) -> tuple[int, list, float]:
    try:  # a file on disk: truncated, or another run's, it is one line (it was an OSError traceback)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if feature_kd is not None and state["adapters"] is not None:
            feature_kd.load_state_dict(state["adapters"])
        torch.set_rng_state(state["torch_rng"])
        return int(state["epoch"]), state["history"].tolist(), float(state["seconds"])
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KDCacheError(f"the training state {path} cannot be restored ({first}); it is damaged or another "
                           "run's: pass --overwrite to train this student from the start") from None


def _keep_lines(path: str, n: int) -> None:
    """Truncate a metrics file to its first `n` lines (all of it gone when n = 0)."""
    lines = open(path).readlines()[:n] if n and os.path.exists(path) else []
    with open(path, "w") as f:
        f.writelines(lines)


@torch.no_grad()
def _predict(model, loader, device) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x.to(device)).argmax(1).cpu() for x, _, _ in loader])


def epoch_line(name: str, kind: str, epochs: int, m: dict, seconds: float) -> str:
    """One plain line per epoch: losses by part, test top-1, agreement with the teacher, seconds."""
    parts = [f"{label} {m[key]:.4f}" for key, label in LOSS_PARTS[1:] if key in m]
    agree = f"  agree {m['agreement']:6.2f}" if m.get("agreement") is not None else ""
    return (f"{name} {kind} epoch {m['epoch']}/{epochs}: loss {m['loss']:.4f} ({', '.join(parts)})  "
            f"top1 {m['top1']:6.2f}{agree}  {seconds:.1f}s")


def student_line(row: dict) -> str:
    return f"{row['student']:>16} {row['kind']:>9}  top1 {row['top1']:6.2f}  ({row['seconds']:.1f}s)"


def _read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
