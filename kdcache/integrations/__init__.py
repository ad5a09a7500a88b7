"""The cache inside other people's training loops: plain PyTorch, fastai/fasterai, Lightning, the
Hugging Face Trainer. Each framework is imported only by its own module, when that module is used.

`from kdcache.integrations import Teacher, WithIndex` is the plain-PyTorch core the others build on.
"""
from __future__ import annotations

from kdcache.imports import require  # re-exported: what the framework modules import by

__all__ = ["Distiller", "Teacher", "WithIndex", "evaluate", "indexed_loader", "require"]


def __getattr__(name):  # deferred: `import kdcache.integrations.fastai` need not build the plain core first
    if name in ("Distiller", "Teacher", "WithIndex", "evaluate", "indexed_loader"):
        from kdcache.integrations import plain

        return getattr(plain, name)
    raise AttributeError(f"module 'kdcache.integrations' has no attribute {name!r}")
