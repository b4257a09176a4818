"""End-to-end `trainer/pretrain.py` runs on tiny shards (DALI CPU): exact resume after a kill, SIGTERM checkpoint,
non-finite stop, encoder export into torchvision, methods (MoCo, MICLe, GradCache, patient positives), errors."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import latest_checkpoint, list_checkpoints, save_encoder
from trainer.encoder_io import imagenet_weights_path, read_encoder
from trainer.models import torchvision_resnet
from trainer.pretrain import main

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "trainer" / "configs" / "debug_cpu.toml")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tests"))
    from shardgen import make_shards

    return make_shards(tmp_path_factory.mktemp("trainer") / "shards", num_patients=24)  # 24 train images


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "trainer/pretrain.py", DEBUG, *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_killed_run_resumes_to_the_same_loss_curve(shards, tmp_path):
    # same intra-op thread count in-process and in the subprocess: CPU conv sums depend on it
    common = [f"data.shards={shards}", "run.ckpt_every=3", "run.cpu_threads=1"]  # 3 batches per epoch
    assert main([DEBUG, *common, f"run.out={tmp_path / 'full'}"]) == 0
    full = _losses(tmp_path / "full")
    assert [s for s, _ in full] == [1, 2, 3, 4, 5, 6]

    run = tmp_path / "killed"
    proc = _spawn([*common, f"run.out={run}"])
    deadline = time.time() + 120
    while not (run / "ckpt" / "step-000003.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no handler runs; rows logged after the checkpoint must be discarded on resume
    proc.communicate()
    assert latest_checkpoint(run) is not None
    assert main([DEBUG, *common, f"run.out={run}"]) == 0
    assert _losses(run) == full

    # a mid-epoch stop (DALI checkpoint inside the epoch) resumes exactly too
    mid = tmp_path / "mid"
    assert main([DEBUG, *common, f"run.out={mid}", "run.max_steps=4"]) == 0
    assert [p.name for p in list_checkpoints(mid)] == ["step-000003.pt", "step-000004.pt"]
    assert main([DEBUG, *common, f"run.out={mid}"]) == 0
    assert _losses(mid) == full
    assert [p.name for p in list_checkpoints(mid)] == ["step-000004.pt", "step-000006.pt"]  # keep_last = 2

    state = torch.load(latest_checkpoint(mid), weights_only=True)  # the whole checkpoint is weights_only-safe
    assert {"model", "optimizer", "scaler", "schedule", "step", "epoch", "ranks", "config"} <= set(state)
    assert {"python", "numpy", "torch"} <= set(state["ranks"][0]["rng"]) and state["ranks"][0]["loader"]
    assert main([DEBUG, *common, f"run.out={mid}"]) == 0  # finished: nothing to do, nothing overwritten

    # the exported encoder loads into torchvision, strict apart from the classifier
    net = torchvision_resnet("resnet18", in_channels=1)
    doc = torch.load(mid / "encoder.pt", weights_only=True)
    missing, unexpected = net.load_state_dict(doc["state_dict"], strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    assert (doc["arch"], doc["in_channels"], doc["feature_dim"], doc["step"]) == ("resnet18", 1, 512, 6)
    enc = read_encoder(mid / "encoder.pt")
    torch.testing.assert_close(enc.model.conv1.weight, net.conv1.weight)
    assert enc.meta["config"]["model"]["arch"] == "resnet18" and enc.feature_dim == 512


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_and_exits_cleanly(shards, tmp_path, sig):
    run = tmp_path / "run"
    proc = _spawn([f"data.shards={shards}", f"run.out={run}", "optim.total_steps=500", "run.ckpt_every=1000"])
    deadline = time.time() + 120
    while (not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 2) \
            and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert f"stopped by {sig.name}" in out
    steps = [s for s, _ in _losses(run)]
    ckpts = list_checkpoints(run)
    assert len(ckpts) == 1 and ckpts[0].name == f"step-{steps[-1]:06d}.pt" and 2 <= steps[-1] < 500
    assert torch.load(ckpts[0], weights_only=True)["step"] == steps[-1]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([DEBUG, f"data.shards={shards}", f"run.out={run}", "run.max_steps=2"]) == 0
    # a temperature that overflows float32 logits: the loss is inf/nan from the next step on
    # (a changed config on resume needs run.resume=force)
    code = main([DEBUG, f"data.shards={shards}", f"run.out={run}", "loss.temperature=1e-39", "run.resume=force"])
    assert code == 3
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step-000002.pt" in err
    assert [p.name for p in list_checkpoints(run)] == ["step-000002.pt"]


@pytest.mark.parametrize("overrides", [
    ["loss.method=moco", "loss.moco_queue=16", "model.head_bn=false", "optim.name=sgd", "loss.moco_bn_splits=2"],
    ["loss.method=micle", "augment.preset=azizi", "run.tensorboard=true"],
    ["optim.micro_batch=3", "loss.positives=patient", "optim.name=adamw", "optim.base_lr=0.001"],
])
def test_methods_run(shards, tmp_path, overrides, capsys):
    run = tmp_path / "run"
    assert main([DEBUG, f"data.shards={shards}", f"run.out={run}", "optim.total_steps=2", *overrides]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)
    assert {"lr", "images_per_s", "views_per_s", "step_ms", "data_wait_pct", "epoch", "peak_rss_gib"} <= set(rows[0])
    console = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(console) == 2 and all("loss" in c and "views/s" in c and "wait" in c for c in console)  # one per row
    state = torch.load(latest_checkpoint(run), weights_only=True)
    if "loss.method=moco" in overrides:
        assert int(state["model"]["queue_ptr"]) == 0  # 2 steps x batch 8 wrapped a 16-key queue
        assert "encoder_k.backbone.conv1.weight" in state["model"]
        net = torchvision_resnet("resnet18", in_channels=1)  # single-rank shuffle-BN keeps torchvision's keys
        missing, unexpected = net.load_state_dict(torch.load(run / "encoder.pt", weights_only=True)["state_dict"],
                                                  strict=False)
        assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    if "loss.method=micle" in overrides:
        assert 0.0 <= rows[0]["micle_multi_instance"] <= 1.0
        assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "config.toml").read_text().count("[") >= 5


def test_bad_input_is_a_one_line_error_before_work(shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([DEBUG, f"data.shards={shards}", f"run.out={run}", "optim.lr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown key optim.lr" in err and "\n" not in err and not run.exists()
    assert main([DEBUG, f"data.shards={tmp_path / 'nowhere'}", f"run.out={run}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere: no manifest.json" in err and err.count("\n") == 0 and not run.exists()
    assert main([DEBUG, f"data.shards={shards}", f"run.out={run}", "loss.method=moco", "loss.moco_queue=12"]) == 2
    assert "multiple of data.batch_size=8" in capsys.readouterr().err
    assert main([DEBUG, f"data.shards={shards}", f"run.out={run}", "loss.method=moco", "loss.moco_queue=16"]) == 2
    assert "loss.moco_bn_splits=8: data.batch_size=8 must split" in capsys.readouterr().err and not run.exists()
    # a model that cannot be built (missing init checkpoint) leaves no run folder behind
    assert main([DEBUG, f"data.shards={shards}", f"run.out={run}", f"model.init={tmp_path / 'no.pt'}"]) == 2
    assert "no.pt: checkpoint not found" in capsys.readouterr().err and not run.exists()
    assert main([DEBUG, f"data.shards={shards}", f"run.out={run}", "run.max_steps=1"]) == 0
    assert main([DEBUG, f"data.shards={shards}", f"run.out={run}", "run.resume=none"]) == 2  # no clobbering
    assert "run.overwrite=true" in capsys.readouterr().err
    assert main([DEBUG, f"data.shards={shards}", f"run.out={run}", "loss.impl=fused"]) == 2


def test_init_imagenet_offline_and_from_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="no network access"):
        read_encoder("imagenet", arch="resnet18", in_channels=1)
    # a stand-in for the cached ImageNet file: the 1-channel stem must be the sum of its RGB filters
    rgb = torchvision_resnet("resnet18", in_channels=3)
    path = imagenet_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(rgb.state_dict(), path)
    record = read_encoder("imagenet", arch="resnet18", in_channels=1)
    gray, dim = record.model, record.feature_dim
    assert dim == 512 and isinstance(gray.fc, torch.nn.Identity)
    torch.testing.assert_close(gray.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(gray.layer4[1].bn2.weight, rgb.layer4[1].bn2.weight)
    x = torch.rand(1, 1, 32, 32)
    rgb.fc = torch.nn.Identity()
    torch.testing.assert_close(gray.eval()(x), rgb.eval()(x.expand(1, 3, 32, 32)), rtol=1e-4, atol=1e-5)

    save_encoder(tmp_path / "enc.pt", gray, "resnet18", 1, {"step": 7})
    again = read_encoder(str(tmp_path / "enc.pt"), arch="resnet18", in_channels=1)  # continued pretraining
    torch.testing.assert_close(again.model.conv1.weight, gray.conv1.weight)
    with pytest.raises(ValueError, match="resnet18 with 1"):
        read_encoder(str(tmp_path / "enc.pt"), arch="resnet34", in_channels=1)
    torch.save({"weights": 1}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="junk.pt: not an encoder"):
        read_encoder(tmp_path / "junk.pt")


def test_real_cxrs_through_ingest_dali_and_trainer(shared_data, tmp_path):
    """Real radiographs (pneumonia-mini, linked not copied) -> ingest build-shards -> DALI CPU -> 2 SimCLR steps."""
    root = tmp_path / "root"
    for cls in ("Normal", "ViralPneumonia"):
        (root / cls).mkdir(parents=True)
        for src in sorted((shared_data / "pneumonia-mini" / cls).iterdir())[:12]:
            (root / cls / src.name).symlink_to(src)
    out = tmp_path / "shards"
    built = subprocess.run([sys.executable, "-m", "ingest", "build-shards", "--source", "folder", "--root", str(root),
                            "--out", str(out), "--size", "64", "--split-mode", "hash", "--val-frac", "0.1",
                            "--test-frac", "0.1", "--workers", "1", "--no-progress"],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr[-2000:]
    run = tmp_path / "run"
    assert main([DEBUG, f"data.shards={out}", f"run.out={run}", "optim.total_steps=2"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert read_encoder(run / "encoder.pt").meta["step"] == 2
