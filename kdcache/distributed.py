"""Running under `torchrun`: the process's place in the job, its process group, and how blocks of
the store and batches of training are split between processes. kdcache has no cluster layer of its own.

Every helper here is a no-op with one process, so single-process code paths call them unconditionally.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as td

from kdcache import seeds
from kdcache.errors import KDCacheError

__all__ = ["Dist", "process_group", "barrier", "broadcast_object", "all_gather_object", "device_for",
           "rank_blocks", "rank_blocks_aligned", "GlobalBatchSampler", "loss_scale", "all_reduce_sum",
           "average_gradients", "on_main"]


# --- the process's place in the job -----------------------------------------------------------

@dataclass(frozen=True)
class Dist:
    """Where this process stands: its global rank, the number of processes, its rank on this host."""

    rank: int = 0  # 0 .. world_size - 1; rank 0 writes attrs, checkpoints and summaries
    world_size: int = 1  # one process unless torchrun says otherwise
    local_rank: int = 0  # which of this host's GPUs the process drives

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ=None) -> Dist:
        """RANK, WORLD_SIZE, LOCAL_RANK as torchrun sets them; a single process where they are unset."""
        environ = os.environ if environ is None else environ
        values = {}
        for field, var, default in (("rank", "RANK", 0), ("world_size", "WORLD_SIZE", 1),
                                    ("local_rank", "LOCAL_RANK", 0)):
            text = environ.get(var, "")
            try:
                values[field] = int(text) if text.strip() else default
            except ValueError:
                raise KDCacheError(f"environment variable {var}={text!r} is not an integer; "
                                   "launch with torchrun, which sets it, or unset it") from None
        dist = cls(**values)
        if dist.world_size < 1 or not 0 <= dist.rank < dist.world_size or dist.local_rank < 0:
            raise KDCacheError(f"RANK={dist.rank}, WORLD_SIZE={dist.world_size}, LOCAL_RANK={dist.local_rank} "
                               "do not describe a process of a job (need 0 <= RANK < WORLD_SIZE); "
                               "launch with torchrun, which sets them, or unset them")
        return dist


BACKENDS = {"cuda": "nccl", "cpu": "gloo"}  # nccl: GPU tensors over NVLink/IB; gloo: CPU tensors over TCP


@contextmanager
def process_group(device_type: str):
    """Yields this process's `Dist`; with WORLD_SIZE > 1, inside a process group joined through
    torchrun's env:// rendezvous (nccl for "cuda", gloo for "cpu"), destroyed on exit whatever happened.

    One process: nothing is initialized. A group the caller initialized already is used as it is
    and left to its owner.
    """
    dist = Dist.from_env()
    if dist.world_size == 1 or td.is_initialized():
        yield dist
        return
    if device_type not in BACKENDS:
        raise KDCacheError(f"cannot run {dist.world_size} processes on device type '{device_type}'; "
                           f"use one of {', '.join(BACKENDS)}")
    missing = [var for var in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(var)]
    if missing:
        raise KDCacheError(f"WORLD_SIZE={dist.world_size} but {' and '.join(missing)} "
                           f"{'is' if len(missing) == 1 else 'are'} not set; launch with "
                           "`torchrun --nproc-per-node N -m kdcache ...`, which sets them, or unset WORLD_SIZE")
    if device_type == "cuda":
        torch.cuda.set_device(device_for(dist, torch.device("cuda")))  # nccl's collectives run on the current device
    try:
        td.init_process_group(backend=BACKENDS[device_type], init_method="env://",
                              rank=dist.rank, world_size=dist.world_size)
    except td.DistNetworkError as e:  # an unreachable or unresolvable MASTER_ADDR:MASTER_PORT
        raise KDCacheError(f"rank {dist.rank} could not reach the job's rendezvous at "
                           f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({str(e).splitlines()[0]}); "
                           "check that MASTER_ADDR resolves and the port is open from every host") from e
    try:
        yield dist
    finally:
        td.destroy_process_group()


def barrier(dist: Dist) -> None:
    """Wait until every process gets here (e.g. rank 0 has written a file the others read)."""
    if dist.world_size > 1:
        td.barrier()


def broadcast_object(obj, dist: Dist):
    """Rank 0's `obj` (any picklable value), returned on every rank; other ranks' `obj` is ignored."""
    if dist.world_size == 1:
        return obj
    box = [obj if dist.is_main else None]
    td.broadcast_object_list(box, src=0)
    return box[0]


def on_main(dist, fn, share: bool = True):
    """`fn()` on rank 0 only. Every rank learns whether it failed (a user error on rank 0 is raised
    on every rank, so none waits forever at a barrier) and, with `share`, gets its result."""
    result, error = None, None
    if dist.is_main:
        try:
            result = fn()
        except KDCacheError as e:
            error = str(e)
            if dist.world_size == 1:
                raise
    outcome = broadcast_object((error, result if share else None), dist)
    if outcome[0] is not None:
        raise KDCacheError(outcome[0])
    return result if dist.is_main or not share else outcome[1]


def all_gather_object(obj, dist: Dist) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if dist.world_size == 1:
        return [obj]
    out = [None] * dist.world_size
    td.all_gather_object(out, obj)
    return out


def resolve_device(name: str) -> torch.device:
    """--device: auto (CUDA when there is one, else the CPU), cpu, cuda, cuda:N or mps, checked
    against what this machine has, so a missing device is one line and not a traceback later."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise KDCacheError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise KDCacheError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise KDCacheError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                               f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise KDCacheError(f"--device {name}: no Apple GPU (MPS) is available here; use --device cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise KDCacheError(f"--device {name}: kdcache runs on cpu, cuda or mps; use one of those or auto")
    return device


