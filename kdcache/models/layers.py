"""What a model is made of: parameter counts and every named layer with its output shape
(`kdcache layers`, and the names --activation and --feature take)."""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from kdcache.errors import KDCacheError
from kdcache.models.checkpoints import _looks_like_path, load_checkpoint, model_from_checkpoint
from kdcache.models.registry import create_model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared ones counted once), trainable or not."""
    return sum(p.numel() for p in model.parameters())


def layers_model(spec: str, *, num_classes: int) -> tuple[nn.Module, int]:
    """`kdcache layers SPEC`: the model a name or a kdcache checkpoint describes, and its input channels."""
    if os.path.isfile(spec):
        ckpt = load_checkpoint(spec)
        return model_from_checkpoint(ckpt, path=spec).eval(), ckpt["in_chans"]
    if _looks_like_path(spec) and ":" not in spec:  # a missing checkpoint (hf:DIR and module:fn have a colon)
        raise KDCacheError(f"checkpoint {spec} does not exist; give an existing model.pt or a model name")
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
