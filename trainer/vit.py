"""Vision Transformer backbones (timm's VisionTransformer, timm parameter names): ViT-Ti/S/B at any patch size,
dynamic image size (96 px local and 224 px global crops through one model), 1-channel input by weight folding, and
`model.init=PATH` from a timm / DINOv2 state dict, a cxr-ssl encoder.pt or a training checkpoint.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

# size -> (embed_dim, depth, num_heads), as timm's vit_{tiny,small,base}_patch16_224
VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}
VIT_ARCH_RE = re.compile(r"^vit_(tiny|small|base)_patch(\d+)$")
VIT_ARCHS = tuple(f"vit_{s}_patch{p}" for s in VIT_SIZES for p in (16, 14, 8))  # listed choices; any patch parses
# keys of a source state dict that a backbone without a classifier has no use for (dropped, never an error)
IGNORED_KEYS = re.compile(r"^(head\.|head_drop\.|fc_norm\.|mask_token$)")
# wrapper prefixes stripped from a raw state dict (DDP, DINO's MultiCropWrapper, timm hub files)
STRIP_PREFIXES = ("module.", "backbone.", "teacher.backbone.", "student.backbone.")


def is_vit(arch: str) -> bool:
    return VIT_ARCH_RE.match(arch) is not None


def parse_arch(arch: str) -> tuple[str, int]:
    m = VIT_ARCH_RE.match(arch)
    if m is None or int(m.group(2)) < 2:
        raise ValueError(f"unknown ViT arch {arch!r} (vit_tiny|vit_small|vit_base + _patch16, _patch14, ...)")
    return m.group(1), int(m.group(2))


def vit_model(arch: str, in_channels: int = 1, *, img_size: int = 224, init_values: float | None = None,
              reg_tokens: int = 0) -> nn.Module:
    """timm VisionTransformer without a classifier: forward(x (B, C, H, W)) -> CLS token after the final norm
    (B, embed_dim); H and W may be any size (position embeddings interpolated; padded to a patch multiple)."""
    from timm.models.vision_transformer import VisionTransformer

    size, patch = parse_arch(arch)
    dim, depth, heads = VIT_SIZES[size]
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    model = VisionTransformer(img_size=img_size, patch_size=patch, in_chans=in_channels, num_classes=0,
                              global_pool="token", embed_dim=dim, depth=depth, num_heads=heads,
                              init_values=init_values, reg_tokens=reg_tokens, dynamic_img_size=True,
                              dynamic_img_pad=True)
    model.feature_dim = dim
    return model


def fold_channels(state: dict, in_channels: int) -> dict:
    """An RGB patch embedding summed into one input channel (a gray image replicated to RGB gives the same tokens),
    as the ResNets' stem."""
    w = state.get("patch_embed.proj.weight")
    if w is not None and w.shape[1] == 3 and in_channels == 1:
        state = dict(state, **{"patch_embed.proj.weight": w.sum(dim=1, keepdim=True)})
    return state


def read_state(path: str | Path) -> tuple[dict, dict]:
    """(backbone state dict with timm names, meta) from a timm / torch hub file (.pth, .pt, .bin, .safetensors),
    a cxr-ssl encoder.pt or a training checkpoint. ValueError, one line naming the file, otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.init={path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        doc = load_file(str(path))
    else:
        from trainer.checkpoint import load_checkpoint

        doc = load_checkpoint(path)
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a state dict (top level is {type(doc).__name__})")
    meta: dict = {}
    if "state_dict" in doc and "arch" in doc:  # cxr-ssl encoder.pt
        meta = {k: v for k, v in doc.items() if k != "state_dict"}
        doc = doc["state_dict"]
    elif isinstance(doc.get("model"), dict):  # training checkpoint (or a hub file nesting its weights)
        cfg = doc.get("config", {}).get("model", {}) if isinstance(doc.get("config"), dict) else {}
        meta = {"arch": cfg.get("arch"), "in_channels": cfg.get("in_channels")} if cfg else {}
        model = doc["model"]
        teacher = {k[len("teacher.backbone."):]: v for k, v in model.items() if k.startswith("teacher.backbone.")}
        doc = teacher or model  # a DINO run continues from its teacher, the encoder it exports
    elif isinstance(doc.get("teacher"), dict):  # the DINO reference code's checkpoint
        doc = doc["teacher"]
    state = {}
    for k, v in doc.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: not a state dict of tensors (key {k!r} holds {type(v).__name__})")
        for prefix in STRIP_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        state[k] = v
    return state, meta


def _short(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")


def load_vit_state(model: nn.Module, state: dict, source: str) -> None:
    """Load ``state`` into ``model`` strictly after folding RGB to gray, dropping a classifier and resampling the
    position embeddings to the model's grid; a mismatch is one line listing the keys."""
    from timm.layers import resample_abs_pos_embed

    state = {k: v for k, v in state.items() if not IGNORED_KEYS.match(k)}
    state = fold_channels(state, model.patch_embed.proj.in_channels)
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(pos, list(model.patch_embed.grid_size), num_prefix_tokens=prefix)
    own = model.state_dict()
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    shape = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or shape:
        parts = [f"missing {_short(missing)}" if missing else "", f"unexpected {_short(unexpected)}" if unexpected
                 else "", "shape differs: " + _short(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                                      for k in shape) if shape else ""]
        raise ValueError(f"{source}: does not fit this ViT ({'; '.join(p for p in parts if p)})")
    model.load_state_dict(state, strict=True)


