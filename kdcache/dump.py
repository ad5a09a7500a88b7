"""Stage 1, `dump-teacher`: run the teacher once over each split and write what students need.

dataset (eval transform, fixed order) -> V views per sample (augment.DumpViews; one clean view
unless --views/--augment) -> DataLoader (no shuffle) -> teacher (inference mode, autocast on GPU)
-> hooks -> device-to-host copy -> ChunkWriter thread -> store; complete last.
A row of every array is one sample: [V, ...], all its views.
"""
from __future__ import annotations

import datetime
import hashlib
import os

import numpy as np
import torch

from kdcache import augment
from kdcache import store as stores
from kdcache.config import DumpConfig, as_dict, resolve
from kdcache.data import SplitData, load_split
from kdcache.errors import KDCacheError
from kdcache.hooks import REDUCTIONS, capture, parse_activation
from kdcache.models import build_teacher, get_module
from kdcache.writer import ChunkWriter, chunk_checksum


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KDCacheError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise KDCacheError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Identity of weights that came from no file (a name-only teacher)."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def encode(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """A teacher output in the store's dtype, still on its device (halves the copy for fp16)."""
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16)  # stored as uint16 bits; int16 is the same bits
    return t.to(getattr(torch, dtype))


def dump_teacher(cfg: DumpConfig | None = None, **options) -> str:
    """Run the teacher over every split of `cfg` into a store; return the store's path.

    Python API: `kdcache.dump_teacher(teacher="runs/t/resnet20/model.pt", dataset="digits",
    out="cache.zarr")` takes the same options as the command line.
    """
    cfg = cfg or resolve(DumpConfig, overrides=options, source="dump_teacher()")
    out = cfg.out.rstrip("/")
    partial = stores.partial_path(out)
    stores.backend_for(out)  # an unknown suffix fails before any work
    with stores.StoreLock(out):  # one writer per store: a second dump fails here, at once
        return _dump(cfg, out, partial)


def _dump(cfg: DumpConfig, out: str, partial: str) -> str:
    if os.path.exists(out) and not (cfg.overwrite or cfg.resume):
        raise KDCacheError(f"output '{out}' already exists; pass --overwrite to replace it or choose another --out")
    if os.path.exists(partial) and not (cfg.overwrite or cfg.resume):
        raise KDCacheError(f"an interrupted dump exists at '{partial}'; pass --resume to finish it or --overwrite to start over")
    if cfg.resume and not os.path.exists(partial):
        if os.path.exists(out):
            print(f"{out} is already complete; nothing to resume")
            return out
        raise KDCacheError(f"nothing to resume: neither '{partial}' nor '{out}' exists; run without --resume")

    device = resolve_device(cfg.device)
    splits = [load_split(cfg.dataset, s, root=cfg.data_root) for s in cfg.splits]
    # a teacher given by name takes its shape from the data; a checkpoint is checked against it
    teacher, info = build_teacher(cfg.teacher, num_classes=splits[0].num_classes, in_chans=splits[0].in_chans,
                                  weights=cfg.weights)
    teacher.to(device).eval()
    info = dict(info, weights_sha256=info.get("weights_sha256") or state_dict_sha256(teacher))
    activations = [parse_activation(a) for a in cfg.activations]
    if len({name for name, _ in activations}) != len(activations):
        raise KDCacheError("--activation names a module twice; store each module in one form")
    for name, _ in activations:
        get_module(teacher, name)  # an unknown layer fails before anything is written
    for data in splits:
        if data.num_classes != info["num_classes"]:
            raise KDCacheError(f"teacher predicts {info['num_classes']} classes but {data.name} has {data.num_classes}; "
                               "use the teacher trained on this dataset")

    root_attrs = {
        "schema_version": stores.SCHEMA_VERSION,
        "kdcache_version": _version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "complete": False,
        "teacher": info,
        "splits": list(cfg.splits),
        "dtype": cfg.dtype,
        "encoding": stores.STORAGE_DTYPES[cfg.dtype][1],
        "views": cfg.views,
        "augment": augment.dump_attrs(cfg),  # how views were made (None: one clean view per sample)
        "topk": None,
        "activations": {name: {"form": form} for name, form in activations},
        "config": as_dict(cfg),
    }
    if cfg.resume:
        store = stores.backend_for(partial)(partial, read_only=False)
        _check_resumable(store, root_attrs, splits)
    else:
        _check_free_space(out, teacher, splits, activations, cfg, device)
        store = stores.create_store(partial)
        store.update_attrs(root_attrs)
    try:
        for data in splits:
            _dump_split(store, teacher, data, activations, cfg, device, augment.dump_recipe(cfg, data))
        store.update_attrs({"complete": True})  # written last: only now does the store read as complete
    finally:
        store.close()
    if os.path.exists(out):  # --overwrite: the old store goes only once the new one is whole
        stores.remove_store(out)
    os.replace(partial, out)
    return out


