"""`python -m bench ingest`: ingest throughput. Per-core decode -> resize -> encode rate and `build-shards`
end to end with 1, 2, ... workers (scaling), on CheXpert-small-like JPEGs (~320x390 gray), 1024x1024 PNGs,
big JPEGs with and without the draft (DCT-scaled) fast path, and 2048x2500 12-bit DICOM radiographs per
transfer syntax (uncompressed, JPEG-LS lossless, JPEG 2000 lossless). Inputs are generated in a temp folder."""
from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.harness import BenchReport, default_out_dir, time_fn
from ingest.errors import one_line

SHARED_DATA = Path(os.environ.get("CXR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _base_images(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Real CXRs from ../shared/data/pneumonia-mini when present, else smooth synthetic fields (gray, uint8)."""
    real = sorted((SHARED_DATA / "pneumonia-mini" / "Normal").glob("*.jpeg"))[:n] if SHARED_DATA.is_dir() else []
    if real:
        return [np.asarray(Image.open(p).convert("L")) for p in real]
    out = []
    for _ in range(n):
        low = rng.normal(0, 1, (40, 50)).astype(np.float32)
        img = np.asarray(Image.fromarray(low, mode="F").resize((400, 300), Image.BICUBIC))
        out.append(np.clip((img - img.min()) / (np.ptp(img) + 1e-6) * 255, 0, 255).astype(np.uint8))
    return out


def make_inputs(folder: Path, kind: str, count: int, seed: int = 0) -> Path:
    """``folder/cls/NNNNN.ext`` images of one kind: 'jpeg320' (320x390 q90), 'png1024', 'jpeg2k' (2048x2500)."""
    rng = np.random.default_rng(seed)
    bases = _base_images(min(count, 64), rng)
    (folder / "cls").mkdir(parents=True, exist_ok=True)
    size, fmt, ext = {"jpeg320": ((320, 390), "JPEG", "jpg"), "png1024": ((1024, 1024), "PNG", "png"),
                      "jpeg2k": ((2048, 2500), "JPEG", "jpg")}[kind]
    variants = []
    for b in bases:
        img = np.asarray(Image.fromarray(b).resize(size, Image.BICUBIC)).astype(np.int16)
        img = np.clip(img + rng.normal(0, 2.0, img.shape), 0, 255).astype(np.uint8)  # sensor noise: real entropy
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 6}))
        variants.append(buf.getvalue())
    for i in range(count):
        (folder / "cls" / f"{i:05d}.{ext}").write_bytes(variants[i % len(variants)])
    return folder


def bench_process(report: BenchReport, root: Path, label: str, repeats: int, draft: bool = True) -> None:
    from ingest.preprocess import process_bytes
    datas = [p.read_bytes() for p in sorted((root / "cls").iterdir())]
    t = time_fn(lambda: [process_bytes(d, "image", 256, 95, draft=draft) for d in datas], warmup=1, repeats=repeats,
                sync=False)
    report.add(input=label, stage="decode+resize+encode, 1 process" + ("" if draft else ", no draft"),
               workers=1, images=len(datas), median_s=t.median_s,
               images_per_s=len(datas) / t.median_s, images_per_s_per_worker=len(datas) / t.median_s, scaling=None)


def _process_path(path: str) -> int:
    from ingest.preprocess import process_file
    return len(process_file(path, "image", 256, 95).jpeg)


def bench_pool(report: BenchReport, root: Path, label: str, workers_list: list[int], repeats: int) -> None:
    """Decode -> resize -> encode from files in a process pool (no shard writing): the workers' own scaling."""
    import multiprocessing as mp
    paths = [str(p) for p in sorted((root / "cls").iterdir())]
    base = None
    for w in workers_list:
        with mp.get_context("fork").Pool(w) as pool:
            t = time_fn(lambda: sum(pool.imap(_process_path, paths, chunksize=16)), warmup=1, repeats=repeats,
                        sync=False)
        ips = len(paths) / t.median_s
        base = base or ips
        report.add(input=label, stage="decode+resize+encode, process pool", workers=w, images=len(paths),
                   median_s=t.median_s, images_per_s=ips, images_per_s_per_worker=ips / w, scaling=ips / base)


def bench_build(report: BenchReport, root: Path, label: str, workers_list: list[int], repeats: int, tmp: Path) -> None:
    from ingest import build
    n = sum(1 for _ in (root / "cls").iterdir())
    base = None
    for w in workers_list:
        out = tmp / f"out-{label}-{w}"

        def once():
            shutil.rmtree(out, ignore_errors=True)
            assert build.main(["--source", "folder", "--root", str(root), "--out", str(out), "--workers", str(w),
                               "--no-progress", "--size", "256", "--quality", "95"]) == 0
        import contextlib
        with contextlib.redirect_stdout(io.StringIO()):
            t = time_fn(once, warmup=1, repeats=repeats, sync=False)
        ips = n / t.median_s
        base = base or ips
        report.add(input=label, stage="build-shards end to end", workers=w, images=n, median_s=t.median_s,
                   images_per_s=ips, images_per_s_per_worker=ips / w, scaling=ips / base)


