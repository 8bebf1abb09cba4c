"""BYOL: Bootstrap Your Own Latent, a new approach to self-supervised learning.
Grill, Strub, Altché, Tallec, Richemond et al., NeurIPS 2020. arXiv:2006.07733.
Official code: github.com/deepmind/deepmind-research/tree/master/byol

  x -> two random views v = t(x), v' = t'(x) (asymmetric: t and t' differ in blur and solarisation)
  online network (theta):   y = f(v), z = g(y), p = q(z)      encoder, projector, predictor
  target network (xi):      y' = f'(v'), z' = g'(y')          encoder and projector only; no gradient
  L = || p/|p| - z'/|z'| ||^2 = 2 - 2 cos(p, z')              per pair, mean over the batch
  L_total = L(p1, z'2) + L(p2, z'1)                           symmetrised: each view predicts the other's target
  theta <- LARS(theta, grad_theta L_total)                    (biases and BatchNorm excluded, warm-up + cosine)
  xi <- tau xi + (1 - tau) theta                              after every step
  tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2            k: the step, K: all steps; tau_base -> 1
  Both networks run in training mode (BatchNorm with batch statistics), the target too, as the official code.
  There are no negatives: the loss is a mean over pairs, so the global batch enters only through BatchNorm.

Run:   python byol.py --dataset digits --arch tiny --epochs 100 --batch-size 256 --workers 0
                                                    (offline, CPU; prints k-NN untrained vs trained)
       torchrun --nproc_per_node=8 byol.py --data-dir data --download --linear-epochs 100 --linear-lr 0.1
                                                    (solo-learn's CIFAR-10 recipe below, then the linear protocol)
       torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 byol.py ...
Defaults: solo-learn's CIFAR-10 recipe (scripts/pretrain/cifar/byol.yaml): ResNet-18 with the CIFAR stem,
       batch 256, 1000 epochs, LARS with learning rate 1.0 x 256/256, eta 0.02 clipped at the learning rate,
       weight decay 1e-5, 10 warm-up epochs then cosine, tau_base 0.99, projector and predictor 4096 hidden
       -> 256, colour jitter (0.4, 0.4, 0.2, 0.1) with probability 0.8, no blur on 32 px images, solarisation
       0.2 on the second view.
       The paper trains only on ImageNet (batch 4096, tau_base 0.996, blur 1.0 / 0.1); solo-learn's recipe is
       the published CIFAR-10 setting that keeps the official architecture, LARS and the per-step cosine tau.
Expect: 92.58% linear top-1 on CIFAR-10 after 1000 epochs (solo-learn's model zoo, ResNet-18, its linear
       classifier trained on the frozen representation alongside pre-training).

Where this file differs from the official code, and why:
  - The target starts as a copy of the online network; the official code draws it with its own random seed (and
    notes that this made no significant difference). A copy makes xi a running average of theta from step 0.
  - LARS clips the adapted rate as solo-learn's CIFAR recipe does (common.LARS with clip; --no-lars-clip: the official
    form). Its trust ratio divides by ||g + wd w|| as the official code (solo-learn: ||g|| + wd ||w||), and the
    lr multiplies the momentum buffer's increment (solo-learn: the whole buffer), as common.LARS.
  - Inputs are standardised with the dataset's channel mean and std, and the heads keep PyTorch's default
    initialisation (the official haiku layers draw from a truncated normal of the same fan-in scale).
  - The CIFAR stem's conv1 pads by 1 and starts from Kaiming fan-out (solo-learn's replaced conv1 pads by 2, which
    makes 34 x 34 maps, and keeps PyTorch's default initialisation); its warm-up starts at 3e-5 (here 0).
  - The online classifier (solo-learn: on the frozen representation during pre-training, SGD lr 0.1, its figure
    above) is replaced by the k-NN monitor, a fast probe, and the linear protocol (--linear-epochs 100, lr 0.1:
    solo-learn's classifier rate; its offline linear scripts run 100 epochs).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

import common

# -------- Args --------------------------------------------------------------------------------------------------------


@dataclass
class Args(common.Args):
    epochs: int = common.flag(1000, "training epochs (solo-learn's CIFAR-10 recipe)")
    batch_size: int = common.flag(256, "global batch N, split evenly over the processes")
    lr: float = common.flag(1.0, "base learning rate, scaled by batch_size / 256 (the official linear rule): 1.0 "
                            "at 256")
    weight_decay: float = common.flag(1e-5, "LARS weight decay (solo-learn's CIFAR-10 recipe; 1.5e-6 on ImageNet)")
    warmup_epochs: float = common.flag(10, "linear warm-up epochs before the cosine decay")
    tau_base: float = common.flag(0.99, "tau_base, the target's EMA rate at step 0, raised to 1 by a cosine (0.996 "
                                  "on ImageNet)", "in [0, 1]")
    proj_hidden_dim: int = common.flag(4096, "hidden width of the projector g and the predictor q", ">= 1")
    proj_dim: int = common.flag(256, "output size of g and q", ">= 1")
    crop_min_scale: float = common.flag(0.08, "smallest crop area as a fraction of the image (the paper's 0.08)",
                                        "in (0, 1]")
    blur: int = common.flag(-1, "Gaussian blur as the paper (view 1 always, view 2 with p 0.1): 1 on, 0 off, -1 "
                            "above 64 px", "in [-1, 1]")
    solarize: float = common.flag(0.2, "probability of solarisation of the second view (the first view is never "
                                  "solarised)", "in [0, 1]")
    momentum: float = common.flag(0.9, "LARS momentum")
    lars_eta: float = common.flag(0.02, "LARS trust coefficient (solo-learn's CIFAR-10 recipe; 0.001 in the "
                                  "official code)")
    lars_clip: bool = common.flag(True, "cap the adapted rate at the lr (solo-learn's clip_lr; --no-lars-clip: "
                                  "official LARS)")
    sync_bn: bool = common.flag(True, "BatchNorm statistics over the global batch (the official cross-replica "
                                "BatchNorm)")

    def check(self, world_size: int = 1):
        super().check(world_size)
        if self.batch_size // world_size < 2:
            raise ValueError("BatchNorm needs at least 2 images per process (--batch-size)")


# -------- Views -------------------------------------------------------------------------------------------------------


def byol_augment(info: common.DataInfo, size: int, blur: float = 0.0, solarize: float = 0.0,
                 min_scale: float = 0.08) -> T.Compose:
    """One random view, as the paper's Table 6: crop of 8-100% of the area (aspect 3/4-4/3) resized to `size`,
    horizontal flip, colour jitter (0.4, 0.4, 0.2, 0.1) with probability 0.8, grayscale with probability 0.2,
    Gaussian blur (kernel 10% of the side, sigma in [0.1, 2]) with probability `blur`, and solarisation
    (pixels above one half inverted) with probability `solarize`. The two views use different probabilities."""
    ops = [
        T.RandomResizedCrop(size, scale=(min_scale, 1.0), ratio=(3 / 4, 4 / 3)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if blur > 0:
        ops.append(T.RandomApply([T.GaussianBlur(2 * (size // 20) + 1, sigma=(0.1, 2.0))], p=blur))
    if solarize > 0:
        ops.append(T.RandomSolarize(threshold=128, p=solarize))  # on 8-bit images: x -> 255 - x where x >= 128
    return T.Compose(ops + [common.normalize(info)])


# -------- Model -------------------------------------------------------------------------------------------------------


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """The official networks.MLP: Linear (with bias) -> BatchNorm -> ReLU -> Linear (no bias)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim, bias=False))


