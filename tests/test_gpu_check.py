"""`make gpu-check` (scripts/gpu_check.py): the one-line refusal without a GPU, the dry-run listing of its steps and
of what it needs beyond torch and triton, DALI's wheel per CUDA major, and the 8-minute budget."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up while the file executes
_spec.loader.exec_module(gpu_check)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_cpu_only_machine_gets_a_one_line_refusal(capsys):
    assert gpu_check.main([]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1
    assert out.err.startswith("gpu-check: no CUDA GPU visible") and "--dry-run" in out.err


def test_dry_run_lists_steps_and_wheels(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "-m pytest" in out and "-m gpu tests" in out and "test_kernel_" in out
    assert "-m bench all --quick" in out and "bench/results/" in out
    assert "nvidia-dali-cuda12" in out and "webdataset" in out and "pytest" in out
    listed = out.split("needs beyond torch and triton")[1].splitlines()[1:]
    assert "pip download --only-binary=:all: -d wheels" in out
    listed = [line for line in listed if line.startswith("  ")]
    assert len(listed) == 3 and not any(line.split()[0] in ("torch", "triton") for line in listed)


def test_dali_wheel_follows_the_cuda_major_and_steps_fit_the_budget(tmp_path):
    assert gpu_check.needs(12)[0].wheel == "nvidia-dali-cuda120"
    assert gpu_check.needs(13)[0].wheel == "nvidia-dali-cuda130"
    assert [n.wheel for n in gpu_check.needs(13)[1:]] == ["webdataset", "pytest"]
    plan = gpu_check.steps("python", tmp_path)
    assert sum(s.timeout_s for s in plan) <= gpu_check.GPU_CHECK_BUDGET_S <= 8 * 60


def test_make_target_runs_the_script():
    run = subprocess.run(["make", "-n", "-W", "pyproject.toml", "gpu-check"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "scripts/gpu_check.py" in run.stdout
