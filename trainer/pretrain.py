"""Self-supervised pretraining entry point: `torchrun --nproc_per_node=N trainer/pretrain.py CONFIG.toml key=value ...`.

`train` reads top to bottom: config -> process group -> data -> model and optimiser -> run folder -> resume -> loop
with logging, checkpoints, preemption signals and a non-finite-loss stop -> encoder export; the helpers below it
hold the details (resume: `trainer/resume.py`). Also runs as `python trainer/pretrain.py` (one process).
"""
from __future__ import annotations

import os
import random
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ingest.errors import one_line
from ingest.remote import is_remote
from trainer import checkpoint as ckpt
from trainer import distributed as dist_utils
from trainer import resume
from trainer.augment_section import augment_config
from trainer.config import Config, ConfigError, flat_keys, load_config, split_argv, to_dict, to_toml
from trainer.data import build_loader
from trainer.health import HealthMeter, collapse_warning
from trainer.metrics import MetricsLogger, StepTimer
from trainer.methods import Method, build_method, method_class
from trainer.models import convert_global_bn
from trainer.monitor import build_monitor
from trainer.optim import build_optimizer
from trainer.resume import Position
from trainer.schedules import scaled_lr, steps_from_epochs, warmup_cosine
from trainer.steps import AUTOCAST_DTYPES, TrainStep, resolve_precision
from trainer.tracking import MlflowTracker, TrackingError, check_available

USAGE = """usage: torchrun --nproc_per_node=N trainer/pretrain.py CONFIG.toml [section.key=value ...]
       python trainer/pretrain.py CONFIG.toml [section.key=value ...]

Sections data, model, loss, optim, run (see trainer/config.py and the presets in trainer/configs/).
Exit status: 0 done or preempted with a checkpoint, 2 bad config/input, 3 non-finite loss,
4 a peer rank died or hung past run.dist_timeout_s (resume from the last checkpoint)."""

EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PEER_LOST = 2, 3, 4


