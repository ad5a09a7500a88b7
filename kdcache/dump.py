"""Stage 1, `dump-teacher`: run the teacher once over each split and write what students need.

dataset (eval transform, fixed order) -> V views per sample (augment.DumpViews; one clean view
unless --views/--augment) -> DataLoader (no shuffle) -> teacher (inference mode, autocast on GPU)
-> hooks -> device-to-host copy -> BlockWriter thread -> store; complete last.
A row of every array is one sample: [V, ...], all its views.
"""
from __future__ import annotations

import contextlib
import datetime
import math

import numpy as np
import torch

from kdcache import augment, distributed, encodings
from kdcache.encodings import ActivationCodec
from kdcache import store as stores
from kdcache.config import DumpConfig, as_dict, resolve
from kdcache.distributed import autocast_dtype  # where the device's precision is chosen; named here too
from kdcache.data import SplitData, load_split, loader as data_loader
from kdcache.errors import KDCacheError
from kdcache.hooks import REDUCTIONS, capture, parse_activation
from kdcache.models import build_teacher
from kdcache.modules import get_module, weights_sha256
from kdcache.progress import Progress, log
from kdcache.tokens.text import is_text_dataset
from kdcache.store import records, writer
from kdcache.version import __version__


def dump_teacher(cfg: DumpConfig | None = None, **options) -> str:
    """Run the teacher over every split of `cfg` into a store; return the store's path.

    Python API: `kdcache.dump_teacher(teacher="runs/t/resnet20/model.pt", dataset="digits",
    out="cache.zarr")` takes the same options as the command line. Under `torchrun` every rank
    runs this; each writes its own contiguous range of whole blocks (see kdcache/distributed.py).
    """
    cfg = cfg or resolve(DumpConfig, overrides=options, source="dump_teacher()")
    out = cfg.out.rstrip("/")
    out = stores.remote.local_path(out) or out  # file:///x.zarr is a local path: written at .partial, renamed, locked
    backend = stores.backend_for(out)  # an unknown suffix fails before any work
    dist = distributed.Dist.from_env()
    if dist.world_size > 1 and not backend.supports_concurrent_writers:
        raise KDCacheError(f"a distributed dump writes one store from {dist.world_size} processes, which HDF5 "
                           "cannot; dump to a .zarr store, then kdcache convert it to .h5")
    device = distributed.device_for(dist, distributed.resolve_device(cfg.device))
    with distributed.process_group(device.type) as dist:
        # one writer per store: a second dump fails here, at once (rank 0 holds it for all ranks; a URL takes no lock)
        with stores.StoreLock(out) if dist.is_main else contextlib.nullcontext():
            with stores.translate_errors(out):  # read-only credentials for a URL: one line, not a botocore traceback
                return _dump(cfg, out, dist, device)


def _dump(cfg: DumpConfig, out: str, dist, device) -> str:
    partial = stores.partial_path(out)
    # 1. what to do: decided by rank 0 alone, so every rank takes the same way (or the same error)
    action = distributed.on_main(dist, lambda: stores.decide(out, overwrite=cfg.overwrite, resume=cfg.resume))
    if action == "done":
        log.info(f"{out} is already complete; nothing to resume")
        return out

    # 2. every rank: the data, the teacher and its outputs' encoding (images here, token sequences in tokens/dump.py)
    if is_text_dataset(cfg.dataset):
        from kdcache.tokens.dump import TokenDump

        job = TokenDump(cfg, device)
    else:
        job = ImageDump(cfg, device)
    root_attrs = {
        "schema_version": stores.SCHEMA_VERSION,
        "kdcache_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "complete": False,
        "teacher": job.info,
        "splits": list(cfg.splits),
        **job.codec.attrs(),  # dtype, topk, encoding: how the logits are stored
        **job.attrs(),
        "autocast": _dtype_name(autocast_dtype(cfg, device)),  # the precision the teacher ran in (None: float32)
        "config": as_dict(cfg),
    }

    # 3. rank 0 makes (or reopens) the store and every split's arrays; the others then open it
    def prepare():
        with stores.translate_errors(out):  # a KDCacheError, so that on_main hands it to every rank
            if action == "resume":
                store = stores.open_store(partial, read_only=False)
                _check_resumable(store, root_attrs, job.splits)
            else:
                stores.check_room(out, job.estimate_bytes(), job.room_hint)
                # a URL is its own partial: --overwrite deletes the old store here, before writing, since an
                # object store has no rename that could keep it until the new one is complete
                store = stores.create_store(partial)
                store.update_attrs(root_attrs)
            for data in job.splits:
                job.prepare_split(store, data)
            return store

    store = distributed.on_main(dist, prepare, share=False)
    if not dist.is_main:
        store = stores.backend_for(partial)(partial, read_only=False)
    try:
        for data in job.splits:
            _dump_split(store, job, data, dist)
        distributed.barrier(dist)  # every rank's blocks are on disk
        if dist.is_main:
            store.update_attrs({"complete": True})  # written last: only now does the store read as complete
    finally:
        store.close()
    if dist.is_main:
        stores.publish(partial, out)  # the rename into place (replacing an old store); a URL is in place already
    distributed.barrier(dist)  # no rank reports success before the store is in place
    return out


