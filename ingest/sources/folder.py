"""Image folders: labels from class sub-folders (one-hot over the sorted folder names), or a labels CSV
(`--labels-csv`, see labels_csv.py). Without a patient column each image is its own patient. File names and
CSV patient / study values may identify: OUT sees only their salted pseudonyms."""
from __future__ import annotations

import os
from pathlib import Path

from ingest.pseudonym import pseudonymise
from ingest.records import Record, Reject, normalise_age, normalise_sex, normalise_view
from ingest.schema import sample_key
from ingest.sources import SourceError, SourceOptions, SourceResult
from ingest.sources.labels_csv import read_labels_csv


def path_id(rel: str, salt: bytes) -> str:
    """A stable opaque id for an image without a patient (file names can carry identifiers)."""
    return pseudonymise(rel, salt, "i")


def walk_files(folder: Path, root: Path) -> list[str]:
    """Every regular file under ``folder`` as a sorted POSIX path relative to ``root``."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for f in filenames:
            out.append((Path(dirpath) / f).relative_to(root).as_posix())
    return sorted(out)


def _from_class_folders(root: Path, dataset: str, salt: bytes) -> SourceResult:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SourceError(f"{root}: no class sub-folders (and no --labels-csv)")
    records, rejects = [], []
    for rel in walk_files(root, root):
        if "/" not in rel:
            rejects.append(Reject(rel, "file at the top of --root, outside any class folder"))
            continue
        cls = rel.split("/", 1)[0]
        if cls not in classes:  # a hidden folder
            rejects.append(Reject(rel, "in a hidden folder, not a class folder"))
            continue
        pid = path_id(rel, salt)
        records.append(Record(key=sample_key(dataset, pid, "s0", 0), dataset=dataset, source_path=rel,
                              patient_id=pid, study_id="s0", view="UNKNOWN",
                              labels={c: int(c == cls) for c in classes}))
    return SourceResult(dataset, tuple(classes), records, rejects)


def _from_csv(root: Path, csv_path: Path, dataset: str, salt: bytes) -> SourceResult:
    names, rows = read_labels_csv(csv_path)
    records, rejects, per_study = [], [], {}
    for row in rows:
        if row.error is not None:
            rejects.append(Reject(row.path, row.error))
            continue
        if row.path.startswith("/") or ".." in row.path.split("/"):
            rejects.append(Reject(row.path, f"--labels-csv line {row.line}: path must be relative to --root"))
            continue
        patient = pseudonymise(row.patient, salt, "p") if row.patient else path_id(row.path, salt)
        study = pseudonymise(row.study, salt, "s") if row.study else "s0"
        n = per_study[(patient, study)] = per_study.get((patient, study), -1) + 1
        records.append(Record(key=sample_key(dataset, patient, study, n), dataset=dataset, source_path=row.path,
                              patient_id=patient, study_id=study, view=normalise_view(row.view),
                              labels=row.labels, sex=normalise_sex(row.sex), age=normalise_age(row.age)))
    return SourceResult(dataset, names, records, rejects)


def read(root: Path, opts: SourceOptions) -> SourceResult:
    if not opts.pseudonym_salt:
        raise SourceError("the folder source needs a pseudonym salt (internal error: build sets one)")
    dataset = opts.dataset_name or "folder"
    if opts.labels_csv is not None:
        return _from_csv(root, Path(opts.labels_csv), dataset, opts.pseudonym_salt)
    return _from_class_folders(root, dataset, opts.pseudonym_salt)
