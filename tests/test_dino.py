"""DINO: the prototype cross-entropy against a textbook reference (values and gradients), centre / EMA / Sinkhorn /
KoLeo, the schedules, a whole step through TrainStep, and 2 gloo ranks equal to one process on the whole batch."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer import dino_loss as D

ROOT = Path(__file__).resolve().parents[1]


def reference_ce(student: list[torch.Tensor], q: torch.Tensor, temp: float) -> torch.Tensor:
    """Caron et al.'s DINOLoss.forward, written out: every (teacher crop iq, student crop v != iq) pair."""
    total, pairs = 0.0, 0
    for iq in range(q.shape[0]):
        for v, s in enumerate(student):
            if v == iq:
                continue
            total = total + torch.sum(-q[iq] * F.log_softmax(s / temp, dim=-1), dim=-1).mean()
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("block_rows", [2, 256])
def test_prototype_ce_matches_reference_values_and_gradients(monkeypatch, block_rows):
    monkeypatch.setattr(D, "BLOCK_ROWS", block_rows)  # 2: several row blocks per crop
    g = torch.Generator().manual_seed(0)
    b, k = 5, 37
    crops = [torch.randn(b, k, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(5)]
    q = torch.softmax(torch.randn(2, b, k, generator=g, dtype=torch.float64) / 0.3, dim=-1)
    want = reference_ce(crops, q, 0.1)
    want_grads = torch.autograd.grad(want, crops)
    got = D.prototype_ce(crops, q, 0.1)
    got_grads = torch.autograd.grad(got * 1.0, crops)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for a, w in zip(got_grads, want_grads):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-7)
    # autograd's own check of the backward against finite differences
    small = [c.detach()[:2, :7].clone().requires_grad_(True) for c in crops[:3]]
    qs = torch.softmax(q[:, :2, :7], dim=-1)
    assert torch.autograd.gradcheck(lambda *s: D.prototype_ce(list(s), qs, 0.5).double(), small, eps=1e-6,
                                    atol=1e-4)


def test_centre_teacher_probs_and_ema():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(6, 11, generator=g)
    c = torch.randn(1, 11, generator=g)
    torch.testing.assert_close(D.updated_center(c, t, 0.9), 0.9 * c + 0.1 * t.mean(0, keepdim=True))
    torch.testing.assert_close(D.teacher_probs(t, c, 0.04), torch.softmax((t - c) / 0.04, dim=-1))

    from trainer.methods.dino import DINOHead, DINOModel

    torch.manual_seed(0)
    model = DINOModel(nn.Sequential(nn.Flatten(), nn.Linear(4, 6)), DINOHead(6, 10, 8, 5, 2))
    before = [p.clone() for p in model.teacher.parameters()]
    for p in model.student_parameters():
        p.data.add_(1.0)
    model.ema_update(0.75)
    for t_new, t_old, s in zip(model.teacher.parameters(), before, model.student_parameters()):
        torch.testing.assert_close(t_new, 0.75 * t_old + 0.25 * s)
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_head_prototypes_are_weight_normalised():
    from trainer.methods.dino import DINOHead

    head = DINOHead(6, 9, 8, 4, 3)
    with torch.no_grad():
        head.last_v.mul_(torch.arange(1, 10.0)[:, None])  # rescaling a prototype's direction changes nothing
    x = torch.randn(3, 6)
    logits = head(x)
    assert logits.shape == (3, 9)
    z = F.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(logits, z @ F.normalize(head.last_v, dim=1).T)  # cosines with unit prototypes
    assert logits.abs().max() <= 1.0 + 1e-6


def test_sinkhorn_equalises_prototype_mass():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(12, 4, generator=g) + torch.tensor([2.0, 0, 0, 0])  # prototype 0 dominates the softmax
    q = D.sinkhorn_knopp(t, 0.5, iterations=50)
    torch.testing.assert_close(q.sum(1), torch.ones(12))
    torch.testing.assert_close(q.sum(0), torch.full((4,), 3.0), rtol=1e-2, atol=1e-2)
    assert torch.softmax(t / 0.5, 1).sum(0)[0] > 6  # without Sinkhorn it would take over half the mass


def test_koleo_is_minus_mean_log_nearest_distance():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 5, generator=g)
    xn = F.normalize(x, dim=1)
    d = torch.cdist(xn, xn) + torch.eye(7) * 10
    want = -torch.log(d.min(1).values + 1e-8).mean()
    torch.testing.assert_close(D.koleo(x), want, rtol=1e-5, atol=1e-5)


