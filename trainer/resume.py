"""Resume: which checkpoint a run continues from, the check that it is the same run (config), and the restore of
weights, optimiser, scaler, position, RNG and loader state. Errors are `ResumeError`, one line each."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ingest.errors import one_line
from trainer import checkpoint as ckpt
from trainer import distributed as dist_utils
from trainer.config import Config, changed_keys, to_dict


class ResumeError(ValueError):
    """A checkpoint this run cannot continue from; the message is one line naming the file and the reason."""


@dataclass
class Position:
    """Where the run is: optimiser steps done, epoch, and batches of that epoch consumed."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def restore(resume_path: Path | None, cfg: Config, info: dist_utils.DistInfo, raw_model, step_fn, loader,
            steps_per_epoch: int) -> Position:
    """Weights, optimiser, scaler, position, this rank's RNG and loader state from ``resume_path`` (None: fresh), or
    from the newest earlier checkpoint where that one cannot be read (``load_newest_readable``)."""
    loader.set_epoch(0)
    if resume_path is None:
        return Position()
    resume_path, state = load_newest_readable(resume_path, cfg, info)
    check_same_config(state.get("config", {}), cfg, resume_path, info)
    try:
        raw_model.load_state_dict(state["model"])
        step_fn.optimizer.load_state_dict(state["optimizer"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise ResumeError(f"{resume_path}: does not match this run's model/optimiser "
                          f"({one_line(e, limit_chars=200)}); use another run.out") from None
    if step_fn.scaler is not None and state.get("scaler"):
        step_fn.scaler.load_state_dict(state["scaler"])
    pos = Position(int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"]))
    ranks = state.get("ranks", [])
    if len(ranks) == info.world_size:
        ckpt.set_rng_state(ranks[info.rank]["rng"])
        loader.set_epoch(pos.epoch)
        try:
            loader.load_state_dict(ranks[info.rank]["loader"])
        except ValueError as e:
            raise ResumeError(f"{resume_path}: {one_line(e)}") from None
        if pos.batch_in_epoch >= steps_per_epoch:  # saved right after an epoch's last batch
            pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
            loader.set_epoch(pos.epoch)
    else:  # a different world size cannot continue the same data order: restart the epoch, same schedule
        loader.set_epoch(pos.epoch)
        pos.batch_in_epoch = 0
        if info.is_main:
            print(f"resume: checkpoint has {len(ranks)} rank states, this run {info.world_size}; restarting epoch "
                  f"{pos.epoch} data order", flush=True)
    if info.is_main:
        print(f"resumed from {resume_path} at step {pos.step}", flush=True)
    return pos


TRAINING_KEYS = ("model", "optimizer", "step", "epoch", "batch_in_epoch")


def read_training_checkpoint(path: Path) -> dict:
    """The state saved by the trainer at ``path``; ValueError (one line naming the file) when it cannot be read or
    lacks what a resume needs."""
    state = ckpt.load_checkpoint(path, map_location="cpu")  # load_state_dict copies to the device
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a training checkpoint (top level is {type(state).__name__})")
    missing = [k for k in TRAINING_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path}: not a training checkpoint (no {', '.join(missing)})")
    return state


def load_newest_readable(resume_path: Path, cfg: Config, info: dist_utils.DistInfo) -> tuple[Path, dict]:
    """(path, state) of ``resume_path``; under run.resume=auto|force a checkpoint that cannot be read (truncated by
    a full disk or an interrupted copy) is skipped, with the file and the reason printed, for the newest earlier
    one that can. A skipped file is renamed ``*.unreadable`` (kept, but no longer counted by ``keep_last``, which
    would otherwise delete the good checkpoints around it). An explicit run.resume=PATH is never replaced."""
    candidates = [Path(resume_path)]
    if cfg.run.resume in ("auto", "force"):
        # By step, not by membership: another rank may already have renamed an unreadable resume_path aside.
        step = ckpt.checkpoint_step(candidates[0])
        if step is not None:
            candidates += [p for p in reversed(ckpt.list_checkpoints(cfg.run.out)) if ckpt.checkpoint_step(p) < step]
    skipped: list[tuple[Path, str]] = []
    for path in candidates:
        try:
            state = read_training_checkpoint(path)
        except (ValueError, OSError) as e:
            skipped.append((path, one_line(e)))
            continue
        if info.is_main:
            for bad, reason in skipped:
                kept = bad.with_name(bad.name + ".unreadable")
                try:
                    bad.rename(kept)
                except OSError:
                    kept = bad
                print(f"resume: skipped {reason}; kept as {kept.name}", flush=True)
        return path, state
    if len(candidates) == 1:
        raise ResumeError(skipped[0][1])
    raise ResumeError(f"{Path(cfg.run.out) / ckpt.CKPT_DIR}: none of the {len(candidates)} checkpoints is readable "
                      f"(newest: {skipped[0][1]}); use run.resume=none run.overwrite=true to start again")


def check_same_config(saved: dict, cfg: Config, resume_path: Path, info: dist_utils.DistInfo) -> None:
    """A resume continues the run it finds: any key outside SAFE_ON_RESUME that differs stops it (one line naming
    the keys), unless run.resume=force."""
    changed = changed_keys(saved, to_dict(cfg))
    if not changed:
        return
    listed = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
    if cfg.run.resume != "force":
        raise ResumeError(f"{resume_path}: this run's config differs from the checkpoint's in {listed}; "
                          f"restore those values, or use run.resume=force to continue with the new ones")
    if info.is_main:
        print(f"resume: run.resume=force: continuing with changed {listed}", flush=True)


def find_checkpoint(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint to continue from, per run.resume; refuses to start over a run's output without overwrite."""
    mode = cfg.run.resume
    if mode not in ("auto", "force", "none"):
        path = Path(mode)
        if not path.is_file():
            raise ResumeError(f"run.resume={mode}: no such checkpoint")
        return path
    latest = ckpt.latest_checkpoint(run_dir)
    if mode in ("auto", "force") and latest is not None:
        return latest
    if latest is not None or (run_dir / "encoder.pt").exists():
        if not cfg.run.overwrite:
            raise ResumeError(f"{run_dir} holds a previous run's checkpoints; use run.resume=auto to "
                              f"continue or run.overwrite=true to start again")
        dist_utils.barrier()
        if dist_utils.world()[0] == 0:
            shutil.rmtree(run_dir / ckpt.CKPT_DIR, ignore_errors=True)
            shutil.rmtree(run_dir / "tb", ignore_errors=True)
            (run_dir / "encoder.pt").unlink(missing_ok=True)
    return None
