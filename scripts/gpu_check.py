"""`make gpu-check`: on a lent H100 / H200, the GPU-marked tests, the fused kernels' tests and `python -m bench all
--quick` in one command within GPU_CHECK_BUDGET_S, logs and results under bench/results/<gpu>/.

`--dry-run` lists the steps and what they need beyond torch and triton (so it can be carried as wheels); without a
CUDA GPU the check refuses in one line.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK_BUDGET_S = 480  # 8 minutes for every step together


@dataclass(frozen=True)
class Need:
    module: str   # what the steps import
    wheel: str    # what to carry / pip install
    why: str


@dataclass(frozen=True)
class Step:
    name: str
    argv: list
    timeout_s: int


def cuda_major() -> int | None:
    """The CUDA major the driver supports (NVML), else torch's CUDA runtime; None without either."""
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            return pynvml.nvmlSystemGetCudaDriverVersion_v2() // 1000
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    import torch
    return int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None


def needs(major: int | None) -> list[Need]:
    """Packages the steps need beyond torch and triton; DALI's wheel follows the driver's CUDA major."""
    dali = f"nvidia-dali-cuda{major}0" if major in (12, 13) else "nvidia-dali-cuda120 or nvidia-dali-cuda130"
    return [Need("nvidia.dali", dali, "DALI pipelines (data tests, bench data / e2e)"),
            Need("webdataset", "webdataset", "shard reading in tests and bench data's baseline"),
            Need("pytest", "pytest", "the test steps")]


def steps(python: str, out_dir: Path) -> list[Step]:
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra"]
    return [
        Step("gpu-marked tests", pytest + ["-m", "gpu", "tests", f"--junitxml={out_dir / 'gpu-tests.xml'}"], 240),
        Step("fused kernel tests (real kernels, small shapes)",
             pytest + ["tests/test_fused_ntxent.py", "-k", "test_kernel_", f"--junitxml={out_dir / 'kernels.xml'}"],
             90),
        Step("bench all --quick", [python, "-m", "bench", "all", "--quick", "--stage-timeout-s", "60",
                                   "--out", str(out_dir)], 150),
    ]


def _gpu_out_dir() -> Path:
    from bench.harness import default_out_dir
    return default_out_dir()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list the steps and the packages they need, run nothing")
    args = p.parse_args(argv)
    import torch

    has_gpu = torch.cuda.is_available()
    major = cuda_major() if has_gpu else None
    out_dir = _gpu_out_dir() if has_gpu else ROOT / "bench" / "results" / "<gpu>"
    plan = steps(sys.executable, out_dir)
    required = needs(major)
    if args.dry_run:
        print(f"gpu-check plan ({GPU_CHECK_BUDGET_S} s budget; results under {out_dir}):")
        for s in plan:
            print(f"  {s.name} (<= {s.timeout_s} s): {' '.join(map(str, s.argv))}")
        print("needs beyond torch and triton (carry as wheels where missing):")
        for n in required:
            state = "present" if importlib.util.find_spec(n.module.split(".")[0]) else "missing"
            print(f"  {n.wheel} ({n.why}) [{state}]")
        dali = required[0].wheel if major in (12, 13) else "nvidia-dali-cudaXY0"
        hint = "" if major in (12, 13) else " (XY0: 120 or 130, the target driver's CUDA major)"
        print(f"to carry them: python -m pip download --only-binary=:all: -d wheels {dali} webdataset pytest{hint}")
        return 0
    if not has_gpu:
        print("gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False); run it on a machine with an "
              "H100 / H200, or use --dry-run to list its steps", file=sys.stderr)
        return 2
    missing = [n.wheel for n in required if importlib.util.find_spec(n.module.split(".")[0]) is None
               or importlib.util.find_spec(n.module) is None]
    if missing:
        print(f"gpu-check: missing {', '.join(missing)} (CUDA {major} driver); pip install or carry them as wheels",
              file=sys.stderr)
        return 2

    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "gpu-check.log"
    summary = {"gpu": torch.cuda.get_device_name(0), "cuda_major": major, "torch": torch.__version__,
               "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "steps": []}
    deadline = time.monotonic() + GPU_CHECK_BUDGET_S
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)
    with open(log, "w") as f:
        for s in plan:
            timeout = max(1.0, min(s.timeout_s, deadline - time.monotonic()))
            t0 = time.monotonic()
            f.write(f"==== {s.name}: {' '.join(map(str, s.argv))}\n")
            f.flush()
            try:
                rc = subprocess.run(s.argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                status = f"timed out after {timeout:.0f} s"
            took = time.monotonic() - t0
            summary["steps"].append({"name": s.name, "status": status, "seconds": round(took, 1)})
            print(f"gpu-check: {s.name}: {status} in {took:.0f} s", flush=True)
    (out_dir / "gpu-check.json").write_text(json.dumps(summary, indent=2) + "\n")
    failed = [s for s in summary["steps"] if s["status"] != "ok"]
    print(f"gpu-check: {len(plan) - len(failed)}/{len(plan)} steps ok; log {log}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
