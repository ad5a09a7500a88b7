"""Augmentation that can be replayed, so a cache holds the teacher's opinion of the very input the
student trains on (Beyer et al., CVPR 2022: teacher and student must see the same view).

A view is named for good by (base seed, sample index, view number): its seed is a pure integer
function of the three, and the transform runs under it (torch, numpy and Python RNGs), so the same
view comes back in any process, DataLoader worker or restart. `dump-teacher --views K` runs the
teacher on K views of each sample and stores, per view, its seed, a digest of its input and (with
--mix) its partner and mixing weights; `train-student` regenerates one stored view per sample and
epoch (FKD, ECCV 2022, replays crops the same way) after checking a sample of digests.
"""
from __future__ import annotations

import hashlib
import random
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from kdcache import choices, seeds
from kdcache import store as stores
from kdcache.errors import KDCacheError, closest
from kdcache.imports import user_callable
from kdcache.progress import log

# --- presets: small transform recipes on the dataset's normalized [C, H, W] tensors ------------
# Geometric ops only, applied after the eval transform, so every dataset's tensors work as they are
# and padding takes the data's black (`SplitData.background`), not the normalized mean.

PRESETS: dict = {}


def register_preset(fn):
    """Register `fn(size, fill) -> transform` under its function name (a second one wins, with a warning)."""
    if fn.__name__ in PRESETS:
        warnings.warn(f"augmentation preset '{fn.__name__}' is registered twice; the last one wins")
    PRESETS[fn.__name__] = fn
    return fn


@register_preset
def cifar(size, fill):
    """Random crop of the image padded by 4 pixels, horizontal flip half the time: the CIFAR
    ResNet recipe (He et al. 2016) of every CIFAR KD benchmark."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomCrop(size, padding=4, fill=fill), v2.RandomHorizontalFlip()])


@register_preset
def imagenet(size, fill):
    """Random resized crop (8-100% of the area, aspect 3/4 to 4/3) back to full size, horizontal
    flip: the ImageNet training recipe (Szegedy et al. 2015; torchvision's references)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])


@register_preset
def digits(size, fill):
    """Rotation up to 10 degrees, shift up to 10%, scale 0.9-1.1 (the usual MNIST recipe), never a
    flip (a mirrored 2 is no digit); bilinear: nearest-neighbour leaves upsampled strokes jagged."""
    from torchvision.transforms import v2

    return v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1),
                           interpolation=v2.InterpolationMode.BILINEAR, fill=fill)


@register_preset
def none(size, fill):
    """The input unchanged: the single clean view of a cache made without augmentation."""
    from torchvision.transforms import v2

    return v2.Identity()


def preset_names() -> list[str]:
    return sorted(PRESETS) + ["module:callable"]


def check_spec(spec: str, flag: str = "--augment") -> None:
    """Fail early on a preset name that does not exist (module:callable is imported when used)."""
    if spec not in PRESETS and ":" not in spec:
        raise KDCacheError(f"{flag} {spec!r} is not a preset; use one of {', '.join(preset_names())} "
                           f"(closest: {closest(spec, PRESETS)})")


@dataclass(frozen=True)
class Augmentation:
    """A transform by name: `spec` as the user gave it, `transform` a function of a [C, H, W] tensor."""

    spec: str
    transform: Callable

    @property
    def description(self) -> str:
        """The transform's repr on one line, memory addresses dropped (a function's repr names one):
        recorded at dump time, compared at replay time."""
        return re.sub(r" at 0x[0-9a-fA-F]+", "", " ".join(repr(self.transform).split()))


def build_augmentation(spec: str, data) -> Augmentation:
    """The transform `spec` for the tensors of `data` (a SplitData): a preset, sized to the data and
    padding with its black, or `module:callable`, called with no arguments, returning a transform."""
    check_spec(spec)
    if spec in PRESETS:
        size = tuple(data.dataset[0][0].shape[-2:])
        fill = data.background if isinstance(data.background, (int, float)) else list(data.background)
        return Augmentation(spec, PRESETS[spec](size, fill))
    transform = user_callable(spec, "augmentation")()
    if not callable(transform):
        raise KDCacheError(f"augmentation '{spec}' returned a {type(transform).__name__}, not a transform; "
                           "the callable must return a function of a [C, H, W] tensor")
    return Augmentation(spec, transform)


def library_versions() -> dict:
    """What a view's pixels depend on besides the recipe: recorded at dump, named when replay fails."""
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__}


# --- seeds: pure integer functions, the same in every process (kdcache/seeds.py) ----------------

