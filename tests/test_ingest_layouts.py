"""Dataset layouts built in tmp_path with real images: NIH (images_00N/images, official lists), MIMIC-CXR-JPG
(files/pXX/..., three CSVs), and a folder with a labels CSV (the real figure1 multi-image patients)."""
from __future__ import annotations

import csv
import gzip
import io
import json
import re
import shutil
import struct
from collections import Counter

import numpy as np
from PIL import Image

from ingest import build, stats, verify
from ingest.schema import CHEXPERT_LABELS, NIH_LABELS, load_manifest
from ingest.shards import iter_shard


def _samples(out, split):
    return [s for sh in load_manifest(out).shards(split) for s in iter_shard(sh.path)]


def _metas(out, split):
    return {json.loads(s["json"])["source_path"]: json.loads(s["json"]) for s in _samples(out, split)}


def test_nih_layout_with_official_lists(shared_data, tmp_path):
    root = tmp_path / "nih"
    pngs = [shared_data / "formats" / "nih_00000001_000.png", shared_data / "formats" / "nih_00027426_000.png"]
    rows = [("00000001_000.png", "Cardiomegaly", 0, 1, 58, "M", "PA", "images_001"),
            ("00000001_001.png", "Cardiomegaly|Emphysema", 1, 1, 58, "M", "PA", "images_001"),
            ("00000002_000.png", "No Finding", 0, 2, 81, "M", "AP", "images_001"),
            ("00027426_000.png", "Effusion|Infiltration", 0, 27426, 40, "F", "AP", "images_012"),
            ("00027427_000.png", "Mass", 0, 27427, 33, "F", "PA", None)]  # listed, file absent
    for i, (name, *_, folder) in enumerate(rows):
        if folder:
            (root / folder / "images").mkdir(parents=True, exist_ok=True)
            shutil.copy(pngs[i % 2], root / folder / "images" / name)
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                    "View Position", "OriginalImage[Width", "Height]"])
        w.writerows([r[:7] + (512, 512) for r in rows])
    (root / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000002_000.png\n")
    (root / "test_list.txt").write_text("00027426_000.png\n00027427_000.png\n")
    out = tmp_path / "out"
    assert build.main(["--source", "nih", "--root", str(root), "--out", str(out), "--workers", "0", "--no-progress",
                       "--val-frac", "0", "--size", "128"]) == 0
    m = load_manifest(out)
    assert m.label_names == list(NIH_LABELS)
    assert [r["reason"] for r in m.data["rejects"]] == ["missing file named in Data_Entry_2017_v2020.csv"]
    assert (m.num_samples("train"), m.num_samples("val"), m.num_samples("test")) == (3, 0, 1)
    test = _samples(out, "test")[0]
    meta = json.loads(test["json"])
    assert meta["source_path"] == "images_012/images/00027426_000.png" and meta["sex"] == "Female"
    lbl = dict(zip(NIH_LABELS, struct.unpack("<14f", test["lbl"])))
    assert lbl["Effusion"] == lbl["Infiltration"] == 1.0 and sum(lbl.values()) == 2.0
    train = _metas(out, "train")
    assert all(v == 0 for v in train["images_001/images/00000002_000.png"]["labels"].values())  # No Finding
    assert train["images_001/images/00000001_001.png"]["study_id"] == "followup1"
    assert verify.main([str(out)]) == 0


def _gz_csv(path, header, rows):
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_mimic_layout(shared_data, tmp_path):
    root = tmp_path / "mimic-cxr-jpg"
    src = sorted((shared_data / "pneumonia-mini" / "Normal").glob("*.jpeg"))
    images = [  # dicom_id, subject, study, view, split
        ("aa11", "10000032", "50414267", "PA", "train"), ("bb22", "10000032", "50414267", "LATERAL", "train"),
        ("cc33", "10000764", "57375967", "AP", "validate"), ("dd44", "10000898", "50771383", "PA", "test"),
        ("ee55", "10000898", "54205396", "AP", "test"), ("ff66", "10000935", "51178377", "PA", None),
    ]
    for i, (dicom_id, subject, study, *_rest) in enumerate(images):
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True, exist_ok=True)
        if dicom_id != "ee55":  # listed in the metadata, file missing
            shutil.copy(src[i], folder / f"{dicom_id}.jpg")
    _gz_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz",
            ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"],
            [(d, s, st, v, 300, 400) for d, s, st, v, _ in images])
    _gz_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
            [(d, st, s, sp) for d, s, st, _, sp in images if sp])
    labels = {"50414267": {"Cardiomegaly": "1.0", "Edema": "-1.0", "No Finding": ""},
              "57375967": {"No Finding": "1.0"}, "50771383": {"Pneumonia": "0.0"}}
    _gz_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *CHEXPERT_LABELS],
            [(s, st, *(labels[st].get(n, "") for n in CHEXPERT_LABELS)) for _, s, st, *_ in images if st in labels])
    out = tmp_path / "out"
    assert build.main(["--source", "mimic", "--root", str(root), "--out", str(out), "--workers", "2", "--no-progress",
                       "--size", "64", "--views", "frontal"]) == 0
    m = load_manifest(out)
    assert m.data["counts"] == {"inputs": 6, "written": 3, "rejected": 2, "filtered": 1}
    reasons = sorted(r["reason"] for r in m.data["rejects"])
    assert reasons[0].startswith("dicom_id not in mimic-cxr-2.0.0-split.csv") and reasons[1] == "missing file"
    assert [m.num_samples(s) for s in ("train", "val", "test")] == [1, 1, 1]  # official split honoured
    train = _metas(out, "train")["files/p10/p10000032/s50414267/aa11.jpg"]
    assert train["labels"]["Cardiomegaly"] == 1 and train["labels"]["Edema"] == -1 \
        and train["labels"]["No Finding"] is None
    assert train["view"] == "PA" and train["patient_id"] == "p10000032" and train["study_id"] == "s50414267"
    assert _samples(out, "train")[0]["__key__"] == "mimic-p10000032-s50414267-vaa11"
    assert verify.main([str(out)]) == 0


