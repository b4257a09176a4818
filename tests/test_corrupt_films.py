"""Corrupt films refused by ingest's decoding and builds, each with a reason (eval predict and serve: in
test_serve_api.py, which has a bundle): real CXRs cut short (with and
without an end marker appended, baseline and progressive, JPEG / PNG / DICOM) and headers that claim more pixels
than the data holds. The originals of every corrupted film are still accepted."""
from __future__ import annotations

import csv
import hashlib
import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from ingest.preprocess import ImageReject, process_bytes

EOI = b"\xff\xd9"
CUT_SHORT = "coded data ends before the last block"


def _sof_patched(data: bytes, width: int, height: int) -> bytes:
    i = data.index(b"\xff\xc0")
    return data[:i + 5] + struct.pack(">HH", height, width) + data[i + 9:]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    pos, out = 8, []
    while pos < len(data):
        n = struct.unpack(">I", data[pos:pos + 4])[0]
        out.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]))
        pos += 12 + n
    return out


def _dicom_with_frame(path: Path, cut) -> bytes:
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([cut(next(generate_frames(ds.PixelData, number_of_frames=1)))])
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _native_dicom_cut(path: Path) -> bytes:
    import pydicom
    ds = pydicom.dcmread(path)
    ds.decompress()  # the real film, uncompressed; then PixelData shorter than Rows x Columns x BitsAllocated
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 10]
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def films(shared_data):
    return corrupt_films(shared_data)


