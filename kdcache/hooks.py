"""Forward hooks that capture named module outputs, managed in one place.

`capture(model, names)` is a context manager: inside it, every forward fills a dict
`{name: output}`; on exit the hooks are always removed, whatever happened.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from kdcache.errors import KDCacheError
from kdcache.losses import attention_map
from kdcache.modules import get_module


@contextmanager
def capture(model: torch.nn.Module, names):
    """Yields `{name: tensor}` refreshed on every forward of `model` (names are dotted paths)."""
    outputs: dict = {}
    handles = []
    try:
        for name in names:
            module = get_module(model, name)

            def hook(_module, _inputs, output, name=name):
                outputs[name] = output

            handles.append(module.register_forward_hook(hook))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


# Reduced forms of a cached activation. A full [B, C, H, W] map costs C*H*W values per sample;
# attention transfer needs only the [B, H, W] map, and many feature losses only the [B, C] vector.
def _attention(x: torch.Tensor) -> torch.Tensor:
    return attention_map(x, p=2)


def _pool(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).mean(-1) if x.dim() > 2 else x


REDUCTIONS = {"full": lambda x: x, "attention": _attention, "pool": _pool}


def parse_activation(spec: str) -> tuple[str, str]:
    """'layer3.1:attention' -> ('layer3.1', 'attention'); the form defaults to 'full'."""
    name, _, form = spec.partition(":")
    form = form or "full"
    if form not in REDUCTIONS:
        raise KDCacheError(f"activation '{spec}': unknown form '{form}'; use NAME, NAME:full, NAME:attention or NAME:pool")
    if not name:
        raise KDCacheError(f"activation '{spec}' has no module name; use a dotted path such as layer3.1")
    return name, form
