"""Multi-node training on one box: two torchrun agents (c10d rendezvous on 127.0.0.1, one gloo process each, the
launch of scripts/slurm_pretrain.sbatch) train like one agent with two processes, and a lost node or a hung peer
ends the survivor with one project line (run.dist_timeout_s bounds the wait)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from procs import child_pids

ROOT = Path(__file__).resolve().parents[1]
TINY = ["trainer/pretrain.py", "trainer/configs/debug_cpu.toml", "data.source=synthetic", "data.synthetic_batches=3",
        "data.image_size=16", "model.head_hidden_dim=16", "model.proj_dim=8"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent(port: int, args: list[str]) -> subprocess.Popen:
    """One 'node': the sbatch's torchrun line with one process per node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--max_restarts=0",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=test-{port}", *TINY, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_rows(path: Path, procs: list[subprocess.Popen], rows: int = 1, timeout_s: float = 240) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if path.exists() and len(path.read_text().splitlines()) >= rows:
            return
        time.sleep(0.1)
    raise AssertionError(f"no {rows} metrics rows in {path}: " + " | ".join(
        (p.communicate()[1] if p.poll() is not None else "running")[-1500:] for p in procs))


def _trainer_lines(err: str) -> list[str]:
    """What the trainer itself wrote on stderr (torchrun's own log lines and failure report left out)."""
    return [line for line in err.splitlines() if line.startswith("pretrain:")]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_agents_train_like_one_agent_with_two_processes(tmp_path):
    port = _free_port()
    common = ["optim.total_steps=3", "run.ckpt_every=3"]
    agents = [_agent(port, [*common, f"run.out={tmp_path / 'nodes'}"]) for _ in range(2)]
    outs = [a.communicate(timeout=300) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(err[-2000:] for _, err in outs)
    one = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *TINY,
                          *common, f"run.out={tmp_path / 'one'}"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    assert len(_losses(tmp_path / "one")) == 3
    assert _losses(tmp_path / "nodes") == _losses(tmp_path / "one")
    assert "2 rank(s)" in "".join(out for out, _ in outs)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["node killed", "peer hung"])
def test_a_lost_or_hung_node_ends_the_survivor_with_one_line(tmp_path, fault):
    """SIGKILL of an agent and its rank (a node gone: its socket closes) or SIGSTOP of a rank (it hangs: the
    survivor's collective runs into run.dist_timeout_s): the other node's rank prints one line and exits 4."""
    port, run = _free_port(), tmp_path / "run"
    args = ["optim.total_steps=100000", "run.ckpt_every=100000", "run.log_every=1", f"run.out={run}",
            "run.dist_timeout_s=5"]
    first = _agent(port, args)
    second = _agent(port, args)
    victim, survivor = second, first
    try:
        _wait_for_rows(run / "metrics.jsonl", [first, second])
        ranks = child_pids(victim.pid)
        assert len(ranks) == 1, ranks
        if fault == "node killed":
            for pid in (victim.pid, *ranks):
                os.kill(pid, signal.SIGKILL)
        else:
            os.kill(ranks[0], signal.SIGSTOP)
        _, err = survivor.communicate(timeout=120)
    finally:
        for proc in (first, second):
            for pid in (*child_pids(proc.pid), proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.communicate()
    assert survivor.returncode != 0
    lines = _trainer_lines(err)
    assert len(lines) == 1 and "a peer rank died or hung (run.dist_timeout_s=5)" in lines[0], err[-3000:]
    # torchrun reports the rank's status 4, unless the killed agent was the one hosting the c10d store (whichever
    # agent bound the rendezvous port first): then the survivor's agent loses its store and stops without a summary
    assert "exitcode  : 4" in err or (fault == "node killed" and "RendezvousConnectionError" in err), err[-3000:]
    assert 'pretrain.py", line' not in err and "gloo/transport" not in err and "pair.cc" not in err, err[-3000:]
    if fault == "peer hung":
        assert "Timed out" in lines[0]
