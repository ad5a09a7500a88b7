"""Datasets by name, split by split, with the fingerprint that ties a cache to its data.

Registry names: `digits` (bundled with scikit-learn), `digit-pairs[:size=N,test_size=M]` (100
classes made from digits), `fake[:size=N,classes=C,image=S]`
(torchvision FakeData), torchvision datasets read from `--data-root` (never downloaded),
`imagefolder:PATH`, and `module:callable` for a user's own dataset.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from kdcache.imports import user_callable
from kdcache.errors import KDCacheError, closest

DATASETS: dict = {}


def register_dataset(fn):
    """Register `fn(split, root, **options) -> SplitData` under its function name."""
    DATASETS[fn.__name__.replace("_", "-")] = fn
    return fn


@dataclass
class SplitData:
    """One split of one dataset, and what identifies it.

    `dataset[i]` is `(x [C, H, W] float tensor, y int)`, in the split's fixed order.
    """

    name: str  # the spec the user gave, e.g. "digits" or "fake:size=512"
    split: str
    dataset: torch.utils.data.Dataset
    labels: np.ndarray  # [N] int64, in dataset order
    num_classes: int
    class_names: list = field(default_factory=list)
    transform: str = ""  # a readable description of the eval transform, kept in the store's attrs
    paths: list | None = None  # file paths in order, when the data are files
    background: float | tuple = 0.0  # a black pixel after the eval transform: what augmentation pads with

    def __len__(self):
        return len(self.labels)

    @property
    def in_chans(self) -> int:
        return int(self.dataset[0][0].shape[0])

    def fingerprint(self) -> str:
        """sha256 of what identifies the data in order: length, labels, and file paths or
        the raw bytes of up to 16 evenly spaced samples."""
        h = hashlib.sha256()
        h.update(f"{len(self)}|{self.num_classes}|".encode())
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        if self.paths is not None:
            h.update("\n".join(map(str, self.paths)).encode())
        else:
            for i in np.linspace(0, len(self) - 1, num=min(16, len(self)), dtype=np.int64):
                x = self.dataset[int(i)][0]
                h.update(np.ascontiguousarray(torch.as_tensor(x).numpy()).tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        """The dataset block of a store's split attrs."""
        return {
            "name": self.name, "split": self.split, "length": len(self), "num_classes": self.num_classes,
            "class_names": list(self.class_names), "fingerprint": self.fingerprint(),
        }


class WithIndex(torch.utils.data.Dataset):
    """Yields `(x, y, i)`: the sample index is how a batch finds its rows in the cache."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x, y, i


class TensorDataset(torch.utils.data.Dataset):
    """Images already in memory as one tensor [N, C, H, W]: the small built-in datasets."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray):
        self.images, self.labels = images, torch.as_tensor(labels, dtype=torch.int64)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def _check_split(dataset: str, split: str, splits) -> None:
    if split not in splits:
        raise KDCacheError(f"dataset '{dataset}' has no split '{split}'; its splits are {', '.join(splits)}")


# --- built-in: digits ----------------------------------------------------------------------

DIGITS_TRAIN = 1437  # 80% of scikit-learn's 1797 digits; the rest (360) is the test split
DIGITS_SPLIT_SEED = 0  # the fixed permutation that assigns digits to splits


def digits_tensors(split: str) -> tuple[torch.Tensor, np.ndarray]:
    """Digits as [N, 3, 32, 32] float tensors in [-1, 1] and their labels, in the fixed split order.

    The 8x8 images (values 0..16) are upsampled bilinearly to 32x32 and repeated to 3 channels,
    so every CIFAR-style model runs on them unchanged.
    """
    from sklearn.datasets import load_digits  # deferred: scikit-learn imports in ~1 s

    bunch = load_digits()
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(bunch.target))
    idx = order[:DIGITS_TRAIN] if split == "train" else order[DIGITS_TRAIN:]
    x = torch.tensor(bunch.images[idx], dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) - 0.5) / 0.5
    return x.repeat(1, 3, 1, 1).contiguous(), bunch.target[idx].astype(np.int64)


