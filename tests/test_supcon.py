"""Properties of SupCon's loss (supcon.py): the paper's L_out, SimCLR as the label-free case, masks, modes,
no NaN without positives, and the global batch over two processes."""

import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import common
import simclr
import supcon
from conftest import TwoLayerEncoder, init_gloo, run_script, shard, spawn

temperatures = st.floats(0.05, 2.0)
seeds = st.integers(0, 2**31 - 1)


def draw(seed, b, v, d, classes, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, d, generator=g, dtype=dtype), torch.randint(0, classes, (b,), generator=g)


def l_out_reference(features, labels, tau, base_tau, mode="all"):
    """The paper's L_out (equation 2) with plain loops in float64, as the official code averages and scales it:
    for each anchor i, P(i) = other views with i's label (or of i's image without labels), A(i) = all views
    but i; loss_i = -(tau/base_tau) / |P(i)| sum_p log exp(z_i.z_p/tau) / sum_a exp(z_i.z_a/tau), 0 when P(i)
    is empty; the mean over anchors (all views, or only view 0 of each image with mode 'one')."""
    f = features.detach().double().numpy()
    b, v = f.shape[:2]
    views = [(i, k, f[i, k] / np.linalg.norm(f[i, k])) for k in range(v) for i in range(b)]  # (image, view, z)
    y = list(range(b)) if labels is None else [int(t) for t in labels]
    losses = []
    for a, (i, k, z_i) in enumerate(views):
        if mode == "one" and k != 0:
            continue
        others = [(j, z) for c, (j, _, z) in enumerate(views) if c != a]
        denominator = sum(math.exp(float(z_i @ z) / tau) for _, z in others)
        positives = [z for j, z in others if y[j] == y[i]]
        total = sum(math.log(math.exp(float(z_i @ z_p) / tau) / denominator) for z_p in positives)
        losses.append(-(tau / base_tau) * total / len(positives) if positives else 0.0)
    return sum(losses) / len(losses)


@given(b=st.integers(1, 6), v=st.integers(1, 3), d=st.integers(1, 8), classes=st.integers(1, 4),
       tau=temperatures, base=temperatures, mode=st.sampled_from(["all", "one"]), seed=seeds,
       use_labels=st.booleans())
def test_equals_transcription_of_the_paper(b, v, d, classes, tau, base, mode, seed, use_labels):
    if b * v < 2:
        return
    features, labels = draw(seed, b, v, d, classes)
    labels = labels if use_labels else None
    got = supcon.supcon_loss(features, labels, tau, base, mode).item()
    assert got == pytest.approx(l_out_reference(features, labels, tau, base, mode), rel=1e-9, abs=1e-9)


@given(n=st.integers(1, 8), d=st.integers(1, 12), tau=temperatures, seed=seeds)
def test_without_labels_equals_simclr_nt_xent(n, d, tau, seed):
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    features = torch.stack([z1, z2], dim=1)  # [N, 2, D]
    got = supcon.supcon_loss(features, None, temperature=tau, base_temperature=tau)  # scale tau/base_tau = 1
    assert torch.allclose(got, simclr.nt_xent(z1, z2, tau), rtol=1e-10, atol=1e-12)
    # labels all different is the same thing as no labels
    distinct = supcon.supcon_loss(features, torch.arange(n), temperature=tau, base_temperature=tau)
    assert torch.allclose(distinct, got, rtol=1e-12, atol=1e-12)


@given(b=st.integers(1, 8), v=st.integers(1, 3), classes=st.integers(1, 4), seed=seeds,
       use_labels=st.booleans(), mode=st.sampled_from(["all", "one"]))
def test_masks_never_pair_an_anchor_with_itself(b, v, classes, seed, use_labels, mode):
    labels = torch.randint(0, classes, (b,), generator=torch.Generator().manual_seed(seed)) if use_labels else None
    anchor_views = v if mode == "all" else 1
    positive, self_pair = supcon.supcon_masks(labels, b, v, anchor_views)
    assert positive.shape == self_pair.shape == (anchor_views * b, v * b)
    assert self_pair.sum(1).eq(1).all()  # exactly one self-pair per anchor ...
    assert not (positive & self_pair).any()  # ... never a positive
    for a in range(anchor_views * b):
        for c in range(v * b):
            i, j = a % b, c % b  # rows and columns are view-major
            same = (i == j) if labels is None else bool(labels[i] == labels[j])
            assert bool(self_pair[a, c]) == (a == c)
            assert bool(positive[a, c]) == (same and a != c)


