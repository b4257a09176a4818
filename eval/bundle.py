"""The exported classifier bundle: one folder with model.pt (weights only), bundle.json (tasks, view, metrics,
thresholds, provenance) and a generated README.md model card; plus the linear probes' heads.pt that `eval linear`
leaves beside its results so that `eval export` can build a bundle from them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BUNDLE_FORMAT = "cxr-ssl-bundle/1"
HEADS_FORMAT = "cxr-ssl-linear-heads/1"
MODEL_FILE, META_FILE, CARD_FILE = "model.pt", "bundle.json", "README.md"
VIEWS = ("center", "full")


class BundleError(ValueError):
    """A bundle folder that is missing, incomplete or does not match its own description (one-line message)."""


def save_linear_heads(path: Path, probe, tasks: list[str], val_targets: np.ndarray | None) -> None:
    """``eval linear``'s probes as plain tensors: weight (T, D) (NaN rows = task not trained), bias (T,), the
    training-feature standardisation (D,), and the chosen probes' validation scores with their targets."""
    dim = int(probe.feature_mean.shape[0])
    weight = torch.full((len(tasks), dim), float("nan"), dtype=torch.float64)
    bias = torch.full((len(tasks),), float("nan"), dtype=torch.float64)
    for j, name in enumerate(tasks):
        if name in probe.weights:
            weight[j] = torch.from_numpy(np.asarray(probe.weights[name].weight, dtype=np.float64))
            bias[j] = float(probe.weights[name].bias)
    doc = {"format": HEADS_FORMAT, "tasks": list(tasks), "weight": weight, "bias": bias,
           "feature_mean": torch.from_numpy(np.asarray(probe.feature_mean, dtype=np.float64)),
           "feature_std": torch.from_numpy(np.asarray(probe.feature_std, dtype=np.float64))}
    if probe.val_scores is not None and val_targets is not None:
        doc["val_scores"] = torch.from_numpy(np.asarray(probe.val_scores, dtype=np.float64))
        doc["val_targets"] = torch.from_numpy(np.asarray(val_targets, dtype=np.float64))
    tmp = path.with_name(path.name + ".tmp")
    torch.save(doc, tmp)
    tmp.replace(path)


class ProbeHeads(torch.nn.Module):
    """All tasks' heads as one layer: logits = ((f - mean) / std) @ weight.T + bias. A fine-tuned head is the
    same layer with mean 0 and std 1."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.float())  # (T, D)
        self.register_buffer("bias", bias.float())      # (T,)
        self.register_buffer("mean", mean.float())      # (D,)
        self.register_buffer("std", std.float())        # (D,)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, T)
        return ((features - self.mean) / self.std) @ self.weight.T + self.bias

    def class_activation(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) last-stage maps -> (B, T, h, w). With global average pooling and a linear head this is
        CAM, which equals Grad-CAM's map for such heads (the gradient is the head's weight), without autograd."""
        return torch.einsum("bdhw,td->bthw", maps, self.weight / self.std)


class BundleModel(torch.nn.Module):
    """ResNet trunk (fc = Identity) + ProbeHeads; ``forward`` returns logits and the last-stage feature maps."""

    def __init__(self, backbone: torch.nn.Module, heads: ProbeHeads, input_adapter: torch.nn.Module | None = None):
        super().__init__()
        self.backbone, self.heads = backbone, heads
        self.input_adapter = input_adapter if input_adapter is not None else torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, C, S, S) -> (B, T), (B, D, h, w)
        b = self.backbone
        x = self.input_adapter(x)
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        maps = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        return self.heads(torch.flatten(b.avgpool(maps), 1)), maps


@dataclass
class Bundle:
    folder: Path
    meta: dict              # bundle.json
    model: BundleModel      # on the CPU, eval mode

    @property
    def tasks(self) -> list[str]:
        return list(self.meta["tasks"])

    @property
    def thresholds(self) -> np.ndarray:  # (T,)
        return np.array([self.meta["thresholds"][t]["threshold"] for t in self.tasks], dtype=np.float64)


def build_model(arch: str, in_channels: int, backbone_state: dict, heads: ProbeHeads,
                input_adapter: str) -> BundleModel:
    from trainer.models import build_backbone
    backbone, _ = build_backbone(arch, in_channels, "random")
    try:
        backbone.load_state_dict(backbone_state, strict=True)
    except RuntimeError as e:
        raise BundleError(f"backbone weights do not fit {arch} ({str(e).splitlines()[0][:160]})") from None
    adapter = None
    if input_adapter == "imagenet":
        from eval.imagenet_input import ImageNetInput
        adapter = ImageNetInput(in_channels)
    return BundleModel(backbone, heads, adapter).eval()


def write_bundle(folder: Path, model_doc: dict, meta: dict, card: str) -> None:
    """Write the three files into a sibling temp folder and rename it into place (a half-written bundle never
    has the final name). ``model_doc`` holds tensors only; its sha256 is recorded in bundle.json."""
    import shutil
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"format": BUNDLE_FORMAT, **model_doc}, tmp / MODEL_FILE)
    meta = {**meta, "model_sha256": _sha256(tmp / MODEL_FILE)}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    (tmp / CARD_FILE).write_text(card)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def load_bundle(folder: str | Path) -> Bundle:
    """Read and check a bundle; BundleError (one line) when it is not one."""
    folder = Path(folder)
    if not (folder / META_FILE).is_file() or not (folder / MODEL_FILE).is_file():
        raise BundleError(f"{folder}: not a bundle (needs {META_FILE} and {MODEL_FILE}; "
                          "write one with `python -m eval export`)")
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{folder / META_FILE}: unreadable ({str(e).splitlines()[0]})") from None
    if meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{folder}: bundle format {meta.get('format')!r}, this code reads {BUNDLE_FORMAT}")
    if meta.get("model_sha256") != _sha256(folder / MODEL_FILE):
        raise BundleError(f"{folder / MODEL_FILE}: sha256 differs from the one in {META_FILE} (modified or corrupt)")
    try:
        doc = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise BundleError(f"{folder / MODEL_FILE}: unreadable ({type(e).__name__})") from None
    heads = ProbeHeads(doc["head_weight"], doc["head_bias"], doc["feature_mean"], doc["feature_std"])
    arch = meta["encoder"]
    model = build_model(arch["arch"], int(arch["in_channels"]), doc["backbone"], heads, arch["input_adapter"])
    if heads.weight.shape[0] != len(meta["tasks"]):
        raise BundleError(f"{folder}: {heads.weight.shape[0]} heads for {len(meta['tasks'])} tasks")
    return Bundle(folder, meta, model)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
