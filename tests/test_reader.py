"""Streamed targets: the block-shuffling sampler and the reader that follows it, on tiny fake stores."""
import threading
import weakref

import pytest
import torch

from kdcache.errors import KDCacheError
from kdcache.reader import BlockShuffleSampler, StreamTargets

N, R = 53, 4  # 14 blocks, the last one short (1 sample): every boundary case at once


def sampler(n=N, block_rows=R, batch_size=5, buffer_blocks=3, seed=0, **kw) -> BlockShuffleSampler:
    return BlockShuffleSampler(n, block_rows=block_rows, batch_size=batch_size, buffer_blocks=buffer_blocks,
                               seed=seed, **kw)


def epoch_of(s: BlockShuffleSampler, epoch: int) -> list[list[int]]:
    s.set_epoch(epoch)
    return list(s)


def flat(batches) -> list[int]:
    return [i for batch in batches for i in batch]


class FakeStore:
    """A split of `n` samples x `views` whose targets are functions of the row: logits [row, -row],
    activations {"feat": [row] * 3}. Counts its block reads and how many blocks are alive at once."""

    def __init__(self, n=N, block_rows=R, views=1, fail_at=None):
        self.n, self.block_rows, self.views, self.fail_at = n, block_rows, views, fail_at
        self.calls: list[int] = []
        self.alive = self.peak_alive = 0
        self.lock = threading.Lock()

    def __call__(self, b: int) -> dict:
        if b == self.fail_at:
            raise OSError(f"disk gone at block {b}")
        start, stop = b * self.block_rows, min((b + 1) * self.block_rows, self.n)
        rows = torch.arange(start * self.views, stop * self.views, dtype=torch.float16)
        block = {"logits": torch.stack([rows, -rows], 1), "activations": {"feat": rows[:, None].repeat(1, 3)}}
        with self.lock:
            self.calls.append(b)
            self.alive += 1
            self.peak_alive = max(self.peak_alive, self.alive)
        weakref.finalize(block["logits"], self._freed)  # a block's memory is gone once its logits are
        return block

    def _freed(self):
        with self.lock:
            self.alive -= 1


def loader_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "kdcache-block-loader"]


# --- the sampler ---------------------------------------------------------------------------

@pytest.mark.parametrize("n,block_rows,batch_size,buffer_blocks", [(53, 4, 5, 3), (64, 8, 8, 2), (7, 10, 3, 1),
                                                                   (40, 4, 64, 2)])
def test_every_sample_exactly_once_per_epoch(n, block_rows, batch_size, buffer_blocks):
    s = sampler(n, block_rows, batch_size, buffer_blocks)
    for epoch in range(3):
        batches = epoch_of(s, epoch)
        assert sorted(flat(batches)) == list(range(n))
        assert len(batches) == len(s) and all(len(b) == batch_size for b in batches[:-1])


def test_batches_differ_between_epochs_and_repeat_for_the_same_seed_and_epoch():
    a, b = sampler(seed=1), sampler(seed=1)
    assert epoch_of(a, 0) != epoch_of(a, 1)
    assert epoch_of(a, 1) == epoch_of(b, 1) and epoch_of(a, 0) == epoch_of(b, 0)
    assert epoch_of(a, 0) != epoch_of(sampler(seed=2), 0)


