"""The [augment] config section: a dali_pipes.AugmentConfig preset plus any of its fields, resolved in place so the
run's config.toml lists every value the loader uses (keys the user set win over the preset's values).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from dali_pipes.augment import AugmentConfig


@dataclass
class AugmentSection:
    """Mirrors AugmentConfig (pairs are TOML arrays); the defaults are the ``simclr-cxr`` preset's."""
    preset: str = "simclr-cxr"       # simclr-cxr | azizi | moco-cxr | simclr | dino-cxr (dali_pipes.augment)
    random_crop: bool = True
    crop_scale_min: float = 0.2
    crop_scale_max: float = 1.0
    crop_ratio: list = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip_prob: float = 0.5
    rotation_deg: float = 0.0
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.0
    hue: float = 0.0
    grayscale_prob: float = 0.0
    blur_prob: float = 0.5
    blur_sigma: list = field(default_factory=lambda: [0.1, 2.0])
    blur_kernel_frac: float = 0.1
    local_crops: int = 8             # multi-crop (DINO): local crops per image, their size and area range
    local_crop_size: int = 96
    local_crop_scale_min: float = 0.05
    local_crop_scale_max: float = 0.4


PAIR_FIELDS = ("crop_ratio", "blur_sigma")


class AugmentSectionError(ValueError):
    """An [augment] value AugmentConfig rejects; one line naming the key."""


def _augment_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(AugmentConfig) if f.name != "name"]


def resolve_augment_section(section: AugmentSection, explicit: set[str]) -> AugmentConfig:
    """Fill ``section`` with its preset's values except the ``explicit`` keys, validate, return the AugmentConfig."""
    overrides = {}
    for key in explicit - {"preset"}:
        value = getattr(section, key)
        if key in PAIR_FIELDS:
            if len(value) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise AugmentSectionError(f"augment.{key} must be two numbers [low, high], got {value!r}")
            value = (float(value[0]), float(value[1]))
        overrides[key] = value
    try:
        aug = AugmentConfig.preset(section.preset, **overrides)
    except ValueError as e:
        raise AugmentSectionError(f"[augment] preset {section.preset!r}: {e}") from None
    for key in _augment_fields():
        value = getattr(aug, key)
        setattr(section, key, list(value) if key in PAIR_FIELDS else value)
    return aug


def augment_config(section: AugmentSection) -> AugmentConfig:
    """The AugmentConfig of a resolved section (every field set), named after its preset."""
    values = {k: getattr(section, k) for k in _augment_fields()}
    for key in PAIR_FIELDS:
        values[key] = tuple(float(v) for v in values[key])
    return AugmentConfig(name=section.preset, **values).validated()
