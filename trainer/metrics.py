"""Run visibility: a console line and a `metrics.jsonl` row per log step, TensorBoard scalars, GPU stats (pynvml) and,
with a tracker, MLflow. Device values are read (`.item()`) only at log steps; between them the loop only accumulates
host-side timings.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch


class GpuStats:
    """Utilisation %, memory used (MiB) and power (W) of one GPU through pynvml; empty when unavailable."""

    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:
            self.handle = None

    def read(self) -> dict:
        if self.handle is None:
            return {}
        try:
            n = self._nvml
            return {"gpu_util_pct": float(n.nvmlDeviceGetUtilizationRates(self.handle).gpu),
                    "gpu_mem_used_mib": n.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20,
                    "gpu_power_w": n.nvmlDeviceGetPowerUsage(self.handle) / 1000.0}
        except Exception:
            return {}


class StepTimer:
    """Host-side wall time and time blocked waiting for the next batch, accumulated between log steps."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.data_wait_s = 0.0
        self.steps = 0

    def add_data_wait(self, seconds: float) -> None:
        self.data_wait_s += seconds

    def step(self) -> None:
        self.steps += 1

    def summary(self) -> dict:
        wall = max(time.perf_counter() - self.t0, 1e-9)
        steps = max(self.steps, 1)
        return {"wall_s": wall, "step_ms": 1000.0 * wall / steps, "data_wait_pct": 100.0 * self.data_wait_s / wall}


class MetricsLogger:
    """Writes RUN/metrics.jsonl (append; rows past a resume point are dropped), TensorBoard, and the console."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None, device: torch.device = torch.device("cpu"), tracker=None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self.tracker = tracker  # trainer.tracking.MlflowTracker or None
        self.gpu = GpuStats(device) if enabled else None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step)
            except Exception as e:  # tensorboard is optional
                print(f"tensorboard logging off ({type(e).__name__}: {e})", flush=True)

    def _truncate_after(self, step: int) -> None:
        """A run killed after logging step s > checkpoint step resumes at the checkpoint: drop the stale rows."""
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a kill
        self.path.write_text("".join(k + "\n" for k in keep))

    def log(self, row: dict) -> str:
        if self.gpu is not None:
            row.update(self.gpu.read())
        line = format_line(row)
        if not self.enabled:
            return line
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():  # "health/std", "knn_auroc/<task>" keep their own group
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k if "/" in k else f"train/{k}", v, row["step"])
        if self.tracker is not None:
            self.tracker.log(row)
        return line

    def close(self, status: str = "FINISHED") -> None:
        """``status``: how the run ended, for the tracker (FINISHED, KILLED or FAILED)."""
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.tracker is not None:
            self.tracker.close(status)


_LINE_FORMATS = (  # key -> how it reads on the console line
    ("epoch", "epoch {:.2f}"), ("loss", "loss {:.4f}"), ("lr", "lr {:.3e}"), ("images_per_s", "{:,.0f} img/s"),
    ("views_per_s", "{:,.0f} views/s"), ("step_ms", "{:.1f} ms"), ("data_wait_pct", "wait {:.1f}%"),
    ("peak_mem_gib", "{:.2f} GiB"), ("peak_rss_gib", "rss {:.2f} GiB"), ("gpu_util_pct", "gpu {:.0f}%"),
    ("gpu_power_w", "{:.0f} W"), ("health/emb_std", "std {:.3f}"), ("health/top1", "top1 {:.2f}"),
    ("health/grad_norm", "|g| {:.3g}"), ("knn_auroc_mean", "kNN AUROC {:.3f}"),
)


def format_line(row: dict) -> str:
    parts = [f"step {row['step']:>7d}"]
    parts += [fmt.format(row[key]) for key, fmt in _LINE_FORMATS if row.get(key) is not None]
    return " | ".join(parts)
