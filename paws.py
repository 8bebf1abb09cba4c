"""PAWS: Semi-Supervised Learning of Visual Features by Non-Parametrically Predicting View Assignments with
Support Samples. Assran, Caron, Misra, Bojanowski, Joulin, Ballas & Rabbat, ICCV 2021. arXiv:2104.13963.
Official code: github.com/facebookresearch/suncet

  A small labelled support set S (images x_S, labels y_S of K classes) and a large unlabelled set D.
  x in D -> two global views x_1, x_2 (and M smaller multi-crop views);  z = g(f(x)), z_S = g(f(x_S))
  y_S    <- (1 - eps) onehot(y_S) + eps / K                    label smoothing of the support labels
  pi(z, z_S) = softmax( norm(z) . norm(z_S)^T / tau ) @ y_S   soft nearest-neighbour (SNN) class prediction
  rho(p)_k   = p_k^(1/T) / sum_j p_j^(1/T)                     sharpening, T < 1
  p_1 = pi(z_1, z_S), p_2 = pi(z_2, z_S)                       anchors' predictions (with gradient)
  t_1 = rho(p_2), t_2 = rho(p_1)                               targets from the other view: no gradient
  t_crop = (t_1 + t_2) / 2                                     target of every multi-crop view
  t <- 0 where t < 1e-4                                        (the official code's numerical guard)
  L = CE + ME-MAX,  CE = mean over anchors of H(t, p) = -sum_k t_k log p_k
  ME-MAX = -H(p_bar),  p_bar = mean over anchors (and processes) of rho(p)    keeps every class in use
  The supports of all processes are gathered (with gradient) before the SNN; a step draws alike from each class.
  PAWS-NN (evaluation, the official snn_eval): argmax_k pi(z, z_L)_k over all labelled images (one-hot, unaugmented).
  Fine-tuning (optional, the official snn_fine_tune): a copy of f and g trained on the labelled images alone with
  SuNCEt, L_ft = mean_i H(y_i, sum_{j != i} softmax_j(norm(z_i) . norm(z_j) / tau) y_j), BatchNorm frozen.

Run:   python paws.py --dataset digits --arch tiny --num-labels 100 --classes-per-batch 10 --supports-per-class 4
              --multicrop 2 --epochs 30 --batch-size 128 --warmup-epochs 2 --workers 0   (CPU, offline; torchrun too)
       torchrun --nproc_per_node=8 paws.py --data-dir data --download   (official recipe, fine-tuning included)
       torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 paws.py ...
Defaults: configs/paws/cifar10_train.yaml: WRN-28-2 of its wide_resnet.py (conv biases, downsampling stride in a
       block's second conv, PyTorch's init, last BatchNorm momentum 0.99), 3-layer head to 128-d, 256 unlabelled
       images a step, 2 global views + 6 multi-crops, supports 10 classes x 64 images x 2 views, 4,000 labels, tau
       0.1, T 0.25, smoothing 0.1, ME-MAX, 600 epochs, LARS (decay 1e-6), lr 0.8 -> 3.2 in 10 epochs, cosine to 0.032.
       Evaluation (README, no linear probe): SuNCEt fine-tuning (cifar10_snn.yaml: 30 epochs, lr 0.1 -> 0.01), PAWS-NN.
Expect: PAWS-NN 96.0 +- 0.2% top-1 on CIFAR-10, 4,000 labels, after fine-tuning (finetune_snn_top1; paper, WRN-28-2).

Where this file differs from the official code, and why:
  - --batch-size and --supports-per-class are global (split over the processes), so a run means the same on any
    number of processes; the official values are per GPU (its CIFAR-10 recipe runs on one).
  - Support labels have K = classes_per_batch columns (the step's classes, sorted); the official matrix has
    K x world_size on several processes, which puts smoothing mass on columns no support belongs to.
  - Labels: a seeded class-balanced draw (--num-labels, --label-seed) or --label-file (spc.4000_split.152.txt).
  - LARS's trust is eta |w| / |g + wd w| (official: eta |w| / (|g| + wd |w|)): within 1e-6 at its weight decay.
    Inputs use the CIFAR-10 std (0.247, 0.243, 0.261) of every file here, not (0.2023, 0.1994, 0.2010): 1.2x.
  - Fine-tuning (an epoch: a pass over the labels) follows training in one command, on a copy of f and g.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

import common

# -------- Args --------------------------------------------------------------------------------------------------------


@dataclass
class Args(common.Args):
    arch: str = common.flag("wrn28_2", "encoder f (official CIFAR-10: Wide-ResNet-28-2)")
    epochs: int = common.flag(600, "training epochs (official CIFAR-10 config)")
    batch_size: int = common.flag(256, "global number of unlabelled images a step, split evenly over the processes")
    lr: float = common.flag(3.2, "learning rate after the warm-up (not scaled with the batch, as the official code)")
    start_lr: float = common.flag(0.8, "learning rate at the first step of the warm-up", ">= 0")
    final_lr: float = common.flag(0.032, "learning rate at the end of the cosine decay", ">= 0")
    weight_decay: float = common.flag(1e-6, "LARS weight decay (official CIFAR-10 config)")
    warmup_epochs: float = common.flag(10, "linear warm-up epochs from --start-lr to --lr before the cosine decay")
    momentum: float = common.flag(0.9, "LARS momentum")
    lars_eta: float = common.flag(0.001, "LARS trust coefficient")
    num_labels: int = common.flag(4000, "labelled images: a class-balanced subset drawn with --label-seed", ">= 1")
    label_seed: int = common.flag(152, "seed of the labelled split (official CIFAR-10 split files are named by seed)")
    label_file: str = common.flag("", "file of training-set indices, one a line: the labelled subset instead")
    classes_per_batch: int = common.flag(10, "classes whose supports every step draws", ">= 2 (for the SNN to choose)")
    supports_per_class: int = common.flag(64, "labelled images a step from each of those classes (global)", "positive")
    support_views: int = common.flag(2, "augmented views of each support image", "positive")
    multicrop: int = common.flag(6, "small multi-crop views of each unlabelled image besides its 2 global ones", ">= 0")
    temperature: float = common.flag(0.1, "tau of the soft nearest-neighbour classifier: training, PAWS-NN", "positive")
    sharpen: float = common.flag(0.25, "T, the sharpening temperature of the targets", "positive")
    label_smoothing: float = common.flag(0.1, "eps of the support labels", "in [0, 1)")
    me_max: bool = common.flag(True, "add ME-MAX, the negative entropy of the mean sharpened prediction")
    proj_dim: int = common.flag(128, "output size of the projection head g", "positive")
    jitter_strength: float = common.flag(0.5, "s: colour jitter of brightness, contrast, saturation 0.8s and hue "
                                         "0.2s", "in [0, 2.5] (hue 0.2s <= 0.5)")
    supervised_only: bool = common.flag(False, "baseline: a linear classifier with cross-entropy on the supports alone")
    sync_bn: bool = common.flag(True, "BatchNorm statistics over the global batch (official: SyncBatchNorm)")
    finetune_epochs: int = common.flag(30, "after training, fine-tune a copy of f and g on the labelled set "
                                       "(official CIFAR-10)", ">= 0")
    finetune_lr: float = common.flag(0.1, "fine-tuning learning rate at its first step (official CIFAR-10)", "positive")
    finetune_final_lr: float = common.flag(0.01, "fine-tuning learning rate at its last step (cosine decay)", ">= 0")
    FREE_ON_RESUME = common.Args.FREE_ON_RESUME + ("finetune_epochs", "finetune_lr", "finetune_final_lr")  # after it

    def check(self, world_size: int = 1):
        super().check(world_size)
        if self.supports_per_class % world_size:
            raise ValueError(f"--supports-per-class does not divide evenly over {world_size} processes")


# -------- Views -------------------------------------------------------------------------------------------------------


def paws_augment(info: common.DataInfo, size: int, scale: tuple, strength: float, small: bool) -> T.Compose:
    """One random view, as the official data_manager: crop of `scale` of the area resized to `size`, flip, colour
    jitter (p 0.8), then solarize and equalize (p 0.2 each) for `small` images (CIFAR-like), grayscale (p 0.2)
    and Gaussian blur (p 0.5) for large ones (ImageNet-like)."""
    s = strength
    ops = [T.RandomResizedCrop(size, scale=scale), T.RandomHorizontalFlip(),
           T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8)]
    ops += [RandomSolarizeThreshold(threshold=128, p=0.2), T.RandomEqualize(p=0.2)] if small else [
        T.RandomGrayscale(p=0.2), T.RandomApply([T.GaussianBlur(2 * (size // 20) + 1, sigma=(0.1, 2.0))], p=0.5)]
    return T.Compose(ops + [common.normalize(info)])


class RandomSolarizeThreshold(T.RandomSolarize):
    """With probability p, solarise with a threshold drawn uniformly in [0, 256) for each image: the official
    Solarize of PAWS (torchvision's RandomSolarize has a fixed threshold). device_data.py reads threshold_range."""
    threshold_range = (0.0, 256.0)

    def forward(self, img):
        return T.functional.solarize(img, float(256 * torch.rand(()))) if torch.rand(()) < self.p else img


def paws_views(info: common.DataInfo, size: int, multicrop: int, strength: float) -> tuple:
    """(views of an unlabelled image: 2 global + `multicrop` small, the global view of a support image).
    Crop scales as the official code: small images 75-100% (50-100% without multi-crop) at full size and 30-75%
    at 9/16 of the side (18 px on CIFAR); large images 14-100% (8-100%) and 5-14% at 96/224 of the side."""
    small = size <= 64
    scale = ((0.75, 1.0) if multicrop else (0.5, 1.0)) if small else ((0.14, 1.0) if multicrop else (0.08, 1.0))
    global_view = paws_augment(info, size, scale, strength, small)
    mc_size = max(1, round(size * 18 / 32)) if small else round(size * 96 / 224)
    mc_view = paws_augment(info, mc_size, (0.3, 0.75) if small else (0.05, 0.14), strength, small)
    return common.MultiView([global_view] * 2 + [mc_view] * multicrop), global_view


def finetune_view(info: common.DataInfo, size: int) -> T.Compose:
    """The official fine-tuning view, no colour distortion: small images flipped only (its centre crop of a 32 px
    image is all of it; RandomCrop at full size, which the device path can make), large ones a resized crop too."""
    ops = ([T.RandomResizedCrop(size)] if size > 64 else [T.RandomCrop(size)] if size == info.size
           else [T.Resize(size), T.CenterCrop(size)])
    return T.Compose(ops + [T.RandomHorizontalFlip(), common.normalize(info)])


class ClassStratifiedSampler(torch.utils.data.Sampler):
    """`steps` batches of support indices, `classes_per_batch` classes x `supports_per_class` images (global), class by
    class; process `rank` of `world_size` gets the rank-th slice of each class's images. Classes and images come in a
    fresh random order at each pass (none drawn twice before all are drawn), alike on every process (seed, epoch)."""

    def __init__(self, targets, classes_per_batch: int, supports_per_class: int, steps: int, seed: int = 0,
                 epoch: int = 0, rank: int = 0, world_size: int = 1):
        self.targets = torch.as_tensor(list(targets))
        self.classes = self.targets.unique()
        if not 1 <= classes_per_batch <= len(self.classes) or supports_per_class % world_size:
            raise ValueError(f"classes_per_batch {classes_per_batch} must be in [1, {len(self.classes)}] (the "
                             f"labelled classes), supports_per_class {supports_per_class} divide over {world_size}")
        self.cpb, self.spc, self.steps = classes_per_batch, supports_per_class, steps
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size

    def __len__(self):
        return self.steps

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        members = [torch.nonzero(self.targets == c).flatten() for c in self.classes]  # dataset indices per class
        queues, class_order = [[] for _ in self.classes], []  # per class: its images still to draw; classes to come
        share = self.spc // self.world_size
        for _ in range(self.steps):
            if len(class_order) < self.cpb:  # a new pass over the classes, in a new random order
                class_order = torch.randperm(len(self.classes), generator=g).tolist()
            picked, class_order = class_order[:self.cpb], class_order[self.cpb:]
            batch = []
            for c in picked:
                while len(queues[c]) < self.spc:  # refill with a fresh shuffle of the class's images
                    queues[c] += members[c][torch.randperm(len(members[c]), generator=g)].tolist()
                drawn, queues[c] = queues[c][:self.spc], queues[c][self.spc:]
                batch += drawn[self.rank * share:(self.rank + 1) * share]
            yield batch


def labelled_indices(targets, args: Args) -> list[int]:
    """The labelled subset: indices into the training set, from --label-file or a seeded class-balanced draw."""
    if not args.label_file:
        if args.num_labels > len(targets):
            common.fail(f"--num-labels {args.num_labels} is larger than the training set ({len(targets)} images)")
        return common.balanced_subset(targets, args.num_labels, seed=args.label_seed)
    try:
        indices = sorted({int(v) for v in Path(args.label_file).read_text().split()})
    except (OSError, ValueError) as err:
        common.fail(f"cannot read --label-file {args.label_file}: {err}")
    if not indices or indices[0] < 0 or indices[-1] >= len(targets):
        common.fail(f"--label-file {args.label_file} must hold indices in [0, {len(targets)}) of the training set")
    return indices


# -------- Model -------------------------------------------------------------------------------------------------------


class PAWS(nn.Module):
    """z = g(f(x)), g as the official code: Linear-BN-ReLU, Linear-BN-ReLU, Linear, hidden width the encoder's (128
    for WRN-28-2). With `num_classes` (--supervised-only), logits=True gives a linear classifier's logits on z."""

    def __init__(self, backbone: nn.Module, proj_dim: int = 128, num_classes: int = 0):
        super().__init__()
        self.backbone, d = backbone, backbone.out_dim
        self.projector = nn.Sequential(
            nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU(inplace=True),
            nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU(inplace=True),
            nn.Linear(d, proj_dim))
        self.classifier = nn.Linear(proj_dim, num_classes) if num_classes else None

    def forward(self, x: torch.Tensor, logits: bool = False) -> torch.Tensor:
        z = self.projector(self.backbone(x))  # [B, proj_dim]
        return self.classifier(z) if logits else z


# -------- Losses ------------------------------------------------------------------------------------------------------


def smooth_labels(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Label smoothing: y [S] integer classes -> [S, K] rows (1 - smoothing) onehot(y) + smoothing / K."""
    onehot = (y[:, None] == torch.arange(num_classes, device=y.device)).float()  # [S, K]
    return onehot * (1 - smoothing) + smoothing / num_classes


def sharpen(p: torch.Tensor, T_sharp: float) -> torch.Tensor:
    """rho(p) of each row of p [N, K] (T: T_sharp), as softmax(log p / T), which does not underflow to 0/0."""
    return torch.softmax(torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)) / T_sharp, dim=1)


def snn(query: torch.Tensor, supports: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """pi (module docstring): query [N, D], supports [S, D], labels [S, K] (rows distributions) -> [N, K]."""
    query, supports = F.normalize(query, dim=1), F.normalize(supports, dim=1)
    return torch.softmax(query @ supports.T / tau, dim=1) @ labels  # [N, S] @ [S, K]


def paws_loss(z: torch.Tensor, z_S: torch.Tensor, y_S: torch.Tensor, tau: float, T_sharp: float,
              multicrop: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """PAWS's two terms (CE, ME-MAX), as the official init_paws_loss, in float32 (float64 for float64 inputs).
    z: [(2 + M) n, D], the views of n unlabelled images: global view 1, global view 2, then M multi-crop views,
    each a block of n rows in the same image order; z_S: [S, D], the supports of all processes; y_S: [S, K]."""
    with torch.autocast(z.device.type, enabled=False):
        dtype = torch.promote_types(z.dtype, torch.float32)
        z, z_S, y_S = z.to(dtype), z_S.to(dtype), y_S.to(dtype)
        n = len(z) // (2 + multicrop)
        p = snn(z, z_S, y_S, tau)  # [(2+M)n, K] anchors' predictions
        with torch.no_grad():  # targets: no gradient reaches the network through them
            t = sharpen(torch.cat([p[n:2 * n], p[:n]]), T_sharp)  # [2n, K]: t_1 = rho(p_2), t_2 = rho(p_1)
            t_crop = 0.5 * (t[:n] + t[n:])  # [n, K]
            t = torch.cat([t] + [t_crop] * multicrop)  # [(2+M)n, K]
            t = t.masked_fill(t < 1e-4, 0.0)
        ce = -(t * torch.log(p.clamp_min(torch.finfo(dtype).tiny))).sum(dim=1).mean()
        p_bar = sharpen(p, T_sharp).mean(dim=0)  # [K]
        # the mean over all processes' anchors (official AllReduce): the gradient flows to this process's anchors
        p_bar = p_bar + (common.all_reduce_mean(p_bar.detach()) - p_bar.detach())
        me_max = (p_bar * torch.log(p_bar.clamp_min(torch.finfo(dtype).tiny))).sum()  # -H(p_bar), in [-log K, 0]
        return ce, me_max


def suncet_loss(z: torch.Tensor, z_S: torch.Tensor, y_S: torch.Tensor, tau: float, offset: int = 0) -> torch.Tensor:
    """SuNCEt, the official fine-tuning loss L_ft (module docstring), in float32 (float64 for float64 inputs).
    z: [s, D], this process's supports, rows offset .. offset + s of z_S: [S, D], all processes'; y_S: [S, K]."""
    with torch.autocast(z.device.type, enabled=False):
        dtype = torch.promote_types(z.dtype, torch.float32)
        q, k, y_S = F.normalize(z.to(dtype), dim=1), F.normalize(z_S.to(dtype), dim=1), y_S.to(dtype)
        own = torch.eye(len(q), len(k), dtype=torch.bool, device=q.device).roll(offset, 1)  # [s, S] z_i's own row
        p = torch.softmax((q @ k.T / tau).masked_fill(own, float("-inf")), dim=1) @ y_S  # [s, K], j != i
        y = y_S[offset:offset + len(q)]
        return -(y * torch.log(p.clamp_min(torch.finfo(dtype).tiny))).sum(dim=1).mean()


# -------- Training ----------------------------------------------------------------------------------------------------


def support_labels(y: torch.Tensor, views: int, num_classes: int, smoothing: float) -> torch.Tensor:
    """Smoothed labels [views * s * world_size, K] of the gathered supports (rows as gather_with_grad's) from this
    process's classes y [s], numbered 0..K-1 among the step's classes by sorting: torch.unique makes the host wait."""
    y = common.gather_no_grad(y.repeat(views))  # [S]
    s = y.sort().values
    first = torch.cat([torch.ones_like(s[:1], dtype=torch.bool), s[1:] != s[:-1]])  # [S] a class's first row
    slot = first.cumsum(0)[torch.searchsorted(s, y)] - 1  # [S] the label's place among the step's classes
    return smooth_labels(slot, num_classes, smoothing)


def support_batches(supports: common.TrainData, args: Args, epoch: int, steps: int):
    """This process's class-stratified support batches (views, labels) of `steps` steps; views of their own (salt 1)."""
    sampler = ClassStratifiedSampler(supports.train_set.targets, args.classes_per_batch, args.supports_per_class,
                                     steps, args.seed, epoch, *common.world())  # rank, world size
    return supports.loader(epoch, sampler, salt=1)


def build_optimizer(model: nn.Module, args: Args) -> torch.optim.Optimizer:
    """LARS, biases and norms neither decayed nor adapted; --lr not scaled with the batch, as the official code."""
    return common.LARS(common.param_groups(model, args.weight_decay), lr=args.lr, momentum=args.momentum,
                       eta=args.lars_eta)


def train_step(model: nn.Module, batch, optimizer, support_batch, args: Args) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of PAWS on unlabelled views `batch` and `support_batch` (views, labels): L = CE + ME-MAX against the
    supports of all processes. Returns the loss and its terms [2] (detached); --supervised-only ignores `batch`."""
    (support_views, y), (views, _) = support_batch, batch
    x_S, y = torch.cat(common.to_device(support_views, args)), common.to_device(y, args)  # [V s, C, H, W], [s]
    if args.supervised_only:
        with common.autocast(args):
            logits = model(x_S, logits=True)  # [V s, num_classes]
        ce = F.cross_entropy(logits.float(), y.repeat(args.support_views), label_smoothing=args.label_smoothing)
        loss, me_max = ce, torch.zeros((), device=args.device)
    else:
        x = common.to_device(views, args)  # 2 + M tensors [n, C, H, W]
        n = len(x[0])
        with common.autocast(args):
            # global views and supports in one pass (BatchNorm over both), multi-crops in a second, as official
            z = model(torch.cat(x[:2] + [x_S]))  # [2n + V s, D]
            z_views = torch.cat([z[:2 * n], model(torch.cat(x[2:]))]) if args.multicrop else z[:2 * n]
        # the supports of all processes, with gradient, so every anchor is classified by the global support set
        z_S = common.gather_with_grad(z[2 * n:])
        y_S = support_labels(y, args.support_views, args.classes_per_batch, args.label_smoothing)
        ce, me_max = paws_loss(z_views, z_S, y_S, args.temperature, args.sharpen, args.multicrop)
        loss = ce + me_max if args.me_max else ce
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), torch.stack([ce, me_max]).detach()


def train_one_epoch(model: nn.Module, loader, supports, optimizer, lr_at, progress: common.Progress,
                    args: Args) -> tuple[float, float]:
    """One pass over this process's unlabelled data (`loader`; None with --supervised-only: the supports alone) and
    the epoch's `supports`; returns the mean (CE, ME-MAX) over all processes."""
    model.train()
    totals = torch.zeros(2, device=args.device)  # sums of CE and ME-MAX
    unlabelled = loader if loader is not None else [(None, None)] * len(supports)
    progress.start(len(supports))  # the epoch's clock
    for i, (support_batch, batch) in enumerate(zip(supports, unlabelled)):
        step = supports.epoch * len(supports) + i  # the global step: the schedule's clock
        lr = common.set_lr(optimizer, lr_at(step))
        loss, terms = train_step(model, batch, optimizer, support_batch, args)
        totals += terms
        progress.update(step, loss, lr, len(support_batch[1]) + (len(batch[0][0]) if loader is not None else 0))
    return tuple(common.all_reduce_mean(totals / len(supports)).tolist())


def finetune(model: nn.Module, supports: common.TrainData, args: Args, run: common.RunDir) -> nn.Module:
    """The official snn_fine_tune (module docstring) on class-stratified batches of `supports`: the tuned copy.
    Epoch e is seeded as epoch --epochs + e, so a resumed run repeats it exactly."""
    tuned = copy.deepcopy(model)
    if tuned.classifier is not None:  # the baseline's classifier takes no part in SuNCEt
        tuned.classifier.requires_grad_(False)
    ddp_tuned = common.distribute(tuned, args)
    optimizer = common.LARS(common.param_groups(tuned, 0.0), lr=args.finetune_lr, momentum=args.momentum,
                            eta=args.lars_eta)
    steps = max(1, len(supports.train_set) // (args.classes_per_batch * args.supports_per_class))  # a pass
    last = args.finetune_epochs * steps - 1  # the step that reaches --finetune-final-lr
    progress = common.Progress(args, epochs=args.epochs + args.finetune_epochs)
    ddp_tuned.train()  # but BatchNorm keeps the statistics of training, as the official fine-tuning
    ddp_tuned.apply(lambda m: m.eval() if isinstance(m, nn.modules.batchnorm._BatchNorm) else None)
    for epoch in range(args.epochs, args.epochs + args.finetune_epochs):
        total_loss = torch.zeros((), device=args.device)
        progress.start(steps)  # the epoch's clock
        for i, (views, y) in enumerate(support_batches(supports, args, epoch, steps)):
            step = (epoch - args.epochs) * steps + i  # of the fine-tuning: cosine, no warm-up
            lr = common.set_lr(optimizer, common.warmup_cosine(step, last, 0, args.finetune_lr, args.finetune_final_lr))
            with common.autocast(args):
                z = ddp_tuned(torch.cat(common.to_device(views, args)))  # [V s, D]
            y_S = support_labels(common.to_device(y, args), args.support_views, args.classes_per_batch, 0.0)
            # the supports of all processes, with gradient: [V s W, D], this process's rows at rank * V s
            loss = suncet_loss(z, common.gather_with_grad(z), y_S, args.temperature, offset=common.world()[0] * len(z))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach()
            progress.update(epoch * steps + i, loss, lr, len(z))  # the run's step: after training's
        run.log(epoch=epoch + 1, finetune_loss=common.all_reduce_mean(total_loss / steps).item(), **progress.summary())
    return tuned


@torch.no_grad()
def snn_accuracy(model: nn.Module, labelled_set, test_set, num_classes: int, args: Args) -> float:
    """PAWS-NN top-1: the SNN classifier over the embeddings z of every labelled image (one-hot labels)."""
    (z_L, y_L), (z, y) = (common.extract_features(model, s, args) for s in (labelled_set, test_set))
    probs = torch.cat([snn(q, z_L, F.one_hot(y_L, num_classes).float(), args.temperature) for q in z.split(1024)])
    return common.topk_accuracy(probs, y, (1,))[0]


# -------- Main --------------------------------------------------------------------------------------------------------


def main(args: Args):
    common.setup_distributed(args)
    info, size = common.dataset_info(args)
    views, support_view = paws_views(info, size, args.multicrop, args.jitter_strength)
    train_set, memory_set, test_set = common.training_and_eval_sets(args, views, common.eval_transform(info, size))
    support_views = common.MultiView([support_view] * args.support_views)
    labelled = labelled_indices(train_set.targets, args)
    in_split = [train_set.indices[i] for i in labelled] if args.subset else labelled  # rows of the training split
    support_set = common.Subset(common.load_dataset(args, True, support_views), in_split)
    paws_nn = functools.partial(snn_accuracy, labelled_set=common.Subset(memory_set, labelled), test_set=test_set,
                                num_classes=info.num_classes, args=args)  # network -> its PAWS-NN top-1
    if args.classes_per_batch > len(set(support_set.targets)):
        common.fail(f"--classes-per-batch {args.classes_per_batch} is more than the labelled subset's classes")
    train_data = common.TrainData(train_set, views, args)  # on the device (--data-path) or the CPU DataLoader
    supports = common.TrainData(support_set, support_views, args)
    run = common.RunDir(args, "paws")

    backbone = common.build_backbone(args.arch, info.channels, size, style="suncet")
    model = common.prepare_model(PAWS(backbone, args.proj_dim, info.num_classes if args.supervised_only else 0), args)
    optimizer = build_optimizer(model, args)
    state = run.resume(model, optimizer)
    ddp_model = common.distribute(model, args)  # the model as trained: DDP on several processes

    lr_at = common.lr_schedule(args, train_data.steps, args.lr, args.final_lr, args.start_lr)  # the official schedule
    evaluation = common.Evaluation(memory_set, test_set, info.num_classes, args)
    progress = common.Progress(args)
    common.print0(f"PAWS {args.arch} on {args.dataset}: {len(train_set)} images ({len(labelled)} labelled), "
                  f"{train_data.steps} steps of {args.batch_size} + {args.classes_per_batch} x "
                  f"{args.supports_per_class} supports per epoch, {common.world()[1]} process(es) on {args.device}")
    if state["epoch"] == 0:  # the untrained network's k-NN and PAWS-NN
        run.log(epoch=0, step=0, knn_top1=evaluation.knn(model.backbone), snn_top1=paws_nn(model))
    for epoch in range(state["epoch"], args.epochs):
        loader = None if args.supervised_only else train_data.loader(epoch)
        ce, me_max = train_one_epoch(ddp_model, loader, support_batches(supports, args, epoch, train_data.steps),
                                     optimizer, lr_at, progress, args)
        knn_top1 = evaluation.knn(model.backbone, epoch + 1) if evaluation.due(epoch) else None
        run.log(epoch=epoch + 1, loss=ce + me_max if args.me_max else ce, knn_top1=knn_top1, ce=ce, me_max=me_max,
                **progress.summary())
        run.save(epoch + 1, model=model.state_dict(), optimizer=optimizer.state_dict())
    extra = {"snn_top1_untrained": run.history[0]["snn_top1"], "snn_top1": paws_nn(model)}
    common.print0(f"PAWS-NN top-1: untrained {extra['snn_top1_untrained']:.4f} -> trained {extra['snn_top1']:.4f}")
    if args.finetune_epochs:
        if "finetuned" in state:  # a resumed run whose fine-tuning had finished
            tuned = copy.deepcopy(model)
            tuned.load_state_dict(state["finetuned"])
        else:
            finetune_views = common.MultiView([finetune_view(info, size)] * args.support_views)
            finetune_set = common.Subset(common.load_dataset(args, True, finetune_views), in_split)
            tuned = finetune(model, common.TrainData(finetune_set, finetune_views, args), args, run)
            run.save(args.epochs, force=True, model=model.state_dict(), optimizer=optimizer.state_dict(),
                     finetuned=tuned.state_dict())
        extra["finetune_snn_top1"] = paws_nn(tuned)
        common.print0(f"PAWS-NN top-1 after fine-tuning: {extra['finetune_snn_top1']:.4f}")
    if args.supervised_only:  # the baseline's own classifier, the other way it can use its labels
        classifier = nn.Sequential(model.backbone, model.projector, model.classifier)  # model(x, logits=True)
        logits, y = common.extract_features(classifier, test_set, args)
        extra["classifier_top1"] = common.topk_accuracy(logits, y, (1,))[0]
        common.print0(f"classifier top-1: {extra['classifier_top1']:.4f}")
    evaluation.report(model.backbone, run, **extra)
    common.cleanup_distributed()


if __name__ == "__main__":
    main(common.parse(Args))
