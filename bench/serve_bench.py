"""`python -m bench serve`: `python -m serve` under concurrent uploads on 127.0.0.1. 16 clients x 10 uploads of mixed
8-bit JPEG, 16-bit PNG and DICOM films (real ones from ../shared/data/formats when present); p50 / p95 latency per
kind, errors, the server's peak RSS and its RSS before and after the load (sampled from /proc)."""
from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from bench.harness import BenchReport, default_out_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CXR_SHARED_DATA", ROOT.parent / "shared" / "data"))
GOAL_PEAK_RSS_MB = 2048
FILM_16BIT_PX = (2500, 3000)  # (w, h): a typical 16-bit CR / DX film


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(f"`{' '.join(cmd[:2])}` failed: {tail[-1] if tail else done.returncode}")


def make_bundle(root: Path) -> Path:
    """A tiny bundle (seeded random ResNet-18 on `ingest synth` phantoms, 64 px): serving costs, not accuracy."""
    _run(["ingest", "synth", "--out", str(root / "raw"), "--n", "120", "--size", "96", "--seed", "0",
          "--valid-frac", "0.2", "--workers", "1"])
    _run(["ingest", "build-shards", "--source", "chexpert", "--root", str(root / "raw" / "CheXpert-v1.0-small"),
          "--out", str(root / "shards"), "--size", "72", "--val-frac", "0.2", "--no-progress"])
    _run(["eval", "linear", "--shards", str(root / "shards"), "--out", str(root / "eval"), "--init", "random",
          "--tasks", "chexpert5", "--arch", "resnet18", "--image-size", "64", "--resize-size", "72",
          "--batch-size", "16", "--bootstrap", "100"])
    _run(["eval", "export", "--out", str(root / "eval"), "--encoder", "random-resnet18", "--protocol", "linear",
          "--bundle", str(root / "bundle")])
    return root / "bundle"


def _base_gray(rng: np.random.Generator) -> np.ndarray:
    real = SHARED_DATA / "formats" / "nih_00000001_000.png"
    if real.is_file():
        return np.asarray(Image.open(real).convert("L"))
    low = rng.normal(0, 1, (40, 50)).astype(np.float32)
    img = np.asarray(Image.fromarray(low, mode="F").resize((512, 512), Image.BICUBIC))
    return np.clip((img - img.min()) / (np.ptp(img) + 1e-6) * 255, 0, 255).astype(np.uint8)


def _film_16bit(rng: np.random.Generator) -> np.ndarray:
    """A real CXR scaled to a 2500 x 3000 film of 12 significant bits plus sensor noise (real entropy)."""
    img = np.asarray(Image.fromarray(_base_gray(rng)).resize(FILM_16BIT_PX, Image.BICUBIC)).astype(np.float32)
    return np.clip(img * 16 + rng.normal(0, 12, img.shape), 0, 4095).astype(np.uint16)


