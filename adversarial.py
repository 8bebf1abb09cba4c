"""Two techniques that pair with contrastive learning, options of simclr.py and instdisc.py (off by default; a run
without them does not import this file):

  --adv-eps EPS   CLAE: Ho & Vasconcelos, "Contrastive Learning with Adversarial Examples", NeurIPS 2020
                  (github.com/chihhuiho/CLAE). The loss gains a term on an adversarial view of the images.
  --adv-bn        AdvProp: Xie et al., "Adversarial Examples Improve Image Recognition", CVPR 2020. The encoder's
                  BatchNorms get auxiliary twins that normalise adversarial views only.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch
import torch.nn as nn


class DualBatchNorm(nn.Module):
    """AdvProp's BatchNorms (Xie et al., CVPR 2020): `main` for clean inputs and evaluation, `aux` for adversarial
    inputs only, so that their statistics do not mix; adversarial_bn() picks the one that runs."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, aux_momentum: float = 0.01):
        super().__init__()
        self.main, self.aux, self.use_aux = bn, copy.deepcopy(bn), False
        self.aux.momentum = aux_momentum

    def forward(self, x):
        return self.aux(x) if self.use_aux else self.main(x)


def dual_batchnorm(module: nn.Module, aux_momentum: float = 0.01) -> nn.Module:
    """Give every BatchNorm inside `module` an auxiliary twin (in place; returns `module`)."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, DualBatchNorm(child, aux_momentum))
        else:
            dual_batchnorm(child, aux_momentum)
    return module


@contextlib.contextmanager
def adversarial_bn(module: nn.Module, enabled: bool = True):
    """Inside the block, `module`'s DualBatchNorms run their auxiliary BatchNorm."""
    duals = [m for m in module.modules() if isinstance(m, DualBatchNorm)] if enabled else []
    for m in duals:
        m.use_aux = True
    try:
        yield
    finally:
        for m in duals:
            m.use_aux = False


@functools.lru_cache
def constant(values: tuple, device: str) -> torch.Tensor:
    """Per-channel values [1, C, 1, 1] copied to the device once: a copy every step would make the host wait."""
    return torch.tensor(values).view(1, -1, 1, 1).to(device)


def adversarial_view(loss_fn, x: torch.Tensor, eps: float, steps: int, mean, std) -> torch.Tensor:
    """CLAE's adversarial view (Ho & Vasconcelos, NeurIPS 2020): within `eps` (L-inf, pixels in [0, 1]) of `x`, the
    image that increases loss_fn, by FGSM (one step of eps) or PGD (steps of 2.5 eps / steps, projected). x and
    the (detached) result are standardised by `mean`, `std`. Only the input gets gradient, no parameter."""
    mean, std = constant(tuple(mean), str(x.device)), constant(tuple(std), str(x.device))  # [1, C, 1, 1]
    pixels = (x.detach() * std + mean).clamp(0, 1)
    adv, alpha = pixels.clone(), eps if steps == 1 else 2.5 * eps / steps
    for _ in range(steps):
        (grad,) = torch.autograd.grad(loss_fn((adv.requires_grad_(True) - mean) / std), adv)
        adv = torch.minimum(torch.maximum(adv.detach() + alpha * grad.sign(), pixels - eps), pixels + eps).clamp(0, 1)
    return ((adv - mean) / std).detach()
