"""Source readers: turn a dataset's layout and CSVs into `Record`s (no pixels read). One module per source."""
from __future__ import annotations

import gzip
import importlib
from dataclasses import dataclass, field
from pathlib import Path

from ingest.dicom_filters import DicomPolicy
from ingest.errors import one_line
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
    force_folder: bool = False          # folder: pack the tree even when it holds another source's metadata


@dataclass
class SourceResult:
    dataset: str
    label_names: tuple[str, ...]
    records: list[Record]
    rejects: list[Reject] = field(default_factory=list)   # inputs unusable before any pixel is read
    has_official_split: bool = False
    filtered: list[Reject] = field(default_factory=list)  # excluded by a source filter (dicom: --modalities, ...)
    notes: dict = field(default_factory=dict)  # recorded in the manifest (dicom: the patient key used)
    root: Path | None = None  # the dataset folder found inside --root, when it was not --root itself


def read_source(name: str, root: Path, opts: SourceOptions) -> SourceResult:
    if name not in SOURCES:
        raise SourceError(f"unknown source {name!r} (choose from {', '.join(SOURCES)})")
    if not Path(root).is_dir():
        raise SourceError(f"{root}: --root is not a directory")
    return importlib.import_module(SOURCES[name]).read(Path(root), opts)


def read_csv_table(path: Path):
    """A dataset CSV as a pandas DataFrame of strings (blank cells stay ""); an unreadable one is a SourceError
    naming the file."""
    import pandas as pd
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise SourceError(f"{path}: unreadable CSV ({one_line(e, with_type=True)})") from None


def find_file(root: Path, names: tuple[str, ...]) -> Path | None:
    """The first of ``names`` (plain or .gz) that exists in ``root``."""
    for n in names:
        for cand in (root / n, root / (n + ".gz")):
            if cand.is_file():
                return cand
    return None


# The CSV columns that tell a CheXpert train.csv / valid.csv from any other dataset's train.csv.
CHEXPERT_MARK_COLUMNS = ("Path", "Frontal/Lateral")


def _csv_header(path: Path) -> list[str]:
    try:
        with (gzip.open(path, "rt", errors="replace") if path.name.endswith(".gz")
              else open(path, errors="replace")) as f:
            return [c.strip().strip('"') for c in f.readline().split(",")]
    except (OSError, EOFError):
        return []


def source_markers(folder: Path) -> list[tuple[str, Path]]:
    """(source, metadata file) for each public dataset whose metadata sits directly in ``folder``: CheXpert's
    train.csv / valid.csv (by their columns), NIH's Data_Entry_2017*.csv, MIMIC-CXR-JPG's mimic-cxr-2.0.0-*.csv."""
    found = []
    for name in ("train.csv", "valid.csv"):
        path = find_file(folder, (name,))
        if path is not None and all(c in _csv_header(path) for c in CHEXPERT_MARK_COLUMNS):
            found.append(("chexpert", path))
            break
    try:
        names = sorted(p.name for p in folder.iterdir())
    except OSError:
        return found
    for n in names:
        low = n.lower()
        if low.startswith("data_entry_2017") and low.endswith((".csv", ".csv.gz")):
            found.append(("nih", folder / n))
            break
    for n in names:
        if n.startswith("mimic-cxr-2.0.0-") and n.endswith((".csv", ".csv.gz")):
            found.append(("mimic", folder / n))
            break
    return found


def markers_in_tree(root: Path) -> list[tuple[str, Path]]:
    """source_markers of ``root`` and of its direct sub-folders (a dataset folder given one level up)."""
    found = source_markers(root)
    try:
        subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        subs = []
    for sub in subs:
        found += source_markers(sub)
    return found