@register_dataset
def digits(split: str, root=None) -> SplitData:
    _check_split("digits", split, ("train", "test"))
    images, labels = digits_tensors(split)
    return SplitData(
        name="digits", split=split, dataset=TensorDataset(images, labels), labels=labels, num_classes=10,
        class_names=[str(i) for i in range(10)],
        transform="8x8 /16, bilinear to 32x32, (x-0.5)/0.5, 3 channels", background=-1.0,
    )


# --- built-in: digit pairs -------------------------------------------------------------------

# 20000 train pairs: 200 per class, and 2 epochs of cnn_small take 36 s on 2 CPU cores (measured:
# see digit_pairs); with 144 train images per digit, 200 draws per class rarely repeat a pair.
# 4000 test pairs: 40 per class, so one test error moves top-1 by 0.025%.
DIGIT_PAIRS_TRAIN, DIGIT_PAIRS_TEST = 20_000, 4_000
DIGIT_PAIRS_SEED = {"train": 1, "test": 2}  # a split's own stream: changing one size leaves the other split as it was


class PairDataset(torch.utils.data.Dataset):
    """Sample i is images[pairs[i, 0]] and images[pairs[i, 1]] side by side: [C, H, 2W].

    Pairs are put together on access: 20000 precomputed pairs would be 480 MB, the indices are 320 kB.
    """

    def __init__(self, images: torch.Tensor, pairs: np.ndarray, labels: np.ndarray):
        self.images, self.pairs = images, torch.as_tensor(pairs, dtype=torch.int64)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        left, right = self.pairs[i]
        return torch.cat([self.images[left], self.images[right]], dim=-1), int(self.labels[i])


