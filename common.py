"""Plumbing shared by every method file: CLI, distributed, backbones, data, optimiser, evaluation, run directory.

Nothing in here is a method. A method file (simclr.py, ...) imports this module and keeps its own views, model
heads, losses and training step; everything both of them need to run on one CPU, one GPU or many is here.

Sections, in order:
  CLI            Args (the flags every method shares), parse(), fail()
  Distributed    Dist, setup_distributed(), gather_with_grad(), gather_no_grad(), all_reduce_mean(),
                 GlobalBatchNorm (--sync-bn where torch's SyncBatchNorm cannot run), distribute()
  Backbones      ResNet-18/34/50 (CIFAR or ImageNet stem), Wide-ResNet 28-2/28-10/34-10, a tiny test network
  Data           datasets by name, class-balanced subsets, an index-returning wrapper, views, loaders
  Device data    a training set held on the device, batched per-sample augmentation (ViewSpec), TrainData
  Adversarial    AdvProp's auxiliary BatchNorm (DualBatchNorm), CLAE's adversarial views (FGSM / PGD)
  Optimisation   LARS (optionally clipped), warm-up + cosine schedule, set_lr (per-group scale or fixed rate)
  Evaluation     feature extraction, weighted k-NN (InstDisc), linear probe on frozen features, calibration bins
                 and the reliability diagram
  Run directory  args.json, metrics.jsonl, atomic checkpoint.pt, curves.png, the progress line
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import inspect
import json
import math
import os
import random
import re
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF2
from PIL import Image

# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


class UserError(SystemExit):
    """Bad input from the user. The message is printed as one line and the process exits with code 2."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


def _speaks() -> bool:
    """Rank 0 (or a plain process) prints errors; the other processes of a torchrun job exit quietly."""
    return os.environ.get("RANK", "0") == "0"


def fail(message: str):
    """Print `error: message` as one line on stderr and exit with code 2 (argparse's convention for bad input)."""
    if _speaks():
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise UserError(message)


@dataclass
class Args:
    """Flags every method shares. A method subclasses this, adds its own fields and overrides defaults."""

    # data
    dataset: str = "cifar10"  # cifar10 cifar100 stl10 svhn mnist fashionmnist kmnist imagefolder digits synthetic
    data_dir: str = "data"  # where the dataset lives (torchvision layout, or train/ and val/ or test/ folders)
    download: bool = False  # download a torchvision dataset into --data-dir when it is missing
    image_size: int = 0  # side of the training crops in pixels (0: the dataset's own size)
    subset: int = 0  # train on a class-balanced subset of this many images (0: the whole training split)
    eval_subset: int = 0  # evaluate on a class-balanced subset of this many test images (0: the whole split)
    workers: int = 4  # data-loading worker processes per training process
    # device: training set held on the device, views made there; cpu: the DataLoader (stays for ImageNet-scale folders)
    data_path: str = "auto"  # auto (device on CUDA when the training set fits in memory, else cpu), device, cpu
    # model
    arch: str = "resnet18"  # resnet18 resnet34 resnet50 wrn28_2 wrn28_10 wrn34_10 tiny
    # optimisation
    epochs: int = 100  # training epochs
    batch_size: int = 256  # global batch size, split evenly over the processes
    lr: float = 0.1  # base learning rate
    weight_decay: float = 1e-4  # L2 weight decay (not applied to biases and normalisation parameters)
    warmup_epochs: float = 10  # linear warm-up from 0 before the cosine decay
    # evaluation
    eval_every: int = 10  # k-NN monitor every this many epochs (0: only before and after training)
    knn_k: int = 200  # neighbours of the weighted k-NN monitor (InstDisc)
    knn_t: float = 0.1  # temperature of the weighted k-NN monitor
    probe_epochs: int = 100  # epochs of the linear probe on frozen features after training (0: skip it)
    # run
    out_dir: str = ""  # run directory (default: runs/<method>-<date>-<time>)
    resume: bool = False  # continue the run in --out-dir from its checkpoint.pt
    save_every: int = 1  # write checkpoint.pt every this many epochs (and always after the last)
    seed: int = 0  # seed of every random draw (data order, augmentation, initialisation)
    device: str = ""  # cuda, cuda:N or cpu (default: cuda when available, else cpu)
    amp: bool = False  # bfloat16 autocast for the networks (losses stay in float32)
    compile: bool = False  # torch.compile the model
    channels_last: bool = False  # channels-last memory format for the convolutions
    sync_bn: bool = False  # synchronise BatchNorm statistics across processes
    log_every: float = 10.0  # seconds between progress lines

    def check(self, world_size: int = 1):
        """Raise ValueError with a one-line reason for any invalid value."""
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown --dataset {self.dataset!r} (choose from {', '.join(DATASETS)})")
        if self.data_path not in DATA_PATHS:
            raise ValueError(f"unknown --data-path {self.data_path!r} (choose from {', '.join(DATA_PATHS)})")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown --arch {self.arch!r} (choose from {', '.join(ARCHS)})")
        positive = ["epochs", "batch_size", "lr", "knn_k", "knn_t", "save_every", "log_every"]
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        non_negative = ["image_size", "subset", "eval_subset", "workers", "weight_decay", "warmup_epochs",
                        "eval_every", "probe_epochs"]
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % world_size:
            raise ValueError(f"--batch-size {self.batch_size} does not divide evenly over {world_size} processes")
        if self.resume and not self.out_dir:
            raise ValueError("--resume needs --out-dir, the directory of the run to continue")
        if self.device and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device):
            raise ValueError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device} asked for, but CUDA is not available")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse prints the usage too by default)
        if _speaks():
            print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)
        raise UserError(message)


def _field_comments(cls) -> dict[str, str]:
    """The `# comment` after each dataclass field, read from the source of the class and its bases."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            m = re.match(r"\s+(\w+)\s*:[^=]+=.*?#\s*(.+)$", line)
            if m:
                comments[m.group(1)] = m.group(2).strip()
    return comments


def parse(cls, argv: list[str] | None = None):
    """Turn the dataclass `cls` into command-line flags (`batch_size` -> `--batch-size`), parse, validate.

    Help text comes from the comment after each field. An invalid value prints one line and exits with code 2.
    """
    module = sys.modules.get(cls.__module__)
    doc = (module.__doc__ or "") if module else ""
    parser = _Parser(prog=os.path.basename(sys.argv[0]) or "python", description=doc,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = _field_comments(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        default = f.default
        help_text = comments.get(f.name, "") + f" (default: {default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif kind in (int, float, str):
            parser.add_argument(flag, type=kind, default=default, help=help_text,
                                metavar=f.name.upper() if kind is str else kind.__name__.upper())
        else:
            raise TypeError(f"field {f.name}: only bool, int, float and str flags are supported, not {kind}")
    namespace = parser.parse_args(argv)
    args = cls(**vars(namespace))
    try:
        args.check(world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as err:
        if _speaks():
            print(f"{parser.prog}: error: {err}", file=sys.stderr, flush=True)
        raise UserError(str(err)) from None
    return args


# ----------------------------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    """Where this process stands: its rank among `world_size` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(args: Args) -> Dist:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), or run as one process.

    NCCL on CUDA, gloo on the CPU. Each process gets its own GPU (cuda:LOCAL_RANK) and its own seed.
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device:
        device = torch.device(args.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend, rank=rank, world_size=world_size,
                                      device_id=device if device.type == "cuda" else None)
    seed_everything(args.seed + rank)
    return Dist(rank, world_size, local_rank, device)


