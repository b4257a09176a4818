"""Shared benchmark harness: environment capture, warm-up + repeated timing (median / p90), GPU sampling, JSON + table.

Every `python -m bench <sub>` builds one `BenchReport`, adds rows, and calls `finish()`.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ingest.files import atomic_write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _version(module: str) -> str | None:
    try:
        mod = __import__(module, fromlist=["__version__"])
        return getattr(mod, "__version__", "unknown")
    except Exception:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def capture_env() -> dict:
    """What ran the benchmark: GPU(s), driver, CUDA, library versions, CPU, cores, commit."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "git_commit": _git_commit(),
        "versions": {m: _version(m) for m in ("torch", "torchvision", "triton", "numpy", "webdataset", "PIL")},
        "gpus": [],
    }
    try:
        from nvidia import dali  # noqa: F401
        env["versions"]["nvidia.dali"] = dali.__version__
    except Exception:
        env["versions"]["nvidia.dali"] = None
    try:
        import torch
        env["cuda_runtime"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    try:
        import pynvml
        pynvml.nvmlInit()
        env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        pynvml.nvmlShutdown()
    except Exception:
        env["driver"] = None
    return env


def gpu_slug(env: dict) -> str:
    """Folder name for bench/results: the first GPU's name, or 'cpu-<model>' without a GPU."""
    name = env["gpus"][0] if env.get("gpus") else f"cpu-{env.get('cpu', 'unknown')}"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def _sync() -> None:
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except Exception:
        pass


@dataclass
class Timing:
    seconds: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def p90_s(self) -> float:
        s = sorted(self.seconds)
        return s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]

    def as_dict(self) -> dict:
        return {"median_s": self.median_s, "p90_s": self.p90_s, "repeats": len(self.seconds)}


def time_fn(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 5, sync: bool = True,
            cuda_events: bool = False) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (CUDA-synchronised on each side). With
    ``cuda_events`` and a CUDA device, each run is timed by CUDA events recorded around it on the current stream."""
    for _ in range(warmup):
        fn()
    if sync:
        _sync()
    if cuda_events:
        import torch
        if torch.cuda.is_available():
            out = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end) / 1000)
            return Timing(out)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            _sync()
        out.append(time.perf_counter() - t0)
    return Timing(out)


class GpuSampler:
    """Samples GPU utilisation %, memory and power with pynvml in a thread; a no-op without pynvml or a GPU."""

    def __init__(self, interval_s: float = 0.1, device_index: int = 0):
        self.interval_s, self.device_index = interval_s, device_index
        self.samples: list[tuple[float, float, float]] = []  # (util %, memory MiB, power W)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "GpuSampler":
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.device_index)
        except Exception:
            return self

        def loop():
            while not self._stop.is_set():
                try:
                    util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
                    mem = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
                    power = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
                    self.samples.append((float(util), float(mem), float(power)))
                except Exception:
                    return
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        util, mem, power = zip(*self.samples)
        return {"gpu_util_pct_median": statistics.median(util), "gpu_mem_mib_max": max(mem),
                "gpu_power_w_median": statistics.median(power), "samples": len(self.samples)}


@dataclass
class BenchReport:
    """One benchmark document: the command, the environment and a list of result rows."""
    name: str
    argv: list[str]
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    env: dict = field(default_factory=capture_env)

    def add(self, **row) -> dict:
        self.rows.append(row)
        return row

    def as_dict(self) -> dict:
        return {"benchmark": self.name, "command": "python -m bench " + " ".join([self.name, *self.argv]),
                "env": self.env, "rows": self.rows, "notes": self.notes}

    def table(self, columns: list[str] | None = None) -> str:
        if not self.rows:
            return "(no rows)"
        columns = columns or list(dict.fromkeys(k for r in self.rows for k in r))

        def fmt(v):
            if isinstance(v, float):
                return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
            return "" if v is None else str(v)

        cells = [[fmt(r.get(c)) for c in columns] for r in self.rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
                 "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        lines += ["| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |" for row in cells]
        return "\n".join(lines)

    def finish(self, out: str | Path | None = None, columns: list[str] | None = None) -> Path | None:
        """Print the table; write the JSON document to ``out`` (a file, or a folder that gets ``<name>.json``)."""
        print(self.table(columns))
        for n in self.notes:
            print(f"note: {n}")
        if out is None:
            return None
        out = Path(out)
        if out.suffix != ".json":
            out = out / f"{self.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(self.as_dict(), indent=2, default=str) + "\n")
        print(f"wrote {out}", file=sys.stderr)
        return out


def default_out_dir(env: dict | None = None) -> Path:
    """``bench/results/<gpu-name>/`` for this machine."""
    return RESULTS_DIR / gpu_slug(env or capture_env())
