"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations.
Chen, Kornblith, Norouzi & Hinton, ICML 2020. arXiv:2002.05709. Official code: github.com/google-research/simclr

  x -> two random views x_i, x_j (crop + resize, flip, colour jitter, grayscale; blur on large images)
  h = f(x)                     encoder (ResNet), the representation kept after training
  z = g(h)                     projection head (MLP), used only by the loss
  sim(u, v) = u.v / (|u| |v|)  cosine similarity
  l(i, j) = -log  exp(sim(z_i, z_j) / tau)  /  sum_{k != i} exp(sim(z_i, z_k) / tau)      k over all 2N views
  L = 1/(2N) sum_{k=1..N} [ l(2k-1, 2k) + l(2k, 2k-1) ]      (NT-Xent: 1 positive, 2N-2 negatives per anchor)
  N is the global batch: embeddings are gathered from every process (with gradient) before the loss.
  LARS (biases and BatchNorm excluded from weight decay and adaptation), lr = base_lr * N / 256,
  linear warm-up for 10 epochs, then cosine decay to 0.

Run:   python simclr.py --dataset digits --arch tiny --epochs 100 --batch-size 256 --workers 0
                                                   (offline, CPU: about two minutes; k-NN untrained vs trained)
       torchrun --nproc_per_node=8 simclr.py --data-dir data --download --linear-epochs 100 --linear-lr 0.2
              --linear-batch-size 512   (the official CIFAR-10 recipe below, then its linear evaluation)
       torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 simclr.py ...