class Stop(Exception):
    """End the run early with an exit status and a one-line reason."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else EXIT_BAD_INPUT
    try:
        cfg = load_config(*split_argv(argv))
    except ConfigError as e:
        print(f"pretrain: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    flags = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, torch.get_num_threads())
    peer_lost = False
    try:
        info = dist_utils.setup(cfg.run.device, timeout_s=cfg.run.dist_timeout_s)
        return train(cfg, info)
    except Stop as e:
        print(f"pretrain: {e}", file=sys.stderr, flush=True)
        return e.code
    except RuntimeError as e:  # a peer lost mid-run, or run.device=cuda without a GPU
        reason = dist_utils.peer_failure(e)
        if reason is not None:
            peer_lost = True
            print(_peer_lost_line(cfg, reason), file=sys.stderr, flush=True)
            return EXIT_PEER_LOST
        if "CUDA" not in str(e):
            raise
        print(f"pretrain: {one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    finally:
        if not peer_lost:  # a group with a dead member may block in its destructor; the process ends instead
            dist_utils.teardown()
        # process-wide switches go back as they were (main() may be called in-process, e.g. by tests)
        torch.use_deterministic_algorithms(flags[0])
        torch.backends.cudnn.benchmark = flags[1]
        torch.set_num_threads(flags[2])


def train(cfg: Config, info: dist_utils.DistInfo) -> int:
    device, world_size = info.device, info.world_size
    precision = resolve_precision(cfg.run.precision, device)
    run_dir = Path(cfg.run.out)
    _seed_and_determinism(cfg, info)
    method = build_method(cfg.loss, device=device, embed_dim=cfg.model.proj_dim)
    _check_inputs(cfg, info, method)  # what needs the world size or the device, before anything is built or written

    # ---- data, schedule, model (nothing is written until all three are built)
    per_rank_batch = cfg.data.batch_size // world_size
    input_dtype = AUTOCAST_DTYPES.get(precision, torch.float32) if device.type == "cuda" else torch.float32
    try:
        loader = build_loader(cfg.data, cfg.model, cfg.loss, augment=augment_config(cfg.augment),
                              per_rank_batch=per_rank_batch, rank=info.rank, world_size=world_size,
                              seed=cfg.run.seed, device=device, dtype=input_dtype)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise Stop(EXIT_BAD_INPUT, one_line(e)) from None
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise Stop(EXIT_BAD_INPUT, f"{cfg.data.shards}: fewer samples than one batch of {per_rank_batch} per rank")
    schedule = _schedule(cfg, steps_per_epoch)
    if info.is_main:
        for text in fit_warnings(cfg, device, world_size, schedule):
            print(text, file=sys.stderr, flush=True)
    method.set_schedule(schedule["total_steps"], steps_per_epoch)
    raw_model, step_fn = _build_model(cfg, info, method, precision, schedule["peak_lr"])
    optimizer = step_fn.optimizer

    # ---- run folder: resume (a changed config is refused before anything is loaded) or refuse to clobber; the
    # resolved config replaces the previous one only once the restore has passed
    try:
        resume_path = resume.find_checkpoint(cfg, run_dir)
        pos = resume.restore(resume_path, cfg, info, raw_model, step_fn, loader, steps_per_epoch)
    except resume.ResumeError as e:
        raise Stop(EXIT_BAD_INPUT, str(e)) from None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(cfg))
    dist_utils.barrier()
    total_steps = schedule["total_steps"]
    if pos.step >= total_steps:
        if info.is_main:
            print(f"pretrain: {run_dir} already finished ({pos.step}/{total_steps} steps); nothing to do", flush=True)
        return 0

    def save() -> None:
        """Checkpoint at pos.step: rank 0 writes model, optimiser, scaler, schedule and every rank's RNG / loader."""
        ranks = dist_utils.all_gather_state({"rng": ckpt.rng_state(), "loader": ckpt.to_plain(loader.state_dict())})
        if info.is_main:
            ckpt.save_checkpoint(run_dir, pos.step, {
                "format": "cxr-ssl-train/1", "step": pos.step, "epoch": pos.epoch, "batch_in_epoch": pos.batch_in_epoch,
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": step_fn.scaler.state_dict() if step_fn.scaler is not None else {},
                "schedule": schedule, "config": to_dict(cfg), "world_size": world_size, "ranks": ranks,
            }, keep_last=cfg.run.keep_last)
        dist_utils.barrier()

    logger = bar = None
    previous_handlers: dict = {}
    end_status = "FAILED"  # what the tracker records unless the loop ends normally
    try:
        # ---- preemption: SIGTERM / SIGUSR1 set a flag; the loop checkpoints at the next agreed step and exits
        received: list[int] = []
        previous_handlers = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                             for sig in (signal.SIGTERM, signal.SIGUSR1)}
        resume_step = pos.step if resume_path is not None else None
        logger = MetricsLogger(run_dir, enabled=info.is_main, tensorboard=cfg.run.tensorboard,
                               resume_step=resume_step, device=device,
                               tracker=_tracker(cfg, info, run_dir, resume_step))
        bar = _progress(cfg.run.progress and info.is_main, total_steps, pos.step)
        if info.is_main:
            bn_scope = method.bn_scope(_global_bn(cfg, world_size))
            print(f"pretrain: {cfg.loss.method} {cfg.model.arch} {cfg.model.in_channels}ch {cfg.data.image_size}px | "
                  f"{world_size} rank(s) on {device.type} | {precision} | BN {bn_scope} | "
                  f"global batch {cfg.data.batch_size} | {total_steps} steps ({steps_per_epoch}/epoch) | "
                  f"peak lr {schedule['peak_lr']:.4g} | {run_dir}",
                  flush=True)
        monitor = build_monitor(cfg, device, input_dtype, step_fn.autocast) if info.is_main else None
        monitor_on = dist_utils.broadcast_object(monitor is not None)

        # ---- the loop: device values stay on the device; the host reads them only at log / checkpoint steps
        timer = StepTimer()
        loss_sum = torch.zeros((), device=device)
        nonfinite = torch.zeros((), device=device, dtype=torch.bool)
        last_saved, stop_reason = -1, None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batches = iter(loader)
        while pos.step < total_steps:
            t_wait = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
                loader.set_epoch(pos.epoch)
                batches = iter(loader)
                batch = next(batches)
            timer.add_data_wait(time.perf_counter() - t_wait)
            pos.batch_in_epoch += 1

            lr = warmup_cosine(pos.step, **schedule)
            loss = step_fn(batch, lr)
            pos.step += 1
            timer.step()
            loss_sum += loss
            nonfinite |= ~torch.isfinite(loss)
            if bar is not None:
                bar.update(1)

            step = pos.step
            must_save = step % cfg.run.ckpt_every == 0 or step == total_steps or step == cfg.run.max_steps
            monitor_due = monitor_on and (step % cfg.run.monitor_every == 0 or step in (total_steps,
                                                                                          cfg.run.max_steps))
            sync_point = step % cfg.run.log_every == 0 or must_save or monitor_due
            if sync_point:
                _check_finite(nonfinite, step, run_dir)
                row = _log_row(cfg, pos, steps_per_epoch, lr, loss_sum, timer, device, loader, method)
                row.update(step_fn.health.summary())
                if monitor_due:  # rank 0 embeds the val subset; the others wait here
                    row.update(monitor(method.backbone(raw_model)) if monitor is not None else {})
                    dist_utils.barrier()
                line = logger.log(row)
                if info.is_main:
                    for text in (line, collapse_warning(row, cfg.model.proj_dim, cfg.run.collapse_std_ratio)):
                        if text:
                            (bar.write if bar is not None else print)(text)
                loss_sum.zero_()
            if must_save:
                save()
                last_saved = step
            if sync_point:
                timer.reset()  # after the checkpoint, so its write does not count as step time
            if _signal_check_due(cfg, world_size, step, sync_point) and dist_utils.any_rank(bool(received), device):
                stop_reason = signal.Signals(received[0]).name if received else "a peer's signal"
                break
            if step == cfg.run.max_steps:
                stop_reason = f"run.max_steps={cfg.run.max_steps}"
                break

        end_status = "KILLED" if stop_reason else "FINISHED"  # MLflow's word for stopped early (it resumes)
        # ---- the end (finished, preempted or max_steps): last checkpoint and the encoder export
        if last_saved != pos.step:
            _check_finite(nonfinite, pos.step, run_dir)
            save()
        if info.is_main:
            ckpt.save_encoder(run_dir / "encoder.pt", method.backbone(raw_model), cfg.model.arch, cfg.model.in_channels,
                              {"config": to_dict(cfg), "step": pos.step, "finished": pos.step >= total_steps})
            why = f"stopped by {stop_reason}" if stop_reason else "finished"
            print(f"pretrain: {why} at step {pos.step}/{total_steps}; checkpoint {ckpt.ckpt_path(run_dir, pos.step)}, "
                  f"encoder {run_dir / 'encoder.pt'}", flush=True)
    finally:  # also on a Stop: flush TensorBoard, close the bar, give the signals back
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.close(end_status)
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    return 0


