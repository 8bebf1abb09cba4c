"""Faults and bad input: the documented exit code, one line on stderr that names the file, the classes or the lost
process and says what to do, and nothing already written lost (every file that existed before is byte-identical
afterwards; a run refused before it makes its --out-dir does not make it).

Fast tier (no marker): the checks in this process (common.dataset_info, load_dataset, open_image, the DataLoader's
workers, device_data.train_data, RunDir: its lock, resume's rules, a full disk) and every method's main diverging.
`scripts` tier (`pytest -m scripts`): simclr.py from the command line (image folders with broken files, a killed run,
a stale checkpoint.pt.tmp, a checkpoint of other flags, a second run in a held directory, Ctrl-C, a killed DataLoader
worker, a file-size limit) and two torchrun "nodes" on loopback, one of which dies (the other node's, or the one
hosting the rendezvous) or freezes.
"""

import contextlib
import gc
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import common
from conftest import SYNTHETIC_FLAGS

ROOT = Path(__file__).resolve().parent.parent  # conftest.py puts it on sys.path, for `import common`
TINY = ["--arch", "tiny", "--log-every", "0.5", "--probe-epochs", "1"]
SYNTHETIC = ["simclr.py", *SYNTHETIC_FLAGS, "--batch-size", "64", "--workers", "0", *TINY]
PATHS = [("cpu", 0), ("cpu", 2), ("device", 0), ("device", 2)]  # --data-path, --workers


# ---------------------------------------------------------------------------------------------------- helpers


def script_env() -> dict:
    """The environment of a script started here: one thread, unbuffered, outside any process group."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def run_script(*argv, timeout=300):
    """`python <argv>` from the repository root; the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=script_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


def image_folder(root: Path, classes=("a", "b", "c"), train: int = 6, test: int = 2, test_name: str = "test"):
    """root/train/<class>/<i>.jpg and root/<test_name>/<class>/<i>.jpg: 16x16 RGB noise, seeded."""
    rng = random.Random(0)
    for split, n in (("train", train), (test_name, test)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.frombytes("RGB", (16, 16), rng.randbytes(16 * 16 * 3)).save(root / split / c / f"{i}.jpg",
                                                                                  quality=95)
    return root


def folder_args(root: Path, **kwargs) -> common.Args:
    return common.Args(**{"dataset": "imagefolder", "data_dir": str(root), "arch": "tiny", "batch_size": 8,
                          "workers": 0, "device": "cpu", "data_path": "cpu", **kwargs})


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def zero_bytes(path: Path):
    path.write_bytes(b"")


def break_header(path: Path):
    data = path.read_bytes()
    path.write_bytes(b"\0" * 16 + data[16:])


# damage -> (how, which file): the first image in sorted order (the one the device path opens for the size), the
# last, one in the middle, one of the test split
DAMAGES = {"truncated": (truncate, "train/a/0.jpg"), "zero_bytes": (zero_bytes, "train/c/5.jpg"),
           "broken_header": (break_header, "train/b/2.jpg"), "broken_test_image": (break_header, "test/b/1.jpg")}


def snapshot(path: Path) -> dict:
    """Every file and folder under `path` (or `path` itself, a file): relative path -> sha256 of the bytes (None
    for a folder); {} where nothing exists."""
    if not path.exists():
        return {}
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*"))}


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr[-4000:]}"
    return lines[0]


def assert_refused(out, *parts, code=2) -> str:
    """The process exited with `code` after one line on stderr that holds every one of `parts`; returns the line."""
    assert out.returncode == code, f"exit code {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    line = one_line(out.stderr)
    for part in parts:
        assert str(part) in line, line
    return line


def assert_refused_here(exit_info, capsys, *parts) -> str:
    """The same for a check run in this process: SystemExit(2) after one line on stderr."""
    assert exit_info.value.code == 2
    line = one_line(capsys.readouterr().err)
    for part in parts:
        assert str(part) in line, line
    return line


def assert_nothing_left(run: Path):
    """A run refused early leaves no --out-dir, or one that does not block a re-run (its lock file only: no args.json,
    no metrics.jsonl, no checkpoint.pt)."""
    assert not run.exists() or set(os.listdir(run)) <= {".lock"}, sorted(os.listdir(run))


@pytest.fixture
def quick_loader_shutdown(monkeypatch):
    """A DataLoader iterator that met an error waits for each of its workers up to 5 s when it is collected (PyTorch's
    join timeout; a script exits without it): 0.1 s here, and collected before the test ends."""
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.1)
    yield
    gc.collect()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 1-epoch simclr.py run on the synthetic set; tests copy it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    out = run_script(*SYNTHETIC, "--epochs", "1", "--out-dir", run)
    assert out.returncode == 0, out.stderr[-3000:]
    return run


# ---------------------------------------------------------------------------------------------------- class folders


@pytest.mark.parametrize("test_name", ["test", "val"])
@pytest.mark.parametrize("missing, extra", [("c", None), (None, "d"), ("c", "d")])
def test_splits_with_other_classes_are_refused_naming_them(tmp_path, capsys, test_name, missing, extra):
    image_folder(tmp_path, test_name=test_name)
    if missing:
        shutil.rmtree(tmp_path / test_name / missing)
    if extra:
        image_folder(tmp_path, classes=(extra,), train=0, test=2, test_name=test_name)
        shutil.rmtree(tmp_path / "train" / extra)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        common.dataset_info(folder_args(tmp_path))
    line = assert_refused_here(exit_info, capsys, "differ")
    if missing:
        assert f"only in train/: {missing}" in line, line
    if extra:
        assert f"only in {test_name}/: {extra}" in line, line
    assert snapshot(tmp_path) == before


