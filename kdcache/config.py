"""Every setting of every stage, with its default and the reason for it.

Precedence: dataclass default < `--config FILE.yaml` < command-line flag. The resolved config
is saved with every artifact (store attrs, checkpoints, run folders).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field

from kdcache.errors import KDCacheError, closest


TARGETS_IN = ("auto", "memory", "gpu", "stream")
INT64 = 2**63  # ints must fit int64: torch and numpy take seeds and sizes as int64
FLOAT32_MAX = 3.4028234663852886e38  # floats must be finite in float32, the dtype training computes in
DTYPES = ("float16", "bfloat16", "float32", "int8", "uint8")  # int8: per-row affine quantized logits; uint8: top-k codes (kdcache/encodings.py)


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
    topk_indices: str = "plain"  # packed: ceil(log2 C) bits a class index (10 at 1,000 classes) instead of 16
    sample: int | None = None  # store S classes drawn from the tempered teacher instead (random-sampling KD)
    sample_temperature: float = 4.0  # the draws' T, and the only one students can train at: train-student's default
    sample_seed: int = 0  # with each row's logits, names its draws
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
    amp: bool | None = None  # CUDA autocast; None: only when the stored dtype is not float32 (bfloat16 -> bf16 autocast)
    random_teacher: bool = False  # allow a teacher given by name without weights: a random network, for benchmarks
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
        _workers(self.num_workers)
        _positive("chunk_bytes", self.chunk_bytes)
        if not self.splits:
            raise KDCacheError("dump-teacher needs at least one --split")
        for split in (*self.splits, *self.augment_splits):
            _split_name("--split", split)
        _teacher_name(self.teacher)
        _dataset_name(self.dataset)
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
    random_teacher: bool = False  # online KD from a --teacher NAME without --weights: random, for benchmarks
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
        _workers(self.num_workers)
        _split_name("--train-split", self.train_split)
        _split_name("--test-split", self.test_split)
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
        from kdcache.losses import KD_LOSSES

        if self.loss not in KD_LOSSES:
            raise KDCacheError(f"unknown --loss '{self.loss}'; choose one of {', '.join(KD_LOSSES)} "
                               f"(closest: {closest(self.loss, KD_LOSSES)})")
        from kdcache.models import check_model_name

        for name in self.students:
            check_model_name(name)  # looked up, not built: an unknown student fails before any data is read
        if self.teacher:
            _teacher_name(self.teacher)
        _dataset_name(self.dataset)


def _check_augment(augment, mix, mix_alpha) -> None:
    from kdcache.augment import MIXES, check_spec

    if augment is not None:
        check_spec(augment)
    if mix is not None and mix not in MIXES:
        raise KDCacheError(f"--mix {mix!r} is not supported; use {' or '.join(MIXES)}")
    _positive("mix_alpha", mix_alpha)


MAX_WORKERS = 512  # loader processes: more than any machine has cores, and each one holds a copy of the dataset


def _workers(value):
    _non_negative("num_workers", value)
    if value > MAX_WORKERS:
        raise KDCacheError(f"--num-workers {value} would start that many loader processes; use at most {MAX_WORKERS} "
                           "(about one per CPU core)")


def _split_name(flag, name):
    """A split is a group in the store and a folder of an imagefolder: a plain name, never a path."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or ".." in name:
        raise KDCacheError(f"{flag} {name!r} is not a split name; use letters, digits, '_', '-' and '.' "
                           "(no '/', '..' or leading '.'), e.g. train, test, val")


def _teacher_name(spec):
    """A teacher is a checkpoint (perhaps written by an earlier stage) or a model name, checked here."""
    from kdcache.models import check_model_name

    if not (os.path.exists(spec) or "/" in spec or os.sep in spec or spec.endswith((".pt", ".pth", ".ckpt", ".bin"))):
        check_model_name(spec)