def device_for(dist: Dist, requested: torch.device) -> torch.device:
    """The device this process computes on: its own GPU, cuda:LOCAL_RANK, when CUDA is requested for
    several processes (an index in `requested` is overridden: CUDA_VISIBLE_DEVICES chooses GPUs); else `requested`."""
    requested = torch.device(requested)
    if requested.type != "cuda" or dist.world_size == 1:
        return requested
    visible = torch.cuda.device_count()
    if dist.local_rank >= visible:
        raise KDCacheError(f"LOCAL_RANK={dist.local_rank} but only {visible} CUDA device(s) are visible; "
                           f"use at most --nproc-per-node {visible} on this host")
    return torch.device("cuda", dist.local_rank)


# --- splitting the work -------------------------------------------------------------------------

def rank_blocks(n_blocks: int, world_size: int, rank: int) -> range:
    """The blocks (the store's unit of writing, a shard of rows) that `rank` dumps: a contiguous range,
    as even as possible; the first n_blocks % world_size ranks get one more; ranks past n_blocks get none.

    Whole blocks and no padding, unlike DistributedSampler (which strides sample indices across every
    shard and repeats samples to even the ranks out): each block has one writer, and no row is written twice.
    """
    assert n_blocks >= 0 and world_size >= 1 and 0 <= rank < world_size, (n_blocks, world_size, rank)
    base, extra = divmod(n_blocks, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def loss_scale(local_size: int, global_size: int, world_size: int) -> float:
    """Factor on a rank's mean loss so that DDP's gradient (the plain mean over ranks) is the gradient of
    the mean over the global batch, whatever the ranks' slice sizes.

    With b_r samples on rank r, B = sum_r b_r and L_r the mean loss over rank r's slice, DDP computes
    (1/W) sum_r grad(s_r L_r); the 1-process gradient is (1/B) sum_r b_r grad(L_r), so s_r = W b_r / B.
    It is 1 when the slices are equal.
    """
    return world_size * local_size / global_size


def _epoch_seed(seed: int, epoch: int) -> int:
    """uint64 seed of an epoch's permutation: a pure function of (seed, epoch), so resuming needs no RNG
    state, and (seed, epoch) pairs never share a permutation the way seed + epoch would."""
    return seeds.seed_hash(seeds.EPOCH_ORDER, seed, epoch)


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches for DDP: each epoch, a permutation of range(n) cut into global batches of `global_batch`;
    rank r yields its contiguous slice of each (split as in `rank_blocks`), so the ranks together see
    exactly the batches one process would, in the same order. With world_size 1, those batches.

    Use it as `DataLoader(dataset, batch_sampler=sampler)`, call `set_epoch(e)` before each epoch, and
    multiply step i's mean loss by `sampler.loss_scale(i)`.

    Short final batch: kept (unless drop_last), and split like the others, when it has at least
    world_size samples; dropped when it has fewer, since a rank with an empty slice would have no loss
    to backpropagate while DDP waits for its gradients. Every rank yields a non-empty slice at every
    step and len() is the same on every rank. The dropped samples (< world_size) differ per epoch.
    """

    def __init__(self, n: int, global_batch: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        if global_batch < world_size:
            raise KDCacheError(f"global batch size {global_batch} is smaller than the {world_size} processes; "
                               f"use a batch size of at least {world_size} or fewer processes")
        assert n >= 0 and 0 <= rank < world_size, (n, rank, world_size)
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, tail = divmod(self.n, self.global_batch)
        return full + (not self.drop_last and tail >= self.world_size)

    def global_size(self, step: int) -> int:
        """Samples in global batch `step` of an epoch, across all ranks."""
        assert 0 <= step < len(self), (step, len(self))
        return min(self.global_batch, self.n - step * self.global_batch)

    def local_slice(self, step: int) -> range:
        """Positions, within global batch `step`, of this rank's samples."""
        return rank_blocks(self.global_size(step), self.world_size, self.rank)

    def loss_scale(self, step: int) -> float:
        """`loss_scale` for this rank at `step` of an epoch."""
        return loss_scale(len(self.local_slice(step)), self.global_size(step), self.world_size)

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch)))
        for step in range(len(self)):
            start = step * self.global_batch
            part = self.local_slice(step)
            yield order[start + part.start:start + part.stop].tolist()


