"""`python -m bench scale`: cost against size, from test sizes up to MIMIC-CXR's 377k images: ingest planning,
manifest and patient table, view-filtered indexes, DALI reader start-up, feature memory and the kNN bank.
Each case runs in a fresh process (its peak RSS is its own); exponents are least-squares slopes on log-log."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

from bench.harness import BenchReport, default_out_dir
from bench.ingest_bench import SHARED_DATA

CHEXPERT_CSV = SHARED_DATA / "metadata" / "chexpert_train.csv.gz"
NIH_CSV = SHARED_DATA / "metadata" / "nih_data_entry_2017_v2020.csv.gz"
MIMIC_IMAGES = 377_110
FEATURE_DIM = 2048            # ResNet-50 pooled features, what eval's kNN bank holds (float32)
KNN_QUERIES = 1000            # fixed query count: the bank's size is what varies
SHARD_SAMPLES = 10_000        # ingest's --shard-max-samples default: how MIMIC-size splits are cut
EXPONENT_LIMIT = 1.1
PLAN_LIMIT_S, PLAN_LIMIT_MIB = 60.0, 2048.0
FULL_SIZES = {"ingest-chexpert": [10_000, 100_000, MIMIC_IMAGES], "ingest-nih": [10_000, 100_000, MIMIC_IMAGES],
              "views": [10_000, 100_000, MIMIC_IMAGES], "reader": [100, 1_000, 10_000],
              "features": [50_000, 200_000], "knn": [50_000, 200_000]}
QUICK_SIZES = {"ingest-chexpert": [300, 1_200], "ingest-nih": [300, 1_200], "views": [300, 1_200],
               "reader": [4, 16], "features": [1_000, 4_000], "knn": [1_000, 4_000]}
FAMILIES = tuple(FULL_SIZES)
PLAN_STAGE = "plan (read_source + make_plan)"


def _rss_mib() -> float:
    """This process's peak RSS in MiB. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a fresh
    child would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ---- inputs (made by the parent, once per size) ------------------------------------------------------------
def _grown_csv(csv_gz: Path, n: int, grow) -> "object":
    """The first ``n`` rows of a real metadata CSV; past its end, copies of its rows with new patients."""
    import pandas as pd
    base = pd.read_csv(csv_gz, dtype=str, keep_default_na=False, nrows=n)
    parts, rep = [base], 1
    while sum(len(p) for p in parts) < n:
        parts.append(grow(base.copy(), rep))
        rep += 1
    return pd.concat(parts, ignore_index=True).head(n)


def _chexpert_copy(df, rep: int):
    # patient00001 -> patient{rep}00001: six digits, never one of the real five-digit ids
    df["Path"] = df["Path"].str.replace("/patient", f"/patient{rep}", regex=False)
    return df


def _nih_copy(df, rep: int):
    df["Patient ID"] = (df["Patient ID"].astype(int) + rep * 100_000).astype(str)
    df["Image Index"] = f"r{rep}-" + df["Image Index"]
    return df


def make_chexpert_root(root: Path, n: int) -> Path:
    """ROOT/train.csv only: the chexpert source plans from the CSV and never opens an image."""
    root.mkdir(parents=True, exist_ok=True)
    _grown_csv(CHEXPERT_CSV, n, _chexpert_copy).to_csv(root / "train.csv", index=False)
    return root