def cleanup_distributed():
    if torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _world() -> tuple[int, int]:
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns, for this process's rows, the gradient of the global loss.

    Every process computes a loss from the gathered tensor, so the gradient of the sum of those losses with
    respect to this process's rows is the sum over processes of each one's gradient for these rows: all-reduce
    (sum) the incoming gradient, then keep this process's slice. Keeping only the local slice of the local
    gradient (without the all-reduce) would drop every other process's contribution, a known bug.
    """

    @staticmethod
    def forward(ctx, x):
        rank, world_size = _world()
        ctx.rank, ctx.world_size, ctx.rows = rank, world_size, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        torch_dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch_dist.all_reduce(grad, op=torch_dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each of W processes -> [W*n, ...], rows in rank order, differentiable. Identity for W = 1.

    Under DDP (which averages gradients over processes) a loss that every process computes identically from the
    gathered tensor gets exactly the gradient that one process would get from the whole batch.
    """
    if _world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each process -> [W*n, ...] in rank order, without gradient. Identity for one process."""
    if _world()[1] == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_world()[1])]
    torch_dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of `x` over processes (a new tensor). Identity for one process."""
    if _world()[1] == 1:
        return x
    x = x.detach().clone()
    torch_dist.all_reduce(x, op=torch_dist.ReduceOp.SUM)
    return x / _world()[1]


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object, on every process."""
    if _world()[1] == 1:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if _world()[0] == 0:
        print(*args, **kwargs, flush=True)


class _AllReduceSum(torch.autograd.Function):
    """The sum over processes. Every process's loss depends on the sum, so the gradient for this process's term
    is the sum of the processes' incoming gradients: the backward all-reduces them too."""

    @staticmethod
    def forward(ctx, x):
        x = x.detach().clone()
        torch_dist.all_reduce(x, op=torch_dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch_dist.all_reduce(grad, op=torch_dist.ReduceOp.SUM)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of the global batch: each process's per-channel sums of
    x and x^2 and its count are summed over processes (with gradient), on any backend. It stands in for torch's
    SyncBatchNorm where that cannot run (the CPU, gloo); one process, or eval mode, is plain BatchNorm. The
    running variance is the global batch's unbiased one, as SyncBatchNorm keeps it."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {x.dim()}-d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _world()[1] > 1):
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        c, xf = x.shape[1], x.float()
        local = torch.cat([xf.sum(dims), (xf * xf).sum(dims), xf.new_full((1,), x.numel() / c)])  # [2C + 1]
        total = _AllReduceSum.apply(local)
        n = total[-1]
        mean = total[:c] / n  # [C]
        var = (total[c:2 * c] / n - mean * mean).clamp_min(0)  # [C] biased, as normalisation uses
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def global_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm1d/2d/3d inside `module` becomes a GlobalBatchNorm, in place (same parameters, buffers and
    state_dict keys: only the class changes). Returns `module`."""
    for m in module.modules():
        if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            m.__class__ = GlobalBatchNorm
    return module


def distribute(model: nn.Module, args: Args, dist: Dist) -> nn.Module:
    """The network to train: DistributedDataParallel on several processes (with --sync-bn, BatchNorm over the
    global batch: torch's SyncBatchNorm on CUDA, GlobalBatchNorm elsewhere), compiled with --compile. `model`
    itself stays the plain module for evaluation and checkpoints."""
    net = model
    if dist.world_size > 1:
        if args.sync_bn and dist.device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # swaps the BatchNorm layers inside `model` too
        elif args.sync_bn:
            global_batchnorm(net)  # in place: `model` normalises over the global batch as well
        net = nn.parallel.DistributedDataParallel(net, device_ids=[dist.device.index] if dist.device.type == "cuda"
                                                  else None)
    return torch.compile(net) if args.compile else net


# ----------------------------------------------------------------------------------------------------------------
# Backbones: each returns an nn.Module mapping images [B, C, H, W] to features [B, out_dim], with .out_dim set
# ----------------------------------------------------------------------------------------------------------------

ARCHS = ["resnet18", "resnet34", "resnet50", "wrn28_2", "wrn28_10", "wrn34_10", "tiny"]


def resnet(depth: int, in_channels: int = 3, stem: str = "cifar", zero_init_residual: bool = False) -> nn.Module:
    """torchvision's ResNet without its classifier. stem 'cifar': 3x3 conv, stride 1, no max-pool (for 32 px
    images, as SimCLR's CIFAR-10 ResNet); stem 'imagenet': 7x7 conv, stride 2, then 3x3 max-pool."""
    builders = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34, 50: torchvision.models.resnet50}
    net = builders[depth](weights=None, zero_init_residual=zero_init_residual)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    else:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


class _WideBlock(nn.Module):
    """Pre-activation wide residual block: act(norm(x)) -> conv3x3 -> act(norm) -> dropout -> conv3x3, + shortcut."""

    def __init__(self, c_in, c_out, stride, norm, act, dropout):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm2, self.conv2 = norm(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.act, self.dropout = act, nn.Dropout(dropout)
        self.shortcut = (nn.Conv2d(c_in, c_out, 1, stride, bias=False)
                         if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x):
        out = self.conv1(self.act(self.norm1(x)))
        out = self.conv2(self.dropout(self.act(self.norm2(out))))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """Wide-ResNet-depth-k (Zagoruyko & Komodakis, 2016) for 32 px images, as used by FixMatch, PAWS and JEM.

    norm='batch' or 'none' (JEM trains without normalisation); act='relu' or 'leaky' (LeakyReLU 0.2, JEM).
    """

    def __init__(self, depth=28, widen=2, in_channels=3, norm="batch", act="relu", dropout=0.0):
        super().__init__()
        assert (depth - 4) % 6 == 0, "Wide-ResNet depth must be 6n + 4"
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        make_norm = (lambda c: nn.BatchNorm2d(c)) if norm == "batch" else (lambda c: nn.Identity())
        activation = nn.LeakyReLU(0.2) if act == "leaky" else nn.ReLU(inplace=True)
        layers = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)]
        c_in = widths[0]
        for group, stride in zip(range(3), (1, 2, 2)):
            for i in range(n):
                layers.append(_WideBlock(c_in, widths[group + 1], stride if i == 0 else 1,
                                         make_norm, activation, dropout))
                c_in = widths[group + 1]
        layers += [make_norm(c_in), activation, nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.out_dim = c_in
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.net(x)


class TinyNet(nn.Sequential):
    """Three conv-BN-ReLU layers and global pooling: fast enough for the tests on a CPU."""

    def __init__(self, in_channels=3, width=32):
        super().__init__(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 4 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(4 * width), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 4 * width


def build_backbone(arch: str, in_channels: int = 3, image_size: int = 32, norm: str = "batch",
                   act: str = "relu", zero_init_residual: bool = False) -> nn.Module:
    """Backbone by name; ResNets get the CIFAR stem for images of 64 px or less, the ImageNet stem above."""
    if arch.startswith("resnet"):
        return resnet(int(arch[6:]), in_channels, "cifar" if image_size <= 64 else "imagenet", zero_init_residual)
    if arch.startswith("wrn"):
        depth, widen = (int(v) for v in arch[3:].split("_"))
        return WideResNet(depth, widen, in_channels, norm=norm, act=act)
    if arch == "tiny":
        return TinyNet(in_channels)
    raise ValueError(f"unknown arch {arch!r}")


def prepare_model(model: nn.Module, args: Args, dist: Dist) -> nn.Module:
    """Move to the device, in channels-last format when asked."""
    model = model.to(dist.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def autocast(args: Args, device: torch.device):
    """bfloat16 autocast with --amp (a no-op context otherwise). Losses cast their inputs back to float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)


# ----------------------------------------------------------------------------------------------------------------
# Adversarial views (CLAE, Ho & Vasconcelos, NeurIPS 2020) and auxiliary BatchNorm (AdvProp, Xie et al., CVPR 2020)
# ----------------------------------------------------------------------------------------------------------------


class DualBatchNorm(nn.Module):
    """AdvProp's pair of BatchNorms: `main` normalises clean inputs (and is the one used at evaluation), `aux`
    normalises adversarial inputs only, so that their different statistics do not mix. Which one runs is set
    by the `adversarial_bn` context manager; the weights of both are trained."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, aux_momentum: float = 0.01):
        super().__init__()
        self.main = bn
        self.aux = copy.deepcopy(bn)
        self.aux.momentum = aux_momentum
        self.use_aux = False

    def forward(self, x):
        return self.aux(x) if self.use_aux else self.main(x)


def dual_batchnorm(module: nn.Module, aux_momentum: float = 0.01) -> nn.Module:
    """Give every BatchNorm inside `module` an auxiliary twin (in place; returns `module`)."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, DualBatchNorm(child, aux_momentum))
        else:
            dual_batchnorm(child, aux_momentum)
    return module


@contextlib.contextmanager
def adversarial_bn(module: nn.Module, enabled: bool = True):
    """Route forwards through the auxiliary BatchNorms of `module` (those made by dual_batchnorm) inside the block."""
    duals = [m for m in module.modules() if isinstance(m, DualBatchNorm)] if enabled else []
    for m in duals:
        m.use_aux = True
    try:
        yield
    finally:
        for m in duals:
            m.use_aux = False


def adversarial_view(loss_fn, x: torch.Tensor, eps: float, steps: int, mean, std) -> torch.Tensor:
    """CLAE's adversarial view: the image within an L-infinity ball of radius `eps` (in pixel units of [0, 1])
    around `x` that increases `loss_fn(view)`, by FGSM (steps=1: one signed-gradient step of size eps) or PGD
    (steps>1: steps of 2.5 eps / steps, projected back on the ball), staying a valid image in [0, 1].

    x: [B, C, H, W], standardised with the per-channel `mean` and `std`; the result is standardised the same way
    and detached. The gradient is taken with respect to the input only (torch.autograd.grad), so no parameter
    receives gradient; BatchNorm running statistics are updated by the forwards, as in the official code.
    """
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    pixels = (x.detach() * std + mean).clamp(0, 1)  # [B, C, H, W] in [0, 1]
    alpha = eps if steps == 1 else 2.5 * eps / steps
    adv = pixels.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = loss_fn((adv - mean) / std)
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = adv + alpha * grad.sign()
            adv = torch.minimum(torch.maximum(adv, pixels - eps), pixels + eps).clamp(0, 1)
    return ((adv - mean) / std).detach()


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataInfo:
    num_classes: int
    channels: int
    size: int  # native image side in pixels
    mean: tuple
    std: tuple


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

DATASETS = {
    "cifar10": DataInfo(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DataInfo(100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": DataInfo(10, 3, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "svhn": DataInfo(10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "mnist": DataInfo(10, 1, 28, (0.1307,), (0.3081,)),
    "fashionmnist": DataInfo(10, 1, 28, (0.2860,), (0.3530,)),
    "kmnist": DataInfo(10, 1, 28, (0.1918,), (0.3483,)),
    "imagefolder": DataInfo(0, 3, 0, IMAGENET_MEAN, IMAGENET_STD),  # classes and size read from the folder
    "digits": DataInfo(10, 1, 8, (0.3050,), (0.3770,)),  # scikit-learn's bundled 8x8 digits, offline
    "synthetic": DataInfo(10, 3, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),  # made up on the spot, for tests
}

_TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "stl10": "STL10", "svhn": "SVHN",
                "mnist": "MNIST", "fashionmnist": "FashionMNIST", "kmnist": "KMNIST"}


class ImageTensorDataset(torch.utils.data.Dataset):
    """uint8 images [N, H, W, C] and integer labels, served as PIL images like torchvision's datasets."""

    def __init__(self, images: torch.Tensor, targets: list[int], transform=None):
        self.images, self.targets, self.transform = images, list(targets), transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        array = self.images[i].numpy()
        img = Image.fromarray(array[..., 0], "L") if array.shape[-1] == 1 else Image.fromarray(array, "RGB")
        return (self.transform(img) if self.transform else img), self.targets[i]


def _digits(train: bool) -> tuple[torch.Tensor, list[int]]:
    """scikit-learn's 1,797 8x8 digits (values 0..16), split 80/20 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.from_numpy(data.images).mul(255.0 / 16.0).round().to(torch.uint8)[..., None]  # [N, 8, 8, 1]
    index = torch.arange(len(images)).numpy()
    tr, te = train_test_split(index, test_size=0.2, random_state=0, stratify=data.target)
    keep = tr if train else te
    return images[keep], [int(v) for v in data.target[keep]]


def _synthetic(train: bool, n: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """A learnable toy: 10 classes, each a fixed random 16x16 colour pattern, plus per-image noise and shifts."""
    g = torch.Generator().manual_seed(1234)
    prototypes = torch.rand(10, 16, 16, 3, generator=g)
    n = n or (512 if train else 128)
    g.manual_seed(1 if train else 2)
    targets = torch.arange(n) % 10
    shifts = torch.randint(-2, 3, (n, 2), generator=g)
    images = torch.stack([prototypes[t].roll((int(s[0]), int(s[1])), dims=(0, 1)) for t, s in zip(targets, shifts)])
    images = (0.7 * images + 0.3 * torch.rand(images.shape, generator=g)).mul(255).round().to(torch.uint8)
    return images, targets.tolist()


def _image_folder_split(root: Path, train: bool) -> Path:
    names = ["train"] if train else ["val", "test"]
    for name in names:
        if (root / name).is_dir():
            return root / name
    fail(f"--dataset imagefolder needs {' or '.join(n + '/' for n in names)} under --data-dir {root} "
         f"(one sub-folder per class inside)")


def dataset_info(args: Args) -> tuple[DataInfo, int]:
    """The dataset's facts and the training image size (--image-size, else the dataset's own)."""
    info = DATASETS[args.dataset]
    if args.dataset == "imagefolder":
        split = _image_folder_split(Path(args.data_dir), True)
        classes = sorted(d.name for d in split.iterdir() if d.is_dir())
        if not classes:
            fail(f"no class folders in {split}")
        first = next((p for p in sorted((split / classes[0]).iterdir()) if p.is_file()), None)
        if first is None:
            fail(f"no images in {split / classes[0]}")
        with Image.open(first) as img:
            side = min(img.size)
        # small images (CIFAR-like folders) are used at their own size; large ones at ImageNet's 224
        info = dataclasses.replace(info, num_classes=len(classes), size=side if side <= 64 else 224)
    return info, (args.image_size or info.size)


def load_dataset(args: Args, train: bool, transform=None):
    """The training or test split of --dataset, with `.targets` (a list of ints). Fails with the fix when the
    data is missing. Test split names: CIFAR/MNIST-like 'test', SVHN 'test', STL-10 'test' (training uses
    'train'; STL-10's 'unlabeled' split is reached with --dataset imagefolder)."""
    name, root = args.dataset, Path(args.data_dir)
    if name == "digits":
        return ImageTensorDataset(*_digits(train), transform=transform)
    if name == "synthetic":
        return ImageTensorDataset(*_synthetic(train), transform=transform)
    if name == "imagefolder":
        return torchvision.datasets.ImageFolder(str(_image_folder_split(root, train)), transform=transform)
    cls = getattr(torchvision.datasets, _TORCHVISION[name])
    kwargs = {"split": "train" if train else "test"} if name in ("svhn", "stl10") else {"train": train}
    try:
        ds = cls(str(root), download=args.download, transform=transform, **kwargs)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        fix = "pass --download to fetch it" if not args.download else "the download did not complete"
        fail(f"{name} not found or incomplete in --data-dir {root} ({fix}, or point --data-dir at a copy)")
    except OSError as err:  # a failed download (no network)
        fail(f"could not download {name} into {root}: {err}; copy the dataset there by hand and omit --download")
    if not hasattr(ds, "targets"):
        ds.targets = [int(v) for v in ds.labels]  # SVHN, STL-10 call them labels
    return ds


def balanced_subset(targets, n: int, seed: int = 0) -> list[int]:
    """Indices of `n` samples, as equal a number from each class as possible, drawn with a fixed seed."""
    targets = torch.as_tensor(list(targets))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(targets), generator=g)
    classes = targets.unique()
    per_class = [order[targets[order] == c] for c in classes]
    picked, k = [], 0
    while len(picked) < min(n, len(targets)):  # round-robin over classes, in the seeded order within each
        for idx in per_class:
            if k < len(idx) and len(picked) < n:
                picked.append(int(idx[k]))
        k += 1
    return sorted(picked)


class Subset(torch.utils.data.Subset):
    """torch's Subset that keeps `.targets`."""

    def __init__(self, dataset, indices):
        super().__init__(dataset, indices)
        self.targets = [dataset.targets[i] for i in indices]


class WithIndex(torch.utils.data.Dataset):
    """Returns (x, y, index): the sample's position in the dataset (a memory bank's row, a per-sample target)."""

    def __init__(self, dataset):
        self.dataset, self.targets = dataset, dataset.targets

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x, y, i


def training_and_eval_sets(args: Args, train_transform, eval_transform):
    """(train set with the method's views, train set for the k-NN memory, test set), with --subset applied."""
    train = load_dataset(args, True, train_transform)
    memory = load_dataset(args, True, eval_transform)
    test = load_dataset(args, False, eval_transform)
    if args.subset:
        keep = balanced_subset(train.targets, args.subset, seed=0)
        train, memory = Subset(train, keep), Subset(memory, keep)
    if args.eval_subset:
        test = Subset(test, balanced_subset(test.targets, args.eval_subset, seed=0))
    return train, memory, test


def normalize(info: DataInfo):
    """PIL image -> float tensor in [0, 1] -> standardised with the dataset's channel mean and std."""
    return T.Compose([T.ToTensor(), T.Normalize(info.mean, info.std)])


def eval_transform(info: DataInfo, size: int):
    """Deterministic view for evaluation: resize (and centre-crop 224 of 256 for large images)."""
    if size > 64:
        return T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), normalize(info)])
    return T.Compose([T.Resize(size), T.CenterCrop(size), normalize(info)])


