"""kdcache's speed targets (DESIGN.md, "Speed, as measured ratios"), measured side by side.

Every figure is a ratio of two sides run in the same process, alternating, round after round
(the order reversed every other round); the figure is the median of the per-round ratios, so a
machine that slows down between minutes moves both sides of a round together.

1. dump / inference-only throughput (target >= 0.95). Inference-only: the DataLoader that
   `dump_teacher` builds (same dataset, batch size, workers, pin_memory) and the teacher's
   forward under inference_mode (autocast on CUDA), outputs discarded.
     1a/1b  split loop: `kdcache.dump._dump_split` into a fresh zarr / HDF5 store, i.e. probe,
            array creation, labels, dataset fingerprint, the batch loop, writer thread, flush.
            This is the steady-state figure.
     1c/1d  whole call: `kdcache.dump_teacher(..., overwrite=True)` as a user calls it: teacher
            from its checkpoint, dataset, store creation, the split, complete flag, rename.
            The fixed costs (whole call minus split loop) are printed beside it. Both are timed in
            a warm process; the CLI pays its imports (torch, torchvision, zarr) on top.
2. train-from-cache / plain-training throughput (target >= 0.97): `kdcache.train.train_one_epoch`
   with the same student init, data order and optimizer; plain = CE only (teacher=None), from
   cache = CE + soft_target KD with targets gathered by `CachedTeacher` from the in-memory table.
3. random-batch read of cached logits (target >= 1,000,000 samples/s): `SplitTargets[idx]`
   (`open_cache(path)[split][idx]`) on random batches of 256 from a synthetic 200k x 1000 float16
   zarr store written with kdcache's store classes, next to a naive per-batch zarr read
   (`array.oindex[sorted idx]`) on the same store; their ratio is printed beside it.
4. online-KD / cached-KD step time (target >= 0.97 x (student + teacher) / student): online
   uses `OnlineTeacher`; student = the plain-training epoch (forward, backward, step, loader),
   teacher = the teacher's no_grad forward over the same batches, both measured in each round.
   What is judged is the paired ratio (online / cached) / ((student + teacher) / student) >= 0.97,
   i.e. a cache saves at least 97% of what the teacher costs online.

Also: bytes per sample of the stores of figure 1 (`kdcache.report.describe_store`).

Run: `.venv/bin/python bench/run.py` (`make bench`); `--rounds N` for more rounds, `--keep` to
keep the stores. Device: cuda when there is one (as `--device auto`), else cpu.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # timing.py, when run as a script

from timing import Figure, alternate, med, paired, sync, timed  # noqa: E402

import kdcache  # noqa: E402
from kdcache import store as stores  # noqa: E402
from kdcache.config import DumpConfig, TrainConfig, resolve  # noqa: E402
from kdcache.data import TensorDataset, WithIndex, load_split  # noqa: E402
from kdcache.dump import _dump_split, dump_teacher, resolve_device  # noqa: E402
from kdcache.models import build_teacher, create_model, save_checkpoint  # noqa: E402
from kdcache.report import describe_store  # noqa: E402
from kdcache.schedules import Schedule  # noqa: E402
from kdcache.targets import CachedTeacher, OnlineTeacher, open_cache  # noqa: E402
from kdcache.train import train_one_epoch  # noqa: E402

# Sizes: each side of a comparison takes a few seconds on 2 CPU cores (whole run < 5 minutes).
CLASSES = 100  # CIFAR-100-like: 200 B/sample of float16 logits
TEACHER = "resnet8"  # ~2 ms/sample forward on 2 cores: the teacher is the cost a cache saves
STUDENT = "cnn_tiny"  # ~1 ms/sample train step: a small student, so the KD overhead shows
SIZES = {  # per device type: dataset size, train epochs per side, rounds per figure
    "cpu": dict(samples=1024, epochs=2, rounds={1: 3, 2: 5, 3: 3, 4: 3}),
    "cuda": dict(samples=8192, epochs=3, rounds={1: 3, 2: 5, 3: 5, 4: 5}),
}
READ_ROWS, READ_CLASSES, READ_BATCH = 200_000, 1000, 256  # figure 3's store: 400 MB of float16 logits
GATHERS, ZARR_READS = 400, 4  # batches per side per round of figure 3 (the zarr side is ~200x slower)


# --- fixtures -----------------------------------------------------------------------------------

def make_teacher_checkpoint(folder: str) -> str:
    """A random-weight teacher saved as a kdcache checkpoint (dump_teacher wants one: see report)."""
    torch.manual_seed(0)
    model = create_model(TEACHER, num_classes=CLASSES)
    path = os.path.join(folder, "teacher.pt")
    save_checkpoint(path, model, arch=TEACHER, arch_kwargs={}, num_classes=CLASSES, in_chans=3,
                    config={}, metrics={})
    return path


def in_memory(data) -> TensorDataset:
    """The split's images decoded once: training sides then measure the step, not PIL."""
    images = torch.stack([data.dataset[i][0] for i in range(len(data))])
    return TensorDataset(images, data.labels)


