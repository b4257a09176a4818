"""The dicom source: pseudonymised patients and studies, windowing / MONOCHROME1 / modality LUT on synthetic
12-bit files, unsupported and broken DICOMs rejected, and no identifying header value in any output byte."""
from __future__ import annotations

import hashlib
import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from ingest import build, verify
from ingest.dicom import decode_dicom
from ingest.pseudonym import default_salt_file, pseudonymise
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


def _identifying_values(root) -> set[str]:
    """Every name, date, time, free-text id and instance UID in the inputs' headers (standard UIDs excepted)."""
    import pydicom
    out = set()
    for f in root.rglob("*"):
        try:
            ds = pydicom.dcmread(f, force=True, stop_before_pixels=True)
        except Exception:
            continue
        for elem in [*ds.iterall(), *getattr(ds, "file_meta", pydicom.Dataset()).iterall()]:
            if elem.VR in ("PN", "DA", "DT", "TM", "UI", "SH", "LO") and elem.value:
                for v in (elem.value if elem.VM > 1 else [elem.value]):
                    v = str(v).strip()
                    if len(v) >= 4 and not v.startswith("1.2.840.10008."):
                        out.add(v)
    return out


def _all_bytes_under(out) -> dict:
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_dicom_tree_pseudonymises_and_leaks_nothing(shared_data, tmp_path, capsys):
    import pydicom
    root = tmp_path / "dicoms"
    patient_dir = root / "MRN-0012345_Doe" / "Doe^Jane"  # PACS exports name folders after patients
    patient_dir.mkdir(parents=True)
    make_dicom(root / "MRN-0012345_Doe" / "img1-Jane-chest.dcm", _ramp(), ViewPosition="PA", PatientSex="F",
               PatientAge="093Y", WindowCenter=2048, WindowWidth=4096, **IDENTIFIERS)
    make_dicom(patient_dir / "img2_19450317", _ramp()[::-1].copy(), photometric="MONOCHROME1", ViewPosition="LL",
               **IDENTIFIERS)
    real = pydicom.dcmread(shared_data / "formats" / "siim_monochrome2.dcm")  # a real CR, JPEG-compressed
    real_ids = (str(real.PatientID), str(real.StudyInstanceUID), str(real.SOPInstanceUID))
    for k, v in {**IDENTIFIERS, "PatientName": "Roe^Richard", "PatientID": "MRN-777"}.items():
        setattr(real, k, v)
    real.save_as(root / "Roe_Richard_SC.dcm")  # as published: a CR wrapped as secondary capture -> kept
    real.SOPClassUID = real.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    real.save_as(root / "Roe_Richard_CR.dcm")
    make_dicom(root / "rgb-ACC998877.dcm", np.zeros((8, 8, 3), np.uint8), photometric="RGB", bits_stored=8,
               **IDENTIFIERS)
    make_dicom(root / "noid-Smithers.dcm", _ramp(), StudyInstanceUID="1.2.3")
    (root / "notes-Burns.txt").write_text("Doe^Jane, not an image\n")
    whole = (root / "MRN-0012345_Doe" / "img1-Jane-chest.dcm").read_bytes()
    (root / "cut-Flanders.dcm").write_bytes(whole[: len(whole) - 3000])  # pixel data cut short
    make_dicom(root / "ct-Wiggum.dcm", _ramp(), Modality="CT", **IDENTIFIERS)
    salt_file, log = tmp_path / "keys" / "team-key-7f3a", tmp_path / "private" / "raw-paths-9c1e.tsv"
    out = tmp_path / "out"
    args = ["--source", "dicom", "--root", str(root), "--workers", "0", "--size", "32", "--no-progress",
            "--split-mode", "hash", "--val-frac", "0", "--test-frac", "0"]
    assert build.main([*args, "--out", str(out), "--salt-file", str(salt_file), "--private-log", str(log)]) == 0
    printed = capsys.readouterr().out
    assert str(log) in printed and str(salt_file) in printed
    salt = salt_file.read_text().strip().encode()
    assert len(salt) == 64 and salt_file.stat().st_mode & 0o077 == 0 and log.stat().st_mode & 0o077 == 0
    m = load_manifest(out)
    fid = lambda rel: pseudonymise(rel, salt, "f")  # noqa: E731
    reasons = {r["input_id"]: r["reason"] for r in m.data["rejects"]}
    assert reasons[fid("rgb-ACC998877.dcm")].startswith("unsupported photometric interpretation 'RGB'")
    assert reasons[fid("notes-Burns.txt")].startswith("not a DICOM file")
    assert reasons[fid("noid-Smithers.dcm")].startswith("DICOM without PatientID: choose --patient-from study")
    assert reasons[fid("cut-Flanders.dcm")].startswith("cannot decode DICOM pixel data")
    sha = {r["input_id"]: r["sha256"] for r in m.data["rejects"]}
    assert sha[fid("cut-Flanders.dcm")] == hashlib.sha256((root / "cut-Flanders.dcm").read_bytes()).hexdigest()
    assert (out / "rejects.tsv").read_text().splitlines()[0] == "input_id\tsha256\treason"
    filtered = dict(line.split("\t") for line in (out / "filtered.tsv").read_text().splitlines()[1:])
    assert filtered[fid("ct-Wiggum.dcm")] == "modality CT not selected by --modalities CR,DX"
    assert m.data["counts"] == {"inputs": 9, "written": 4, "rejected": 4, "filtered": 1}
    assert m.data["patient_key"] == {"rule": "PatientID", "counts": {"PatientID": 5}}  # incl. cut
    # The private log, outside OUT, maps every reject and filtered input back to its raw path.
    private = {line.split("\t")[0]: line.split("\t")[4] for line in log.read_text().splitlines()[1:]}
    assert private[fid("cut-Flanders.dcm")] == "cut-Flanders.dcm" and private[fid("ct-Wiggum.dcm")] == "ct-Wiggum.dcm"
    assert m.label_names == [] and verify.main([str(out)]) == 0  # no labels: empty .lbl, still a valid shard
    samples = [s for sh in m.shards("train") for s in iter_shard(sh.path)]
    by_path = {json.loads(s["json"])["source_path"]: json.loads(s["json"]) for s in samples}
    # shards carry a salted pseudonym of the file's path, never the path (folder names can identify)
    img1, img2 = "MRN-0012345_Doe/img1-Jane-chest.dcm", "MRN-0012345_Doe/Doe^Jane/img2_19450317"
    metas = {p: by_path[fid(p)] for p in (img1, img2, "Roe_Richard_CR.dcm")}
    pid = pseudonymise("MRN-0012345", salt, "d")
    assert metas[img1]["patient_id"] == metas[img2]["patient_id"] == pid
    assert metas[img1]["study_id"] == pseudonymise(IDENTIFIERS["StudyInstanceUID"], salt, "s")
    assert (metas[img1]["view"], metas[img2]["view"]) == ("PA", "LAT")
    assert (metas[img1]["sex"], metas[img1]["age"]) == ("Female", 90)  # 93 capped
    assert metas["Roe_Richard_CR.dcm"]["photometric_interpretation"] == "MONOCHROME2"
    assert json.loads((out / "patients.json").read_text()) == sorted({pid, pseudonymise("MRN-777", salt, "d")})
    components = {c for f in root.rglob("*") for c in f.relative_to(root).parts}
    components |= {c.rsplit(".", 1)[0] for c in components} | {root.name, str(root), salt_file.name, str(log)}
    headers = [*IDENTIFIERS.values(), "Doe", "Jane", "Roe^Richard", "MRN-777", "0012345", *real_ids,
               *_identifying_values(root)]
    for p, data in _all_bytes_under(out).items():
        leaked = [n for n in [*components, *headers, salt.decode()] if n.encode() in data]
        assert not leaked, f"{p.relative_to(out)} contains {leaked}"
    for s in samples:
        assert Image.open(io.BytesIO(s["jpg"])).mode == "L" and struct.unpack("<q", s["pid"])[0] in (0, 1)
    # Without --salt-file a per-user salt outside OUT is made once (0600) and reused: same pseudonyms.
    out2, out3 = tmp_path / "out2", tmp_path / "out3"
    assert build.main([*args, "--out", str(out2)]) == 0
    user_salt = default_salt_file()
    assert user_salt.is_file() and not user_salt.is_relative_to(out2) and user_salt.stat().st_mode & 0o077 == 0
    assert build.main([*args, "--out", str(out3)]) == 0
    assert (out2 / "patients.json").read_bytes() == (out3 / "patients.json").read_bytes()
    assert json.loads((out2 / "patients.json").read_text())[0] in {
        pseudonymise(i, user_salt.read_text().strip().encode(), "d") for i in ("MRN-0012345", "MRN-777")}
    assert not [p for p in out2.rglob("*") if "salt" in p.name]
    # A salt inside OUT (older versions kept it there) or readable by others is refused.
    (out3 / "pseudonym-salt.txt").write_text("x" * 64)
    assert build.main([*args, "--out", str(out3), "--overwrite"]) == 2
    assert build.main([*args, "--out", str(tmp_path / "o4"), "--salt-file", str(tmp_path / "o4" / "k")]) == 2
    assert build.main([*args, "--out", str(tmp_path / "o6"), "--private-log", str(tmp_path / "o6" / "log")]) == 2
    assert not (tmp_path / "o4" / "k").exists() and not (tmp_path / "o6" / "log").exists()
    salt_file.chmod(0o644)
    assert build.main([*args, "--out", str(tmp_path / "o5"), "--salt-file", str(salt_file)]) == 2
    assert "chmod 600" in capsys.readouterr().err


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
    (tmp_path / "salt").write_text("x" * 32)
    (tmp_path / "salt").chmod(0o600)
    args = ["--source", "dicom", "--root", str(root), "--size", "16", "--no-progress", "--salt-file",
            str(tmp_path / "salt"), "--shard-max-samples", "64"]
    assert build.main([*args, "--out", str(tmp_path / "a"), "--workers", "0"]) == 0
    assert build.main([*args, "--out", str(tmp_path / "b"), "--workers", "2"]) == 0
    files = lambda d: {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}  # noqa: E731
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert a == b
    m = load_manifest(tmp_path / "a")
    assert m.num_patients == 40 and m.data["counts"] == {"inputs": 261, "written": 260, "rejected": 1, "filtered": 0}