class MultiView:
    """Applies each transform to the same image: returns a list of views (two for SimCLR, more for multi-crop)."""

    def __init__(self, transforms: list):
        self.transforms = transforms

    def __call__(self, img):
        return [t(img) for t in self.transforms]

    def __repr__(self):
        return f"MultiView({self.transforms})"


def seed_epoch(seed: int, epoch: int, rank: int) -> int:
    """Reseed every generator at the start of an epoch, so a resumed run draws what an uninterrupted one would."""
    s = (seed * 1_000_003 + epoch * 1009 + rank) % (2**31)
    seed_everything(s)
    return s


def train_loader(dataset, args: Args, dist: Dist, epoch: int) -> torch.utils.data.DataLoader:
    """This process's share of the epoch: a seeded shuffle split over the processes, full batches only."""
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank,
                                                  shuffle=True, seed=args.seed, drop_last=True)
    sampler.set_epoch(epoch)
    generator = torch.Generator().manual_seed(seed_epoch(args.seed, epoch, dist.rank))  # worker seeds
    local_batch = args.batch_size // dist.world_size
    if len(sampler) < local_batch:
        fail(f"--batch-size {args.batch_size} is larger than the training set ({len(dataset)} images)")
    return torch.utils.data.DataLoader(dataset, batch_size=local_batch, sampler=sampler, drop_last=True,
                                       num_workers=args.workers, generator=generator,
                                       pin_memory=dist.device.type == "cuda",
                                       persistent_workers=False)


def to_device(x, device: torch.device, channels_last: bool = False):
    """Move a tensor, or a list of tensors (views), to the device without blocking the host."""
    if isinstance(x, (list, tuple)):
        return [to_device(v, device, channels_last) for v in x]
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


# ----------------------------------------------------------------------------------------------------------------
# Device data
# ----------------------------------------------------------------------------------------------------------------
# A training set that fits in memory is decoded once into a uint8 tensor on the training device, and each batch's
# views are made there by batched augmentation: every sample draws its own parameters from a seeded generator on
# the device, as torchvision's transforms do per image, but one batch is one set of tensor operations. The ops
# follow torchvision's tensor versions (transforms.v2.functional) and take the same parameters, so the tests
# compare them sample by sample. The CPU DataLoader (train_loader) stays for datasets too large to hold, such as
# ImageNet-scale folders, and for views these ops do not cover (e.g. AutoAugment).
#
# What differs from the CPU path, which runs torchvision on PIL images: the device path stays in float from the
# decoded image to the standardised view, where PIL rounds to 8 bits after every step; crops are resized without
# antialiasing (PIL antialiases when it shrinks a crop); and the random numbers come from another generator, so
# the two paths draw different (equally distributed) views of the same images.

DATA_PATHS = ["auto", "device", "cpu"]


