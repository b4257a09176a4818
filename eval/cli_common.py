"""What every `python -m eval` protocol shares: the encoders and tasks of a run, its device (resolved once), label
policy, transform and feature path, the provenance recorded in each result, and guarded, atomic result files."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from eval.arg_types import UsageError
from eval.devices import resolve_device
from eval.features import EncoderSpec, Transform, encoder_hash, encoder_spec, extract_features
from eval.labels import LabelPolicy, resolve_tasks
from ingest.files import atomic_write, atomic_write_text
from ingest.remote import RemoteError, is_remote, local_folder
from ingest.schema import load_manifest


def encoders(args) -> list[EncoderSpec]:
    vit = getattr(args, "vit_features", "cls")
    specs = [encoder_spec(e, arch=args.arch, in_channels=args.in_channels, seed=args.seed, vit_features=vit)
             for e in args.encoder]
    specs += [encoder_spec(init=i, arch=args.arch or "resnet50", in_channels=args.in_channels, seed=args.seed,
                           vit_features=vit) for i in args.init]
    if not specs:
        raise UsageError("no encoder: give --encoder PATH and/or --init random|imagenet")
    if vit != "cls" and all(s.vit_features is None for s in specs):
        # A ResNet has no tokens to pool; a run that also holds a ViT applies the choice to the ViT only.
        raise UsageError(f"--vit-features {vit} applies to vit_* encoders only; {specs[0].name} is a {specs[0].arch}")
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UsageError(f"two encoders share the name '{sorted(dup)[0]}' (run folders with the same name); "
                         "evaluate them into separate --out folders")
    return specs


def guard_outputs(paths: list[Path], overwrite: bool) -> None:
    for path in paths:
        if path.exists() and not overwrite:
            raise UsageError(f"{path}: finished output exists; pass --overwrite to replace it")


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default))


def json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, (Path,)):
        return str(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def save_predictions(path: Path, preds: dict, tasks: list[str]) -> None:
    with atomic_write(path) as f:
        np.savez(f, targets=preds["targets"], scores=preds["scores"], pids=preds["pids"], tasks=np.array(tasks))


def run_context(args, spec: EncoderSpec, tasks: list[str]) -> dict:
    return {"encoder": {"name": spec.name, "category": spec.category, "kind": spec.kind, "arch": spec.arch,
                        "in_channels": spec.in_channels, "path": str(spec.path) if spec.path else None,
                        "seed": spec.seed if spec.kind == "random" else None, "sha256": encoder_hash(spec),
                        "vit_features": spec.vit_features},
            "shards": shards_record(args), "task_names": tasks, "device": args.device,
            "label_policy": policy_of(args).to_json(), "eval_view": args.eval_view,
            "transform": transform_of(args).as_dict(),
            "argv": getattr(args, "argv", sys.argv[1:]), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def transform_of(args) -> Transform:
    resize = args.resize_size or int(round(args.image_size * 8 / 7))
    return Transform(args.image_size, resize, view=args.eval_view)


def policy_of(args) -> LabelPolicy:
    return LabelPolicy(blank=args.blank, uncertain=args.uncertainty)


def features_of(args, spec: EncoderSpec, split: str):
    return extract_features(spec, args.shards, split, device=args.device, transform=transform_of(args),
                            batch_size=args.batch_size, cache_dir=args.cache, num_threads=args.num_threads, log=log)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def local_shards(args, location) -> Path:
    """A --shards / --target-shards / --add-shards value as a local folder: an s3:// location is staged into
    --shards-cache (each shard checked against the manifest's sha256 first; see ingest/remote.py)."""
    try:
        return local_folder(location, getattr(args, "shards_cache", None), endpoint=getattr(args, "s3_endpoint", None))
    except RemoteError as e:
        raise UsageError(str(e)) from None


def shards_record(args, which: str = "shards") -> str:
    """How results name a shard location: an s3:// location as given (portable), a local folder resolved."""
    return getattr(args, f"{which}_location", None) or str(Path(getattr(args, which)).resolve())


def prepare(args) -> tuple[list[EncoderSpec], list[str]]:
    if is_remote(args.shards):
        args.shards_location, args.shards = str(args.shards), local_shards(args, args.shards)
    manifest = load_manifest(args.shards)
    tasks = resolve_tasks(args.tasks, manifest.label_names, source=str(args.shards))
    for split in ("train", "val", "test"):
        if split not in manifest.splits():
            raise UsageError(f"{args.shards}: split '{split}' is empty or missing; "
                             "the protocols need train, val and test")
    args.device = resolve_device(args.device)  # once: every later step reads 'cpu' or 'gpu' from here
    args.cache = args.cache or args.out / "cache"
    return encoders(args), tasks


def probe_options(args) -> dict:
    backend = args.probe_backend
    if backend == "auto":
        backend = "torch" if args.device == "gpu" else "sklearn"
    return {"backend": backend, "device": args.device}


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def fmt_ci(ci) -> str:
    return "n/a" if not ci or ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"