# --- 1. dump vs inference-only --------------------------------------------------------------------

def inference_only(teacher, data, cfg: DumpConfig, device) -> None:
    """The teacher over the loader dump_teacher builds, outputs discarded."""
    cuda = device.type == "cuda"
    subset = torch.utils.data.Subset(data.dataset, range(0, len(data)))
    loader = torch.utils.data.DataLoader(subset, batch_size=cfg.batch_size, shuffle=False,
                                         num_workers=cfg.num_workers, pin_memory=cuda)
    with torch.inference_mode(), torch.autocast("cuda", enabled=cuda):
        for x, _ in loader:
            teacher(x.to(device, non_blocking=True))
    sync(device)


def dump_split_only(path: str, teacher, data, cfg: DumpConfig, device) -> float:
    """kdcache's per-split dump into a fresh store; times `_dump_split` alone."""
    store = stores.create_store(path)
    try:
        start = time.perf_counter()
        _dump_split(store, teacher, data, [], cfg, device)
        return time.perf_counter() - start
    finally:
        store.close()


def dump_whole_call(cfg: DumpConfig, out: str) -> None:
    dump_teacher(teacher=cfg.teacher, dataset=cfg.dataset, splits=cfg.splits, out=out, device=cfg.device,
                 overwrite=True)


def bench_dump(work: str, ckpt: str, spec: str, device, rounds: int) -> tuple[list[Figure], dict]:
    cfg = resolve(DumpConfig, overrides=dict(teacher=ckpt, dataset=spec, splits=["train"], out="unused.zarr",
                                             device=str(device)), source="bench")
    teacher = build_teacher(ckpt, num_classes=None)[0].to(device).eval()
    data = load_split(spec, "train")
    paths = {k: os.path.join(work, f"dump-{k}") for k in ("split.zarr", "split.h5", "call.zarr", "call.h5")}
    inference_only(teacher, data, cfg, device)  # warm-up: first forwards build the conv kernels' plans
    times = alternate({
        "infer": lambda: inference_only(teacher, data, cfg, device),
        "zarr_split": lambda: dump_split_only(paths["split.zarr"], teacher, data, cfg, device),
        "h5_split": lambda: dump_split_only(paths["split.h5"], teacher, data, cfg, device),
        "zarr_call": lambda: dump_whole_call(cfg, paths["call.zarr"]),
        "h5_call": lambda: dump_whole_call(cfg, paths["call.h5"]),
    }, rounds)
    n = len(data)
    rate = lambda t: f"{n / t:,.0f}/s"  # noqa: E731
    figures = []
    for key, side, what in (("1a", "zarr_split", "dump/inference, zarr, split loop (steady state)"),
                            ("1b", "h5_split", "dump/inference, hdf5, split loop (steady state)"),
                            ("1c", "zarr_call", "dump/inference, zarr, whole dump_teacher call"),
                            ("1d", "h5_call", "dump/inference, hdf5, whole dump_teacher call")):
        ratio = paired(times, lambda **t: t["infer"] / t[side])
        note = f"inference {rate(med(times['infer']))}, dump {rate(med(times[side]))}"
        if side.endswith("_call"):
            split_side = side.replace("_call", "_split")
            fixed = paired(times, lambda **t: t[side] - t[split_side])
            note += f"; fixed costs (call - split loop) {fixed * 1000:+.0f} ms"
        figures.append(Figure(key, what, ratio, 0.95, f"{ratio:.3f}", ">= 0.95", note))
    return figures, {"zarr": paths["call.zarr"], "h5": paths["call.h5"], "samples": n}