def digit_pair_indices(digit_labels: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`size` (left, right) image indices and their classes 10 * left digit + right digit.

    Every class appears size // 100 or size // 100 + 1 times, in shuffled order; each class draws its
    two images uniformly from the images of its digits.
    """
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.arange(size) % 100).astype(np.int64)
    by_digit = [np.flatnonzero(digit_labels == d) for d in range(10)]
    pairs = np.empty((size, 2), dtype=np.int64)
    for side, digit in ((0, classes // 10), (1, classes % 10)):
        for d in range(10):
            rows = np.flatnonzero(digit == d)
            pairs[rows, side] = rng.choice(by_digit[d], size=len(rows))
    return pairs, classes


@register_dataset
def digit_pairs(split: str, root=None, size: int = DIGIT_PAIRS_TRAIN, test_size: int = DIGIT_PAIRS_TEST) -> SplitData:
    """Two digits side by side, [3, 32, 64] in [-1, 1]; class "37" is a 3 on the left of a 7.

    100 classes with real structure (pairs sharing a digit look alike) from the bundled digits alone:
    train pairs use only digits' train images, test pairs only its test images. `size` and
    `test_size` are the numbers of train and test pairs. Never flip these images (`--augment digits`
    suits them; `cifar` would swap the digits and mirror them).

    Measured (2 CPU threads): cnn_small, plain, 2 epochs: top-1 63.4%, top-5 97.8%, 36 s. Global
    pooling sees the order of the digits only near the borders: 87% name both digits, and most
    errors are the swapped class ("73" for "37"), the near miss that dark knowledge should carry.
    """
    _check_split("digit-pairs", split, ("train", "test"))
    try:
        size, test_size = int(size), int(test_size)
    except ValueError:
        raise KDCacheError(f"digit-pairs options size and test_size must be whole numbers; got size={size}, "
                           f"test_size={test_size} (example: digit-pairs:size=5000)") from None
    if size < 1 or test_size < 1:
        raise KDCacheError(f"digit-pairs needs size >= 1 and test_size >= 1; got size={size}, test_size={test_size}")
    images, digit_labels = digits_tensors(split)
    pairs, labels = digit_pair_indices(digit_labels, size if split == "train" else test_size, DIGIT_PAIRS_SEED[split])
    return SplitData(
        name=f"digit-pairs:size={size},test_size={test_size}", split=split,
        dataset=PairDataset(images, pairs, labels), labels=labels, num_classes=100,
        class_names=[f"{c:02d}" for c in range(100)],
        transform="digits (8x8 /16, bilinear to 32x32, (x-0.5)/0.5, 3 channels), two side by side: 32x64",
        background=-1.0,
    )


# --- built-in: FakeData --------------------------------------------------------------------

FAKE_TEST_OFFSET = 1_000_000  # test images are drawn from seeds that train never uses


@register_dataset
def fake(split: str, root=None, size: int = 1000, classes: int = 10, image: int = 32) -> SplitData:
    """torchvision FakeData: random images, deterministic per index, with no class structure."""
    from torchvision import transforms

    _check_split("fake", split, ("train", "test"))
    size, classes, image = int(size), int(classes), int(image)
    if size < 1 or classes < 2 or image < 8:
        raise KDCacheError(f"fake dataset needs size >= 1, classes >= 2, image >= 8; got size={size}, classes={classes}, image={image}")
    offset = 0 if split == "train" else FAKE_TEST_OFFSET
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    ds = _FakeData(size=size, image_size=(3, image, image), num_classes=classes, transform=tf, random_offset=offset)
    labels = _fake_labels(size, classes, (3, image, image), offset)
    return SplitData(name=f"fake:size={size},classes={classes},image={image}", split=split, dataset=ds,
                     labels=labels, num_classes=classes, class_names=[str(i) for i in range(classes)],
                     transform="ToTensor, Normalize(0.5, 0.5)", background=-1.0)


def _fake_sample(index: int, shape, classes: int, offset: int, generator=None):
    """FakeData's draw for one index (image [C, H, W] then label), on a private generator:
    torchvision reseeds torch's global RNG per sample, which cost 60% of its time here."""
    g = generator or torch.Generator()
    g.manual_seed(index + offset)
    image = torch.randn(*shape, generator=g)
    return image, int(torch.randint(0, classes, (1,), generator=g, dtype=torch.long)[0])


def _fake_data_class():
    from torchvision import datasets, transforms

    class FakeData(datasets.FakeData):
        """torchvision FakeData, same images and labels, without touching the global RNG."""

        def __getitem__(self, index):
            if index >= len(self):
                raise IndexError(f"FakeData index {index} out of range")
            image, label = _fake_sample(index, self.image_size, self.num_classes, self.random_offset)
            image = transforms.ToPILImage()(image)
            return (self.transform(image) if self.transform else image), label

    return FakeData


def _FakeData(**kwargs):
    return _fake_data_class()(**kwargs)


def _fake_labels(size, classes, shape, offset) -> np.ndarray:
    """FakeData's labels without decoding images: it seeds torch with index + offset, draws the
    image, then the label; the same draws on a private generator give the same label."""
    g = torch.Generator()
    return np.array([_fake_sample(i, shape, classes, offset, g)[1] for i in range(size)], dtype=np.int64)


# --- torchvision datasets from a local root --------------------------------------------------

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _black(mean, std) -> tuple:
    """A black pixel, per channel, after Normalize(mean, std)."""
    return tuple(round(-m / s, 6) for m, s in zip(mean, std))


def _torchvision_split(name, cls_name, split, root, splits, make_kwargs, gray=False) -> SplitData:
    from torchvision import datasets, transforms

    _check_split(name, split, splits)
    if root is None:
        raise KDCacheError(f"dataset '{name}' is read from disk: pass --data-root DIR (kdcache never downloads)")
    if not os.path.isdir(root):
        raise KDCacheError(f"data root '{root}' does not exist; pass the folder that holds {name}")
    steps = [transforms.Grayscale(3), transforms.Pad(2)] if gray else []
    mean, std = ((0.5,) * 3, (0.5,) * 3) if gray else (CIFAR_MEAN, CIFAR_STD)
    tf = transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(mean, std)])
    try:
        ds = getattr(datasets, cls_name)(root, transform=tf, download=False, **make_kwargs(split))
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
        raise KDCacheError(f"{name} not found under '{root}' ({e}); place the dataset there (kdcache never downloads)") from None
    labels = np.asarray(getattr(ds, "targets", None) if hasattr(ds, "targets") else ds.labels, dtype=np.int64)
    classes = list(getattr(ds, "classes", [])) or [str(i) for i in range(int(labels.max()) + 1)]
    return SplitData(name=name, split=split, dataset=ds, labels=labels, num_classes=len(classes),
                     class_names=[str(c) for c in classes], transform=repr(tf).replace("\n", ""),
                     background=_black(mean, std))


def _train_flag(split):
    return {"train": split == "train"}