def test_schedules_and_collapse_signals():
    assert D.cosine_to(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert D.cosine_to(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert D.cosine_to(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert D.teacher_temperature(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert D.teacher_temperature(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert D.teacher_temperature(10, 10, 0.04, 0.07) == pytest.approx(0.07)
    k = 8
    uniform = torch.full((2, 3, k), 1.0 / k)
    stats = D.teacher_stats(uniform, torch.tensor(math.log(k)), torch.zeros(1, k))
    torch.testing.assert_close(stats, torch.tensor([math.log(k), 0.0, 0.0, float(k)]))
    one_hot = F.one_hot(torch.zeros(2, 3, dtype=torch.long), k).float()
    assert D.teacher_stats(one_hot, torch.tensor(1.0), torch.ones(1, k))[3] == pytest.approx(1.0)


def _step(cfg_overrides=()):
    from trainer.config import load_config
    from trainer.health import HealthMeter
    from trainer.methods import build_method
    from trainer.optim import build_optimizer
    from trainer.steps import TrainStep

    cfg = load_config(ROOT / "trainer/configs/dino_vitti_debug_cpu.toml",
                      ["data.source=synthetic", "loss.dino_out_dim=64", *cfg_overrides])
    torch.manual_seed(0)
    method = build_method(cfg.loss)
    method.set_schedule(10, 4)
    model = method.build_model(cfg.model, world_size=1)
    opt = build_optimizer(model, cfg.optim, 1e-3)
    return cfg, method, model, TrainStep(model, model, opt, cfg.loss, precision="fp32", device=torch.device("cpu"),
                                         grad_clip_norm=cfg.optim.grad_clip_norm, health=HealthMeter(
                                             torch.device("cpu")), method=method)


def test_train_step_multicrop_teacher_centre_and_frozen_last_layer():
    cfg, method, model, step = _step(["loss.dino_freeze_last_layer_epochs=0.5", "loss.dino_koleo_weight=0.1",
                                      "loss.dino_weight_decay_end=0.4"])
    g = torch.Generator().manual_seed(0)
    batch = {"global": torch.randn(2, 4, 1, 32, 32, generator=g), "local": torch.randn(3, 4, 1, 16, 16, generator=g)}
    last_v = model.head.last_v.detach().clone()
    teacher0 = model.teacher.backbone.pos_embed.detach().clone()
    loss = step(batch, 1e-3)
    assert torch.isfinite(loss) and int(model.step) == 1
    torch.testing.assert_close(model.head.last_v, last_v)  # frozen during the first 2 of 4 steps per epoch
    assert model.center.abs().sum() > 0  # the centre moved towards the teacher's mean
    assert not torch.equal(model.teacher.backbone.pos_embed, teacher0)  # EMA after the optimiser step
    assert step.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.04)  # step 0 of the cosine
    step(batch, 1e-3)
    step(batch, 1e-3)  # step index 2: the last layer learns now
    assert not torch.equal(model.head.last_v, last_v)
    assert 0.04 < step.optimizer.param_groups[0]["weight_decay"] < 0.4
    row = step.health.summary()
    for key in ("health/teacher_entropy", "health/student_teacher_kl", "health/center_norm",
                "health/proto_perplexity", "health/emb_std"):
        assert key in row and math.isfinite(row[key]), key
    assert 0 <= row["health/teacher_entropy"] <= math.log(64) + 1e-4
    assert method.log_fields(None)["dino/momentum"] > 0.996


def test_sinkhorn_centering_step():
    _, _, model, step = _step(["loss.dino_centering=sinkhorn"])
    batch = {"view1": torch.randn(3, 1, 32, 32), "view2": torch.randn(3, 1, 32, 32)}  # two-view loader: no locals
    assert torch.isfinite(step(batch, 1e-3))
    assert model.center.abs().sum() == 0  # Sinkhorn targets use no centre


def test_stage_a_bench_row_runs_at_a_tiny_size_on_the_cpu():
    from bench.dino_bench import dino_throughput

    row = dino_throughput(arch="vit_tiny_patch8", global_size=16, local_size=8, local_crops=2, batch=2, out_dim=64,
                          device="cpu", precision="fp32", steps=1, warmup=1)
    assert row["crops"] == "2x16+2x8" and row["images_per_s"] > 0 and math.isfinite(row["loss"])


def test_two_gloo_ranks_equal_one_process():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve())]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("DINO-DDP-OK") == 2, out.stdout[-3000:]


# ----------------------------------------------------------------------------------------- worker (under torchrun)


def _run_steps(model, ddp, batch_fn, centering: str, steps: int = 3):
    """A few DINO steps through the trainer's TrainStep; returns the losses."""
    from trainer.config import LossConfig
    from trainer.methods.dino import DINO
    from trainer.steps import TrainStep

    cfg = LossConfig(method="dino", dino_out_dim=16, dino_centering=centering, dino_freeze_last_layer_epochs=0.0)
    method = DINO(cfg)
    method.set_schedule(10, 5)
    opt = torch.optim.SGD(model.parameters() if ddp is None else ddp.module.student_parameters(), lr=0.5)
    step = TrainStep(ddp or model, model, opt, cfg, precision="fp32", device=torch.device("cpu"), method=method)
    return [float(step(batch_fn(i), 0.5)) for i in range(steps)]


def _worker() -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainer import distributed as dist_utils
    from trainer.methods.dino import DINOHead, DINOModel

    def make_model():
        torch.manual_seed(0)
        return DINOModel(nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh()), DINOHead(12, 16, 10, 6, 2))

    g = torch.Generator().manual_seed(7)
    n = 6
    data = [(torch.randn(2, n, 1, 4, 4, generator=g), torch.randn(3, n, 1, 2, 8, generator=g)) for _ in range(3)]

    def full(i):
        return {"global": data[i][0], "local": data[i][1]}

    results = {}
    for centering in ("center", "sinkhorn"):  # one process, whole batch (before the process group exists)
        ref = make_model()
        results[centering] = (_run_steps(ref, None, full, centering), ref.state_dict())

    info = dist_utils.setup("cpu")
    rank, world = info.rank, info.world_size
    half = slice(rank * n // world, (rank + 1) * n // world)
    for centering, (ref_losses, ref_state) in results.items():
        model = make_model()
        ddp = DDP(model)
        losses = _run_steps(model, ddp, lambda i: {"global": data[i][0][:, half], "local": data[i][1][:, half]},
                            centering)
        mean = [float(dist_utils.all_reduce_mean(torch.tensor(v))) for v in losses]
        assert mean == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), (centering, mean, ref_losses)
        for key, value in model.state_dict().items():  # student, teacher (EMA), centre, step
            torch.testing.assert_close(value, ref_state[key], rtol=1e-4, atol=1e-6, msg=f"{centering}: {key}")
    dist_utils.teardown()
    print(f"DINO-DDP-OK rank {rank}", flush=True)


if __name__ == "__main__":
    _worker()
