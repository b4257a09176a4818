"""`python -m bench dino loss-memory`: peak memory of DINO's prototype cross-entropy, textbook (log_softmax of every
crop) vs the trainer's blocked autograd function, forward + backward, each in a fresh process.
`python -m bench dino [--compile off,default]`: images/s of the trainer's real DINO step (ViT-S/16 at 2 x 224 + 8 x 96
crops by default) on synthetic crops, model only; `dino_throughput` is the row gpu_check's stage-A dino step records.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

LOSS_IMPLS = ("naive", "blocked")
COMPILE_MODES = ("off", "default", "max-autotune")


def naive_ce(student: list[torch.Tensor], q: torch.Tensor, temp: float) -> torch.Tensor:
    """The textbook form: log_softmax of all crops at once, then -q . log p for every pair."""
    logp = torch.log_softmax(torch.cat(student) / temp, dim=-1).chunk(len(student))
    total, pairs = 0.0, 0
    for iq in range(q.shape[0]):
        for v in range(len(student)):
            if v != iq:
                total = total + (-(q[iq] * logp[v]).sum(-1)).mean()
                pairs += 1
    return total / pairs


def measure_loss_memory(impl: str, k: int, crops: int, batch: int, device: str = "cpu") -> dict:
    """Peak bytes the loss's forward + backward adds on top of its inputs (student logits with gradient, teacher
    targets). CUDA: the allocator's peak; CPU: the process's peak RSS (run it in a fresh process: RSS peaks only
    grow)."""
    import resource

    from trainer.dino_loss import prototype_ce

    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    student = [torch.randn(batch, k, generator=g).to(dev).requires_grad_(True) for _ in range(crops)]
    q = torch.softmax(torch.randn(2, batch, k, generator=g).to(dev) / 0.04, dim=-1)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    loss = naive_ce(student, q, 0.1) if impl == "naive" else prototype_ce(student, q, 0.1)
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    grad_bytes = sum(s.grad.numel() * s.grad.element_size() for s in student)
    return {"impl": impl, "k": k, "crops": crops, "batch": batch, "device": dev.type, "loss": float(loss),
            "peak_extra_mib": peak / 2**20, "logit_grads_mib": grad_bytes / 2**20,
            "seconds": time.perf_counter() - t0}


def _fresh_process(impl: str, k: int, crops: int, batch: int, device: str) -> dict:
    code = ("import json, sys; from bench.dino_bench import measure_loss_memory; "
            f"print(json.dumps(measure_loss_memory({impl!r}, {k}, {crops}, {batch}, {device!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def loss_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench dino loss-memory", description=__doc__)
    p.add_argument("--k", type=int, default=65536)
    p.add_argument("--crops", type=int, default=10)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    rows = [_fresh_process(impl, a.k, a.crops, a.batch, a.device) for impl in LOSS_IMPLS]
    for r in rows:
        print(f"{r['impl']:>8}: K={r['k']} {r['crops']} crops x {r['batch']} on {r['device']}: peak +"
              f"{r['peak_extra_mib']:.0f} MiB over the inputs (of which the logits' gradient {r['logit_grads_mib']:.0f}"
              f" MiB), loss {r['loss']:.6f}, {r['seconds']:.1f} s")
    return 0


def dino_throughput(*, arch: str = "vit_small_patch16", global_size: int = 224, local_size: int = 96,
                    local_crops: int = 8, batch: int = 64, out_dim: int = 65536, device: str = "cuda",
                    precision: str = "bf16", compile_mode: str | None = None, steps: int = 10,
                    warmup: int = 3) -> dict:
    """images/s of the trainer's DINO TrainStep (student, teacher, loss, AdamW + clipping, EMA) on synthetic crops held
    on the device: the median of ``steps`` timed steps (CUDA events on a GPU, synchronised host clock elsewhere) after
    ``warmup`` untimed ones, the first of which is timed alone (it holds the compilation); peak MiB on a GPU."""
    from bench.harness import time_fn
    from trainer.config import load_config
    from trainer.methods import build_method
    from trainer.optim import build_optimizer
    from trainer.steps import TrainStep

    dev = torch.device(device)
    cfg = load_config(None, ["data.source=synthetic", "loss.method=dino", f"model.arch={arch}",
                             f"loss.dino_out_dim={out_dim}", "optim.name=adamw", "optim.grad_clip_norm=3.0",
                             f"data.batch_size={batch}"])
    method = build_method(cfg.loss)
    method.set_schedule(1000, 100)
    model = method.build_model(cfg.model, world_size=1).to(dev)
    if compile_mode:
        method.compile(model, model, compile_mode)
    step = TrainStep(model, model, build_optimizer(model, cfg.optim, 1e-4), cfg.loss, precision=precision,
                     device=dev, grad_clip_norm=3.0, method=method)
    g = torch.Generator(device="cpu").manual_seed(0)  # random crops: zeros can run faster than real data
    batch_d = {"global": torch.randn(2, batch, 1, global_size, global_size, generator=g).to(dev),
               "local": torch.randn(local_crops, batch, 1, local_size, local_size, generator=g).to(dev)}
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    loss = step(batch_d, 1e-4)
    finite = bool(torch.isfinite(loss).item())  # the host read waits for the step
    first_s = time.perf_counter() - t0
    last = [loss]

    def one_step() -> None:
        last[0] = step(batch_d, 1e-4)

    timing = time_fn(one_step, warmup=max(0, warmup - 1), repeats=steps, cuda_events=cuda)
    loss = last[0]
    row = {"arch": arch, "crops": f"2x{global_size}+{local_crops}x{local_size}", "batch": batch, "k": out_dim,
           "precision": precision, "compile": compile_mode or "off", "device": dev.type, "steps": steps,
           "warmup": warmup, "images_per_s": batch / timing.median_s, "step_ms": 1000 * timing.median_s,
           "step_ms_p90": 1000 * timing.p90_s, "first_step_s": first_s,
           "loss_finite": finite and bool(torch.isfinite(loss).item()), "loss": float(loss)}
    if cuda:
        row["peak_mem_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return row


def main(argv: list[str]) -> int:
    if argv[:1] == ["loss-memory"]:
        return loss_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench dino", description=__doc__)
    p.add_argument("--arch", default="vit_small_patch16")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--local-crops", type=int, default=8)
    p.add_argument("--k", type=int, default=65536)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--compile", default="off",
                   help="comma list of off, default, max-autotune: one row each, in this order (e.g. off,default)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args(argv)
    modes = [m for m in a.compile.split(",") if m]
    if not modes or any(m not in COMPILE_MODES for m in modes):
        print(f"bench dino: --compile {a.compile}: expected a comma list of {', '.join(COMPILE_MODES)}",
              file=sys.stderr)
        return 2
    rows = []
    for mode in modes:
        torch._dynamo.reset()  # each compiled row compiles afresh
        rows.append(dino_throughput(arch=a.arch, global_size=a.global_size, local_size=a.local_size,
                                    local_crops=a.local_crops, batch=a.batch, out_dim=a.k, device=a.device,
                                    precision=a.precision, compile_mode=None if mode == "off" else mode,
                                    steps=a.steps, warmup=a.warmup))
        print(json.dumps(rows[-1]), flush=True)
    eager = next((r for r in rows if r["compile"] == "off"), None)
    for r in rows:
        if eager is not None and r is not eager:
            print(f"compile={r['compile']}: {r['images_per_s'] / eager['images_per_s']:.2f}x the eager images/s "
                  f"(first step {r['first_step_s']:.1f} s)")
    return 0 if all(r["loss_finite"] for r in rows) else 1
