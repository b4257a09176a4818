"""Exposure and film processing: a phantom's attenuation map (frontal or lateral) -> a processed uint8 radiograph."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from synth.frontal import frontal_attenuation
from synth.lateral import lateral_attenuation
from synth.phantom import Anatomy, Findings, Frame, Pose


def _expose(mu: np.ndarray, frame: Frame, pose: Pose, rng: np.random.Generator, marker: str | None) -> np.ndarray:
    """Attenuation -> detector signal -> window / gamma -> quantum noise -> blur + edge enhancement -> uint8."""
    # displayed density ~ log transmission = attenuation, through an S-shaped film / LUT curve
    k = pose.exposure
    img = 0.5 + 0.5 * np.tanh((mu - pose.level) * k)
    img = np.clip((img - pose.window_lo) * (1.0 / (pose.window_hi - pose.window_lo)), 0.0, 1.0) ** pose.gamma
    img *= 1.0 + pose.heel * (np.arange(frame.h, dtype=np.float32)[:, None] / frame.h - 0.5)
    # fewer photons behind dense structures: noise grows with brightness
    img += (pose.noise * (0.4 + img)) * rng.standard_normal(img.shape, dtype=np.float32)
    out = Image.fromarray(np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if pose.blur_px > 0.05:
        out = out.filter(ImageFilter.GaussianBlur(pose.blur_px))
    if pose.sharpen > 0:
        out = out.filter(ImageFilter.UnsharpMask(radius=max(2, frame.w // 60), percent=int(pose.sharpen), threshold=2))
    if marker:
        from PIL import ImageFont
        size = max(8, frame.w // 18)
        draw = ImageDraw.Draw(out)
        draw.text((frame.w * 0.06, frame.h * 0.04), marker, fill=235, font=ImageFont.load_default(size=size))
    return np.asarray(out)


def render_frontal(anat: Anatomy, find: Findings, pose: Pose, view: str, height_px: int, width_px: int,
                   rng: np.random.Generator) -> np.ndarray:
    """One PA or AP chest radiograph, uint8 (H, W)."""
    frame = Frame(height_px, width_px, pose)
    mu = frontal_attenuation(anat, find, pose, view, frame)
    return _expose(mu, frame, pose, rng, ("R" if rng.random() < 0.7 else "L") if pose.marker else None)


def render_lateral(anat: Anatomy, find: Findings, pose: Pose, height_px: int, width_px: int,
                   rng: np.random.Generator) -> np.ndarray:
    """One left-lateral chest radiograph (anterior on image left), uint8 (H, W)."""
    frame = Frame(height_px, width_px, pose)
    mu = lateral_attenuation(anat, find, pose, frame)
    return _expose(mu, frame, pose, rng, "L" if pose.marker else None)
