"""Backbones (torchvision ResNets with a 1- or 3-channel stem), projection heads, the SimCLR model, split / global BN.

Modules only: weights from files (ImageNet cache, encoder.pt, checkpoints) are read by `trainer.encoder_io`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")


def _torchvision_model(arch: str, num_classes: int = 1000) -> nn.Module:
    import torchvision

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r} (choose from {', '.join(ARCHS)})")
    return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)


def adapt_stem(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace conv1 for ``in_channels``; existing RGB filters are summed into one channel (a gray image x
    replicated to RGB gives the same response), or kept for 3 channels."""
    old = model.conv1
    if in_channels == old.in_channels:
        return model
    if in_channels != 1:
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    new = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    with torch.no_grad():
        new.weight.copy_(old.weight.sum(dim=1, keepdim=True))
    model.conv1 = new
    return model


def torchvision_resnet(arch: str, in_channels: int = 1, num_classes: int = 1000) -> nn.Module:
    """The torchvision model with its stem adapted: what an exported encoder.pt loads into (strict apart from fc)."""
    return adapt_stem(_torchvision_model(arch, num_classes), in_channels)


def build_backbone(arch: str, in_channels: int = 1, *, rgb_state: dict | None = None) -> tuple[nn.Module, int]:
    """A torchvision ResNet with ``fc = Identity`` -> (module, feature_dim), randomly initialised, or holding
    ``rgb_state`` (the 3-channel ImageNet classifier's state dict), loaded strictly before the stem is adapted (RGB
    filters summed for 1 channel). Files (encoder.pt, checkpoints, the hub cache) are read by trainer.encoder_io."""
    if arch.startswith("vit_"):  # timm Vision Transformers: trainer/vit.py (no ImageNet classifier to adapt)
        from trainer.vit import vit_model

        model = vit_model(arch, in_channels)
        return model, model.feature_dim
    model = _torchvision_model(arch)
    if rgb_state is not None:
        model.load_state_dict(rgb_state)
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    return adapt_stem(model, in_channels), feature_dim


class ProjectionHead(nn.Sequential):
    """2- or 3-layer MLP to ``out_dim`` (SimCLR v2 uses 3 with BatchNorm; MoCo v2 uses 2 without)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int = 128, layers: int = 2, batch_norm: bool = True):
        mods: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers - 1):
            mods.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                mods.append(nn.BatchNorm1d(hidden_dim))
            mods.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        mods.append(nn.Linear(dim, out_dim))
        super().__init__(*mods)


class ContrastiveModel(nn.Module):
    """backbone -> projection head; forward returns projections (B, proj_dim), not normalised."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_contrastive_model(model_cfg, init=None) -> ContrastiveModel:
    """backbone -> projection head for a `ModelConfig`. ``init``: the backbone record that
    ``trainer.encoder_io.read_init(model_cfg)`` returned (its ``model`` and ``feature_dim``); without it the backbone
    is built at random, which only ``model.init=random`` allows."""
    if init is None:
        if model_cfg.init != "random":
            raise ValueError(f"model.init={model_cfg.init}: read it with trainer.encoder_io.read_init and pass it")
        backbone, feature_dim = build_backbone(model_cfg.arch, model_cfg.in_channels)
    else:
        backbone, feature_dim = init.model, init.feature_dim
    hidden = model_cfg.head_hidden_dim or feature_dim
    head = ProjectionHead(feature_dim, hidden, model_cfg.proj_dim, model_cfg.head_layers, model_cfg.head_bn)
    return ContrastiveModel(backbone, head)


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of ``num_splits`` equal chunks of the batch, as if each chunk
    were on its own GPU (MoCo's single-GPU shuffle-BN emulation). Same parameters and buffers as the BatchNorm it
    replaces, so state dicts (checkpoints, encoder.pt) do not change; eval mode is plain BatchNorm."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, num_splits: int):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.load_state_dict(bn.state_dict())
        self.num_splits = num_splits

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 4):
            raise ValueError(f"SplitBatchNorm expects (N, C) or (N, C, H, W) input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, c, s = x.shape[0], x.shape[1], self.num_splits
        values = (n // s) * (x[0, 0].numel())  # per chunk and channel
        if n % s or values < 2:
            raise ValueError(f"a batch of {n} cannot be split into {s} BatchNorm chunks of >= 2 values per channel "
                             f"(lower loss.moco_bn_splits)")
        # statistics and normalisation in fp32 whatever autocast made x (as cuDNN's BatchNorm does), output in x's dtype
        xs = x.reshape(s, n // s, c, -1).float()  # (S, N/S, C, H*W): a view in fp32, also in channels-last memory
        var, mean = torch.var_mean(xs, dim=(1, 3), correction=0)  # (S, C) each
        scale = torch.rsqrt(var + self.eps)  # (S, C)
        if self.affine:
            scale = scale * self.weight.float()
        shift = -mean * scale if not self.affine else self.bias.float() - mean * scale
        y = (xs * scale[:, None, :, None] + shift[:, None, :, None]).to(x.dtype)
        if self.track_running_stats:
            with torch.no_grad():  # the mean of the chunks' updates, as S ranks' key encoders would average out
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.mean(0), m)
                self.running_var.lerp_((var * values / (values - 1)).mean(0), m)
        return y.reshape(x.shape)


def split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm in ``module`` by a SplitBatchNorm (in place; returns the module)."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            setattr(module, name, SplitBatchNorm(child, num_splits))
        else:
            split_batchnorm(child, num_splits)
    return module


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with the statistics of the global batch (every rank's images) for CPU ranks (gloo), which torch's
    SyncBatchNorm and DDP's check of it refuse: per-channel sums all-reduced with autograd, in fp32. Same parameters
    and buffers as BatchNorm (state dicts do not change); one process or eval mode is plain BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (N, C, ...) input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.transpose(0, 1).reshape(c, -1).float()  # (C, values on this rank)
        count = torch.full((1,), float(xf.shape[1]), device=x.device)
        total = all_reduce(torch.cat([xf.sum(1), count]))  # (C + 1,): global sums and value count
        n = total[c]
        mean = total[:c] / n  # (C,)
        var = all_reduce((xf - mean[:, None]).square().sum(1)) / n  # (C,) biased, two-pass
        scale = torch.rsqrt(var + self.eps) * (self.weight.float() if self.affine else 1.0)
        shift = (self.bias.float() if self.affine else 0.0) - mean * scale
        shape = (1, c) + (1,) * (x.dim() - 2)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1), m)
        return (x.float() * scale.reshape(shape) + shift.reshape(shape)).to(x.dtype)


def convert_global_bn(module: nn.Module, device_type: str = "cpu") -> nn.Module:
    """BatchNorm over the global batch: torch's SyncBatchNorm (NCCL kernels) for a CUDA run, GlobalBatchNorm for a
    CPU one; returns the converted module (state dict unchanged)."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SplitBatchNorm):
        bn = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)
        bn.load_state_dict(module.state_dict())
        return bn.train(module.training)
    for name, child in module.named_children():
        setattr(module, name, convert_global_bn(child, device_type))
    return module
