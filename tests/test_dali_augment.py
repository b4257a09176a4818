"""dali_pipes augmentation semantics on the CPU: presets and overrides, flip, conditional blur, colour options,
and brightness / contrast jitter against torchvision and PIL (contrast about each image's mean)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import dali_pipes as dp
from test_dali_pipes import S, _pretrain, _write_views_shards, unique_shards  # noqa: F401 (fixture)


@pytest.mark.parametrize("preset", ["simclr-cxr", "azizi", "moco-cxr", "simclr"])
def test_each_preset_builds_and_runs(unique_shards, preset):
    channels = 3 if preset == "simclr" else 1
    b = next(iter(_pretrain(unique_shards, augment=preset, channels=channels)))
    assert b["view1"].shape == (4, channels, S, S) and not torch.equal(b["view1"], b["view2"])


def test_augment_config_presets_and_overrides():
    cfg = dp.AugmentConfig.preset("azizi", hflip_prob=0.0)
    assert cfg.rotation_deg == 45 and cfg.blur_prob == 0 and cfg.hflip_prob == 0 and cfg.name == "azizi"
    assert dp.AugmentConfig.preset("simclr").needs_color and not dp.AugmentConfig.preset("simclr-cxr").needs_color
    assert dp.AugmentConfig.preset("moco-cxr").random_crop is False
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        dp.AugmentConfig.preset("byol")
    with pytest.raises(ValueError, match="unknown AugmentConfig field"):
        dp.AugmentConfig.preset("azizi", hflip=0.0)
    with pytest.raises(ValueError, match="probability"):
        dp.AugmentConfig.preset("azizi", blur_prob=1.5)


def test_skipped_blur_is_exact_identity(unique_shards):
    # The blur runs under a DALI conditional: samples whose coin says no must come out of the merge untouched.
    base = dict(random_crop=False, rotation_deg=0.0, hflip_prob=0.0, jitter_prob=0.0)
    plain = dp.AugmentConfig.preset("moco-cxr", **base)
    never = dp.AugmentConfig.preset("moco-cxr", **base, blur_prob=1e-9)
    always = dp.AugmentConfig.preset("moco-cxr", **base, blur_prob=1.0, blur_sigma=(1.5, 2.0))
    a, b, c = (next(iter(_pretrain(unique_shards, augment=cfg))) for cfg in (plain, never, always))
    assert torch.equal(a["view1"], b["view1"])
    assert not torch.equal(a["view1"], c["view1"])


def test_hflip_mirrors_width_and_can_be_disabled(unique_shards):
    base = dict(random_crop=False, rotation_deg=0.0, jitter_prob=0.0, blur_prob=0.0)
    no_flip = next(iter(_pretrain(unique_shards, augment=dp.AugmentConfig.preset("moco-cxr", **base, hflip_prob=0.0))))
    flip = next(iter(_pretrain(unique_shards, augment=dp.AugmentConfig.preset("moco-cxr", **base, hflip_prob=1.0))))
    assert torch.equal(flip["view1"], no_flip["view1"].flip(-1))  # left-right (W), never up-down
    assert not torch.equal(flip["view1"], no_flip["view1"])


@pytest.mark.parametrize("overrides", [dict(saturation=0.5, hue=0.0, grayscale_prob=0.0),
                                       dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.1),
                                       dict(jitter_prob=0.0, grayscale_prob=0.5), dict(contrast=0.0),
                                       dict(crop_scale_min=1.0, crop_ratio=(1.0, 1.0), blur_sigma=(1.0, 1.0))])
def test_colour_option_combinations_run(unique_shards, overrides):
    cfg = dp.AugmentConfig.preset("simclr", **overrides)
    b = next(iter(_pretrain(unique_shards, augment=cfg, channels=3)))
    assert b["view1"].shape == (4, 3, S, S) and torch.isfinite(b["view1"]).all()


def _run_brightness_contrast(images: list[np.ndarray], b: float, c: float, impl: str | None = None,
                             device: str = "cpu") -> np.ndarray:
    from nvidia.dali import fn, pipeline_def
    from dali_pipes.augment import brightness_contrast

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=0 if device == "gpu" else None, exec_dynamic=True)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        return brightness_contrast(x.gpu() if device == "gpu" else x, b, c, device=device, impl=impl)

    p = pipe()
    p.build()
    out = p.run()[0]
    return np.array((out.as_cpu() if device == "gpu" else out).as_tensor())


def _dark_films(rng: np.random.Generator) -> list[np.ndarray]:
    """Films with means 60-100 (far from DALI's default mid-gray centre); max 200, so b <= 1.25 never clips."""
    return [np.clip(rng.normal(mu, 25, (40, 48, 1)), 0, 200).astype(np.uint8) for mu in (60, 80, 100)]


@pytest.mark.gpu
@pytest.mark.dali
def test_gpu_brightness_contrast_matches_formula():
    images = _dark_films(np.random.default_rng(1))
    got = _run_brightness_contrast(images, 1.25, 0.6, device="gpu").astype(float)[..., 0]  # the GPU default path
    for x, y in zip(images, got):
        xf = x[..., 0].astype(float)
        assert np.abs(y - 1.25 * (xf.mean() + 0.6 * (xf - xf.mean()))).max() <= 0.5 + 1e-3


@pytest.mark.parametrize("impl", ["fused", "arith"])  # "arith" is the GPU graph's formula, run here on the CPU
def test_brightness_contrast_matches_torchvision_and_pil(impl):
    from PIL import ImageEnhance
    from torchvision.transforms import functional as F

    images = _dark_films(np.random.default_rng(0))
    b, c = 1.25, 0.6
    got = _run_brightness_contrast(images, b, c, impl).astype(int)
    for x, y in zip(images, got[..., 0]):
        t = torch.from_numpy(x).permute(2, 0, 1)  # (1, H, W) uint8
        refs = [F.adjust_contrast(F.adjust_brightness(t, b), c)[0].numpy(),  # torchvision draws the order at
                F.adjust_brightness(F.adjust_contrast(t, c), b)[0].numpy(),  # random: both must match
                np.asarray(ImageEnhance.Contrast(ImageEnhance.Brightness(Image.fromarray(x[..., 0])).enhance(b))
                           .enhance(c))]  # what the bench baseline (ColorJitter on PIL images) does
        xf = x[..., 0].astype(float)
        exact = b * (xf.mean() + c * (xf - xf.mean()))  # the formula with the image's own mean as centre
        assert np.abs(y - exact).max() <= 0.5 + 1e-3  # rounded once
        for ref in refs:  # they truncate (torchvision twice, PIL's mean to an integer): 0-2 levels below ours
            d = y - ref.astype(int)
            assert d.min() >= -1 and d.max() <= 2 and abs(d.mean()) < 1.1, (d.min(), d.max(), d.mean())
        # the old mid-gray centre is off by (1 - c) * b * (128 - mean): 13-34 gray levels here
        mid = np.clip(b * (128 + c * (x[..., 0].astype(float) - 128)), 0, 255)
        assert np.abs(mid - refs[0]).mean() > 10


def test_contrast_jitter_keeps_each_films_mean(tmp_path):
    # Through the loader: contrast about the image mean leaves that mean alone (no clipping in a 30-90 film at
    # factor <= 1.5); a mid-gray centre would brighten every dark film by (1 - c) * (128 - mean).
    root = _write_views_shards(tmp_path / "dark", [["PA"]] * 8, pixel_range=(30, 90))
    base = dict(random_crop=False, rotation_deg=0.0, hflip_prob=0.0, blur_prob=0.0, brightness=0.0)
    plain = dp.AugmentConfig.preset("moco-cxr", **base)
    jitter = dp.AugmentConfig.preset("moco-cxr", **base, jitter_prob=1.0, contrast=0.5)
    a, b = (next(iter(_pretrain(root, batch_size=8, augment=cfg))) for cfg in (plain, jitter))
    assert torch.equal(a["pids"], b["pids"])
    level = 1 / 255 / dp.CXR_STD  # one gray level in normalised units
    for view in ("view1", "view2"):
        mean_a, mean_b = a[view].mean(dim=(1, 2, 3)), b[view].mean(dim=(1, 2, 3))
        assert (mean_a - mean_b).abs().max() < 0.6 * level
        assert ((a[view].std(dim=(1, 2, 3)) - b[view].std(dim=(1, 2, 3))).abs() > 0.5 * level).any()
