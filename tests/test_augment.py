"""The device data path (device_data.py): batched per-sample augmentation against torchvision's functional ops
sample by sample, its random parameters, the epoch's batches, simclr.py trained through it, and every method that
takes its batches through common.TrainData run on it (those runs from the command line: `pytest -m scripts`)."""

import dataclasses
import json

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageOps

import byol
import common
import device_data
import dpll
import instdisc
import jem
import paws
import simclr
from conftest import SYNTHETIC, SYNTHETIC_FLAGS, SYNTHETIC_INFO, run_script

seeds = st.integers(0, 2**31 - 1)
channels = st.sampled_from([1, 3])


def images(seed, batch, c, h, w):
    """Random images in [0, 1], with flat regions and saturated pixels (grey, black, white) mixed in, where
    colour conversions have their edge cases."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, c, h, w, generator=g)
    x[:, :, : h // 3] = x[:, :1, : h // 3]  # grey rows: every channel equal
    x[:, :, -1:] = (x[:, :, -1:] > 0.5).float()  # black or white
    return x


def params_for(spec, batch, h, w, seed):
    return device_data.draw_params(spec, batch, h, w, torch.Generator().manual_seed(seed))


SIMCLR_LIKE = dict(scale=(0.08, 1.0), flip=0.5, brightness=(0.2, 1.8), contrast=(0.2, 1.8), saturation=(0.2, 1.8),
                   hue=(-0.2, 0.2), jitter=0.8, grayscale=0.2)

# ---------------------------------------------------------------------------------------------------- each op


@given(seed=seeds, batch=st.integers(1, 5), c=channels, h=st.integers(3, 20), w=st.integers(3, 20),
       size=st.integers(2, 16), scale_low=st.floats(0.01, 1.0))
def test_resized_crop_and_flip_match_torchvision(seed, batch, c, h, w, size, scale_low):
    x = images(seed, batch, c, h, w)
    p = params_for(device_data.ViewSpec(size, scale=(scale_low, 1.0), flip=0.5), batch, h, w, seed)
    out = device_data.resized_crop(x, p.top, p.left, p.height, p.width, size, p.flip)  # [B, C, size, size]
    assert out.shape == (batch, c, size, size)
    for b in range(batch):
        box = [int(v[b]) for v in (p.top, p.left, p.height, p.width)]
        assert 0 <= box[0] and box[0] + box[2] <= h and 0 <= box[1] and box[1] + box[3] <= w
        ref = TF.resized_crop(x[b], *box, [size, size], antialias=False)
        ref = TF.horizontal_flip(ref) if p.flip[b] else ref
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=0)


STEPS = {"brightness": (device_data.adjust_brightness, TF.adjust_brightness, (0.0, 3.0)),
         "contrast": (device_data.adjust_contrast, TF.adjust_contrast, (0.0, 3.0)),
         "saturation": (device_data.adjust_saturation, TF.adjust_saturation, (0.0, 3.0)),
         "hue": (device_data.adjust_hue, TF.adjust_hue, (-0.5, 0.5))}


@pytest.mark.parametrize("name", STEPS)
@given(seed=seeds, batch=st.integers(1, 6), c=channels, side=st.integers(1, 9))
def test_each_jitter_step_matches_torchvision_per_sample_factor(name, seed, batch, c, side):
    ours, theirs, (low, high) = STEPS[name]
    x = images(seed, batch, c, side, side)
    factor = low + (high - low) * torch.rand(batch, generator=torch.Generator().manual_seed(seed + 1))
    factor[0] = 0.0 if name == "hue" else 1.0  # the identity factor, which the jitter gives unjittered samples
    out = ours(x, factor)
    for b in range(batch):
        torch.testing.assert_close(out[b], theirs(x[b], float(factor[b])), atol=2e-5, rtol=0)
    assert torch.equal(out[0], x[0]), "the identity factor leaves the image exactly as it is"


@given(seed=seeds, batch=st.integers(1, 6), c=channels, side=st.integers(1, 9))
def test_grayscale_and_solarize_match_torchvision(seed, batch, c, side):
    x = images(seed, batch, c, side, side)
    gray = device_data.rgb_to_grayscale(x)
    mask = torch.rand(batch, generator=torch.Generator().manual_seed(seed)) < 0.5
    threshold = float(torch.rand((), generator=torch.Generator().manual_seed(seed + 1)))
    sol = device_data.solarize(x, threshold, mask)
    for b in range(batch):
        torch.testing.assert_close(gray[b], TF.rgb_to_grayscale(x[b]), atol=1e-6, rtol=0)
        torch.testing.assert_close(sol[b], TF.solarize(x[b], threshold) if mask[b] else x[b], atol=1e-6, rtol=0)


@given(seed=seeds, batch=st.integers(1, 5), c=channels, side=st.integers(6, 14), k=st.sampled_from([1, 3, 5]))
def test_gaussian_blur_with_per_sample_sigma_matches_torchvision(seed, batch, c, side, k):
    x = images(seed, batch, c, side, side)
    sigma = 0.1 + 2.9 * torch.rand(batch, generator=torch.Generator().manual_seed(seed))
    sigma[0] = 0.0  # not blurred
    out = device_data.gaussian_blur(x, k, sigma)
    torch.testing.assert_close(out[0], x[0], atol=1e-6, rtol=0)
    for b in range(1, batch):
        ref = TF.gaussian_blur(x[b], [k, k], [float(sigma[b])] * 2)
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=0)


@given(seed=seeds, batch=st.integers(1, 5), c=channels, side=st.integers(4, 14), data=st.data())
def test_padded_crop_and_flip_match_torchvision_pad_and_crop(seed, batch, c, side, data):
    pad = data.draw(st.integers(0, side - 1))  # reflection needs a padding smaller than the side
    size = data.draw(st.integers(1, side + 2 * pad))
    spec = device_data.ViewSpec(size, crop="padded", pad=pad, flip=0.5)
    x = images(seed, batch, c, side, side)
    p = params_for(spec, batch, side, side, seed)
    out = device_data.apply_params(x, p)
    assert out.shape == (batch, c, size, size)
    for b in range(batch):
        padded = TF.pad(x[b], [pad], padding_mode="reflect") if pad else x[b]
        ref = TF.crop(padded, int(p.top[b]), int(p.left[b]), size, size)
        ref = TF.horizontal_flip(ref) if p.flip[b] else ref
        torch.testing.assert_close(out[b], ref, atol=1e-6, rtol=0)


def test_padded_crop_offsets_are_distributed_as_torchvision_random_crop_draws_them():
    n, side, pad = 3000, 12, 4
    p = params_for(device_data.ViewSpec(side, crop="padded", pad=pad), n, side, side, seed=3)
    torch.manual_seed(4)
    padded = torch.zeros(1, side + 2 * pad, side + 2 * pad)
    theirs = torch.tensor([T.RandomCrop.get_params(padded, (side, side))[:2] for _ in range(n)])
    for k, ours in enumerate((p.top, p.left)):
        assert ours.min() == 0 and ours.max() == 2 * pad
        assert ks_statistic(ours, theirs[:, k]) < 0.05, k
    with pytest.raises(ValueError, match="padded by"):  # a crop larger than the padded image cannot be drawn
        params_for(device_data.ViewSpec(side + 2 * pad + 1, crop="padded", pad=pad), 2, side, side, seed=0)


@given(seed=seeds, batch=st.integers(1, 6), c=channels, side=st.integers(1, 9))
def test_solarize_with_a_threshold_for_each_sample_matches_torchvision(seed, batch, c, side):
    x = images(seed, batch, c, side, side)
    spec = device_data.ViewSpec(side, crop="padded", solarize=0.7, solarize_range=(0.0, 256 / 255))
    p = params_for(spec, batch, side, side, seed)
    out = device_data.solarize(x, p.threshold, p.solarize)
    for b in range(batch):
        t = float(p.threshold[b])  # above 1 (PIL's 255 < t < 256) nothing is solarised: torchvision refuses it
        ref = TF.solarize(x[b], t) if p.solarize[b] and t <= 1 else x[b]
        torch.testing.assert_close(out[b], ref, atol=0, rtol=0)


def test_solarize_thresholds_are_drawn_for_each_sample_in_their_range():
    n = 4000
    p = params_for(device_data.ViewSpec(4, solarize=0.2, solarize_range=(0.0, 256 / 255)), n, 4, 4, seed=0)
    t = p.threshold
    assert t.min() >= 0 and t.max() < 256 / 255 and len(t.unique()) == n
    assert abs(t.mean().item() - 128 / 255) < 0.02  # uniform: the mean of the range


@given(seed=seeds, batch=st.integers(1, 5), c=channels, side=st.integers(2, 12))
def test_equalize_matches_pil_image_by_image(seed, batch, c, side):
    x = (images(seed, batch, c, side, side) * 255).round().to(torch.uint8)
    x[0] = x[0] // 4 + 60  # a low-contrast image, which equalisation stretches
    mask = torch.rand(batch, generator=torch.Generator().manual_seed(seed)) < 0.5
    mask[0] = True
    out = device_data.equalize(x.float() / 255, mask)
    for b in range(batch):
        if mask[b]:
            pil = Image.fromarray(x[b].permute(1, 2, 0).squeeze(2).numpy())
            ref = T.functional.pil_to_tensor(ImageOps.equalize(pil)).float() / 255
        else:
            ref = x[b].float() / 255
        torch.testing.assert_close(out[b], ref, atol=1e-6, rtol=0)


def reference_view(x, p, b):
    """Sample b's view through torchvision's functional ops, with the parameters that draw_params chose."""
    spec = p.spec
    y = TF.resized_crop(x, int(p.top[b]), int(p.left[b]), int(p.height[b]), int(p.width[b]), [spec.size] * 2,
                        antialias=False)
    if p.flip[b]:
        y = TF.horizontal_flip(y)
    steps = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    if not torch.equal(p.jitter[b], torch.tensor([1.0, 1.0, 1.0, 0.0])):
        for j in p.order[b].tolist():
            y = steps[j](y, float(p.jitter[b, j]))
    if p.grayscale[b]:
        y = TF.rgb_to_grayscale(y, num_output_channels=y.shape[0])
    if p.sigma[b] > 0:
        y = TF.gaussian_blur(y, [spec.blur_kernel] * 2, [float(p.sigma[b])] * 2)
    if p.solarize[b] and p.threshold[b] <= 1:  # a threshold above 1 solarises nothing (torchvision refuses it)
        y = TF.solarize(y, float(p.threshold[b]))
    return TF.normalize(y, list(spec.mean), list(spec.std))


@given(seed=seeds, batch=st.integers(1, 6), c=channels, side=st.integers(8, 20), size=st.integers(6, 16))
def test_whole_view_matches_torchvision_sample_by_sample(seed, batch, c, side, size):
    spec = device_data.ViewSpec(size, **SIMCLR_LIKE, blur=0.5, blur_kernel=5, solarize=0.5, mean=(0.4,) * c,
                                std=(0.25,) * c)
    x = (images(seed, batch, c, side, side) * 255).round().to(torch.uint8)  # decoded images are 8-bit
    p = params_for(spec, batch, side, side, seed)
    out = device_data.apply_params(x, p)
    for b in range(batch):
        torch.testing.assert_close(out[b], reference_view(x[b].float() / 255, p, b), atol=2e-4, rtol=0)


@given(seed=seeds, batch=st.integers(1, 6), c=channels, side=st.integers(8, 20), size=st.integers(6, 16))
def test_paws_like_view_with_random_thresholds_then_equalize_matches_torchvision(seed, batch, c, side, size):
    spec = device_data.ViewSpec(size, **{**SIMCLR_LIKE, "scale": (0.3, 0.75), "grayscale": 0.0}, solarize=0.5,
                                solarize_range=(0.0, 256 / 255), mean=(0.4,) * c, std=(0.25,) * c)
    x = (images(seed, batch, c, side, side) * 255).round().to(torch.uint8)
    p = params_for(spec, batch, side, side, seed)
    out = device_data.apply_params(x, p)
    for b in range(batch):
        torch.testing.assert_close(out[b], reference_view(x[b].float() / 255, p, b), atol=2e-4, rtol=0)
    # equalisation comes last, on the 8-bit rounding of the view: the same view with equalize on (and the same
    # draws otherwise) is device_data.equalize of the view without it, tested against PIL above. (Compared with
    # torchvision's whole pipeline, a value within 1e-5 of a rounding boundary may land in the next 8-bit level,
    # which moves the equaliser's look-up table: no tolerance fits that.)
    coins = torch.rand(batch, generator=torch.Generator().manual_seed(seed)) < 0.5
    equalized = device_data.ViewParams(**{**vars(p), "spec": dataclasses.replace(spec, equalize=1.0),
                                          "equalize": coins})
    plain = device_data.apply_params(x, p, standardize=False)
    expected = (device_data.equalize(plain, equalized.equalize) - 0.4) / 0.25
    torch.testing.assert_close(device_data.apply_params(x, equalized), expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------- parameters


def test_each_sample_draws_its_own_parameters():
    n = 2000
    spec = device_data.ViewSpec(16, **SIMCLR_LIKE, blur=0.5, solarize=0.3)
    p = params_for(spec, n, 16, 16, seed=0)
    boxes = torch.stack([p.top, p.left, p.height, p.width], 1)
    assert len(boxes.unique(dim=0)) > n // 4
    jittered = (p.jitter != torch.tensor([1.0, 1.0, 1.0, 0.0])).any(1)
    assert len(p.jitter[jittered].unique(dim=0)) == int(jittered.sum())  # continuous factors: all distinct
    assert len(p.order.unique(dim=0)) == 24  # every order of the four jitter steps occurs
    assert len(p.sigma[p.sigma > 0].unique()) == int((p.sigma > 0).sum())
    # each coin comes up at its own rate, and the coins are not the same coin
    for coin, rate in [(p.flip, 0.5), (jittered, 0.8), (p.grayscale, 0.2), (p.sigma > 0, 0.5), (p.solarize, 0.3)]:
        assert abs(coin.float().mean().item() - rate) < 5 * (rate * (1 - rate) / n) ** 0.5
    assert 0.35 < (p.flip == (p.sigma > 0)).float().mean().item() < 0.65


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov distance between samples a and b of a discrete variable."""
    values = torch.cat([a, b]).unique()
    cdf_a = (a[:, None] <= values).float().mean(0)
    cdf_b = (b[:, None] <= values).float().mean(0)
    return (cdf_a - cdf_b).abs().max().item()


