"""Odd data and odd flags: an image folder's size decided by the folder, every PIL mode read at its own value range,
files that are not regular image files, link loops, decompression bombs, flags that are not finite, a hue jitter
out of range, a device the machine lacks. Each refusal: exit code 2, one line on stderr that names the file or the
flag and says what to do, and every file that existed before intact.

Fast tier (no marker): the checks in this process (common.parse, dataset_info, load_dataset, open_image, the
DataLoader). `scripts` tier (`pytest -m scripts`): simclr.py and the other method files from the command line.
"""

import dataclasses
import gc
import hashlib
import importlib
import io
import json
import math
import os
import random
import signal
import socket
import stat
import struct
import typing
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import common
from conftest import run_script

METHODS = ["simclr", "supcon", "moco", "byol", "simsiam", "instdisc", "paws", "jem", "dpll"]
TINY = ["--arch", "tiny", "--batch-size", "8", "--log-every", "0.5", "--probe-epochs", "1", "--workers", "0"]
NOT_REGULAR = "(not a regular file: a FIFO, socket, device or broken link): remove or replace it"


# ---------------------------------------------------------------------------------------------------- helpers


def image_folder(root: Path, sizes=None, classes=("a", "b", "c"), train: int = 6, test: int = 2) -> Path:
    """root/train/<class>/<i>.png and root/test/<class>/<i>.png: RGB noise, seeded; `sizes`: (width, height) of
    each training image by its path under root (others 16x16)."""
    rng, sizes = random.Random(0), sizes or {}
    for split, n in (("train", train), ("test", test)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = sizes.get(f"{split}/{c}/{i}.png", (16, 16))
                Image.frombytes("RGB", (w, h), rng.randbytes(w * h * 3)).save(root / split / c / f"{i}.png")
    return root


def folder_args(root: Path, **kwargs) -> common.Args:
    return common.Args(**{"dataset": "imagefolder", "data_dir": str(root), "arch": "tiny", "batch_size": 8,
                          "workers": 0, "device": "cpu", "data_path": "cpu", **kwargs})


def snapshot(path: Path) -> dict:
    """Every entry under `path`, links not followed: relative path -> sha256 of a regular file's bytes, a link's
    target, or the kind of anything else (a FIFO is never opened: that would wait for a writer)."""
    found = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            mode = os.lstat(p).st_mode
            found[os.path.relpath(p, path)] = (hashlib.sha256(Path(p).read_bytes()).hexdigest() if stat.S_ISREG(mode)
                                               else "-> " + os.readlink(p) if stat.S_ISLNK(mode) else stat.S_IFMT(mode))
    return found


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr[-4000:]}"
    return lines[0]


def refused_here(exit_info, capsys) -> str:
    """SystemExit(2) after one line on stderr; returns the line."""
    assert exit_info.value.code == 2
    return one_line(capsys.readouterr().err)


def refused(out, code: int = 2) -> str:
    assert out.returncode == code, f"exit code {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return one_line(out.stderr)


