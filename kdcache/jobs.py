"""`--jobs N`: the students of one sweep trained side by side, one process each (one GPU each).

A convenience for sweeps on one node, not a replacement for DDP: each student still trains on one
device. Jobs are spawned processes (CUDA cannot be forked); each loads the data and the teacher
targets itself and trains its share of the students, one after another.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from kdcache.errors import KDCacheError


def devices(cfg, n: int) -> list[str]:
    """One device per job: the GPUs in turn when training on CUDA, else the CPU for all."""
    from kdcache.dump import resolve_device

    device = resolve_device(cfg.device)
    if device.type == "cuda":
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(n)]
    return ["cpu"] * n


def run(cfg, runs: list, folders: dict) -> dict:
    """{(student, kind): summary row} for every run, trained by min(cfg.jobs, len(runs)) processes."""
    n = min(cfg.jobs, len(runs))
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // n)  # the CPU's cores shared out: no job oversubscribes them
    workers = [ctx.Process(target=_job, args=(cfg, runs[i::n], folders, device, threads, results), daemon=True)
               for i, device in enumerate(devices(cfg, n))]
    for w in workers:
        w.start()
    rows, errors = {}, []
    try:
        while len(rows) + len(errors) < len(runs):
            kind, run, value = results.get()
            if kind == "row":
                rows[run] = value
            else:
                errors.append(value)
                break  # one job failed: the sweep stops (finished students are kept for --resume)
    finally:
        for w in workers:
            if errors:
                w.terminate()
            w.join()
    if errors:
        raise KDCacheError(errors[0])
    return rows


def _job(cfg, runs, folders, device, threads, results) -> None:
    from kdcache import distributed
    from kdcache.train import Setup, fit

    torch.set_num_threads(threads)
    try:
        setup = Setup(dataclasses.replace(cfg, device=device), torch.device(device), distributed.Dist())
        for run in runs:
            results.put(("row", run, fit(run[0], run[1], setup, folders[run])))
    except KDCacheError as e:
        results.put(("error", runs[0], str(e)))
    except BaseException as e:  # a crash in a job: its message, not a hang of the parent
        results.put(("error", runs[0], f"job training {', '.join(r[0] for r in runs)} failed: {type(e).__name__}: {e}"))
