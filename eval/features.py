"""Encoders to evaluate (a run's encoder.pt, seeded random init, offline ImageNet weights; read by
`trainer.encoder_io`) and frozen-feature extraction through the dali_pipes evaluation loader, cached under (encoder
hash, manifest hash, transform, a ViT's feature choice)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from eval.devices import dali_device_id, torch_device
from ingest.files import atomic_write, sha256_file
from ingest.schema import MANIFEST_NAME, load_manifest

CACHE_VERSION = 1
CATEGORY = {"checkpoint": "SSL", "random": "Scratch", "imagenet": "ImageNet"}


class EncoderError(ValueError):
    """An encoder that cannot be built or does not match the requested model config (one-line message)."""


@dataclass(frozen=True)
class EncoderSpec:
    kind: str                 # "checkpoint" | "random" | "imagenet"
    arch: str
    in_channels: int
    name: str                 # display name: run folder name, "random-resnet18", "imagenet-resnet50"
    path: Path | None = None  # the encoder.pt (or step-*.pt) for kind == "checkpoint"
    seed: int = 0             # init seed for kind == "random"
    vit_features: str | None = None  # a vit_* arch's frozen features (trainer.vit.VIT_FEATURES); None for a ResNet

    @property
    def category(self) -> str:
        return CATEGORY[self.kind]


def encoder_spec(encoder: str | Path | None = None, init: str | None = None, *, arch: str | None = None,
                 in_channels: int | None = None, seed: int = 0, name: str | None = None,
                 vit_features: str | None = None) -> EncoderSpec:
    """Describe one encoder: exactly one of ``encoder`` (an encoder.pt, a run folder holding one, or a training
    checkpoint) or ``init`` ("random" | "imagenet"). For a file, ``arch`` / ``in_channels`` when given must match it.
    ``vit_features`` (default "cls") is what a vit_* encoder hands to the probes; a ResNet ignores it."""
    if (encoder is None) == (init is None):
        raise EncoderError("give exactly one of --encoder PATH or --init random|imagenet")
    if encoder is not None:
        # read (and built) now: weights that do not fit their declared model fail before any encoder is evaluated
        enc = _read(encoder, arch=arch, in_channels=in_channels)
        run_name = enc.path.parent.name if enc.path.name == "encoder.pt" else enc.path.stem
        return EncoderSpec("checkpoint", enc.arch, enc.in_channels, name or run_name, path=enc.path,
                           vit_features=_features_for(enc.arch, vit_features))
    if init not in ("random", "imagenet"):
        raise EncoderError(f"unknown --init '{init}' (choose random or imagenet)")
    arch = arch or "resnet50"
    ch = in_channels if in_channels is not None else (1 if init == "random" else 3)
    if init == "imagenet":
        imagenet_weights_file(arch)  # fail before any encoder is evaluated, not halfway through a run
    return EncoderSpec(init, arch, ch, name or f"{init}-{arch}", seed=seed,
                       vit_features=_features_for(arch, vit_features))


def _features_for(arch: str, vit_features: str | None) -> str | None:
    """A vit_* arch's feature choice (default "cls"), checked; None for any other arch."""
    from trainer.vit import VIT_FEATURES, is_vit
    if not is_vit(arch):
        return None
    if (vit_features or "cls") not in VIT_FEATURES:
        raise EncoderError(f"unknown ViT features {vit_features!r} (choose from {', '.join(VIT_FEATURES)})")
    return vit_features or "cls"


def imagenet_weights_file(arch: str) -> Path:
    """The cached ImageNet weights file of ``arch`` (`trainer.encoder_io`'s one check); EncoderError when absent."""
    from trainer import encoder_io
    try:
        return encoder_io.imagenet_weights_file(arch)
    except encoder_io.EncoderError as e:
        raise EncoderError(str(e)) from None


def read_spec(spec: EncoderSpec):
    """The `trainer.encoder_io.Encoder` record of ``spec``: the plain backbone (no ImageNet input adapter), CPU."""
    source = spec.path if spec.kind == "checkpoint" else spec.kind
    seed = spec.seed if spec.kind == "random" else None
    return _read(source, arch=spec.arch, in_channels=spec.in_channels, seed=seed)


def _read(source, **options):
    """`trainer.encoder_io.read_encoder` with its one-line errors as this CLI's EncoderError (torch loads here)."""
    from trainer import encoder_io
    try:
        return encoder_io.read_encoder(source, **options)
    except encoder_io.EncoderError as e:
        raise EncoderError(str(e)) from None


def build_encoder(spec: EncoderSpec):
    """(backbone nn.Module with fc = Identity, feature_dim) for ``spec``, on the CPU, in eval mode; ImageNet weights
    come behind the input adapter that maps CXR-normalised images to ImageNet's statistics; a ViT comes wrapped in
    `trainer.vit.ViTFeatures` returning ``spec.vit_features`` (its state dict then prefixes the names "backbone.")."""
    enc = read_spec(spec)
    model = enc.model
    if spec.vit_features is not None:
        from trainer.vit import ViTFeatures
        model = ViTFeatures(model, spec.vit_features)
        return model.eval(), model.feature_dim
    if spec.kind == "imagenet":
        import torch

        from eval.imagenet_input import ImageNetInput
        model = torch.nn.Sequential(ImageNetInput(spec.in_channels), model)
    return model.eval(), enc.feature_dim


