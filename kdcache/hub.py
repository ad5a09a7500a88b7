"""Teachers and students from timm (`timm:NAME`) and Hugging Face (`hf:PATH_OR_NAME`), and the
teacher's own preprocessing, resolved as its library resolves it and recorded in the store.

Weights come from a local file (`timm:NAME --weights FILE`) or a directory written by
`save_pretrained` (`hf:DIR`), or, by the same call, from the local Hugging Face cache or the hub
for a user with network; kdcache itself never asks for a download. models.py sends these names here.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os

import torch
import torch.nn as nn

from kdcache.errors import KDCacheError, closest
from kdcache.imports import require
from kdcache.progress import log
from kdcache.modules import weights_sha256

PREFIXES = ("timm:", "hf:")


def is_hub(name: str) -> bool:
    """Whether a model name names a timm or Hugging Face model (a registry, never code to import)."""
    return isinstance(name, str) and name.startswith(PREFIXES)


def _timm():
    return require("timm", "timm", "a timm: model")


def _transformers():
    return require("transformers", "hf", "an hf: model")


def _timm_name(name: str) -> str:
    arch = name.removeprefix("timm:")
    timm = _timm()
    if not timm.is_model(arch):
        raise KDCacheError(f"unknown timm model '{arch}'; did you mean {closest(arch, timm.list_models())}? "
                           "(timm.list_models() lists them; a pretrained tag such as resnet18.a1_in1k works too)")
    return arch


def check_name(name: str) -> None:
    """An unknown timm name fails here, before any data is read; an hf: name is looked up when used."""
    if name.startswith("timm:"):
        _timm_name(name)


# --- students: fresh models --------------------------------------------------------------------

def create_model(name: str, *, num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    """A randomly initialised timm model, or an HF image classifier built from the config at PATH."""
    if name.startswith("timm:"):
        return _timm().create_model(_timm_name(name), pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                    **kwargs)
    transformers = _transformers()
    path = name.removeprefix("hf:")
    try:
        config = transformers.AutoConfig.from_pretrained(path, num_labels=num_classes, num_channels=in_chans, **kwargs)
    except OSError as e:
        raise _not_found(name, e) from None
    return HFClassifier(transformers.AutoModelForImageClassification.from_config(config))


class HFClassifier(nn.Module):
    """A transformers image classifier as kdcache runs models: forward(x [B, C, H, W]) -> logits [B, K].

    Its modules keep the transformers model's own dotted names (`resnet.encoder.stages.1`): the
    children are adopted here, and the transformers model runs its forward on them.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "hf_model", model)  # not a submodule: its modules are ours already
        self.config = model.config

    def train(self, mode: bool = True):
        self.hf_model.training = mode  # the transformers model's own flag, for code that reads self.training
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf_model(pixel_values=x).logits


def _not_found(name: str, error: Exception) -> KDCacheError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return KDCacheError(f"{name}: no such model here ({first}); give a directory written by save_pretrained, or a "
                        "model in the local Hugging Face cache (HF_HUB_OFFLINE=1 keeps it from the network)")


# --- teachers: trained weights and their preprocessing ------------------------------------------

def build_teacher(name: str, *, num_classes: int | None, in_chans: int = 3, weights: str | None = None):
    """(model in eval mode, info) for a hub teacher; info adds `preprocessing`, the data config its
    inputs are made with (see preprocessing())."""
    if name.startswith("timm:"):
        model = _timm_teacher(name, num_classes=num_classes, in_chans=in_chans, weights=weights)
    else:
        if weights is not None:
            raise KDCacheError(f"teacher {name} brings its weights from its directory; drop --weights {weights}")
        model = _hf_teacher(name)
    num_classes = int(model.num_classes if name.startswith("timm:") else model.config.num_labels)
    info = {"arch": name, "arch_kwargs": {}, "num_classes": num_classes, "in_chans": in_chans,
            "weights_sha256": weights_sha256(model), "preprocessing": preprocessing(name, model)}
    return model.eval(), info