def _peer_lost_line(cfg: Config, reason: str) -> str:
    rank, world_size = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    last = ckpt.latest_checkpoint(cfg.run.out)
    kept = f"last checkpoint {last}" if last else "no checkpoint yet"
    return (f"pretrain: rank {rank}/{world_size}: a peer rank died or hung (run.dist_timeout_s="
            f"{cfg.run.dist_timeout_s:g}): {reason}; stopping ({kept}; the same command resumes)")


# ------------------------------------------------------------------------------------------------ setup helpers


def _seed_and_determinism(cfg: Config, info: dist_utils.DistInfo) -> None:
    """Each rank its own Python/NumPy stream; the same torch seed everywhere (DDP broadcasts rank 0's weights)."""
    if cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not cfg.run.deterministic
    if cfg.run.cpu_threads > 0:
        torch.set_num_threads(cfg.run.cpu_threads)
    if info.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast
    random.seed(cfg.run.seed + info.rank)
    np.random.seed(cfg.run.seed + info.rank)
    torch.manual_seed(cfg.run.seed)


def _check_inputs(cfg: Config, info: dist_utils.DistInfo, method: Method) -> None:
    world_size, device = info.world_size, info.device
    if cfg.data.batch_size % world_size:
        raise Stop(EXIT_BAD_INPUT, f"data.batch_size={cfg.data.batch_size} is not divisible by {world_size} ranks")
    local = cfg.data.source == "shards" and not is_remote(cfg.data.shards)  # s3:// is checked when it is staged
    if local and not (Path(cfg.data.shards) / "manifest.json").is_file():
        raise Stop(EXIT_BAD_INPUT, f"data.shards={cfg.data.shards}: no manifest.json (not an ingest shard folder)")
    reason = method.check_run(cfg, world_size, device)
    if reason:
        raise Stop(EXIT_BAD_INPUT, reason)
    try:
        check_available(cfg.run.mlflow_uri)
    except TrackingError as e:
        raise Stop(EXIT_BAD_INPUT, str(e)) from None


