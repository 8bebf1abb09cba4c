"""Two gloo processes on the CPU against one process on the whole batch (gather_with_grad, NT-Xent under DDP), and
every method's main on two processes, whose replicas must stay equal."""

import importlib

import pytest
import torch
import torch.distributed as dist

import common
import simclr
from conftest import TwoLayerEncoder, init_gloo, shard, spawn
from test_faults import METHODS, TINY_RUN


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
    x1, x2 = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)  # two views of 8 images
    return x1, x2, torch.arange(8)


ARGS = simclr.Args(device="cpu", temperature=0.3, sync_bn=True)  # --sync-bn: the head's BatchNorm on the global batch


def _simclr_model():
    """SimCLR's own head (Linear + BatchNorm layers) on a small encoder: one process or two with --sync-bn compute
    the same function of the batch."""
    torch.manual_seed(0)
    return simclr.SimCLR(TwoLayerEncoder(), proj_dim=6, proj_layers=2)


def _step(net, model, x1, x2, y):
    """simclr.train_step once with plain SGD; returns the loss, the gradients and the state after the step."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = simclr.train_step(net, ((x1, x2), y), optimizer, ARGS)
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss, grads, {k: v.clone() for k, v in model.state_dict().items()}


def _ddp_worker(rank, store, out):
    init_gloo(rank, store)
    model = _simclr_model()
    net = common.distribute(model, ARGS)  # DDP, every BatchNorm a GlobalBatchNorm
    loss, grads, state = _step(net, model, *(shard(t, rank) for t in _batch()))
    torch.save({"loss": loss, "grads": grads, "state": state}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_on_halves_equal_one_process_on_the_whole_batch(tmp_path):
    # SimCLR's own train_step: the embeddings gathered with gradient (each anchor's 2N - 2 negatives), the loss of
    # the global batch on every process, DDP's average of the gradients, BatchNorm over both views of all images
    results = spawn(_ddp_worker, tmp_path)
    model = _simclr_model()
    loss, grads, state = _step(model, model, *_batch())
    assert any("running_var" in k for k in state), "the head has BatchNorm statistics to compare"
    for got in results:
        assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
        for name, g in grads.items():  # float32 sums in another order: to 1e-5 of the largest entry (or of 1)
            assert torch.allclose(got["grads"][name], g, rtol=1e-5, atol=1e-5 * max(1.0, g.abs().max().item())), name
        for name, v in state.items():  # the weights after the step and the BatchNorm statistics
            assert torch.allclose(got["state"][name].double(), v.double(), rtol=1e-5, atol=1e-6), name


def _replicas_worker(rank, store, out):
    init_gloo(rank, store)
    same = {"w": torch.ones(3), "bn.running_mean": torch.full((2,), float(rank))}  # running statistics may differ
    apart = {"w": torch.ones(3) + rank * 1e-3}
    torch.save({"same": common.replicas_agree(same), "apart": common.replicas_agree(apart)}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_replicas_agree_only_when_every_process_holds_the_same_weights(tmp_path):
    for got in spawn(_replicas_worker, tmp_path):
        assert got == {"same": True, "apart": False}


def _main_worker(rank, store, out, method):
    init_gloo(rank, store)
    module = importlib.import_module(method)
    module.main(common.parse(module.Args, [*TINY_RUN, *METHODS[method], "--epochs", "1", "--out-dir", f"{out}/run"]))
    torch.save({"done": True}, f"{out}/{rank}.pt")


@pytest.mark.parametrize("method", METHODS)
def test_main_on_two_processes_keeps_the_replicas_equal(method, tmp_path):
    """Each method's own main on two processes, one epoch: RunDir.save stops a run whose processes' weights differ
    (exit code 3), so a loop that trains the plain model instead of the DDP-wrapped one fails here."""
    assert all(r["done"] for r in spawn(_main_worker, tmp_path, method))
