"""MoCo: Momentum Contrast for Unsupervised Visual Representation Learning (v1 and v2).
He, Fan, Wu, Xie & Girshick, CVPR 2020. arXiv:1911.05722. Chen, Fan, Girshick & He, "Improved Baselines with
Momentum Contrastive Learning", arXiv:2003.04297. Official code: github.com/facebookresearch/moco

  x -> two random views x_q, x_k (crop + resize, flip, colour jitter, grayscale)
  q = f_q(x_q) / |f_q(x_q)|    query encoder (ResNet + linear head, or MLP head in v2), trained by gradient
  k = f_k(x_k) / |f_k(x_k)|    key encoder: no gradient, a moving average of the query encoder
  l_pos = q.k  [N, 1],   l_neg = q.queue  [N, K]       the queue holds the K most recent keys (negatives)
  L = 1/N sum_n -log  exp(l_pos/T) / (exp(l_pos/T) + sum_K exp(l_neg/T))  = cross-entropy over [l_pos, l_neg]/T,
      the positive at index 0 (InfoNCE)
  theta_k <- m theta_k + (1 - m) theta_q                 before each step, no gradient
  enqueue the keys of the global batch (gathered from every process), dequeue the oldest.
  Shuffle BN: the keys' inputs are shuffled across the global batch before f_k and the keys put back in order
  after, so a key's BatchNorm statistics never come from the batch its query was normalised with. On one process
  BatchNorm runs over --bn-splits groups of the batch (the official CIFAR demo's SplitBatchNorm, standing for 8 GPUs).
  --symmetric: the CIFAR demo's option, L(x_1 -> x_2) + L(x_2 -> x_1), both views' keys enqueued.

Run:   python moco.py --dataset digits --arch resnet18 --epochs 30 --batch-size 256 --queue-size 1024 --workers 0
                                                          (CPU; prints k-NN untrained vs trained)
       torchrun --nproc_per_node=8 moco.py --data-dir data --download --linear-epochs 100 --linear-lr 30
                                                          (the official CIFAR-10 recipe below, its linear protocol)
       torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 moco.py ...
Defaults: the official CIFAR-10 demo (facebookresearch/moco, colab/moco_cifar10_demo.ipynb): ResNet-18 with the
       CIFAR stem and a linear head to 128-d, batch 512, 200 epochs, SGD with learning rate 0.06 (0.03 at batch
       256), momentum 0.9, weight decay 5e-4, cosine decay without warm-up, K = 4096, m = 0.99, T = 0.1, 8 BatchNorm
       splits, asymmetric loss. Linear classifier (the demo's note): 100 epochs, lr 30, no weight decay. MoCo v2 on
       ImageNet (official README and main_moco.py): --arch resnet50 --mlp --temperature 0.2 --queue-size 65536
       --momentum 0.999 --batch-size 256 (lr 0.03) --weight-decay 1e-4 --crop-min-scale 0.2 --epochs 200, plus the
       Gaussian blur (p 0.5, sigma 0.1-2) that this file leaves out; main_lincls.py: --linear-epochs 100
       --linear-lr 30 (steps at 60 and 80 there, cosine here).
Expect: k-NN top-1 on CIFAR-10 (ResNet-18) 82.6 / 86.3 / 88.7 after 200 / 400 / 800 epochs, and with --symmetric
       85.3 / 88.5 / 89.7 (official CIFAR demo); linear classification 90.7 for the 89.7 k-NN model (same source).

Where this file differs from the official code, and why:
  - The schedule is cosine per step; the demo sets the learning rate once per epoch.
  - The learning rate scales linearly with the batch (0.06 x batch / 512), the rule the demo states in a comment.
  - Several processes: the keys' inputs are shuffled over the global batch as the official ImageNet code
    (_batch_shuffle_ddp), and BatchNorm is per process; --bn-splits applies on one process only. With 8
    processes at batch 512 each BatchNorm group holds 64 images, as the demo's 8 splits do.
  - Inputs are standardised with the dataset's channel mean and std (the demo uses std 0.2023, 0.1994, 0.2010).
    The CIFAR stem's conv1 starts from Kaiming fan-out (the demo's replaced conv1 keeps PyTorch's default).
  - Evaluation: the weighted k-NN monitor (k=200, T=0.1, as the demo's) reads the backbone's features, not the
    128-d head output the demo's monitor reads; a linear probe on frozen, precomputed features at the end.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from einops import rearrange

import common

# -------- Args --------------------------------------------------------------------------------------------------------


@dataclass
class Args(common.Args):
    epochs: int = common.flag(200, "training epochs (official CIFAR demo)")
    batch_size: int = common.flag(512, "global batch N, split evenly over the processes")
    lr: float = common.flag(0.06, "learning rate of SGD at batch 512, scaled by batch_size / 512 (official CIFAR "
                            "demo)")
    weight_decay: float = common.flag(5e-4, "SGD weight decay (official CIFAR demo)")
    warmup_epochs: float = common.flag(0, "linear warm-up epochs before the cosine decay (the demo has none)")
    queue_size: int = common.flag(4096, "K, negatives kept from earlier batches; a multiple of the keys enqueued "
                                  "per step")
    momentum: float = common.flag(0.99, "m of the key encoder: theta_k <- m theta_k + (1 - m) theta_q", "in [0, 1]")
    temperature: float = common.flag(0.1, "T of InfoNCE (0.1 in the CIFAR demo, 0.2 in MoCo v2)", "positive")
    proj_dim: int = common.flag(128, "output size of the head (the feature dimension of the keys)", ">= 1")
    mlp: bool = common.flag(False, "MoCo v2's 2-layer MLP head instead of the linear head")
    bn_splits: int = common.flag(8, "BatchNorm over this many groups of the batch, on one process (official CIFAR "
                                 "demo)", ">= 1")
    symmetric: bool = common.flag(False, "the CIFAR demo's symmetric loss: both views are queries, both keys are "
                                  "enqueued")
    crop_min_scale: float = common.flag(0.08, "smallest crop area as a fraction of the image (the demo's 0.08)",
                                        "in (0, 1]")
    sgd_momentum: float = common.flag(0.9, "SGD momentum")

    def check(self, world_size: int = 1):
        super().check(world_size)
        keys = self.batch_size * (2 if self.symmetric else 1)
        if self.queue_size < 1 or self.queue_size % keys:
            raise ValueError(f"--queue-size {self.queue_size} must be a positive multiple of the {keys} keys "
                             f"enqueued per step (--batch-size{' x 2 with --symmetric' if self.symmetric else ''})")
        if world_size == 1 and self.batch_size % self.bn_splits:
            raise ValueError(f"--batch-size {self.batch_size} does not split into --bn-splits {self.bn_splits} "
                             f"equal groups")


# -------- Views -------------------------------------------------------------------------------------------------------


def moco_augment(info: common.DataInfo, size: int, min_scale: float = 0.08) -> T.Compose:
    """One random view, as the official CIFAR demo: crop of 8-100% of the area resized to `size`, horizontal flip,
    colour jitter (0.4, 0.4, 0.4, 0.1) with probability 0.8, grayscale with probability 0.2."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(min_scale, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        common.normalize(info),
    ])


