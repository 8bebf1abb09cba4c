"""Properties of SimCLR's NT-Xent loss, model and views (simclr.py)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import common
import simclr
from conftest import SYNTHETIC_INFO, TwoLayerEncoder, backbone_built_by, synthetic

temperatures = st.floats(0.05, 2.0)
seeds = st.integers(0, 2**31 - 1)


def views(seed, n, d, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)


def nt_xent_reference(z1, z2, tau):
    """The paper's equation, transcribed with loops in float64 and the paper's interleaved indexing: views
    2k and 2k+1 (0-based) are the two views of image k; l(i, j) = -log exp(s_ij/tau) / sum_{k != i} exp(s_ik/tau);
    L = 1/(2N) sum_k [l(2k, 2k+1) + l(2k+1, 2k)]."""
    a, b = z1.detach().double().numpy(), z2.detach().double().numpy()
    n = len(a)
    zs = [None] * (2 * n)
    for k in range(n):
        zs[2 * k], zs[2 * k + 1] = a[k], b[k]

    def sim(u, v):
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))

    def pair_loss(i, j):
        denominator = sum(math.exp(sim(zs[i], zs[k]) / tau) for k in range(2 * n) if k != i)
        return -math.log(math.exp(sim(zs[i], zs[j]) / tau) / denominator)

    return sum(pair_loss(2 * k, 2 * k + 1) + pair_loss(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


@given(n=st.integers(1, 8), d=st.integers(1, 12), tau=temperatures, seed=seeds)
def test_equals_transcription_of_the_paper(n, d, tau, seed):
    z1, z2 = views(seed, n, d)
    assert simclr.nt_xent(z1, z2, tau).item() == pytest.approx(nt_xent_reference(z1, z2, tau), rel=1e-9, abs=1e-9)


@given(n=st.integers(2, 8), d=st.integers(2, 12), tau=temperatures, seed=seeds,
       a=st.floats(0.01, 100.0), b=st.floats(0.01, 100.0))
def test_invariant_to_rescaling_each_embedding(n, d, tau, seed, a, b):
    z1, z2 = views(seed, n, d)
    g = torch.Generator().manual_seed(seed + 1)
    row_scale = torch.rand(n, 1, generator=g, dtype=torch.float64) * 10 + 0.1  # per-row positive scales too
    expected = simclr.nt_xent(z1, z2, tau)
    assert torch.allclose(simclr.nt_xent(a * z1 * row_scale, b * z2, tau), expected, rtol=1e-10, atol=1e-12)


@given(n=st.integers(2, 8), d=st.integers(2, 12), tau=temperatures, seed=seeds)
def test_equivariant_to_permuting_the_batch(n, d, tau, seed):
    z1, z2 = views(seed, n, d)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(simclr.nt_xent(z1[perm], z2[perm], tau), simclr.nt_xent(z1, z2, tau), rtol=1e-12)


@given(n=st.integers(2, 8), d=st.integers(2, 12), tau=temperatures, seed=seeds)
def test_changes_when_pairs_are_broken(n, d, tau, seed):
    # permuting only one view pairs images with other images' views: the loss must see it (not a constant)
    z1, z2 = views(seed, n, d)
    shifted = z2.roll(1, dims=0)
    assert not torch.allclose(simclr.nt_xent(z1, shifted, tau), simclr.nt_xent(z1, z2, tau), rtol=1e-9)


@given(n=st.integers(1, 8), d=st.integers(1, 12), tau=temperatures, seed=seeds)
def test_symmetric_in_the_two_views(n, d, tau, seed):
    z1, z2 = views(seed, n, d)
    assert torch.allclose(simclr.nt_xent(z1, z2, tau), simclr.nt_xent(z2, z1, tau), rtol=1e-12)


@given(n=st.integers(1, 16), d=st.integers(1, 12), tau=temperatures, seed=seeds)
def test_bounds(n, d, tau, seed):
    # cosine similarities lie in [-1, 1], so each term log(1 + sum_neg exp((s_neg - s_pos)/tau)) lies between
    # log(1 + (2N-2) exp(-2/tau)) (positive aligned, negatives opposite) and log(1 + (2N-2) exp(2/tau))
    z1, z2 = views(seed, n, d)
    loss = simclr.nt_xent(z1, z2, tau).item()
    lower = math.log1p((2 * n - 2) * math.exp(-2 / tau))
    upper = math.log1p((2 * n - 2) * math.exp(2 / tau))
    assert lower - 1e-9 <= loss <= upper + 1e-9


@given(n=st.integers(1, 16), d=st.integers(1, 12), tau=temperatures, seed=seeds)
def test_collapsed_embeddings_give_log_2n_minus_1(n, d, tau, seed):
    # every embedding identical: all 2N-1 candidates equally likely
    v = torch.randn(1, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = v.expand(n, d).clone()
    assert simclr.nt_xent(z, z, tau).item() == pytest.approx(math.log(2 * n - 1), abs=1e-9)


def test_lower_bound_is_attained_by_antipodal_negatives():
    # N = 1 image pair: no negatives, the loss is exactly 0; N = 2 with the two images' views at opposite poles
    z = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert simclr.nt_xent(z, z, 0.5).item() == pytest.approx(0.0, abs=1e-12)
    z1 = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    tau = 0.5
    assert simclr.nt_xent(z1, z1.clone(), tau).item() == pytest.approx(math.log1p(2 * math.exp(-2 / tau)), abs=1e-12)


@given(n=st.integers(2, 6), d=st.integers(2, 6), tau=st.floats(0.1, 1.0), seed=seeds)
def test_gradient_matches_finite_differences_in_float64(n, d, tau, seed):
    z1, z2 = views(seed, n, d)
    z1.requires_grad_(True), z2.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: simclr.nt_xent(a, b, tau), (z1, z2))


@given(n=st.integers(1, 32), d=st.integers(1, 16), tau=st.floats(0.01, 2.0), seed=seeds)
def test_gradients_are_finite_even_for_small_temperatures_and_collapse(n, d, tau, seed):
    z1, z2 = views(seed, n, d, torch.float32)
    for a, b in [(z1, z2), (z1, z1.clone()), (z1 * 1e-6, z2 * 1e6)]:
        a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        loss = simclr.nt_xent(a, b, tau)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


@given(n=st.integers(2, 16), d=st.integers(2, 16), tau=temperatures, seed=seeds)
def test_float32_under_bf16_autocast(n, d, tau, seed):
    z1, z2 = views(seed, n, d, torch.float32)
    z1, z2 = z1.bfloat16(), z2.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = simclr.nt_xent(z1, z2, tau)
    assert loss.dtype == torch.float32
    expected = simclr.nt_xent(z1.float(), z2.float(), tau)  # same bf16 inputs, computed without autocast
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-6)


def test_model_shapes_and_head_as_the_official_code():
    backbone = common.build_backbone("tiny", in_channels=1)
    model = simclr.SimCLR(backbone, proj_dim=16, proj_layers=3)
    z = model(torch.randn(4, 1, 8, 8))
    assert z.shape == (4, 16)
    linears = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and all(m.bias is None for m in linears)
    last_bn = model.projector[-1]
    assert isinstance(last_bn, torch.nn.BatchNorm1d) and not last_bn.bias.requires_grad
    z.pow(2).sum().backward()
    assert last_bn.bias.grad is None and torch.count_nonzero(last_bn.bias) == 0


def test_views_are_two_different_random_augmentations_of_one_image():
    info = SYNTHETIC_INFO
    ds = common.ImageTensorDataset(*synthetic(True))
    img, _ = ds[0]
    two = common.MultiView([simclr.simclr_augment(info, 16, 0.5, 0.5) for _ in range(2)])
    torch.manual_seed(0)
    v1, v2 = two(img)
    assert v1.shape == v2.shape == (3, 16, 16)
    assert not torch.equal(v1, v2)
    torch.manual_seed(0)
    w1, w2 = two(img)
    assert torch.equal(v1, w1) and torch.equal(v2, w2)  # seeded: the same draws again


def test_args_reject_bad_values():
    for bad in (dict(temperature=0.0), dict(blur=1.5), dict(proj_layers=0), dict(jitter_strength=-1.0)):
        with pytest.raises(ValueError):
            simclr.Args(**bad).check()
    simclr.Args().check()
    with pytest.raises(ValueError, match="2 images per process"):
        simclr.Args(batch_size=2).check(world_size=2)


# ---- the training step, the epoch loop and the optimiser, as main runs them ------------------------------------------


def step_model():
    """SimCLR's own head (Linear + BatchNorm) on a small encoder, in float64."""
    torch.manual_seed(0)
    return simclr.SimCLR(TwoLayerEncoder(), proj_dim=6, proj_layers=2).double()