def png_header(path: Path, width: int, height: int):
    """A PNG that declares width x height pixels (and holds none): all PIL reads before its bomb check."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))


@pytest.fixture
def no_hang():
    """A test that would wait forever (a FIFO opened for reading) fails after 60 s instead."""
    def stop(*_):  # not an OSError (TimeoutError is one), which os.path.isdir and the like would swallow
        raise RuntimeError("still waiting after 60 s: a file that is not a regular one was opened, or a loop walked")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def quick_loader_shutdown(monkeypatch):
    """A DataLoader iterator that met an error waits for each worker up to 5 s when collected: 0.1 s here."""
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.1)
    yield
    gc.collect()


# ---------------------------------------------------------------------------------------------------- flags


def float_flags(module) -> list[str]:
    hints = typing.get_type_hints(module.Args)
    return [f.name for f in dataclasses.fields(module.Args) if hints[f.name] is float]


@pytest.mark.parametrize("method", METHODS)
def test_every_float_flag_of_every_method_refuses_nan_and_infinity(method, capsys):
    """Args.check on every float field (the flags' own check, which parse calls), then one flag through parse."""
    module = importlib.import_module(method)
    module.Args().check()  # the defaults pass: what is refused below is the one value
    names = float_flags(module)
    assert {"lr", "weight_decay", "warmup_epochs", "knn_t", "dist_timeout", "log_every"} <= set(names)
    for name in names:
        for value in (math.nan, math.inf, -math.inf):
            with pytest.raises(ValueError) as err:
                module.Args(**{name: value}).check()
            assert str(err.value) == f"--{name.replace('_', '-')} must be a finite number, got {value}"
    for value in ("nan", "NaN", "inf", "-inf", "1e999"):
        with pytest.raises(SystemExit) as exit_info:
            common.parse(module.Args, [f"--{names[-1].replace('_', '-')}={value}"])
        line = refused_here(exit_info, capsys)
        assert line.endswith(f": error: --{names[-1].replace('_', '-')} must be a finite number, got {float(value)}")


@pytest.mark.parametrize("device, cuda_devices, message", [
    ("mps", 0, "unknown --device 'mps' (choose from cpu)"),  # CUDA and the CPU only
    ("cuda", 0, "unknown --device 'cuda' (choose from cpu)"),  # what this machine has
    ("cuda:1", 1, "unknown --device 'cuda:1' (choose from cpu, cuda, cuda:0)"),
    ("cuda:0", 1, None), ("cuda:1", 2, None), ("cpu", 0, None)])
def test_device_this_machine_lacks_is_refused(monkeypatch, capsys, device, cuda_devices, message):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_devices > 0)
    if message is None:
        assert common.parse(common.Args, ["--device", device]).device == device
        return
    with pytest.raises(SystemExit) as exit_info:
        common.parse(common.Args, ["--device", device])
    assert refused_here(exit_info, capsys).endswith(f": error: {message}")


def jitter_views(method: str, s: float):
    """The method's views at --jitter-strength s, as its main builds them."""
    module, info = importlib.import_module(method), common.DATASETS["cifar10"]
    return module.simclr_augment(info, 32, s) if method == "simclr" else module.paws_views(info, 32, 2, s)


@pytest.mark.parametrize("method", ["simclr", "paws"])  # the methods with a --jitter-strength
@pytest.mark.parametrize("s", [0.0, 0.5, 2.0, 2.5, 2.5000001, 2.6, 10.0, -0.1])
def test_jitter_strength_is_refused_exactly_where_torchvision_refuses_the_hue(method, s, capsys):
    module = importlib.import_module(method)
    try:
        jitter_views(method, s)
        torchvision_takes_it = True
    except ValueError:  # torchvision: hue (0.2 s) out of [0, 0.5], or a negative jitter
        torchvision_takes_it = False
    if torchvision_takes_it:
        assert common.parse(module.Args, ["--jitter-strength", str(s)]).jitter_strength == s
        return
    with pytest.raises(SystemExit) as exit_info:
        common.parse(module.Args, [f"--jitter-strength={s}"])
    line = refused_here(exit_info, capsys)
    assert line.endswith(f": error: --jitter-strength must be in [0, 2.5] (hue 0.2s <= 0.5), got {s}"), line


# ---------------------------------------------------------------------------------------------------- PIL modes

RNG = np.random.default_rng(0)
U16 = RNG.integers(300, 65536, (5, 7)).astype(np.uint16)  # above 255 throughout: clipping would make it all white


