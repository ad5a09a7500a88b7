"""Every setting of every stage, declared once: its default, the reason for it, its --help section
and its choices. The command line's options are generated from these fields (kdcache/cli.py).

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

from kdcache import choices
from kdcache.errors import KDCacheError, closest


INT64 = 2**63  # ints must fit int64: torch and numpy take seeds and sizes as int64
FLOAT32_MAX = 3.4028234663852886e38  # floats must be finite in float32, the dtype training computes in
DTYPES = choices.DTYPES  # int8: per-row affine quantized logits; uint8: top-k codes (kdcache/encodings.py)
TARGETS_IN = choices.TARGETS_IN
GROUPS = ("data", "teacher", "store", "training", "KD", "views", "run")  # --help's sections, in this order


def option(default, help: str, *, group: str, choices=None, flag: str | None = None):
    """A config field declared once: its default, its help, its --help section, and its choices,
    from which the command line's options are generated (kdcache/cli.py) and config files checked.

    `flag`: the option's name when it is not --FIELD-NAME (`--student` for `students`: repeatable).
    A list default is copied for every config; `choices` is a tuple from kdcache/choices.py.
    """
    metadata = {"help": help, "group": group, "choices": choices, "flag": flag}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Common:
    """Options that mean the same for every stage: declared once, inherited by each stage's config."""

    dataset: str = option("digits", "digits, digit-pairs, fake[:size=N,classes=C,image=S], cifar10, cifar100, mnist, "
                          "fashionmnist, svhn, imagefolder:PATH[,image=S] or module:callable; text for language models: pydoc, "
                          "text:FILE_OR_GLOB, jsonl:FILE[:FIELD], hfds:PATH; training checks it against the cache's "
                          "fingerprint", group="data")
    data_root: str | None = option(None, "folder holding a torchvision dataset (nothing is ever downloaded)", group="data")
    weights: str | None = option(None, "state dict or model.pt for a --teacher given by name (the way a "
                                 "module:callable teacher loads)", group="teacher")
    random_teacher: bool = option(False, "allow a --teacher NAME without --weights: a randomly initialised network "
                                  "(benchmarks); refused otherwise", group="teacher")
    augment_seed: int = option(0, "base of every view's seed: with the sample index and view number it names each "
                               "view for good", group="views")
    mix: str | None = option(None, "mix each view with a recorded partner sample", group="views", choices=choices.MIXES)
    mix_alpha: float = option(1.0, "Beta(alpha, alpha) mixing weights: the mixup and CutMix papers' CIFAR setting",
                              group="views")
    seq_len: int = option(128, "text datasets: tokens per sequence (windows overlap by one token, so every next token "
                          "is a target once); at most the teacher's context", group="data")
    tokenizer: str | None = option(None, "text datasets: tokenizer.json, a folder holding one, or bpe:N (a byte-level "
                                   "BPE of N tokens trained on the train split); default: the teacher's, or the cache's",
                                   group="data")
    packing: str = option("document", "text datasets: a sequence holds one document (no attention across documents), "
                          "or documents packed end to end (no target across a boundary)", group="data",
                          choices=choices.PACKINGS)
    max_sequences: int | None = option(None, "text datasets: keep the first N sequences of each split (quick runs)",
                                       group="data")
    device: str = option("auto", "auto (CUDA when there is one, else the CPU), cpu, cuda, cuda:N or mps", group="run")
    num_workers: int = option(0, "DataLoader worker processes; 0 keeps small datasets simplest and fastest", group="run")
    resume: bool = option(False, "finish an interrupted run: a dump's STORE.partial, a training's last epoch; "
                          "finished students are kept", group="run")
    overwrite: bool = option(False, "replace what --out holds (a store only once the new one is complete)", group="run")


