"""InstDisc: Unsupervised Feature Learning via Non-Parametric Instance Discrimination.
Wu, Xiong, Yu & Lin, CVPR 2018. arXiv:1805.01978. Official code: github.com/zhirongw/lemniscate.pytorch

  Every training image x_i is its own class. v = f(x): encoder, a linear layer to D = 128, L2-normalised.
  Memory bank V = {v_1 .. v_N}: one unit vector per training image, read as the "class weights" (no gradient).
  P(i|v) = exp(v_i . v / tau)  /  sum_{j=1..N} exp(v_j . v / tau)          non-parametric softmax, tau = 0.1
  J = -sum_i log P(i | f(x_i))                  (--nce-k 0: the exact softmax, the official CIFAR-10 command)
  NCE (--nce-k m > 0), as the official code:
    P(i|v) ~= exp(v_i . v / tau) / Z,   Z = N * mean exp(v_j . v / tau) over the first batch's samples, then fixed
    noise P_n = 1/N (uniform, drawn by the alias method),  h(i, v) = P(D=1|i,v) = P(i|v) / (P(i|v) + m P_n)
    J_NCE = -E_{P_d}[ log h(i, v) ]  -  m E_{P_n}[ log(1 - h(i, v')) ]      (m noise rows per image)
  Proximal regularisation (--proximal lambda): + lambda ||v_i^(t) - v_i^(t-1)||^2, v_i^(t-1) the bank's row.
  Bank update after each step (no gradient): v_i <- (m_b v_i + (1 - m_b) f(x_i)) / ||...||, m_b = 0.5.
  Weighted k-NN (k = 200, sigma = 0.1): each of the k nearest v_j votes for its class with weight exp(v_j.v/sigma).
  Distributed: the bank is global and identical on every process (features and indices of the global batch are
  gathered before the update). Each image's loss involves only its own v, the bank and Z, so each process
  computes the loss of its own images and DDP's gradient average is the global batch's gradient; the noise rows
  of the global batch are drawn from a generator every process holds alike, and Z is estimated from the whole
  first global batch, so two processes on two halves take exactly the step of one process on the whole batch.

Run:   python instdisc.py --dataset digits --arch tiny --epochs 30 --batch-size 128 --workers 0
                                                          (CPU: about a minute; prints k-NN untrained vs trained)
       torchrun --nproc_per_node=1 instdisc.py --data-dir data --download   (the official CIFAR-10 recipe below;
                  batch 128 fits one GPU: more processes split it, add --sync-bn to keep BatchNorm over 128)
       torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 instdisc.py ...
Defaults: the official CIFAR-10 command (`python cifar.py --nce-k 0 --nce-t 0.1 --lr 0.03`, README of
       zhirongw/lemniscate.pytorch) with cifar.py's settings: ResNet-18 with the CIFAR stem, 128-d features,
       full softmax, tau 0.1, bank momentum 0.5, batch 128, 200 epochs, SGD lr 0.03 momentum 0.9 weight decay 5e-4,
       lr x0.1 after epochs 120 and 160; views: crop of 20-100% of the area, colour jitter 0.4, grayscale 0.2, no flip.
       Evaluation: the weighted k-NN (k 200, sigma 0.1) on v against the bank; no linear protocol.
Expect: weighted k-NN top-1 80.8% on CIFAR-10 (paper, Table 1: non-parametric softmax, ResNet-18, 128-d;
       NCE with m = 4096: 80.4%). The official README gives the CIFAR-10 command but no figure.

Where this file differs from the official code, and why:
  - The bank update is an explicit step after backward, applied once to the gathered global batch; the official
    code updates the bank inside NCEFunction.backward, which would update it again at every extra backward pass
    (e.g. gradcheck) and before the other processes' features are known. Same values: both use the forward's f(x_i).
  - The noise rows of the global batch are drawn on every process from a shared generator (each keeps its rows),
    so the run does not depend on the number of processes (BatchNorm aside); the official code runs one process.
  - The bank starts as random unit vectors (the paper); the official code draws uniform [-sqrt(3/D), sqrt(3/D)]
    entries, unit-norm on average only.
  - The learning-rate steps sit at 60% and 80% of --epochs (epochs 120 and 160 of the official 200), so a shorter
    run keeps the schedule's shape; --warmup-epochs (default 0, as the official code) adds a linear warm-up.
  - Inputs are standardised with the dataset's channel std; the official CIFAR-10 script uses (0.2023, 0.1994,
    0.2010) for (0.2470, 0.2435, 0.2616). BatchNorm follows the first convolution, so little changes. The ResNet
    is torchvision's, Kaiming fan-out initialised (the official models/resnet_cifar.py keeps PyTorch's defaults).
  - Evaluation: every epoch the paper's k-NN on the 128-d v against the memory bank (bank_knn_top1, as the
    official cifar.py, which ends with a k-NN on recomputed v; Expect is the paper's k-NN on v); and, as for every
    method here, the k-NN monitor and linear probe on the encoder's features (before the 128-d layer).

Options from two later papers, off by default (they need adversarial.py beside this file):
  --adv-eps EPS [--adv-steps S --adv-weight ALPHA]   CLAE (Ho & Vasconcelos, "Contrastive Learning with
       Adversarial Examples", NeurIPS 2020, github.com/chihhuiho/CLAE): J += ALPHA * J(x_adv), the method's own
       loss of an adversarial view of x found by FGSM (or PGD) against that loss within EPS pixels (CLAE: 0.03,
       1.0). With the memory bank, "its own loss" means that x_adv must still pick out its image's bank row v_i
       (among all N rows, or against the same m noise rows under NCE); CLAE's own instance-discrimination code
       contrasts within the batch, without a bank. The bank is updated from the clean features only.
  --adv-bn   AdvProp (Xie et al., "Adversarial Examples Improve Image Recognition", CVPR 2020): the encoder's
       BatchNorms get auxiliary twins (momentum 0.01 as CLAE's code) that normalise adversarial views only.
"""

