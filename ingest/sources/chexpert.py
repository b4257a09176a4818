"""CheXpert v1.0 / v1.0-small: `train.csv` + `valid.csv`; patient, study and view from the strictly checked path.

Official split: `valid.csv` (radiologist-labelled, patient-disjoint) becomes `test`; `train.csv` patients are
`trainval` (val is carved out of them by the patient hash with --val-frac).
"""
from __future__ import annotations

import re
from pathlib import Path

from ingest.records import Record, Reject, normalise_age, normalise_sex, normalise_view, parse_label
from ingest.schema import CHEXPERT_LABELS, sample_key
from ingest.sources import (SourceError, SourceOptions, SourceResult, find_file, read_csv_table,
                            source_markers)

PATH_PATTERN = re.compile(
    r"^(?:(?P<prefix>[^/]+)/)?(?P<part>train|valid|test)/patient(?P<patient>\d{5,})/study(?P<study>\d+)/"
    r"view(?P<view>\d+)_(?P<fl>frontal|lateral)\.jpg$"
)
REQUIRED_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
CSV_SPLITS = (("train.csv", "trainval"), ("valid.csv", "test"))


def _view(fl_column: str, appa: str, fl_name: str) -> tuple[str, str | None]:
    """(view, contradiction or None) from Frontal/Lateral, AP/PA and the file name's frontal/lateral."""
    fl = fl_column.strip().lower()
    code = appa.strip()
    if fl not in ("frontal", "lateral"):
        return "UNKNOWN", f"Frontal/Lateral={fl_column!r}"
    if fl != fl_name:
        return "UNKNOWN", f"Frontal/Lateral={fl_column} but file name says {fl_name}"
    coded = normalise_view(code) if code else None
    if fl == "lateral":
        if coded not in (None, "LAT", "UNKNOWN"):
            return "UNKNOWN", f"Frontal/Lateral=Lateral but AP/PA={code}"
        return "LAT", None
    if coded == "LAT":  # CheXpert has a few Frontal rows coded LL / RL
        return "UNKNOWN", f"Frontal/Lateral=Frontal but AP/PA={code}"
    if coded in ("PA", "AP"):
        return coded, None
    return "UNKNOWN", (f"Frontal/Lateral=Frontal but AP/PA={code}" if code else None)


# The cells as read_csv_table gives them (strings, blank = "") in almost every row of a real CSV; any other value
# takes parse_label's checked path, which alone formats an error location.
_PLAIN_LABELS = {"1.0": 1, "0.0": 0, "-1.0": -1, "1": 1, "0": 0, "-1": -1, "": None}


def _label(value, csv_path: Path, row: int, name: str):
    """parse_label(value), without building its error location for each of the millions of plain cells."""
    if value in _PLAIN_LABELS:
        return _PLAIN_LABELS[value]
    return parse_label(value, where=f"{csv_path.name} row {row + 2} {name}")


def read_csv_records(csv_path: Path, split: str) -> tuple[list[Record], list[Reject]]:
    df = read_csv_table(csv_path)
    missing = [c for c in (*REQUIRED_COLUMNS, *CHEXPERT_LABELS) if c not in df.columns]
    if missing:
        raise SourceError(f"{csv_path}: not a CheXpert CSV, missing columns {missing}")
    records, rejects = [], []
    label_cols = [df[c].tolist() for c in CHEXPERT_LABELS]
    for i, (path, sex, age, fl, appa) in enumerate(zip(*(df[c].tolist() for c in REQUIRED_COLUMNS))):
        m = PATH_PATTERN.match(path)
        if m is None:
            rejects.append(Reject(path, f"{csv_path.name} row {i + 2}: path does not match "
                                        "[prefix/]train|valid/patientNNNNN/studyN/viewN_frontal|lateral.jpg"))
            continue
        # CSV paths are relative to the folder above the CSV's (CheXpert-v1.0-small/train/...): drop the prefix.
        rel = path if m.group("prefix") is None else path.split("/", 1)[1]
        try:
            labels = {n: _label(col[i], csv_path, i, n) for n, col in zip(CHEXPERT_LABELS, label_cols)}
        except ValueError as e:
            rejects.append(Reject(rel, str(e)))
            continue
        view, contradiction = _view(fl, appa, m.group("fl"))
        patient = m.group("patient")
        study = int(m.group("study"))
        records.append(Record(
            key=sample_key("chexpert", f"p{patient}", f"s{study:03d}", int(m.group("view"))),
            dataset="chexpert", source_path=rel, patient_id=f"patient{patient}", study_id=f"study{study}",
            view=view, labels=labels, sex=normalise_sex(sex), age=normalise_age(age), official_split=split,
            flags={"view_contradiction": contradiction} if contradiction else {},
        ))
    return records, rejects


def find_root(root: Path) -> Path:
    """``root`` when it holds train.csv / valid.csv, else the one sub-folder holding CheXpert's CSVs (--root given
    as the folder above CheXpert-v1.0-small or CheXpert-v1.0)."""
    if any(find_file(root, (name,)) for name, _ in CSV_SPLITS):
        return root
    try:
        subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise SourceError(f"{root}: cannot list --root ({e.strerror})") from None
    inside = [sub for sub in subs if any(source == "chexpert" for source, _ in source_markers(sub))]
    if len(inside) > 1:
        raise SourceError(f"{root}: several CheXpert folders ({', '.join(p.name for p in inside)}); "
                          "pass the one to pack as --root")
    if not inside:
        raise SourceError(f"{root}: no train.csv or valid.csv, here or in a sub-folder (CheXpert layout expected)")
    return inside[0]


def read(root: Path, opts: SourceOptions) -> SourceResult:
    found_root = find_root(root)
    records, rejects = [], []
    for name, split in CSV_SPLITS:
        csv_path = find_file(found_root, (name,))
        if csv_path is None:
            continue
        r, j = read_csv_records(csv_path, split)
        records += r
        rejects += j
    return SourceResult("chexpert", CHEXPERT_LABELS, records, rejects, has_official_split=True,
                        root=None if found_root == root else found_root)
