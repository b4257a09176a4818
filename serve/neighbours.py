"""The k most similar training images: the bundle's pooled encoder features of a shard split, cosine similarity."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LABEL_TEXT = {1.0: "positive", 0.0: "negative", -1.0: "uncertain", None: "not mentioned"}


@dataclass
class NeighbourIndex:
    features: np.ndarray          # (N, D) L2-normalised
    keys: list[str]
    labels: list[dict[str, str]]  # per image: task -> positive | negative | uncertain | not mentioned
    jpegs: list[bytes]            # the shard's own (already de-identified, resized) JPEG

    @classmethod
    def build(cls, predictor, shards: Path, *, split: str = "train", max_images: int = 2000, batch_size: int = 64,
              log=print) -> "NeighbourIndex":
        import json

        import torch
        from PIL import Image

        from eval.predict import view_tensor
        from ingest.schema import load_manifest
        from ingest.shards import iter_shard
        meta = predictor.bundle.meta
        tasks = predictor.bundle.tasks
        feats, keys, labels, jpegs, pending = [], [], [], [], []

        def flush():
            if pending:
                feats.append(predictor.predict(torch.stack(pending)).features)
                pending.clear()
        for shard in load_manifest(shards).shards(split):
            for s in iter_shard(shard.path):
                if len(keys) >= max_images:
                    break
                gray = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("L"))
                pending.append(view_tensor(gray, meta["view"], meta["normalisation"], predictor.channels))
                raw = json.loads(s["json"]).get("labels", {})
                keys.append(s["__key__"])
                labels.append({t: LABEL_TEXT.get(raw.get(t), str(raw.get(t))) for t in tasks})
                jpegs.append(s["jpg"])
                if len(pending) >= batch_size:
                    flush()
        flush()
        if not keys:
            raise ValueError(f"{shards}: split '{split}' has no images")
        f = np.concatenate(feats)
        f /= np.linalg.norm(f, axis=1, keepdims=True).clip(min=1e-12)
        log(f"neighbours: {len(keys)} {split} images of {shards} indexed")
        return cls(f.astype(np.float32), keys, labels, jpegs)

    def query(self, feature: np.ndarray, k: int) -> list[dict]:
        q = feature / max(float(np.linalg.norm(feature)), 1e-12)
        sims = self.features @ q.astype(np.float32)  # (N,)
        top = np.argsort(-sims, kind="stable")[:k]
        return [{"key": self.keys[i], "similarity": float(sims[i]), "labels": self.labels[i], "jpeg": self.jpegs[i]}
                for i in top]