def _view_code(scheme: str, value: str):
    import pydicom
    item = pydicom.Dataset()
    item.CodingSchemeDesignator, item.CodeValue, item.CodeMeaning = scheme, value, "view"
    return pydicom.Sequence([item])


def test_filters_views_and_patient_key_end_to_end(tmp_path):
    """Every header filter leaves its reason in filtered.tsv or rejects.tsv; views from ViewCodeSequence;
    the patient key falls back to --patient-from and the manifest says so."""
    root = tmp_path / "arch"
    root.mkdir()
    x = _ramp(32, 40)
    common = {"StudyInstanceUID": "1.2.3.4", "PatientID": "P1"}
    make_dicom(root / "a.dcm", x, ViewCodeSequence=_view_code("SCT", "399348003"), **common)        # AP by code
    make_dicom(root / "b.dcm", x, ViewCodeSequence=_view_code("SRT", "R-10236"), **common)          # left lateral
    make_dicom(root / "c.dcm", x, ViewPosition="PA", ViewCodeSequence=_view_code("SCT", "399348003"), **common)
    make_dicom(root / "d.dcm", x, ViewCodeSequence=_view_code("SCT", "123"), BodyPartExamined="ABDOMEN", **common)
    make_dicom(root / "burned.dcm", x, BurnedInAnnotation="YES", **common)
    make_dicom(root / "mr.dcm", x, Modality="MR", **common)
    make_dicom(root / "multi.dcm", np.concatenate([x, x // 2]), NumberOfFrames=2, Rows=32, **common)
    make_dicom(root / "noid1.dcm", x, StudyInstanceUID="1.2.3.9")
    make_dicom(root / "noid2.dcm", x, StudyInstanceUID="1.2.3.9")
    salt = tmp_path / "k"
    salt.write_text("0123456789abcdef" * 2)
    salt.chmod(0o600)
    base = ["--source", "dicom", "--root", str(root), "--workers", "0", "--size", "16", "--no-progress",
            "--salt-file", str(salt), "--private-log", str(tmp_path / "log.tsv"), "--split-mode", "hash",
            "--val-frac", "0", "--test-frac", "0"]

    def built(out, *extra):
        assert build.main([*base, "--out", str(tmp_path / out), *extra]) == 0
        m = load_manifest(tmp_path / out)
        ids = {pseudonymise(p.name, b"0123456789abcdef" * 2, "f"): p.name for p in root.iterdir()}
        rej = {ids[r["input_id"]]: r["reason"] for r in m.data["rejects"]}
        filt = dict(line.split("\t") for line in (tmp_path / out / "filtered.tsv").read_text().splitlines()[1:])
        metas = {ids[json.loads(s["json"])["source_path"]]: json.loads(s["json"])
                 for sh in m.shards("train") for s in iter_shard(sh.path)}
        return m, rej, {ids[k]: v for k, v in filt.items()}, metas

    m, rej, filt, metas = built("o1")
    assert sorted(metas) == ["a.dcm", "b.dcm", "c.dcm", "d.dcm"]
    assert [metas[n]["view"] for n in ("a.dcm", "b.dcm", "c.dcm", "d.dcm")] == ["AP", "LAT", "PA", "UNKNOWN"]
    assert metas["a.dcm"]["flags"] == {"view_from": "ViewCodeSequence"}
    assert metas["d.dcm"]["flags"] == {"body_part_not_chest": "ABDOMEN"}
    assert rej["burned.dcm"].startswith("BurnedInAnnotation is YES")
    assert rej["multi.dcm"] == "multi-frame DICOM (2 frames); --frames first keeps the first"
    assert rej["noid1.dcm"].startswith("DICOM without PatientID: choose --patient-from study")
    assert filt == {"mr.dcm": "modality MR not selected by --modalities CR,DX"}
    m, rej, filt, metas = built("o2", "--frames", "first", "--allow-burned-in", "--modalities", "all",
                                "--patient-from", "study", "--body-parts", "CHEST")
    assert set(metas) == {"a.dcm", "b.dcm", "c.dcm", "burned.dcm", "mr.dcm", "multi.dcm", "noid1.dcm", "noid2.dcm"}
    assert filt == {"d.dcm": "BodyPartExamined ABDOMEN not selected by --body-parts CHEST"} and not rej
    assert metas["multi.dcm"]["flags"]["multiframe_first_of"] == 2
    assert "first_frame_of:2" in metas["multi.dcm"]["preprocessing"]
    assert metas["burned.dcm"]["flags"] == {"burned_in_annotation": True}
    assert metas["noid1.dcm"]["patient_id"] == metas["noid2.dcm"]["patient_id"] != metas["a.dcm"]["patient_id"]
    assert m.data["patient_key"] == {"rule": "PatientID, else --patient-from study",
                                     "counts": {"PatientID": 6, "StudyInstanceUID": 2}}
    assert m.data["options"]["patient_from"] == "study"
    m, rej, filt, metas = built("o3", "--patient-from", "file")
    assert metas["noid1.dcm"]["patient_id"] != metas["noid2.dcm"]["patient_id"]


def test_folder_source_leaks_no_path_or_csv_identifier(tmp_path):
    """The folder source under the same rule: file and sub-folder names, CSV patient / study values and the CSV's
    own name appear nowhere under OUT (class folder names are the labels, so they do, by design)."""
    import csv
    root = tmp_path / "export_StMary"
    rng = np.random.default_rng(0)
    files = ["pneumonia/Ward7_Bloggs/MRN-4455_chest.png", "normal/2019-06-12_Sykes.png", "normal/Nguyen_Thi.png",
             "normal/broken_Quimby.png", ".hidden_Krabappel/x_Skinner.png", "top_Milhouse.png"]
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 20), dtype=np.uint8)).save(root / rel)
    (root / "normal/broken_Quimby.png").write_bytes(b"\x89PNG truncated")
    salt = tmp_path / "team-key"
    salt.write_text("q" * 40)
    salt.chmod(0o600)
    args = ["--source", "folder", "--root", str(root), "--workers", "0", "--size", "16", "--no-progress",
            "--salt-file", str(salt), "--private-log", str(tmp_path / "paths.tsv")]
    assert build.main([*args, "--out", str(tmp_path / "o1")]) == 0
    labels = tmp_path / "cases_Wiggum_2019.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient", "study", "label"])
        w.writerow([files[0], "MRN-4455", "ACC-2019-777", "pneumonia"])
        w.writerow([files[1], "MRN-9911", "", "normal"])
        w.writerow(["../outside_Flanders.png", "MRN-1234", "", "normal"])
    assert build.main([*args, "--out", str(tmp_path / "o2"), "--labels-csv", str(labels)]) == 0
    components = {c for rel in files for c in rel.split("/")} - {"pneumonia", "normal"}
    components |= {c.rsplit(".", 1)[0] for c in components} | {root.name, labels.name, labels.stem, "outside_Flanders",
                                                                 "MRN-4455", "MRN-9911", "MRN-1234", "ACC-2019-777"}
    components = {c for c in components if c}
    for out in (tmp_path / "o1", tmp_path / "o2"):
        m = load_manifest(out)
        assert m.data["counts"]["rejected"] >= 1 and all(set(r) == {"input_id", "sha256", "reason"}
                                                         for r in m.data["rejects"])
        for p, data in _all_bytes_under(out).items():
            leaked = [n for n in components if n.encode() in data]
            assert not leaked, f"{p.relative_to(tmp_path)} contains {leaked}"
    private = (tmp_path / "paths.tsv").read_text()
    assert "../outside_Flanders.png" in private and "normal/broken_Quimby.png" not in private  # last run's log