def _dump_split(store, teacher, data: SplitData, activations, cfg: DumpConfig, device, recipe) -> None:
    """One split into `store`; `recipe` (augment.ViewRecipe) makes its views, None: one clean view."""
    split, n = data.split, len(data)
    if store.get_attrs(split).get("complete") if split in store.group_names() else False:
        return
    views = cfg.views if recipe is not None else 1
    source = augment.DumpViews(data.dataset, recipe, views)  # sample i -> (x [V, C, H, W], per-view record)
    shapes = _probe(teacher, source, activations, device)
    storage_dtype = stores.STORAGE_DTYPES[cfg.dtype][0]
    specs = {"logits": ((n, views) + shapes["logits"], storage_dtype)}
    for name, form in activations:
        specs[f"activations/{name}"] = ((n, views) + shapes[name], storage_dtype)
    arrays = {}
    for key, (shape, dtype) in specs.items():
        rows = stores.chunk_rows(int(np.prod(shape[1:])) * np.dtype(dtype).itemsize, n, cfg.chunk_bytes)
        arrays[f"{split}/{key}"] = _array(store, f"{split}/{key}", shape, dtype, rows)
    # seeds, digests and mixes are chunked like the logits: tiny rows would make huge chunks, and the
    # largest chunk sets the step a resumed dump restarts at
    for key, (dtype, tail) in (recipe.records() if recipe is not None else {}).items():
        arrays[f"{split}/{key}"] = _array(store, f"{split}/{key}", (n, views) + tail, dtype, arrays[f"{split}/logits"][1])
    if not store.has_array(f"{split}/labels"):
        labels = store.create_array(f"{split}/labels", shape=(n,), dtype="int64",
                                    chunks=(stores.chunk_rows(8, n, cfg.chunk_bytes),))
        labels[:] = data.labels
        label_rows = labels.chunks[0] if hasattr(labels, "chunks") else n
        sums = [chunk_checksum(data.labels[i : i + label_rows]) for i in range(0, n, label_rows)]
        store.update_attrs({"dataset": data.describe(), "transform": data.transform, "views": views,
                            "view_transform": recipe.augmentation.description if recipe is not None else None,
                            "rows_written": 0, "complete": False, "checksums": {"labels": sums}}, group=split)

    # restart where every array begins a fresh chunk: chunk sizes are powers of two, so the
    # largest one's boundaries are boundaries of all
    recorded = store.get_attrs(split)
    done = recorded.get("rows_written", 0)
    step = max(rows for _, rows in arrays.values())
    start = done if done >= n else done - done % step
    prefix = f"{split}/"

    def progress(rows, checksums):  # from the writer thread, each time more rows are whole on disk
        sums = dict(recorded.get("checksums", {}), **{k.removeprefix(prefix): v for k, v in checksums.items()})
        store.update_attrs({"checksums": sums, "rows_written": rows}, group=split)  # the marker last

    seed = {prefix + k: v for k, v in recorded.get("checksums", {}).items()}
    writer = ChunkWriter(arrays, start_row=start, on_progress=progress, checksums=seed)
    subset = torch.utils.data.Subset(source, range(start, n))
    cuda = device.type == "cuda"
    # --batch-size counts teacher inputs: B // V samples of V views each
    loader = torch.utils.data.DataLoader(subset, batch_size=max(1, cfg.batch_size // views), shuffle=False,
                                         num_workers=cfg.num_workers, pin_memory=cuda)
    from tqdm import tqdm

    bar = tqdm(total=n, initial=start, unit="samples", desc=f"dump {split}", disable=None, unit_scale=True)
    names = [name for name, _ in activations]
    try:
        with torch.inference_mode(), torch.autocast("cuda", enabled=cuda), capture(teacher, names) as acts:
            row = start
            for x, record in loader:
                b, v = x.shape[:2]
                x = x.to(device, non_blocking=True).flatten(0, 1)  # [B * V, C, H, W]: every view in one teacher batch
                logits = teacher(x).float().unflatten(0, (b, v))  # [B, V, C]
                if not cfg.allow_nonfinite:
                    _check_finite(logits.flatten(1), row)
                rows = {f"{split}/logits": encode(logits, cfg.dtype)}
                for name, form in activations:
                    rows[f"{split}/activations/{name}"] = encode(REDUCTIONS[form](acts[name].float()).unflatten(0, (b, v)),
                                                                 cfg.dtype)
                # copies are queued behind the teacher's kernels; the writer waits on the event
                host = {k: t.to("cpu", non_blocking=cuda) for k, t in rows.items()}
                host.update({f"{split}/{k}": augment.as_stored(k, t) for k, t in record.items()})  # on the host already
                ready = torch.cuda.Event() if cuda else None
                if ready is not None:
                    ready.record()
                writer.put(host, ready)
                row += b
                bar.update(b)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    writer.close()
    store.update_attrs({"complete": True}, group=split)


def _array(store, path: str, shape: tuple, dtype: str, rows: int):
    """(array, rows per chunk) at `path`, created unless a resumed store has it already."""
    if not store.has_array(path):
        store.create_array(path, shape=shape, dtype=dtype, chunks=(rows,) + shape[1:])
    array = store.array(path)
    return array, array.chunks[0]  # a resumed store keeps the chunking it was made with


def estimate_bytes(teacher, splits, activations, cfg: DumpConfig, device) -> int:
    """Uncompressed size of the store: an upper bound, since chunks are compressed (digits' fp16
    logits shrink ~10%, feature maps more)."""
    itemsize = np.dtype(stores.STORAGE_DTYPES[cfg.dtype][0]).itemsize
    total = 0
    for data in splits:
        recipe = augment.dump_recipe(cfg, data)
        views = cfg.views if recipe is not None else 1
        shapes = _probe(teacher, augment.DumpViews(data.dataset, recipe, views), activations, device)
        per_view = sum(int(np.prod(shape)) for shape in shapes.values()) * itemsize + (16 if recipe else 0)
        total += len(data) * (8 + views * per_view)  # labels, then every view's outputs and records
    return total


def _check_free_space(out: str, teacher, splits, activations, cfg: DumpConfig, device) -> None:
    """Refuse before writing a byte when the store cannot fit: better than ENOSPC hours in."""
    import shutil

    need = estimate_bytes(teacher, splits, activations, cfg, device)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(out))).free
    if need > free:
        raise KDCacheError(f"the store needs up to {need / 2**20:,.1f} MiB but only {free / 2**20:,.1f} MiB is free "
                           f"where '{out}' goes; free space, choose another --out, or store reduced activations "
                           "(NAME:attention or NAME:pool)")