def test_folder_with_labels_csv_on_figure1(shared_data, tmp_path, capsys):
    root = shared_data / "figure1"
    with open(root / "metadata.csv", newline="", encoding="latin-1") as f:
        meta = {r["patientid"]: r for r in csv.DictReader(f)}
    names = ["COVID-00003a.jpg", "COVID-00003b.jpg", "COVID-00012.jpg", "COVID-00015a.png", "COVID-00039a.jpg",
             "COVID-00039b.jpg", "COVID-00039c.jpg", "COVID-00040a.jpg", "COVID-00040b.jpg", "COVID-00048.png",
             "COVID-00001.jpg", "COVID-99999.jpg"]  # the last is listed but absent
    labels_csv = tmp_path / "labels.csv"
    with open(labels_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient", "view", "COVID-19"])
        for n in names:
            stem = n.rsplit(".", 1)[0]
            row = meta.get(stem, {"finding": "", "view": ""})
            w.writerow([f"images/{n}", re.sub(r"[a-z]$", "", stem), row["view"],
                        "1" if row["finding"] == "COVID-19" else ""])
    out = tmp_path / "out"
    assert build.main(["--source", "folder", "--root", str(root), "--out", str(out), "--labels-csv", str(labels_csv),
                       "--dataset-name", "figure1", "--workers", "0", "--no-progress", "--size", "96",
                       "--val-frac", "0", "--test-frac", "0"]) == 0
    m = load_manifest(out)
    assert m.label_names == ["COVID-19"] and m.data["datasets"] == ["figure1"]
    # folder paths and CSV patient ids may identify: OUT shows salted pseudonyms (salt kept outside OUT)
    from ingest.pseudonym import default_salt_file, pseudonymise
    salt = default_salt_file().read_text().strip().encode()
    fid = lambda rel: pseudonymise(rel, salt, "f")  # noqa: E731
    assert [(r["input_id"], r["reason"]) for r in m.data["rejects"]] == [
        (fid("images/COVID-99999.jpg"), "missing file")]
    metas = {n: _metas(out, "train")[fid(n)] for n in (f"images/{n}" for n in names[:-1])}
    # The patient table is fixed before decoding (the .pid bytes depend on it), so it keeps the row of
    # COVID-99999 whose only image was rejected; the split counts only patients with written samples.
    assert len(metas) == 11 and m.num_patients == 8 and m.data["splits"]["train"]["num_patients"] == 7
    assert metas["images/COVID-00003b.jpg"]["patient_id"] == pseudonymise("COVID-00003", salt, "p")
    assert metas["images/COVID-00003b.jpg"]["view"] == "AP"
    assert metas["images/COVID-00015a.png"]["labels"] == {"COVID-19": 1}
    assert metas["images/COVID-00003a.jpg"]["labels"] == {"COVID-19": None}  # blank: not mentioned, not 0
    assert metas["images/COVID-00001.jpg"]["photometric_interpretation"] == "RGB"
    assert metas["images/COVID-00048.png"]["original_width"] == 224
    for s in _samples(out, "train"):
        assert min(Image.open(io.BytesIO(s["jpg"])).size) == 96
    st = stats.collect(out)["splits"]["train"]
    per_patient = Counter(re.sub(r"[a-z]$", "", n.rsplit(".", 1)[0]) for n in names[:-1])
    multi = [c for c in per_patient.values() if c >= 2]
    assert (st["patients"], st["patients_2plus"], st["images_of_patients_2plus"]) \
        == (len(per_patient), len(multi), sum(multi))
    assert len(multi) == 3
    lbl = [struct.unpack("<f", s["lbl"])[0] for s in _samples(out, "train")]
    assert sum(np.isnan(lbl)) == sum(v["labels"]["COVID-19"] is None for v in metas.values()) > 0


def _nih_rows(shared_data, n):
    with gzip.open(shared_data / "metadata" / "nih_data_entry_2017_v2020.csv.gz", "rt", newline="") as f:
        reader = csv.reader(f)
        return [next(reader) for _ in range(n + 1)]  # header + n rows


def test_folder_source_follows_symlinks_and_reports_loops(shared_data, tmp_path):
    """Class folders and films linked from a store elsewhere (as hospital exports often are): all followed,
    a film linked under two names counted once per path, a link back to its own folder reported, not walked."""
    store = tmp_path / "store"
    for cls in ("BacterialPneumonia", "Normal"):
        (store / cls).mkdir(parents=True)
        for src in sorted((shared_data / "pneumonia-mini" / cls).glob("*.jpeg"))[:3]:
            Image.open(src).convert("L").save(store / cls / (src.stem + ".png"))
    root = tmp_path / "root"
    (root / "Pneumonia").mkdir(parents=True)
    (root / "Normal").symlink_to(store / "Normal", target_is_directory=True)  # a linked class folder
    films = sorted((store / "BacterialPneumonia").iterdir())
    (root / "Pneumonia" / "a.png").symlink_to(films[0])
    (root / "Pneumonia" / "same-film-again.png").symlink_to(films[0])
    (root / "Pneumonia" / "batch2").symlink_to(store / "BacterialPneumonia", target_is_directory=True)
    (root / "Pneumonia" / "batch2-loop").symlink_to(root / "Pneumonia", target_is_directory=True)
    out = tmp_path / "out"
    assert build.main(["--source", "folder", "--root", str(root), "--out", str(out), "--workers", "0",
                       "--no-progress", "--size", "32", "--val-frac", "0", "--test-frac", "0"]) == 0
    m = load_manifest(out)
    assert m.label_names == ["Normal", "Pneumonia"]
    # 3 linked Normal films; Pneumonia: 2 file links + 3 films in the linked batch2 folder
    assert m.data["counts"] == {"inputs": 9, "written": 8, "rejected": 1, "filtered": 0}
    from ingest.pseudonym import default_salt_file, pseudonymise
    salt = default_salt_file().read_text().strip().encode()
    [loop] = m.data["rejects"]
    assert loop["input_id"] == pseudonymise("Pneumonia/batch2-loop", salt, "f")
    assert loop["reason"].startswith("symlink loop")
    labels = Counter(tuple(meta["labels"].items()) for meta in _metas(out, "train").values())
    assert labels == {(("Normal", 1), ("Pneumonia", 0)): 3, (("Normal", 0), ("Pneumonia", 1)): 5}
    assert verify.main([str(out)]) == 0


def test_folder_source_refuses_nih_and_mimic_trees(shared_data, tmp_path, capsys):
    nih = tmp_path / "nih"
    (nih / "images_001" / "images").mkdir(parents=True)
    shutil.copy(shared_data / "formats" / "nih_00000001_000.png", nih / "images_001" / "images" / "00000001_000.png")
    with open(nih / "Data_Entry_2017_v2020.csv", "w", newline="") as f:
        csv.writer(f).writerows(_nih_rows(shared_data, 5))
    mimic = tmp_path / "above" / "mimic-cxr-jpg"  # given one level up
    (mimic / "files" / "p10" / "p10000032" / "s50414267").mkdir(parents=True)
    _gz_csv(mimic / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "subject_id", "study_id", "ViewPosition"],
            [("aa11", "10000032", "50414267", "PA")])
    for root, source in ((nih, "nih"), (tmp_path / "above", "mimic")):
        out = tmp_path / f"out-{source}"
        assert build.main(["--source", "folder", "--root", str(root), "--out", str(out), "--workers", "0",
                           "--no-progress"]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and f"use --source {source}" in err[0] and not out.exists()
