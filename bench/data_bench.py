"""`python -m bench data`: DALI two-view pretraining pipeline (gpu / cpu) vs a torchvision + webdataset DataLoader
doing the same augmentation on the same shards, side by side; samples/s, views/s and CPU cores actually used.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.harness import BenchReport, GpuSampler, default_out_dir
from dali_pipes import CXR_MEAN, CXR_STD, AugmentConfig, build_pretrain_loader
from ingest.errors import one_line
from ingest.schema import FORMAT_VERSION, MANIFEST_NAME, SHARD_PATTERN, ShardFormatError, load_manifest
from ingest.shards import iter_shard, write_shard

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def write_bench_shards(out: Path, *, num_images: int, size_px: int, samples_per_shard: int, seed: int = 0,
                       lateral_every: int = 0, drop_lateral: bool = False) -> Path:
    """CXR-like gray JPEGs (shorter side ``size_px``, portrait 1.2 aspect) written with ingest's shard writer.
    ``lateral_every=k``: every k-th image is labelled LAT; ``drop_lateral`` leaves those out (the same frontal
    images, byte for byte, as shards that ingest wrote with ``--views frontal``)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    h, w = int(size_px * 1.2), size_px
    yy, xx = np.mgrid[0:h, 0:w]
    samples = []
    for i in range(num_images):
        low = rng.normal(0, 1, (h // 16 + 1, w // 16 + 1)).astype(np.float32)
        img = np.asarray(Image.fromarray(low, mode="F").resize((w, h), Image.BILINEAR))
        lungs = ((xx - w * 0.3) ** 2 / (w * 0.18) ** 2 + (yy - h * 0.45) ** 2 / (h * 0.3) ** 2 < 1) | \
                ((xx - w * 0.7) ** 2 / (w * 0.18) ** 2 + (yy - h * 0.45) ** 2 / (h * 0.3) ** 2 < 1)
        img = np.clip(128 + 25 * img - 70 * lungs + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img, mode="L").save(buf, format="JPEG", quality=90)
        pid = i // 2
        view = "LAT" if lateral_every and i % lateral_every == lateral_every - 1 else "PA"
        if view == "LAT" and drop_lateral:
            continue
        samples.append({"__key__": f"bench-p{pid:06d}-s{i:06d}-v1", "jpg": buf.getvalue(),
                        "json": json.dumps({"patient_id": f"p{pid}", "view": view}).encode(),
                        "lbl": struct.pack("<1f", 0.0), "pid": struct.pack("<q", pid)})
    shards = []
    for k in range(0, len(samples), samples_per_shard):
        ws = write_shard(out / "train" / SHARD_PATTERN.format(index=k // samples_per_shard),
                         samples[k:k + samples_per_shard])
        shards.append({"name": ws.name, "num_samples": ws.num_samples, "sha256": ws.sha256, "num_bytes": ws.num_bytes})
    manifest = {"format_version": FORMAT_VERSION, "datasets": ["bench"], "label_names": ["x"],
                "num_patients": (num_images + 1) // 2, "rejects": [],
                "splits": {"train": {"num_samples": len(samples), "shards": shards}}}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    return out


def replicate_shards(src: Path, out: Path, *, num_samples: int, samples_per_shard: int = 256) -> Path:
    """A train split of ``num_samples`` repeating the train samples of an ingest shard folder byte for byte (each
    copy its own key and patient id, so SimCLR sees one positive pair per image): enough batches for a throughput
    run from a few phantoms that are slow to generate."""
    base = [s for shard in load_manifest(src).shards("train") for s in iter_shard(shard.path)]
    if not base:
        raise ValueError(f"{src}: no train samples to replicate")
    samples = []
    for i in range(num_samples):
        s = base[i % len(base)]
        meta = json.loads(s["json"])
        meta["patient_id"] = f"rep{i}"
        samples.append({"__key__": f"rep-p{i:07d}-s001-v1", "jpg": s["jpg"], "json": json.dumps(meta).encode(),
                        "lbl": s["lbl"], "pid": struct.pack("<q", i)})
    shards = []
    for k in range(0, len(samples), samples_per_shard):
        ws = write_shard(out / "train" / SHARD_PATTERN.format(index=k // samples_per_shard),
                         samples[k:k + samples_per_shard])
        shards.append({"name": ws.name, "num_samples": ws.num_samples, "sha256": ws.sha256, "num_bytes": ws.num_bytes})
    label_names = json.loads((src / MANIFEST_NAME).read_text()).get("label_names", [])
    manifest = {"format_version": FORMAT_VERSION, "datasets": ["replicated"], "label_names": label_names,
                "num_patients": num_samples, "rejects": [],
                "splits": {"train": {"num_samples": len(samples), "shards": shards}}}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    return out


def torchvision_views(cfg: AugmentConfig, image_size: int, channels: int):
    """The torchvision equivalent of dali_pipes.augment_view for ``cfg`` (PIL in, normalised tensor out)."""
    from torchvision import transforms as T
    ops = []
    if cfg.random_crop:
        ops.append(T.RandomResizedCrop(image_size, scale=(cfg.crop_scale_min, cfg.crop_scale_max),
                                       ratio=cfg.crop_ratio))
    else:
        ops += [T.Resize(image_size), T.CenterCrop(image_size)]
    if cfg.rotation_deg > 0:
        ops.append(T.RandomRotation(cfg.rotation_deg, interpolation=T.InterpolationMode.BILINEAR))
    if channels == 3:
        ops.append(T.Grayscale(num_output_channels=3))
    if cfg.jitter_prob > 0:
        ops.append(T.RandomApply([T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)],
                                 p=cfg.jitter_prob))
    if cfg.grayscale_prob > 0:
        ops.append(T.RandomGrayscale(cfg.grayscale_prob))
    if cfg.blur_prob > 0:
        k = max(3, int(round(cfg.blur_kernel_frac * image_size))) | 1
        ops.append(T.RandomApply([T.GaussianBlur(k, sigma=cfg.blur_sigma)], p=cfg.blur_prob))
    if cfg.hflip_prob > 0:
        ops.append(T.RandomHorizontalFlip(cfg.hflip_prob))
    ops += [T.ToTensor(), T.Normalize([CXR_MEAN] * channels, [CXR_STD] * channels)]
    return T.Compose(ops)


class _TwoViews:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, sample):
        from PIL import Image
        jpg, pid = sample
        img = Image.open(io.BytesIO(jpg)).convert("L")
        return self.transform(img), self.transform(img), struct.unpack("<q", pid)[0]


def baseline_loader(shard_root: Path, *, cfg, image_size, channels, batch_size, workers, shuffle_buffer: int):
    import webdataset as wds
    urls = [str(s.path) for s in load_manifest(shard_root).shards("train")]
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(shuffle_buffer)
          .to_tuple("jpg", "pid").map(_TwoViews(torchvision_views(cfg, image_size, channels))))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, drop_last=True,
                                       persistent_workers=False, prefetch_factor=4 if workers else None)