@given(b=st.integers(2, 8), d=st.integers(2, 8), tau=temperatures, seed=seeds)
def test_self_similarity_does_not_enter_the_loss(b, d, tau, seed):
    # one view per image and every label distinct: no anchor has a positive, so the loss is exactly 0 (an anchor
    # paired with itself would give -log p(self) > 0)
    features, _ = draw(seed, b, 1, d, 1)
    loss = supcon.supcon_loss(features, torch.arange(b), tau)
    assert loss.item() == 0.0


@given(b=st.integers(2, 8), v=st.integers(1, 3), d=st.integers(1, 8), tau=st.floats(0.01, 2.0), seed=seeds)
def test_anchor_without_positive_gives_no_nan(b, v, d, tau, seed):
    # labels [0, 1, 1, 2, ...]: with one view, the first and last images have no positive in the batch
    features, _ = draw(seed, b, v, d, 1, torch.float32)
    labels = torch.tensor([0] + [1] * (b - 2) + [2])
    features.requires_grad_(True)
    loss = supcon.supcon_loss(features, labels, tau)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(features.grad).all()
    expected = l_out_reference(features, labels, tau, 0.07)
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-5)


@given(b=st.integers(2, 8), v=st.integers(2, 3), d=st.integers(1, 8), classes=st.integers(1, 4), tau=temperatures,
       seed=seeds)
def test_one_mode_is_the_mean_over_first_views_and_all_mode_over_every_view(b, v, d, classes, tau, seed):
    features, labels = draw(seed, b, v, d, classes)
    one = supcon.supcon_loss(features, labels, tau, contrast_mode="one")
    every = supcon.supcon_loss(features, labels, tau, contrast_mode="all")
    # 'all' averages the per-view 'one' losses: rotate each view into position 0 and average
    rotated = [supcon.supcon_loss(features.roll(-k, dims=1), labels, tau, contrast_mode="one") for k in range(v)]
    assert torch.allclose(every, torch.stack(rotated).mean(), rtol=1e-10)
    assert torch.allclose(one, rotated[0], rtol=1e-12)
    # with a single view the two modes coincide
    single = features[:, :1]
    assert torch.allclose(supcon.supcon_loss(single, labels, tau, contrast_mode="one"),
                          supcon.supcon_loss(single, labels, tau, contrast_mode="all"), rtol=1e-12)


@given(b=st.integers(2, 8), v=st.integers(1, 3), d=st.integers(1, 8), classes=st.integers(1, 4), tau=temperatures,
       seed=seeds, mode=st.sampled_from(["all", "one"]))
def test_invariant_to_permuting_the_images(b, v, d, classes, tau, seed, mode):
    features, labels = draw(seed, b, v, d, classes)
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed + 1))
    assert torch.allclose(supcon.supcon_loss(features[perm], labels[perm], tau, contrast_mode=mode),
                          supcon.supcon_loss(features, labels, tau, contrast_mode=mode), rtol=1e-10, atol=1e-12)


@given(b=st.integers(2, 8), d=st.integers(2, 8), seed=seeds, tau=temperatures)
def test_scale_is_temperature_over_base_temperature(b, d, seed, tau):
    features, labels = draw(seed, b, 2, d, 3)
    assert torch.allclose(supcon.supcon_loss(features, labels, tau, 0.07),
                          supcon.supcon_loss(features, labels, tau, tau) * tau / 0.07, rtol=1e-12)


@given(b=st.integers(2, 16), d=st.integers(1, 8), tau=st.floats(0.01, 2.0), seed=seeds)
def test_gradients_are_finite_even_for_small_temperatures_and_collapse(b, d, tau, seed):
    features, labels = draw(seed, b, 2, d, 3, torch.float32)
    for f in (features, features[:, :1].expand(b, 2, d), features * 1e-6):
        f = f.clone().requires_grad_(True)
        loss = supcon.supcon_loss(f, labels, tau)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(f.grad).all()


@given(b=st.integers(2, 4), d=st.integers(2, 4), tau=st.floats(0.1, 1.0), seed=seeds)
def test_gradient_matches_finite_differences_in_float64(b, d, tau, seed):
    features, labels = draw(seed, b, 2, d, 2)
    features.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: supcon.supcon_loss(f, labels, tau), (features,))


@given(b=st.integers(2, 16), d=st.integers(2, 16), tau=temperatures, seed=seeds)
def test_float32_under_bf16_autocast(b, d, tau, seed):
    features, labels = draw(seed, b, 2, d, 3, torch.float32)
    features = features.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = supcon.supcon_loss(features, labels, tau)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(supcon.supcon_loss(features.float(), labels, tau).item(), rel=1e-6, abs=1e-6)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="batch, views"):
        supcon.supcon_loss(torch.randn(4, 8))
    with pytest.raises(ValueError, match="contrast_mode"):
        supcon.supcon_loss(torch.randn(4, 2, 8), contrast_mode="some")
    with pytest.raises(ValueError, match="labels"):
        supcon.supcon_loss(torch.randn(4, 2, 8), torch.arange(3))