from __future__ import annotations

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
    epochs: int = common.flag(200, "training epochs (official cifar.py)")
    batch_size: int = common.flag(128, "global batch, split evenly over the processes (official cifar.py)")
    lr: float = common.flag(0.03, "SGD learning rate, x0.1 after 3/5 and 4/5 of the epochs (official: epochs 120, "
                            "160 of 200)")
    weight_decay: float = common.flag(5e-4, "SGD weight decay, on every parameter as the official code")
    warmup_epochs: float = common.flag(0, "linear warm-up epochs before the step schedule (0: none, as the official "
                                       "code)")
    momentum: float = common.flag(0.9, "SGD momentum")
    low_dim: int = common.flag(128, "D, size of the L2-normalised feature v and of each memory-bank row", ">= 1")
    nce_k: int = common.flag(0, "m, noise samples per image for NCE (0: the full non-parametric softmax over all N "
                             "images)", ">= 0")
    temperature: float = common.flag(0.1, "tau of P(i|v) (the official --nce-t)", "positive")
    bank_momentum: float = common.flag(0.5, "m_b of the memory-bank update v_i <- normalise(m_b v_i + (1 - m_b) "
                                       "f(x_i))", "in [0, 1)")
    proximal: float = common.flag(0.0, "lambda of the proximal term lambda ||v_i^(t) - v_i^(t-1)||^2 (0: off, as "
                                  "the official code)", ">= 0")
    crop_min_scale: float = common.flag(0.2, "smallest crop area as a fraction of the image (official: 0.2)",
                                        "in (0, 1]")
    flip: bool = common.flag(False, "random horizontal flip (off in the official CIFAR-10 script, on in its "
                             "ImageNet one)")
    adv_eps: float = common.flag(0.0, "CLAE: L-inf radius of the adversarial view in pixels of [0, 1] (0: off; "
                                 "CLAE uses 0.03)", ">= 0")
    adv_steps: int = common.flag(1, "CLAE: gradient steps making the adversarial view (1: FGSM as CLAE, more: PGD)",
                                 ">= 1")
    adv_weight: float = common.flag(1.0, "CLAE: alpha, weight of the adversarial view's loss", ">= 0")
    adv_bn: bool = common.flag(False, "AdvProp: auxiliary BatchNorms in the encoder, used for adversarial views only")

    def check(self, world_size: int = 1):
        super().check(world_size)
        if self.adv_bn and not self.adv_eps:
            raise ValueError("--adv-bn needs adversarial views: set --adv-eps (e.g. 0.03)")


# -------- Views -------------------------------------------------------------------------------------------------------


def instdisc_augment(info: common.DataInfo, size: int, min_scale: float = 0.2, flip: bool = False) -> T.Compose:
    """One random view, as the official cifar.py: crop of 20-100% of the area resized to `size`, colour jitter
    (brightness, contrast, saturation and hue 0.4, always applied), grayscale with probability 0.2; no flip."""
    ops = [
        T.RandomResizedCrop(size, scale=(min_scale, 1.0)),
        T.ColorJitter(0.4, 0.4, 0.4, 0.4),
        T.RandomGrayscale(p=0.2),
    ]
    if flip:
        ops.append(T.RandomHorizontalFlip())
    return T.Compose(ops + [common.normalize(info)])