class ImageDump:
    """What a dump of an image dataset runs and writes: the teacher's logits of V views per sample,
    and the activations named. A dump job gives `_dump` its splits, teacher info, codec, attrs and
    arrays, and writes the blocks it is given (kdcache/tokens/dump.py is the other kind)."""

    room_hint = ("choose another --out, or store reduced activations (NAME:attention or NAME:pool), "
                 "--topk K or --dtype int8 logits")

    def __init__(self, cfg: DumpConfig, device):
        self.cfg, self.device = cfg, device
        splits = [load_split(cfg.dataset, s, root=cfg.data_root) for s in cfg.splits]
        # a teacher given by name takes its shape from the data; a checkpoint is checked against it
        teacher, info = build_teacher(cfg.teacher, num_classes=splits[0].num_classes, in_chans=splits[0].in_chans,
                                      weights=cfg.weights, random_ok=cfg.random_teacher)
        self.teacher = teacher.to(device).eval()
        self.info = dict(info, weights_sha256=info.get("weights_sha256") or weights_sha256(teacher))  # a random one too
        if info.get("preprocessing"):  # a timm/HF teacher sees the images through its own preprocessing (kdcache/hub.py)
            from kdcache import hub

            splits = [hub.with_teacher_transform(data, cfg.teacher, info["preprocessing"]) for data in splits]
        self.splits = splits
        self.activations = [parse_activation(a) for a in cfg.activations]
        if len({name for name, _ in self.activations}) != len(self.activations):
            raise KDCacheError("--activation names a module twice; store each module in one form")
        for name, _ in self.activations:
            get_module(self.teacher, name)  # an unknown layer fails before anything is written
        for data in splits:
            if data.num_classes != info["num_classes"]:
                raise KDCacheError(f"teacher predicts {info['num_classes']} classes but {data.name} has "
                                   f"{data.num_classes}; use the teacher trained on this dataset")
        self.codec = encodings.LogitCodec(cfg.dtype, cfg.topk, info["num_classes"], indices=cfg.topk_indices,
                                          sample=cfg.sample, sample_seed=cfg.sample_seed,
                                          sample_temperature=cfg.sample_temperature if cfg.sample else None)
        self.codec.validate()
        self._layouts: dict = {}

    def attrs(self) -> dict:
        """Root attrs beyond the codec's: how activations and views were stored."""
        return {**ActivationCodec.for_logits(self.cfg.dtype).attrs(), "views": self.cfg.views,
                "augment": augment.dump_attrs(self.cfg),  # how views were made (None: one clean view per sample)
                "activations": {name: {"form": form} for name, form in self.activations}}

    def estimate_bytes(self) -> int:
        """Uncompressed size of the store: an upper bound, since chunks are compressed (digits' fp16
        logits shrink ~10%, feature maps more)."""
        total = 0
        for data in self.splits:
            total += 8 * len(data)  # labels
            # math.prod of Python ints: np.prod wraps around int64 for a huge --views and would pass the check
            total += sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in self.specs(data).values())
        return total

    def layout(self, data: SplitData):
        """(views, recipe, {name relative to split: (shape, storage dtype)}) of a split's outputs,
        worked out once per split (it runs the teacher on one view)."""
        if data.split not in self._layouts:
            self._layouts[data.split] = self._layout(data)
        return self._layouts[data.split]

    def _layout(self, data: SplitData):
        recipe = augment.dump_recipe(self.cfg, data)  # how its views are made; None: one clean view
        views = self.cfg.views if recipe is not None else 1
        n = len(data)
        # per-view shapes from the first view alone: --views 10**9 would make all its views here first
        shapes = self._probe(augment.DumpViews(data.dataset, recipe, 1))
        specs = {name: ((n, views) + tail, dtype) for name, (tail, dtype) in self.codec.arrays().items()}
        act_dtype = ActivationCodec.for_logits(self.cfg.dtype).storage_dtype
        for name, _ in self.activations:
            specs[f"activations/{name}"] = ((n, views) + shapes[name], act_dtype)
        for key, (dtype, tail) in (recipe.records() if recipe is not None else {}).items():
            specs[key] = ((n, views) + tail, dtype)
        return views, recipe, specs

    def specs(self, data: SplitData) -> dict:
        return self.layout(data)[2]

    def batch_samples(self, data: SplitData) -> int:
        """Samples per teacher batch: --batch-size counts teacher inputs, B // V samples of V views each."""
        return max(1, self.cfg.batch_size // self.layout(data)[0])

    def prepare_split(self, store, data: SplitData) -> None:
        """Create a split's arrays, labels and attrs (rank 0, before any rank writes)."""
        views, recipe, specs = self.layout(data)
        stores.create_split(store, data.split, specs, np.asarray(data.labels, dtype=np.int64), self.cfg.chunk_bytes,
                            {"dataset": data.describe(), "transform": data.transform, "views": views,
                             "view_transform": recipe.augmentation.description if recipe is not None else None})

    def write_blocks(self, store, data: SplitData, block: int, todo: list, record, keys) -> None:
        """Run the teacher over the samples of blocks `todo` (in order) and write them into the split's
        arrays `keys` (names relative to the split)."""
        cfg, device, teacher, activations, codec = self.cfg, self.device, self.teacher, self.activations, self.codec
        views, recipe, _ = self.layout(data)
        split, n = data.split, len(data)
        source = augment.DumpViews(data.dataset, recipe, views)  # sample i -> (x [V, C, H, W], per-view record)
        # named, not listed: listing the split walks the other ranks' progress records as they are rewritten
        arrays = {f"{split}/{key}": store.array(f"{split}/{key}") for key in keys}
        rows = [i for b in todo for i in range(b * block, min((b + 1) * block, n))]
        cuda = device.type == "cuda"
        amp = autocast_dtype(cfg, device)
        loader = data_loader(torch.utils.data.Subset(source, rows), batch_size=self.batch_samples(data),
                             shuffle=False, num_workers=cfg.num_workers, pin_memory=cuda)
        names = [name for name, _ in activations]
        act_codec = ActivationCodec.for_logits(cfg.dtype)

        def batches():
            """The teacher's outputs for `rows`, batch by batch, encoded and on their way to the host."""
            # a bar on a terminal, else a line every few seconds (a killed dump's log says how far it got)
            with (Progress(n, f"dump {split}", initial=n - len(rows)) as bar, torch.inference_mode(),
                  torch.autocast("cuda", dtype=amp or torch.float16, enabled=amp is not None),
                  capture(teacher, names) as acts):
                done = 0
                for x, view_records in loader:
                    b, v = x.shape[:2]
                    x = x.to(device, non_blocking=True).flatten(0, 1)  # [B * V, C, H, W]: every view in one teacher batch
                    logits = teacher(x).float().unflatten(0, (b, v))  # [B, V, C]
                    batch = {}
                    # checked after rounding, in network order (the earliest bad value is the clue): a finite
                    # value that the stored dtype makes inf would turn training's losses into NaN
                    for name, form in activations:
                        act = REDUCTIONS[form](acts[name].float()).unflatten(0, (b, v))
                        if not cfg.allow_nonfinite:
                            encodings.check_finite(act.flatten(1), rows[done], f"activation {name}")
                        encodings.check_stored(f"activation {name}", act.flatten(1), None, act_codec.dtype, rows[done])
                        batch[f"{split}/activations/{name}"] = act_codec.encode(act)
                    encoded = encodings.encode_checked(codec, logits, rows[done], allow_nonfinite=cfg.allow_nonfinite)
                    batch.update({f"{split}/{k}": t for k, t in encoded.items()})
                    host, ready = writer.to_host(batch, cuda)  # the writer waits on `ready` before reading
                    host.update({f"{split}/{k}": augment.as_stored(k, t) for k, t in view_records.items()})  # on the host already
                    yield host, ready
                    done += b
                    bar.update(b)

        writer.write_blocks(arrays, batches(), block_rows=block, blocks=todo, record=record)

    def _probe(self, source) -> dict:
        """Per-view shapes of the logits and each stored activation form, from sample 0's first view."""
        x = source[0][0][:1].to(self.device)
        with torch.inference_mode(), capture(self.teacher, [n for n, _ in self.activations]) as acts:
            logits = self.teacher(x)
        shapes = {"logits": tuple(logits.shape[1:])}
        for name, form in self.activations:
            shapes[name] = tuple(REDUCTIONS[form](acts[name].float()).shape[1:])
        return shapes


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def _dump_split(store, job, data, dist) -> None:
    """This rank's blocks of one split that are not on disk yet, then (rank 0) the split's completion."""
    split, n = data.split, len(data)
    attrs = store.get_attrs(split)
    if attrs.get("complete"):
        return
    block = attrs["block_rows"]
    n_blocks = -(-n // block)
    specs = job.specs(data)
    known = records.read_progress(store, split, specs, n_blocks)
    done = records.blocks_done(known, n_blocks)
    # ranks start on a teacher batch boundary as well as a block's, so each batch holds the samples it
    # holds in a 1-process dump: kernels may round differently by batch size (CPU convolutions on
    # batches of 1 and 7 differ from batches of 32 by ~1e-6 here; cuDNN picks algorithms by shape).
    # Blocks and batches are powers of two by default, so the unit is one block or a few; any other batch
    # size deals blocks in larger units (lcm), i.e. fewer and less even shares
    samples = job.batch_samples(data)
    mine = distributed.rank_blocks_aligned(n_blocks, dist.world_size, dist.rank, math.lcm(block, samples) // block)
    todo = [b for b in mine if b not in done]
    if todo:
        record = records.ProgressRecord(store, split, mine.start, mine.stop, known)
        job.write_blocks(store, data, block, todo, record, specs)
    distributed.barrier(dist)  # every rank's share of the split is on disk
    if dist.is_main:
        known = records.read_progress(store, split, specs, n_blocks)
        missing = n_blocks - len(records.blocks_done(known, n_blocks))
        assert missing == 0, f"{missing} blocks of {split} were not written"
        records.finish_split(store, split, known, n)


def _check_resumable(store, attrs: dict, splits) -> None:
    old = store.get_attrs()
    if old.get("schema_version") != stores.SCHEMA_VERSION:
        raise KDCacheError(f"cannot resume '{store.path}': it was started by another kdcache version (schema "
                           f"{old.get('schema_version')}, this one writes {stores.SCHEMA_VERSION}); pass --overwrite to start over")
    # autocast: a dump started under float16 autocast on a GPU and resumed on the CPU (or with another --amp)
    # would hold rows of two precisions under one record
    for key in ("teacher", "splits", "dtype", "topk", "encoding", "activations", "views", "augment", "tokens", "autocast"):
        if old.get(key) != attrs.get(key):
            raise KDCacheError(f"cannot resume '{store.path}': its {key} differs from this run's "
                               f"({old.get(key)} vs {attrs.get(key)}); pass --overwrite to start over")
    for data in splits:
        if data.split in store.group_names():
            recorded = store.get_attrs(data.split).get("dataset", {}).get("fingerprint")
            if recorded is not None and recorded != data.fingerprint():
                raise KDCacheError(f"cannot resume '{store.path}': split '{data.split}' holds different data "
                                   "(fingerprint mismatch); pass --overwrite to start over")
