"""A bundle applied to new films: bytes sniffed and decoded by ingest's own chain (DICOM LUTs, 16-bit, MONOCHROME1),
the bundle's eval view reproduced in torch, probabilities + threshold flags + saliency maps (class activation, or a
ViT's CLS attention); and
`python -m eval predict --bundle DIR --input PATH --out preds.csv` over files and folders.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.devices import DeviceError, resolve_device, torch_device
from ingest.errors import one_line
from ingest.files import atomic_write

DEFAULT_MAX_PIXELS = 40_000_000  # 8-bit pixels: a 6000 x 6000 film; a 16-bit pixel counts twice (~3000 x 3500 CR)
MAX_ASPECT = 8  # chest films are ~1 : 1.25; panoramic strips are not
JPEG_MAGIC, PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
NOT_VALIDATED = "not validated"  # the flag of a task exported without a threshold (eval.export.is_validated)


class InputError(ValueError):
    """An upload or file that cannot be predicted (``kind``: empty | too_large | unsupported | undecodable), or
    a bad command line (``kind`` usage)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def sniff(data: bytes) -> str:
    """'jpeg' | 'png' | 'dicom' from the bytes themselves (never the file name)."""
    if not data:
        raise InputError("empty", "empty file")
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(PNG_MAGIC):
        return "png"
    if len(data) > 132 and data[128:132] == b"DICM":
        return "dicom"
    raise InputError("unsupported", "not a JPEG, PNG or DICOM file (content checked, not the extension)")


