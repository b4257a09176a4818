"""DICOM decoding through pydicom's pixel-data plugins on files written by other tools (the test files bundled in
the pydicom wheel: one MR image as native, big-endian, RLE, JPEG-LS and JPEG 2000 twins; 12-bit JPEG Extended,
JPEG-LS near-lossless, lossy JPEG 2000, deflated), 12-bit radiographs compressed by CharLS / OpenJPEG, and the
robust reading of files without preamble, without pixels, or cut short."""
from __future__ import annotations

import io

import numpy as np
import pytest

from ingest.dicom import DicomReject, decode_dicom, pixels_of, read_header

TWINS = ["MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_RLE.dcm",
         "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"]


def _bundled(name: str):
    """A pydicom test file shipped in the wheel; never downloaded."""
    from pydicom.data import get_testdata_file
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom")
    return path


def _read(path):
    import pydicom
    return pydicom.dcmread(path)


@pytest.mark.parametrize("name", TWINS)
def test_lossless_twins_decode_to_the_uncompressed_pixels(name):
    ref_path, path = _bundled("MR_small.dcm"), _bundled(name)
    ref, ds = _read(ref_path), _read(path)
    assert ds.file_meta.TransferSyntaxUID != ref.file_meta.TransferSyntaxUID or name == "MR_small_implicit.dcm"
    assert np.array_equal(pixels_of(ds), pixels_of(ref))
    out, info = decode_dicom(open(path, "rb").read())
    want, _ = decode_dicom(open(ref_path, "rb").read())
    assert np.array_equal(out, want) and out.shape == (64, 64)


@pytest.mark.parametrize("name, syntax, bits", [
    ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51", 12),       # JPEG Extended, 12-bit samples
    ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81", 16),
    ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91", 16),          # JPEG 2000 (lossy allowed)
    ("693_J2KI.dcm", "1.2.840.10008.1.2.4.91", 14),
    ("image_dfl.dcm", "1.2.840.10008.1.2.1.99", 8),          # deflated explicit little endian
])
def test_other_tools_files_decode(name, syntax, bits):
    path = _bundled(name)
    ds = _read(path)
    assert ds.file_meta.TransferSyntaxUID == syntax
    raw = pixels_of(ds)
    out, info = decode_dicom(open(path, "rb").read())
    assert out.dtype == np.uint8 and out.shape == raw.shape == (ds.Rows, ds.Columns)
    assert info["original_bit_depth"] == bits and out.max() > out.min()  # a real image, not a blank


def test_jpeg_lossless_process14_twin_of_rle():
    """GDCM's JPEG Lossless SV1 file and the RLE file of the same RGB image: identical stored pixels (ingest
    itself rejects RGB; this checks the process 14 decoder pydicom uses for it)."""
    jpeg, rle = _read(_bundled("SC_rgb_jpeg_gdcm.dcm")), _read(_bundled("SC_rgb_rle.dcm"))
    assert jpeg.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    assert np.array_equal(jpeg.pixel_array, rle.pixel_array) and jpeg.pixel_array.std() > 0


def test_decoders_installed_for_every_pacs_syntax():
    import pydicom.uid as U
    from pydicom.pixels import get_decoder
    for uid in (U.JPEGBaseline8Bit, U.JPEGExtended12Bit, U.JPEGLossless, U.JPEGLosslessSV1, U.JPEGLSLossless,
                U.JPEGLSNearLossless, U.JPEG2000Lossless, U.JPEG2000, U.RLELossless):
        decoder = get_decoder(uid)
        assert decoder.is_available, f"no decoder for {uid.name}"
    # JPEG Lossless (process 14) has no bundled sample file; its plugin is pylibjpeg-libjpeg's.
    assert "pylibjpeg" in get_decoder(U.JPEGLosslessSV1).available_plugins


def _radiograph_12bit(h=96, w=80) -> np.ndarray:
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:h, 0:w]
    body = 2600 - 1500 * np.exp(-(((x - w / 2) / (w / 3)) ** 2 + ((y - h / 2) / (h / 2.5)) ** 2))
    return np.clip(body + rng.normal(0, 40, (h, w)), 0, 4095).astype(np.uint16)


