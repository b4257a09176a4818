"""`python -m bench loss`: fused Triton NT-Xent vs the reference PyTorch loss (eager and torch.compile'd).

Forward + backward per batch of N views (SimCLR pairing, D = 128): median / p90 time, peak memory, speedup.
Every variant runs under one fp32 matmul precision (the trainer's 'high' on a GPU); each row records its dot dtype.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.harness import BenchReport, GpuSampler, capture_env, default_out_dir, time_fn
from ingest.errors import one_line

GPU_SIZES = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
CPU_SIZES = [64, 128, 256]
IMPLS = ("fused", "reference", "compiled")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
COLUMNS = ["n_views", "rows", "impl", "dots", "status", "median_ms", "p90_ms", "peak_mem_mib", "speedup_vs_best_torch",
           "loss_pct_of_resnet50_step"]
MATMUL_PRECISIONS = ("highest", "high", "medium")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench loss", description=__doc__)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--sizes", type=int, nargs="+", help="numbers of views N (even); default 512..65536 on a GPU, "
                   "64..256 on the CPU")
    p.add_argument("--dim", type=int, default=128, help="embedding width D")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="embedding dtype (default bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--impls", nargs="+", choices=IMPLS,
                   help="default: all on a GPU; fused (interpreter, if TRITON_INTERPRET=1) + reference on the CPU")
    p.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS,
                   help="torch.set_float32_matmul_precision for every variant alike (default: high on a GPU, the "
                        "trainer's CUDA setting, so the reference's fp32 GEMMs use tf32; highest on the CPU)")
    p.add_argument("--world", type=int, default=1,
                   help="time one rank of W: N / W rows against all N gathered columns (cross-GPU negatives)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, help="timed runs per point (default 20 on a GPU, 3 on the CPU)")
    p.add_argument("--resnet50-batch", type=int,
                   help="time a ResNet-50 bf16 train step at this batch (GPU; default 256, 0 = skip) and report the "
                        "loss as a %% of a step over this rank's N / W views (step time scaled linearly in images)")
    p.add_argument("--out", help="JSON file or folder (default on a GPU: bench/results/<gpu>/loss.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing JSON result")
    return p


def _is_oom(err: BaseException) -> bool:
    import torch
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _loss_fn(impl: str):
    from trainer.fused_ntxent import nt_xent_fused
    from trainer.losses import nt_xent_reference
    if impl == "fused":
        return nt_xent_fused
    if impl == "reference":
        return nt_xent_reference
    import torch
    # a fresh compile per size: dynamo's per-function recompile limit (8) would silently fall back to eager
    torch._dynamo.reset()
    return torch.compile(nt_xent_reference, dynamic=False)


def _dots(impl: str, dtype, device) -> str:
    """What the similarity matmuls multiply in: the fused kernel takes its inputs' dtype (fp32 inputs follow torch's
    matmul precision, like cuBLAS); the reference upcasts to fp32 first, so its GEMMs are tf32 or exact fp32."""
    import torch
    from trainer.fused_ntxent_kernels import fp32_dot_precision
    if impl == "fused" and dtype != torch.float32:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return "tf32" if device.type == "cuda" and fp32_dot_precision() == "tf32" else "fp32"


def measure_impl(impl: str, n_views: int, args, device, dtype) -> dict:
    """Time forward + backward of one implementation at N views; OOM becomes a row, not a crash.

    With ``--world W`` this is one rank's share: its N / W rows against all N gathered columns.
    """
    import torch
    from trainer.losses import simclr_labels
    gen = torch.Generator(device="cpu").manual_seed(n_views)
    z = torch.nn.functional.normalize(torch.randn(n_views, args.dim, generator=gen), dim=1)
    z = z.to(device=device, dtype=dtype).requires_grad_()  # (N, D)
    labels = simclr_labels(n_views // 2, device)
    rows = n_views // args.world  # rank 0's rows: a view of z, so its gradient reaches z with the columns'
    fn = _loss_fn(impl)

    def step():
        z.grad = None
        fn(z[:rows], z, labels[:rows], labels, 0, args.temperature, "mean").backward()

    row = {"n_views": n_views, "rows": rows, "impl": impl, "dots": _dots(impl, dtype, device),
           "matmul_precision": args.matmul_precision}
    cuda = device.type == "cuda"
    try:
        step()  # compile / autotune outside the timed and the memory-measured region
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        step()
        if cuda:
            torch.cuda.synchronize()
            row["peak_mem_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        timing = time_fn(step, warmup=args.warmup, repeats=args.repeats, cuda_events=cuda)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
        if not _is_oom(err):
            raise
        row.update(status="OOM", error=one_line(err, limit_chars=200))
        return row
    finally:
        z.grad = None
        if cuda:
            torch.cuda.empty_cache()
    row.update(status="ok", median_ms=timing.median_s * 1e3, p90_ms=timing.p90_s * 1e3, repeats=args.repeats)
    return row


def _resnet50_ms_per_image(batch: int, device) -> float:
    """Median ms per image of a ResNet-50 SGD step (bf16 autocast, channels-last, 224 px) at ``batch``."""
    import torch
    import torchvision
    model = torchvision.models.resnet50().to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    ms = time_fn(step, warmup=3, repeats=10).median_s * 1e3
    del model, opt, x
    torch.cuda.empty_cache()
    return ms / batch


def _plan(args, device) -> tuple[list[str], list[str]]:
    """(implementations to run, notes about those left out)."""
    from trainer.fused_ntxent import fused_available
    notes = []
    if args.impls:
        impls = list(args.impls)
    elif device.type == "cuda":
        impls = list(IMPLS)
    else:
        impls = ["fused", "reference"]
        notes.append("CPU: torch.compile variant skipped by default (pass --impls compiled to include it)")
    if "fused" in impls and not fused_available(device):
        impls.remove("fused")
        notes.append(f"fused skipped: needs triton and a CUDA GPU, or TRITON_INTERPRET=1 on the CPU ({device})")
    elif "fused" in impls and device.type == "cpu":
        notes.append("fused ran in triton's CPU interpreter: a correctness smoke run, its times mean nothing")
    return impls, notes


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench loss: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          (args.device if args.device != "auto" else "cpu"))
    cuda = device.type == "cuda"
    sizes = args.sizes or (GPU_SIZES if cuda else CPU_SIZES)
    if any(n < 2 or n % 2 for n in sizes):
        print(f"bench loss: --sizes must be even and >= 2 (two views per sample), got {sizes}", file=sys.stderr)
        return 2
    if args.world < 1 or any(n % args.world for n in sizes):
        print(f"bench loss: --world {args.world} must divide every size {sizes}", file=sys.stderr)
        return 2
    args.repeats = args.repeats or (20 if cuda else 3)
    args.resnet50_batch = (256 if cuda else 0) if args.resnet50_batch is None else args.resnet50_batch
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if cuda else "fp32")])
    env = capture_env()
    out = Path(args.out) if args.out else (default_out_dir(env) / "loss.json" if cuda else None)
    if out is not None:
        target = out if out.suffix == ".json" else out / "loss.json"
        if target.exists() and not args.overwrite:
            print(f"bench loss: {target} exists (pass --overwrite to replace it)", file=sys.stderr)
            return 2

    args.matmul_precision = args.matmul_precision or ("high" if cuda else "highest")
    impls, notes = _plan(args, device)
    if "fused" in impls and args.dim > 256:
        print(f"bench loss: the fused kernels support D <= 256, got --dim {args.dim}", file=sys.stderr)
        return 2
    report = BenchReport("loss", list(argv if argv is not None else sys.argv[2:]), env=env, notes=notes)
    report.notes.append(f"D={args.dim} dtype={dtype} temperature={args.temperature} world={args.world}, SimCLR "
                        "pairing, forward+backward of the mean loss; peak_mem = max_memory_allocated delta over inputs")
    report.notes.append(f"float32 matmul precision '{args.matmul_precision}' for every variant; 'dots' says what each "
                        "row's similarity matmuls multiplied in (the reference upcasts its inputs to fp32)")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(args.matmul_precision)
    try:
        _run(report, impls, sizes, args, device, dtype)
    finally:  # a process-wide switch: put it back for in-process callers
        torch.set_float32_matmul_precision(before)
    report.finish(out, COLUMNS)
    return 0


def _run(report, impls: list[str], sizes: list[int], args, device, dtype) -> None:
    import torch
    cuda = device.type == "cuda"
    ms_per_image = _resnet50_ms_per_image(args.resnet50_batch, device) if cuda and args.resnet50_batch else None
    if ms_per_image is not None:
        report.notes.append(f"ResNet-50 bf16 step: {ms_per_image:.4f} ms/image at batch {args.resnet50_batch}")
    with GpuSampler() as sampler:
        for n_views in sizes:
            rows = [report.add(**measure_impl(impl, n_views, args, device, dtype)) for impl in impls]
            torch_ms = [r["median_ms"] for r in rows if r["impl"] != "fused" and r["status"] == "ok"]
            for r in rows:
                if r["impl"] == "fused" and r["status"] == "ok":
                    r["speedup_vs_best_torch"] = min(torch_ms) / r["median_ms"] if torch_ms else None
                    if ms_per_image is not None:
                        # this rank's step trains on its own rows' images
                        r["loss_pct_of_resnet50_step"] = 100 * r["median_ms"] / (ms_per_image * r["rows"])
            print(f"N={n_views}: " + ", ".join(f"{r['impl']} {r.get('median_ms', r['status'])}" for r in rows),
                  file=sys.stderr, flush=True)
    report.env["gpu_sampler"] = sampler.summary()
    report.notes.extend(goal_notes(report.rows))


def goal_notes(rows: list[dict]) -> list[str]:
    """The fused loss's three targets for one H100, judged from this run's rows: met / MISSED / not measured."""
    fused = {r["n_views"]: r for r in rows if r["impl"] == "fused" and r["status"] == "ok"}

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "MISSED")

    big = {n: r.get("speedup_vs_best_torch") for n, r in fused.items() if n >= 16384}
    # no speedup where every PyTorch variant ran out of memory: the fused loss is then the only one that runs
    measured = {n: x for n, x in big.items() if x is not None}
    speed = verdict(all(x >= 2 for x in measured.values()) if measured else None)
    detail = ", ".join(f"N={n}: {'x%.2f' % x if x is not None else 'PyTorch OOM'}" for n, x in sorted(big.items()))
    mem = fused.get(65536, {}).get("peak_mem_mib")
    pct = fused.get(8192, {}).get("loss_pct_of_resnet50_step")
    return [f"goal >= 2x the best PyTorch variant at N >= 16384: {speed} ({detail or 'no such size'})",
            f"goal N=65536 loss memory < 1 GB: {verdict(None if mem is None else mem < 1024)}"
            + ("" if mem is None else f" ({mem:.0f} MiB)"),
            f"goal N=8192 loss < 1% of a ResNet-50 step: {verdict(None if pct is None else pct < 1)}"
            + ("" if pct is None else f" ({pct:.2f}%)")]


if __name__ == "__main__":
    sys.exit(main())
