"""Augmentation config (SimCLR / MICLe / MoCo-CXR presets) and the one DALI graph that applies it on cpu or gpu.
Calling `augment_view` twice on the same decoded images gives two views with independent random draws.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Mean / std of pixel intensity / 255 over 2,002 real 8-bit CXRs of a public pneumonia set (computed once with PIL).
# Used per channel when the gray image is replicated to 3 channels.
CXR_MEAN = 0.4982
CXR_STD = 0.2511


@dataclass(frozen=True)
class AugmentConfig:
    """One view's random augmentation. Probabilities are per sample; ranges are (low, high)."""
    name: str = "custom"
    random_crop: bool = True             # False: deterministic resize (shorter side) + centre crop
    crop_scale_min: float = 0.2          # fraction of the image area kept by the random resized crop
    crop_scale_max: float = 1.0
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5              # set 0 to keep anatomy sided (the heart is on the left)
    rotation_deg: float = 0.0            # uniform in [-rotation_deg, +rotation_deg], black fill
    jitter_prob: float = 0.8             # brightness/contrast (+ saturation/hue) applied together with this p
    brightness: float = 0.4              # factor uniform in [1 - b, 1 + b] (torchvision ColorJitter semantics)
    contrast: float = 0.4
    saturation: float = 0.0              # 3-channel only (simclr parity preset)
    hue: float = 0.0                     # fraction of the hue circle, as torchvision: 0.2 -> +-72 degrees
    grayscale_prob: float = 0.0          # 3-channel only
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1        # kernel size as a fraction of image_size (SimCLR: 10 %), made odd
    # Multi-crop (DINO; other methods ignore these): 2 global crops at the run's image_size with the crop scale
    # above, plus local_crops small crops of local_crop_size px from local_crop_scale of the film, with the same
    # photometric ops as the global crops.
    local_crops: int = 8
    local_crop_size: int = 96
    local_crop_scale_min: float = 0.05
    local_crop_scale_max: float = 0.4

    PRESETS = ("simclr-cxr", "azizi", "moco-cxr", "simclr", "dino-cxr")

    @classmethod
    def preset(cls, name: str, **overrides) -> "AugmentConfig":
        """A named recipe with any field overridden, e.g. ``AugmentConfig.preset("azizi", hflip_prob=0.0)``."""
        base = _PRESETS.get(name)
        if base is None:
            raise ValueError(f"unknown augmentation preset '{name}' (choose from {', '.join(cls.PRESETS)})")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown AugmentConfig field(s) {unknown} for preset '{name}'")
        return dataclasses.replace(cls(name=name, **base), **overrides).validated()

    def validated(self) -> "AugmentConfig":
        for f in ("hflip_prob", "jitter_prob", "grayscale_prob", "blur_prob"):
            if not 0.0 <= getattr(self, f) <= 1.0:
                raise ValueError(f"AugmentConfig.{f}={getattr(self, f)} is not a probability")
        if not 0.0 < self.crop_scale_min <= self.crop_scale_max <= 1.0:
            raise ValueError(f"AugmentConfig crop scale ({self.crop_scale_min}, {self.crop_scale_max}) "
                             "must satisfy 0 < min <= max <= 1")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"AugmentConfig.crop_ratio={self.crop_ratio} must be increasing and positive")
        if self.brightness < 0 or self.contrast < 0 or self.saturation < 0 or not 0 <= self.hue <= 0.5:
            raise ValueError("AugmentConfig jitter strengths must be >= 0 (hue in [0, 0.5])")
        if self.blur_prob > 0 and not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"AugmentConfig.blur_sigma={self.blur_sigma} must be increasing and positive")
        if self.local_crops < 0 or self.local_crop_size < 8:
            raise ValueError(f"AugmentConfig local_crops={self.local_crops} must be >= 0 and local_crop_size="
                             f"{self.local_crop_size} >= 8")
        if not 0.0 < self.local_crop_scale_min <= self.local_crop_scale_max <= 1.0:
            raise ValueError(f"AugmentConfig local crop scale ({self.local_crop_scale_min}, "
                             f"{self.local_crop_scale_max}) must satisfy 0 < min <= max <= 1")
        if self.rotation_deg < 0:
            raise ValueError(f"AugmentConfig.rotation_deg={self.rotation_deg} must be >= 0")
        return self

    @property
    def needs_color(self) -> bool:
        """True when an op needs 3 channels (saturation, hue, random grayscale)."""
        return self.jitter_prob > 0 and (self.saturation > 0 or self.hue > 0) or self.grayscale_prob > 0