@pytest.mark.parametrize("h, w, scale, ratio", [(16, 16, (0.08, 1.0), (3 / 4, 4 / 3)),
                                                (8, 20, (0.5, 1.0), (3 / 4, 4 / 3)),  # often no fit: fallback
                                                (20, 9, (0.3, 0.9), (0.5, 2.0))])
def test_crop_boxes_are_distributed_as_torchvision_draws_them(h, w, scale, ratio):
    n = 3000
    p = params_for(device_data.ViewSpec(8, scale=scale, ratio=ratio), n, h, w, seed=1)
    torch.manual_seed(2)
    image = torch.zeros(1, h, w)
    theirs = torch.tensor([T.RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(n)])
    ours = torch.stack([p.top, p.left, p.height, p.width], 1)
    for k in range(4):  # top, left, height, width; equal distributions exceed 0.05 at 3000 draws once in 1000
        assert ks_statistic(ours[:, k], theirs[:, k]) < 0.05, k
    area = lambda boxes: boxes[:, 2] * boxes[:, 3]  # noqa: E731
    assert ks_statistic(area(ours), area(theirs)) < 0.05


@pytest.mark.parametrize("h, w, ratio", [(10, 10, (3 / 4, 4 / 3)), (8, 20, (3 / 4, 4 / 3)), (20, 9, (3 / 4, 4 / 3)),
                                         (12, 30, (0.5, 2.0))])
