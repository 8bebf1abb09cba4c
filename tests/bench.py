"""Throughput of a method's training step against its floor, and of the two data paths' augmentation.

Run:   python tests/bench.py                           (every method, tiny network, synthetic images, cuda if present)
       python tests/bench.py --arch resnet18 --batch-size 512 --data cifar10 --data-dir ../shared/data/cifar10

For each method (--method; entries in METHODS), in images per second, each the median over --repeats rounds:
  floor             the network work alone on one fixed batch already on the device: the method's step without
                    its loader (SimCLR, SupCon, SimSiam: forward and backward over both views; BYOL: the same for
                    the online network plus the target's forward; MoCo: the query encoder's forward and backward
                    over one view plus the key encoder's forward over the other, both ways with its --symmetric;
                    InstDisc: forward and backward over its one view; PAWS: forward and backward over the two
                    global views with the supports, and over the multi-crops; JEM: the SGLD chains from its
                    replay buffer and the forward and backward over data and samples), the loss and the
                    optimiser step; no data loading, no augmentation
  step, device data the method's own train_one_epoch over --steps batches from the training set held on the
                    device, views made there by batched augmentation (device_data.py through common.TrainData,
                    --data-path device)
  step, CPU data    the same over the CPU DataLoader with the PIL views and --workers processes (--data-path cpu)
  augment, device / CPU   the views of --steps batches alone (both views of every image), made on the device,
                    or by the DataLoader and moved to the device
The ratio step / floor says how much of the network's speed survives the data path (1.0: the data costs nothing);
each ratio is the median of the ratios measured within a round.
Every quantity is measured once per round, in the same round as the others, so that a change in the machine's
load (this CPU may be shared) touches every row alike; one round of warm-up is discarded.
The numbers and every round go to --json (bench.json). Not a test: pytest collects only test_*.py files.

       python tests/bench.py --adversarial             (the cost of CLAE and AdvProp, see README)
times the training step of simclr.py and instdisc.py as they are, with CLAE's adversarial view (--adv-eps 0.03)
and with it and AdvProp's auxiliary BatchNorms (--adv-bn), on the same fixed batches, round by round.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import byol  # noqa: E402
import common  # noqa: E402
import conftest  # noqa: E402  (the tests' synthetic images)
import instdisc  # noqa: E402
import jem  # noqa: E402
import moco  # noqa: E402
import paws  # noqa: E402
import simclr  # noqa: E402
import simsiam  # noqa: E402
import supcon  # noqa: E402


@dataclasses.dataclass
class Entry:
    """What the benchmark needs from a method: its views (the training set's transform), a step that trains on a
    loader of batches with the method's own train_one_epoch, and the floor's network work on one batch of views."""

    views: object
    step: callable  # loader -> None
    floor: callable  # the views of one batch on the device (a list, or one tensor) -> None
    indexed: bool = False  # the method trains on a common.WithIndex set: batches (views, labels, positions)


def method_args(cls, bench, **kw):
    """The method's defaults with the benchmark's device, network, batch and speed options."""
    return cls(dataset="cifar10", arch=bench.arch, batch_size=bench.batch_size, workers=bench.workers,
               device=bench.device, amp=bench.amp, channels_last=bench.channels_last, compile=bench.compile,
               log_every=1e9, **kw)


class QuietProgress(common.Progress):
    """common.Progress that never prints a line, nor reads the loss from the device to print it: the benchmark times
    the steps alone."""

    def update(self, step: int, loss: torch.Tensor, lr: float, images: int):
        pass


class Fixed(list):
    """Batches fixed in advance as one epoch's loader (what train_one_epoch iterates: len, iteration, .epoch)."""

    epoch = 0


def simclr_entry(bench, info: common.DataInfo, size: int, images: int) -> Entry:
    args = method_args(simclr.Args, bench)
    views = common.MultiView([simclr.simclr_augment(info, size, args.jitter_strength, 0.0, args.crop_min_scale)
                              for _ in range(2)])
    model = common.prepare_model(simclr.SimCLR(common.build_backbone(args.arch, info.channels, size),
                                               args.proj_dim, args.proj_layers), args)
    lr = args.lr * args.batch_size / 256
    optimizer = common.LARS(common.param_groups(model, args.weight_decay), lr=lr, momentum=args.momentum,
                            eta=args.lars_eta)
    net = common.distribute(model, args)
    progress = QuietProgress(args)

    def step(loader):
        simclr.train_one_epoch(net, loader, optimizer, lambda _: lr, progress, args)

    def floor(views):  # train_one_epoch's step without its loader
        x = torch.cat(common.to_device(views, args))  # [2n, C, H, W]
        with common.autocast(args):
            z = net(x)
        z1, z2 = z.chunk(2)
        loss = simclr.nt_xent(z1, z2, args.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return Entry(views, step, floor)


def supcon_entry(bench, info: common.DataInfo, size: int, images: int) -> Entry:
    args = method_args(supcon.Args, bench)
    views = common.MultiView([supcon.supcon_augment(info, size, args.crop_min_scale) for _ in range(2)])
    model = common.prepare_model(supcon.SupCon(common.build_backbone(args.arch, info.channels, size),
                                               args.proj_dim), args)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    net = common.distribute(model, args)
    progress = QuietProgress(args)
    labels = torch.arange(bench.batch_size, device=args.device) % info.num_classes  # the floor's fixed labels

    def step(loader):
        supcon.train_one_epoch(net, loader, optimizer, lambda _: args.lr, progress, args)

    def floor(views):  # train_one_epoch's step without its loader: forward of both views, loss, backward, step
        x = torch.cat(common.to_device(views, args))  # [2n, C, H, W]
        with common.autocast(args):
            z = net(x)
        features = torch.stack(z.chunk(2), dim=1)  # [n, 2, D]
        loss = supcon.supcon_loss(features, labels[:len(features)], args.temperature, args.base_temperature,
                                  args.contrast_mode)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return Entry(views, step, floor)


def moco_entry(bench, info: common.DataInfo, size: int, images: int) -> Entry:
    args = method_args(moco.Args, bench)
    views = common.MultiView([moco.moco_augment(info, size, args.crop_min_scale) for _ in range(2)])
    backbone = moco.split_batchnorm(common.build_backbone(args.arch, info.channels, size), args.bn_splits)
    model = common.prepare_model(moco.MoCo(backbone, args.proj_dim, args.mlp, args.queue_size), args)
    lr = args.lr * args.batch_size / 512
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                                momentum=args.sgd_momentum, weight_decay=args.weight_decay)
    net = common.distribute(model, args)
    progress = QuietProgress(args)

    def step(loader):
        moco.train_one_epoch(net, loader, optimizer, lambda _: lr, progress, args)

    def floor(views):  # the step without its loader: the query encoder's forward and backward on one view, the
        x1, x2 = common.to_device(views, args)  # key encoder's forward on the other
        moco.momentum_update(model.encoder_q, model.encoder_k, args.momentum)
        with common.autocast(args):
            q1, k2 = net(x1), model.keys(x2)
            if args.symmetric:
                q2, k1 = net(x2), model.keys(x1)
        queue = model.queue.clone()
        loss = moco.moco_loss(q1, k2, queue, args.temperature)
        if args.symmetric:
            loss = loss + moco.moco_loss(q2, k1, queue, args.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for k in ([k1, k2] if args.symmetric else [k2]):
            model.dequeue_and_enqueue(k)

    return Entry(views, step, floor)


def byol_entry(bench, info: common.DataInfo, size: int, images: int) -> Entry:
    args = method_args(byol.Args, bench)
    blur = args.blur == 1 or (args.blur == -1 and size > 64)
    views = common.MultiView([byol.byol_augment(info, size, 1.0 if blur else 0.0, 0.0, args.crop_min_scale),
                              byol.byol_augment(info, size, 0.1 if blur else 0.0, args.solarize,
                                                args.crop_min_scale)])
    model = common.prepare_model(byol.BYOL(common.build_backbone(args.arch, info.channels, size),
                                           args.proj_hidden_dim, args.proj_dim), args)
    lr = args.lr * args.batch_size / 256
    optimizer = common.LARS(common.param_groups(model, args.weight_decay), lr=lr, momentum=args.momentum,
                            eta=args.lars_eta, clip=args.lars_clip)
    net = common.distribute(model, args)
    progress = QuietProgress(args)

    def step(loader):
        byol.train_one_epoch(net, loader, optimizer, lambda _: lr, progress, args)

    def floor(views):  # the step without its loader: the online network's forward and backward on both views,
        x1, x2 = common.to_device(views, args)  # the target's forward on both
        with common.autocast(args):
            p1, p2, z1, z2 = net(x1, x2)
        loss = byol.byol_loss(p1, z2) + byol.byol_loss(p2, z1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.update_target(args.tau_base)

    return Entry(views, step, floor)


def simsiam_entry(bench, info: common.DataInfo, size: int, images: int) -> Entry:
    args = method_args(simsiam.Args, bench)
    blur = args.blur if args.blur >= 0 else (0.5 if size > 64 else 0.0)
    views = common.MultiView([simsiam.simsiam_augment(info, size, blur, args.crop_min_scale) for _ in range(2)])
    backbone = common.build_backbone(args.arch, info.channels, size, zero_init_residual=True)
    model = common.prepare_model(simsiam.SimSiam(backbone, args.proj_dim, args.pred_dim, args.proj_layers), args)
    lr = args.lr * args.batch_size / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    net = common.distribute(model, args)
    progress = QuietProgress(args)

    def step(loader):
        simsiam.train_one_epoch(net, loader, optimizer, lambda _: lr, progress, args)

    def floor(views):  # the step without its loader: forward and backward on both views
        x1, x2 = common.to_device(views, args)
        with common.autocast(args):
            p1, p2, z1, z2 = net(x1, x2)
        loss = simsiam.simsiam_loss(p1, p2, z1, z2, stop_grad=args.stop_grad)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        simsiam.output_std(z1)

    return Entry(views, step, floor)


def instdisc_entry(bench, info: common.DataInfo, size: int, images: int) -> Entry:
    args = method_args(instdisc.Args, bench)
    views = instdisc.instdisc_augment(info, size, args.crop_min_scale, args.flip)
    model = common.prepare_model(instdisc.InstDisc(common.build_backbone(args.arch, info.channels, size),
                                                   args.low_dim), args)
    bank = instdisc.MemoryBank(images, args.low_dim, torch.Generator().manual_seed(0)).to(args.device)
    bank.rng.manual_seed(7919)  # the generator of its noise rows
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    net = common.distribute(model, args)
    progress = QuietProgress(args)
    rows = torch.arange(bench.batch_size, device=args.device)  # the floor's fixed bank rows

    def step(loader):
        instdisc.train_one_epoch(net, bank, loader, optimizer, lambda _: args.lr, progress, args)

    def floor(x):  # the step without its loader: forward and backward on the one view, the bank's update
        x = common.to_device(x, args)
        instdisc.train_step(net, (x, None, rows[:len(x)]), optimizer, bank, args)

    return Entry(views, step, floor, indexed=True)


def paws_entry(bench, info: common.DataInfo, size: int, images: int) -> Entry:
    """Every training image is labelled here, so the supports (10 classes x 64 x 2 views a step, the default)
    come from the same images, through the same path as the unlabelled batch: the step's rows time both."""
    args = method_args(paws.Args, bench)
    views, support_view = paws.paws_views(info, size, args.multicrop, args.jitter_strength)
    support_views = common.MultiView([support_view] * args.support_views)
    model = common.prepare_model(paws.PAWS(common.build_backbone(args.arch, info.channels, size), args.proj_dim),
                                 args)
    optimizer = common.LARS(common.param_groups(model, args.weight_decay), lr=args.lr, momentum=args.momentum,
                            eta=args.lars_eta)
    net = common.distribute(model, args)
    progress = QuietProgress(args)
    supports = {}
    for path in ("device", "cpu"):
        support_args = dataclasses.replace(args, data_path=path, seed=1)
        supports[path] = common.TrainData(training_set(bench, bench.data_args, support_views), support_views,
                                          support_args)
    fixed_supports = next(iter(paws.support_batches(supports["device"], args, 0, 1)))

    def step(loader):
        path = "device" if loader.on_device else "cpu"
        paws.train_one_epoch(net, loader, paws.support_batches(supports[path], args, 0, len(loader)), optimizer,
                             lambda _: args.lr, progress, args)

    def floor(views):  # the step without its loaders: one fixed unlabelled batch and one fixed batch of supports
        paws.train_one_epoch(net, Fixed([(views, None)]), Fixed([fixed_supports]), optimizer, lambda _: args.lr,
                             progress, args)

    return Entry(views, step, floor)


def jem_entry(bench, info: common.DataInfo, size: int, images: int) -> Entry:
    """JEM's default objective: each step runs --sgld-steps (20) forward and backward passes for the replay
    buffer's samples besides the one over the batch, so the data path weighs little here."""
    args = method_args(jem.Args, bench)
    views = jem.jem_augment(info, size)  # the step adds the inputs' Gaussian noise (--sigma)
    backbone = common.build_backbone(args.arch, info.channels, size, act="leaky")
    model = jem.JEM(jem.without_batchnorm(backbone) if args.norm == "none" else backbone, info.num_classes)
    model = common.prepare_model(model, args)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    buffer = jem.ReplayBuffer(args.buffer_size, (info.channels, size, size), args.reinit_freq, args.device)
    net = common.distribute(model, args)
    progress = QuietProgress(args)
    labels = torch.arange(bench.batch_size, device=args.device) % info.num_classes  # the floor's fixed labels

    def step(loader):
        jem.train_one_epoch(net, loader, optimizer, lambda _: args.lr, progress, args, buffer, None)

    def floor(x):  # the step without its loader: SGLD from the buffer, forward and backward, one fixed batch
        jem.train_one_epoch(net, Fixed([(x, labels[:len(x)])]), optimizer, lambda _: args.lr, progress, args,
                            buffer, None)

    return Entry(views, step, floor)


METHODS = {"simclr": simclr_entry, "supcon": supcon_entry, "moco": moco_entry, "byol": byol_entry,
           "simsiam": simsiam_entry, "instdisc": instdisc_entry, "paws": paws_entry, "jem": jem_entry}


class Batches:
    """A loader of k training batches (what train_one_epoch iterates) from epoch `epoch` on, whose first `skip`
    batches were fetched before it is handed out, untimed. With skip = the DataLoader's workers, every worker has
    delivered its first batch and is busy with its next: the pipeline is in its steady state, neither starting
    its processes nor holding batches prepared while something else was being measured (a fresh iterator for
    each measurement, so no worker runs in the background of another row)."""

    def __init__(self, train_data: common.TrainData, epoch: int, k: int, skip: int = 0):
        self.on_device, self.epoch = train_data.on_device, epoch
        self.batches = itertools.chain.from_iterable(train_data.loader(e) for e in itertools.count(epoch))
        for _ in range(skip):
            next(self.batches)
        self.k = k

    def __len__(self):
        return self.k

    def __iter__(self):
        return itertools.islice(self.batches, self.k)


def timed(fn, device: torch.device) -> float:
    """Seconds that fn() takes, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def training_set(bench, data_args: common.Args, views):
    """The training images with the method's views: synthetic (made here, --images of them) or a CIFAR-10 image
    folder (a class-balanced --images of its train/)."""
    if bench.data == "synthetic":
        return common.ImageTensorDataset(*conftest.synthetic(True, bench.images), transform=views)
    train = common.load_dataset(data_args, True, views)
    return common.Subset(train, common.balanced_subset(train.targets, bench.images)) if bench.images else train


def setup(bench, args: common.Args) -> torch.device:
    """One process on bench.device (set to the device's full name, cuda:0 for cuda), as a method's run starts;
    the benchmark's own number of threads kept (main sets it)."""
    threads = torch.get_num_threads()
    common.setup_distributed(args)  # sets args.device, the seeds, the allocator, and threads of its own choice
    torch.set_num_threads(threads)
    bench.device = args.device  # every method's args: the same device
    return torch.device(args.device)


def run(bench) -> dict:
    data_args = common.Args(dataset="imagefolder", data_dir=bench.data_dir, device=bench.device)
    device = setup(bench, data_args)
    info, size = (conftest.SYNTHETIC_INFO, 16) if bench.data == "synthetic" else common.dataset_info(data_args)
    n = bench.batch_size * bench.steps
    results = {"config": {**vars(bench), "device": str(device), "torch": torch.__version__,
                          "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "image_size": size}}
    images = len(training_set(bench, data_args, None))  # InstDisc's memory bank has a row per image
    bench.data_args = data_args  # for entries with a second training set (PAWS's supports)
    for method in bench.method:
        entry = METHODS[method](bench, info, size, images)
        train_set = training_set(bench, data_args, entry.views)
        if entry.indexed:
            train_set = common.WithIndex(train_set)
        paths = {}
        for path in ("device", "cpu"):
            args = dataclasses.replace(data_args, batch_size=bench.batch_size, workers=bench.workers, data_path=path,
                                       seed=0)
            paths[path] = common.TrainData(train_set, entry.views, args)
        skip = {"device": 0, "cpu": bench.workers}
        fixed = next(iter(paths["device"].loader(0)))[0]  # one batch of views for the floor
        epoch = itertools.count(1)

        def floor():
            for _ in range(bench.steps):
                entry.floor(fixed)

        def step(path):
            batches = Batches(paths[path], next(epoch), bench.steps, skip[path])
            return lambda: entry.step(batches)

        def augment(path):
            batches = Batches(paths[path], next(epoch), bench.steps, skip[path])
            return lambda: [common.to_device(views, data_args) for views, *_ in batches]

        measures = {"floor": lambda: floor,  # each makes the function to time (untimed set-up first)
                    "step_device_data": lambda: step("device"),
                    "step_cpu_data": lambda: step("cpu"),
                    "augment_device": lambda: augment("device"),
                    "augment_cpu": lambda: augment("cpu")}
        rounds = {name: [] for name in measures}
        for r in range(bench.repeats + 1):  # round 0 warms up (allocator, cudnn, worker start, compile)
            for name, make in measures.items():
                seconds = timed(make(), device)
                if r:
                    rounds[name].append(n / seconds)
        median = {name: statistics.median(v) for name, v in rounds.items()}
        results[method] = {name: {"images_per_s": median[name], "rounds": rounds[name]} for name in measures}

        def ratio(a, b):  # the median of the rounds' own ratios: a change of load between rounds cancels out
            return statistics.median(x / y for x, y in zip(rounds[a], rounds[b]))

        for name in ("step_device_data", "step_cpu_data"):
            results[method][name]["vs_floor"] = ratio(name, "floor")
        results[method]["augment_device"]["vs_cpu"] = ratio("augment_device", "augment_cpu")
    return results


LABELS = {"floor": ("floor: the network work alone", ""),
          "step_device_data": ("step, data on the device", "vs_floor"),
          "step_cpu_data": ("step, CPU DataLoader", "vs_floor"),
          "augment_device": ("augmentation on the device", "vs_cpu"),
          "augment_cpu": ("augmentation, CPU DataLoader", "")}
NOTES = {"vs_floor": "of the floor", "vs_cpu": "x the CPU's", "": ""}


ADVERSARIAL = {"plain": {}, "clae": {"adv_eps": 0.03}, "clae+advprop": {"adv_eps": 0.03, "adv_bn": True}}


def adversarial_costs(bench) -> dict:
    """ms per training step of simclr.py and instdisc.py with and without --adv-eps / --adv-bn, each method's own
    train_one_epoch over the same --steps fixed batches, the configurations interleaved round by round."""
    import adversarial  # the optional module of --adv-eps and --adv-bn

    device = setup(bench, common.Args(device=bench.device))
    info, size, n = common.DATASETS["cifar10"], 32, bench.batch_size  # CIFAR-sized random images
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(n, info.channels, size, size, generator=g).to(device) for _ in range(2 * bench.steps)]
    y, i = torch.zeros(n, dtype=torch.long, device=device), torch.arange(n, device=device)
    results = {}
    for method in ("simclr", "instdisc"):
        steps = {}
        for name, options in ADVERSARIAL.items():
            torch.manual_seed(0)
            if method == "simclr":
                args = method_args(simclr.Args, bench, **options)
                backbone = common.build_backbone(args.arch, info.channels, size)
                model = simclr.SimCLR(adversarial.dual_batchnorm(backbone) if args.adv_bn else backbone,
                                      args.proj_dim, args.proj_layers).to(device)
                opt = common.LARS(common.param_groups(model, args.weight_decay), lr=0.1, eta=args.lars_eta)
                batches = Fixed(((x[2 * k], x[2 * k + 1]), y) for k in range(bench.steps))
                steps[name] = functools.partial(simclr.train_one_epoch, model, batches, opt, lambda _: 0.1,
                                                QuietProgress(args), args)
            else:
                args = method_args(instdisc.Args, bench, **options)
                backbone = common.build_backbone(args.arch, info.channels, size)
                model = instdisc.InstDisc(adversarial.dual_batchnorm(backbone) if args.adv_bn else backbone,
                                          args.low_dim).to(device)
                opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
                bank = instdisc.MemoryBank(n, args.low_dim).to(device)
                bank.rng.manual_seed(1)  # the generator of its noise rows
                batches = Fixed((x[k], y, i) for k in range(bench.steps))
                steps[name] = functools.partial(instdisc.train_one_epoch, model, bank, batches, opt,
                                                lambda _: 0.03, QuietProgress(args), args)
        rounds = {name: [] for name in steps}
        for r in range(bench.repeats + 1):  # round 0 warms up
            for name, step in steps.items():
                seconds = timed(step, device)
                if r:
                    rounds[name].append(1000 * seconds / bench.steps)
        plain = statistics.median(rounds["plain"])
        results[method] = {name: {"ms_per_step": statistics.median(v), "vs_plain": statistics.median(v) / plain,
                                  "rounds": v} for name, v in rounds.items()}
    return results


def adversarial_table(results: dict, bench) -> str:
    lines = []
    for method in ("simclr", "instdisc"):
        config = results["config"]
        lines += [f"{method}: {bench.arch}, batch {bench.batch_size}, {config['device']} ({config['threads']} "
                  f"thread(s)), median of {bench.repeats} rounds of {bench.steps} steps",
                  f"{'':<34}{'ms/step':>10}{'ratio':>8}"]
        for name, row in results[method].items():
            lines.append(f"{name:<34}{row['ms_per_step']:>10,.1f}{row['vs_plain']:>8.2f}")
    return "\n".join(lines)


def table(results: dict) -> str:
    c = results["config"]
    lines = []
    for method in c["method"]:
        lines += [f"{method}: {c['arch']}, batch {c['batch_size']}, {c['image_size']} px {c['data']} "
                  f"({c['images'] or 'all'} images), {c['device']} ({c['threads']} thread"
                  f"{'s' if c['threads'] != 1 else ''}), DataLoader with {c['workers']} workers",
                  f"{'median of ' + str(c['repeats']) + ' rounds of ' + str(c['steps']) + ' steps':<34}"
                  f"{'images/s':>10}{'ratio':>8}"]
        for name, (label, ratio) in LABELS.items():
            row = results[method][name]
            value = f"{row[ratio]:.2f}" if ratio else ""
            lines.append(f"{label:<34}{row['images_per_s']:>10,.0f}{value:>8}  {NOTES[ratio]}".rstrip())
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--arch", default="tiny", choices=["tiny", "resnet18"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="", help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds (after one of warm-up)")
    parser.add_argument("--steps", type=int, default=4, help="training steps (batches) per measurement")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8), help="DataLoader processes")
    parser.add_argument("--data", default="synthetic", choices=["synthetic", "cifar10"])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data"
                                                  / "cifar10"), help="the CIFAR-10 image folder (train/, test/)")
    parser.add_argument("--images", type=int, default=4096, help="training images (0: all of the folder's)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the main process (0: 1 on the CPU, torch's default with CUDA). On a "
                             "CPU shared with other work, more than one makes every small op wait for a thread "
                             "that another process holds: the augmentation's 300 small ops then slow down 100-fold")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--json", default="bench.json", help="where the results go")
    parser.add_argument("--adversarial", action="store_true",
                        help="instead: ms per step of simclr.py and instdisc.py with and without CLAE and AdvProp")
    bench = parser.parse_args(argv)
    if bench.data == "synthetic" and not bench.images:
        parser.error("--images must be positive for synthetic data")
    on_cpu = (bench.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    if bench.threads or on_cpu:
        torch.set_num_threads(bench.threads or 1)
    if bench.adversarial:
        results = {"config": {**vars(bench), "device": bench.device or ("cuda" if torch.cuda.is_available()
                                                                         else "cpu"),
                              "threads": torch.get_num_threads(), "torch": torch.__version__},
                   **adversarial_costs(bench)}
        print(adversarial_table(results, bench))
    else:
        results = run(bench)
        print(table(results))
    Path(bench.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {bench.json}")


if __name__ == "__main__":
    main()
