"""Health metrics: embedding std / alignment / uniformity / top-1 against direct formulas, gradient norm, LARS trust
ratios, the collapse warning, and a train step that accumulates them without reading the device on the host."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.config import load_config
from trainer.health import HEALTH_KEYS, HealthMeter, collapse_warning, embedding_stats, grad_norm
from trainer.methods.moco import MoCo
from trainer.models import build_contrastive_model
from trainer.optim import LARS, build_optimizer
from trainer.steps import TrainStep


def test_embedding_stats_match_the_definitions():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(16, 8, generator=g)
    z2 = z1 + 0.1 * torch.randn(16, 8, generator=g)
    std, align, uniform, top1 = embedding_stats(z1, z2).tolist()
    u1, u2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    u = torch.cat([u1, u2])
    assert std == pytest.approx(u.std(dim=0).mean().item(), rel=1e-5)
    assert align == pytest.approx(sum(((u1[i] - u2[i]) ** 2).sum().item() for i in range(16)) / 16, rel=1e-5)

    def naive_uniformity(x):
        vals = [math.exp(-2 * ((x[i] - x[j]) ** 2).sum().item()) for i in range(len(x)) for j in range(i + 1, len(x))]
        return math.log(sum(vals) / len(vals))

    assert uniform == pytest.approx(0.5 * (naive_uniformity(u1) + naive_uniformity(u2)), rel=1e-4)
    assert top1 == 1.0  # near-identical views: every view's partner is its nearest neighbour
    # views that do not match their partners: top-1 near chance (1 / 31), not 1
    assert embedding_stats(z1, torch.randn(16, 8, generator=g))[3].item() < 0.5


def test_collapse_drives_std_to_zero_and_spread_embeddings_sit_near_one_over_sqrt_d():
    d = 128
    collapsed = torch.ones(64, d) + 1e-4 * torch.randn(64, d)
    assert embedding_stats(collapsed, collapsed)[0].item() < 1e-3
    spread = torch.randn(4096, d)
    assert embedding_stats(spread, spread)[0].item() == pytest.approx(1 / math.sqrt(d), rel=0.05)


def test_collapse_warning_threshold():
    assert collapse_warning({"step": 5, "health/emb_std": 0.001}, proj_dim=128, ratio=0.25).startswith(
        "warning: step 5: embedding std 0.0010 < 0.0221")
    assert collapse_warning({"step": 5, "health/emb_std": 0.08}, proj_dim=128, ratio=0.25) is None
    assert collapse_warning({"step": 5, "health/emb_std": 0.001}, proj_dim=128, ratio=0.0) is None
    assert collapse_warning({"step": 5}, proj_dim=128, ratio=0.25) is None


def test_grad_norm_and_lars_trust_ratios():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model(torch.randn(5, 4)).pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    expected = math.sqrt(sum((g ** 2).sum().item() for g in grads))
    assert grad_norm(model.parameters()).item() == pytest.approx(expected, rel=1e-5)
    weights = [model[0].weight, model[2].weight]
    opt = LARS([{"params": weights}, {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0,
                                      "lars_exclude": True}], lr=0.1, weight_decay=0.0, trust_coefficient=0.01)
    want = [0.01 * w.norm().item() / w.grad.norm().item() for w in weights]
    opt.step()
    assert opt.last_trust_ratios.tolist() == pytest.approx(want, rel=1e-5)  # excluded biases are not listed


def _no_host_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a device value was read on the host inside the train step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("overrides, trust", [
    (["loss.method=simclr", "optim.name=lars"], True),
    (["loss.method=simclr", "optim.micro_batch=2", "loss.positives=patient", "optim.grad_clip_norm=1.0"], True),
    (["loss.method=moco", "loss.moco_queue=16", "model.head_bn=false", "optim.name=sgd", "loss.moco_bn_splits=2"],
     False),
])
def test_train_step_accumulates_health_without_host_reads(monkeypatch, overrides, trust):
    cfg = load_config(None, ["data.source=synthetic", "model.arch=resnet18", "model.head_hidden_dim=16",
                             "model.proj_dim=8", "data.batch_size=4", *overrides])
    torch.manual_seed(0)
    model = build_contrastive_model(cfg.model)
    if cfg.loss.method == "moco":
        model = MoCo(model, cfg.loss.moco_queue, cfg.loss.moco_momentum, True, bn_splits=cfg.loss.moco_bn_splits)
    meter = HealthMeter(torch.device("cpu"))
    step = TrainStep(model, model, build_optimizer(model, cfg.optim, 0.1), cfg.loss, precision="fp32",
                     device=torch.device("cpu"), micro_batch=cfg.optim.micro_batch,
                     grad_clip_norm=cfg.optim.grad_clip_norm, health=meter)
    g = torch.Generator().manual_seed(0)
    batch = {"view1": torch.randn(4, 1, 32, 32, generator=g), "view2": torch.randn(4, 1, 32, 32, generator=g),
             "pids": torch.tensor([0, 1, 0, 2])}
    with monkeypatch.context() as m:
        _no_host_reads(m)
        for _ in range(3):
            step(batch, lr=0.1)
    assert meter.counts[:5] == [3] * 5
    row = meter.summary()
    assert set(row) == set(HEALTH_KEYS[:8] if trust else HEALTH_KEYS[:5])  # no DINO signals from a contrastive step
    assert all(math.isfinite(v) for v in row.values())
    assert 0 < row["health/emb_std"] <= 1 / math.sqrt(8) + 1e-6 and 0 <= row["health/top1"] <= 1
    assert row["health/align"] >= 0 and -4.0 - 1e-6 <= row["health/uniform"] <= 0 and row["health/grad_norm"] > 0
    if trust:
        assert 0 < row["health/trust_min"] <= row["health/trust_median"] <= row["health/trust_max"]
    assert meter.counts == [0] * len(HEALTH_KEYS) and float(meter.sums.abs().sum()) == 0.0  # reset for the next row
