"""The one reader of encoders: `encoder.pt`, a run folder, a training checkpoint `step-*.pt`, a seeded random init
or the cached ImageNet weights -> an `Encoder` record (backbone module, feature dimension, where it came from).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ingest.errors import one_line
from trainer.checkpoint import load_checkpoint
from trainer.models import ARCHS, build_backbone

ENCODER_FILE = "encoder.pt"
KINDS = ("encoder", "training", "random", "imagenet")  # Encoder.kind: what `source` named
_BACKBONE_PREFIXES = ("teacher.backbone.", "encoder_q.backbone.", "backbone.")  # DINO, MoCo, SimCLR / MICLe


class EncoderError(ValueError):
    """An encoder that cannot be read or does not match the requested model (one-line message naming the file)."""


@dataclass
class Encoder:
    model: nn.Module          # torchvision ResNet with fc = Identity, on the CPU, in train mode as built
    feature_dim: int          # width of the pooled features model(x) returns
    arch: str
    in_channels: int
    kind: str                 # one of KINDS
    path: Path | None = None  # the file read: encoder.pt, step-*.pt or the cached ImageNet weights; None for random
    meta: dict = field(default_factory=dict)  # the file's other entries (format, config, step, ...)


def read_encoder(source: str | Path, *, arch: str | None = None, in_channels: int | None = None,
                 seed: int | None = None) -> Encoder:
    """Read ``source``: "random", "imagenet", or the path of an encoder.pt, a run folder (its encoder.pt) or a
    training checkpoint. For a file, ``arch`` / ``in_channels`` when given must match what it holds; "random" and
    "imagenet" need both. ``seed`` seeds a random init without touching the global RNG (None: the global RNG).
    EncoderError (one line naming the file) for anything that cannot be read or does not match."""
    if str(source) in ("random", "imagenet"):
        if arch is None or in_channels is None:
            raise EncoderError(f"a {source} encoder needs an arch and in_channels")
        _check_model(arch, in_channels, str(source))
        if str(source) == "random":
            return _random(arch, in_channels, seed)
        return _imagenet(arch, in_channels)
    path = Path(source)
    if path.is_dir():
        path = path / ENCODER_FILE
    if arch is not None and _is_vit(arch):  # timm / DINOv2 / DINO files as well as ours: trainer.vit reads them
        return _vit_file(path, arch, in_channels if in_channels is not None else 1)
    try:
        doc = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        raise EncoderError(one_line(e)) from None
    kind, state, meta = _parse(path, doc)
    found_arch, found_channels = meta["arch"], meta["in_channels"]
    if (arch is not None and found_arch != arch) or (in_channels is not None and found_channels != in_channels):
        raise EncoderError(f"{path}: encoder is {found_arch} with {found_channels} input channel(s), but "
                           f"{arch or found_arch} with {found_channels if in_channels is None else in_channels} "
                           f"was requested")
    return encoder_from_state(state, found_arch, found_channels, source=path, kind=kind, meta=meta)


def read_init(model_cfg) -> Encoder:
    """The backbone a run starts from: ``model.init`` (random from the global RNG, imagenet, or a path) read as
    ``model.arch`` with ``model.in_channels``."""
    return read_encoder(model_cfg.init, arch=model_cfg.arch, in_channels=model_cfg.in_channels)


def encoder_from_state(state: dict, arch: str, in_channels: int, *, source: str | Path, kind: str = "encoder",
                       meta: dict | None = None) -> Encoder:
    """The backbone ``arch`` with ``in_channels`` holding ``state`` (torchvision names, no fc.*), loaded strictly;
    EncoderError naming ``source`` when the weights do not fit."""
    _check_model(arch, in_channels, str(source))
    if _is_vit(arch):
        from trainer.vit import vit_from_state
        try:
            model = vit_from_state(arch, in_channels, state, str(source))
        except ValueError as e:
            raise EncoderError(one_line(e)) from None
        return Encoder(model, model.feature_dim, arch, in_channels, kind, Path(source), dict(meta or {}))
    model, feature_dim = build_backbone(arch, in_channels)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:  # wrong names or shapes; not a state dict at all
        raise EncoderError(f"{source}: weights do not match {arch} with {in_channels} channel(s) "
                           f"({one_line(e, limit_chars=160)})") from None
    return Encoder(model, feature_dim, arch, in_channels, kind, Path(source), dict(meta or {}))


def imagenet_weights_path(arch: str) -> Path:
    """Where the ImageNet weights of ``arch`` sit in the torch hub cache: torchvision's DEFAULT file, or another
    ImageNet release (e.g. ResNet-50 V1) when only that one is cached; DEFAULT's path when none is."""
    import torchvision

    _check_model(arch, None, "imagenet")
    enum = torchvision.models.get_model_weights(arch)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    candidates = [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]
    paths = [folder / w.url.rsplit("/", 1)[-1] for w in candidates]
    return next((p for p in paths if p.is_file()), paths[0])