def make_nih_root(root: Path, n: int, film: Path) -> Path:
    """ROOT/Data_Entry_2017.csv + ROOT/images/<name> symlinks to one real film: the nih source lists images/."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    df = _grown_csv(NIH_CSV, n, _nih_copy)
    df.to_csv(root / "Data_Entry_2017.csv", index=False)
    target = str(film.resolve())
    for name in df["Image Index"]:
        os.symlink(target, root / "images" / name)
    return root


def _tiny_jpeg() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray((np.arange(32 * 38) % 251).astype(np.uint8).reshape(32, 38)).save(buf, format="JPEG")
    return buf.getvalue()


def make_shard_root(root: Path, num_samples: int, samples_per_shard: int) -> Path:
    """``root/train/shard-*.tar`` through ingest.shards (tiny JPEGs, views cycling PA, AP, LAT) + manifest.json.
    Scratch inputs: fsync is skipped while writing them (durability is not what is measured)."""
    import struct
    from ingest.schema import CHEXPERT_LABELS, FORMAT_VERSION, MANIFEST_NAME, SHARD_PATTERN, SPLITS
    from ingest.shards import encode_sample, write_encoded_shard
    jpg, views = _tiny_jpeg(), ("PA", "AP", "LAT")
    lbl = struct.pack(f"<{len(CHEXPERT_LABELS)}f", *([0.0] * len(CHEXPERT_LABELS)))
    shards = []
    with mock.patch.object(os, "fsync", lambda fd: None):
        for start in range(0, num_samples, samples_per_shard):
            batch = [encode_sample({"__key__": f"scale-p{i:07d}-s1-v1", "jpg": jpg, "lbl": lbl,
                                    "pid": struct.pack("<q", i),
                                    "json": json.dumps({"view": views[i % 3], "patient_id": f"p{i}"}).encode()})
                     for i in range(start, min(num_samples, start + samples_per_shard))]
            w = write_encoded_shard(root / "train" / SHARD_PATTERN.format(index=len(shards)), batch)
            shards.append({"name": w.name, "num_samples": w.num_samples, "sha256": w.sha256, "num_bytes": w.num_bytes})
    splits = {s: {"num_samples": 0, "shards": []} for s in SPLITS}
    splits["train"] = {"num_samples": num_samples, "shards": shards}
    manifest = {"format_version": FORMAT_VERSION, "datasets": ["scale"], "label_names": list(CHEXPERT_LABELS),
                "num_patients": num_samples, "splits": splits, "rejects": []}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


def make_feature_root(root: Path, n: int) -> Path:
    """A manifest announcing ``n`` train images over one (empty) shard: extract_features checks the count only."""
    from ingest.schema import CHEXPERT_LABELS, FORMAT_VERSION, MANIFEST_NAME, SPLITS
    (root / "train").mkdir(parents=True, exist_ok=True)
    for name in ("shard-000000.tar", "shard-000000.idx"):
        (root / "train" / name).write_bytes(b"")
    splits = {s: {"num_samples": 0, "shards": []} for s in SPLITS}
    splits["train"] = {"num_samples": n, "shards": [{"name": "shard-000000.tar", "num_samples": n,
                                                     "sha256": "0" * 64, "num_bytes": 0}]}
    (root / MANIFEST_NAME).write_text(json.dumps({"format_version": FORMAT_VERSION, "datasets": ["scale"],
                                                  "label_names": list(CHEXPERT_LABELS), "num_patients": n,
                                                  "splits": splits, "rejects": []}))
    return root


# ---- measurements (each in its own process) -------------------------------------------------------------
def measure_ingest(p: dict) -> dict:
    """`ingest build-shards` (build.run itself) with only the pixel stage replaced: each planned record still
    becomes its worker task (build.sample_task), and each split one segment per SHARD_SAMPLES records, so
    build.finish writes the manifest, patient table, rejects and filtered lists of a full-size run."""
    import importlib
    from ingest import build
    from ingest.schema import SHARD_PATTERN
    from ingest.sources import SOURCES
    from ingest.state import Segment
    importlib.import_module(SOURCES[p["source"]])  # imported before timing: the largest size runs only once
    base = _rss_mib()
    times: dict[str, list[float]] = {}
    rss: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            times.setdefault(name, []).append(time.perf_counter() - t0)
            rss.setdefault(name, _rss_mib())  # peak so far, after this stage's first run
            return out
        return wrapper

    def encode_without_pixels(o, plan, todo, privacy):
        for seq, (split, _, rec) in enumerate(todo):
            build.sample_task(seq, rec, split, plan, privacy)
        return iter(())

    def write_without_pixels(o, plan, writers, todo, results, total, ends=None):
        for split, w in writers.items():
            total = len(plan.order[split])
            for start in range(0, total, o.shard_max_samples):
                k = min(total, start + o.shard_max_samples) - start
                shard = {"name": SHARD_PATTERN.format(index=len(w.segments)), "num_samples": k, "sha256": "0" * 64,
                         "num_bytes": k * 20_000}
                w.segments.append(Segment(split, len(w.segments), start, start + k, shard, []))

    argv = ["--source", p["source"], "--root", p["root"], "--out", p["out"], "--workers", "0", "--no-progress",
            "--overwrite", "--shard-max-samples", str(SHARD_SAMPLES), "--salt-file", p["salt"],
            "--private-log", p["private_log"]]
    replaced = {"encode": encode_without_pixels, "write_results": write_without_pixels}
    with contextlib.ExitStack() as stack:
        for name, key in (("read_source", "read_source"), ("make_plan", "make_plan"),
                          ("encode", "sample tasks (no pixels)"), ("write_results", "segments (no pixels)"),
                          ("write_outputs", "write_outputs (manifest, patients, rejects)"),
                          ("finish", "finish (incl. write_outputs)")):
            stack.enter_context(mock.patch.object(build, name, timed(key, replaced.get(name, getattr(build, name)))))
        for _ in range(p["repeats"]):
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                rc = build.main(argv)
            if rc != 0:
                raise RuntimeError(f"build-shards without pixels exited {rc} on {p['root']}")
            times.setdefault("build-shards without pixels", []).append(time.perf_counter() - t0)
    times[PLAN_STAGE] = [a + b for a, b in zip(times["read_source"], times["make_plan"])]
    rss[PLAN_STAGE] = rss["make_plan"]
    manifest = json.loads((Path(p["out"]) / "manifest.json").read_text())
    return {"times": times, "rss_mib": rss, "rss_base_mib": base, "peak_rss_mib": _rss_mib(),
            "check": manifest["counts"]}


def measure_views(p: dict) -> dict:
    """select_views(frontal) over a split: derive every shard's filtered index, then again from the cache."""
    from dali_pipes.view_index import select_views
    from ingest.schema import FRONTAL_VIEWS, VIEWS_CACHE_DIR, load_manifest
    base = _rss_mib()
    root = Path(p["root"])
    times: dict[str, list[float]] = {"derive filtered indexes": [], "read from the cache": []}
    for _ in range(p["repeats"]):
        shutil.rmtree(root / VIEWS_CACHE_DIR, ignore_errors=True)
        t0 = time.perf_counter()
        sel = select_views(load_manifest(root), "train", FRONTAL_VIEWS)
        times["derive filtered indexes"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cached = select_views(load_manifest(root), "train", FRONTAL_VIEWS)
        times["read from the cache"].append(time.perf_counter() - t0)
    if not sel.num_selected == cached.num_selected == p["n"] - p["n"] // 3:
        raise RuntimeError(f"{root}: {sel.num_selected} frontal samples selected, expected {p['n'] - p['n'] // 3}")
    return {"times": times, "rss_mib": {}, "rss_base_mib": base, "peak_rss_mib": _rss_mib(),
            "check": {"selected": sel.num_selected}}


def measure_reader(p: dict) -> dict:
    """build_pretrain_loader on the CPU (device_id None) until the first batch: manifest and index checks, then
    the DALI webdataset pipeline's build and first run."""
    import torch
    from nvidia.dali import fn, pipeline_def, types  # noqa: F401  (imported before timing, as in a trainer)
    from dali_pipes import build_pretrain_loader
    base = _rss_mib()
    times: dict[str, list[float]] = {"loader init (manifest, indexes)": [], "pipeline build + first batch": [],
                                     "until the first batch": []}
    for _ in range(p["repeats"]):
        t0 = time.perf_counter()
        loader = build_pretrain_loader(p["root"], "train", batch_size=2, device="cpu", views="all", image_size=32,
                                       num_threads=1, device_id=None, shuffle_buffer=p["shuffle_buffer"],
                                       build_ahead=False, dtype=torch.float32)
        t1 = time.perf_counter()
        batch = next(iter(loader))
        t2 = time.perf_counter()
        loader.close()
        if tuple(batch["view1"].shape[:2]) != (2, 1):
            raise RuntimeError(f"unexpected first batch {tuple(batch['view1'].shape)}")
        times["loader init (manifest, indexes)"].append(t1 - t0)
        times["pipeline build + first batch"].append(t2 - t1)
        times["until the first batch"].append(t2 - t0)
    return {"times": times, "rss_mib": {}, "rss_base_mib": base, "peak_rss_mib": _rss_mib(),
            "check": {"shards": p["n"]}}


def measure_features(p: dict) -> dict:
    """eval.features.extract_features with a stand-in encoder and loader (random FEATURE_DIM features per
    batch): the memory its accumulation and concatenation take for ``n`` images."""
    import types
    import torch
    from eval.features import extract_features
    base = _rss_mib()
    n, batch_size = p["n"], 256

    def loader(shard_root, split, *, batch_size, **_):
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            yield {"images": torch.zeros(batch_size, 1, 8, 8), "labels": torch.zeros(batch_size, 14),
                   "pids": torch.arange(start, start + batch_size),
                   "valid": torch.arange(batch_size) < b}

    class RandomEncoder(torch.nn.Module):
        def forward(self, x):
            return torch.randn(len(x), FEATURE_DIM)

    spec = types.SimpleNamespace(name="scale", in_channels=1)
    t0 = time.perf_counter()
    fs = extract_features(spec, p["root"], "train", model=RandomEncoder(), loader_factory=loader,
                          batch_size=batch_size, log=lambda *_: None)
    seconds = time.perf_counter() - t0
    peak = _rss_mib()
    matrix_mib = fs.features.nbytes / 2**20
    return {"times": {"extract_features (stand-in encoder)": [seconds]}, "rss_mib": {}, "rss_base_mib": base,
            "peak_rss_mib": peak, "check": {"features": list(fs.features.shape), "dtype": str(fs.features.dtype),
                                            "matrix_mib": matrix_mib,
                                            "matrix_copies_at_peak": (peak - base) / matrix_mib}}


def measure_knn(p: dict) -> dict:
    """eval.knn on random float32 features: topk_cosine (one bank) and knn_protocol (5 tasks, bootstrap CIs)."""
    from eval.features import FeatureSet
    from eval.knn import knn_protocol, topk_cosine
    from eval.labels import LabelPolicy  # the CLI default: blank = negative, uncertain ignored
    from ingest.schema import CHEXPERT_COMPETITION_TASKS, CHEXPERT_LABELS
    base = _rss_mib()
    rng = np.random.default_rng(0)
    n, q = p["n"], p["queries"]
    names = list(CHEXPERT_LABELS)

    def feature_set(rows):
        labels = rng.choice(np.array([0.0, 1.0, np.nan], dtype=np.float32), size=(rows, len(names)))
        return FeatureSet(rng.standard_normal((rows, FEATURE_DIM), dtype=np.float32), labels,
                          np.arange(rows, dtype=np.int64) // 2, names)
    train, test = feature_set(n), feature_set(q)
    after_data = _rss_mib()
    times: dict[str, list[float]] = {f"topk_cosine ({q} queries, k=20)": [],
                                     f"knn_protocol (5 tasks, {q} queries)": []}
    for _ in range(p["repeats"]):
        t0 = time.perf_counter()
        topk_cosine(test.features, train.features, 20)
        times[f"topk_cosine ({q} queries, k=20)"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        knn_protocol(train, None, test, list(CHEXPERT_COMPETITION_TASKS), policy=LabelPolicy(), num_replicates=100)
        times[f"knn_protocol (5 tasks, {q} queries)"].append(time.perf_counter() - t0)
    peak = _rss_mib()
    return {"times": times, "rss_mib": {}, "rss_base_mib": base, "peak_rss_mib": peak,
            "check": {"bank_mib": train.features.nbytes / 2**20, "rss_over_data_mib": peak - after_data}}


MEASURES = {"ingest": measure_ingest, "views": measure_views, "reader": measure_reader,
            "features": measure_features, "knn": measure_knn}


def child_main() -> None:
    """Entry of the fresh process: ``python -c ... <params.json> <result.json>``."""
    params = json.loads(Path(sys.argv[1]).read_text())
    result = MEASURES[params["measure"]](params)
    Path(sys.argv[2]).write_text(json.dumps(result))


def run_case(params: dict, work: Path, in_process: bool, timeout_s: float) -> dict:
    if in_process:  # the test's smoke mode: RSS is then this process's running peak, not the case's own
        return MEASURES[params["measure"]](params)
    pfile, rfile = work / "params.json", work / "result.json"
    pfile.write_text(json.dumps(params))
    rfile.unlink(missing_ok=True)
    code = "import bench.scale_bench as s; s.child_main()"
    proc = subprocess.run([sys.executable, "-c", code, str(pfile), str(rfile)], capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                                                                    "2")})
    if proc.returncode != 0 or not rfile.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"{params['measure']} at {params['n']:,}: exit {proc.returncode}: "
                           f"{tail[-1] if tail else 'no output'}")
    return json.loads(rfile.read_text())