# A CPU step past this many input pixels per rank (64 images of 224 px) takes long enough that a run of GPU-sized
# batches is better refused by its user than discovered a step at a time.
CPU_PIXELS_PER_RANK_STEP = 64 * 224 * 224


def fit_warnings(cfg: Config, device: torch.device, world_size: int, schedule: dict) -> list[str]:
    """One line each: a GPU-sized batch on the CPU, and a warm-up as long as the whole run (the lr never peaks)."""
    out = []
    per_rank = cfg.data.batch_size // world_size
    if device.type == "cpu" and per_rank * cfg.data.image_size ** 2 > CPU_PIXELS_PER_RANK_STEP:
        out.append(f"pretrain: warning: data.batch_size={cfg.data.batch_size} at {cfg.data.image_size} px is a GPU "
                   f"batch: {per_rank} images per rank and step on the CPU make each step slow (the run has "
                   f"{schedule['total_steps']} steps); lower data.batch_size / data.image_size for a CPU run "
                   f"(trainer/configs/debug_cpu.toml)")
    if schedule["warmup_steps"] >= schedule["total_steps"]:
        out.append(f"pretrain: warning: the warm-up ({schedule['warmup_steps']} steps) is not shorter than the run "
                   f"({schedule['total_steps']} steps): the lr never reaches its peak {schedule['peak_lr']:.4g}; "
                   f"lower optim.warmup_steps / optim.warmup_epochs")
    return out


def _global_bn(cfg: Config, world_size: int) -> bool:
    """BatchNorm over the global batch: SimCLR / MICLe put both views of a sample on one rank, and per-rank statistics
    would let the model tell positives by their batch; MoCo hides that with shuffle-BN instead."""
    if world_size == 1 or cfg.model.sync_bn == "off":
        return False
    return cfg.model.sync_bn == "on" or method_class(cfg.loss.method).global_bn_default


def _schedule(cfg: Config, steps_per_epoch: int) -> dict:
    """warmup_cosine's keyword arguments: peak lr scaled by the global batch, warm-up and total steps, floor."""
    o = cfg.optim
    peak_lr = scaled_lr(o.base_lr, cfg.data.batch_size, o.lr_scaling)
    return {"peak_lr": peak_lr, "min_lr": peak_lr * o.min_lr_ratio,
            "warmup_steps": o.warmup_steps if o.warmup_steps >= 0 else steps_from_epochs(o.warmup_epochs,
                                                                                         steps_per_epoch),
            "total_steps": o.total_steps or steps_from_epochs(o.epochs, steps_per_epoch)}


