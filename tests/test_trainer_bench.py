"""CPU smoke tests of `python -m bench model` and `python -m bench e2e` (tiny sizes; real numbers need a GPU)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench.__main__ import main as bench_main

ROOT = Path(__file__).resolve().parents[1]


def test_bench_model_quick(tmp_path):
    out = tmp_path / "model.json"
    assert bench_main(["model", "--quick", "--memory-format", "nchw,channels_last", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert {(r["precision"], r["memory_format"]) for r in rows} == {
        ("fp32", "nchw"), ("fp32", "channels_last"), ("bf16", "nchw"), ("bf16", "channels_last")}
    assert all(r["views_per_s"] > 0 and r["step_ms"] > 0 and r["loss_finite"] for r in rows)
    assert doc["env"]["cpu_cores_available"] >= 1 and doc["command"].startswith("python -m bench model")


def test_bench_model_rejects_bad_grid(capsys):
    assert bench_main(["model", "--quick", "--precision", "fp8", "--no-save"]) == 2
    assert "unknown grid value" in capsys.readouterr().err


def test_bench_e2e_quick(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from shardgen import make_shards

    shards = make_shards(tmp_path / "shards", num_patients=16)
    out = tmp_path / "e2e.json"
    assert bench_main(["e2e", "--quick", "--shards", str(shards), "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["e2e_views_per_s"] > 0 and row["model_only_views_per_s"] > 0
    assert row["pipeline_efficiency"] == pytest.approx(row["e2e_views_per_s"] / row["model_only_views_per_s"])
    assert 0 <= row["data_wait_pct"] <= 100
    assert bench_main(["e2e", "--quick", "--shards", str(tmp_path / "nothing"), "--no-save"]) == 2