def _timm_teacher(name, *, num_classes, in_chans, weights):
    timm = _timm()
    arch = _timm_name(name)
    kwargs = {"in_chans": in_chans} if num_classes is None else {"in_chans": in_chans, "num_classes": num_classes}
    if weights is not None:
        if not os.path.isfile(weights):
            raise KDCacheError(f"weights file {weights} does not exist")
        # num_classes in the overlay too: timm otherwise takes a head of another size for an ImageNet
        # one and leaves it random, where a teacher's head must be the trained one or an error
        overlay = dict(file=os.fspath(weights), **({"num_classes": num_classes} if num_classes else {}))
        try:
            return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        except (RuntimeError, KeyError, ValueError) as e:
            raise KDCacheError(f"weights {weights} do not fit timm model {arch} with {num_classes} classes "
                               f"({str(e).strip().splitlines()[0]}); check the model name and the dataset") from None
    try:
        return timm.create_model(arch, pretrained=True, **kwargs)
    except RuntimeError as e:  # a head of another size than the hub's
        raise KDCacheError(f"the pretrained weights of timm model {arch} do not fit {num_classes} classes "
                           f"({str(e).strip().splitlines()[0]}); pass --weights FILE trained on this dataset") from None
    except Exception as e:  # huggingface_hub's not-found and offline errors have no common base but OSError/ValueError
        raise KDCacheError(f"timm model {arch} has no weights here ({str(e).strip().splitlines()[0]}); pass --weights "
                           "FILE, or fetch them once with network into the Hugging Face cache") from None


def _hf_teacher(name):
    transformers = _transformers()
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(name.removeprefix("hf:"))
    except OSError as e:
        raise _not_found(name, e) from None
    return HFClassifier(model)


def preprocessing(name: str, model: nn.Module) -> dict:
    """The teacher's own eval preprocessing as plain data, as its library resolves it: timm's
    `resolve_data_config` (input_size, interpolation, mean, std, crop_pct, crop_mode) for timm:,
    the saved image processor's settings for hf:. A teacher without one is a KDCacheError."""
    if name.startswith("timm:"):
        from timm.data import resolve_data_config

        config = resolve_data_config({}, model=model)
        return _plain({"library": "timm", **config})
    try:
        processor = _transformers().AutoImageProcessor.from_pretrained(name.removeprefix("hf:"))
    except (OSError, ValueError) as e:
        raise KDCacheError(f"teacher {name} has no image processor, so its preprocessing cannot be resolved "
                           f"({str(e).strip().splitlines()[0]}); save it beside the model with "
                           "processor.save_pretrained(PATH)") from None
    return _plain({"library": "transformers", "image_processor": type(processor).__name__, **processor.to_dict()})


def _plain(config: dict) -> dict:
    """JSON-ready data (tuples as lists, enums by value): what store attrs and checkpoints hold."""
    return json.loads(json.dumps(config, default=lambda v: getattr(v, "value", str(v))))


def eval_transform(name: str, config: dict):
    """(transform of a PIL image -> [C, H, W] tensor, its one-line description) for a teacher's
    recorded preprocessing: timm's create_transform, or the saved HF image processor itself."""
    if config["library"] == "timm":
        from timm.data import create_transform

        keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
        tf = create_transform(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in keys})
        return tf, " ".join(repr(tf).split())
    processor = _transformers().AutoImageProcessor.from_pretrained(name.removeprefix("hf:"))
    return ProcessorTransform(processor), f"{type(processor).__name__} of {name.removeprefix('hf:')}"


class ProcessorTransform:
    """An HF image processor as a per-image transform: PIL image -> pixel_values [C, H, W]."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image):
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def with_teacher_transform(data, name: str, config: dict):
    """`data` (a SplitData) with its images made by the teacher's eval transform, where the dataset
    reads image files (imagefolder, torchvision roots: a `transform` attribute); a dataset that makes
    tensors itself keeps its own, said once on stderr. The copy keeps the data's fingerprint."""
    if not hasattr(data.dataset, "transform") or getattr(data.dataset, "transform", None) is None:
        log.warning(f"note: {data.name} makes its own tensors ({data.transform}); teacher {name}'s preprocessing is "
                    "recorded in the store but not applied (an imagefolder: dataset gets it)")
        return data
    tf, description = eval_transform(name, config)
    dataset = copy.copy(data.dataset)
    dataset.transform = tf
    fingerprint = data.fingerprint()
    teacher_view = dataclasses.replace(data, dataset=dataset, transform=f"teacher's: {description}")
    teacher_view.fingerprint = lambda: fingerprint  # the data's identity, not the transform's
    return teacher_view
