"""`python3 scripts/gpu_check.py --stage A|B --out DIR`: the GPU check for a lent H100 / H200, run with that machine's
own python3 (torch, Triton, torchvision, timm, numpy, pytest; no venv, no install). Stage A needs nothing else; stage
B needs DALI (carried wheels, see scripts/gpu_wheels.sh). Each figure goes to DIR/results.jsonl as measured.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.gpu_results import ENV_NAME, RESULTS_NAME, SUMMARY_NAME, append_record, write_summary  # noqa: E402

JUNIT_NAME, LOGS_NAME = "junit.xml", "logs.tar.gz"
WORK_DIR = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/cxr-gpu-check"))  # shards, step logs: never sent back
WHEELS_DIR, SITE_DIR = Path("/tmp/cxr-wheels"), Path("/tmp/cxr-site")  # what scripts/gpu_wheels.sh's command uses
DEFAULT_WHEELS = ROOT / ".gpu-wheels"
PER_TEST_TIMEOUT_S = 60
# the lent machine brings these; anything else the check imports comes from this repository (or stage B's wheels)
LENT_MODULES = ("torch", "triton", "torchvision", "timm", "numpy", "pytest", "pytest_timeout")


@dataclass(frozen=True)
class Step:
    name: str
    cap_s: int
    what: str


# Caps are upper bounds (a step ends at its cap, the stage at its deadline); A + B <= 540 s leaves a rerun's time in
# the 15 device minutes after the machine's start and the carried parts. Within a step the compiled rows come last
# (PLANNED_ROWS), so a compile that outlasts the cap costs only its own row, reported "not measured (cap)".
STAGES = {
    "A": (300, (
        Step("env", 20, "GPU, driver, torch / Triton / torchvision / DALI versions -> env.json"),
        Step("loss", 65, "fused NT-Xent (self-check on) vs eager and compiled PyTorch at 4,096 / 16,384 / 65,536 "
                         "views, D=128, bf16: fwd+bwd ms (median of 10, CUDA events), peak memory, OOM as such"),
        Step("model", 80, "trainer's SimCLR step (method + NT-Xent + LARS, global BN off, 1 GPU) on device-resident "
                          "synthetic tensors, 224 px, batch 256, channels-last, bf16: ResNet-50 eager, ResNet-18 "
                          "eager, ResNet-50 compiled: images/s, steps/s, views/s"),
        Step("dino", 70, "trainer's DINO step (ViT-S/16 student + EMA teacher + centred loss + AdamW, clip 3.0, 1 GPU) "
                         "on device-resident synthetic crops, 2x224 + 8x96 px, batch 64, K=65,536, bf16: eager, then "
                         "compiled: images/s (median of 10), first-step (compile) s, peak MiB, compiled / eager"),
        Step("tests", 65, f"GPU-marked tests without DALI, {PER_TEST_TIMEOUT_S} s per test, JUnit as they go"),
    )),
    "B": (240, (
        Step("install", 30, "carried wheels: sha256 of each part, unpack, the manifest's one pip install"),
        Step("shards", 35, "`ingest synth` phantoms -> shards of real-size JPEGs, shorter side 256 and 1024"),
        Step("dali", 40, "DALI GPU decode + augment, 2 views at 224 px: images/s at 256 and 1024 px"),
        Step("e2e", 85, "SimCLR ResNet-50 224 px bf16 compiled fed by DALI: images/s, end-to-end / model-only"),
        Step("tests", 50, f"DALI GPU tests, {PER_TEST_TIMEOUT_S} s per test, JUnit as they go"),
    )),
}
# GPU-marked test files: stage A runs `gpu and not dali`, stage B `gpu and dali` (tests/conftest.py: the dali mark)
TEST_FILES = {
    "A": ("tests/test_fused_ntxent.py", "tests/test_trainer_ntxent.py", "tests/test_trainer_losses.py",
          "tests/test_eval_knn.py", "tests/test_trainer_gpu.py"),
    "B": ("tests/test_dali_augment.py", "tests/test_dali_handoff.py", "tests/test_dali_pipes.py",
          "tests/test_eval_cli.py", "tests/test_trainer_gpu.py"),
}
TEST_MARKS = {"A": "gpu and not dali", "B": "gpu and dali"}
OUT_FILES = (RESULTS_NAME, ENV_NAME, JUNIT_NAME, SUMMARY_NAME, LOGS_NAME)

# Sizes: the on a GPU; --smoke runs the same code at CPU-sized shapes (a test of the code, not a figure).
SIZES = {
    "gpu": {"loss_views": (4096, 16384, 65536), "loss_repeats": 10,
            "model_runs": (("resnet50", 224, 256, "eager"), ("resnet18", 224, 256, "eager"),
                           ("resnet50", 224, 256, "compile")), "model_repeats": 10, "model_warmup": 3,
            "dino": {"arch": "vit_small_patch16", "global_size": 224, "local_size": 96, "local_crops": 8,
                     "batch": 64, "out_dim": 65536, "steps": 10, "warmup": 3},
            "synth_images": 16, "synth_px": 1024, "shard_px": (256, 1024), "replicas": {256: 4096, 1024: 1024},
            "dali_batch": 256, "dali_batches": 20, "e2e_steps": 20, "e2e_warmup": 5},
    "smoke": {"loss_views": (64, 128), "loss_repeats": 2, "model_runs": (("resnet18", 32, 4, "eager"),),
              "model_repeats": 2, "model_warmup": 1,
              "dino": {"arch": "vit_tiny_patch8", "global_size": 32, "local_size": 16, "local_crops": 2, "batch": 4,
                       "out_dim": 1024, "steps": 2, "warmup": 1},
              "synth_images": 4, "synth_px": 64, "shard_px": (32, 64), "replicas": {32: 32, 64: 32},
              "dali_batch": 8, "dali_batches": 2, "e2e_steps": 2, "e2e_warmup": 1},
}
DINO_MODES = ("eager", "compile")  # eager first: its row is on disk before a compile can run into the cap


def model_metric(arch: str, mode: str) -> str:
    return f"{arch} train step images/s, {mode}"


def dino_metric(arch: str, what: str, mode: str) -> str:
    return f"DINO {arch} step {what}, {mode}"


def planned_rows(step: str, sizes: dict, compiled: bool) -> list[tuple[str, str]]:
    """(metric, unit) of the headline rows a step measures, in the order it measures them (the last fall to the cap
    first); without ``compiled`` (a smoke run on a CPU) the compiled rows are left out, as the steps leave them out."""
    if step == "model":
        return [(model_metric(arch, mode), "images/s") for arch, _, _, mode in sizes["model_runs"]
                if compiled or mode != "compile"]
    if step == "dino":
        arch = sizes["dino"]["arch"]
        rows = [(dino_metric(arch, "images/s", mode), "images/s") for mode in DINO_MODES
                if compiled or mode != "compile"]
        return rows + ([(dino_metric(arch, "speedup", "compiled / eager"), "x")] if compiled else [])
    return []


# ------------------------------------------------------------------------------------------------ plan / dry run


def floors() -> dict[str, str]:
    """pyproject's lower bounds for the packages the lent machine brings (torch, triton, torchvision, timm, numpy)."""
    import tomllib
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for d in deps:
        spec = d.split(";")[0].replace(" ", "")
        if ">=" in spec:
            name, floor = spec.split(">=", 1)
            out[name.lower()] = floor.split(",")[0]
    return {k: v for k, v in out.items() if k in ("torch", "triton", "torchvision", "timm", "numpy")}


