"""GPU paths of the trainer (skipped without CUDA): bf16 autocast + torch.compile + channels-last, fp16 with
GradScaler, the fused loss against the reference, MoCo compiled, and the DALI GPU loader into the step."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.pretrain import main

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "trainer" / "configs" / "debug_cpu.toml")
GPU = ["run.device=cuda", "run.deterministic=false", "data.source=synthetic", "data.image_size=64",
       "data.batch_size=32", "optim.total_steps=4"]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [
    ["run.precision=bf16", "model.compile=on", "model.channels_last=true"],
    ["run.precision=fp16", "model.compile=off"],
    ["run.precision=bf16", "model.compile=on", "optim.micro_batch=8"],
    ["run.precision=bf16", "model.compile=on", "loss.method=moco", "loss.moco_queue=128", "model.head_bn=false"],
])
def test_gpu_runs(tmp_path, extra):
    run = tmp_path / "run"
    assert main([DEBUG, *GPU, f"run.out={run}", *extra]) == 0
    rows = _rows(run)
    assert len(rows) == 4 and all(r["loss"] == r["loss"] and r["peak_mem_gib"] > 0 for r in rows)


@pytest.mark.gpu
def test_fused_loss_matches_reference_in_training(tmp_path):
    losses = {}
    for impl in ("reference", "fused"):
        run = tmp_path / impl
        assert main([DEBUG, *GPU, f"run.out={run}", "run.precision=fp32", "model.compile=off",
                     f"loss.impl={impl}", "optim.total_steps=1"]) == 0
        losses[impl] = _rows(run)[0]["loss"]
    assert losses["fused"] == pytest.approx(losses["reference"], rel=1e-4)


@pytest.mark.gpu
@pytest.mark.dali
def test_dali_gpu_loader_run(tmp_path, tiny_shards):
    run = tmp_path / "run"
    assert main([DEBUG, "run.device=cuda", "run.deterministic=false", f"data.shards={tiny_shards}",
                 "data.device=gpu", "data.batch_size=4", "optim.total_steps=2", f"run.out={run}"]) == 0
    assert len(_rows(run)) == 2
