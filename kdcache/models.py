"""Model registry (CIFAR ResNets, WideResNets, tiny CNNs), name resolution, layer lookup.

Also kdcache checkpoints: what a trained student or teacher is saved as, and how a teacher is built.
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdcache import choices
from kdcache.imports import user_callable
from kdcache.modules import get_module, weights_sha256  # re-exported: models are addressed by module path
from kdcache.errors import KDCacheError, closest

__all__ = [
    "MODELS",
    "register_model",
    "create_model",
    "model_names",
    "get_module",
    "list_layers",
    "count_parameters",
    "save_checkpoint",
    "load_checkpoint",
    "model_from_checkpoint",
    "build_teacher",
    "CHECKPOINT_FORMAT",
]

MODELS: dict[str, Callable[..., nn.Module]] = {}

CHECKPOINT_FORMAT = 1  # bump when the checkpoint dict changes in a way old readers cannot follow


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a constructor `fn(*, num_classes, in_chans=3, **kwargs) -> nn.Module` under its name."""
    name = fn.__name__
    if name in MODELS:
        warnings.warn(f"overwriting registered model {name!r}", stacklevel=2)
    MODELS[name] = fn
    return fn


def _init_weights(model: nn.Module) -> None:
    # The init of the CRD / torchdistill reference code, so accuracies are comparable to papers.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


# No model below uses an in-place op: a forward hook on `bn1` or `bn2` must keep seeing that
# layer's output, not a tensor that a later in-place ReLU or residual add has overwritten.


# ---------------------------------------------------------------------------------------------
# CIFAR ResNets (CRD, "Contrastive Representation Distillation", Tian et al. 2020; torchdistill)
# Attribute names follow CRD's resnet.py so its released teacher state dicts load unchanged.
# ---------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual: [B, inplanes, H, W] -> [B, planes, H/stride, W/stride]."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            # CRD's option B shortcut: 1x1 conv + BN (not the zero-padding option A of He et al.)
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        # F.relu, not self.relu: a hook on `layerK.i.relu` then sees one call, the inner activation;
        # the block's output is the block itself (`layerK.i`).
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2: [B, in_chans, H, W] (H, W >= 8) -> logits [B, num_classes].

    Stages: conv1 [B, w0, H, W] -> layer1 [B, w1, H, W] -> layer2 [B, w2, H/2, W/2]
    -> layer3 [B, w3, H/4, W/4] -> avgpool -> fc.
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], *, num_classes: int, in_chans: int = 3):
        super().__init__()
        assert (depth - 2) % 6 == 0, f"CIFAR ResNet depth must be 6n+2, got {depth}"
        n = (depth - 2) // 6
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(widths[1], n, stride=1)
        self.layer2 = self._make_layer(widths[2], n, stride=2)
        self.layer3 = self._make_layer(widths[3], n, stride=2)
        # Adaptive, where CRD has AvgPool2d(8): the same weights then serve any input size >= 8.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(self.inplanes, planes, stride)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _cifar_resnet(depth: int, widths, num_classes: int, in_chans: int) -> nn.Module:
    return CifarResNet(depth, widths, num_classes=num_classes, in_chans=in_chans)


_W1 = (16, 16, 32, 64)  # the original CIFAR ResNet widths (He et al. 2016)
_W4 = (32, 64, 128, 256)  # CRD's "x4" teacher widths