def build_vit(arch: str, in_channels: int = 1, init: str = "random") -> tuple[nn.Module, int]:
    """(ViT backbone, feature_dim) for ``model.arch`` / ``model.init``: "random", or a path whose weights are
    loaded (timm names; LayerScale and register tokens, as in DINOv2 files, are built when the file has them)."""
    if init == "imagenet":
        raise ValueError(f"model.init=imagenet is for torchvision ResNets; for {arch} give a local timm state dict "
                         f"(model.init=PATH; this run makes no network access)")
    if init == "random":
        model = vit_model(arch, in_channels)
        return model, model.feature_dim
    state, meta = read_state(init)
    if meta.get("arch") not in (None, arch):
        raise ValueError(f"{init}: holds a {meta['arch']}; this run builds {arch}")
    model = vit_from_state(arch, in_channels, state, str(init))
    return model, model.feature_dim


def vit_from_state(arch: str, in_channels: int, state: dict, source: str) -> nn.Module:
    """The ViT ``arch`` holding ``state`` (timm names), with LayerScale and register tokens built when the state
    has them (DINOv2 files); ValueError, one line listing the keys, when it does not fit."""
    init_values = 1e-5 if "blocks.0.ls1.gamma" in state else None
    reg = state.get("reg_token")
    model = vit_model(arch, in_channels, init_values=init_values, reg_tokens=int(reg.shape[1]) if reg is not None
                      else 0)
    load_vit_state(model, state, source)
    return model


VIT_FEATURES = ("cls", "mean", "both")  # what a frozen ViT hands to a probe: CLS token, mean patch token, both


def vit_feature_dim(model: nn.Module, features: str) -> int:
    if features not in VIT_FEATURES:
        raise ValueError(f"unknown ViT features {features!r} (choose from {', '.join(VIT_FEATURES)})")
    return model.embed_dim * (2 if features == "both" else 1)


def pool_tokens(tokens: torch.Tensor, num_prefix_tokens: int, features: str) -> torch.Tensor:
    """(B, prefix + P, D) final-norm tokens -> (B, D) CLS token, (B, D) mean of the P patch tokens (register tokens
    excluded), or (B, 2D) both concatenated [CLS, mean] as DINO's linear evaluation does."""
    cls = tokens[:, 0]
    if features == "cls":
        return cls
    mean = tokens[:, num_prefix_tokens:].mean(dim=1)  # (B, D)
    if features == "mean":
        return mean
    if features == "both":
        return torch.cat([cls, mean], dim=1)  # (B, 2D)
    raise ValueError(f"unknown ViT features {features!r} (choose from {', '.join(VIT_FEATURES)})")


class ViTFeatures(nn.Module):
    """A ViT backbone whose forward returns the chosen frozen features (``features`` in VIT_FEATURES); the
    backbone's own forward (the CLS token) is what pretraining uses and stays unchanged."""

    def __init__(self, backbone: nn.Module, features: str):
        super().__init__()
        self.backbone, self.features = backbone, features
        self.feature_dim = vit_feature_dim(backbone, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, feature_dim)
        return pool_tokens(self.backbone.forward_features(x), self.backbone.num_prefix_tokens, self.features)