def store_sizes(paths: dict) -> list[str]:
    """Bytes per sample of each dumped store, logical and on disk, from describe_store."""
    lines = []
    for backend, path in paths.items():
        for split, entry in describe_store(path)["splits"].items():
            for name, a in entry["arrays"].items():
                rows = max(a["shape"][0], 1)
                lines.append(f"   {backend:<4} {split}/{name:<7} {str(tuple(a['shape'])):<16} {a['dtype']:<8} "
                             f"{a['bytes_per_sample']:>5} B/sample logical, {a['stored_bytes'] / rows:7.1f} B/sample on disk")
    return lines


# --- 2. training from the cache vs plain training --------------------------------------------------

def train_loader(dataset: TensorDataset, cfg: TrainConfig):
    """kdcache.train's loader: (x, y, index), shuffled by a seeded generator (same order every side)."""
    return torch.utils.data.DataLoader(WithIndex(dataset), batch_size=cfg.batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(cfg.seed), num_workers=cfg.num_workers)


def train_epochs(dataset: TensorDataset, teacher, cfg: TrainConfig, epochs: int, device) -> float:
    """`epochs` of train_one_epoch from the same init and data order; times the epochs alone."""
    torch.manual_seed(cfg.seed)
    model = create_model(STUDENT, num_classes=CLASSES).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=True)
    loader = train_loader(dataset, cfg)
    schedule = Schedule(cfg.alpha_schedule, cfg.alpha_start, cfg.alpha) if teacher is not None else None
    sync(device)
    start = time.perf_counter()
    for epoch in range(epochs):  # train_one_epoch ends in a float() of its losses: a device sync
        train_one_epoch(model, loader, optimizer, teacher, cfg, step=epoch * len(loader),
                        total_steps=epochs * len(loader), alpha_schedule=schedule, device=device)
    return time.perf_counter() - start


def bench_train(dataset: TensorDataset, cache_path: str, device, epochs: int, rounds: int) -> Figure:
    cfg = TrainConfig(students=[STUDENT], cache=cache_path)
    cached = CachedTeacher(open_cache(cache_path, device=device)["train"])
    train_epochs(dataset, cached, cfg, 1, device)  # warm-up: first backward allocates its buffers
    times = alternate({
        "plain": lambda: train_epochs(dataset, None, cfg, epochs, device),
        "cached": lambda: train_epochs(dataset, cached, cfg, epochs, device),
    }, rounds)
    ratio = paired(times, lambda plain, cached: plain / cached)
    steps = epochs * len(dataset) / cfg.batch_size
    note = (f"plain {1000 * med(times['plain']) / steps:.1f} ms/step, "
            f"from cache {1000 * med(times['cached']) / steps:.1f} ms/step ({STUDENT}, batch {cfg.batch_size})")
    return Figure("2", "train from cache / plain training, throughput", ratio, 0.97, f"{ratio:.3f}", ">= 0.97", note)


# --- 3. random-batch reads of cached logits ---------------------------------------------------------

def write_synthetic_store(path: str, rows: int, classes: int) -> None:
    """A complete one-split float16 cache, written chunk-aligned with kdcache's store classes."""
    rng = np.random.default_rng(0)
    with stores.create_store(path) as store:
        store.update_attrs({"schema_version": stores.SCHEMA_VERSION, "complete": False, "encoding": None,
                            "activations": {}, "teacher": {"arch": "synthetic", "num_classes": classes},
                            "dtype": "float16", "views": 1, "topk": None})
        chunk = stores.chunk_rows(classes * 2, rows)
        logits = store.create_array("train/logits", shape=(rows, 1, classes), dtype="float16",
                                    chunks=(chunk, 1, classes))
        block = chunk * 16  # 16 whole chunks per write: ~16 MiB of host memory at a time
        for start in range(0, rows, block):
            n = min(block, rows - start)
            logits[start:start + n] = (3 * rng.standard_normal((n, 1, classes), dtype=np.float32)).astype(np.float16)
        labels = store.create_array("train/labels", shape=(rows,), dtype="int64", chunks=(stores.chunk_rows(8, rows),))
        labels[:] = rng.integers(0, classes, rows)
        store.update_attrs({"complete": True, "rows_written": rows}, group="train")
        store.update_attrs({"complete": True})


