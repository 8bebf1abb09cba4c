"""Every method file from the command line on tiny data (`pytest -m scripts`): a run, torchrun, kill and resume,
bad input, and the user's own move: one method file and common.py copied into an empty folder and run there.

A method joins these tests by adding its file to METHODS with the flags that make its run tiny. The full set of
bad-input cases runs for simclr.py (they exercise common.py, which every method shares); every method gets the
cases that touch its own arguments and checkpoint. --help is checked in process (the fast tier).
"""

import importlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
from conftest import ROOT, SYNTHETIC_FLAGS, run_script, torchrun

TINY = [*SYNTHETIC_FLAGS, "--arch", "tiny", "--batch-size", "64", "--workers", "0", "--log-every", "0.5",
        "--probe-epochs", "2"]

# method file -> extra flags for its tiny run (added to TINY)
METHODS = {
    "simclr.py": [],
    "supcon.py": [],
    "moco.py": ["--queue-size", "128"],
    "byol.py": ["--proj-hidden-dim", "64", "--proj-dim", "32"],
    "simsiam.py": ["--proj-dim", "64", "--pred-dim", "16"],
    "instdisc.py": ["--nce-k", "32"],
    "paws.py": ["--num-labels", "100", "--supports-per-class", "4", "--multicrop", "2", "--finetune-epochs", "0"],
    "jem.py": ["--buffer-size", "256", "--sgld-steps", "2"],
    "dpll.py": ["--q", "0.3", "--ramp-epochs", "2"],
}


def tiny(method, *extra):
    return [method, *TINY, *METHODS[method], *extra]


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def snapshot(path):
    """Every file of a run directory but its lock file (which a refused run may make where none was)."""
    return {p.name: p.read_bytes() for p in path.iterdir() if p.name != ".lock"} if path.exists() else {}


