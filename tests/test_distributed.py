"""Two gloo processes on the CPU against one process on the whole batch (gather_with_grad, NT-Xent under DDP)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import common
import simclr
from conftest import TwoLayerEncoder, init_gloo, shard, spawn


def _full_x():
    return torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _f(x):  # a loss that couples every row with every other
    return (x @ x.T).tanh().pow(2).sum() + x.pow(3).sum()


def _gather_worker(rank, store, out):
    init_gloo(rank, store)
    x = shard(_full_x(), rank).clone().requires_grad_(True)
    # process r weighs its loss by (r + 1): the gradient of the global loss (sum over processes) for x's rows
    # is (1 + 2) * df/dx; returning only this process's slice of its own gradient would give (r + 1) * df/dx
    loss = (rank + 1) * _f(common.gather_with_grad(x))
    loss.backward()
    torch.save({"grad": x.grad, "gathered": common.gather_no_grad(x.detach()),
                "mean": common.all_reduce_mean(torch.tensor([float(rank)]))}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_gather_with_grad_returns_the_global_gradient(tmp_path):
    results = spawn(_gather_worker, tmp_path)
    full = _full_x().requires_grad_(True)
    _f(full).backward()
    for rank, got in enumerate(results):
        assert torch.equal(got["gathered"], _full_x())
        assert torch.allclose(got["grad"], 3 * shard(full.grad, rank), rtol=1e-12)
        assert got["mean"].item() == 0.5


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)  # two views of 8 images


def _simclr_step(model, x1, x2, tau):
    """SimCLR's step as train_one_epoch does it: one forward of both views, gather, NT-Xent, backward."""
    z1, z2 = model(torch.cat([x1, x2])).chunk(2)
    loss = simclr.nt_xent(common.gather_with_grad(z1), common.gather_with_grad(z2), tau)
    loss.backward()
    return loss


def _ddp_worker(rank, store, out):
    init_gloo(rank, store)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(TwoLayerEncoder())
    x1, x2 = _batch()
    loss = _simclr_step(model, shard(x1, rank), shard(x2, rank), 0.5)
    grads = {k: p.grad for k, p in model.module.named_parameters()}
    torch.save({"loss": loss.detach(), "grads": grads}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_on_halves_equal_one_process_on_the_whole_batch(tmp_path):
    results = spawn(_ddp_worker, tmp_path)
    torch.manual_seed(0)
    model = TwoLayerEncoder()
    x1, x2 = _batch()
    loss = _simclr_step(model, x1, x2, 0.5)
    for got in results:
        assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
        for name, p in model.named_parameters():
            assert torch.allclose(got["grads"][name], p.grad, rtol=1e-5, atol=1e-7), name