def test_when_no_box_fits_the_crop_is_torchvision_centre_fallback(h, w, ratio):
    p = params_for(device_data.ViewSpec(8, scale=(2.0, 3.0), ratio=ratio), 4, h, w, seed=0)  # never fits
    expected = T.RandomResizedCrop.get_params(torch.zeros(1, h, w), [2.0, 3.0], list(ratio))
    for b in range(4):
        assert (int(p.top[b]), int(p.left[b]), int(p.height[b]), int(p.width[b])) == expected


@given(seed=seeds, c=channels, side=st.integers(4, 12))
def test_views_stay_in_unit_range_before_standardisation(seed, c, side):
    spec = device_data.ViewSpec(side, flip=0.5, brightness=(0.0, 4.0), contrast=(0.0, 4.0), saturation=(0.0, 4.0),
                                hue=(-0.5, 0.5), jitter=1.0, grayscale=0.5, blur=0.5, solarize=0.5, mean=(0.5,) * c,
                                std=(0.1,) * c)
    x = (images(seed, 8, c, side, side) * 255).round().to(torch.uint8)
    p = params_for(spec, 8, side, side, seed)
    out = device_data.apply_params(x, p, standardize=False)
    assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(device_data.apply_params(x, p), (out - 0.5) / 0.1)