# --- collectives the trainer needs ---------------------------------------------------------------

def all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """`t` summed over every rank (a new tensor on every rank); `t` itself with one process."""
    if dist.world_size == 1:
        return t
    t = t.clone()
    td.all_reduce(t)
    return t


def average_gradients(module: torch.nn.Module) -> None:
    """Average the gradients of `module` over ranks by hand: for trainable parts outside the
    DistributedDataParallel wrapper (feature-KD adapters). One flat all-reduce, not one per tensor."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads or not td.is_initialized():
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    td.all_reduce(flat)
    flat /= td.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def rank_blocks_aligned(n_blocks: int, world_size: int, rank: int, unit: int) -> range:
    """`rank_blocks` dealt in groups of `unit` blocks: every rank's range starts at a multiple of `unit`
    (a distributed dump aligns ranks to its teacher batches this way); the last group may be short."""
    assert unit >= 1, unit
    groups = rank_blocks(-(-n_blocks // unit), world_size, rank)
    return range(min(groups.start * unit, n_blocks), min(groups.stop * unit, n_blocks))


def autocast_dtype(cfg, device: torch.device) -> torch.dtype | None:
    """The CUDA autocast dtype of the teacher's forward (cfg: a DumpConfig), or None for full precision.

    Default (--amp unset): autocast only when the store rounds anyway, so a float32 store holds
    float32-accurate logits ("an fp32 cache equals online KD" also on a GPU); bfloat16 stores get
    bfloat16 autocast (float16's range is narrower: logits above 65504 would overflow). On the CPU
    the teacher always runs in float32.
    """
    if device.type != "cuda":
        return None
    amp = cfg.amp if cfg.amp is not None else cfg.dtype != "float32"
    if not amp:
        return None
    return torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float16
