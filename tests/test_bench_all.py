"""`python -m bench all`: CPU smoke through the real stages, missing and broken stages reported, summary maths."""
from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import pytest

from bench import all_bench
from bench.report import headline, markdown, plot


def test_bench_all_cpu_smoke(tmp_path, monkeypatch, capsys):
    """Phantom shards through ingest, the real e2e and loss stages at tiny sizes, a stage reported missing."""
    monkeypatch.setitem(all_bench.STAGE_MODULES, "ingest", "bench.no_such_stage_bench")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    rc = all_bench.main(["--out", str(tmp_path), "--quick", "--in-process", "--stages", "ingest,e2e,loss"])
    assert rc == 0, capsys.readouterr().err
    docs = sorted(tmp_path.glob("*.json"))
    assert len(docs) == 1
    doc = json.loads(docs[0].read_text())
    assert doc["mode"] == "quick" and doc["env"]["cpu_cores_available"] >= 1
    assert doc["stages"]["ingest"]["status"] == "missing"
    for stage in ("e2e", "loss"):
        assert doc["stages"][stage]["status"] == "ok", doc["stages"][stage]
        assert doc["stages"][stage]["result"]["rows"]
    e2e_row = doc["stages"]["e2e"]["result"]["rows"][0]
    summary = doc["summary"]
    assert summary["pipeline_efficiency"] == pytest.approx(
        e2e_row["e2e_views_per_s"] / e2e_row["model_only_views_per_s"])
    assert 0 <= summary["data_wait_pct"] <= 100
    assert any(k.startswith("end-to-end") for k in summary["images_per_s"])
    stem = docs[0].stem
    md = (tmp_path / f"{stem}.md").read_text()
    assert "| ingest | missing |" in md and f"![throughput]({stem}.png)" in md and "No GPU" in md
    assert (tmp_path / f"{stem}.png").stat().st_size > 1000
    assert (tmp_path / stem / "e2e.log").is_file() and (tmp_path / stem / "loss.json").is_file()
    # a second run the same day keeps the first result
    rc = all_bench.main(["--out", str(tmp_path), "--quick", "--in-process", "--stages", "loss"])
    assert rc == 0 and len(list(tmp_path.glob("*.json"))) == 2


def test_a_broken_stage_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    broken = types.ModuleType("bench.broken_stage_bench")
    broken.__spec__ = importlib.machinery.ModuleSpec("bench.broken_stage_bench", None)

    def main(argv):
        raise RuntimeError("kaboom\nsecond line")
    broken.main = main
    monkeypatch.setitem(sys.modules, "bench.broken_stage_bench", broken)
    monkeypatch.setitem(all_bench.STAGE_MODULES, "model", "bench.broken_stage_bench")
    rc = all_bench.main(["--out", str(tmp_path), "--quick", "--in-process", "--stages", "model,loss"])
    assert rc == 1
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert doc["stages"]["model"]["status"] == "error" and doc["stages"]["model"]["error"] == "RuntimeError: kaboom"
    assert doc["stages"]["loss"]["status"] == "ok"


def test_headline_markdown_and_plot_from_stage_documents(tmp_path):
    stages = {
        "ingest": {"status": "ok", "result": {"rows": [
            {"input": "jpeg", "stage": "decode+resize+encode, 1 process", "workers": 1, "images_per_s": 300.0,
             "images_per_s_per_worker": 300.0},
            {"input": "jpeg", "stage": "build-shards end to end", "workers": 1, "images_per_s": 250.0},
            {"input": "jpeg", "stage": "build-shards end to end", "workers": 8, "images_per_s": 1800.0}]}},
        "data": {"status": "ok", "result": {"rows": [
            {"loader": "dali-gpu", "workers_or_threads": 8, "samples_per_s": 9000.0}]}},
        "model": {"status": "ok", "result": {"rows": [
            {"arch": "resnet50", "image_size": 224, "compile": "eager", "precision": "bf16",
             "memory_format": "channels_last", "views_per_s": 4000.0},
            {"arch": "resnet50", "image_size": 224, "compile": "compile", "precision": "bf16",
             "memory_format": "channels_last", "views_per_s": 5000.0}]}},
        "e2e": {"status": "ok", "result": {"rows": [
            {"arch": "resnet50", "image_size": 224, "data_device": "gpu", "e2e_views_per_s": 4600.0,
             "model_only_views_per_s": 5000.0, "pipeline_efficiency": 0.92, "data_wait_pct": 3.5}]}},
        "loss": {"status": "missing", "error": "bench.loss_bench is not in this checkout"},
    }
    s = headline(stages)
    ips = s["images_per_s"]
    assert ips["ingest build-shards (jpeg, 8 workers)"] == 1800.0
    assert ips["model-only step (resnet50 224px, compile bf16 channels_last)"] == 2500.0   # 2 views per image
    assert s["pipeline_efficiency"] == 0.92 and s["data_wait_pct"] == 3.5 and "loss_ms_at_max_n" not in s
    doc = {"env": {"gpus": ["NVIDIA H100 80GB HBM3"], "cpu": "x", "versions": {}}, "summary": s, "stages": stages,
           "command": "python -m bench all", "mode": "full", "wall_s": 300.0}
    md = markdown(doc, "p.png")
    assert md.startswith("# Benchmark: NVIDIA H100") and "**92.0%**" in md and "No GPU" not in md
    assert "| loss | missing |" in md
    png = plot(s, tmp_path / "p.png", "H100")
    assert png is not None and png.stat().st_size > 1000
    assert plot({"images_per_s": {}}, tmp_path / "none.png", "x") is None


def test_bad_stage_name_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        all_bench.main(["--stages", "model,warp"])
    assert e.value.code == 2
