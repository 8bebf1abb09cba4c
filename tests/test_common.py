"""Properties of the shared plumbing (common.py): CLI, optimiser, schedule, k-NN, probe, data, backbones, runs."""

import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import common
import jem
import simclr
from conftest import SYNTHETIC, init_gloo, spawn

seeds = st.integers(0, 2**31 - 1)

# ---------------------------------------------------------------------------------------------------- CLI


def test_parse_turns_fields_into_typed_flags():
    args = common.parse(simclr.Args, ["--batch-size", "64", "--lr", "0.5", "--amp", "--dataset", "digits",
                                      "--no-sync-bn", "--out-dir", "x"])
    assert (args.batch_size, args.lr, args.amp, args.dataset, args.sync_bn, args.out_dir) == (
        64, 0.5, True, "digits", False, "x")
    assert isinstance(args.batch_size, int) and isinstance(args.lr, float)
    assert common.parse(simclr.Args, []) == simclr.Args()  # defaults untouched


def test_help_comes_from_the_field_comments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.parse(simclr.Args, ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "tau of NT-Xent" in out and "--temperature" in out and "global batch" in out
    assert "(default: 0.5)" in out


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--lr must be positive"),
    (["--dataset", "nope"], "unknown --dataset"),
    (["--arch", "vgg"], "unknown --arch"),
    (["--batch-size", "ten"], "invalid int value"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--resume"], "--resume needs --out-dir"),
    (["--temperature", "0"], "--temperature must be positive"),
])
def test_bad_flags_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.parse(simclr.Args, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_batch_not_divisible_by_processes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as exit_info:
        common.parse(simclr.Args, ["--batch-size", "64"])
    assert exit_info.value.code == 2 and "does not divide evenly over 3" in capsys.readouterr().err

# ---------------------------------------------------------------------------------------------------- LARS


def lars_reference(ws, gs, steps, lr, momentum, wd, eta, exclude):
    """SimCLR's official LARS update, transcribed per parameter with plain tensor arithmetic."""
    ws = [w.clone() for w in ws]
    vs = [torch.zeros_like(w) for w in ws]
    for t in range(steps):
        for i, (w, v) in enumerate(zip(ws, vs)):
            g = gs[t][i].clone()
            if not exclude[i]:
                g = g + wd * w
                w_norm, g_norm = w.norm().item(), g.norm().item()
                trust = eta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
            else:
                trust = 1.0
            scaled_lr = lr * trust
            v.copy_(momentum * v + scaled_lr * g)
            w -= v
    return ws


@given(seed=seeds, lr=st.floats(0.01, 5.0), momentum=st.floats(0.0, 0.99), wd=st.floats(0.0, 0.1),
       eta=st.floats(1e-4, 1e-1), steps=st.integers(1, 4))
def test_lars_step_equals_transcription(seed, lr, momentum, wd, eta, steps):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (3,), (2, 2, 3)]
    exclude = [False, True, False]
    ws = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    ws[2].zero_()  # a zero weight: trust ratio falls back to 1
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(steps)]
    params = [nn.Parameter(w.clone()) for w in ws]
    opt = common.LARS([{"params": [params[0], params[2]], "weight_decay": wd},
                       {"params": [params[1]], "weight_decay": 0.0, "lars_exclude": True}],
                      lr=lr, momentum=momentum, eta=eta)
    for t in range(steps):
        for p, gr in zip(params, grads[t]):
            p.grad = gr.clone()
        opt.step()
    expected = lars_reference(ws, grads, steps, lr, momentum, wd, eta, exclude)
    for p, e in zip(params, expected):
        assert torch.allclose(p.detach(), e, rtol=1e-10, atol=1e-12)


def test_param_groups_exclude_biases_and_norms_from_decay_and_adaptation():
    model = simclr.SimCLR(common.build_backbone("tiny"), proj_dim=8)
    decay, no_decay = common.param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0 and no_decay["lars_exclude"]
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)
    bn_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert bn_weights <= {id(p) for p in no_decay["params"]}