def _dicom_12bit(img: np.ndarray) -> bytes:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["bench-serve"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.StudyInstanceUID = "DX", "bench", "1.2.3.4"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = *img.shape, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = img.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_uploads(seed: int = 0) -> tuple[list[tuple[str, str, bytes]], str]:
    """[(kind, name, bytes)] over three kinds: 8-bit JPEG, 16-bit PNG, DICOM; and where they came from."""
    rng = np.random.default_rng(seed)
    formats = SHARED_DATA / "formats"
    jpegs = sorted(formats.glob("*.jpg")) if formats.is_dir() else []
    dicoms = sorted(formats.glob("*.dcm")) if formats.is_dir() else []
    out = [("jpeg8", p.name, p.read_bytes()) for p in jpegs]
    if not jpegs:
        buf = io.BytesIO()
        Image.fromarray(_base_gray(rng)).save(buf, format="JPEG", quality=90)
        out.append(("jpeg8", "generated.jpg", buf.getvalue()))
    film = _film_16bit(rng)
    buf = io.BytesIO()
    Image.fromarray(film).save(buf, format="PNG")
    out.append(("png16", "film_2500x3000_16bit.png", buf.getvalue()))
    out += [("dicom", p.name, p.read_bytes()) for p in dicoms]
    out.append(("dicom", "film_2500x3000_12bit.dcm", _dicom_12bit(film)))
    where = (f"8-bit JPEGs and DICOMs from {formats}; " if jpegs or dicoms else "generated JPEG; ") + \
        "16-bit PNG and 12-bit DICOM generated (2500 x 3000, a real CXR scaled plus noise)"
    return out, where


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (less noisy than latency on a shared machine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler:
    """The server's RSS every ``interval_s`` in a thread: the maximum seen, with the kernel's VmHWM as a check."""

    def __init__(self, pid: int, interval_s: float = 0.05):
        self.pid, self.interval_s, self.max_mb = pid, interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.max_mb = max(self.max_mb, _rss_mb(self.pid) or 0.0)
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=2)


def start_server(bundle: Path, extra: list[str], timeout_s: float = 180):
    """`python -m serve` on a free 127.0.0.1 port; (process, base URL) once /api/health answers."""
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--bundle", str(bundle), "--port", str(port), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited {proc.returncode}: {proc.stdout.read().strip()[-500:]}")
        try:
            if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"serve did not answer /api/health within {timeout_s:g} s")
        time.sleep(0.3)


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_load(url: str, uploads: list[tuple[str, str, bytes]], clients: int, per_client: int) -> list[dict]:
    """``clients`` threads, each posting ``per_client`` uploads in turn (kinds interleaved); one record each."""
    import httpx
    http = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=clients))

    kinds = sorted({k for k, _, _ in uploads})
    by_kind = {k: [u for u in uploads if u[0] == k] for k in kinds}

    def client(c: int) -> list[dict]:
        out = []
        for i in range(per_client):
            j = c * per_client + i  # kinds in turn, so each is a third of the load whatever the file counts
            kind, name, data = by_kind[kinds[j % len(kinds)]][(j // len(kinds)) % len(by_kind[kinds[j % len(kinds)]])]
            t0 = time.perf_counter()
            try:
                r = http.post(url + "/api/predict", files={"file": (name, data, "application/octet-stream")})
                status = r.status_code
                ok = status == 200 and len(r.json().get("findings", [])) > 0
            except httpx.HTTPError as e:
                status, ok = type(e).__name__, False
            out.append({"kind": kind, "name": name, "status": status, "ok": ok,
                        "latency_s": time.perf_counter() - t0})
        return out
    try:
        with ThreadPoolExecutor(clients) as pool:
            return [r for rs in pool.map(client, range(clients)) for r in rs]
    finally:
        http.close()


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarise(report: BenchReport, records: list[dict], wall_s: float, rss: dict) -> dict:
    """One row per upload kind and one for all: requests, errors, p50 / p95 / max latency; RSS on the 'all' row."""
    kinds = sorted({r["kind"] for r in records})
    for kind in [*kinds, "all"]:
        rs = [r for r in records if kind in ("all", r["kind"])]
        lat_ms = [1000 * r["latency_s"] for r in rs]
        row = {"kind": kind, "requests": len(rs), "errors": sum(not r["ok"] for r in rs),
               "p50_ms": _pct(lat_ms, 50), "p95_ms": _pct(lat_ms, 95), "max_ms": max(lat_ms) if lat_ms else None}
        if kind == "all":
            row.update(requests_per_s=len(rs) / wall_s if wall_s > 0 else None, **rss)
        report.add(**row)
    return report.rows[-1]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench serve", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="bundle folder (default: a tiny one made in a temp folder)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--uploads", type=int, default=10, help="uploads per client (default 10)")
    p.add_argument("--max-concurrent-decodes", type=int, default=None, metavar="N",
                   help="passed to the server (default: the server's own default)")
    p.add_argument("--settle-s", type=float, default=3.0, help="idle time before the after-load RSS is read")
    p.add_argument("--out", default=None, help="JSON file or folder (default bench/results/<machine>/serve.json)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    if args.clients < 1 or args.uploads < 1:
        print("bench serve: --clients and --uploads must be >= 1", file=sys.stderr)
        return 2
    if args.bundle is not None and not args.bundle.is_dir():
        print(f"bench serve: --bundle {args.bundle}: no such folder", file=sys.stderr)
        return 2
    report = BenchReport("serve", argv)
    extra = [] if args.max_concurrent_decodes is None else ["--max-concurrent-decodes",
                                                            str(args.max_concurrent_decodes)]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        bundle = args.bundle
        if bundle is None:
            t0 = time.perf_counter()
            bundle = make_bundle(Path(tmp))
            report.notes.append(f"tiny bundle made in {time.perf_counter() - t0:.0f} s (random ResNet-18, 64 px)")
        uploads, where = make_uploads()
        report.notes.append(f"uploads: {where}; sizes " +
                            ", ".join(f"{n} {len(d) / 1024:.0f} KB" for _, n, d in uploads))
        proc, url = start_server(bundle, extra)
        try:
            run_load(url, uploads[:1], 1, 1)  # warm-up: lazy imports and first allocations are not the load
            time.sleep(0.5)
            rss_start, cpu0 = _rss_mb(proc.pid), _cpu_s(proc.pid)
            with RssSampler(proc.pid) as sampler:
                t0 = time.perf_counter()
                records = run_load(url, uploads, args.clients, args.uploads)
                wall_s = time.perf_counter() - t0
            cpu_per_request_s = (_cpu_s(proc.pid) - cpu0) / len(records)
            time.sleep(args.settle_s)
            rss = {"rss_start_mb": rss_start, "peak_rss_mb": max(sampler.max_mb, _rss_mb(proc.pid, "VmHWM") or 0.0),
                   "rss_after_mb": _rss_mb(proc.pid), "server_cpu_s_per_request": cpu_per_request_s}
        finally:
            stop_server(proc)
    row = summarise(report, records, wall_s, rss)
    statuses = sorted({str(r["status"]) for r in records if not r["ok"]})
    report.notes.append(f"{args.clients} clients x {args.uploads} uploads on {os.cpu_count()} CPUs (load average "
                        f"{os.getloadavg()[0]:.1f} after), server "
                        f"{' '.join(extra) or 'defaults'}; wall {wall_s:.1f} s" +
                        (f"; error statuses {', '.join(statuses)}" if statuses else ""))
    goal = (row["errors"] == 0 and row["peak_rss_mb"] < GOAL_PEAK_RSS_MB)
    report.notes.append(f"goal: 0 errors and peak RSS < {GOAL_PEAK_RSS_MB} MB: {'met' if goal else 'NOT met'}; "
                        f"RSS after the load {row['rss_after_mb']:.0f} MB vs {row['rss_start_mb']:.0f} MB before")
    out = None if args.no_save else (args.out or default_out_dir(report.env))
    report.finish(out, columns=["kind", "requests", "errors", "p50_ms", "p95_ms", "max_ms", "requests_per_s",
                                "server_cpu_s_per_request", "rss_start_mb", "peak_rss_mb", "rss_after_mb"])
    return 0 if goal else 1