_VIEW, _CHOICE, _PARTNER = seeds.VIEW, seeds.CHOICE, seeds.PARTNER
_hash, _MASK64 = seeds.seed_hash, seeds.MASK64


def view_seeds(base_seed: int, index, view):
    """uint64 seed of view `view` of sample `index`: an int, or an array where an argument is one
    ([N, 1] and [V] give [N, V]). Pinned by a test: changing it orphans every cache made before."""
    return _hash(_VIEW, base_seed, index, view)


def choose_view(seed: int, epoch: int, index: int, count: int | None, policy: str = "random") -> int:
    """Which of `count` views sample `index` trains on in `epoch`, a pure function of the run's seed,
    so every worker and a resumed run agree. random: drawn anew each epoch; cycle: each view once
    every `count` epochs, from a per-sample start. `count` None: view `epoch`, a fresh one each epoch."""
    if count is None:
        return epoch
    if policy == "cycle":
        return int((epoch + int(_hash(_CHOICE, seed, index, 0))) % count)
    return int(_hash(_CHOICE, seed, index, epoch + 1) % count)


@contextmanager
def seeded(seed: int):
    """Run the block with torch's CPU generator, numpy's global RNG and Python's `random` seeded from
    `seed` (a transform library draws from one of them), then put all three back as they were, so
    making a view never shifts the caller's random stream (and training stays resumable)."""
    seed = int(seed) & _MASK64
    saved = torch.default_generator.get_state(), np.random.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)  # the CPU generator alone: never touches CUDA's
    np.random.seed((seed ^ (seed >> 32)) & 0xFFFFFFFF)  # numpy's global seed takes 32 bits
    random.seed(seed)
    try:
        yield
    finally:
        torch.default_generator.set_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])


