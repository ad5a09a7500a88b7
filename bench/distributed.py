"""Dump throughput with 2 processes (`torchrun --nproc-per-node 2`, gloo) against 1, same teacher and data.

    .venv/bin/python bench/distributed.py [--rounds 5] [--data benchdata:cifar100_like_large]

Each side is a fresh launch, as a user runs it, and each process has 1 torch thread (OMP_NUM_THREADS=1:
on 2 shared cores a second thread per process only contends). The sides alternate round after round
(bench/timing.py); the ratio is the median of the per-round ratios. Timed: `kdcache.dump_teacher` from
a barrier after every rank's imports to a barrier after the last rank's return (store creation, probe,
batch loop, merge, rename); the launch and imports (~4 s of CPU per process) are printed beside it.
The two stores are checked equal value for value, so the figure is for a correct dump.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)  # timing.py and benchdata.py, when run as a script
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # helpers.torchrun: the launcher the tests use

import numpy as np  # noqa: E402

TEACHER, CLASSES = "resnet8", 100  # bench/run.py's teacher: ~0.9 ms/sample on 1 CPU thread
# 64-row blocks of float16 logits (200 B/row): the test split (1024 rows) has 16 blocks to share, and
# batches of 64 keep every rank's range aligned to a batch without dealing blocks in groups
OPTIONS = dict(chunk_bytes=64 * 200, batch_size=64)


def worker(out: str, teacher: str, data: str) -> None:
    """One rank (or the one process) of a side: the timed dump; rank 0 prints {"seconds", "samples"}."""
    import torch.distributed as td

    from kdcache import dump_teacher
    from kdcache import store as stores
    from kdcache.distributed import Dist

    dist = Dist.from_env()
    if dist.world_size > 1:  # joined here, not in dump_teacher, so the timer starts once every rank has imported
        td.init_process_group("gloo", rank=dist.rank, world_size=dist.world_size)
        td.barrier()
    start = time.perf_counter()
    dump_teacher(teacher=teacher, dataset=data, out=out, overwrite=True, **OPTIONS)
    if dist.world_size > 1:
        td.barrier()
        td.destroy_process_group()
    seconds = time.perf_counter() - start
    if dist.is_main:
        with stores.open_store(out) as store:
            samples = sum(store.array(f"{split}/labels").shape[0] for split in store.get_attrs()["splits"])
        print(json.dumps({"seconds": seconds, "samples": samples}))


def launch(nproc: int, out: str, teacher: str, data: str) -> dict:
    from helpers.torchrun import launch as run_processes

    start = time.perf_counter()
    run = run_processes([os.path.abspath(__file__), "--worker", out, teacher, data], nproc=nproc,
                        env={"PYTHONPATH": os.pathsep.join([BENCH, ROOT])}, timeout=900)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"{nproc}-process dump failed:\n{run.stderr[-3000:]}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return dict(result, wall=wall)


def same_store(a: str, b: str) -> bool:
    from kdcache import store as stores

    with stores.open_store(a) as x, stores.open_store(b) as y:
        return all(np.array_equal(x.array(f"{s}/{n}")[:], y.array(f"{s}/{n}")[:])
                   for s in x.get_attrs()["splits"] for n in x.array_names(s))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of (1 process, 2 processes), alternating")
    parser.add_argument("--data", default="benchdata:cifar100_like_large",
                        help="dataset (default: 16384 + 1024 CIFAR-100-like images in memory, ~17 s per 1-thread dump)")
    args = parser.parse_args(argv)

    import torch

    from kdcache.models import create_model, save_checkpoint
    from timing import paired

    work = tempfile.mkdtemp(prefix="kdcache-bench-dist-")
    torch.manual_seed(0)  # random weights, saved: every rank loads the same teacher
    teacher = os.path.join(work, "teacher.pt")
    save_checkpoint(teacher, create_model(TEACHER, num_classes=CLASSES), arch=TEACHER, arch_kwargs={},
                    num_classes=CLASSES, in_chans=3, config={}, metrics={})
    outs = {1: os.path.join(work, "one.zarr"), 2: os.path.join(work, "two.zarr")}
    runs = {1: [], 2: []}
    for r in range(args.rounds):
        for nproc in ((1, 2) if r % 2 == 0 else (2, 1)):  # neither side always runs first
            runs[nproc].append(launch(nproc, outs[nproc], teacher, args.data))
        print(f"round {r + 1}: " + ", ".join(f"{n} process{'es' if n > 1 else ''} {runs[n][-1]['seconds']:.2f} s "
                                             f"(launch {runs[n][-1]['wall']:.1f} s)" for n in (1, 2)), flush=True)
    assert same_store(outs[1], outs[2]), "the 2-process store differs from the 1-process store"

    samples = runs[1][0]["samples"]
    times = {f"p{n}": [run["seconds"] for run in runs[n]] for n in (1, 2)}
    walls = {f"p{n}": [run["wall"] for run in runs[n]] for n in (1, 2)}
    ratio = paired(times, lambda p1, p2: p1 / p2)  # throughput ratio = inverse time ratio
    for n in (1, 2):
        rates = [samples / s for s in times[f"p{n}"]]
        print(f"{n} process{'es' if n > 1 else ' '}: median {np.median(rates):,.0f} samples/s, best {max(rates):,.0f} "
              f"({samples} samples; launch + imports + dump: median {np.median(walls[f'p{n}']):.1f} s)")
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"dump 2 processes / 1 process throughput: {ratio:.2f}")
    print(f"  whole command (launch + imports + dump): {paired(walls, lambda p1, p2: p1 / p2):.2f}")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:5])
    else:
        sys.exit(main())
