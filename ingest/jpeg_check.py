"""Strict JPEG checks that libjpeg (behind Pillow and pylibjpeg) does not make: a header claiming more pixels than
its coded data can hold, scans missing, and a scan cut short (the decoder fills the rest and only warns)."""
from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# Start-of-frame markers by entropy coding. Huffman codes are 1..16 bits long, so a sequential Huffman scan spends
# at least 2 bits on every 8x8 block (a DC code and an AC code, EOB at least), a progressive or lossless one at
# least 1 (the first DC scan's code). Arithmetic coding can spend less than a bit per block: no bound there.
SOF_SEQUENTIAL_HUFFMAN = frozenset({0xC0, 0xC1})
SOF_OTHER_HUFFMAN = frozenset({0xC2, 0xC3, 0xC5, 0xC6, 0xC7})
SOF_ARITHMETIC = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
SOF_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# Coded bytes (no 0xFF, so never a marker) inserted before the end of the last scan by `scan_cut_short`.
PROBE_BYTES = bytes(range(1, 255)) * 8
GRAY_FILL = 128  # what libjpeg decodes for the all-zero coefficients it substitutes for missing data


@dataclass
class JpegLayout:
    """What the markers say: frame size, components' sampling factors, scans, and where the coded data is."""
    sof: int = 0
    width: int = 0
    height: int = 0
    precision: int = 8
    components: dict[int, tuple[int, int]] = field(default_factory=dict)  # id -> (h, v) sampling factors
    scans: list[tuple[tuple[int, ...], int, int, int, int]] = field(default_factory=list)  # ids, Ss, Se, Ah, Al
    coded_bytes: int = 0          # entropy-coded bytes of all scans (stuffed 0x00 and RST markers included)
    last_scan_end: int = -1       # offset of the marker that ends the last scan's coded data
    ends_early: bool = False      # the bytes end inside a marker segment or a scan, before the end marker


def parse(data: bytes) -> JpegLayout | None:
    """The layout from the markers (``ends_early`` where the bytes end inside a segment or scan), None for no
    JPEG. Only the markers are read, in bytes.find steps: milliseconds for a large film."""
    if not data.startswith(b"\xff\xd8"):
        return None
    lay = JpegLayout()
    if _walk(data, lay):
        lay.ends_early = True
    return lay


def _walk(data: bytes, lay: JpegLayout) -> bool:
    """Fill ``lay``; True when the bytes end before the end marker."""
    pos, n = 2, len(data)
    while pos + 1 < n:
        if data[pos] != 0xFF:
            return not lay.scans  # stray bytes after a scan: libjpeg skips them with a warning
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            return False
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if pos + 4 > n:
            return True
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        seg = data[pos + 4:pos + 2 + length]
        if length < 2 or len(seg) != length - 2:
            return True
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and len(seg) >= 6:
            lay.sof, lay.precision = marker, seg[0]
            lay.height, lay.width = int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big")
            lay.components = {seg[6 + 3 * i]: (seg[7 + 3 * i] >> 4, seg[7 + 3 * i] & 15)
                              for i in range(seg[5]) if 8 + 3 * i <= len(seg)}
        pos += 2 + length
        if marker != 0xDA:
            continue
        ns = seg[0] if seg else 0
        if len(seg) < 4 + 2 * ns:
            return True
        ids = tuple(seg[1 + 2 * i] for i in range(ns))
        ss, se, a = seg[1 + 2 * ns], seg[2 + 2 * ns], seg[3 + 2 * ns]
        lay.scans.append((ids, ss, se, a >> 4, a & 15))
        start = pos
        while True:  # to the first marker that is neither a stuffed 0xFF00 nor a restart marker
            pos = data.find(b"\xff", pos)
            if pos < 0 or pos + 1 >= n:
                return True
            nxt = data[pos + 1]
            if nxt == 0 or 0xD0 <= nxt <= 0xD7:
                pos += 2
            elif nxt == 0xFF:
                pos += 1
            else:
                break
        lay.coded_bytes += pos - start
        lay.last_scan_end = pos
    return True