def test_model_output_is_normalised_and_head_is_the_official_mlp():
    model = supcon.SupCon(common.build_backbone("tiny", in_channels=1), proj_dim=16)
    z = model(torch.randn(4, 1, 8, 8))
    assert z.shape == (4, 16)
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)
    assert [type(m) for m in model.projector] == [nn.Linear, nn.ReLU, nn.Linear]


def test_args_reject_bad_values():
    for bad in (dict(temperature=0.0), dict(base_temperature=-1.0), dict(method="byol"), dict(contrast_mode="x"),
                dict(crop_min_scale=0.0), dict(proj_dim=0)):
        with pytest.raises(ValueError):
            supcon.Args(**bad).check()
    supcon.Args().check()


# ---- the training step, the epoch loop and the optimiser, as main runs them ------------------------------------------

# (--method, --contrast-mode): labels reach the loss only with supcon; 'one' anchors only view 1
MODES = [("supcon", "all"), ("supcon", "one"), ("simclr", "all")]


def step_model(dtype=torch.float64):
    torch.manual_seed(0)
    model = supcon.SupCon(TwoLayerEncoder(), proj_dim=6).to(dtype)
    with torch.no_grad():  # doubled weights spread the embeddings over the sphere: pairs and labels show in the loss
        for p in model.parameters():
            p.mul_(2)
    return model


def step_batch(dtype=torch.float64):
    """What the loader yields: two views of 8 distinct images and their labels, repeated within and across halves."""
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(8, 3, 4, 4, generator=g, dtype=dtype), torch.randn(8, 3, 4, 4, generator=g, dtype=dtype)
    return (x1, x2), torch.tensor([0, 1, 1, 2, 0, 3, 3, 3])


def step_args(method, mode):
    return supcon.Args(device="cpu", method=method, contrast_mode=mode, temperature=0.2, base_temperature=0.15)


@pytest.mark.parametrize("method, mode", MODES)
def test_train_step_is_l_out_of_the_views_paired_by_image_with_the_labels(method, mode):
    # the step against L_out on features built here from the same weights: [N, 2, D] with view 1 then view 2 of
    # each image, the labels (supcon) or none (simclr), the temperatures and contrast mode of args; gradients cleared
    # of the previous step's, then one SGD step
    model, reference = step_model(), step_model()
    (x1, x2), y = step_batch()
    z = reference(torch.cat([x1, x2]))  # [16, 6], one forward as the official code
    features = torch.stack([z[:8], z[8:]], dim=1)  # [8, 2, 6]: image k's two views
    expected = supcon.supcon_loss(features, y if method == "supcon" else None, 0.2, 0.15, mode)
    expected.backward()
    other = supcon.supcon_loss(features.detach(), y if method == "simclr" else None, 0.2, 0.15, mode)
    assert not torch.allclose(other, expected.detach(), rtol=1e-3)  # the labels make a difference here
    for p in model.parameters():
        p.grad = torch.randn_like(p)  # a previous step's gradient, which the step must clear
    before = [p.detach().clone() for p in model.parameters()]
    loss = supcon.train_step(model, ((x1, x2), y), torch.optim.SGD(model.parameters(), lr=0.1),
                             step_args(method, mode))
    assert not loss.requires_grad and loss.item() == pytest.approx(expected.item(), rel=1e-12)
    for p, q, p0 in zip(model.parameters(), reference.parameters(), before):
        assert torch.allclose(p.grad, q.grad, rtol=1e-9, atol=1e-12)
        assert torch.allclose(p, p0 - 0.1 * q.grad, rtol=1e-12, atol=1e-14)


class Epoch(list):
    """An epoch's batches as its loader gives them (the loop reads the epoch)."""
    epoch = 1


def test_epoch_loop_sets_each_steps_lr_and_returns_the_mean_loss(monkeypatch):
    args = supcon.Args(device="cpu", epochs=2, log_every=1e9)
    model = step_model()
    optimizer = supcon.build_optimizer(model, args)
    seen, real_step = [], supcon.train_step

    def step(*a):
        seen.append([group["lr"] for group in optimizer.param_groups])
        seen[-1].append(real_step(*a))
        return seen[-1][-1]

    monkeypatch.setattr(supcon, "train_step", step)
    model.eval()  # the loop must put it in training mode (BatchNorm on batch statistics)
    loader = Epoch([step_batch(), step_batch()])
    mean = supcon.train_one_epoch(model, loader, optimizer, lambda s: 0.25 * s, common.Progress(args), args)
    assert [s[:-1] for s in seen] == [[0.5], [0.75]]  # steps 2 and 3: epoch 1 of 2 batches
    assert mean == pytest.approx((seen[0][-1] + seen[1][-1]).item() / 2, rel=1e-6)  # summed in float32
    assert model.training


