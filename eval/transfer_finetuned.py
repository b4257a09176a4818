"""Distribution shift for end-to-end fine-tuned models: the checkpoint `python -m eval finetune` selected on the
source's validation split scores the source test split and the target shards, unchanged.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from eval.devices import torch_device
from eval.features import EncoderError, EncoderSpec, Transform, build_encoder, eval_loader, iterate_valid
from eval.transfer import Scored
from ingest.schema import load_manifest


def load_finetuned(path: Path, spec: EncoderSpec):
    """(backbone, head, tasks) of a fine-tuned checkpoint written for ``spec``; EncoderError (one line) when the
    file is missing or belongs to another encoder."""
    import torch
    if not path.is_file():
        raise EncoderError(f"{path}: no fine-tuned checkpoint; run `python -m eval finetune` for {spec.name} first")
    doc = torch.load(path, map_location="cpu", weights_only=True)
    if doc.get("encoder") != spec.name or doc.get("arch") != spec.arch:
        raise EncoderError(f"{path}: checkpoint of {doc.get('encoder')} ({doc.get('arch')}), "
                           f"not of {spec.name} ({spec.arch})")
    saved = doc.get("vit_features") or ("cls" if spec.vit_features is not None else None)  # older files: CLS
    if saved != spec.vit_features:
        raise EncoderError(f"{path}: fine-tuned on ViT features {saved!r}, not {spec.vit_features!r} (--vit-features)")
    model, dim = build_encoder(spec)
    backbone = doc["backbone"]
    if spec.kind == "imagenet":  # saved without the ImageNet input adapter's Sequential prefix
        backbone = {f"1.{k}": v for k, v in backbone.items()}
    if spec.vit_features is not None:  # saved without ViTFeatures' prefix
        backbone = {f"backbone.{k}": v for k, v in backbone.items()}
    model.load_state_dict(backbone)
    head = torch.nn.Linear(dim, len(doc["tasks"]))
    head.load_state_dict(doc["head"])
    return model.eval(), head.eval(), list(doc["tasks"])


def score_split(model, head, shard_root: Path, splits: list[str], columns: list[int], *, spec: EncoderSpec,
                transform: Transform, device: str, batch_size: int, num_threads: int) -> Scored:
    """sigmoid(head(model(x))) columns ``columns`` for every image of ``splits`` of ``shard_root``."""
    import torch
    dev = torch_device(device)
    model, head = model.to(dev), head.to(dev)
    scores, raw, pids = [], [], []
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        for split in splits:
            loader = eval_loader(shard_root, split, batch_size=batch_size, device=device, transform=transform,
                                 channels=spec.in_channels, num_threads=num_threads)
            for images, lbl, pid in iterate_valid(loader):
                p = torch.sigmoid(head(model(images.to(dev))).float())[:, columns]
                scores.append(p.cpu().numpy().astype(np.float64))
                raw.append(lbl.float().cpu().numpy())
                pids.append(pid.cpu().numpy().astype(np.int64))
    return Scored(np.concatenate(raw), load_manifest(shard_root).label_names, np.concatenate(pids),
                  np.concatenate(scores))
