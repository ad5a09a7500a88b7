"""A tiny linear model trained with DDP under torchrun, or in one process: the two must agree.

`torchrun --nproc-per-node 2 tests/helpers/ddp_probe.py OUT.pt`: rank 0 writes the final weights to OUT.pt.
"""
import sys

import torch
import torch.nn.functional as F

from kdcache.distributed import Dist, GlobalBatchSampler, process_group

N, GLOBAL_BATCH, EPOCHS = 21, 8, 2  # per epoch: batches of 8, 8, 5 (split 3 + 2: unequal slices, scaled loss)


def train(dist: Dist) -> dict:
    """SGD with momentum on a fixed regression problem; returns the final weights (the same on every rank)."""
    torch.manual_seed(0)  # the same data and init in every process
    x, w_true = torch.randn(N, 5), torch.randn(5, 3)
    y = x @ w_true + 0.1 * torch.randn(N, 3)
    model = torch.nn.Linear(5, 3)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.world_size > 1 else model
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    sampler = GlobalBatchSampler(N, GLOBAL_BATCH, seed=3, rank=dist.rank, world_size=dist.world_size)
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for step, batch in enumerate(sampler):
            loss = F.mse_loss(ddp(x[batch]), y[batch]) * sampler.loss_scale(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    with process_group("cpu") as dist:
        weights = train(dist)
        if dist.is_main:
            torch.save(weights, sys.argv[1])