TORCHVISION = {
    "cifar10": ("CIFAR10", ("train", "test"), _train_flag, False),
    "cifar100": ("CIFAR100", ("train", "test"), _train_flag, False),
    "mnist": ("MNIST", ("train", "test"), _train_flag, True),
    "fashionmnist": ("FashionMNIST", ("train", "test"), _train_flag, True),
    "svhn": ("SVHN", ("train", "test", "extra"), lambda s: {"split": s}, False),
}


def _imagefolder(path: str, split: str, image: int | None = None) -> SplitData:
    """A folder of one subfolder per split, one sub-subfolder per class; labels number the class names
    of all splits, so a split may lack a class. Images are resized to `image` (image=S) pixels on the
    short side and centre-cropped to S x S; without it, S is the first image's short side (a 32x32
    folder stays 32x32: a silent 224 trained at chance)."""
    from torchvision import datasets, transforms

    if not os.path.isdir(path):
        raise KDCacheError(f"imagefolder '{path}' does not exist; give a folder with one subfolder per split")
    folder = os.path.join(path, split)
    if not os.path.isdir(folder):
        found = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        raise KDCacheError(f"imagefolder '{path}' has no split '{split}'; its splits are {', '.join(found) or 'none'}")
    try:
        ds = datasets.ImageFolder(folder, loader=_load_image)
    except FileNotFoundError as e:  # torchvision's: no class folder, or no image in any of them
        raise KDCacheError(f"imagefolder split '{folder}' holds no images ({str(e).rstrip('.')}); put each class's "
                           f"images in {folder}/<class>/") from None
    # one label per class name in every split: a test split without 'bird' must not call 'cat' class 0
    classes = sorted({c.name for d in os.scandir(path) if d.is_dir() for c in os.scandir(d.path) if c.is_dir()})
    label = [classes.index(c) for c in ds.classes]  # this split's class index -> the label
    ds.samples = ds.imgs = [(p, label[t]) for p, t in ds.samples]
    ds.targets = [t for _, t in ds.samples]
    ds.classes, ds.class_to_idx = classes, {c: i for i, c in enumerate(classes)}
    if image is None:
        from PIL import Image

        with Image.open(ds.samples[0][0]) as first:
            image, resize = min(first.size), min(first.size)  # the images' own scale: no zoom
    else:
        image = int(image)
        resize = image * 8 // 7  # the ImageNet eval recipe: resize to 8/7, centre crop
    if image < 1:
        raise KDCacheError(f"imagefolder option image={image} must be a positive size in pixels")
    tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds.transform = tf
    paths = [os.path.relpath(p, path) for p, _ in ds.samples]  # relative: a moved copy keeps its fingerprint
    return SplitData(name=f"imagefolder:{path}", split=split, dataset=ds, labels=np.asarray(ds.targets, dtype=np.int64),
                     num_classes=len(ds.classes), class_names=list(ds.classes), transform=repr(tf).replace("\n", ""),
                     paths=paths, background=_black(IMAGENET_MEAN, IMAGENET_STD))