Defaults: the official CIFAR-10 command (README of google-research/simclr): ResNet-18 with the CIFAR stem and
       the last BatchNorm of every residual block zero-initialised (resnet.py's init_zero), batch 512, 1000 epochs,
       LARS with learning rate 1.0 x 512/256 = 2.0, weight decay 1e-4, temperature 0.5, colour-jitter strength 0.5,
       no blur, 10 warm-up epochs, 2-layer projection head to 128-d. Linear evaluation (README): 100 epochs,
       momentum SGD at 0.1 x 512/256 = 0.2 (cosine), batch 512, no weight decay, crops and flips.
Expect: about 91% linear evaluation on CIFAR-10 after 1000 epochs (official README, ResNet-18);
       k-NN top-1 0.848 after 200 epochs at batch 512 (lightly's CIFAR-10 benchmark, ResNet-18).

Where this file differs from the official code, and why:
  - The loss is the paper's mean over the 2N anchors; the official code returns the sum of its two halves
    (loss_a + loss_b), twice this value. With LARS that factor only changes weight decay's share of the step.
  - Every process computes the (identical) loss of the whole global batch from the gathered embeddings rather
    than only its own anchors' rows: simpler to read, same gradients (tests/test_distributed.py), and the
    [2N, 2N] similarity matrix costs little next to the encoder.
  - Inputs are standardised with the dataset's channel mean and std (the official code feeds [0, 1] pixels):
    an affine change of the input that the first convolution can absorb; it only conditions early updates.
  - The head has 2 layers, as the code that measured the README's 91% (num_nlh_layers 1); the repository's later
    SimCLR v2 code defaults to 3 (num_proj_layers). Convolutions start from torchvision's Kaiming fan-out normal
    (official: TF's variance scaling, fan-in, truncated normal); a BatchNorm follows each, so their scale washes out.
  - Evaluation: the weighted k-NN monitor during training (InstDisc's, k=200, T=0.1) and a fast probe on frozen,
    precomputed features; the linear protocol (--linear-epochs) stands for the official one, whose crops are
    SimCLR's (8-100% of the area; the protocol: common.py's crops).

Options from two later papers, off by default (they need adversarial.py beside this file):
  --adv-eps EPS [--adv-steps S --adv-weight ALPHA]   CLAE (Ho & Vasconcelos, "Contrastive Learning with
       Adversarial Examples", NeurIPS 2020, github.com/chihhuiho/CLAE): L += ALPHA * NT-Xent(view 1, its
       adversarial view), the view found by FGSM (or PGD) against that loss within EPS pixels (CLAE: 0.03, 1.0).
  --adv-bn   AdvProp (Xie et al., "Adversarial Examples Improve Image Recognition", CVPR 2020): the encoder's
       BatchNorms get auxiliary twins (momentum 0.01 as CLAE's code) that normalise adversarial views only.
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
    epochs: int = common.flag(1000, "training epochs (official CIFAR-10 command)")
    batch_size: int = common.flag(512, "global batch N, split evenly over the processes")
    lr: float = common.flag(1.0, "base learning rate, scaled by batch_size / 256 (the official linear rule): 2.0 "
                            "at 512")
    weight_decay: float = common.flag(1e-4, "LARS weight decay (official CIFAR-10 command)")
    warmup_epochs: float = common.flag(10, "linear warm-up epochs before the cosine decay")
    temperature: float = common.flag(0.5, "tau of NT-Xent (0.5 for CIFAR-10, 0.1 for ImageNet in the paper)",
                                     "positive")
    proj_dim: int = common.flag(128, "output size of the projection head g", ">= 1")
    proj_layers: int = common.flag(2, "linear layers of g (2 in SimCLR, 3 in SimCLR v2)", ">= 1")
    crop_min_scale: float = common.flag(0.08, "smallest crop area as a fraction of the image (the paper's 0.08)",
                                        "in (0, 1]")
    jitter_strength: float = common.flag(0.5, "s: colour jitter of brightness, contrast, saturation 0.8s and hue "
                                         "0.2s", "in [0, 2.5] (hue 0.2s <= 0.5)")
    blur: float = common.flag(-1.0, "probability of Gaussian blur per view (-1: 0.5 above 64 px as for ImageNet, "
                              "else 0)")
    momentum: float = common.flag(0.9, "LARS momentum")
    lars_eta: float = common.flag(0.001, "LARS trust coefficient")
    sync_bn: bool = common.flag(True, "BatchNorm statistics over the global batch (the official 'global_bn')")
    adv_eps: float = common.flag(0.0, "CLAE: L-inf radius of the adversarial view in pixels of [0, 1] (0: off; "
                                 "CLAE uses 0.03)", ">= 0")
    adv_steps: int = common.flag(1, "CLAE: gradient steps making the adversarial view (1: FGSM as CLAE, more: PGD)",
                                 ">= 1")
    adv_weight: float = common.flag(1.0, "CLAE: alpha, weight of the loss between view 1 and its adversarial view",
                                    ">= 0")
    adv_bn: bool = common.flag(False, "AdvProp: auxiliary BatchNorms in the encoder, used for adversarial views only")

    def check(self, world_size: int = 1):
        super().check(world_size)
        if not (self.blur == -1 or 0 <= self.blur <= 1):
            raise ValueError(f"--blur must be a probability in [0, 1] or -1 (automatic), got {self.blur}")
        if self.adv_bn and not self.adv_eps:
            raise ValueError("--adv-bn needs adversarial views: set --adv-eps (e.g. 0.03)")
        if self.batch_size // world_size < 2:
            raise ValueError("NT-Xent needs at least 2 images per process (--batch-size)")


# -------- Views -------------------------------------------------------------------------------------------------------


def simclr_augment(info: common.DataInfo, size: int, strength: float = 0.5, blur: float = 0.0,
                   min_scale: float = 0.08) -> T.Compose:
    """One random view, as the official data_util: crop of 8-100% of the area (aspect 3/4-4/3) resized to `size`,
    horizontal flip, colour jitter with probability 0.8 (random order), grayscale with probability 0.2, and
    Gaussian blur (kernel 10% of the side, sigma in [0.1, 2]) with probability `blur`."""
    s = strength
    ops = [
        T.RandomResizedCrop(size, scale=(min_scale, 1.0), ratio=(3 / 4, 4 / 3)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if blur > 0:
        ops.append(T.RandomApply([T.GaussianBlur(2 * (size // 20) + 1, sigma=(0.1, 2.0))], p=blur))
    return T.Compose(ops + [common.normalize(info)])


# -------- Model -------------------------------------------------------------------------------------------------------


class SimCLR(nn.Module):
    """Encoder f and projection head g: z = g(f(x)). g as the official code: each layer Linear (no bias) +
    BatchNorm; ReLU between layers; the last BatchNorm scales but does not shift. Weights drawn N(0, 0.01^2)."""

    def __init__(self, backbone: nn.Module, proj_dim: int = 128, proj_layers: int = 2):
        super().__init__()
        self.backbone = backbone
        d = backbone.out_dim
        layers: list[nn.Module] = []
        for _ in range(proj_layers - 1):
            layers += [nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True)]
        last_bn = nn.BatchNorm1d(proj_dim)
        last_bn.bias.requires_grad_(False)  # stays 0: the official head's last BatchNorm has no centring
        layers += [nn.Linear(d, proj_dim, bias=False), last_bn]
        self.projector = nn.Sequential(*layers)
        for m in self.projector.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))  # [B, proj_dim]


# -------- Losses ------------------------------------------------------------------------------------------------------


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent, the normalised temperature-scaled cross-entropy of the paper (its equation 1, averaged).

    z1, z2: [N, D], two views of the same N images (row k of z1 and row k of z2 are a positive pair).
    Each of the 2N embeddings is an anchor; its positive is the other view of its image and its negatives are
    the other 2N - 2 embeddings. Returns the mean over the 2N anchors, computed in float32 (float64 for float64
    inputs), also under autocast.
    """
    with torch.autocast(z1.device.type, enabled=False):
        n = z1.shape[0]
        dtype = torch.promote_types(z1.dtype, torch.float32)  # float32, or float64 when given float64
        z = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)  # [2N, D], so z_i . z_k = sim(z_i, z_k)
        logits = z @ z.T / temperature  # [2N, 2N]
        self_pair = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_pair, float("-inf"))  # k != i: an anchor is never its own candidate
        positive = torch.arange(2 * n, device=z.device).roll(n)  # [2N] the other view: N..2N-1, then 0..N-1
        return F.cross_entropy(logits, positive)  # mean of l(i, j) over the 2N anchors


def clae_loss(model: nn.Module, x1: torch.Tensor, z1: torch.Tensor, args: Args) -> torch.Tensor:
    """CLAE's extra term (Ho & Vasconcelos, NeurIPS 2020): NT-Xent between view 1 and an adversarial view made
    from it, by FGSM/PGD against that same loss (view 1's embeddings held fixed). With --adv-bn both the
    generation and the term run through the encoder's auxiliary BatchNorms (AdvProp).

    model: the network as trained (DDP on several processes); x1: [n, C, H, W] view 1 of this process's images;
    z1: [n, proj_dim] their embeddings (with gradient). The search goes through the plain module and differentiates
    the input only, so it adds no gradient to the parameters; its cost is one forward and backward per step.
    """
    import adversarial  # the optional module of --adv-eps and --adv-bn

    plain = common.unwrap(model)
    anchors = common.gather_no_grad(z1)  # [N, proj_dim], fixed while the view is searched

    def loss_of(view):
        with common.autocast(args):
            return nt_xent(anchors, common.gather_with_grad(plain(view)), args.temperature)

    stats = common.DATASETS[args.dataset]  # the inputs' standardisation, to bound the view in pixels
    with adversarial.adversarial_bn(plain.backbone, args.adv_bn):
        x_adv = adversarial.adversarial_view(loss_of, x1, args.adv_eps, args.adv_steps, stats.mean, stats.std)
        with common.autocast(args):
            z_adv = model(common.to_device(x_adv, args))  # [n, proj_dim], through DDP like the main loss
    return nt_xent(common.gather_with_grad(z1), common.gather_with_grad(z_adv), args.temperature)


# -------- Training ----------------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, args: Args) -> torch.optim.Optimizer:
    """The paper's optimiser: LARS with lr = base_lr * N / 256; biases and BatchNorm (param_groups' second group)
    neither decayed nor adapted; the frozen bias of the head's last BatchNorm left out."""
    base_lr = args.lr * args.batch_size / 256  # the official linear scaling rule
    return common.LARS(common.param_groups(model, args.weight_decay), lr=base_lr, momentum=args.momentum,
                       eta=args.lars_eta)


def train_step(model: nn.Module, batch, optimizer, args: Args) -> torch.Tensor:
    """One step of SimCLR on one batch: z = g(f(x)) for both views, L = NT-Xent over the global batch, one LARS step.
    `model` is the network as trained (DDP on several processes). Returns the loss of the global batch (on the
    device, detached)."""
    (x1, x2), _ = batch
    # both views in one forward pass, so BatchNorm normalises them together as in the official code
    x = torch.cat(common.to_device([x1, x2], args))  # [2n, C, H, W]
    with common.autocast(args):
        z1, z2 = rearrange(model(x), "(v n) d -> v n d", v=2)  # [n, proj_dim] each
    # the global batch: all processes' embeddings, with gradient, so each anchor has 2N - 2 negatives
    loss = nt_xent(common.gather_with_grad(z1), common.gather_with_grad(z2), args.temperature)
    if args.adv_eps > 0:
        loss = loss + args.adv_weight * clae_loss(model, x[:len(x1)], z1, args)
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
    blur = args.blur if args.blur >= 0 else (0.5 if size > 64 else 0.0)
    views = common.MultiView([simclr_augment(info, size, args.jitter_strength, blur, args.crop_min_scale)
                              for _ in range(2)])
    train_set, memory_set, test_set = common.training_and_eval_sets(args, views, common.eval_transform(info, size))
    train_data = common.TrainData(train_set, views, args)  # on the device (--data-path) or the CPU DataLoader
    run = common.RunDir(args, "simclr")

    backbone = common.build_backbone(args.arch, info.channels, size, zero_init_residual=True)
    if args.adv_bn:
        import adversarial  # the optional module of --adv-eps and --adv-bn

        backbone = adversarial.dual_batchnorm(backbone)
    model = common.prepare_model(SimCLR(backbone, args.proj_dim, args.proj_layers), args)
    optimizer = build_optimizer(model, args)
    base_lr = optimizer.defaults["lr"]  # the scaled rate the schedule starts from
    start = run.resume(model, optimizer)["epoch"]
    ddp_model = common.distribute(model, args)  # the model as trained: DDP on several processes

    lr_at = common.lr_schedule(args, train_data.steps, base_lr)
    evaluation = common.Evaluation(memory_set, test_set, info.num_classes, args)
    progress = common.Progress(args)
    common.print0(f"SimCLR {args.arch} on {args.dataset}: {len(train_set)} images, {train_data.steps} steps of "
                  f"{args.batch_size} per epoch, {common.world()[1]} process(es) on {args.device}")
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