def make_mode(mode: str) -> tuple[Image.Image, np.ndarray | None]:
    """An image of `mode` and the RGB [H, W, 3] it must read as (None: PIL's own conversion of that colour space)."""
    def grey(v):
        return np.repeat(np.asarray(v, dtype=np.uint8)[..., None], 3, axis=2)

    bands = RNG.integers(0, 256, (5, 7, 4)).astype(np.uint8)
    if mode == "1":
        bits = bands[..., 0] > 127
        return Image.fromarray(bits), grey(bits * 255)
    if mode in ("I;16", "I;16B", "I;16L"):
        raw = U16.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
        return Image.frombytes(mode, (7, 5), raw), grey(np.round(U16 / 65535 * 255))
    if mode == "I":
        values = RNG.integers(0, 2**31 - 1, (5, 7)).astype(np.int32)
        return Image.fromarray(values), grey(np.round(values / (2**31 - 1) * 255))
    if mode == "F":
        values = RNG.random((5, 7)).astype(np.float32)
        return Image.fromarray(values), grey(np.round(values.astype(np.float64) * 255))
    if mode in ("L", "LA"):
        return Image.fromarray(bands[..., :len(mode)].squeeze(-1) if mode == "L" else bands[..., :2], mode), \
            grey(bands[..., 0])
    if mode in ("RGB", "RGBA", "RGBX"):
        return Image.fromarray(bands[..., :len(mode)].copy(), mode) if mode != "RGBX" else \
            Image.fromarray(bands[..., :3]).convert("RGBX"), bands[..., :3]
    if mode == "P":  # with transparency: the colours are kept, alpha dropped (as torchvision's loader)
        palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
        img = Image.fromarray(bands[..., 0], "P")
        img.putpalette(palette.tobytes())
        img.info["transparency"] = bytes(RNG.integers(0, 256, 256).astype(np.uint8))  # an alpha per colour
        return img, palette[bands[..., 0]]
    return Image.frombytes(mode, (7, 5), bands[..., :len(Image.new(mode, (1, 1)).getbands())].tobytes()), None


def saved_modes() -> list[tuple[str, str]]:
    """(mode, format) for every PIL mode that PNG or TIFF can store."""
    found = []
    for mode in sorted(Image.MODES):
        for fmt in ("PNG", "TIFF"):
            try:
                Image.new(mode, (1, 1)).save(io.BytesIO(), fmt)
            except (OSError, ValueError, KeyError):
                continue
            found.append((mode, fmt))
    return found


