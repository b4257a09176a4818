"""MLflow tracking (run.mlflow_uri): written by a real run into a local sqlite store and read back with MLflow's own
client; a killed-then-resumed run continues one MLflow run; a missing MLflow or an unreachable store is one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.pretrain import main

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "trainer" / "configs" / "debug_cpu.toml")


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_logs_params_metrics_and_status_and_resume_continues_the_same_mlflow_run(tmp_path, capsys):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install 'cxr-ssl[mlflow]')")
    pytest.importorskip("alembic", reason="the mlflow extra's SQL store is not installed")
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "run"
    args = [DEBUG, "data.source=synthetic", f"run.out={run}", f"run.mlflow_uri={uri}", "run.mlflow_experiment=demo",
            "run.log_every=2"]
    assert main(args + ["run.max_steps=3"]) == 0  # steps 1-3 of 6, then a checkpoint: stopped early
    client = MlflowClient(tracking_uri=uri)
    state = json.loads((run / "mlflow.json").read_text())
    first = client.get_run(state["run_id"])
    assert first.info.status == "KILLED" and first.info.run_name == "run"
    assert first.data.params["optim.name"] == "lars" and first.data.params["loss.method"] == "simclr"
    assert first.data.params["data.source"] == "synthetic" and first.data.params["run.max_steps"] == "3"
    assert "mlflow: run " in capsys.readouterr().out

    assert main(args) == 0  # resumes at step 3 and finishes
    assert json.loads((run / "mlflow.json").read_text())["run_id"] == state["run_id"]
    done = client.get_run(state["run_id"])
    assert done.info.status == "FINISHED"
    assert done.data.tags["cxr_ssl.resumed_at_step"] == "3"
    assert done.data.tags["cxr_ssl.changed_at_step_3.run.max_steps"] == "0"  # params are write-once: a tag
    experiment = client.get_experiment_by_name("demo")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [state["run_id"]]
    # every metrics.jsonl row is in MLflow at its step with its value (health keys keep their "/" group)
    rows = _rows(run)
    loss = {m.step: m.value for m in client.get_metric_history(state["run_id"], "loss")}
    assert {r["step"]: r["loss"] for r in rows}.items() <= loss.items() and set(loss) == {2, 3, 4, 6}
    std = {m.step: m.value for m in client.get_metric_history(state["run_id"], "health/emb_std")}
    assert std[6] == pytest.approx(rows[-1]["health/emb_std"])


def test_missing_mlflow_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    run = tmp_path / "run"
    rc = main([DEBUG, "data.source=synthetic", f"run.out={run}", "run.mlflow_uri=http://127.0.0.1:9/"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "run.mlflow_uri=http://127.0.0.1:9/ needs MLflow: pip install 'cxr-ssl[mlflow]'" in err[0]
    assert not run.exists()


def test_a_store_that_cannot_start_stops_the_run_in_one_line(tmp_path, capsys):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    pytest.importorskip("alembic", reason="the mlflow extra's SQL store is not installed")
    run = tmp_path / "run"
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's folder should be")
    rc = main([DEBUG, "data.source=synthetic", f"run.out={run}", f"run.mlflow_uri=sqlite:///{blocker}/x/mlflow.db"])
    err = capsys.readouterr().err.strip().splitlines()
    assert (rc == 2 and len(err) == 1
            and err[0].startswith(f"pretrain: run.mlflow_uri=sqlite:///{blocker}/x/mlflow.db: "))
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text()


def test_a_resume_against_another_tracking_store_is_refused(tmp_path, capsys):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    pytest.importorskip("alembic", reason="the mlflow extra's SQL store is not installed")
    run = tmp_path / "run"
    first, second = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    base = [DEBUG, "data.source=synthetic", f"run.out={run}"]
    assert main(base + [f"run.mlflow_uri={first}", "run.max_steps=3"]) == 0
    capsys.readouterr()
    assert main(base + [f"run.mlflow_uri={second}"]) == 2
    err = capsys.readouterr().err
    assert f"this run logged to MLflow at {first}, not {second}" in err
