"""`ingest scan`: header-only counts and verdicts agree with what build-shards then does, decoders are reported
per transfer syntax, and the report names no file."""
from __future__ import annotations

import json
import shutil

import numpy as np

from ingest import build, scan
from ingest.schema import load_manifest
from test_ingest_dicom import make_dicom


def test_scan_counts_match_build(tmp_path, capsys):
    from pydicom.data import get_testdata_file
    root = tmp_path / "Smith_John_archive"
    root.mkdir()
    x = np.tile(np.linspace(0, 4095, 40), (32, 1)).astype(np.uint16)
    make_dicom(root / "pa.dcm", x, ViewPosition="PA", PatientID="A", StudyInstanceUID="1.2")
    make_dicom(root / "lat.dcm", x, ViewPosition="LL", PatientID="A", StudyInstanceUID="1.2", BodyPartExamined="CHEST")
    make_dicom(root / "ct.dcm", x, Modality="CT", PatientID="A", StudyInstanceUID="1.2")
    make_dicom(root / "burn.dcm", x, BurnedInAnnotation="YES", PatientID="A", StudyInstanceUID="1.2")
    make_dicom(root / "noid.dcm", x, StudyInstanceUID="1.3")
    shutil.copy(get_testdata_file("test-SR.dcm", download=False), root / "report.dcm")
    shutil.copy(get_testdata_file("MR_small_jpeg_ls_lossless.dcm", download=False), root / "mr.dcm")
    (root / "readme.txt").write_text("not dicom")
    dicomdir = get_testdata_file("MR_small.dcm", download=False).replace("MR_small.dcm", "dicomdirtests/DICOMDIR")
    shutil.copy(dicomdir, root / "DICOMDIR")  # a PACS / CD export's index: no image
    json_path = tmp_path / "scan.json"
    assert scan.main(["--source", "dicom", "--root", str(root), "--workers", "0", "--json", str(json_path)]) == 0
    printed = capsys.readouterr().out
    r = json.loads(json_path.read_text())
    c = r["counts"]
    assert r["files"] == 9 and c["outcome"] == {"would write": 2, "filtered": 4, "rejected": 3}
    assert c["modality"] == {"DX": 4, "MR": 1, "SR": 1, "CT": 1, "(missing)": 1}
    assert c["view"] == {"PA (from ViewPosition)": 1, "LAT (from ViewPosition)": 1}
    assert c["rejected"] == {"not a DICOM file": 1, "BurnedInAnnotation is YES": 1, "DICOM without PatientID": 1}
    assert set(c["filtered"]) == {"modality CT not selected by --modalities CR,DX",
                                  "modality MR not selected by --modalities CR,DX",
                                  "SOP class 1.2.840.10008.5.1.4.1.1.88.33 is a structured report / key object "
                                  "selection, not a radiograph",
                                  "SOP class 1.2.840.10008.1.3.10 is a media directory"}  # grouped: cut at " ("
    jls = next(k for k in r["decoders"] if k.startswith("JPEG-LS Lossless"))
    assert r["decoders"][jls].startswith("installed") and "decoder: installed" in printed
    text = printed + json_path.read_text()
    assert not [n for n in ("Smith_John", "pa.dcm", "noid", "readme", str(tmp_path)) if n in text]
    # build-shards does what scan said it would
    salt = tmp_path / "k"
    salt.write_text("s" * 32)
    salt.chmod(0o600)
    assert build.main(["--source", "dicom", "--root", str(root), "--out", str(tmp_path / "out"), "--workers", "0",
                       "--no-progress", "--salt-file", str(salt), "--private-log", str(tmp_path / "log")]) == 0
    counts = load_manifest(tmp_path / "out").data["counts"]
    assert (counts["written"], counts["filtered"], counts["rejected"]) == (2, 4, 3)
    assert scan.main(["--source", "dicom", "--root", str(tmp_path / "nowhere")]) == 2
    assert scan.main(["--source", "dicom", "--root", str(root), "--modalities", ","]) == 2


def test_linked_dicom_folders_are_followed_and_loops_rejected(tmp_path):
    x = np.tile(np.linspace(0, 4095, 40), (32, 1)).astype(np.uint16)
    store = tmp_path / "pacs-export"
    store.mkdir()
    make_dicom(store / "pa.dcm", x, ViewPosition="PA", PatientID="A", StudyInstanceUID="1.2")
    make_dicom(store / "ap.dcm", x, ViewPosition="AP", PatientID="B", StudyInstanceUID="1.3")
    root = tmp_path / "archive"
    root.mkdir()
    (root / "2024").symlink_to(store, target_is_directory=True)
    (store / "again").symlink_to(store, target_is_directory=True)  # a loop, reached through the link
    r = scan.collect(root, 0, scan.policy_from_args(scan.build_parser().parse_args(
        ["--source", "dicom", "--root", str(root)])))
    assert r["files"] == 2 and r["counts"]["outcome"] == {"would write": 2, "rejected": 1}
    assert list(r["counts"]["rejected"]) == ["symlink loop"]
    salt = tmp_path / "k"
    salt.write_text("s" * 32)
    salt.chmod(0o600)
    assert build.main(["--source", "dicom", "--root", str(root), "--out", str(tmp_path / "out"), "--workers", "0",
                       "--no-progress", "--salt-file", str(salt), "--private-log", str(tmp_path / "log")]) == 0
    m = load_manifest(tmp_path / "out")
    assert (m.data["counts"]["written"], m.data["counts"]["rejected"]) == (2, 1)
    assert m.data["rejects"][0]["reason"].startswith("symlink loop")
