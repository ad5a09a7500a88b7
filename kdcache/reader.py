"""Stage 2 for targets larger than memory: read a split block by block, in a shuffled block order.

`BlockShuffleSampler` orders the samples (blocks shuffled, samples shuffled within a window of
whole blocks) and drives the images; `StreamTargets` loads those blocks in the same order in a
background thread and gathers a batch's targets from them. The store is reached only through
`load_block(block) -> {name: tensor}`, one call per block per epoch, never one per sample.

Wiring (targets.py's in-memory path, with the table replaced by a window of blocks):

    sampler = BlockShuffleSampler(len(data), block_rows=R, batch_size=256, buffer_blocks=16, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=8)    # dataset yields (x, y, row)
    targets = StreamTargets(load_block, sampler, views=V)
    for epoch in range(epochs):
        targets.start_epoch(epoch)                   # sets the sampler's epoch, restarts the prefetch
        for x, y, row in loader:
            batch_targets = targets.gather(row)      # {"logits": [B, C], "activations": {...}}
    targets.close()
"""
from __future__ import annotations

import math
import threading
from typing import Callable

import torch

from kdcache.errors import KDCacheError
from kdcache.seeds import seed_hash

__all__ = ["BlockShuffleSampler", "StreamTargets"]


class BlockShuffleSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of sample indices that read a split block by block. `len(sampler)`: batches per epoch.

    Blocks are `block_rows` consecutive samples (the last may be short), the unit the store reads
    whole (a zarr shard). Each epoch, a pure function of `seed` and the epoch:
      1. shuffle the order of all blocks (the same order on every rank);
      2. rank r takes blocks r, r + W, r + 2W, ... of that order (W = world_size): disjoint blocks;
      3. group the rank's blocks into windows of `buffer_blocks` whole blocks, shuffle the samples
         within each window, and cut batches of `batch_size` continuously across windows.
    So one window's samples come from at most `buffer_blocks` blocks, and a reader holding one
    window (plus the next, prefetched) serves every batch.

    Balancing ranks (DDP hangs unless every rank runs the same number of steps): ranks hold
    equally many blocks or one more, and the short last block lands anywhere, so their sample
    counts differ by less than two blocks. Every rank yields the same count, every epoch:
      drop_last=False: ceil(blocks / W) * block_rows samples; a rank that holds fewer makes up
        the rest by repeating samples of its own last window (under 2 * block_rows). No sample is
        skipped, and with world_size 1 nothing is repeated either: every sample exactly once.
      drop_last=True: the fewest a rank can hold, (blocks // W) * block_rows minus the short
        block's shortfall, rounded down to whole batches; each rank skips the tail of its last
        window (different samples each epoch; fewer than 2 * block_rows + batch_size per rank).
    """

    def __init__(self, n: int, *, block_rows: int, batch_size: int, buffer_blocks: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False):
        for name, value in (("n", n), ("block_rows", block_rows), ("batch_size", batch_size),
                            ("buffer_blocks", buffer_blocks), ("world_size", world_size)):
            if int(value) < 1:
                raise KDCacheError(f"BlockShuffleSampler needs {name} >= 1, got {value}")
        if not 0 <= rank < world_size:
            raise KDCacheError(f"rank {rank} is not one of world_size {world_size} ranks (0..{world_size - 1})")
        self.n, self.block_rows, self.batch_size = int(n), int(block_rows), int(batch_size)
        self.buffer_blocks, self.seed = int(buffer_blocks), int(seed)
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), bool(drop_last)
        self.num_blocks = math.ceil(self.n / self.block_rows)
        if self.num_blocks < self.world_size:
            raise KDCacheError(f"{self.n} samples make {self.num_blocks} blocks of {self.block_rows}, fewer than "
                               f"{self.world_size} ranks; use fewer ranks or a store written with smaller blocks")
        self.epoch = 0
        self._plan: tuple | None = None  # (epoch, block order, sample sequence), made once per epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def block_len(self, block: int) -> int:
        return min(self.block_rows, self.n - block * self.block_rows)

    def block_order(self) -> list[int]:
        """This rank's blocks in the order this epoch reads them (a reader prefetches in this order)."""
        return self._epoch_plan()[1]

    def epoch_samples(self) -> torch.Tensor:
        """This rank's sample indices this epoch [S], batch after batch (padding and cut included)."""
        return self._epoch_plan()[2]

    def __iter__(self):
        for batch in self.epoch_samples().split(self.batch_size):
            yield batch.tolist()

    def __len__(self) -> int:
        if self.drop_last:
            return self._per_rank() // self.batch_size
        return math.ceil(self._per_rank() / self.batch_size)

    # --- the plan of one epoch ------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(seed_hash(self.seed, self.epoch))

    def _per_rank(self) -> int:
        """Samples every rank yields per epoch, the same every epoch (a trainer sizes its schedule
        with `len(loader)` once): the bound over wherever the short block lands in the order."""
        if self.world_size == 1:
            target = self.n
        elif self.drop_last:  # a rank of the fewest blocks, the short one among them
            shortfall = self.block_rows - self.block_len(self.num_blocks - 1)
            target = self.num_blocks // self.world_size * self.block_rows - shortfall
        else:  # a rank of the most blocks, all full
            target = math.ceil(self.num_blocks / self.world_size) * self.block_rows
        return target // self.batch_size * self.batch_size if self.drop_last else target

    def _epoch_plan(self) -> tuple:
        if self._plan is not None and self._plan[0] == self.epoch:
            return self._plan
        generator = self._generator()
        order = torch.randperm(self.num_blocks, generator=generator).tolist()  # drawn first: the same on every rank
        mine = order[self.rank::self.world_size]
        windows = []
        for i in range(0, len(mine), self.buffer_blocks):
            starts = torch.tensor(mine[i:i + self.buffer_blocks]) * self.block_rows
            samples = (starts[:, None] + torch.arange(self.block_rows)).flatten()
            samples = samples[samples < self.n]  # the short last block
            windows.append(samples[torch.randperm(len(samples), generator=generator)])
        sequence = torch.cat(windows)
        target = self._per_rank()
        if target > len(sequence):  # pad from this rank's last window, so the reader holds it anyway
            repeats = math.ceil((target - len(sequence)) / len(windows[-1]))
            sequence = torch.cat([sequence, windows[-1].repeat(repeats)[:target - len(sequence)]])
        self._plan = (self.epoch, mine, sequence[:target])
        return self._plan


class StreamTargets:
    """A split's teacher targets, streamed block by block in `sampler`'s order, gathered per batch.

    `gather(rows)` -> the structure `load_block` returns, each array [B, ...] float32, like
    `SplitTargets.gather`: {"logits": [B, C], "activations": {name: [B, ...]}}.
    `load_block(b)` returns block b's arrays, a dict of tensors (nested dicts allowed), each with
    first dim `block_len * views`: rows [start * V, stop * V) of the flat [N * V] table, in order.
    A row is `sample * V + view`, so the sampler's samples are `row // V`.

    A background thread calls `load_block` once per block the epoch uses, in
    `sampler.block_order()`; store reads and zstd decompression release the GIL, so loading
    overlaps training. At most `buffer_blocks + prefetch_blocks` blocks are in memory, the one
    being read included; a block is dropped once every row of it this epoch uses is gathered.
    A caller that strays from the sampler's order gets an error, never a hang.
    """

    def __init__(self, load_block: Callable[[int], dict], sampler: BlockShuffleSampler, *, views: int = 1,
                 prefetch_blocks: int | None = None, device="cpu"):
        if views < 1:
            raise KDCacheError(f"StreamTargets needs views >= 1, got {views}")
        if prefetch_blocks is not None and prefetch_blocks < 0:
            raise KDCacheError(f"StreamTargets needs prefetch_blocks >= 0, got {prefetch_blocks}")
        self.load_block, self.sampler, self.views, self.device = load_block, sampler, int(views), device
        # default: a whole window ahead (double buffering). A window's blocks free up only at its
        # end (a block's last sample lies in the window's last 1/block_rows, on average), so any
        # less prefetch stalls training at every window boundary until the missing blocks are read.
        self.prefetch_blocks = sampler.buffer_blocks if prefetch_blocks is None else int(prefetch_blocks)
        self.capacity = sampler.buffer_blocks + self.prefetch_blocks
        self.epoch: int | None = None  # the epoch started, None before start_epoch and after close
        self._cond = threading.Condition()  # guards _blocks, _error and _stop, shared with the loader thread
        self._blocks: dict = {}
        self._error: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None

    # --- epochs ---------------------------------------------------------------------------
    def start_epoch(self, epoch: int | None = None) -> None:
        """Set the sampler's epoch (when given) and restart the prefetch for its block order.
        Call before iterating the loader: a DataLoader draws its batches when iterated."""
        if epoch is not None:
            self.sampler.set_epoch(epoch)
        self._stop_loader()
        s = self.sampler
        order = torch.tensor(s.block_order(), dtype=torch.int64)
        self._block_of_step = s.epoch_samples() // s.block_rows  # [S] the block of each row, batch after batch
        self._remaining = torch.bincount(self._block_of_step, minlength=s.num_blocks)  # rows left per block
        self._position = torch.full((s.num_blocks,), -1, dtype=torch.int64)  # -1: another rank's block
        self._position[order] = torch.arange(len(order))
        self._window = torch.where(self._position >= 0, self._position // s.buffer_blocks, -1)
        self._window_of_step = self._window[self._block_of_step]  # nondecreasing along the epoch
        used_blocks = order[self._remaining[order] > 0].tolist()
        self._window_blocks = {}  # window -> its blocks this epoch, in load order
        for b in used_blocks:
            self._window_blocks.setdefault(int(self._window[b]), []).append(b)
        self._windows = {}  # window -> (table, starts), built on its first gather
        self._consumed = 0
        self.epoch = s.epoch
        used = order[self._remaining[order] > 0].tolist()  # drop_last may leave a block unused
        self._thread = threading.Thread(target=self._load, args=(used,), name="kdcache-block-loader", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the loader thread (after the read in progress) and drop every block."""
        self._stop_loader()
        self.epoch = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- the batch ------------------------------------------------------------------------
    def gather(self, rows: torch.Tensor, activations=None) -> dict:
        """Targets of the views at `rows` [B] (the rows the loader yields for one of the sampler's
        batches), each array [B, ...] float32; only the named `activations` when given. Blocks
        until their blocks are loaded; a loader error is raised here."""
        rows = torch.as_tensor(rows, dtype=torch.int64).cpu()
        self._check_rows(rows)
        blocks = rows // self.views // self.sampler.block_rows
        # rows grouped by block: one index_select per block, then one cat and un-permute per array;
        # 2.5x cheaper than an index_copy_ per block into the output (bench, CPU time: 0.5M vs 0.2M
        # samples/s, batches of 256 from 16 blocks of 512 x 1000 fp16; one in-memory table: 1.4M)
        order = self._position[blocks].argsort(stable=True)  # earlier windows first, so they free first
        unique, counts = torch.unique_consecutive(blocks[order], return_counts=True)
        self._check_blocks(rows, blocks, unique, counts)
        left = self._remaining[unique] - counts
        windows = self._window[unique]
        if windows.min() == windows.max():  # the usual batch: all its rows in one window
            return self._gather_window(int(windows[0]), rows, blocks, unique, left, activations)
        local = rows[order] - blocks[order] * (self.sampler.block_rows * self.views)
        parts = []
        for b, index, done in zip(unique.tolist(), local.split(counts.tolist()), (left == 0).tolist()):
            block = _select(self._wait_for(b), activations)
            parts.append(_tree_map(lambda t: t.index_select(0, index), block))
            del block  # else the block outlives its eviction while the loader reads the next one
            if done:
                self._evict(b)
        self._remaining[unique] = left
        self._consumed += len(rows)
        self._drop_finished_windows(windows.unique().tolist())
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        # to the device in the stored dtype (half the bytes to copy for fp16 caches); the caller
        # decodes there (float16 to float32, int8 with its scales, top-k indices)
        return _tree_zip(lambda ts: torch.cat(ts).index_select(0, inverse).to(self.device), parts)

    def _gather_window(self, w: int, rows, blocks, unique, left, activations) -> dict:
        """A batch within window `w`: one index_select per array from the window's blocks joined
        into one table, built once when the window is first gathered from (its blocks then hold
        views into it: no extra memory). Per-block selects, a cat and an un-permute cost a third of
        a streamed epoch's read time (bench section 6); this is one copy of the batch."""
        table, starts = self._window_table(w)
        per_block = self.sampler.block_rows * self.views
        local = rows - blocks * per_block + starts[blocks]
        out = _tree_map(lambda t: t.index_select(0, local).to(self.device), _select(table, activations))
        for b in unique[left == 0].tolist():
            self._evict(b)
        self._remaining[unique] = left
        self._consumed += len(rows)
        self._drop_finished_windows([w])
        return out

    def _drop_finished_windows(self, windows) -> None:
        for w in windows:
            if not any(b in self._blocks for b in self._window_blocks.get(w, [])):
                self._windows.pop(w, None)  # the window's last block is gone: so is its table

    def _window_table(self, w: int):
        """(the window's blocks as one table, [num_blocks] first row of each block in it)."""
        if w not in self._windows:
            members = self._window_blocks[w]
            parts = [self._wait_for(b) for b in members]
            table = _tree_zip(torch.cat, parts)
            starts = torch.zeros(self.sampler.num_blocks, dtype=torch.int64)
            offset = 0
            for b in members:
                starts[b] = offset
                n = self.sampler.block_len(b) * self.views
                view = _tree_map(lambda t, o=offset, n=n: t[o : o + n], table)
                with self._cond:
                    self._blocks[b] = view  # the loaded copy goes; the slot stays counted until evicted
                offset += n
            del parts
            self._windows[w] = (table, starts)
        return self._windows[w]

    def _check_rows(self, rows: torch.Tensor) -> None:
        s = self.sampler
        if self.epoch is None or s.epoch != self.epoch:
            raise KDCacheError(f"targets are {'not started' if self.epoch is None else f'at epoch {self.epoch}'} but "
                               f"the sampler is at epoch {s.epoch}; call targets.start_epoch(epoch) before each epoch")
        total = len(self._block_of_step)
        if rows.dim() != 1 or len(rows) == 0 or self._consumed + len(rows) > total:
            raise KDCacheError(f"gather got {rows.numel()} rows after {self._consumed} of the {total} the sampler "
                               "yields this epoch; gather each of its batches once, and start_epoch each epoch")
        if rows.min() < 0 or rows.max() >= s.n * self.views:
            bad = int(rows[(rows < 0) | (rows >= s.n * self.views)][0])
            raise KDCacheError(f"row {bad} is outside the {s.n} samples x {self.views} views of this split")

    def _check_blocks(self, rows, blocks, unique, counts) -> None:
        """That the batch follows the sampler: its blocks in the window(s) the sampler is at, none
        used more than the sampler will, none left behind. Checked before any state changes."""
        lo = int(self._window_of_step[self._consumed])
        hi = int(self._window_of_step[self._consumed + len(rows) - 1])
        windows = self._window[blocks]
        outside = ((windows < lo) | (windows > hi)).nonzero()
        if len(outside):
            i = int(outside[0])
            b, w = int(blocks[i]), int(windows[i])
            where = "another rank's block" if w < 0 else f"in window {w}"
            raise KDCacheError(f"row {int(rows[i])} is in block {b} ({where}) but the sampler is at window "
                               f"{lo}{f'..{hi}' if hi > lo else ''} of epoch {self.epoch}; gather each batch "
                               "in the sampler's order (DataLoader(batch_sampler=sampler))")
        over = (counts > self._remaining[unique]).nonzero()
        if len(over):
            b = int(unique[over[0]])
            raise KDCacheError(f"the batch has {int(counts[over[0]])} rows of block {b} but the sampler yields only "
                               f"{int(self._remaining[b])} more this epoch; gather each of its batches once")
        behind = ((self._remaining > 0) & (self._window >= 0) & (self._window < lo)).nonzero()
        if len(behind):  # its block would hold a buffer slot for ever
            b = int(behind[0])
            raise KDCacheError(f"block {b} still has {int(self._remaining[b])} rows not gathered but the sampler has "
                               "moved past its window; gather every batch the sampler yields, in order")

    # --- the loader thread and the blocks it shares -------------------------------------------
    def _load(self, blocks: list[int]) -> None:
        for b in blocks:
            with self._cond:
                while len(self._blocks) >= self.capacity and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
            try:
                arrays = self._checked(b, self.load_block(b))
            except BaseException as error:  # handed to the caller's gather, which raises it
                error.add_note(f"(raised by load_block({b}) in kdcache's block loader thread)")
                with self._cond:
                    self._error = error
                    self._cond.notify_all()
                return
            with self._cond:
                if self._stop:
                    return
                self._blocks[b] = arrays
                self._cond.notify_all()
            del arrays  # an evicted block must not live on here while the next one is read

    def _checked(self, b: int, arrays) -> dict:
        if not isinstance(arrays, dict):
            raise KDCacheError(f"load_block({b}) returned {type(arrays).__name__}; return a dict of tensors")
        arrays = _tree_map(torch.as_tensor, arrays)
        start, length = b * self.sampler.block_rows, self.sampler.block_len(b)
        for name, t in _leaves(arrays):
            if t.dim() == 0 or t.shape[0] != length * self.views:
                raise KDCacheError(
                    f"load_block({b}) returned '{name}' of shape {tuple(t.shape)}; expected {length * self.views} "
                    f"rows first: block {b} holds samples [{start}, {start + length}) x {self.views} views, rows "
                    f"[{start * self.views}, {(start + length) * self.views}) of the flat table")
        return arrays

    def _wait_for(self, b: int) -> dict:
        with self._cond:
            while b not in self._blocks:
                if self._error is not None:
                    raise self._error
                if len(self._blocks) >= self.capacity:  # only gather frees a slot: waiting would hang
                    raise KDCacheError(f"block {b} is needed but all {self.capacity} buffer slots hold blocks with "
                                       "rows not yet gathered; gather every batch the sampler yields, in order")
                if self._thread is None or not self._thread.is_alive():
                    raise KDCacheError("the targets' loader is stopped; call targets.start_epoch(epoch) first")
                self._cond.wait()
            return self._blocks[b]

    def _evict(self, b: int) -> None:
        with self._cond:
            del self._blocks[b]
            self._cond.notify_all()

    def _stop_loader(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._thread, self._blocks, self._error, self._stop = None, {}, None, False
        self._windows = {}




# --- nested dicts of tensors ----------------------------------------------------------------

def _tree_map(fn, tree):
    return {k: _tree_map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def _leaves(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def _tree_zip(fn, trees: list):
    """fn([leaf of each tree]) at every leaf of the first tree's structure."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: _tree_zip(fn, [t[k] for t in trees]) for k in first}
    return fn(trees)


def _select(arrays: dict, activations) -> dict:
    """Only the named activations (all when None), as CachedTeacher asks for them."""
    if activations is None:
        return arrays
    stored = arrays.get("activations", {})
    missing = [n for n in activations if n not in stored]
    if missing:
        raise KDCacheError(f"the blocks hold no activation {', '.join(missing)}; "
                           f"they hold {', '.join(stored) or 'none'}")
    return {**arrays, "activations": {n: stored[n] for n in activations}}