def gather_batches(targets, batches: list) -> None:
    for index in batches:
        targets[index]


def zarr_batch_reads(array, batches: list) -> None:
    """The naive way: one zarr read per batch (orthogonal selection wants sorted indices)."""
    for index in batches:
        array.oindex[np.sort(index.numpy())]


def bench_read(work: str, rounds: int) -> tuple[Figure, str]:
    path = os.path.join(work, "read.zarr")
    write_s = timed(lambda: write_synthetic_store(path, READ_ROWS, READ_CLASSES))
    start = time.perf_counter()
    targets = open_cache(path)["train"]  # the whole table into memory, one read per array
    load_s = time.perf_counter() - start
    store = stores.open_store(path)
    array = store.array("train/logits")
    g = torch.Generator().manual_seed(0)
    draw = lambda k: [torch.randint(0, READ_ROWS, (READ_BATCH,), generator=g) for _ in range(k)]  # noqa: E731
    gather_batches(targets, draw(20))  # warm-up
    times = alternate({
        "gather": lambda: gather_batches(targets, draw(GATHERS)),
        "zarr": lambda: zarr_batch_reads(array, draw(ZARR_READS)),
    }, rounds)
    store.close()
    gather_rate = paired(times, lambda gather, zarr: GATHERS * READ_BATCH / gather)
    zarr_rate = paired(times, lambda gather, zarr: ZARR_READS * READ_BATCH / zarr)
    speedup = paired(times, lambda gather, zarr: (GATHERS / gather) / (ZARR_READS / zarr))
    note = (f"per-batch zarr oindex {zarr_rate:,.0f}/s, gather/zarr = {speedup:,.0f}x; "
            f"{READ_ROWS:,} x {READ_CLASSES} float16 table")
    info = (f"   store for 3: written in {write_s:.1f} s, {du(path) / 1e6:.0f} MB on disk, "
            f"loaded into memory by open_cache()[split] in {load_s:.1f} s")
    shutil.rmtree(path)  # 400 MB: gone as soon as it has served
    figure = Figure("3", f"random batches of {READ_BATCH} from the in-memory table",
                    gather_rate, 1e6, f"{gather_rate:,.0f}/s", ">= 1,000,000/s", note)
    return figure, info


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# --- 4. online KD vs KD from the cache ----------------------------------------------------------

def teacher_forward(teacher, batches: list, device) -> None:
    """What OnlineTeacher adds per step: the teacher's forward under no_grad."""
    with torch.no_grad():
        for x in batches:
            teacher(x)
    sync(device)


def bench_online(dataset: TensorDataset, cache_path: str, ckpt: str, device, epochs: int, rounds: int) -> Figure:
    cfg = TrainConfig(students=[STUDENT], cache=cache_path)
    cached = CachedTeacher(open_cache(cache_path, device=device)["train"])
    model = build_teacher(ckpt, num_classes=None)[0].to(device)
    online = OnlineTeacher(model)
    batches = [x.to(device) for _ in range(epochs) for x, _, _ in train_loader(dataset, cfg)]
    teacher_forward(model, batches[:4], device)  # warm-up
    times = alternate({
        "plain": lambda: train_epochs(dataset, None, cfg, epochs, device),
        "cached": lambda: train_epochs(dataset, cached, cfg, epochs, device),
        "online": lambda: train_epochs(dataset, online, cfg, epochs, device),
        "teacher": lambda: teacher_forward(model, batches, device),
    }, rounds)
    ratio = paired(times, lambda plain, cached, online, teacher: online / cached)
    ideal = paired(times, lambda plain, cached, online, teacher: (plain + teacher) / plain)
    judged = paired(times, lambda plain, cached, online, teacher: (online / cached) / ((plain + teacher) / plain))
    steps = len(batches)
    ms = lambda side: f"{1000 * med(times[side]) / steps:.1f}"  # noqa: E731
    note = (f"ms/step: student {ms('plain')}, teacher {ms('teacher')}, online {ms('online')}, cached {ms('cached')}; "
            f"(online/cached)/((s+t)/s) = {judged:.3f}")
    return Figure("4", f"online KD / cached KD step time ({TEACHER} -> {STUDENT})", judged, 0.97,
                  f"{ratio:.2f}", f">= 0.97 x {ideal:.2f} = {0.97 * ideal:.2f}", note)