# -------- Model -------------------------------------------------------------------------------------------------------


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises each of `num_splits` groups of the batch with the group's own
    statistics (sample i in group i % num_splits), as BatchNorm on num_splits GPUs would; the running statistics
    are the mean of the groups'. In evaluation it is plain BatchNorm2d. (The official CIFAR demo's layer.)"""

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        n, c, h, w = x.shape
        g = self.num_splits
        running_mean, running_var = self.running_mean.repeat(g), self.running_var.repeat(g)  # [g*C]
        out = F.batch_norm(x.reshape(n // g, g * c, h, w), running_mean, running_var, self.weight.repeat(g),
                           self.bias.repeat(g), True, self.momentum, self.eps).reshape(n, c, h, w)
        self.running_mean.copy_(running_mean.view(g, c).mean(0))
        self.running_var.copy_(running_var.view(g, c).mean(0))
        return out


def split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d inside `module` by a SplitBatchNorm with the same parameters (none for 1 split)."""
    if num_splits == 1:
        return module
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            split = SplitBatchNorm(child.num_features, num_splits, eps=child.eps, momentum=child.momentum)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            split_batchnorm(child, num_splits)
    return module


class MoCo(nn.Module):
    """Query encoder f_q = head(backbone), key encoder f_k (a copy that only follows f_q by momentum), and the
    queue of K keys [D, K] with its pointer. All three are in the state_dict, so a resumed run continues them."""

    def __init__(self, backbone: nn.Module, proj_dim: int = 128, mlp: bool = False, queue_size: int = 4096):
        super().__init__()
        d = backbone.out_dim
        head = (nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, proj_dim)) if mlp
                else nn.Linear(d, proj_dim))
        self.encoder_q = nn.Sequential(backbone, head)
        self.encoder_k = copy.deepcopy(self.encoder_q)  # starts equal to f_q
        self.encoder_k.requires_grad_(False)  # the key encoder gets no gradient, only momentum updates
        # the queue: random unit keys at first, then the K most recent keys; a buffer, never given gradient
        self.register_buffer("queue", F.normalize(torch.randn(proj_dim, queue_size), dim=0))  # [D, K]
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # column of the oldest key

    @property
    def backbone(self) -> nn.Module:
        return self.encoder_q[0]  # the representation kept after training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder_q(x), dim=1)  # q, [B, proj_dim]

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """k = f_k(x) / |f_k(x)|, [B, proj_dim], without gradient, computed on the shuffled global batch."""
        x, idx_unshuffle = batch_shuffle(x)
        return batch_unshuffle(F.normalize(self.encoder_k(x), dim=1), idx_unshuffle)

    @torch.no_grad()
    def dequeue_and_enqueue(self, k: torch.Tensor):
        """Put the keys of the global batch (gathered from every process, in rank order) in place of the oldest
        ones, so every process holds the same queue. K is a multiple of the batch (Args.check). The columns are
        computed on the device from the pointer: reading the pointer would make the host wait every step."""
        k = common.gather_no_grad(k)  # [N, D]
        columns = (self.queue_ptr + torch.arange(len(k), device=k.device)) % self.queue.shape[1]  # [N]
        self.queue.index_copy_(1, columns, k.T.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + len(k)) % self.queue.shape[1])


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle BN, step 1 (official _batch_shuffle_ddp; on one process the demo's in-batch shuffle): gather the
    global batch [W*n, ...], draw one permutation (rank 0's, broadcast), return this process's n rows of the
    permuted batch and the inverse permutation."""
    rank, world = common.world()
    x_all = common.gather_no_grad(x)  # [W*n, ...]
    idx_shuffle = torch.randperm(x_all.shape[0], device=x.device)
    if world > 1:
        torch_dist.broadcast(idx_shuffle, src=0)  # the same permutation on every process
    idx_unshuffle = torch.argsort(idx_shuffle)
    return x_all[rearrange(idx_shuffle, "(w n) -> w n", w=world)[rank]], idx_unshuffle


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Shuffle BN, step 2 (official _batch_unshuffle_ddp): gather the outputs and give each process back the rows
    of its own inputs, in their order."""
    rank, world = common.world()
    x_all = common.gather_no_grad(x)  # [W*n, ...]
    return x_all[rearrange(idx_unshuffle, "(w n) -> w n", w=world)[rank]]


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float):
    """theta_k <- m theta_k + (1 - m) theta_q for every parameter, without gradient. Buffers (BatchNorm
    statistics) are the target's own, as in the official code."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - m)  # a few multi-tensor kernels


# -------- Losses ------------------------------------------------------------------------------------------------------


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of MoCo (the paper's equation 1), averaged over the N queries.

    q: [N, D] queries; k: [N, D] their positive keys; queue: [D, K] negative keys (the official layout), all
    L2-normalised by the caller. No gradient reaches k or the queue. Computed in float32 (float64 for float64
    inputs), also under autocast.
    """
    with torch.autocast(q.device.type, enabled=False):
        dtype = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 when given float64
        q, k, queue = q.to(dtype), k.detach().to(dtype), queue.detach().to(dtype)  # keys: no gradient
        l_pos = torch.einsum("nd,nd->n", q, k)[:, None]  # [N, 1]
        l_neg = torch.einsum("nd,dk->nk", q, queue)  # [N, K]
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # [N, 1 + K]
        positive = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # index 0
        return F.cross_entropy(logits, positive)


# -------- Training ----------------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, args: Args) -> torch.optim.Optimizer:
    """The optimiser main builds: SGD with momentum and weight decay on every parameter of the query encoder (the key
    encoder follows by momentum only), at the demo's linear rule lr x batch / 512 (0.06 at 512, 0.03 at 256)."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr * args.batch_size / 512,
                           momentum=args.sgd_momentum, weight_decay=args.weight_decay)


def train_step(model: nn.Module, batch, optimizer, args: Args) -> torch.Tensor:
    """One step of MoCo on one batch: theta_k <- m theta_k + (1 - m) theta_q, then L(q, k, queue), then enqueue k.
    `model` is the query encoder as trained (DDP on several processes). Returns the loss of the global batch (on the
    device, detached)."""
    moco = common.unwrap(model)  # the key encoder and the queue, used outside DDP's gradient synchronisation
    (x1, x2), _ = batch
    x1, x2 = common.to_device([x1, x2], args)  # [n, C, H, W] each
    momentum_update(moco.encoder_q, moco.encoder_k, args.momentum)  # first, as the official code
    with common.autocast(args):
        q1, k2 = model(x1), moco.keys(x2)  # [n, D] each; keys without gradient
        if args.symmetric:
            q2, k1 = model(x2), moco.keys(x1)
    queue = moco.queue.clone()  # this step's negatives, kept apart from the enqueue below
    loss = moco_loss(q1, k2, queue, args.temperature)
    if args.symmetric:
        loss = loss + moco_loss(q2, k1, queue, args.temperature)  # the demo sums the two directions
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    for k in ([k1, k2] if args.symmetric else [k2]):  # the demo enqueues k1's keys, then k2's
        moco.dequeue_and_enqueue(k)  # each gathered over the processes, so in the global batch's order
    return common.all_reduce_mean(loss.detach())  # each process averaged its own queries


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
    views = common.MultiView([moco_augment(info, size, args.crop_min_scale) for _ in range(2)])
    train_set, memory_set, test_set = common.training_and_eval_sets(args, views, common.eval_transform(info, size))
    train_data = common.TrainData(train_set, views, args)  # on the device (--data-path) or the CPU DataLoader
    run = common.RunDir(args, "moco")

    # split BatchNorm stands in for several GPUs on one process; with several, each process is one BN group
    backbone = split_batchnorm(common.build_backbone(args.arch, info.channels, size),
                               args.bn_splits if common.world()[1] == 1 else 1)
    model = common.prepare_model(MoCo(backbone, args.proj_dim, args.mlp, args.queue_size), args)
    optimizer = build_optimizer(model, args)
    start = run.resume(model, optimizer)["epoch"]  # the key encoder and the queue are in the model's state
    ddp_model = common.distribute(model, args)  # the model as trained: DDP on several processes

    lr_at = common.lr_schedule(args, train_data.steps, optimizer.defaults["lr"])  # the scaled base lr
    evaluation = common.Evaluation(memory_set, test_set, info.num_classes, args)
    progress = common.Progress(args)
    common.print0(f"MoCo {args.arch} on {args.dataset}: {len(train_set)} images, {train_data.steps} steps of "
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
