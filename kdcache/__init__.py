"""kdcache: run a teacher once, cache its logits and activations, train many students from them.

Data flows dataset (data, augment) -> teacher (models, hooks) -> dump -> store -> targets ->
losses/schedules -> train. The names below are imported on first use (module __getattr__), so
`import kdcache` and `kdcache --help` cost no torch import.
"""
from kdcache.version import __version__

# name -> module that defines it; each is imported only when the name is first used
_EXPORTS = {
    "dump_teacher": "kdcache.dump",
    "train_student": "kdcache.sweep",
    "open_cache": "kdcache.targets",
    "kd_objective": "kdcache.losses",
    "soft_target": "kdcache.losses",
    "KDCacheError": "kdcache.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__():
    return sorted(__all__)