def test_each_window_draws_its_samples_from_buffer_blocks_whole_blocks():
    s = sampler(buffer_blocks=3)
    for epoch in range(3):
        samples = flat(epoch_of(s, epoch))
        windows = [s.block_order()[i:i + 3] for i in range(0, s.num_blocks, 3)]
        for blocks in windows:  # the sequence is the windows one after another, each its blocks' samples
            size = sum(s.block_len(b) for b in blocks)
            head, samples = samples[:size], samples[size:]
            assert {i // R for i in head} == set(blocks) and len(set(head)) == size
        assert samples == []


def test_samples_are_shuffled_within_a_window():
    samples = flat(epoch_of(sampler(buffer_blocks=3), 0))
    assert [i // R for i in samples[:12]] != sorted(i // R for i in samples[:12])


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ddp_ranks_take_disjoint_blocks_run_equal_steps_and_cover_every_sample(world_size):
    ranks = [sampler(rank=r, world_size=world_size) for r in range(world_size)]
    for epoch in range(4):  # the short block lands on different ranks
        per_rank = [epoch_of(s, epoch) for s in ranks]
        assert len({len(b) for b in per_rank}) == 1 and all(len(b) == len(s) for b, s in zip(per_rank, ranks))
        assert len({tuple(len(x) for x in b) for b in per_rank}) == 1  # same batch sizes, step by step
        sets = [set(flat(b)) for b in per_rank]
        assert sum(len(x) for x in sets) == N and set().union(*sets) == set(range(N))  # disjoint, complete
        for s in ranks:  # padding repeats only the rank's own last window, less than two blocks of it
            samples = flat(list(s))
            assert len(samples) - len(set(samples)) < 2 * R
            assert {i // R for i in samples} == set(s.block_order())


@pytest.mark.parametrize("world_size", [1, 3])
def test_drop_last_gives_full_equal_batches_and_skips_less_than_two_blocks_and_a_batch(world_size):
    ranks = [sampler(rank=r, world_size=world_size, drop_last=True) for r in range(world_size)]
    for epoch in range(4):
        per_rank = [epoch_of(s, epoch) for s in ranks]
        assert all(len(b) == len(ranks[0]) for b in per_rank)
        assert all(len(x) == 5 for b in per_rank for x in b)
        seen = [flat(b) for b in per_rank]
        assert all(len(x) == len(set(x)) for x in seen) and not set(seen[0]) & set().union(*seen[1:])
        assert all(len(s.epoch_samples()) - len(x) == 0 for s, x in zip(ranks, seen))
        for s, x in zip(ranks, seen):
            mine = sum(s.block_len(b) for b in s.block_order())
            assert mine - len(x) < 2 * R + 5


def test_more_ranks_than_blocks_is_refused():
    with pytest.raises(KDCacheError, match="fewer than 4 ranks"):
        sampler(n=10, block_rows=4, rank=0, world_size=4)


# --- the reader ----------------------------------------------------------------------------

def run_epoch(targets: StreamTargets, s: BlockShuffleSampler, epoch: int, views=1) -> list[tuple]:
    targets.start_epoch(epoch)
    out = []
    for batch in s:
        rows = torch.tensor(batch) * views + (epoch % views)
        out.append((rows, targets.gather(rows)))
    return out


def test_each_block_is_read_once_per_epoch_and_memory_stays_bounded():
    store, s = FakeStore(), sampler(buffer_blocks=3)
    with StreamTargets(store, s, prefetch_blocks=1) as targets:
        for epoch in range(3):
            store.calls.clear()
            for rows, t in run_epoch(targets, s, epoch):
                assert t["logits"].dtype == torch.float16  # as stored: the caller decodes
                assert torch.equal(t["logits"].float(), torch.stack([rows, -rows], 1).float())
                assert torch.equal(t["activations"]["feat"].float(), rows[:, None].float().repeat(1, 3))
            assert store.calls == s.block_order()  # in the sampler's order, once each, never per sample
    assert store.peak_alive <= 3 + 1
    assert store.alive == 0 and loader_threads() == []


@pytest.mark.parametrize("drop_last", [False, True])
def test_each_rank_reads_only_its_own_blocks_and_serves_its_padded_or_cut_epoch(drop_last):
    for rank in range(3):
        store, s = FakeStore(), sampler(rank=rank, world_size=3, drop_last=drop_last)
        with StreamTargets(store, s, prefetch_blocks=0) as targets:
            for epoch in range(3):
                store.calls.clear()
                for rows, t in run_epoch(targets, s, epoch):
                    assert torch.equal(t["logits"][:, 0].float(), rows.float())
                assert set(store.calls) <= set(s.block_order()) and len(store.calls) == len(set(store.calls))
        assert store.peak_alive <= 3


def test_batches_larger_than_a_window_and_no_prefetch_still_stream():
    store, s = FakeStore(), sampler(batch_size=13, buffer_blocks=1)
    with StreamTargets(store, s, prefetch_blocks=0) as targets:
        for rows, t in run_epoch(targets, s, 0):
            assert torch.equal(t["logits"][:, 0].float(), rows.float())
    assert store.peak_alive == 1 and sorted(store.calls) == list(range(s.num_blocks))


def test_views_map_rows_to_their_samples_blocks():
    store, s = FakeStore(views=2), sampler()
    with StreamTargets(store, s, views=2) as targets:
        for epoch in range(2):
            for rows, t in run_epoch(targets, s, epoch, views=2):  # view `epoch % 2` of every sample
                assert torch.equal(t["logits"][:, 0].float(), rows.float())


def test_only_the_named_activations_are_gathered():
    s = sampler()
    with StreamTargets(FakeStore(), s) as targets:
        targets.start_epoch(0)
        batch = torch.tensor(next(iter(s)))
        assert set(targets.gather(batch, activations=[])["activations"]) == set()
        with pytest.raises(KDCacheError, match="no activation conv9"):
            targets.gather(torch.tensor(list(s)[1]), activations=["conv9"])


class Indexed(torch.utils.data.Dataset):
    """Item i: (an image filled with i, its label, its row)."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        return torch.full((2, 3), float(i)), i % 10, i


def test_dataloader_workers_keep_each_image_with_its_targets():
    s = sampler(batch_size=6, buffer_blocks=2, seed=3)
    loader = torch.utils.data.DataLoader(Indexed(), batch_sampler=s, num_workers=2, persistent_workers=True)
    with StreamTargets(FakeStore(), s) as targets:
        for epoch in range(2):
            targets.start_epoch(epoch)  # before iterating: the loader draws its batches then
            seen = []
            for x, y, row in loader:
                t = targets.gather(row)
                assert torch.equal(t["logits"][:, 0], x[:, 0, 0]) and torch.equal(row, x[:, 0, 0].long())
                seen += row.tolist()
            assert sorted(seen) == list(range(N))


def test_a_loader_error_is_raised_in_the_caller():
    s = sampler()
    with StreamTargets(FakeStore(fail_at=s.block_order()[4]), s) as targets:
        targets.start_epoch(0)
        with pytest.raises(OSError, match="disk gone at block"):
            for batch in s:
                targets.gather(torch.tensor(batch))
    assert loader_threads() == []


def test_a_block_of_the_wrong_length_is_named():
    s = sampler()
    with StreamTargets(lambda b: {"logits": torch.zeros(R + 1, 2)}, s) as targets:
        targets.start_epoch(0)
        with pytest.raises(KDCacheError, match=r"expected \d rows first"):
            targets.gather(torch.tensor(next(iter(s))))


def test_rows_outside_the_current_window_raise_instead_of_hanging():
    s = sampler(buffer_blocks=2)
    with StreamTargets(FakeStore(), s, prefetch_blocks=0) as targets:
        targets.start_epoch(0)
        last = s.block_order()[-1] * R
        with pytest.raises(KDCacheError, match="window"):
            targets.gather(torch.tensor([last]))
        batches = list(s)
        with pytest.raises(KDCacheError, match="in order|sampler's order"):  # a skipped batch: found, not waited on
            for batch in batches[1:]:
                targets.gather(torch.tensor(batch))


def swap_window_tail(s: BlockShuffleSampler) -> list[list[int]]:
    """Batches 0..2 with batch 1's samples of window 0 (5..7) swapped for window 1's (10..12); the
    third then holds window 1's last samples, and window 0's block rows 5..7 are never gathered."""
    samples = flat(list(s))
    return [samples[:5], samples[8:10] + samples[10:13], samples[13:16]]


def test_a_window_left_unfinished_with_no_room_to_prefetch_raises_instead_of_hanging():
    s = sampler(n=48, buffer_blocks=2)
    with StreamTargets(FakeStore(n=48), s, prefetch_blocks=0) as targets:
        targets.start_epoch(0)
        first, second, _ = swap_window_tail(s)
        targets.gather(torch.tensor(first))
        with pytest.raises(KDCacheError, match="buffer slots hold blocks with rows not yet gathered"):
            targets.gather(torch.tensor(second))


def test_a_window_left_unfinished_is_named_once_the_sampler_moves_past_it():
    s = sampler(n=48, buffer_blocks=2)
    with StreamTargets(FakeStore(n=48), s) as targets:
        targets.start_epoch(0)
        first, second, third = swap_window_tail(s)
        targets.gather(torch.tensor(first))
        targets.gather(torch.tensor(second))
        with pytest.raises(KDCacheError, match="moved past its window"):
            targets.gather(torch.tensor(third))


def test_gathering_without_starting_the_epoch_says_what_to_call():
    s = sampler()
    with StreamTargets(FakeStore(), s) as targets:
        with pytest.raises(KDCacheError, match="not started"):
            targets.gather(torch.tensor([0]))
        targets.start_epoch(0)
        s.set_epoch(1)
        with pytest.raises(KDCacheError, match=r"start_epoch\(epoch\)"):
            targets.gather(torch.tensor(next(iter(s))))


def test_restarting_epochs_midway_leaks_no_thread():
    s = sampler()
    targets = StreamTargets(FakeStore(), s, prefetch_blocks=0)
    for epoch in range(5):
        targets.start_epoch(epoch)
        targets.gather(torch.tensor(next(iter(s))))  # abandon the epoch after one batch
    targets.close()
    assert loader_threads() == []
