"""Source readers on the real CheXpert and NIH CSVs at full scale (exact counts derived here independently with
the csv module), plus the split rules."""
from __future__ import annotations

import csv
import gzip
from collections import Counter

import pytest

from ingest.records import normalise_age, normalise_view, parse_label, parse_views_option
from ingest.schema import CHEXPERT_LABELS, NIH_LABELS
from ingest.sources import SourceError, SourceOptions, read_source
from ingest.splits import assign_splits, hashed_split

CHEXPERT_STATE = {"1.0": 1, "0.0": 0, "-1.0": -1, "": None}


def _rows(path):
    with gzip.open(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def chexpert(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("chexpert")
    (root / "train.csv.gz").symlink_to(shared_data / "metadata" / "chexpert_train.csv.gz")
    return _rows(shared_data / "metadata" / "chexpert_train.csv.gz"), read_source("chexpert", root, SourceOptions())


def test_chexpert_full_csv_counts(chexpert):
    rows, res = chexpert
    assert len(rows) == 223_414
    assert res.rejects == [] and len(res.records) == len(rows)
    assert res.label_names == CHEXPERT_LABELS
    patients = {r["Path"].split("/")[2] for r in rows}
    assert len({r.patient_id for r in res.records}) == len(patients) == 64_540
    assert len({r.key for r in res.records}) == len(rows)
    # Views: Frontal rows take AP / PA; the Frontal rows coded LL / RL are contradictions (UNKNOWN + flag).
    expect = Counter()
    for r in rows:
        if r["Frontal/Lateral"] == "Lateral":
            expect["LAT"] += 1
        elif r["AP/PA"] in ("AP", "PA"):
            expect[r["AP/PA"]] += 1
        else:
            expect["UNKNOWN"] += 1
    got = Counter(r.view for r in res.records)
    assert got == expect
    assert got["LAT"] == 32_387 and got["UNKNOWN"] == sum(r["AP/PA"] in ("LL", "RL") for r in rows) == 17
    flagged = [r for r in res.records if "view_contradiction" in r.flags]
    assert len(flagged) == 17 and all("AP/PA=L" in r.flags["view_contradiction"]
                                      or "AP/PA=R" in r.flags["view_contradiction"] for r in flagged)
    # Labels exactly as in the CSV: blank stays None (never 0), -1 stays -1.
    for name in CHEXPERT_LABELS:
        want = Counter(CHEXPERT_STATE[r[name]] for r in rows)
        assert Counter(rec.labels[name] for rec in res.records) == want, name
    assert Counter(rec.labels["No Finding"] for rec in res.records)[None] == 201_033
    assert Counter(r.sex for r in res.records) == Counter({"Male": 132_636, "Female": 90_777, None: 1})
    assert {r.official_split for r in res.records} == {"trainval"}
    first = res.records[0] if res.records[0].source_path.endswith("patient00001/study1/view1_frontal.jpg") else \
        next(r for r in res.records if r.source_path == "train/patient00001/study1/view1_frontal.jpg")
    assert (first.key, first.patient_id, first.study_id, first.age, first.view) == \
        ("chexpert-p00001-s001-v1", "patient00001", "study1", 68, "AP")


def test_chexpert_bad_path_and_bad_label_are_rejected(tmp_path):
    header = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_LABELS)
    blank = "," * (len(CHEXPERT_LABELS) - 1)
    (tmp_path / "valid.csv").write_text("\n".join([
        header,
        "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg,Male,73,Frontal,AP,1.0" + blank,
        "CheXpert-v1.0-small/valid/patient64541/study1/../view1_frontal.jpg,Male,73,Frontal,AP,1.0" + blank,
        "CheXpert-v1.0-small/valid/patient64542/study1/view1_frontal.jpg,Male,73,Frontal,AP,2.0" + blank,
    ]) + "\n")
    res = read_source("chexpert", tmp_path, SourceOptions())
    assert [r.source_path for r in res.records] == ["valid/patient64541/study1/view1_frontal.jpg"]
    assert res.records[0].official_split == "test"
    reasons = sorted(r.reason for r in res.rejects)
    assert "does not match" in reasons[0] and "'2.0' is not 1, 0, -1 or blank" in reasons[1]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="no train.csv"):
        read_source("chexpert", empty, SourceOptions())