@pytest.mark.parametrize("method", METHODS)
def test_help(method, capsys):  # the fast tier: in process
    """--help as the script's own `common.parse(Args)` prints it (in this process: the runs below start the files
    from the command line)."""
    module = importlib.import_module(method[:-3])
    with pytest.raises(SystemExit) as exit_:
        common.parse(module.Args, ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--resume" in out and "(default:" in out
    assert module.__doc__.strip().splitlines()[0] in out, "the module docstring is the description"


def grouped(cases):
    """Parameters marked with their method file and the scripts tier: pytest-xdist (--dist loadgroup, pytest.ini)
    runs all of a method's script tests on one worker, which makes the method's finished run once."""
    cases = [c if isinstance(c, tuple) else (c,) for c in cases]
    return [pytest.param(*c, marks=[pytest.mark.xdist_group(c[0][:-3]), pytest.mark.scripts]) for c in cases]


class FinishedRuns(dict):
    """method -> (run directory, output) of a finished two-process run (torchrun, 2 epochs), made when a test
    first asks for it: the torchrun test checks it, the bad-input tests aim at it."""

    def __init__(self, tmp_path_factory):
        super().__init__()
        self.tmp_path_factory = tmp_path_factory

    def __missing__(self, method):
        run = self.tmp_path_factory.mktemp(method[:-3]) / "run"
        self[method] = run, torchrun(*tiny(method, "--epochs", "2", "--eval-every", "1", "--out-dir", run,
                                           "--seed", "3"))
        return self[method]

    def run(self, method):
        """The directory of the method's finished run (which must have succeeded)."""
        run, out = self[method]
        assert out.returncode == 0, out.stderr[-3000:]
        return run


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    return FinishedRuns(tmp_path_factory)


@pytest.mark.parametrize("method", grouped(METHODS))
def test_torchrun_two_processes_on_the_cpu(method, finished_runs):
    run, out = finished_runs[method]
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es)" in out.stdout
    assert out.stdout.count("k-NN top-1 of the untrained network") == 1  # rank 0 speaks, once
    assert [r["epoch"] for r in rows(run)] == [0, 1, 2]  # one writer
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("method", grouped(METHODS))
def test_run_writes_its_run_directory_and_a_killed_run_resumes_to_the_same_weights(method, tmp_path):
    argv = tiny(method, "--epochs", "3", "--eval-every", "1")
    whole = tmp_path / "whole"  # the run from start to end
    out = run_script(*argv, "--out-dir", whole)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "k-NN top-1: untrained" in out.stdout and "img/s" in out.stdout and "ETA" in out.stdout
    args = json.loads((whole / "args.json").read_text())
    assert args["method"] == method[:-3] and args["epochs"] == 3
    assert [r["epoch"] for r in rows(whole)] == [0, 1, 2, 3]
    last = rows(whole)[-1]
    assert last["knn_top1"] is not None and last["loss"] is not None and last["images_per_s"] > 0
    results = json.loads((whole / "results.json").read_text())
    assert {"knn_top1_untrained", "knn_top1", "probe_top1", "probe_top5"} <= set(results)
    state = torch.load(whole / "checkpoint.pt", weights_only=True)
    # no random generator's state: every epoch reseeds them from (--seed, epoch, rank), so the resume below is exact
    assert state["method"] == method[:-3] and state["epoch"] == 3 and "optimizer" in state and "history" in state

    # the same run killed as soon as its first checkpoint is on disk, then resumed

    cut = tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, *argv, "--out-dir", str(cut)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (cut / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = torch.load(cut / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= killed_at < 3

    out = run_script(*argv, "--out-dir", cut, "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed {cut} at epoch {killed_at}" in out.stdout
    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["epoch"] for r in rows(cut)] == [0, 1, 2, 3]  # no epoch logged twice, none missing


def assert_refused(out, message):
    assert out.returncode == 2, out.stderr[-3000:]
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


BAD_FLAGS = [
    ("simclr.py", ["--lr", "-0.1"], "--lr must be positive"),
    ("simclr.py", ["--dataset", "imagenet22k"], "unknown --dataset"),
    ("simclr.py", ["--epochs", "0"], "--epochs must be positive"),
    ("simclr.py", ["--temperature", "-1"], "--temperature must be positive"),
] + [(m, [], "already holds a run") for m in METHODS]


@pytest.mark.parametrize("method, extra, message", grouped(BAD_FLAGS))
def test_bad_flags_leave_the_previous_run_intact(finished_runs, method, extra, message):
    run = finished_runs.run(method)
    before = snapshot(run)
    assert_refused(run_script(*tiny(method, "--epochs", "1", "--out-dir", run, *extra)), message)
    assert snapshot(run) == before


@pytest.mark.scripts
def test_missing_data_dir(tmp_path):
    out = run_script("simclr.py", "--dataset", "cifar10", "--data-dir", tmp_path / "nowhere",
                     "--out-dir", tmp_path / "run")
    assert_refused(out, "--download")
    assert not (tmp_path / "run").exists()
    out = run_script("simclr.py", "--dataset", "imagefolder", "--data-dir", tmp_path, "--out-dir", tmp_path / "r")
    assert_refused(out, "train/")


@pytest.mark.scripts
def test_batch_not_divisible_by_processes(tmp_path):
    out = torchrun("simclr.py", *SYNTHETIC_FLAGS, "--arch", "tiny", "--batch-size", "63",
                   "--out-dir", tmp_path / "run")
    assert out.returncode != 0  # torchrun reports its children's failure with its own exit code (1)
    assert "exitcode: 2" in out.stderr  # ... after each child exited with 2
    assert out.stderr.count("--batch-size 63 does not divide evenly over 2 processes") == 1  # rank 0 speaks
    assert not (tmp_path / "run").exists()


BAD_CHECKPOINTS = [("simclr.py", "corrupt"), ("simclr.py", "foreign_arch")] + [(m, "foreign_method")
                                                                               for m in METHODS]


@pytest.mark.parametrize("method, damage", grouped(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused_and_kept(tmp_path, finished_runs, method, damage):
    run = tmp_path / "run"
    run.mkdir()
    good = finished_runs.run(method) / "checkpoint.pt"
    state = torch.load(good, weights_only=True)
    if damage == "corrupt":
        (run / "checkpoint.pt").write_bytes(good.read_bytes()[:5000])
        message = "not a valid checkpoint"
    elif damage == "foreign_method":
        other = "moco" if method != "moco.py" else "simclr"
        torch.save({**state, "method": other}, run / "checkpoint.pt")
        message = f"is not a checkpoint of {method}"
    else:
        torch.save({**state, "args": {**state["args"], "arch": "resnet50"}}, run / "checkpoint.pt")
        message = "--arch resnet50"
    before = snapshot(run)
    assert_refused(run_script(*tiny(method, "--epochs", "2", "--out-dir", run, "--resume")), message)
    assert snapshot(run) == before


# the quick start of each file, offline: digits, the tiny network, one short epoch (the flags of METHODS make the
# method's own parts small too)
COPY_FLAGS = ["--dataset", "digits", "--arch", "tiny", "--batch-size", "64", "--workers", "0", "--epochs", "1",
              "--subset", "256", "--eval-subset", "64", "--probe-epochs", "1", "--knn-k", "10"]


@pytest.mark.parametrize("method, device", grouped([(m, d) for m in METHODS for d in (False, True)]))
def test_one_method_file_and_common_py_alone_run_in_an_empty_folder(method, device, tmp_path):
    """The user's move: copy one method file and common.py into an empty folder and run it there; the same with
    device_data.py added and --data-path device (without it, --data-path device says in one line why not)."""
    for name in [method, "common.py"] + (["device_data.py"] if device else []):
        shutil.copy(ROOT / name, tmp_path / name)
    argv = [method, *COPY_FLAGS, *METHODS[method], "--out-dir", "run"] + (["--data-path", "device"] if device else [])
    out = run_script(*argv, cwd=tmp_path, env_extra={"PYTHONPATH": ""})
    if device and method == "dpll.py":  # Cutout and AutoAugment have no batched version: refused in one line
        assert_refused(out, "--data-path device: no batched version of Cutout")
        return
    assert out.returncode == 0, out.stderr[-3000:]
    assert "k-NN top-1: untrained" in out.stdout and (tmp_path / "run" / "results.json").exists()
    assert ("training data on cpu" in out.stdout) == device
    if not device:
        assert_refused(run_script(*argv, "--data-path", "device", "--out-dir", "again", cwd=tmp_path,
                                  env_extra={"PYTHONPATH": ""}), "--data-path device: No module named 'device_data'")
