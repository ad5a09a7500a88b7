"""`--jobs N`: the students of one sweep trained side by side, one process each (one GPU each).

A convenience for sweeps on one node, not a replacement for DDP: each student still trains on one
device. Jobs are spawned processes (CUDA cannot be forked); each loads the data and the teacher
targets itself and trains its share of the students, one after another. They are not daemons, so
that they can start DataLoader workers; a sweep that stops (a failed job, Ctrl-C, SIGTERM) ends
them, and each job ends its own workers as it unwinds: no process outlives the sweep.
"""
from __future__ import annotations

import dataclasses
import os
import queue

import torch

from kdcache import distributed
from kdcache.errors import KDCacheError
from kdcache.signals import sigterm_raises
from kdcache.train import Setup, fit

STOP_SECONDS = 30  # a stopped job's time to unwind (end its loader workers) before it is killed


def devices(cfg, n: int) -> list[str]:
    """One device per job: the GPUs in turn when training on CUDA, else the CPU for all."""
    
    device = distributed.resolve_device(cfg.device)
    if device.type == "cuda":
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(n)]
    return ["cpu"] * n


def run(cfg, runs: list, folders: dict) -> dict:
    """{(student, kind): summary row} for every run, trained by min(cfg.jobs, len(runs)) processes."""
    n = min(cfg.jobs, len(runs))
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // n)  # the CPU's cores shared out: no job oversubscribes them
    # not daemons: a daemonic process may not start children, and DataLoader workers are children
    workers = [ctx.Process(target=_job, args=(cfg, runs[i::n], folders, device, threads, results), daemon=False)
               for i, device in enumerate(devices(cfg, n))]
    rows, errors = {}, []
    with sigterm_raises():  # a SIGTERM to this process ends the jobs too, instead of orphaning them
        try:
            for w in workers:
                w.start()
            while len(rows) + len(errors) < len(runs):
                try:
                    kind, run, value = results.get(timeout=1.0)
                except queue.Empty:  # a job killed outright (out of memory, SIGKILL) sends no message
                    ended = [w.exitcode for w in workers if w.exitcode is not None]
                    if any(ended) or len(ended) == len(workers):
                        errors.append(f"a job process ended (exit code {max(ended, key=abs)}) before its students "
                                      "were trained; rerun with --resume (finished students are kept)")
                        break
                    continue
                if kind == "row":
                    rows[run] = value
                else:
                    errors.append(value)
                    break  # one job failed: the sweep stops (finished students are kept for --resume)
        finally:
            _stop([w for w in workers if w.pid is not None], finished=len(rows) == len(runs))
    if errors:
        raise KDCacheError(errors[0])
    return rows


def _stop(workers, *, finished: bool) -> None:
    """Wait for finished jobs; end the others (SIGTERM: they unwind and end their loader workers),
    killing any that has not ended within STOP_SECONDS."""
    for w in workers:
        if not finished:
            w.terminate()
    for w in workers:
        w.join(None if finished else STOP_SECONDS)
        if w.is_alive():
            w.kill()
            w.join()


def _job(cfg, runs, folders, device, threads, results) -> None:
    torch.set_num_threads(threads)
    try:
        with sigterm_raises():  # ended by the sweep: unwind, so that this job's loader workers end with it
            setup = Setup(dataclasses.replace(cfg, device=device), torch.device(device), distributed.Dist(), announce=False)
            for run in runs:
                results.put(("row", run, fit(run[0], run[1], setup, folders[run])))
    except KeyboardInterrupt:  # the sweep stopped (Ctrl-C, or ended by the parent): nothing to report
        pass
    except KDCacheError as e:
        results.put(("error", runs[0], str(e)))
    except BaseException as e:  # a crash in a job: its message, not a hang of the parent
        results.put(("error", runs[0], f"job training {', '.join(r[0] for r in runs)} failed: {type(e).__name__}: {e}"))
