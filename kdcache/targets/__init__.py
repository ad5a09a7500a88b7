"""Stage 2's view of a cache: the teacher's targets of a split, gathered by sample index.

tables (in memory) and streamed (block by block from the store) give the same gathers; placement
decides which a run uses; cache opens a store for training; teachers is the one interface train.fit
calls, cached or online. This module only re-exports.
"""
from kdcache.targets.cache import Cache, open_cache
from kdcache.targets.placement import FIT_SHARE, MEMORY_SHARE, available_memory, choose_place
from kdcache.targets.streamed import StreamedSplit, StreamTeacherTargets
from kdcache.targets.tables import SplitTargets
from kdcache.targets.teachers import CachedTeacher, OnlineTeacher

__all__ = ["Cache", "CachedTeacher", "FIT_SHARE", "MEMORY_SHARE", "OnlineTeacher", "SplitTargets", "StreamTeacherTargets",
           "StreamedSplit", "available_memory", "choose_place", "open_cache"]
