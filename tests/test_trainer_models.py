"""Trainer models and step: single-rank MoCo shuffle-BN (BatchNorm over chunks, keys permuted across them) and a
train step that never reads a device value on the host (`.item()` only at log steps)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.config import load_config
from trainer.methods.moco import MoCo
from trainer.models import ContrastiveModel, ProjectionHead, SplitBatchNorm, build_contrastive_model
from trainer.optim import build_optimizer
from trainer.steps import TrainStep


def _encoder() -> ContrastiveModel:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return ContrastiveModel(backbone, ProjectionHead(4, 6, 3, layers=2, batch_norm=True))


@pytest.mark.parametrize("shape", [(8, 3, 5, 5), (8, 3)])
def test_split_batchnorm_is_batchnorm_per_chunk(shape):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3) if len(shape) == 4 else nn.BatchNorm1d(3)
    nn.init.uniform_(bn.weight)
    nn.init.uniform_(bn.bias)
    split = SplitBatchNorm(copy.deepcopy(bn), num_splits=4)
    assert split.state_dict().keys() == bn.state_dict().keys()  # checkpoints and encoder.pt keep their keys
    x = torch.randn(shape)
    if len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    chunk_bns = [copy.deepcopy(bn) for _ in range(4)]
    ref = torch.cat([b(x2[2 * i:2 * i + 2]) for i, b in enumerate(chunk_bns)])
    out = split(x1)
    torch.testing.assert_close(out, ref)
    w = torch.randn(shape)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(split.weight.grad, sum(b.weight.grad for b in chunk_bns))
    # running statistics: the mean of what the four chunk BatchNorms would hold
    torch.testing.assert_close(split.running_mean, torch.stack([b.running_mean for b in chunk_bns]).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack([b.running_var for b in chunk_bns]).mean(0))
    if len(shape) == 4:  # bf16 activations (autocast): statistics in fp32, output in bf16 close to the fp32 one
        low = SplitBatchNorm(copy.deepcopy(bn), num_splits=4)(x.bfloat16())
        assert low.dtype == torch.bfloat16 and low.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(low.float(), ref.detach(), rtol=2e-2, atol=2e-2)
    bn.load_state_dict(split.state_dict())
    torch.testing.assert_close(split.eval()(x), bn.eval()(x))  # eval: plain BatchNorm
    with pytest.raises(ValueError, match="moco_bn_splits"):
        split.train()(x[:6])


def test_single_rank_moco_shuffles_keys_across_bn_chunks():
    plain = _encoder()
    moco = MoCo(copy.deepcopy(plain), queue_size=16, momentum=0.99, shuffle_bn=True, bn_splits=2)
    assert isinstance(moco.encoder_q.backbone[1], SplitBatchNorm) and isinstance(moco.encoder_k.head[1], SplitBatchNorm)
    x = torch.randn(8, 1, 6, 6)
    torch.manual_seed(5)
    keys = moco.keys(x)
    torch.manual_seed(5)
    perm = torch.randperm(8)
    enc_k = copy.deepcopy(plain)  # plain BatchNorm over each chunk of the permuted batch, as two GPUs would
    with torch.no_grad():
        shuffled = torch.cat([F.normalize(enc_k(x[perm][a:a + 4]), dim=1) for a in (0, 4)])
    torch.testing.assert_close(keys, shuffled[torch.argsort(perm)])
    # unshuffled keys would share BatchNorm statistics with their own queries: different values
    with torch.no_grad():
        unshuffled = torch.cat([F.normalize(copy.deepcopy(plain)(x[a:a + 4]), dim=1) for a in (0, 4)])
    assert not torch.allclose(keys, unshuffled, atol=1e-4)
    # queries: BatchNorm per chunk of the batch as it comes
    q, _ = moco(x, x)
    enc_q = copy.deepcopy(plain)
    torch.testing.assert_close(q, torch.cat([F.normalize(enc_q(x[a:a + 4]), dim=1) for a in (0, 4)]))
    # shuffle-BN off: no chunks, keys straight through
    off = MoCo(copy.deepcopy(plain), queue_size=16, shuffle_bn=False, bn_splits=2)
    assert off.bn_splits == 1 and isinstance(off.encoder_q.backbone[1], nn.BatchNorm2d)


def _no_host_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a device value was read on the host inside the train step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("overrides", [
    ["loss.method=simclr", "optim.name=lars"],
    ["loss.method=simclr", "optim.micro_batch=2", "loss.positives=patient"],
    ["loss.method=moco", "loss.moco_queue=16", "model.head_bn=false", "optim.name=sgd", "loss.moco_bn_splits=2"],
])
def test_train_step_reads_nothing_on_the_host(monkeypatch, overrides):
    cfg = load_config(None, ["data.source=synthetic", "model.arch=resnet18", "model.head_hidden_dim=16",
                             "model.proj_dim=8", "data.batch_size=4", *overrides])
    model = build_contrastive_model(cfg.model)
    if cfg.loss.method == "moco":
        model = MoCo(model, cfg.loss.moco_queue, cfg.loss.moco_momentum, True, bn_splits=cfg.loss.moco_bn_splits)
    model = model.to(memory_format=torch.channels_last)
    step = TrainStep(model, model, build_optimizer(model, cfg.optim, 0.1), cfg.loss, precision="fp32",
                     device=torch.device("cpu"), micro_batch=cfg.optim.micro_batch)
    g = torch.Generator().manual_seed(0)
    batch = {"view1": torch.randn(4, 1, 32, 32, generator=g), "view2": torch.randn(4, 1, 32, 32, generator=g),
             "pids": torch.tensor([0, 1, 0, 2])}
    losses = []
    with monkeypatch.context() as m:
        _no_host_reads(m)
        for _ in range(2):
            losses.append(step(batch, lr=0.1))
    assert all(torch.isfinite(v) for v in losses)
    if cfg.loss.method == "moco":
        assert int(model.queue_ptr) == 8  # two batches of 4 enqueued on the device