def test_nih_full_csv_counts(shared_data, tmp_path, monkeypatch):
    import ingest.sources.nih as nih
    src = shared_data / "metadata" / "nih_data_entry_2017_v2020.csv.gz"
    (tmp_path / "Data_Entry_2017_v2020.csv.gz").symlink_to(src)
    rows = _rows(src)
    # No images here: pretend every listed file sits in images_001/images/ (the reader's file index).
    monkeypatch.setattr(nih, "index_images",
                        lambda root: {r["Image Index"]: f"images_001/images/{r['Image Index']}" for r in rows})
    res = read_source("nih", tmp_path, SourceOptions())
    assert len(rows) == 112_120 and len(res.records) == len(rows) and res.rejects == []
    assert len({r.patient_id for r in res.records}) == len({r["Patient ID"] for r in rows}) == 30_805
    assert (Counter(r.view for r in res.records) == Counter(r["View Position"] for r in rows)
            == Counter(PA=67_310, AP=44_810))
    findings = Counter(f for r in rows for f in r["Finding Labels"].split("|"))
    for name in NIH_LABELS:
        assert sum(rec.labels[name] == 1 for rec in res.records) == findings[name], name
        assert all(rec.labels[name] in (0, 1) for rec in res.records)
    no_finding = [rec for rec in res.records if not any(rec.labels.values())]
    assert len(no_finding) == findings["No Finding"] == 60_361
    # The study is the Follow-up # column, not the file name (00000003_000.png is follow-up 7).
    rec = next(r for r in res.records if r.source_path.endswith("00000003_000.png"))
    assert (rec.study_id, rec.key, rec.patient_id, rec.sex) == (
        "followup7", "nih-p00000003-s007-v1", "00000003", "Female")
    assert len({r.key for r in res.records}) == len(rows)
    assert not res.has_official_split


def test_nih_official_lists_and_missing_files(shared_data, tmp_path):
    (tmp_path / "images_001" / "images").mkdir(parents=True)
    (tmp_path / "images_002" / "images").mkdir(parents=True)
    (tmp_path / "images_001" / "images" / "00000001_000.png").write_bytes(b"x")
    (tmp_path / "images_002" / "images" / "00000002_000.png").write_bytes(b"x")
    (tmp_path / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
        "00000001_000.png,Cardiomegaly|Effusion,0,1,57,M,PA\n00000002_000.png,No Finding,0,2,80,M,AP\n"
        "00000003_000.png,Hernia,0,3,74,F,PA\n")
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n")
    (tmp_path / "test_list.txt").write_text("00000002_000.png\n00000003_000.png\n")
    res = read_source("nih", tmp_path, SourceOptions())
    assert [(r.source_path, r.official_split) for r in res.records] == [
        ("images_001/images/00000001_000.png", "trainval"), ("images_002/images/00000002_000.png", "test")]
    assert res.records[0].labels["Effusion"] == 1 and res.records[0].labels["Atelectasis"] == 0
    assert [(r.source_path, r.reason) for r in res.rejects] == [
        ("00000003_000.png", "missing file named in Data_Entry_2017.csv")]
    (tmp_path / "test_list.txt").unlink()
    with pytest.raises(SourceError, match="needs both"):
        read_source("nih", tmp_path, SourceOptions())


def test_normalisers():
    assert [normalise_view(v) for v in ("PA", "AP", "LL", "LATERAL", "AP AXIAL", "LAO", None, "")] == \
        ["PA", "AP", "LAT", "LAT", "AP", "UNKNOWN", "UNKNOWN", "UNKNOWN"]
    assert [normalise_age(v) for v in ("067Y", "011M", "95", 42.0, "", None, "x")] == [67, 0, 90, 42, None, None, None]
    assert [parse_label(v, where="t") for v in ("1.0", "0", "-1.0", "", None)] == [1, 0, -1, None, None]
    with pytest.raises(ValueError, match="row 3"):
        parse_label("0.5", where="row 3")
    assert parse_views_option("frontal") == {"PA", "AP", "UNKNOWN"}
    assert parse_views_option("pa,ap") == {"PA", "AP"}
    with pytest.raises(ValueError):
        parse_views_option("sideways")


def test_hash_split_is_patient_level_deterministic_and_sized(chexpert):
    _, res = chexpert
    records = res.records
    a = assign_splits(records, mode="hash", seed=3, val_frac=0.1, test_frac=0.2)
    b = assign_splits(list(reversed(records)), mode="hash", seed=3, val_frac=0.1, test_frac=0.2)
    assert a == b  # independent of record order
    n = len(a)
    share = Counter(a.values())
    assert abs(share["test"] / n - 0.2) < 0.01 and abs(share["val"] / n - 0.1) < 0.01
    c = assign_splits(records, mode="hash", seed=4, val_frac=0.1, test_frac=0.2)
    assert sum(a[p] != c[p] for p in a) > 0.2 * n  # the seed matters
    official = assign_splits(records, mode="official", seed=3, val_frac=0.1, test_frac=0.2)
    assert set(official.values()) == {"train", "val"}  # train.csv is a train+val pool; no test from it
    assert hashed_split("patient00001", 3, 0.1, 0.2) == a["patient00001"]