def test_secondary_capture_radiographs_are_ingested_and_sop_classes_narrows(shared_data, tmp_path, capsys):
    """The real CR films exported as Secondary Capture (as RSNA / SIIM publish them) are written; --sop-classes
    CR,DX leaves them out, and the closing lines count the reason and name filtered.tsv, the file holding it."""
    import shutil
    root = tmp_path / "export"
    root.mkdir()
    for p in sorted((shared_data / "formats").glob("*.dcm")):
        shutil.copy(p, root / p.name)
    args = ["--source", "dicom", "--root", str(root), "--workers", "0", "--no-progress", "--patient-from", "file",
            "--salt-file", str(tmp_path / "k"), "--private-log", str(tmp_path / "log")]
    assert build.main([*args, "--out", str(tmp_path / "all")]) == 0
    assert load_manifest(tmp_path / "all").data["counts"] == {"inputs": 2, "written": 2, "rejected": 0, "filtered": 0}
    capsys.readouterr()
    assert build.main([*args, "--out", str(tmp_path / "narrow"), "--sop-classes", "CR,DX"]) == 1
    out, err = capsys.readouterr()
    tail = out.rstrip("\n").splitlines()[-2:]
    assert tail == ["  filtered 2: SOP class 1.2.840.10008.5.1.4.1.1.7 not selected by --sop-classes",
                    f"2 filtered, listed with their reasons in {tmp_path / 'narrow' / 'filtered.tsv'}"]
    assert f"reasons in {tmp_path / 'narrow' / 'filtered.tsv'}" in err and "rejects.tsv" not in err
    assert len((tmp_path / "narrow" / "filtered.tsv").read_text().splitlines()) == 3
    assert build.main([*args, "--out", str(tmp_path / "bad"), "--sop-classes", "CR,chest"]) == 2
    assert "'chest' is neither a UID" in capsys.readouterr().err


