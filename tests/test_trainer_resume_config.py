"""A resume refuses a changed config (one line naming the keys) except the keys safe to change; run.resume=force
overrides; RUN/config.toml keeps the original until the check passes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trainer.config import SAFE_ON_RESUME, changed_keys, load_config, to_dict
from trainer.pretrain import main

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "trainer" / "configs" / "debug_cpu.toml")


def _base(run: Path) -> list[str]:
    return [DEBUG, "data.source=synthetic", "data.synthetic_batches=2", "optim.total_steps=4", "run.ckpt_every=2",
            "run.log_every=1", "run.tensorboard=false", "run.progress=false", f"run.out={run}"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A run stopped with a checkpoint at step 2 of 4; tests resume copies of it."""
    run = tmp_path_factory.mktemp("resume") / "run"
    assert main(_base(run) + ["run.max_steps=2"]) == 0
    return run


def test_changed_keys_names_every_difference_outside_the_safe_list():
    a = to_dict(load_config(DEBUG, ["data.source=synthetic"]))
    b = to_dict(load_config(DEBUG, ["data.source=synthetic", "loss.temperature=0.5", "optim.base_lr=1.0",
                                    "run.max_steps=9", "run.log_every=3", "run.progress=false", "run.resume=force"]))
    assert changed_keys(a, b) == ["loss.temperature: 0.2 -> 0.5", "optim.base_lr: 0.3 -> 1.0"]
    del b["data"]["views"]  # a key this version does not know counts as changed
    assert any(k.startswith("data.views: ") and k.endswith("-> (absent)") for k in changed_keys(a, b))
    assert {"run.max_steps", "run.log_every", "run.ckpt_every", "run.progress", "run.tensorboard"} <= SAFE_ON_RESUME


def test_resume_refuses_a_changed_config_and_force_overrides(stopped_run, tmp_path, capsys):
    run = shutil.copytree(stopped_run, tmp_path / "run")
    original = (run / "config.toml").read_text()
    capsys.readouterr()

    # safe keys: the resume goes ahead
    assert main(_base(run) + ["run.max_steps=3", "run.log_every=2", "run.ckpt_every=1"]) == 0
    assert "resumed from" in capsys.readouterr().out

    # a changed key: one line naming it, nothing loaded or rewritten
    code = main(_base(run) + ["loss.temperature=0.5", "optim.weight_decay=0.01"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "differs from the checkpoint's in loss.temperature: 0.2 -> 0.5; optim.weight_decay: " in err, err
    assert "run.resume=force" in err
    resolved = (run / "config.toml").read_text()
    assert "temperature = 0.5" not in resolved and "max_steps = 3" in resolved  # the last accepted run's config
    assert "max_steps = 2" in original

    # force: continues, says so, and the new config becomes the run's
    assert main(_base(run) + ["loss.temperature=0.5", "optim.weight_decay=0.01", "run.resume=force"]) == 0
    out = capsys.readouterr().out
    assert "run.resume=force: continuing with changed loss.temperature: 0.2 -> 0.5" in out
    assert "temperature = 0.5" in (run / "config.toml").read_text()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


@pytest.mark.parametrize("key", ["data.batch_size=4", "model.proj_dim=16", "loss.method=micle"])
def test_structural_changes_are_refused_before_the_weights_are_loaded(stopped_run, tmp_path, capsys, key):
    run = shutil.copytree(stopped_run, tmp_path / "run")
    assert main(_base(run) + [key]) == 2
    err = capsys.readouterr().err
    assert f"{key.split('=')[0]}: " in err and "does not match this run's model" not in err
