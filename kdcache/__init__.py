"""kdcache: run a teacher once, cache its logits and activations, train many students from them.

Data flows data -> augment (replayable views) -> models -> dump (hooks, writer) -> store -> targets
-> losses/schedules -> train.
"""
__version__ = "0.1.0"

from kdcache.dump import dump_teacher  # noqa: E402
from kdcache.errors import KDCacheError  # noqa: E402
from kdcache.losses import kd_objective, soft_target  # noqa: E402
from kdcache.targets import open_cache  # noqa: E402
from kdcache.train import train_student  # noqa: E402

__all__ = ["__version__", "dump_teacher", "train_student", "open_cache", "kd_objective", "soft_target", "KDCacheError"]