def test_predict_applies_the_ingest_acceptance_rule(shared_data):
    """eval predict (and serve, which calls it) accepts and refuses DICOMs by the same `radiograph_verdict` as
    a build: the real Secondary Capture CR is decoded, the same film relabelled CT or cut to a thumbnail is not,
    with ingest's own reason."""
    import pydicom

    from eval.predict import InputError, decode_gray
    from ingest.dicom import read_header
    from ingest.dicom_filters import DicomPolicy, judge
    data = (shared_data / "formats" / "monochrome1.dcm").read_bytes()
    assert decode_gray(data, shard_size=64, quality=90).shape == (64, 64)
    ds = pydicom.dcmread(io.BytesIO(data))
    for change, kind in ((dict(Modality="CT"), "unsupported"), (dict(Rows=8), "undecodable"),
                         (dict(SamplesPerPixel=3), "undecodable")):
        for k, v in change.items():
            setattr(ds, k, v)
        buf = io.BytesIO()
        ds.save_as(buf)
        ingest_reason = judge(read_header(io.BytesIO(buf.getvalue())), DicomPolicy()).reason
        with pytest.raises(InputError) as e:
            decode_gray(buf.getvalue(), shard_size=64, quality=90)
        assert (e.value.kind, str(e.value)) == (kind, ingest_reason) and ingest_reason
        ds = pydicom.dcmread(io.BytesIO(data))