def test_same_seed_same_views_other_seed_other_views():
    spec = device_data.ViewSpec(12, **SIMCLR_LIKE, blur=0.5)
    x = (images(0, 16, 3, 16, 16) * 255).to(torch.uint8)
    view = lambda seed: device_data.apply_params(x, params_for(spec, 16, 16, 16, seed))  # noqa: E731
    assert torch.equal(view(5), view(5))
    assert not torch.allclose(view(5), view(6))


# ---------------------------------------------------------------------------------------------------- views


def test_spec_from_simclr_views():
    info = common.DATASETS["cifar10"]
    spec = device_data.ViewSpec.from_torchvision(simclr.simclr_augment(info, 32, strength=0.5, blur=0.5))
    assert spec == device_data.ViewSpec(32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=0.5, brightness=(0.6, 1.4),
                                        contrast=(0.6, 1.4), saturation=(0.6, 1.4), hue=(-0.1, 0.1), jitter=0.8,
                                        grayscale=0.2, blur=0.5, blur_kernel=3, blur_sigma=(0.1, 2.0),
                                        mean=info.mean, std=info.std)
    solarized = T.Compose([T.RandomResizedCrop(8), T.RandomSolarize(128, p=0.3), T.ToTensor()])
    assert device_data.ViewSpec.from_torchvision(solarized).solarize_range == (128 / 255,) * 2  # PIL's 8-bit units
    for unsupported in [T.Compose([T.RandomResizedCrop(8), T.RandomRotation(10)]),
                        T.Compose([T.RandomResizedCrop(8), T.RandomGrayscale(), T.ColorJitter(0.4)]),  # order
                        T.Compose([T.Resize(8), T.ToTensor()])]:
        with pytest.raises(ValueError, match="batched"):
            device_data.ViewSpec.from_torchvision(unsupported)


