"""The training set held on the device, each batch's views made there: the fast GPU data path (--data-path device,
or auto on CUDA). Optional: common.TrainData imports this file only when a run takes that path (handing it the
dataset, the batches and the seed); without it every method runs on the CPU DataLoader.

A small training set (CIFAR, STL-10, SVHN, MNIST-like, digits, an image folder of 64 px or less) is decoded once into
a uint8 tensor on the device. Every sample draws its own view parameters, as torchvision's transforms do per image,
but a batch is one set of tensor ops of fixed shapes, so nothing waits for the host. The ops follow torchvision's
tensor versions (tests/test_augment.py compares them).

Unlike the CPU path (torchvision on PIL images): the views stay in float where PIL rounds to 8 bits after every
step, crops are resized without antialiasing, and another generator draws other (equally distributed) views.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF2

# ColorJitter's four factors, in its order, each with the range that leaves the image as it is
JITTER = {"brightness": (1.0, 1.0), "contrast": (1.0, 1.0), "saturation": (1.0, 1.0), "hue": (0.0, 0.0)}
# the steps with a batched version: their place in a view (the flip aside) and the spec's field of their probability
STEPS = {T.Pad: (1, None), T.RandomResizedCrop: (2, None), T.RandomCrop: (2, None), T.ColorJitter: (3, "jitter"),
         T.RandomGrayscale: (4, "grayscale"), T.GaussianBlur: (5, "blur"), T.RandomSolarize: (6, "solarize"),
         T.RandomEqualize: (7, "equalize"), T.ToTensor: (8, None), T.Normalize: (9, None)}


@dataclass(frozen=True)
class ViewSpec:
    """One random view: torchvision's pipeline of these steps, in this order, each left out at its default:
    RandomResizedCrop(size, scale, ratio) (or, with crop "padded", Pad(pad, reflect) -> RandomCrop(size)) ->
    RandomHorizontalFlip(flip) -> RandomApply([ColorJitter(brightness, contrast, saturation, hue)], jitter) ->
    RandomGrayscale(grayscale) -> RandomApply([GaussianBlur(blur_kernel, blur_sigma)], blur) ->
    RandomSolarize(threshold in solarize_range, solarize) -> RandomEqualize(equalize) -> Normalize(mean, std).
    Per sample: factors and thresholds drawn uniformly in (low, high), each step's coin, the jitter steps' order."""

    size: int  # side of the output view in pixels
    crop: str = "resized"  # resized: RandomResizedCrop; padded: a size x size crop of the reflect-padded image
    pad: int = 0  # with crop "padded": reflect padding on every side before the crop (RandomCrop's padding)
    scale: tuple = (0.08, 1.0)  # crop area as a fraction of the image
    ratio: tuple = (3 / 4, 4 / 3)  # crop aspect ratio (width / height), drawn log-uniformly
    flip: float = 0.0  # probability of a horizontal flip
    brightness: tuple = (1.0, 1.0)  # colour jitter factor ranges; (1, 1) and hue (0, 0): the image as it is
    contrast: tuple = (1.0, 1.0)
    saturation: tuple = (1.0, 1.0)
    hue: tuple = (0.0, 0.0)
    jitter: float = 0.0  # probability of the colour jitter
    grayscale: float = 0.0  # probability of grayscale (kept at the image's number of channels)
    blur: float = 0.0  # probability of the Gaussian blur
    blur_kernel: int = 3  # its (odd) kernel side
    blur_sigma: tuple = (0.1, 2.0)  # its sigma range
    solarize: float = 0.0  # probability of solarisation: x -> 1 - x where x >= a threshold
    solarize_range: tuple = (0.5, 0.5)  # its range in [0, 1] pixel units, drawn per sample (PAWS's), or (t, t)
    equalize: float = 0.0  # probability of histogram equalisation of each channel (PIL's, on 8-bit values)
    mean: tuple = ()  # standardisation (empty: the view stays in [0, 1])
    std: tuple = ()

    @classmethod
    def from_torchvision(cls, transform) -> ViewSpec:
        """The spec of a torchvision pipeline of the steps above (nested Compose, RandomApply around one step,
        ToTensor and Normalize last; the flip anywhere, as mirroring commutes with every other step's distribution),
        ValueError for the others. A RandomSolarize with `threshold_range` draws one in it per image (paws.py's)."""
        fields, last = {}, 0
        steps = [transform]
        while any(isinstance(s, T.Compose) for s in steps):  # nested Compose, flattened
            steps = [t for s in steps for t in (s.transforms if isinstance(s, T.Compose) else [s])]
        for step in steps:
            p = 1.0
            if isinstance(step, T.RandomApply) and len(step.transforms) == 1:
                p, step = step.p, step.transforms[0]
            kind = next((k for k in STEPS if isinstance(step, k)), type(step))
            if kind is T.RandomHorizontalFlip and p == 1.0:
                fields["flip"] = step.p
                continue
            place, chance = STEPS.get(kind, (0, None))
            if place <= last or (p != 1.0 and kind not in (T.ColorJitter, T.GaussianBlur)):
                raise ValueError(f"no batched version of {step!r} at this place in the views")
            last = place
            if chance:
                fields[chance] = getattr(step, "p", p)  # the step's own, else its RandomApply's
            if kind is T.Pad or (kind is T.RandomCrop and step.padding):
                pads = {step.padding} if isinstance(step.padding, int) else set(step.padding)
                if len(pads) > 1 or step.padding_mode != "reflect" or getattr(step, "pad_if_needed", False):
                    raise ValueError(f"the batched padded crop pads every side alike by reflection, not {step!r}")
                fields["pad"] = pads.pop()
            if kind in (T.RandomCrop, T.RandomResizedCrop):
                bilinear = getattr(step, "interpolation", T.InterpolationMode.BILINEAR) == T.InterpolationMode.BILINEAR
                if step.size[0] != step.size[1] or not bilinear:
                    raise ValueError(f"the batched crop makes square views, resized bilinearly, not {step!r}")
                fields.update(size=step.size[0], **({"crop": "padded"} if kind is T.RandomCrop else
                                                    {"scale": tuple(step.scale), "ratio": tuple(step.ratio)}))
            elif kind is T.ColorJitter:  # a factor it leaves out (None) keeps its identity range
                fields.update({k: tuple(getattr(step, k) or identity) for k, identity in JITTER.items()})
            elif kind is T.GaussianBlur:
                if step.kernel_size[0] != step.kernel_size[1]:
                    raise ValueError("the batched blur has a square kernel")
                fields.update(blur_kernel=step.kernel_size[0], blur_sigma=tuple(step.sigma))
            elif kind is T.RandomSolarize:  # before ToTensor: on PIL images, whose threshold is in 8-bit units
                thresholds = getattr(step, "threshold_range", (step.threshold, step.threshold))
                fields["solarize_range"] = tuple(v / 255 for v in thresholds)
            elif kind is T.Normalize:
                fields.update(mean=tuple(step.mean), std=tuple(step.std))
        if "size" not in fields or (fields.get("pad") and fields.get("crop") != "padded"):
            raise ValueError("views without a RandomResizedCrop or a RandomCrop have no batched version here")
        return cls(**fields)


def view_specs(views) -> list[ViewSpec]:
    """The specs of a list (or tuple) of transforms, a MultiView's, or of one transform."""
    return [ViewSpec.from_torchvision(t) for t in (views if isinstance(views, (list, tuple)) else [views])]


@dataclass
class ViewParams:
    """The random parameters of a batch of B views, one per sample, drawn by draw_params."""

    spec: ViewSpec
    top: torch.Tensor  # [B] crop box in input pixels (integers, as torchvision's)
    left: torch.Tensor  # [B]
    height: torch.Tensor  # [B]
    width: torch.Tensor  # [B]
    flip: torch.Tensor  # [B] bool
    jitter: torch.Tensor  # [B, 4] brightness, contrast, saturation, hue factors (1, 1, 1, 0: not jittered)
    order: torch.Tensor  # [B, 4] the order of the four jitter steps for each sample (a permutation of 0..3)
    grayscale: torch.Tensor  # [B] bool
    sigma: torch.Tensor  # [B] of the Gaussian blur (0: not blurred)
    solarize: torch.Tensor  # [B] bool
    threshold: torch.Tensor  # [B] solarisation threshold in [0, 1] pixel units
    equalize: torch.Tensor  # [B] bool


def draw_params(spec: ViewSpec, batch: int, height: int, width: int, generator: torch.Generator) -> ViewParams:
    """Per-sample parameters for `batch` views of images height x width, from `generator` (on the device). The crop
    is RandomResizedCrop.get_params vectorised: its up to ten tries as ten candidates per sample, the first that fits
    placed uniformly, else its fallback. A "padded" crop is RandomCrop.get_params on the image padded by spec.pad
    (ValueError when it cannot fit)."""
    device = generator.device

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(shape, generator=generator, device=device)

    def coin(p):
        return torch.rand(batch, generator=generator, device=device) < p

    if spec.crop == "padded":
        room_h, room_w = height + 2 * spec.pad - spec.size, width + 2 * spec.pad - spec.size
        if min(room_h, room_w) < 0 or spec.pad >= min(height, width):
            raise ValueError(f"a {spec.size} px crop of {height}x{width} images padded by {spec.pad} px")
        top = (uniform(0, 1, batch) * (room_h + 1)).floor().long()
        left = (uniform(0, 1, batch) * (room_w + 1)).floor().long()
        h = w = torch.full((batch,), spec.size, device=device)
    else:
        target = height * width * uniform(*spec.scale, batch, 10)  # [B, 10]
        aspect = torch.exp(uniform(math.log(spec.ratio[0]), math.log(spec.ratio[1]), batch, 10))
        w, h = torch.sqrt(target * aspect).round().long(), torch.sqrt(target / aspect).round().long()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # [B, 10]
        first = fits.int().argmax(1, keepdim=True)  # the first candidate that fits (0 when none does)
        w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]  # [B]
        found = fits.any(1)  # else torchvision's fallback: the whole image, clamped to the ratios
        fw = round(height * max(spec.ratio)) if width / height > max(spec.ratio) else width
        fh = round(width / min(spec.ratio)) if width / height < min(spec.ratio) else height
        w, h = torch.where(found, w, fw), torch.where(found, h, fh)
        top = torch.where(found, (uniform(0, 1, batch) * (height - h + 1)).floor().long(), (height - h) // 2)
        left = torch.where(found, (uniform(0, 1, batch) * (width - w + 1)).floor().long(), (width - w) // 2)
    flip, jittered = coin(spec.flip), coin(spec.jitter)
    jitter = torch.stack([torch.where(jittered, uniform(*getattr(spec, k), batch), identity[0])
                          for k, identity in JITTER.items()], 1)  # [B, 4]
    order = torch.rand(batch, 4, generator=generator, device=device).argsort(1)  # a permutation each
    grayscale = coin(spec.grayscale)
    sigma = torch.where(coin(spec.blur), uniform(*spec.blur_sigma, batch), 0.0)
    solarize = coin(spec.solarize)
    threshold = uniform(*spec.solarize_range, batch)
    equalize = coin(spec.equalize) if spec.equalize > 0 else torch.zeros(batch, dtype=torch.bool, device=device)
    return ViewParams(spec, top, left, h, w, flip, jitter, order, grayscale, sigma, solarize, threshold, equalize)


@torch.no_grad()
def apply_params(images: torch.Tensor, p: ViewParams, standardize: bool = True) -> torch.Tensor:
    """The views of `images` ([B, C, H, W], uint8 or float in [0, 1]) for the parameters `p`: [B, C, size, size]
    float, standardised with the spec's mean and std (or left in [0, 1] with standardize=False)."""
    spec = p.spec
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()  # [B, C, H, W] in [0, 1]
    if spec.pad:
        x = F.pad(x, (spec.pad,) * 4, mode="reflect")  # [B, C, H + 2 pad, W + 2 pad]
    x = resized_crop(x, p.top, p.left, p.height, p.width, spec.size, p.flip)  # [B, C, size, size]
    if spec.jitter > 0:
        x = color_jitter(x, p.jitter, p.order)
    if spec.grayscale > 0:
        x = torch.where(p.grayscale[:, None, None, None], rgb_to_grayscale(x).expand_as(x), x)
    if spec.blur > 0:
        x = gaussian_blur(x, spec.blur_kernel, p.sigma).clamp(0, 1)  # its sums can round a hair outside
    if spec.solarize > 0:
        x = solarize(x, p.threshold, p.solarize)
    if spec.equalize > 0:
        x = equalize(x, p.equalize)
    if standardize and spec.mean:  # channel by channel with numbers: no tensor of them copied to the device
        x = torch.stack([(x[:, c] - m) / s for c, (m, s) in enumerate(zip(spec.mean, spec.std))], 1)
    return x


def resized_crop(x: torch.Tensor, top, left, height, width, size: int, flip=None) -> torch.Tensor:
    """Each sample's box (top, left, height, width: [B] integers) of x [B, C, H, W] resized to size x size, bilinear
    without antialiasing, mirrored where flip [B] is set: torchvision's resized_crop(antialias=False) then hflip.
    Two gathers per axis, not grid_sample, so that samples near the box's edges are clamped to it as there."""
    i = torch.arange(size, device=top.device, dtype=torch.float32)
    for dim, start, length in ((2, top, height), (3, left, width)):  # rows: [B, C, size, W], then columns
        pos = ((i + 0.5) * (length[:, None] / size) - 0.5).clamp(min=0)  # [B, size], in box pixels
        low = pos.floor()
        weight, last = pos - low, length[:, None] - 1
        low = torch.minimum(low.long(), last)
        low, high = start[:, None] + low, start[:, None] + torch.minimum(low + 1, last)  # [B, size] input pixels
        if dim == 3 and flip is not None:  # a mirrored view reads its columns right to left
            low, high, weight = (torch.where(flip[:, None], t.flip(1), t) for t in (low, high, weight))
        shape, out = [x.shape[0], 1, 1, 1], list(x.shape)
        shape[dim] = out[dim] = size  # [B, 1, size, 1] or [B, 1, 1, size]
        a, b = (x.gather(dim, t.view(shape).expand(out)) for t in (low, high))
        x = torch.lerp(a, b, weight.view(shape))
    return x


rgb_to_grayscale = TF2.rgb_to_grayscale  # luma [B, 1, H, W] of RGB [B, 3, H, W] (a copy of one channel): batched


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] in [0, 1] scaled by factor [B] (blended with black)."""
    return (x * factor.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x blended with its own mean luma by factor [B] (factor 1: exactly x)."""
    return torch.lerp(rgb_to_grayscale(x).mean((1, 2, 3), keepdim=True), x, factor.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x blended with its grayscale by factor [B]; a one-channel image has no saturation to change."""
    return x if x.shape[1] == 1 else torch.lerp(rgb_to_grayscale(x), x, factor.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Hue rotated by factor [B] (in turns, [-0.5, 0.5]) in HSV space; a one-channel image has no hue."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)  # [B, H, W] each
    v, low = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)  # v: the HSV value
    delta = v - low  # the chroma, v s
    d = torch.where(delta > 0, delta, 1.0)  # grey pixels: any hue, 0 here, and delta = 0 makes it irrelevant
    h6 = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * d, r - g + 4 * d)) / d  # sextants, in [-1, 5]
    h6 = (h6 + 6 * factor.view(-1, 1, 1)) % 6  # [B, H, W], the rotated hue in sixths of a turn
    # back to RGB: channel n = 5, 3, 1 (R, G, B) is v - delta clamp(min(k, 4 - k), 0, 1), with k = (n + h6) mod 6
    n = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)  # 5, 3, 1 (made on the device, not copied)
    k = (n + h6[:, None]) % 6  # [B, 3, H, W]
    out = v[:, None] - delta[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)
    return torch.where((factor == 0).view(-1, 1, 1, 1), x, out)  # exactly x when not rotated


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """ColorJitter with per-sample factors [B, 4] (brightness, contrast, saturation, hue) in each sample's own order
    [B, 4], as torchvision draws a permutation per image. At each of the four places every step runs on the whole
    batch, with its identity factor (exactly x) for the samples whose step there is another: fixed shapes."""
    steps, identity = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue), (1.0, 1.0, 1.0, 0.0)
    for place in range(4):
        for j, step in enumerate(steps):
            x = step(x, torch.where(order[:, place] == j, factors[:, j], identity[j]))
    return x


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] blurred with a Gaussian of side kernel_size (odd) and per-sample sigma [B] (0: unchanged),
    reflect padding, as torchvision's gaussian_blur; separable: one grouped convolution per axis."""
    batch, channels, height, width = x.shape
    t = torch.arange(kernel_size, device=x.device, dtype=torch.float32) - (kernel_size - 1) / 2  # [k]
    kernel = torch.exp(-0.5 * (t / sigma.clamp(min=1e-6)[:, None]) ** 2)  # [B, k]; sigma 0: a unit impulse
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # [B*C, k]
    y = F.pad(x.reshape(1, batch * channels, height, width), (kernel_size // 2,) * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(-1, 1, kernel_size, 1), groups=batch * channels)  # along rows
    y = F.conv2d(y, kernel.view(-1, 1, 1, kernel_size), groups=batch * channels)  # along columns
    return y.view(batch, channels, height, width)


def solarize(x: torch.Tensor, threshold, mask: torch.Tensor) -> torch.Tensor:
    """x -> 1 - x where x >= threshold (a number, or one per sample [B]), for the samples where mask [B] is set."""
    threshold = threshold.view(-1, 1, 1, 1) if isinstance(threshold, torch.Tensor) else threshold
    return torch.where(mask.view(-1, 1, 1, 1) & (x >= threshold), 1 - x, x)


def equalize(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each channel of the samples where mask [B] is set, on x [B, C, H, W] in [0, 1]
    rounded to 8 bits: torchvision's batched equalize, which follows PIL's ImageOps.equalize."""
    equalized = TF2.equalize((x * 255).round().to(torch.uint8)).float() / 255  # each image and channel on its own
    return torch.where(mask.view(-1, 1, 1, 1), equalized, x)


class DeviceData:
    """`dataset` (through Subset and WithIndex) held whole on the device in its order: images uint8 [N, C, H, W]
    decoded by its own __getitem__ (the same pixels) in the batches of `decode` (a loader; default a DataLoader),
    labels [N], the specs of `views` (a list of transforms, then a list of views a batch, or one). ValueError where
    it cannot be held: views without a batched version, images of differing sizes, larger than 64 px in an image
    folder, or, with `fit`, more than a quarter of the device's free memory."""

    def __init__(self, dataset, device, views=(), decode=None, fit: bool = False):
        self.specs, self.multi = view_specs(views), isinstance(views, (list, tuple))
        top = base = copy.copy(dataset)  # shallow copies down to the dataset that decodes, to decode without views
        while hasattr(base, "dataset"):
            base.dataset = copy.copy(base.dataset)
            base = base.dataset
        base.transform = T.PILToTensor()
        decode = decode or functools.partial(torch.utils.data.DataLoader, batch_size=256)
        try:
            first = next(iter(decode(torch.utils.data.Subset(top, [0]))))[0]  # the first image alone, for its size
            height, width = first.shape[2:]
            if isinstance(base, torchvision.datasets.ImageFolder) and max(width, height) > 64:
                raise ValueError(f"images of {width}x{height} px: the device copy is for small images (64 px or "
                                 f"less); an ImageNet-scale folder stays on the CPU DataLoader")
            if fit and len(dataset) * first.numel() > torch.cuda.mem_get_info(device)[0] / 4:
                raise ValueError(f"{len(dataset) * first.numel() / 2**30:.1f} GiB of images do not fit in the memory "
                                 f"set aside for them")
            columns = list(zip(*decode(top)))  # images [b, C, H, W], labels [b] (and positions [b]) of each batch
            self.images, self.targets = (torch.cat(column).to(device) for column in columns[:2])
        except RuntimeError as err:  # a batch of images of different sizes
            raise ValueError(f"the images differ in size ({str(err).splitlines()[0]})") from None
        self.with_index = len(columns) == 3
        for spec in self.specs:  # a padded crop that cannot fit these images fails here, not in the first step
            draw_params(spec, 1, height, width, torch.Generator(device))

    def __len__(self):
        return len(self.images)

    def __str__(self):
        return f"{len(self)} images of {tuple(self.images.shape[1:])} ({self.images.numel() / 2**20:.1f} MiB)"

    def loader(self, batches, seed: int, epoch: int) -> DeviceLoader:
        return DeviceLoader(self, batches, seed, epoch)


class DeviceLoader:
    """One epoch of a DeviceData in `batches` (lists of indices), shaped as the DataLoader's batches, its views drawn
    from a generator on the device seeded with `seed` (so that --resume draws them again)."""

    def __init__(self, data: DeviceData, batches, seed: int, epoch: int):
        self.data, self.epoch = data, epoch
        self.generator = torch.Generator(data.images.device).manual_seed(seed)
        self.batches = torch.as_tensor(list(batches), dtype=torch.long).to(data.images.device)  # [steps, b], once

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for idx in self.batches:
            images = self.data.images[idx]  # [b, C, H, W] uint8
            views = [apply_params(images, draw_params(s, len(idx), *images.shape[2:], self.generator))
                     for s in self.data.specs]
            x = views if self.data.multi else views[0]
            yield (x, self.data.targets[idx], idx) if self.data.with_index else (x, self.data.targets[idx])
