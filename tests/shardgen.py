"""Small shard folders for tests of the readers (dali_pipes, trainer, eval), written through ingest.shards.

Images are smooth random gray fields with a label-dependent bright disc, so a model can learn something.
"""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from ingest.schema import FORMAT_VERSION, MANIFEST_NAME, SHARD_PATTERN
from ingest.shards import write_shard

LABEL_NAMES = ("Cardiomegaly", "Edema", "Pleural Effusion")


def _image(rng: np.random.Generator, size_px: int, positive: bool) -> bytes:
    h, w = size_px, int(size_px * 1.2)
    low = rng.normal(0, 1, (h // 8 + 1, w // 8 + 1))
    img = np.asarray(Image.fromarray(low.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))
    yy, xx = np.mgrid[0:h, 0:w]
    radius = (0.3 if positive else 0.15) * h
    img = img + 2.5 * (((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < radius**2)
    img = np.clip((img - img.min()) / (np.ptp(img) + 1e-6) * 255, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shards(
    out: Path,
    num_patients: int = 12,
    images_per_patient: tuple[int, ...] = (1, 2, 3),
    splits: dict[str, float] | None = None,
    samples_per_shard: int = 8,
    size_px: int = 64,
    seed: int = 0,
) -> Path:
    """Write ``out/{train,val,test}/shard-*.tar`` (+ .idx) and ``out/manifest.json``; returns ``out``.

    Patients cycle through ``images_per_patient`` counts; each patient goes to one split (fractions of patients).
    """
    splits = splits or {"train": 0.5, "val": 0.25, "test": 0.25}
    rng = np.random.default_rng(seed)
    out = Path(out)
    patient_split = {}
    order = list(splits)
    cum = np.cumsum([splits[s] for s in order])
    for p in range(num_patients):
        patient_split[p] = order[int(np.searchsorted(cum, (p + 0.5) / num_patients))]
    per_split: dict[str, list[dict]] = {s: [] for s in order}
    for p in range(num_patients):
        count = images_per_patient[p % len(images_per_patient)]
        labels = [float(rng.integers(0, 2)) for _ in LABEL_NAMES]
        if p % 5 == 4:
            labels[1] = float("nan")  # "not mentioned"
        if p % 7 == 6:
            labels[2] = -1.0  # uncertain
        for v in range(count):
            key = f"test-p{p:05d}-s{v + 1}-v1"
            meta = {"dataset": "test", "patient_id": f"p{p:05d}", "study_id": f"s{v + 1}", "view": "PA",
                    "labels": {n: (None if np.isnan(x) else x) for n, x in zip(LABEL_NAMES, labels)},
                    "split": patient_split[p]}
            per_split[patient_split[p]].append({
                "__key__": key,
                "jpg": _image(rng, size_px, labels[0] == 1.0),
                "json": json.dumps(meta, sort_keys=True).encode(),
                "lbl": struct.pack(f"<{len(labels)}f", *labels),
                "pid": struct.pack("<q", p),
            })
    manifest = {"format_version": FORMAT_VERSION, "datasets": ["test"], "label_names": list(LABEL_NAMES),
                "num_patients": num_patients, "splits": {}, "rejects": []}
    for split, samples in per_split.items():
        rng.shuffle(samples)
        shards = []
        for i in range(0, len(samples), samples_per_shard):
            w = write_shard(out / split / SHARD_PATTERN.format(index=i // samples_per_shard),
                            samples[i : i + samples_per_shard])
            shards.append({"name": w.name, "num_samples": w.num_samples, "sha256": w.sha256, "num_bytes": w.num_bytes})
        manifest["splits"][split] = {"num_samples": len(samples), "shards": shards}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return out