def corrupt_films(shared_data: Path) -> dict[str, tuple[bytes, str | None]]:
    """{name: (bytes, expected reason fragment or None for an accepted original)} made from real films."""
    cxr = (shared_data / "pneumonia-mini" / "Normal" / "0.jpeg").read_bytes()
    rgb = (shared_data / "formats" / "padchest_16747_3_1_rgb.jpg").read_bytes()
    nih = (shared_data / "formats" / "nih_00000001_000.png").read_bytes()
    dcm = shared_data / "formats" / "siim_monochrome2.dcm"
    buf = io.BytesIO()
    Image.open(io.BytesIO(cxr)).save(buf, "JPEG", quality=90, progressive=True)
    prog = buf.getvalue()
    last_sos = prog.rindex(b"\xff\xda")
    sos = cxr.index(b"\xff\xda")
    chunks = _png_chunks(nih)
    head = nih[:8] + b"".join(_png_chunk(k, v) for k, v in chunks if k not in (b"IDAT", b"IEND"))
    idat = b"".join(v for k, v in chunks if k == b"IDAT")
    big_ihdr = struct.pack(">II", 6000, 6000) + chunks[0][1][8:]
    return {
        "original.jpeg": (cxr, None), "original_rgb.jpg": (rgb, None), "original_progressive.jpg": (prog, None),
        "original.png": (nih, None), "original.dcm": (dcm.read_bytes(), None),
        "cut_eoi.jpeg": (cxr[: len(cxr) // 10] + EOI, CUT_SHORT),
        "cut.jpeg": (cxr[: len(cxr) // 10], "truncated"),
        "cut_eoi_rgb.jpg": (rgb[: len(rgb) // 2] + EOI, CUT_SHORT),
        "cut_eoi_progressive.jpg": (prog[: (last_sos + len(prog)) // 2] + EOI, CUT_SHORT),  # inside the last scan
        "last_scans_missing.jpg": (prog[: len(prog) * 2 // 3] + EOI, "last scans are missing"),
        # a real film's headers claiming 6000 x 6000 over 40 bytes of its scan: ~330 bytes in all
        "forged_6000px.jpeg": (_sof_patched(cxr[: sos + 60], 6000, 6000) + EOI,
                               "claims 6000 x 6000 pixels but the file holds"),
        "cut_iend.png": (nih[: len(nih) // 10] + _png_chunk(b"IEND", b""), "truncated"),
        "short_idat.png": (head + _png_chunk(b"IDAT", idat[: len(idat) // 10]) + _png_chunk(b"IEND", b""),
                           "truncated"),
        "forged_6000px.png": (nih[:8] + _png_chunk(b"IHDR", big_ihdr)
                              + b"".join(_png_chunk(k, v) for k, v in chunks[1:]), "truncated"),
        "cut_eoi.dcm": (_dicom_with_frame(dcm, lambda f: f[: len(f) // 10] + EOI), CUT_SHORT),
        "cut.dcm": (_dicom_with_frame(dcm, lambda f: f[: len(f) // 10]), "ends before the end-of-image marker"),
        "forged_6000px.dcm": (_dicom_with_frame(dcm, lambda f: _sof_patched(f[: f.index(b"\xff\xda") + 60],
                                                                             6000, 6000) + EOI),
                              "claims 6000 x 6000 pixels"),
        "native_cut.dcm": (_native_dicom_cut(dcm), "cannot decode DICOM pixel data"),
    }


def test_decode_refuses_every_corruption_and_keeps_the_originals(films):
    for name, (data, reason) in films.items():
        kind = "dicom" if name.endswith(".dcm") else "image"
        if reason is None:
            assert process_bytes(data, kind, 64, 90).jpeg, name
            continue
        with pytest.raises(ImageReject) as e:
            process_bytes(data, kind, 64, 90)
        assert reason in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
        if name.endswith(".jpeg") or name.endswith(".jpg"):  # the same at full scale (no DCT-scaled draft)
            with pytest.raises(ImageReject, match=reason):
                process_bytes(data, kind, 0, 90)


def test_forged_header_is_refused_before_any_pixel_is_decoded(films, monkeypatch):
    data, _ = films["forged_6000px.jpeg"]
    assert len(data) < 400
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a forged header's pixels"))
    with pytest.raises(ImageReject, match="claims 6000 x 6000"):
        process_bytes(data, "image", 64, 90)


def test_ingest_build_lists_each_corrupt_film_with_its_reason(films, tmp_path, capsys):
    from ingest import build
    from ingest.schema import load_manifest
    root = tmp_path / "films"
    (root / "normal").mkdir(parents=True)
    images = {n: v for n, v in films.items() if not n.endswith(".dcm")}
    for name, (data, _) in images.items():
        (root / "normal" / name).write_bytes(data)
    out = tmp_path / "out"
    rc = build.main(["--source", "folder", "--root", str(root), "--out", str(out), "--workers", "0", "--size", "32",
                     "--no-progress", "--split-mode", "hash", "--val-frac", "0", "--test-frac", "0",
                     "--salt-file", str(tmp_path / "k"), "--private-log", str(tmp_path / "log")])
    assert rc == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(out / "rejects.tsv"), delimiter="\t"))
    by_sha = {r["sha256"]: r["reason"] for r in rows}
    for name, (data, reason) in images.items():
        sha = hashlib.sha256(data).hexdigest()
        if reason is None:
            assert sha not in by_sha, name
        else:
            assert reason in by_sha[sha], (name, by_sha[sha])
    assert load_manifest(out).data["counts"]["written"] == sum(r is None for _, r in images.values())
    assert str(out / "rejects.tsv") in capsys.readouterr().out.splitlines()[-1]


def test_dicom_build_rejects_cut_frames(films, tmp_path):
    from ingest import build
    from ingest.schema import load_manifest
    root = tmp_path / "dicoms"
    root.mkdir()
    dicoms = {n: v for n, v in films.items() if n.endswith(".dcm")}
    for name, (data, _) in dicoms.items():
        (root / name).write_bytes(data)
    out = tmp_path / "out"
    assert build.main(["--source", "dicom", "--root", str(root), "--out", str(out), "--workers", "0",
                       "--no-progress", "--patient-from", "file", "--salt-file", str(tmp_path / "k"),
                       "--private-log", str(tmp_path / "log")]) == 0
    by_sha = {r["sha256"]: r["reason"] for r in load_manifest(out).data["rejects"]}
    for name, (data, reason) in dicoms.items():
        sha = hashlib.sha256(data).hexdigest()
        assert (sha not in by_sha) if reason is None else reason in by_sha[sha], name
