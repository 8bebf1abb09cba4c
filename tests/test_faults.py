"""Faults and bad input: the documented exit code, one line on stderr that names the file, the classes or the lost
process and says what to do, and nothing already written lost (every file that existed before is byte-identical
afterwards; a run refused before it makes its --out-dir does not make it).

Fast tier (no marker): the checks in this process (common.dataset_info, load_dataset, open_image, the DataLoader's
workers, device_data.train_data, RunDir). `scripts` tier (`pytest -m scripts`): simclr.py from the command line
(image folders with broken files, a killed run, a stale checkpoint.pt.tmp, a checkpoint of other flags) and two
torchrun "nodes" on loopback, one of which dies (the other node's, or the one hosting the rendezvous) or freezes.
"""

import contextlib
import gc
import hashlib
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
    assert common.dataset_info(args)[0].num_classes == 4  # the same classes in both splits: no complaint yet
    with pytest.raises(SystemExit) as exit_info:
        common.load_dataset(args, True)
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
        for _ in common.train_loader(train_set, args, 0):
            pass
    line = assert_refused_here(exit_info, capsys, path, "remove or replace it")
    assert line.startswith(f"error: cannot read the image {path}"), line


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the workers cut short
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("damage", ["truncated", "zero_bytes", "broken_header"])
def test_broken_image_on_the_device_path_is_one_line(tmp_path, capsys, quick_loader_shutdown, damage, workers):
    """device_data decodes the whole training set up front, the first image on its own (for the size)."""
    import device_data
    import simclr

    how, name = DAMAGES[damage]
    path = image_folder(tmp_path) / name
    how(path)
    args = folder_args(tmp_path, data_path="device", workers=workers)
    info = common.DATASETS["imagefolder"]._replace(num_classes=3, size=16)
    views = common.MultiView([simclr.simclr_augment(info, 16) for _ in range(2)])
    train_set = common.load_dataset(args, True, views)
    with pytest.raises(SystemExit) as exit_info:
        device_data.train_data(train_set, views, args)
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
    assert again.fresh and again.resume(None, None) == {"epoch": 0}
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


def lost_peer_line(stderr: str, run: Path, start: str = "error: process 0 lost process 1", code: bool = True) -> str:
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
