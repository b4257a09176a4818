"""Encoders to evaluate (a run's encoder.pt, seeded random init, offline ImageNet weights) and frozen-feature
extraction through the dali_pipes evaluation loader, cached under (encoder hash, manifest hash, transform).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from eval.devices import dali_device_id, torch_device
from ingest.errors import one_line
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
    path: Path | None = None  # the encoder.pt for kind == "checkpoint"
    seed: int = 0             # init seed for kind == "random"

    @property
    def category(self) -> str:
        return CATEGORY[self.kind]


def _read_encoder_meta(path: Path) -> dict:
    import torch
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise EncoderError(f"{path}: not a readable encoder checkpoint "
                           f"({one_line(e, limit_chars=120, with_type=True)})") from e
    if not isinstance(obj, dict) or "state_dict" not in obj or "arch" not in obj:
        raise EncoderError(f"{path}: not an encoder.pt (expected keys arch, in_channels, state_dict)")
    return obj


def encoder_spec(encoder: str | Path | None = None, init: str | None = None, *, arch: str | None = None,
                 in_channels: int | None = None, seed: int = 0, name: str | None = None) -> EncoderSpec:
    """Describe one encoder: exactly one of ``encoder`` (path to encoder.pt or a run folder holding one) or
    ``init`` ("random" | "imagenet"). For a checkpoint, ``arch`` / ``in_channels`` when given must match it."""
    if (encoder is None) == (init is None):
        raise EncoderError("give exactly one of --encoder PATH or --init random|imagenet")
    if encoder is not None:
        path = Path(encoder)
        if path.is_dir():
            path = path / "encoder.pt"
        if not path.is_file():
            raise EncoderError(f"{path}: encoder file not found")
        meta = _read_encoder_meta(path)
        if arch is not None and meta["arch"] != arch:
            raise EncoderError(f"{path}: encoder is {meta['arch']}, but --arch {arch} was requested")
        ch = int(meta.get("in_channels", 1))
        if in_channels is not None and ch != in_channels:
            raise EncoderError(f"{path}: encoder has {ch} input channel(s), but {in_channels} were requested")
        run_name = path.parent.name if path.name == "encoder.pt" else path.stem
        spec = EncoderSpec("checkpoint", meta["arch"], ch, name or run_name, path=path)
        build_encoder(spec)  # weights that do not fit their declared model fail now, before any encoder is evaluated
        return spec
    if init not in ("random", "imagenet"):
        raise EncoderError(f"unknown --init '{init}' (choose random or imagenet)")
    arch = arch or "resnet50"
    ch = in_channels if in_channels is not None else (1 if init == "random" else 3)
    if init == "imagenet":
        imagenet_weights_file(arch)  # fail before any encoder is evaluated, not halfway through a run
    return EncoderSpec(init, arch, ch, name or f"{init}-{arch}", seed=seed)


def imagenet_weights_file(arch: str) -> Path:
    """The torchvision ImageNet weights of ``arch`` in the local torch hub cache; EncoderError when absent
    (evaluation never downloads)."""
    from trainer.models import imagenet_weights_path
    try:
        path = imagenet_weights_path(arch)
    except ValueError as e:
        raise EncoderError(f"unknown architecture '{arch}' for ImageNet weights") from e
    if not path.is_file():
        raise EncoderError(f"--init imagenet: {arch} ImageNet weights are not in the local torch hub cache ({path}); "
                           f"copy them there from a connected machine (evaluation does not download)")
    return path


def build_encoder(spec: EncoderSpec):
    """(backbone nn.Module with fc = Identity, feature_dim) for ``spec``, on the CPU, in eval mode."""
    import torch
    from trainer import checkpoint, models
    if spec.kind == "checkpoint":
        try:
            model, meta = checkpoint.load_encoder(spec.path, map_location="cpu")
        except ValueError as e:
            raise EncoderError(one_line(e)) from e
        dim = int(meta.get("feature_dim") or _probe_dim(model, spec.in_channels))
    elif spec.kind == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model, dim = models.build_backbone(spec.arch, spec.in_channels, "random")
    else:
        imagenet_weights_file(spec.arch)
        try:
            model, dim = models.build_backbone(spec.arch, spec.in_channels, "imagenet")
        except Exception as e:  # noqa: BLE001 - offline download failures surface as many exception types
            raise EncoderError(f"ImageNet weights for {spec.arch} could not be loaded offline: "
                               f"{one_line(e, limit_chars=160)}") from e
        from eval.imagenet_input import ImageNetInput
        model = torch.nn.Sequential(ImageNetInput(spec.in_channels), model)
    return model.eval(), int(dim)


def _probe_dim(model, in_channels: int) -> int:
    import torch
    with torch.no_grad():
        return int(model(torch.zeros(1, in_channels, 64, 64)).shape[1])


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
    manifest_sha = sha256_file(Path(shard_root) / MANIFEST_NAME)
    blob = json.dumps({"v": CACHE_VERSION, "encoder": encoder_hash(spec), "manifest": manifest_sha, "split": split,
                       "channels": spec.in_channels, "device": device, **transform.as_dict()}, sort_keys=True)
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
