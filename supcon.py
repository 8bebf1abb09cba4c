"""SupCon: Supervised Contrastive Learning.
Khosla, Teterwak, Wang, Sarna, Tian, Isola, Maschinot, Liu & Krishnan, NeurIPS 2020. arXiv:2004.11362.
Official code: github.com/HobbitLong/SupContrast

  x -> two random views (crop + resize, flip, colour jitter, grayscale): 2N views of N images, labels y
  z = Proj(Enc(x)) / |Proj(Enc(x))|   encoder (ResNet) and MLP head, L2-normalised; Enc(x) is kept after training
  I = all 2N views, A(i) = I \\ {i}, P(i) = {p in A(i) : y_p = y_i}       (positives: every view of the same class)
  L_out = 1/|I| sum_{i in I} -1/|P(i)| sum_{p in P(i)} log  exp(z_i.z_p / tau) / sum_{a in A(i)} exp(z_i.z_a / tau)
  scaled by tau / base_tau as the official code. Without labels P(i) is the other view of the same image: SimCLR.
  N is the global batch: embeddings and labels are gathered from every process before the loss.
  Stage 1 trains Enc and Proj with L_out; stage 2 trains a linear classifier on the frozen Enc(x), which is what
  the final linear probe of this file does (common.Evaluation.report).

Run:   python supcon.py --dataset digits --arch resnet18 --epochs 30 --batch-size 256 --workers 0
                                                          (CPU; prints k-NN untrained vs trained)
       torchrun --nproc_per_node=8 supcon.py --data-dir data --download --linear-epochs 100 --linear-lr 5
              --linear-batch-size 512   (the official CIFAR-10 recipe below, then its stage 2; --linear-lr 1 after
              --method simclr, as the README)
       torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 supcon.py ...
Defaults: the official CIFAR-10 command (README and main_supcon.py of HobbitLong/SupContrast): ResNet-50 with
       the CIFAR stem, batch 1024, 1000 epochs, SGD with learning rate 0.5, momentum 0.9, weight decay 1e-4,
       cosine decay, 10 warm-up epochs (the official code warms up whenever the batch exceeds 256),
       temperature 0.1 (base temperature 0.07), MLP head to 128-d, crops of 20-100% of the image.
       --method simclr is the official `--method SimCLR` (labels not passed to the loss; its README uses
       --temperature 0.5 for it).
Expect: 96.0% top-1 on CIFAR-10 (SupCon), 93.6% (SimCLR), 95.0% (cross-entropy), all ResNet-50 (official README).

Where this file differs from the official code, and why:
  - supcon_loss L2-normalises its input (the official loss expects normalised features; on those it is the same),
    and computes the denominator as a log-sum-exp over the candidates only, where the official code takes
    log(sum(exp)) after subtracting the row maximum including the self-pair: equal in exact arithmetic, but
    finite for small temperatures where every exp(.) of the official form would underflow.
  - An anchor without positive (a single view of a class seen once in the batch) contributes 0 and still counts
    in the mean, as the official code's later fix (it divides by max(|P(i)|, 1)); the original gave NaN.
  - The schedule is per step: linear warm-up from 0 for 10 epochs, then cosine to 0. The official code warms up
    from 0.01 per step and decays per epoch to lr * 0.001.
  - Every process computes the (identical) loss of the whole global batch from the gathered embeddings: the
    official code runs on one node with DataParallel, which sees the whole batch too.
  - Inputs are standardised with the dataset's channel mean and std (the official code uses std 0.2023, 0.1994,
    0.2010 for CIFAR-10): an affine change of the input that the first convolution can absorb.
  - Evaluation: the weighted k-NN monitor during training (InstDisc's, k=200, T=0.1), a fast probe, and stage 2
    as the linear protocol (--linear-epochs): main_linear.py's 100 epochs, batch 512, lr 5, no weight decay,
    crops of 20-100% of the area and flips (the protocol: common.py's crops); its rate steps x 0.2 at 60, 75, 90.
    The official cross-entropy baseline (main_ce.py) is not part of this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from einops import rearrange

import common

# -------- Args --------------------------------------------------------------------------------------------------------


@dataclass
class Args(common.Args):
    arch: str = common.flag("resnet50", "backbone (official: resnet50)")
    epochs: int = common.flag(1000, "training epochs (official CIFAR-10 command)")
    batch_size: int = common.flag(1024, "global batch N, split evenly over the processes")
    lr: float = common.flag(0.5, "learning rate of SGD (official CIFAR-10 command; not scaled with the batch)")
    weight_decay: float = common.flag(1e-4, "SGD weight decay, on every parameter as the official code")
    warmup_epochs: float = common.flag(10, "linear warm-up epochs before the cosine decay (official: for batches "
                                       "above 256)")
    method: str = common.flag("supcon", "supcon: positives are views of the same class; simclr: only of the same "
                              "image", ("supcon", "simclr"))
    temperature: float = common.flag(0.1, "tau of the loss (official CIFAR-10 command: 0.1 for SupCon, 0.5 for "
                                     "SimCLR)", "positive")
    base_temperature: float = common.flag(0.07, "the loss is scaled by temperature / base_temperature (official "
                                          "code)", "positive")
    contrast_mode: str = common.flag("all", "all: every view is an anchor; one: only the first view of each image",
                                     ("all", "one"))
    proj_dim: int = common.flag(128, "output size of the projection head", ">= 1")
    crop_min_scale: float = common.flag(0.2, "smallest crop area as a fraction of the image (official: 0.2)",
                                        "in (0, 1]")
    momentum: float = common.flag(0.9, "SGD momentum")


# -------- Views -------------------------------------------------------------------------------------------------------


def supcon_augment(info: common.DataInfo, size: int, min_scale: float = 0.2) -> T.Compose:
    """One random view, as the official main_supcon.py: crop of 20-100% of the area resized to `size`, horizontal
    flip, colour jitter (0.4, 0.4, 0.4, 0.1) with probability 0.8, grayscale with probability 0.2."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(min_scale, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        common.normalize(info),
    ])