def version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def installed_version(module: str) -> str | None:
    import importlib.metadata
    import importlib.util
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    dist = {"pytest_timeout": "pytest-timeout", "nvidia.dali": None}.get(module, module)
    if dist is None:
        mod = __import__(module, fromlist=["__version__"])
        return getattr(mod, "__version__", "present")
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return getattr(__import__(module), "__version__", "present")


def wheel_manifest(wheels: Path) -> dict | None:
    path = wheels / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def dry_run(stage: str, out: Path, wheels: Path) -> int:
    deadline_s, steps = STAGES[stage]
    print(f"gpu-check stage {stage}: deadline {deadline_s} s, steps (cap each):")
    for s in steps:
        print(f"  {s.name:<8} <= {s.cap_s:>3} s  {s.what}")
        rows = planned_rows(s.name, SIZES["gpu"], compiled=True)
        if rows:
            print(f"           rows in order (a cap cuts the last first): {'; '.join(m for m, _ in rows)}")
    print(f"  caps sum to {sum(s.cap_s for s in steps)} s; stages A + B: "
          f"{sum(st.cap_s for _, ss in STAGES.values() for st in ss)} s")
    print(f"writes into {out}: {', '.join(OUT_FILES)} (results.jsonl grows as figures are measured)")
    print(f"tests: pytest -m '{TEST_MARKS[stage]}' {' '.join(TEST_FILES[stage])}")
    floor = floors()
    for module in LENT_MODULES:
        have = installed_version(module)
        need = floor.get(module)
        ok = have is not None and (need is None or version_tuple(have) >= version_tuple(need))
        verdict = "ok" if ok else ("optional: no per-test timeout" if module == "pytest_timeout" else "NOT OK")
        print(f"  {module:<14} {have or 'missing':<16} floor {need or '-':<8} {verdict}")
    if stage == "B":
        dali = installed_version("nvidia.dali")
        print(f"  nvidia.dali    {dali or 'missing (install step: carried wheels)'}")
        manifest = wheel_manifest(wheels)
        if manifest is None:
            print(f"wheel parts: no {wheels / 'manifest.json'} (make it on a CPU machine: scripts/gpu_wheels.sh "
                  f"{wheels})")
        else:
            print(f"wheel parts in {wheels} ({len(manifest['parts'])}, one per device call; the last with this "
                  f"stage):")
            for p in manifest["parts"]:
                present = "present" if (wheels / p["name"]).is_file() else "not here"
                print(f"  {p['name']}  {p['bytes'] / 2**20:.1f} MiB  sha256 {p['sha256'][:16]}  [{present}]")
            print(f"install: {manifest['install']}")
    return 0


