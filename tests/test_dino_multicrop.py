"""Multi-crop DALI loader (2 global + N local crops grouped by size) and a DINO run through the real entry point on
shards: health rows, encoder export, and a resumed run equal to an uninterrupted one (teacher, centre, step)."""
from __future__ import annotations

import json

import pytest
import torch

from shardgen import make_shards

from dali_pipes.augment import AugmentConfig

pytest.importorskip("nvidia.dali")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("multicrop") / "shards", num_patients=24, images_per_patient=(1,),
                       size_px=48)


def test_multicrop_shapes_counts_and_layout(shards):
    from dali_pipes.multicrop import build_multicrop_loader

    aug = AugmentConfig.preset("dino-cxr", local_crops=3, local_crop_size=16)
    loader = build_multicrop_loader(shards, "train", batch_size=4, augment=aug, image_size=32, num_threads=1,
                                    views="all", seed=1)
    batches = list(loader)
    loader.close()
    assert len(batches) == len(loader) == 3  # 12 train images, batch 4
    for b in batches:
        assert b["global"].shape == (2, 4, 1, 32, 32) and b["local"].shape == (3, 4, 1, 16, 16)
        assert b["pids"].shape == (4,) and b["global"].dtype == torch.float32
        assert b["global"].flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
        assert not torch.equal(b["global"][0], b["global"][1])  # independent draws of the same images
        assert not torch.equal(b["local"][0], b["local"][1])
    assert len({int(p) for b in batches for p in b["pids"]}) == 12  # every image once per epoch
    none = build_multicrop_loader(shards, "train", batch_size=4, augment=AugmentConfig.preset("dino-cxr",
                                  local_crops=0), image_size=32, num_threads=1, views="all")
    assert next(iter(none))["local"].shape == (0, 4, 1, 96, 96)
    none.close()


ARGS = ["trainer/configs/dino_vitti_debug_cpu.toml", "data.batch_size=4", "data.image_size=16",
        "augment.local_crops=2", "augment.local_crop_size=8", "loss.dino_out_dim=64", "loss.dino_hidden_dim=32",
        "loss.dino_bottleneck_dim=16", "loss.dino_freeze_last_layer_epochs=0.5", "optim.total_steps=4",
        "run.ckpt_every=2", "run.cpu_threads=1", "run.monitor_every=0"]


def test_dino_run_resumes_exactly(shards, tmp_path):
    from trainer.pretrain import main

    full, part = tmp_path / "full", tmp_path / "part"
    assert main(ARGS + [f"data.shards={shards}", f"run.out={full}"]) == 0
    assert main(ARGS + [f"data.shards={shards}", f"run.out={part}", "run.max_steps=2"]) == 0
    assert main(ARGS + [f"data.shards={shards}", f"run.out={part}"]) == 0
    a = torch.load(full / "ckpt" / "step-000004.pt", weights_only=True)["model"]
    b = torch.load(part / "ckpt" / "step-000004.pt", weights_only=True)["model"]
    assert int(a["step"]) == 4 and a["center"].abs().sum() > 0
    for key in a:  # student, teacher, centre and step
        assert torch.equal(a[key], b[key]), key
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["health/teacher_entropy"] >= 0 and "health/proto_perplexity" in r and "dino/momentum" in r
               for r in rows)
    encoder = torch.load(full / "encoder.pt", weights_only=True)
    assert encoder["arch"] == "vit_tiny_patch8" and encoder["feature_dim"] == 192
    assert torch.equal(encoder["state_dict"]["pos_embed"], a["teacher.backbone.pos_embed"])  # the teacher exported