def digest(x: torch.Tensor) -> int:
    """64-bit blake2b of a tensor's dtype, shape and bytes: a short name for one exact input."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{x.dtype}{tuple(x.shape)}".encode())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little")


# --- mixing: a partner and weights per view, drawn from the view's seed -------------------------

MIXES = choices.MIXES


@dataclass(frozen=True)
class Mix:
    """How one view mixes its sample with another: stored per view, replayed as stored."""

    partner: int  # index of the sample mixed in
    lam: float  # weight of the view's own image and label (exactly a float32: the store keeps float32)
    box: tuple = (0, 0, 0, 0)  # cutmix: (top, left, bottom, right) of the partner's patch; mixup: empty


def draw_mix(kind: str, alpha: float, seed: int, index: int, n: int, size) -> Mix:
    """The mix of one view, from its seed alone, never from a batch (the dump's batches are not the
    student's). The partner is any other sample, uniformly.
    mixup (Zhang et al. 2018): x = lam x_i + (1 - lam) x_j, lam ~ Beta(alpha, alpha).
    CutMix (Yun et al. 2019): x_i with a box of about (1 - lam) of its area, centred uniformly and
    clipped at the border, taken from x_j; lam is then the fraction of x_i left.
    Labels mix with the same lam."""
    rng = np.random.default_rng(int(_hash(_PARTNER, seed)))
    partner = int((index + 1 + rng.integers(n - 1)) % n) if n > 1 else index
    lam = float(rng.beta(alpha, alpha))
    box = (0, 0, 0, 0)
    if kind == "cutmix":
        h, w = size
        cut = np.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        top, bottom = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
        left, right = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
        box = (int(top), int(left), int(bottom), int(right))
        lam = 1.0 - (bottom - top) * (right - left) / (h * w)
    return Mix(partner, float(np.float32(lam)), box)


def apply_mix(kind: str, x: torch.Tensor, partner: torch.Tensor, mix: Mix) -> torch.Tensor:
    """`x` [C, H, W] mixed with the partner's view as `mix` says (the same arithmetic at dump and replay)."""
    if kind == "mixup":
        return x * mix.lam + partner * (1.0 - mix.lam)
    top, left, bottom, right = mix.box
    x = x.clone()
    x[:, top:bottom, left:right] = partner[:, top:bottom, left:right]
    return x


# --- the recipe of a split's views, and the datasets that make them -----------------------------

# Per-view arrays a view cache stores beside its logits: {name: (dtype, shape per view)}, each [N, V, ...].
RECORDS = {"view_seeds": ("uint64", ()), "view_digests": ("uint64", ())}
MIX_RECORDS = {"mix_partner": ("int64", ()), "mix_lambda": ("float32", ()), "mix_box": ("int32", (4,))}


class ViewRecipe:
    """How view `v` of sample `i` of one split is made: `recipe.make(i, v)` -> (x [C, H, W], Mix or None).

    Seeds and mixes are derived from `base_seed` (a dump, online KD, plain training), or, when
    replaying a cache, read from its `stored` arrays: the cache is the truth, a later change to
    how they are derived cannot move them.
    """

    def __init__(self, dataset, augmentation: Augmentation, *, base_seed: int, labels, num_classes: int,
                 mix: str | None = None, mix_alpha: float = 1.0, stored: dict | None = None):
        self.dataset, self.augmentation = dataset, augmentation
        self.base_seed, self.mix_kind, self.mix_alpha = base_seed, mix, mix_alpha
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = num_classes
        self.stored = stored or {}
        self.size = tuple(dataset[0][0].shape[-2:])  # cutmix boxes are drawn in these pixels

    def seed(self, i: int, v: int) -> int:
        if "view_seeds" in self.stored:
            return int(self.stored["view_seeds"][i, v])
        return int(view_seeds(self.base_seed, i, v))

    def mix(self, i: int, v: int) -> Mix | None:
        if self.mix_kind is None:
            return None
        if "mix_partner" in self.stored:
            s = self.stored
            box = tuple(int(b) for b in s["mix_box"][i, v])
            return Mix(int(s["mix_partner"][i, v]), float(s["mix_lambda"][i, v]), box)
        return draw_mix(self.mix_kind, self.mix_alpha, self.seed(i, v), i, len(self.labels), self.size)

    def view(self, i: int, seed: int) -> torch.Tensor:
        """Sample `i` through the transform under `seed`."""
        with seeded(seed):
            return self.augmentation.transform(self.dataset[i][0])

    def make(self, i: int, v: int) -> tuple[torch.Tensor, Mix | None]:
        seed, mix = self.seed(i, v), self.mix(i, v)
        x = self.view(i, seed)
        if mix is not None:  # the partner's own view, seeded from this view's seed
            x = apply_mix(self.mix_kind, x, self.view(mix.partner, int(_hash(_PARTNER, seed, mix.partner))), mix)
        return x, mix

    def target(self, i: int, mix: Mix | None):
        """The class of sample `i`, or for a mixed view the mixed label [num_classes] float32
        (cross-entropy with it is lam CE(y_i) + (1 - lam) CE(y_j))."""
        if mix is None:
            return int(self.labels[i])
        y = torch.zeros(self.num_classes)
        y[self.labels[i]] += mix.lam
        y[self.labels[mix.partner]] += 1.0 - mix.lam
        return y

    def records(self) -> dict:
        """{array name: (dtype, shape per view)} of what a dump stores per view of this recipe."""
        return dict(RECORDS, **(MIX_RECORDS if self.mix_kind else {}))


class DumpViews(torch.utils.data.Dataset):
    """Sample `i` as a dump's teacher sees it: (x [V, C, H, W], record {array: [V, ...]}).

    The record holds each view's seed and input digest (uint64 bits carried as int64) and, with
    mixing, its partner, lambda and box. Without a recipe: the dataset's own input as one view.
    """

    def __init__(self, dataset, recipe: ViewRecipe | None, count: int):
        self.dataset, self.recipe, self.count = dataset, recipe, count

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if self.recipe is None:
            return self.dataset[i][0].unsqueeze(0), {}
        xs, seeds, digests, mixes = [], [], [], []
        for v in range(self.count):
            x, mix = self.recipe.make(i, v)
            xs.append(x)
            seeds.append(self.recipe.seed(i, v))
            digests.append(digest(x))
            mixes.append(mix)
        record = {"view_seeds": _as_int64(seeds), "view_digests": _as_int64(digests)}
        if self.recipe.mix_kind:
            record["mix_partner"] = torch.tensor([m.partner for m in mixes], dtype=torch.int64)
            record["mix_lambda"] = torch.tensor([m.lam for m in mixes], dtype=torch.float32)
            record["mix_box"] = torch.tensor([m.box for m in mixes], dtype=torch.int32)
        return torch.stack(xs), record


def _as_int64(values) -> torch.Tensor:
    """uint64 values as int64 tensors of the same bits (the DataLoader collates int64, not uint64)."""
    return torch.from_numpy(np.array(values, dtype=np.uint64).view(np.int64))


def as_stored(name: str, values: torch.Tensor) -> np.ndarray:
    """A collated record array [B, V, ...] in its stored dtype (uint64 back from its int64 bits)."""
    values = values.numpy()
    return values.view(np.uint64) if name in RECORDS else values  # seeds and digests: uint64


class TrainViews(torch.utils.data.Dataset):
    """(x, y, row) for training: sample `i` as the view `choose_view` picks for the current epoch.

    y: the class, or the mixed label [num_classes] of a mixed view. row: where the view's targets
    sit in the cache's flattened [N * V] table, `i * V + view` when the cache stores `per_view`
    targets, else `i` (a cache of one clean view per sample, or no cache).
    Call `set_epoch` before each epoch (DataLoader workers get the new value with their copy).
    """

    def __init__(self, recipe: ViewRecipe, *, count: int | None, policy: str, seed: int, per_view: bool):
        self.recipe, self.count, self.policy, self.seed, self.per_view = recipe, count, policy, seed, per_view
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.recipe.labels)

    def view_of(self, i: int) -> int:
        return choose_view(self.seed, self.epoch, i, self.count, self.policy)

    def __getitem__(self, i):
        v = self.view_of(i)
        x, mix = self.recipe.make(i, v)
        return x, self.recipe.target(i, mix), i * self.count + v if self.per_view else i

    def describe(self) -> dict:
        r = self.recipe
        return {"augment": r.augmentation.spec, "transform": r.augmentation.description, "views": self.count,
                "view_policy": self.policy, "base_seed": r.base_seed, "mix": r.mix_kind,
                "targets": "per view" if self.per_view else "per sample"}


