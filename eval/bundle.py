"""The exported classifier bundle: one folder with model.pt (weights only), bundle.json (tasks, view, metrics,
thresholds, provenance) and a generated README.md model card; plus the linear probes' heads.pt that `eval linear`
leaves beside its results so that `eval export` can build a bundle from them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ingest.errors import one_line
from ingest.files import atomic_write, sha256_file
BUNDLE_FORMAT = "cxr-ssl-bundle/2"  # /2: thresholds[task].validated
HEADS_FORMAT = "cxr-ssl-linear-heads/1"
MODEL_FILE, META_FILE, CARD_FILE = "model.pt", "bundle.json", "README.md"
VIEWS = ("center", "full")


class BundleError(ValueError):
    """A bundle folder that is missing, incomplete or does not match its own description (one-line message)."""


def save_linear_heads(path: Path, probe, tasks: list[str], val_targets: np.ndarray | None,
                      val_pids: np.ndarray | None = None) -> None:
    """``eval linear``'s probes as plain tensors: weight (T, D) (NaN rows = task not trained), bias (T,), the
    training-feature standardisation (D,), and the chosen probes' validation scores with their targets and patient
    ids (export's patient-bootstrap CI of the validation AUROC)."""
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
        if val_pids is not None:
            doc["val_pids"] = [str(p) for p in val_pids]
    with atomic_write(path) as f:
        torch.save(doc, f)


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


# What a bundle's saliency map is (Bundle.saliency, Prediction.saliency) and how the page names it.
SALIENCY_TEXT = {
    "cam": "class activation map (= Grad-CAM for a linear head on pooled features)",
    "attention": "attention map: the last block's CLS-token attention to each patch, averaged over heads "
                 "(one map for every finding)",
}


def saliency_of(vit_features: str | None) -> str:
    """"cam" for a ResNet and for a ViT probed on its mean patch token (a linear head on average-pooled maps, as the
    ResNet's); "attention" for a ViT probed on its CLS token (alone or with the mean), which has no such map."""
    return "cam" if vit_features in (None, "mean") else "attention"


class BundleModel(torch.nn.Module):
    """ResNet trunk (fc = Identity) or ViT trunk + ProbeHeads; ``forward`` returns logits, the features the heads
    read and a saliency map per task (``saliency``: "cam" or "attention", see saliency_of)."""

    def __init__(self, backbone: torch.nn.Module, heads: ProbeHeads, input_adapter: torch.nn.Module | None = None,
                 vit_features: str | None = None):
        super().__init__()
        self.backbone, self.heads, self.vit_features = backbone, heads, vit_features
        self.input_adapter = input_adapter if input_adapter is not None else torch.nn.Identity()
        self.saliency = saliency_of(vit_features)
        if vit_features is not None:
            import threading
            # The last block's attention input, kept per thread (Predictor.predict runs in several threads): the
            # attention weights are recomputed from it, leaving timm's fused attention and the outputs untouched.
            self._attn_input = threading.local()
            backbone.blocks[-1].attn.register_forward_pre_hook(self._keep_attn_input)

    def _keep_attn_input(self, module, args) -> None:
        self._attn_input.x = args[0]

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, S, S) -> (B, D): what the heads read
        return self.forward(x)[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, S, S) -> logits (B, T), features (B, D), saliency (B, T, h, w)."""
        x = self.input_adapter(x)
        if self.vit_features is not None:
            return self._vit(x)
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        maps = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        feats = torch.flatten(b.avgpool(maps), 1)
        return self.heads(feats), feats, self.heads.class_activation(maps)

    def _vit(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from trainer.vit import pool_tokens
        vit = self.backbone
        h, w = vit.patch_embed.dynamic_feat_size(x.shape[-2:])
        tokens = vit.forward_features(x)  # (B, prefix + h * w, D) after the final norm
        feats = pool_tokens(tokens, vit.num_prefix_tokens, self.vit_features)
        logits = self.heads(feats)
        if self.saliency == "cam":  # mean of the patch tokens into a linear head: each patch's logit contribution
            patches = tokens[:, vit.num_prefix_tokens:].transpose(1, 2).reshape(len(x), -1, h, w)
            return logits, feats, self.heads.class_activation(patches)
        att = cls_attention(vit.blocks[-1].attn, self._attn_input.x, vit.num_prefix_tokens)
        self._attn_input.x = None
        return logits, feats, att.reshape(len(x), 1, h, w).expand(-1, logits.shape[1], -1, -1)


def cls_attention(attn: torch.nn.Module, x: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """(B, N, D) input of a timm Attention (after the block's norm1) -> (B, P) the CLS token's attention to the P
    patch tokens, averaged over heads and renormalised over the patches (register tokens and the CLS token's
    attention to itself left out): a distribution over patches, summing to 1 per image."""
    n, heads = x.shape[1], attn.num_heads
    q, k, _ = attn.qkv(x).reshape(len(x), n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, 1, N): CLS row
    cls_to_patch = weights[:, :, 0, num_prefix_tokens:].mean(dim=1)  # (B, P)
    return cls_to_patch / cls_to_patch.sum(dim=1, keepdim=True)


@dataclass
class Bundle:
    folder: Path
    meta: dict              # bundle.json
    model: BundleModel      # on the CPU, eval mode

    @property
    def tasks(self) -> list[str]:
        return list(self.meta["tasks"])

    @property
    def thresholds(self) -> np.ndarray:  # (T,); NaN where the task is not validated (no flag is ever raised)
        return np.array([np.nan if self.meta["thresholds"][t]["threshold"] is None
                         else self.meta["thresholds"][t]["threshold"] for t in self.tasks], dtype=np.float64)

    @property
    def vit_features(self) -> str | None:  # a ViT bundle's feature choice; None for a ResNet bundle
        return self.meta["encoder"].get("vit_features")

    @property
    def saliency(self) -> str:  # "cam" | "attention": what Prediction.cams holds (SALIENCY_TEXT names it)
        return saliency_of(self.vit_features)

    @property
    def validated(self) -> np.ndarray:  # (T,) bool: the task's validation AUROC CI lies above 0.5
        return np.array([bool(self.meta["thresholds"][t]["validated"]) for t in self.tasks], dtype=bool)


def build_model(arch: str, in_channels: int, backbone_state: dict, heads: ProbeHeads,
                input_adapter: str, *, source: str | Path = "backbone", vit_features: str | None = None) -> BundleModel:
    """The bundle's network (``vit_features``: a ViT's feature choice, None for a ResNet); ``source`` (the file the
    backbone came from) names it in a one-line BundleError."""
    from trainer.encoder_io import EncoderError, encoder_from_state
    from trainer.vit import vit_feature_dim
    try:
        enc = encoder_from_state(backbone_state, arch, in_channels, source=source)
    except EncoderError as e:
        raise BundleError(str(e)) from None
    dim = enc.feature_dim if vit_features is None else vit_feature_dim(enc.model, vit_features)
    if heads.weight.shape[1] != dim:
        raise BundleError(f"{source}: heads read {heads.weight.shape[1]} features, the encoder gives {dim}")
    adapter = None
    if input_adapter == "imagenet":
        from eval.imagenet_input import ImageNetInput
        adapter = ImageNetInput(in_channels)
    return BundleModel(enc.model, heads, adapter, vit_features).eval()


def write_bundle(folder: Path, model_doc: dict, meta: dict, card: str) -> None:
    """Write the three files into a sibling temp folder and rename it into place (a half-written bundle never
    has the final name). ``model_doc`` holds tensors only; its sha256 is recorded in bundle.json."""
    import shutil
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"format": BUNDLE_FORMAT, **model_doc}, tmp / MODEL_FILE)
    meta = {**meta, "model_sha256": sha256_file(tmp / MODEL_FILE)}
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
        raise BundleError(f"{folder / META_FILE}: unreadable ({one_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise BundleError(f"{folder}: bundle format {found!r}, this code reads {BUNDLE_FORMAT} "
                          "(export it again with `python -m eval export`)")
    check_meta(meta, folder / META_FILE)
    if meta.get("model_sha256") != sha256_file(folder / MODEL_FILE):
        raise BundleError(f"{folder / MODEL_FILE}: sha256 differs from the one in {META_FILE} (modified or corrupt)")
    try:
        doc = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        reason = one_line(e, limit_chars=120, with_type=True)
        raise BundleError(f"{folder / MODEL_FILE}: unreadable ({reason})") from None
    missing = [k for k in MODEL_KEYS if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise BundleError(f"{folder / MODEL_FILE}: missing {', '.join(missing)}")
    try:
        heads = ProbeHeads(doc["head_weight"], doc["head_bias"], doc["feature_mean"], doc["feature_std"])
    except (AttributeError, TypeError) as e:
        raise BundleError(f"{folder / MODEL_FILE}: heads are not tensors ({one_line(e)})") from None
    arch = meta["encoder"]
    model = build_model(arch["arch"], int(arch["in_channels"]), doc["backbone"], heads, arch["input_adapter"],
                        source=folder / MODEL_FILE, vit_features=arch.get("vit_features"))
    if heads.weight.shape[0] != len(meta["tasks"]):
        raise BundleError(f"{folder}: {heads.weight.shape[0]} heads for {len(meta['tasks'])} tasks")
    return Bundle(folder, meta, model)


MODEL_KEYS = ("backbone", "head_weight", "head_bias", "feature_mean", "feature_std")
# What predict and serve read from bundle.json: dotted path ("*" = every task) -> the JSON types it may hold.
_NUM, _INT, _STR = (int, float), (int,), (str,)
META_KEYS = {"protocol": _STR, "threshold_rule": _STR, "encoder.name": _STR, "encoder.arch": _STR,
             "encoder.in_channels": _INT, "encoder.input_adapter": _STR, "view.mode": _STR, "view.image_size": _INT,
             "normalisation.mean": _NUM, "normalisation.std": _NUM, "ingest.size": _INT, "ingest.quality": _INT,
             "metrics.*.test_auroc": _NUM + (type(None),), "metrics.*.test_auroc_ci": (list, type(None)),
             "thresholds.*.threshold": _NUM + (type(None),), "thresholds.*.validated": (bool,)}


def check_meta(meta: dict, path: Path) -> None:
    """BundleError naming the first missing or mistyped key of bundle.json, before anything reads it."""
    tasks = meta.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise BundleError(f"{path}: 'tasks' must be a non-empty list of names")
    keys = dict(META_KEYS)
    if isinstance(meta.get("view"), dict) and meta["view"].get("mode") == "center":
        keys["view.resize_size"] = _INT
    for dotted, types in keys.items():
        for task in tasks if "*" in dotted else [None]:
            node, where = meta, []
            for part in dotted.split("."):
                where.append(task if part == "*" else part)
                if not isinstance(node, dict) or where[-1] not in node:
                    raise BundleError(f"{path}: missing key '{'.'.join(where)}'")
                node = node[where[-1]]
            if not isinstance(node, types) or (isinstance(node, bool) and bool not in types):
                raise BundleError(f"{path}: key '{'.'.join(where)}' holds {type(node).__name__} "
                                  f"({' or '.join(k.__name__ for k in types)} expected)")
    _check_vit_features(meta["encoder"], path)
    if meta["view"]["mode"] not in VIEWS:
        raise BundleError(f"{path}: view.mode {meta['view']['mode']!r} is not one of {', '.join(VIEWS)}")
    for t in tasks:
        th = meta["thresholds"][t]
        if th["validated"] and th["threshold"] is None:
            raise BundleError(f"{path}: thresholds.{t}: a validated task needs a threshold")


def _check_vit_features(encoder: dict, path: Path) -> None:
    """encoder.vit_features: one of VIT_FEATURES for a vit_* arch; absent (or null) for a ResNet, as in every bundle
    written before ViTs could be exported."""
    from trainer.vit import VIT_FEATURES, is_vit
    value = encoder.get("vit_features")
    if is_vit(encoder["arch"]):
        if value not in VIT_FEATURES:
            raise BundleError(f"{path}: encoder.vit_features {value!r} is not one of {', '.join(VIT_FEATURES)}")
    elif value is not None:
        raise BundleError(f"{path}: encoder.vit_features {value!r} given for a {encoder['arch']} (vit_* only)")