# -------- Model -------------------------------------------------------------------------------------------------------


class InstDisc(nn.Module):
    """v = f(x): the encoder, a linear layer (with bias) to low_dim, L2 normalisation, as the official ResNet."""

    def __init__(self, backbone: nn.Module, low_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.out_dim, low_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc(self.backbone(x)), dim=1)  # [B, low_dim], unit rows


class MemoryBank:
    """V = {v_1 .. v_N}: one L2-normalised feature per training image, NCE's normalisation constant Z, and NCE's
    noise distribution P_n = 1/N (drawn by the alias method, as the official code) with the generator of its draws.
    V is a plain tensor, not a parameter: the losses read it detached, only `update` writes it (no_grad, with the
    global batch; every process holds the whole bank). The noise generator, seeded alike on every process at
    each epoch, needs no saving to resume."""

    def __init__(self, n: int, dim: int, generator: torch.Generator | None = None, dtype=torch.float32):
        # random unit vectors (the paper), drawn from `generator` so that every process starts from the same bank
        self.memory = F.normalize(torch.randn(n, dim, generator=generator, dtype=dtype), dim=1)  # [N, D]
        self.Z = -1.0  # NCE's Z; negative until estimated from the first batch
        self.noise, self.rng = AliasSampler(torch.ones(n)), torch.Generator()

    def to(self, device) -> MemoryBank:
        self.memory, self.noise, self.rng = self.memory.to(device), self.noise.to(device), torch.Generator(device)
        return self

    def draw_noise(self, rows: int, m: int) -> torch.Tensor:
        """[rows, m] bank rows drawn from P_n with the bank's generator."""
        return self.noise.draw(rows * m, self.rng).view(rows, m)

    @torch.no_grad()
    def update(self, i: torch.Tensor, f: torch.Tensor, momentum: float):
        """v_i <- (m v_i + (1 - m) f_i) / ||m v_i + (1 - m) f_i|| for the rows i (distinct) with new features f."""
        v = momentum * self.memory[i] + (1 - momentum) * f.detach().to(self.memory.dtype)  # [B, D]
        self.memory.index_copy_(0, i, F.normalize(v, dim=1))

    def state_dict(self) -> dict:
        return {"memory": self.memory, "Z": self.Z}

    def load_state_dict(self, state: dict):
        self.memory.copy_(state["memory"])
        self.Z = float(state["Z"])


