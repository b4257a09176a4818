"""Input statistics for ImageNet weights: the dali_pipes loaders normalise with the CXR mean/std, ImageNet-trained
filters expect ImageNet's per-channel statistics; this module converts one into the other on the device."""
from __future__ import annotations

import torch

import dali_pipes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetInput(torch.nn.Module):
    """x_cxr -> x_imagenet per channel; for a 1-channel stem (RGB filters summed) the channel-mean statistics."""

    def __init__(self, in_channels: int):
        super().__init__()
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        if in_channels == 1:
            mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
        # (x * s_cxr + m_cxr - m) / s  ==  x * scale + shift; not persistent: encoders' state dicts stay torchvision's
        self.register_buffer("scale", (dali_pipes.CXR_STD / std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((dali_pipes.CXR_MEAN - mean) / std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
