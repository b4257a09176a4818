"""Resume past an unreadable checkpoint: a truncated latest checkpoint is skipped (named, with the reason, and kept
aside as *.unreadable) and the run continues from the newest readable one; with none readable, one line, exit 2."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from trainer.pretrain import main

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "trainer" / "configs" / "debug_cpu.toml")


def _base(run: Path) -> list[str]:
    return [DEBUG, "data.source=synthetic", "data.synthetic_batches=2", "optim.total_steps=3", "run.ckpt_every=1",
            "run.keep_last=3", "run.log_every=1", "run.tensorboard=false", "run.progress=false", f"run.out={run}"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A run stopped at step 2 of 3 with checkpoints at steps 1 and 2."""
    run = tmp_path_factory.mktemp("fallback") / "run"
    assert main(_base(run) + ["run.max_steps=2"]) == 0
    return run


def test_truncated_latest_checkpoint_resumes_from_the_previous(stopped_run, tmp_path, capsys):
    run = shutil.copytree(stopped_run, tmp_path / "run")
    latest = run / "ckpt" / "step-000002.pt"
    latest.write_bytes(latest.read_bytes()[:4096])  # a copy cut short
    capsys.readouterr()
    assert main(_base(run)) == 0
    out = capsys.readouterr().out
    assert f"resume: skipped {latest}: not a readable checkpoint (" in out, out
    assert "kept as step-000002.pt.unreadable" in out
    assert f"resumed from {run / 'ckpt' / 'step-000001.pt'} at step 1" in out
    assert "step       2 |" in out and "finished at step 3/3" in out  # step 2 is trained again
    names = sorted(p.name for p in (run / "ckpt").iterdir())
    assert names == ["step-000001.pt", "step-000002.pt", "step-000002.pt.unreadable", "step-000003.pt"], names


def test_no_readable_checkpoint_is_one_line_exit_2(stopped_run, tmp_path, capsys):
    run = shutil.copytree(stopped_run, tmp_path / "run")
    for ckpt in (run / "ckpt").glob("step-*.pt"):
        ckpt.write_bytes(b"")
    capsys.readouterr()
    assert main(_base(run)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "none of the 2 checkpoints is readable" in err, err
    assert "step-000002.pt: not a readable checkpoint (EOFError)" in err
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["step-000001.pt", "step-000002.pt"]  # left as found