def _proc_cpu_s(pid: int, *, reaped_children: bool = False) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) from /proc; with ``reaped_children`` also
    those of its exited and reaped children (fields cutime / cstime). 0 for a process already gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if reaped_children else 0)
    return ticks / _CLK_TCK


def _cpu_s(worker_pids) -> float:
    """CPU seconds of this process, its live DataLoader workers and its reaped children. Workers that end inside
    the timed window (a new epoch's iterator starts new ones) move from the live sum to the reaped one; reading
    the live workers first means a worker reaped in between is counted in the reaped sum, never lost."""
    live = sum(_proc_cpu_s(p) for p in worker_pids())
    return live + _proc_cpu_s(os.getpid(), reaped_children=True)


def measure_loader(make_iter, worker_pids, *, warmup_batches: int, timed_batches: int, batch_size: int, device) -> dict:
    t0 = time.perf_counter()
    it = make_iter()
    next(it)  # DALI: pipeline build + shuffle-buffer fill (later epochs: built ahead); DataLoader: worker start
    first_batch_s = time.perf_counter() - t0
    for _ in range(warmup_batches - 1):
        next(it)
    cpu0 = _cpu_s(worker_pids)
    t0 = time.perf_counter()
    for _ in range(timed_batches):
        batch = next(it)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    cpu = _cpu_s(worker_pids) - cpu0
    del batch, it
    n = timed_batches * batch_size
    return {"samples_per_s": n / wall, "views_per_s": 2 * n / wall, "wall_s": wall, "cpu_s": cpu,
            "cpu_cores_used": cpu / wall, "samples_per_cpu_s": n / cpu if cpu > 0 else None,
            "first_batch_s": first_batch_s}


def cycle(loader):
    while True:
        yield from loader