# ---- fits, goals, outputs ------------------------------------------------------------------------------------
def fit_exponent(sizes, values) -> float | None:
    """Slope of log(value) on log(size), least squares; None with fewer than two sizes."""
    pts = [(math.log(s), math.log(v)) for s, v in zip(sizes, values) if s > 0 and v and v > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def fits(rows: list[dict]) -> list[dict]:
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault((r["family"], r["stage"]), []).append((r["n"], r["median_s"]))
    out = []
    for (family, stage), pts in series.items():
        pts.sort()
        e = fit_exponent([n for n, _ in pts], [v for _, v in pts])
        if e is not None:
            out.append({"family": family, "stage": stage, "sizes": [n for n, _ in pts], "time_exponent": e})
    mem: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r.get("case_peak"):
            mem.setdefault(r["family"], []).append((r["n"], r["peak_rss_mib"] - r["rss_base_mib"]))
    for family, pts in mem.items():
        e = fit_exponent([n for n, _ in pts], [v for _, v in pts])
        if e is not None:
            out.append({"family": family, "stage": "peak RSS above the imports", "sizes": [n for n, _ in pts],
                        "memory_exponent": e})
    return out


def goals(rows: list[dict], fitted: list[dict]) -> list[dict]:
    out = [{"goal": f"{f['family']}: {f['stage']} time exponent <= {EXPONENT_LIMIT}", "value": f["time_exponent"],
            "ok": f["time_exponent"] <= EXPONENT_LIMIT} for f in fitted if "time_exponent" in f]
    for r in rows:
        if r["stage"] == PLAN_STAGE and r["n"] == MIMIC_IMAGES:
            out.append({"goal": f"{r['family']}: 377k plan < {PLAN_LIMIT_S:.0f} s", "value": r["median_s"],
                        "ok": r["median_s"] < PLAN_LIMIT_S})
            out.append({"goal": f"{r['family']}: 377k plan peak RSS < {PLAN_LIMIT_MIB:.0f} MiB",
                        "value": r["peak_rss_mib"], "ok": r["peak_rss_mib"] < PLAN_LIMIT_MIB})
    return out


def plot(rows: list[dict], fitted: list[dict], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    families = list(dict.fromkeys(r["family"] for r in rows))
    panels = families + ["peak RSS"]
    cols = 3
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(15, 4.2 * -(-len(panels) // cols)),
                             squeeze=False)
    exps = {(f["family"], f["stage"]): f["time_exponent"] for f in fitted if "time_exponent" in f}
    for ax, family in zip(axes.flat, families):
        stages = list(dict.fromkeys(r["stage"] for r in rows if r["family"] == family))
        for stage in stages:
            pts = sorted((r["n"], r["median_s"]) for r in rows if r["family"] == family and r["stage"] == stage)
            e = exps.get((family, stage))
            ax.plot(*zip(*pts), marker="o", label=f"{stage}" + (f"  (n^{e:.2f})" if e is not None else ""))
        ax.set_title(family, fontsize=10)
        ax.set_xlabel("shards" if family == "reader" else "images / records")
        ax.set_ylabel("seconds (median)")
    ax = axes.flat[len(families)]
    for family in families:
        pts = sorted({(r["n"], r["peak_rss_mib"]) for r in rows if r["family"] == family and r.get("case_peak")})
        if pts:
            ax.plot(*zip(*pts), marker="s", label=family)
    ax.set_title("peak RSS per case (fresh process)", fontsize=10)
    ax.set_xlabel("size")
    ax.set_ylabel("MiB")
    for ax in axes.flat[:len(panels)]:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown(doc: dict, plot_name: str) -> str:
    from bench.report import markdown_table
    env = doc["env"]
    lines = [f"# Cost against size ({env.get('cpu')}, {env.get('cpu_cores_available')} cores)", "",
             f"`{doc['command']}` on {env.get('date')}, commit {env.get('git_commit')}.", "",
             "## Goals", "", markdown_table(doc["goals"], ["goal", "value", "ok"]), "",
             "## Fitted exponents (least squares on log-log)", "",
             markdown_table(doc["fits"], ["family", "stage", "sizes", "time_exponent", "memory_exponent"]), "",
             f"![cost against size]({plot_name})", "", "## Rows", "", markdown_table(doc["rows"]), ""]
    lines += [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


# ---- the run -------------------------------------------------------------------------------------------------
def _film() -> Path | None:
    films = sorted((SHARED_DATA / "pneumonia-mini" / "Normal").glob("*.jpeg")) if SHARED_DATA.is_dir() else []
    return films[0] if films else None


def case_params(family: str, n: int, work: Path, repeats: int, quick: bool) -> dict:
    """Make the inputs of one case under ``work`` and return what its measuring process needs."""
    case = work / f"{family}-{n}"
    if family.startswith("ingest-"):
        source = family.split("-", 1)[1]
        root = (make_chexpert_root(case / "root", n) if source == "chexpert"
                else make_nih_root(case / "root", n, _film()))
        return {"measure": "ingest", "source": source, "root": str(root), "out": str(case / "out"), "n": n,
                "salt": str(case / "salt"), "private_log": str(case / "private.tsv"), "repeats": repeats}
    if family == "views":
        per_shard = max(1, n // 4) if quick else SHARD_SAMPLES
        return {"measure": "views", "root": str(make_shard_root(case / "shards", n, per_shard)), "n": n,
                "repeats": repeats}
    if family == "reader":
        return {"measure": "reader", "root": str(make_shard_root(case / "shards", n, 1)), "n": n,
                "repeats": repeats, "shuffle_buffer": 64}
    if family == "features":
        return {"measure": "features", "root": str(make_feature_root(case / "shards", n)), "n": n}
    return {"measure": "knn", "n": n, "queries": 100 if quick else KNN_QUERIES, "repeats": repeats}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes only (a smoke run in seconds)")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per case (the largest size runs once)")
    p.add_argument("--out", help="results folder (default bench/results/<machine>/): scale.json, scale.md, scale.png")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process (tests): peak RSS is then not per case")
    p.add_argument("--case-timeout-s", type=float, default=1800.0)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    families = [f.strip() for f in a.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or a.repeats < 1:
        print(f"bench scale: unknown families {unknown} (choose from {', '.join(FAMILIES)})" if unknown
              else f"bench scale: --repeats {a.repeats}: must be >= 1", file=sys.stderr)
        return 2
    sizes = QUICK_SIZES if a.quick else FULL_SIZES
    report = BenchReport("scale", list(argv or []))
    if any(f.startswith("ingest-") for f in families) and not (CHEXPERT_CSV.is_file() and NIH_CSV.is_file()
                                                             and _film() is not None):
        report.notes.append(f"ingest families skipped: the real metadata CSVs / films are not under {SHARED_DATA}")
        families = [f for f in families if not f.startswith("ingest-")]
    report.notes.append(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        for family in families:
            for n in sizes[family]:
                repeats = 1 if (n == max(sizes[family]) and not a.quick) else a.repeats
                t0 = time.perf_counter()
                params = case_params(family, n, work, repeats, a.quick)
                prep_s = time.perf_counter() - t0
                res = run_case(params, work, a.in_process, a.case_timeout_s)
                for i, (stage, secs) in enumerate(res["times"].items()):
                    report.add(family=family, n=n, stage=stage, median_s=statistics.median(secs), repeats=len(secs),
                               peak_rss_mib=res["rss_mib"].get(stage, res["peak_rss_mib"]),
                               rss_base_mib=res["rss_base_mib"], case_peak=i == 0, check=res["check"])
                print(f"  {family} n={n:,}: inputs {prep_s:.1f} s, " + ", ".join(
                    f"{k} {statistics.median(v):.3g} s" for k, v in res["times"].items())
                    + f", peak RSS {res['peak_rss_mib']:.0f} MiB", file=sys.stderr)
                shutil.rmtree(work / f"{family}-{n}", ignore_errors=True)
    fitted = fits(report.rows)
    judged = goals(report.rows, fitted)
    report.notes.append(f"load average after: {os.getloadavg()[0]:.2f}; {time.perf_counter() - t_all:.0f} s in all")
    report.notes.append("reader: one sample per shard, shuffle_buffer 64, batch 2, 32 px, CPU, 1 DALI thread; "
                        f"knn: {KNN_QUERIES if not a.quick else 100} queries, {FEATURE_DIM}-d float32 features")
    if a.in_process:
        report.notes.append("--in-process: peak RSS is the running peak of one process, not per case")
    columns = ["family", "n", "stage", "median_s", "repeats", "peak_rss_mib"]
    out_dir = None if a.no_save else (Path(a.out) if a.out else default_out_dir(report.env))
    doc = {**report.as_dict(), "fits": fitted, "goals": judged}
    print(report.table(columns))
    print("\nfitted exponents (log-log least squares):")
    for f in fitted:
        kind, e = ("time", f["time_exponent"]) if "time_exponent" in f else ("memory", f["memory_exponent"])
        print(f"  {f['family']:<16} {f['stage']:<45} {kind} n^{e:.2f}  over {f['sizes']}")
    print("\ngoals:")
    for g in judged:
        print(f"  {'PASS' if g['ok'] else 'FAIL'}  {g['goal']}: {g['value']:.3g}")
    for n in report.notes:
        print(f"note: {n}")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        png = plot(report.rows, fitted, out_dir / "scale.png",
                   f"cost against size: {report.env.get('cpu')}, {report.env.get('cpu_cores_available')} cores")
        for path, text in ((out_dir / "scale.json", json.dumps(doc, indent=2, default=str) + "\n"),
                           (out_dir / "scale.md", markdown(doc, png.name))):
            tmp_path = path.with_name(path.name + ".tmp")
            tmp_path.write_text(text)
            os.replace(tmp_path, path)
        print(f"wrote {out_dir / 'scale.json'}, scale.md, scale.png", file=sys.stderr)
    return 0