def imagenet_weights_file(arch: str) -> Path:
    """The cached ImageNet weights file of ``arch``; EncoderError when absent (nothing here downloads)."""
    path = imagenet_weights_path(arch)
    if not path.is_file():
        raise EncoderError(
            f"{arch} ImageNet weights are not in the local torch hub cache ({path}) and there is no network access "
            f"here: fetch them on a connected machine with `python -c \"import torchvision; "
            f"torchvision.models.{arch}(weights='DEFAULT')\"`, copy the file there, or use a random init")
    return path


def _is_vit(arch: str) -> bool:
    return str(arch).startswith("vit_")


def _vit_file(path: Path, arch: str, in_channels: int) -> Encoder:
    """A ViT from any state dict trainer.vit reads (timm, DINOv2, DINO's teacher, our encoder.pt or checkpoint)."""
    from trainer.vit import build_vit
    _check_model(arch, in_channels, str(path))
    try:
        model, dim = build_vit(arch, in_channels, str(path))
    except (FileNotFoundError, ValueError) as e:
        raise EncoderError(one_line(e)) from None
    return Encoder(model, dim, arch, in_channels, "encoder", path)


def _check_model(arch: str, in_channels: int | None, source: str) -> None:
    if arch not in ARCHS and not _is_vit(arch):
        raise EncoderError(f"{source}: unknown arch {arch!r} (choose from {', '.join(ARCHS)} or a vit_* arch)")
    if in_channels is not None and in_channels not in (1, 3):
        raise EncoderError(f"{source}: in_channels must be 1 or 3, got {in_channels}")


def _random(arch: str, in_channels: int, seed: int | None) -> Encoder:
    if seed is None:
        model, dim = build_backbone(arch, in_channels)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, dim = build_backbone(arch, in_channels)
    return Encoder(model, dim, arch, in_channels, "random", meta={"seed": seed})


def _imagenet(arch: str, in_channels: int) -> Encoder:
    if _is_vit(arch):
        raise EncoderError(f"imagenet: ImageNet weights are for the torchvision ResNets; for {arch} give a local timm "
                           f"state dict as model.init=PATH (nothing here downloads)")
    path = imagenet_weights_file(arch)
    try:
        rgb_state = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        raise EncoderError(one_line(e)) from None
    try:
        model, dim = build_backbone(arch, in_channels, rgb_state=rgb_state)
    except (RuntimeError, TypeError, AttributeError) as e:  # not this arch's ImageNet classifier
        raise EncoderError(f"{path}: not the ImageNet weights of {arch} ({one_line(e, limit_chars=160)})") from None
    return Encoder(model, dim, arch, in_channels, "imagenet", path)


def _parse(path: Path, doc) -> tuple[str, dict, dict]:
    """(kind, backbone state, meta with arch and in_channels) of an encoder.pt or a training checkpoint."""
    if isinstance(doc, dict) and {"arch", "in_channels", "state_dict"} <= set(doc):
        meta = {k: v for k, v in doc.items() if k != "state_dict"}
        meta["in_channels"] = _channels(path, meta["in_channels"])
        return "encoder", doc["state_dict"], meta
    if isinstance(doc, dict) and isinstance(doc.get("model"), dict):
        state = _backbone_state(doc["model"])
        model_cfg = doc.get("config", {}).get("model", {}) if isinstance(doc.get("config"), dict) else {}
        if state and "arch" in model_cfg and "in_channels" in model_cfg:
            meta = {"arch": model_cfg["arch"], "in_channels": _channels(path, model_cfg["in_channels"]),
                    "step": doc.get("step"), "config": doc["config"]}
            return "training", state, meta
    raise EncoderError(f"{path}: not an encoder (expected an encoder.pt with keys arch, in_channels, state_dict, or "
                       f"a training checkpoint whose model holds a backbone and whose config names model.arch)")


def _backbone_state(model_state: dict) -> dict:
    for prefix in _BACKBONE_PREFIXES:
        sub = {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}
        if sub:
            return sub
    return {}


def _channels(path: Path, value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise EncoderError(f"{path}: in_channels {value!r} is not a number") from None