# SimCLR jitter of strength s is (0.8s, 0.8s, 0.8s, 0.2s) with p=0.8 (Chen et al. 2020, appendix A).
_PRESETS: dict[str, dict] = {
    # CXR-adapted SimCLR: milder crop, no colour (gray images), blur kept.
    "simclr-cxr": dict(crop_scale_min=0.2, brightness=0.4, contrast=0.4, blur_prob=0.5),
    # Azizi et al. 2021 (MICLe): jitter strength 0.5 (0.4 / 0.4), rotation up to 45 degrees, flip, no blur. The paper
    # names only "random crop" and otherwise reuses SimCLR's pipeline, whose Inception-style crop keeps 8-100 % of
    # the area; we keep 0.08 to reproduce it (simclr-cxr's 0.2 is this project's milder CXR choice; override freely).
    "azizi": dict(crop_scale_min=0.08, brightness=0.4, contrast=0.4, rotation_deg=45.0, blur_prob=0.0),
    # MoCo-CXR (Sowrirajan et al. 2021): rotation +-10 degrees and flip only; resize + centre crop to image_size.
    "moco-cxr": dict(random_crop=False, rotation_deg=10.0, jitter_prob=0.0, brightness=0.0, contrast=0.0,
                     blur_prob=0.0),
    # Original ImageNet SimCLR recipe, for 3-channel parity runs.
    "simclr": dict(crop_scale_min=0.08, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
                   grayscale_prob=0.2, blur_prob=0.5),
    # DINO multi-crop on gray films: global crops from 40-100 % of the film, 8 local crops from 5-40 % (Caron et al.
    # 2021); brightness / contrast and blur only (no colour jitter, grayscale or solarisation on grey films).
    "dino-cxr": dict(crop_scale_min=0.4, brightness=0.4, contrast=0.4, blur_prob=0.5, local_crops=8,
                     local_crop_size=96, local_crop_scale_min=0.05, local_crop_scale_max=0.4),
}


def resolve_augment(augment: "AugmentConfig | str", channels: int) -> AugmentConfig:
    cfg = AugmentConfig.preset(augment) if isinstance(augment, str) else augment.validated()
    if cfg.needs_color and channels != 3:
        raise ValueError(f"augmentation '{cfg.name}' uses saturation/hue/grayscale, "
                         f"which need channels=3 (got {channels})")
    return cfg


def _odd(n: float) -> int:
    k = max(3, int(round(n)))
    return k if k % 2 else k + 1


def _uniform(low: float, high: float):
    """A per-sample uniform draw, or the constant when the range is empty (DALI rejects low == high)."""
    from nvidia.dali import fn
    return float(low) if low >= high else fn.random.uniform(range=[float(low), float(high)])


def _coin(p: float):
    from nvidia.dali import fn
    return fn.random.coin_flip(probability=p)  # int32 0/1; arithmetic with floats promotes to float