# ---------------------------------------------------------------------------------------------------- schedule


@given(total=st.integers(2, 2000), warm_frac=st.floats(0.0, 0.5), base=st.floats(1e-4, 10.0),
       final_frac=st.floats(0.0, 0.5))
def test_warmup_cosine_bounds_and_shape(total, warm_frac, base, final_frac):
    warmup = int(total * warm_frac)
    final = base * final_frac
    lrs = [common.warmup_cosine(s, total, warmup, base, final) for s in range(total + 1)]
    assert all(0 <= lr <= base * (1 + 1e-12) for lr in lrs)
    if warmup:
        assert lrs[0] == 0.0
        assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))  # strictly rising warm-up
        assert lrs[warmup - 1] == pytest.approx(base * (warmup - 1) / warmup)
    assert lrs[warmup] == pytest.approx(base)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # then never rising
    assert lrs[total] == pytest.approx(final, abs=1e-12)
    assert all(lr >= final - 1e-12 for lr in lrs[warmup:])

# ---------------------------------------------------------------------------------------------------- k-NN, probe


def knn_brute_force(train_z, train_y, test_z, num_classes, k, t):
    """InstDisc's weighted k-NN with explicit loops: sort all similarities, vote exp(s/t) with the top k."""
    out = torch.zeros(len(test_z), num_classes, dtype=torch.float64)
    for i, q in enumerate(test_z):
        sims = [(float(q @ x / (q.norm() * x.norm())), int(y)) for x, y in zip(train_z, train_y)]
        sims.sort(key=lambda s: -s[0])
        for s, y in sims[:k]:
            out[i, y] += math.exp(s / t)
    return out


@given(seed=seeds, n=st.integers(1, 40), m=st.integers(1, 10), d=st.integers(2, 8), c=st.integers(2, 6),
       k=st.integers(1, 50), t=st.floats(0.05, 1.0))
def test_weighted_knn_equals_brute_force(seed, n, m, d, c, k, t):
    # d >= 2: in one dimension every cosine similarity is +-1 and the k nearest are ties
    g = torch.Generator().manual_seed(seed)
    train_z, test_z = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(m, d, generator=g,
                                                                                         dtype=torch.float64)
    train_y = torch.randint(0, c, (n,), generator=g)
    got = common.knn_scores(train_z, train_y, test_z, c, k=k, t=t, chunk=3)
    assert torch.allclose(got.double(), knn_brute_force(train_z, train_y, test_z, c, min(k, n), t), rtol=1e-5)


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    top1, top2 = common.topk_accuracy(scores, labels, (1, 2))
    assert top1 == pytest.approx(1 / 3) and top2 == pytest.approx(2 / 3)


def test_linear_probe_separates_separable_features_and_fails_on_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    centres = torch.randn(3, 16, generator=g) * 5
    z = centres[y] + torch.randn(300, 16, generator=g)
    top1, top5 = common.linear_probe(z[:200], y[:200], z[200:], y[200:], 3, epochs=30)
    assert top1 > 0.98 and top5 == 1.0
    noise = torch.randn(300, 16, generator=g)
    top1_noise, _ = common.linear_probe(noise[:200], y[:200], noise[200:], y[200:], 3, epochs=30)
    assert top1_noise < 0.6

# ---------------------------------------------------------------------------------------------------- data


@given(seed=seeds, n=st.integers(1, 200))
def test_balanced_subset(seed, n):
    targets = [i % 7 for i in range(100)] + [0] * 20  # class 0 over-represented
    idx = common.balanced_subset(targets, n, seed)
    assert len(idx) == min(n, len(targets)) and len(set(idx)) == len(idx)
    counts = torch.bincount(torch.tensor([targets[i] for i in idx]), minlength=7)
    if n <= 7 * 14:  # every class still has images: counts differ by at most one
        assert counts.max() - counts.min() <= 1
    assert idx == common.balanced_subset(targets, n, seed)