# ------------------------------------------------------------------------------------------------ records


class Recorder:
    """Appends figures, notes and step outcomes of one stage to DIR/results.jsonl (flushed and fsynced each)."""

    def __init__(self, out: Path, stage: str, step: str = ""):
        self.path, self.stage, self.step = out / RESULTS_NAME, stage, step

    def figure(self, metric: str, value, unit: str, conditions: str, goal: str = "", status: str = "ok", **extra):
        rec = append_record(self.path, {"kind": "figure", "stage": self.stage, "step": self.step, "metric": metric,
                                        "value": value, "unit": unit, "conditions": conditions, "goal": goal,
                                        "status": status, **extra})
        print(f"[{self.stage}/{self.step}] {metric}: {value if status == 'ok' else status} {unit} ({conditions})",
              flush=True)
        return rec

    def note(self, text: str) -> None:
        append_record(self.path, {"kind": "note", "stage": self.stage, "step": self.step, "text": text})
        print(f"[{self.stage}/{self.step}] note: {text}", flush=True)


# ------------------------------------------------------------------------------------------------ step bodies
# Each runs in its own child process (own CUDA context, killed as a group at its cap).


def _device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def step_env(rec: Recorder, out: Path, sizes: dict) -> None:
    import torch

    from bench.harness import capture_env
    env = capture_env()
    env["versions"]["nvidia.dali"] = installed_version("nvidia.dali")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu_properties"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                 "multiprocessors": p.multi_processor_count, "capability": f"{p.major}.{p.minor}"}
    tmp = out / (ENV_NAME + ".tmp")
    tmp.write_text(json.dumps(env, indent=2, default=str) + "\n")
    os.replace(tmp, out / ENV_NAME)
    rec.note(f"env: {env.get('gpus') or 'no GPU'}, driver {env.get('driver')}, torch {env['versions'].get('torch')}, "
             f"triton {env['versions'].get('triton')}, DALI {env['versions'].get('nvidia.dali')}")


