"""Plumbing shared by every method file: CLI, distributed, backbones, data, optimisation, evaluation, run directory
(its files, resume, progress). Nothing here is a method: a method file keeps its views, heads, losses and training
step, and runs when copied with this file into an empty folder (device_data.py, the GPU data path, is optional).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import ctypes
import dataclasses
import datetime
import fcntl
import functools
import json
import math
import os
import random
import signal
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image


# -------- CLI ---------------------------------------------------------------------------------------------------------

def fail(message: str, every_rank: bool = False, prefix: str = "error: ", code: int = 2):
    """One line on stderr (rank 0's, unless `every_rank`), then SystemExit(code) (2: bad input; 3: diverged)."""
    if every_rank or os.environ.get("RANK", "0") == "0":
        print(f"{prefix}{message}", file=sys.stderr, flush=True)
    error = SystemExit(code)
    error.message = message
    raise error


def flag(default, help: str, valid=None):
    """A field of Args: its default, its --help, and the values check() takes: a tuple of choices, "positive",
    ">= a" or "in [a, b]" ("(" or ")": that end excluded; words after it: why). Declared again, it keeps its rule."""
    return dataclasses.field(default=default, metadata={"help": help, "valid": valid})


def _rules(cls) -> dict:  # each field's rule of flag(), from the last class that gives one
    return {f.name: f.metadata["valid"] for k in reversed(cls.__mro__[:-1]) for f in dataclasses.fields(k)
            if f.metadata["valid"] is not None}


def _within(value, rule: str) -> bool:
    words = rule.replace("positive", "> 0").split()  # "> a", ">= a" or "in [a, b)": a bracket includes its end
    if words[0] != "in":
        return value > float(words[1]) if words[0] == ">" else value >= float(words[1])
    a, b = float(words[1][1:-1]), float(words[2][:-1])
    return (a <= value if words[1][0] == "[" else a < value) and (value <= b if words[2][-1] == "]" else value < b)


@dataclass
class Args:
    """Flags every method shares. A method subclasses this, adds its own fields and overrides defaults."""

    dataset: str = flag("cifar10", "the data (imagefolder: train/ and val/ or test/ folders of class folders)", (
        "cifar10", "cifar100", "stl10", "svhn", "mnist", "fashionmnist", "kmnist", "imagefolder", "digits"))
    data_dir: str = flag("data", "where the dataset lives (torchvision layout, or train/ and val/ or test/ folders)")
    download: bool = flag(False, "download a torchvision dataset into --data-dir when it is missing")
    image_size: int = flag(0, "side of the training crops in pixels (0: the dataset's own size)", ">= 0")
    subset: int = flag(0, "train on a class-balanced subset of this many images (0: the whole training split)", ">= 0")
    eval_subset: int = flag(0, "evaluate on a class-balanced subset of this many test images (0: all)", ">= 0")
    workers: int = flag(4, "data-loading worker processes per training process", ">= 0")
    data_path: str = flag("auto", "where views are made (auto: on the device with CUDA)", ("auto", "device", "cpu"))
    arch: str = flag("resnet18", "backbone", ("resnet18", "resnet34", "resnet50", "wrn28_2", "wrn28_10", "wrn34_10",
                                              "tiny"))
    epochs: int = flag(100, "training epochs", "positive")
    batch_size: int = flag(256, "global batch size, split evenly over the processes", "positive")
    lr: float = flag(0.1, "base learning rate", "positive")
    weight_decay: float = flag(1e-4, "L2 weight decay (not applied to biases and normalisation parameters)", ">= 0")
    warmup_epochs: float = flag(10, "linear warm-up from 0 before the cosine decay", ">= 0")
    eval_every: int = flag(10, "k-NN monitor every this many epochs (0: only before and after training)", ">= 0")
    knn_k: int = flag(200, "neighbours of the weighted k-NN monitor (InstDisc)", "positive")
    knn_t: float = flag(0.1, "temperature of the weighted k-NN monitor", "positive")
    probe_epochs: int = flag(100, "epochs of the linear probe on frozen features after training (0: skip it)", ">= 0")
    linear_epochs: int = flag(0, "epochs of the papers' linear protocol on padded, flipped crops (0: off)", ">= 0")
    linear_lr: float = flag(0.1, "SGD rate of the linear protocol (momentum 0.9, cosine, not batch-scaled)", "positive")
    linear_batch_size: int = flag(256, "global batch of the linear protocol", "positive")
    out_dir: str = flag("", "run directory (default: runs/<method>-<date>-<time>)")
    resume: bool = flag(False, "continue the run in --out-dir from its checkpoint.pt; a flag that decides its training "
                        "must keep its value, but --epochs may grow and --lr be lowered; these may change: {free}")
    save_every: int = flag(1, "write checkpoint.pt every this many epochs (and always after the last)", "positive")
    seed: int = flag(0, "seed of every random draw (data order, augmentation, initialisation)")
    device: str = flag("", "cuda, cuda:N or cpu (default: cuda when available, else cpu)")
    threads: int = flag(0, "CPU threads per process (default 1 on a CPU: faster, robust to load; 4 with a GPU)", ">= 0")
    amp: bool = flag(False, "bfloat16 autocast for the networks (losses stay float32; CUDA convolutions use TF32)")
    compile: bool = flag(False, "torch.compile the model")
    channels_last: bool = flag(False, "channels-last memory format for the convolutions")
    sync_bn: bool = flag(False, "BatchNorm statistics over the global batch (all processes)")
    deterministic: bool = flag(False, "deterministic CUDA kernels: a resumed GPU run repeats an uninterrupted one")
    dist_timeout: float = flag(300.0, "seconds to wait for a dead or frozen process, then stop the run", "positive")
    log_every: float = flag(10.0, "seconds between progress lines", "positive")
    # what --resume lets change: where the data lives and how it is loaded, evaluation, saving, logging, the machine
    FREE_ON_RESUME = ("download", "data_dir", "eval_subset", "workers", "data_path", "eval_every", "knn_k", "linear_lr",
                      "probe_epochs", "linear_epochs", "linear_batch_size", "knn_t", "resume", "out_dir", "save_every",
                      "log_every", "compile", "device", "deterministic", "dist_timeout", "threads", "channels_last")

    def check(self, world_size: int = 1):
        """Raise ValueError, one line, for a value its flag() refuses, a float not finite, or a rule across flags."""
        cuda = tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
        rules = _rules(type(self)) | {"device": ("", "cpu") + ("cuda",) * bool(cuda) + cuda}  # the machine's devices
        batches = ["batch_size"] + ["linear_batch_size"] * bool(self.linear_epochs)  # the protocol's only when run
        for name, value in vars(self).items():
            option, rule = "--" + name.replace("_", "-"), rules.get(name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{option} must be a finite number, got {value}")
            if isinstance(rule, tuple) and value not in rule:
                raise ValueError(f"unknown {option} {value!r} (choose from {', '.join(filter(None, rule))})")
            if isinstance(rule, str) and not _within(value, rule):
                raise ValueError(f"{option} must be {rule}, got {value}")
            if name in batches and value % world_size:
                raise ValueError(f"{option} {value} does not divide evenly over {world_size} processes")
        if self.resume and not self.out_dir:
            raise ValueError("--resume needs --out-dir, the directory of the run to continue")


def parse(cls, argv: list[str] | None = None):
    """The dataclass `cls` as flags (`batch_size` -> `--batch-size`; help and choices from flag()), parsed, checked."""
    parser = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: fail(message, prefix=f"{parser.prog}: error: ")  # one line, no usage, exit 2
    rules = _rules(cls)
    free = " ".join("--" + name.replace("_", "-") for name in cls.FREE_ON_RESUME)  # in --resume's help
    for f in dataclasses.fields(cls):
        text = f.metadata["help"].replace("{free}", free)
        text += "" if "(default" in text else f" (default: {f.default})"
        choices = "{" + ",".join(filter(None, rules[f.name])) + "}" if isinstance(rules.get(f.name), tuple) else None
        kind = typing.get_type_hints(cls)[f.name]
        how = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        parser.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=text, metavar=choices, **how)
    args = cls(**vars(parser.parse_args(argv)))
    try:
        args.check(world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as err:
        parser.error(str(err))
    return args


# -------- Distributed: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; one process without it --------------------------


def setup_distributed(args: Args):
    """Join torchrun's group (NCCL on CUDA, gloo on the CPU) or run alone; set the device, CPU threads, allocator, seed
    (TF32 as PyTorch's default: on for convolutions, off for matmuls)."""
    cuda = args.device.startswith("cuda") or not args.device and torch.cuda.is_available()
    args.device = args.device if ":" in args.device else f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(args.device)
        torch.backends.cudnn.benchmark = not args.deterministic
    torch.set_num_threads(args.threads or (4 if cuda else 1))
    with contextlib.suppress(OSError, AttributeError):  # glibc only: keep freed memory for reuse, rather than unmap
        libc = ctypes.CDLL("libc.so.6")  # each large tensor at free and fault it in again (README, "On a CPU")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no allocation served by mmap
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: keep up to 2 GiB of freed memory in the heap
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch_dist.is_initialized():  # RANK etc. from torchrun
        torch_dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.dist_timeout),
                                      device_id=torch.device(args.device) if cuda else None)
    sys.excepthook = _uncaught  # a peer silent for --dist-timeout seconds raises an error, as one that died
    seed_everything(args.seed + world()[0])


