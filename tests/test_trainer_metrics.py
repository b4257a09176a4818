"""Run visibility: one console line and one metrics.jsonl row per log step, with GPU utilisation, memory and power
from pynvml when it is present (a stand-in module here), TensorBoard scalars, resume truncation."""
from __future__ import annotations

import json
import sys
import types

import torch

from trainer.metrics import MetricsLogger, StepTimer


def _fake_pynvml(monkeypatch) -> None:
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetHandleByIndex = lambda index: ("gpu", index)
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=87, memory=40)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30)
    nvml.nvmlDeviceGetPowerUsage = lambda h: 412_500  # milliwatts
    monkeypatch.setitem(sys.modules, "pynvml", nvml)


def test_log_row_console_line_gpu_stats_and_tensorboard(tmp_path, monkeypatch):
    _fake_pynvml(monkeypatch)
    logger = MetricsLogger(tmp_path, device=torch.device("cuda", 0), tensorboard=True)
    timer = StepTimer()
    timer.add_data_wait(0.0)
    timer.step()
    t = timer.summary()
    line = logger.log({"step": 10, "epoch": 0.5, "loss": 4.25, "lr": 0.3, "images_per_s": 1000.0,
                       "views_per_s": 2000.0, "step_ms": t["step_ms"], "data_wait_pct": t["data_wait_pct"],
                       "peak_mem_gib": 12.5})
    logger.log({"step": 20, "loss": 4.0, "lr": 0.2})
    logger.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]
    assert rows[0]["gpu_util_pct"] == 87 and rows[0]["gpu_mem_used_mib"] == 3 * 1024 and rows[0]["gpu_power_w"] == 412.5
    assert "\n" not in line
    for part in ("step      10", "loss 4.2500", "lr 3.000e-01", "1,000 img/s", "2,000 views/s", "wait 0.0%",
                 "12.50 GiB", "gpu 87%", "412 W"):
        assert part in line, (part, line)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/views_per_s", "train/gpu_util_pct", "train/peak_mem_gib"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [10, 20]

    # a resume at step 10 drops the rows logged after that checkpoint
    MetricsLogger(tmp_path, resume_step=10, tensorboard=False).close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [10]


def test_no_gpu_stats_without_pynvml_or_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    logger = MetricsLogger(tmp_path, device=torch.device("cuda", 0), tensorboard=False)
    logger.log({"step": 1, "loss": 1.0})
    cpu = MetricsLogger(tmp_path / "cpu", device=torch.device("cpu"), tensorboard=False)
    (tmp_path / "cpu").mkdir()
    cpu.log({"step": 1, "loss": 1.0})
    for path in (tmp_path / "metrics.jsonl", tmp_path / "cpu" / "metrics.jsonl"):
        (row,) = [json.loads(x) for x in path.read_text().splitlines()]
        assert not any(k.startswith("gpu_") for k in row)