def geometric(images, *, image_size: int, resize_size: int, device: str, cfg: AugmentConfig | None):
    """Crop to (image_size, image_size): random resized crop, or resize shorter side + centre crop (cfg None = eval)."""
    from nvidia.dali import fn, types
    size = [image_size, image_size]
    if cfg is not None and cfg.random_crop:
        return fn.random_resized_crop(images, device=device, size=size,
                                      random_area=[cfg.crop_scale_min, cfg.crop_scale_max],
                                      random_aspect_ratio=list(cfg.crop_ratio), interp_type=types.INTERP_LINEAR,
                                      antialias=True)
    out = fn.resize(images, device=device, resize_shorter=resize_size, interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.crop(out, device=device, crop=size, crop_pos_x=0.5, crop_pos_y=0.5)


def replicate_channels(images, device: str):
    """(H, W, 1) -> (H, W, 3) by concatenation (real memory, so the torch side stays a plain channels-last view)."""
    from nvidia.dali import fn
    return fn.cat(images, images, images, axis=2, device=device)


def normalize(images, *, channels: int, dali_dtype, device: str, mirror=None):
    """uint8 HWC -> normalised float HWC (fp32 or fp16); the flip is fused here via ``mirror``."""
    from nvidia.dali import fn
    kw = {} if mirror is None else {"mirror": mirror}
    return fn.crop_mirror_normalize(images, device=device, dtype=dali_dtype, output_layout="HWC",
                                    mean=[CXR_MEAN * 255.0] * channels, std=[CXR_STD * 255.0] * channels, **kw)


def augment_view(images, cfg: AugmentConfig, *, image_size: int, channels: int, dali_dtype, device: str):
    """Decoded uint8 (H, W, 1) images -> one augmented, normalised view (image_size, image_size, channels).

    Order: crop -> rotation -> [to 3 ch if colour ops] -> jitter -> grayscale -> blur -> flip + normalise.
    Every image op runs on ``device`` ("cpu" or "gpu"); random parameters are drawn on the CPU as DALI requires.
    """
    from nvidia.dali import fn, types
    x = geometric(images, image_size=image_size, resize_size=image_size, device=device, cfg=cfg)
    if cfg.rotation_deg > 0:
        angle = _uniform(-cfg.rotation_deg, cfg.rotation_deg)
        x = fn.rotate(x, device=device, angle=angle, keep_size=True, fill_value=0, interp_type=types.INTERP_LINEAR)
    replicated = False
    if channels == 3 and cfg.needs_color:
        x, replicated = replicate_channels(x, device), True
    color = replicated and (cfg.saturation > 0 or cfg.hue > 0)
    if cfg.jitter_prob > 0 and (cfg.brightness > 0 or cfg.contrast > 0 or color):
        # One coin gates all jitter factors together, as torchvision's RandomApply([ColorJitter], p).
        on = _coin(cfg.jitter_prob)

        def factor(strength: float):  # uniform in [1-s, 1+s] when on, exactly 1 when off (DALI rejects empty ranges)
            if strength <= 0:
                return 1.0
            return 1.0 + on * (_uniform(max(0.0, 1 - strength), 1 + strength) - 1.0)

        if cfg.brightness > 0 or cfg.contrast > 0:
            x = brightness_contrast(x, factor(cfg.brightness), factor(cfg.contrast), device=device)
        if color or (replicated and cfg.grayscale_prob > 0):
            s = factor(cfg.saturation)
            if cfg.grayscale_prob > 0:
                s = s * (1.0 - _coin(cfg.grayscale_prob))  # saturation 0 == grayscale, fused into one HSV op
            hue = on * _uniform(-360.0 * cfg.hue, 360.0 * cfg.hue) if cfg.hue > 0 else 0.0
            x = fn.hsv(x, device=device, saturation=s, hue=hue)
    elif replicated and cfg.grayscale_prob > 0:
        x = fn.hsv(x, device=device, saturation=1.0 - _coin(cfg.grayscale_prob))
    if cfg.blur_prob > 0:
        x = _random_blur(x, cfg, image_size=image_size, device=device)
    if channels == 3 and not replicated:
        x = replicate_channels(x, device)
    mirror = fn.random.coin_flip(probability=cfg.hflip_prob) if cfg.hflip_prob > 0 else None
    return normalize(x, channels=channels, dali_dtype=dali_dtype, device=device, mirror=mirror)


def brightness_contrast(x, brightness, contrast, *, device: str, impl: str | None = None):
    """torchvision ColorJitter brightness + contrast on uint8 HWC: ``b * (m + c * (x - m))``, clipped to [0, 255].

    ``m`` is each image's own mean gray level, as ``adjust_contrast`` blends with the mean of the grayscale image
    (DALI's default centre is mid-gray 128, which also shifts a dark film's mean brightness). The centre is the mean
    of the image at this point of the graph (after crop / rotation), as in a torchvision Compose.

    Order: torchvision applies brightness, contrast (saturation, hue) in a random order each call. With the centre
    at the mean these commute (mean(b * x) = b * mean(x)), so one fused op draws from the same distribution up to
    intermediate clipping at 255 (torchvision clips after each op, this clips once); that is all that matters for
    gray CXR presets. DALI's ``hsv`` (the 3-channel ``simclr`` preset) is a linear map that keeps luma, so it also
    commutes up to clipping; torchvision's HSV-space hue does not exactly, a small gap accepted for the parity runs.

    ``impl``: "fused" (``fn.brightness_contrast`` with a per-sample ``contrast_center``; the CPU default, ~25x faster
    than DALI's CPU arithmetic) or "arith" (the same formula as GPU arithmetic ops; the GPU default, because an
    argument input such as ``contrast_center`` must live on the CPU and would force a GPU->CPU copy per batch).
    """
    from nvidia.dali import fn, math as dmath, types
    impl = impl or ("fused" if device == "cpu" else "arith")
    mean = fn.reductions.mean(x, dtype=types.FLOAT)  # () per sample, on x's device; channels are equal here (gray)
    if impl == "fused":
        return fn.brightness_contrast(x, device=device, brightness=brightness, contrast=contrast,
                                      contrast_center=mean)
    if impl != "arith":
        raise ValueError(f"brightness_contrast impl must be 'fused' or 'arith', got {impl!r}")
    k = brightness * contrast  # per-sample scalars (CPU); arithmetic moves them to x's device
    y = x * k + mean * (brightness - k)  # == b * (m + c * (x - m)), float
    return fn.cast(dmath.clamp(y, 0.0, 255.0), dtype=types.UINT8)


def _random_blur(x, cfg: AugmentConfig, *, image_size: int, device: str):
    """Gaussian blur with probability blur_prob. A DALI conditional (the pipeline is built with
    ``enable_conditionals=True``) splits the batch, so skipped samples cost nothing: the blur is the most
    expensive CPU op of the simclr-cxr graph."""
    from nvidia.dali import fn
    window = _odd(cfg.blur_kernel_frac * image_size)
    if cfg.blur_prob >= 1.0:
        return fn.gaussian_blur(x, device=device, sigma=_uniform(*cfg.blur_sigma), window_size=window)
    if fn.random.coin_flip(probability=cfg.blur_prob):
        x = fn.gaussian_blur(x, device=device, sigma=_uniform(*cfg.blur_sigma), window_size=window)
    return x
