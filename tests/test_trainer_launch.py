"""Launch-time behaviour that needs no second process: the CPU-fit and warm-up warnings, progress bars only on a
terminal (ingest.progress), and the run.dist_timeout_s key."""
from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

from ingest.progress import show_progress
from trainer.config import SAFE_ON_RESUME, ConfigError, load_config
from trainer.pretrain import _schedule, fit_warnings, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "trainer" / "configs"
DEBUG = str(CONFIGS / "debug_cpu.toml")


def _warnings(name: str, device: str, *overrides: str, steps_per_epoch: int = 100) -> list[str]:
    cfg = load_config(CONFIGS / name, ["data.shards=/data/shards", *overrides])
    return fit_warnings(cfg, torch.device(device), 1, _schedule(cfg, steps_per_epoch))


def test_the_flagship_batch_warns_on_the_cpu_only():
    (line,) = _warnings("simclr_r50_chexpert.toml", "cpu")
    assert line.startswith("pretrain: warning: data.batch_size=1024 at 224 px") and "\n" not in line
    assert _warnings("simclr_r50_chexpert.toml", "cuda") == []
    assert _warnings("debug_cpu.toml", "cpu") == []


def test_a_warm_up_as_long_as_the_run_warns():
    (line,) = _warnings("debug_cpu.toml", "cpu", "optim.total_steps=2", "optim.warmup_steps=2")
    assert "warm-up (2 steps) is not shorter than the run (2 steps)" in line
    # epochs-based: 10 warm-up epochs of a 5-epoch run
    (line,) = _warnings("simclr_r50_chexpert.toml", "cuda", "optim.epochs=5", steps_per_epoch=10)
    assert "warm-up (100 steps)" in line and "(50 steps)" in line


def test_progress_bars_only_on_a_terminal():
    assert not show_progress(True, io.StringIO())
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as tty:
        assert show_progress(True, tty) and not show_progress(False, tty)
    os.close(leader)
    closed = io.StringIO()
    closed.close()
    assert not show_progress(True, closed)


def test_a_run_into_a_log_has_no_bar_and_one_warning_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([DEBUG, "data.source=synthetic", "data.image_size=16", f"run.out={run}", "optim.total_steps=2",
                 "run.progress=true"]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.strip()] == [
        line for line in err.splitlines() if line.startswith("pretrain: warning: the warm-up (2 steps)")], err
    assert "step/s" not in err and "\r" not in err  # no tqdm bar written into the captured (non-terminal) stderr


def test_dist_timeout_key():
    synthetic = "data.source=synthetic"
    assert load_config(DEBUG, [synthetic, "run.dist_timeout_s=30"]).run.dist_timeout_s == 30.0
    assert load_config(DEBUG, [synthetic]).run.dist_timeout_s == 600.0
    with pytest.raises(ConfigError, match="run.dist_timeout_s must be > 0"):
        load_config(DEBUG, [synthetic, "run.dist_timeout_s=0"])
    assert "run.dist_timeout_s" in SAFE_ON_RESUME  # when to give up on a peer never changes what is computed
