"""CLAE's adversarial views and AdvProp's auxiliary BatchNorm (adversarial.py), and simclr.py and instdisc.py with
them switched on."""

import json

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import adversarial
import common
import instdisc
import simclr
from conftest import SYNTHETIC_FLAGS, run_script, torchrun

seeds = st.integers(0, 2**31 - 1)
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def toy_encoder():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 8))


def channel(values):
    return torch.tensor(values, dtype=torch.float64).view(1, 3, 1, 1)


def images(seed, n=6):
    pixels = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return pixels, (pixels - channel(MEAN)) / channel(STD)


def to_pixels(x):
    return x * channel(STD) + channel(MEAN)


@given(seed=seeds, eps=st.floats(1e-3, 0.1), steps=st.integers(1, 4))
def test_adversarial_view_stays_within_eps_in_pixels_and_in_range(seed, eps, steps):
    torch.manual_seed(seed)
    model = toy_encoder().double()
    pixels, x = images(seed)
    anchors = model(x).detach()
    x_adv = adversarial.adversarial_view(lambda v: simclr.nt_xent(anchors, model(v), 0.5), x, eps, steps, MEAN, STD)
    adv_pixels = to_pixels(x_adv)
    assert (adv_pixels - pixels).abs().max() <= eps + 1e-9
    assert adv_pixels.min() >= -1e-9 and adv_pixels.max() <= 1 + 1e-9
    assert not x_adv.requires_grad


@given(seed=seeds, steps=st.integers(1, 3))
def test_adversarial_view_increases_the_loss_of_a_fixed_model(seed, steps):
    torch.manual_seed(seed)
    model = toy_encoder().double().eval()  # fixed model: BatchNorm with its running statistics
    pixels, x = images(seed)
    x = ((pixels * 0.5 + 0.25) - channel(MEAN)) / channel(STD)  # pixels away from 0 and 1: the clamp never binds
    anchors = model(x).detach()

    def loss_of(v):
        return simclr.nt_xent(anchors, model(v), 0.5)

    x_adv = adversarial.adversarial_view(loss_of, x, 1e-3, steps, MEAN, STD)
    assert loss_of(x_adv).item() > loss_of(x).item()


def test_generation_adds_no_gradient_to_the_parameters():
    torch.manual_seed(0)
    model = toy_encoder().double()
    _, x = images(1)
    anchors = model(x).detach()
    adversarial.adversarial_view(lambda v: simclr.nt_xent(anchors, model(v), 0.5), x, 0.03, 2, MEAN, STD)
    assert all(p.grad is None for p in model.parameters())
    # with gradients already accumulated, they are left exactly as they were
    model(x).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    adversarial.adversarial_view(lambda v: simclr.nt_xent(anchors, model(v), 0.5), x, 0.03, 1, MEAN, STD)
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


def bn_state(model):
    dual = [m for m in model.modules() if isinstance(m, adversarial.DualBatchNorm)][0]
    return (dual.main.running_mean.clone(), dual.main.running_var.clone(), dual.aux.running_mean.clone(),
            dual.aux.running_var.clone())


def test_auxiliary_batchnorm_statistics_move_only_under_adversarial_forwards():
    torch.manual_seed(0)
    model = adversarial.dual_batchnorm(toy_encoder())
    x = torch.randn(8, 3, 8, 8)
    main_mean, main_var, aux_mean, aux_var = bn_state(model)
    model(x)  # clean forward: main statistics move, auxiliary ones do not
    m1, v1, a1, av1 = bn_state(model)
    assert not torch.equal(m1, main_mean) and torch.equal(a1, aux_mean) and torch.equal(av1, aux_var)
    with adversarial.adversarial_bn(model):
        model(x + 1)  # adversarial forward: the reverse
    m2, v2, a2, av2 = bn_state(model)
    assert torch.equal(m2, m1) and torch.equal(v2, v1) and not torch.equal(a2, a1)
    assert not any(m.use_aux for m in model.modules() if isinstance(m, adversarial.DualBatchNorm))  # routing undone


