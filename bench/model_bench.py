"""`python -m bench model`: the trainer's real train step on synthetic inputs, over the grid
eager/compile x fp32/bf16 x NCHW/channels-last; views/s, step ms, peak memory, GPU utilisation and power.

Model-only throughput is the ceiling the data pipeline is judged against (`python -m bench e2e`).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

from bench.harness import BenchReport, GpuSampler, default_out_dir, time_fn
from trainer.config import ConfigError, load_config
from trainer.methods import build_method
from trainer.optim import build_optimizer
from trainer.steps import TrainStep

GOAL_VIEWS_PER_S = 5000  # target: ResNet-50, 224 px, model only, one H100
CHEXPERT_FRONTAL_TRAIN_IMAGES = 191_027  # frontal rows of the CheXpert v1.0 train CSV (of 223,414): "100 epochs" below


def hours_for_epochs(images_per_s: float, epochs: int = 100, images: int = CHEXPERT_FRONTAL_TRAIN_IMAGES) -> float:
    return epochs * images / images_per_s / 3600.0


def build_step(cfg, device: torch.device, *, compile_mode: str | None, channels_last: bool, precision: str):
    """Model + optimiser + TrainStep as `trainer/pretrain.py` builds them (single process)."""
    splits = cfg.loss.moco_bn_splits
    if cfg.data.batch_size % splits or cfg.data.batch_size // splits < 2:
        cfg.loss.moco_bn_splits = 1  # a batch too small for MoCo's one-rank BatchNorm chunks is timed without them
    method = build_method(cfg.loss, device=device, embed_dim=cfg.model.proj_dim)
    model = method.build_model(cfg.model, world_size=1)  # one process, as the trainer on one rank
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim, lr=0.1)
    if compile_mode:
        method.compile(model, model, compile_mode)
    return TrainStep(model, model, optimizer, cfg.loss, precision=precision, device=device,
                     micro_batch=cfg.optim.micro_batch, method=method)


def synthetic_batch(batch: int, channels: int, size: int, device: torch.device, dtype: torch.dtype,
                    channels_last: bool) -> dict:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator(device="cpu").manual_seed(0)
    views = [torch.randn(batch, channels, size, size, generator=g).to(device, dtype).contiguous(memory_format=fmt)
             for _ in range(2)]
    return {"view1": views[0], "view2": views[1], "pids": torch.arange(batch, device=device)}


def measure(step: TrainStep, batch: dict, *, warmup: int, repeats: int, device: torch.device) -> dict:
    """Time whole optimiser steps (synchronised); the first call's time includes compilation."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    loss = step(batch, 0.1)
    float(loss)
    first_s = time.perf_counter() - t0
    with GpuSampler() as sampler:
        timing = time_fn(lambda: step(batch, 0.1), warmup=max(0, warmup - 1), repeats=repeats,
                         cuda_events=device.type == "cuda")
    n = batch["view1"].shape[0]
    row = {"step_ms": 1000 * timing.median_s, "step_ms_p90": 1000 * timing.p90_s,
           "views_per_s": 2 * n / timing.median_s, "images_per_s": n / timing.median_s, "first_step_s": first_s,
           "loss_finite": bool(torch.isfinite(step(batch, 0.1)).item())}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    row.update(sampler.summary() or {})
    return row


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench model", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256, help="images per step (2 views each)")
    p.add_argument("--channels", type=int, default=1, choices=(1, 3))
    p.add_argument("--method", default="simclr", choices=("simclr", "moco"))
    p.add_argument("--optimizer", default="lars", choices=("lars", "sgd", "adamw"))
    p.add_argument("--loss-impl", default="auto", choices=("auto", "reference", "fused"))
    p.add_argument("--compile", default="auto", help="comma list of eager,compile (auto: both on GPU, eager on CPU)")
    p.add_argument("--precision", default="fp32,bf16", help="comma list of fp32,bf16,fp16")
    p.add_argument("--memory-format", default="nchw,channels_last", help="comma list of nchw,channels_last")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="CPU smoke: resnet18, 32 px, batch 4, 1 warm-up, 2 repeats")
    p.add_argument("--out", default=None, help="JSON file or folder (default bench/results/<gpu>/model.json)")
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) or args.device == "cuda"
                          else "cpu")
    if args.quick:
        args.arch, args.image_size, args.batch, args.warmup, args.repeats = "resnet18", 32, 4, 1, 2
    compiles = ["eager", "compile"] if device.type == "cuda" else ["eager"]
    if args.compile != "auto":
        compiles = args.compile.split(",")
    try:
        cfg = load_config(None, ["data.source=synthetic", f"model.arch={args.arch}",
                                 f"model.in_channels={args.channels}", f"loss.method={args.method}",
                                 f"optim.name={args.optimizer}", f"loss.impl={args.loss_impl}",
                                 f"loss.moco_queue={max(args.batch, 65536 // args.batch * args.batch)}",
                                 f"data.batch_size={args.batch}", f"data.image_size={args.image_size}"])
    except ConfigError as e:
        print(f"bench model: {e}", file=sys.stderr)
        return 2
    bad = [x for x in compiles if x not in ("eager", "compile")]
    precisions, formats = args.precision.split(","), args.memory_format.split(",")
    bad += [x for x in precisions if x not in ("fp32", "bf16", "fp16")]
    bad += [x for x in formats if x not in ("nchw", "channels_last")]
    if bad:
        print(f"bench model: unknown grid value(s) {bad}", file=sys.stderr)
        return 2
    report = BenchReport("model", list(argv))
    report.notes.append(f"{args.method} {args.arch} {args.channels}ch {args.image_size}px, {args.batch} images "
                        f"({2 * args.batch} views) per step, {args.optimizer}, loss impl {args.loss_impl}, on {device}")
    for comp, prec, fmt in itertools.product(compiles, precisions, formats):
        if prec == "fp16" and device.type != "cuda":
            continue
        base = {"arch": args.arch, "image_size": args.image_size, "batch": args.batch, "compile": comp,
                "precision": prec, "memory_format": fmt, "device": device.type}
        try:
            torch.manual_seed(0)
            if comp == "compile":
                torch._dynamo.reset()  # a fresh compile per grid cell: no cache-limit fallbacks to eager
            step = build_step(cfg, device, compile_mode=args.compile_mode if comp == "compile" else None,
                              channels_last=fmt == "channels_last", precision=prec)
            batch = synthetic_batch(args.batch, args.channels, args.image_size, device,
                                    torch.float32 if prec == "fp32" or device.type == "cpu"
                                    else {"bf16": torch.bfloat16, "fp16": torch.float16}[prec],
                                    fmt == "channels_last")
            row = report.add(**base, **measure(step, batch, warmup=args.warmup, repeats=args.repeats, device=device))
        except torch.cuda.OutOfMemoryError:
            report.add(**base, error="out of memory")
            continue
        finally:
            step = batch = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"  {comp:>7} {prec:>4} {fmt:>13}: {row['views_per_s']:,.0f} views/s, {row['step_ms']:.1f} ms/step",
              file=sys.stderr, flush=True)
    best = max((r for r in report.rows if "views_per_s" in r), key=lambda r: r["views_per_s"], default=None)
    if best and args.arch == "resnet50" and args.image_size == 224 and device.type == "cuda":
        verdict = "meets" if best["views_per_s"] >= GOAL_VIEWS_PER_S else "misses"
        report.notes.append(f"best {best['views_per_s']:,.0f} views/s ({best['compile']}, {best['precision']}, "
                            f"{best['memory_format']}) {verdict} the {GOAL_VIEWS_PER_S:,} views/s goal; 100 CheXpert "
                            f"epochs would take {hours_for_epochs(best['images_per_s']):.1f} h model-only")
    out = None if args.no_save else (args.out or default_out_dir(report.env))
    report.finish(out, columns=["compile", "precision", "memory_format", "views_per_s", "step_ms", "step_ms_p90",
                                "first_step_s", "peak_mem_gib", "gpu_util_pct_median", "gpu_power_w_median"])
    return 0 if all("views_per_s" in r and r["loss_finite"] for r in report.rows) else 1