@pytest.mark.scripts
def test_splits_with_other_classes_are_refused_before_training(tmp_path):
    data, run = image_folder(tmp_path / "data"), tmp_path / "run"
    shutil.rmtree(data / "test" / "b")
    image_folder(data, classes=("e",), train=0, test=2)
    shutil.rmtree(data / "train" / "e")
    before = snapshot(data)
    out = run_script("simclr.py", "--dataset", "imagefolder", "--data-dir", data, "--batch-size", "8",
                     "--workers", "0", *TINY, "--epochs", "1", "--out-dir", run)
    assert_refused(out, "only in train/: b", "only in test/: e")
    assert not run.exists()
    assert snapshot(data) == before


def test_empty_class_folder_is_refused_naming_it(tmp_path, capsys):
    image_folder(tmp_path)
    (tmp_path / "train" / "zzz_empty").mkdir()
    (tmp_path / "test" / "zzz_empty").mkdir()
    args = folder_args(tmp_path)
    with pytest.raises(SystemExit) as exit_info:  # the same classes in both splits: refused all the same
        common.dataset_info(args)
    assert_refused_here(exit_info, capsys, "zzz_empty", tmp_path / "train")


# ---------------------------------------------------------------------------------------------------- broken images


@pytest.mark.parametrize("damage", DAMAGES)
def test_open_image_names_a_broken_file(tmp_path, damage):
    how, name = DAMAGES[damage]
    path = image_folder(tmp_path) / name
    how(path)
    with pytest.raises(common.BadImage) as err:
        common.open_image(str(path))
    assert str(path) in str(err.value) and "remove or replace it" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the workers cut short
@pytest.mark.parametrize("workers", [0, 2])
def test_broken_image_in_the_data_loader_is_one_line(tmp_path, capsys, quick_loader_shutdown, workers):
    """From a DataLoader worker the error comes back wrapped, with the worker's traceback: one line all the same,
    without the exception's module and class in front of it."""
    path = image_folder(tmp_path) / "train/b/2.jpg"
    truncate(path)
    args = folder_args(tmp_path, workers=workers)
    train_set = common.load_dataset(args, True, common.T.PILToTensor())
    with pytest.raises(SystemExit) as exit_info:
        for _ in common.TrainData(train_set, None, args).loader(0):
            pass
    line = assert_refused_here(exit_info, capsys, path, "remove or replace it")
    assert line.startswith(f"error: cannot read the image {path}"), line


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the workers cut short
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("damage", ["truncated", "zero_bytes", "broken_header"])
def test_broken_image_on_the_device_path_is_one_line(tmp_path, capsys, quick_loader_shutdown, damage, workers):
    """The device path decodes the whole training set up front (through common.Batches, with its workers)."""
    import simclr

    how, name = DAMAGES[damage]
    path = image_folder(tmp_path) / name
    how(path)
    args = folder_args(tmp_path, data_path="device", workers=workers)
    info = common.DATASETS["imagefolder"]._replace(num_classes=3, size=16)
    views = common.MultiView([simclr.simclr_augment(info, 16) for _ in range(2)])
    train_set = common.load_dataset(args, True, views)
    with pytest.raises(SystemExit) as exit_info:
        common.TrainData(train_set, views, args)
    line = assert_refused_here(exit_info, capsys, path, "remove or replace it")
    assert line.startswith(f"error: cannot read the image {path}"), line


@pytest.mark.scripts
@pytest.mark.parametrize("data_path, workers", PATHS)
@pytest.mark.parametrize("damage", DAMAGES)
def test_broken_image_stops_the_run_in_one_line(tmp_path, damage, data_path, workers):
    how, name = DAMAGES[damage]
    data, run = image_folder(tmp_path / "data"), tmp_path / "run"
    path = data / name
    how(path)
    before = snapshot(data)
    out = run_script("simclr.py", "--dataset", "imagefolder", "--data-dir", data, "--batch-size", "8", *TINY,
                     "--epochs", "2", "--data-path", data_path, "--workers", workers, "--out-dir", run)
    line = assert_refused(out, path, "remove or replace it")
    assert line.startswith(f"error: cannot read the image {path}"), line
    assert_nothing_left(run)
    assert snapshot(data) == before


