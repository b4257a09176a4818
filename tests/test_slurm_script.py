"""scripts/slurm_pretrain.sbatch under stand-in srun / scontrol / torchrun: torchrun >= 2.12 gets the 150 s
--shutdown-timeout, an older one (no such flag; a fixed 30 s grace) does not and the ranks check for a stop every 5
steps instead; the launch is the c10d rendezvous that tests/test_trainer_multinode.py runs on one box."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_pretrain.sbatch"


def _launch(tmp_path: Path, torchrun_help: str, *args: str) -> tuple[list[str], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {"torchrun": f"echo '{torchrun_help}'", "srun": 'echo "$@" > "$SRUN_ARGS"', "scontrol": "echo node1"}
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SRUN_ARGS=str(tmp_path / "srun.args"),
               SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="7", SLURM_GPUS_ON_NODE="4")
    done = subprocess.run(["bash", str(SCRIPT), "cfg.toml", *args], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return (tmp_path / "srun.args").read_text().split(), done.stderr


@pytest.mark.parametrize("version", ["2.12+", "2.11"])
def test_grace_follows_what_torchrun_supports(tmp_path, version):
    help_text = "  --shutdown-timeout SHUTDOWN_TIMEOUT" if version == "2.12+" else "  --max-restarts MAX_RESTARTS"
    argv, err = _launch(tmp_path, help_text, "run.out=/scratch/r", "run.signal_check_every=2")
    assert argv[:2] == ["--kill-on-bad-exit=1", "torchrun"]
    assert {"--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d", "--rdzv_endpoint=node1:29500",
            "--rdzv_id=7", "--max_restarts=0"} <= set(argv)
    pretrain = argv[argv.index("trainer/pretrain.py"):]
    if version == "2.12+":
        assert "--shutdown-timeout=150" in argv and "grace 150 s" in err
        assert pretrain[:3] == ["trainer/pretrain.py", "cfg.toml", "run.signal_check_every=0"]
    else:
        assert not any(a.startswith("--shutdown-timeout") for a in argv) and "grace 30 s" in err
        assert pretrain[:3] == ["trainer/pretrain.py", "cfg.toml", "run.signal_check_every=5"]
    # the user's overrides come after the script's default (they win), resume and progress come last
    assert pretrain[3:] == ["run.out=/scratch/r", "run.signal_check_every=2", "run.resume=auto",
                            "run.progress=false"]
