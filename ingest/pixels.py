"""Wide pixel arrays (16-bit, int32, float) to 8 bit with bounded memory: a lookup table over the value range for
integer images, else the float64 formula on stripes of rows; either way the same bytes as the full-size formula."""
from __future__ import annotations

import numpy as np

STRIPE_PIXELS = 1 << 20  # float64 temporaries of one stripe stay ~8 MB whatever the film's size
MAX_LUT_ENTRIES = 1 << 16  # a table over at most 65536 values: every 16-bit range, and most 32-bit films


def stripes(height: int, width: int):
    """Row slices covering ``height`` rows, each of about STRIPE_PIXELS pixels (at least one row)."""
    rows = max(1, STRIPE_PIXELS // max(1, width))
    for top in range(0, height, rows):
        yield slice(top, min(height, top + rows))


def map_to_u8(x, fn, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """uint8 image ``fn(values)`` for a 2-D array or a Pillow image ``x``; ``fn`` maps a float64 array to uint8
    elementwise. Integer inputs whose range spans <= MAX_LUT_ENTRIES values go through a table (``fn`` evaluated
    once per value in [lo, hi]); others through ``fn`` stripe by stripe. A Pillow image is read one stripe at a
    time, so no full-size copy of the wide pixels is made."""
    pil = not isinstance(x, np.ndarray)
    width, height = (x.size if pil else (x.shape[1], x.shape[0]))
    if lo is None or hi is None:
        lo, hi = extrema(x)
    out = np.empty((height, width), np.uint8)
    integer = (x.mode != "F") if pil else np.issubdtype(x.dtype, np.integer)
    lut = None
    if integer and hi - lo < MAX_LUT_ENTRIES:
        lo, hi = int(lo), int(hi)
        lut = fn(np.arange(lo, hi + 1, dtype=np.float64))
    for rows in stripes(height, width):
        part = np.asarray(x.crop((0, rows.start, width, rows.stop))) if pil else x[rows]
        if lut is None:
            out[rows] = fn(part.astype(np.float64))
        elif lo == 0:
            np.take(lut, part, out=out[rows])
        else:
            np.take(lut, part.astype(np.int64) - lo, out=out[rows])
    return out


def extrema(x) -> tuple[float, float]:
    """(min, max) of a 2-D array or a Pillow image, without a full-size copy."""
    if not isinstance(x, np.ndarray):
        lo, hi = x.getextrema()
        return lo, hi
    return (x.min().item(), x.max().item()) if x.size else (0, 0)


def range_to_u8(x, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Linear map of the image's real [min, max] to 0..255 (a constant image becomes 0): rint((v - lo) * 255 /
    (hi - lo)) in float64, value for value."""
    if lo is None or hi is None:
        lo, hi = extrema(x)
    lo, hi = float(lo), float(hi)
    if hi <= lo:
        width, height = x.size if not isinstance(x, np.ndarray) else (x.shape[1], x.shape[0])
        return np.zeros((height, width), np.uint8)
    scale = 255.0 / (hi - lo)
    return map_to_u8(x, lambda v: np.rint((v - lo) * scale).astype(np.uint8), lo, hi)