def _build_model(cfg: Config, info: dist_utils.DistInfo, method: Method, precision: str, peak_lr: float):
    """-> (raw model, TrainStep): the method's model, SyncBN, device and memory format, optimiser, DDP, compile."""
    device, world_size = info.device, info.world_size
    try:
        model = method.build_model(cfg.model, world_size=world_size)
    except (FileNotFoundError, ValueError) as e:
        raise Stop(EXIT_BAD_INPUT, one_line(e)) from None
    if _global_bn(cfg, world_size):
        model = convert_global_bn(model, device.type)
    model = model.to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    raw_model = model
    optimizer = build_optimizer(raw_model, cfg.optim, peak_lr)
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=method.broadcast_buffers(_global_bn(cfg, world_size)),
            gradient_as_bucket_view=True)
    if cfg.model.compile == "on" or (cfg.model.compile == "auto" and device.type == "cuda"):
        method.compile(model, raw_model, cfg.model.compile_mode)
    step_fn = TrainStep(model, raw_model, optimizer, cfg.loss, precision=precision, device=device,
                        micro_batch=cfg.optim.micro_batch, grad_clip_norm=cfg.optim.grad_clip_norm,
                        health=HealthMeter(device), method=method)
    return raw_model, step_fn


def _tracker(cfg: Config, info: dist_utils.DistInfo, run_dir: Path, resume_step: int | None):
    """Rank 0's MLflow tracker (None when run.mlflow_uri is empty); a tracker that cannot start stops every rank."""
    tracker, error = None, None
    if info.is_main and cfg.run.mlflow_uri:
        try:
            tracker = MlflowTracker(cfg.run.mlflow_uri, cfg.run.mlflow_experiment, cfg.run.mlflow_run_name, run_dir,
                                    {k: str(v) for k, v in flat_keys(to_dict(cfg)).items()}, resume_step)
            print(f"mlflow: run {tracker.run_id} at {cfg.run.mlflow_uri} (experiment '{cfg.run.mlflow_experiment}')",
                  flush=True)
        except TrackingError as e:
            error = str(e)
    error = dist_utils.broadcast_object(error)
    if error:
        raise Stop(EXIT_BAD_INPUT, error)
    return tracker


# ------------------------------------------------------------------------------------------------- loop helpers


def _log_row(cfg: Config, pos: Position, steps_per_epoch: int, lr: float, loss_sum: torch.Tensor,
             timer: StepTimer, device: torch.device, loader, method: Method) -> dict:
    """One metrics row; the mean loss over ranks and log steps is the one device value read (a host sync)."""
    mean_loss = dist_utils.all_reduce_mean(loss_sum / timer.steps).item()
    t = timer.summary()
    images_per_s = cfg.data.batch_size * timer.steps / t["wall_s"]
    row = {"step": pos.step, "epoch": pos.epoch + pos.batch_in_epoch / steps_per_epoch, "loss": mean_loss, "lr": lr,
           "images_per_s": images_per_s, "views_per_s": 2 * images_per_s, "step_ms": t["step_ms"],
           "data_wait_pct": t["data_wait_pct"]}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # host peak resident memory (Linux reports KiB)
        row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ntxent = method.ntxent
    if ntxent is not None:
        row.update(ntxent.log_fields())  # which NT-Xent serves the run; the first row after the decision says why
    row.update(method.log_fields(loader))
    return row


def _signal_check_due(cfg: Config, world_size: int, step: int, sync_point: bool) -> bool:
    """One rank reads its own flag every step; several agree through an all-reduce (a host sync), so only at
    log / checkpoint steps unless run.signal_check_every asks for more."""
    if world_size == 1:
        return True
    every = cfg.run.signal_check_every
    return sync_point or (every > 0 and step % every == 0)


def _check_finite(nonfinite: torch.Tensor, step: int, run_dir: Path) -> None:
    if dist_utils.any_rank(bool(nonfinite), nonfinite.device):
        last = ckpt.latest_checkpoint(run_dir)
        kept = f"last good checkpoint {last}" if last else "no checkpoint was written"
        raise Stop(EXIT_NONFINITE, f"non-finite loss at or before step {step}; stopping without saving ({kept}); "
                                   f"lower optim.base_lr, raise loss.temperature or use run.precision=fp32")


def _progress(enabled: bool, total: int, initial: int):
    """A step bar on a terminal only (run.progress, rank 0); a redirected log gets the log rows alone."""
    from ingest.progress import show_progress

    if not show_progress(enabled):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)


if __name__ == "__main__":
    dist_utils.exit_process(main())
