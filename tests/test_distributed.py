"""kdcache.distributed: the split of blocks and batches between processes, and a real 2-process gloo run."""
import os
import time

import pytest
import torch

from helpers.ddp_probe import train
from helpers.torchrun import launch
from kdcache.distributed import (Dist, GlobalBatchSampler, all_gather_object, barrier, broadcast_object, device_for,
                                 loss_scale, process_group, rank_blocks)
from kdcache.errors import KDCacheError


# --- Dist and the one-process no-ops ------------------------------------------------------------

def test_dist_from_env_defaults_to_a_single_process():
    assert Dist.from_env({}) == Dist(rank=0, world_size=1, local_rank=0)
    assert Dist.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Dist(3, 4, 1)
    assert Dist.from_env({}).is_main and not Dist(1, 2, 1).is_main


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "two"}, {"RANK": "2", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "0"}])
def test_dist_from_env_rejects_a_broken_environment_in_one_line(env):
    with pytest.raises(KDCacheError, match="torchrun") as info:
        Dist.from_env(env)
    assert "\n" not in str(info.value)


def test_one_process_needs_no_process_group_and_collectives_are_identities(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with process_group("cpu") as dist:
        assert dist == Dist() and not torch.distributed.is_initialized()
        barrier(dist)
        assert broadcast_object({"a": 1}, dist) == {"a": 1}
        assert all_gather_object(7, dist) == [7]
    assert device_for(dist, torch.device("cuda", 1)) == torch.device("cuda", 1)  # one process keeps its choice
    assert device_for(Dist(1, 2, 1), torch.device("cpu")) == torch.device("cpu")


def test_several_processes_without_a_rendezvous_address_is_a_user_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(KDCacheError, match="MASTER_ADDR is not set; launch with `torchrun"):
        with process_group("cpu"):
            pass
    assert not torch.distributed.is_initialized()


# --- rank_blocks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_blocks,world", [(10, 3), (12, 4), (2, 5), (0, 2), (7, 1), (5, 5)])
def test_rank_blocks_give_every_block_to_one_rank_in_contiguous_even_ranges(n_blocks, world):
    ranges = [rank_blocks(n_blocks, world, r) for r in range(world)]
    assert [b for r in ranges for b in r] == list(range(n_blocks))  # each once, in rank order
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_rank_blocks_leave_ranks_past_the_last_block_empty():
    assert [rank_blocks(2, 4, r) for r in range(4)] == [range(0, 1), range(1, 2), range(2, 2), range(2, 2)]
    assert [len(rank_blocks(10, 3, r)) for r in range(3)] == [4, 3, 3]


# --- GlobalBatchSampler --------------------------------------------------------------------------

def epoch_batches(n, global_batch, world, *, epoch=0, seed=0, drop_last=False):
    """Per rank, the list of batches it yields in `epoch`."""
    samplers = [GlobalBatchSampler(n, global_batch, seed=seed, rank=r, world_size=world, drop_last=drop_last)
                for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    return [list(s) for s in samplers]


@pytest.mark.parametrize("n,global_batch,world", [(23, 8, 3), (24, 6, 2), (20, 8, 4), (9, 9, 2)])
def test_rank_slices_join_into_the_one_process_batches_in_order(n, global_batch, world):
    (single,) = epoch_batches(n, global_batch, 1)
    per_rank = epoch_batches(n, global_batch, world)
    assert {len(b) for b in per_rank} == {len(single)}  # every rank takes every step
    for step, batch in enumerate(single):
        assert sum((ranks[step] for ranks in per_rank), []) == batch
        assert all(len(ranks[step]) >= 1 for ranks in per_rank)
    assert sorted(sum(single, [])) == list(range(n))  # every sample exactly once per epoch


def test_one_process_yields_exactly_the_global_batches_with_a_short_last_one():
    (batches,) = epoch_batches(10, 4, 1)
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(sum(batches, [])) == list(range(10))
    (dropped,) = epoch_batches(10, 4, 1, drop_last=True)
    assert dropped == batches[:2]


def test_a_final_batch_smaller_than_the_world_is_dropped_on_every_rank():
    per_rank = epoch_batches(17, 8, 4)  # batches of 8, 8 and 1: the 1 cannot give 4 ranks a sample each
    assert [len(b) for b in per_rank] == [2, 2, 2, 2]
    assert len(GlobalBatchSampler(17, 8, rank=3, world_size=4)) == 2
    seen = sorted(i for batches in per_rank for b in batches for i in b)
    assert len(seen) == 16 and len(set(seen)) == 16


def test_a_global_batch_smaller_than_the_world_is_a_user_error():
    with pytest.raises(KDCacheError, match="batch size of at least 4"):
        GlobalBatchSampler(100, 3, world_size=4)


def test_order_is_a_pure_function_of_seed_and_epoch():
    assert epoch_batches(30, 7, 2, epoch=1, seed=5) == epoch_batches(30, 7, 2, epoch=1, seed=5)
    assert epoch_batches(30, 7, 2, epoch=1, seed=5) != epoch_batches(30, 7, 2, epoch=2, seed=5)
    assert epoch_batches(30, 7, 2, epoch=1, seed=0) != epoch_batches(30, 7, 2, epoch=0, seed=1)  # not seed + epoch


def test_scaled_rank_means_average_to_the_global_mean():
    losses = torch.randn(11, dtype=torch.float64)  # per-sample losses of one global batch, split 4/4/3
    world = 3
    sampler_scales = [GlobalBatchSampler(11, 11, rank=r, world_size=world).loss_scale(0) for r in range(world)]
    parts = [losses[rank_blocks(11, world, r).start:rank_blocks(11, world, r).stop] for r in range(world)]
    scales = [loss_scale(len(p), len(losses), world) for p in parts]
    assert scales == sampler_scales and scales[-1] < 1 < scales[0]
    ddp_mean = sum(s * p.mean() for s, p in zip(scales, parts)) / world  # DDP averages the ranks' gradients
    assert torch.allclose(ddp_mean, losses.mean(), rtol=0, atol=1e-12)


# --- a real 2-process run ------------------------------------------------------------------------

def test_two_process_gloo_ddp_trains_the_same_weights_as_one_process(tmp_path):
    out = tmp_path / "weights.pt"
    started = time.perf_counter()
    done = launch([os.path.join(os.path.dirname(__file__), "helpers", "ddp_probe.py"), str(out)], nproc=2, timeout=120)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"2-process torchrun launch: {seconds:.1f}s")
    ddp = torch.load(out, weights_only=True)
    single = train(Dist())
    for name in single:
        assert torch.allclose(ddp[name], single[name], rtol=1e-5, atol=1e-6), name
