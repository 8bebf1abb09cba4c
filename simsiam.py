"""SimSiam: Exploring Simple Siamese Representation Learning.
Chen & He, CVPR 2021. arXiv:2011.10566. Official code: github.com/facebookresearch/simsiam

  x -> two random views x1, x2 (crop + resize, flip, colour jitter, grayscale; blur on large images)
  z = f(x)                      encoder: backbone + projection MLP (its last BatchNorm has no affine parameters)
  p = h(z)                      prediction MLP, a bottleneck (2048 -> 512 -> 2048)
  D(p, z) = - p/|p| . z/|z|     negative cosine similarity
  L = 1/2 D(p1, stopgrad(z2)) + 1/2 D(p2, stopgrad(z1))      mean over the batch; L in [-1, 1]
  The stop-gradient is the method: without it the outputs collapse (the paper: L -> -1 at once, the std of z/|z|
  over the batch to 0; about 1/sqrt(d) per channel when healthy). No negatives, no momentum encoder. (The
  projector's last BatchNorm keeps the std above 0; the collapse shows in the k-NN: RESULTS.md.)
  SGD, lr = base_lr * N / 256, cosine decay, no warm-up; the predictor's lr is kept at lr (not decayed).

Run:   python simsiam.py --dataset digits --arch tiny --epochs 100 --batch-size 256 --workers 0
                                                    (offline, CPU; prints k-NN untrained vs trained)
       torchrun --nproc_per_node=8 simsiam.py --data-dir data --download --linear-epochs 90 --linear-lr 0.1
                                                    (the paper's CIFAR-10 recipe below, then the linear protocol)
       torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 simsiam.py ...
       python simsiam.py ... --no-stop-grad              (the paper's ablation: collapses; watch z_std)
Defaults: the paper's CIFAR-10 setting (its appendix, "CIFAR Experiments"): the CIFAR variant of ResNet-18,
       batch 512, 800 epochs, SGD with base lr 0.03 (x 512/256 = 0.06), momentum 0.9, weight decay 5e-4, cosine
       decay, 32 px crops without blur, a 2-layer projection MLP with 2048-d outputs (3 layers on ImageNet); the
       prediction MLP of ImageNet (2048 -> 512 -> 2048), which the appendix leaves unchanged; the predictor's lr
       fixed (the official command's --fix-pred-lr) and zero-initialised residual branches (the official builder).
Expect: 91.8% linear top-1 on CIFAR-10 after 800 epochs (the paper's appendix, ResNet-18 CIFAR variant).

Where this file differs from the official code, and why:
  - The cosine decay is evaluated at every step; the official code changes the lr once per epoch.
  - The projector's hidden layers are proj_dim wide (2048). The official ImageNet code makes them as wide as the
    backbone's output (2048 for ResNet-50, the same number); for the 512-d ResNet-18 this keeps the 2048 of the
    paper's CIFAR outputs, as solo-learn's CIFAR recipe does.
  - The projector's output layer has no bias; the official one has a frozen bias, which the following BatchNorm
    without affine parameters cancels anyway.
  - Inputs are standardised with the dataset's channel mean and std (the official code uses ImageNet's for any
    data). Evaluation: the k-NN monitor, a fast probe, and the linear protocol: main_lincls.py's 90 epochs, cosine,
    no weight decay, SGD at 0.1 x batch / 256 (its README runs LARS at 0.02 x 4096 / 256, which is not here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

import common

# -------- Args --------------------------------------------------------------------------------------------------------


@dataclass
class Args(common.Args):
    epochs: int = common.flag(800, "training epochs (the paper's CIFAR-10 setting)")
    batch_size: int = common.flag(512, "global batch N, split evenly over the processes")
    lr: float = common.flag(0.03, "base learning rate, scaled by batch_size / 256 (the paper's rule): 0.06 at 512")
    weight_decay: float = common.flag(5e-4, "SGD weight decay, on every parameter (CIFAR-10; 1e-4 on ImageNet)")
    warmup_epochs: float = common.flag(0, "linear warm-up epochs before the cosine decay (none in the paper)")
    momentum: float = common.flag(0.9, "SGD momentum")
    proj_dim: int = common.flag(2048, "output (and hidden) size of the projection MLP", ">= 1")
    proj_layers: int = common.flag(2, "linear layers of the projection MLP (2 on CIFAR, 3 on ImageNet)", ">= 1")
    pred_dim: int = common.flag(512, "hidden size of the prediction MLP's bottleneck", ">= 1")
    fix_pred_lr: bool = common.flag(True, "keep the predictor's lr at base lr instead of decaying it (the official "
                                    "--fix-pred-lr)")
    stop_grad: bool = common.flag(True, "stop-gradient on z (--no-stop-grad: the paper's ablation, which collapses)")
    crop_min_scale: float = common.flag(0.2, "smallest crop area as a fraction of the image (the official 0.2)",
                                        "in (0, 1]")
    blur: float = common.flag(-1.0, "probability of Gaussian blur per view (-1: 0.5 above 64 px as for ImageNet, "
                              "else 0)")
    sync_bn: bool = common.flag(True, "BatchNorm statistics over the global batch (the official SyncBatchNorm)")

    def check(self, world_size: int = 1):
        super().check(world_size)
        if not (self.blur == -1 or 0 <= self.blur <= 1):
            raise ValueError(f"--blur must be a probability in [0, 1] or -1 (automatic), got {self.blur}")
        if self.batch_size // world_size < 2:
            raise ValueError("BatchNorm needs at least 2 images per process (--batch-size)")


# -------- Views -------------------------------------------------------------------------------------------------------


def simsiam_augment(info: common.DataInfo, size: int, blur: float = 0.0, min_scale: float = 0.2) -> T.Compose:
    """One random view, as the official main_simsiam: crop of 20-100% of the area resized to `size`, colour jitter
    (0.4, 0.4, 0.4, 0.1) with probability 0.8, grayscale with probability 0.2, Gaussian blur (sigma in [0.1, 2])
    with probability `blur`, horizontal flip."""
    ops = [
        T.RandomResizedCrop(size, scale=(min_scale, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if blur > 0:
        ops.append(T.RandomApply([T.GaussianBlur(2 * (size // 20) + 1, sigma=(0.1, 2.0))], p=blur))
    return T.Compose(ops + [T.RandomHorizontalFlip(), common.normalize(info)])


# -------- Model -------------------------------------------------------------------------------------------------------


class SimSiam(nn.Module):
    """Encoder f (backbone + projection MLP) and prediction MLP h, as the official builder: the projector's layers
    are Linear (no bias) + BatchNorm, ReLU between them, and the last BatchNorm has no affine parameters; the
    predictor is Linear (no bias) + BatchNorm + ReLU, then Linear (with bias), a bottleneck of pred_dim."""

    def __init__(self, backbone: nn.Module, proj_dim: int = 2048, pred_dim: int = 512, proj_layers: int = 2):
        super().__init__()
        self.backbone = backbone
        layers: list[nn.Module] = []
        d = backbone.out_dim
        for _ in range(proj_layers - 1):
            layers += [nn.Linear(d, proj_dim, bias=False), nn.BatchNorm1d(proj_dim), nn.ReLU(inplace=True)]
            d = proj_dim
        layers += [nn.Linear(d, proj_dim, bias=False), nn.BatchNorm1d(proj_dim, affine=False)]
        self.projector = nn.Sequential(*layers)
        self.predictor = nn.Sequential(nn.Linear(proj_dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim),
                                       nn.ReLU(inplace=True), nn.Linear(pred_dim, proj_dim))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        """Each view on its own, as the official code. Returns p1, p2, z1, z2, each [n, proj_dim]; the
        stop-gradient on z is the loss's (simsiam_loss), so that the ablation can switch it off."""
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        return self.predictor(z1), self.predictor(z2), z1, z2