def step_loss(rec: Recorder, out: Path, sizes: dict) -> None:
    import torch
    import torch.nn.functional as F

    from bench.loss_bench import measure_impl
    from trainer.fused_ntxent import fused_available
    from trainer.ntxent import CHECK_GRAD_RTOL, CHECK_LOSS_RTOL, NTXent
    from trainer.losses import simclr_labels
    device = _device()
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    args = argparse.Namespace(dim=128, world=1, temperature=0.1, warmup=2, repeats=sizes["loss_repeats"],
                              matmul_precision="high" if cuda else "highest")
    torch.set_float32_matmul_precision(args.matmul_precision)
    fused = fused_available(device) and os.environ.get("TRITON_INTERPRET") != "1"
    impls = (["fused"] if fused else []) + ["reference"] + (["compiled"] if cuda else [])
    if not fused:
        rec.note(f"fused NT-Xent not timed: needs triton and a CUDA device ({device.type})")
    cond = f"D=128 {str(dtype).split('.')[-1]}, SimCLR pairing, mean loss, T=0.1, {device.type}"
    if fused:
        for n in sizes["loss_views"]:
            z = F.normalize(torch.randn(n, 128, generator=torch.Generator().manual_seed(n)), dim=1)
            z = z.to(device, dtype)
            labels = simclr_labels(n // 2, device)
            ok, why = NTXent.compare(z, z, labels, labels, 0, 0.1)
            rec.figure("fused NT-Xent self-check vs reference", "agrees" if ok else "DISAGREES", "",
                       f"{n} views: {why}", f"loss rel err <= {CHECK_LOSS_RTOL:g}, grads <= {CHECK_GRAD_RTOL:g}",
                       status="ok" if ok else "failed", n_views=n)
            del z, labels
    ms: dict[tuple[str, int], float] = {}
    for impl in impls:
        for n in sizes["loss_views"]:
            row = measure_impl(impl, n, args, device, dtype)
            name = {"fused": "fused Triton", "reference": "PyTorch eager", "compiled": "PyTorch torch.compile"}[impl]
            if row["status"] != "ok":
                rec.figure(f"NT-Xent fwd+bwd, {name}", None, "ms", f"{n} views, {cond}", status=row["status"],
                           n_views=n, impl=impl, error=row.get("error"))
                continue
            ms[impl, n] = row["median_ms"]
            rec.figure(f"NT-Xent fwd+bwd, {name}", row["median_ms"], "ms",
                       f"{n} views, {cond}, median of {row['repeats']}, p90 {row['p90_ms']:.3g} ms, dots {row['dots']}",
                       n_views=n, impl=impl, p90_ms=row["p90_ms"])
            if "peak_mem_mib" in row:
                rec.figure(f"NT-Xent peak memory, {name}", row["peak_mem_mib"], "MiB", f"{n} views, {cond}",
                           "fused < 1024 MiB at 65,536 views" if impl == "fused" else "", n_views=n, impl=impl)
    for n in sizes["loss_views"]:
        torch_ms = [ms[i, n] for i in ("reference", "compiled") if (i, n) in ms]
        if ("fused", n) in ms and torch_ms:
            rec.figure("fused NT-Xent speedup vs best PyTorch", min(torch_ms) / ms["fused", n], "x",
                       f"{n} views, {cond}", ">= 2 at >= 16,384 views", n_views=n)


def step_model(rec: Recorder, out: Path, sizes: dict) -> None:
    import torch
    from ingest.errors import one_line

    from bench.model_bench import GOAL_VIEWS_PER_S, build_step, measure, synthetic_batch
    from trainer.config import load_config
    device = _device()
    cuda = device.type == "cuda"
    precision = "bf16" if cuda else "fp32"
    for arch, px, batch, mode in sizes["model_runs"]:  # eager rows first: a compile cut at the cap costs only its row
        if mode == "compile" and not cuda:
            continue  # inductor compiles for minutes on a CPU; the smoke run checks the eager path
        cfg = load_config(None, ["data.source=synthetic", f"model.arch={arch}", "model.in_channels=1",
                                 "loss.method=simclr", "optim.name=lars", "loss.impl=auto", "model.sync_bn=off",
                                 f"data.batch_size={batch}", f"data.image_size={px}"])
        amp = f"{precision} autocast" if precision != "fp32" else "fp32"
        cond = (f"{arch} {px} px, batch {batch} (x2 views), 1 channel, channels-last, {amp}, "
                f"{mode}, SimCLR + NT-Xent + LARS, 1 {device.type}, synthetic tensors on the device")
        step = held = None
        try:
            torch.manual_seed(0)
            torch._dynamo.reset()
            step = build_step(cfg, device, compile_mode="default" if mode == "compile" else None,
                              channels_last=True, precision=precision)
            held = synthetic_batch(batch, 1, px, device, torch.bfloat16 if cuda else torch.float32, True)
            row = measure(step, held, warmup=sizes["model_warmup"], repeats=sizes["model_repeats"], device=device)
        except torch.cuda.OutOfMemoryError as e:
            rec.figure(model_metric(arch, mode), None, "images/s", cond, status="OOM",
                       error=one_line(e, limit_chars=200))
            continue
        finally:
            step_impl = getattr(getattr(step, "ntxent", None), "note", "") if step is not None else ""
            step = held = None
            if cuda:
                torch.cuda.empty_cache()
        cond += f"; loss impl: {step_impl or 'undecided'}"
        goal = f">= {GOAL_VIEWS_PER_S // 2:,} images/s" if arch == "resnet50" and px == 224 else ""
        rec.figure(model_metric(arch, mode), row["images_per_s"], "images/s", cond, goal,
                   arch=arch, mode=mode, step_ms=row["step_ms"], first_step_s=row["first_step_s"],
                   loss_finite=row["loss_finite"])
        rec.figure(f"{arch} first step (compile) time, {mode}", row["first_step_s"], "s", cond, arch=arch,
                   mode=mode)
        if "peak_mem_gib" in row:
            rec.figure(f"{arch} train step peak memory, {mode}", row["peak_mem_gib"], "GiB", cond, arch=arch,
                       mode=mode)
        if mode == "compile" and arch == "resnet50":
            rec.figure("SimCLR training step (trainer code, compiled) steps/s", 1000 / row["step_ms"], "steps/s",
                       cond, arch=arch)
            rec.figure("SimCLR training step (trainer code, compiled) views/s", row["views_per_s"], "views/s",
                       cond, f">= {GOAL_VIEWS_PER_S:,} views/s", arch=arch)
        if not row["loss_finite"]:
            rec.note(f"{arch} {mode}: non-finite loss")


def step_dino(rec: Recorder, out: Path, sizes: dict) -> None:
    """DINO ViT step, eager then compiled, through bench.dino_bench's row (the trainer's own step); each row is on
    disk before the next starts, so a compile cut at the cap leaves the eager row."""
    import torch
    from ingest.errors import one_line

    from bench.dino_bench import dino_throughput
    device = _device()
    cuda = device.type == "cuda"
    precision = "bf16" if cuda else "fp32"
    d = sizes["dino"]
    arch = d["arch"]
    images_per_s: dict[str, float] = {}
    for mode in DINO_MODES:
        if mode == "compile" and not cuda:
            continue  # inductor compiles for minutes on a CPU; the smoke run checks the eager path
        amp = f"{precision} autocast" if precision != "fp32" else "fp32"
        cond = (f"{arch}, 2x{d['global_size']} + {d['local_crops']}x{d['local_size']} px crops, batch {d['batch']}, "
                f"1 channel, K={d['out_dim']:,}, {amp}, {mode}, student + EMA teacher + centred loss + AdamW (clip "
                f"3.0), 1 {device.type}, synthetic crops on the device")
        try:
            torch.manual_seed(0)
            torch._dynamo.reset()
            row = dino_throughput(arch=arch, global_size=d["global_size"], local_size=d["local_size"],
                                  local_crops=d["local_crops"], batch=d["batch"], out_dim=d["out_dim"],
                                  device=device.type, precision=precision,
                                  compile_mode="default" if mode == "compile" else None, steps=d["steps"],
                                  warmup=d["warmup"])
        except torch.cuda.OutOfMemoryError as e:
            rec.figure(dino_metric(arch, "images/s", mode), None, "images/s", cond, status="OOM",
                       error=one_line(e, limit_chars=200))
            continue
        finally:
            if cuda:
                torch.cuda.empty_cache()
        cond += (f", median of {row['steps']} steps after {row['warmup']} ("
                 f"{'CUDA events' if cuda else 'synchronised clock'}), p90 {row['step_ms_p90']:.3g} ms")
        images_per_s[mode] = row["images_per_s"]
        rec.figure(dino_metric(arch, "images/s", mode), row["images_per_s"], "images/s", cond, arch=arch, mode=mode,
                   step_ms=row["step_ms"], first_step_s=row["first_step_s"], loss_finite=row["loss_finite"])
        rec.figure(dino_metric(arch, "first step (compile) time", mode), row["first_step_s"], "s", cond, arch=arch,
                   mode=mode)
        if "peak_mem_mib" in row:
            rec.figure(dino_metric(arch, "peak memory", mode), row["peak_mem_mib"], "MiB", cond, arch=arch, mode=mode)
        if not row["loss_finite"]:
            rec.note(f"DINO {arch} {mode}: non-finite loss")
    if "eager" in images_per_s and "compile" in images_per_s:
        rec.figure(dino_metric(arch, "speedup", "compiled / eager"), images_per_s["compile"] / images_per_s["eager"],
                   "x", f"{arch}, images/s of the two rows above (what torch.compile gives the ViT's DINO step)",
                   arch=arch)


def step_install(rec: Recorder, out: Path, sizes: dict, wheels: Path) -> None:
    """Check each carried part against the manifest, unpack the wheels and run the manifest's one install command."""
    import hashlib
    import shlex
    manifest = wheel_manifest(wheels)
    if installed_version("nvidia.dali") is not None:
        rec.note("DALI already importable: nothing to install")
        return
    if manifest is None:
        raise SystemExit(f"no {wheels / 'manifest.json'} and no DALI: carry the parts made by scripts/gpu_wheels.sh")
    WHEELS_DIR.mkdir(parents=True, exist_ok=True)
    stream = WORK_DIR / "wheels.tar"
    with open(stream, "wb") as dst:
        for p in manifest["parts"]:
            path = wheels / p["name"]
            if not path.is_file():
                raise SystemExit(f"{path}: part missing (carry each part in its own call, back to back)")
            h = hashlib.sha256()
            with open(path, "rb") as src:
                while chunk := src.read(1 << 22):
                    h.update(chunk)
                    dst.write(chunk)
            if h.hexdigest() != p["sha256"]:
                raise SystemExit(f"{path}: sha256 differs from the manifest (a part cut short in transfer?)")
    with tarfile.open(stream) as tf:
        tf.extractall(WHEELS_DIR, filter="data")
    stream.unlink()
    t0 = time.perf_counter()
    run = subprocess.run(manifest["install"], shell=True, capture_output=True, text=True)
    print(run.stdout + run.stderr, flush=True)
    if run.returncode != 0:
        raise SystemExit(f"install failed (exit {run.returncode}): {shlex.quote(manifest['install'])}")
    rec.figure("carried wheels install time", time.perf_counter() - t0, "s",
               f"{len(manifest['parts'])} parts, {sum(p['bytes'] for p in manifest['parts']) / 2**20:.0f} MiB")


def _shard_root(px: int) -> Path:
    return WORK_DIR / f"shards-{px}px"


def step_shards(rec: Recorder, out: Path, sizes: dict) -> None:
    import contextlib
    import io
    import shutil

    from bench.all_bench import make_phantom_shards
    from bench.data_bench import replicate_shards
    from ingest import build, synth
    cores = len(os.sched_getaffinity(0))
    t0 = time.perf_counter()
    base = WORK_DIR / "phantoms"
    biggest = max(sizes["shard_px"])
    make_phantom_shards(base, n_images=sizes["synth_images"], synth_px=sizes["synth_px"], shard_px=biggest,
                        workers=cores)
    for px in sizes["shard_px"]:
        src = base / "shards" if px == biggest else base / f"shards-{px}"
        if px != biggest:
            with contextlib.redirect_stdout(io.StringIO()):
                if build.main(["--source", "chexpert", "--root", str(base / "phantoms" / synth.ROOT_NAME), "--out",
                               str(src), "--size", str(px), "--workers", str(cores), "--no-progress",
                               "--overwrite"]) != 0:
                    raise SystemExit(f"ingest build-shards --size {px} failed")
        shutil.rmtree(_shard_root(px), ignore_errors=True)
        replicate_shards(src, _shard_root(px), num_samples=sizes["replicas"][px])
    rec.note(f"{sizes['synth_images']} phantoms ({sizes['synth_px']} px) -> shards at {sizes['shard_px']} px, "
             f"replicated to {sizes['replicas']} samples, in {time.perf_counter() - t0:.0f} s on {cores} cores")


def step_dali(rec: Recorder, out: Path, sizes: dict) -> None:
    import torch

    from bench.data_bench import GPU_GOAL_SAMPLES_PER_S, cycle, dali_loader, measure_loader
    cuda = torch.cuda.is_available()
    cores = len(os.sched_getaffinity(0))
    args = argparse.Namespace(dtype="bfloat16" if cuda else "float32", gpu_batch_size=sizes["dali_batch"],
                              batch_size=sizes["dali_batch"], augment="simclr-cxr", image_size=224 if cuda else 32,
                              channels=1, shuffle_buffer=1024 if cuda else 16)
    device = "gpu" if cuda else "cpu"
    for px in sizes["shard_px"]:
        loader = dali_loader(_shard_root(px), args, device=device, threads=cores, micle=False)
        try:
            r = measure_loader(lambda: cycle(loader), lambda: [], warmup_batches=3 if cuda else 1,
                               timed_batches=sizes["dali_batches"], batch_size=loader.batch_size,
                               device=loader.torch_device)
        finally:
            loader.close()
        cond = (f"DALI {device} decode + simclr-cxr augment, 2 views of {args.image_size} px, JPEG shorter side "
                f"{px} px, batch {loader.batch_size}, {cores} threads, {args.dtype}")
        rec.figure(f"DALI decode+augment images/s ({px} px JPEGs)", r["samples_per_s"], "images/s", cond,
                   f">= {GPU_GOAL_SAMPLES_PER_S:,} images/s" if px == 256 else "", shard_px=px,
                   cpu_cores_used=r["cpu_cores_used"], first_batch_s=r["first_batch_s"])


def step_e2e(rec: Recorder, out: Path, sizes: dict) -> None:
    import torch

    from bench import e2e_bench
    cuda = torch.cuda.is_available()
    px = min(sizes["shard_px"])
    result = WORK_DIR / "e2e.json"
    argv = ["--shards", str(_shard_root(px)), "--steps", str(sizes["e2e_steps"]), "--warmup",
            str(sizes["e2e_warmup"]), "--num-threads", str(len(os.sched_getaffinity(0))), "--out", str(result)]
    if not cuda:
        argv += ["--arch", "resnet18", "--image-size", "32", "--batch", "4"]
    if e2e_bench.main(argv) != 0:
        raise SystemExit("bench e2e failed")
    for row in json.loads(result.read_text())["rows"]:
        cond = (f"{row['arch']} {row['image_size']} px, batch {row['batch']}, {row['precision']}, {row['compile']}, "
                f"DALI {row['data_device']} on {px}-px shards, {sizes['e2e_steps']} steps after {sizes['e2e_warmup']}")
        rec.figure("SimCLR end-to-end images/s (DALI-fed)", row["e2e_views_per_s"] / 2, "images/s", cond)
        rec.figure("SimCLR model-only images/s (same step, batch held)", row["model_only_views_per_s"] / 2,
                   "images/s", cond)
        rec.figure("pipeline efficiency end-to-end / model-only", row["pipeline_efficiency"], "ratio", cond,
                   f">= {e2e_bench.GOAL_EFFICIENCY}")
        rec.figure("data wait", row["data_wait_pct"], "%", cond)


STEP_BODIES = {"env": step_env, "loss": step_loss, "model": step_model, "dino": step_dino, "shards": step_shards,
               "dali": step_dali, "e2e": step_e2e}


# ------------------------------------------------------------------------------------------------ pytest plugin
# Loaded into the tests step's pytest with `-p gpu_check`: every test outcome goes to results.jsonl and junit.xml is
# rewritten after each test, so a run cut at its cap keeps every finished test.

_junit_cases: list[tuple[str, str, float, str]] = []


def _write_junit(out: Path) -> None:
    import xml.etree.ElementTree as ET
    counts = {k: sum(1 for c in _junit_cases if c[1] == k) for k in ("failed", "error", "skipped")}
    suite = ET.Element("testsuite", name=f"gpu-check-{os.environ.get('GPU_CHECK_STAGE', '')}",
                       tests=str(len(_junit_cases)), failures=str(counts["failed"]), errors=str(counts["error"]),
                       skipped=str(counts["skipped"]), time=f"{sum(c[2] for c in _junit_cases):.3f}")
    for nodeid, outcome, seconds, detail in _junit_cases:
        path, _, name = nodeid.partition("::")
        case = ET.SubElement(suite, "testcase", classname=path.replace("/", ".").removesuffix(".py"), name=name,
                             time=f"{seconds:.3f}")
        if outcome in ("failed", "error", "skipped"):
            tag = {"failed": "failure", "error": "error", "skipped": "skipped"}[outcome]
            ET.SubElement(case, tag, message=detail[:500]).text = detail
    tmp = out / (JUNIT_NAME + ".tmp")
    ET.ElementTree(suite).write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, out / JUNIT_NAME)


