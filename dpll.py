"""DPLL: Revisiting Consistency Regularization for Deep Partial Label Learning.
Wu, Wang & Zhang, ICML 2022 (PMLR 162:24212-24225). Official code: github.com/wu-dd/PLCR

  Each training image x_i comes with a candidate label set S_i that holds its true label y_i and some wrong ones
  (here generated as the official code does: every wrong label joins S_i with probability q; a set left with the
  true label alone gets one wrong label drawn uniformly). The classifier f sees three views of x_i:
  x^0 weak (flip + crop), x^1 and x^2 strong (flip + crop + Cutout + AutoAugment); p^v = softmax(f(x^v)).
  L_sup  = -1/n sum_i sum_{j not in S_i} log(1 - p^0_ij)          supervised: push mass off the non-candidates
  L_cont =  1/n sum_i sum_{v=0,1,2} KL(t_i || p^v_i)              consistency of every view with the target t_i
  L      =  L_sup + lambda(e) L_cont,   lambda(e) = lambda_max min(e / E_ramp, 1)   (e: the 0-based epoch)
  t_i    starts uniform over S_i; after each step, for the images of the batch (no gradient),
  t_ij  <- [j in S_i] prod_v (p^v_ij)^(1/3)  /  sum_{k in S_i} prod_v (p^v_ik)^(1/3)
         the normalised geometric mean of the views' predictions on the candidates, which is the closed-form
         minimiser of L_cont over distributions supported on S_i.
  The targets are one global [N, K] table, identical on every process: each step the processes exchange the
  indices and new targets of their images. The loss is a mean over images, so DDP's averaged gradient is the
  gradient of the global batch. Evaluation: top-1 accuracy on the test set's true labels, every epoch.

Run:   python dpll.py --dataset digits --arch tiny --epochs 30 --batch-size 64 --workers 0
                                                          (offline, CPU; prints the test accuracy every epoch)
       torchrun --nproc_per_node=1 dpll.py --data-dir data --download   (the official CIFAR-10 recipe below)
       torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 dpll.py ...
       python dpll.py ... --naive                         (baseline: cross-entropy with the uniform distribution
                                                          over each candidate set, weak view only, no consistency)
Defaults: the official main.py for CIFAR-10: Wide-ResNet-34-10 of its wideresnet.py (Kaiming fan-out, no biases,
       a widening block's shortcut fed after BN-ReLU, classifier bias 0), batch 64, 200 epochs, SGD (momentum 0.9,
       weight decay 1e-4) at learning rate 0.1 divided by 10 at epochs 100 and 150, lambda_max 1 reached linearly
       at epoch 100, q 0.4 (main.py's default; its README's CIFAR-10 demo uses 0.7).
       Views as the official dataset classes: CIFAR-10/100 flip + reflect-padded 4 px crop, Cutout 16 and the
       CIFAR-10 AutoAugment policy; SVHN no flip or crop, Cutout 20 and the SVHN policy (both with grey fill 128);
       Fashion-MNIST and Kuzushiji-MNIST flip + crop and Cutout 16 without AutoAugment. Other datasets follow the
       CIFAR recipe (the MNIST one when grayscale) with padding 1/8 and Cutout 1/2 of the image side. Evaluation:
       the classifier's top-1 on the test set (no linear probe).
Expect: accuracy on the true test labels approaching fully supervised training when candidate sets are small
       (the paper's CIFAR-10 table, Wide-ResNet-34-10, uniform candidate sets at several q; not re-checked here).

Where this file differs from the official code, and why:
  - Targets are updated in log space (mean of log-probabilities, softmax over the candidates) instead of a product
    of cube roots: the same value, but no 0/0 when every candidate's probability underflows.
  - The three views run through the network one after another inside a single forward call (the official code
    calls the network three times): BatchNorm still normalises each view on its own, and DDP sees one forward
    per backward.
  - Inputs are standardised with the dataset's channel mean and std (the official code uses ImageNet's for
    CIFAR and 0.5 for SVHN and Kuzushiji-MNIST); Cutout blacks out the square on the image itself rather than on a
    tensor converted back to an image (the official round trip can shift pixel values by one grey level).
  - AutoAugment is torchvision's, whose CIFAR-10 policy holds the paper's 25 sub-policies; the official
    autoaugment_extra.py draws from 97 (the 25 and those of further searches), rotates one way only and solarizes
    from 256: that table would double this file, and the strong views stay strong. The fill is the official grey.
  - Candidate sets are drawn from a generator seeded with --seed and saved in the checkpoint (the official code
    seeds NumPy's global generator with 2 and regenerates them at every start).
  - Added evaluation: the k-NN monitor of the backbone's features and a linear probe at the end (this project's
    common evaluation), and the share of training images whose target puts most mass on the true label.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

import common

# -------- Args --------------------------------------------------------------------------------------------------------


@dataclass
class Args(common.Args):
    arch: str = common.flag("wrn34_10", "backbone (the official CIFAR-10 model is Wide-ResNet-34-10)")
    epochs: int = common.flag(200, "training epochs (official main.py)")
    batch_size: int = common.flag(64, "global batch, split evenly over the processes (official loaders)")
    lr: float = common.flag(0.1, "SGD learning rate (not scaled with the batch size, as the official code)")
    weight_decay: float = common.flag(1e-4, "SGD weight decay, on every parameter as the official optimiser")
    momentum: float = common.flag(0.9, "SGD momentum", "in [0, 1)")
    warmup_epochs: float = common.flag(0, "linear warm-up epochs before the step schedule (the official code has "
                                       "none)")
    milestones: str = common.flag("100,150", "comma-separated epochs at which the learning rate is multiplied by "
                                  "--lr-decay")
    lr_decay: float = common.flag(0.1, "factor of the learning rate at each milestone (official MultiStepLR)",
                                  "in (0, 1]")
    q: float = common.flag(0.4, "probability that each wrong label joins a candidate set (official --rate)",
                           "in [0, 1]")
    lam: float = common.flag(1.0, "lambda_max, the weight of the consistency loss after the ramp (official --lam)",
                             ">= 0")
    ramp_epochs: float = common.flag(100, "epochs of the linear ramp of lambda from 0 to lambda_max (official: 100)",
                                     ">= 0")
    naive: bool = common.flag(False, "baseline instead of DPLL: cross-entropy with the uniform distribution over "
                              "each set")

    def milestone_epochs(self) -> list[int]:
        return [int(m) for m in self.milestones.split(",") if m.strip()]

    def check(self, world_size: int = 1):
        super().check(world_size)
        try:
            epochs = self.milestone_epochs()
        except ValueError:
            raise ValueError(f"--milestones must be comma-separated epochs, got {self.milestones!r}") from None
        if any(m <= 0 for m in epochs) or epochs != sorted(epochs):
            raise ValueError(f"--milestones must be positive and increasing, got {self.milestones!r}")


# -------- Candidate label sets ----------------------------------------------------------------------------------------


def partial_labels(y: torch.Tensor, num_classes: int, q: float, generator: torch.Generator) -> torch.Tensor:
    """Uniform candidate sets as the official generate_partial_labels. y: [N] true labels -> S: [N, K] bool.

    The true label is always in; each wrong label joins independently with probability q; a set that holds only
    the true label gets one more label (the official loop draws labels uniformly until a wrong one turns up, which
    picks a wrong label uniformly). So every set has at least two labels and a wrong label is in with probability
    q + (1 - q)^(K-1) / (K - 1)."""
    if num_classes < 2:
        raise ValueError("partial labels need at least two classes")
    n = y.shape[0]
    S = torch.rand(n, num_classes, generator=generator) < q  # [N, K] wrong labels flipped in
    S[torch.arange(n), y] = True
    alone = S.sum(1) == 1  # [N] only the true label
    r = torch.randint(0, num_classes - 1, (n,), generator=generator)  # a wrong label for each row ...
    extra = r + (r >= y).long()  # ... skipping the true one: uniform over the K - 1 others
    S[alone.nonzero().squeeze(1), extra[alone]] = True
    return S


# -------- Views -------------------------------------------------------------------------------------------------------


class Cutout:
    """Cutout (DeVries & Taylor, 2017) as the official code: one `length` x `length` black square centred on a
    uniformly drawn pixel, clipped at the border (so 1/4 to all of the square lands on the image)."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        box = (max(cx - self.length // 2, 0), max(cy - self.length // 2, 0),
               min(cx + self.length // 2, w), min(cy + self.length // 2, h))
        img = img.copy()
        img.paste(0 if img.mode == "L" else (0,) * len(img.getbands()), box)
        return img

    def __repr__(self):
        return f"Cutout(length={self.length})"


def augment_recipe(dataset: str, info: common.DataInfo, size: int) -> dict:
    """The official per-dataset choices: flip and crop padding of every view, Cutout length and AutoAugment
    policy of the strong views. Datasets outside the paper follow CIFAR's (MNIST's when grayscale), scaled."""
    P = T.AutoAugmentPolicy
    official = {
        "cifar10": dict(flip=True, pad=4, cutout=16, policy=P.CIFAR10),
        "cifar100": dict(flip=True, pad=4, cutout=16, policy=P.CIFAR10),
        "svhn": dict(flip=False, pad=0, cutout=20, policy=P.SVHN),  # digits: no flip, no crop
        "fashionmnist": dict(flip=True, pad=4, cutout=16, policy=None),
        "kmnist": dict(flip=True, pad=4, cutout=16, policy=None),
    }
    if dataset in official:
        return official[dataset]
    return dict(flip=True, pad=max(1, size // 8), cutout=max(1, size // 2),
                policy=P.CIFAR10 if info.channels == 3 else None)


def dpll_views(info: common.DataInfo, size: int, recipe: dict) -> tuple[T.Compose, T.Compose]:
    """(weak, strong): weak = flip + padded crop; strong = the same, then Cutout, then AutoAugment."""
    base = [T.Resize(size), T.CenterCrop(size)] if size != info.size else []
    if recipe["flip"]:
        base.append(T.RandomHorizontalFlip())
    if recipe["pad"]:
        base.append(T.RandomCrop(size, padding=recipe["pad"], padding_mode="reflect"))
    policy = [T.AutoAugment(recipe["policy"], fill=[128] * info.channels)] if recipe["policy"] else []  # grey fill
    strong = base + [Cutout(recipe["cutout"])] + policy
    return T.Compose(base + [common.normalize(info)]), T.Compose(strong + [common.normalize(info)])


# -------- Model -------------------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    """Backbone and a linear layer to the K classes. Given several views, runs them one after another (so that
    BatchNorm normalises each view's batch on its own, as the official code's separate calls) and stacks them."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.out_dim, num_classes)
        nn.init.zeros_(self.fc.bias)  # as the official WideResNet's classifier

    def forward(self, *views: torch.Tensor) -> torch.Tensor:
        logits = [self.fc(self.backbone(x)) for x in views]  # V x [n, K]
        return logits[0] if len(views) == 1 else torch.stack(logits)  # [n, K] or [V, n, K]


# -------- Losses ------------------------------------------------------------------------------------------------------

EPS = 1e-7  # the official log(1.0000001 - p): finite when a non-candidate's probability reaches 1


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))  # float32, or float64 when given float64