@dataclass(frozen=True)
class ViewSpec:
    """One random view: torchvision's pipeline of these steps, in this order, each left out at its default:
    RandomResizedCrop(size, scale, ratio) (or, with crop "padded", Pad(pad, reflect) -> RandomCrop(size)) ->
    RandomHorizontalFlip(flip) -> RandomApply([ColorJitter(brightness, contrast, saturation, hue)], jitter) ->
    RandomGrayscale(grayscale) -> RandomApply([GaussianBlur(blur_kernel, blur_sigma)], blur) ->
    RandomSolarize(solarize_threshold, solarize) (or SolarizeRandomThreshold, a threshold per sample) ->
    RandomEqualize(equalize) -> Normalize(mean, std) -> GaussianNoise(noise).
    Ranges are torchvision's: factors drawn uniformly in (low, high); probabilities per sample; the four jitter
    steps in a random order drawn for each sample, as ColorJitter draws one for each image."""

    size: int  # side of the output view in pixels
    crop: str = "resized"  # resized: RandomResizedCrop; padded: a size x size crop of the reflect-padded image
    pad: int = 0  # with crop "padded": reflect padding on every side before the crop (RandomCrop's padding)
    scale: tuple = (0.08, 1.0)  # crop area as a fraction of the image
    ratio: tuple = (3 / 4, 4 / 3)  # crop aspect ratio (width / height), drawn log-uniformly
    flip: float = 0.0  # probability of a horizontal flip
    brightness: tuple = (1.0, 1.0)  # colour jitter factor ranges; (1, 1) and hue (0, 0) leave that step out
    contrast: tuple = (1.0, 1.0)
    saturation: tuple = (1.0, 1.0)
    hue: tuple = (0.0, 0.0)
    jitter: float = 0.0  # probability of the colour jitter
    grayscale: float = 0.0  # probability of grayscale (kept at the image's number of channels)
    blur: float = 0.0  # probability of the Gaussian blur
    blur_kernel: int = 3  # its (odd) kernel side
    blur_sigma: tuple = (0.1, 2.0)  # its sigma range
    solarize: float = 0.0  # probability of solarisation: x -> 1 - x where x >= solarize_threshold
    solarize_threshold: float = 0.5  # in [0, 1] pixel units
    solarize_range: tuple = ()  # instead: a threshold for each sample, uniform in this range (PAWS's solarize)
    equalize: float = 0.0  # probability of histogram equalisation of each channel (PIL's, on 8-bit values)
    mean: tuple = ()  # standardisation (empty: the view stays in [0, 1])
    std: tuple = ()
    noise: float = 0.0  # std of Gaussian noise added to the standardised view (JEM's inputs)

    @classmethod
    def from_torchvision(cls, transform) -> "ViewSpec":
        """The spec of a torchvision pipeline built from the steps above (nested Compose, RandomApply around one
        step, ToTensor and Normalize at the end). The flip may sit anywhere: mirroring commutes with every other
        step's distribution. Raises ValueError for a step or an order that has no batched version here."""
        fields, last = {}, 0
        order = {T.Pad: 0.5, T.RandomResizedCrop: 1, T.RandomCrop: 1, T.ColorJitter: 2, T.RandomGrayscale: 3,
                 T.GaussianBlur: 4, T.RandomSolarize: 5, SolarizeRandomThreshold: 5, T.RandomEqualize: 6,
                 T.ToTensor: 7, T.Normalize: 8, GaussianNoise: 9}
        for step in _flatten(transform):
            p = 1.0
            if isinstance(step, T.RandomApply) and len(step.transforms) == 1:
                p, step = step.p, step.transforms[0]
            kind = type(step)
            if kind is T.RandomHorizontalFlip and p == 1.0:
                fields["flip"] = step.p
                continue
            if kind not in order or order[kind] <= last or (p != 1.0 and kind not in (T.ColorJitter, T.GaussianBlur)):
                raise ValueError(f"no batched version of {step!r} at this place in the views")
            last = order[kind]
            if kind is T.Pad or (kind is T.RandomCrop and step.padding):
                padding = step.padding
                if (kind is T.RandomCrop and step.pad_if_needed) or step.padding_mode != "reflect" or not (
                        isinstance(padding, int) or len(set(padding)) == 1):
                    raise ValueError(f"the batched padded crop pads every side alike by reflection, not {step!r}")
                fields["pad"] = padding if isinstance(padding, int) else padding[0]
            if kind is T.RandomCrop:
                if step.size[0] != step.size[1]:
                    raise ValueError("the batched crop makes square views")
                fields.update(size=step.size[0], crop="padded")
            elif kind is T.RandomResizedCrop:
                if step.size[0] != step.size[1] or step.interpolation != T.InterpolationMode.BILINEAR:
                    raise ValueError("the batched crop makes square views with bilinear interpolation")
                fields.update(size=step.size[0], scale=tuple(step.scale), ratio=tuple(step.ratio))
            elif kind is T.ColorJitter:
                fields.update(brightness=tuple(step.brightness or (1.0, 1.0)),
                              contrast=tuple(step.contrast or (1.0, 1.0)),
                              saturation=tuple(step.saturation or (1.0, 1.0)), hue=tuple(step.hue or (0.0, 0.0)),
                              jitter=p)
            elif kind is T.RandomGrayscale:
                fields["grayscale"] = step.p
            elif kind is T.GaussianBlur:
                if step.kernel_size[0] != step.kernel_size[1]:
                    raise ValueError("the batched blur has a square kernel")
                fields.update(blur=p, blur_kernel=step.kernel_size[0], blur_sigma=tuple(step.sigma))
            elif kind is T.RandomSolarize:  # before ToTensor: on PIL images, whose threshold is in 8-bit units
                fields.update(solarize=step.p, solarize_threshold=step.threshold / 255)
            elif kind is SolarizeRandomThreshold:
                fields.update(solarize=step.p, solarize_range=(step.low / 255, step.high / 255))
            elif kind is T.RandomEqualize:
                fields["equalize"] = step.p
            elif kind is T.Normalize:
                fields.update(mean=tuple(step.mean), std=tuple(step.std))
            elif kind is GaussianNoise:
                fields["noise"] = step.sigma
        if "size" not in fields or (fields.get("pad") and fields.get("crop") != "padded"):
            raise ValueError("views without a RandomResizedCrop or a RandomCrop have no batched version here")
        return cls(**fields)


class SolarizeRandomThreshold:
    """With probability p, solarize a PIL image (invert the pixels at or above a threshold) with a threshold drawn
    uniformly in [low, high) 8-bit units for each image (torchvision's RandomSolarize has a fixed one); the
    default range is the whole of [0, 256), as PAWS's colour distortion."""

    def __init__(self, p: float = 0.2, low: float = 0.0, high: float = 256.0):
        self.p, self.low, self.high = p, low, high

    def __call__(self, img):
        if torch.rand(()) < self.p:
            return T.functional.solarize(img, float(self.low + (self.high - self.low) * torch.rand(())))
        return img

    def __repr__(self):
        return f"SolarizeRandomThreshold(p={self.p}, low={self.low}, high={self.high})"


class GaussianNoise:
    """Adds Gaussian noise of std sigma to a tensor image (after standardisation, as JEM's training inputs)."""

    def __init__(self, sigma: float):
        self.sigma = sigma

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sigma * torch.randn_like(x)

    def __repr__(self):
        return f"GaussianNoise(sigma={self.sigma})"


def _flatten(transform) -> list:
    if isinstance(transform, T.Compose):
        return [step for t in transform.transforms for step in _flatten(t)]
    return [transform]


def view_specs(views) -> list[ViewSpec]:
    """The specs of a MultiView's transforms (or of one transform)."""
    return [ViewSpec.from_torchvision(t) for t in (views.transforms if isinstance(views, MultiView) else [views])]


@dataclass
class ViewParams:
    """The random parameters of a batch of B views, one per sample, drawn by draw_params."""

    spec: ViewSpec
    top: torch.Tensor  # [B] crop box in input pixels (integers, as torchvision's)
    left: torch.Tensor  # [B]
    height: torch.Tensor  # [B]
    width: torch.Tensor  # [B]
    flip: torch.Tensor  # [B] bool
    jitter: torch.Tensor  # [B, 4] brightness, contrast, saturation, hue factors (1, 1, 1, 0: not jittered)
    order: torch.Tensor  # [B, 4] the order of the four jitter steps for each sample (a permutation of 0..3)
    grayscale: torch.Tensor  # [B] bool
    sigma: torch.Tensor  # [B] of the Gaussian blur (0: not blurred)
    solarize: torch.Tensor  # [B] bool
    threshold: torch.Tensor  # [B] solarisation threshold in [0, 1] pixel units
    equalize: torch.Tensor  # [B] bool


