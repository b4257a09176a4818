"""Under `torchrun --nproc_per_node=2` (gloo): gathered-negative gradients equal single-process full-batch ones.

The test launches this file under torchrun; each rank checks itself and exits non-zero on a mismatch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from procs import child_pids

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(args: list[str], timeout: int = 240, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_gathered_gradients_equal_single_process():
    out = _torchrun([str(Path(__file__).resolve())])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("DDP-GRADIENTS-OK") == 2, out.stdout[-3000:]


@pytest.mark.slow
def test_pretrain_two_ranks_checkpoint_and_resume(tmp_path):
    """The real entry point on two gloo ranks: per-rank loader/RNG states saved, and a resume continues the curve."""
    base = ["trainer/pretrain.py", "trainer/configs/debug_cpu.toml", "data.source=synthetic",
            "data.synthetic_batches=3", f"run.out={tmp_path / 'run'}", "optim.total_steps=4", "run.ckpt_every=2",
            "run.signal_check_every=1"]
    first = _torchrun(base + ["run.max_steps=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    import torch

    state = torch.load(tmp_path / "run" / "ckpt" / "step-000002.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert all(r["loader"]["position"] == 2 and "torch" in r["rng"] for r in state["ranks"])
    second = _torchrun(base)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    full = _torchrun(base[:4] + [f"run.out={tmp_path / 'full'}"] + base[5:])
    assert full.returncode == 0, full.stderr[-3000:]
    rows_full = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in rows_full]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["torchrun", "ranks"])
def test_sigterm_under_torchrun_checkpoints_every_rank_at_a_log_step(tmp_path, target):
    """Cluster preemption: the ranks agree at the next log step (no extra host syncs between log steps),
    checkpoint together and exit 0 before torchrun's shutdown grace. Signalled directly (as Slurm signals every
    process of a step), torchrun sees every rank exit 0 and returns 0; signalled itself, torchrun forwards SIGTERM
    and then re-raises it as its SignalException: a traceback and status 1 whatever the ranks returned
    (trainer/README.md says so)."""
    import signal
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "trainer/pretrain.py", "trainer/configs/debug_cpu.toml", "data.source=synthetic", f"run.out={run}",
           "data.image_size=16", "optim.total_steps=500", "run.ckpt_every=1000", "run.log_every=4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (run / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    for pid in (child_pids(proc.pid) if target == "ranks" else [proc.pid]):
        os.kill(pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert "stopped by SIGTERM" in out or "stopped by a peer's signal" in out, out[-2000:] + err[-2000:]
    assert "exitcode  : -9" not in err and "SIGKILL" not in err  # no rank had to be killed
    if target == "ranks":
        assert proc.returncode == 0, err[-2000:]  # torchrun returns 0 only when every rank did
    else:
        assert proc.returncode == 1 and "SignalException" in err, err[-2000:]
    assert [line for line in err.splitlines() if line.startswith("pretrain:")] == []
    (ckpt,) = (run / "ckpt").glob("step-*.pt")
    import torch

    state = torch.load(ckpt, weights_only=True)
    assert state["step"] % 4 == 0 and 4 <= state["step"] < 500 and len(state["ranks"]) == 2


# ----------------------------------------------------------------------------------------- worker (under torchrun)


def _worker() -> None:
    import torch
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainer import distributed as D
    from trainer.methods.moco import MoCo
    from trainer.models import ContrastiveModel, ProjectionHead
    from trainer.ntxent import NTXent

    info = D.setup("cpu")
    rank, world = info.rank, info.world_size
    assert world == 2

    def make_model():
        torch.manual_seed(0)
        backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.Tanh())
        return ContrastiveModel(backbone, ProjectionHead(10, 9, 5, layers=2, batch_norm=False))

    g = torch.Generator().manual_seed(123)
    n_global = 6
    v1, v2 = torch.randn(n_global, 1, 3, 4, generator=g), torch.randn(n_global, 1, 3, 4, generator=g)
    pids = torch.tensor([4, 1, 4, 2, 1, 9])  # same-patient pairs straddle the two ranks
    for positives in ("sample", "patient"):
        ref = make_model()  # single process, whole global batch, nothing gathered
        z = ref(torch.cat([v1, v2]))
        ref_loss = NTXent("reference", 0.2, positives=positives, gather=False)(z[:n_global], z[n_global:], pids)
        ref_loss.backward()

        model = DDP(make_model())
        n = n_global // world
        sl = slice(rank * n, (rank + 1) * n)
        z = model(torch.cat([v1[sl], v2[sl]]))
        loss = NTXent("reference", 0.2, positives=positives, gather=True)(z[:n], z[n:], pids[sl])
        loss.backward()
        mean_loss = D.all_reduce_mean(loss.detach())
        torch.testing.assert_close(mean_loss, ref_loss.detach(), msg=f"{positives}: loss")
        for (name, p), p_ref in zip(model.module.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=f"{positives}: grad {name}")

        if positives == "sample":  # GradCache under DDP (no_sync on all but the last micro-batch) is the same
            from trainer.gradcache import gradcache_step

            cached = DDP(make_model())
            gradcache_step(cached, v1[sl], v2[sl],
                           NTXent("reference", 0.2, positives="sample", gather=True),
                           micro_batch=2, no_sync=cached.no_sync)
            for (name, p), p_ref in zip(cached.module.named_parameters(), ref.parameters()):
                torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=f"gradcache grad {name}")

    # MoCo shuffle-BN: keys computed on a batch permuted across ranks come back in this rank's order.
    torch.manual_seed(1)
    moco = MoCo(make_model(), queue_size=8, momentum=0.99, shuffle_bn=True)
    x = torch.randn(3, 1, 3, 4, generator=torch.Generator().manual_seed(rank))
    shuffled = moco.keys(x)
    moco.shuffle_bn = False
    torch.testing.assert_close(shuffled, moco.keys(x))
    D.teardown()
    print(f"DDP-GRADIENTS-OK rank {rank}", flush=True)


if __name__ == "__main__":
    _worker()
    from trainer.distributed import exit_process

    exit_process(0)  # DDP leaves gloo threads that may abort interpreter finalisation
