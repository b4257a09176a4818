"""Backbones (torchvision ResNets with a 1- or 3-channel stem), projection heads, and the SimCLR / MoCo v2 models.

ImageNet weights come only from the local torch hub cache (no network); `init` may also name a checkpoint to
continue pretraining from (ImageNet -> CXR, as Azizi et al. did).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def imagenet_weights_path(arch: str) -> Path:
    """The cached ImageNet weights of ``arch`` in the torch hub cache: torchvision's DEFAULT file, or another
    ImageNet release (e.g. ResNet-50 V1) when only that one is cached; DEFAULT's path when none is."""
    import torchvision

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r} (choose from {', '.join(ARCHS)})")
    enum = torchvision.models.get_model_weights(arch)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    candidates = [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]
    paths = [folder / w.url.rsplit("/", 1)[-1] for w in candidates]
    return next((p for p in paths if p.is_file()), paths[0])


def build_backbone(arch: str, in_channels: int = 1, init: str = "random") -> tuple[nn.Module, int]:
    """A torchvision ResNet with ``fc = Identity`` -> (module, feature_dim).

    init: "random"; "imagenet" (local hub cache only, RGB stem filters summed for 1 channel); or a path to an
    encoder.pt / training checkpoint whose backbone weights are loaded strictly.
    """
    model = _torchvision_model(arch)
    if init == "imagenet":
        path = imagenet_weights_path(arch)
        if not path.is_file():
            raise FileNotFoundError(
                f"model.init=imagenet: {arch} ImageNet weights not in the local torch hub cache ({path}); this run "
                f"makes no network access: fetch them on a connected machine with "
                f"`python -c \"import torchvision; torchvision.models.{arch}(weights='DEFAULT')\"` and copy the file "
                f"there, or set model.init=random")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    model = adapt_stem(model, in_channels)
    if init not in ("random", "imagenet"):
        from trainer.checkpoint import backbone_state_from_file

        state, meta = backbone_state_from_file(init)
        if meta.get("arch", arch) != arch or meta.get("in_channels", in_channels) != in_channels:
            raise ValueError(f"{init}: holds a {meta.get('arch')} with {meta.get('in_channels')} input channel(s); "
                             f"this run builds {arch} with {in_channels}")
        model.load_state_dict(state, strict=True)
    return model, feature_dim


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


def build_contrastive_model(model_cfg) -> ContrastiveModel:
    backbone, feature_dim = build_backbone(model_cfg.arch, model_cfg.in_channels, model_cfg.init)
    hidden = model_cfg.head_hidden_dim or feature_dim
    head = ProjectionHead(feature_dim, hidden, model_cfg.proj_dim, model_cfg.head_layers, model_cfg.head_bn)
    return ContrastiveModel(backbone, head)


class MoCo(nn.Module):
    """MoCo v2: query encoder, momentum key encoder, and a queue of normalised keys (a buffer, so it checkpoints).

    Shuffle-BN (``shuffle_bn`` with several ranks): keys are computed on a batch permuted across ranks so BatchNorm
    statistics cannot leak which key matches which query.
    """

    def __init__(self, encoder_q: ContrastiveModel, queue_size: int = 65536, momentum: float = 0.999,
                 shuffle_bn: bool = True):
        super().__init__()
        self.encoder_q = encoder_q
        self.encoder_k = copy.deepcopy(encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.momentum, self.shuffle_bn = momentum, shuffle_bn
        dim = self._out_dim(encoder_q)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))  # (K, D)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _out_dim(model: ContrastiveModel) -> int:
        return [m for m in model.head.modules() if isinstance(m, nn.Linear)][-1].out_features

    @torch.no_grad()
    def momentum_update(self) -> None:
        """key = m * key + (1 - m) * query over parameters (BN statistics stay the key encoder's own, as in MoCo)."""
        q = [p.detach() for p in self.encoder_q.parameters()]
        k = [p for p in self.encoder_k.parameters()]
        torch._foreach_mul_(k, self.momentum)
        torch._foreach_add_(k, q, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest entries with ``keys`` (B, D) gathered from every rank; B must divide the queue."""
        size = self.queue.shape[0]
        b = keys.shape[0]
        if size % b:
            raise ValueError(f"loss.moco_queue={size} must be a multiple of the global batch {b}")
        ptr = int(self.queue_ptr)
        self.queue[ptr:ptr + b] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + b) % size)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised keys (B, D) for this rank's ``x``, with shuffle-BN across ranks when enabled."""
        from trainer.distributed import gather_no_grad, world

        rank, world_size = world()
        if not (self.shuffle_bn and world_size > 1):
            return F.normalize(self.encoder_k(x).float(), dim=1)
        import torch.distributed as dist

        b = x.shape[0]
        x_all = gather_no_grad(x)  # (W*B, ...)
        perm = torch.randperm(x_all.shape[0], device=x.device)
        dist.broadcast(perm, src=0)
        unperm = torch.argsort(perm)
        k = F.normalize(self.encoder_k(x_all[perm[rank * b:(rank + 1) * b]]).float(), dim=1)
        k_all = gather_no_grad(k)  # (W*B, D) in shuffled order
        return k_all[unperm[rank * b:(rank + 1) * b]]

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (q (B, D) normalised with gradient, k (B, D) normalised without); updates the key encoder first."""
        q = F.normalize(self.encoder_q(x_q).float(), dim=1)
        with torch.no_grad():
            self.momentum_update()
            k = self.keys(x_k)
        return q, k