class BYOL(nn.Module):
    """Online network (backbone f, projector g, predictor q) and target network (target_backbone f',
    target_projector g'), the target an exponential moving average of the online encoder and projector.

    The target's parameters never require gradient; its BatchNorm running statistics are its own (updated by
    its forward passes), as the official code keeps a separate state for each network."""

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 4096, proj_dim: int = 256):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(backbone.out_dim, proj_hidden_dim, proj_dim)
        self.predictor = mlp(proj_dim, proj_hidden_dim, proj_dim)
        self.target_backbone = copy.deepcopy(self.backbone)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self.target_parameters():
            p.requires_grad_(False)  # xi is never trained: it only follows theta through update_target

    def online_parameters(self):
        """theta of the EMA, in the same order as target_parameters()."""
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def target_parameters(self):
        return [*self.target_backbone.parameters(), *self.target_projector.parameters()]

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        """Each view on its own, as the official code (so BatchNorm normalises each view over its own batch).
        Returns the online predictions p1, p2 and the target projections z1, z2 (no gradient), each [n, proj_dim]."""
        p1, p2 = (self.predictor(self.projector(self.backbone(x))) for x in (x1, x2))
        with torch.no_grad():  # the target branch: no gradient reaches xi (the official stop_gradient)
            z1, z2 = (self.target_projector(self.target_backbone(x)) for x in (x1, x2))
        return p1, p2, z1, z2

    @torch.no_grad()
    def update_target(self, tau: float):
        """xi <- tau xi + (1 - tau) theta, in place (all parameters in a few multi-tensor kernels); no gradient."""
        torch._foreach_lerp_(self.target_parameters(), self.online_parameters(), 1 - tau)


