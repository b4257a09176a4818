"""`python -m bench e2e`: real shards through the DALI loader into the trainer's step.

Reports end-to-end views/s, model-only views/s (the same step on one batch held on the device), their ratio as the
pipeline efficiency, and the data-wait % (time blocked on the loader over wall time).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench.harness import BenchReport, GpuSampler, default_out_dir
from bench.model_bench import build_step, hours_for_epochs, measure
from trainer.augment_section import augment_config
from trainer.config import ConfigError, load_config
from trainer.data import build_loader
from trainer.steps import AUTOCAST_DTYPES, resolve_precision

GOAL_EFFICIENCY = 0.97  # end-to-end >= 97% of model-only (issue 4)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench e2e", description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="shard folder (ingest output)")
    p.add_argument("--split", default="train")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256, help="images per step")
    p.add_argument("--channels", type=int, default=1, choices=(1, 3))
    p.add_argument("--augment", default="simclr-cxr")
    p.add_argument("--micle", action="store_true", help="MICLe pair mode")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--channels-last", default="on", choices=("on", "off"))
    p.add_argument("--data-device", default="auto", choices=("auto", "cpu", "gpu"))
    p.add_argument("--num-threads", type=int, default=4)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--steps", type=int, default=50, help="timed end-to-end steps (epochs restart as needed)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="CPU smoke: resnet18, 32 px, batch 4, 3 steps")
    p.add_argument("--out", default=None, help="JSON file or folder (default bench/results/<gpu>/e2e.json)")
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def run_e2e(step, loader, *, steps: int, warmup: int) -> dict:
    """Loop over the loader like the trainer does; time after ``warmup`` steps; sync only at the end."""
    epoch = 0
    batches = iter(loader)

    def next_batch():
        nonlocal batches, epoch
        try:
            return next(batches)
        except StopIteration:
            epoch += 1
            loader.set_epoch(epoch)
            batches = iter(loader)
            return next(batches)

    for _ in range(warmup):
        loss = step(next_batch(), 0.1)
    if warmup:
        float(loss)
    wait_s, views = 0.0, 0
    with GpuSampler() as sampler:
        t0 = time.perf_counter()
        for _ in range(steps):
            tw = time.perf_counter()
            batch = next_batch()
            wait_s += time.perf_counter() - tw
            views += 2 * batch["view1"].shape[0]
            loss = step(batch, 0.1)
        float(loss)  # one sync: the device finishes the queued steps
        wall = time.perf_counter() - t0
    row = {"e2e_views_per_s": views / wall, "e2e_step_ms": 1000 * wall / steps, "data_wait_pct": 100 * wait_s / wall,
           "epochs_touched": epoch + 1}
    row.update({f"e2e_{k}": v for k, v in (sampler.summary() or {}).items()})
    return row


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) or args.device == "cuda"
                          else "cpu")
    if args.quick:
        args.arch, args.image_size, args.batch, args.steps, args.warmup = "resnet18", 32, 4, 3, 1
        args.num_threads = min(args.num_threads, 2)
    if not (Path(args.shards) / "manifest.json").is_file():
        print(f"bench e2e: {args.shards}: no manifest.json (not a shard folder)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(None, [f"data.shards={args.shards}", f"data.split={args.split}",
                                 f"data.batch_size={args.batch}", f"data.image_size={args.image_size}",
                                 f"augment.preset={args.augment}", f"data.device={args.data_device}",
                                 f"data.num_threads={args.num_threads}", f"data.prefetch={args.prefetch}",
                                 f"model.arch={args.arch}", f"model.in_channels={args.channels}",
                                 f"loss.method={'micle' if args.micle else 'simclr'}", "data.frontal_only=false"])
        precision = resolve_precision(args.precision, device)
    except (ConfigError, ValueError) as e:
        print(f"bench e2e: {e}", file=sys.stderr)
        return 2
    compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    channels_last = args.channels_last == "on"
    dtype = AUTOCAST_DTYPES.get(precision, torch.float32) if device.type == "cuda" else torch.float32
    try:
        loader = build_loader(cfg.data, cfg.model, cfg.loss, augment=augment_config(cfg.augment),
                              per_rank_batch=args.batch, rank=0, world_size=1, seed=0, device=device, dtype=dtype)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"bench e2e: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    step = build_step(cfg, device, compile_mode="default" if compiled else None, channels_last=channels_last,
                      precision=precision)
    report = BenchReport("e2e", list(argv))
    base = {"arch": args.arch, "image_size": args.image_size, "batch": args.batch, "precision": precision,
            "compile": "compile" if compiled else "eager", "channels_last": channels_last, "device": device.type,
            "data_device": cfg.data.device if cfg.data.device != "auto" else ("gpu" if device.type == "cuda" else "cpu"),
            "batches_per_epoch": len(loader)}
    e2e = run_e2e(step, loader, steps=args.steps, warmup=args.warmup)
    # model-only on one real batch kept on the device: the same compiled step, no loader in the loop
    held = next(iter(loader))
    model_only = measure(step, held, warmup=args.warmup, repeats=max(args.steps, 3), device=device)
    efficiency = e2e["e2e_views_per_s"] / model_only["views_per_s"]
    row = report.add(**base, **e2e, model_only_views_per_s=model_only["views_per_s"],
                     model_only_step_ms=model_only["step_ms"], pipeline_efficiency=efficiency,
                     peak_mem_gib=model_only.get("peak_mem_gib"))
    row["chexpert_100_epochs_h"] = hours_for_epochs(row["e2e_views_per_s"] / 2)
    if device.type == "cuda":
        verdict = "meets" if efficiency >= GOAL_EFFICIENCY else "misses"
        report.notes.append(f"pipeline efficiency {100 * efficiency:.1f}% {verdict} the "
                            f"{100 * GOAL_EFFICIENCY:.0f}% goal (data-wait {row['data_wait_pct']:.1f}%); 100 CheXpert "
                            f"epochs (191,027 frontal images) at this rate: {row['chexpert_100_epochs_h']:.1f} h")
    report.notes.append(f"shards {args.shards} ({args.split}), {args.batch} images per step, "
                        f"{args.steps} timed steps after {args.warmup} warm-up")
    out = None if args.no_save else (args.out or default_out_dir(report.env))
    report.finish(out, columns=["arch", "precision", "compile", "data_device", "e2e_views_per_s",
                                "model_only_views_per_s", "pipeline_efficiency", "data_wait_pct", "e2e_step_ms",
                                "peak_mem_gib", "chexpert_100_epochs_h"])
    return 0
