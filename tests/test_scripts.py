"""simclr.py from the command line on tiny data: help, a run, torchrun, kill and resume, bad input."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_script, torchrun

TINY = ["--dataset", "synthetic", "--arch", "tiny", "--batch-size", "64", "--workers", "0", "--log-every", "0.5"]


def test_help():
    out = run_script("simclr.py", "--help")
    assert out.returncode == 0, out.stderr
    assert "NT-Xent" in out.stdout and "--temperature" in out.stdout and "--resume" in out.stdout


def test_tiny_run_writes_its_run_directory(tmp_path):
    run = tmp_path / "run"
    out = run_script("simclr.py", *TINY, "--epochs", "2", "--eval-every", "1", "--probe-epochs", "5",
                     "--out-dir", run)
    assert out.returncode == 0, out.stderr
    assert "k-NN top-1: untrained" in out.stdout and "img/s" in out.stdout and "ETA" in out.stdout
    args = json.loads((run / "args.json").read_text())
    assert args["method"] == "simclr" and args["epochs"] == 2 and args["temperature"] == 0.5
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert all(r["knn_top1"] is not None for r in rows) and rows[-1]["loss"] > 0 and rows[-1]["images_per_s"] > 0
    results = json.loads((run / "results.json").read_text())
    assert set(results) == {"knn_top1_untrained", "knn_top1", "probe_top1", "probe_top5"}
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["method"] == "simclr" and state["epoch"] == 2 and "optimizer" in state and "rng" in state
    pytest.importorskip("matplotlib")
    assert (run / "curves.png").stat().st_size > 0


def test_torchrun_two_processes_on_the_cpu(tmp_path):
    run = tmp_path / "run"
    out = torchrun("simclr.py", *TINY, "--epochs", "2", "--eval-every", "1", "--probe-epochs", "2",
                   "--out-dir", run, "--seed", "3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es)" in out.stdout
    assert out.stdout.count("k-NN top-1 of the untrained network") == 1  # rank 0 speaks, once
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]  # one writer
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2


def final_weights(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    argv = [*TINY, "--epochs", "6", "--eval-every", "2", "--probe-epochs", "0"]
    whole = tmp_path / "whole"
    out = run_script("simclr.py", *argv, "--out-dir", whole)
    assert out.returncode == 0, out.stderr

    cut = tmp_path / "cut"
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "simclr.py", *argv, "--out-dir", str(cut)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**__import__("os").environ, **env})
    deadline = time.time() + 240
    while not (cut / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = torch.load(cut / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= killed_at < 6

    out = run_script("simclr.py", *argv, "--out-dir", cut, "--resume")
    assert out.returncode == 0, out.stderr
    assert f"resumed {cut} at epoch {killed_at}" in out.stdout
    a, b = final_weights(whole), final_weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(line)["epoch"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert rows == [0, 1, 2, 3, 4, 5, 6]  # no epoch logged twice, none missing


def snapshot(path):
    return {p.name: p.read_bytes() for p in path.iterdir()} if path.exists() else {}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    out = run_script("simclr.py", *TINY, "--epochs", "1", "--probe-epochs", "0", "--out-dir", run)
    assert out.returncode == 0, out.stderr
    return run


@pytest.mark.parametrize("extra, message", [
    (["--lr", "-0.1"], "--lr must be positive"),
    (["--dataset", "imagenet22k"], "unknown --dataset"),
    (["--epochs", "0"], "--epochs must be positive"),
    ([], "already holds a run"),
])
def test_bad_flags_leave_the_previous_run_intact(finished_run, extra, message):
    before = snapshot(finished_run)
    out = run_script("simclr.py", *TINY, "--epochs", "1", "--out-dir", finished_run, *extra)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert snapshot(finished_run) == before


def test_missing_data_dir(tmp_path):
    out = run_script("simclr.py", "--dataset", "cifar10", "--data-dir", tmp_path / "nowhere",
                     "--out-dir", tmp_path / "run")
    assert out.returncode == 2 and "--download" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    out = run_script("simclr.py", "--dataset", "imagefolder", "--data-dir", tmp_path, "--out-dir", tmp_path / "r")
    assert out.returncode == 2 and "train/" in out.stderr


def test_batch_not_divisible_by_processes(tmp_path):
    out = torchrun("simclr.py", *TINY[:-6], "--batch-size", "63", "--out-dir", tmp_path / "run")
    assert out.returncode != 0  # torchrun reports its children's failure with its own exit code (1)
    assert "exitcode: 2" in out.stderr
    assert "--batch-size 63 does not divide evenly over 2 processes" in out.stderr
    assert out.stderr.count("does not divide evenly") == 1  # only rank 0 speaks
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["corrupt", "foreign_method", "foreign_arch"])
def test_bad_checkpoint_is_refused_and_kept(tmp_path, finished_run, damage):
    run = tmp_path / "run"
    run.mkdir()
    state = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    if damage == "corrupt":
        (run / "checkpoint.pt").write_bytes((finished_run / "checkpoint.pt").read_bytes()[:5000])
        message = "not a valid checkpoint"
    elif damage == "foreign_method":
        torch.save({**state, "method": "moco"}, run / "checkpoint.pt")
        message = "written by moco.py, not simclr.py"
    else:
        torch.save({**state, "args": {**state["args"], "arch": "resnet50"}}, run / "checkpoint.pt")
        message = "--arch resnet50"
    before = snapshot(run)
    out = run_script("simclr.py", *TINY, "--epochs", "2", "--out-dir", run, "--resume")
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert snapshot(run) == before
