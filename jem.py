"""JEM: Your Classifier is Secretly an Energy Based Model and You Should Treat it Like One.
Grathwohl, Wang, Jacobsen, Duvenaud, Norouzi & Swersky, ICLR 2020. arXiv:1912.03263.
Official code: github.com/wgrathwohl/JEM
With HDGE: Hybrid Discriminative-Generative Training via Contrastive Learning. Liu & Abbeel, 2020. arXiv:2007.09070.
Official code: github.com/forhaoliu/hybrid-discriminative-generative

  f(x) in R^C                   the classifier's logits;  p(y|x) = softmax(f(x))_y, the classifier
  E(x, y) = -f(x)[y]            p(x, y) = exp(-E(x, y)) / Z
  E(x) = -logsumexp_y f(x)[y]   p(x) = sum_y p(x, y) = exp(-E(x)) / Z
  SGLD from a replay buffer (10,000 images, initialised uniform in [-1, 1]): each chain restarts from uniform noise
  with probability rho = 0.05, then takes 20 steps (the network in eval mode) of
      x <- x + alpha * d/dx logsumexp_y f(x)[y] + sigma * eps,   eps ~ N(0, I),  alpha = 1, sigma = 0.01
  and the samples x_q are written back to the buffer (without gradient).
  L_p(x) = -(mean_data logsumexp f(x) - mean_samples logsumexp f(x_q))  =  mean E(x) - mean E(x_q)
  HDGE: log q(x|y) by contrast with a queue of K = 65,536 logit vectors of earlier batches (no gradient):
      p = f(x) / |f(x)|,  q_k = f(x_k) / |f(x_k)|
      L_HDGE = -log exp(p_y / T) / (exp(p_y / T) + sum_k exp(q_k[y] / T)),  T = 0.1   (see the quirk below)
  L = L_p(x) + CE(f(x), y)     --objective jem          L = L_HDGE + CE     --objective hdge
  L = L_HDGE + L_p(x) + CE     --objective hdge+sgld    L = CE              --objective ce (the baseline)

Run:   python jem.py --dataset digits --arch tiny --epochs 20 --workers 0 --sgld-steps 5   (CPU; test accuracy, ECE)
       torchrun --nproc_per_node=8 jem.py --data-dir data --download --ood-dataset svhn   (official recipe)
       torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 jem.py ...
Defaults: the official CIFAR-10 command (README and train_wrn_ebm.py): Wide-ResNet 28-10 without normalisation
       as its wideresnet.py (biases, the downsampling stride in a block's second convolution, PyTorch's default
       initialisation: conv_init is never called), LeakyReLU 0.2, no dropout, Adam lr 1e-4 (betas 0.9, 0.999, no
       weight decay), warm-up over about 1,000 steps, lr x 0.3 at epochs 160 and 180 of 200, batch 64, inputs in
       [-1, 1] plus Gaussian noise 0.03, pad-4 crops and flips, p(x) and p(y|x) weights 1, SGLD as above. HDGE:
       queue 65,536, T = 0.1, weight 1 (its README). Evaluation: the classifier's test accuracy (no linear probe).
Expect: JEM 92.9% CIFAR-10 test accuracy, OOD AUROC log p(x) 0.67 against SVHN (JEM paper, Tables 1 and 2,
       WRN-28-10), better calibration than cross-entropy (paper, CIFAR-100); HDGE above both on CIFAR-10 with the
       same network (HDGE paper, Table 1). Training diverges now and then (the paper says so): this file stops with
       the way to continue. Outputs: reliability.png, samples.png (from the buffer), ece, ood_auroc, test_top1.

Where this file differs from the official code, and why:
  - HDGE's masking quirk is the default, as published (--hdge-mask select drops it): the one-hot product inside a
    logsumexp counts the C - 1 other classes as exp(0): logits log(exp(p_y) + C - 1), log(exp(q_k[y]) + C - 1).
  - One batch serves both terms (official: independent draws; the same expectation, half the loading); data and
    SGLD samples share one forward pass (one DDP forward a step; BatchNorm backbones normalise them together).
  - --norm none (the default) strips BatchNorm from tiny and the ResNets too, as the official network has none.
  - No 5,000-image validation split (official: to keep the best checkpoint); test images get no noise (official: 0.03).
  - Under torchrun each process keeps buffer-size / processes chains; the HDGE queue takes the global batch's
    logits (as MoCo's). A step's chains are distinct (official: drawn with replacement, the last write wins).
  - ECE: 15 equal-width confidence bins (Guo et al., 2017); OOD detection scores by -E(x) = logsumexp f(x).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from einops import rearrange

import common

# -------- Args --------------------------------------------------------------------------------------------------------


@dataclass
class Args(common.Args):
    arch: str = common.flag("wrn28_10", "backbone (the official Wide-ResNet 28-10; tiny or resnet18 for small runs)")
    norm: str = common.flag("none", "none (official: every BatchNorm of the backbone removed) or batch (kept)",
                            ("none", "batch"))
    objective: str = common.flag("jem", "jem (SGLD for p(x)), hdge (contrastive q(x|y)), hdge+sgld (both), ce "
                                 "(baseline)", ("jem", "hdge", "hdge+sgld", "ce"))
    epochs: int = common.flag(200, "training epochs (official)")
    batch_size: int = common.flag(64, "global batch, split evenly over the processes (official 64)")
    lr: float = common.flag(1e-4, "Adam learning rate (official)")
    weight_decay: float = common.flag(0.0, "Adam weight decay (official 0)")
    warmup_epochs: float = common.flag(1.28, "linear warm-up (the official 1,000 steps of batch 64 on 50,000 images)")
    decay_epochs: str = common.flag("160,180", "epochs at which the learning rate is multiplied by --decay-rate")
    decay_rate: float = common.flag(0.3, "learning-rate decay factor (official)", "positive")
    sigma: float = common.flag(0.03, "std of the Gaussian noise added to training inputs in [-1, 1] (official)", ">= 0")
    p_x_weight: float = common.flag(1.0, "weight of the p(x) term L_p(x) (official)", ">= 0")
    p_y_x_weight: float = common.flag(1.0, "weight of the cross-entropy term (official)", ">= 0")
    buffer_size: int = common.flag(10000, "SGLD replay buffer size, over all processes (official)")
    reinit_freq: float = common.flag(0.05, "rho, probability that a chain restarts from uniform noise (official)",
                                     "in [0, 1]")
    sgld_steps: int = common.flag(20, "SGLD steps per training step (official; more steps are more stable)",
                                  "positive")
    sgld_step_size: float = common.flag(1.0, "alpha, SGLD step size on the gradient of logsumexp f (official)",
                                        "positive")
    sgld_noise: float = common.flag(0.01, "sigma of the SGLD noise (official)", ">= 0")
    hdge_weight: float = common.flag(1.0, "weight of the HDGE term (official pxycontrast)", ">= 0")
    queue_size: int = common.flag(65536, "K, logit vectors kept by HDGE from earlier batches (official contrast_k)")
    hdge_temperature: float = common.flag(0.1, "T of HDGE (official contrast_t)", "positive")
    hdge_mask: str = common.flag("official", "official (one-hot product inside logsumexp) or select (the label's "
                                 "entry only)", ("official", "select"))
    diverge_at: float = common.flag(1e8, "stop when |loss| exceeds this or is not finite (official 1e8)", "positive")
    ood_dataset: str = common.flag("", "a second dataset for OOD-detection AUROC of the energy (e.g. svhn; empty: "
                                   "skip)", ("", *common.DATASETS))
    ood_data_dir: str = common.flag("", "where --ood-dataset lives (default: --data-dir)")
    FREE_ON_RESUME = common.Args.FREE_ON_RESUME + ("diverge_at", "ood_dataset", "ood_data_dir")  # not the training

    def check(self, world_size: int = 1):
        super().check(world_size)
        if self.buffer_size < self.batch_size or self.buffer_size % world_size:
            raise ValueError(f"--buffer-size {self.buffer_size} must hold a batch of chains (--batch-size) and "
                             f"divide over {world_size} processes")
        if self.queue_size < 1 or self.queue_size % self.batch_size:
            raise ValueError(f"--queue-size {self.queue_size} must be a positive multiple of --batch-size "
                             f"{self.batch_size}")
        if not all(e.strip().isdigit() for e in self.decay_epochs.split(",") if e.strip()):
            raise ValueError(f"--decay-epochs must be comma-separated integers, got {self.decay_epochs!r}")


# -------- Views -------------------------------------------------------------------------------------------------------


def to_unit_range(channels: int) -> T.Compose:
    """PIL image -> tensor in [-1, 1] (mean 0.5, std 0.5), the space the SGLD chains live in."""
    return T.Compose([T.ToTensor(), T.Normalize((0.5,) * channels, (0.5,) * channels)])


def jem_augment(info: common.DataInfo, size: int, flip: bool = True) -> T.Compose:
    """The official training view: reflect-pad 4 and crop back (for 32 px; an eighth of the side in general),
    horizontal flip (not for SVHN's digits), scale to [-1, 1]. The step adds the Gaussian noise of --sigma."""
    ops = [T.Resize(size), T.CenterCrop(size)] if size != info.size else []
    ops += [T.Pad(max(1, size // 8), padding_mode="reflect"), T.RandomCrop(size)]
    ops += [T.RandomHorizontalFlip()] if flip else []
    return T.Compose(ops + [to_unit_range(info.channels)])


def eval_view(info: common.DataInfo, size: int) -> T.Compose:
    return T.Compose([T.Resize(size), T.CenterCrop(size), to_unit_range(info.channels)])


# -------- Model -------------------------------------------------------------------------------------------------------


class JEM(nn.Module):
    """A classifier f(x) = W h(x) + b on a backbone h; its logits define both p(y|x) and the energy E(x)."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.out_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))  # [B, C]


def without_batchnorm(net: nn.Module) -> nn.Module:
    """Every BatchNorm replaced by the identity (--norm none: module docstring)."""
    for name, child in net.named_children():
        setattr(net, name, nn.Identity() if isinstance(child, nn.modules.batchnorm._BatchNorm) else
                without_batchnorm(child))
    return net


class ReplayBuffer:
    """SGLD chains x [size, C, H, W] kept across steps (persistent contrastive divergence with restarts), without
    gradient; drawn on the buffer's device from the global generator, seeded every epoch: a resumed run draws alike."""

    def __init__(self, size: int, shape: tuple, reinit_freq: float = 0.05, device="cpu"):
        self.reinit_freq = reinit_freq
        self.x = torch.rand(size, *shape).mul_(2).sub_(1).to(device)  # [size, C, H, W] uniform in [-1, 1]

    def __len__(self) -> int:
        return len(self.x)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n distinct chains [n, C, H, W], each restarted from uniform noise with probability reinit_freq; indices."""
        idx = torch.randperm(len(self.x), device=self.x.device)[:n]  # [n] distinct chains
        restart = torch.rand(n, device=self.x.device) < self.reinit_freq  # [n]
        noise = torch.rand(n, *self.x.shape[1:], device=self.x.device).mul_(2).sub_(1)  # [n, C, H, W]
        return torch.where(restart[:, None, None, None], noise, self.x[idx]), idx

    @torch.no_grad()
    def write(self, idx: torch.Tensor, x: torch.Tensor):
        self.x[idx] = x.detach().to(self.x.dtype)  # the samples are targets of nothing: stored without gradient

    def state_dict(self) -> dict:
        """Every process's chains, gathered in rank order (called on every process)."""
        return {"buffer": common.gather_no_grad(self.x)}

    def load_state_dict(self, state: dict):
        """This process's share of the chains of state_dict()."""
        rank, world = common.world()
        if "buffer" not in state or len(state["buffer"]) != len(self) * world:
            common.fail(f"the checkpoint holds no replay buffer of --buffer-size {len(self) * world} to continue with")
        self.x.copy_(rearrange(state["buffer"], "(w n) ... -> w n ...", w=world)[rank])


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

    def state_dict(self) -> dict:
        return {"queue": self.logits, "queue_ptr": self.ptr}

    def load_state_dict(self, state: dict):
        if "queue" not in state or state["queue"].shape != self.logits.shape:
            common.fail(f"the checkpoint holds no HDGE queue of --queue-size {self.logits.shape[1]} to continue with")
        self.logits.copy_(state["queue"])
        self.ptr = state["queue_ptr"]


def sgld_sample(model: nn.Module, x0: torch.Tensor, steps: int, step_size: float, noise: float) -> torch.Tensor:
    """`steps` of SGLD (module docstring) from x0 [B, C, H, W], the model in eval mode; the samples, detached."""
    was_training = model.training
    model.eval()
    x = x0.detach().clone().requires_grad_(True)
    for _ in range(steps):
        # gradient with respect to the input only: the parameters' .grad is left untouched
        grad = torch.autograd.grad(-energy(model(x)).sum(), [x])[0]  # [B, C, H, W]
        x = (x.detach() + step_size * grad + noise * torch.randn_like(x)).requires_grad_(True)
    model.train(was_training)
    return x.detach()


# -------- Losses ------------------------------------------------------------------------------------------------------


def energy(logits: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """E(x) = -logsumexp_y f(x)[y] [B], or with labels y [B] the joint energy E(x, y) = -f(x)[y] [B].
    logits: [B, C]. Float32 (float64 for float64 inputs), also under autocast."""
    with torch.autocast(logits.device.type, enabled=False):
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if y is None:
            return -torch.logsumexp(logits, dim=1)
        return -logits.gather(1, y[:, None]).squeeze(1)


def px_loss(logits_data: torch.Tensor, logits_sample: torch.Tensor) -> torch.Tensor:
    """L_p(x) from logits [N, C] and [M, C]: its gradient is the contrastive-divergence estimate of -d log p(x)."""
    return energy(logits_data).mean() - energy(logits_sample).mean()


def hdge_loss(logits: torch.Tensor, y: torch.Tensor, queue: torch.Tensor, temperature: float = 0.1,
              official_mask: bool = True) -> torch.Tensor:
    """L_HDGE (module docstring), mean over the batch: logits [N, C] f(x); y [N] labels; queue [C, K] logits of
    earlier batches (constants: detached here); official_mask keeps the official code's masking quirk."""
    with torch.autocast(logits.device.type, enabled=False):
        dtype = torch.promote_types(logits.dtype, torch.float32)
        p = F.normalize(logits.to(dtype), dim=1)  # [N, C]
        q = F.normalize(queue.detach().to(dtype), dim=0)  # [C, K], no gradient into the queue
        s = torch.cat([p.gather(1, y[:, None]), q[y]], dim=1)  # [N, 1 + K]: p_y, then q_k[y_n]
        if official_mask and logits.shape[1] > 1:  # the C - 1 zeroed entries, each exp(0) = 1 in the logsumexp
            s = torch.logaddexp(s, torch.full_like(s, math.log(logits.shape[1] - 1)))  # log(exp(s) + C - 1)
        return F.cross_entropy(s / temperature, torch.zeros(len(s), dtype=torch.long, device=s.device))


# -------- Training ----------------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, args: Args) -> torch.optim.Optimizer:
    """Adam over every parameter, as the official code (betas 0.9, 0.999; --weight-decay, officially 0)."""
    return torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)


def train_step(model: nn.Module, batch, optimizer, buffer: ReplayBuffer | None, queue: LogitQueue | None,
               args: Args) -> torch.Tensor:
    """One step of JEM on one batch (x, y): L = CE + L_p(x) on SGLD samples from `buffer` (written back with them)
    + L_HDGE against `queue` (then given this batch's logits), each term with its weight; `buffer`, `queue` None
    drop their terms. `model` is the network as trained (DDP on several processes). Returns the loss (detached)."""
    x, y = common.to_device(batch, args)  # [n, C, H, W], [n]
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
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_one_epoch(model: nn.Module, loader, optimizer, lr_at, progress: common.Progress, args: Args,
                    buffer: ReplayBuffer | None, queue: LogitQueue | None) -> float:
    """One pass over this process's share of the data; returns the epoch's mean loss (global batch).
    `model` is the network as trained (DDP on several processes); `buffer` feeds SGLD, `queue` HDGE (or None)."""
    model.train()
    total = torch.zeros((), device=args.device)
    progress.start(len(loader))  # the epoch's clock
    for i, batch in enumerate(loader):
        step = loader.epoch * len(loader) + i  # the global step: the schedule's clock
        lr = common.set_lr(optimizer, lr_at(step))
        loss = train_step(model, batch, optimizer, buffer, queue, args)
        total += loss
        progress.update(step, loss, lr, len(batch[1]))  # the images in this process's batch
    return common.all_reduce_mean(total / len(loader)).item()


def sync_buffers(model: nn.Module):
    """Rank 0's BatchNorm statistics on every process, as a resume restores them (the other processes sample SGLD
    with their own between DDP's broadcasts). The official normalisation-free Wide-ResNet has no such buffers."""
    if common.world()[1] > 1:
        for b in model.buffers():
            torch.distributed.broadcast(b, src=0)


def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15):
    """(count, mean confidence, accuracy) of each equal-width confidence bin [lo, hi) (the last closed) [bins]."""
    probs, labels = probs.detach().cpu().double(), labels.cpu()
    confidence, prediction = probs.max(dim=1)  # [N], [N]
    which = (confidence * bins).long().clamp(0, bins - 1)  # [N] bin index; confidence 1 joins the last bin
    count = torch.bincount(which, minlength=bins).double()  # [bins]
    conf_sum = torch.bincount(which, confidence, minlength=bins)  # [bins] sums of the bins' confidences
    acc_sum = torch.bincount(which, (prediction == labels).double(), minlength=bins)  # [bins] and correct answers
    return count, conf_sum / count.clamp_min(1), acc_sum / count.clamp_min(1)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE = sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)| over equal-width confidence bins (Guo et al.)."""
    count, confidence, accuracy = calibration_bins(probs, labels, bins)
    return float((count / count.sum() * (accuracy - confidence).abs()).sum())


def reliability_diagram(probs: torch.Tensor, labels: torch.Tensor, path, title: str, bins: int = 15):
    """Accuracy against confidence per bin, and the diagonal of perfect calibration (when matplotlib is here)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return
    count, _, accuracy = calibration_bins(probs, labels, bins)
    keep = count > 0  # empty bins are left blank
    fig, ax = plt.subplots(figsize=(4, 4))
    # a bar below the diagonal: over-confident in that bin
    ax.bar(((torch.arange(bins) + 0.5) / bins)[keep], accuracy[keep], width=1 / bins, edgecolor="black")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlabel="confidence", ylabel="accuracy", title=title)
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
            torchvision.utils.save_image(buffer.x[:64].cpu().add(1).div(2), run.path / "samples.png", nrow=8)
    if ood_set is not None:
        from sklearn.metrics import roc_auc_score

        ood_logits, _ = common.extract_features(model, ood_set, args)
        scores = torch.cat([-energy(logits), -energy(ood_logits)]).cpu().numpy()  # high: in distribution
        results["ood_auroc"] = float(roc_auc_score([1] * len(logits) + [0] * len(ood_logits), scores))
    common.print0("  ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return results


# -------- Main --------------------------------------------------------------------------------------------------------


def main(args: Args):
    common.setup_distributed(args)
    info, size = common.dataset_info(args)
    views = jem_augment(info, size, flip=args.dataset != "svhn")
    train_set, memory_set, test_set = common.training_and_eval_sets(args, views, eval_view(info, size))
    train_data = common.TrainData(train_set, views, args)  # on the device (--data-path) or the CPU DataLoader
    ood_set = ood_test_set(args, info, size)
    run = common.RunDir(args, "jem")

    backbone = common.build_backbone(args.arch, info.channels, size, act="leaky", style="suncet")
    model = JEM(without_batchnorm(backbone) if args.norm == "none" else backbone, info.num_classes)
    model = common.prepare_model(model, args)
    optimizer = build_optimizer(model, args)
    state = run.resume(model, optimizer)
    sgld, hdge = args.objective in ("jem", "hdge+sgld"), args.objective.startswith("hdge")
    buffer = ReplayBuffer(args.buffer_size // common.world()[1], (info.channels, size, size), args.reinit_freq,
                          args.device) if sgld else None
    queue = LogitQueue(info.num_classes, args.queue_size, args.device, args.seed) if hdge else None
    parts = [part for part in (buffer, queue) if part is not None]  # saved beside the model and the optimiser
    for part in parts if state["epoch"] else []:
        part.load_state_dict(state)
    ddp_model = common.distribute(model, args)  # the model as trained: DDP on several processes

    warmup = round(args.warmup_epochs * train_data.steps)
    decay_at = [int(e) * train_data.steps for e in args.decay_epochs.split(",") if e.strip()]  # steps

    def lr_at(step: int) -> float:  # linear warm-up, then x decay_rate at each of the decay epochs (official)
        decays = sum(step >= d for d in decay_at)
        return args.lr * min(1.0, step / warmup if warmup else 1.0) * args.decay_rate ** decays

    evaluation = common.Evaluation(memory_set, test_set, info.num_classes, args)
    progress = common.Progress(args, diverge_at=args.diverge_at)  # a bad loss stops the run (exit code 3)
    common.print0(f"JEM ({args.objective}) {args.arch} on {args.dataset}: {len(train_set)} images, {train_data.steps} "
                  f"steps of {args.batch_size} per epoch, {common.world()[1]} process(es) on {args.device}")
    if state["epoch"] == 0:
        run.log(epoch=0, step=0, knn_top1=evaluation.knn(model.backbone))
    for epoch in range(state["epoch"], args.epochs):
        loss = train_one_epoch(ddp_model, train_data.loader(epoch), optimizer, lr_at, progress, args, buffer, queue)
        sync_buffers(model)
        knn_top1 = evaluation.knn(model.backbone, epoch + 1) if evaluation.due(epoch) else None
        run.log(epoch=epoch + 1, loss=loss, knn_top1=knn_top1, **progress.summary())
        run.save(epoch + 1, model=model.state_dict(), optimizer=optimizer.state_dict(),
                 **{k: v for part in parts for k, v in part.state_dict().items()})
    evaluation.report(model.backbone, run, **evaluate(model, test_set, ood_set, buffer, args, run))
    common.cleanup_distributed()


if __name__ == "__main__":
    main(common.parse(Args))
