"""`python -m bench all`: every stage on this machine in one command, on phantom shards built by the real ingest path.

Writes ``bench/results/<gpu-name>/<date>.json`` (environment + each stage's document + headline numbers), a Markdown
summary and a plot beside it, and each stage's raw JSON and log under ``<date>/``. Without a GPU (or with --quick)
every stage runs at tiny sizes: a smoke run of the suite, not a measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import capture_env, default_out_dir
from bench.report import headline, markdown, plot
from ingest.errors import one_line

STAGES = ("ingest", "data", "model", "e2e", "loss")
STAGE_MODULES = {s: f"bench.{s}_bench" for s in STAGES}
NEEDS_SHARDS = ("data", "e2e")


def stage_argv(stage: str, *, mode: str, cuda: bool, shards: Path | None, out_json: Path) -> list[str]:
    """Arguments for one stage. full: sizes that characterise a GPU in a few minutes each; quick: a smoke run."""
    cores = len(os.sched_getaffinity(0))
    workers = sorted({1, min(4, cores), cores})
    full = {
        "ingest": ["--workers", ",".join(map(str, workers))],
        "data": ["--shards", str(shards)],
        "model": ["--precision", "fp32,bf16", "--memory-format", "channels_last"],
        "e2e": ["--shards", str(shards)],
        "loss": ["--overwrite"],
    }
    quick = {
        "ingest": ["--jpeg-images", "16", "--png-images", "2", "--big-jpeg-images", "2", "--workers", "1",
                   "--repeats", "1"],
        "data": ["--quick", "--shards", str(shards), "--devices", "gpu,cpu" if cuda else "cpu"],
        "model": ["--quick", "--precision", "fp32", "--memory-format", "nchw,channels_last",
                  "--device", "cuda" if cuda else "cpu"],
        "e2e": ["--quick", "--shards", str(shards)],
        "loss": (["--sizes", "512", "1024"] if cuda else ["--sizes", "8", "16", "--repeats", "2", "--impls",
                                                           "reference"]) + ["--overwrite"],
    }
    return (full if mode == "full" else quick)[stage] + ["--out", str(out_json)]


def make_phantom_shards(folder: Path, *, n_images: int, synth_px: int, shard_px: int, workers: int) -> Path:
    """`ingest synth` + `ingest build-shards --source chexpert`: the shards the data and e2e stages read."""
    from ingest import build
    from synth import dataset as synth_dataset
    raw, shards = folder / "phantoms", folder / "shards"
    with contextlib.redirect_stdout(io.StringIO()):
        if synth_dataset.main(["--out", str(raw), "--n", str(n_images), "--size", str(synth_px),
                               "--workers", str(workers), "--overwrite"]) != 0:
            raise RuntimeError("ingest synth failed")
        if build.main(["--source", "chexpert", "--root", str(raw / synth_dataset.ROOT_NAME), "--out", str(shards),
                       "--size", str(shard_px), "--workers", str(workers), "--no-progress", "--overwrite"]) != 0:
            raise RuntimeError("ingest build-shards failed")
    return shards


def run_stage(stage: str, argv: list[str], log: Path, *, in_process: bool, timeout_s: float) -> dict:
    """Run one stage; never raises. Status: ok | failed | error | timeout | missing."""
    module = STAGE_MODULES[stage]
    try:
        present = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        present = False
    if not present:
        return {"status": "missing", "error": f"{module} is not in this checkout"}
    t0 = time.perf_counter()
    rec: dict = {"argv": argv}
    if in_process:
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                rc = int(importlib.import_module(module).main(argv) or 0)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
        except Exception as e:  # a broken stage must not take the others down
            rc = None
            rec["error"] = one_line(e, with_type=True)
        log.write_text(buf.getvalue())
    else:
        try:
            with open(log, "w") as f:
                rc = subprocess.run([sys.executable, "-m", "bench", stage, *argv], stdout=f, stderr=subprocess.STDOUT,
                                    timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = None
            rec["error"] = f"timed out after {timeout_s:.0f} s"
    rec["seconds"] = time.perf_counter() - t0
    rec["rc"] = rc
    if rc != 0 and "error" not in rec:
        tail = [ln for ln in log.read_text().splitlines() if ln.strip()][-1:] if log.exists() else []
        rec["error"] = f"exit {rc}: {tail[0][:200] if tail else 'no output'}"
    rec["status"] = "ok" if rc == 0 else ("timeout" if "timed out" in rec.get("error", "") else
                                          "failed" if rc is not None else "error")
    return rec


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench all", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="results folder (default bench/results/<gpu-name>/)")
    p.add_argument("--quick", action="store_true", help="tiny sizes everywhere (always so without a GPU)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list from {','.join(STAGES)}")
    p.add_argument("--shards", help="shard folder for data/e2e (default: phantoms through ingest, in a temp folder)")
    p.add_argument("--stage-timeout-s", type=float, default=600.0)
    p.add_argument("--in-process", action="store_true", help="import and call each stage (no subprocess isolation)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace today's result instead of adding a timestamped one")
    args = p.parse_args(argv)
    args.stage_list = [s for s in args.stages.split(",") if s]
    bad = [s for s in args.stage_list if s not in STAGES]
    if bad:
        p.error(f"unknown stage(s) {bad}; choose from {list(STAGES)}")
    return args


def _result_paths(out_dir: Path, overwrite: bool) -> tuple[Path, Path, Path, Path]:
    now = dt.datetime.now(dt.timezone.utc)
    stem = now.strftime("%Y-%m-%d")
    if (out_dir / f"{stem}.json").exists() and not overwrite:
        stem = now.strftime("%Y-%m-%dT%H%M%S")
    return out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png", out_dir / stem


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    t_start = time.perf_counter()
    env = capture_env()
    cuda = bool(env.get("gpus"))
    mode = "full" if cuda and not args.quick else "quick"
    out_dir = Path(args.out) if args.out else default_out_dir(env)
    json_path, md_path, png_path, raw_dir = _result_paths(out_dir, args.overwrite)
    raw_dir.mkdir(parents=True, exist_ok=True)
    print(f"bench all: {mode} mode on {', '.join(env['gpus']) or 'CPU (no GPU: tiny sizes)'} -> {json_path}",
          file=sys.stderr, flush=True)
    stages: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-all-") as tmp:
        shards = Path(args.shards) if args.shards else None
        if shards is None and any(s in NEEDS_SHARDS for s in args.stage_list):
            t0 = time.perf_counter()
            try:
                n, synth_px, shard_px = (2048, 320, 256) if mode == "full" else (64, 96, 64)
                shards = make_phantom_shards(Path(tmp), n_images=n, synth_px=synth_px, shard_px=shard_px,
                                             workers=len(os.sched_getaffinity(0)))
                print(f"  phantom shards: {n} images in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            except Exception as e:
                print(f"  phantom shards failed: {e}", file=sys.stderr)
        for stage in args.stage_list:
            out_json = raw_dir / f"{stage}.json"
            if stage in NEEDS_SHARDS and shards is None:
                stages[stage] = {"status": "error", "error": "no shards (phantom shard build failed)"}
                continue
            argv_s = stage_argv(stage, mode=mode, cuda=cuda, shards=shards, out_json=out_json)
            print(f"  {stage:<7} python -m bench {stage} {' '.join(argv_s)}", file=sys.stderr, flush=True)
            rec = run_stage(stage, argv_s, raw_dir / f"{stage}.log", in_process=args.in_process,
                            timeout_s=args.stage_timeout_s)
            if out_json.is_file():
                rec["result"] = json.loads(out_json.read_text())
            elif rec["status"] == "ok":
                rec.update(status="failed", error="exited 0 but wrote no JSON")
            print(f"  {stage:<7} {rec['status']}" + (f" in {rec['seconds']:.1f} s" if "seconds" in rec else "") +
                  (f": {rec['error']}" if rec.get("error") else ""), file=sys.stderr, flush=True)
            stages[stage] = rec
    doc = {"benchmark": "all", "command": "python -m bench all " + " ".join(argv), "mode": mode, "env": env,
           "stages": stages, "summary": headline(stages), "wall_s": time.perf_counter() - t_start}
    json_path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    title = f"{', '.join(env['gpus']) or 'CPU only'} ({mode} mode)"
    png = plot(doc["summary"], png_path, title)
    md_path.write_text(markdown(doc, png.name if png else None) + "\n")
    for name, v in doc["summary"].get("images_per_s", {}).items():
        print(f"{v:>12,.0f} images/s  {name}")
    if "pipeline_efficiency" in doc["summary"]:
        print(f"pipeline efficiency {100 * doc['summary']['pipeline_efficiency']:.1f}%, "
              f"data wait {doc['summary']['data_wait_pct']:.1f}%")
    print(f"wrote {json_path}, {md_path}" + (f", {png}" if png else ""))
    bad = {k: v["status"] for k, v in stages.items() if v["status"] not in ("ok", "missing")}
    if bad:
        print(f"bench all: stage(s) did not finish: {bad}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