def cleanup_distributed():
    if torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def world() -> tuple[int, int]:
    return (torch_dist.get_rank(), torch_dist.get_world_size()) if torch_dist.is_initialized() else (0, 1)


def print0(*args, **kwargs):
    if world()[0] == 0:
        print(*args, **kwargs, flush=True)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient of all rows, then keeps this process's rows: every
    process's loss reads all rows (this process's rows of its own gradient alone is a known bug)."""

    forward = staticmethod(lambda ctx, x: gather_no_grad(x))

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # all_reduce works in place
        torch_dist.all_reduce(grad)
        return grad.chunk(world()[1])[world()[0]]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each of W processes -> [W*n, ...] in rank order; under DDP, the gradient of the whole batch."""
    return x if world()[1] == 1 else _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each process -> [W*n, ...] in rank order, without gradient."""
    if world()[1] == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world()[1])]
    torch_dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of `x` over processes, without gradient."""
    return gather_no_grad(x.detach()[None]).mean(0)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch (--sync-bn), NCCL or gloo (torch's SyncBatchNorm: GPUs only, a host wait in
    each layer): the processes' per-channel sums of x and x^2 and counts, summed with gradient. Momentum set."""

    _check_input_dim = staticmethod(lambda x: None)  # any of BatchNorm1d, 2d and 3d's inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world()[1] > 1):
            return super().forward(x)
        dims, shape, c, xf = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2), x.shape[1], x.float()
        local = torch.cat([xf.sum(dims), (xf * xf).sum(dims), xf.new_full((1,), x.numel() / c)])  # [2C + 1]
        total = gather_with_grad(local[None]).sum(0)  # every process's loss depends on the sum: so does its gradient
        n, mean = total[-1], total[:c] / total[-1]  # [C]
        var = (total[c:2 * c] / n - mean * mean).clamp_min(0)  # [C] biased, as normalisation uses
        self.num_batches_tracked += 1
        self.running_mean.lerp_(mean.detach(), self.momentum)
        self.running_var.lerp_((var * n / (n - 1).clamp_min(1)).detach(), self.momentum)  # unbiased, as BatchNorm keeps
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return (y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y).to(x.dtype)


def distribute(model: nn.Module, args: Args) -> nn.Module:
    """The model as trained: DDP on several processes (--sync-bn: each BatchNorm a GlobalBatchNorm), --compile."""
    if world()[1] > 1:
        for m in model.modules() if args.sync_bn else []:
            if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
                m.__class__ = GlobalBatchNorm
        model = nn.parallel.DistributedDataParallel(model, device_ids=[args.device] if "cuda" in args.device else None)
    return torch.compile(model) if args.compile else model


def replicas_agree(state_dict: dict) -> bool:
    """Whether every process holds the same weights (a sum per tensor), BatchNorm's running statistics aside."""
    sums = [t.double().sum() for k, t in state_dict.items() if t.is_floating_point() and "running_" not in k]
    rows = gather_no_grad(torch.stack(sums or [torch.zeros((), dtype=torch.float64)])[None])  # [W, T]
    return torch.allclose(rows, rows[:1].expand_as(rows), rtol=1e-5, atol=1e-6)


def unwrap(net: nn.Module) -> nn.Module:
    net = getattr(net, "_orig_mod", net)
    return getattr(net, "module", net)


