"""Source readers: turn a dataset's layout and CSVs into `Record`s (no pixels read). One module per source."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from ingest.dicom_filters import DicomPolicy
from ingest.records import Record, Reject

# --source name -> module exposing read(root: Path, opts: SourceOptions) -> SourceResult
SOURCES = {
    "chexpert": "ingest.sources.chexpert",
    "nih": "ingest.sources.nih",
    "mimic": "ingest.sources.mimic",
    "dicom": "ingest.sources.dicom_tree",
    "folder": "ingest.sources.folder",
}


class SourceError(ValueError):
    """The dataset layout itself is unusable (no CSV, wrong columns): stops the run with a one-line reason."""


@dataclass
class SourceOptions:
    labels_csv: Path | None = None      # folder / dicom: CSV with path [+ patient] + label columns
    pseudonym_salt: bytes = b""         # dicom / folder: salt of the identifier and path pseudonyms
    dataset_name: str | None = None     # folder / dicom: the `dataset` field (default: the source name)
    workers: int = 0                    # dicom: processes reading headers (0: in-process)
    dicom: DicomPolicy = field(default_factory=DicomPolicy)  # dicom: header filters and patient key


@dataclass
class SourceResult:
    dataset: str
    label_names: tuple[str, ...]
    records: list[Record]
    rejects: list[Reject] = field(default_factory=list)   # inputs unusable before any pixel is read
    has_official_split: bool = False
    filtered: list[Reject] = field(default_factory=list)  # excluded by a source filter (dicom: --modalities, ...)
    notes: dict = field(default_factory=dict)  # recorded in the manifest (dicom: the patient key used)


def read_source(name: str, root: Path, opts: SourceOptions) -> SourceResult:
    if name not in SOURCES:
        raise SourceError(f"unknown source {name!r} (choose from {', '.join(SOURCES)})")
    if not Path(root).is_dir():
        raise SourceError(f"{root}: --root is not a directory")
    return importlib.import_module(SOURCES[name]).read(Path(root), opts)


def find_file(root: Path, names: tuple[str, ...]) -> Path | None:
    """The first of ``names`` (plain or .gz) that exists in ``root``."""
    for n in names:
        for cand in (root / n, root / (n + ".gz")):
            if cand.is_file():
                return cand
    return None