@pytest.mark.scripts
@pytest.mark.parametrize("data_path, workers", PATHS[:3])
def test_other_files_in_class_folders_are_ignored(tmp_path, data_path, workers):
    data, run = image_folder(tmp_path / "data"), tmp_path / "run"
    (data / "train" / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1\0" * 50)
    (data / "test" / "b" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1\0" * 50)
    (data / "train" / "c" / "notes.txt").write_text("not an image\n")
    out = run_script("simclr.py", "--dataset", "imagefolder", "--data-dir", data, "--batch-size", "8", *TINY,
                     "--epochs", "1", "--data-path", data_path, "--workers", workers, "--out-dir", run)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "18 images" in out.stdout  # 3 classes of 6: the other files are not samples
    assert (run / "results.json").is_file()


@pytest.mark.scripts
@pytest.mark.parametrize("data_path", ["cpu", "device"])
def test_empty_class_folder_stops_the_run_in_one_line(tmp_path, data_path):
    data, run = image_folder(tmp_path / "data"), tmp_path / "run"
    (data / "train" / "zzz_empty").mkdir()
    (data / "test" / "zzz_empty").mkdir()
    before = snapshot(data)
    out = run_script("simclr.py", "--dataset", "imagefolder", "--data-dir", data, "--batch-size", "8", *TINY,
                     "--epochs", "1", "--data-path", data_path, "--workers", "0", "--out-dir", run)
    assert_refused(out, "zzz_empty", "add images to that class folder or remove it")
    assert not run.exists()
    assert snapshot(data) == before


@pytest.mark.scripts
def test_broken_image_keeps_the_run_and_the_repaired_folder_runs(tmp_path):
    """A finished run resumed onto a folder with a broken image is refused with its files untouched; a fresh run
    stopped by it leaves nothing that blocks the re-run once the image is replaced."""
    data, run, fresh = image_folder(tmp_path / "data"), tmp_path / "run", tmp_path / "fresh"
    argv = ["simclr.py", "--dataset", "imagefolder", "--data-dir", data, "--batch-size", "8", "--workers", "0",
            *TINY, "--data-path", "cpu"]
    out = run_script(*argv, "--epochs", "1", "--out-dir", run)
    assert out.returncode == 0, out.stderr[-3000:]
    path = data / "train/b/2.jpg"
    good = path.read_bytes()
    truncate(path)

    before = snapshot(run)
    assert_refused(run_script(*argv, "--epochs", "2", "--out-dir", run, "--resume"), path)
    assert snapshot(run) == before
    assert_refused(run_script(*argv, "--epochs", "1", "--out-dir", fresh), path)
    assert_nothing_left(fresh)

    path.write_bytes(good)
    out = run_script(*argv, "--epochs", "1", "--out-dir", fresh)
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_script(*argv, "--epochs", "2", "--out-dir", run, "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2


# ---------------------------------------------------------------------------------------------------- run directory


def unwritable_parent(tmp_path: Path, how: str) -> Path:
    """A parent for --out-dir in which nothing can be made: a regular file ("file"), or a folder made read-only
    ("readonly": chmod 0o500; as root, who writes anyway, the immutable attribute where chattr can set it)."""
    parent = tmp_path / "parent"
    if how == "file":
        parent.write_text("a file, not a folder\n")
        return parent
    parent.mkdir()
    (parent / "kept.txt").write_text("kept\n")
    if os.geteuid() != 0:
        parent.chmod(0o500)
    elif not shutil.which("chattr") or subprocess.run(["chattr", "+i", parent], capture_output=True,
                                                      check=False).returncode:
        pytest.skip("running as root, who writes into a chmod 0o500 folder, and chattr +i is not available here")
    return parent


def restore(parent: Path):
    if parent.is_dir():
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", parent], capture_output=True, check=False)
        parent.chmod(0o700)


@pytest.mark.parametrize("how", ["file", "readonly"])
def test_unwritable_out_dir_is_refused_in_one_line(tmp_path, capsys, how):
    parent = unwritable_parent(tmp_path, how)
    try:
        before = snapshot(parent)
        with pytest.raises(SystemExit) as exit_info:
            common.RunDir(common.Args(out_dir=str(parent / "run")), "simclr")
        assert_refused_here(exit_info, capsys, f"cannot write the run directory {parent / 'run'}",
                            "choose an --out-dir that can be written")
        assert snapshot(parent) == before
    finally:
        restore(parent)


@pytest.mark.scripts
@pytest.mark.parametrize("how", ["file", "readonly"])
def test_unwritable_out_dir_stops_the_run_in_one_line(tmp_path, how):
    parent = unwritable_parent(tmp_path, how)
    try:
        before = snapshot(parent)
        out = run_script(*SYNTHETIC, "--epochs", "1", "--out-dir", parent / "run")
        assert_refused(out, f"cannot write the run directory {parent / 'run'}")
        assert snapshot(parent) == before
    finally:
        restore(parent)


@pytest.mark.scripts
def test_run_killed_before_its_first_checkpoint_starts_again_with_resume(tmp_path):
    run, argv = tmp_path / "run", [*SYNTHETIC, "--epochs", "2"]
    proc = subprocess.Popen([sys.executable, *map(str, argv), "--out-dir", str(run)], cwd=ROOT, env=script_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (run / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert (run / "args.json").is_file() and not (run / "checkpoint.pt").exists(), sorted(os.listdir(run))

    before = snapshot(run)
    assert_refused(run_script(*argv, "--out-dir", run), run, "pass --resume")
    assert snapshot(run) == before

    out = run_script(*argv, "--out-dir", run, "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"no checkpoint.pt in {run} yet: starting the run again from epoch 0" in out.stdout
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2
    epochs = [int(re.search(r'"epoch": (\d+)', line).group(1)) for line in (run / "metrics.jsonl").open()]
    assert epochs == [0, 1, 2]


def test_resume_starts_again_a_run_stopped_before_its_first_epoch(tmp_path, capsys):
    """A run that made its directory (its lock file; args.json comes with the first metrics row) and stopped before
    its first metrics line, as when a peer is lost during the untrained network's k-NN: the lost-peer line says to
    pass --resume, so --resume must take it."""
    run = tmp_path / "run"
    common.RunDir(common.Args(out_dir=str(run)), "simclr")
    assert os.listdir(run) == [".lock"]
    again = common.RunDir(common.Args(out_dir=str(run), resume=True), "simclr")
    assert again.resume(None, None) == {"epoch": 0}
    assert f"no checkpoint.pt in {run} yet: starting the run again from epoch 0" in capsys.readouterr().out


@pytest.mark.scripts
def test_batch_larger_than_the_data_is_refused_before_the_run_directory(tmp_path):
    run = tmp_path / "run"
    out = run_script("simclr.py", *SYNTHETIC_FLAGS, "--batch-size", "1024", "--workers", "0", *TINY,
                     "--epochs", "1", "--out-dir", run)
    assert_refused(out, "--batch-size 1024 is larger than the training set (512 images)")
    assert not run.exists()


@pytest.mark.scripts
def test_stale_temporary_checkpoint_is_removed_and_the_run_continues(tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "checkpoint.pt.tmp").write_bytes(os.urandom(3 * 2**20))  # what a kill during torch.save leaves
    out = run_script(*SYNTHETIC, "--epochs", "2", "--out-dir", run, "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed {run} at epoch 1" in out.stdout
    assert not (run / "checkpoint.pt.tmp").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2


def assert_names_the_key(line: str):
    """The first key that does not fit (the last projection layer's weight, [proj_dim, 128]), and its shape in the
    checkpoint, then here."""
    assert "does not fit this model" in line and "projector.3.weight" in line, line
    assert re.search(r"128, 128\D.*\D64, 128", line), line


def test_checkpoint_of_another_model_is_refused_naming_the_key(tmp_path, capsys):
    import simclr

    def model_and_optimizer(proj_dim):
        model = simclr.SimCLR(common.build_backbone("tiny"), proj_dim)
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    args = simclr.Args(dataset="digits", arch="tiny", epochs=1, out_dir=str(tmp_path / "run"))
    model, optimizer = model_and_optimizer(128)
    common.RunDir(args, "simclr").save(1, model=model.state_dict(), optimizer=optimizer.state_dict())
    before = snapshot(tmp_path / "run")
    other = simclr.Args(dataset="digits", arch="tiny", epochs=2, out_dir=str(tmp_path / "run"), resume=True)
    run = common.RunDir(other, "simclr")  # the same flags, another model (an edited file)
    with pytest.raises(SystemExit) as exit_info:
        run.resume(*model_and_optimizer(64))
    assert_names_the_key(assert_refused_here(exit_info, capsys, tmp_path / "run" / "checkpoint.pt"))
    assert snapshot(tmp_path / "run") == before


@pytest.mark.scripts
def test_resume_with_other_flags_names_them(tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    out = run_script(*SYNTHETIC, "--epochs", "2", "--out-dir", run, "--resume", "--proj-dim", "64", "--seed", "3")
    assert_refused(out, f"{run / 'checkpoint.pt'} holds a run of --seed 0 --proj-dim 128, but this run asks for "
                        f"--seed 3 --proj-dim 64: pass the run's own to continue it")
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------------------- lost nodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether a socket on this machine listens on `port` (read from /proc, without connecting to it)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            if any(cols[1].endswith(f":{port:04X}") and cols[3] == "0A" for cols in map(str.split, list(f)[1:])):
                return True
    return False


def children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


class TwoNodes:
    """Two torchrun agents on this machine, one process each, meeting at a c10d rendezvous on loopback: node 0 is
    started first and hosts the rendezvous, node 1 joins it. Each agent in its own session, with its own stdout and
    stderr files; close() ends every process started here (the agents and their workers)."""

    def __init__(self, directory: Path, argv: list, tag: str):
        self.directory, self.argv, self.tag, self.agents, self.workers = directory, argv, tag, [], []

    def start(self):
        port = free_port()
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=faults-{self.tag}",
                   *map(str, self.argv)]
        for node in range(2):
            with open(self.out(node), "w") as out, open(self.err(node), "w") as err:
                self.agents.append(subprocess.Popen(command, cwd=ROOT, env=script_env(), stdout=out, stderr=err,
                                                    start_new_session=True))
            deadline = time.time() + 60
            while node == 0 and not listening(port) and self.agents[0].poll() is None and time.time() < deadline:
                time.sleep(0.05)  # node 0 holds the rendezvous before node 1 looks for it
        return self

    def out(self, node: int) -> Path:
        return self.directory / f"{self.tag}-node{node}.out"

    def err(self, node: int) -> Path:
        return self.directory / f"{self.tag}-node{node}.err"

    def worker(self, node: int, timeout: float = 120) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline and self.agents[node].poll() is None:
            kids = children(self.agents[node].pid)
            if kids:
                self.workers += kids
                return kids[0]
            time.sleep(0.05)
        raise AssertionError(f"no worker of node {node}:\n{self.err(node).read_text()[-3000:]}")

    def wait(self, timeout: float) -> list[int]:
        deadline = time.time() + timeout
        return [agent.wait(timeout=max(1.0, deadline - time.time())) for agent in self.agents]

    def close(self):
        for agent in self.agents:
            if agent.poll() is None:
                self.workers += children(agent.pid)
        for pid in self.workers:
            try:
                ours = b"simclr.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                ours = False  # gone
            for sig in (signal.SIGCONT, signal.SIGKILL) if ours else ():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        for agent in self.agents:
            if agent.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(agent.pid, sig)
            agent.wait()


def lost_peer_line(stderr: str, run: Path, start: str = "error: process 0 lost a peer", code: bool = True) -> str:
    """The survivor's one line in its agent's stderr (the agent adds its own summary after it); no traceback from
    the worker before it; exit code 4 (as the agent reports it, where it is still there to report it)."""
    lines = [line for line in stderr.splitlines() if line.startswith(start)]
    assert len(lines) == 1, stderr[-5000:]
    assert "Traceback (most recent call last)" not in stderr[:stderr.index(lines[0])], stderr[-5000:]
    assert not code or re.search(r"exitcode\s*:\s*4\b", stderr), stderr[-5000:]
    epoch = torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]
    assert f"checkpoint.pt of epoch {epoch} in {run} is intact" in lines[0], lines[0]
    assert f"--resume --out-dir {run}" in lines[0], lines[0]
    return lines[0]


EPOCHS, DIST_TIMEOUT = 6, 20


def two_node_argv(run: Path) -> list:
    return [*SYNTHETIC, "--log-every", "0.2", "--epochs", EPOCHS, "--out-dir", run, "--dist-timeout", DIST_TIMEOUT]


def wait_for_checkpoint(nodes: TwoNodes, run: Path, timeout: float = 240):
    deadline = time.time() + timeout
    while not (run / "checkpoint.pt").exists():
        assert time.time() < deadline and all(a.poll() is None for a in nodes.agents), \
            nodes.err(0).read_text()[-3000:] + nodes.err(1).read_text()[-3000:]
        time.sleep(0.05)
    time.sleep(0.5)  # into the next epoch


def signal_node_1(tmp_path, run, sig, timeout):
    """Two nodes train into `run`; after the first checkpoint node 1's process (not the rendezvous host) gets `sig`.
    Returns the seconds node 0 took to end after it, having printed its one lost-peer line."""
    nodes = TwoNodes(tmp_path, two_node_argv(run), signal.Signals(sig).name).start()
    try:
        worker = nodes.worker(1)
        wait_for_checkpoint(nodes, run)
        sent = time.time()
        os.kill(worker, sig)
        nodes.agents[0].wait(timeout=timeout)
        took = time.time() - sent
    finally:
        nodes.close()
    line = lost_peer_line(nodes.err(0).read_text(), run)
    print(f"survivor ended {took:.1f} s after {signal.Signals(sig).name}: {line}")
    return took


@pytest.mark.scripts
@pytest.mark.xdist_group("two_nodes")
def test_lost_node_ends_the_survivor_in_one_line_and_resume_finishes(tmp_path):
    run = tmp_path / "run"
    took = signal_node_1(tmp_path, run, signal.SIGKILL, timeout=60)  # node 1 dies
    assert took < 30
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= saved < EPOCHS

    again = TwoNodes(tmp_path, [*two_node_argv(run), "--resume"], "resume").start()
    try:
        codes = again.wait(timeout=300)
    finally:
        again.close()
    assert codes == [0, 0], again.err(0).read_text()[-3000:] + again.err(1).read_text()[-3000:]
    assert f"resumed {run} at epoch {saved}" in again.out(0).read_text()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == EPOCHS


@pytest.mark.scripts
@pytest.mark.xdist_group("two_nodes")
def test_frozen_node_ends_the_survivor_in_one_line(tmp_path):
    took = signal_node_1(tmp_path, tmp_path / "run", signal.SIGSTOP, timeout=DIST_TIMEOUT + 60)  # frozen, silent
    assert took < DIST_TIMEOUT + 15


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


@pytest.mark.scripts
@pytest.mark.xdist_group("two_nodes")
def test_lost_rendezvous_host_ends_the_survivor_in_one_line(tmp_path):
    """Node 0, which hosts the rendezvous, dies (its agent and its worker): node 1's agent loses the rendezvous and
    ends its worker (SIGTERM), which must still have said what is kept and how to continue."""
    run = tmp_path / "run"
    nodes = TwoNodes(tmp_path, two_node_argv(run), "host").start()
    try:
        workers = [nodes.worker(0), nodes.worker(1)]
        wait_for_checkpoint(nodes, run)
        os.killpg(nodes.agents[0].pid, signal.SIGKILL)
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.time() + 60
        while not gone(workers[1]) and time.time() < deadline:
            time.sleep(0.05)
        assert gone(workers[1]), "the survivor did not end"
        nodes.agents[1].wait(timeout=60)
    finally:
        nodes.close()
    line = lost_peer_line(nodes.err(1).read_text(), run, start="error: process 1 lost ", code=False)
    print(line)


# ---------------------------------------------------------------------------------------------------- divergence

# a few steps of each method on tiny data (4 steps an epoch): the flags that make its own parts small
TINY_RUN = [*SYNTHETIC_FLAGS, "--arch", "tiny", "--batch-size", "32", "--subset", "128", "--workers", "0",
            "--data-path", "cpu", "--eval-every", "0", "--probe-epochs", "0", "--knn-k", "10", "--log-every", "1000"]
METHODS = {
    "simclr": [], "supcon": [], "moco": ["--queue-size", "64"], "byol": ["--proj-hidden-dim", "64", "--proj-dim", "32"],
    "simsiam": ["--proj-dim", "64", "--pred-dim", "16"], "instdisc": ["--nce-k", "16"],
    "paws": ["--num-labels", "40", "--supports-per-class", "2", "--multicrop", "1"], "dpll": ["--q", "0.3"],
    "jem": ["--buffer-size", "128", "--sgld-steps", "2"],
}


def poison(batch):
    """The batch with every float tensor in it not a number."""
    if isinstance(batch, torch.Tensor):
        return torch.full_like(batch, float("nan")) if batch.is_floating_point() else batch
    return type(batch)(poison(b) for b in batch) if isinstance(batch, (list, tuple)) else batch


class Poisoned:
    """An epoch's loader (its length, its .epoch) whose third batch of the second epoch is not a number."""

    def __init__(self, loader):
        self.loader, self.epoch = loader, loader.epoch

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            yield poison(batch) if (self.epoch, i) == (1, 2) else batch


def main_of(method: str, argv: list):
    module = __import__(method)
    module.main(common.parse(module.Args, [*TINY_RUN, *METHODS[method], *map(str, argv)]))


@pytest.fixture
def keep_excepthook(monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # set back what setup_distributed installs


@pytest.mark.parametrize("method", METHODS)
def test_divergence_stops_every_method_keeping_the_last_good_checkpoint(method, tmp_path, capsys, monkeypatch,
                                                                          keep_excepthook):
    """Epoch 2's third batch is not a number, so is its loss: the run stops (exit code 3) with one line at the end of
    the epoch, before its metrics row and checkpoint; every file of epoch 1 is intact, metrics.jsonl strict JSON."""
    run = tmp_path / "run"
    main_of(method, ["--epochs", "1", "--out-dir", run])
    before = snapshot(run)
    capsys.readouterr()
    module = __import__(method)
    train_one_epoch = module.train_one_epoch
    monkeypatch.setattr(module, "train_one_epoch", lambda *a: train_one_epoch(
        *(Poisoned(x) if hasattr(x, "epoch") else x for x in a)))  # the epoch's loaders, poisoned
    with pytest.raises(SystemExit) as exit_info:
        main_of(method, ["--epochs", "3", "--out-dir", run, "--resume"])
    assert exit_info.value.code == 3
    line = one_line(capsys.readouterr().err)
    assert re.fullmatch(rf"error: training diverged: the loss stopped being finite \(nan\) at epoch 2, step 3 of \d+; "
                        rf"checkpoint.pt of epoch 1 in {run} is intact: resume with --resume "
                        rf"--out-dir {run} and a lower --lr", line), line
    assert snapshot(run) == before
    for row in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(row, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))


def test_jem_stops_at_its_own_bound_which_resume_may_change(tmp_path, capsys, keep_excepthook):
    run = tmp_path / "run"
    main_of("jem", ["--epochs", "1", "--out-dir", run])
    before = snapshot(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main_of("jem", ["--epochs", "2", "--out-dir", run, "--resume", "--diverge-at", "1e-9"])
    assert exit_info.value.code == 3
    line = one_line(capsys.readouterr().err)
    assert re.fullmatch(rf"error: training diverged: the loss passed 1e-09 \(\S+\) at epoch 2, step 1 of 4; "
                        rf"checkpoint.pt of epoch 1 in {run} is intact: resume with --resume "
                        rf"--out-dir {run} and a lower --lr", line), line
    assert snapshot(run) == before


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_every_loss_that_is_not_finite_stops_the_epoch(tmp_path, capsys, value):
    """The progress line's check, for each kind of non-finite loss, with no --diverge-at bound (infinity): the line
    names the step where the loss stopped being finite (the second of three), read at the epoch's end."""
    args = common.Args(out_dir=str(tmp_path / "run"), epochs=1, log_every=1e9)
    common.RunDir(args, "simclr")
    progress = common.Progress(args)
    with pytest.raises(SystemExit) as exit_info:
        progress.start(3)
        for step in range(3):
            progress.update(step, torch.tensor([1.0, value, 2.0][step]), 0.1, 1)
    assert exit_info.value.code == 3
    assert f"the loss stopped being finite ({value:.4g}) at epoch 1, step 2 of 3" in capsys.readouterr().err


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["model", "optimizer", "method"])
def test_a_checkpoint_that_is_not_finite_is_never_written(tmp_path, capsys, value, where):
    """Weights that stopped being finite while the last loss read was finite: save refuses them (exit code 3)."""
    args = common.Args(out_dir=str(tmp_path / "run"), epochs=3)
    run = common.RunDir(args, "simclr")
    state = {"model": {"w": torch.ones(3), "n": torch.tensor(2)}, "optimizer": {"state": {0: {"v": torch.ones(3)}}},
             "method": [torch.zeros(2)]}
    run.log(epoch=1, loss=1.0)
    run.save(1, **state)
    before = snapshot(run.path)
    {"model": state["model"]["w"], "optimizer": state["optimizer"]["state"][0]["v"], "method": state["method"][0]}[
        where][1] = value
    run.log(epoch=2, loss=float("nan"), knn_top1=value)
    with pytest.raises(SystemExit) as exit_info:
        run.save(2, **state)
    assert exit_info.value.code == 3
    assert one_line(capsys.readouterr().err) == (
        f"error: training diverged: the weights stopped being finite in epoch 2; checkpoint.pt of epoch 1 in "
        f"{run.path} is intact: resume with --resume --out-dir {run.path} and a lower --lr")
    assert snapshot(run.path)["checkpoint.pt"] == before["checkpoint.pt"]
    rows = [json.loads(row, parse_constant=pytest.fail) for row in (run.path / "metrics.jsonl").open()]
    assert rows[-1]["loss"] is None and rows[-1]["knn_top1"] is None  # not a bare NaN or Infinity


# ---------------------------------------------------------------------------------------------------- one run a folder


def let_go():
    """This process lets go of its run directory, as when it ends (a run made here in a test holds it till then)."""
    os.close(common.RunDir.lock)
    common.RunDir.lock = None


def test_a_directory_in_use_is_refused_until_its_holder_ends(tmp_path, capsys):
    """Another process's lock on .lock (flock, as a running run holds it): refused in one line, nothing touched; once
    the holder lets go (as the OS does when a process ends, however it ends) the same run proceeds."""
    import fcntl

    run = tmp_path / "run"
    common.RunDir(common.Args(out_dir=str(run)), "simclr").log(epoch=0)
    let_go()
    holder = os.open(run / ".lock", os.O_RDWR)  # another open file: another holder, as another process is
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        before = snapshot(run)
        for resume in (True, False):
            with pytest.raises(SystemExit) as exit_info:
                common.RunDir(common.Args(out_dir=str(run), resume=resume), "simclr")
            assert_refused_here(exit_info, capsys, f"{run} is in use by another run: wait until it ends, or choose "
                                                   f"another --out-dir")
            assert snapshot(run) == before
    finally:
        os.close(holder)
    assert common.RunDir(common.Args(out_dir=str(run), resume=True), "simclr").resume(None, None) == {"epoch": 0}


@pytest.mark.scripts
@pytest.mark.parametrize("workers", [0, 2])
def test_second_run_in_a_directory_is_refused_and_ctrl_c_keeps_the_checkpoint(tmp_path, workers):
    """A run holds its directory: a second one (with or without --resume) is refused while it runs. Ctrl-C (SIGINT to
    its process group, as a terminal sends it, DataLoader workers too) ends it with one line and exit code 130;
    --resume then finishes."""
    run, argv = tmp_path / "run", [*SYNTHETIC, "--epochs", "30", "--eval-every", "0", "--workers", workers]
    proc = subprocess.Popen([sys.executable, *map(str, argv), "--out-dir", str(run)], cwd=ROOT, env=script_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (run / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        for resume in ([], ["--resume"]):
            out = run_script(*argv, "--out-dir", run, *resume)
            assert_refused(out, f"{run} is in use by another run")
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    epoch = torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]
    assert one_line(err) == (f"error: interrupted; checkpoint.pt of epoch {epoch} in {run} is intact: continue with "
                             f"--resume --out-dir {run}")
    assert not list(run.glob("*.tmp"))
    out = run_script(*argv, "--out-dir", run, "--resume", "--epochs", epoch + 1)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed {run} at epoch {epoch}" in out.stdout


@pytest.mark.scripts
def test_torchrun_is_refused_by_a_run_that_holds_the_directory(tmp_path, finished_run):
    """Rank 0 takes the lock and tells every rank: one line, from rank 0, and the holder's files untouched."""
    import fcntl

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    holder = os.open(run / ".lock", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        before = snapshot(run)
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *map(str, SYNTHETIC),
                              "--epochs", "2", "--out-dir", str(run), "--resume"], cwd=ROOT, env=script_env(),
                             capture_output=True, text=True, timeout=300, check=False)
    finally:
        os.close(holder)
    assert out.returncode != 0
    assert [line for line in out.stderr.splitlines() if "in use by another run" in line] == [
        f"error: {run} is in use by another run: wait until it ends, or choose another --out-dir"], out.stderr[-3000:]
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------------------- resume's rules


def small_run(tmp_path, **flags):
    """A run directory with a checkpoint of epoch 2 (simclr, tiny, digits) and its three metrics rows."""
    import simclr

    args = simclr.Args(dataset="digits", arch="tiny", epochs=2, out_dir=str(tmp_path / "run"), **flags)
    run = common.RunDir(args, "simclr")
    model = simclr.SimCLR(common.build_backbone("tiny", 1, 8), args.proj_dim)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(3):
        run.log(epoch=epoch, loss=1.0 if epoch else None)
    run.save(2, model=model.state_dict(), optimizer=optimizer.state_dict())
    return run.path, model, optimizer


@pytest.mark.parametrize("flags, named", [
    ({"lr": 2.0}, "--lr 1.0, but this run asks for --lr 2.0"),
    ({"seed": 1, "batch_size": 256}, "--batch-size 512 --seed 0, but this run asks for --batch-size 256 --seed 1"),
    ({"temperature": 0.2}, "--temperature 0.5, but this run asks for --temperature 0.2"),  # the method's own
    ({"sync_bn": False}, "--sync-bn, but this run asks for --no-sync-bn"),
    ({"arch": "resnet18"}, "--arch tiny, but this run asks for --arch resnet18"),
    ({"epochs": 1}, "--epochs 2, but this run asks for --epochs 1: pass the run's own to continue it (--lr may be "
                    "lowered, --epochs 2 or more"),
])
def test_resume_refuses_flags_that_would_change_the_training(tmp_path, capsys, flags, named):
    import simclr

    path, model, optimizer = small_run(tmp_path)
    before = snapshot(path)
    args = simclr.Args(**{"dataset": "digits", "arch": "tiny", "epochs": 2, "out_dir": str(path), "resume": True,
                          **flags})
    with pytest.raises(SystemExit) as exit_info:
        common.RunDir(args, "simclr").resume(model, optimizer)
    assert_refused_here(exit_info, capsys, named)
    assert snapshot(path) == before


def test_resume_takes_more_epochs_a_lower_lr_and_other_machines_and_args_json_says_so(tmp_path, capsys):
    import simclr

    path, model, optimizer = small_run(tmp_path)
    args = simclr.Args(dataset="digits", arch="tiny", epochs=5, lr=0.5, workers=0, log_every=1, eval_every=2,
                       data_path="cpu", device="cpu", out_dir=str(path), resume=True)
    run = common.RunDir(args, "simclr")
    assert run.resume(model, optimizer)["epoch"] == 2
    assert f"resumed {path} at epoch 2" in capsys.readouterr().out
    assert json.loads((path / "args.json").read_text())["epochs"] == 2  # until the resumed run writes a row
    run.log(epoch=3, loss=1.0)
    saved = json.loads((path / "args.json").read_text())
    assert (saved["epochs"], saved["lr"], saved["workers"], saved["eval_every"]) == (5, 0.5, 0, 2)


@pytest.mark.parametrize("resume", [True, False])
def test_a_run_whose_checkpoint_is_gone_keeps_its_history(tmp_path, capsys, resume):
    path, *_ = small_run(tmp_path)
    (path / "checkpoint.pt").unlink()
    before = snapshot(path)
    with pytest.raises(SystemExit) as exit_info:
        common.RunDir(common.Args(out_dir=str(path), resume=resume), "simclr")
    assert_refused_here(exit_info, capsys, f"{path} holds no checkpoint.pt, but its metrics.jsonl holds trained "
                                           f"epochs, which starting over would delete: put checkpoint.pt back")
    assert snapshot(path) == before


@pytest.mark.parametrize("name", ["checkpoint.pt", "metrics.jsonl", "args.json", ".lock"])
@pytest.mark.parametrize("resume", [True, False])
def test_a_run_file_that_is_a_directory_is_refused(tmp_path, capsys, name, resume):
    path, *_ = small_run(tmp_path)
    moved = path / f"{name}.bak"
    (path / name).rename(moved)
    (path / name).mkdir()
    before = snapshot(path)
    with pytest.raises(SystemExit) as exit_info:
        common.RunDir(common.Args(out_dir=str(path), resume=resume), "simclr")
    assert_refused_here(exit_info, capsys, f"{path / name} is not a file: move it out of {path}")
    assert snapshot(path) == before


@pytest.mark.parametrize("holds, resumes", [([], False), (["notes.txt"], False), ([".lock"], True),
                                           (["args.json"], True), (["checkpoint.pt"], True)])
def test_resume_needs_a_run_to_continue(tmp_path, capsys, holds, resumes):
    """A directory holds a run when a run took it (.lock) or wrote one of its files there."""
    path = tmp_path / "run"
    path.mkdir()
    for name in holds:
        (path / name).write_bytes(b"")
    if resumes:
        assert common.RunDir(common.Args(out_dir=str(path), resume=True), "simclr")
        return
    before = snapshot(path)
    with pytest.raises(SystemExit) as exit_info:
        common.RunDir(common.Args(out_dir=str(path), resume=True), "simclr")
    assert_refused_here(exit_info, capsys, f"--resume: {path} holds no run to continue")
    assert snapshot(path) == before


def test_a_start_that_fails_leaves_no_args_json(tmp_path, capsys):
    """args.json comes with the first metrics row: a run stopped before it (a broken test image found by the first
    k-NN, a lost peer) leaves only its lock file, which a plain re-run takes."""
    run = tmp_path / "run"
    common.RunDir(common.Args(out_dir=str(run)), "simclr")
    assert os.listdir(run) == [".lock"]
    common.RunDir(common.Args(out_dir=str(run)), "simclr").log(epoch=0)
    assert sorted(os.listdir(run)) == [".lock", "args.json", "metrics.jsonl"]


# ---------------------------------------------------------------------------------------------------- a full disk


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    """torch.save stops part-way (its writer raises RuntimeError, a file object OSError): the temporary is removed,
    one line names the file and the intact checkpoint, checkpoint.pt and metrics.jsonl are as they were."""
    path, model, optimizer = small_run(tmp_path)
    run = common.RunDir.current
    before = snapshot(path)
    save = torch.save

    def full(obj, f):
        Path(f).write_bytes(os.urandom(1000))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SystemExit) as exit_info:
        run.save(2, force=True, model=model.state_dict())
    assert_refused_here(exit_info, capsys, f"cannot write {path / 'checkpoint.pt'} (the write stopped: is the disk "
                                           f"full?); checkpoint.pt of epoch 2 in {path} is intact: make room, then "
                                           f"continue with --resume --out-dir {path}")
    assert snapshot(path) == before
    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(Path, "write_text", lambda self, text: (self.write_bytes(b"{"), full(0, self)))
    with pytest.raises(SystemExit) as exit_info:
        run.log(epoch=3, loss=1.0)
    assert_refused_here(exit_info, capsys, f"cannot write {path / 'metrics.jsonl'}")
    assert snapshot(path) == before


@pytest.mark.scripts
def test_a_full_disk_while_saving_stops_the_run_in_one_line(tmp_path, finished_run):
    """A limit on the size of any file the run writes (RLIMIT_FSIZE: each write past it fails, as on a full disk),
    above the files of the finished run but below its next checkpoint."""
    import resource

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    limit = (run / "checkpoint.pt").stat().st_size - 1000
    out = subprocess.run([sys.executable, *map(str, SYNTHETIC), "--epochs", "2", "--out-dir", str(run), "--resume"],
                         cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300, check=False,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert_refused(out, f"cannot write {run / 'checkpoint.pt'}", f"checkpoint.pt of epoch 1 in {run} is intact")
    assert not list(run.glob("*.tmp"))
    assert snapshot(run)["checkpoint.pt"] == before["checkpoint.pt"]


# ---------------------------------------------------------------------------------------------------- killed workers


@pytest.mark.scripts
def test_a_killed_data_loader_worker_stops_the_run_in_one_line(tmp_path):
    """SIGKILL (as the out-of-memory killer sends it) to a DataLoader worker after the first checkpoint."""
    run = tmp_path / "run"
    argv = [*SYNTHETIC[:SYNTHETIC.index("--workers")], "--workers", "2", *TINY, "--data-path", "cpu", "--epochs", "30",
            "--eval-every", "0", "--out-dir", run]
    proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, env=script_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline, workers = time.time() + 240, []
        while not workers and proc.poll() is None and time.time() < deadline:
            workers = children(proc.pid) if (run / "checkpoint.pt").exists() else []
            time.sleep(0.02)
        assert workers, "no DataLoader worker seen"
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 4, err
    epoch = torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]
    line = one_line(err)
    assert re.fullmatch(rf"error: DataLoader worker \(pid(\(s\))? \d+\) (is killed by signal: Killed|exited "
                        rf"unexpectedly) \(fewer --workers need less memory\); checkpoint.pt of epoch {epoch} in "
                        rf"{run} is intact: continue with --resume --out-dir {run}", line), line
