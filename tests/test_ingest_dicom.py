"""The dicom source: pseudonymised patients and studies, windowing / MONOCHROME1 / modality LUT on synthetic
12-bit files, unsupported and broken DICOMs rejected, and no identifying header value in any output byte."""
from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from ingest import build, verify
from ingest.dicom import decode_dicom, pseudonymise
from ingest.schema import load_manifest
from ingest.shards import iter_shard

IDENTIFIERS = {"PatientName": "Doe^Jane", "PatientID": "MRN-0012345", "PatientBirthDate": "19450317",
               "StudyDate": "20190612", "AccessionNumber": "ACC998877", "InstitutionName": "St Example Hospital",
               "ReferringPhysicianName": "House^Gregory", "StudyInstanceUID": "1.2.826.0.1.3680043.2.1125.777.1"}


def make_dicom(path, pixels: np.ndarray, *, photometric="MONOCHROME2", bits_stored=12, **tags):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _ramp(h=64, w=80, hi=4095) -> np.ndarray:
    return np.tile(np.linspace(0, hi, w), (h, 1)).round().astype(np.uint16)


def test_window_and_monochrome1_on_12bit():
    x = _ramp()
    buf = io.BytesIO()
    make_dicom(buf, x, WindowCenter=2048, WindowWidth=1024, PatientID="p")
    out, info = decode_dicom(buf.getvalue())
    c, w = 2048, 1024
    want = np.clip(np.rint(((x - (c - 0.5)) / (w - 1) + 0.5) * 255), 0, 255)
    assert np.array_equal(out, want.astype(np.uint8)) and info["steps"] == ["voi_window[0]:linear"]
    assert info["original_bit_depth"] == 12 and info["photometric_interpretation"] == "MONOCHROME2"
    buf1 = io.BytesIO()
    make_dicom(buf1, x, photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=1024, PatientID="p")
    inv, info1 = decode_dicom(buf1.getvalue())
    assert np.array_equal(inv.astype(int), 255 - out.astype(int))
    assert info1["steps"] == ["voi_window[0]:linear", "invert_monochrome1"]
    # Without a window the real range is used (12-bit data is not clipped), with the modality LUT first.
    buf2 = io.BytesIO()
    make_dicom(buf2, x // 2 + 100, RescaleSlope=2, RescaleIntercept=-1000, PatientID="p")
    plain, info2 = decode_dicom(buf2.getvalue())
    assert info2["steps"] == ["modality_lut", "range_to_8bit"]
    assert plain.min() == 0 and plain.max() == 255 and (plain == 255).mean() < 0.05


def test_dicom_tree_pseudonymises_and_leaks_nothing(shared_data, tmp_path):
    import pydicom
    root = tmp_path / "dicoms"
    (root / "a" / "Doe^Jane").mkdir(parents=True)  # PACS exports name folders after patients
    make_dicom(root / "a" / "img1.dcm", _ramp(), ViewPosition="PA", PatientSex="F", PatientAge="093Y",
               WindowCenter=2048, WindowWidth=4096, **IDENTIFIERS)
    make_dicom(root / "a" / "Doe^Jane" / "img2", _ramp()[::-1].copy(), photometric="MONOCHROME1", ViewPosition="LL", **IDENTIFIERS)
    real = pydicom.dcmread(shared_data / "formats" / "siim_monochrome2.dcm")  # a real CR, JPEG-compressed
    real_ids = (str(real.PatientID), str(real.StudyInstanceUID))
    for k, v in {**IDENTIFIERS, "PatientName": "Roe^Richard", "PatientID": "MRN-777"}.items():
        setattr(real, k, v)
    real.save_as(root / "real.dcm")
    make_dicom(root / "rgb.dcm", np.zeros((8, 8, 3), np.uint8), photometric="RGB", bits_stored=8, **IDENTIFIERS)
    make_dicom(root / "noid.dcm", _ramp(), StudyInstanceUID="1.2.3")
    (root / "notes.txt").write_text("Doe^Jane, not an image\n")
    whole = (root / "a" / "img1.dcm").read_bytes()
    (root / "cut.dcm").write_bytes(whole[: len(whole) - 3000])  # pixel data cut short
    out = tmp_path / "out"
    args = ["--source", "dicom", "--root", str(root), "--workers", "0", "--size", "32", "--no-progress",
            "--split-mode", "hash", "--val-frac", "0", "--test-frac", "0"]
    assert build.main([*args, "--out", str(out), "--pseudonym-salt", "s3cret"]) == 0
    m = load_manifest(out)
    reasons = {r["source_path"]: r["reason"] for r in m.data["rejects"]}
    assert reasons["rgb.dcm"].startswith("unsupported photometric interpretation 'RGB'")
    assert reasons["notes.txt"].startswith("not a DICOM file")
    assert reasons["noid.dcm"].startswith("DICOM without PatientID")
    assert reasons["cut.dcm"].startswith("cannot decode DICOM pixel data")
    assert m.data["counts"] == {"inputs": 7, "written": 3, "rejected": 4, "filtered": 0}
    assert m.label_names == [] and verify.main([str(out)]) == 0  # no labels: empty .lbl, still a valid shard
    samples = [s for sh in m.shards("train") for s in iter_shard(sh.path)]
    by_path = {json.loads(s["json"])["source_path"]: json.loads(s["json"]) for s in samples}
    # shards carry a salted pseudonym of the file's path, never the path (folder names can identify)
    metas = {p: by_path[pseudonymise(p, b"s3cret", "f")] for p in ("a/img1.dcm", "a/Doe^Jane/img2", "real.dcm")}
    pid = pseudonymise("MRN-0012345", b"s3cret", "d")
    assert metas["a/img1.dcm"]["patient_id"] == metas["a/Doe^Jane/img2"]["patient_id"] == pid
    assert metas["a/img1.dcm"]["study_id"] == pseudonymise(IDENTIFIERS["StudyInstanceUID"], b"s3cret", "s")
    assert (metas["a/img1.dcm"]["view"], metas["a/Doe^Jane/img2"]["view"]) == ("PA", "LAT")
    assert (metas["a/img1.dcm"]["sex"], metas["a/img1.dcm"]["age"]) == ("Female", 90)  # 93 capped
    assert metas["real.dcm"]["photometric_interpretation"] == "MONOCHROME2"
    assert json.loads((out / "patients.json").read_text()) == sorted({pid, pseudonymise("MRN-777", b"s3cret", "d")})
    needles = [v.encode() for v in IDENTIFIERS.values()] + [b"Doe", b"Jane", b"Roe^Richard", b"0012345", b"MRN",
                                                            b"s3cret", *(v.encode() for v in real_ids)]
    for p in out.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            leaked = [n for n in needles if n in data]
            assert not leaked, f"{p.relative_to(out)} contains {leaked}"
    for s in samples:
        assert Image.open(io.BytesIO(s["jpg"])).mode == "L" and struct.unpack("<q", s["pid"])[0] in (0, 1)
    # Without --pseudonym-salt a random salt is made once, kept private in OUT and reused on re-runs.
    out2 = tmp_path / "out2"
    assert build.main([*args, "--out", str(out2)]) == 0
    salt = (out2 / build.SALT_FILE).read_text().strip()
    assert len(salt) == 64 and (out2 / build.SALT_FILE).stat().st_mode & 0o077 == 0
    assert json.loads((out2 / "patients.json").read_text())[0] in {pseudonymise(i, salt.encode(), "d")
                                                                   for i in ("MRN-0012345", "MRN-777")}
    assert salt not in (out2 / "manifest.json").read_text()


@pytest.mark.parametrize("bad", ["PALETTE COLOR", "YBR_FULL"])
def test_unsupported_photometric_reason(bad):
    buf = io.BytesIO()
    make_dicom(buf, _ramp(8, 8, 255).astype(np.uint8), photometric=bad, bits_stored=8, PatientID="p")
    from ingest.dicom import DicomReject
    with pytest.raises(DicomReject, match=f"unsupported photometric interpretation '{bad}'"):
        decode_dicom(buf.getvalue())


def test_many_dicoms_scan_in_parallel_with_identical_output(tmp_path):
    root = tmp_path / "tree"
    rng = np.random.default_rng(1)
    for i in range(260):  # above the threshold where headers are read in a process pool
        folder = root / f"pt{i % 40:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        make_dicom(folder / f"im{i:03d}.dcm", rng.integers(0, 4096, (16, 16)).astype(np.uint16),
                   PatientID=f"MRN{i % 40:04d}", StudyInstanceUID=f"1.2.3.{i % 40}.{i % 3}", PatientName="Doe^Jane")
    (root / "pt00" / "junk.bin").write_bytes(b"\x00" * 200)
    args = ["--source", "dicom", "--root", str(root), "--size", "16", "--no-progress", "--pseudonym-salt", "x",
            "--shard-max-samples", "64"]
    assert build.main([*args, "--out", str(tmp_path / "a"), "--workers", "0"]) == 0
    assert build.main([*args, "--out", str(tmp_path / "b"), "--workers", "2"]) == 0
    files = lambda d: {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}  # noqa: E731
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert a == b
    m = load_manifest(tmp_path / "a")
    assert m.num_patients == 40 and m.data["counts"] == {"inputs": 261, "written": 260, "rejected": 1, "filtered": 0}
