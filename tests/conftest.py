"""Shared test set-up: the repository root on sys.path, Hypothesis profiles, helpers to run the scripts, and the
two-process (gloo) harness of the checks that two processes on halves of a batch equal one on the whole batch."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402  (the repository root on sys.path first)

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per test worker: the workers already fill the cores
    torch.set_num_threads(1)

# Property tests: enough examples to find edge cases, no per-example deadline (the CPU here may be shared).
# The default profile is derandomised: the same examples on every run, so a suite that passed passes again;
# HYPOTHESIS_PROFILE=thorough searches afresh with ten times the examples.
settings.register_profile("default", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=400, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# CIFAR-10 for the learning checks: as `--download` stores it (cifar-10-batches-py/ inside), or an image folder (train/
# and test/, a folder per class): $CIFAR10_DIR, else data/ (where --download puts it), else a copy beside the checkout
CIFAR10_DIRS = [Path(os.environ["CIFAR10_DIR"])] if os.environ.get("CIFAR10_DIR") else [
    ROOT / "data", ROOT.parent / "shared" / "data" / "cifar10"]


def synthetic(train: bool = True, n: int = 0) -> tuple[torch.Tensor, list[int]]:
    """The tests' images: 10 classes, each a fixed random 16x16 colour pattern with noise and shifts, learnable in a
    few steps; uint8 [n, 16, 16, 3] (512 to train, 128 to test) and labels."""
    g = torch.Generator().manual_seed(1234)
    prototypes = torch.rand(10, 16, 16, 3, generator=g)
    n = n or (512 if train else 128)
    g.manual_seed(1 if train else 2)
    targets = torch.arange(n) % 10
    shifts = torch.randint(-2, 3, (n, 2), generator=g)
    images = torch.stack([prototypes[t].roll((int(s[0]), int(s[1])), dims=(0, 1)) for t, s in zip(targets, shifts)])
    images = (0.7 * images + 0.3 * torch.rand(images.shape, generator=g)).mul(255).round().to(torch.uint8)
    return images, targets.tolist()


def _synthetic_folder() -> Path:
    """synthetic() as an image folder (train/ and test/, a folder of PNG files per class), made once per machine."""
    root = Path(tempfile.gettempdir()) / f"ssl-tests-synthetic-{os.getuid()}-v1"
    if not root.is_dir():
        from PIL import Image

        part = Path(tempfile.mkdtemp(dir=root.parent))
        for split, train in (("train", True), ("test", False)):
            images, targets = synthetic(train)
            for i, (image, label) in enumerate(zip(images, targets)):
                (part / split / f"class{label}").mkdir(parents=True, exist_ok=True)
                Image.fromarray(image.numpy()).save(part / split / f"class{label}" / f"{i:04d}.png")
        try:
            part.rename(root)  # whole or not at all; another test process may have made it first
        except OSError:
            pass
    return root


SYNTHETIC = _synthetic_folder()
SYNTHETIC_FLAGS = ["--dataset", "imagefolder", "--data-dir", str(SYNTHETIC)]  # the flags that train on it
SYNTHETIC_INFO = common.DataInfo(10, 3, 16, (0.5,) * 3, (0.25,) * 3)  # its facts, for views made in a test


def run_script(*argv, timeout=300, env_extra=None, cwd=None):
    """Run `python <argv>` from the repository root; returns the CompletedProcess (text output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd or ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def torchrun(*argv, nproc=2, timeout=300):
    """Run a script under `torchrun --nproc_per_node=nproc` on the CPU (gloo)."""
    return run_script("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *argv,
                      timeout=timeout)


@pytest.fixture
def cifar10():
    """The flags that read CIFAR-10 from the first of CIFAR10_DIRS holding it; without, the test skips, saying why."""
    for root in CIFAR10_DIRS:
        if (root / "cifar-10-batches-py").is_dir():
            return ["--dataset", "cifar10", "--data-dir", str(root)]
        if (root / "train").is_dir() and (root / "test").is_dir():
            return ["--dataset", "imagefolder", "--data-dir", str(root)]
    pytest.skip(f"no CIFAR-10 in {' or '.join(map(str, CIFAR10_DIRS))}: get it with `python -c \"import torchvision; "
                f"torchvision.datasets.CIFAR10('data', download=True)\"` (or set CIFAR10_DIR)")


# ---- two processes on the CPU (gloo) -------------------------------------------------------------------------------

WORLD = 2


def init_gloo(rank, store):
    """Join process `rank` to a WORLD-process gloo group on the file `store`, with the environment variables the
    scripts read (common.setup_distributed) and one thread, so that the two processes do not compete for the cores."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)


def spawn(worker, tmp_path, *args) -> list:
    """Run worker(rank, store, out, *args) in WORLD processes; returns what each saved to out/{rank}.pt, by rank.
    The worker must be a top-level function of its test module: mp.spawn pickles it by reference."""
    mp.spawn(worker, args=(str(tmp_path / "store"), str(tmp_path), *args), nprocs=WORLD)
    return [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(WORLD)]


def shard(x, rank):
    """Process `rank`'s contiguous share of the rows of x: the shares, in rank order, are x again."""
    n = x.shape[0] // WORLD
    return x[rank * n:(rank + 1) * n]


class TwoLayerEncoder(nn.Module):
    """A BatchNorm-free network: BatchNorm would normalise each process's half on its own, so without it one process
    on the whole batch and two on halves compute the same function."""

    out_dim = 8  # the feature size, as a backbone gives it (moco.MoCo reads it)

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.Tanh(), nn.Linear(16, self.out_dim))

    def forward(self, x):
        return self.net(x)


class _Built(Exception):
    pass


def backbone_built_by(main, args, monkeypatch, at=(common, "build_backbone")) -> nn.Module:
    """What `main(args)` builds through common.build_backbone, or the function `at` names (main stops right there)."""
    built = []

    def spy(*a, **kw):
        built.append(real(*a, **kw))
        raise _Built

    real = getattr(*at)
    monkeypatch.setattr(*at, spy)
    with pytest.raises(_Built):
        main(args)
    return built[0]