# --- the run -------------------------------------------------------------------------------------

def print_table(figures: list[Figure]) -> None:
    print(f"{'':<3}{'figure':<58}{'measured':>12}  {'target':<26}result")
    for f in figures:
        print(f"{f.key:<3}{f.what:<58}{f.shown:>12}  {f.target_shown:<26}{f.verdict}")
        if f.note:
            print(f"{'':<6}{f.note}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="rounds per figure (default: per figure, see SIZES)")
    parser.add_argument("--workdir", default=None, help="where the stores go (default: a fresh temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the stores and checkpoint afterwards")
    args = parser.parse_args(argv)

    device = resolve_device("auto")
    sizes = SIZES[device.type if device.type in SIZES else "cpu"]
    rounds = {k: args.rounds or v for k, v in sizes["rounds"].items()}
    work = args.workdir or tempfile.mkdtemp(prefix="kdcache-bench-")
    os.makedirs(work, exist_ok=True)
    spec = f"fake:size={sizes['samples']},classes={CLASSES},image=32"
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    print(f"kdcache {kdcache.__version__} bench: torch {torch.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, dataset {spec}, teacher {TEACHER}, "
          f"student {STUDENT}", flush=True)
    figures, info = [], []
    try:
        ckpt = make_teacher_checkpoint(work)

        t = time.perf_counter()
        dump_figures, dumped = bench_dump(work, ckpt, spec, device, rounds[1])
        figures += dump_figures
        print(f"[1/4] dump vs inference: {rounds[1]} rounds, {time.perf_counter() - t:.0f} s", flush=True)

        dataset = in_memory(load_split(spec, "train"))
        t = time.perf_counter()
        figures.append(bench_train(dataset, dumped["zarr"], device, sizes["epochs"], rounds[2]))
        print(f"[2/4] train from cache vs plain: {rounds[2]} rounds, {time.perf_counter() - t:.0f} s", flush=True)

        t = time.perf_counter()
        read_figure, read_info = bench_read(work, rounds[3])
        figures.append(read_figure)
        info.append(read_info)
        print(f"[3/4] random-batch reads: {rounds[3]} rounds, {time.perf_counter() - t:.0f} s", flush=True)

        t = time.perf_counter()
        figures.append(bench_online(dataset, dumped["zarr"], ckpt, device, sizes["epochs"], rounds[4]))
        print(f"[4/4] online vs cached KD: {rounds[4]} rounds, {time.perf_counter() - t:.0f} s", flush=True)

        sizes_lines = store_sizes({"zarr": dumped["zarr"], "h5": dumped["h5"]})
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print_table(figures)
    print(f"bytes per sample of the stores of 1 ({dumped['samples']} samples, float16 logits, describe_store):")
    print("\n".join(sizes_lines))
    print("\n".join(info))
    load_after = os.getloadavg()[0]
    busy = "  (busy machine: other processes shared the CPUs)" if max(load_before, load_after) > (os.cpu_count() or 1) else ""
    print(f"load average {load_before:.1f} before, {load_after:.1f} after{busy}; total {time.perf_counter() - started:.0f} s")
    print(f"torch {torch.__version__}, device {device}; command: {shlex.join([sys.executable] + sys.argv)}")
    return 0  # a measurement, not a gate: BELOW is printed, never an error (DESIGN: never timed tests)


if __name__ == "__main__":
    sys.exit(main())