def sup_loss(probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """L_sup = -1/n sum_i sum_{j not in S_i} log(1 - p_ij). probs: [n, K] (the weak view's softmax);
    candidates: [n, K], 1 (True) for the labels in S_i. Mean over the n images, in float32 also under autocast."""
    with torch.autocast(probs.device.type, enabled=False):
        p = _float(probs)
        outside = 1 - candidates.to(p.dtype)  # [n, K] the non-candidates
        return -(torch.log1p(EPS - p) * outside).sum(1).mean()


def cont_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_cont = 1/n sum_i sum_v KL(t_i || softmax(logits_vi)), with 0 log 0 = 0 (torch's KLDivLoss, batchmean).

    logits: [V, n, K] (V views) or [n, K] (one view); targets: [n, K] distributions t_i, no gradient (detached).
    Summed over the views, mean over the n images, in float32 also under autocast."""
    with torch.autocast(logits.device.type, enabled=False):
        z = _float(logits)
        t = targets.detach().to(z.dtype)  # the targets are fixed in this step: no gradient reaches them
        kl = (torch.xlogy(t, t) - t * F.log_softmax(z, dim=-1)).sum(-1)  # [V, n] or [n]
        return kl.sum() / t.shape[0]


def naive_loss(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The baseline: cross-entropy with the uniform distribution over each candidate set,
    -1/n sum_i 1/|S_i| sum_{j in S_i} log p_ij. logits: [n, K]; candidates: [n, K]."""
    with torch.autocast(logits.device.type, enabled=False):
        z = _float(logits)
        s = candidates.to(z.dtype)
        uniform = s / s.sum(1, keepdim=True)  # [n, K]
        return -(uniform * F.log_softmax(z, dim=1)).sum(1).mean()


@torch.no_grad()
def update_targets(probs_views: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """t_ij = [j in S_i] prod_v p_vij^(1/V) / sum_{k in S_i} prod_v p_vik^(1/V), in log space. probs_views:
    [V, n, K] softmax outputs of the V views; candidates: [n, K]. Returns [n, K], zero outside S_i, rows summing
    to one; computed without gradient (the targets are constants of the next steps)."""
    p = _float(probs_views)
    log_mean = p.clamp_min(torch.finfo(p.dtype).tiny).log().mean(0)  # [n, K] log of the geometric mean
    log_mean = log_mean.masked_fill(~candidates.bool(), float("-inf"))  # restricted to the candidates
    return log_mean.softmax(dim=1)


def consistency_weight(epoch: float, lam: float, ramp_epochs: float) -> float:
    """lambda(e) = lam * min(e / ramp_epochs, 1): 0 at the first epoch, lam from epoch ramp_epochs on."""
    return lam if ramp_epochs <= 0 else lam * min(epoch / ramp_epochs, 1.0)


# -------- Training ----------------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, args: Args) -> torch.optim.Optimizer:
    """The optimiser main builds: SGD with momentum, weight decay on every parameter (the official optimiser), the
    learning rate not scaled with the batch."""
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def train_step(model: nn.Module, batch, optimizer, candidates: torch.Tensor, targets: torch.Tensor, lam: float,
               args: Args) -> torch.Tensor:
    """One step of DPLL on one batch: L = L_sup + lambda(e) L_cont against the targets t_i as they are, then
    t_i <- the views' normalised geometric mean on S_i (the global `targets` in place, the same rows on every
    process; --naive: the baseline's loss, no targets). `model` is the network as trained (DDP on several processes).
    Returns [L, L_sup, L_cont] of the global batch (on the device, detached)."""
    views, _, index = batch
    views, index = common.to_device(views, args), common.to_device(index, args)  # 3 x [n, C, H, W], [n]
    S = candidates[index]  # [n, K]
    if args.naive:
        with common.autocast(args):
            logits = model(views[0])  # [n, K]
        loss = naive_loss(logits, S)
        loss_sup = loss_cont = loss.new_zeros(())
    else:
        with common.autocast(args):
            logits = model(*views)  # [3, n, K]
        logits = _float(logits)  # float32 under autocast (float64 stays float64)
        probs = logits.softmax(dim=-1)  # [3, n, K]
        loss_sup = sup_loss(probs[0], S)  # on the weak view
        loss_cont = cont_loss(logits, targets[index])  # a copy of the rows: the update below does not touch it
        loss = loss_sup + lam * loss_cont
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if not args.naive:
        # t_i <- normalised geometric mean of the views' predictions on S_i; without gradient, and on every process
        # for the images of the whole global batch, so the table stays identical everywhere
        new = update_targets(probs.detach(), S)  # [n, K]
        targets.index_copy_(0, common.gather_no_grad(index), common.gather_no_grad(new))
    return common.all_reduce_mean(torch.stack([loss, loss_sup, loss_cont]).detach())


def train_one_epoch(model: nn.Module, loader, optimizer, lr_at, progress: common.Progress, args: Args,
                    candidates: torch.Tensor, targets: torch.Tensor) -> dict:
    """One pass over this process's share of the data; returns the epoch's mean losses (global batch)."""
    model.train()
    lam = consistency_weight(loader.epoch, args.lam, args.ramp_epochs)
    totals = torch.zeros(3, device=args.device)  # L, L_sup, L_cont
    progress.start(len(loader))  # the epoch's clock
    for i, batch in enumerate(loader):
        step = loader.epoch * len(loader) + i  # the global step: the schedule's clock
        lr = common.set_lr(optimizer, lr_at(step))
        losses = train_step(model, batch, optimizer, candidates, targets, lam, args)
        totals += losses
        progress.update(step, losses[0], lr, len(batch[2]))
    loss, loss_sup, loss_cont = (totals / len(loader)).tolist()
    return {"loss": loss} if args.naive else {"loss": loss, "sup_loss": loss_sup, "cont_loss": loss_cont}


def test_accuracy(model: nn.Module, test_set, args: Args) -> float:
    """Top-1 accuracy of the classifier on the test images' true labels (eval mode)."""
    logits, y = common.extract_features(model, test_set, args)
    return common.topk_accuracy(logits, y, (1,))[0]


# -------- Main --------------------------------------------------------------------------------------------------------


def main(args: Args):
    common.setup_distributed(args)
    info, size = common.dataset_info(args)
    weak, strong = dpll_views(info, size, augment_recipe(args.dataset, info, size))
    views = common.MultiView([weak] if args.naive else [weak, strong, strong])
    train_set, memory_set, test_set = common.training_and_eval_sets(args, views, common.eval_transform(info, size))
    train_set = common.WithIndex(train_set)  # per-sample targets are rows of a table indexed by the image
    if info.num_classes < 2:
        common.fail("partial-label learning needs at least two classes")
    train_data = common.TrainData(train_set, views, args)  # the CPU DataLoader: no batched Cutout, AutoAugment
    run = common.RunDir(args, "dpll")

    model = common.prepare_model(Classifier(common.build_backbone(args.arch, info.channels, size),
                                            info.num_classes), args)
    optimizer = build_optimizer(model, args)
    state = run.resume(model, optimizer)
    # candidate sets S (drawn once, seeded, identical on every process) and targets t, uniform over S at first
    y_true = torch.as_tensor(train_set.targets)
    candidates = partial_labels(y_true, info.num_classes, args.q, torch.Generator().manual_seed(args.seed))
    targets = candidates.float() / candidates.sum(1, keepdim=True)
    if "candidates" in state:
        if state["candidates"].shape != candidates.shape:
            common.fail(f"the checkpoint's candidate sets are {tuple(state['candidates'].shape)}, this training set "
                        f"needs {tuple(candidates.shape)} (was --subset changed?)")
        candidates, targets = state["candidates"], state["targets"]
    candidates, targets, y_true = candidates.to(args.device), targets.to(args.device), y_true.to(args.device)
    ddp_model = common.distribute(model, args)  # the model as trained: DDP on several processes

    warmup, milestones = round(args.warmup_epochs * train_data.steps), args.milestone_epochs()

    def lr_at(step: int) -> float:  # linear warm-up, then the official steps: x lr_decay at each milestone
        warm = min(1.0, step / warmup) if warmup else 1.0
        return args.lr * warm * args.lr_decay ** sum(step >= m * train_data.steps for m in milestones)

    evaluation = common.Evaluation(memory_set, test_set, info.num_classes, args)
    progress = common.Progress(args)
    common.print0(f"DPLL{' (naive baseline)' if args.naive else ''} {args.arch} on {args.dataset}: "
                  f"{len(train_set)} images, {candidates.sum(1).float().mean():.2f} candidate labels on average "
                  f"(q {args.q}), {train_data.steps} steps of {args.batch_size} per epoch, {common.world()[1]} "
                  f"process(es) on {args.device}")
    if state["epoch"] == 0:
        run.log(epoch=0, step=0, knn_top1=evaluation.knn(model.backbone))
    test_top1 = test_accuracy(model, test_set, args) if state["epoch"] == args.epochs else None
    for epoch in range(state["epoch"], args.epochs):
        losses = train_one_epoch(ddp_model, train_data.loader(epoch), optimizer, lr_at, progress, args, candidates,
                                 targets)
        test_top1 = test_accuracy(model, test_set, args)
        # how often the target's most likely candidate is the true label (the disambiguation of the training set)
        target_top1 = (targets.argmax(1) == y_true).float().mean().item()
        common.print0(f"epoch {epoch + 1}: test top-1 {test_top1:.4f}  targets' top-1 on the training set "
                      f"{target_top1:.4f}")
        knn_top1 = evaluation.knn(model.backbone, epoch + 1) if evaluation.due(epoch) else None
        run.log(epoch=epoch + 1, knn_top1=knn_top1, test_top1=test_top1, target_top1=target_top1, **losses,
                **progress.summary())
        run.save(epoch + 1, model=model.state_dict(), optimizer=optimizer.state_dict(), candidates=candidates.cpu(),
                 targets=targets.cpu())
    evaluation.report(model.backbone, run, test_top1=test_top1)
    common.cleanup_distributed()


if __name__ == "__main__":
    main(common.parse(Args))
