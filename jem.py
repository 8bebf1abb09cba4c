"""JEM: Your Classifier is Secretly an Energy Based Model and You Should Treat it Like One.
Grathwohl, Wang, Jacobsen, Duvenaud, Norouzi & Swersky, ICLR 2020. arXiv:1912.03263.
Official code: github.com/wgrathwohl/JEM
With HDGE: Hybrid Discriminative-Generative Training via Contrastive Learning. Liu & Abbeel, 2020. arXiv:2007.09070.
Official code: github.com/forhaoliu/hybrid-discriminative-generative

  f(x) in R^C                   the classifier's logits
  p(y|x) = softmax(f(x))_y      the classifier
  E(x, y) = -f(x)[y]            p(x, y) = exp(-E(x, y)) / Z
  E(x) = -logsumexp_y f(x)[y]   p(x) = sum_y p(x, y) = exp(-E(x)) / Z
  SGLD from a replay buffer (10,000 images, initialised uniform in [-1, 1]); each chain restarts from uniform noise
  with probability rho = 0.05, then 20 steps of
      x <- x + alpha * d/dx logsumexp_y f(x)[y] + sigma * eps,   eps ~ N(0, I),  alpha = 1, sigma = 0.01
  with the network in eval mode; the samples x_q are written back to the buffer (and get no gradient).
  L_p(x) = -(mean_data logsumexp f(x) - mean_samples logsumexp f(x_q))  =  mean E(x) - mean E(x_q)
  L = L_p(x) + CE(f(x), y)                               --objective jem
  HDGE: log q(x|y) by contrast with a queue of K = 65,536 logit vectors of earlier batches (no gradient):
      p = f(x) / |f(x)|,  q_k = f(x_k) / |f(x_k)|
      L_HDGE = -log exp(p_y / T) / (exp(p_y / T) + sum_k exp(q_k[y] / T)),  T = 0.1   (see the quirk below)
  L = L_HDGE + CE                                        --objective hdge
  L = L_HDGE + L_p(x) + CE                               --objective hdge+sgld
  L = CE                                                 --objective ce (the baseline, same network and budget)

Run:   python jem.py --dataset digits --arch tiny --epochs 20 --workers 0 --sgld-steps 5
                                                          (CPU; prints test accuracy, ECE and the k-NN monitor)
       torchrun --nproc_per_node=8 jem.py --data-dir data --download --ood-dataset svhn   (the official CIFAR-10
                                                          recipe: global batch 64, 8 images and 1,250 chains a GPU)
       torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 jem.py ...
Defaults: the official CIFAR-10 command (README and train_wrn_ebm.py): Wide-ResNet 28-10 without normalisation,
       LeakyReLU 0.2, no dropout, Adam lr 1e-4 (betas 0.9, 0.999, no weight decay), warm-up over about 1,000 steps,
       lr x 0.3 at epochs 160 and 180 of 200, batch 64, inputs in [-1, 1] plus Gaussian noise 0.03, pad-4 crops
       and flips, p(x) and p(y|x) weights 1, SGLD as above. HDGE: queue 65,536, T = 0.1, weight 1 (its README).
Expect: JEM 92.9% CIFAR-10 test accuracy, OOD AUROC log p(x) 0.67 against SVHN (JEM paper, Tables 1 and 2,
       Wide-ResNet 28-10); JEM is better calibrated than its cross-entropy baseline (paper, CIFAR-100). HDGE
       reports higher CIFAR-10 accuracy than JEM and than cross-entropy with the same network (HDGE paper, Table 1).
       Training diverges now and then (the paper says so): this file stops with the way to continue.
Outputs beside the house files: reliability.png (reliability diagram), samples.png (a grid from the replay buffer,
       objectives that sample), and test_top1, ece, ood_auroc in results.json.

Where this file differs from the official code, and why:
  - HDGE's masking quirk, kept: the official code selects the label's entry by multiplying with the one-hot label
    before a logsumexp over classes, so the other C - 1 entries enter as exp(0) = 1 rather than vanishing. Its
    positive logit is log(exp(p_y) + C - 1), each negative log(exp(q_k[y]) + C - 1) (closed form here, same value).
    The published results come from that form, so it is the default; --hdge-mask select uses p_y and q_k[y].
  - One batch serves both terms: the official code draws the p(x) batch and the labelled batch independently from
    the same training set; the expectation is the same and the data loading halves. Data and SGLD samples go
    through the network in one forward pass: identical for the official normalisation-free Wide-ResNet, and it
    keeps DistributedDataParallel to one forward per step (BatchNorm backbones normalise them together).
  - --norm none (the default) also strips the BatchNorm layers of backbones built with them (tiny, ResNets), so
    that small models keep the official network's property: no batch statistics shared by data and samples.
  - Inputs are scaled to [-1, 1] (mean 0.5, std 0.5 for every channel), not standardised with the dataset's
    statistics: SGLD chains start uniform in [-1, 1], and data and samples must live in the same space.
  - The Wide-ResNet is the project's: convolutions without bias, Kaiming initialisation (the official one has
    biases and Xavier initialisation). The validation split of 5,000 images is not held out; evaluation uses
    noise-free test images (the official test transform adds the 0.03 noise too).
  - Under torchrun every process keeps its own share of the replay buffer (buffer-size / processes chains) and
    samples its share of the batch; the HDGE queue receives the logits of the global batch, as MoCo's does, and
    starts from the same draw on every process.
  - A step's chains are distinct (drawn without replacement; the official code draws with replacement, and a
    chain drawn twice is written back by whichever write lands last): the same distribution up to those rare
    repeats, and a write that does not depend on the device's scheduling.
  - ECE uses 15 equal-width confidence bins (Guo et al., 2017); OOD detection scores by -E(x) = logsumexp f(x).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from einops import rearrange

import common

OBJECTIVES = ("jem", "hdge", "hdge+sgld", "ce")

# ----------------------------------------------------------------------------------------------------------------
# Args
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Args(common.Args):
    arch: str = "wrn28_10"  # backbone (the official Wide-ResNet 28-10; tiny or resnet18 for small runs)
    norm: str = "none"  # none (official: every BatchNorm of the backbone removed) or batch (kept)
    objective: str = "jem"  # jem (SGLD for p(x)), hdge (contrastive q(x|y)), hdge+sgld (both), ce (baseline)
    epochs: int = 200  # training epochs (official)
    batch_size: int = 64  # global batch, split evenly over the processes (official 64)
    lr: float = 1e-4  # Adam learning rate (official)
    weight_decay: float = 0.0  # Adam weight decay (official 0)
    warmup_epochs: float = 1.28  # linear warm-up (the official 1,000 steps of batch 64 on 50,000 images)
    decay_epochs: str = "160,180"  # epochs at which the learning rate is multiplied by --decay-rate
    decay_rate: float = 0.3  # learning-rate decay factor (official)
    sigma: float = 0.03  # std of the Gaussian noise added to training inputs in [-1, 1] (official)
    p_x_weight: float = 1.0  # weight of the p(x) term L_p(x) (official)
    p_y_x_weight: float = 1.0  # weight of the cross-entropy term (official)
    buffer_size: int = 10000  # SGLD replay buffer size, over all processes (official)
    reinit_freq: float = 0.05  # rho, probability that a chain restarts from uniform noise (official)
    sgld_steps: int = 20  # SGLD steps per training step (official; more steps are more stable)
    sgld_step_size: float = 1.0  # alpha, SGLD step size on the gradient of logsumexp f (official)
    sgld_noise: float = 0.01  # sigma of the SGLD noise (official)
    hdge_weight: float = 1.0  # weight of the HDGE term (official pxycontrast)
    queue_size: int = 65536  # K, logit vectors kept by HDGE from earlier batches (official contrast_k)
    hdge_temperature: float = 0.1  # T of HDGE (official contrast_t)
    hdge_mask: str = "official"  # official (one-hot product inside logsumexp) or select (the label's entry only)
    diverge_at: float = 1e8  # stop when |loss| exceeds this or is not finite (official 1e8)
    ood_dataset: str = ""  # a second dataset for OOD-detection AUROC of the energy (e.g. svhn; empty: skip)
    ood_data_dir: str = ""  # where --ood-dataset lives (default: --data-dir)

    def check(self, world_size: int = 1):
        super().check(world_size)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown --objective {self.objective!r} (choose from {', '.join(OBJECTIVES)})")
        if self.norm not in ("none", "batch"):
            raise ValueError(f"--norm must be none or batch, got {self.norm!r}")
        if self.hdge_mask not in ("official", "select"):
            raise ValueError(f"--hdge-mask must be official or select, got {self.hdge_mask!r}")
        if not 0 <= self.reinit_freq <= 1:
            raise ValueError(f"--reinit-freq must be a probability in [0, 1], got {self.reinit_freq}")
        if self.sgld_steps < 1 or self.sgld_step_size <= 0 or self.sgld_noise < 0:
            raise ValueError("--sgld-steps and --sgld-step-size must be positive and --sgld-noise >= 0")
        if self.buffer_size < self.batch_size or self.buffer_size % world_size:
            raise ValueError(f"--buffer-size {self.buffer_size} must hold a batch of chains (--batch-size) and "
                             f"divide over {world_size} processes")
        if not self.hdge_temperature > 0:
            raise ValueError(f"--hdge-temperature must be positive, got {self.hdge_temperature}")
        if self.queue_size < 1 or self.queue_size % self.batch_size:
            raise ValueError(f"--queue-size {self.queue_size} must be a positive multiple of --batch-size "
                             f"{self.batch_size}")
        if self.sigma < 0 or self.decay_rate <= 0 or not self.diverge_at > 0:
            raise ValueError("--sigma must be >= 0, --decay-rate and --diverge-at positive")
        if min(self.p_x_weight, self.p_y_x_weight, self.hdge_weight) < 0:
            raise ValueError("--p-x-weight, --p-y-x-weight and --hdge-weight must be >= 0")
        try:
            self.decay_at()
        except ValueError:
            raise ValueError(f"--decay-epochs must be comma-separated integers, got {self.decay_epochs!r}") from None
        if self.ood_dataset and self.ood_dataset not in common.DATASETS:
            raise ValueError(f"unknown --ood-dataset {self.ood_dataset!r} (choose from {', '.join(common.DATASETS)})")

    def decay_at(self) -> list[int]:
        return [int(e) for e in self.decay_epochs.split(",") if e.strip()]


# ----------------------------------------------------------------------------------------------------------------
# Views
# ----------------------------------------------------------------------------------------------------------------


def to_unit_range(channels: int) -> T.Compose:
    """PIL image -> tensor in [-1, 1] (mean 0.5, std 0.5), the space the SGLD chains live in."""
    return T.Compose([T.ToTensor(), T.Normalize((0.5,) * channels, (0.5,) * channels)])


def jem_augment(info: common.DataInfo, size: int, flip: bool = True) -> T.Compose:
    """The official training view: reflect-pad 4 and crop back (for 32 px; an eighth of the side in general),
    horizontal flip (not for SVHN's digits), scale to [-1, 1]. The step adds the Gaussian noise of --sigma."""
    ops = [T.Resize(size), T.CenterCrop(size)] if size != info.size else []
    ops += [T.Pad(max(1, size // 8), padding_mode="reflect"), T.RandomCrop(size)]
    if flip:
        ops.append(T.RandomHorizontalFlip())
    return T.Compose(ops + [to_unit_range(info.channels)])


def eval_view(info: common.DataInfo, size: int) -> T.Compose:
    return T.Compose([T.Resize(size), T.CenterCrop(size), to_unit_range(info.channels)])


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


class JEM(nn.Module):
    """A classifier f(x) = W h(x) + b on a backbone h; its logits define both p(y|x) and the energy E(x)."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.out_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))  # [B, C]


def without_batchnorm(net: nn.Module) -> nn.Module:
    """Every BatchNorm replaced by the identity (for --norm none on backbones built with it, e.g. tiny, resnet18):
    batch statistics would differ between data, SGLD samples and eval-mode sampling."""
    for name, child in net.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(net, name, nn.Identity())
        else:
            without_batchnorm(child)
    return net


class ReplayBuffer:
    """SGLD chains persisted across training steps (persistent contrastive divergence with restarts).

    x: [size, C, H, W], initialised uniform in [-1, 1]. sample(n) draws n distinct chains and restarts each from
    fresh uniform noise with probability reinit_freq; write(idx, x) stores the chains back. Draws are made on the
    buffer's device from the global generator (seeded every epoch), so nothing waits for the host and a resumed
    run draws the same. Never receives gradient."""

    def __init__(self, size: int, shape: tuple, reinit_freq: float = 0.05, device="cpu"):
        self.reinit_freq = reinit_freq
        self.x = torch.rand(size, *shape).mul_(2).sub_(1).to(device)  # [size, C, H, W] uniform in [-1, 1]

    def __len__(self) -> int:
        return len(self.x)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randperm(len(self.x), device=self.x.device)[:n]  # [n] distinct chains
        restart = torch.rand(n, device=self.x.device) < self.reinit_freq  # [n]
        noise = torch.rand(n, *self.x.shape[1:], device=self.x.device).mul_(2).sub_(1)  # [n, C, H, W]
        return torch.where(restart[:, None, None, None], noise, self.x[idx]), idx

    @torch.no_grad()
    def write(self, idx: torch.Tensor, x: torch.Tensor):
        self.x[idx] = x.detach().to(self.x.dtype)  # the samples are targets of nothing: stored without gradient


class LogitQueue:
    """HDGE's queue of logit vectors from earlier (global) batches: logits [C, K], initialised N(0, 1) as the
    official code, from `seed` alike on every process; the oldest batch is replaced first. Never receives gradient."""

    def __init__(self, num_classes: int, size: int, device="cpu", seed: int = 0):
        self.logits = torch.randn(num_classes, size, generator=torch.Generator().manual_seed(seed)).to(device)  # [C, K]
        self.ptr = 0

    @torch.no_grad()
    def push(self, logits: torch.Tensor):
        n = len(logits)
        self.logits[:, self.ptr:self.ptr + n] = logits.detach().T.to(self.logits.dtype)
        self.ptr = (self.ptr + n) % self.logits.shape[1]


def sgld_sample(model: nn.Module, x0: torch.Tensor, steps: int, step_size: float, noise: float) -> torch.Tensor:
    """steps of x <- x + step_size * d/dx logsumexp_y f(x)[y] + noise * N(0, I), i.e. descent on the energy,
    from x0 [B, C, H, W]. The model is in eval mode while sampling (restored after); no parameter gets gradient.
    Returns the samples, detached."""
    was_training = model.training
    model.eval()
    x = x0.detach().clone().requires_grad_(True)
    for _ in range(steps):
        # gradient with respect to the input only: the parameters' .grad is left untouched
        grad = torch.autograd.grad(-energy(model(x)).sum(), [x])[0]  # [B, C, H, W]
        x = (x.detach() + step_size * grad + noise * torch.randn_like(x)).requires_grad_(True)
    model.train(was_training)
    return x.detach()


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------


def energy(logits: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """E(x) = -logsumexp_y f(x)[y] [B], or with labels y [B] the joint energy E(x, y) = -f(x)[y] [B].
    logits: [B, C]. Float32 (float64 for float64 inputs), also under autocast."""
    with torch.autocast(logits.device.type, enabled=False):
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if y is None:
            return -torch.logsumexp(logits, dim=1)
        return -logits.gather(1, y[:, None]).squeeze(1)


def px_loss(logits_data: torch.Tensor, logits_sample: torch.Tensor) -> torch.Tensor:
    """L_p(x) = -(mean logsumexp f(x_data) - mean logsumexp f(x_sample)) = mean E(x_data) - mean E(x_sample).
    logits_data: [N, C]; logits_sample: [M, C]. Its gradient is the contrastive-divergence estimate of -d log p(x)."""
    return energy(logits_data).mean() - energy(logits_sample).mean()


def hdge_loss(logits: torch.Tensor, y: torch.Tensor, queue: torch.Tensor, temperature: float = 0.1,
              official_mask: bool = True) -> torch.Tensor:
    """HDGE's contrastive estimate of -log q(x|y), mean over the batch.

    logits: [N, C] f(x); y: [N] labels; queue: [C, K] logits of earlier batches (constants: detached here).
    p = f(x) / |f(x)| and q_k = queue[:, k] / |queue[:, k]|; positive logit s_0 = p_y, negatives s_k = q_k[y];
    loss = -log softmax(s / T)_0. With official_mask the official code's one-hot product inside a logsumexp over
    classes is kept: s_0 = log(exp(p_y) + C - 1), s_k = log(exp(q_k[y]) + C - 1) (module docstring)."""
    with torch.autocast(logits.device.type, enabled=False):
        dtype = torch.promote_types(logits.dtype, torch.float32)
        c = logits.shape[1]
        p = F.normalize(logits.to(dtype), dim=1)  # [N, C]
        q = F.normalize(queue.detach().to(dtype), dim=0)  # [C, K], no gradient into the queue
        l_pos = p.gather(1, y[:, None])  # [N, 1]
        l_neg = q[y]  # [N, K]: q_k[y_n]
        if official_mask and c > 1:
            rest = math.log(c - 1)  # the C - 1 zeroed entries, each exp(0) = 1 inside the logsumexp
            l_pos = torch.logaddexp(l_pos, torch.full_like(l_pos, rest))  # [N, 1]
            l_neg = torch.logaddexp(l_neg, torch.full_like(l_neg, rest))  # [N, K]
        s = torch.cat([l_pos, l_neg], dim=1) / temperature  # [N, 1 + K]
        return F.cross_entropy(s, torch.zeros(len(s), dtype=torch.long, device=s.device))


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


class Diverged(Exception):
    pass


DIVERGENCE_CHECK = 50  # steps between the reads of the divergence flag from the device


def train_one_epoch(model: nn.Module, loader, optimizer, lr_at, progress: common.Progress, args: Args,
                    buffer: ReplayBuffer | None, queue: LogitQueue | None) -> float:
    """One pass over this process's share of the data; returns the epoch's mean loss (global batch). Raises Diverged.
    `model` is the network as trained (DDP on several processes); `buffer` feeds SGLD, `queue` HDGE (or None)."""
    model.train()
    total = torch.zeros((), device=args.device)
    bad_step = torch.full((), -1, device=args.device)  # the first step of this epoch with a bad loss (-1: none yet)
    bad_loss = torch.zeros((), device=args.device)  # its loss
    for x, y in progress(loader):
        lr = common.set_lr(optimizer, lr_at(progress.step))
        x, y = common.to_device([x, y], args)  # [n, C, H, W], [n]
        x = x + args.sigma * torch.randn_like(x)  # the official inputs: in [-1, 1] plus Gaussian noise
        n = len(x)
        if buffer is not None:  # x_q: samples of p(x) from the replay buffer, without gradient
            x0, idx = buffer.sample(n)
            x_q = sgld_sample(common.unwrap(model), x0, args.sgld_steps, args.sgld_step_size, args.sgld_noise)
            buffer.write(idx, x_q)
            x = torch.cat([x, x_q])  # [2n, C, H, W]: one forward pass
        with common.autocast(args):
            logits = model(x)  # [n or 2n, C]
        logits, logits_q = logits[:n], logits[n:]
        loss = args.p_y_x_weight * F.cross_entropy(logits.float(), y)  # -log p(y|x)
        if buffer is not None:
            loss = loss + args.p_x_weight * px_loss(logits, logits_q)  # -log p(x), by contrastive divergence
        if queue is not None:
            loss = loss + args.hdge_weight * hdge_loss(logits, y, queue.logits, args.hdge_temperature,
                                                       args.hdge_mask == "official")
            queue.push(common.gather_no_grad(logits.detach().float()))  # the global batch, after its use
        # divergence: the first bad step is noted on the device (no host synchronisation inside the step) ...
        bad = ~torch.isfinite(loss.detach()) | (loss.detach().abs() > args.diverge_at)
        first = bad & (bad_step < 0)
        bad_step, bad_loss = torch.where(first, progress.i, bad_step), torch.where(first, loss.detach(), bad_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        progress.update(loss, lr, n)
        # ... and read back every DIVERGENCE_CHECK steps and at the end of the epoch, before any checkpoint: every
        # process stops together, and the weights after a bad step are never saved. The read waits for the device,
        # once every DIVERGENCE_CHECK steps, outside the step.
        if (progress.i + 1) % DIVERGENCE_CHECK == 0 or progress.i + 1 == len(loader):
            check_divergence(bad_step, bad_loss, loader.epoch)
    return common.all_reduce_mean(total / len(loader)).item()


def check_divergence(bad_step: torch.Tensor, bad_loss: torch.Tensor, epoch: int):
    """Raise Diverged on every process when any process has met a bad loss (one host read)."""
    if common.all_reduce_mean((bad_step >= 0).float()).item() > 0:
        where = f"at epoch {epoch + 1} step {bad_step.item() + 1}" if bad_step >= 0 else f"in epoch {epoch + 1}"
        raise Diverged(f"loss {bad_loss.item():.4g} {where}")


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


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


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE = sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)| over equal-width confidence bins (Guo et al.)."""
    count, confidence, accuracy = calibration_bins(probs, labels, bins)
    return float((count / count.sum() * (accuracy - confidence).abs()).sum())


def reliability_diagram(probs: torch.Tensor, labels: torch.Tensor, path, title: str, bins: int = 15):
    """Accuracy against confidence per bin, with the diagonal of perfect calibration (when matplotlib is here)."""
    try:
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
    ax.set(xlabel="confidence", ylabel="accuracy", title=title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ood_test_set(args: Args, info: common.DataInfo, size: int):
    """The test split of --ood-dataset (loaded before training, so that missing data fails early), or None."""
    if not args.ood_dataset:
        return None
    if common.DATASETS[args.ood_dataset].channels != info.channels:
        common.fail(f"--ood-dataset {args.ood_dataset} has {common.DATASETS[args.ood_dataset].channels} channel(s), "
                    f"--dataset {args.dataset} has {info.channels}")
    ood_args = dataclasses.replace(args, dataset=args.ood_dataset, data_dir=args.ood_data_dir or args.data_dir)
    ood_set = common.load_dataset(ood_args, False, eval_view(info, size))
    if args.eval_subset:
        ood_set = common.Subset(ood_set, common.balanced_subset(ood_set.targets, args.eval_subset, seed=0))
    return ood_set


def evaluate(model, test_set, ood_set, buffer, args: Args, run: common.RunDir) -> dict:
    """Test accuracy, ECE with reliability.png, samples.png from the buffer, OOD AUROC of the energy."""
    logits, labels = common.extract_features(model, test_set, args)  # [N, C], [N] on every process
    probs = logits.softmax(dim=1)
    results = {"test_top1": common.topk_accuracy(logits, labels, (1,))[0],
               "ece": expected_calibration_error(probs, labels)}
    if common.world()[0] == 0:
        reliability_diagram(probs, labels, run.path / "reliability.png",
                            f"{args.objective}: ECE {results['ece']:.4f}, accuracy {results['test_top1']:.4f}")
        if buffer is not None:
            grid = buffer.x[:64].clamp(-1, 1).cpu()
            torchvision.utils.save_image(grid, run.path / "samples.png", nrow=8, normalize=True, value_range=(-1, 1))
    if ood_set is not None:
        from sklearn.metrics import roc_auc_score

        ood_logits, _ = common.extract_features(model, ood_set, args)
        scores = torch.cat([-energy(logits), -energy(ood_logits)]).cpu().numpy()  # high: in distribution
        results["ood_auroc"] = float(roc_auc_score([1] * len(logits) + [0] * len(ood_logits), scores))
    common.print0("  ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return results


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def sync_buffers(model: nn.Module):
    """BatchNorm statistics of rank 0 on every process, as a resume would restore them from the checkpoint. Between
    DDP's broadcasts at each forward the other processes sample SGLD with their own; without this a resumed run
    would drift from an uninterrupted one. (The official normalisation-free Wide-ResNet has no such buffers.)"""
    if common.world()[1] > 1:
        for b in model.buffers():
            torch.distributed.broadcast(b, src=0)


def method_state(buffer: ReplayBuffer | None, queue: LogitQueue | None) -> dict:
    """What a resume needs beyond model and optimiser: every process's chains (gathered, in rank order; called on
    every process) and the queue (the same on every process)."""
    state = {}
    if buffer is not None:
        state["buffer"] = common.gather_no_grad(buffer.x)
    if queue is not None:
        state.update(queue=queue.logits, queue_ptr=queue.ptr)
    return state


def restore(state: dict, buffer: ReplayBuffer | None, queue: LogitQueue | None, args: Args):
    """This process's share of the chains and the queue, as they were when the checkpoint was written."""
    rank, world = common.world()
    if buffer is not None:
        if "buffer" not in state or len(state["buffer"]) != args.buffer_size:
            common.fail(f"the checkpoint holds no replay buffer of --buffer-size {args.buffer_size} to continue with")
        buffer.x.copy_(rearrange(state["buffer"], "(w n) ... -> w n ...", w=world)[rank])
    if queue is not None:
        if "queue" not in state or state["queue"].shape != queue.logits.shape:
            common.fail(f"the checkpoint holds no HDGE queue of --queue-size {args.queue_size} to continue with")
        queue.logits.copy_(state["queue"])
        queue.ptr = state["queue_ptr"]


def main(args: Args):
    common.setup_distributed(args)
    info, size = common.dataset_info(args)
    views = jem_augment(info, size, flip=args.dataset != "svhn")
    train_set, memory_set, test_set = common.training_and_eval_sets(args, views, eval_view(info, size))
    train_data = common.TrainData(train_set, views, args)  # on the device (--data-path) or the CPU DataLoader
    ood_set = ood_test_set(args, info, size)
    run = common.RunDir(args, "jem")

    backbone = common.build_backbone(args.arch, info.channels, size, norm=args.norm, act="leaky")
    model = JEM(without_batchnorm(backbone) if args.norm == "none" else backbone, info.num_classes)
    model = common.prepare_model(model, args)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    state = run.resume(model, optimizer)
    sgld, hdge = args.objective in ("jem", "hdge+sgld"), args.objective.startswith("hdge")
    buffer = ReplayBuffer(args.buffer_size // common.world()[1], (info.channels, size, size), args.reinit_freq,
                          args.device) if sgld else None
    queue = LogitQueue(info.num_classes, args.queue_size, args.device, args.seed) if hdge else None
    if state["epoch"]:
        restore(state, buffer, queue, args)
    ddp_model = common.distribute(model, args)  # the model as trained: DDP on several processes

    warmup, decay_at = round(args.warmup_epochs * train_data.steps), args.decay_at()

    def lr_at(step: int) -> float:  # linear warm-up, then steps of x decay_rate at the decay epochs (official)
        decays = sum(step >= e * train_data.steps for e in decay_at)
        return args.lr * min(1.0, step / warmup if warmup else 1.0) * args.decay_rate ** decays

    evaluation = common.Evaluation(memory_set, test_set, info.num_classes, args)
    progress = common.Progress(args)
    common.print0(f"JEM ({args.objective}) {args.arch} on {args.dataset}: {len(train_set)} images, {train_data.steps} "
                  f"steps of {args.batch_size} per epoch, {common.world()[1]} process(es) on {args.device}")
    if state["epoch"] == 0:
        run.log(epoch=0, step=0, knn_top1=evaluation.knn(model.backbone))
    for epoch in range(state["epoch"], args.epochs):
        try:
            loss = train_one_epoch(ddp_model, train_data.loader(epoch), optimizer, lr_at, progress, args, buffer,
                                   queue)
        except Diverged as err:  # the last checkpoint is untouched: continue from it with gentler settings
            kept = f"the last good checkpoint in {run.path} is kept" if run.saved_epoch else \
                "no checkpoint was written yet"
            common.print0(f"error: training diverged ({err}); {kept}: continue with --resume (or start again) "
                          f"and a lower --lr or more --sgld-steps", file=sys.stderr)
            raise SystemExit(3) from None
        sync_buffers(model)
        knn_top1 = evaluation.knn(model.backbone, epoch + 1) if evaluation.due(epoch) else None
        run.log(epoch=epoch + 1, loss=loss, knn_top1=knn_top1, **progress.summary())
        run.save(epoch + 1, model=model.state_dict(), optimizer=optimizer.state_dict(), **method_state(buffer, queue))
    evaluation.report(model.backbone, run, **evaluate(model, test_set, ood_set, buffer, args, run))
    common.cleanup_distributed()


if __name__ == "__main__":
    main(common.parse(Args))