def step_batch(n=5):
    """What the loader yields: two views of n distinct images, and labels (unused by SimCLR)."""
    g = torch.Generator().manual_seed(3)
    x1, x2 = (torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    return (x1, x2), torch.arange(n)


@pytest.mark.parametrize("adv_eps", [0.0, 0.03])
def test_train_step_is_nt_xent_of_the_views_paired_by_image(adv_eps):
    # the step against NT-Xent on embeddings made here from the same weights: view 1 of image k paired with view 2
    # of image k, both views through one forward (one BatchNorm over the 2n), the temperature of args, and CLAE's
    # term with its weight; then one SGD step from gradients cleared of the previous step's
    args = simclr.Args(device="cpu", temperature=0.3, adv_eps=adv_eps, adv_weight=0.7)
    model, reference = step_model(), step_model()
    (x1, x2), y = step_batch()
    n = len(x1)
    z = reference(torch.cat([x1, x2]))  # [2n, 6]
    expected = simclr.nt_xent(z[:n], z[n:], 0.3)
    if adv_eps:
        expected = expected + 0.7 * simclr.clae_loss(reference, x1, z[:n], args)
    expected.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        p.grad = torch.randn_like(p)  # a previous step's gradient, which the step must clear
    before = [p.detach().clone() for p in model.parameters()]
    loss = simclr.train_step(model, ((x1, x2), y), torch.optim.SGD(trained, lr=0.1), args)
    assert not loss.requires_grad and loss.item() == pytest.approx(expected.item(), rel=1e-12)
    for p, q, p0 in zip(model.parameters(), reference.parameters(), before):
        if not q.requires_grad:
            assert p.grad is None and torch.equal(p, p0)  # the last BatchNorm's frozen bias
            continue
        assert torch.allclose(p.grad, q.grad, rtol=1e-9, atol=1e-12)
        assert torch.allclose(p, p0 - 0.1 * q.grad, rtol=1e-12, atol=1e-14)
    for b, c in zip(model.buffers(), reference.buffers()):  # BatchNorm statistics of the same forward passes
        assert torch.allclose(b.double(), c.double(), rtol=1e-12, atol=1e-14)


class Epoch(list):
    """An epoch's batches as its loader gives them (the loop reads the epoch)."""
    epoch = 1


def test_epoch_loop_sets_each_steps_lr_and_returns_the_mean_loss(monkeypatch):
    args = simclr.Args(device="cpu", temperature=0.3, epochs=2, log_every=1e9)
    model = step_model()
    optimizer = simclr.build_optimizer(model, args)
    seen, real_step = [], simclr.train_step

    def step(*a):
        seen.append([group["lr"] for group in optimizer.param_groups])
        seen[-1].append(real_step(*a))
        return seen[-1][-1]

    monkeypatch.setattr(simclr, "train_step", step)
    model.eval()  # the loop must put it in training mode (BatchNorm on batch statistics)
    loader = Epoch([step_batch(4), step_batch(5)])
    mean = simclr.train_one_epoch(model, loader, optimizer, lambda s: 0.25 * s, common.Progress(args), args)
    assert [s[:-1] for s in seen] == [[0.5, 0.5], [0.75, 0.75]]  # steps 2 and 3: epoch 1 of 2 batches
    assert mean == pytest.approx((seen[0][-1] + seen[1][-1]).item() / 2, rel=1e-6)  # summed in float32
    assert model.training


def test_optimizer_as_main_builds_it():
    args = simclr.Args(lr=0.3, batch_size=1024, weight_decay=1e-3, momentum=0.8, lars_eta=0.01)
    model = simclr.SimCLR(common.build_backbone("tiny", 3), proj_dim=16, proj_layers=2)
    optimizer = simclr.build_optimizer(model, args)
    assert isinstance(optimizer, common.LARS) and optimizer.defaults["lr"] == pytest.approx(0.3 * 1024 / 256)
    weights, excluded = optimizer.param_groups
    frozen = model.projector[-1].bias
    assert {id(p) for p in weights["params"]} == {id(p) for p in model.parameters() if p.ndim > 1}
    assert {id(p) for p in excluded["params"]} == {id(p) for p in model.parameters() if p.ndim == 1} - {id(frozen)}
    assert weights["weight_decay"] == 1e-3 and not weights["lars_exclude"]
    assert excluded["weight_decay"] == 0 and excluded["lars_exclude"]  # biases and BatchNorm: no decay, no trust
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(1.2) and group["momentum"] == 0.8 and group["eta"] == 0.01
        assert not group["clip"]


def test_main_zero_initialises_the_last_batchnorm_of_every_residual_block(tmp_path, monkeypatch):
    # the official resnet.py: batch_norm_relu(..., init_zero=True) closes every residual block
    args = simclr.Args(dataset="digits", arch="resnet18", device="cpu", workers=0, out_dir=str(tmp_path / "r"))
    net = backbone_built_by(simclr.main, args, monkeypatch)
    blocks = [m for m in net.modules() if m.__class__.__name__ == "BasicBlock"]
    assert len(blocks) == 8 and all(torch.count_nonzero(b.bn2.weight) == 0 for b in blocks)
    assert all(torch.count_nonzero(b.bn1.weight) == b.bn1.weight.numel() for b in blocks)  # the first keeps 1