def draw_params(spec: ViewSpec, batch: int, height: int, width: int, generator: torch.Generator) -> ViewParams:
    """Per-sample parameters for `batch` views of images height x width, from `generator` (on the device).

    The crop is torchvision's RandomResizedCrop.get_params, vectorised: ten candidate boxes per sample (area
    fraction uniform in `scale`, aspect ratio log-uniform in `ratio`, sides rounded), the first that fits the image
    is kept, placed uniformly; a sample whose ten candidates all fail gets torchvision's fallback, the centred
    crop of the whole image clamped to `ratio`. Taking the first fitting one of ten independent candidates is
    the distribution of torchvision's loop of up to ten tries. A "padded" crop is RandomCrop.get_params on the
    image padded by spec.pad: a size x size box at a uniform offset (ValueError when it cannot fit)."""
    device = generator.device

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(shape, generator=generator, device=device)

    def coin(p):
        return torch.rand(batch, generator=generator, device=device) < p

    if spec.crop == "padded":  # RandomCrop.get_params on the padded image: a uniform offset, the whole view
        room_h, room_w = height + 2 * spec.pad - spec.size, width + 2 * spec.pad - spec.size
        if min(room_h, room_w) < 0 or spec.pad >= min(height, width):
            raise ValueError(f"a {spec.size} px crop of {height}x{width} images padded by {spec.pad} px")
        top = (uniform(0, 1, batch) * (room_h + 1)).floor().long()
        left = (uniform(0, 1, batch) * (room_w + 1)).floor().long()
        h = w = torch.full((batch,), spec.size, device=device)
        return _draw_colour(spec, batch, top, left, h, w, uniform, coin, generator)
    area = height * width
    target = area * uniform(*spec.scale, batch, 10)  # [B, 10]
    aspect = torch.exp(uniform(math.log(spec.ratio[0]), math.log(spec.ratio[1]), batch, 10))
    w = torch.sqrt(target * aspect).round().long()
    h = torch.sqrt(target / aspect).round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # [B, 10]
    first = fits.int().argmax(1, keepdim=True)  # the first candidate that fits (0 when none does)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]  # [B]
    if width / height < min(spec.ratio):  # torchvision's fallback: the whole image, clamped to the ratio range
        fw, fh = width, round(width / min(spec.ratio))
    elif width / height > max(spec.ratio):
        fw, fh = round(height * max(spec.ratio)), height
    else:
        fw, fh = width, height
    found = fits.any(1)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    top = torch.where(found, (uniform(0, 1, batch) * (height - h + 1)).floor().long(), (height - h) // 2)
    left = torch.where(found, (uniform(0, 1, batch) * (width - w + 1)).floor().long(), (width - w) // 2)
    return _draw_colour(spec, batch, top, left, h, w, uniform, coin, generator)


def _draw_colour(spec: ViewSpec, batch: int, top, left, h, w, uniform, coin, generator) -> ViewParams:
    """The parameters after the crop box: flip, jitter and its order, grayscale, blur, solarize, equalize."""
    flip = coin(spec.flip)
    jittered = coin(spec.jitter)
    jitter = torch.stack([torch.where(jittered, uniform(*spec.brightness, batch), 1.0),
                          torch.where(jittered, uniform(*spec.contrast, batch), 1.0),
                          torch.where(jittered, uniform(*spec.saturation, batch), 1.0),
                          torch.where(jittered, uniform(*spec.hue, batch), 0.0)], 1)  # [B, 4]
    order = torch.rand(batch, 4, generator=generator, device=generator.device).argsort(1)  # a permutation each
    grayscale = coin(spec.grayscale)
    sigma = torch.where(coin(spec.blur), uniform(*spec.blur_sigma, batch), 0.0)
    solarize = coin(spec.solarize)
    threshold = (uniform(*spec.solarize_range, batch) if spec.solarize_range
                 else torch.full((batch,), spec.solarize_threshold, device=generator.device))
    equalize = coin(spec.equalize) if spec.equalize > 0 else torch.zeros(batch, dtype=torch.bool,
                                                                           device=generator.device)
    return ViewParams(spec, top, left, h, w, flip, jitter, order, grayscale, sigma, solarize, threshold, equalize)


@torch.no_grad()
def apply_params(images: torch.Tensor, params: ViewParams, standardize: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The views of `images` ([B, C, H, W], uint8 or float in [0, 1]) for `params`: [B, C, size, size] float,
    standardised with the spec's mean and std and given its Gaussian noise (drawn from `generator`), or left in
    [0, 1] with standardize=False."""
    spec, p = params.spec, params
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()  # [B, C, H, W] in [0, 1]
    if spec.pad:
        x = F.pad(x, (spec.pad,) * 4, mode="reflect")  # [B, C, H + 2 pad, W + 2 pad]
    x = resized_crop(x, p.top, p.left, p.height, p.width, spec.size, p.flip)  # [B, C, size, size]
    if spec.jitter > 0:
        active = (spec.brightness != (1, 1), spec.contrast != (1, 1), spec.saturation != (1, 1), spec.hue != (0, 0))
        x = color_jitter(x, p.jitter, p.order, active)
    if spec.grayscale > 0:
        x = torch.where(p.grayscale[:, None, None, None], rgb_to_grayscale(x).expand_as(x), x)
    if spec.blur > 0:
        x = gaussian_blur(x, spec.blur_kernel, p.sigma).clamp(0, 1)  # its sums can round a hair outside
    if spec.solarize > 0:
        x = solarize(x, p.threshold, p.solarize)
    if spec.equalize > 0:
        x = equalize(x, p.equalize)
    if standardize and spec.mean:
        x = (x - _constant(spec.mean, x.device)) / _constant(spec.std, x.device)
    if standardize and spec.noise:
        x = x + spec.noise * torch.randn(x.shape, generator=generator, device=x.device)
    return x


@functools.lru_cache
def _constant(values: tuple, device: torch.device) -> torch.Tensor:
    """Per-channel values [1, C, 1, 1] on the device, copied there once: a copy from the host in every batch
    would make the host wait for the device's queued work (a blocking copy synchronises the stream)."""
    return torch.tensor(values, device=device).view(1, -1, 1, 1)


def _bilinear_taps(start: torch.Tensor, length: torch.Tensor, size: int, flip: torch.Tensor | None = None):
    """For each sample's crop [start, start + length) of one axis: the two input pixels and the weight of the
    second that make each of `size` output pixels, as torchvision's bilinear resize without antialiasing
    (output pixel i reads the crop at (i + 0.5) * length / size - 0.5, clamped to the crop). [B] -> 3 x [B, size]"""
    i = torch.arange(size, device=start.device, dtype=torch.float32)
    pos = ((i + 0.5) * (length[:, None] / size) - 0.5).clamp(min=0)  # [B, size], in crop pixels
    low = pos.floor()
    weight = pos - low
    last = length[:, None] - 1
    low = torch.minimum(low.long(), last)
    high = torch.minimum(low + 1, last)
    taps = [start[:, None] + low, start[:, None] + high, weight]
    if flip is not None:  # a mirrored view reads its columns right to left
        taps = [torch.where(flip[:, None], t.flip(1), t) for t in taps]
    return taps


def _resample(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, weight: torch.Tensor, dim: int):
    """Linear interpolation of x [B, C, H, W] along `dim` (2: rows, 3: columns) at per-sample taps [B, S]."""
    shape = [x.shape[0], 1, 1, 1]
    shape[dim] = low.shape[1]  # [B, 1, S, 1] or [B, 1, 1, S]
    out = list(x.shape)
    out[dim] = low.shape[1]
    a = x.gather(dim, low.view(shape).expand(out))
    b = x.gather(dim, high.view(shape).expand(out))
    return torch.lerp(a, b, weight.view(shape))


def resized_crop(x: torch.Tensor, top, left, height, width, size: int, flip=None) -> torch.Tensor:
    """Each sample's box (top, left, height, width: [B] integers) of x [B, C, H, W] resized to size x size,
    bilinear without antialiasing, mirrored where flip [B] is set: torchvision's resized_crop(antialias=False)
    then hflip. Two gathers per axis rather than grid_sample, so the samples near the box's edges are clamped
    to the box as torchvision's resize of the cropped image clamps them."""
    x = _resample(x, *_bilinear_taps(top, height, size), dim=2)  # [B, C, size, W]
    return _resample(x, *_bilinear_taps(left, width, size, flip), dim=3)  # [B, C, size, size]


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R 601-2, torchvision's weights) [B, 1, H, W] of RGB x [B, 3, H, W]; one channel stays as it is."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(x: torch.Tensor, other, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] in [0, 1] scaled by factor [B] (blended with black)."""
    return _blend(x, 0.0, factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x blended with its own mean luma by factor [B]."""
    return _blend(x, rgb_to_grayscale(x).mean((1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x blended with its grayscale by factor [B]; a one-channel image has no saturation to change."""
    return x if x.shape[1] == 1 else _blend(x, rgb_to_grayscale(x), factor)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Hue rotated by factor [B] (in turns, [-0.5, 0.5]) in HSV space; a one-channel image has no hue."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)  # [B, H, W] each
    v, low = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)  # v: the HSV value
    delta = v - low  # the chroma, v s
    d = torch.where(delta > 0, delta, 1.0)  # grey pixels: any hue, 0 here, and delta = 0 makes it irrelevant
    h6 = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * d, r - g + 4 * d)) / d  # sextants, in [-1, 5]
    h6 = (h6 + 6 * factor.view(-1, 1, 1)) % 6  # [B, H, W], the rotated hue in sixths of a turn
    # back to RGB: channel n = 5, 3, 1 (R, G, B) is v - delta clamp(min(k, 4 - k), 0, 1), with k = (n + h6) mod 6
    n = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)  # 5, 3, 1 (made on the device, not copied)
    k = (n + h6[:, None]) % 6  # [B, 3, H, W]
    out = v[:, None] - delta[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)
    return torch.where((factor == 0).view(-1, 1, 1, 1), x, out)  # exactly x when not rotated


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, active=(True,) * 4,
                 grouped: bool | None = None) -> torch.Tensor:
    """ColorJitter with per-sample factors [B, 4] (brightness, contrast, saturation, hue) applied in each sample's
    own order [B, 4], as torchvision draws a permutation per image. At each of the four places every sample gets
    the step its order puts there. `active`: which steps can change anything (one whose range is the identity is
    skipped).

    Two equal ways (each sample's result is the same, the ops being per sample): on a GPU, every step runs on the
    whole batch at every place, with its identity factor for the samples whose step there is another one: fixed
    shapes, so nothing waits for the host. On the CPU (grouped, the default there), each step runs only on the
    samples that it changes at that place: a quarter of the work, and no queue of device work to stall."""
    steps = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    identity = (1.0, 1.0, 1.0, 0.0)
    grouped = x.device.type == "cpu" if grouped is None else grouped
    if grouped:
        x = x.clone()  # changed in place below, one sample group at a time
    for place in range(4):
        for j, step in enumerate(steps):
            if not active[j]:
                continue
            here = order[:, place] == j  # [B] the samples whose step at this place is this one
            if grouped:
                idx = (here & (factors[:, j] != identity[j])).nonzero().squeeze(1)  # and that it changes
                if len(idx):
                    x.index_copy_(0, idx, step(x[idx], factors[idx, j]))
            else:
                x = step(x, torch.where(here, factors[:, j], identity[j]))
    return x


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] blurred with a Gaussian of side kernel_size (odd) and per-sample sigma [B] (0: unchanged),
    reflect padding, as torchvision's gaussian_blur; separable: one grouped convolution per axis."""
    batch, channels, height, width = x.shape
    t = torch.arange(kernel_size, device=x.device, dtype=torch.float32) - (kernel_size - 1) / 2  # [k]
    kernel = torch.exp(-0.5 * (t / sigma.clamp(min=1e-6)[:, None]) ** 2)  # [B, k]; sigma 0: a unit impulse
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # [B*C, k]
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, batch * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel.view(-1, 1, kernel_size, 1), groups=batch * channels)  # along rows
    y = F.conv2d(y, kernel.view(-1, 1, 1, kernel_size), groups=batch * channels)  # along columns
    return y.view(batch, channels, height, width)