# -------- Model -------------------------------------------------------------------------------------------------------


class SupCon(nn.Module):
    """Encoder Enc and projection head Proj: z = normalise(Proj(Enc(x))). Proj as the official 'mlp' head:
    Linear(d, d), ReLU, Linear(d, proj_dim)."""

    def __init__(self, backbone: nn.Module, proj_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        d = backbone.out_dim
        self.projector = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(x)), dim=1)  # [B, proj_dim], on the unit sphere


# -------- Losses ------------------------------------------------------------------------------------------------------


def supcon_masks(labels: torch.Tensor | None, batch_size: int, n_views: int, n_anchor_views: int,
                 device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, self_pair), both bool [n_anchor_views * B, n_views * B], rows and columns view-major (row
    v * B + i is view v of image i). positive[a, c]: candidate c has the anchor's label (or, without labels, is a
    view of the anchor's image) and is not the anchor itself; self_pair[a, c]: c is the anchor."""
    if labels is None:
        same = torch.eye(batch_size, dtype=torch.bool, device=device)  # [B, B] same image
    else:
        labels = labels.reshape(-1).to(device, non_blocking=True)
        if len(labels) != batch_size:
            raise ValueError(f"{len(labels)} labels for {batch_size} images")
        same = labels[:, None] == labels[None, :]  # [B, B] same class
    rows, cols = n_anchor_views * batch_size, n_views * batch_size
    self_pair = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    self_pair.diagonal().fill_(True)  # anchor row a is candidate column a
    positive = same.repeat(n_anchor_views, n_views) & ~self_pair
    return positive, self_pair


def supcon_loss(features: torch.Tensor, labels: torch.Tensor | None = None, temperature: float = 0.1,
                base_temperature: float = 0.07, contrast_mode: str = "all") -> torch.Tensor:
    """L_out of the paper (its equation 2) as the official SupConLoss, averaged over the anchors.

    features: [B, V, D], V views of B images (normalised here along D); labels: [B] or None (then the only
    positives of an anchor are the other views of its image: SimCLR's NT-Xent, scaled by tau / base_tau).
    contrast_mode 'all': every view is an anchor; 'one': only view 0 of each image. Candidates are always all
    V * B views but the anchor itself, positives included in the denominator.
    An anchor without positive (V = 1 and its class appears once in the batch) contributes 0 to the sum and
    still counts in the mean, as the official code's fix: no NaN. Computed in float32 (float64 for float64
    inputs), also under autocast.
    """
    if features.dim() < 3:
        raise ValueError("features must be [batch, views, ...]")
    if contrast_mode not in ("all", "one"):
        raise ValueError(f"unknown contrast_mode {contrast_mode!r}")
    with torch.autocast(features.device.type, enabled=False):
        b, v = features.shape[:2]
        if b * v < 2:
            raise ValueError("the loss needs at least 2 views in the batch")
        dtype = torch.promote_types(features.dtype, torch.float32)  # float32, or float64 when given float64
        z = F.normalize(features.reshape(b, v, -1).to(dtype), dim=2)  # [B, V, D]
        contrast = torch.cat(z.unbind(1))  # [V*B, D], view-major
        anchors, n_anchor_views = (contrast, v) if contrast_mode == "all" else (z[:, 0], 1)  # [A*B, D]
        positive, self_pair = supcon_masks(labels, b, v, n_anchor_views, z.device)  # [A*B, V*B] each
        logits = anchors @ contrast.T / temperature  # [A*B, V*B]
        # log of exp(z_i.z_p/tau) / sum_{a in A(i)} exp(z_i.z_a/tau): the anchor is never its own candidate
        log_prob = logits - torch.logsumexp(logits.masked_fill(self_pair, float("-inf")), dim=1, keepdim=True)
        n_positive = positive.sum(1)  # |P(i)|, [A*B]
        mean_log_prob_pos = log_prob.masked_fill(~positive, 0).sum(1) / n_positive.clamp_min(1)  # 0 if P(i) = {}
        loss = -(temperature / base_temperature) * mean_log_prob_pos  # [A*B]
        return loss.mean()