def _uncaught(kind, error, traceback):
    """sys.excepthook: a run stopped from outside ends in one line saying what is kept and how to continue: Ctrl-C (exit
    code 130), a killed DataLoader worker or a lost peer process (4). Anything else is a bug: its traceback."""
    run, (rank, size) = RunDir.current, world()
    if isinstance(error, KeyboardInterrupt):
        what, code = "interrupted", 130
    elif isinstance(error, RuntimeError) and str(error).startswith("DataLoader worker"):  # killed: out of memory?
        what, code = f"{str(error).split('.')[0]} (fewer --workers need less memory)", 4
    elif size > 1 and (isinstance(error, torch_dist.DistError) or isinstance(error, RuntimeError) and any(
            word in str(error) for word in ("gloo", "Connection", "peer", "timeout", "Timed out"))):  # gloo's: no type
        what, code = f"process {rank} lost a peer process (it died, or was silent for --dist-timeout seconds)", 4
    else:
        return sys.__excepthook__(kind, error, traceback)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun stops a node that lost the rendezvous host: line first
    if rank == 0 or code == 4:  # Ctrl-C reaches every process: rank 0 speaks for all
        again = f"--resume --out-dir {run.path}{' on every node' if size > 1 else ''}" if run else "the same command"
        print(f"error: {what}; {run.kept() if run else 'nothing was written yet'}: continue with {again}",
              file=sys.stderr, flush=True)
    os._exit(code)  # now: the normal exit's teardown (process group, DataLoader workers) would wait for the lost ones


# -------- Backbones: each maps images [B, C, H, W] to features [B, out_dim], with .out_dim set ------------------------

class _WideBlock(nn.Module):
    """Pre-activation wide residual block: act(norm(x)) -> conv3x3 -> act(norm) -> conv3x3, + shortcut (a 1x1 conv
    where the block widens, and strides; else the identity). plcr (DPLL's official network): stride in the first conv,
    no biases, the 1x1 conv takes act(norm(x)); else suncet (PAWS's, JEM's): stride in the second, biases, x itself."""

    def __init__(self, c_in, c_out, stride, act, plcr: bool):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride if plcr else 1, 1, bias=not plcr)
        self.norm2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1 if plcr else stride, 1, bias=not plcr)
        self.act = act
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=not plcr) if c_in != c_out else nn.Identity()
        self.preact_shortcut = plcr and c_in != c_out

    def forward(self, x):
        pre = self.act(self.norm1(x))
        return self.conv2(self.act(self.norm2(self.conv1(pre)))) + self.shortcut(pre if self.preact_shortcut else x)