def _dimensions(data: bytes, kind: str) -> tuple[int, int, int]:
    """(width, height, bytes per decoded sample) from the header alone, before any pixel is decoded (decompression
    bombs). A DICOM must also pass ingest's acceptance rule (`radiograph_verdict`: Modality and image content), as in
    a build."""
    from PIL import Image
    if kind == "dicom":
        return _dicom_dimensions(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            # 16-bit PNGs open as I;16 (or I in older Pillow): two bytes a pixel either way.
            sample_bytes = 2 if im.mode.startswith("I;16") or (im.mode == "I" and kind == "png") else \
                4 if im.mode in ("I", "F") else 1
            return int(im.width), int(im.height), sample_bytes
    except Image.DecompressionBombError:  # Pillow's own header check (twice its MAX_IMAGE_PIXELS)
        raise InputError("too_large", "image too large (over Pillow's decompression-bomb pixel limit)") from None
    except Exception as e:  # noqa: BLE001 - any header parser failure means the same thing to the user
        raise InputError("undecodable", f"unreadable {kind} header ({type(e).__name__})") from None


def _dicom_dimensions(data: bytes) -> tuple[int, int, int]:
    from ingest.dicom import DicomReject, read_header
    from ingest.dicom_filters import DicomPolicy, radiograph_verdict
    try:
        h = read_header(io.BytesIO(data))
    except DicomReject as e:
        raise InputError("undecodable", str(e)) from None
    verdict = radiograph_verdict(h, DicomPolicy())
    if verdict.status == "filtered":  # not a chest radiograph (modality, SOP class)
        raise InputError("unsupported", verdict.reason)
    if verdict.status != "ok":
        raise InputError("undecodable", verdict.reason)
    return h.columns, h.rows, max(1, -(-(h.bits_stored or 8) // 8))  # 12-bit samples decode to 2 bytes


def decode_gray(data: bytes, *, shard_size: int, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The film as ingest would have stored it: 8-bit gray (H, W), shorter side ``shard_size``, JPEG ``quality``."""
    from PIL import Image

    from ingest.preprocess import ImageReject, process_bytes
    kind = sniff(data)
    width, height, sample_bytes = _dimensions(data, kind)
    # The limit is on decoded bytes: max_pixels 8-bit pixels, half as many 16-bit ones.
    if width * height * sample_bytes > max_pixels:
        raise InputError("too_large", f"image of {width} x {height} {8 * sample_bytes}-bit pixels exceeds the "
                                      f"limit of {max_pixels / 1e6:g} megapixels at 8 bits "
                                      f"({max_pixels / sample_bytes / 1e6:g} at {8 * sample_bytes} bits)")
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT * min(width, height):
        # Resizing the shorter side of a 1 x 20000 strip to shard size would allocate gigabytes.
        raise InputError("undecodable", f"image of {width} x {height} pixels is not a radiograph's shape")
    try:
        jpeg = process_bytes(data, "dicom" if kind == "dicom" else "image", shard_size, quality).jpeg
    except ImageReject as e:
        raise InputError("undecodable", one_line(e)) from None
    with Image.open(io.BytesIO(jpeg)) as im:
        return np.asarray(im.convert("L"))


def view_tensor(gray: np.ndarray, view: dict, norm: dict, channels: int):
    """(H, W) uint8 -> (C, S, S) float32 normalised, the eval loader's view: ``center`` = shorter side ->
    resize_size then centre crop; ``full`` = the whole film resized to S x S. Bilinear with antialiasing."""
    import torch
    import torch.nn.functional as F
    x = torch.tensor(gray, dtype=torch.float32).div_(255.0)[None, None]  # (1, 1, H, W)
    s = int(view["image_size"])
    h, w = x.shape[-2:]
    if view["mode"] == "center":
        r = int(view["resize_size"])
        size = (r, max(1, round(w * r / h))) if h <= w else (max(1, round(h * r / w)), r)
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = round((size[0] - s) / 2), round((size[1] - s) / 2)
        x = x[..., top:top + s, left:left + s]
    else:
        x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
    x = (x.clamp_(0, 1) - norm["mean"]) / norm["std"]
    return x[0].expand(channels, s, s).contiguous()


@dataclass
class Prediction:
    probs: np.ndarray      # (B, T)
    flags: np.ndarray      # (B, T) bool, probs >= the bundle's thresholds
    cams: np.ndarray       # (B, T, h, w) saliency: class-activation maps (logit contributions) or, for a ViT
                           # probed on its CLS token, its attention map (the same for each task; see ``saliency``)
    features: np.ndarray   # (B, D) the features the heads read (pooled maps; a ViT's chosen tokens)
    saliency: str = "cam"  # "cam" | "attention" (eval.bundle.SALIENCY_TEXT names them)


class Predictor:
    """A loaded bundle on one device; ``prepare`` and ``predict`` are safe to call from several threads."""

    def __init__(self, bundle, device: str = "cpu", max_pixels: int = DEFAULT_MAX_PIXELS):
        self.bundle, self.max_pixels = bundle, max_pixels
        self.device = torch_device(device)
        self.model = bundle.model.to(self.device).eval()
        self.channels = int(bundle.meta["encoder"]["in_channels"])

    def prepare(self, data: bytes):
        """bytes -> (C, S, S) input tensor; InputError on anything that is not a decodable film."""
        meta = self.bundle.meta
        gray = decode_gray(data, shard_size=meta["ingest"]["size"], quality=meta["ingest"]["quality"],
                           max_pixels=self.max_pixels)
        return view_tensor(gray, meta["view"], meta["normalisation"], self.channels)

    def shown(self, x) -> np.ndarray:
        """The model's input as 8-bit gray (S, S): what the model saw."""
        norm = self.bundle.meta["normalisation"]
        unit = (x[0].numpy() * norm["std"] + norm["mean"]).clip(0, 1)
        return np.rint(unit * 255).astype(np.uint8)

    def predict(self, batch) -> Prediction:  # batch (B, C, S, S)
        import torch
        with torch.inference_mode():
            logits, feats, cams = self.model(batch.to(self.device))
            probs = torch.sigmoid(logits).double().cpu().numpy()
        return Prediction(probs, probs >= self.bundle.thresholds[None], cams.float().cpu().numpy(),
                          feats.float().cpu().numpy(), self.model.saliency)


def iter_inputs(paths: list[Path]) -> list[Path]:
    files = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        else:
            files.append(p)
    return files


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval predict", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, type=Path, help="bundle folder written by `python -m eval export`")
    p.add_argument("--input", required=True, type=Path, action="append",
                   help="JPEG / PNG / DICOM file or folder; repeatable")
    p.add_argument("--out", required=True, type=Path, help="CSV to write (one row per input)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding threads")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse larger images (decompression bombs): N 8-bit pixels, N / 2 16-bit ones")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> dict:
    import torch
    from tqdm import tqdm

    from eval.bundle import load_bundle
    from ingest.preprocess import ImageReject, read_bytes
    from ingest.progress import show_progress
    if args.out.exists() and not args.overwrite:
        raise InputError("usage", f"{args.out}: exists; pass --overwrite to replace it")
    for p in args.input:
        if not p.exists():
            raise InputError("usage", f"{p}: no such file or folder")
    if args.batch_size < 1 or args.workers < 1:
        raise InputError("usage", "--batch-size and --workers must be >= 1")
    bundle = load_bundle(args.bundle)
    files = iter_inputs(args.input)
    if not files:
        raise InputError("usage", f"{', '.join(map(str, args.input))}: no files to predict (hidden files are skipped)")
    try:
        device = resolve_device(args.device)
    except DeviceError as e:
        raise InputError("usage", str(e)) from None
    predictor = Predictor(bundle, device, args.max_pixels)
    tasks, validated = bundle.tasks, bundle.validated
    rows: dict[int, dict] = {}
    pending: list[tuple[int, object]] = []
    start = time.perf_counter()

    def flush():
        if pending:
            out = predictor.predict(torch.stack([x for _, x in pending]))
            for (i, _), p, f in zip(pending, out.probs, out.flags):
                rows[i].update({f"p_{t}": f"{p[j]:.6f}" for j, t in enumerate(tasks)})
                # No threshold exists for a task whose validation AUROC is at chance: say so instead of 0.
                rows[i].update({f"flag_{t}": int(f[j]) if validated[j] else NOT_VALIDATED for j, t in enumerate(tasks)})
            pending.clear()
    def load(path: Path):
        try:
            return predictor.prepare(read_bytes(path)), ""
        except (InputError, ImageReject) as e:
            return None, str(e)
    # Decoding runs in threads (Pillow, pydicom's numpy and torch release the GIL), a few batches ahead of the
    # model; the block bound keeps memory flat on folders of any size.
    block = args.batch_size * 4
    with ThreadPoolExecutor(args.workers) as pool, tqdm(total=len(files), desc="predict", unit="img",
                                                        disable=not show_progress(not args.no_progress),
                                                        file=sys.stderr) as bar:
        for lo in range(0, len(files), block):
            for i, (x, reason) in enumerate(pool.map(load, files[lo:lo + block]), start=lo):
                rows[i] = {"path": str(files[i]), "status": "ok" if x is not None else "error", "reason": reason}
                if x is not None:
                    pending.append((i, x))
                if len(pending) >= args.batch_size:
                    flush()
                bar.update()
        flush()
    seconds = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["path", "status", "reason", *[f"p_{t}" for t in tasks], *[f"flag_{t}" for t in tasks]]
    with atomic_write(args.out, text=True, newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows[i] for i in range(len(files)))
    ok = sum(r["status"] == "ok" for r in rows.values())
    return {"predicted": ok, "unreadable": len(files) - ok, "seconds": seconds,
            "errors": [(r["path"], r["reason"]) for r in rows.values() if r["status"] != "ok"]}


def main(argv: list[str]) -> int:
    from eval.bundle import BundleError
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as e:
        return int(e.code or 0)
    try:
        summary = run(args)
    except (InputError, BundleError) as e:
        print(f"eval predict: error: {one_line(e)}", file=sys.stderr)
        return 2
    for path, reason in summary["errors"]:
        print(f"eval predict: unreadable: {path}: {reason}", file=sys.stderr)
    if summary["predicted"] == 0:
        print(f"eval predict: error: none of the {summary['unreadable']} input(s) could be read (reasons listed "
              f"in {args.out})", file=sys.stderr)
        return 2
    rate = summary["predicted"] / summary["seconds"] if summary["seconds"] > 0 else float("nan")
    print(f"eval predict: {summary['predicted']} predicted, {summary['unreadable']} unreadable -> {args.out} "
          f"({rate:.1f} images/s)", file=sys.stderr)
    return 0