# -------- Training ----------------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, args: Args) -> torch.optim.Optimizer:
    """The official optimiser: SGD with momentum, weight decay on every parameter, the lr of the recipe's batch
    as given (not scaled)."""
    base_lr = args.lr  # the official recipe gives the learning rate of its batch directly
    return torch.optim.SGD(model.parameters(), lr=base_lr, momentum=args.momentum, weight_decay=args.weight_decay)


def train_step(model: nn.Module, batch, optimizer, args: Args) -> torch.Tensor:
    """One step of SupCon on one batch: z = Proj(Enc(x)) for both views, L_out over the global batch with its labels
    (none for --method simclr), one SGD step. `model` is the network as trained (DDP on several processes).
    Returns the loss of the global batch (on the device, detached)."""
    (x1, x2), y = batch
    # both views in one forward pass, so BatchNorm normalises them together as in the official code
    x = torch.cat(common.to_device([x1, x2], args))  # [2n, C, H, W]
    with common.autocast(args):
        z1, z2 = rearrange(model(x), "(v n) d -> v n d", v=2)  # [n, proj_dim] each
    # the global batch: all processes' embeddings (with gradient) and labels (without)
    features = torch.stack([common.gather_with_grad(z1), common.gather_with_grad(z2)], dim=1)  # [N, 2, D]
    labels = common.gather_no_grad(common.to_device(y, args)) if args.method == "supcon" else None  # [N]
    loss = supcon_loss(features, labels, args.temperature, args.base_temperature, args.contrast_mode)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_one_epoch(model: nn.Module, loader, optimizer, lr_at, progress: common.Progress, args: Args) -> float:
    """One pass over this process's share of the data; returns the epoch's mean loss (global batch)."""
    model.train()
    total = torch.zeros((), device=args.device)
    progress.start(len(loader))  # the epoch's clock
    for i, batch in enumerate(loader):
        step = loader.epoch * len(loader) + i  # the global step: the schedule's clock
        lr = common.set_lr(optimizer, lr_at(step))
        loss = train_step(model, batch, optimizer, args)
        total += loss
        progress.update(step, loss, lr, len(batch[1]))  # the images in this process's batch
    return (total / len(loader)).item()


# -------- Main --------------------------------------------------------------------------------------------------------


def main(args: Args):
    common.setup_distributed(args)
    info, size = common.dataset_info(args)
    views = common.MultiView([supcon_augment(info, size, args.crop_min_scale) for _ in range(2)])
    train_set, memory_set, test_set = common.training_and_eval_sets(args, views, common.eval_transform(info, size))
    train_data = common.TrainData(train_set, views, args)  # on the device (--data-path) or the CPU DataLoader
    run = common.RunDir(args, "supcon")

    backbone = common.build_backbone(args.arch, info.channels, size)
    model = common.prepare_model(SupCon(backbone, args.proj_dim), args)
    optimizer = build_optimizer(model, args)
    base_lr = optimizer.defaults["lr"]  # the rate the schedule starts from
    start = run.resume(model, optimizer)["epoch"]
    ddp_model = common.distribute(model, args)  # the model as trained: DDP on several processes

    lr_at = common.lr_schedule(args, train_data.steps, base_lr)
    evaluation = common.Evaluation(memory_set, test_set, info.num_classes, args)
    progress = common.Progress(args)
    common.print0(f"SupCon ({args.method}) {args.arch} on {args.dataset}: {len(train_set)} images, {train_data.steps} "
                  f"steps of {args.batch_size} per epoch, {common.world()[1]} process(es) on {args.device}")
    if start == 0:
        run.log(epoch=0, step=0, knn_top1=evaluation.knn(model.backbone))
    for epoch in range(start, args.epochs):
        loss = train_one_epoch(ddp_model, train_data.loader(epoch), optimizer, lr_at, progress, args)
        knn_top1 = evaluation.knn(model.backbone, epoch + 1) if evaluation.due(epoch) else None
        run.log(epoch=epoch + 1, loss=loss, knn_top1=knn_top1, **progress.summary())
        run.save(epoch + 1, model=model.state_dict(), optimizer=optimizer.state_dict())
    evaluation.report(model.backbone, run)
    common.cleanup_distributed()


if __name__ == "__main__":
    main(common.parse(Args))