def test_datasets_offline_and_index_wrapper():
    args = common.Args(dataset="digits")
    train, test = common.load_dataset(args, True), common.load_dataset(args, False)
    assert (len(train), len(test)) == (1437, 360)
    img, y = train[0]
    assert img.size == (8, 8) and img.mode == "L" and 0 <= y < 10
    info, size = common.dataset_info(args)
    x, y2, i = common.WithIndex(common.load_dataset(args, True, common.normalize(info)))[5]
    assert x.shape == (1, 8, 8) and i == 5 and y2 == train[5][1]
    syn = common.load_dataset(common.Args(dataset="imagefolder", data_dir=str(SYNTHETIC)), True)
    assert len(syn) == 512 and syn[0][0].size == (16, 16) and syn[0][0].mode == "RGB"


def test_missing_torchvision_data_fails_with_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.load_dataset(common.Args(dataset="cifar10", data_dir=str(tmp_path)), True)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--download" in err and len(err.strip().splitlines()) == 1


def test_image_folder(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 20), (i * 50, 0, 0)).save(tmp_path / split / c / f"{i}.png")
    args = common.Args(dataset="imagefolder", data_dir=str(tmp_path))
    info, size = common.dataset_info(args)
    assert info.num_classes == 2 and size == 20
    assert len(common.load_dataset(args, True)) == 6 and common.load_dataset(args, False).targets == [0] * 3 + [1] * 3


def test_extract_features_keeps_dataset_order():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 2, 2, 1).contiguous()
    ds = common.ImageTensorDataset(images, list(range(10)), transform=common.T.PILToTensor())

    class Mean(nn.Module):
        def forward(self, x):
            return x.float().mean(dim=(2, 3))

    z, y = common.extract_features(Mean(), ds, common.Args(device="cpu", workers=0), batch_size=3)
    assert torch.equal(z[:, 0], torch.arange(10.0)) and torch.equal(y, torch.arange(10))

# ---------------------------------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("arch, size, dim", [("tiny", 8, 128), ("resnet18", 16, 512), ("resnet34", 16, 512),
                                             ("resnet50", 16, 2048), ("wrn28_2", 16, 128),
                                             ("resnet18", 96, 512)])
@pytest.mark.parametrize("channels", [1, 3])
def test_backbones_any_channels(arch, size, dim, channels):
    net = common.build_backbone(arch, in_channels=channels, image_size=size)
    assert net.out_dim == dim
    assert net(torch.randn(2, channels, size, size)).shape == (2, dim)


