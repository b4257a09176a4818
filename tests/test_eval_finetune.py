"""eval.finetune's on-device augmentation: the affine resample is exact at identity settings and flips / crops
as configured, seeded by the generator."""
from __future__ import annotations

import torch

from eval.finetune import FinetuneConfig, augment

NO_AUG = dict(crop_scale_min=1.0, crop_ratio_max=1.0, hflip_prob=0.0, rotation_deg=0.0, brightness=0.0, contrast=0.0)


def test_identity_settings_leave_images_unchanged():
    x = torch.randn(4, 1, 16, 20)
    out = augment(x, torch.Generator().manual_seed(0), FinetuneConfig(**NO_AUG))
    assert torch.allclose(out, x, atol=1e-5)


def test_flip_and_crop():
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16)
    flipped = augment(x, torch.Generator().manual_seed(0), FinetuneConfig(**{**NO_AUG, "hflip_prob": 1.0}))
    assert torch.allclose(flipped, x.flip(-1), atol=1e-4)
    cfg = FinetuneConfig(**{**NO_AUG, "crop_scale_min": 0.3})
    a = augment(x, torch.Generator().manual_seed(1), cfg)
    b = augment(x, torch.Generator().manual_seed(1), cfg)
    c = augment(x, torch.Generator().manual_seed(2), cfg)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    # a crop zooms in: the value range of a crop lies inside the image's
    assert a.min() >= x.min() - 1e-4 and a.max() <= x.max() + 1e-4 and (a.amax((1, 2, 3)) - a.amin((1, 2, 3)) < 255).all()
