"""Contrastive losses (the reference maths and the run's `NTXent` module) against direct transcriptions of the papers,
GradCache equivalence, MoCo queue and momentum, and which NT-Xent implementation a run's module hands what."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.gradcache import gradcache_step
from trainer.losses import moco_infonce, nt_xent_simclr
from trainer.methods.moco import MoCo
from trainer.models import ContrastiveModel, ProjectionHead
from trainer.ntxent import NTXent


def _paper_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """SimCLR (Chen et al. 2020, Alg. 1) with plain Python loops: pairs (2k-1, 2k) interleaved, cosine similarity,
    l(i,j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t), L = 1/(2N) sum_k [l(2k-1,2k) + l(2k,2k-1)]."""
    z = []
    for a, b in zip(z1.tolist(), z2.tolist()):
        z += [a, b]

    def sim(u, v):
        dot = sum(x * y for x, y in zip(u, v))
        return dot / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v)))

    def ell(i, j):
        num = math.exp(sim(z[i], z[j]) / tau)
        den = sum(math.exp(sim(z[i], z[k]) / tau) for k in range(len(z)) if k != i)
        return -math.log(num / den)

    n = len(z1)
    return sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_paper_equation(tau):
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    expected = _paper_nt_xent(z1, z2, tau)
    assert nt_xent_simclr(z1, z2, tau).item() == pytest.approx(expected, rel=1e-5)
    assert NTXent("reference", tau)(z1, z2).item() == pytest.approx(expected, rel=1e-5)


def test_multi_positive_patient_loss_by_hand():
    """Same-patient views are positives too: row i averages -log p over every other view of its patient."""
    torch.manual_seed(1)
    z1, z2 = torch.randn(4, 6), torch.randn(4, 6)
    pids = torch.tensor([7, 3, 7, 5])
    tau = 0.2
    z = F.normalize(torch.cat([z1, z2]), dim=1).double()
    labels = torch.cat([pids, pids]).tolist()
    total = 0.0
    for i in range(8):
        logits = [(z[i] @ z[k]).item() / tau for k in range(8)]
        lse = math.log(sum(math.exp(logits[k]) for k in range(8) if k != i))
        pos = [k for k in range(8) if k != i and labels[k] == labels[i]]
        total += -sum(logits[k] - lse for k in pos) / len(pos)
    got = NTXent("reference", tau, positives="patient")(z1, z2, pids)
    assert got.item() == pytest.approx(total / 8, rel=1e-5)
    # with distinct patients it reduces to SimCLR
    assert NTXent("reference", tau, positives="patient")(z1, z2, torch.arange(4)).item() == pytest.approx(
        NTXent("reference", tau)(z1, z2).item(), rel=1e-6)


def test_moco_infonce_by_hand():
    torch.manual_seed(2)
    q, k = F.normalize(torch.randn(3, 4), dim=1), F.normalize(torch.randn(3, 4), dim=1)
    queue = F.normalize(torch.randn(6, 4), dim=1)
    tau = 0.2
    expected = 0.0
    for i in range(3):
        pos = math.exp((q[i] @ k[i]).item() / tau)
        neg = sum(math.exp((q[i] @ queue[j]).item() / tau) for j in range(6))
        expected += -math.log(pos / (pos + neg))
    assert moco_infonce(q, k, queue, tau).item() == pytest.approx(expected / 3, rel=1e-5)


def _tiny_encoder(proj_dim=8):
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, 10))
    return ContrastiveModel(backbone, ProjectionHead(10, 16, proj_dim, layers=2, batch_norm=False))


def test_gradcache_gradients_equal_full_batch():
    torch.manual_seed(3)
    model = _tiny_encoder()
    v1, v2 = torch.randn(12, 1, 4, 4), torch.randn(12, 1, 4, 4)
    loss_fn = NTXent("reference", 0.1)

    torch.manual_seed(10)  # dropout draws: GradCache must replay the same ones as the full batch
    full = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert full
    # the full-batch reference draws dropout chunk by chunk in the same order as GradCache's first pass
    zs = [model(torch.cat([v1[a:a + 5], v2[a:a + 5]])) for a in (0, 5, 10)]
    z1 = torch.cat([z[: len(z) // 2] for z in zs])
    z2 = torch.cat([z[len(z) // 2:] for z in zs])
    ref_loss = loss_fn(z1, z2)
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    torch.manual_seed(10)
    loss = gradcache_step(model, v1, v2, loss_fn, micro_batch=5)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7, msg=n)


def test_gradcache_equals_unchunked_batch_without_batch_coupling():
    """Without dropout or BatchNorm the micro-batch split is invisible: GradCache == one big batch."""
    torch.manual_seed(4)
    model = _tiny_encoder()
    model.eval()  # dropout off
    v1, v2 = torch.randn(10, 1, 4, 4), torch.randn(10, 1, 4, 4)
    loss_fn = NTXent("reference", 0.1)
    z = model(torch.cat([v1, v2]))
    loss_fn(z[:10], z[10:]).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    gradcache_step(model, v1, v2, loss_fn, micro_batch=3)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7, msg=n)


def test_gradcache_keeps_bn_running_stats_of_a_single_pass():
    """The no-graph first pass must not update BatchNorm running statistics (only the re-forward does)."""
    torch.manual_seed(5)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(16, 10), nn.BatchNorm1d(10))
    model = ContrastiveModel(backbone, ProjectionHead(10, 8, 4, layers=2))
    twin = ContrastiveModel(*[m for m in __import__("copy").deepcopy(model).children()])
    v1, v2 = torch.randn(8, 1, 4, 4), torch.randn(8, 1, 4, 4)
    gradcache_step(model, v1, v2, NTXent("reference", 0.1), micro_batch=4)
    for a in (0, 4):  # what plain micro-batch accumulation would leave
        twin(torch.cat([v1[a:a + 4], v2[a:a + 4]]))
    for (n, b1), (_, b2) in zip(model.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(b1, b2, msg=n)


def test_moco_queue_and_momentum_update():
    torch.manual_seed(6)
    enc = _tiny_encoder(proj_dim=4)
    moco = MoCo(enc, queue_size=8, momentum=0.9)
    assert moco.queue.shape == (8, 4) and int(moco.queue_ptr) == 0
    torch.testing.assert_close(moco.queue.norm(dim=1), torch.ones(8))
    old = moco.queue.clone()
    keys = F.normalize(torch.randn(4, 4), dim=1)
    moco.enqueue(keys)
    torch.testing.assert_close(moco.queue[:4], keys)
    torch.testing.assert_close(moco.queue[4:], old[4:])
    assert int(moco.queue_ptr) == 4
    keys2 = F.normalize(torch.randn(4, 4), dim=1)
    moco.enqueue(keys2)
    torch.testing.assert_close(moco.queue[4:], keys2)
    assert int(moco.queue_ptr) == 0  # wrapped: the oldest entries go next
    with pytest.raises(ValueError, match="multiple"):
        moco.enqueue(torch.randn(3, 4))
    # momentum update: k <- 0.9 k + 0.1 q, key encoder gets no gradient
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(1.0)
    k_before = [p.clone() for p in moco.encoder_k.parameters()]
    q_now = [p.clone() for p in moco.encoder_q.parameters()]
    moco.eval()
    q, k = moco(torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4))
    for kb, qn, ka in zip(k_before, q_now, moco.encoder_k.parameters()):
        torch.testing.assert_close(ka, 0.9 * kb + 0.1 * qn)
        assert not ka.requires_grad
    assert q.requires_grad and not k.requires_grad
    torch.testing.assert_close(k.norm(dim=1), torch.ones(2))


# ---- loss.impl dispatch and the precision handed to the fused kernel ---------------------------------------------

def _spy_fused(monkeypatch) -> list:
    """Replace the fused kernel entry by a recorder that computes the reference (the kernels need a GPU here)."""
    from trainer import fused_ntxent
    from trainer.losses import nt_xent_reference
    seen = []

    def spy(z_rows, z_cols, *args, **kwargs):
        seen.append((z_rows.dtype, z_cols.dtype))
        return nt_xent_reference(z_rows, z_cols, *args, **kwargs)

    monkeypatch.setattr(fused_ntxent, "nt_xent_fused", spy)
    monkeypatch.setattr(fused_ntxent, "_require_fused", lambda device: None)
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_gets_the_projections_dtype_reference_gets_fp32(monkeypatch, dtype):
    """Autocast's 16-bit projections reach the fused kernel as 16-bit unit vectors (tensor cores); fp32 stays fp32."""
    seen = _spy_fused(monkeypatch)
    torch.manual_seed(7)
    z1, z2 = torch.randn(6, 8).to(dtype).requires_grad_(), torch.randn(6, 8).to(dtype).requires_grad_()
    fused = NTXent("fused", 0.1)(z1, z2)
    assert seen == [(dtype, dtype)]
    fused.backward()
    assert z1.grad.dtype == dtype and torch.isfinite(z1.grad).all()
    ref = NTXent("reference", 0.1)(z1, z2)
    assert len(seen) == 1  # the reference path never goes through the fused entry
    assert fused.dtype == ref.dtype == torch.float32
    assert fused.item() == pytest.approx(ref.item(), rel=1e-2 if dtype != torch.float32 else 1e-6)