def test_resnet_stems_and_wide_resnet_options():
    cifar, imagenet = common.build_backbone("resnet18", image_size=64), common.build_backbone("resnet18", image_size=96)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1) and isinstance(cifar.maxpool,
                                                                                             nn.Identity)
    assert imagenet.conv1.kernel_size == (7, 7) and isinstance(imagenet.maxpool, nn.MaxPool2d)
    plain = jem.without_batchnorm(common.build_backbone("wrn28_10", act="leaky"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert any(isinstance(m, nn.LeakyReLU) for m in plain.modules())
    assert plain.out_dim == 640 and common.build_backbone("wrn34_10").out_dim == 640
    blocks = [m for m in common.build_backbone("wrn34_10").modules() if isinstance(m, common._WideBlock)]
    assert len(blocks) == 15  # (34 - 4) / 6 = 5 blocks in each of 3 groups

# ------------------------------------------------------------------------------------------- distributed (one process)


def test_gathers_are_identity_on_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    assert common.gather_with_grad(x) is x
    assert torch.equal(common.gather_no_grad(x), x) and torch.equal(common.all_reduce_mean(x), x)

# ---------------------------------------------------------------------------------------------------- run directory


def test_run_dir_refuses_to_overwrite_and_checks_checkpoints(tmp_path, capsys):
    args = simclr.Args(dataset="digits", arch="tiny", out_dir=str(tmp_path / "run"))
    run = common.RunDir(args, "simclr")
    run.log(epoch=1, step=4, loss=1.5, extra=3)  # args.json comes with the first row
    assert json.loads((run.path / "args.json").read_text())["arch"] == "tiny"
    row = json.loads((run.path / "metrics.jsonl").read_text())
    assert list(row)[:len(common.METRIC_KEYS)] == common.METRIC_KEYS and row["extra"] == 3
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run.save(1, model=model.state_dict(), optimizer=optimizer.state_dict())
    assert not list(run.path.glob("*.tmp"))
    before = {p.name: p.read_bytes() for p in run.path.iterdir()}

    def resume(method="simclr", **flags):
        return common.RunDir(dataclasses.replace(args, resume=True, **flags), method).resume(model, optimizer)

    with pytest.raises(SystemExit):  # a second run into the same directory
        common.RunDir(args, "simclr")
    assert "already holds a run" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a checkpoint of another method
        resume("moco")
    assert "is not a checkpoint of moco.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # another architecture
        resume(arch="resnet18")
    assert "--arch tiny" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.path.iterdir()} == before  # nothing written over

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.pt").write_bytes((run.path / "checkpoint.pt").read_bytes()[:100])
    with pytest.raises(SystemExit) as exit_info:
        resume(out_dir=str(corrupt))
    assert exit_info.value.code == 2 and "not a valid checkpoint" in capsys.readouterr().err
    assert resume()["epoch"] == 1


def test_help_names_each_default_once(capsys):
    with pytest.raises(SystemExit):
        common.parse(simclr.Args, ["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert "(default: runs/<method>-<date>-<time>)" in out
    assert "(default: runs/<method>-<date>-<time>) (default" not in out
    assert "cuda when available, else cpu)" in out and "else cpu) (default" not in out
    assert "(default: 0.5)" in out  # a field whose comment names no default gets it appended


def test_args_json_records_the_directory_and_device_the_run_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = simclr.Args(dataset="digits", arch="tiny")
    common.setup_distributed(args)
    run = common.RunDir(args, "simclr")
    run.log(epoch=0)  # args.json comes with the first row
    saved = json.loads((run.path / "args.json").read_text())
    assert saved["out_dir"] == str(run.path) and run.path.parent.name == "runs" and run.path.is_dir()
    assert saved["device"] == "cpu"


def test_progress_line_eta_never_negative_and_epoch_figures(capsys):
    args = common.Args(epochs=1, log_every=0.0)
    progress = common.Progress(args)
    progress.start(3)
    for step in range(3):
        progress.update(step, torch.tensor(1.5), 0.1, 8)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[-1].endswith("ETA 0:00:00") and all("-1 day" not in line for line in lines)
    summary = progress.summary()
    assert summary["step"] == 3 and summary["lr"] == 0.1 and summary["time_s"] > 0 and summary["images_per_s"] > 0


def _initial_weights(args, monkeypatch) -> dict:
    """The weights simclr.main builds, read where it hands the model to common.distribute (the run stops there)."""
    weights = {}

    def stop(model, args):
        weights.update({k: v.clone() for k, v in model.state_dict().items()})
        raise SystemExit(0)

    monkeypatch.setattr(common, "distribute", stop)
    with pytest.raises(SystemExit):
        simclr.main(args)
    return weights


def test_the_same_seed_builds_the_same_network_on_both_data_paths(tmp_path, monkeypatch):
    """Decoding an image folder onto the device runs a DataLoader before the network is built: it must draw nothing
    from the generator that initialises the network."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(8):
                pixels = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.png")
    weights = [_initial_weights(simclr.Args(dataset="imagefolder", data_dir=str(tmp_path), arch="tiny", batch_size=8,
                                            workers=0, seed=5, data_path=path, out_dir=str(tmp_path / path)),
                                monkeypatch) for path in ("cpu", "device")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_losses_stay_float32_on_cuda_and_deterministic_asks_for_exact_kernels(monkeypatch):
    """setup_distributed leaves TF32 off for matrix products (the float32 losses and the k-NN are such products;
    convolutions keep PyTorch's default), and --deterministic turns on PyTorch's deterministic mode (which makes
    cuDNN's convolutions deterministic too, and CUBLAS_WORKSPACE_CONFIG its matrix products)."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    common.setup_distributed(common.Args(device="cpu"))
    assert not torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        common.setup_distributed(common.Args(device="cpu", deterministic=True))
        assert torch.are_deterministic_algorithms_enabled() and os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)

# ---------------------------------------------------------------------------------------------------- GlobalBatchNorm


def _batchnorm_case():
    """A batch of 12 images (3 channels, 2x2, far from zero mean), a fixed random weighting of the outputs, and a
    BatchNorm2d with affine parameters away from 1 and 0 and a momentum other than 0.5."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 2, 2, generator=g) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 3.0
    w = torch.randn(12, 3, 2, 2, generator=g)
    bn = nn.BatchNorm2d(3, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.5, 2.0])), bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return x, w, bn


def _batchnorm_worker(rank, store, out):
    from conftest import init_gloo, shard

    init_gloo(rank, store)
    x, w, bn = _batchnorm_case()
    net = nn.Sequential(bn)
    common.distribute(net, common.Args(device="cpu", sync_bn=True))  # turns the BatchNorm into a GlobalBatchNorm
    x = shard(x, rank).requires_grad_(True)
    y = net(x)
    (y * shard(w, rank)).sum().backward()  # this process's share of the loss on the whole batch
    torch.save({"cls": type(bn).__name__, "y": y.detach(), "x_grad": x.grad, "weight_grad": bn.weight.grad,
                "bias_grad": bn.bias.grad, "running_mean": bn.running_mean, "running_var": bn.running_var,
                "tracked": bn.num_batches_tracked}, f"{out}/{rank}.pt")
    torch.distributed.destroy_process_group()


def test_global_batchnorm_on_two_processes_equals_one_batchnorm_on_the_whole_batch(tmp_path):
    """Two gloo processes with --sync-bn on the halves of a batch against nn.BatchNorm2d on the whole batch: output,
    input gradient (each process's rows get the gradient of the global loss, through the global statistics), weight
    and bias gradients (summed over the processes), running mean and unbiased running variance."""
    from conftest import WORLD, shard, spawn

    got = spawn(_batchnorm_worker, tmp_path)
    x, w, bn = _batchnorm_case()
    x.requires_grad_(True)
    y = bn(x)
    (y * w).sum().backward()
    for rank in range(WORLD):
        r = got[rank]
        assert r["cls"] == "GlobalBatchNorm"
        assert torch.allclose(r["y"], shard(y.detach(), rank), rtol=1e-5, atol=1e-5)
        assert torch.allclose(r["x_grad"], shard(x.grad, rank), rtol=1e-4, atol=1e-5)
        assert torch.allclose(r["running_mean"], bn.running_mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(r["running_var"], bn.running_var, rtol=1e-5, atol=1e-6)
        assert int(r["tracked"]) == int(bn.num_batches_tracked) == 1
    for name in ("weight", "bias"):
        assert torch.allclose(got[0][f"{name}_grad"] + got[1][f"{name}_grad"], getattr(bn, name).grad, rtol=1e-5,
                              atol=1e-5), name


def test_distribute_turns_batchnorm_global_only_with_sync_bn_on_several_processes(monkeypatch):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm1d(4))
    common.distribute(net, common.Args(device="cpu", sync_bn=True))  # one process: nothing to synchronise
    assert [type(m) for m in net[1:]] == [nn.BatchNorm2d, nn.BatchNorm1d]

# ---------------------------------------------------------------------------------------------------- optimiser pieces


def test_param_groups_leave_frozen_parameters_out_and_mark_only_the_excluded_group():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.LayerNorm(3), nn.Linear(3, 2, bias=False))
    model[0].requires_grad_(False)  # frozen: in no group
    decay, excluded = common.param_groups(model, 0.25)
    assert [id(p) for p in decay["params"]] == [id(model[3].weight)]
    assert [id(p) for p in excluded["params"]] == [id(p) for p in (*model[1].parameters(), *model[2].parameters())]
    assert decay["weight_decay"] == 0.25 and not decay.get("lars_exclude", False)
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"] is True


@pytest.mark.parametrize("clip", [False, True])
def test_lars_on_a_models_param_groups_equals_transcription(clip):
    """common.LARS over common.param_groups of a network, two steps: weights decayed and scaled by their trust ratio
    eta |w| / |g + wd w| times lr (with clip: the least of
    that ratio and lr), biases and norm parameters plain momentum SGD, as transcribed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double()
    params = list(model.parameters())
    lr, momentum, wd, eta = 0.7, 0.9, 0.1, 0.02
    opt = common.LARS(common.param_groups(model, wd), lr=lr, momentum=momentum, eta=eta, clip=clip)
    ws = [p.detach().clone() for p in params]
    vs = [torch.zeros_like(w) for w in ws]
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) * (10 if clip else 1) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        for i, (w, v, gr) in enumerate(zip(ws, vs, grads)):
            if w.ndim > 1:  # a weight: decay and trust
                gr = gr + wd * w
                trust = eta * w.norm() / gr.norm()
                local_lr = min(trust, lr) if clip else lr * trust  # clip: LARC's min(eta |w| / |g|, lr)
            else:  # a bias or a norm parameter: neither
                local_lr = lr
            v.mul_(momentum).add_(local_lr * gr)
            w.sub_(v)
    for p, w in zip(params, ws):
        assert torch.allclose(p.detach(), w, rtol=1e-10, atol=1e-12)


def test_warmup_cosine_equals_transcription_at_every_step():
    total, warmup, base, final, start = 50, 10, 2.0, 0.1, 0.4
    for step in range(total + 3):
        if step < warmup:
            expected = start + (base - start) * step / warmup
        else:
            t = min(1.0, (step - warmup) / (total - warmup))
            expected = final + (base - final) * (1 + math.cos(math.pi * t)) / 2
        assert common.warmup_cosine(step, total, warmup, base, final, start) == pytest.approx(expected, abs=1e-12)


def test_cpu_loader_splits_each_epoch_into_disjoint_shards_reshuffled_by_epoch(monkeypatch):
    """Two processes' loaders of an epoch: batches of batch_size / 2, together every image at most once (full
    batches only), the same for the same seed and epoch, another order in another epoch."""
    dataset = torch.utils.data.TensorDataset(torch.arange(44))
    args = common.Args(device="cpu", batch_size=8, workers=0, seed=3)

    def epoch_of(rank, epoch):
        monkeypatch.setattr(common, "world", lambda: (rank, 2))
        return [batch[0].tolist() for batch in common.TrainData(dataset, None, args).loader(epoch)]

    shards = [epoch_of(rank, 0) for rank in range(2)]
    assert all(len(b) == 4 for s in shards for b in s) and len(shards[0]) == len(shards[1]) == 5
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == len(set(seen)) == 40
    assert shards[0] == epoch_of(0, 0) and epoch_of(0, 1) != shards[0]
    assert common.epoch_seed(3, 1, 0) not in (common.epoch_seed(3, 0, 0), common.epoch_seed(3, 1, 1))


def _shortcut_input(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = block.shortcut.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    block(x)
    handle.remove()
    return seen[0]


def test_wide_resnet_plcr_style_is_dplls_official_network():
    net = common.build_backbone("wrn34_10").eval()
    blocks = [m for m in net.modules() if isinstance(m, common._WideBlock)]
    down = blocks[5]  # first block of the second group: 160 -> 320 channels, stride 2
    assert down.conv1.stride == (2, 2) and down.conv2.stride == (1, 1)
    assert all(m.bias is None for m in net.modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(2, 160, 8, 8)
    assert torch.equal(_shortcut_input(down, x), torch.relu(down.norm1(x)))  # PLCR: after BN-ReLU
    assert isinstance(blocks[6].shortcut, nn.Identity)  # same width, stride 1: the identity, of the input itself
    x = torch.randn(2, 320, 4, 4)
    assert torch.equal(_shortcut_input(blocks[6], x), x)
    weight = blocks[7].conv1.weight  # Kaiming fan-out: std sqrt(2 / (320 * 9))
    assert abs(weight.std().item() / math.sqrt(2 / (320 * 9)) - 1) < 0.05


def test_wide_resnet_suncet_style_is_paws_and_jems_official_network():
    net = common.build_backbone("wrn28_2", style="suncet").eval()
    blocks = [m for m in net.modules() if isinstance(m, common._WideBlock)]
    down = blocks[4]  # first block of the second group: 32 -> 64 channels, stride 2
    assert down.conv1.stride == (1, 1) and down.conv2.stride == (2, 2) and down.shortcut.stride == (2, 2)
    assert all(m.bias is not None for m in net.modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(2, 32, 8, 8)
    assert torch.equal(_shortcut_input(down, x), x)  # suncet and JEM: the block's input itself
    final_bn = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)][-1]
    assert final_bn.num_features == 128 and final_bn.momentum == 0.99 and blocks[0].norm1.momentum == 0.1
    jems = jem.without_batchnorm(common.build_backbone("wrn28_10", act="leaky", style="suncet"))
    weight = [m for m in jems.modules() if isinstance(m, common._WideBlock)][5].conv1.weight  # 320 -> 320
    assert abs(weight.std().item() / math.sqrt(1 / (3 * 320 * 9)) - 1) < 0.05  # PyTorch's default, not Kaiming
    assert jems(torch.randn(2, 3, 32, 32)).shape == (2, 640)


def test_wide_resnet_without_normalisation_keeps_the_block_input_for_its_shortcut():
    net = jem.without_batchnorm(common.build_backbone("wrn28_2", act="leaky", style="suncet"))  # JEM's
    down = [m for m in net.modules() if isinstance(m, common._WideBlock)][4]
    x = torch.randn(2, 32, 8, 8)
    assert torch.equal(_shortcut_input(down, x.clone()), x)  # an in-place ReLU would have clipped it


# ---------------------------------------------------------------------------------------------------- linear protocol


def test_linear_protocol_trains_a_head_on_augmented_views_of_the_frozen_network(tmp_path):
    """Evaluation.report with --linear-epochs: the head learns (a zero head scores chance, 0.1) from crops and flips
    of the training images, through the network in eval mode; its weights and BatchNorm statistics stay as they were,
    and results.json holds the figures beside the fast probe's, with the protocol of each."""
    args = common.Args(dataset="digits", arch="tiny", workers=0, subset=512, batch_size=64, probe_epochs=10,
                       linear_epochs=3, linear_lr=0.5, linear_batch_size=32, device="cpu")
    args.out_dir = str(tmp_path / "run")
    info, size = common.dataset_info(args)
    _, memory_set, test_set = common.training_and_eval_sets(args, None, common.eval_transform(info, size))
    torch.manual_seed(0)
    backbone = common.build_backbone(args.arch, info.channels, size)
    for bn in (m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.momentum = None  # BatchNorm statistics of these images (their average over batches), as training leaves them
    with torch.no_grad():
        for x, _ in common.Batches(memory_set, args, batch_size=128):
            backbone(x)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    calls = []  # (training mode, gradient enabled, input) of every forward pass
    backbone.register_forward_hook(lambda m, x, out: calls.append((m.training, torch.is_grad_enabled(), x[0])))
    evaluation = common.Evaluation(memory_set, test_set, info.num_classes, args)
    results = evaluation.report(backbone, common.RunDir(args, "x"))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved == results and {"probe_top1", "probe_top5", "linear_top1", "linear_top5"} <= set(saved)
    assert set(saved["protocols"]) == {"knn_top1", "probe_top1", "linear_top1"}
    assert "crops and flips" in saved["protocols"]["linear_top1"]
    assert 0.4 < saved["linear_top1"] <= saved["linear_top5"]
    assert backbone.training  # its mode given back
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())  # weights, running statistics
    assert not any(training or grad for training, grad, _ in calls)
    unaugmented = torch.stack([x for x, _ in [*memory_set, *test_set]])  # [N, 1, 8, 8]
    inputs = torch.cat([x for *_, x in calls]).flatten(1)  # [M, 64]
    distance = [torch.cdist(inputs, images.flatten(1), compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
                for images in (unaugmented, unaugmented.flip(-1))]  # [M] each, exact zeros: an image, its mirror
    augmented, cropped = distance[0] > 0, (distance[0] > 0) & (distance[1] > 0)
    # every training image once an epoch, of which about 1 in 18 (crop offsets 3 x 3, flip or not) is the image itself
    # and 1 in 9 the image or its mirror
    assert 0.8 * args.linear_epochs * len(memory_set) < augmented.sum() <= args.linear_epochs * len(memory_set)
    assert 0.7 * args.linear_epochs * len(memory_set) < cropped.sum()
    assert 0.02 * args.linear_epochs * len(memory_set) < (augmented & (distance[1] == 0)).sum()  # flipped, not moved


def _linear_head(args: common.Args) -> nn.Linear:
    """The linear protocol's head on 128 digits without augmentation, through a seeded tiny network."""
    info, size = common.dataset_info(args)
    train_set = common.Subset(common.load_dataset(args, True, common.eval_transform(info, size)), range(128))
    torch.manual_seed(0)
    return common.linear_protocol(common.build_backbone("tiny", info.channels, size), train_set, 10, args)


LINEAR_ARGS = dict(dataset="digits", workers=0, linear_epochs=2, linear_lr=2.0, linear_batch_size=32, device="cpu")


def _linear_head_worker(rank, store, out):
    init_gloo(rank, store)
    torch.save(_linear_head(common.Args(**LINEAR_ARGS)).state_dict(), os.path.join(out, f"{rank}.pt"))


def test_linear_protocol_on_two_processes_trains_the_head_of_one(tmp_path):
    """Two processes, each on half of every global batch with the gradients averaged, hold the head that one process
    trains on the whole batches."""
    one = _linear_head(common.Args(**LINEAR_ARGS)).state_dict()
    assert one["weight"].abs().sum() > 0
    for two in spawn(_linear_head_worker, tmp_path):
        assert all(torch.allclose(two[k], one[k], atol=1e-6) for k in one)


def test_linear_protocol_flags_are_checked_before_training(capsys):
    """A global batch that does not divide over the processes, or exceeds the training set, is refused when the run
    starts; with the protocol off (the default) neither is asked of the flags."""
    with pytest.raises(ValueError, match="--linear-batch-size 63 does not divide evenly over 2 processes"):
        common.Args(linear_epochs=1, linear_batch_size=63).check(world_size=2)
    common.Args(linear_batch_size=63).check(world_size=2)
    with pytest.raises(SystemExit) as exit_info:
        common.Evaluation(range(32), range(8), 10, common.Args(linear_epochs=1, linear_batch_size=64))
    assert exit_info.value.code == 2 and "--linear-batch-size 64 is larger than the training set (32 images)" in (
        capsys.readouterr().err)
    common.Evaluation(range(32), range(8), 10, common.Args(linear_batch_size=64))
