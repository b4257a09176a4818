"""Global BatchNorm: under `torchrun --nproc_per_node=2` (gloo) statistics, outputs and gradients equal one process
BatchNorm-ing the whole global batch; and the run's default (SimCLR / MICLe global on > 1 rank, MoCo shuffle-BN)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from trainer.config import load_config
from trainer.models import GlobalBatchNorm, SplitBatchNorm, convert_global_bn, split_batchnorm
from trainer.pretrain import _global_bn

ROOT = Path(__file__).resolve().parents[1]


def test_two_gloo_ranks_match_one_process_on_the_global_batch():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve())]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("GLOBAL-BN-OK") == 2, out.stdout[-3000:]


@pytest.mark.parametrize("method,mode,world,expected", [
    ("simclr", "auto", 2, True), ("micle", "auto", 8, True), ("moco", "auto", 2, False),
    ("simclr", "auto", 1, False), ("simclr", "off", 2, False), ("moco", "on", 2, True), ("moco", "on", 1, False),
])
def test_default_is_global_bn_for_simclr_and_micle_on_several_ranks(method, mode, world, expected):
    extra = ["loss.moco_queue=256"] if method == "moco" else []
    cfg = load_config(None, ["data.source=synthetic", f"loss.method={method}", f"model.sync_bn={mode}", *extra])
    assert _global_bn(cfg, world) is expected


def test_conversion_keeps_state_dict_and_leaves_split_bn_alone():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3))
    model[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_global_bn(model)
    assert isinstance(converted[1], GlobalBatchNorm) and isinstance(converted[4], GlobalBatchNorm)
    after = converted.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    cuda = convert_global_bn(nn.Sequential(nn.BatchNorm2d(4)), "cuda")  # torch's NCCL version (state dict as is)
    assert type(cuda[0]) is nn.SyncBatchNorm
    split = split_batchnorm(nn.Sequential(nn.BatchNorm2d(4)), 2)
    assert isinstance(convert_global_bn(split)[0], SplitBatchNorm)
    x = torch.randn(6, 3)
    bn = nn.BatchNorm1d(3)  # one process (no process group): plain BatchNorm
    torch.testing.assert_close(convert_global_bn(nn.Sequential(bn))(x), nn.BatchNorm1d(3)(x))


# ----------------------------------------------------------------------------------------- worker (under torchrun)


def _worker() -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainer import distributed as D

    info = D.setup("cpu")
    rank, world = info.rank, info.world_size

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                              nn.Linear(3 * 4 * 4, 5), nn.BatchNorm1d(5))
        with torch.no_grad():  # affine parameters away from 1 / 0, so their gradients are tested too
            model[1].weight.uniform_(0.5, 1.5), model[1].bias.uniform_(-0.5, 0.5)
        return model

    g = torch.Generator().manual_seed(42)
    n_global = 8
    x = torch.randn(n_global, 1, 6, 6, generator=g) * 3 + 1  # (8, 1, 6, 6) non-zero mean, non-unit scale
    w_out = torch.randn(n_global, 5, generator=g)  # fixed weights: a loss whose gradient reaches every input
    ref = make()
    x_ref = x.clone().requires_grad_()
    y_ref = ref(x_ref)
    (y_ref * w_out).sum().backward()

    # as the trainer wraps it (DDP refuses torch's SyncBatchNorm on CPU); no buffer broadcast: every rank's running
    # statistics must come out equal to the global ones by themselves
    model = DDP(convert_global_bn(make()), broadcast_buffers=False)
    n = n_global // world
    sl = slice(rank * n, (rank + 1) * n)
    x_local = x[sl].clone().requires_grad_()
    y = model(x_local)
    (y * w_out[sl]).sum().backward()
    torch.testing.assert_close(y, y_ref[sl].detach(), rtol=1e-5, atol=1e-5, msg="outputs")
    torch.testing.assert_close(x_local.grad, x_ref.grad[sl], rtol=1e-4, atol=1e-5, msg="input gradients")
    for i in (1, 5):
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(model.module[i], buf), getattr(ref[i], buf), rtol=1e-5, atol=1e-6,
                                       msg=f"layer {i} {buf}")
    for (name, p), p_ref in zip(model.module.named_parameters(), ref.parameters()):
        # DDP averages over ranks; the reference loss is the sum of both ranks' losses
        torch.testing.assert_close(p.grad * world, p_ref.grad, rtol=1e-4, atol=1e-5, msg=f"grad {name}")
    model.eval()  # eval: the running statistics, identical on every rank
    torch.testing.assert_close(model.module(x[sl]), ref.eval()(x[sl]), rtol=1e-5, atol=1e-5)
    D.teardown()
    print(f"GLOBAL-BN-OK rank {rank}", flush=True)


if __name__ == "__main__":
    _worker()
    from trainer.distributed import exit_process

    exit_process(0)  # DDP leaves gloo threads that may abort interpreter finalisation
