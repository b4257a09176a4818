"""Images for the page: the model's view and its saliency overlays (class activation, or a ViT's attention) as
in-memory PNG data URLs."""
from __future__ import annotations

import base64
import io

import numpy as np


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def png_url(rgb_or_gray: np.ndarray) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb_or_gray).save(buf, format="PNG")
    return data_url(buf.getvalue(), "image/png")


def overlay(gray: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """(S, S) uint8 film + (h, w) activation -> (S, S, 3) uint8: positive evidence for the finding (or a ViT's
    attention weight) in warm colours, rescaled to this map's own range as Grad-CAM displays it (a map without
    positive evidence leaves the film as is)."""
    import torch
    import torch.nn.functional as F
    from matplotlib import colormaps
    up = F.interpolate(torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None, None], size=gray.shape,
                       mode="bilinear", align_corners=False)[0, 0].clamp_(min=0).numpy()
    up -= up.min()
    peak = float(up.max())
    heat = up / peak if peak > 0 else up
    colour = colormaps["inferno"](heat)[..., :3]  # (S, S, 3) in [0, 1]
    alpha = 0.55 * heat[..., None]
    base = np.repeat(gray[..., None] / 255.0, 3, axis=2)
    return np.rint((base * (1 - alpha) + colour * alpha) * 255).astype(np.uint8)