class AliasSampler:
    """Draws from a discrete distribution over K outcomes in O(1) per draw (Walker's alias method, as the official
    alias_multinomial): pick a column k uniformly, keep it with probability prob[k], else take alias[k].

    Built in O(K): each column holds at most two outcomes, one with probability mass below 1/K ("small") topped up
    by one with mass above ("large"), so that outcome j's total mass over all columns is exactly p_j."""

    def __init__(self, probs: torch.Tensor):
        p = torch.as_tensor(probs, dtype=torch.float64).flatten()
        if len(p) == 0 or (p < 0).any() or not p.sum() > 0:
            raise ValueError("AliasSampler needs non-negative probabilities with a positive sum")
        k = len(p)
        scaled = (p / p.sum() * k).tolist()  # mass of each outcome in units of one column
        prob, alias = [1.0] * k, list(range(k))
        small = [j for j in range(k) if scaled[j] < 1.0]
        large = [j for j in range(k) if scaled[j] >= 1.0]
        while small and large:
            s, g = small.pop(), large.pop()
            prob[s], alias[s] = scaled[s], g  # column s: outcome s with its mass, the rest of the column is g's
            scaled[g] -= 1.0 - scaled[s]
            (small if scaled[g] < 1.0 else large).append(g)
        # what is left has mass 1 up to rounding: its column is its own
        self.prob = torch.tensor(prob, dtype=torch.float64)  # [K] probability of keeping column k's own outcome
        self.alias = torch.tensor(alias, dtype=torch.long)  # [K] the outcome taken otherwise

    def to(self, device) -> "AliasSampler":
        self.prob, self.alias = self.prob.to(device), self.alias.to(device)
        return self

    def draw(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n independent draws [n] (long), from `generator` (the default one when None)."""
        device = self.prob.device
        k = torch.randint(len(self.prob), (n,), generator=generator, device=device)
        keep = torch.rand(n, generator=generator, device=device, dtype=torch.float64) < self.prob[k]
        return torch.where(keep, k, self.alias[k])


# -------- Losses ------------------------------------------------------------------------------------------------------


class NCEFunction(torch.autograd.Function):
    """P(j|v) ~= exp(v_j . v / tau) / Z for the sampled bank rows, with the official hand-written backward.

    forward(v [B, D], weight [B, m+1, D], tau, Z) -> P [B, m+1]; weight holds the bank rows v_j (column 0 the
    image's own row v_i, then its m noise rows). Only v receives a gradient: d P_bj / d v_b = P_bj / tau * v_j.
    The bank rows get none (the memory bank is not a parameter) and the bank is not touched here."""

    @staticmethod
    def forward(ctx, v, weight, tau, Z):
        P = torch.exp(torch.einsum("bjd,bd->bj", weight, v) / tau - math.log(Z))  # [B, m+1], exp(s/tau) / Z
        ctx.save_for_backward(weight, P)
        ctx.tau = tau
        return P

    @staticmethod
    def backward(ctx, grad_P):
        weight, P = ctx.saved_tensors
        grad_v = torch.einsum("bj,bjd->bd", grad_P * P / ctx.tau, weight)  # [B, D]
        return grad_v, None, None, None


def _float(*xs):
    """Promote to at least float32 (float64 stays float64, for gradcheck)."""
    dtype = torch.promote_types(xs[0].dtype, torch.float32)
    return [x.to(dtype) for x in xs]


@torch.no_grad()
def normalisation_constant(v: torch.Tensor, weight: torch.Tensor, tau: float, n: int) -> torch.Tensor:
    """The official estimate of Z: n * mean of exp(v_j . v / tau) over every sampled row of the batch (the
    positives included). v: [B, D]; weight: [B, m+1, D]. Returns a 0-d float64 tensor (computed through
    log-sum-exp, so small temperatures do not overflow); no gradient: Z is a constant."""
    with torch.autocast(v.device.type, enabled=False):
        s = torch.einsum("bjd,bd->bj", *_float(weight, v)).double() / tau  # [B, m+1]
        return (math.log(n) + s.flatten().logsumexp(0) - math.log(s.numel())).exp()


def nce_loss(v: torch.Tensor, weight: torch.Tensor, tau: float, Z: float, n: int, eps: float = 1e-7) -> torch.Tensor:
    """J_NCE of the official NCEFunction + NCECriterion, averaged over the B images.

    v: [B, D] features; weight: [B, m+1, D] bank rows (column 0 the image's own row, then m noise rows drawn
    from P_n = 1/n); Z the fixed normalisation constant; n the bank size. With P = NCEFunction(v, weight, tau, Z):
      log h(i, v)      = log( P_i / (P_i + m P_n + eps) )
      log (1 - h(j,v)) = log( m P_n / (P_j + m P_n + eps) )
      J = -1/B sum_b [ log h(i_b, v_b) + sum_{j in noise_b} log(1 - h(j, v_b)) ]
    Computed in float32 (float64 for float64 inputs), also under autocast."""
    with torch.autocast(v.device.type, enabled=False):
        v, weight = _float(v, weight.detach())  # the bank rows: no gradient
        P = NCEFunction.apply(v, weight, tau, Z)  # [B, m+1]
        m = P.shape[1] - 1
        mPn = m / n
        P_pos, P_noise = P[:, 0], P[:, 1:]  # [B], [B, m]
        # log of each ratio as a difference of logs; P_pos clamped above 0 so an underflow stays finite
        log_h = P_pos.clamp_min(torch.finfo(P.dtype).tiny).log() - (P_pos + mPn + eps).log()  # [B]
        log_1mh = (math.log(mPn) if m else 0.0) - (P_noise + mPn + eps).log()  # [B, m]
        return -(log_h.sum() + log_1mh.sum()) / P.shape[0]


def softmax_loss(v: torch.Tensor, memory: torch.Tensor, i: torch.Tensor, tau: float) -> torch.Tensor:
    """J = -1/B sum_b log P(i_b | v_b), the exact non-parametric softmax over all n bank rows (the official
    LinearAverage + cross-entropy). v: [B, D]; memory: [n, D] (no gradient); i: [B] each image's own row."""
    with torch.autocast(v.device.type, enabled=False):
        v, memory = _float(v, memory.detach())
        logits = v @ memory.T / tau  # [B, n] v_j . v / tau
        return F.cross_entropy(logits, i)


def proximal_term(v: torch.Tensor, v_prev: torch.Tensor, lam: float) -> torch.Tensor:
    """lambda * 1/B sum_b ||v_b^(t) - v_b^(t-1)||^2: v [B, D] this step's features, v_prev [B, D] the bank's rows
    for the same images (the previous iterate, no gradient)."""
    with torch.autocast(v.device.type, enabled=False):
        v, v_prev = _float(v, v_prev.detach())
        return lam * (v - v_prev).pow(2).sum(1).mean()


# -------- Training ----------------------------------------------------------------------------------------------------


def clae_loss(model: nn.Module, x: torch.Tensor, instance_loss, args: Args) -> torch.Tensor:
    """CLAE's extra term (Ho & Vasconcelos, NeurIPS 2020) for InstDisc: instance_loss(f(x_adv)), the method's loss
    of an adversarial view of x made by FGSM/PGD against that same loss (the bank rows and noise rows fixed);
    with --adv-bn, generation and term run through the encoder's auxiliary BatchNorms (AdvProp).
    model: as trained (DDP on several processes); x: [n, C, H, W] this process's images; instance_loss: v [n, D]
    -> loss of this step's rows i. The search differentiates the input only, through the plain module: it adds no
    gradient to the parameters, and costs one forward and backward."""
    import adversarial  # the optional module of --adv-eps and --adv-bn

    plain = common.unwrap(model)

    def loss_of(view):
        with common.autocast(args):
            return instance_loss(plain(view))

    stats = common.DATASETS[args.dataset]  # the inputs' standardisation, to bound the view in pixels
    with adversarial.adversarial_bn(plain.backbone, args.adv_bn):
        x_adv = adversarial.adversarial_view(loss_of, x, args.adv_eps, args.adv_steps, stats.mean, stats.std)
        with common.autocast(args):
            v_adv = model(common.to_device(x_adv, args))  # [n, D], through DDP like the main loss
    return instance_loss(v_adv)


def build_optimizer(model: nn.Module, args: Args) -> torch.optim.Optimizer:
    """The optimiser main builds: SGD with momentum, weight decay on every parameter (the official code); the bank is
    not a parameter."""
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def train_step(model: nn.Module, batch, optimizer, bank: MemoryBank, args: Args) -> torch.Tensor:
    """One step of InstDisc on one batch: J of v = f(x) against the bank's rows (+ proximal term), then
    v_i <- normalise(m_b v_i + (1 - m_b) f(x_i)). `model` is the network as trained (DDP on several processes).
    Returns the loss of the global batch (on the device, detached)."""
    x, _, i = batch
    x, i = common.to_device(x, args), common.to_device(i, args)  # [n, C, H, W] images, [n] their bank rows
    with common.autocast(args):
        v = model(x)  # [n, D] f(x), L2-normalised
    n, (rank, world) = len(bank.memory), common.world()
    if args.nce_k:
        # the global batch's noise rows, drawn alike on every process; this process keeps its own rows
        noise = bank.draw_noise(len(i) * world, args.nce_k)[rank * len(i):(rank + 1) * len(i)]  # [n, m]
        weight = bank.memory[torch.cat([i[:, None], noise], dim=1)]  # [n, m+1, D] own row first; a copy, no grad
        if bank.Z < 0:  # estimated once, from the first global batch, then fixed (the official code)
            bank.Z = common.all_reduce_mean(normalisation_constant(v, weight, args.temperature, n)).item()
            common.print0(f"normalisation constant Z set to {bank.Z:.1f}")

        def instance_loss(v):
            return nce_loss(v, weight, args.temperature, bank.Z, n)
    else:
        def instance_loss(v):
            return softmax_loss(v, bank.memory, i, args.temperature)
    loss = instance_loss(v)
    if args.proximal:
        loss = loss + proximal_term(v, bank.memory[i], args.proximal)
    if args.adv_eps > 0:
        loss = loss + args.adv_weight * clae_loss(model, x, instance_loss, args)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    # v_i <- f(x_i) with momentum, once per step, for the global batch on every process (no gradient)
    bank.update(common.gather_no_grad(i), common.gather_no_grad(v.detach().float()), args.bank_momentum)
    return common.all_reduce_mean(loss.detach())


def train_one_epoch(model: nn.Module, bank: MemoryBank, loader, optimizer, lr_at, progress: common.Progress,
                    args: Args) -> float:
    """One pass over this process's share of the data; returns the epoch's mean loss (global batch)."""
    model.train()
    total = torch.zeros((), device=args.device)
    progress.start(len(loader))  # the epoch's clock
    for i, batch in enumerate(loader):
        step = loader.epoch * len(loader) + i  # the global step: the schedule's clock
        lr = common.set_lr(optimizer, lr_at(step))
        loss = train_step(model, batch, optimizer, bank, args)
        total += loss
        progress.update(step, loss, lr, len(batch[0]))
    return (total / len(loader)).item()


def step_schedule(args: Args, steps_per_epoch: int):
    """step -> lr: the official x0.1 steps (after epochs 120 and 160 of 200, here 60% and 80% of --epochs),
    after --warmup-epochs of linear warm-up."""
    warmup = round(args.warmup_epochs * steps_per_epoch)
    milestones = [round(f * args.epochs) for f in (0.6, 0.8)]

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * step / warmup
        epoch = step // steps_per_epoch
        return args.lr * 0.1 ** sum(epoch >= e for e in milestones)

    return lr_at


@torch.no_grad()
def bank_knn_accuracy(model, bank: MemoryBank, labels: torch.Tensor, test_set, num_classes: int,
                      args: Args) -> float:
    """The official per-epoch check: weighted k-NN of the test images' features against the memory bank itself
    (no recomputation of the training features, so it costs one pass over the test set)."""
    test_v, test_y = common.extract_features(model, test_set, args)
    scores = common.knn_scores(bank.memory, labels, test_v, num_classes, args.knn_k, args.knn_t)
    return common.topk_accuracy(scores, test_y, (1,))[0]


# -------- Main --------------------------------------------------------------------------------------------------------


def main(args: Args):
    common.setup_distributed(args)
    info, size = common.dataset_info(args)
    views = instdisc_augment(info, size, args.crop_min_scale, args.flip)
    train_set, memory_set, test_set = common.training_and_eval_sets(args, views, common.eval_transform(info, size))
    train_set = common.WithIndex(train_set)  # (x, y, i): i is the image's row in the memory bank
    train_data = common.TrainData(train_set, views, args)  # on the device (--data-path) or the CPU DataLoader
    run = common.RunDir(args, "instdisc")

    backbone = common.build_backbone(args.arch, info.channels, size)
    if args.adv_bn:
        import adversarial  # the optional module of --adv-eps and --adv-bn

        backbone = adversarial.dual_batchnorm(backbone)
    model = common.prepare_model(InstDisc(backbone, args.low_dim), args)
    # the same bank on every process: drawn from a generator seeded alike, not per rank
    bank = MemoryBank(len(train_set), args.low_dim, torch.Generator().manual_seed(args.seed)).to(args.device)
    optimizer = build_optimizer(model, args)
    state = run.resume(model, optimizer)
    if "bank" in state:
        bank.load_state_dict(state["bank"])
    ddp_model = common.distribute(model, args)  # the model as trained: DDP on several processes

    lr_at = step_schedule(args, train_data.steps)
    evaluation = common.Evaluation(memory_set, test_set, info.num_classes, args)
    progress = common.Progress(args)
    labels = torch.tensor(train_set.targets, device=args.device)  # [N] classes of the bank rows, for the bank k-NN
    common.print0(f"InstDisc {args.arch} on {args.dataset}: {len(train_set)} images, {train_data.steps} steps of "
                  f"{args.batch_size} per epoch, {common.world()[1]} process(es) on {args.device}")
    if state["epoch"] == 0:
        run.log(epoch=0, step=0, knn_top1=evaluation.knn(model.backbone))
    for epoch in range(state["epoch"], args.epochs):
        bank.rng.manual_seed(common.epoch_seed(args.seed + 7919, epoch, 0))  # the epoch's noise rows, on every rank
        loss = train_one_epoch(ddp_model, bank, train_data.loader(epoch), optimizer, lr_at, progress, args)
        bank_knn = bank_knn_accuracy(model, bank, labels, test_set, info.num_classes, args)
        knn_top1 = evaluation.knn(model.backbone, epoch + 1) if evaluation.due(epoch) else None
        run.log(epoch=epoch + 1, loss=loss, knn_top1=knn_top1, bank_knn_top1=bank_knn, **progress.summary())
        run.save(epoch + 1, model=model.state_dict(), optimizer=optimizer.state_dict(), bank=bank.state_dict())
    evaluation.report(model.backbone, run)
    common.cleanup_distributed()


if __name__ == "__main__":
    main(common.parse(Args))