def pytest_runtest_logreport(report) -> None:
    out = os.environ.get("GPU_CHECK_OUT")
    if not out:
        return
    outcome = None
    if report.when == "setup" and not report.passed:
        outcome = "skipped" if report.skipped else "error"
    elif report.when == "call":
        outcome = "passed" if report.passed else ("skipped" if report.skipped else "failed")
    elif report.when == "teardown" and report.failed:
        outcome = "error"
    if outcome is None:
        return
    detail = ""
    if outcome == "skipped" and isinstance(report.longrepr, tuple):
        detail = str(report.longrepr[2])
    elif outcome != "passed":
        detail = str(report.longrepr).strip().splitlines()[-1][:300] if report.longrepr else ""
    _junit_cases.append((report.nodeid, outcome, report.duration, detail))
    append_record(Path(out) / RESULTS_NAME, {"kind": "test", "stage": os.environ.get("GPU_CHECK_STAGE"),
                                             "nodeid": report.nodeid, "outcome": outcome,
                                             "seconds": round(report.duration, 2), "detail": detail})
    _write_junit(Path(out))


def test_argv(stage: str, python: str, have_timeout: bool) -> list[str]:
    argv = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_check", "-o", "addopts=-ra", "-m",
            TEST_MARKS[stage], *TEST_FILES[stage]]
    if have_timeout:
        argv.insert(3, f"--timeout={PER_TEST_TIMEOUT_S}")
    return argv


