"""No training step makes the host wait for the device, for every method on both data paths.

On a GPU the host queues each step's kernels and runs ahead; an op whose result the host must see (a tensor's value
as a Python number, a size known only on the device, a blocking copy between host and device) stalls that queue.
The CPU cannot show the stall itself, but it can show the ops: each method's `main` runs a few steps of a tiny run
in this process under a recorder (a TorchDispatchMode for the ops, a TorchFunctionMode for the copies) that notes
every such op with its place in the code. The first step may build constants; after it, none is allowed inside a
step. Waits that are part of a method happen outside its steps and are named here: the progress line's read of the
loss and of the divergence flag beside it (every --log-every seconds). On the DataLoader path the loader's
own work (PIL views in worker processes on a GPU machine) is not the device's and is left out.
"""

import contextlib
import itertools
import sys
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import common
from conftest import SYNTHETIC_FLAGS

# ops whose result the host must wait for on CUDA
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "argwhere", "masked_select", "_unique",
            "_unique2", "unique_dim", "unique_consecutive", "bincount", "histc"}
# where a wait is part of the method, outside its steps: (file, function)
ALLOWED = {("common.py", "update")}


class Recorder(TorchDispatchMode):
    """Notes the ops that would make the host wait, while `step` is 1 or more (the second step on)."""

    def __init__(self):
        super().__init__()
        self.step, self.events, self.paused = None, [], False

    def note(self, what):
        if self.paused or self.step is None or self.step < 1:
            return
        frames = traceback.extract_stack()[:-2]
        if any((f.filename.rsplit("/", 1)[-1], f.name) in ALLOWED for f in frames):
            return
        if any("/torch/optim/" in f.filename for f in frames):  # an optimiser's host-side step counter (Adam's)
            return
        where = next((f for f in reversed(frames) if "/site-packages/" not in f.filename and "tests/" not in
                      f.filename), frames[-1])
        self.events.append(f"step {self.step}: {what} at {where.filename.rsplit('/', 1)[-1]}:{where.lineno} "
                           f"({where.line})")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.note(name)
        elif name == "repeat_interleave" and "output_size" not in kwargs and any(
                isinstance(a, torch.Tensor) and a.dim() > 0 and not a.is_floating_point() for a in args[1:2]):
            self.note("repeat_interleave with tensor repeats")  # its output size is a sum on the device
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
                if i is not None):
            self.note(f"{name} with a boolean mask")  # the mask's count of True decides the shape
        return func(*args, **kwargs)


class Copies(TorchFunctionMode):
    """Notes copies between host and device that block the host: .to(device) / .cuda() without non_blocking,
    .cpu(), .tolist(), .numpy(), and torch.tensor / as_tensor made straight onto a device."""

    def __init__(self, recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda) and not kwargs.get("non_blocking"):
            target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
            if target is not None or func is torch.Tensor.cuda:
                self.recorder.note(f"a blocking copy ({func.__name__} to {target})")
        elif func in (torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy):
            self.recorder.note(f"a copy to the host ({func.__name__})")
        elif func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
            self.recorder.note(f"a blocking copy ({func.__name__} onto {kwargs['device']})")
        return func(*args, **kwargs)


class Recorded:
    """An epoch's loader (its length, its .epoch) that tells the recorder the step of the batch it handed out, and
    None while it loads the next."""

    def __init__(self, loader, recorder):
        self.loader, self.epoch, self.recorder = loader, loader.epoch, recorder

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches_iter = iter(self.loader)
        for i in itertools.count():
            self.recorder.step = None
            try:
                batch = next(batches_iter)
            except StopIteration:
                return
            self.recorder.step = i
            yield batch


# a few steps of each method on tiny data: the flags that make its own parts small
TINY = [*SYNTHETIC_FLAGS, "--arch", "tiny", "--batch-size", "32", "--subset", "128", "--epochs", "1",
        "--workers", "0", "--eval-every", "0", "--probe-epochs", "0", "--knn-k", "10", "--log-every", "1000"]
METHODS = {
    "simclr": [],
    "simclr-clae": ["--adv-eps", "0.03", "--adv-bn"],
    "supcon": [],
    "moco": ["--queue-size", "64"],
    "byol": ["--proj-hidden-dim", "64", "--proj-dim", "32"],
    "simsiam": ["--proj-dim", "64", "--pred-dim", "16"],
    "instdisc": ["--nce-k", "16"],
    "paws": ["--num-labels", "40", "--supports-per-class", "2", "--multicrop", "1", "--finetune-epochs", "0"],
    "dpll": ["--q", "0.3"],
    "jem": ["--buffer-size", "128", "--sgld-steps", "2"],
    "jem-hdge": ["--objective", "hdge+sgld", "--buffer-size", "128", "--sgld-steps", "2", "--queue-size", "64"],
}
CASES = [(m, path) for m in METHODS for path in ("cpu", "device") if not (m == "dpll" and path == "device")]


@pytest.mark.parametrize("method, path", CASES)
def test_no_step_waits_for_the_host(method, path, tmp_path, monkeypatch):
    module = __import__(method.split("-")[0])
    args = common.parse(module.Args, [*TINY, *METHODS[method], "--data-path", path, "--out-dir", str(tmp_path)])
    recorder = Recorder()
    train_one_epoch = module.train_one_epoch

    def recorded(*a):  # the steps of the epoch: recording from the second on
        return train_one_epoch(*(Recorded(x, recorder) if hasattr(x, "epoch") else x for x in a))

    loader_iter = common.Batches.__iter__

    def loader_apart(self):  # a DataLoader's batches: the loader's own work is not the device's
        batches_iter = loader_iter(self)
        while True:
            recorder.paused = True
            try:
                batch = next(batches_iter)
            except StopIteration:
                return
            finally:
                recorder.paused = False
            yield batch

    monkeypatch.setattr(module, "train_one_epoch", recorded)
    monkeypatch.setattr(common.Batches, "__iter__", loader_apart)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # set back what setup_distributed may install
    steps = []
    monkeypatch.setattr(common.Progress, "update", lambda self, step, loss, lr, n, update=common.Progress.update: (
        steps.append(step), update(self, step, loss, lr, n))[-1])
    with contextlib.ExitStack() as stack:
        stack.enter_context(recorder)
        stack.enter_context(Copies(recorder))
        module.main(args)
    assert len(steps) >= 3, "too few steps to see the steps after the first"
    assert not recorder.events, "\n".join(recorder.events[:20])


def test_the_recorder_sees_what_would_wait():
    """The recorder can fail: each kind of wait, made in a step after the first, is noted."""
    recorder = Recorder()
    with recorder, Copies(recorder):
        recorder.step = 1
        x = torch.arange(6.0)
        float(x.sum())  # a value read by the host
        x[x > 2]  # a boolean mask
        torch.unique(x)  # a size only the device knows
        x.to("cpu")  # a copy without non_blocking
        torch.tensor([1, 2], device="cpu")  # a copy onto the device
        x.tolist()
        x.to("cpu", non_blocking=True)  # allowed
        x.to(torch.float64)  # no device: allowed
    kinds = " ".join(recorder.events)
    for what in ("_local_scalar_dense", "boolean mask", "unique", "blocking copy (to to cpu)", "tensor onto",
                 "tolist"):
        assert what in kinds, (what, recorder.events)
    assert len(recorder.events) == 6, recorder.events