def solarize(x: torch.Tensor, threshold, mask: torch.Tensor) -> torch.Tensor:
    """x -> 1 - x where x >= threshold (a number, or one for each sample [B]), for the samples where mask [B] is
    set."""
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.view(-1, 1, 1, 1)
    return torch.where(mask.view(-1, 1, 1, 1) & (x >= threshold), 1 - x, x)


def equalize(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each channel of the samples where mask [B] is set, on x [B, C, H, W] in [0, 1]
    rounded to 8 bits: torchvision's batched equalize, which follows PIL's ImageOps.equalize."""
    equalized = TF2.equalize((x * 255).round().to(torch.uint8)).float() / 255  # each image and channel on its own
    return torch.where(mask.view(-1, 1, 1, 1), equalized, x)


class DeviceData:
    """A training set held whole on the device: images uint8 [N, C, H, W] and labels [N], decoded once.
    `with_index`: the training set was a WithIndex, so batches carry the samples' positions too."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, with_index: bool = False):
        self.images, self.targets, self.with_index = images, targets, with_index

    def __len__(self):
        return len(self.images)

    @classmethod
    def from_dataset(cls, dataset, device: torch.device, workers: int = 0, max_bytes: float = float("inf")):
        """The images of a training set from load_dataset / training_and_eval_sets (through Subset and WithIndex),
        in its order. Raises ValueError when they cannot be held: too large, images of differing sizes, large
        images (an image folder of more than 64 px is ImageNet-scale), or a dataset without raw images."""
        base, indices, with_index = dataset, None, False
        while isinstance(base, (WithIndex, torch.utils.data.Subset)):
            if isinstance(base, WithIndex):
                with_index = True
            else:
                indices = list(base.indices) if indices is None else [base.indices[i] for i in indices]
            base = base.dataset
        indices = list(range(len(base))) if indices is None else indices
        targets = torch.as_tensor([base.targets[i] for i in indices], dtype=torch.long)
        if isinstance(base, ImageTensorDataset):
            source = base.images.permute(0, 3, 1, 2)  # [N, C, H, W]
        elif isinstance(base, torchvision.datasets.ImageFolder):
            paths = [base.samples[i][0] for i in indices]
            with Image.open(paths[0]) as img:
                width, height = img.size
            if max(width, height) > 64:
                raise ValueError(f"images of {width}x{height} px: the device copy is for small images (64 px or "
                                 f"less); an ImageNet-scale folder stays on the CPU DataLoader")
            if len(paths) * 3 * width * height > max_bytes:
                raise ValueError(f"{len(paths)} images do not fit in the memory set aside for them")
            return cls(_decode_files(paths, workers).to(device), targets.to(device), with_index)
        elif hasattr(getattr(base, "data", None), "shape"):  # torchvision's CIFAR, SVHN, STL-10, MNIST-like
            source = torch.as_tensor(base.data)
            if source.ndim == 3:  # MNIST-like: [N, H, W]
                source = source[:, None]
            elif isinstance(base, torchvision.datasets.CIFAR10):  # [N, H, W, C]; SVHN and STL-10: [N, C, H, W]
                source = source.permute(0, 3, 1, 2)
        else:
            raise ValueError(f"no device copy of a {type(base).__name__}")
        size = len(indices) * source[0].numel()
        if size > max_bytes:
            raise ValueError(f"{size / 2**30:.1f} GiB of images do not fit in the memory set aside for them")
        return cls(source[torch.as_tensor(indices)].contiguous().to(device), targets.to(device), with_index)


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):  # decoded by PIL as ImageFolder does, so both paths see the same pixels
        with Image.open(self.paths[i]) as img:
            return T.functional.pil_to_tensor(img.convert("RGB"))  # [3, H, W] uint8


def _decode_files(paths: list, workers: int) -> torch.Tensor:
    loader = torch.utils.data.DataLoader(_ImageFiles(paths), batch_size=256, num_workers=workers)
    try:
        return torch.cat(list(loader))  # [N, 3, H, W]
    except RuntimeError as err:  # stacking images of different sizes
        raise ValueError(f"the images differ in size ({str(err).splitlines()[0]})") from None


def epoch_batches(n: int, args: Args, dist: Dist, epoch: int) -> torch.Tensor:
    """This process's share of epoch `epoch` of n samples as batches of indices [steps, local batch] on the
    device: the seeded shuffle of train_loader (DistributedSampler: every process its own W-th of the epoch,
    reshuffled with seed + epoch), full batches only."""
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=dist.world_size, rank=dist.rank,
                                                  shuffle=True, seed=args.seed, drop_last=True)
    sampler.set_epoch(epoch)
    local_batch = args.batch_size // dist.world_size
    if len(sampler) < local_batch:
        fail(f"--batch-size {args.batch_size} is larger than the training set ({n} images)")
    steps = len(sampler) // local_batch
    return torch.tensor(list(sampler))[:steps * local_batch].view(steps, local_batch).to(dist.device)


class DeviceLoader:
    """One epoch from a DeviceData, shaped like train_loader's DataLoader over a MultiView: (views, labels) or,
    for a WithIndex set, (views, labels, indices), with the views a list (one per spec) when given a list.
    The views are drawn from a generator on the device seeded per epoch and process, so --resume reproduces.
    `batches` ([steps, b] indices into `data`; default epoch_batches, the seeded shuffle split over processes)
    gives a method's own sampler's batches; `salt` gives a second loader of the same epoch its own random views."""

    def __init__(self, data: DeviceData, specs, args: Args, dist: Dist, epoch: int, batches=None, salt: int = 0):
        self.data, self.specs = data, specs
        self.batches = (epoch_batches(len(data), args, dist, epoch) if batches is None
                        else torch.as_tensor(batches, dtype=torch.long).to(dist.device))
        seed = seed_epoch(args.seed, epoch, dist.rank) + (salt << 32)
        self.generator = torch.Generator(dist.device).manual_seed(seed)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for idx in self.batches:
            images = self.data.images[idx]  # [b, C, H, W] uint8
            specs = self.specs if isinstance(self.specs, list) else [self.specs]
            views = [apply_params(images, draw_params(spec, len(idx), *images.shape[2:], self.generator),
                                  generator=self.generator) for spec in specs]
            x = views if isinstance(self.specs, list) else views[0]
            labels = self.data.targets[idx]
            yield (x, labels, idx) if self.data.with_index else (x, labels)


class TrainData:
    """The training batches of every epoch, on the path --data-path picks: `loader(epoch)` is a DeviceLoader
    (the set decoded once onto the device, batched augmentation) or train_loader's CPU DataLoader.

    `views` is the transform given to the training set (a MultiView, or one transform); the device path runs
    the same pipeline, translated by ViewSpec.from_torchvision. auto: the device on CUDA when the translation
    works and the images take at most a quarter of the free GPU memory, else the CPU DataLoader."""

    def __init__(self, train_set, views, args: Args, dist: Dist):
        self.train_set, self.args, self.dist = train_set, args, dist
        self.data, why = None, None
        if args.data_path == "device" or (args.data_path == "auto" and dist.device.type == "cuda"):
            try:
                specs = view_specs(views)
                self.specs = specs if isinstance(views, MultiView) else specs[0]
                budget = float("inf")
                if args.data_path == "auto":
                    budget = torch.cuda.mem_get_info(dist.device)[0] / 4
                self.data = DeviceData.from_dataset(train_set, dist.device, args.workers, budget)
                for spec in specs:  # a padded crop that cannot fit these images fails here, not in the first step
                    draw_params(spec, 1, *self.data.images.shape[2:], torch.Generator(dist.device))
            except ValueError as err:
                if args.data_path == "device":
                    fail(f"--data-path device: {err}")
                why = str(err)
        if self.data is not None:
            print0(f"training data on {dist.device}: {len(self.data)} images of {tuple(self.data.images.shape[1:])}"
                   f" ({self.data.images.numel() / 2**20:.1f} MiB), views made there")
        elif why:
            print0(f"training data through the CPU DataLoader: {why}")

    @property
    def on_device(self) -> bool:
        return self.data is not None

    def loader(self, epoch: int):
        if self.data is not None:
            return DeviceLoader(self.data, self.specs, self.args, self.dist, epoch)
        return train_loader(self.train_set, self.args, self.dist, epoch)


# ----------------------------------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------------------------------