def dali_loader(root: Path, args, *, device: str, threads: int, micle: bool, views: str = "all"):
    """The DALI loader of one row: every setting from ``args``, as the timed rows use it (a CPU test traces the
    gpu rows' pipeline through this same function). views='all': the baseline reads every image too."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    return build_pretrain_loader(root, batch_size=args.gpu_batch_size if device == "gpu" else args.batch_size,
                                 device=device, augment=AugmentConfig.preset(args.augment), micle=micle,
                                 views=views, image_size=args.image_size, channels=args.channels, dtype=dtype,
                                 num_threads=threads, seed=0, shuffle_buffer=args.shuffle_buffer)


GOAL_VIEW_INDEX_RATIO = 0.95  # a view-filtered index over mixed tars vs tars holding only those views


def view_filter_rows(report: BenchReport, tmp: Path, args, *, devices: list[str], threads: int, common: dict,
                     row_base: dict) -> None:
    """Frontal images read two ways, alternated: through a subset .idx over tars where every 4th image is LAT,
    and from tars that hold only the frontal images (what ``ingest --views frontal`` writes). Best of 2 each."""
    shape = dict(num_images=args.num_images, size_px=args.size_px, samples_per_shard=args.samples_per_shard,
                 lateral_every=4)
    kinds = {"views-index": (write_bench_shards(tmp / "mixed", **shape), "frontal"),
             "frontal-tar": (write_bench_shards(tmp / "frontal", drop_lateral=True, **shape), "all")}
    for device in devices:
        best: dict[str, dict] = {}
        for _ in range(2):
            for kind, (root, views) in kinds.items():
                loader = dali_loader(root, args, device=device, threads=threads, micle=False, views=views)
                r = measure_loader(lambda: cycle(loader), lambda: [], device=loader.torch_device,
                             batch_size=loader.batch_size, **common)
                loader.close()
                if kind not in best or r["samples_per_s"] > best[kind]["samples_per_s"]:
                    best[kind] = {**r, "batch_size": loader.batch_size}
        for kind, r in best.items():
            report.add(loader=f"dali-{device}-{kind}", workers_or_threads=threads, **row_base, **r)
        ratio = best["views-index"]["samples_per_s"] / best["frontal-tar"]["samples_per_s"]
        report.notes.append(f"dali-{device} frontal images via a view-filtered index / from frontal-only tars = "
                            f"{ratio:.2f}x samples/s (goal >= {GOAL_VIEW_INDEX_RATIO}: "
                            f"{'met' if ratio >= GOAL_VIEW_INDEX_RATIO else 'NOT met'}; best of 2 alternated runs)")


GPU_GOAL_SAMPLES_PER_S = 15_000  # target for one H100: source images/s, each giving 2 views


def run(args) -> BenchReport:
    report = BenchReport("data", list(args.argv))
    cfg = AugmentConfig.preset(args.augment)
    tmp = None
    if args.shards:
        root = Path(args.shards)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-data-")
        root = Path(tmp.name) / "shards"
        t0 = time.perf_counter()
        write_bench_shards(root, num_images=args.num_images, size_px=args.size_px,
                           samples_per_shard=args.samples_per_shard)
        report.notes.append(f"generated {args.num_images} synthetic {args.size_px}-px gray JPEG samples in "
                            f"{time.perf_counter() - t0:.2f}s (temporary shards)")
    common = dict(warmup_batches=args.warmup_batches, timed_batches=args.batches)
    devices = [d for d in args.devices.split(",") if d]
    if "gpu" in devices and not torch.cuda.is_available():
        devices.remove("gpu")
        report.notes.append("no CUDA GPU: DALI gpu rows skipped")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    row_base = dict(augment=cfg.name, image_size=args.image_size, channels=args.channels, dtype=args.dtype,
                    cores_available=cores, shuffle_buffer=args.shuffle_buffer)
    for threads in args.threads:
        for device in devices:
            for micle in (False, True) if args.micle else (False,):
                loader = dali_loader(root, args, device=device, threads=threads, micle=micle)
                batch = loader.batch_size
                with GpuSampler() as gpu:
                    r = measure_loader(lambda: cycle(loader), lambda: [], device=loader.torch_device, batch_size=batch,
                                 **common)
                loader.close()  # no pipeline built ahead may run on during the next row
                name = f"dali-{device}" + ("-micle" if micle else "")
                report.add(loader=name, workers_or_threads=threads, batch_size=batch, **row_base, **r,
                           **({"gpu": gpu.summary()} if device == "gpu" else {}))
                if device == "gpu" and not micle:
                    met = "met" if r["samples_per_s"] >= GPU_GOAL_SAMPLES_PER_S else "NOT met"
                    report.notes.append(f"dali-gpu {r['samples_per_s']:,.0f} samples/s ({2 * r['samples_per_s']:,.0f} "
                                        f"views/s): goal >= {GPU_GOAL_SAMPLES_PER_S:,} samples/s on one H100 {met}")
        base = baseline_loader(root, cfg=cfg, image_size=args.image_size, channels=args.channels,
                               batch_size=args.batch_size, workers=threads, shuffle_buffer=args.shuffle_buffer)
        holder = {}

        def make_iter():
            holder["it"] = iter(_cycle_dl(base, holder))
            return holder["it"]

        r = measure_loader(make_iter, lambda: [w.pid for w in getattr(holder.get("dl_it"), "_workers", [])],
                     device=torch.device("cpu"), batch_size=args.batch_size, **common)
        report.add(loader="torchvision+webdataset", workers_or_threads=threads, batch_size=args.batch_size,
                   **row_base, **r)
        dali_cpu = [x for x in report.rows if x["loader"] == "dali-cpu" and x["workers_or_threads"] == threads]
        if dali_cpu:
            ratio = dali_cpu[0]["samples_per_s"] / r["samples_per_s"]
            per_cpu_s = [x.get("samples_per_cpu_s") for x in (dali_cpu[0], r)]
            per_core = (f", {per_cpu_s[0] / per_cpu_s[1]:.2f}x samples per CPU-second" if all(per_cpu_s) else "")
            report.notes.append(f"{threads} thread(s) / worker(s) of {cores} core(s): "
                                f"dali-cpu / baseline = {ratio:.2f}x "
                                f"samples/s{per_core} (goal >= 1.5x with the same cores: "
                                f"{'met' if ratio >= 1.5 else 'NOT met'})")
    report.notes.append("same shards, same augmentation preset (torchvision_views mirrors augment_view), same "
                        "batch size for dali-cpu and baseline, DALI num_threads == DataLoader num_workers, one "
                        "affinity mask. samples/s counts source images; each yields 2 augmented views. "
                        "cpu_cores_used = process (+ DataLoader worker) CPU seconds / wall seconds over the "
                        "timed batches")
    if tmp is not None:
        if args.view_filter:
            view_filter_rows(report, Path(tmp.name), args, devices=devices, threads=args.threads[0], common=common,
                             row_base=row_base)
        tmp.cleanup()
    return report


def _cycle_dl(loader, holder):
    while True:
        it = iter(loader)
        holder["dl_it"] = it
        yield from it


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench data", description=__doc__)
    p.add_argument("--shards", help="existing shard folder (default: generate temporary 256-px shards)")
    p.add_argument("--num-images", type=int, default=2048)
    p.add_argument("--size-px", type=int, default=256, help="shorter side of generated shard images")
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--channels", type=int, default=1, choices=(1, 3))
    p.add_argument("--batch-size", type=int, default=64, help="per-batch samples for CPU rows and the baseline")
    p.add_argument("--gpu-batch-size", type=int, default=256, help="per-batch samples for DALI gpu rows")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--micle", action="store_true", help="also time the DALI MICLe pair pipeline")
    p.add_argument("--augment", default="simclr-cxr", choices=AugmentConfig.PRESETS)
    p.add_argument("--threads", type=int, nargs="+", default=[len(os.sched_getaffinity(0))],
                   help="DALI num_threads == DataLoader num_workers (equal cores), one row set per value")
    p.add_argument("--devices", default="gpu,cpu", help="DALI devices to run, comma separated")
    p.add_argument("--batches", type=int, default=20, help="timed batches per row")
    p.add_argument("--warmup-batches", type=int, default=3, help="untimed batches, including the first")
    p.add_argument("--shuffle-buffer", type=int, default=1024)
    p.add_argument("--no-view-filter", dest="view_filter", action="store_false",
                   help="skip the rows that compare a view-filtered index with frontal-only tars (generated shards)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (small images, few batches)")
    p.add_argument("--out", help="write JSON here (file or folder); 'default' = bench/results/<gpu-name>/")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parsed and checked arguments, ``--quick`` applied (exits 2 with usage on bad input)."""
    p = _parser()
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.quick:
        args.num_images, args.size_px, args.samples_per_shard = 96, 96, 32
        args.image_size, args.batch_size, args.batches, args.warmup_batches = 64, 8, 3, 1
        args.gpu_batch_size = 8
        args.shuffle_buffer = 32
    if args.batches < 1 or args.warmup_batches < 1:
        p.error("--batches and --warmup-batches must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        report = run(args)
    except (ShardFormatError, ValueError, RuntimeError) as e:  # bad shards / sizes: one line, no traceback
        print(f"bench data: {one_line(e)}", file=sys.stderr)
        return 2
    out = default_out_dir(report.env) if args.out == "default" else args.out
    report.finish(out, columns=["loader", "workers_or_threads", "augment", "image_size", "batch_size",
                                "samples_per_s", "views_per_s", "cpu_cores_used", "samples_per_cpu_s",
                                "first_batch_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
