"""The cache inside other people's training loops: plain PyTorch, fastai/fasterai, Lightning, the
Hugging Face Trainer. Each framework is imported only by its own module, when that module is used.

`from kdcache.integrations import Teacher, WithIndex` is the plain-PyTorch core the others build on.
"""
from __future__ import annotations

import importlib

from kdcache.errors import KDCacheError

__all__ = ["Distiller", "Teacher", "WithIndex", "evaluate", "indexed_loader", "require"]


def require(module: str, extra: str, what: str):
    """Import `module` for `what`, or stop with one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise KDCacheError(f"{what} needs {module.split('.')[0]}, which is not installed ({e}); "
                           f"pip install 'kdcache[{extra}]'") from None


def __getattr__(name):  # deferred: `import kdcache.integrations.fastai` need not build the plain core first
    if name in ("Distiller", "Teacher", "WithIndex", "evaluate", "indexed_loader"):
        from kdcache.integrations import plain

        return getattr(plain, name)
    raise AttributeError(f"module 'kdcache.integrations' has no attribute {name!r}")