# -------- Losses ------------------------------------------------------------------------------------------------------


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor,
                 stop_grad: bool = True) -> torch.Tensor:
    """L = 1/2 D(p1, stopgrad(z2)) + 1/2 D(p2, stopgrad(z1)), D(p, z) = -cos(p, z) averaged over the N pairs.

    p1, p2: [N, D] predictions h(f(x)); z1, z2: [N, D] projections f(x) of the same N images' two views. With
    stop_grad (the method) z1 and z2 are constants: no gradient flows through them, only through p1 and p2.
    stop_grad=False is the paper's ablation. L lies in [-1, 1], -1 when every p is aligned with the other z.
    Computed in float32 (float64 for float64 inputs), also under autocast.
    """
    with torch.autocast(p1.device.type, enabled=False):
        dtype = torch.promote_types(p1.dtype, torch.float32)  # float32, or float64 when given float64
        if stop_grad:
            z1, z2 = z1.detach(), z2.detach()

        def D(p, z):  # [N, D], [N, D] -> mean of -cos over the N pairs
            return -(F.normalize(p.to(dtype), dim=1) * F.normalize(z.to(dtype), dim=1)).sum(dim=1).mean()

        return 0.5 * D(p1, z2) + 0.5 * D(p2, z1)


def output_std(z: torch.Tensor) -> torch.Tensor:
    """The paper's collapse monitor: the std over the batch of z/|z|, averaged over the D channels. About
    1/sqrt(D) for outputs spread over the sphere, 0 when every image has the same output. z: [N, D]."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


# -------- Training ----------------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, args: Args) -> torch.optim.Optimizer:
    """The official optimiser: SGD with momentum and weight decay on every parameter, lr = base_lr * N / 256, in two
    groups: the encoder (backbone and projector) and the predictor, whose lr stays at base_lr with --fix-pred-lr."""
    base_lr = args.lr * args.batch_size / 256  # the paper's linear scaling rule
    encoder = [*model.backbone.parameters(), *model.projector.parameters()]
    predictor = {"params": list(model.predictor.parameters())}
    if args.fix_pred_lr:
        predictor["fixed_lr"] = base_lr  # the official fix_lr group: the predictor's lr is never decayed
    return torch.optim.SGD([{"params": encoder}, predictor], lr=base_lr, momentum=args.momentum,
                           weight_decay=args.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """The schedule's lr for every group but one with 'fixed_lr' (the official adjust_learning_rate); returns lr."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("fixed_lr", lr)
    return lr