DICOM_SYNTAXES = ("ExplicitVRLittleEndian", "JPEGLSLossless", "JPEG2000Lossless")


def make_dicom_radiographs(count: int, seed: int = 0) -> list[bytes]:
    """``count`` different 2048x2500 12-bit DX images (a real CXR scaled to 12 bits plus sensor noise), stored
    uncompressed; the compressed twins are made by bench_dicom."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    rng = np.random.default_rng(seed)
    out = []
    for i, base in enumerate(_base_images(count, rng)):
        img = np.asarray(Image.fromarray(base).resize((2048, 2500), Image.BICUBIC)).astype(np.float32) * 16
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 4095).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"bench-{seed}-{i}"])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.StudyInstanceUID = "DX", f"bench{i}", f"1.2.3.{i}"
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 2500, 2048, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.PixelData = img.tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def bench_dicom(report: BenchReport, count: int, repeats: int) -> None:
    """decode -> window -> resize -> encode of one 2048x2500 12-bit radiograph per transfer syntax, 1 process.
    Without pydicom (an optional reader: a GPU box may lack it) the DICOM rows are left out with a note."""
    try:
        import pydicom
        import pydicom.uid as U
    except ImportError as e:
        report.notes.append(f"dicom: skipped, pydicom is not importable ({e})")
        return
    from ingest.preprocess import process_bytes
    plain = make_dicom_radiographs(count)
    for name in DICOM_SYNTAXES:
        datas = []
        try:
            for d in plain:
                ds = pydicom.dcmread(io.BytesIO(d))
                if name != "ExplicitVRLittleEndian":
                    ds.compress(getattr(U, name))  # CharLS (pyjpegls) / OpenJPEG (pylibjpeg-openjpeg)
                buf = io.BytesIO()
                ds.save_as(buf)
                datas.append(buf.getvalue())
        except (RuntimeError, ImportError) as e:
            report.notes.append(f"dicom {name}: skipped, no encoder to make the input ({one_line(e)})")
            continue
        t = time_fn(lambda: [process_bytes(d, "dicom", 256, 95) for d in datas], warmup=1, repeats=repeats,
                    sync=False)
        ratio = sum(len(d) for d in plain) / sum(len(d) for d in datas)
        report.add(input=f"dicom 2048x2500 12-bit {getattr(U, name).name} (x{ratio:.2f} smaller)",
                   stage="decode+window+resize+encode, 1 process", workers=1, images=len(datas), median_s=t.median_s,
                   images_per_s=len(datas) / t.median_s, images_per_s_per_worker=len(datas) / t.median_s, scaling=None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench ingest", description=__doc__)
    p.add_argument("--jpeg-images", type=int, default=2000, help="CheXpert-small-like 320x390 JPEGs")
    p.add_argument("--png-images", type=int, default=120, help="1024x1024 PNGs")
    p.add_argument("--big-jpeg-images", type=int, default=60, help="2048x2500 JPEGs (draft fast path)")
    p.add_argument("--dicom-images", type=int, default=2, help="2048x2500 12-bit DICOMs per transfer syntax")
    p.add_argument("--workers", default="1,2", help="comma list of worker counts for build-shards")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="JSON file or folder (default: print only; 'default' = bench/results/<machine>/)")
    a = p.parse_args(argv)
    workers = [int(w) for w in a.workers.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report = BenchReport("ingest", list(argv or []))
    report.notes.append(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmpdir:
        tmp = Path(tmpdir)
        t0 = time.perf_counter()
        jpeg = make_inputs(tmp / "jpeg320", "jpeg320", a.jpeg_images)
        png = make_inputs(tmp / "png1024", "png1024", a.png_images)
        big = make_inputs(tmp / "jpeg2k", "jpeg2k", a.big_jpeg_images)
        report.notes.append(f"inputs generated in {time.perf_counter() - t0:.1f} s "
                            f"({'real pneumonia-mini CXRs' if SHARED_DATA.is_dir() else 'synthetic fields'} + noise)")
        bench_process(report, jpeg, "jpeg 320x390 gray", a.repeats)
        bench_process(report, png, "png 1024x1024 gray", a.repeats)
        bench_process(report, big, "jpeg 2048x2500 gray", a.repeats)
        bench_process(report, big, "jpeg 2048x2500 gray", a.repeats, draft=False)
        if a.dicom_images > 0:
            bench_dicom(report, a.dicom_images, a.repeats)
        bench_pool(report, jpeg, "jpeg 320x390 gray", workers, a.repeats)
        bench_build(report, jpeg, "jpeg 320x390 gray", workers, a.repeats, tmp)
        bench_build(report, png, "png 1024x1024 gray", workers, a.repeats, tmp)
    report.notes.append(f"load average after: {os.getloadavg()[0]:.2f}")
    out = default_out_dir(report.env) if a.out == "default" else a.out
    report.finish(out, columns=["input", "stage", "workers", "images", "median_s", "images_per_s",
                                "images_per_s_per_worker", "scaling"])
    return 0