def test_auto_is_reference_on_cpu_through_the_train_step(monkeypatch):
    """The trainer's default loss.impl=auto on the CPU: a real TrainStep never reaches the fused kernel."""
    from trainer.config import LossConfig
    from trainer.steps import TrainStep
    seen = _spy_fused(monkeypatch)
    cfg = LossConfig()
    model = _tiny_encoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = TrainStep(model, model, opt, cfg, precision="bf16", device=torch.device("cpu"))
    assert cfg.impl == "auto" and step.ntxent.requested == "auto"
    loss = step({"view1": torch.randn(4, 1, 4, 4), "view2": torch.randn(4, 1, 4, 4)}, lr=0.1)
    assert torch.isfinite(loss) and seen == []
    assert step.ntxent.active == "reference" and "on cpu" in step.ntxent.note
    assert step.ntxent.log_fields() == {"loss_impl": "reference", "loss_impl_note": step.ntxent.note}
    assert step.ntxent.log_fields() == {"loss_impl": "reference"}  # the reason goes into one row only


def test_auto_is_eligible_on_cuda_only_within_the_kernels_width(monkeypatch):
    """auto may pick fused for CUDA tensors (triton present, no interpreter), and then the handoff is 16-bit."""
    pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    auto, cuda = NTXent("auto"), torch.device("cuda", 0)
    assert auto.eligible(cuda, 128) == (True, "") and auto.wants_16bit(cuda, 128)
    assert not auto.eligible("cpu", 128)[0] and not auto.wants_16bit("cpu", 128)
    # wider than the kernels' tiles: auto keeps the reference instead of failing the run (explicit 'fused' still tries)
    assert auto.eligible(cuda, 512) == (False, "embedding width 512 > the kernels' 256")
    assert NTXent("fused").wants_16bit(cuda, 512) and not NTXent("reference").wants_16bit(cuda, 128)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter is ~1000x slower than the reference
    assert auto.eligible(cuda, 128) == (False, "TRITON_INTERPRET=1")
    with pytest.raises(ValueError, match="unknown loss impl"):
        NTXent("flash")


@pytest.mark.gpu
def test_auto_runs_fused_in_a_cuda_train_step(monkeypatch):
    from trainer import fused_ntxent
    from trainer.config import LossConfig
    from trainer.steps import TrainStep
    seen = []
    real = fused_ntxent.nt_xent_fused

    def spy(z_rows, z_cols, *args, **kwargs):
        seen.append(z_rows.dtype)
        return real(z_rows, z_cols, *args, **kwargs)

    monkeypatch.setattr(fused_ntxent, "nt_xent_fused", spy)
    device = torch.device("cuda")
    model = _tiny_encoder().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = TrainStep(model, model, opt, LossConfig(), precision="bf16", device=device)
    loss = step({"view1": torch.randn(8, 1, 4, 4, device=device), "view2": torch.randn(8, 1, 4, 4, device=device)},
                lr=0.1)
    # the first step's self-check calls the kernel once, then the step itself does, on bf16 unit vectors
    assert torch.isfinite(loss) and seen == [torch.bfloat16, torch.bfloat16]
    assert step.ntxent.active == "fused", step.ntxent.note