@register_model
def resnet8(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """CIFAR ResNet-8 (widths 16/32/64, 1 block per stage)."""
    return _cifar_resnet(8, _W1, num_classes, in_chans)


@register_model
def resnet14(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """CIFAR ResNet-14 (widths 16/32/64, 2 blocks per stage)."""
    return _cifar_resnet(14, _W1, num_classes, in_chans)


@register_model
def resnet20(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """CIFAR ResNet-20 (widths 16/32/64, 3 blocks per stage)."""
    return _cifar_resnet(20, _W1, num_classes, in_chans)


@register_model
def resnet32(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """CIFAR ResNet-32 (widths 16/32/64, 5 blocks per stage)."""
    return _cifar_resnet(32, _W1, num_classes, in_chans)


@register_model
def resnet44(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """CIFAR ResNet-44 (widths 16/32/64, 7 blocks per stage)."""
    return _cifar_resnet(44, _W1, num_classes, in_chans)


@register_model
def resnet56(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """CIFAR ResNet-56 (widths 16/32/64, 9 blocks per stage)."""
    return _cifar_resnet(56, _W1, num_classes, in_chans)


@register_model
def resnet110(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """CIFAR ResNet-110 (widths 16/32/64, 18 blocks per stage)."""
    return _cifar_resnet(110, _W1, num_classes, in_chans)


@register_model
def resnet8x4(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """CRD ResNet-8x4 (stem 32, widths 64/128/256, 1 block per stage)."""
    return _cifar_resnet(8, _W4, num_classes, in_chans)


@register_model
def resnet32x4(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """CRD ResNet-32x4 (stem 32, widths 64/128/256, 5 blocks per stage): the usual CIFAR-100 teacher."""
    return _cifar_resnet(32, _W4, num_classes, in_chans)


# ---------------------------------------------------------------------------------------------
# WideResNets (Zagoruyko & Komodakis 2016), as in CRD's wrn.py: pre-activation blocks.
# Names keep CRD's `block1.layer.0.conv1` / `convShortcut` so its state dicts load unchanged.
# ---------------------------------------------------------------------------------------------


class WideBasicBlock(nn.Module):
    """Pre-activation block: [B, in_planes, H, W] -> [B, out_planes, H/stride, W/stride]."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # As in the reference: the identity shortcut takes x, the projection takes the activated x.
        shortcut = x if self.equal_in_out else self.convShortcut(pre)
        return out + shortcut


class NetworkBlock(nn.Module):
    """One WRN stage, its blocks in `.layer` (CRD's naming)."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k: [B, in_chans, H, W] (H, W >= 8) -> logits [B, num_classes].

    conv1 [B, 16, H, W] -> block1 [B, 16k, H, W] -> block2 [B, 32k, H/2, W/2]
    -> block3 [B, 64k, H/4, W/4] -> bn1, relu -> avgpool -> fc.
    """

    def __init__(
        self, depth: int, widen_factor: int, *, num_classes: int, in_chans: int = 3, drop_rate: float = 0.0
    ):
        super().__init__()
        assert (depth - 4) % 6 == 0, f"WideResNet depth must be 6n+4, got {depth}"
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, ch[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch[3], num_classes)
        _init_weights(self)
        nn.init.zeros_(self.fc.bias)  # CRD's wrn init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model
def wrn_16_1(*, num_classes: int, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """WRN-16-1 (widths 16/32/64, 2 blocks per stage)."""
    return WideResNet(16, 1, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)


@register_model
def wrn_16_2(*, num_classes: int, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """WRN-16-2 (widths 32/64/128, 2 blocks per stage)."""
    return WideResNet(16, 2, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)


@register_model
def wrn_40_1(*, num_classes: int, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """WRN-40-1 (widths 16/32/64, 6 blocks per stage)."""
    return WideResNet(40, 1, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)


@register_model
def wrn_40_2(*, num_classes: int, in_chans: int = 3, drop_rate: float = 0.0) -> nn.Module:
    """WRN-40-2 (widths 32/64/128, 6 blocks per stage): CRD's usual WRN teacher."""
    return WideResNet(40, 2, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)


# ---------------------------------------------------------------------------------------------
# Small conv-BN-ReLU stacks for CPU demos (e.g. 8x8 digits upscaled to 32x32).
# Stage names match the ResNets (conv1, layer1..3, fc), so one feature-KD setting such as
# `layer3` works for any teacher/student pair here. The stem has stride 2: digits are 8x8 images
# upsampled to 32x32, and full-resolution stages made these nets 4x slower on CPU for nothing.
# ---------------------------------------------------------------------------------------------


class ConvBNReLU(nn.Sequential):
    """3x3 conv, BN, ReLU: [B, cin, H, W] -> [B, cout, H/stride, W/stride]."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()


class SmallCNN(nn.Module):
    """Plain CNN of base width w: [B, in_chans, H, W] -> logits [B, num_classes].

    conv1 [B, w, H/2, W/2] -> layer1 [B, 2w, H/2, W/2] -> layer2 [B, 4w, H/4, W/4]
    -> layer3 [B, 8w, H/8, W/8] -> avgpool -> fc.
    """

    def __init__(self, width: int, *, num_classes: int, in_chans: int = 3):
        super().__init__()
        self.conv1 = ConvBNReLU(in_chans, width, stride=2)
        self.layer1 = ConvBNReLU(width, 2 * width)
        self.layer2 = ConvBNReLU(2 * width, 4 * width, stride=2)
        self.layer3 = ConvBNReLU(4 * width, 8 * width, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model
def cnn_tiny(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """Conv-BN-ReLU stack, widths 4/8/16/32 (about 7k parameters for 10 classes)."""
    return SmallCNN(4, num_classes=num_classes, in_chans=in_chans)


@register_model
def cnn_small(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """Conv-BN-ReLU stack, widths 8/16/32/64 (about 25k parameters for 10 classes)."""
    return SmallCNN(8, num_classes=num_classes, in_chans=in_chans)


@register_model
def cnn_medium(*, num_classes: int, in_chans: int = 3) -> nn.Module:
    """Conv-BN-ReLU stack, widths 16/32/64/128 (about 100k parameters for 10 classes)."""
    return SmallCNN(16, num_classes=num_classes, in_chans=in_chans)


# ---------------------------------------------------------------------------------------------
# Name resolution
# ---------------------------------------------------------------------------------------------


def _torchvision_names() -> list[str]:
    import torchvision  # deferred: ~1 s to import, and only needed when a name is not ours

    return sorted(torchvision.models.list_models(module=torchvision.models))


def model_names() -> list[str]:
    """Every name create_model accepts without a module path: the registry, then torchvision's."""
    ours = sorted(MODELS)
    return ours + [n for n in _torchvision_names() if n not in MODELS]


def _check_kwargs(fn: Callable, name: str, kwargs: dict) -> None:
    """Turn a wrong constructor argument into a user error instead of a TypeError traceback."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and C callables carry no signature: let the call decide
        return
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        accepted = [p for p in sig.parameters if sig.parameters[p].kind is not inspect.Parameter.VAR_KEYWORD]
        raise KDCacheError(
            f"model '{name}' cannot be built with these arguments ({e}); it accepts: {', '.join(accepted)}"
        ) from None


def _accepts(fn: Callable, param: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return param in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _resolve_callable(spec: str) -> Callable:
    return user_callable(spec, "model")


def check_model_name(name: str) -> None:
    """Raise create_model's error for a name it cannot build, without building a model (a pipeline
    checks every stage's names before its first stage runs)."""
    if name in MODELS or name in choices.LM_MODELS:  # LM sizes: kdcache/tokens/models.py
        return
    if _hub_name(name):
        from kdcache import hub

        return hub.check_name(name)
    if ":" in name:
        _resolve_callable(name)
    elif name not in _torchvision_names():
        create_model(name, num_classes=2)  # an unknown name builds nothing: it raises the error with suggestions


def create_model(name: str, *, num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build a fresh, randomly initialised model mapping [B, in_chans, H, W] to [B, num_classes].

    `name` is, in this order: a registered name (`resnet8`), a `module:callable` called as
    `callable(num_classes=..., [in_chans=...,] **kwargs)`, or a torchvision classification model
    (`resnet18`, built with weights=None: kdcache never downloads weights). `timm:NAME` and
    `hf:PATH` are timm and Hugging Face models (kdcache/hub.py).
    """
    if _hub_name(name):
        from kdcache import hub

        return hub.create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if name in MODELS:
        fn = MODELS[name]
        call = dict(num_classes=num_classes, in_chans=in_chans, **kwargs)
        _check_kwargs(fn, name, call)
        return fn(**call)

    if ":" in name:
        fn = _resolve_callable(name)
        call = dict(num_classes=num_classes, **kwargs)
        # Pass in_chans only where the callable takes it, so a plain make_net(num_classes) works.
        if _accepts(fn, "in_chans"):
            call["in_chans"] = in_chans
        elif in_chans != 3:
            raise KDCacheError(f"model '{name}' takes no in_chans argument, but in_chans={in_chans} was asked for")
        _check_kwargs(fn, name, call)
        model = fn(**call)
        if not isinstance(model, nn.Module):
            raise KDCacheError(f"model '{name}' returned a {type(model).__name__}, not a torch.nn.Module")
        return model

    tv_names = _torchvision_names()
    if name in tv_names:
        import torchvision

        if in_chans != 3:
            raise KDCacheError(
                f"torchvision model '{name}' takes 3 input channels, not {in_chans}; "
                "repeat the channels in the transform or use a registered model"
            )
        try:
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        except TypeError as e:
            raise KDCacheError(
                f"torchvision model '{name}' cannot be built with arguments {sorted(kwargs)} ({e})"
            ) from None

    raise KDCacheError(
        f"unknown model '{name}'; did you mean {closest(name, sorted(MODELS) + tv_names)}? "
        "(`kdcache models` lists them all; a module:callable such as mypkg.nets:make_net also works)"
    )


# ---------------------------------------------------------------------------------------------
# Inspection
# ---------------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared ones counted once), trainable or not."""
    return sum(p.numel() for p in model.parameters())


def layers_model(spec: str, *, num_classes: int) -> tuple[nn.Module, int]:
    """`kdcache layers SPEC`: the model a name or a kdcache checkpoint describes, and its input channels."""
    if os.path.isfile(spec):
        ckpt = load_checkpoint(spec)
        return model_from_checkpoint(ckpt, path=spec).eval(), ckpt["in_chans"]
    return create_model(spec, num_classes=num_classes), 3


def list_layers(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> list[dict]:
    """Every named submodule, in definition order, with its output shape on a zero input.

    Returns [{name, type, shape, params}]: shape is the output's shape tuple (of its last call,
    where a module runs more than once), or None where the output is not a tensor or the module
    never ran; params counts the module's parameters including its children's.
    The model is run in eval mode under no_grad; hooks and every module's train/eval flag are
    restored even when the forward fails.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    shapes: dict[str, tuple | None] = {n: None for n, _ in named}

    def hook_for(name: str):
        def hook(_module, _inputs, output):
            shapes[name] = tuple(output.shape) if isinstance(output, torch.Tensor) else None

        return hook

    # Per module, not model.train(flag): a model may hold frozen parts (e.g. BN kept in eval).
    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    handles = []
    try:
        handles = [m.register_forward_hook(hook_for(n)) for n, m in named]
        model.eval()
        with torch.no_grad():
            try:
                model(torch.zeros(input_shape, device=device, dtype=dtype))
            except RuntimeError as e:
                raise KDCacheError(
                    f"{type(model).__name__} cannot run on an input of shape {list(input_shape)} "
                    f"({str(e).splitlines()[0]}); pass the input_shape the model expects"
                ) from None
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return [
        {"name": n, "type": type(m).__name__, "shape": shapes[n], "params": count_parameters(m)}
        for n, m in named
    ]


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

_PLAIN = (str, int, float, bool, type(None))


def _check_plain(obj, where: str) -> None:
    """Refuse what torch.load(weights_only=True) would refuse, at save time, naming the key."""
    if isinstance(obj, _PLAIN) or isinstance(obj, torch.Tensor):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise KDCacheError(f"checkpoint {where} has a key of type {type(k).__name__}; use str keys")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise KDCacheError(
        f"checkpoint {where} is a {type(obj).__module__}.{type(obj).__name__}; only str, int, float, bool, "
        "None, list, dict and tensors can be saved: convert it (float(x), str(path), ...)"
    )


def save_checkpoint(
    path,
    model: nn.Module,
    *,
    arch: str,
    arch_kwargs: dict,
    num_classes: int,
    in_chans: int,
    config: dict,
    metrics: dict,
    extra: dict | None = None,
) -> None:
    """Write a kdcache checkpoint: everything model_from_checkpoint needs, plus how it was made.

    Written to `path.partial`, then renamed into place, so a crash never leaves half a checkpoint.
    """
    ckpt = {
        "kdcache_checkpoint": CHECKPOINT_FORMAT,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
        "num_classes": int(num_classes),
        "in_chans": int(in_chans),
        # On CPU so a checkpoint from a GPU run loads on any machine.
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": config,
        "metrics": metrics,
        "extra": extra,
    }
    for key in ("arch_kwargs", "config", "metrics", "extra"):
        _check_plain(ckpt[key], key)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".partial"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the bytes do
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _torch_load(path: str, what: str):
    # weights_only=True: a checkpoint is plain data, so loading one never runs code from the file.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KDCacheError(
            f"{what} {path} cannot be read by torch.load(weights_only=True) ({first}); "
            "save plain data, e.g. torch.save(model.state_dict(), path)"
        ) from None


def load_checkpoint(path) -> dict:
    """Read a kdcache checkpoint (on CPU) as the dict save_checkpoint wrote."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise KDCacheError(f"checkpoint {path} does not exist; give the model.pt written by train-student")
    return _checked(_torch_load(path, "checkpoint"), path)


_FIELDS = {"kdcache_checkpoint": int, "arch": str, "arch_kwargs": dict, "num_classes": int, "in_chans": int,
           "state_dict": dict}  # what model_from_checkpoint reads, and the type it must be


def _checked(ckpt, path: str) -> dict:
    """`ckpt` if it is a kdcache checkpoint this version reads, with every field it builds from well-typed."""
    if not isinstance(ckpt, dict) or "kdcache_checkpoint" not in ckpt:
        raise KDCacheError(
            f"{path} is not a kdcache checkpoint (no 'kdcache_checkpoint' key); "
            "for a plain state dict give a model name and --weights instead"
        )
    for key, kind in _FIELDS.items():
        value = ckpt.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
            raise KDCacheError(f"checkpoint {path} is malformed: {key} is {_brief(value)}, expected "
                               f"{'a positive int' if kind is int else f'a {kind.__name__}'}; "
                               "give a model.pt written by kdcache train-student")
    if not all(isinstance(k, str) for k in ckpt["arch_kwargs"]):
        raise KDCacheError(f"checkpoint {path} is malformed: arch_kwargs is {_brief(ckpt['arch_kwargs'])}, expected "
                           "keyword arguments by name; give a model.pt written by kdcache train-student")
    if ckpt["kdcache_checkpoint"] > CHECKPOINT_FORMAT:
        raise KDCacheError(
            f"checkpoint {path} has format {ckpt['kdcache_checkpoint']}, newer than this kdcache reads "
            f"({CHECKPOINT_FORMAT}); upgrade kdcache"
        )
    return ckpt


def _brief(value) -> str:
    """A value for a message: its repr when short, else its type."""
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


def _fmt_shape(shape) -> str:
    return "[" + ",".join(str(s) for s in shape) + "]"


def _load_fitting(model: nn.Module, state: dict, *, source: str, arch: str) -> None:
    """load_state_dict, but a misfit is one line saying what does not fit, not a wall of keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        k for k in own if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{len(missing)} missing keys" + (f" (e.g. {missing[0]})" if missing else ""),
            f"{len(unexpected)} unexpected" + (f" (e.g. {unexpected[0]})" if unexpected else ""),
            f"{len(mismatched)} shape mismatches",
        ]
        if mismatched:
            k = mismatched[0]
            theirs = _fmt_shape(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__
            parts[-1] += f" (e.g. {k} {theirs} in the weights vs {_fmt_shape(own[k].shape)} in the model)"
        raise KDCacheError(
            f"weights {source} do not fit model {arch}: {', '.join(parts)}; check the model name and num_classes"
        )
    model.load_state_dict(state)


def names_code(arch: str) -> bool:
    """Whether a model name imports code (module:callable) rather than naming a registered or torchvision model."""
    return ":" in arch and not _hub_name(arch)


def _hub_name(name: str) -> bool:
    return name.startswith(("timm:", "hf:"))  # registries of models (kdcache/hub.py), not code to import


def model_from_checkpoint(ckpt: dict, *, arch: str | None = None, path: str | None = None) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (left in train mode).

    A checkpoint is a file, not the user: its arch may name a registered or torchvision model, and
    code (module:callable, torch.hub:load, ...) only when that is `arch`, the name the user gave for
    this file (the --student it is the model.pt of). `path` names the file in messages.
    """
    where = f"checkpoint {path}" if path else "the checkpoint"
    if names_code(ckpt["arch"]) and ckpt["arch"] != arch:
        fix = (f"this run names it {arch}: pass --overwrite to train {arch} again" if arch is not None
               else f"if you trust that code, name it yourself: --teacher {ckpt['arch']} --weights {path or 'FILE'}")
        raise KDCacheError(f"{where} names its model as code ({ckpt['arch']}), and kdcache runs code only when you "
                           f"name it, never because a file does; {fix}")
    model = create_model(
        ckpt["arch"], num_classes=ckpt["num_classes"], in_chans=ckpt["in_chans"], **ckpt["arch_kwargs"]
    )
    _load_fitting(model, ckpt["state_dict"], source=f"in {where}", arch=ckpt["arch"])
    return model


def _state_dict_from(obj, path: str) -> dict:
    """The state dict inside what a weights file holds: raw, {'state_dict': ...}, {'model': ...} or ours."""
    if isinstance(obj, dict):
        if "kdcache_checkpoint" in obj:
            obj = obj["state_dict"]
        elif isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        elif isinstance(obj.get("model"), dict):  # CRD and torchvision-reference checkpoints
            obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise KDCacheError(
            f"weights {path} hold no state dict (expected tensors by name, or a dict with a 'state_dict' "
            "or 'model' key); save them with torch.save(model.state_dict(), path)"
        )
    keys = list(obj)
    # nn.DataParallel / DistributedDataParallel prefix every key with "module."
    if keys and all(k.startswith("module.") for k in keys):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.endswith((".pt", ".pth", ".ckpt", ".bin"))


def build_teacher(
    spec: str, *, num_classes: int | None, in_chans: int = 3, weights: str | None = None, random_ok: bool = False
) -> tuple[nn.Module, dict]:
    """A teacher in eval mode, and what identifies it: {arch, arch_kwargs, num_classes, in_chans, weights_sha256}.

    `spec` is a kdcache checkpoint file (which brings its own arch, num_classes and in_chans), or
    a model name for create_model, with an optional `weights` file (a raw state dict, a dict with a
    'state_dict' or 'model' key, or a kdcache checkpoint). A name without weights is a random
    network: refused unless `random_ok` (--random-teacher, for benchmarks); its weights_sha256 is None.
    """
    if os.path.isfile(spec):
        if weights is not None:
            raise KDCacheError(
                f"teacher {spec} is a checkpoint and carries its weights; drop --weights {weights}, "
                "or give a model name with --weights"
            )
        ckpt = load_checkpoint(spec)
        if num_classes is not None and num_classes != ckpt["num_classes"]:
            raise KDCacheError(
                f"teacher checkpoint {spec} has {ckpt['num_classes']} classes, but num_classes={num_classes} "
                "was given; drop --num-classes or use a teacher trained on this dataset"
            )
        model = model_from_checkpoint(ckpt, path=spec)
        info = {
            "arch": ckpt["arch"],
            "arch_kwargs": dict(ckpt["arch_kwargs"]),
            "num_classes": ckpt["num_classes"],
            "in_chans": ckpt["in_chans"],
            "weights_sha256": weights_sha256(model),
        }
        return model.eval(), info

    if _hub_name(spec):  # before the path test: hf:DIR names a directory
        from kdcache import hub

        return hub.build_teacher(spec, num_classes=num_classes, in_chans=in_chans, weights=weights)
    if _looks_like_path(spec):
        raise KDCacheError(f"teacher checkpoint {spec} does not exist; give an existing model.pt or a model name")
    if num_classes is None:
        raise KDCacheError(
            f"teacher '{spec}' is a model name, so num_classes is needed; give --num-classes or a checkpoint"
        )
    if weights is None and not random_ok:
        raise KDCacheError(f"teacher '{spec}' is a model name without --weights, so it would be a randomly "
                           "initialised network; pass --weights FILE, a kdcache checkpoint (model.pt), or "
                           "--random-teacher if a random teacher is what you want (benchmarks)")
    obj, arch_kwargs, sha = None, {}, None
    if weights is not None:
        weights = os.fspath(weights)
        if not os.path.isfile(weights):
            raise KDCacheError(f"weights file {weights} does not exist")
        obj = _torch_load(weights, "weights")
        if isinstance(obj, dict) and "kdcache_checkpoint" in obj and obj.get("arch") == spec:
            # a checkpoint of this very model (--teacher mymod:net --weights its model.pt): built as it was trained
            ckpt = _checked(obj, weights)
            in_chans, arch_kwargs = ckpt["in_chans"], dict(ckpt["arch_kwargs"])
    model = create_model(spec, num_classes=num_classes, in_chans=in_chans, **arch_kwargs)
    if obj is not None:
        _load_fitting(model, _state_dict_from(obj, weights), source=weights, arch=spec)
        sha = weights_sha256(model)
    info = {
        "arch": spec, "arch_kwargs": arch_kwargs, "num_classes": num_classes, "in_chans": in_chans, "weights_sha256": sha
    }
    return model.eval(), info