def test_evaluation_uses_the_main_batchnorm_and_state_dict_round_trips():
    torch.manual_seed(0)
    plain = toy_encoder()
    for _ in range(3):
        plain(torch.randn(8, 3, 8, 8))
    dual = adversarial.dual_batchnorm(toy_encoder())
    dual_state = {k.replace("1.", "1.main.", 1) if k.startswith("1.") else k: v
                  for k, v in plain.state_dict().items()}
    dual.load_state_dict({**dual.state_dict(), **dual_state})
    plain.eval(), dual.eval()
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(plain(x), dual(x))  # evaluation: the main BatchNorm, with its running statistics
    with adversarial.adversarial_bn(dual):
        assert not torch.allclose(plain(x), dual(x))  # the auxiliary one has other (initial) statistics
    copy = adversarial.dual_batchnorm(toy_encoder())
    copy.load_state_dict(dual.state_dict())
    copy.eval()
    assert torch.equal(copy(x), dual(x))
    with adversarial.adversarial_bn(copy), adversarial.adversarial_bn(dual):
        assert torch.equal(copy(x), dual(x))
    assert any(".aux." in k for k in dual.state_dict()) and any(".main." in k for k in dual.state_dict())


def test_every_batchnorm_of_a_resnet_gets_a_twin():
    backbone = adversarial.dual_batchnorm(common.build_backbone("resnet18", image_size=16))
    duals = [m for m in backbone.modules() if isinstance(m, adversarial.DualBatchNorm)]
    plain = [m for m in common.build_backbone("resnet18", image_size=16).modules()
             if isinstance(m, nn.BatchNorm2d)]
    assert len(duals) == len(plain) and all(m.aux.momentum == 0.01 for m in duals)
    assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, 512)


TINY_ADV = [*SYNTHETIC_FLAGS, "--arch", "tiny", "--batch-size", "64", "--workers", "0", "--probe-epochs",
            "2", "--adv-eps", "0.03", "--adv-bn"]


@pytest.mark.scripts
def test_simclr_with_clae_and_advprop_runs_resumes_and_refuses_a_plain_checkpoint(tmp_path):
    run = tmp_path / "run"
    out = run_script("simclr.py", *TINY_ADV, "--epochs", "1", "--out-dir", run)
    assert out.returncode == 0, out.stderr[-3000:]
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert any(".aux." in k for k in state["model"])
    out = run_script("simclr.py", *TINY_ADV, "--epochs", "2", "--out-dir", run, "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    plain = TINY_ADV[:-3]  # the same run without the options: refused, naming them
    out = run_script("simclr.py", *plain, "--epochs", "3", "--out-dir", run, "--resume")
    assert out.returncode == 2 and "--adv-eps 0.03 --adv-bn, but this run asks for --adv-eps 0.0 --no-adv-bn" in \
        out.stderr, out.stderr


@pytest.mark.scripts
def test_simclr_with_clae_under_torchrun(tmp_path):
    out = torchrun("simclr.py", *TINY_ADV, "--epochs", "1", "--adv-steps", "2", "--out-dir", tmp_path / "run")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["knn_top1"] is not None


@pytest.mark.scripts
def test_instdisc_with_clae_and_advprop_runs_alone_and_under_torchrun(tmp_path):
    out = run_script("instdisc.py", *TINY_ADV, "--epochs", "1", "--out-dir", tmp_path / "one")
    assert out.returncode == 0, out.stderr[-3000:]
    state = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    assert any(".aux." in k for k in state["model"])
    out = torchrun("instdisc.py", *TINY_ADV, "--epochs", "1", "--adv-steps", "2", "--nce-k", "32",
                   "--out-dir", tmp_path / "two")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "results.json").read_text())["knn_top1"] is not None


@pytest.mark.parametrize("module", [simclr, instdisc])
def test_adv_bn_without_adversarial_views_is_refused(module):
    with pytest.raises(ValueError, match="--adv-bn needs"):
        module.Args(adv_bn=True).check()
    with pytest.raises(ValueError, match="--adv-steps"):
        module.Args(adv_eps=0.03, adv_steps=0).check()