def train_step(model: nn.Module, batch, optimizer, args: Args) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of SimSiam on one batch: L = 1/2 D(p1, stopgrad(z2)) + 1/2 D(p2, stopgrad(z1)), one SGD step.
    `model` is the network as trained (DDP on several processes). Returns this process's loss (a mean over its
    pairs, whose mean over processes is the global batch's loss) and the std of its z1/|z1| (the collapse monitor),
    on the device, detached."""
    (x1, x2), _ = batch
    x1, x2 = common.to_device([x1, x2], args)  # [n, C, H, W] each
    with common.autocast(args):
        p1, p2, z1, z2 = model(x1, x2)  # [n, proj_dim] each
    # a per-pair mean: DDP's average of the processes' gradients is the gradient of the global batch's loss
    loss = simsiam_loss(p1, p2, z1, z2, stop_grad=args.stop_grad)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), output_std(z1)


def train_one_epoch(model: nn.Module, loader, optimizer, lr_at, progress: common.Progress,
                    args: Args) -> tuple[float, float]:
    """One pass over this process's share of the data; returns the epoch's mean loss (global batch) and the mean
    std of z/|z| (the collapse monitor)."""
    model.train()
    total, total_std = torch.zeros((), device=args.device), torch.zeros((), device=args.device)
    progress.start(len(loader))  # the epoch's clock
    for i, batch in enumerate(loader):
        step = loader.epoch * len(loader) + i  # the global step: the schedule's clock
        lr = set_lr(optimizer, lr_at(step))  # the predictor keeps its fixed_lr
        loss, z_std = train_step(model, batch, optimizer, args)
        total += loss
        total_std += z_std
        progress.update(step, loss, lr, len(batch[1]))  # the images in this process's batch
    return (common.all_reduce_mean(total / len(loader)).item(),
            common.all_reduce_mean(total_std / len(loader)).item())


# -------- Main --------------------------------------------------------------------------------------------------------


def main(args: Args):
    common.setup_distributed(args)
    info, size = common.dataset_info(args)
    blur = args.blur if args.blur >= 0 else (0.5 if size > 64 else 0.0)
    views = common.MultiView([simsiam_augment(info, size, blur, args.crop_min_scale) for _ in range(2)])
    train_set, memory_set, test_set = common.training_and_eval_sets(args, views, common.eval_transform(info, size))
    train_data = common.TrainData(train_set, views, args)  # on the device (--data-path) or the CPU DataLoader
    run = common.RunDir(args, "simsiam")

    backbone = common.build_backbone(args.arch, info.channels, size, zero_init_residual=True)
    model = common.prepare_model(SimSiam(backbone, args.proj_dim, args.pred_dim, args.proj_layers), args)
    optimizer = build_optimizer(model, args)
    base_lr = optimizer.defaults["lr"]  # the scaled rate the schedule starts from
    start = run.resume(model, optimizer)["epoch"]
    ddp_model = common.distribute(model, args)  # the model as trained: DDP on several processes

    lr_at = common.lr_schedule(args, train_data.steps, base_lr)
    evaluation = common.Evaluation(memory_set, test_set, info.num_classes, args)
    progress = common.Progress(args)
    common.print0(f"SimSiam {args.arch} on {args.dataset}: {len(train_set)} images, {train_data.steps} steps of "
                  f"{args.batch_size} per epoch, {common.world()[1]} process(es) on {args.device}")
    if start == 0:
        run.log(epoch=0, step=0, knn_top1=evaluation.knn(model.backbone))
    for epoch in range(start, args.epochs):
        loss, z_std = train_one_epoch(ddp_model, train_data.loader(epoch), optimizer, lr_at, progress, args)
        knn_top1 = evaluation.knn(model.backbone, epoch + 1) if evaluation.due(epoch) else None
        run.log(epoch=epoch + 1, loss=loss, knn_top1=knn_top1, z_std=z_std, **progress.summary())
        run.save(epoch + 1, model=model.state_dict(), optimizer=optimizer.state_dict())
    evaluation.report(model.backbone, run)
    common.cleanup_distributed()


if __name__ == "__main__":
    main(common.parse(Args))