def target_momentum(step: int, total_steps: int, base: float) -> float:
    """The paper's tau at step k of K: 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, from tau_base (k = 0) up to 1
    (k = K), never decreasing; steps past K stay at 1 (as the official schedules.target_ema)."""
    k = min(step, total_steps)
    return 1 - (1 - base) * (math.cos(math.pi * k / total_steps) + 1) / 2


# -------- Losses ------------------------------------------------------------------------------------------------------


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The paper's L: || p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z) for each pair, averaged over the N pairs.

    p: [N, D], online predictions q(g(f(v))); z: [N, D], target projections g'(f'(v')) of the other view. z is a
    target: it is detached here, so no gradient flows to it even if the caller forgot torch.no_grad.
    Each pair's term lies in [0, 4] (0 when p and z point the same way). Computed in float32 (float64 for float64
    inputs), also under autocast.
    """
    with torch.autocast(p.device.type, enabled=False):
        dtype = torch.promote_types(p.dtype, torch.float32)  # float32, or float64 when given float64
        p_hat = F.normalize(p.to(dtype), dim=1)  # [N, D]
        z_hat = F.normalize(z.detach().to(dtype), dim=1)  # [N, D], stop-gradient
        return (p_hat - z_hat).pow(2).sum(dim=1).mean()  # the squared distance: >= 0 exactly, no cancellation


# -------- Training ----------------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, args: Args) -> torch.optim.Optimizer:
    """The official optimiser: LARS on theta only (the target xi has no gradient) with lr = base_lr * N / 256;
    biases and BatchNorm (param_groups' second group) neither decayed nor adapted; clipped as solo-learn's."""
    base_lr = args.lr * args.batch_size / 256  # the official linear scaling rule
    return common.LARS(common.param_groups(model, args.weight_decay), lr=base_lr, momentum=args.momentum,
                       eta=args.lars_eta, clip=args.lars_clip)  # param_groups takes only theta: xi has no grad


def train_step(model: nn.Module, batch, optimizer, tau: float, args: Args) -> torch.Tensor:
    """One step of BYOL on one batch: L(p1, z'2) + L(p2, z'1), one LARS step on theta, then xi <- tau xi +
    (1 - tau) theta with this step's tau. `model` is the network as trained (DDP on several processes). Returns
    this process's loss (on the device, detached): a mean over its pairs, whose mean over processes is the global
    batch's loss."""
    (x1, x2), _ = batch
    x1, x2 = common.to_device([x1, x2], args)  # [n, C, H, W] each
    with common.autocast(args):
        p1, p2, z1, z2 = model(x1, x2)  # [n, proj_dim] each; z1, z2 without gradient
    # symmetrised: view 1's prediction regresses view 2's target projection and the other way round. The loss
    # is a per-pair mean, so DDP's average of the processes' gradients is the gradient of the global batch.
    loss = byol_loss(p1, z2) + byol_loss(p2, z1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    common.unwrap(model).update_target(tau)  # after theta's update, as the official code
    return loss.detach()


def train_one_epoch(model: nn.Module, loader, optimizer, lr_at, progress: common.Progress, args: Args) -> float:
    """One pass over this process's share of the data; returns the epoch's mean loss (global batch)."""
    model.train()  # the target too: batch statistics in both networks, as the official code
    total_steps = args.epochs * len(loader)
    total = torch.zeros((), device=args.device)
    progress.start(len(loader))  # the epoch's clock
    for i, batch in enumerate(loader):
        step = loader.epoch * len(loader) + i  # the global step: the schedule's clock
        lr = common.set_lr(optimizer, lr_at(step))
        tau = target_momentum(step, total_steps, args.tau_base)  # this step's
        loss = train_step(model, batch, optimizer, tau, args)
        total += loss
        progress.update(step, loss, lr, len(batch[1]))  # the images in this process's batch
    return common.all_reduce_mean(total / len(loader)).item()


# -------- Main --------------------------------------------------------------------------------------------------------


def main(args: Args):
    common.setup_distributed(args)
    info, size = common.dataset_info(args)
    blur = args.blur == 1 or (args.blur == -1 and size > 64)
    views = common.MultiView([byol_augment(info, size, 1.0 if blur else 0.0, 0.0, args.crop_min_scale),
                              byol_augment(info, size, 0.1 if blur else 0.0, args.solarize, args.crop_min_scale)])
    train_set, memory_set, test_set = common.training_and_eval_sets(args, views, common.eval_transform(info, size))
    train_data = common.TrainData(train_set, views, args)  # on the device (--data-path) or the CPU DataLoader
    run = common.RunDir(args, "byol")

    model = BYOL(common.build_backbone(args.arch, info.channels, size), args.proj_hidden_dim, args.proj_dim)
    model = common.prepare_model(model, args)
    optimizer = build_optimizer(model, args)
    base_lr = optimizer.defaults["lr"]  # the scaled rate the schedule starts from
    start = run.resume(model, optimizer)["epoch"]  # the target network is part of the model's state_dict
    ddp_model = common.distribute(model, args)  # the model as trained: DDP on several processes

    lr_at = common.lr_schedule(args, train_data.steps, base_lr)
    evaluation = common.Evaluation(memory_set, test_set, info.num_classes, args)
    progress = common.Progress(args)
    common.print0(f"BYOL {args.arch} on {args.dataset}: {len(train_set)} images, {train_data.steps} steps of "
                  f"{args.batch_size} per epoch, {common.world()[1]} process(es) on {args.device}")
    if start == 0:
        run.log(epoch=0, step=0, knn_top1=evaluation.knn(model.backbone))
    for epoch in range(start, args.epochs):
        loss = train_one_epoch(ddp_model, train_data.loader(epoch), optimizer, lr_at, progress, args)
        knn_top1 = evaluation.knn(model.backbone, epoch + 1) if evaluation.due(epoch) else None
        tau = target_momentum((epoch + 1) * train_data.steps - 1, args.epochs * train_data.steps, args.tau_base)
        run.log(epoch=epoch + 1, loss=loss, knn_top1=knn_top1, tau=tau, **progress.summary())
        run.save(epoch + 1, model=model.state_dict(), optimizer=optimizer.state_dict())
    evaluation.report(model.backbone, run)
    common.cleanup_distributed()


if __name__ == "__main__":
    main(common.parse(Args))
