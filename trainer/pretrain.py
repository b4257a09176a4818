"""Self-supervised pretraining entry point: `torchrun --nproc_per_node=N trainer/pretrain.py CONFIG.toml key=value ...`.

Reads top to bottom: config -> process group -> run folder -> data -> model -> optimiser -> resume -> loop with
logging, checkpoints, preemption signals and a non-finite-loss stop -> encoder export.
Also runs as `python trainer/pretrain.py` (one process).
"""
from __future__ import annotations

import os
import random
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from trainer import checkpoint as ckpt
from trainer import distributed as dist_utils
from trainer.config import Config, ConfigError, load_config, split_argv, to_dict, to_toml
from trainer.data import build_loader
from trainer.metrics import MetricsLogger, StepTimer
from trainer.models import MoCo, build_contrastive_model
from trainer.optim import build_optimizer
from trainer.schedules import scaled_lr, steps_from_epochs, warmup_cosine
from trainer.steps import AUTOCAST_DTYPES, TrainStep, resolve_precision

USAGE = """usage: torchrun --nproc_per_node=N trainer/pretrain.py CONFIG.toml [section.key=value ...]
       python trainer/pretrain.py CONFIG.toml [section.key=value ...]

Sections data, model, loss, optim, run (see trainer/config.py and the presets in trainer/configs/).
Exit status: 0 done or preempted with a checkpoint, 2 bad config/input, 3 non-finite loss."""