@dataclass
class DumpConfig(Common):
    teacher: str = option("", "kdcache checkpoint (OUT/<student>/model.pt), or a model name with --weights (timm:NAME, "
                          "hf:PATH, module:callable)", group="teacher")
    splits: list = option(["train", "test"], "split to dump; repeat for several (test logits give teacher agreement "
                          "at evaluation)", group="data", flag="--split")
    out: str = option("", "store to write: PATH.zarr (Zarr v3 directory) or PATH.h5 (HDF5 file)", group="store")
    activations: list = option([], "teacher module to store, NAME[:full|attention|pool]; repeatable", group="store",
                               flag="--activation")
    dtype: str = option("float16", "storage dtype of logits and activations: float16 loses < 1e-3 relative, far below "
                        "KD noise; int8: logits quantized per row; uint8: --topk values as 8-bit codes", group="store",
                        choices=choices.DTYPES)
    topk: int | None = option(None, "keep the K largest logits per view (+ classes, logsumexp, exact tail mass): "
                              "ImageNet-scale caches", group="store")
    topk_indices: str = option("plain", "class indices of --topk/--sample: plain integers, or packed in ceil(log2 C) "
                               "bits each (10 at 1,000 classes)", group="store", choices=choices.INDEX_LAYOUTS)
    sample: int | None = option(None, "store S classes drawn per view from the tempered teacher instead "
                                "(random-sampling KD)", group="store")
    sample_temperature: float = option(4.0, "--sample: the draws' temperature, the only one students can train at",
                                       group="store")
    sample_seed: int = option(0, "--sample: with each row's logits, names its draws", group="store")
    chunk_bytes: int = option(1 << 20, "uncompressed bytes per chunk: ~1 MiB reads fast and rewrites cheaply on resume",
                              group="store")
    views: int = option(1, "teacher outputs per training sample, each on its own augmented view", group="views")
    augment: str = option("none", "the views' transform: cifar, imagenet, digits, none or module:callable",
                          group="views")
    augment_splits: list = option(["train"], "split that gets views (the rest keep the eval transform, one view); "
                                  "repeatable", group="views", flag="--augment-split")
    batch_size: int = option(256, "teacher inputs per batch (B // V samples of V views): bounded by device memory",
                             group="run")
    allow_nonfinite: bool = option(False, "keep NaN/Inf teacher outputs instead of stopping at the first one",
                                   group="teacher")
    amp: bool | None = option(None, "CUDA autocast for the teacher; unset: only when --dtype is not float32, so a "
                              "float32 store is float32-accurate (bfloat16 stores: bfloat16 autocast)", group="teacher")

    def validate(self) -> None:
        _check_choices(self)
        if not self.teacher:
            raise KDCacheError("dump-teacher needs --teacher (a kdcache checkpoint, or a model name with --weights)")
        if not self.out:
            raise KDCacheError("dump-teacher needs --out STORE.zarr or STORE.h5")
        from kdcache.store import backend_for  # deferred: the backends import zarr and h5py

        backend_for(self.out)  # an unknown suffix, or HDF5 at a URL, before any name is looked up
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
class TrainConfig(Common):
    students: list = option([], "student model name; repeat for a sweep", group="training", flag="--student")
    cache: str | None = option(None, "teacher store from dump-teacher; without it, plain training (or online KD with "
                               "--teacher)", group="KD")
    teacher: str | None = option(None, "online KD (no cache), for comparison: a checkpoint, or a model name with "
                                 "--weights", group="teacher")
    train_split: str = option("train", "split to train on", group="data")
    test_split: str = option("test", "split to evaluate on (teacher agreement where the cache holds it)", group="data")
    epochs: int = option(10, "passes over the training split", group="training")
    batch_size: int = option(64, "samples per step: small datasets like digits need many steps more than big batches",
                             group="training")
    optimizer: str = option("sgd", "SGD with Nesterov momentum, or AdamW", group="training", choices=choices.OPTIMIZERS)
    lr: float = option(0.05, "learning rate: with SGD and BN everywhere, 0.05 trains CIFAR-style nets stably",
                       group="training")
    momentum: float = option(0.9, "SGD momentum", group="training")
    weight_decay: float = option(5e-4, "weight decay: the CIFAR ResNet default", group="training")
    lr_schedule: str = option("cos", "cos (to zero) or step (x0.1 at 50% and 75% of training)", group="training",
                              choices=choices.LR_SCHEDULES)
    seed: int = option(0, "model init, data order, and which stored view each sample replays each epoch",
                       group="training")
    alpha: float = option(0.9, "weight of the KD term at the end of its schedule (Hinton: most weight on soft targets)",
                          group="KD")
    alpha_start: float = option(0.0, "weight of the KD term at the start of its schedule (unused by constant)",
                                group="KD")
    alpha_schedule: str = option("constant", "how alpha goes from --alpha-start to --alpha over training (constant: "
                                 "alpha from the first step)", group="KD", choices=choices.SCHEDULES)
    temperature: float = option(4.0, "softens the targets; 4 is the common choice at CIFAR-scale class counts",
                                group="KD")
    loss: str = option("soft_target", "logit loss between student and teacher; token caches: soft_target (forward "
                       "KL), reverse_kl or gjsd", group="KD", choices=choices.LOSSES)
    jsd_beta: float = option(0.5, "--loss gjsd: the teacher's weight in the mixture (0.5: symmetric JSD)", group="KD")
    features: list = option([], "feature KD pair S_LAYER=T_ACT[:LOSS]; repeatable. T_ACT: a cached activation (with "
                            "--cache) or a teacher module (with --teacher); LOSS: fitnet (default), attention, "
                            "activation_boundaries, similarity, pkt, rkd", group="KD", flag="--feature")
    feature_weight: float = option(1.0, "weight of the summed feature losses at the end of its schedule; their scales "
                                   "differ ~1000x: set it per loss", group="KD")
    feature_weight_start: float = option(0.0, "feature weight at the start of its schedule (unused by constant)",
                                         group="KD")
    feature_weight_schedule: str = option("constant", "how the feature weight goes from its start to its end",
                                          group="KD", choices=choices.SCHEDULES)
    topk_reconstruction: str = option("sparse", "top-k caches: KL over the K classes plus a tail bucket, or dense "
                                      "(FKD's even tail)", group="KD", choices=choices.TOPK_RECONSTRUCTIONS)
    baseline: bool = option(False, "also train each student without KD, for comparison", group="training")
    out: str = option("runs/train", "output folder: OUT/<student>/{model.pt, metrics.jsonl}, OUT/summary.csv",
                      group="run")
    augment: str | None = option(None, "the student's own views (no cache, or a clean one): cifar, imagenet, digits, "
                                 "none or module:callable; a view cache brings its own", group="views")
    views: int = option(0, "views per sample to draw from with --augment (0: a fresh one each epoch)", group="views")
    view_policy: str = option("random", "which view a sample trains on each epoch: random, or cycle (each once per V "
                              "epochs)", group="views", choices=choices.VIEW_POLICIES)
    verify_replay: int = option(64, "views of a view cache regenerated and checked against their dump-time digests "
                                "before training (0: none)", group="views")
    verify: bool = option(False, "check every chunk of the cache against its checksum before training (every block "
                          "read is checked anyway)", group="KD")
    targets_in: str = option("auto", "where the teacher targets live: memory, gpu or stream (blocks read in the "
                             "background); auto picks by size and device", group="KD", choices=choices.TARGETS_IN)
    buffer_blocks: int = option(8, "--targets-in stream: whole blocks shuffled together (more: better mixing, more "
                                "memory)", group="KD")
    jobs: int = option(1, "students trained at once, one per GPU (or sharing the CPU's cores): a sweep convenience",
                       group="run")

    def validate(self) -> None:
        _check_choices(self)
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
        _positive("buffer_blocks", self.buffer_blocks)
        _positive("jobs", self.jobs)
        if self.views and self.augment in (None, "none") and not self.cache:
            raise KDCacheError(f"--views {self.views} draws from augmented views of each sample; pass --augment PRESET "
                               "with it (cifar, imagenet, digits or module:callable)")
        _non_negative("feature_weight", self.feature_weight)
        _non_negative("feature_weight_start", self.feature_weight_start)
        if self.features:
            if not (self.cache or self.teacher):
                raise KDCacheError("--feature needs a teacher: pass --cache STORE (dumped with --activation) or --teacher CKPT")
            from kdcache.features import parse_features

            parse_features(self.features)  # syntax and loss names: a pipeline fails before its first stage
        from kdcache.models import check_model_name

        for name in self.students:
            check_model_name(name)  # looked up, not built: an unknown student fails before any data is read
        if self.teacher:
            _teacher_name(self.teacher)
        _dataset_name(self.dataset)


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a config field: --FIELD-NAME, or the one its declaration names."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _check_choices(cfg) -> None:
    """Every field declared with choices holds one of them (flags are checked by click; config files here)."""
    for f in dataclasses.fields(cfg):
        allowed, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if allowed and value is not None and value not in allowed:
            raise KDCacheError(f"{flag_of(f)} {value!r} is not one of {', '.join(allowed)} "
                               f"(closest: {closest(str(value), allowed)})")


def _check_augment(augment, mix, mix_alpha) -> None:
    from kdcache.augment import check_spec  # deferred: augment imports torch

    if augment is not None:
        check_spec(augment)
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
    if name == "pydoc":
        return
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
    # a field's own flag is a name for it too (student: [a, b] for students), as on the command line
    aliases = {flag_of(f)[2:].replace("-", "_"): f.name for f in names.values() if f.metadata.get("flag")}
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