class LARS(torch.optim.Optimizer):
    """LARS (You, Gitman & Ginsburg, 2017) as in SimCLR's official code. For a parameter w with gradient g:

        g     <- g + wd * w                                      (wd = 0 in groups with lars_exclude)
        trust  = eta * ||w|| / ||g||   if ||w|| > 0 and ||g|| > 0, else 1   (1 in groups with lars_exclude)
        v     <- momentum * v + lr * trust * g
        w     <- w - v                  (nesterov: w <- w - (momentum * v + lr * trust * g))

    Biases and normalisation parameters go in a group with lars_exclude=True: no weight decay, no adaptation.
    clip=True caps the adapted rate at the learning rate, as the clipping of NVIDIA's LARC (solo-learn's clip_lr):
    lr * trust becomes min(trust, lr), so the trust ratio is the weight's own rate, which the schedule only caps.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001,
                 nesterov: bool = False, clip: bool = False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, nesterov=nesterov,
                        lars_exclude=False, clip=clip)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient, a group at a time with torch's multi-tensor (foreach)
        kernels: a few launches a group instead of a dozen a parameter, and no host synchronisation (the trust
        ratios stay on the device)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            ws = [w for w in group["params"] if w.grad is not None]
            if not ws:
                continue
            gs, lr, momentum = [w.grad for w in ws], group["lr"], group["momentum"]
            if not group["lars_exclude"]:
                if group["weight_decay"]:
                    gs = torch._foreach_add(gs, ws, alpha=group["weight_decay"])  # g + wd w
                w_norm, g_norm = torch.stack(torch._foreach_norm(ws)), torch.stack(torch._foreach_norm(gs))  # [P]
                trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                    torch.ones_like(w_norm))
                if group.get("clip") and lr > 0:  # .get: checkpoints without the key
                    trust = (trust / lr).clamp(max=1.0)  # lr * this = min(eta ||w|| / ||g||, lr)
                gs = torch._foreach_mul(gs, list(trust.unbind()))  # g * trust, one ratio per parameter
            vs = []
            for w in ws:
                state = self.state[w]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(w)
                vs.append(state["momentum_buffer"])
            torch._foreach_mul_(vs, momentum)
            torch._foreach_add_(vs, gs, alpha=lr)  # v <- momentum v + lr g
            if group["nesterov"]:
                torch._foreach_sub_(ws, torch._foreach_add(torch._foreach_mul(vs, momentum), gs, alpha=lr))
            else:
                torch._foreach_sub_(ws, vs)  # w <- w - v
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, LARS-adapted) and biases + normalisation parameters (neither), the split
    SimCLR's official code makes by name ('bias', 'batch_normalization'); here by shape (1-d tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float, final_lr: float = 0.0) -> float:
    """Linear warm-up from 0 to base_lr over warmup_steps, then cosine decay to final_lr at total_steps."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


