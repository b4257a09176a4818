"""The eval view through the real DALI CPU eval pipeline: a portrait film whose effusion sits only in the
costophrenic angles keeps it under --eval-view full and loses it under center (resize 256 + centre crop 224)."""
from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from dali_pipes.augment import CXR_MEAN, CXR_STD
from eval.features import Transform, eval_loader, feature_cache_key, iterate_valid
from ingest.schema import FORMAT_VERSION, MANIFEST_NAME, SHARD_PATTERN
from ingest.shards import write_shard

HEIGHT, WIDTH = 320, 256  # a portrait film as ingest stores it: shorter side 256
ANGLE_Y, ANGLE_X, RADIUS = 305, (45, WIDTH - 45), 12  # bright fluid in both costophrenic angles, bottom 8 % only


def _film(effusion: bool) -> np.ndarray:
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    img = 60 + 60 * np.exp(-(((xx - WIDTH / 2) / 60) ** 2))  # soft mediastinum, dark lungs, nothing above 130
    if effusion:
        for x0 in ANGLE_X:
            img[(yy - ANGLE_Y) ** 2 + (xx - x0) ** 2 < RADIUS**2] = 250
    return img.astype(np.uint8)


def _shards(root, films: list[np.ndarray]):
    samples = []
    for i, film in enumerate(films):
        buf = io.BytesIO()
        Image.fromarray(film, mode="L").save(buf, format="JPEG", quality=95)
        label = 1.0 if film.max() > 200 else 0.0
        meta = {"dataset": "test", "patient_id": f"p{i}", "study_id": "s1", "view": "PA",
                "labels": {"Pleural Effusion": label}, "split": "test"}
        samples.append({"__key__": f"test-p{i:05d}-s1-v1", "jpg": buf.getvalue(),
                        "json": json.dumps(meta).encode(), "lbl": struct.pack("<f", label),
                        "pid": struct.pack("<q", i)})
    w = write_shard(root / "test" / SHARD_PATTERN.format(index=0), samples)
    manifest = {"format_version": FORMAT_VERSION, "datasets": ["test"], "label_names": ["Pleural Effusion"],
                "num_patients": len(films), "rejects": [],
                "splits": {"test": {"num_samples": len(samples), "shards": [
                    {"name": w.name, "num_samples": w.num_samples, "sha256": w.sha256, "num_bytes": w.num_bytes}]}}}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


def _pixels(shards, view: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 224, 224) uint8-scale pixels of the eval view, and the raw labels, in stored order."""
    batches = list(iterate_valid(eval_loader(shards, "test", batch_size=2, device="cpu",
                                             transform=Transform(224, 256, view=view), channels=1)))
    x = np.concatenate([b[0].float().numpy() for b in batches])[:, 0]  # (N, H, W)
    return (x * CXR_STD + CXR_MEAN) * 255.0, np.concatenate([b[1].numpy() for b in batches])[:, 0]


def test_costophrenic_effusion_visible_in_full_view_and_cropped_in_center(tmp_path):
    shards = _shards(tmp_path / "shards", [_film(True), _film(False)])
    full, labels = _pixels(shards, "full")
    center, _ = _pixels(shards, "center")
    assert full.shape == center.shape == (2, 224, 224)
    sick = int(np.flatnonzero(labels == 1)[0])
    # full: the whole film squashed to 224 x 224; the fluid lands at row 305 * 0.7 = 213, cols 45 * 0.875, 211 * 0.875
    y, (xl, xr) = round(ANGLE_Y * 224 / HEIGHT), (round(x * 224 / WIDTH) for x in ANGLE_X)
    for x in (xl, xr):
        assert full[sick, y - 3 : y + 4, x - 3 : x + 4].min() > 200, "effusion missing from the full view"
    assert (full[sick] > 200).sum() > 2 * 0.5 * np.pi * (RADIUS * 0.7) ** 2  # both blobs, most of their area
    # center: rows 48..271 of the 320-row film survive the 224 crop; the angles (rows 293..317) are cut away
    assert center[sick].max() < 150, "the centre crop should have cut the costophrenic angles"
    assert abs(center[sick, 112, 112] - full[sick, 112, 112]) < 10  # same film: the mediastinum is in both
    assert (full[1 - sick] < 150).all()  # the healthy film has no bright pixel anywhere


def test_view_is_part_of_the_result_and_the_cache_key(tmp_path):
    from eval.features import encoder_spec
    shards = _shards(tmp_path / "shards", [_film(True)])
    spec = encoder_spec(init="random", arch="resnet18")
    full, center = Transform(224, 256, view="full"), Transform(224, 256, view="center")
    assert full.as_dict() == {"eval_view": "full", "image_size": 224}
    assert center.as_dict() == {"eval_view": "center", "image_size": 224, "resize_size": 256}
    assert feature_cache_key(spec, shards, "test", full) != feature_cache_key(spec, shards, "test", center)
    # resize_size does not act on the full view, so it does not split the cache either
    assert feature_cache_key(spec, shards, "test", full) == feature_cache_key(spec, shards, "test", Transform(224, 300))
    with pytest.raises(ValueError, match="unknown eval view 'letterbox'"):
        Transform(224, 256, view="letterbox")


def test_eval_view_choices_agree():
    from dali_pipes.pipelines import EVAL_VIEWS as DALI_VIEWS
    from eval.arg_types import EVAL_VIEWS as ARG_VIEWS
    from eval.features import EVAL_VIEWS
    assert ARG_VIEWS == EVAL_VIEWS == DALI_VIEWS