def test_byol_asymmetric_views_translate_to_two_different_specs():
    """BYOL's views differ: blur always on the first and with p 0.1 on the second, solarisation on the second
    only. Both must reach the device path with their own probabilities, not one spec twice."""
    info = common.DATASETS["cifar10"]
    views = common.MultiView([byol.byol_augment(info, 32, 1.0, 0.0), byol.byol_augment(info, 32, 0.1, 0.2)])
    first, second = device_data.view_specs(views)
    common_fields = dict(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=0.5, brightness=(0.6, 1.4),
                         contrast=(0.6, 1.4), saturation=(0.8, 1.2), hue=(-0.1, 0.1), jitter=0.8, grayscale=0.2,
                         blur_kernel=3, blur_sigma=(0.1, 2.0), mean=info.mean,
                         std=info.std)
    assert first == device_data.ViewSpec(32, blur=1.0, solarize=0.0, **common_fields)
    assert second == device_data.ViewSpec(32, blur=0.1, solarize=0.2, solarize_range=(128 / 255,) * 2, **common_fields)


def test_paws_views_translate_with_their_multicrop_sizes_random_thresholds_and_equalize():
    info = common.DATASETS["cifar10"]
    views, support_view = paws.paws_views(info, 32, 2, 0.5)
    specs = device_data.view_specs(views)
    colour = dict(flip=0.5, brightness=(0.6, 1.4), contrast=(0.6, 1.4), saturation=(0.6, 1.4), hue=(-0.1, 0.1),
                  jitter=0.8, solarize=0.2, solarize_range=(0.0, 256 / 255), equalize=0.2, mean=info.mean,
                  std=info.std)
    assert specs[:2] == [device_data.ViewSpec(32, scale=(0.75, 1.0), **colour)] * 2
    assert specs[2:] == [device_data.ViewSpec(18, scale=(0.3, 0.75), **colour)] * 2
    assert device_data.view_specs(support_view) == specs[:1]
    flip_only = device_data.ViewSpec(32, crop="padded", flip=0.5, mean=info.mean, std=info.std)
    assert device_data.view_specs(paws.finetune_view(info, 32)) == [flip_only]  # a crop of the whole image


def test_jem_view_translates_to_a_padded_crop_and_dpll_strong_view_is_refused():
    info = common.DATASETS["cifar10"]
    spec = device_data.ViewSpec.from_torchvision(jem.jem_augment(info, 32))  # its noise is added in the step
    assert spec == device_data.ViewSpec(32, crop="padded", pad=4, flip=0.5, mean=(0.5,) * 3, std=(0.5,) * 3)
    weak, strong = dpll.dpll_views(info, 32, dpll.augment_recipe("cifar10", info, 32))
    assert device_data.ViewSpec.from_torchvision(weak) == device_data.ViewSpec(32, crop="padded", pad=4, flip=0.5,
                                                                               mean=info.mean, std=info.std)
    with pytest.raises(ValueError, match="no batched version of Cutout"):
        device_data.ViewSpec.from_torchvision(strong)
    for unsupported in (T.RandomCrop(8, padding=2), T.Compose([T.Pad(2), T.RandomCrop(8)]),  # constant padding
                        T.Compose([T.Pad(2, padding_mode="reflect"), T.RandomResizedCrop(8)])):
        with pytest.raises(ValueError):
            device_data.ViewSpec.from_torchvision(unsupported)


def test_instdisc_view_translates_with_its_flip_left_out_or_put_last():
    info = common.DATASETS["cifar10"]
    for flip, p in [(False, 0.0), (True, 0.5)]:
        spec = device_data.ViewSpec.from_torchvision(instdisc.instdisc_augment(info, 32, 0.2, flip))
        assert spec == device_data.ViewSpec(32, scale=(0.2, 1.0), flip=p, brightness=(0.6, 1.4),
                                            contrast=(0.6, 1.4), saturation=(0.6, 1.4), hue=(-0.4, 0.4), jitter=1.0,
                                            grayscale=0.2, mean=info.mean, std=info.std)


# ---------------------------------------------------------------------------------------------------- epochs


def tiny_args(**kw):
    return simclr.Args(**{"dataset": "imagefolder", "data_dir": str(SYNTHETIC), "arch": "tiny", "workers": 0,
                          "batch_size": 32, "seed": 3, "device": "cpu", **kw})