def test_optimizer_as_main_builds_it():
    args = supcon.Args(lr=0.3, batch_size=512, weight_decay=1e-3, momentum=0.8)
    model = supcon.SupCon(common.build_backbone("tiny", 3), proj_dim=16)
    optimizer = supcon.build_optimizer(model, args)
    assert type(optimizer) is torch.optim.SGD and len(optimizer.param_groups) == 1
    (group,) = optimizer.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]  # decay on every parameter
    assert group["lr"] == 0.3 and optimizer.defaults["lr"] == 0.3  # the recipe's rate, not scaled by the batch
    assert group["momentum"] == 0.8 and group["weight_decay"] == 1e-3 and not group["nesterov"]


# ---- two processes on halves of the batch equal one process on the whole batch -------------------------------


def _step(net, model, batch, method, mode):
    """supcon.train_step once with plain SGD; returns the loss, the gradients and the weights after the step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = supcon.train_step(net, batch, optimizer, step_args(method, mode))
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return loss, grads, {k: v.clone() for k, v in model.state_dict().items()}


def _worker(rank, store, out):
    init_gloo(rank, store)
    saved = {}
    for method, mode in MODES:
        model = step_model(torch.float32)
        net = common.distribute(model, supcon.Args(device="cpu"))  # DDP
        (x1, x2), y = step_batch(torch.float32)
        loss, grads, state = _step(net, model, ((shard(x1, rank), shard(x2, rank)), shard(y, rank)), method, mode)
        saved[method + mode] = {"loss": loss, "grads": grads, "state": state}
    torch.save(saved, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_on_halves_equal_one_process_on_the_whole_batch(tmp_path):
    # supcon.train_step: embeddings gathered with gradient and labels without, the loss of the global batch
    results = spawn(_worker, tmp_path)
    for method, mode in MODES:
        model = step_model(torch.float32)
        loss, grads, state = _step(model, model, step_batch(torch.float32), method, mode)
        for saved in results:
            got = saved[method + mode]
            assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
            for name, g in grads.items():
                assert torch.allclose(got["grads"][name], g, rtol=1e-5, atol=1e-7), (method, mode, name)
            for name, v in state.items():
                assert torch.allclose(got["state"][name], v, rtol=1e-5, atol=1e-7), (method, mode, name)


# ---- learning check ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_supcon_cifar10_subset_beats_the_untrained_network(cifar10, tmp_path):
    # tiny network, 5,000 training images, 1,000 test images, 6 epochs; the official lr 0.5 (for ResNet-50 at batch
    # 1024) collapsed the tiny network at batch 256 (the loss stuck at (tau/base_tau) log(2N - 1)), so half of it
    run = tmp_path / "run"
    out = run_script("supcon.py", *cifar10, "--arch", "tiny",
                     "--subset", "5000", "--eval-subset", "1000", "--epochs", EPOCHS, "--warmup-epochs", "1",
                     "--lr", "0.25", "--batch-size", "256", "--workers", "2", "--eval-every", "0",
                     "--probe-epochs", "0", "--out-dir", run, timeout=1800, env_extra={"OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((run / "results.json").read_text())
    print(f"CIFAR-10 subset k-NN top-1: untrained {r['knn_top1_untrained']:.4f} -> trained {r['knn_top1']:.4f}")
    assert r["knn_top1"] - r["knn_top1_untrained"] >= MARGIN_CIFAR


EPOCHS = "6"
MARGIN_CIFAR = 0.015  # measured in 6 epochs: 0.313 -> 0.346 (+0.033) image folder, 0.299 -> 0.339 (+0.040) torchvision


def test_defaults_are_the_official_cifar10_command():
    # SupContrast's README: main_supcon.py --batch_size 1024 --learning_rate 0.5 --temp 0.1 --cosine (ResNet-50,
    # 1000 epochs, wd 1e-4, warm-up above batch 256, base temperature 0.07, crops of 20-100%)
    a = supcon.Args()
    assert (a.arch, a.batch_size, a.epochs, a.lr, a.weight_decay, a.warmup_epochs) == ("resnet50", 1024, 1000, 0.5,
                                                                                       1e-4, 10)
    assert (a.temperature, a.base_temperature, a.proj_dim, a.crop_min_scale, a.momentum) == (0.1, 0.07, 128, 0.2,
                                                                                            0.9)
    assert (a.method, a.contrast_mode) == ("supcon", "all")