def _check_finite(logits: torch.Tensor, first_row: int) -> None:
    """`logits` [B, ...]: stop at the first sample with a NaN or Inf anywhere in its row."""
    bad = ~torch.isfinite(logits).all(dim=1)
    if bad.any():
        row = first_row + int(bad.nonzero()[0])
        raise KDCacheError(f"teacher output for sample {row} is not finite (NaN or Inf); check the teacher weights "
                           "and input, or pass --allow-nonfinite to keep such rows")


def _probe(teacher, source, activations, device) -> dict:
    """Per-view shapes of the logits and each stored activation form, from sample 0's first view."""
    x = source[0][0][:1].to(device)
    with torch.inference_mode(), capture(teacher, [n for n, _ in activations]) as acts:
        logits = teacher(x)
    shapes = {"logits": tuple(logits.shape[1:])}
    for name, form in activations:
        shapes[name] = tuple(REDUCTIONS[form](acts[name].float()).shape[1:])
    return shapes


def _check_resumable(store, attrs: dict, splits) -> None:
    old = store.get_attrs()
    for key in ("teacher", "splits", "dtype", "activations", "views", "augment"):
        if old.get(key) != attrs[key]:
            raise KDCacheError(f"cannot resume '{store.path}': its {key} differs from this run's "
                               f"({old.get(key)} vs {attrs[key]}); pass --overwrite to start over")
    for data in splits:
        if data.split in store.group_names():
            recorded = store.get_attrs(data.split).get("dataset", {}).get("fingerprint")
            if recorded is not None and recorded != data.fingerprint():
                raise KDCacheError(f"cannot resume '{store.path}': split '{data.split}' holds different data "
                                   "(fingerprint mismatch); pass --overwrite to start over")


def _version() -> str:
    from kdcache import __version__

    return __version__
