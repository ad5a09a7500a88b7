"""torch.nn.Module helpers every side uses: a submodule by dotted path, and the identity of weights."""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from kdcache.errors import KDCacheError, closest


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted path `name` (`layer3.1.conv2`); `""` is the model itself."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise KDCacheError(
            f"model {type(model).__name__} has no module '{name}'; closest: {closest(name, names)} "
            "(`kdcache layers MODEL` lists them all)"
        ) from None


def weights_sha256(model: nn.Module) -> str:
    """Identity of a model's weights: sha256 over its state dict's names and tensor bytes, in name
    order. Not of a file: the same weights in a checkpoint, a raw state dict or a DataParallel
    wrapper (and saved on another day) have one hash."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(str(value.dtype).encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
