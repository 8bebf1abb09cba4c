"""Shared test set-up: the repository root on sys.path, Hypothesis profiles, helpers to run the scripts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per test worker: the workers already fill the cores
    torch.set_num_threads(1)

# Property tests: enough examples to find edge cases, no per-example deadline (the CPU here may be shared).
# The default profile is derandomised: the same examples on every run, so a suite that passed passes again;
# HYPOTHESIS_PROFILE=thorough searches afresh with ten times the examples.
settings.register_profile("default", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=400, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# an image-folder copy of CIFAR-10 (train/ and test/, one folder per class) for the learning checks
CIFAR10 = Path(os.environ.get("CIFAR10_DIR", ROOT.parent / "shared" / "data" / "cifar10"))


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
    if not (CIFAR10 / "train").is_dir():
        pytest.skip(f"CIFAR-10 image folder not found at {CIFAR10}")
    return CIFAR10