@pytest.mark.parametrize("mode, fmt", saved_modes())
def test_every_pil_mode_reads_as_rgb_scaled_from_its_value_range(tmp_path, mode, fmt):
    img, expected = make_mode(mode)
    path = tmp_path / f"image.{fmt.lower()}"
    img.save(path, fmt)
    before = snapshot(tmp_path)
    with Image.open(path) as stored:
        stored_mode = stored.mode
        if expected is None:  # CMYK, YCbCr, LAB, PA: PIL's conversion of the colour space
            stored.info.pop("transparency", None)
            expected = np.asarray(stored.convert("RGB"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing on stderr either (PIL warns on a palette's dropped transparency)
        rgb = common.open_image(str(path))
    assert rgb.mode == "RGB" and rgb.size == (7, 5), (stored_mode, rgb.mode, rgb.size)
    assert np.array_equal(np.asarray(rgb), expected), (stored_mode, np.asarray(rgb)[0, :3], expected[0, :3])
    assert snapshot(tmp_path) == before


def test_sixteen_bit_images_are_no_longer_clipped_to_white(tmp_path):
    """The issue's case: a 16-bit PNG of mid-grey reads as mid-grey, not as 255."""
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    assert np.asarray(common.open_image(str(path))).tolist() == np.full((4, 4, 3), 128).tolist()


@pytest.mark.parametrize("values, mode, top", [
    (np.array([[0.5, 1.5]], np.float32), "F", "1.0"), (np.array([[-0.1, 0.5]], np.float32), "F", "1.0"),
    (np.array([[np.nan, 0.5]], np.float32), "F", "1.0"), (np.array([[np.inf, 0.5]], np.float32), "F", "1.0"),
    (np.array([[-5, 7]], np.int32), "I", str(2**31 - 1))])
def test_values_outside_the_mode_range_are_refused_as_a_broken_image(tmp_path, values, mode, top):
    path = tmp_path / "odd.tiff"
    Image.fromarray(values).save(path)
    before = snapshot(tmp_path)
    with pytest.raises(common.BadImage) as err:
        common.open_image(str(path))
    assert str(err.value) == f"cannot read the image {path} (mode {mode} with values outside [0, {top}]): remove or " \
                             f"replace it"
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------- image size


@pytest.mark.parametrize("stray", [(1, 1), (300, 300), (500, 224), (7, 40)])
def test_a_stray_image_does_not_decide_the_folder_size(tmp_path, capsys, stray):
    """The first file in sorted order (what decided the size before) is the stray one."""
    data = image_folder(tmp_path, sizes={"train/a/0.png": stray, "train/c/5.png": (33, 64)})
    args = folder_args(data)
    info, size = common.dataset_info(args)
    assert (info.size, size, args.image_size, info.num_classes) == (16, 16, 16, 3)
    out = capsys.readouterr().out
    assert f"{data / 'train'}: 3 classes; images of 16 px on the shorter side (16 of 18 sampled), trained at 16 px" \
           in out, out


@pytest.mark.parametrize("side, used", [(100, 224), (64, 64), (65, 224), (8, 8)])
def test_folder_size_is_the_common_side_and_the_given_image_size_wins(tmp_path, capsys, side, used):
    sizes = {f"train/{c}/{i}.png": (side, side + 3) for c in "abc" for i in range(6)}
    data = image_folder(tmp_path, sizes={**sizes, "train/b/0.png": (16, 16)})
    args = folder_args(data)
    assert common.dataset_info(args)[1] == used == args.image_size
    out = capsys.readouterr().out
    assert f"images of {side} px on the shorter side (17 of 18 sampled), trained at {used} px" in out, out
    args = folder_args(data, image_size=24)
    assert common.dataset_info(args)[1] == 24 == args.image_size
    assert "trained at 24 px" in capsys.readouterr().out


def test_large_folders_are_sampled_over_every_class(tmp_path, monkeypatch):
    """64 images at most, spread evenly over the folder (so over every class of a balanced one): the size costs
    header reads, not a pass over the folder."""
    data = image_folder(tmp_path, classes=[f"c{i:02d}" for i in range(20)], train=30, test=1)
    opened = []
    real = common.open_image
    monkeypatch.setattr(common, "open_image", lambda path, **kw: opened.append(path) or real(path, **kw))
    common.dataset_info(folder_args(data))
    assert len(opened) == 60 and len(set(opened)) == 60  # 600 images: every 10th
    assert {Path(p).parent.name for p in opened} == {f"c{i:02d}" for i in range(20)}
    spread = set(sorted(os.listdir(data / "train" / "c00"))[::10])  # 30 images: every 10th
    assert {Path(p).name for p in opened if Path(p).parent.name == "c00"} == spread


@pytest.mark.parametrize("dataset, size", [("digits", 8), ("cifar10", 32), ("mnist", 28)])
def test_image_size_of_a_named_dataset_is_recorded(dataset, size):
    args = common.Args(dataset=dataset)
    assert common.dataset_info(args)[1] == size == args.image_size


# ---------------------------------------------------------------------------------------------------- odd files


def make_odd_file(path: Path, kind: str):
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.close()
    elif kind == "broken_link":
        path.symlink_to(path.parent / "missing.png")
    elif kind == "link_to_fifo":
        os.mkfifo(path.parent / "pipe")
        path.symlink_to("pipe")
    elif kind == "link_loop":
        path.symlink_to(path.name)  # a link to itself


ODD = ["fifo", "socket", "broken_link", "link_to_fifo", "link_loop"]


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("kind", ODD)
def test_file_that_is_not_a_regular_one_is_refused_not_waited_on(tmp_path, capsys, no_hang, kind, split):
    """Refused where it would be opened: the training images' size (a header read) or the DataLoader's read."""
    data = image_folder(tmp_path / "data")
    path = data / split / "b" / "1.png"
    path.unlink()
    make_odd_file(path, kind)
    before = snapshot(data)
    args = folder_args(data)
    with pytest.raises(SystemExit) as exit_info:
        common.dataset_info(args)
        for train in (True, False):
            for _ in common.Batches(common.load_dataset(args, train, common.T.PILToTensor()), args, batch_size=4):
                pass
    assert refused_here(exit_info, capsys) == f"error: cannot read the image {path} {NOT_REGULAR}"
    assert snapshot(data) == before


def test_odd_file_without_an_image_extension_is_left_out(tmp_path, no_hang):
    data = image_folder(tmp_path)
    os.mkfifo(data / "train" / "a" / "pipe")
    args = folder_args(data)
    common.dataset_info(args)
    assert len(common.load_dataset(args, True)) == 18


def test_link_loops_count_every_image_once(tmp_path, no_hang):
    """Two links back to the class folder (a walk that follows them branches without end) and a sub-folder with a
    link back up: every real image once; a link to a folder elsewhere is followed, also once."""
    data, outside = image_folder(tmp_path / "data"), tmp_path / "outside"
    a = data / "train" / "a"
    (a / "loop1").symlink_to(".")
    (a / "loop2").symlink_to(".")
    (a / "sub").mkdir()
    Image.new("RGB", (16, 16)).save(a / "sub" / "x.png")
    (a / "sub" / "up").symlink_to("..")
    outside.mkdir()
    Image.new("RGB", (16, 16)).save(outside / "y.png")
    (a / "extra").symlink_to(outside)
    (a / "extra_again").symlink_to(outside)
    before = snapshot(data)
    dataset = common.load_dataset(folder_args(data), True)
    counts = [dataset.targets.count(c) for c in range(3)]
    assert counts == [6 + 1 + 1, 6, 6], counts  # a: its 6, sub/x.png, outside/y.png (through the first link)
    assert len({os.path.realpath(p) for p, _ in dataset.samples}) == len(dataset)
    assert snapshot(data) == before


def test_plain_folder_reads_as_torchvision_reads_it(tmp_path):
    """Same samples, same order as torchvision's ImageFolder, nested sub-folders included."""
    data = image_folder(tmp_path)
    (data / "train" / "b" / "nested" / "deeper").mkdir(parents=True)
    for name in ("nested/1.png", "nested/deeper/2.png", "nested/0.jpg"):
        Image.new("RGB", (16, 16)).save(data / "train" / "b" / name)
    (data / "train" / "c" / "notes.txt").write_text("not an image\n")
    ours = common.load_dataset(folder_args(data), True)
    theirs = torchvision.datasets.ImageFolder(str(data / "train"))
    assert ours.samples == theirs.samples and ours.classes == theirs.classes


# ---------------------------------------------------------------------------------------------------- bombs


def test_decompression_bomb_is_one_line_when_the_size_is_read(tmp_path, capsys):
    data = image_folder(tmp_path / "data")
    path = data / "train" / "b" / "2.png"
    png_header(path, 20000, 20000)
    before = snapshot(data)
    with pytest.raises(SystemExit) as exit_info:
        common.dataset_info(folder_args(data))
    line = refused_here(exit_info, capsys)
    assert line.startswith(f"error: cannot read the image {path} (Image size (400000000 pixels) exceeds limit"), line
    assert line.endswith("decompression bomb DOS attack.): remove or replace it"), line
    assert snapshot(data) == before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the workers cut short
@pytest.mark.parametrize("workers", [0, 2])
def test_decompression_bomb_in_the_data_loader_is_one_line(tmp_path, capsys, quick_loader_shutdown, workers):
    data = image_folder(tmp_path / "data")
    path = data / "test" / "c" / "1.png"
    png_header(path, 30000, 10000)
    args = folder_args(data, workers=workers)
    common.dataset_info(args)
    with pytest.raises(SystemExit) as exit_info:
        for _ in common.Batches(common.load_dataset(args, False, common.T.PILToTensor()), args, batch_size=2):
            pass
    line = refused_here(exit_info, capsys)
    assert line.startswith(f"error: cannot read the image {path} (Image size (300000000 pixels) exceeds limit"), line


# ---------------------------------------------------------------------------------------------------- scripts


def fake_run(path: Path) -> Path:
    """A run directory's files (their content does not matter: a refused start must not touch them)."""
    path.mkdir(parents=True)
    for name in ("args.json", "metrics.jsonl", "checkpoint.pt", "results.json"):
        (path / name).write_bytes(os.urandom(64))
    return path


@pytest.mark.scripts
@pytest.mark.parametrize("argv, message", [
    (["simclr.py", "--warmup-epochs", "nan"], "--warmup-epochs must be a finite number, got nan"),
    (["moco.py", "--lr=inf"], "--lr must be a finite number, got inf"),
    (["jem.py", "--sigma=-inf"], "--sigma must be a finite number, got -inf"),
    (["dpll.py", "--q", "NaN"], "--q must be a finite number, got nan"),
    (["simclr.py", "--jitter-strength", "3"], "--jitter-strength must be in [0, 2.5] (hue 0.2s <= 0.5), got 3.0"),
    (["paws.py", "--jitter-strength", "2.6"], "--jitter-strength must be in [0, 2.5] (hue 0.2s <= 0.5), got 2.6")])
@pytest.mark.parametrize("resume", [False, True])
def test_bad_flag_is_one_line_and_the_run_directory_is_intact(tmp_path, argv, message, resume):
    run = fake_run(tmp_path / "run")
    before = snapshot(run)
    out = run_script(*argv, "--dataset", "digits", "--out-dir", run, *(["--resume"] if resume else []), timeout=120)
    assert refused(out) == f"{argv[0]}: error: {message}"
    assert snapshot(run) == before


@pytest.mark.scripts
def test_device_mps_is_one_line(tmp_path):
    run = fake_run(tmp_path / "run")
    before = snapshot(run)
    out = run_script("simclr.py", "--dataset", "digits", "--device", "mps", "--out-dir", run, "--resume", timeout=120)
    assert refused(out).startswith("simclr.py: error: unknown --device 'mps' (choose from cpu")  # and the CUDA devices
    assert snapshot(run) == before


def odd_data(root: Path, fault: str) -> Path:
    """An image folder with one fault; returns the faulty file's path."""
    data = image_folder(root)
    path = data / "train" / "b" / "4.png"
    if fault == "bomb":
        png_header(path, 20000, 20000)
    elif fault == "float_out_of_range":
        path.unlink()
        path = path.with_suffix(".tiff")
        Image.fromarray(np.full((16, 16), 3.0, np.float32)).save(path)
    else:
        path.unlink()
        make_odd_file(path, fault)
    return path


@pytest.mark.scripts
@pytest.mark.parametrize("fault", ["fifo", "socket", "broken_link", "bomb", "float_out_of_range"])
@pytest.mark.parametrize("data_path", ["cpu", "device"])
def test_odd_image_stops_the_run_in_one_line(tmp_path, fault, data_path):
    data, run = tmp_path / "data", tmp_path / "run"
    path = odd_data(data, fault)
    before = snapshot(data)
    out = run_script("simclr.py", "--dataset", "imagefolder", "--data-dir", data, *TINY, "--epochs", "1",
                     "--data-path", data_path, "--out-dir", run, timeout=200)
    line = refused(out)
    assert line.startswith(f"error: cannot read the image {path} ("), line
    assert line.endswith("): remove or replace it"), line
    assert snapshot(data) == before
    assert not run.exists() or set(os.listdir(run)) <= {"args.json", ".lock"}, sorted(os.listdir(run))


@pytest.mark.scripts
def test_mixed_modes_and_a_stray_size_train_and_args_json_records_the_size(tmp_path):
    """16-bit PNG, float and 32-bit TIFF, palette with transparency, CMYK, grey and alpha images and one 300-px stray
    first in sorted order: the run trains at the folder's 16 px and args.json says so."""
    data, run = image_folder(tmp_path / "data", sizes={"train/a/0.png": (300, 300)}), tmp_path / "run"
    odd = {"train/a/1": make_mode("I;16")[0], "train/b/1": make_mode("F")[0], "train/c/1": make_mode("I")[0],
           "train/a/2": make_mode("P")[0], "train/b/2": make_mode("CMYK")[0], "train/c/2": make_mode("LA")[0],
           "test/a/1": make_mode("I;16B")[0]}
    for name, img in odd.items():
        (data / f"{name}.png").unlink()
        img.resize((16, 16), Image.NEAREST).save(data / f"{name}.tiff")  # (no overshoot out of [0, 1])
    before = snapshot(data)
    out = run_script("simclr.py", "--dataset", "imagefolder", "--data-dir", data, *TINY, "--epochs", "1",
                     "--data-path", "cpu", "--out-dir", run, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "images of 16 px on the shorter side (17 of 18 sampled), trained at 16 px" in out.stdout, out.stdout
    assert json.loads((run / "args.json").read_text())["image_size"] == 16
    assert math.isfinite(json.loads((run / "results.json").read_text())["knn_top1"])
    assert snapshot(data) == before