EXIT_BAD_INPUT, EXIT_NONFINITE = 2, 3


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
    try:
        info = dist_utils.setup(cfg.run.device)
        return train(cfg, info)
    except Stop as e:
        print(f"pretrain: {e}", file=sys.stderr, flush=True)
        return e.code
    except RuntimeError as e:  # e.g. run.device=cuda without a GPU
        if "CUDA" not in str(e):
            raise
        print(f"pretrain: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    finally:
        dist_utils.teardown()
        # process-wide switches go back as they were (main() may be called in-process, e.g. by tests)
        torch.use_deterministic_algorithms(flags[0])
        torch.backends.cudnn.benchmark = flags[1]
        torch.set_num_threads(flags[2])


def train(cfg: Config, info: dist_utils.DistInfo) -> int:
    device, rank, world_size = info.device, info.rank, info.world_size
    precision = resolve_precision(cfg.run.precision, device)
    run_dir = Path(cfg.run.out)

    # ---- determinism and seeds (each rank its own stream; DDP broadcasts rank 0's initial weights)
    if cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not cfg.run.deterministic
    if cfg.run.cpu_threads > 0:
        torch.set_num_threads(cfg.run.cpu_threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast
    seed = cfg.run.seed
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)  # same model init on every rank

    # ---- checks that need the world size or the device, before anything is written
    if cfg.data.batch_size % world_size:
        raise Stop(EXIT_BAD_INPUT, f"data.batch_size={cfg.data.batch_size} is not divisible by {world_size} ranks")
    if cfg.data.source == "shards" and not (Path(cfg.data.shards) / "manifest.json").is_file():
        raise Stop(EXIT_BAD_INPUT, f"data.shards={cfg.data.shards}: no manifest.json (not an ingest shard folder)")
    if cfg.loss.impl == "fused" and cfg.loss.method != "moco":
        from trainer.fused_ntxent import fused_available

        if not fused_available(device):
            raise Stop(EXIT_BAD_INPUT, f"loss.impl=fused needs triton and a CUDA device (this run is on "
                                       f"{device.type}); use loss.impl=auto or reference")

    # ---- run folder: resume, refuse to clobber, write the resolved config
    resume_path = _resume_path(cfg, run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(cfg))
    dist_utils.barrier()

    # ---- data
    per_rank_batch = cfg.data.batch_size // world_size
    input_dtype = AUTOCAST_DTYPES.get(precision, torch.float32) if device.type == "cuda" else torch.float32
    try:
        loader = build_loader(cfg.data, cfg.model, cfg.loss, per_rank_batch=per_rank_batch, rank=rank,
                              world_size=world_size, seed=seed, device=device, dtype=input_dtype)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise Stop(EXIT_BAD_INPUT, str(e).splitlines()[0]) from None
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise Stop(EXIT_BAD_INPUT, f"{cfg.data.shards}: fewer samples than one batch of {per_rank_batch} per rank")
    total_steps = cfg.optim.total_steps or steps_from_epochs(cfg.optim.epochs, steps_per_epoch)
    warmup_steps = (cfg.optim.warmup_steps if cfg.optim.warmup_steps >= 0
                    else steps_from_epochs(cfg.optim.warmup_epochs, steps_per_epoch))
    peak_lr = scaled_lr(cfg.optim.base_lr, cfg.data.batch_size, cfg.optim.lr_scaling)
    min_lr = peak_lr * cfg.optim.min_lr_ratio

    # ---- model (MoCo wraps the query encoder with a momentum copy and a queue)
    try:
        model = build_contrastive_model(cfg.model)
    except (FileNotFoundError, ValueError) as e:
        raise Stop(EXIT_BAD_INPUT, str(e).splitlines()[0]) from None
    if cfg.loss.method == "moco":
        model = MoCo(model, cfg.loss.moco_queue, cfg.loss.moco_momentum, cfg.loss.moco_shuffle_bn)
    if cfg.model.sync_bn and world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    raw_model = model
    optimizer = build_optimizer(raw_model, cfg.optim, peak_lr)

    # ---- distributed wrapper and compilation (compile on by default on GPU, off on CPU)
    if world_size > 1:
        # MoCo's queue is identical on every rank (gathered keys): no need to broadcast its 32 MB every step.
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=cfg.loss.method != "moco", gradient_as_bucket_view=True)
    if cfg.model.compile == "on" or (cfg.model.compile == "auto" and device.type == "cuda"):
        if isinstance(raw_model, MoCo):
            raw_model.encoder_q.compile(mode=cfg.model.compile_mode)
            raw_model.encoder_k.compile(mode=cfg.model.compile_mode)
        else:
            model.compile(mode=cfg.model.compile_mode)
    step_fn = TrainStep(model, raw_model, optimizer, cfg.loss, precision=precision, device=device,
                        micro_batch=cfg.optim.micro_batch, grad_clip_norm=cfg.optim.grad_clip_norm)

    # ---- resume: weights, optimiser, scaler, step, epoch, RNG and the loader's position
    step, epoch, batch_in_epoch = 0, 0, 0
    loader.set_epoch(0)
    if resume_path is not None:
        try:
            state = ckpt.load_checkpoint(resume_path, map_location="cpu")  # load_state_dict copies to device
        except ValueError as e:
            raise Stop(EXIT_BAD_INPUT, str(e)) from None
        try:
            raw_model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise Stop(EXIT_BAD_INPUT, f"{resume_path}: does not match this run's model/optimiser "
                                       f"({str(e).splitlines()[0][:200]}); use another run.out") from None
        if step_fn.scaler is not None and state.get("scaler"):
            step_fn.scaler.load_state_dict(state["scaler"])
        step, epoch, batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        ranks = state.get("ranks", [])
        if len(ranks) == world_size:
            ckpt.set_rng_state(ranks[rank]["rng"])
            loader.set_epoch(epoch)
            try:
                loader.load_state_dict(ranks[rank]["loader"])
            except ValueError as e:
                raise Stop(EXIT_BAD_INPUT, f"{resume_path}: {str(e).splitlines()[0]}") from None
            if batch_in_epoch >= steps_per_epoch:  # saved right after an epoch's last batch
                epoch, batch_in_epoch = epoch + 1, 0
                loader.set_epoch(epoch)
        else:  # a different world size cannot continue the same data order: restart the epoch, same schedule
            loader.set_epoch(epoch)
            batch_in_epoch = 0
            if info.is_main:
                print(f"resume: checkpoint has {len(ranks)} rank states, this run {world_size}; restarting epoch "
                      f"{epoch} data order", flush=True)
        if info.is_main:
            print(f"resumed from {resume_path} at step {step}", flush=True)
    if step >= total_steps:
        if info.is_main:
            print(f"pretrain: {run_dir} already finished ({step}/{total_steps} steps); nothing to do", flush=True)
        return 0

    logger = bar = None
    previous_handlers: dict = {}
    try:
        # ---- preemption: SIGTERM / SIGUSR1 set a flag; the loop checkpoints at the next step boundary and exits
        received: list[int] = []
        previous_handlers = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                             for sig in (signal.SIGTERM, signal.SIGUSR1)}

        def save(at_step: int) -> Path | None:
            rank_state = {"rng": ckpt.rng_state(), "loader": ckpt.to_plain(loader.state_dict())}
            ranks = dist_utils.all_gather_state(rank_state)
            path = None
            if info.is_main:
                path = ckpt.save_checkpoint(run_dir, at_step, {
                    "format": "cxr-ssl-train/1", "step": at_step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": step_fn.scaler.state_dict() if step_fn.scaler is not None else {},
                    "schedule": {"peak_lr": peak_lr, "min_lr": min_lr, "warmup_steps": warmup_steps,
                                 "total_steps": total_steps},
                    "config": to_dict(cfg), "world_size": world_size, "ranks": ranks,
                }, keep_last=cfg.run.keep_last)
            dist_utils.barrier()
            return path

        # ---- the loop
        logger = MetricsLogger(run_dir, enabled=info.is_main, tensorboard=cfg.run.tensorboard,
                               resume_step=step if resume_path is not None else None, device=device)
        bar = _progress(cfg.run.progress and info.is_main, total_steps, step)
        if info.is_main:
            arch = f"{cfg.model.arch} {cfg.model.in_channels}ch {cfg.data.image_size}px"
            print(f"pretrain: {cfg.loss.method} {arch} | {world_size} rank(s) on {device.type} | {precision} | global "
                  f"batch {cfg.data.batch_size} | {total_steps} steps ({steps_per_epoch}/epoch) | peak lr {peak_lr:.4g} "
                  f"| {run_dir}", flush=True)
        timer, loss_sum, nonfinite = StepTimer(), torch.zeros((), device=device), torch.zeros((), device=device,
                                                                                              dtype=torch.bool)
        last_saved, stop_reason = -1, None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batches = iter(loader)
        while step < total_steps:
            t_wait = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                epoch, batch_in_epoch = epoch + 1, 0
                loader.set_epoch(epoch)
                batches = iter(loader)
                batch = next(batches)
            timer.add_data_wait(time.perf_counter() - t_wait)
            batch_in_epoch += 1

            lr = warmup_cosine(step, peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=total_steps, min_lr=min_lr)
            loss = step_fn(batch, lr)
            step += 1
            timer.step()
            loss_sum += loss
            nonfinite |= ~torch.isfinite(loss)
            if bar is not None:
                bar.update(1)

            must_save = step % cfg.run.ckpt_every == 0 or step == total_steps or step == cfg.run.max_steps
            if step % cfg.run.log_every == 0 or must_save:
                _check_finite(nonfinite, step, run_dir)
                mean_loss = dist_utils.all_reduce_mean(loss_sum / timer.steps).item()  # the only host sync
                t = timer.summary()
                images_per_s = cfg.data.batch_size * timer.steps / t["wall_s"]
                row = {"step": step, "epoch": epoch + batch_in_epoch / steps_per_epoch, "loss": mean_loss, "lr": lr,
                       "images_per_s": images_per_s, "views_per_s": 2 * images_per_s, "step_ms": t["step_ms"],
                       "data_wait_pct": t["data_wait_pct"]}
                if device.type == "cuda":
                    row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                else:  # host peak resident memory (Linux reports KiB)
                    row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                if cfg.loss.method == "micle":
                    row["micle_multi_instance"] = float(getattr(loader, "multi_instance_fraction", float("nan")))
                line = logger.log(row)
                if info.is_main:
                    (bar.write if bar is not None else print)(line)
                loss_sum.zero_()
            if must_save:
                _check_finite(nonfinite, step, run_dir)
                save(step)
                last_saved = step
            if timer.steps and (step % cfg.run.log_every == 0 or must_save):
                timer.reset()  # after the checkpoint, so its write does not count as step time
            every = 1 if world_size == 1 else cfg.run.signal_check_every
            if step % every == 0 and dist_utils.any_rank(bool(received), device):
                stop_reason = signal.Signals(received[0]).name if received else "a peer's signal"
                break
            if step == cfg.run.max_steps:
                stop_reason = f"run.max_steps={cfg.run.max_steps}"
                break

        if last_saved != step:
            _check_finite(nonfinite, step, run_dir)
            save(step)
        if info.is_main:
            backbone = raw_model.encoder_q.backbone if isinstance(raw_model, MoCo) else raw_model.backbone
            ckpt.save_encoder(run_dir / "encoder.pt", backbone, cfg.model.arch, cfg.model.in_channels,
                              {"config": to_dict(cfg), "step": step, "finished": step >= total_steps})
            why = f"stopped by {stop_reason}" if stop_reason else "finished"
            print(f"pretrain: {why} at step {step}/{total_steps}; checkpoint {ckpt.ckpt_path(run_dir, step)}, "
                  f"encoder {run_dir / 'encoder.pt'}", flush=True)
    finally:  # also on a Stop: flush TensorBoard, close the bar, give the signals back
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    return 0


