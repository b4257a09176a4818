"""Optional MLflow tracking of a pretraining run (run.mlflow_uri): the resolved config as params, every metrics row as
metrics, the run's end as its status. A resumed run continues the same MLflow run; metrics.jsonl and TensorBoard
stay the record of truth, and a tracking server that stops answering mid-run costs warnings, not the run."""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from ingest.errors import one_line

STATE_FILE = "mlflow.json"  # RUN/mlflow.json: {"tracking_uri", "run_id"} so a resumed run finds its MLflow run
_PARAMS_PER_CALL = 100      # MLflow's limit on params per log_batch
_BAD_KEY_CHARS = re.compile(r"[^0-9A-Za-z_\-. /]")  # MLflow metric names allow these; anything else becomes "_"


class TrackingError(RuntimeError):
    """The tracker cannot start (mlflow missing, server unreachable, state from another server): one line."""


def check_available(uri: str) -> None:
    """Raise TrackingError (one line) when tracking is asked for but mlflow, or the SQL store it needs, is absent."""
    if not uri:
        return
    import importlib.util
    if importlib.util.find_spec("mlflow") is None:
        raise TrackingError(f"run.mlflow_uri={uri} needs MLflow: pip install 'cxr-ssl[mlflow]' "
                            f"(or leave run.mlflow_uri empty)")
    if uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")) and importlib.util.find_spec("alembic") is None:
        raise TrackingError(f"run.mlflow_uri={uri} is a database store, which needs sqlalchemy and alembic: "
                            f"pip install 'cxr-ssl[mlflow]'")


class MlflowTracker:
    """One MLflow run per pretraining run, written through MlflowClient (no process-global active run)."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_dir: Path, params: dict[str, str],
                 resume_step: int | None):
        check_available(uri)
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        self._metric = Metric
        self.state_path = Path(run_dir) / STATE_FILE
        self._failing = False
        try:
            self.client = MlflowClient(tracking_uri=uri)  # a database store is opened (and migrated) here
            previous = self._previous_run(uri) if resume_step is not None else None
            if previous is not None:
                self.run_id = previous.info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                self.client.set_tag(self.run_id, "cxr_ssl.resumed_at_step", str(resume_step))
                # run.resume=force may have changed keys: MLflow params are write-once, so changes become tags
                for key, value in params.items():
                    old = previous.data.params.get(key)
                    if old is not None and old != value:
                        self.client.set_tag(self.run_id, f"cxr_ssl.changed_at_step_{resume_step}.{key}", value)
            else:
                found = self.client.get_experiment_by_name(experiment)
                exp_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
                run = self.client.create_run(exp_id, run_name=run_name or Path(run_dir).name,
                                             tags={"cxr_ssl.run_dir": str(Path(run_dir).resolve())})
                self.run_id = run.info.run_id
                items = [Param(k, v) for k, v in params.items()]
                for i in range(0, len(items), _PARAMS_PER_CALL):
                    self.client.log_batch(self.run_id, params=items[i : i + _PARAMS_PER_CALL])
                self.state_path.write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}) + "\n")
        except TrackingError:
            raise
        except Exception as e:  # an unreachable server, a bad URI, a refused experiment: before step 1, one line
            raise TrackingError(f"run.mlflow_uri={uri}: {one_line(e, limit_chars=300, with_type=True)}") from None

    def _previous_run(self, uri: str):
        """The MLflow run this run folder logged to before, or None (first start, or no tracking before)."""
        if not self.state_path.is_file():
            return None
        state = json.loads(self.state_path.read_text())
        if state.get("tracking_uri") != uri:
            raise TrackingError(f"{self.state_path}: this run logged to MLflow at {state.get('tracking_uri')}, not "
                                f"{uri}; resume with that run.mlflow_uri, or delete the file to start a new MLflow run")
        return self.client.get_run(state["run_id"])

    def log(self, row: dict) -> None:
        """The row's finite numbers as metrics at row["step"]; a failed call warns once per streak of failures."""
        now_ms, step = int(time.time() * 1000), int(row["step"])
        metrics = [self._metric(_BAD_KEY_CHARS.sub("_", k), float(v), now_ms, step) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
            if self._failing:
                print(f"mlflow: logging works again at step {step}", flush=True)
            self._failing = False
        except Exception as e:
            if not self._failing:
                print(f"warning: mlflow: step {step} not logged ({one_line(e, limit_chars=200, with_type=True)}); "
                      f"training goes on, metrics.jsonl has every row", flush=True)
            self._failing = True

    def close(self, status: str) -> None:
        """status: FINISHED, KILLED (stopped early: a signal or run.max_steps; it resumes) or FAILED."""
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as e:
            print(f"warning: mlflow: could not mark the run {status} ({type(e).__name__})", flush=True)
