"""MIMIC-CXR-JPG: `files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg` with the metadata, split and chexpert CSVs.

Inputs are the metadata CSV's rows; labels (CheXpert labeler, per study) from `mimic-cxr-2.0.0-chexpert.csv`,
the official split (train / validate / test) from `mimic-cxr-2.0.0-split.csv`. Sex and age are not in
MIMIC-CXR-JPG (they live in MIMIC-IV) and stay null.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ingest.records import Record, Reject, normalise_view, parse_label
from ingest.schema import CHEXPERT_LABELS, sample_key
from ingest.sources import SourceError, SourceOptions, SourceResult, find_file, read_csv_table

METADATA_CSV = ("mimic-cxr-2.0.0-metadata.csv",)
SPLIT_CSV = ("mimic-cxr-2.0.0-split.csv",)
CHEXPERT_CSV = ("mimic-cxr-2.0.0-chexpert.csv",)
SPLIT_NAMES = {"train": "train", "validate": "val", "test": "test"}


def _csv(root: Path, names: tuple[str, ...], columns: tuple[str, ...]) -> pd.DataFrame:
    path = find_file(root, names)
    if path is None:
        raise SourceError(f"{root}: no {names[0]} (MIMIC-CXR-JPG layout expected)")
    df = read_csv_table(path)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SourceError(f"{path}: missing columns {missing}")
    return df


def image_path(subject_id: str, study_id: str, dicom_id: str) -> str:
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg"


def read(root: Path, opts: SourceOptions) -> SourceResult:
    meta = _csv(root, METADATA_CSV, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    split_df = _csv(root, SPLIT_CSV, ("dicom_id", "split"))
    chex = _csv(root, CHEXPERT_CSV, ("subject_id", "study_id", *CHEXPERT_LABELS))
    splits = dict(zip(split_df["dicom_id"], split_df["split"]))
    label_cols = [chex[c].tolist() for c in CHEXPERT_LABELS]
    study_labels: dict[tuple[str, str], list[str]] = {}
    for i, key in enumerate(zip(chex["subject_id"], chex["study_id"])):
        study_labels[key] = [col[i] for col in label_cols]
    records, rejects = [], []
    for dicom_id, subject, study, view in zip(meta["dicom_id"], meta["subject_id"], meta["study_id"],
                                              meta["ViewPosition"]):
        if not (subject.isdigit() and study.isdigit() and dicom_id):
            rejects.append(Reject(f"{subject}/{study}/{dicom_id}",
                                  "metadata row with malformed subject_id / study_id / dicom_id"))
            continue
        rel = image_path(subject, study, dicom_id)
        split = SPLIT_NAMES.get(splits.get(dicom_id, ""))
        if split is None:
            rejects.append(Reject(rel, f"dicom_id not in {SPLIT_CSV[0]} (or unknown split {splits.get(dicom_id)!r})"))
            continue
        raw = study_labels.get((subject, study))
        flags = {}
        try:
            if raw is None:
                labels = {n: None for n in CHEXPERT_LABELS}
                flags["no_labels_row"] = True
            else:
                labels = {n: parse_label(v, where=f"{CHEXPERT_CSV[0]} s{study} {n}")
                          for n, v in zip(CHEXPERT_LABELS, raw)}
        except ValueError as e:
            rejects.append(Reject(rel, str(e)))
            continue
        records.append(Record(
            key=sample_key("mimic", f"p{subject}", f"s{study}", dicom_id),
            dataset="mimic", source_path=rel, patient_id=f"p{subject}", study_id=f"s{study}",
            view=normalise_view(view), labels=labels, official_split=split, flags=flags,
        ))
    return SourceResult("mimic", CHEXPERT_LABELS, records, rejects, has_official_split=True)
