"""Every setting of every stage, with its default and the reason for it.

Precedence: dataclass default < `--config FILE.yaml` < command-line flag. The resolved config
is saved with every artifact (store attrs, checkpoints, run folders).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from kdcache.errors import KDCacheError, closest


TARGETS_IN = ("auto", "memory", "gpu", "stream")
DTYPES = ("float16", "bfloat16", "float32", "int8")  # int8: per-row affine quantized logits (kdcache/encodings.py)


@dataclass
class DumpConfig:
    teacher: str = ""  # kdcache checkpoint (OUT/<student>/model.pt) or a model name with --weights
    weights: str | None = None  # state dict for a teacher given by name
    dataset: str = "digits"  # registry name, imagefolder:PATH or module:callable
    data_root: str | None = None  # where torchvision datasets live; nothing is ever downloaded
    splits: list = field(default_factory=lambda: ["train", "test"])  # test logits give teacher agreement at eval
    out: str = ""  # STORE.zarr (Zarr v3 directory) or STORE.h5 (HDF5 file)
    activations: list = field(default_factory=list)  # NAME[:full|attention|pool] teacher modules to store
    dtype: str = "float16"  # half the bytes of float32; logits lose < 1e-3 relative, far below KD noise
    topk: int | None = None  # keep only the K largest logits (+ indices, logsumexp): ImageNet-scale caches, see README
    views: int = 1  # teacher outputs per training sample, each on its own augmented view (kdcache/augment.py)
    augment: str = "none"  # the views' transform: cifar, imagenet, digits, none or module:callable
    augment_seed: int = 0  # with the sample index and view number, names each view's seed for good
    augment_splits: list = field(default_factory=lambda: ["train"])  # the rest keep the eval transform, one view
    mix: str | None = None  # mixup or cutmix: each view mixes in a recorded partner sample
    mix_alpha: float = 1.0  # Beta(alpha, alpha) mixing weights: the mixup and CutMix papers' CIFAR setting
    batch_size: int = 256  # teacher inputs per batch (B // V samples of V views): bounded by device memory
    num_workers: int = 0  # loader processes; 0 keeps small datasets simplest and fastest
    device: str = "auto"  # cuda when there is one, else cpu
    chunk_bytes: int = 1 << 20  # ~1 MiB uncompressed chunks: fast sequential reads, cheap rewrites on resume
    allow_nonfinite: bool = False  # keep NaN/Inf teacher outputs instead of stopping at the first one
    resume: bool = False  # finish an interrupted dump (STORE.partial) instead of starting over
    overwrite: bool = False  # replace an existing store (the old one stays until the new one is complete)

    def validate(self) -> None:
        if not self.teacher:
            raise KDCacheError("dump-teacher needs --teacher (a kdcache checkpoint, or a model name with --weights)")
        if not self.out:
            raise KDCacheError("dump-teacher needs --out STORE.zarr or STORE.h5")
        if self.dtype not in DTYPES:
            raise KDCacheError(f"--dtype {self.dtype!r} is not supported; use {', '.join(DTYPES)}")
        if self.topk is not None and (not isinstance(self.topk, int) or isinstance(self.topk, bool) or self.topk < 1):
            raise KDCacheError(f"--topk must be a positive integer (classes kept per row), got {self.topk!r}")
        _positive("batch_size", self.batch_size)
        _non_negative("num_workers", self.num_workers)
        _positive("chunk_bytes", self.chunk_bytes)
        if not self.splits:
            raise KDCacheError("dump-teacher needs at least one --split")
        if len(set(self.splits)) != len(self.splits):
            raise KDCacheError(f"--split repeats a split ({', '.join(self.splits)}); name each once")
        if self.resume and self.overwrite:
            raise KDCacheError("--resume and --overwrite contradict each other; pass one")
        _positive("views", self.views)
        _non_negative("augment_seed", self.augment_seed)
        _check_augment(self.augment, self.mix, self.mix_alpha)
        if self.views > 1 and self.augment == "none" and not self.mix:
            raise KDCacheError(f"--views {self.views} with --augment none would store {self.views} identical views; "
                               "pass --augment PRESET (cifar, imagenet, digits or module:callable)")
        from kdcache.augment import augments

        if augments(self) and not set(self.splits) & set(self.augment_splits):
            raise KDCacheError(f"--views/--augment apply to the splits students train on ({', '.join(self.augment_splits)}), "
                               f"and this dump has none of them; add --split {self.augment_splits[0]} or --augment-split "
                               f"{self.splits[0]}")


@dataclass
class TrainConfig:
    students: list = field(default_factory=list)  # model names; several make a sweep
    cache: str | None = None  # teacher store; none means plain training (or online KD with --teacher)
    teacher: str | None = None  # checkpoint for online KD when there is no cache, or a model name with --weights
    weights: str | None = None  # state dict (or model.pt) for a teacher given by name: how a module:callable teacher loads
    dataset: str = "digits"  # must be the dataset the cache was made from (checked by fingerprint)
    data_root: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    epochs: int = 10
    batch_size: int = 64  # small data sets like digits need many steps more than big batches
    optimizer: str = "sgd"  # sgd or adamw
    lr: float = 0.05  # SGD with momentum, BN everywhere: 0.05 trains CIFAR-style nets stably
    momentum: float = 0.9
    weight_decay: float = 5e-4  # the CIFAR ResNet default
    lr_schedule: str = "cos"  # cos (to zero) or step (x0.1 at 50% and 75% of training)
    alpha: float = 0.9  # weight of the KD term at the end of its schedule (Hinton: most weight on soft targets)
    alpha_start: float = 0.0  # weight of the KD term at the start (unused by the constant schedule)
    alpha_schedule: str = "constant"  # constant, linear, cos, step, one_cycle or agp
    temperature: float = 4.0  # softens targets; 4 is the common choice for CIFAR-scale class counts
    loss: str = "soft_target"  # logit loss between student and teacher: soft_target, logits, mutual, dkd or nkd
    features: list = field(default_factory=list)  # S_LAYER=T_ACT[:LOSS] pairs (kdcache/features.py); none: logits only
    feature_weight: float = 1.0  # on the summed feature losses; their scales differ ~1000x: set it per loss (see README)
    feature_weight_start: float = 0.0  # feature weight at the start of its schedule (unused by constant)
    feature_weight_schedule: str = "constant"  # full weight from the first step, as attention transfer trains
    baseline: bool = False  # also train each student without KD, for comparison
    out: str = "runs/train"  # OUT/<student>/{model.pt, metrics.jsonl}, OUT/summary.csv
    seed: int = 0  # model init, data order, and which stored view each sample replays each epoch
    augment: str | None = None  # the student's own views (plain, online KD, over a clean cache); a view cache brings its own
    views: int = 0  # views per sample the student draws from (0: a fresh one each epoch); a view cache brings its own
    augment_seed: int = 0  # as dump-teacher's: online KD with --views K sees a K-view dump's very views
    view_policy: str = "random"  # which view a sample trains on each epoch: random, or cycle (each once per V epochs)
    mix: str | None = None  # mixup or cutmix of the student's own views; from a cache only if dumped with it
    mix_alpha: float = 1.0  # Beta(alpha, alpha), as dump-teacher's
    verify_replay: int = 64  # views regenerated and checked against their dump-time digests before training (0: none)
    device: str = "auto"
    num_workers: int = 0
    overwrite: bool = False  # replace existing student folders in OUT
    resume: bool = False  # continue killed runs from their last epoch; skip students already finished
    verify: bool = False  # check every chunk of the cache against its checksum before training
    topk_reconstruction: str = "sparse"  # top-k caches: KL over the K classes + a tail bucket, or dense (FKD's even tail)
    targets_in: str = "auto"  # memory, gpu or stream (blocks read in the background); auto picks by size and device
    buffer_blocks: int = 8  # --targets-in stream: whole blocks shuffled together (more: better mixing, more memory)
    jobs: int = 1  # students trained at once, one per GPU (or sharing the CPU's cores): a sweep convenience

    def validate(self) -> None:
        if not self.students:
            raise KDCacheError("train-student needs at least one --student MODEL")
        if len(set(self.students)) != len(self.students):
            raise KDCacheError(f"--student repeats a model ({', '.join(self.students)}); name each once")
        _positive("epochs", self.epochs)
        _positive("batch_size", self.batch_size)
        _positive("lr", self.lr)
        _positive("temperature", self.temperature)
        _non_negative("weight_decay", self.weight_decay)
        _non_negative("num_workers", self.num_workers)
        for name in ("alpha", "alpha_start", "momentum"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise KDCacheError(f"--{name.replace('_', '-')} must be between 0 and 1, got {value}")
        if self.optimizer not in ("sgd", "adamw"):
            raise KDCacheError(f"--optimizer {self.optimizer!r} is not supported; use sgd or adamw")
        if self.lr_schedule not in ("cos", "step"):
            raise KDCacheError(f"--lr-schedule {self.lr_schedule!r} is not supported; use cos or step")
        if self.resume and self.overwrite:
            raise KDCacheError("--resume and --overwrite contradict each other; pass one")
        if self.verify and not self.cache:
            raise KDCacheError("--verify checks a cache: pass --cache STORE with it")
        if self.cache and self.teacher:
            raise KDCacheError("pass --cache (offline KD) or --teacher (online KD), not both")
        if self.weights and not self.teacher:
            raise KDCacheError("--weights loads a teacher given by name: pass --teacher NAME with it (online KD)")
        _non_negative("views", self.views)
        _non_negative("augment_seed", self.augment_seed)
        _non_negative("verify_replay", self.verify_replay)
        _check_augment(self.augment, self.mix, self.mix_alpha)
        from kdcache.augment import check_mix_loss

        check_mix_loss(self.loss, self.mix)
        if self.topk_reconstruction not in ("sparse", "dense"):
            raise KDCacheError(f"--topk-reconstruction {self.topk_reconstruction!r} is not one; use sparse or dense")
        if self.targets_in not in TARGETS_IN:
            raise KDCacheError(f"--targets-in {self.targets_in!r} is not a place; use {', '.join(TARGETS_IN)}")
        _positive("buffer_blocks", self.buffer_blocks)
        _positive("jobs", self.jobs)
        if self.view_policy not in ("random", "cycle"):
            raise KDCacheError(f"--view-policy {self.view_policy!r} is not a policy; use random or cycle")
        if self.views and self.augment in (None, "none") and not self.cache:
            raise KDCacheError(f"--views {self.views} draws from augmented views of each sample; pass --augment PRESET "
                               "with it (cifar, imagenet, digits or module:callable)")
        _non_negative("feature_weight", self.feature_weight)
        _non_negative("feature_weight_start", self.feature_weight_start)
        from kdcache.schedules import SCHEDULES

        for name in ("alpha_schedule", "feature_weight_schedule"):
            if getattr(self, name) not in SCHEDULES:
                raise KDCacheError(f"--{name.replace('_', '-')} {getattr(self, name)!r} is not a schedule; "
                                   f"use one of {', '.join(SCHEDULES)}")
        if self.features:
            if not (self.cache or self.teacher):
                raise KDCacheError("--feature needs a teacher: pass --cache STORE (dumped with --activation) or --teacher CKPT")
            from kdcache.features import parse_features

            parse_features(self.features)  # syntax and loss names: a pipeline fails before its first stage


def _check_augment(augment, mix, mix_alpha) -> None:
    from kdcache.augment import MIXES, check_spec

    if augment is not None:
        check_spec(augment)
    if mix is not None and mix not in MIXES:
        raise KDCacheError(f"--mix {mix!r} is not supported; use {' or '.join(MIXES)}")
    _positive("mix_alpha", mix_alpha)


def _positive(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise KDCacheError(f"--{name.replace('_', '-')} must be a positive number, got {value!r}")


def _non_negative(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise KDCacheError(f"--{name.replace('_', '-')} must be zero or more, got {value!r}")


def read_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise KDCacheError(f"config file '{path}' does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)  # plain data only: no tags that build objects
    except yaml.YAMLError as e:
        raise KDCacheError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KDCacheError(f"config file '{path}' must hold a mapping of option: value")
    return data


def resolve(cls, *, file_values: dict | None = None, overrides: dict | None = None, source: str = "config"):
    """`cls` built from defaults, then `file_values`, then `overrides` (None means 'not given')."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    aliases = {"student": "students", "split": "splits", "activation": "activations", "feature": "features",
               "augment_split": "augment_splits"}
    values = {}
    for layer in (file_values or {}, overrides or {}):
        for key, value in layer.items():
            key = aliases.get(key.replace("-", "_"), key.replace("-", "_"))
            if key not in names:
                raise KDCacheError(f"unknown option '{key}' in {source}; did you mean {closest(key, names)}?")
            if value is None:
                continue
            default = names[key].default_factory() if names[key].default_factory is not dataclasses.MISSING else names[key].default
            if isinstance(default, list) and not isinstance(value, (list, tuple)):
                value = [value]
            values[key] = _coerce(key, value, default)
    cfg = cls(**values)
    cfg.validate()
    return cfg


def _coerce(key, value, default):
    """YAML and flags give strings, ints and floats; make them the field's type or say why not."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise KDCacheError(f"option '{key}' must be true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)):
        kind = type(default)
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or (kind is int and not number.is_integer()):
            what = "an integer" if kind is int else "a number"
            raise KDCacheError(f"option '{key}' must be {what}, got {value!r}")
        return kind(number)
    if isinstance(default, list):
        return [str(v) for v in value]
    return value


def as_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