# --- the dump side ---------------------------------------------------------------------------

def dump_recipe(cfg, data) -> ViewRecipe | None:
    """The recipe of `data`'s views in a dump (DumpConfig `cfg`), None for a split that is not augmented."""
    if not augments(cfg) or data.split not in cfg.augment_splits:
        return None
    return ViewRecipe(data.dataset, build_augmentation(cfg.augment, data), base_seed=cfg.augment_seed,
                      labels=data.labels, num_classes=data.num_classes, mix=cfg.mix, mix_alpha=cfg.mix_alpha)


def augments(cfg) -> bool:
    """Whether a dump stores views (anything but one clean view per sample)."""
    return cfg.views > 1 or cfg.augment != "none" or cfg.mix is not None


def dump_attrs(cfg) -> dict | None:
    """The root attrs block that says how a cache's views were made (None: one clean view)."""
    if not augments(cfg):
        return None
    return {"preset": cfg.augment, "views": cfg.views, "seed": cfg.augment_seed, "mix": cfg.mix,
            "mix_alpha": cfg.mix_alpha if cfg.mix else None, "splits": list(cfg.augment_splits),
            "versions": library_versions()}


# --- the train side --------------------------------------------------------------------------

def training_views(cfg, data, cache=None) -> TrainViews | None:
    """The student's inputs for TrainConfig `cfg` on split `data`, or None for the dataset as it is.

    1. A cache with views of this split: its views replayed, seeds and mixes as stored, after
       `check_replay`; the cache brings its own --augment, --views, --mix.
    2. Otherwise `--augment` (and `--mix`): the student's own views, seeded as a dump with the same
       --augment-seed would seed them: plain training, online KD, or, over a cache of clean
       views, KD with targets made on other inputs (the inconsistent case, kept for comparison).
    """
    recorded = (cache.attrs.get("augment") if cache is not None else None) or {}
    if data.split in recorded.get("splits", []):
        return _replayed(cfg, data, cache, recorded)
    if cfg.mix and cache is not None:
        raise KDCacheError(f"--mix {cfg.mix}: cache '{cache.path}' holds the teacher's outputs on unmixed inputs, "
                           "so no target matches a mixed one; dump the cache with --mix "
                           f"{cfg.mix}, or mix online with --teacher CKPT instead of --cache")
    if cfg.augment in (None, "none") and not cfg.mix:
        return None
    check_mix_loss(cfg.loss, cfg.mix)
    recipe = ViewRecipe(data.dataset, build_augmentation(cfg.augment or "none", data), base_seed=cfg.augment_seed,
                        labels=data.labels, num_classes=data.num_classes, mix=cfg.mix, mix_alpha=cfg.mix_alpha)
    if cache is not None:
        log.info(f"note: cache '{cache.path}' holds the teacher's outputs on clean inputs while the student sees "
                 f"--augment {cfg.augment} views (inconsistent targets); dump-teacher --views K --augment "
                 f"{cfg.augment} makes consistent ones")
    return TrainViews(recipe, count=cfg.views or None, policy=cfg.view_policy, seed=cfg.seed, per_view=False)