def encoder_hash(spec: EncoderSpec) -> str:
    """Content hash of the weights: the file's sha256, or the recipe for a seeded random init."""
    if spec.kind == "checkpoint":
        return sha256_file(spec.path)
    if spec.kind == "random":
        import torch
        key = f"random:{spec.arch}:{spec.in_channels}:{spec.seed}:torch{torch.__version__}"
        return hashlib.sha256(key.encode()).hexdigest()
    weights_sha256 = sha256_file(imagenet_weights_file(spec.arch))
    return hashlib.sha256(f"imagenet:{spec.in_channels}:".encode() + weights_sha256.encode()).hexdigest()


@dataclass
class FeatureSet:
    features: np.ndarray      # (N, D) float32
    labels: np.ndarray        # (N, L) float32 raw: 1 / 0 / -1 uncertain / NaN blank
    pids: np.ndarray          # (N,) int64
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.pids)


EVAL_VIEWS = ("full", "center")


@dataclass(frozen=True)
class Transform:
    """The deterministic eval view: ``full`` squashes the whole film to image_size x image_size; ``center`` resizes
    the shorter side to resize_size and centre-crops image_size (resize_size is unused by ``full``)."""
    image_size: int = 224
    resize_size: int = 256
    view: str = "full"

    def __post_init__(self):
        if self.view not in EVAL_VIEWS:
            raise ValueError(f"unknown eval view '{self.view}' (choose from {', '.join(EVAL_VIEWS)})")

    def as_dict(self) -> dict:
        if self.view == "full":
            return {"eval_view": "full", "image_size": self.image_size}
        return {"eval_view": "center", "image_size": self.image_size, "resize_size": self.resize_size}


def feature_cache_key(spec: EncoderSpec, shard_root: Path, split: str, transform: Transform,
                      device: str = "cpu") -> str:
    # The device is part of the key: GPU decoding (nvJPEG) and bf16 autocast give slightly different features.
    # A ViT's feature choice is part of the key (CLS and mean-token features never share an entry); a ResNet's key
    # has no such field, so its existing cache entries stay valid.
    manifest_sha = sha256_file(Path(shard_root) / MANIFEST_NAME)
    vit = {} if spec.vit_features is None else {"vit_features": spec.vit_features}
    blob = json.dumps({"v": CACHE_VERSION, "encoder": encoder_hash(spec), "manifest": manifest_sha, "split": split,
                       "channels": spec.in_channels, "device": device, **vit, **transform.as_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def eval_loader(shard_root: Path, split: str, *, batch_size: int, device: str, transform: Transform, channels: int,
                num_threads: int = 2):
    """The dali_pipes deterministic evaluation loader for one split (single rank)."""
    import dali_pipes
    return dali_pipes.build_eval_loader(str(shard_root), split, batch_size=batch_size, device=device,
                                        image_size=transform.image_size, resize_size=transform.resize_size,
                                        view=transform.view, channels=channels, num_threads=num_threads,
                                        device_id=dali_device_id(device))


def iterate_valid(loader):
    """Yield (images, raw labels, pids) per batch with the loader's padding rows (valid=False) dropped."""
    for batch in loader:
        valid = batch["valid"].bool()
        if bool(valid.all()):
            yield batch["images"], batch["labels"], batch["pids"]
        elif bool(valid.any()):
            idx = valid.nonzero().squeeze(1).to(batch["images"].device)
            yield (batch["images"][idx], batch["labels"][valid.to(batch["labels"].device)],
                   batch["pids"][valid.to(batch["pids"].device)])


def extract_features(spec: EncoderSpec, shard_root: str | Path, split: str, *, device: str = "cpu",
                     transform: Transform = Transform(), batch_size: int = 64, cache_dir: str | Path | None = None,
                     num_threads: int = 2, model=None, loader_factory: Callable | None = None, log=print) -> FeatureSet:
    """Frozen features of every image in ``split`` (each exactly once), from the cache when present.

    ``model`` reuses an already-built encoder; ``loader_factory(shard_root, split, **kw)`` replaces the DALI
    evaluation loader (same batch dict contract)."""
    import torch
    shard_root = Path(shard_root)
    manifest = load_manifest(shard_root)
    cache_path = None
    if cache_dir is not None:
        key = feature_cache_key(spec, shard_root, split, transform, device)
        cache_path = Path(cache_dir) / f"{spec.name}-{split}-{key}.npz"
        if cache_path.is_file():
            with np.load(cache_path) as z:
                return FeatureSet(z["features"], z["labels"], z["pids"], [str(s) for s in z["label_names"]])
    if model is None:
        model, _ = build_encoder(spec)
    dev = torch_device(device)
    model = model.to(dev).eval()
    make = loader_factory or eval_loader
    loader = make(shard_root, split, batch_size=batch_size, device=device, transform=transform,
                  channels=spec.in_channels, num_threads=num_threads)
    feats, labels, pids = [], [], []
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        for images, lbl, pid in iterate_valid(loader):
            feats.append(model(images.to(dev, non_blocking=True)).float().cpu().numpy())
            labels.append(lbl.float().cpu().numpy())
            pids.append(pid.cpu().numpy().astype(np.int64))
    expected = manifest.num_samples(split)
    n = sum(len(p) for p in pids)
    if n != expected:
        raise RuntimeError(f"{shard_root}/{split}: loader yielded {n} images, manifest lists {expected}")
    fs = FeatureSet(np.concatenate(feats).astype(np.float32), np.concatenate(labels).astype(np.float32),
                    np.concatenate(pids), manifest.label_names)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache_path) as f:  # a killed run never leaves a truncated cache entry
            np.savez(f, features=fs.features, labels=fs.labels, pids=fs.pids,
                     label_names=np.array(fs.label_names))
        log(f"cached {n} x {fs.features.shape[1]} features of {spec.name}/{split} -> {cache_path}")
    return fs