# ------------------------------------------------------------------------------------------------ the driver


def _child_env(out: Path, stage: str) -> dict:
    paths = [str(ROOT / "scripts"), str(ROOT)] + ([str(SITE_DIR)] if SITE_DIR.is_dir() else [])
    env = dict(os.environ, GPU_CHECK_OUT=str(out), GPU_CHECK_STAGE=stage, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if os.environ.get("GPU_CHECK_SMOKE") != "1":
        env.pop("TRITON_INTERPRET", None)  # real kernels on the GPU
    return env


def _run_child(argv: list[str], env: dict, log: Path, timeout_s: float) -> tuple[str, str]:
    """Run one step's process group to its end or its cap; -> (status, detail)."""
    with open(log, "ab") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return "timeout", f"killed at its cap of {timeout_s:.0f} s"
        except BaseException:
            _kill_group(proc)
            raise
    if rc == 0:
        return "ok", ""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return "failed", f"exit {rc}: {lines[-1][:200] if lines else ''}"


def _kill_group(proc: subprocess.Popen) -> None:
    """End the step and everything it started (inductor compile workers, DALI threads live in the same group)."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _pack_logs(out: Path, logs: Path) -> None:
    tmp = out / (LOGS_NAME + ".tmp")
    with tarfile.open(tmp, "w:gz") as tf:
        for p in sorted(logs.glob("*.log")):
            tf.add(p, arcname=f"logs/{p.name}")
    os.replace(tmp, out / LOGS_NAME)


class _Stopped(Exception):
    pass


def run_stage(stage: str, out: Path, wheels: Path, only: list[str] | None, smoke: bool) -> int:
    deadline_s, steps = STAGES[stage]
    sizes = SIZES["smoke" if smoke else "gpu"]
    out.mkdir(parents=True, exist_ok=True)
    logs = WORK_DIR / f"logs-{stage}"
    logs.mkdir(parents=True, exist_ok=True)
    for p in logs.glob("*.log"):
        p.unlink()
    rec = Recorder(out, stage, "driver")
    env = _child_env(out, stage)
    if smoke:
        env["GPU_CHECK_SMOKE"] = "1"
    have_timeout = installed_version("pytest_timeout") is not None

    def stop(signum, frame):
        raise _Stopped(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    t_start = time.monotonic()
    failed = 0
    try:
        rec.note(f"stage {stage} started: deadline {deadline_s} s, steps {[s.name for s in steps]}"
                 + (" (smoke: CPU-sized shapes, not figures)" if smoke else ""))
        for s in steps:
            if only and s.name not in only:
                continue
            for metric, unit in planned_rows(s.name, sizes, compiled=not smoke):  # what the summary must account for
                append_record(out / RESULTS_NAME, {"kind": "plan", "stage": stage, "step": s.name, "metric": metric,
                                                   "unit": unit})
            left = deadline_s - (time.monotonic() - t_start)
            if left < 5:
                append_record(out / RESULTS_NAME, {"kind": "step", "stage": stage, "step": s.name, "status": "skipped",
                                                   "seconds": 0, "cap_s": s.cap_s, "detail": "stage deadline reached"})
                continue
            timeout_s = min(s.cap_s, left)
            log = logs / f"{stage}-{s.name}.log"
            if s.name == "tests":
                argv = test_argv(stage, sys.executable, have_timeout)
            else:
                argv = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--out", str(out),
                        "--wheels", str(wheels), "--child", s.name] + (["--smoke"] if smoke else [])
            print(f"gpu-check {stage}/{s.name}: up to {timeout_s:.0f} s ...", flush=True)
            t0 = time.monotonic()
            status, detail = _run_child(argv, env, log, timeout_s)
            if s.name == "tests" and status == "failed" and "exit 5" in detail:
                status, detail = "ok", "no tests selected"
            took = time.monotonic() - t0
            failed += status != "ok"
            append_record(out / RESULTS_NAME, {"kind": "step", "stage": stage, "step": s.name, "status": status,
                                               "seconds": round(took, 1), "cap_s": s.cap_s, "detail": detail})
            print(f"gpu-check {stage}/{s.name}: {status} in {took:.0f} s {detail}", flush=True)
            write_summary(out)
            _pack_logs(out, logs)
            if s.name == "install" and status != "ok":
                rec.note("no DALI: the steps that need it are left out")
                break
    except _Stopped as e:
        rec.note(f"stopped by {e} after {time.monotonic() - t_start:.0f} s; what was measured is kept")
        failed += 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        write_summary(out)
        _pack_logs(out, logs)
    print(f"gpu-check stage {stage}: done in {time.monotonic() - t_start:.0f} s, {failed} step(s) not ok; "
          f"{out / SUMMARY_NAME}", flush=True)
    return 1 if failed else 0


def run_child(stage: str, step: str, out: Path, wheels: Path, smoke: bool) -> int:
    sizes = SIZES["smoke" if smoke else "gpu"]
    out.mkdir(parents=True, exist_ok=True)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    rec = Recorder(out, stage, step)
    if step == "install":
        step_install(rec, out, sizes, wheels)
    else:
        STEP_BODIES[step](rec, out, sizes)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=sorted(STAGES), required=True,
                   help="A: the machine's own packages; B: DALI (carried wheels)")
    p.add_argument("--out", type=Path, default=None, help="results folder (<= 8 files come back from a lent machine)")
    p.add_argument("--wheels", type=Path, default=DEFAULT_WHEELS, help="stage B: folder of gpu_wheels.sh's parts")
    p.add_argument("--dry-run", action="store_true", help="print the plan, the caps and the files; run nothing")
    p.add_argument("--only", help="comma list of step names to run (default: all of the stage)")
    p.add_argument("--smoke", action="store_true", help="CPU-sized shapes: checks the code runs, measures nothing")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or "gpu-check-out")
    if args.dry_run:
        return dry_run(args.stage, out, args.wheels)
    names = [s.name for s in STAGES[args.stage][1]]
    only = [x for x in args.only.split(",") if x] if args.only else None
    if only and (bad := [x for x in only if x not in names]):
        print(f"gpu-check: --only {','.join(bad)}: not a stage {args.stage} step ({', '.join(names)})",
              file=sys.stderr)
        return 2
    if args.child:
        return run_child(args.stage, args.child, out, args.wheels, args.smoke)
    if not args.smoke:
        import torch
        if not torch.cuda.is_available():
            print("gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False); run it on a lent H100 / "
                  "H200, or use --dry-run (plan) / --smoke (CPU-sized code check)", file=sys.stderr)
            return 2
    return run_stage(args.stage, out, args.wheels, only, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