def _load_image(path: str):
    """An image file as RGB (torchvision's loader), or a one-line error naming the file that PIL cannot read."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except (OSError, SyntaxError, ValueError) as e:  # PIL's ways of saying truncated, corrupt or not an image
        raise KDCacheError(f"image '{path}' cannot be read ({e}); replace or remove it") from None


def collate(batch):
    """torch's default_collate, with samples of different shapes named in one line (torch.stack's
    error would end the run in a traceback mid-epoch)."""
    try:
        return torch.utils.data.default_collate(batch)
    except RuntimeError:
        shapes = sorted({tuple(sample[0].shape) for sample in batch})
        if len(shapes) < 2:
            raise
        raise KDCacheError(f"the samples of one batch have different shapes ({' and '.join(map(str, shapes[:2]))}); "
                           "kdcache needs inputs of one size: resize them in the dataset (imagefolder: image=S)") from None


def loader(dataset, *, num_workers: int, **kwargs) -> torch.utils.data.DataLoader:
    """A DataLoader batching with `collate`, whose worker processes end quietly when the run stops."""
    init = _quiet_worker if num_workers > 0 else None
    return torch.utils.data.DataLoader(dataset, num_workers=num_workers, collate_fn=collate, worker_init_fn=init, **kwargs)


def _quiet_worker(_worker_id: int) -> None:
    """A loader worker hands batches to its parent through file descriptors served by a thread
    (multiprocessing.resource_sharer, which reports its errors through sys.excepthook); a run
    stopped (Ctrl-C, SIGTERM, a sweep ending its jobs) closes the parent's end, and that thread
    would print a BrokenPipeError traceback under the run's one-line message. A lost connection
    means the parent no longer wants the batch: drop it silently, report anything else."""
    import sys

    previous = sys.excepthook

    def hook(kind, value, tb):
        if not issubclass(kind, (ConnectionError, EOFError)):
            previous(kind, value, tb)

    sys.excepthook = hook


def _user_dataset(spec: str, split: str, root) -> SplitData:
    ds = user_callable(spec, "dataset")(split=split, root=root)
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = [int(ds[i][1]) for i in range(len(ds))]
    labels = np.asarray(labels, dtype=np.int64)
    classes = list(getattr(ds, "classes", [])) or [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
    outside = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if len(outside):  # a loss would index past the logits mid-epoch; a dump would store them as they are
        i = int(outside[0])
        raise KDCacheError(f"dataset '{spec}' split '{split}' has label {labels[i]} at sample {i}, outside its "
                           f"{len(classes)} classes (0 to {len(classes) - 1}); fix the labels or the dataset's classes")
    return SplitData(name=spec, split=split, dataset=ds, labels=labels, num_classes=len(classes),
                     class_names=[str(c) for c in classes], transform=f"{spec}(split={split!r})")


def _parse_options(text: str) -> dict:
    options = {}
    for part in filter(None, text.split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            raise KDCacheError(f"dataset option '{part}' is not key=value (example: fake:size=512,classes=10)")
        options[key.strip()] = value.strip()
    return options


def dataset_names() -> list[str]:
    return sorted(DATASETS) + sorted(TORCHVISION) + ["imagefolder:PATH", "module:callable"]


def names_code(spec: str) -> bool:
    """Whether a dataset spec imports code (module:callable) rather than naming a registry entry."""
    name, colon, _ = spec.partition(":")
    return bool(colon) and name not in DATASETS and name not in TORCHVISION and name != "imagefolder"


def load_split(spec: str, split: str, *, root: str | None = None, stored_in: str | None = None) -> SplitData:
    """The split `split` of dataset `spec`; every way of naming a dataset comes through here.

    `stored_in`: the store `spec` was read from, when the user did not give it. A store may name
    registry datasets only: its `module:callable` is refused, never imported (stores are shared).
    """
    if stored_in is not None and names_code(spec):
        raise KDCacheError(f"store {stored_in} names its {split} dataset as code ({spec}), and kdcache runs code only "
                           f"when you name it, never because a store does; if you trust it, pass --dataset {spec}")
    name, colon, rest = spec.partition(":")
    if name in DATASETS:
        try:
            data = DATASETS[name](split, root, **_parse_options(rest))
        except TypeError as e:
            raise KDCacheError(f"bad options for dataset '{name}': {e}") from None
    elif name in TORCHVISION:
        cls_name, splits, make_kwargs, gray = TORCHVISION[name]
        data = _torchvision_split(name, cls_name, split, root, splits, make_kwargs, gray)
    elif name == "imagefolder" and colon:
        path, _, opts = rest.partition(",")
        options = _parse_options(opts)
        if set(options) - {"image"}:
            raise KDCacheError(f"imagefolder takes one option, image=SIZE (pixels), not {', '.join(sorted(options))}; "
                               f"e.g. imagefolder:{path},image=224")
        try:
            size = int(options["image"]) if "image" in options else None
        except ValueError:
            raise KDCacheError(f"imagefolder option image={options['image']!r} is not a size in pixels") from None
        data = _imagefolder(path, split, size)
    elif colon:
        data = _user_dataset(spec, split, root)
    else:
        raise KDCacheError(f"unknown dataset '{spec}'; did you mean {closest(spec, dataset_names())}?")
    if len(data) == 0:
        raise KDCacheError(f"dataset '{spec}' split '{split}' is empty; check the data root and split name")
    return data
