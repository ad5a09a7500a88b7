"""The model registry and every way of naming a model: registered names, a user's `module:callable`,
torchvision's classification models, and the hub's `timm:NAME` / `hf:PATH` (kdcache/hub.py)."""

from __future__ import annotations

import inspect
import warnings
from typing import Callable

import torch.nn as nn

from kdcache import choices
from kdcache.errors import KDCacheError, closest
from kdcache.imports import user_callable

MODELS: dict[str, Callable[..., nn.Module]] = {}


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


def _hub_name(name: str) -> bool:
    return name.startswith(("timm:", "hf:"))  # registries of models (kdcache/hub.py), not code to import


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