@given(n=st.integers(8, 80), batch=st.integers(1, 8).map(lambda k: 2 * k), epoch=st.integers(0, 5), seed=seeds)
def test_epoch_batches_split_the_data_over_two_ranks_like_the_dataloader(n, batch, epoch, seed):
    args = tiny_args(batch_size=batch, seed=seed)
    local = batch // 2
    if n // 2 < local:
        return  # no full batch on a process
    dataset = common.WithIndex(common.ImageTensorDataset(torch.zeros(n, 1, 1, 1, dtype=torch.uint8), [0] * n,
                                                         transform=T.PILToTensor()))
    view = T.Compose([T.RandomCrop(1), T.ToTensor()])  # views with a batched version: the device path
    held = common.TrainData(dataset, view, tiny_args(data_path="device", batch_size=batch, seed=seed))
    ranks = []
    for rank in range(2):
        with pytest.MonkeyPatch.context() as patch:  # as if on rank `rank` of 2 processes
            patch.setattr(common, "world", lambda rank=rank: (rank, 2))
            ours = held.loader(epoch).batches  # [steps, local]
            assert ours.shape == ((n // 2) // local, local)
            cpu = [i for _, _, i in common.TrainData(dataset, None, args).loader(epoch)]
            assert torch.equal(ours, torch.stack(cpu)), "the same batches as the CPU DataLoader"
            ranks.append(ours.flatten())
    seen = torch.cat(ranks)
    assert len(seen.unique()) == len(seen) and seen.min() >= 0 and seen.max() < n  # disjoint, in range
    assert len(seen) == 2 * ((n // 2) // local) * local  # every full batch, no partial one
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "world", lambda: (0, 2))
        other = held.loader(epoch + 1).batches
        assert n < 20 or not torch.equal(other, held.loader(epoch).batches)  # reshuffled


def test_device_data_keeps_the_subset_order_and_the_indices(tmp_path):
    args = tiny_args(subset=100)
    views = common.MultiView([T.Compose([T.RandomResizedCrop(16), T.ToTensor()])] * 2)
    train, _, _ = common.training_and_eval_sets(args, views, T.ToTensor())
    data = device_data.DeviceData(common.WithIndex(train), torch.device("cpu"))
    assert data.with_index and len(data) == 100
    raw = common.load_dataset(args, True)
    for i in (0, 37, 99):
        assert torch.equal(data.images[i], TF.pil_to_tensor(raw[train.indices[i]][0]))
        assert data.targets[i] == train.targets[i]


def test_device_data_decodes_a_small_image_folder_as_imagefolder_does(tmp_path):
    g = torch.Generator().manual_seed(0)
    for k, cls in enumerate(["a", "b"]):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = torch.randint(0, 256, (10, 10, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "train" / cls / f"{i}.jpg", quality=90)
    args = tiny_args(dataset="imagefolder", data_dir=str(tmp_path))
    folder = common.load_dataset(args, True)
    data = device_data.DeviceData(folder, torch.device("cpu"))
    assert data.images.shape == (6, 3, 10, 10) and data.targets.tolist() == folder.targets
    for i in range(6):
        assert torch.equal(data.images[i], TF.pil_to_tensor(folder[i][0]))
    Image.new("RGB", (12, 10)).save(tmp_path / "train" / "a" / "odd.png")
    with pytest.raises(ValueError, match="differ in size"):
        device_data.DeviceData(common.load_dataset(args, True), torch.device("cpu"))
    Image.new("RGB", (100, 100)).save(tmp_path / "train" / "a" / "0.jpg")
    with pytest.raises(ValueError, match="ImageNet-scale"):
        device_data.DeviceData(common.load_dataset(args, True), torch.device("cpu"))


def device_train_data(args, views):
    train, _, _ = common.training_and_eval_sets(args, views, T.ToTensor())
    return common.TrainData(train, views, args)


@pytest.mark.parametrize("path", ["device", "cpu"])
def test_an_epoch_of_views_does_not_depend_on_what_ran_before(path):
    """What --resume relies on: the views of epoch e are a function of (seed, epoch, rank) alone, on both paths
    (the CPU path with --workers 0 draws them from the generator the loader reseeds)."""
    views = common.MultiView([simclr.simclr_augment(SYNTHETIC_INFO, 16, blur=0.5)] * 2)
    data = device_train_data(tiny_args(data_path=path), views)
    assert data.on_device == (path == "device")
    first = [v for (v, _) in data.loader(2)]
    torch.rand(100)
    list(data.loader(1))
    again = [v for (v, _) in data.loader(2)]
    for a, b in zip(first, again):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(first[0][0], first[0][1]), "two different views of each image"
    assert not torch.equal(first[0][0], next(iter(data.loader(3)))[0][0]), "another epoch, other views"
    same = [list(range(8))]  # the same images: in another epoch, or through a second loader (a salt), other views
    epoch_2, epoch_3 = (next(iter(data.loader(e, same)))[0][0] for e in (2, 3))
    assert torch.equal(epoch_2, next(iter(data.loader(2, same)))[0][0])
    assert not torch.equal(epoch_2, epoch_3)
    # a second loader of the epoch (a salt) has a generator of its own (on the CPU path its workers': with
    # --workers 0 every loader draws from the one the loader reseeds)
    salted = data if path == "device" else device_train_data(tiny_args(data_path=path, workers=1), views)
    first_loader, second_loader = (next(iter(salted.loader(2, same, salt)))[0][0] for salt in (0, 1))
    assert not torch.equal(first_loader, second_loader)


def test_a_with_index_set_gives_the_cpu_batches_structure_on_the_device():
    """instdisc.py's batches are (x, y, i) with i the image's row in its memory bank: the device path must give
    one view tensor (not a list), and the same labels and positions, batch by batch, as the CPU DataLoader."""
    args = tiny_args(data_path="device", subset=96, batch_size=16)
    view = instdisc.instdisc_augment(SYNTHETIC_INFO, 16)
    train, _, _ = common.training_and_eval_sets(args, view, T.ToTensor())
    train = common.WithIndex(train)
    data = common.TrainData(train, view, args)
    assert data.on_device
    cpu = list(common.TrainData(train, None, args).loader(1))
    device = list(data.loader(1))
    assert len(device) == len(cpu) == 6
    for (x, y, i), (cpu_x, cpu_y, cpu_i) in zip(device, cpu):
        assert isinstance(x, torch.Tensor) and x.shape == cpu_x.shape == (16, 3, 16, 16)
        assert torch.equal(i, cpu_i) and torch.equal(y, cpu_y)
        assert torch.equal(y, torch.as_tensor([train[k][1] for k in i.tolist()]))


def test_views_without_a_batched_version_are_refused_on_the_device_path():
    views = common.MultiView([T.Compose([T.RandomResizedCrop(16), T.RandomRotation(10), T.ToTensor()])] * 2)
    with pytest.raises(SystemExit) as refused:
        device_train_data(tiny_args(data_path="device"), views)
    assert refused.value.message.startswith("--data-path device: no batched version of RandomRotation")
    assert not device_train_data(tiny_args(data_path="auto"), views).on_device  # auto falls back to the CPU


def train_epoch_through(path, views, args):
    """simclr.train_one_epoch over one epoch of `path`, from the same initial network; the loss and weights."""
    args = tiny_args(data_path=path, **args)
    data = device_train_data(args, views)
    assert data.on_device == (path == "device")
    torch.manual_seed(0)
    model = simclr.SimCLR(common.build_backbone("tiny", 3, 16), args.proj_dim, args.proj_layers)
    optimizer = common.LARS(common.param_groups(model, args.weight_decay), lr=0.5, momentum=args.momentum)
    progress = common.Progress(args)
    loss = simclr.train_one_epoch(model, data.loader(0), optimizer, lambda step: 0.5, progress, args)
    return loss, model.state_dict()


def test_device_path_and_cpu_path_give_simclr_the_same_loss():
    """Views that both paths make identically (a whole-image crop, flipped, solarised: no randomness left), so
    the same images in the same batches must give the same loss and the same weights after the epoch's two steps
    (more steps of LARS at this rate amplify the paths' 1e-7 differences in pixels past any useful tolerance)."""
    info = SYNTHETIC_INFO
    view = T.Compose([T.RandomResizedCrop(16, scale=(1.0, 1.0), ratio=(1.0, 1.0)), T.RandomHorizontalFlip(p=1.0),
                      T.RandomSolarize(128, p=1.0), common.normalize(info)])
    views = common.MultiView([view, T.Compose([T.RandomHorizontalFlip(p=1.0), common.normalize(info)])])
    with pytest.raises(SystemExit):  # the second view has no crop: not translatable, so give it one
        train_epoch_through("device", views, {})
    views = common.MultiView([view, T.Compose([T.RandomResizedCrop(16, scale=(1.0, 1.0), ratio=(1.0, 1.0)),
                                               common.normalize(info)])])
    cpu_loss, cpu_weights = train_epoch_through("cpu", views, {"subset": 64})
    device_loss, device_weights = train_epoch_through("device", views, {"subset": 64})
    assert device_loss == pytest.approx(cpu_loss, rel=1e-5)
    for k in cpu_weights:
        torch.testing.assert_close(device_weights[k], cpu_weights[k], atol=1e-5, rtol=1e-5)
    # and the comparison can tell: a different view on one path changes the loss
    views = common.MultiView([view, view])
    assert train_epoch_through("device", views, {"subset": 64})[0] != pytest.approx(cpu_loss, rel=1e-3)


# ---------------------------------------------------------------------------------------------------- script


@pytest.mark.scripts
def test_simclr_runs_on_the_device_data_path(tmp_path):
    run = tmp_path / "run"
    out = run_script("simclr.py", *SYNTHETIC_FLAGS, "--arch", "tiny", "--epochs", "1", "--batch-size", "32",
                     "--workers", "0", "--data-path", "device", "--out-dir", run)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "training data on cpu: 512 images" in out.stdout
    assert json.loads((run / "args.json").read_text())["data_path"] == "device"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[-1]["loss"] > 0
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert (run / "results.json").exists()


# every method file that takes its batches through common.TrainData -> the flags of its small model
DEVICE_METHODS = {
    "simclr.py": [],
    "supcon.py": [],
    "moco.py": ["--queue-size", "128"],
    "byol.py": ["--proj-hidden-dim", "64", "--proj-dim", "32"],
    "simsiam.py": ["--proj-dim", "64", "--pred-dim", "16"],
    "instdisc.py": ["--nce-k", "32"],
    "paws.py": ["--num-labels", "40", "--supports-per-class", "2", "--multicrop", "1", "--finetune-epochs", "1"],
    "jem.py": ["--sgld-steps", "2", "--buffer-size", "256"],
}


# runs a method file as `python METHOD ARGS` would, with the CPU DataLoader's training batches taken away: a method
# that built its TrainData but still took its batches from the CPU DataLoader would train on that path without a word
# (the device path decodes its images through common.Batches too, in batches of its own, without a batch sampler)
WITHOUT_TRAIN_LOADER = """
import runpy, sys
import common
batches = common.Batches
def decode_only(*args, **kwargs):
    if "batch_sampler" in kwargs:
        raise SystemExit("the CPU DataLoader asked for training batches on the device data path")
    return batches(*args, **kwargs)
common.Batches = decode_only
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.scripts
@pytest.mark.parametrize("method", DEVICE_METHODS)
def test_each_method_trains_an_epoch_on_the_device_data_path(method, tmp_path):
    """One epoch of two steps on a 128-image subset, so each run takes seconds, with every batch from the
    device path: the CPU DataLoader refuses to be built."""
    run = tmp_path / "run"
    out = run_script("-c", WITHOUT_TRAIN_LOADER, method, *SYNTHETIC_FLAGS, "--arch", "tiny", "--batch-size",
                     "64", "--workers", "0", "--probe-epochs", "0", "--epochs", "1", "--subset", "128", "--eval-every",
                     "0", "--knn-k", "10", "--data-path", "device", "--out-dir", run, *DEVICE_METHODS[method])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "training data on cpu: 128 images" in out.stdout, out.stdout[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    finetuned = [2] if method == "paws.py" else []  # and a line for its epoch of fine-tuning
    assert [r["epoch"] for r in rows] == [0, 1] + finetuned and rows[1]["loss"] is not None
    assert torch.isfinite(torch.tensor(rows[1]["loss"]))
    assert json.loads((run / "results.json").read_text())["knn_top1"] is not None


STOP_AFTER_FIRST_EPOCH = """
import common, simclr
save = common.RunDir.save
def stop(self, epoch, *args, **kwargs):  # as if killed right after the first epoch's checkpoint
    save(self, epoch, *args, **kwargs)
    if epoch == 1:
        raise SystemExit(3)
common.RunDir.save = stop
simclr.main(common.parse(simclr.Args))
"""


@pytest.mark.scripts
def test_a_run_on_the_device_path_resumes_to_the_same_weights(tmp_path):
    argv = [*SYNTHETIC_FLAGS, "--arch", "tiny", "--epochs", "2", "--batch-size", "64", "--workers", "0",
            "--data-path", "device", "--eval-every", "0", "--probe-epochs", "0", "--knn-k", "10"]
    assert run_script("simclr.py", *argv, "--out-dir", tmp_path / "whole").returncode == 0
    cut = run_script("-c", STOP_AFTER_FIRST_EPOCH, *argv, "--out-dir", tmp_path / "cut")
    assert cut.returncode == 3, cut.stderr[-3000:]
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    out = run_script("simclr.py", *argv, "--out-dir", tmp_path / "cut", "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["model"]
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k


@pytest.mark.scripts
def test_bad_data_path_is_refused(tmp_path):
    out = run_script("simclr.py", *SYNTHETIC_FLAGS, "--data-path", "bogus", "--out-dir", tmp_path / "run")
    assert out.returncode == 2
    assert "--data-path" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "run").exists()
