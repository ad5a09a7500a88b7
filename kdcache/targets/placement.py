"""Where a run keeps its targets (--targets-in auto|memory|gpu|stream): what fits in free GPU memory
or RAM, read from the device and /proc/meminfo."""
from __future__ import annotations

import os

import torch

from kdcache.errors import KDCacheError


def available_memory() -> int:
    """Bytes this machine can still give a process without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


MEMORY_SHARE = 0.5  # auto keeps targets in RAM (or on the GPU) only while they take at most half of what is free
FIT_SHARE = 0.9  # an explicit --targets-in memory|gpu is refused above this: the rest is for the model and images


def choose_place(requested: str, need: int, device) -> str:
    """memory, gpu or stream for targets of `need` bytes, as asked or (auto) as they fit."""
    device = torch.device(device)
    gpu_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    ram_free = available_memory()
    gib = 2**30
    if requested == "gpu":
        if device.type != "cuda":
            raise KDCacheError("--targets-in gpu needs training on a CUDA device; use --targets-in memory here")
        if need > FIT_SHARE * gpu_free:
            raise KDCacheError(f"the targets take {need / gib:.2f} GiB but the GPU has {gpu_free / gib:.2f} GiB free; "
                               "use --targets-in memory or stream")
        return "gpu"
    if requested == "memory":
        if need > FIT_SHARE * ram_free:
            raise KDCacheError(f"the targets take {need / gib:.2f} GiB but only {ram_free / gib:.2f} GiB of memory is "
                               "available; use --targets-in stream (or a compact cache: kdcache convert --topk K)")
        return "memory"
    if requested == "stream":
        return "stream"
    if device.type == "cuda" and need <= MEMORY_SHARE * gpu_free:
        return "gpu"  # a batch is one gather where the student is: no host-to-device copy of targets
    return "memory" if need <= MEMORY_SHARE * ram_free else "stream"
