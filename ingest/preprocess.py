"""Per-image work: read, decode by format (Pillow or pydicom), reduce to one 8-bit channel, resize the shorter
side to `size` with antialiasing, encode a baseline single-channel JPEG. Pure: same bytes in, same bytes out."""
from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from ingest.errors import one_line
from ingest.pixels import extrema, range_to_u8

RESAMPLE = Image.BICUBIC  # antialiased in Pillow (support scales with the factor); ~25% faster than LANCZOS
DRAFT_MIN_REDUCTION = 2  # draft (DCT-scaled) decoding only while the image stays >= 2x the target: no worse
_BIT_DEPTH = {"1": 1, "L": 8, "P": 8, "LA": 8, "RGB": 8, "RGBA": 8, "CMYK": 8, "YCbCr": 8, "I;16": 16,
              "I;16B": 16, "I;16L": 16, "I;16N": 16, "F": 32}
_PHOTOMETRIC = {"1": "MONOCHROME2", "L": "MONOCHROME2", "LA": "MONOCHROME2", "I": "MONOCHROME2", "F": "MONOCHROME2",
                "P": "PALETTE COLOR", "RGB": "RGB", "RGBA": "RGB", "CMYK": "CMYK", "YCbCr": "YBR_FULL"}


class ImageReject(ValueError):
    """An input that cannot become a sample; the message is the reject reason."""


@dataclass
class Processed:
    jpeg: bytes
    source_sha256: str
    original_width: int
    original_height: int
    original_bit_depth: int
    photometric_interpretation: str
    steps: list[str]
    flags: dict