def _replayed(cfg, data, cache, recorded: dict) -> TrainViews:
    for name, asked, held in (("augment", cfg.augment, recorded["preset"]), ("views", cfg.views or None, recorded["views"]),
                              ("mix", cfg.mix, recorded["mix"])):
        if asked is not None and asked != held:
            raise KDCacheError(f"--{name} {asked}: cache '{cache.path}' replays the views it was dumped with "
                               f"(--{name} {held}); drop --{name}, or dump a cache with --{name} {asked}")
    check_mix_loss(cfg.loss, recorded["mix"])
    with stores.open_store(cache.path) as store:
        recipe = stored_recipe(store, data, recorded, named=cfg.augment)
    check_replay(recipe, recipe.stored["view_digests"], cfg.verify_replay, recorded, cache.splits[data.split], data.split)
    return TrainViews(recipe, count=recorded["views"], policy=cfg.view_policy, seed=cfg.seed, per_view=True)


def check_mix_loss(loss: str, mix: str | None) -> None:
    if mix and loss in ("dkd", "nkd"):
        raise KDCacheError(f"--loss {loss} splits the teacher's distribution at the true class, and a mixed input "
                           f"(--mix {mix}) has two; use --loss soft_target, logits or mutual with mixing")


def check_stored_preset(preset, named: str | None, where: str) -> None:
    """Refuse the views' transform a store names unless it is a preset or `named`, the --augment
    the user gave: stores are shared, so what they name never decides what code is imported."""
    if not isinstance(preset, str):
        raise KDCacheError(f"store {where} records no augmentation name for its views (got {preset!r}); "
                           "dump the cache again")
    if ":" in preset and preset != named:
        raise KDCacheError(f"store {where} says its views were made by code ({preset}), and kdcache runs code only "
                           f"when you name it, never because a store does; if you trust it, pass --augment {preset}")


def stored_recipe(store, data, recorded: dict, *, named: str | None = None) -> ViewRecipe:
    """The recipe of the views of `data`'s split in an open `store`, whose root attrs `augment`
    block is `recorded`: seeds and mixes as stored (each per-view array read once, whole). The
    transform is the recorded preset, or the recorded module:callable if it is `named` (the user's
    --augment), see check_stored_preset."""
    check_stored_preset(recorded.get("preset"), named, store.path)
    names = [name for name in (*RECORDS, *MIX_RECORDS) if store.has_array(f"{data.split}/{name}")]
    reads = stores.CheckedReads(store, data.split, names) if names else None  # each block against its recorded crc32
    stored = {name: reads.read(name) for name in names}
    return ViewRecipe(data.dataset, build_augmentation(recorded["preset"], data), base_seed=recorded["seed"],
                      labels=data.labels, num_classes=data.num_classes, mix=recorded["mix"],
                      mix_alpha=recorded["mix_alpha"] or 1.0, stored=stored)


def check_replay(recipe: ViewRecipe, digests: np.ndarray, n: int, recorded: dict, split_attrs: dict, split: str) -> None:
    """Regenerate `n` views spread over the split (always the first) and compare each input's digest
    with the one stored at dump time; at the first mismatch stop, naming the view and the likely cause."""
    samples, views = digests.shape
    order = np.random.default_rng(0).permutation(samples * views)  # fixed: every run checks the same views
    picks = ([0] + [int(f) for f in order[:n] if f != 0][: n - 1]) if n > 0 else []
    for flat in picks:
        i, v = divmod(flat, views)
        got, want = digest(recipe.make(i, v)[0]), int(digests[i, v])
        if got != want:
            raise KDCacheError(f"replay check failed: {split} sample {i} view {v} regenerates an input that differs from "
                               f"the one the teacher saw at dump time (digest {got:016x}, stored {want:016x}); "
                               f"{_suspect(recipe, recorded, split_attrs, i, v)}")


def _suspect(recipe: ViewRecipe, recorded: dict, split_attrs: dict, i: int, v: int) -> str:
    """What most likely changed between the dump and now, and what to do: the transform, the libraries
    that run it, the seed derivation, or else the code behind an unchanged description."""
    redo = "dump the cache again with --overwrite"
    then, now = split_attrs.get("view_transform"), recipe.augmentation.description
    if then != now:
        return f"the transform changed (dumped with {then}, now {now}); {redo}, or restore the dump's transform"
    changed = [f"{k} {recorded.get('versions', {}).get(k)} -> {v_}" for k, v_ in library_versions().items()
               if recorded.get("versions", {}).get(k) != v_]
    if changed:
        return f"the libraries that run the transform changed ({', '.join(changed)}); {redo}, or restore those versions"
    if int(view_seeds(recipe.base_seed, i, v)) != recipe.seed(i, v):
        return f"kdcache derives view seeds differently from the version that made this cache; {redo}"
    return (f"same transform description ({now}) and library versions: the code behind '{recipe.augmentation.spec}' "
            f"or the dataset's images changed; {redo}, or restore them")