def _dataset_name(spec):
    """The name part of a dataset spec, looked up without loading anything (data is read when a stage runs)."""
    from kdcache import data

    name, colon, _ = spec.partition(":")
    if not (name in data.DATASETS or name in data.TORCHVISION or (colon and name)):
        raise KDCacheError(f"unknown dataset '{spec}'; did you mean {closest(spec, data.dataset_names())}?")


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
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)  # plain data only: no tags that build objects
    except yaml.YAMLError as e:
        raise KDCacheError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:
        raise KDCacheError(f"config file '{path}' is not UTF-8 text (byte {e.start}); save it as UTF-8 YAML") from None
    except OSError as e:
        raise KDCacheError(f"cannot read config file '{path}': {e.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KDCacheError(f"config file '{path}' must hold a mapping of option: value")
    return data


def resolve(cls, *, file_values: dict | None = None, overrides: dict | None = None, source: str = "config"):
    """`cls` built from defaults, then `file_values`, then `overrides` (None means 'not given')."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    aliases = {"student": "students", "split": "splits", "activation": "activations", "feature": "features",
               "augment_split": "augment_splits"}
    values = {}
    for layer in (file_values or {}, overrides or {}):
        for key, value in layer.items():
            if not isinstance(key, str):
                raise KDCacheError(f"option names in {source} are text, but {key!r} is a {type(key).__name__}; "
                                   "write it as option: value")
            key = aliases.get(key.replace("-", "_"), key.replace("-", "_"))
            if key not in names:
                raise KDCacheError(f"unknown option '{key}' in {source}; did you mean {closest(key, names)}?")
            if value is None:
                continue
            kind = _kind(hints[key])
            if kind is list and not isinstance(value, (list, tuple)):
                value = [value]
            values[key] = _coerce(key, value, kind)
    cfg = cls(**values)
    cfg.validate()
    return cfg


def _kind(hint):
    """The type a field holds, from its annotation: str, int, float, bool or list (`X | None` is X)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _coerce(key, value, kind):
    """YAML and flags give strings, ints and floats; make them the field's type or say why not.

    Every number is checked here, once for every option: an int must fit int64 (what torch and numpy
    take as seeds and sizes), a float finite in float32 (NaN or inf would wreck a run, not stop it).
    """
    if kind is bool:
        if not isinstance(value, bool):
            raise KDCacheError(f"option '{key}' must be true or false, got {_brief(value)}")
        return value
    if kind in (int, float):
        number = _number(value, kind)
        if number is None:
            what = "an integer" if kind is int else "a number"
            raise KDCacheError(f"option '{key}' must be {what}, got {_brief(value)}")
        if kind is float and not abs(number) <= FLOAT32_MAX:  # NaN fails this too
            raise KDCacheError(f"option '{key}' must be a finite number (|x| <= 3.4e38, float32's range), got {_brief(value)}")
        if kind is int and not -INT64 <= number < INT64:
            raise KDCacheError(f"option '{key}' must be an integer of at most 63 bits (|x| < 2**63), got {_brief(value)}")
        return number
    if kind is list:
        if not all(isinstance(v, str) for v in value):
            raise KDCacheError(f"option '{key}' must be a list of names, got {_brief(value)}")
        return list(value)
    if kind is str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise KDCacheError(f"option '{key}' must be a name or path (text), got {type(value).__name__} {_brief(value)}")
        return value
    return value


def _brief(value) -> str:
    """A value for a one-line message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value, kind):
    """`value` as an int or float (`kind`), or None when it is not one (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    if kind is int and isinstance(value, str):
        try:
            return int(value)  # exact for "12345678901234567890", which float() would round
        except ValueError:
            pass  # "1e3" is an integer too
    try:
        number = value if isinstance(value, int) else float(value)
    except ValueError:
        return None
    if kind is float:
        try:
            return float(number)
        except OverflowError:  # an int beyond 1e308: no finite float
            return math.inf
    if isinstance(number, float):
        return int(number) if number.is_integer() else None  # 3.0 is 3; 3.5, nan and inf are no integers
    return number


def as_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
