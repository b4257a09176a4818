"""Online kNN monitor: the weighted kNN against a direct loop, patient folds that never meet their own patient and
give chance AUROC on random features, eval's label policy, BatchNorm statistics and train/eval modes untouched, one
line and no monitor without labels, and a run that logs it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from trainer.config import load_config
from trainer.models import build_backbone
from trainer.monitor import (KNN_TEMPERATURE, KnnMonitor, MonitorSet, build_monitor, cross_fold_scores, knn_auroc,
                             knn_scores, label_targets, patient_folds)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tests"))
    from shardgen import make_shards

    return make_shards(tmp_path_factory.mktemp("monitor") / "shards", num_patients=24)


def test_label_policy_is_evals_default():
    from eval.labels import LabelPolicy, apply_policy

    raw = np.array([[1, 0, -1, np.nan], [np.nan, -1, 0, 1]], dtype=np.float32)
    np.testing.assert_array_equal(label_targets(raw), apply_policy(raw, LabelPolicy()))


def test_knn_scores_match_a_direct_loop():
    g = torch.Generator().manual_seed(0)
    query, bank = torch.randn(6, 5, generator=g), torch.randn(9, 5, generator=g)
    targets = torch.tensor(np.random.default_rng(0).integers(0, 2, (9, 2)), dtype=torch.float32)
    targets[3, 1] = float("nan")
    k = 3
    got = knn_scores(query, bank, targets, k)
    q, b = (torch.nn.functional.normalize(x, dim=1) for x in (query, bank))
    for i in range(6):
        sims = sorted(((q[i] @ b[j]).item(), j) for j in range(9))[-k:]
        for t in range(2):
            num = den = 0.0
            for s, j in sims:
                if not torch.isnan(targets[j, t]):
                    w = np.exp(s / KNN_TEMPERATURE)
                    num, den = num + w * targets[j, t].item(), den + w
            assert got[i, t].item() == pytest.approx(num / den, rel=1e-4)


def test_folds_keep_a_patient_together_and_score_only_against_the_other_fold():
    pids = np.repeat(np.arange(30), 3) * 1000 + 7  # 3 images per patient, ids with a common stride
    folds = patient_folds(pids)
    assert all(len(set(folds[pids == p])) == 1 for p in np.unique(pids))
    assert 0.25 < folds.mean() < 0.75, "the mix should split strided ids about evenly"
    np.testing.assert_array_equal(patient_folds(pids), folds)  # a pure function of the ids
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(90, 8, generator=g)
    # image 1 is an exact duplicate of image 0 from the same patient, the only positive: it must not be seen
    feats[1] = feats[0]
    y = torch.zeros(90, 1)
    y[1] = 1.0
    f = torch.from_numpy(folds)
    scores = cross_fold_scores(feats, y, f, k=5)
    assert scores[0, 0].item() == 0.0
    # every score is the plain kNN of that image against the other fold's images
    for fold in (0, 1):
        expected = knn_scores(feats[f == fold], feats[f != fold], y[f != fold], 5)
        torch.testing.assert_close(scores[f == fold], expected)


def test_auroc_on_random_features_is_chance():
    """Pooled leave-one-patient-out scores sit below 0.5 on random features (a positive query's bank has one positive
    fewer); per-fold AUROC on cross-fold scores does not. 400 monitor sets of 132 images, prevalence 0.15, k=20:
    leave-one-patient-out gave 0.481 on these sets, this 0.503 (sd of either mean 0.005)."""
    g = torch.Generator().manual_seed(0)
    pids = np.arange(132) // 2
    folds = patient_folds(pids)
    f = torch.from_numpy(folds)
    aurocs = []
    for _ in range(400):
        feats = torch.randn(132, 32, generator=g)
        y = (torch.rand(132, 1, generator=g) < 0.15).float()
        row = knn_auroc(cross_fold_scores(feats, y, f, k=20).numpy(), y.numpy(), folds, ["t"])
        if row:
            aurocs.append(row["knn_auroc/t"])
    assert len(aurocs) > 390
    assert abs(np.mean(aurocs) - 0.5) < 0.015, np.mean(aurocs)


def test_knn_auroc_separates_clusters_and_skips_one_class_tasks():
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1] * 20, dtype=torch.float32)
    feats = torch.randn(40, 16, generator=g) * 0.1 + labels[:, None] * torch.ones(16)  # two clusters
    targets = torch.stack([labels, torch.zeros(40)], dim=1)  # task 2 has one class only
    folds = patient_folds(np.arange(40))
    scores = cross_fold_scores(feats, targets, torch.from_numpy(folds), k=5)
    row = knn_auroc(scores.numpy(), targets.numpy(), folds, ["a", "b"])
    assert row == {"knn_auroc/a": 1.0, "knn_auroc_mean": 1.0}
    # the task AUROC is the mean of the folds' AUROCs, not the AUROC of the pooled scores
    noisy = scores.numpy().copy()
    noisy[folds == 1, 0] = 1 - noisy[folds == 1, 0]  # fold 1 ranks exactly backwards
    assert knn_auroc(noisy, targets.numpy(), folds, ["a", "b"])["knn_auroc/a"] == pytest.approx(0.5)


def test_monitor_leaves_batchnorm_statistics_and_modes_untouched():
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", 1)
    backbone.layer2.eval()  # a module already in eval mode stays so; the rest goes back to train mode
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    modes = {n: m.training for n, m in backbone.named_modules()}
    images = torch.randn(12, 1, 32, 32).contiguous(memory_format=torch.channels_last)
    targets = np.tile(np.array([[0.0], [1.0]], dtype=np.float32), (6, 1))
    data = MonitorSet(images=images, targets=targets, pids=np.arange(12), task_names=["t"], decode_s=0.0)
    monitor = KnnMonitor(data, k=3, batch_size=5)
    row = monitor(backbone)
    assert set(row) == {"knn_auroc/t", "knn_auroc_mean", "monitor_s"} and 0 <= row["knn_auroc_mean"] <= 1
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the monitor changed a weight or BN statistic"
    assert {n: m.training for n, m in backbone.named_modules()} == modes
    # the features are the eval-mode ones (running statistics), not batch statistics
    backbone.eval()
    with torch.no_grad():
        torch.testing.assert_close(monitor.embed(backbone), backbone(images))


def test_no_monitor_is_one_line(shards, tmp_path, capsys):
    cpu = torch.device("cpu")
    synthetic = load_config(None, ["data.source=synthetic"])
    assert build_monitor(synthetic, cpu, torch.float32) is None
    # shards whose manifest carries no labels (e.g. a folder ingest without a label source)
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(shards, bare)
    manifest = json.loads((bare / "manifest.json").read_text())
    manifest["label_names"] = []
    (bare / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(None, [f"data.shards={bare}", "data.image_size=32"])
    assert build_monitor(cfg, cpu, torch.float32) is None
    off = load_config(None, [f"data.shards={shards}", "run.monitor_every=0"])
    assert build_monitor(off, cpu, torch.float32) is None
    # one image is one patient: no second fold to score it against
    one = load_config(None, [f"data.shards={shards}", "data.image_size=32", "data.batch_size=4", "data.device=cpu",
                             "run.monitor_images=1"])
    assert build_monitor(one, cpu, torch.float32) is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "monitor: off (data.source=synthetic has no val split)"
    assert lines[1].startswith("monitor: off (") and "no labels" in lines[1]
    assert lines[2].startswith("monitor: off (") and "too few patients to split them into two folds" in lines[2]
    assert len(lines) == 3  # monitor_every=0 is silent: the user turned it off


def test_monitor_subset_is_capped_and_decoded_once(shards, capsys):
    cfg = load_config(None, [f"data.shards={shards}", "data.image_size=32", "data.batch_size=4",
                             "run.monitor_images=5", "data.device=cpu"])
    monitor = build_monitor(cfg, torch.device("cpu"), torch.float32)
    assert monitor is not None and monitor.data.images.shape == (5, 1, 32, 32)
    assert monitor.data.targets.shape == (5, 3)
    assert "kNN (k=20) on 5 'val' images in two patient folds" in capsys.readouterr().out


def test_run_logs_the_monitor_on_console_jsonl_and_tensorboard(shards, tmp_path, capsys):
    from trainer.pretrain import main

    run = tmp_path / "run"
    rc = main([str(ROOT / "trainer/configs/debug_cpu.toml"), f"data.shards={shards}", f"run.out={run}",
               "run.monitor_every=4", "run.log_every=5", "run.tensorboard=true"])
    assert rc == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 4, 5, 6]  # ckpt at 3 and 6, log at 5, monitor forces a row at 4
    knn = {r["step"]: r["knn_auroc_mean"] for r in rows if "knn_auroc_mean" in r}
    assert set(knn) == {4, 6} and all(0 <= v <= 1 for v in knn.values())  # every 4 steps and at the end
    assert all("health/emb_std" in r and "health/trust_median" in r for r in rows)
    out = capsys.readouterr().out
    assert "kNN AUROC" in out and "monitor: kNN (k=20)" in out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/knn_auroc_mean", "health/emb_std", "health/trust_max", "train/loss"} <= tags
    assert any(t.startswith("knn_auroc/") for t in tags)


def test_two_ranks_rank_zero_monitors_and_the_other_waits(shards, tmp_path):
    """Under torchrun (gloo): one monitor line, kNN values in rank 0's rows, health averaged over both ranks."""
    import os
    import subprocess

    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "trainer/pretrain.py",
           "trainer/configs/debug_cpu.toml", f"data.shards={shards}", f"run.out={run}", "optim.total_steps=4",
           "run.monitor_every=2", "run.log_every=4", "run.ckpt_every=4"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("monitor: kNN") == 1
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all("knn_auroc_mean" in r and "health/top1" in r for r in rows)