def _resume_path(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint to continue from, per run.resume; refuses to start over a run's output without overwrite."""
    mode = cfg.run.resume
    if mode not in ("auto", "none"):
        path = Path(mode)
        if not path.is_file():
            raise Stop(EXIT_BAD_INPUT, f"run.resume={mode}: no such checkpoint")
        return path
    latest = ckpt.latest_checkpoint(run_dir)
    if mode == "auto" and latest is not None:
        return latest
    if latest is not None or (run_dir / "encoder.pt").exists():
        if not cfg.run.overwrite:
            raise Stop(EXIT_BAD_INPUT, f"{run_dir} holds a previous run's checkpoints; use run.resume=auto to "
                                       f"continue or run.overwrite=true to start again")
        dist_utils.barrier()
        if dist_utils.world()[0] == 0:
            shutil.rmtree(run_dir / ckpt.CKPT_DIR, ignore_errors=True)
            shutil.rmtree(run_dir / "tb", ignore_errors=True)
            (run_dir / "encoder.pt").unlink(missing_ok=True)
    return None


def _check_finite(nonfinite: torch.Tensor, step: int, run_dir: Path) -> None:
    if dist_utils.any_rank(bool(nonfinite), nonfinite.device):
        last = ckpt.latest_checkpoint(run_dir)
        kept = f"last good checkpoint {last}" if last else "no checkpoint was written"
        raise Stop(EXIT_NONFINITE, f"non-finite loss at or before step {step}; stopping without saving ({kept}); "
                                   f"lower optim.base_lr, raise loss.temperature or use run.precision=fp32")


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)


if __name__ == "__main__":
    sys.exit(main())