@pytest.mark.parametrize("syntax", ["JPEGLSLossless", "JPEG2000Lossless", "RLELossless"])
def test_12bit_radiograph_compressed_by_other_codecs_is_lossless(tmp_path, syntax):
    import pydicom.uid as U
    from test_ingest_dicom import make_dicom
    if syntax == "JPEGLSLossless":
        pytest.importorskip("jpeg_ls", reason="pyjpegls (CharLS) writes the JPEG-LS twin")
    x = _radiograph_12bit()
    plain = make_dicom(tmp_path / "plain.dcm", x, PatientID="p", WindowCenter=2000, WindowWidth=3000)
    ds = _read(plain)
    ds.compress(getattr(U, syntax))  # CharLS / OpenJPEG / pydicom's RLE encoder
    ds.save_as(tmp_path / "twin.dcm")
    twin = _read(tmp_path / "twin.dcm")
    assert twin.file_meta.TransferSyntaxUID == getattr(U, syntax)
    assert (tmp_path / "twin.dcm").stat().st_size < plain.stat().st_size
    assert np.array_equal(pixels_of(twin), x)
    a, _ = decode_dicom(plain.read_bytes())
    b, _ = decode_dicom((tmp_path / "twin.dcm").read_bytes())
    assert np.array_equal(a, b)


def _no_preamble_bytes(ds) -> bytes:
    """The dataset alone, implicit VR little endian, no preamble / DICM / file meta (as old archives hold)."""
    from pydicom.filewriter import write_dataset
    from pydicom.filebase import DicomBytesIO
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)
    return buf.getvalue()


def test_file_without_preamble_is_read_when_it_holds_an_image(tmp_path):
    from test_ingest_dicom import make_dicom
    x = _radiograph_12bit()
    plain = make_dicom(tmp_path / "plain.dcm", x, PatientID="p", StudyInstanceUID="1.2.3", ViewPosition="AP")
    data = _no_preamble_bytes(_read(plain))
    assert data[128:132] != b"DICM"
    (tmp_path / "raw").write_bytes(data)
    h = read_header(tmp_path / "raw")
    assert h.forced and h.has_pixels and (h.rows, h.columns, h.patient_id) == (96, 80, "p")
    assert h.transfer_syntax == "1.2.840.10008.1.2"
    out, info = decode_dicom(data)
    want, _ = decode_dicom(plain.read_bytes())
    assert np.array_equal(out, want) and info["steps"][0] == "forced_read"


def test_unreadable_header_no_pixels_and_truncated_pixels_are_rejects(tmp_path):
    from test_ingest_dicom import make_dicom
    (tmp_path / "notes.txt").write_text("Patient: Doe^Jane\nnot an image at all\n" * 20)
    with pytest.raises(DicomReject, match="^not a DICOM file"):
        read_header(tmp_path / "notes.txt")
    whole = make_dicom(tmp_path / "ok.dcm", _radiograph_12bit(), PatientID="p").read_bytes()
    (tmp_path / "cut_header.dcm").write_bytes(whole[:200])  # preamble + part of the file meta
    with pytest.raises(DicomReject, match="^(unreadable DICOM header|not a DICOM file)"):
        read_header(tmp_path / "cut_header.dcm")
    sr = read_header(_bundled("test-SR.dcm"))
    assert not sr.has_pixels and sr.modality == "SR"
    ds = _read(tmp_path / "ok.dcm")
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(DicomReject, match="DICOM without pixel data"):
        decode_dicom(buf.getvalue())
    with pytest.raises(DicomReject, match="cannot decode DICOM pixel data"):
        decode_dicom(open(_bundled("MR_truncated.dcm"), "rb").read())
    with pytest.raises(DicomReject, match="cannot decode DICOM pixel data"):
        decode_dicom(whole[: len(whole) - 1000])