def lr_schedule(args: Args, steps_per_epoch: int, base_lr: float):
    """step -> learning rate: --warmup-epochs of linear warm-up, then cosine decay to 0 at the last step."""
    total, warmup = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    return lambda step: warmup_cosine(step, total, warmup, base_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Set every group's learning rate (times the group's optional 'lr_scale'); a group with 'fixed_lr' keeps
    that rate instead (e.g. SimSiam's predictor with --fix-pred-lr). Returns lr."""
    for group in optimizer.param_groups:
        group["lr"] = group["fixed_lr"] if "fixed_lr" in group else lr * group.get("lr_scale", 1.0)
    return lr


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(net: nn.Module, dataset, dist: Dist, batch_size: int = 512, workers: int = 0,
                     args: Args | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D] (float32) and labels [N] of the whole dataset, in dataset order, on every process.

    Each process embeds every W-th sample; the pieces are gathered (padded to equal length) and put back in order.
    The network runs in eval mode (BatchNorm with running statistics) and is put back in its previous mode.
    """
    rank, world_size = dist.rank, dist.world_size
    n = len(dataset)
    mine = list(range(rank, n, world_size))
    loader = torch.utils.data.DataLoader(Subset(dataset, mine) if hasattr(dataset, "targets")
                                         else torch.utils.data.Subset(dataset, mine),
                                         batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=dist.device.type == "cuda")
    was_training = net.training
    net.eval()
    feats, labels = [], []
    channels_last = bool(args and args.channels_last)
    for batch in loader:
        x, y = batch[0], batch[1]
        with autocast(args, dist.device) if args else torch.autocast(dist.device.type, enabled=False):
            f = net(to_device(x, dist.device, channels_last))
        feats.append(f.float())
        labels.append(y.to(dist.device))
    net.train(was_training)
    dim = feats[0].shape[1] if feats else 0
    z = torch.cat(feats) if feats else torch.zeros(0, dim, device=dist.device)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=dist.device)
    if world_size == 1:
        return z, y
    dim = broadcast_object(dim)
    per = math.ceil(n / world_size)
    pad_z = torch.zeros(per, dim, device=dist.device)
    pad_z[:len(z)] = z
    pad_y = torch.full((per,), -1, dtype=torch.long, device=dist.device)
    pad_y[:len(y)] = y
    all_z, all_y = gather_no_grad(pad_z), gather_no_grad(pad_y)  # [W*per, D], rank r holds samples r, r+W, ...
    order = torch.arange(world_size * per, device=dist.device).view(world_size, per).t().reshape(-1)
    return all_z[order][:n], all_y[order][:n]


@torch.no_grad()
def knn_scores(train_z: torch.Tensor, train_y: torch.Tensor, test_z: torch.Tensor, num_classes: int,
               k: int = 200, t: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Weighted k-NN of InstDisc (Wu et al., 2018): each of a test point's k most cosine-similar training points
    votes for its class with weight exp(similarity / t). Returns the votes [M, num_classes]."""
    train_z, test_z = F.normalize(train_z.float(), dim=1), F.normalize(test_z.float(), dim=1)
    k = min(k, len(train_z))
    scores = []
    for q in test_z.split(chunk):
        sim = q @ train_z.T  # [m, N]
        top_sim, top_idx = sim.topk(k, dim=1)  # [m, k]
        weights = (top_sim / t).exp()
        votes = torch.zeros(len(q), num_classes, device=q.device, dtype=weights.dtype)
        scores.append(votes.scatter_add_(1, train_y[top_idx], weights))
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[float]:
    """Fraction of rows whose label is among the top-k scores, for each k (k capped at the number of classes)."""
    out = []
    for k in ks:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices
        out.append((top == labels[:, None]).any(dim=1).float().mean().item())
    return out


def knn_accuracy(net: nn.Module, memory_set, test_set, num_classes: int, dist: Dist, args: Args) -> float:
    """k-NN top-1 accuracy of the network's features: memory = training images, queries = test images."""
    train_z, train_y = extract_features(net, memory_set, dist, workers=min(args.workers, 4), args=args)
    test_z, test_y = extract_features(net, test_set, dist, workers=min(args.workers, 4), args=args)
    scores = knn_scores(train_z, train_y, test_z, num_classes, args.knn_k, args.knn_t)
    return topk_accuracy(scores, test_y, (1,))[0]


class Monitor:
    """The k-NN monitor of an encoder (before training, every --eval-every epochs, after the last) and the final
    report (k-NN, linear probe, results.json, curves.png). Every method uses it on its backbone."""

    def __init__(self, backbone: nn.Module, memory_set, test_set, num_classes: int, args: Args, dist: Dist,
                 run: "RunDir", state: dict):
        self.backbone, self.memory_set, self.test_set = backbone, memory_set, test_set
        self.num_classes, self.args, self.dist, self.run = num_classes, args, dist, run
        self.last = None
        self.untrained = state.get("knn_untrained")
        if state["epoch"] == 0:
            self.untrained = self.accuracy()
            run.log(epoch=0, step=0, knn_top1=self.untrained)
            print0(f"k-NN top-1 of the untrained network: {self.untrained:.4f}")

    def accuracy(self) -> float:
        return knn_accuracy(self.backbone, self.memory_set, self.test_set, self.num_classes, self.dist, self.args)

    def knn(self, epoch: int) -> float | None:
        """k-NN top-1 after `epoch` (0-based) when due: every --eval-every epochs and after the last."""
        every, done = self.args.eval_every, epoch + 1
        self.last = self.accuracy() if done == self.args.epochs or (every and done % every == 0) else None
        return self.last

    def finish(self, **extra) -> dict:
        """Final k-NN and linear probe on frozen features; writes results.json (with the method's own `extra`
        results, e.g. a classifier's test accuracy) and curves.png, prints a summary."""
        args, dist = self.args, self.dist
        knn_top1 = self.last if self.last is not None else self.accuracy()
        results = {"knn_top1_untrained": self.untrained, "knn_top1": knn_top1, **extra}
        if args.probe_epochs:
            train_h, train_y = extract_features(self.backbone, self.memory_set, dist, args=args)
            test_h, test_y = extract_features(self.backbone, self.test_set, dist, args=args)
            top1, top5 = linear_probe(train_h, train_y, test_h, test_y, self.num_classes, args.probe_epochs,
                                      seed=args.seed)
            results.update(probe_top1=top1, probe_top5=top5)
        if dist.is_main:
            (self.run.path / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        self.run.plot()
        probe = f";  linear probe top-1 {results['probe_top1']:.4f}" if "probe_top1" in results else ""
        print0(f"k-NN top-1: untrained {self.untrained:.4f} -> trained {knn_top1:.4f}{probe}  ({self.run.path})")
        return results


def linear_probe(train_z: torch.Tensor, train_y: torch.Tensor, test_z: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, epochs: int = 100, lr: float = 0.1, batch_size: int = 256,
                 weight_decay: float = 0.0, seed: int = 0) -> tuple[float, float]:
    """Linear classifier on frozen features: standardised with the training mean and std, trained with SGD
    (momentum 0.9, Nesterov) and a cosine schedule, cross-entropy. Returns test (top-1, top-5).

    The official protocols train the linear layer on augmented crops; precomputed features of unaugmented images
    make the probe seconds instead of hours and rank representations the same way, a point or two lower."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mean, std = train_z.mean(0, keepdim=True), train_z.std(0, keepdim=True).clamp_min(1e-6)
    train_z, test_z = (train_z - mean) / std, (test_z - mean) / std
    head = nn.Linear(train_z.shape[1], num_classes).to(train_z.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_z) / batch_size)
    total = epochs * steps_per_epoch
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(train_z), generator=g).to(train_z.device)
        idx = order[(step % steps_per_epoch) * batch_size:][:batch_size]
        set_lr(opt, warmup_cosine(step, total, 0, lr))
        loss = F.cross_entropy(head(train_z[idx]), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        top1, top5 = topk_accuracy(head(test_z), test_y, (1, 5))
    return top1, top5


def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15):
    """Per confidence bin [lo, hi) of equal width (the last one closed): (count, mean confidence, accuracy).
    probs: [N, C] predicted probabilities; labels: [N]."""
    probs, labels = probs.detach().cpu().double(), labels.cpu()
    confidence, prediction = probs.max(dim=1)  # [N], [N]
    correct = (prediction == labels).double()  # [N]
    which = (confidence * bins).long().clamp(0, bins - 1)  # [N] bin index; confidence 1 joins the last bin
    count = torch.bincount(which, minlength=bins).double()  # [bins]
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, confidence)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, correct)
    return count, conf_sum / count.clamp_min(1), acc_sum / count.clamp_min(1)


def reliability_diagram(probs: torch.Tensor, labels: torch.Tensor, path, title: str, bins: int = 15):
    """Accuracy against confidence per bin, with the diagonal of perfect calibration (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    count, confidence, accuracy = calibration_bins(probs, labels, bins)
    keep = count > 0  # empty bins are left blank
    centres, confidence, accuracy = ((torch.arange(bins) + 0.5) / bins)[keep], confidence[keep], accuracy[keep]
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.bar(centres, accuracy, width=1 / bins, edgecolor="black", label="accuracy")
    ax.bar(centres, (confidence - accuracy).abs(), bottom=torch.minimum(confidence, accuracy), width=1 / bins,
           facecolor="none", edgecolor="red", hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Run directory: args.json, metrics.jsonl, checkpoint.pt (atomic), curves.png; the progress line
# ----------------------------------------------------------------------------------------------------------------

METRIC_KEYS = ["epoch", "step", "loss", "lr", "knn_top1", "images_per_s", "time_s"]


class RunDir:
    """The run's files. Only rank 0 writes; every rank reads the checkpoint when resuming.

    A directory that already holds a run is never written over: continue it with --resume or pick another.
    """

    def __init__(self, args: Args, method: str, dist: Dist):
        self.method, self.dist = method, dist
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.path = Path(broadcast_object(args.out_dir or f"runs/{method}-{stamp}"))
        self.checkpoint_path = self.path / "checkpoint.pt"
        self.metrics_path = self.path / "metrics.jsonl"
        problem = None
        if dist.is_main:
            if args.resume and not self.checkpoint_path.is_file():
                problem = f"--resume: no checkpoint.pt in {self.path} to continue from"
            elif not args.resume and (self.checkpoint_path.exists() or self.metrics_path.exists()):
                problem = f"{self.path} already holds a run: pass --resume to continue it, or choose another --out-dir"
            elif self.path.exists() and not self.path.is_dir():
                problem = f"--out-dir {self.path} exists and is not a directory"
        problem = broadcast_object(problem)
        if problem:
            fail(problem)
        if dist.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            if not args.resume:
                (self.path / "args.json").write_text(json.dumps({"method": method, **dataclasses.asdict(args)},
                                                                indent=2) + "\n")

    def log(self, **metrics):
        """Append one line to metrics.jsonl: the keys every method shares (None where not measured), then extras."""
        if not self.dist.is_main:
            return
        row = {k: metrics.pop(k, None) for k in METRIC_KEYS}
        row.update(metrics)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def save(self, state: dict):
        """Write checkpoint.pt atomically: to a temporary file, then rename over the old one."""
        if not self.dist.is_main:
            return
        state = {"method": self.method, **state, "rng": _rng_state()}
        tmp = self.checkpoint_path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    def resume(self, args: Args, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """With --resume, load checkpoint.pt into the model and optimiser and return it (the method restores its
        own extra state from it); otherwise {"epoch": 0}."""
        if not args.resume:
            return {"epoch": 0}
        state = self.load(args)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:  # e.g. another head size, or --adv-bn toggled
            fail(f"{self.checkpoint_path} does not fit this model (were other flags used?): "
                 f"{str(err).splitlines()[0]}")
        print0(f"resumed {self.path} at epoch {state['epoch']}")
        return state

    def end_epoch(self, epoch: int, steps: int, args: Args, monitor: "Monitor", state, seconds: float,
                  **metrics):
        """After epoch `epoch` (0-based): one metrics line, the k-NN when due, and checkpoint.pt every
        --save-every epochs and after the last. `state()` returns what the method saves (model, optimiser, ...)."""
        done = epoch + 1
        knn_top1 = monitor.knn(epoch)
        self.log(epoch=done, step=done * steps, knn_top1=knn_top1, images_per_s=steps * args.batch_size / seconds,
                 time_s=seconds, **metrics)
        if knn_top1 is not None:
            print0(f"epoch {done}: loss {metrics.get('loss', float('nan')):.4f}  k-NN top-1 {knn_top1:.4f}")
        if done == args.epochs or done % args.save_every == 0:
            self.save({"epoch": done, "step": done * steps, "args": dataclasses.asdict(args),
                       "knn_untrained": monitor.untrained, **state()})

    def load(self, args: Args) -> dict:
        """Read checkpoint.pt (weights_only), refuse one from another method or architecture, restore the RNGs,
        and drop metric lines of epochs after the checkpoint (they will be run again)."""
        return load_checkpoint(self.checkpoint_path, self.method, args, self)

    def plot(self):
        """curves.png from metrics.jsonl, when matplotlib is installed."""
        if not self.dist.is_main:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
        keys = [k for k in ("loss", "knn_top1", "lr", "images_per_s") if any(r.get(k) is not None for r in rows)]
        keys += sorted({k for r in rows for k, v in r.items()
                        if k not in METRIC_KEYS and k not in keys and isinstance(v, (int, float))})[:4]
        if not keys:
            return
        fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3), squeeze=False)
        for ax, key in zip(axes[0], keys):
            pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
            ax.set_title(key)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{self.method}: {self.path.name}")
        fig.tight_layout()
        fig.savefig(self.path / "curves.png", dpi=100)
        plt.close(fig)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_checkpoint(path: Path, method: str, args: Args, run: RunDir | None = None) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"no checkpoint at {path}")
    except Exception as err:  # truncated, not a torch file, or holding objects weights_only refuses
        fail(f"cannot read {path}: not a valid checkpoint ({type(err).__name__}); the file is left as it is")
    if not isinstance(state, dict) or "model" not in state:
        fail(f"{path} is not a checkpoint of this project")
    if state.get("method") != method:
        fail(f"{path} was written by {state.get('method')}.py, not {method}.py")
    saved = state.get("args", {})
    for key in ("arch", "dataset"):
        if saved.get(key) != getattr(args, key):
            fail(f"{path} holds --{key} {saved.get(key)}, but this run asks for --{key} {getattr(args, key)}")
    rng = state.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "python" in rng:
        random.setstate(_to_tuple(rng["python"]))
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if run is not None and run.dist.is_main and run.metrics_path.exists():
        lines = run.metrics_path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("epoch", 0) <= state["epoch"]]
        if len(kept) != len(lines):
            run.metrics_path.write_text("".join(line + "\n" for line in kept))
    return state


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP and torch.compile wrappers (whose state_dict keys carry no prefix)."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


class Progress:
    """Prints `epoch e/E  step s/S  loss  lr  img/s  ETA` every `every` seconds and at the end of each epoch.

    The loss is read from the device (a host synchronisation) only when a line is printed.
    """

    def __init__(self, epochs: int, steps_per_epoch: int, start_epoch: int, every: float, dist: Dist):
        self.epochs, self.steps, self.every, self.dist = epochs, steps_per_epoch, every, dist
        self.start = time.perf_counter()
        self.done_steps = 0
        self.remaining = (epochs - start_epoch) * steps_per_epoch
        self.last_time, self.last_images = self.start, 0
        self.images = 0

    def update(self, epoch: int, step: int, loss: torch.Tensor, lr: float, images: int):
        """Call after each step; `images` is the global number of images in that step."""
        self.done_steps += 1
        self.images += images
        now = time.perf_counter()
        if now - self.last_time < self.every and step + 1 != self.steps:
            return
        loss_value = float(loss.detach())
        rate = (self.images - self.last_images) / max(now - self.last_time, 1e-9)
        eta = (now - self.start) / self.done_steps * (self.remaining - self.done_steps)
        self.last_time, self.last_images = now, self.images
        if self.dist.is_main:
            print(f"epoch {epoch + 1}/{self.epochs}  step {step + 1}/{self.steps}  loss {loss_value:.4f}  "
                  f"lr {lr:.4g}  {rate:,.0f} img/s  ETA {datetime.timedelta(seconds=round(eta))}", flush=True)

    def images_per_s(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)