def _blocks(lay: JpegLayout) -> int:
    hmax = max((h for h, _ in lay.components.values()), default=1) or 1
    vmax = max((v for _, v in lay.components.values()), default=1) or 1
    return sum(-(-(-(-lay.width * h // hmax)) // 8) * -(-(-(-lay.height * v // vmax)) // 8)
               for h, v in lay.components.values())


def structure_problem(lay: JpegLayout) -> str | None:
    """A reason when the markers alone prove the image incomplete, else None (cheap: no pixel decoded). A file
    that ``ends_early`` is left to the decoder, which reports that truncation itself."""
    if not lay.sof or not lay.scans or lay.ends_early:
        return None  # the decoder reports these itself
    bits = 2 if lay.sof in SOF_SEQUENTIAL_HUFFMAN else 1 if lay.sof in SOF_OTHER_HUFFMAN else 0
    need = _blocks(lay) * bits // 8
    if lay.coded_bytes < need:
        return (f"JPEG header claims {lay.width} x {lay.height} pixels but the file holds {lay.coded_bytes:,} bytes "
                f"of coded data, fewer than the {need:,} any image of that size needs (truncated or forged header)")
    coded = {c for ids, *_ in lay.scans for c in ids}
    missing = sorted(set(lay.components) - coded)
    if missing:
        return f"truncated JPEG: no scan codes component(s) {missing} (the file ends early)"
    if lay.sof in SOF_PROGRESSIVE:
        # Every coefficient of every component must reach full precision (Al = 0) in some scan.
        final = {c: np.full(64, 99) for c in lay.components}
        for ids, ss, se, _, al in lay.scans:
            for c in ids:
                if c in final:
                    final[c][ss:se + 1] = np.minimum(final[c][ss:se + 1], al)
        if any(f.max() > 0 for f in final.values()):
            return "truncated progressive JPEG: its last scans are missing (coefficients never refined)"
    return None


def needs_probe(lay: JpegLayout, pixels: np.ndarray) -> bool:
    """Whether `scan_cut_short` must decode again. A single-scan (baseline) image cut short ends in blocks
    decoded from zero coefficients: flat GRAY_FILL down to its last row, in every channel. So an image whose last
    row is not all GRAY_FILL was not cut (almost every real film); images of several scans are always probed."""
    return len(lay.scans) > 1 or bool((pixels[-1] == GRAY_FILL).all())


def scan_cut_short(data: bytes, lay: JpegLayout, pixels: np.ndarray,
                   decode: Callable[[bytes], np.ndarray]) -> bool:
    """Did the decoder run out of coded data before the last block? libjpeg then substitutes zero coefficients and
    only warns, whether or not an end marker follows. The test: insert PROBE_BYTES of coded data before the marker
    that ends the last scan and decode again (same scale) with ``decode``. A complete scan never reads them (they
    are skipped as extraneous bytes) and the pixels are equal; a scan cut short decodes them into the missing
    blocks and the pixels differ. Robust for any encoder, Huffman table or subsampling, and it checks exactly the
    pixels that are kept: data a reduced-scale decode never uses cannot change them."""
    end = lay.last_scan_end
    probed = decode(data[:end] + PROBE_BYTES + data[end:])
    return probed.shape != pixels.shape or not np.array_equal(probed, pixels)


def check_codestream(data: bytes) -> str | None:
    """All checks on a JPEG codestream held elsewhere (a DICOM frame), decoded by Pillow at 1/8 scale for the
    probe (libjpeg's DCT scaling: entropy decoding in full, little else); None when it is complete or when Pillow
    cannot decode it (12-bit, lossless: the header bound still applies)."""
    from PIL import Image
    lay = parse(data)
    if lay is None:
        return None
    if lay.ends_early:
        return "truncated JPEG: the data ends before the end-of-image marker"
    problem = structure_problem(lay)
    if problem is not None or lay.precision != 8:
        return problem

    def small(d: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(d)) as im:
            im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
            return np.asarray(im)
    try:
        pixels = small(data)
        if needs_probe(lay, pixels) and scan_cut_short(data, lay, pixels, small):
            return CUT_SHORT
    except (OSError, SyntaxError, ValueError):
        return None  # not Pillow-decodable: the codec in use decides
    return None


CUT_SHORT = ("truncated JPEG: the coded data ends before the last block (the decoder would fill the rest with "
             "flat gray)")