def build_backbone(arch: str, in_channels=3, image_size=32, act="relu", zero_init_residual=False, style="plcr"):
    """Backbone by name. resnet<depth>: torchvision's without classifier, with the CIFAR stem (3x3 conv, stride 1, no
    max-pool: SimCLR's CIFAR-10) for images of 64 px or less. wrn<depth>_<widen>: the Wide-ResNet (Zagoruyko &
    Komodakis, 2016) of PAWS, DPLL and JEM (act 'leaky': JEM's); style 'plcr': Kaiming fan-out initialisation, or
    'suncet': PyTorch's, with the final BatchNorm's momentum 0.99 (statistics of almost the last batch alone)."""
    if arch.startswith("wrn"):
        depth, widen = (int(v) for v in arch[3:].split("_"))
        w = [16, 16 * widen, 32 * widen, 64 * widen]
        activation = nn.LeakyReLU(0.2) if act == "leaky" else nn.ReLU(inplace=True)
        blocks = [_WideBlock(w[g + 1] if i else w[g], w[g + 1], 1 if i or g == 0 else 2, activation, style == "plcr")
                  for g in range(3) for i in range((depth - 4) // 6)]
        net = nn.Sequential(nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=style != "plcr"), *blocks, nn.BatchNorm2d(w[3]),
                            activation, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        net[-4].momentum = 0.1 if style == "plcr" else 0.99  # the final BatchNorm's: PyTorch's default, or suncet's
        for conv in [m for m in net.modules() if isinstance(m, nn.Conv2d) and style == "plcr"]:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        net.out_dim = w[3]
        return net
    if arch.startswith("resnet"):
        net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
        cifar = image_size <= 64
        net.conv1 = nn.Conv2d(in_channels, 64, 3 if cifar else 7, 1 if cifar else 2, 1 if cifar else 3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity() if cifar else net.maxpool
        net.out_dim, net.fc = net.fc.in_features, nn.Identity()
        return net
    net = nn.Sequential(  # tiny: three conv-BN-ReLU layers and global pooling, for the tests and the quick start
        nn.Conv2d(in_channels, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        nn.Conv2d(64, 128, 3, 2, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.out_dim = 128
    return net


def prepare_model(model: nn.Module, args: Args) -> nn.Module:
    return model.to(args.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)


def autocast(args: Args):  # bfloat16 with --amp, a no-op context otherwise (losses cast their inputs to float32)
    return torch.autocast(torch.device(args.device or "cpu").type, dtype=torch.bfloat16, enabled=args.amp)


# -------- Data --------------------------------------------------------------------------------------------------------

DataInfo = collections.namedtuple("DataInfo", "num_classes channels size mean std")  # size: the images' side in px
DATASETS = {
    "cifar10": DataInfo(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DataInfo(100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": DataInfo(10, 3, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "svhn": DataInfo(10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "mnist": DataInfo(10, 1, 28, (0.1307,), (0.3081,)),
    "fashionmnist": DataInfo(10, 1, 28, (0.2860,), (0.3530,)),
    "kmnist": DataInfo(10, 1, 28, (0.1918,), (0.3483,)),
    "imagefolder": DataInfo(0, 3, 0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's; classes, size read
    "digits": DataInfo(10, 1, 8, (0.3050,), (0.3770,)),  # scikit-learn's bundled 8x8 digits, offline
}


class ImageTensorDataset(torch.utils.data.Dataset):
    """uint8 images [N, H, W, C] and labels, served as PIL images like torchvision's datasets."""

    def __init__(self, images: torch.Tensor, targets: list[int], transform=None):
        self.images, self.targets, self.transform = images, list(targets), transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i].squeeze(-1).numpy())  # mode L for one channel, RGB for three
        return (self.transform(img) if self.transform else img), self.targets[i]


class BadImage(OSError):
    """An image file that cannot be read."""


def open_image(path: str, header_only: bool = False) -> Image.Image:
    """An image folder's file as RGB (ImageFolder's loader; `header_only`: its width, height), or BadImage naming it.
    8-bit modes by PIL's conversion (alpha dropped, as torchvision's); others scaled from their range (floats' 0..1)."""
    try:
        if not os.path.isfile(path):  # (opening a FIFO would wait for a writer)
            raise OSError("not a regular file: a FIFO, socket, device or broken link")
        with Image.open(path) as img:
            if header_only:
                return img.size
            x = np.asarray(img)
            if x.dtype.itemsize > 1:
                top = np.iinfo(x.dtype).max if x.dtype.kind in "iu" else 1.0
                if not 0 <= x.min() <= x.max() <= top:  # (NaN fails too)
                    raise ValueError(f"mode {img.mode} with values outside [0, {top}]")
                img = Image.fromarray(np.round(x * (255 / top)).astype(np.uint8))
            img.info.pop("transparency", None)  # (PIL warns where a palette's transparency is dropped)
            return img.convert("RGB")
    except Exception as err:  # empty, truncated, not an image, a broken header, a decompression bomb
        raise BadImage(f"cannot read the image {path} ({err}): remove or replace it") from None


class ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's, its walk reading each real folder once (a link loop would count its images again and again)."""

    @staticmethod
    def make_dataset(directory, class_to_idx: dict, *args, **kwargs) -> list[tuple[str, int]]:
        samples = []
        for c, label in class_to_idx.items():
            seen, found = set(), []
            for root, dirs, names in os.walk(os.path.join(directory, c), followlinks=True):
                new = os.path.realpath(root) not in seen
                seen.add(os.path.realpath(root))
                dirs[:] = sorted(dirs) if new else []  # (of two links to one folder, the first is followed)
                found += [(root, n) for n in names if new and torchvision.datasets.folder.is_image_file(n)]
            if not found:  # (as torchvision's)
                raise FileNotFoundError(f"no image in the class folder {os.path.join(directory, c)}")
            samples += [(os.path.join(root, n), label) for root, n in sorted(found)]
        return samples


def dataset_info(args: Args) -> tuple[DataInfo, int]:
    """The dataset's facts and image size, set in args.image_size. An image folder's: its splits' classes must agree (a
    label is a class's place); its size, the commonest shorter side of 64 images spread over it (not a stray one's)."""
    info = DATASETS[args.dataset]
    if args.dataset == "imagefolder":
        train, test = load_dataset(args, True), load_dataset(args, False)
        if train.classes != test.classes:
            only = [f"only in {Path(a.root).name}/: {', '.join(sorted(set(a.classes) - set(b.classes))[:5])}"
                    for a, b in ((train, test), (test, train)) if set(a.classes) - set(b.classes)]
            fail(f"the class folders of {train.root} and {test.root} differ ({'; '.join(only)}): give both splits the "
                 f"same classes, or each label would name another class in each")
        try:
            sides = collections.Counter(min(open_image(path, header_only=True))
                                        for path, _ in train.samples[::math.ceil(len(train) / 64)])
        except BadImage as err:
            fail(str(err))
        (side, count), = sides.most_common(1)
        info = info._replace(num_classes=len(train.classes), size=side if side <= 64 else 224)  # large: ImageNet's
        print0(f"{train.root}: {len(train.classes)} classes; images of {side} px on the shorter side ({count} of "
               f"{sides.total()} sampled), trained at {args.image_size or info.size} px")
    args.image_size = args.image_size or info.size
    return info, args.image_size


def load_dataset(args: Args, train: bool, transform=None):
    """The training or test split of --dataset, with `.targets`; when it is missing, one line with the fix."""
    name, root = args.dataset, Path(args.data_dir)
    if name == "digits":  # scikit-learn's 1,797 8x8 digits (values 0..16), split 80/20 stratified with a fixed seed
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        data = load_digits()
        keep = train_test_split(range(len(data.images)), test_size=0.2, random_state=0, stratify=data.target)[1 - train]
        images = torch.from_numpy(data.images[keep]).mul(255.0 / 16.0).round().to(torch.uint8)[..., None]
        return ImageTensorDataset(images, data.target[keep].tolist(), transform=transform)
    kwargs = {"split": "train" if train else "test"} if name in ("svhn", "stl10") else {"train": train}
    try:
        if name == "imagefolder":
            split = "train" if train else "val" if (root / "val").is_dir() else "test"
            return ImageFolder(str(root / split), transform=transform, loader=open_image)
        cls = next(getattr(torchvision.datasets, c) for c in dir(torchvision.datasets) if c.lower() == name)
        ds = cls(str(root), download=args.download, transform=transform, **kwargs)
    except (RuntimeError, OSError) as err:  # no such folder, no class folder, an empty one; "Dataset not found"
        if name == "imagefolder":
            fail(f"--dataset imagefolder: {err} (--data-dir needs train/ and val/ or test/, one sub-folder of images "
                 f"per class in each; an empty one: add images to that class folder or remove it)")
        fix = f"the download failed: {err}; copy it there by hand" if args.download else "pass --download to fetch it"
        fail(f"{name} not found or incomplete in --data-dir {root} ({fix}, or point --data-dir at a copy)")
    ds.targets = [int(v) for v in getattr(ds, "targets", getattr(ds, "labels", None))]  # SVHN, STL-10: labels
    return ds


def balanced_subset(targets, n: int, seed: int = 0) -> list[int]:
    """Indices of `n` samples, as many from each class as can be (round-robin), drawn with a fixed seed."""
    targets = torch.as_tensor(list(targets))
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    order = order[torch.sort(targets[order], stable=True).indices]  # by class, in the seeded order within each
    place = torch.arange(len(order)) - torch.searchsorted(targets[order], targets[order])  # within its class
    return sorted(order[torch.sort(place, stable=True).indices[:n]].tolist())


class Subset(torch.utils.data.Subset):
    def __init__(self, dataset, indices):
        super().__init__(dataset, indices)
        self.targets = [dataset.targets[i] for i in indices]


class WithIndex(torch.utils.data.Dataset):
    """(x, y, index): the sample's position is its memory-bank row or per-sample target."""

    def __init__(self, dataset):
        self.dataset, self.targets = dataset, dataset.targets

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (*self.dataset[i], i)


def training_and_eval_sets(args: Args, train_transform, eval_transform):
    """(train set with the method's views, train set for the k-NN memory, test set), with --subset applied."""
    train, test = load_dataset(args, True, train_transform), load_dataset(args, False, eval_transform)
    memory = copy.copy(train)  # the same images in the evaluation view
    memory.transform = eval_transform
    if args.subset:
        keep = balanced_subset(train.targets, args.subset, seed=0)
        train, memory = Subset(train, keep), Subset(memory, keep)
    if args.eval_subset:
        test = Subset(test, balanced_subset(test.targets, args.eval_subset, seed=0))
    if len(train) < args.batch_size:
        fail(f"--batch-size {args.batch_size} is larger than the training set ({len(train)} images)")
    return train, memory, test


def normalize(info: DataInfo):
    return T.Compose([T.ToTensor(), T.Normalize(info.mean, info.std)])


def eval_transform(info: DataInfo, size: int):
    """The evaluation view: resized (large images: the centre 224 of 256)."""
    return T.Compose([T.Resize(round(size * 256 / 224) if size > 64 else size), T.CenterCrop(size), normalize(info)])


class MultiView(list):
    """A list of transforms, one a view: called on an image, its views."""

    def __call__(self, img):
        return [t(img) for t in self]


def epoch_seed(seed: int, epoch: int, rank: int, salt: int = 0) -> int:
    """A process's epoch's seed (a resumed run draws what an uninterrupted one would); salt 1: a second loader's."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2**31) + salt * 2**31  # (salt: bit 31, in a CPU generator's 32)


class Batches(torch.utils.data.DataLoader):
    """A DataLoader (pinned for a GPU, its workers seeded by seed, epoch, rank, salt); a bad image: one line, exit 2."""

    def __init__(self, dataset, args: Args, epoch: int = 0, salt: int = 0, **kwargs):
        generator = torch.Generator().manual_seed(epoch_seed(args.seed, epoch, world()[0], salt))
        super().__init__(dataset, **{"num_workers": args.workers, "generator": generator,
                                     "pin_memory": "cuda" in args.device, **kwargs})
        self.epoch = epoch

    def __iter__(self):
        try:
            yield from super().__iter__()
        except BadImage as err:  # a worker's comes with its traceback: "... common.BadImage: <the message>"
            fail(str(err).strip().splitlines()[-1].split("BadImage: ", 1)[-1], every_rank=True)


def to_device(x, args: Args):
    """A tensor or a list of views on args.device, without blocking the host (the batches come pinned)."""
    if isinstance(x, (list, tuple)):
        return [to_device(v, args) for v in x]
    x = x.to(args.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last and x.dim() == 4 else x


class TrainData:
    """The training set's batches, `loader(epoch)`: from the CPU DataLoader or, by --data-path, from device_data.py."""

    def __init__(self, train_set, views, args: Args):
        self.train_set, self.args, self.steps, self.device = train_set, args, len(train_set) // args.batch_size, None
        if views is not None and (args.data_path == "device" or (args.data_path == "auto" and "cuda" in args.device)):
            try:
                import device_data  # optional: without it, every run takes the DataLoader
                decode = functools.partial(Batches, args=args, batch_size=256)
                self.device = device_data.DeviceData(train_set, args.device, views, decode, args.data_path == "auto")
                print0(f"training data on {args.device}: {self.device}")
            except (ImportError, ValueError) as err:  # --data-path auto falls back to the DataLoader, saying why
                if args.data_path == "device":
                    fail(f"--data-path device: {err}")
                print0(f"training data through the CPU DataLoader: {err}")
        self.on_device = self.device is not None

    def loader(self, epoch: int, batch_sampler=None, salt: int = 0):
        """One epoch, in `batch_sampler`'s batches or this process's shard, seeded by (seed, epoch, rank, salt)."""
        rank, size = world()
        seed_everything(epoch_seed(self.args.seed, epoch, rank))  # what this process draws: views, the step's
        if batch_sampler is None:
            shard = torch.utils.data.DistributedSampler(self.train_set, size, rank, seed=self.args.seed, drop_last=True)
            shard.set_epoch(epoch)
            batch_sampler = torch.utils.data.BatchSampler(shard, self.args.batch_size // size, drop_last=True)
        if self.device is None:
            return Batches(self.train_set, self.args, epoch, salt, batch_sampler=batch_sampler)
        return self.device.loader(batch_sampler, epoch_seed(self.args.seed, epoch, rank, salt), epoch)


# -------- Optimisation ------------------------------------------------------------------------------------------------

class LARS(torch.optim.Optimizer):
    """LARS (You, Gitman & Ginsburg, 2017) as in SimCLR's official code. For a parameter w with gradient g:
        g <- g + wd w;  trust = eta ||w|| / ||g|| (1 if either is 0);  v <- momentum v + lr trust g;  w <- w - v
    A group with lars_exclude (biases, normalisation) has neither decay nor trust. clip caps lr trust at lr (LARC)."""

    def __init__(self, params, lr: float, momentum=0.9, weight_decay=0.0, eta=0.001, clip=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip))

    @torch.no_grad()
    def step(self):
        for group in (group for group in self.param_groups if any(w.grad is not None for w in group["params"])):
            ws = [w for w in group["params"] if w.grad is not None]
            gs = [w.grad for w in ws]
            if not group.get("lars_exclude"):
                gs = torch._foreach_add(gs, ws, alpha=group["weight_decay"])  # g + wd w
                w_norm, g_norm = torch.stack(torch._foreach_norm(ws)), torch.stack(torch._foreach_norm(gs))  # [P]
                trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, 1.0)
                if group["clip"]:  # lr * this = min(eta ||w|| / ||g||, lr)
                    trust = (trust / group["lr"]).clamp(max=1.0)
                gs = torch._foreach_mul(gs, list(trust.unbind()))  # g * trust, one ratio per parameter
            for w in (w for w in ws if "momentum_buffer" not in self.state[w]):  # the first step: v = 0
                self.state[w]["momentum_buffer"] = torch.zeros_like(w)
            vs = [self.state[w]["momentum_buffer"] for w in ws]
            torch._foreach_mul_(vs, group["momentum"])
            torch._foreach_add_(vs, gs, alpha=group["lr"])  # v <- momentum v + lr g
            torch._foreach_sub_(ws, vs)  # w <- w - v


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights (decayed, LARS-adapted), and 1-d biases and normalisation parameters (neither), as SimCLR's."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "lars_exclude": False},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars_exclude": True}]


def warmup_cosine(step: int, total: int, warmup: int, base_lr: float, final_lr=0.0, start_lr=0.0) -> float:
    """Linear warm-up from start_lr to base_lr over `warmup` steps, then cosine decay to final_lr at step `total`."""
    if step < warmup:
        return start_lr + (base_lr - start_lr) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


def lr_schedule(args: Args, steps_per_epoch: int, base_lr: float, final_lr=0.0, start_lr=0.0):
    """step -> learning rate: warmup_cosine over --epochs, the first --warmup-epochs of them the warm-up."""
    total, warmup = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    return lambda step: warmup_cosine(step, total, warmup, base_lr, final_lr, start_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Set every group's learning rate; returns lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


# -------- Evaluation --------------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(net: nn.Module, dataset, args: Args, batch_size: int = 512, epoch: int = 0):
    """Features [N, D] and labels [N] of the dataset in eval mode, on every process (each embeds an equal share)."""
    (rank, size), n, was_training = world(), len(dataset), net.training
    mine = torch.arange(math.ceil(n / size) * size).clamp(max=n - 1).view(size, -1)[rank].tolist()  # the last padded
    feats, labels = [], []
    net.eval()
    for x, y, *_ in Batches(torch.utils.data.Subset(dataset, mine), args, epoch, batch_size=batch_size,
                            num_workers=min(args.workers, 4)):
        with autocast(args):
            feats.append(net(to_device(x, args)).float())
        labels.append(to_device(y, args))
    net.train(was_training)
    return gather_no_grad(torch.cat(feats))[:n], gather_no_grad(torch.cat(labels))[:n]  # the shares in rank order


@torch.no_grad()
def knn_scores(train_z: torch.Tensor, train_y: torch.Tensor, test_z: torch.Tensor, num_classes: int,
               k: int = 200, t: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """InstDisc's weighted k-NN: a test point's k most cosine-similar training points vote exp(similarity / t)."""
    train_z, test_z = F.normalize(train_z.float(), dim=1), F.normalize(test_z.float(), dim=1)
    scores = []
    for q in test_z.split(chunk):
        top_sim, top_idx = (q @ train_z.T).topk(min(k, len(train_z)), dim=1)  # [m, k] of the similarities [m, N]
        scores.append(top_sim.new_zeros(len(q), num_classes).scatter_add_(1, train_y[top_idx], (top_sim / t).exp()))
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[float]:
    return [(scores.topk(min(k, scores.shape[1]), dim=1).indices == labels[:, None]).any(dim=1).float().mean().item()
            for k in ks]


def train_linear(head: nn.Linear, features, epochs: int, lr: float, batch_size: int, seed: int = 0,
                 nesterov: bool = False, name: str = "") -> nn.Linear:
    """`head` trained from zero on features(epoch) (z [N, D], y [N]; the same on every process, so is the head):
    cross-entropy, SGD with momentum 0.9, cosine rate, no decay. With a name: a line per epoch, its last loss."""
    g = torch.Generator().manual_seed(seed)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, nesterov=nesterov)
    for epoch in range(epochs):
        z, y = features(epoch)
        batches = torch.randperm(len(z), generator=g).to(z.device).split(batch_size)
        for i, idx in enumerate(batches):
            set_lr(opt, warmup_cosine(epoch * len(batches) + i, epochs * len(batches), 0, lr))
            loss = F.cross_entropy(head(z[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if name:
            print0(f"{name}: epoch {epoch + 1}/{epochs}  loss {float(loss.detach()):.4f}")
    return head


def linear_probe(train_z: torch.Tensor, train_y: torch.Tensor, test_z: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, epochs: int = 100, lr: float = 0.1, batch_size: int = 256, seed: int = 0) -> tuple:
    """Test (top-1, top-5) of a linear classifier on frozen, standardised features (Nesterov): seconds, where the
    papers' protocol on augmented crops (linear_protocol) takes hours; the two rank networks alike."""
    mean, std = train_z.mean(0, keepdim=True), train_z.std(0, keepdim=True).clamp_min(1e-6)
    train_z, test_z = (train_z - mean) / std, (test_z - mean) / std
    head = nn.Linear(train_z.shape[1], num_classes).to(train_z.device)
    train_linear(head, lambda epoch: (train_z, train_y), epochs, lr, batch_size, seed, nesterov=True)
    return tuple(topk_accuracy(head(test_z), test_y, (1, 5)))


def linear_protocol(backbone: nn.Module, train_set, num_classes: int, args: Args) -> nn.Linear:
    """The papers' linear protocol: a linear classifier on `train_set` (views new every epoch) through the frozen
    backbone in eval mode (weights and BatchNorm statistics untouched), SGD with momentum 0.9, no weight decay,
    cosine. The processes embed each epoch's views together: each trains the head one process would."""
    head = nn.Linear(backbone.out_dim, num_classes).to(args.device)
    return train_linear(head, lambda epoch: extract_features(backbone, train_set, args, epoch=epoch),
                        args.linear_epochs, args.linear_lr, args.linear_batch_size, args.seed, name="linear protocol")


def linear_view_set(memory_set, size: int):
    """The memory set (a Subset's too) in the linear protocol's view: a random crop (64 px or less: resized, then
    RandomCrop(size, padding=size // 8), 4 px at 32 as MoCo's CIFAR demo and SimSiam; larger: RandomResizedCrop), a
    flip, then its evaluation view's steps after resize and centre crop. The memory set keeps its own view."""
    dataset = copy.copy(getattr(memory_set, "dataset", memory_set))
    crop = T.RandomResizedCrop(size) if size > 64 else T.Compose([T.Resize(size), T.RandomCrop(size, size // 8)])
    rest = [t for t in dataset.transform.transforms if not isinstance(t, (T.Resize, T.CenterCrop))]
    dataset.transform = T.Compose([crop, T.RandomHorizontalFlip(), *rest])
    return Subset(dataset, memory_set.indices) if isinstance(memory_set, Subset) else dataset


class Evaluation:
    """The encoder's k-NN monitor (memory: training images unaugmented; queries: test images), then the fast linear
    probe and, with --linear-epochs, the standard linear protocol."""

    def __init__(self, memory_set, test_set, num_classes: int, args: Args):
        self.memory_set, self.test_set, self.num_classes, self.args = memory_set, test_set, num_classes, args
        self.last = None  # (epochs done, k-NN top-1, the features after the last epoch) of the last monitor
        if args.linear_epochs and len(memory_set) < args.linear_batch_size:  # said before training, not after it
            fail(f"--linear-batch-size {args.linear_batch_size} is larger than the training set ({len(memory_set)} "
                 f"images)")

    def due(self, epoch: int) -> bool:
        """Whether the monitor runs after epoch `epoch` (0-based): every --eval-every epochs and after the last."""
        return epoch + 1 == self.args.epochs or bool(self.args.eval_every and (epoch + 1) % self.args.eval_every == 0)

    def knn(self, backbone: nn.Module, epochs_done: int = 0) -> float:
        features = [extract_features(backbone, s, self.args) for s in (self.memory_set, self.test_set)]
        (train_z, train_y), (test_z, test_y) = features
        top1 = topk_accuracy(knn_scores(train_z, train_y, test_z, self.num_classes, self.args.knn_k, self.args.knn_t),
                             test_y, (1,))[0]
        self.last = (epochs_done, top1, features if epochs_done == self.args.epochs else None)  # kept for report
        print0(f"k-NN top-1 after epoch {epochs_done}: {top1:.4f}" if epochs_done else
               f"k-NN top-1 of the untrained network: {top1:.4f}")
        return top1

    def report(self, backbone: nn.Module, run: RunDir, **extra) -> dict:
        """The final k-NN (the last monitor's), probe and linear protocol, and the method's `extra` results, to
        results.json with the protocol of each top-1 (a top-5 by its top-1's); a summary line."""
        args = self.args
        if not self.last or self.last[0] != args.epochs:  # not measured after the last epoch: a finished run resumed
            self.knn(backbone, args.epochs)
        _, knn_top1, ((train_z, train_y), (test_z, test_y)) = self.last
        untrained = next((r["knn_top1"] for r in run.history if r["epoch"] == 0), None)
        results = {"knn_top1_untrained": untrained, "knn_top1": knn_top1, **extra}
        protocols = {"knn_top1": f"weighted k-NN (k {args.knn_k}, t {args.knn_t}) on unaugmented training images"}
        if args.probe_epochs:
            results["probe_top1"], results["probe_top5"] = linear_probe(
                train_z, train_y, test_z, test_y, self.num_classes, args.probe_epochs, seed=args.seed)
            protocols["probe_top1"] = f"fast probe: linear, on cached unaugmented features, {args.probe_epochs} epochs"
        if args.linear_epochs:
            head = linear_protocol(backbone, linear_view_set(self.memory_set, args.image_size), self.num_classes, args)
            results["linear_top1"], results["linear_top5"] = topk_accuracy(head(test_z), test_y, (1, 5))
            protocols["linear_top1"] = (f"linear protocol: random crops and flips through the frozen network, "
                                        f"{args.linear_epochs} epochs, lr {args.linear_lr}, cosine")
        results["protocols"] = protocols
        run.write("results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n"))
        before = f"untrained {untrained:.4f} -> " if untrained is not None else ""
        after = "".join(f";  {name} top-1 {results[key]:.4f}" for key, name in
                        (("probe_top1", "linear probe"), ("linear_top1", "linear protocol")) if key in results)
        print0(f"k-NN top-1: {before}trained {knn_top1:.4f}{after}  ({run.path})")
        return results


# -------- Run directory: args.json, metrics.jsonl, checkpoint.pt (atomic); the progress line -------------------------

METRIC_KEYS = ["epoch", "step", "loss", "lr", "knn_top1", "images_per_s", "time_s"]
RUN_FILES = ("args.json", "metrics.jsonl", "checkpoint.pt", "results.json", ".lock")


class RunDir:
    """The run's files, written atomically by rank 0, which holds an OS lock (flock) on .lock: one run a directory."""

    current: RunDir | None = None  # this process's run, named by the line that stops it
    lock: int | None = None  # the file descriptor that holds this process's run directory

    def __init__(self, args: Args, method: str):
        self.args, self.method, self.saved_epoch, self.history = args, method, 0, []  # history: metrics.jsonl's rows
        path = Path(args.out_dir or f"runs/{method}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
        box = [(path, self._take(path, args.resume)) if world()[0] == 0 else None]
        if world()[1] > 1:
            torch_dist.broadcast_object_list(box)  # rank 0's directory and verdict, for every process
        self.path, problem = box[0]
        if problem:
            fail(problem)
        args.out_dir = str(self.path)  # args.json and the checkpoint record the directory the run used
        RunDir.current = self

    @staticmethod
    def _take(path: Path, resume: bool) -> str | None:
        """Rank 0: lock the directory, then read what it holds: why the run is refused, or None."""
        odd = next((path / n for n in RUN_FILES if (path / n).exists() and not (path / n).is_file()), None)
        if odd:
            return f"{odd} is not a file: move it out of {path}, or choose another --out-dir"
        if resume and not any((path / n).is_file() for n in RUN_FILES):
            return f"--resume: {path} holds no run to continue"
        try:
            path.mkdir(parents=True, exist_ok=True)
            if RunDir.lock is not None:
                os.close(RunDir.lock)  # one run a process: an earlier one (a test's) lets go of its directory
            RunDir.lock = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(RunDir.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the OS lets go when the process ends
        except BlockingIOError:
            return f"{path} is in use by another run: wait until it ends, or choose another --out-dir"
        except OSError as err:
            return f"cannot write the run directory {path} ({err.strerror}): choose an --out-dir that can be written"
        checkpoint, metrics = (path / "checkpoint.pt").is_file(), path / "metrics.jsonl"
        if not checkpoint and metrics.is_file() and len(metrics.read_bytes().splitlines()) > 1:  # epoch 0's row, more
            return f"{path} holds no checkpoint.pt, but its metrics.jsonl holds trained epochs, which starting over " \
                   f"would delete: put checkpoint.pt back and pass --resume, or choose another --out-dir"
        if not resume and (checkpoint or metrics.is_file()):
            return f"{path} already holds a run: pass --resume to continue it, or choose another --out-dir"
        for name in RUN_FILES:  # the temporaries of a run killed while writing
            (path / f"{name}.tmp").unlink(missing_ok=True)
        return None

    def kept(self) -> str:  # what the run keeps if it stops now
        return f"checkpoint.pt of epoch {self.saved_epoch} in {self.path} is intact" if self.saved_epoch else (
            "no checkpoint was written yet")

    def diverged(self, what: str):
        fail(f"training diverged: {what}; {self.kept()}: resume with --resume --out-dir {self.path} and a lower "
             f"--lr", code=3)

    def write(self, name: str, save):
        """Rank 0: `save(temporary)`, renamed to `name`; a failed write (a full disk) ends the run in one line."""
        if world()[0] != 0:
            return
        tmp = self.path / f"{name}.tmp"
        try:
            save(tmp)
            os.replace(tmp, self.path / name)
        except (OSError, RuntimeError) as err:  # torch.save's writer raises RuntimeError
            why = getattr(err, "strerror", None) or "the write stopped: is the disk full?"
            fail(f"cannot write {self.path / name} ({why}); {self.kept()}: make room, then continue with --resume "
                 f"--out-dir {self.path}")
        finally:  # what a failed or interrupted write left
            tmp.unlink(missing_ok=True)

    def log(self, **metrics):
        """A row of metrics.jsonl (the shared keys, None if not measured or not finite, its own), with args.json."""
        row = {**{k: metrics.pop(k, None) for k in METRIC_KEYS}, **metrics}
        self.history.append({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()})
        self.write("metrics.jsonl", lambda tmp: tmp.write_text("".join(json.dumps(row) + "\n" for row in self.history)))
        self.write("args.json", lambda tmp: tmp.write_text(json.dumps(
            {"method": self.method, **dataclasses.asdict(self.args)}, indent=2) + "\n"))

    def save(self, epoch: int, force: bool = False, **state):
        """Every --save-every epochs, after the last, or `force`: checkpoint.pt, if all weights are finite and agree."""
        if not (force or epoch == self.args.epochs or epoch % self.args.save_every == 0):
            return
        flags = [t.isfinite().all() for t in torch.utils._pytree.tree_leaves(state)  # in state_dicts, lists, ...
                 if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if all_reduce_mean(torch.stack([f.to(flags[0].device) for f in flags]).all().float()).item() < 1:
            self.diverged(f"the weights stopped being finite in epoch {epoch}")
        if world()[1] > 1 and not replicas_agree(state.get("model", {})):
            fail(f"the processes' weights differ after epoch {epoch}: they trained apart; {self.kept()}", code=3)
        self.write("checkpoint.pt", lambda tmp: torch.save(
            {"method": self.method, "epoch": epoch, "args": dataclasses.asdict(self.args), **state,
             "history": self.history}, tmp))
        self.saved_epoch = epoch

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """checkpoint.pt, if of this method and flags (--resume's help), loaded into model and optimiser; or epoch 0."""
        path, args = self.path / "checkpoint.pt", self.args
        if not path.is_file():
            if args.resume:
                print0(f"no checkpoint.pt in {self.path} yet: starting the run again from epoch 0")
            return {"epoch": 0}
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated, not a torch file, or holding objects weights_only refuses
            fail(f"cannot read {path}: not a valid checkpoint ({type(err).__name__}); the file is left as it is")
        if not isinstance(state, dict) or state.get("method") != self.method:
            fail(f"{path} is not a checkpoint of {self.method}.py")
        run = state["args"]
        other = [k for k, v in dataclasses.asdict(args).items() if k in run and run[k] != v and k not in
                 args.FREE_ON_RESUME and not (k == "lr" and v < run[k]) and not (k == "epochs" and v >= state["epoch"])]
        if other:
            fail(f"{path} holds a run of {' '.join(_flag(k, run[k]) for k in other)}, but this run asks for "
                 f"{' '.join(_flag(k, getattr(args, k)) for k in other)}: pass the run's own to continue it (--lr may "
                 f"be lowered, --epochs {state['epoch']} or more; see --resume in --help)")
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:  # torch's first detail names the key and its shapes
            detail = (str(err).splitlines()[1:] or [str(err)])[0].strip()
            fail(f"{path} does not fit this model (were other flags used?): {detail}")
        self.saved_epoch, self.history = state["epoch"], state["history"]
        print0(f"resumed {self.path} at epoch {state['epoch']}")
        return state


def _flag(name: str, value) -> str:  # a field as it is written on the command line
    flag = name.replace("_", "-")
    return (f"--{flag}" if value else f"--no-{flag}") if isinstance(value, bool) else f"--{flag} {value}"


class Progress:
    """The line `epoch e/E  step s/S  loss  lr  img/s  ETA`, every --log-every seconds and at each epoch's end. A loss
    not finite or above `diverge_at`, noted on the device and read with the line, stops the run (exit code 3)."""

    def __init__(self, args: Args, epochs: int = 0, diverge_at: float = math.inf):
        self.epochs, self.every, self.diverge_at = epochs or args.epochs, args.log_every, diverge_at

    def start(self, steps: int):  # an epoch of `steps` steps, before its first batch is loaded: its clock
        self.steps, self.images = steps, 0
        self.epoch_start = self.last_time = time.perf_counter()

    def update(self, step: int, loss: torch.Tensor, lr: float, images: int):  # the run's step, epoch * steps + i
        epoch, i = divmod(step, self.steps)
        loss = loss.detach().float().reshape(())
        here = torch.stack([torch.full_like(loss, i), loss])  # this step's [step, loss], on the device
        bad = torch.full_like(here, math.inf) if i == 0 else self.bad  # the epoch's first bad [step, loss] (inf: none)
        self.bad = torch.where(~(loss.isfinite() & (loss.abs() <= self.diverge_at)) & bad[0].isinf(), here, bad)
        self.step, self.lr, self.images = step, lr, self.images + images * world()[1]
        now, last = time.perf_counter(), i + 1 == self.steps
        self.time_s = now - self.epoch_start
        if now - self.last_time < self.every and not last:
            return
        self.last_time = now
        rows = gather_no_grad(self.bad[None]) if last else self.bad[None]  # at the end every process is here
        value, bad_step, bad_loss = torch.cat([loss[None], rows[rows[:, 0].argmin()]]).tolist()  # the first of any
        eta = datetime.timedelta(seconds=round(self.time_s / (i + 1) * ((self.epochs - epoch) * self.steps - i - 1)))
        print0(f"epoch {epoch + 1}/{self.epochs}  step {i + 1}/{self.steps}  loss {value:.4f}  lr {lr:.4g}  "
               f"{self.images / max(self.time_s, 1e-9):,.0f} img/s  ETA {eta}")
        if bad_step < math.inf and (last or world()[1] == 1):
            what = "stopped being finite" if not math.isfinite(bad_loss) else f"passed {self.diverge_at:g}"
            RunDir.current.diverged(f"the loss {what} ({bad_loss:.4g}) at epoch {epoch + 1}, step "
                                    f"{int(bad_step) + 1} of {self.steps}")  # the method's RunDir, made before this

    def summary(self) -> dict:
        return {"step": self.step + 1, "lr": self.lr, "images_per_s": self.images / self.time_s, "time_s": self.time_s}