def read_bytes(path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageReject("missing file") from None
    except IsADirectoryError:
        raise ImageReject("is a directory, not an image file") from None
    except OSError as e:
        raise ImageReject(f"unreadable file ({e.strerror or e})") from None
    if not data:
        raise ImageReject("zero-byte file")
    return data


def target_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the shorter side == size and the aspect ratio kept; size 0 keeps the original."""
    if size <= 0 or min(width, height) == size:
        return width, height
    scale = size / min(width, height)
    if width <= height:
        return size, max(1, round(height * scale))
    return max(1, round(width * scale)), size


def to_gray_u8(im: Image.Image) -> tuple[Image.Image, list[str], dict]:
    """One 8-bit channel: 16-bit / float scaled from the real range (convert('L') would clip), equal-channel
    colour images take a channel, other colour images become luminance (flagged)."""
    steps, flags = [], {}
    mode = im.mode
    if mode == "L":
        return im, steps, flags
    if mode in ("I", "F") or mode.startswith("I;16"):
        # A table over the value range, read stripe by stripe: ~3 bytes per pixel in all (the decoded image
        # plus the 8-bit result) where a float64 copy of the whole film cost ~30; same bytes out.
        lo, hi = (float(v) for v in extrema(im))
        out = range_to_u8(im, lo, hi)
        steps.append(f"range_to_8bit:{lo:g}..{hi:g}")
        return Image.fromarray(out, mode="L"), steps, flags
    if mode == "1":
        return im.convert("L"), ["binary_to_8bit"], flags
    if mode == "LA":
        flags["alpha_dropped"] = True
        return im.getchannel(0), ["drop_alpha"], flags
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        steps.append("palette_to_rgb")
    if im.mode == "RGBA":
        im = im.convert("RGB")
        steps.append("drop_alpha")
        flags["alpha_dropped"] = True
    elif im.mode != "RGB":
        im = im.convert("RGB")
        steps.append(f"{mode.lower()}_to_rgb")
    arr = np.asarray(im)  # (H, W, 3)
    if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]):
        steps.append("rgb_equal_channels")
        return Image.fromarray(np.ascontiguousarray(arr[..., 0]), mode="L"), steps, flags
    flags["color_to_luminance"] = True
    steps.append("rgb_to_luminance")
    return im.convert("L"), steps, flags


def decode_pillow(data: bytes, size: int,
                  draft: bool = True) -> tuple[Image.Image, int, int, int, str, list[str], dict, int]:
    """(gray image, original w, h, bit depth, photometric, steps, flags, DCT reduction factor 1/2/4/8). Strict:
    a JPEG cut short (even with an end marker appended) or claiming more pixels than its data holds is refused
    (ingest.jpeg_check); Pillow itself refuses truncated PNG / JPEG data while LOAD_TRUNCATED_IMAGES is off."""
    from ingest.jpeg_check import CUT_SHORT, needs_probe, parse, scan_cut_short, structure_problem
    reduction, layout, request = 1, None, None
    try:
        im = Image.open(io.BytesIO(data))
        width, height, mode, fmt = im.width, im.height, im.mode, im.format
        steps = [f"decode:{(fmt or '?').lower()}"]
        if fmt == "JPEG":
            layout = parse(data)
            problem = structure_problem(layout) if layout is not None else None
            if problem is not None:  # before any pixel is decoded (a forged header may claim gigapixels)
                raise ImageReject(problem)
        if draft and fmt == "JPEG" and size > 0 and mode in ("L", "RGB"):
            want = target_size(width, height, size * DRAFT_MIN_REDUCTION)
            if want[0] < width:
                request = (mode, want)
                im.draft(mode, want)  # libjpeg DCT scaling by 1/2, 1/4 or 1/8
                if im.size != (width, height):
                    reduction = 2 ** round(math.log2(width / im.size[0]))
                    steps.append(f"jpeg_draft:1/{reduction}")
        im.load()
        if layout is not None and layout.ends_early:  # decoded only where LOAD_TRUNCATED_IMAGES was turned on
            raise ImageReject("truncated JPEG: the data ends before the end-of-image marker")
        if layout is not None and layout.scans:
            last_row = np.asarray(im.crop((0, im.height - 1, im.width, im.height)))[0]
            if needs_probe(layout, last_row[None]) and scan_cut_short(data, layout, np.asarray(im),
                                                                      lambda d: _decode_as(d, request)):
                raise ImageReject(CUT_SHORT)
    except UnidentifiedImageError:
        raise ImageReject("not an image (Pillow cannot identify the format)") from None
    except Image.DecompressionBombError as e:
        raise ImageReject(f"image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageReject):
            raise
        raise ImageReject("truncated or corrupt image "
                          f"({one_line(e)})") from None
    if im.mode == "I" and fmt == "PNG":
        bit_depth = 16
    else:
        bit_depth = _BIT_DEPTH.get(mode, 32)
    photometric = _PHOTOMETRIC.get(mode.split(";")[0], "MONOCHROME2" if mode.startswith("I") else mode)
    gray, more_steps, flags = to_gray_u8(im)
    return gray, width, height, bit_depth, photometric, steps + more_steps, flags, reduction


def _decode_as(data: bytes, request: tuple | None) -> np.ndarray:
    """Decode ``data`` with the same draft request (so at the same scale) as the image it is compared with."""
    with Image.open(io.BytesIO(data)) as im:
        if request is not None:
            im.draft(*request)
        return np.asarray(im)


def process_bytes(data: bytes, kind: str, size: int, quality: int, draft: bool = True) -> Processed:
    """Decode ``data`` (kind 'image' or 'dicom'; a DICOM preamble is recognised in either), resize, encode.
    ``draft=False`` disables the DCT-scaled JPEG decoding (for comparisons)."""
    sha = hashlib.sha256(data).hexdigest()
    if kind == "dicom" or (len(data) > 132 and data[128:132] == b"DICM"):
        from ingest.dicom import DicomReject, decode_dicom
        try:
            arr, info = decode_dicom(data)
        except DicomReject as e:
            raise ImageReject(str(e)) from None
        gray = Image.fromarray(arr, mode="L")
        width, height, bit_depth = info["original_width"], info["original_height"], info["original_bit_depth"]
        photometric, steps, flags = info["photometric_interpretation"], ["decode:dicom", *info["steps"]], {}
        reduction = 1
    else:
        gray, width, height, bit_depth, photometric, steps, flags, reduction = decode_pillow(data, size, draft)
    new = target_size(width, height, size)
    if gray.size != new or reduction != 1:
        upscale = new[0] > width
        # A DCT-scaled image covers ceil(w / k) pixels of which the last is partial: resample exactly the
        # original extent (w / k) so the geometry matches a full decode (PSNR ~55 dB against it).
        box = (0.0, 0.0, width / reduction, height / reduction)
        gray = gray.resize(new, RESAMPLE, box=box)
        steps.append(f"resize_{'up' if upscale else 'down'}:{new[0]}x{new[1]}:bicubic")
    buf = io.BytesIO()
    gray.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    steps.append(f"jpeg:q{quality}")
    return Processed(buf.getvalue(), sha, width, height, bit_depth, photometric, steps, flags)


def process_file(path, kind: str, size: int, quality: int) -> Processed:
    return process_bytes(read_bytes(path), kind, size, quality)

